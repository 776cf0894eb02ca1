//! `sanare scan` through the real binary: with many findings, `--json` is one
//! document whose issues are every finding, a false-alarm storm is one table-wide
//! finding, and the human table shows the first hundred and counts the rest; when
//! the server refuses a statement, PostgreSQL's own words — message, SQLSTATE,
//! detail, hint, context — reach the operator once each, on stderr and in `--json`.

use std::process::{Command, Output};

fn sanare(db: &sanare_testing::TestDb, dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sanare"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env("DATABASE_URL", db.url())
        .env_remove("SANARE_CONFIG")
        .output()
        .expect("run the sanare binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_findings_stream_as_one_json_document_and_a_storm_is_one() {
    let db = sanare_testing::test_db().await;
    let dir = tempfile::tempdir().unwrap();
    let operator = sanare::Sanare::builder()
        .pool(db.pool().clone())
        .data_dir(dir.path())
        .operator()
        .build()
        .await
        .unwrap();
    let c = db.client().await;
    for t in ["ledger", "storm"] {
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, v text, row_checksum bytea);
             INSERT INTO {t} SELECT g, 'value ' || g FROM generate_series(1, 1000) g;"
        ))
        .await
        .unwrap();
        sanare::integrity::install_checksum_trigger(
            &**c,
            operator.schema(),
            &sanare::core::TableRef::new("public", t),
            "row_checksum",
            true,
        )
        .await
        .unwrap();
    }
    operator.shutdown().await.unwrap();
    // Behind the trigger's back: 150 damaged rows of one table; every checksum of
    // the other.
    c.batch_execute(
        "SET session_replication_role = replica;
         UPDATE ledger SET v = 'tampered' WHERE id % 6 = 0 AND id <= 900;
         UPDATE storm SET row_checksum = '\\x00';
         RESET session_replication_role;",
    )
    .await
    .unwrap();
    let damaged: i64 = c
        .query_one("SELECT count(*) FROM ledger WHERE v = 'tampered'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(damaged, 150);

    let out = sanare(&db, dir.path(), &["scan", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let issues = v["issues"].as_array().unwrap();
    assert_eq!(issues.len(), 151);
    assert_eq!(v["scan"]["issues"], 151);
    assert_eq!(v["scan"]["rows_scanned"], 2000);
    assert_eq!(v["scan"]["suspects"], 1150);
    assert_eq!(v["scan"]["table_wide"][0]["table"]["name"], "storm");
    let storm: Vec<_> = issues
        .iter()
        .filter(|i| i["table"]["name"] == "storm")
        .collect();
    assert_eq!(storm.len(), 1);
    assert!(storm[0]["row"].is_null());
    assert!(
        issues
            .iter()
            .filter(|i| i["table"]["name"] == "ledger")
            .all(|i| !i["row"].is_null())
    );
    assert!(v["physical"].as_array().unwrap().is_empty());
    assert!(v["checksum_failures"].is_null());

    let out = sanare(&db, dir.path(), &["scan"]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("— 151 issues"), "{text}");
    assert!(
        text.contains("table-wide mismatch: probably configuration, not corruption"),
        "{text}"
    );
    assert!(
        text.contains("… and 51 more (`sanare scan --json` prints every one)"),
        "{text}"
    );
}

#[tokio::test]
async fn a_server_error_reaches_the_operator_whole_in_text_and_json() {
    let db = sanare_testing::test_db().await;
    let dir = tempfile::tempdir().unwrap();
    // A type whose cast to text (what a checksum hashes) raises: the scan's read
    // of the table fails on the server with a detail, a hint and a context.
    db.connect()
        .await
        .batch_execute(
            "CREATE TYPE pair AS (a int, b int);
             CREATE FUNCTION pair_text(pair) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'pair % cannot print', $1 USING ERRCODE = '22P02',
                 DETAIL = 'pairs are private', HINT = 'print a and b instead'; END $$;
             CREATE CAST (pair AS text) WITH FUNCTION pair_text(pair);
             CREATE TABLE t (id int PRIMARY KEY, p pair, row_checksum bytea);
             INSERT INTO t VALUES (1, ROW(1, 2), NULL);",
        )
        .await
        .unwrap();

    let out = sanare(&db, dir.path(), &["scan", "--table", "public.t"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "ERROR: pair (1,2) cannot print (SQLSTATE 22P02)\nDETAIL: pairs are private\n\
             HINT: print a and b instead\nCONTEXT: PL/pgSQL function pair_text(pair)"
        ),
        "{err}"
    );
    assert!(
        err.starts_with("sanare: database error while streaming rows of public.t: "),
        "{err}"
    );
    assert!(!err.contains("db error"), "{err}");
    assert_eq!(err.matches("cannot print").count(), 1, "{err}");

    let out = sanare(&db, dir.path(), &["scan", "--table", "public.t", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let e = &v["error"];
    assert_eq!(e["kind"], "database");
    assert_eq!(e["retryable"], false);
    assert_eq!(e["server"]["code"], "22P02");
    assert_eq!(e["server"]["severity"], "ERROR");
    assert_eq!(e["server"]["message"], "pair (1,2) cannot print");
    assert_eq!(e["server"]["detail"], "pairs are private");
    assert_eq!(e["server"]["hint"], "print a and b instead");
    assert!(
        e["server"]["context"]
            .as_str()
            .unwrap()
            .contains("pair_text(pair)")
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("streaming rows of public.t")
    );
}

#[tokio::test]
async fn an_unreachable_server_says_why() {
    let out = Command::new(env!("CARGO_BIN_EXE_sanare"))
        .args([
            "status",
            "--json",
            "--database-url",
            "postgres://nobody@127.0.0.1:1/x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // The driver's words and the system's, not "error connecting to server" alone.
    assert!(
        err.contains(
            "cannot connect to postgres://nobody@127.0.0.1:1/x: error connecting to server: "
        ),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("error connecting to server: ")
    );
    assert!(v["error"]["server"].is_null());
}
