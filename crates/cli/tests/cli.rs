//! Every subcommand runs the real binary against a real database.

use std::process::Command;

/// The data directory of the CLI runs of this test process.
fn data_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary data directory"))
        .path()
}

fn sanare(db: &sanare_testing::TestDb, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sanare"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir())
        .env("DATABASE_URL", db.url())
        .env_remove("SANARE_CONFIG")
        .output()
        .expect("run the sanare binary")
}

#[tokio::test]
async fn status_reports_components_and_tables_as_json_and_text() {
    let db = sanare_testing::test_db().await;
    let out = sanare(&db, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema"], "sanare");
    assert_eq!(v["components"].as_array().unwrap().len(), 0);

    sanare::MIGRATIONS
        .run(&mut db.connect().await, &sanare_pg::SchemaName::default())
        .await
        .unwrap();
    let out = sanare(&db, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["components"][0]["component"], "sanare");
    assert_eq!(v["components"][0]["schema_version"], 2);
    assert_eq!(v["tables"][0]["table"], "jobs");

    let out = sanare(&db, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("schema `sanare`") && text.contains("jobs"),
        "{text}"
    );
}

#[tokio::test]
async fn bad_input_gives_clear_errors_and_exit_codes() {
    let db = sanare_testing::test_db().await;
    let out = sanare(&db, &["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");

    let out = Command::new(env!("CARGO_BIN_EXE_sanare"))
        .args([
            "status",
            "--database-url",
            "postgres://nobody@127.0.0.1:1/x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));

    let out = Command::new(env!("CARGO_BIN_EXE_sanare"))
        .args(["status"])
        .env("DATABASE_URL", db.url())
        .env("SANARE__SNAPSHOTS__INTERVALL", "5m")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("intervall"), "{err}");

    let out = sanare(&db, &["status", "--schema", "Bad-Schema"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Bad-Schema"));
}

#[tokio::test]
async fn validate_reports_violations_with_exit_code_3_and_writes_csv() {
    let db = sanare_testing::test_db().await;
    let client = db.client().await;
    sanare_testing::fixtures::order_service::install(&**client, "shop")
        .await
        .unwrap();
    sanare_testing::fixtures::order_service::generate(&**client, "shop", 100)
        .await
        .unwrap();
    let out = sanare(&db, &["validate", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    client
        .batch_execute("SET session_replication_role = replica; DELETE FROM shop.customers WHERE id = 3; SET session_replication_role = origin;")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("violations.csv");
    let out = sanare(
        &db,
        &[
            "validate",
            "--table",
            "shop.orders",
            "--csv",
            csv.to_str().unwrap(),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("violations"));
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert!(csv.lines().count() > 1, "{csv}");

    // `--json` prints one document, the report and every violation, the same as
    // the `--report` file and the CSV.
    let report = dir.path().join("report.json");
    let out = sanare(
        &db,
        &[
            "validate",
            "--json",
            "--table",
            "shop.orders",
            "--csv",
            csv_path(&dir).to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let total: u64 = doc["report"]["violations_by_severity"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    let violations = doc["violations"].as_array().unwrap();
    assert!(total > 0);
    assert_eq!(violations.len() as u64, total);
    assert!(
        violations
            .iter()
            .all(|v| v["kind"]["type"] == "referential" && v["table"]["name"] == "orders")
    );
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(file, doc);
    let csv = std::fs::read_to_string(csv_path(&dir)).unwrap();
    assert_eq!(csv.lines().count() as u64, total + 1);
}

fn csv_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("again.csv")
}

#[tokio::test]
async fn crashes_list_shows_recorded_crashes() {
    let db = sanare_testing::test_db().await;
    let out = sanare(&db, &["crashes", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 0);
    let out = sanare(&db, &["crashes", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no crashes recorded"));
}
