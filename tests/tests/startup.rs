//! What every start does, clean or not: replay the journal's unapplied entries
//! exactly once before `build()` returns, report its events, be ready, and honour
//! the crash-detection and recovery settings.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sanare::Event;
use sanare::recovery::{Marker, PreviousOutcome, RecoveryOption, RecoveryStep};
use support::{connect, entry, start};

struct Dir {
    _tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    boot: std::path::PathBuf,
}

fn dir() -> Dir {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let boot = tmp.path().join("boot_id");
    std::fs::write(&boot, "dddddddd-4444-4444-4444-444444444444\n").unwrap();
    Dir {
        _tmp: tmp,
        data,
        boot,
    }
}

async fn app_db() -> sanare_testing::TestDb {
    let db = sanare_testing::test_db().await;
    db.client()
        .await
        .batch_execute(support::APP_SQL)
        .await
        .unwrap();
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_start_replays_the_unapplied_journal_once_and_keeps_its_events() {
    let db = app_db().await;
    let d = dir();
    let client = connect(db.url()).await;
    let first = start(db.url(), &d.data, &d.boot, support::config(), false)
        .await
        .unwrap();
    assert_eq!(
        first.startup_report().previous_run.outcome,
        PreviousOutcome::FirstRun
    );
    assert!(
        first.recovery().readiness().ready,
        "ready after a first start"
    );
    // Journaled, never applied; then a clean shutdown, through an Arc.
    for n in 1..=5 {
        first
            .journal()
            .record(entry(&format!("k{n}"), n))
            .await
            .unwrap();
    }
    let shared = Arc::new(first);
    let handle = Arc::clone(&shared);
    tokio::spawn(async move { handle.shutdown().await })
        .await
        .unwrap()
        .unwrap();
    shared.shutdown().await.unwrap(); // a second call is harmless
    drop(shared);
    assert!(support::rows(&client, "app.ledger").await.is_empty());

    let second = start(db.url(), &d.data, &d.boot, support::config(), false)
        .await
        .unwrap();
    let report = second.startup_report();
    assert_eq!(report.previous_run.outcome, PreviousOutcome::Clean);
    assert!(report.crash().is_none());
    let recovery = report.recovery.as_ref().expect("every start recovers");
    assert_eq!(recovery.option, RecoveryOption::Startup);
    assert_eq!(
        recovery
            .steps
            .iter()
            .map(|s| s.step.clone())
            .collect::<Vec<_>>(),
        [RecoveryStep::ReplayJournal, RecoveryStep::ReadinessCheck]
    );
    assert_eq!(recovery.entries_replayed, 5, "{recovery:?}");
    assert!(recovery.success);
    // Applied before build() returned.
    support::assert_each_entry_applied_once(&second, &client).await;
    assert!(second.recovery().readiness().ready);
    // The start-up events are there after build(): the replay and the recovery.
    let names: Vec<&str> = report.events.iter().map(|e| e.event.name()).collect();
    assert!(
        names.ends_with(&["journal_replayed", "recovery_completed"]),
        "{names:?}"
    );
    match &report.events.last().unwrap().event {
        Event::RecoveryCompleted {
            recovery: id,
            entries_replayed,
            ..
        } => {
            assert_eq!(*id, recovery.id);
            assert_eq!(*entries_replayed, 5);
        }
        other => panic!("{other:?}"),
    }
    second.shutdown().await.unwrap();
    drop(second);

    // Nothing twice.
    let third = start(db.url(), &d.data, &d.boot, support::config(), false)
        .await
        .unwrap();
    let recovery = third.startup_report().recovery.clone().unwrap();
    assert_eq!(recovery.entries_replayed, 0);
    support::assert_each_entry_applied_once(&third, &client).await;
    assert_eq!(support::rows(&client, "app.ledger").await.len(), 5);
    // An operator handle beside it changes nothing and runs nothing.
    let operator = sanare::Sanare::builder()
        .config(support::config())
        .database_url(db.url())
        .data_dir(&d.data)
        .operator()
        .build()
        .await
        .unwrap();
    assert!(operator.startup_report().recovery.is_none());
    assert_eq!(
        operator.startup_report().previous_run.outcome,
        PreviousOutcome::NotChecked
    );
    third.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crash_found_at_start_up_is_in_the_events_and_the_plan_follows_the_configuration() {
    let db = app_db().await;
    let d = dir();
    let first = start(db.url(), &d.data, &d.boot, support::config(), false)
        .await
        .unwrap();
    drop(first); // no clean shutdown
    let mut config = support::config();
    config.recovery.time_target = Duration::from_secs(60);
    config.repair.auto_repair = true;
    let second = start(db.url(), &d.data, &d.boot, config, false)
        .await
        .unwrap();
    let report = second.startup_report();
    let crash = report.crash().expect("the unclean end is a crash");
    match &report.events[0].event {
        Event::CrashDetected { crash: id, .. } => assert_eq!(*id, crash.id),
        other => panic!("{other:?}"),
    }
    let plan = report.plan.as_ref().unwrap();
    assert_eq!(plan.options.option, RecoveryOption::Auto);
    // What is left of the target when the recovery starts (it counts from build()).
    let left = plan.options.time_target.expect("a time target");
    assert!(
        left <= Duration::from_secs(60) && left >= Duration::from_secs(30),
        "{left:?}"
    );
    assert!(plan.options.execute_repairs, "repair.auto_repair = true");
    assert_eq!(plan.crash, Some(crash.id));
    // `auto_recovery = false`: after a crash only the replay runs.
    drop(second);
    let mut config = support::config();
    config.auto_recovery = false;
    let third = start(db.url(), &d.data, &d.boot, config, false)
        .await
        .unwrap();
    assert!(third.startup_report().crash().is_some());
    let plan = third.startup_report().plan.as_ref().unwrap();
    assert_eq!(plan.options.option, RecoveryOption::Startup);
    assert_eq!(plan.crash, None);
    assert!(
        !plan.options.execute_repairs,
        "repair.auto_repair is off by default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_advances_at_the_configured_interval() {
    let db = app_db().await;
    let d = dir();
    let mut config = support::config();
    config.crash_detection.heartbeat_interval = Duration::from_millis(50);
    let sanare = start(db.url(), &d.data, &d.boot, config, false)
        .await
        .unwrap();
    let marker = d.data.join("recovery/sanare-shutdown.marker");
    let read = || {
        Marker::decode(&std::fs::read_to_string(&marker).unwrap())
            .unwrap()
            .heartbeat_unix_ms
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        if let Some(beat) = read()
            && seen.last() != Some(&beat)
        {
            seen.push(beat);
        }
        assert!(Instant::now() < deadline, "heartbeats seen: {seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    sanare.shutdown().await.unwrap();
    let clean = Marker::decode(&std::fs::read_to_string(&marker).unwrap()).unwrap();
    assert_eq!(clean.state, sanare::recovery::MarkerState::Clean);
    assert!(clean.heartbeat_unix_ms >= seen.last().copied());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_history_older_than_history_days_is_purged_at_start_up() {
    let db = app_db().await;
    let d = dir();
    let first = start(db.url(), &d.data, &d.boot, support::config(), false)
        .await
        .unwrap();
    drop(first);
    let second = start(db.url(), &d.data, &d.boot, support::config(), false)
        .await
        .unwrap();
    let mut old = second.startup_report().crash().unwrap().clone();
    old.id = sanare::core::CrashId::new();
    old.crashed_at = sanare::core::now() - time::Duration::days(40);
    second.crashes().record(&old).await.unwrap();
    assert_eq!(second.crashes().history(None, None).await.unwrap().len(), 2);
    second.shutdown().await.unwrap();
    drop(second);

    // history_days = 0 keeps everything.
    let mut keep = support::config();
    keep.crash_detection.history_days = 0;
    let third = start(db.url(), &d.data, &d.boot, keep, false)
        .await
        .unwrap();
    assert_eq!(third.startup_report().crash_history_purged, 0);
    assert_eq!(third.crashes().history(None, None).await.unwrap().len(), 2);
    third.shutdown().await.unwrap();
    drop(third);

    // 30 days: the 40-day-old crash goes, the recent one stays.
    let mut purge = support::config();
    purge.crash_detection.history_days = 30;
    let fourth = start(db.url(), &d.data, &d.boot, purge, false)
        .await
        .unwrap();
    assert!(fourth.startup_report().crash_history_purged >= 1);
    let left = fourth.crashes().history(None, None).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_ne!(left[0].crash.id, old.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_check_that_does_not_answer_fails_the_start_at_the_detection_timeout() {
    let db = app_db().await;
    let d = dir();
    // A boot id "file" that never answers: a FIFO nobody writes to.
    let fifo = d.boot.with_extension("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let mut config = support::config();
    config.crash_detection.detection_timeout = Duration::from_millis(300);
    let t = Instant::now();
    let err = start(db.url(), &d.data, &fifo, config, false)
        .await
        .unwrap_err();
    let waited = t.elapsed();
    assert!(matches!(err, sanare::Error::Unavailable(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("crash_detection.detection_timeout"),
        "{err}"
    );
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // Let the stuck read finish (a writer opens and closes the FIFO).
    drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
}

#[test]
fn bad_crash_detection_and_recovery_values_are_refused_by_key() {
    for (text, key) in [
        (
            "[crash_detection]\ndetection_timeout = \"0s\"",
            "crash_detection.detection_timeout",
        ),
        (
            "[crash_detection]\nheartbeat_interval = \"1ms\"",
            "crash_detection.heartbeat_interval",
        ),
        (
            "[crash_detection]\nhistory_days = -1",
            "crash_detection.history_days",
        ),
        (
            "[recovery]\ntime_target = \"100ms\"",
            "recovery.time_target",
        ),
        ("[recovery]\ntime_targett = \"30s\"", "recovery"),
    ] {
        let err = sanare::SanareConfig::from_toml_str(text, "t").unwrap_err();
        assert!(err.to_string().contains(key), "{text}: {err}");
    }
    let ok = sanare::SanareConfig::from_toml_str(
        "[crash_detection]\nheartbeat_interval = \"2s\"\nhistory_days = 7\n[recovery]\ntime_target = \"45s\"",
        "t",
    )
    .unwrap();
    assert_eq!(
        ok.crash_detection.heartbeat_interval,
        Duration::from_secs(2)
    );
    assert_eq!(ok.crash_detection.history_days, 7);
    assert_eq!(ok.recovery.time_target, Duration::from_secs(45));
}
