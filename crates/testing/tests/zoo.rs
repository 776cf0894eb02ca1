//! The schema zoo installs what it promises, and holds the same rows under every
//! session setting.

use sanare_testing::{test_db, zoo};

#[tokio::test]
async fn the_zoo_holds_what_its_docs_promise() {
    let db = test_db().await;
    let client = db.connect().await;
    zoo::install(&client).await.expect("install the zoo");

    for t in zoo::TABLES {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {}", t.quoted()), &[])
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", t.quoted()))
            .get(0);
        assert_eq!(n, t.rows, "rows of {}", t.quoted());
        let row = client
            .query_one(
                "SELECT c.relkind::text,
                        EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = c.oid AND contype = 'p')
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, &t.name],
            )
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", t.quoted()));
        let kind: String = row.get(0);
        assert_eq!(kind == "p", t.partitioned, "relkind of {}", t.quoted());
        assert_eq!(
            row.get::<_, bool>(1),
            t.primary_key,
            "primary key of {}",
            t.quoted()
        );
    }

    // The catalog holds every promised object.
    let facts = client
        .query_one(
            "SELECT
               (SELECT NOT indisvalid FROM pg_index WHERE indexrelid = 'zoo.typed_invalid_idx'::regclass),
               (SELECT count(*) FROM pg_constraint WHERE connamespace = 'zoo'::regnamespace AND NOT convalidated),
               (SELECT count(*) FROM pg_constraint WHERE connamespace = 'zoo'::regnamespace AND contype = 'c' AND connoinherit),
               (SELECT count(*) FROM pg_constraint WHERE connamespace = 'zoo'::regnamespace AND condeferrable),
               (SELECT count(*) FROM pg_constraint WHERE connamespace = 'zoo'::regnamespace AND confmatchtype = 'f'),
               (SELECT count(*) FROM pg_constraint WHERE connamespace = 'zoo'::regnamespace AND contype = 'x'),
               (SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
                 WHERE c.relnamespace = 'zoo'::regnamespace AND indisunique AND indpred IS NOT NULL AND NOT EXISTS
                       (SELECT 1 FROM pg_constraint WHERE conindid = i.indexrelid)),
               (SELECT reltuples FROM pg_class WHERE oid = 'zoo.never_analyzed'::regclass)::float8,
               (SELECT count(*) FROM pg_inherits WHERE inhparent = 'zoo.vehicles'::regclass)",
            &[],
        )
        .await
        .expect("catalog facts");
    assert!(facts.get::<_, bool>(0), "the invalid index is invalid");
    assert_eq!(facts.get::<_, i64>(1), 2, "NOT VALID check and foreign key");
    assert_eq!(facts.get::<_, i64>(2), 1, "NO INHERIT check");
    assert_eq!(facts.get::<_, i64>(3), 1, "deferrable foreign key");
    assert_eq!(facts.get::<_, i64>(4), 1, "MATCH FULL foreign key");
    assert_eq!(facts.get::<_, i64>(5), 1, "exclusion constraint");
    assert_eq!(
        facts.get::<_, i64>(6),
        2,
        "partial unique indexes, one on an expression"
    );
    assert_eq!(facts.get::<_, f64>(7), -1.0, "never analysed");
    assert_eq!(facts.get::<_, i64>(8), 1, "inheritance child");
}

#[tokio::test]
async fn every_session_setting_is_accepted_and_changes_what_a_session_sees() {
    let db = test_db().await;
    let admin = db.connect().await;
    zoo::install(&admin).await.expect("install the zoo");
    let digest = "SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM zoo.typed t";
    let before: String = admin.query_one(digest, &[]).await.unwrap().get(0);
    let mut settings: Vec<(String, String)> = zoo::SESSION_SETTINGS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    if let Some(locale) = zoo::lc_numeric(&admin).await {
        settings.push(("lc_numeric".into(), format!("'{locale}'")));
    }
    for (name, value) in &settings {
        admin
            .batch_execute(&format!(
                "ALTER DATABASE \"{}\" SET {name} = {value}",
                db.name()
            ))
            .await
            .unwrap_or_else(|e| panic!("{name} = {value}: {e}"));
    }
    // A new session sees the settings, and the text of the rows differs.
    let session = db.connect().await;
    let style: String = session
        .query_one("SELECT current_setting('DateStyle')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(style, "SQL, DMY");
    let after: String = session.query_one(digest, &[]).await.unwrap().get(0);
    assert_ne!(
        before, after,
        "the settings change the rows' text form, which is what a checksum reader must not depend on"
    );
}
