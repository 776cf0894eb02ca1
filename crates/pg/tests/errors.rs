//! The one error shape against a real server: PostgreSQL's own words (severity,
//! SQLSTATE, message, detail, hint, position, context) survive, each once; and the
//! canonical settings give the same text forms under any session's settings.

use sanare_pg::{PgResultExt, describe_pg_error};

#[tokio::test]
async fn a_server_error_keeps_message_detail_hint_sqlstate_and_position() {
    let db = sanare_testing::test_db().await;
    let c = db.connect().await;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY);
         INSERT INTO t VALUES (1);
         CREATE FUNCTION boom() RETURNS int LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'the answer is wrong' USING ERRCODE = '22023',
             DETAIL = 'expected 42', HINT = 'ask again'; END $$;",
    )
    .await
    .unwrap();

    let err = c
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .context("inserting a row")
        .unwrap_err();
    let s = err.server().expect("the server's words");
    assert_eq!(s.code, "23505");
    assert_eq!(s.severity, "ERROR");
    assert_eq!(s.detail.as_deref(), Some("Key (id)=(1) already exists."));
    assert_eq!(s.constraint.as_deref(), Some("t_pkey"));
    assert_eq!(s.table.as_deref(), Some("t"));
    let text = err.to_string();
    assert!(
        text.starts_with(
            "database error while inserting a row: ERROR: duplicate key value violates unique \
             constraint \"t_pkey\" (SQLSTATE 23505)\nDETAIL: Key (id)=(1) already exists."
        ),
        "{text}"
    );
    assert!(!text.contains("db error"), "{text}");
    assert_eq!(text.matches("duplicate key").count(), 1, "{text}");

    let err = c
        .query("SELECT nope FROM t", &[])
        .await
        .context("reading")
        .unwrap_err();
    let s = err.server().unwrap();
    assert_eq!(s.code, "42703");
    assert_eq!(s.position, Some(8));
    assert!(
        err.to_string().contains("(SQLSTATE 42703, at character 8)"),
        "{err}"
    );

    let err = c
        .query("SELECT boom()", &[])
        .await
        .context("calling boom")
        .unwrap_err();
    let s = err.server().unwrap();
    assert_eq!(s.code, "22023");
    assert_eq!(s.hint.as_deref(), Some("ask again"));
    assert!(
        s.context.as_deref().unwrap_or("").contains("boom()"),
        "{s:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("\nDETAIL: expected 42\nHINT: ask again\nCONTEXT: PL/pgSQL function boom()"),
        "{text}"
    );
    assert!(err.report().server.is_some());
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn a_connection_error_is_described_whole() {
    let err = tokio_postgres::connect("postgres://nobody@127.0.0.1:1/x", tokio_postgres::NoTls)
        .await
        .err()
        .expect("nothing listens on port 1");
    let text = describe_pg_error(&err);
    assert!(text.starts_with("error connecting to server: "), "{text}");
    assert!(text.len() > "error connecting to server: ".len(), "{text}");
    let mapped = sanare_pg::map_pg_error("connecting", err);
    assert!(mapped.is_retryable());
    assert!(mapped.server().is_none());
    assert!(mapped.to_string().ends_with(&text), "{mapped}");
}

#[tokio::test]
async fn canonical_settings_print_the_same_text_under_any_session_settings() {
    let db = sanare_testing::test_db().await;
    let c = db.connect().await;
    let probe = "SELECT timestamptz '2024-02-29 23:59:59.5+00'::text, interval '1 year 2 days 3 seconds'::text, \
                 '\\x00ff'::bytea::text, (0.1::float8)::text, 12.5::money::text";
    c.batch_execute(&sanare_pg::canonical_settings_sql())
        .await
        .unwrap();
    let row = c.query_one(probe, &[]).await.unwrap();
    let canonical: Vec<String> = (0..5).map(|i| row.get(i)).collect();
    assert_eq!(canonical[0], "2024-02-29 23:59:59.5+00");
    c.batch_execute(
        "RESET ALL; SET TimeZone = 'Pacific/Chatham'; SET DateStyle = 'SQL, DMY';
         SET IntervalStyle = 'sql_standard'; SET bytea_output = 'escape'; SET extra_float_digits = -3",
    )
    .await
    .unwrap();
    let row = c.query_one(probe, &[]).await.unwrap();
    let odd: Vec<String> = (0..canonical.len()).map(|i| row.get(i)).collect();
    assert_ne!(
        odd[..4],
        canonical[..4],
        "the session settings change text forms"
    );
    // In a transaction, SET LOCAL restores them, and they do not outlive it.
    c.batch_execute(&format!(
        "BEGIN; {}",
        sanare_pg::canonical_settings_local_sql()
    ))
    .await
    .unwrap();
    let row = c.query_one(probe, &[]).await.unwrap();
    let local: Vec<String> = (0..canonical.len()).map(|i| row.get(i)).collect();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(local, canonical);
    let row = c.query_one(probe, &[]).await.unwrap();
    let after: Vec<String> = (0..canonical.len()).map(|i| row.get(i)).collect();
    assert_eq!(after, odd);
}
