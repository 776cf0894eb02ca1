//! The facade end to end: start, crash (no clean shutdown), start again and recover.

use sanare::Sanare;
use sanare::core::{Control, SnapshotRequest, SnapshotService, ValidationScope};
use sanare::recovery::{PreviousOutcome, RecoveryOption, RecoveryOptions};
use sanare_testing::fixtures::order_service;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_without_clean_shutdown_is_detected_recorded_and_recovered() {
    let db = sanare_testing::test_db().await;
    order_service::install(&**db.client().await, "shop")
        .await
        .unwrap();
    order_service::generate(&**db.client().await, "shop", 200)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    let first = Sanare::builder()
        .pool(db.pool().clone())
        .data_dir(dir.path())
        .build()
        .await
        .unwrap();
    assert_eq!(
        first.startup_report().previous_run.outcome,
        PreviousOutcome::FirstRun
    );
    assert!(
        first
            .startup_report()
            .migrations
            .iter()
            .all(|m| !m.applied.is_empty())
    );
    let snapshot = first
        .snapshots()
        .create(
            SnapshotRequest::new().schemas(["shop"]),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(snapshot.tables.len(), 5);
    // The process "dies": no shutdown, the marker still says running.
    drop(first);

    let second = Sanare::builder()
        .pool(db.pool().clone())
        .data_dir(dir.path())
        .build()
        .await
        .unwrap();
    let crash = second
        .startup_report()
        .crash()
        .expect("the unclean end is detected")
        .clone();
    assert!(
        second
            .startup_report()
            .migrations
            .iter()
            .all(|m| m.applied.is_empty())
    );
    let recorded: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM sanare.crash_records", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 1);

    let plan = second
        .recovery()
        .plan(Some(&crash), RecoveryOptions::new(RecoveryOption::Auto));
    let result = second
        .recovery()
        .recover(&plan, &Control::detached())
        .await
        .unwrap();
    assert!(result.success, "{result:?}");
    let summary = sanare::core::IntegrityService::validate(
        second.integrity().as_ref(),
        ValidationScope::all(),
        &Control::detached(),
    )
    .await
    .unwrap();
    assert!(summary.is_clean(), "{summary:?}");
    second.shutdown().await.unwrap();
    drop(second); // the data directory is released with the last handle

    let third = Sanare::builder()
        .pool(db.pool().clone())
        .data_dir(dir.path())
        .build()
        .await
        .unwrap();
    assert_eq!(
        third.startup_report().previous_run.outcome,
        PreviousOutcome::Clean
    );
    third.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_missing_database_or_bad_storage_is_a_named_configuration_error() {
    let err = Sanare::builder()
        .data_dir(std::env::temp_dir())
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("database_url"), "{err}");

    let db = sanare_testing::test_db().await;
    // An S3 store without a bucket is refused by name, when the file is read.
    let err = sanare::SanareConfig::from_toml_str(
        "[snapshots]\nstorage = { kind = \"s3\", bucket = \"\" }",
        "test",
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("snapshots.storage.bucket"),
        "{err}"
    );
    // A configuration built in code is checked by `build()`.
    let mut config = sanare::SanareConfig::default();
    config.snapshots.storage = sanare::config::StorageConfig::S3 {
        bucket: " ".into(),
        prefix: String::new(),
        endpoint: None,
        region: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let err = Sanare::builder()
        .config(config)
        .pool(db.pool().clone())
        .data_dir(dir.path())
        .build()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("snapshots.storage.bucket"),
        "{err}"
    );
}
