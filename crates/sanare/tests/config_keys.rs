//! Configuration keys whose effect shows only on a running service: each test
//! sets the key away from its default and fails if the service ignores it.

use sanare::config::JournalBackend;
use sanare::journal::NewEntry;
use sanare::{Sanare, SanareConfig};

async fn try_start(
    db: &sanare_testing::TestDb,
    dir: &std::path::Path,
    config: SanareConfig,
) -> sanare::Result<Sanare> {
    Sanare::builder()
        .config(config)
        .pool(db.pool().clone())
        .data_dir(dir)
        .background(false)
        .build()
        .await
}

async fn start(db: &sanare_testing::TestDb, dir: &std::path::Path, config: SanareConfig) -> Sanare {
    try_start(db, dir, config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_backend_postgres_keeps_the_journal_in_the_database() {
    let db = sanare_testing::test_db().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = SanareConfig::default();
    config.journal.backend = JournalBackend::Postgres;
    let sanare = start(&db, dir.path(), config).await;
    sanare
        .journal()
        .record(NewEntry::new("order.placed", &1u32).unwrap())
        .await
        .unwrap();
    let rows: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM sanare.transaction_journal", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the entry is a row of the journal table");
    assert!(
        !dir.path().join("journal").exists(),
        "no segment files beside the table"
    );
    sanare.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_detection_off_does_not_judge_how_the_previous_run_ended() {
    let db = sanare_testing::test_db().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = SanareConfig::default();
    config.crash_detection.enabled = false;
    let first = start(&db, dir.path(), config.clone()).await;
    drop(first); // no clean shutdown
    let second = start(&db, dir.path(), config).await;
    assert!(
        second.startup_report().crash().is_none(),
        "{:?}",
        second.startup_report().previous_run
    );
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_key_file_is_where_the_signing_key_is_made_and_read() {
    let db = sanare_testing::test_db().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("orders.key");
    let mut config = SanareConfig::default();
    config.snapshots.key_file = Some(key.clone());
    let sanare = start(&db, dir.path(), config.clone()).await;
    sanare.shutdown().await.unwrap();
    drop(sanare);
    assert!(key.exists(), "the key is made where the key names");
    assert!(
        !dir.path().join("snapshot.key").exists(),
        "and not in the data directory"
    );
    // A key file that is not a key is refused by the next start, not replaced.
    std::fs::write(&key, "not a key").unwrap();
    let Err(err) = try_start(&db, dir.path(), config).await else {
        panic!("a damaged key file is refused");
    };
    assert!(err.to_string().contains("orders.key"), "{err}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "not a key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_rules_file_declares_the_rules_and_a_missing_one_is_named() {
    let db = sanare_testing::test_db().await;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[not_null]]\ntable = \"public.orders\"\ncolumn = \"note\"\n\n\
         [[consistency]]\nname = \"positive_total\"\ntable = \"public.orders\"\n\
         predicate = \"total_cents >= 0\"\n",
    )
    .unwrap();
    let mut config = SanareConfig::default();
    config.validation.rules_file = Some(rules.clone());
    let sanare = start(&db, dir.path(), config.clone()).await;
    let declared = sanare.integrity().rules();
    assert_eq!(declared.not_null.len(), 1);
    assert_eq!(declared.consistency[0].name, "positive_total");
    sanare.shutdown().await.unwrap();
    drop(sanare);

    std::fs::remove_file(&rules).unwrap();
    let Err(err) = try_start(&db, dir.path(), config).await else {
        panic!("a missing rules file is refused");
    };
    assert!(err.to_string().contains("rules.toml"), "{err}");
}

/// The schedule holds the tasks the configuration turns on, and only those:
/// `snapshots.interval` and `journal.compaction_interval` off leave their tasks
/// out, and `corruption.monitoring = false` stops scans whatever their interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_has_the_tasks_the_configuration_turns_on() {
    let db = sanare_testing::test_db().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE public.t (id int PRIMARY KEY); INSERT INTO public.t VALUES (1)",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = SanareConfig::default();
    config.snapshots.interval = None;
    config.journal.compaction_interval = None;
    config.validation.interval = Some(std::time::Duration::from_secs(1));
    config.corruption.scan_interval = Some(std::time::Duration::from_secs(1));
    config.corruption.monitoring = false;
    let sanare = Sanare::builder()
        .config(config)
        .pool(db.pool().clone())
        .data_dir(dir.path())
        .poll_interval(std::time::Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    let count = |sql: &'static str| {
        let db = &db;
        async move {
            db.client()
                .await
                .query_one(sql, &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    // Two validation runs: a scan due as often would have run by the second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while count("SELECT count(DISTINCT batch_id) FROM sanare.jobs WHERE kind = 'integrity.table'")
        .await
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no two validation runs in 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let tasks: Vec<String> = db
        .client()
        .await
        .query("SELECT name FROM sanare.scheduled_tasks ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tasks, [sanare::task::VALIDATE]);
    assert_eq!(
        count("SELECT count(*) FROM sanare.jobs WHERE kind = 'corruption.table'").await,
        0
    );
    sanare.shutdown().await.unwrap();
}

/// `corruption.real_time` starts the change monitor: a row changed behind the
/// service's back (its checksum trigger bypassed) is found without any scan;
/// off (the default), nothing looks at it until a scan runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_real_time_re_verifies_rows_soon_after_they_change() {
    let table = sanare::core::TableRef::new("public", "acct");
    for real_time in [true, false] {
        let db = sanare_testing::test_db().await;
        let dir = tempfile::tempdir().unwrap();
        let operator = Sanare::builder()
            .pool(db.pool().clone())
            .data_dir(dir.path())
            .operator()
            .build()
            .await
            .unwrap();
        let c = db.client().await;
        c.batch_execute(
            "CREATE TABLE public.acct (id bigint PRIMARY KEY, owner text NOT NULL, row_checksum bytea);
             INSERT INTO public.acct (id, owner) SELECT g, 'owner ' || g FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
        sanare::integrity::install_checksum_trigger(
            &**c,
            operator.schema(),
            &table,
            "row_checksum",
            true,
        )
        .await
        .unwrap();
        operator.shutdown().await.unwrap();
        drop(operator);
        let mut config = SanareConfig::default();
        config.corruption.real_time = real_time;
        config.corruption.monitoring = false;
        config.snapshots.interval = None;
        config.journal.compaction_interval = None;
        let sanare = start(&db, dir.path(), config).await;
        c.batch_execute(
            "SET session_replication_role = replica;
             UPDATE public.acct SET owner = 'mallory' WHERE id = 7;
             SET session_replication_role = origin",
        )
        .await
        .unwrap();
        // The monitor polls every second: found within 20 s when on; when off,
        // still nothing after 5 polls' time.
        let wait = std::time::Duration::from_secs(if real_time { 20 } else { 5 });
        let deadline = std::time::Instant::now() + wait;
        let issues = loop {
            let issues = sanare
                .corruption()
                .issues(&sanare::corruption::IssueQuery::new())
                .await
                .unwrap();
            if !issues.is_empty() || std::time::Instant::now() > deadline {
                break issues;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        if real_time {
            assert_eq!(issues.len(), 1, "{issues:?}");
            assert_eq!(issues[0].table, table);
        } else {
            assert!(issues.is_empty(), "{issues:?}");
        }
        sanare.shutdown().await.unwrap();
    }
}
