//! The CLI names its repository: it refuses to start a new one beside a catalog
//! that expects another, shows other repositories' snapshots as not opened here,
//! and lists, verifies and restores from the data directory alone.

use std::path::Path;
use std::process::{Command, Output};

use sanare_testing::TestDb;
use sanare_testing::fixtures::order_service;
use serde_json::Value;

/// Runs `sanare` in `cwd` with `args`, against `db` (none: no database at all).
fn sanare(cwd: &Path, db: Option<&TestDb>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sanare"));
    cmd.current_dir(cwd)
        .args(args)
        .env_remove("SANARE_CONFIG")
        .env_remove("DATABASE_URL");
    if let Some(db) = db {
        cmd.env("DATABASE_URL", db.url());
    }
    cmd.output().expect("run the sanare binary")
}

/// [`sanare`] with `--json`: checks the exit code, parses stdout.
fn json(cwd: &Path, db: Option<&TestDb>, args: &[&str], code: i32) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = sanare(cwd, db, &all);
    assert_eq!(
        out.status.code(),
        Some(code),
        "`sanare {}`\nstdout: {}\nstderr: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

async fn shop(orders: u64) -> TestDb {
    let db = sanare_testing::test_db().await;
    let client = db.client().await;
    order_service::install(&**client, "shop").await.unwrap();
    order_service::generate(&**client, "shop", orders)
        .await
        .unwrap();
    db
}

fn status_of(listing: &Value, id: &str) -> Value {
    listing["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {listing}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_a_new_repository_beside_a_catalog_that_expects_another() {
    let db = shop(200).await;
    let service_dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let data = service_dir.path().to_str().unwrap();
    let taken = json(
        elsewhere.path(),
        Some(&db),
        &[
            "--data-dir",
            data,
            "snapshot",
            "create",
            "--of-schema",
            "shop",
        ],
        0,
    );
    let id = taken["id"].as_str().unwrap().to_owned();
    let listing = json(
        elsewhere.path(),
        Some(&db),
        &["--data-dir", data, "snapshot", "list"],
        0,
    );
    let repo = listing["repository"]["id"].as_str().unwrap().to_owned();
    assert_eq!(status_of(&listing, &id)["status"], "ready");

    // From another working directory, the default data directory (./sanare-data)
    // holds no repository: creating one there is refused, naming the expected one.
    let refused = sanare(elsewhere.path(), Some(&db), &["snapshot", "create"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&repo)
            && err.contains(&service_dir.path().join("snapshots").display().to_string()),
        "{err}"
    );
    assert!(err.contains("--new-repository"), "{err}");
    assert!(
        !elsewhere
            .path()
            .join("sanare-data/snapshots/config")
            .exists()
    );

    // There, the service's snapshot is listed as not opened here, and verify
    // leaves it alone.
    let text =
        String::from_utf8_lossy(&sanare(elsewhere.path(), Some(&db), &["snapshot", "list"]).stdout)
            .into_owned();
    assert!(
        text.contains(&format!("in repository {repo} (not opened here)")),
        "{text}"
    );
    let wrong = sanare(elsewhere.path(), Some(&db), &["snapshot", "verify", &id]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not opened here"));
    let prune = sanare(
        elsewhere.path(),
        Some(&db),
        &["snapshot", "prune", "--grace", "0s"],
    );
    assert_eq!(prune.status.code(), Some(0), "{prune:?}");

    // On purpose, a new repository there; the service's snapshot stays ready.
    let second = json(
        elsewhere.path(),
        Some(&db),
        &[
            "snapshot",
            "create",
            "--of-schema",
            "shop",
            "--new-repository",
        ],
        0,
    );
    let listing = json(
        elsewhere.path(),
        Some(&db),
        &["--data-dir", data, "snapshot", "list"],
        0,
    );
    assert_eq!(status_of(&listing, &id)["status"], "ready");
    assert_eq!(
        status_of(&listing, second["id"].as_str().unwrap())["availability"]["where"],
        "other_repository"
    );
    let verified = json(
        elsewhere.path(),
        Some(&db),
        &["--data-dir", data, "snapshot", "verify", &id],
        0,
    );
    assert_eq!(verified["repository"], repo.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_is_listed_verified_and_restored_from_the_data_directory_alone() {
    let db = shop(300).await;
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let data = cwd.join("data");
    let data = data.to_str().unwrap();
    let taken = json(
        cwd,
        Some(&db),
        &[
            "--data-dir",
            data,
            "snapshot",
            "create",
            "--of-schema",
            "shop",
        ],
        0,
    );
    let id = taken["id"].as_str().unwrap();
    let before = order_service::content_hashes(&**db.client().await, "shop")
        .await
        .unwrap();

    // No database at all: the store alone is listed and verified.
    let listing = json(cwd, None, &["--data-dir", data, "snapshot", "list"], 0);
    assert_eq!(listing["catalog"], false);
    assert_eq!(
        status_of(&listing, id)["tables"].as_array().unwrap().len(),
        5
    );
    let verified = json(
        cwd,
        None,
        &["--data-dir", data, "snapshot", "verify", "latest"],
        0,
    );
    assert_eq!(verified["snapshot"], id);
    assert_eq!(verified["blocks_corrupt"], 0);
    let refused = sanare(
        cwd,
        None,
        &["--data-dir", data, "snapshot", "restore", "latest", "--yes"],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no database"));

    // An empty database: the schema and the rows come back from the store.
    let fresh = sanare_testing::test_db().await;
    let restored = json(
        cwd,
        Some(&fresh),
        &["--data-dir", data, "snapshot", "restore", "latest", "--yes"],
        0,
    );
    assert_eq!(restored["snapshot"], id);
    assert_eq!(
        restored["recreated"].as_array().unwrap().len(),
        5,
        "{restored}"
    );
    assert_eq!(
        order_service::content_hashes(&**fresh.client().await, "shop")
            .await
            .unwrap(),
        before
    );
    let listing = json(
        cwd,
        Some(&fresh),
        &["--data-dir", data, "snapshot", "list"],
        0,
    );
    assert_eq!(status_of(&listing, id)["availability"]["where"], "here");
    assert_eq!(status_of(&listing, id)["status"], "ready");
}
