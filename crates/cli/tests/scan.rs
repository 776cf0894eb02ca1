//! `sanare scan` with many findings: `--json` is one document whose issues are
//! every finding, a false-alarm storm is one table-wide finding, and the human
//! table shows the first hundred and counts the rest.

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
