//! Background work that survives its own failures, against a real PostgreSQL:
//! job leases renewed while a job runs, jobs abandoned on their last attempt
//! finished, panics caught and recorded, tasks cancelled when leadership is lost,
//! and two schemas kept from running the same task on the same data at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sanare::{Error, JobQueue, JobWorker, MIGRATIONS, Scheduler};
use sanare_pg::SchemaName;
use sanare_testing::TestDb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod common;

async fn migrated(schemas: &[&str]) -> TestDb {
    let db = sanare_testing::test_db().await;
    let mut client = db.connect().await;
    for s in schemas {
        MIGRATIONS
            .run(&mut client, &SchemaName::new(*s).unwrap())
            .await
            .unwrap();
    }
    db
}

/// Polls `check` until it holds, failing after 20 s.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    within(Duration::from_secs(20), what, check).await;
}

/// Polls `check` until it holds, failing after `limit`.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} ({limit:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next message, failing after 20 s.
async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("timed out waiting for the task")
        .expect("the task's channel closed")
}

async fn job_row(db: &TestDb, batch: uuid::Uuid) -> (String, i32, Option<String>) {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT status, attempts, error FROM sanare.jobs WHERE batch_id = $1",
            &[&batch],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_longer_than_its_lease_is_renewed_and_never_claimed_twice() {
    let db = migrated(&["sanare"]).await;
    let queue = JobQueue::new(db.pool().clone(), &SchemaName::default());
    let batch = queue
        .enqueue_batch("slow", &[serde_json::json!({})])
        .await
        .unwrap();
    // Room for a slow renewal on a busy machine: the worker gives the job up
    // after half a lease without one.
    let lease = Duration::from_secs(1);
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let finish = CancellationToken::new();
    let shutdown = CancellationToken::new();
    let worker = JobWorker::new(queue.clone(), "a", &["slow"])
        .lease(lease)
        .heartbeat(Duration::from_millis(100))
        .poll_interval(Duration::from_millis(20));
    let running = tokio::spawn(worker.run(shutdown.clone(), {
        let finish = finish.clone();
        move |_job, _control| {
            let (started_tx, finish) = (started_tx.clone(), finish.clone());
            async move {
                let _ = started_tx.send(());
                finish.cancelled().await;
                Ok(serde_json::json!({ "slow": true }))
            }
        }
    }));
    recv(&mut started).await;
    // Three leases long, another worker finds nothing to claim.
    let until = Instant::now() + lease * 3;
    while Instant::now() < until {
        assert!(
            queue.claim("b", &["slow"], lease).await.unwrap().is_none(),
            "a running job whose worker renews its lease was claimed again"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    finish.cancel();
    eventually("the job to finish", || async {
        queue.batch_status(batch).await.unwrap().done == 1
    })
    .await;
    assert_eq!(job_row(&db, batch).await.1, 1, "claimed once");
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_abandoned_on_its_last_attempt_is_failed_with_the_reason_and_its_batch_finishes() {
    let db = migrated(&["sanare"]).await;
    let queue = JobQueue::new(db.pool().clone(), &SchemaName::default());
    let batch = queue
        .enqueue_batch("scan", &[serde_json::json!({})])
        .await
        .unwrap();
    // Three workers claim it in turn and die holding it.
    let lease = Duration::from_millis(40);
    for attempt in 1..=3 {
        let worker = format!("dead-{attempt}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let job = loop {
            if let Some(job) = queue.claim(&worker, &["scan"], lease).await.unwrap() {
                break job;
            }
            assert!(Instant::now() < deadline, "the expired job never came back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(job.attempts, attempt);
    }
    assert!(!queue.batch_status(batch).await.unwrap().is_finished());
    eventually(
        "the last lease to expire and the job to be reaped",
        || async {
            assert!(
                queue
                    .claim("alive", &["scan"], lease)
                    .await
                    .unwrap()
                    .is_none()
            );
            queue.batch_status(batch).await.unwrap().is_finished()
        },
    )
    .await;
    let status = queue.batch_status(batch).await.unwrap();
    assert_eq!((status.done, status.failed), (0, 1), "{status:?}");
    let (state, attempts, error) = job_row(&db, batch).await;
    assert_eq!((state.as_str(), attempts), ("failed", 3));
    let error = error.unwrap();
    assert!(
        error.contains("abandoned") && error.contains("dead-3") && error.contains("3 of 3"),
        "{error}"
    );
    assert_eq!(queue.reap_abandoned().await.unwrap(), 0, "reaped once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_job_fails_with_its_message_and_the_worker_goes_on() {
    let db = migrated(&["sanare"]).await;
    let queue = JobQueue::new(db.pool().clone(), &SchemaName::default());
    let bad = queue
        .enqueue_batch("job", &[serde_json::json!({ "panic": true })])
        .await
        .unwrap();
    let good = queue
        .enqueue_batch("job", &[serde_json::json!({ "panic": false })])
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let worker = JobWorker::new(queue.clone(), "w", &["job"])
        .lease(Duration::from_secs(30))
        .heartbeat(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(20));
    let running = tokio::spawn(worker.run(shutdown.clone(), |job, _control| async move {
        if job.payload["panic"] == true {
            panic!("chunk {} is cursed", job.attempts);
        }
        Ok(serde_json::json!("fine"))
    }));
    eventually("both batches to finish", || async {
        queue.batch_status(bad).await.unwrap().is_finished()
            && queue.batch_status(good).await.unwrap().is_finished()
    })
    .await;
    let (state, attempts, error) = job_row(&db, bad).await;
    assert_eq!(
        (state.as_str(), attempts),
        ("failed", 3),
        "retried to its limit"
    );
    assert_eq!(error.as_deref(), Some("panicked: chunk 3 is cursed"));
    assert_eq!(job_row(&db, good).await.0, "done");
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_job_was_taken_over_stops_it_and_records_nothing() {
    let db = migrated(&["sanare"]).await;
    let queue = JobQueue::new(db.pool().clone(), &SchemaName::default());
    let batch = queue
        .enqueue_batch("job", &[serde_json::json!({})])
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
    let shutdown = CancellationToken::new();
    let worker = JobWorker::new(queue.clone(), "a", &["job"])
        .lease(Duration::from_secs(30))
        .heartbeat(Duration::from_millis(50))
        .poll_interval(Duration::from_millis(20));
    let running = tokio::spawn(worker.run(shutdown.clone(), move |_job, control| {
        let tx = tx.clone();
        async move {
            let _ = tx.send("started");
            control.cancel_token().cancelled().await;
            let _ = tx.send("cancelled");
            Err(Error::Cancelled)
        }
    }));
    assert_eq!(recv(&mut rx).await, "started");
    // Another worker took it over (as after an expired lease).
    db.client()
        .await
        .execute(
            "UPDATE sanare.jobs SET claimed_by = 'b', attempts = attempts + 1 WHERE batch_id = $1",
            &[&batch],
        )
        .await
        .unwrap();
    let since = Instant::now();
    assert_eq!(recv(&mut rx).await, "cancelled");
    assert!(
        since.elapsed() < Duration::from_secs(5),
        "stopped {:?} after the takeover",
        since.elapsed()
    );
    shutdown.cancel();
    running.await.unwrap();
    let (state, attempts, error) = job_row(&db, batch).await;
    assert_eq!((state.as_str(), attempts, error), ("running", 2, None));
}

/// The task's rows in `<schema>.scheduled_tasks`.
async fn task_row(
    db: &TestDb,
    schema: &str,
    name: &str,
) -> (Option<String>, Option<String>, i32, i64, bool) {
    let row = db
        .client()
        .await
        .query_one(
            &format!(
                "SELECT last_outcome, last_error, attempts, panics, run_id IS NOT NULL
                   FROM {schema}.scheduled_tasks WHERE name = $1"
            ),
            &[&name],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
}

/// Makes `name` due now (as if registered long ago).
async fn make_due(db: &TestDb, schema: &str, name: &str) {
    db.client()
        .await
        .execute(
            &format!(
                "INSERT INTO {schema}.scheduled_tasks (name, last_started_at)
                 VALUES ($1, now() - interval '1 day')"
            ),
            &[&name],
        )
        .await
        .unwrap();
}

fn scheduler(db: &TestDb, schema: &str, instance: &str) -> Scheduler {
    Scheduler::new(
        sanare_pg::connect_pool(db.url(), 4).unwrap(),
        SchemaName::new(schema).unwrap(),
        instance,
    )
    .poll_interval(Duration::from_millis(20))
    .heartbeat(Duration::from_millis(50))
    .lease(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_leadership_cancels_the_running_task_and_the_next_leader_resumes_that_run() {
    let db = migrated(&["sanare"]).await;
    make_due(&db, "sanare", "report").await;
    let calls = Arc::new(AtomicU32::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
    let shutdown = CancellationToken::new();
    let running = scheduler(&db, "sanare", "a")
        .task("report", Duration::from_secs(3600), {
            let calls = calls.clone();
            move |control| {
                let (calls, tx) = (calls.clone(), tx.clone());
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) > 0 {
                        let _ = tx.send("resumed");
                        return Ok(());
                    }
                    let _ = tx.send("started");
                    control.cancel_token().cancelled().await;
                    let _ = tx.send("cancelled");
                    Err(Error::Cancelled)
                }
            }
        })
        .spawn(shutdown.clone());
    assert_eq!(recv(&mut rx).await, "started");
    // The leader's session ends (a network cut, an administrator): leadership is
    // gone, and the task must stop within about a heartbeat.
    let ended: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks
              WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended, 1, "one leader session");
    let since = Instant::now();
    assert_eq!(recv(&mut rx).await, "cancelled");
    assert!(
        since.elapsed() < Duration::from_secs(3),
        "the task ran on for {:?} after leadership was lost",
        since.elapsed()
    );
    // The run was handed back, not dropped: the next leader (here the same
    // instance, on a new session) resumes it at once, long before its interval.
    assert_eq!(recv(&mut rx).await, "resumed");
    eventually("the resumed run to be recorded", || async {
        task_row(&db, "sanare", "report").await.0.as_deref() == Some("ok")
    })
    .await;
    let (_, _, attempts, _, running_now) = task_row(&db, "sanare", "report").await;
    assert_eq!(
        (attempts, running_now),
        (1, false),
        "the interruption did not count"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_scheduled_task_is_recorded_and_the_schedule_goes_on() {
    let db = migrated(&["sanare"]).await;
    make_due(&db, "sanare", "flaky").await;
    let panicked = Arc::new(AtomicU32::new(0));
    let healed = CancellationToken::new();
    let shutdown = CancellationToken::new();
    let running = scheduler(&db, "sanare", "a")
        .task("flaky", Duration::from_millis(100), {
            let (panicked, healed) = (panicked.clone(), healed.clone());
            move |_control| {
                let (panicked, healed) = (panicked.clone(), healed.clone());
                async move {
                    if !healed.is_cancelled() {
                        panicked.fetch_add(1, Ordering::SeqCst);
                        panic!("the snapshot store vanished");
                    }
                    Ok(())
                }
            }
        })
        .spawn(shutdown.clone());
    eventually("the panicked run to be recorded", || async {
        task_row(&db, "sanare", "flaky").await.3 >= 1
    })
    .await;
    healed.cancel();
    let (outcome, error, _, _, _) = task_row(&db, "sanare", "flaky").await;
    assert_eq!(outcome.as_deref(), Some("panicked"));
    assert_eq!(
        error.as_deref(),
        Some("panicked: the snapshot store vanished")
    );
    // The same scheduler loop goes on: a later run succeeds.
    eventually("a later run to succeed", || async {
        task_row(&db, "sanare", "flaky").await.0.as_deref() == Some("ok")
    })
    .await;
    let panics = task_row(&db, "sanare", "flaky").await.3;
    assert_eq!(panics, i64::from(panicked.load(Ordering::SeqCst)));
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schemas_never_run_the_same_task_on_the_same_data_at_once() {
    let db = migrated(&["tenant_a", "tenant_b", "tenant_c"]).await;
    for schema in ["tenant_a", "tenant_b", "tenant_c"] {
        make_due(&db, schema, "snapshots.create").await;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
    let release = CancellationToken::new();
    let shutdown = CancellationToken::new();
    let task = |who: &'static str, data: &'static str, every: Duration| {
        let (tx, release) = (tx.clone(), release.clone());
        scheduler(&db, who, who).task_on("snapshots.create", data, every, move |_control| {
            let (tx, release) = (tx.clone(), release.clone());
            async move {
                let _ = tx.send(who);
                if who == "tenant_a" {
                    release.cancelled().await;
                }
                Ok(())
            }
        })
    };
    let a = task("tenant_a", "schemas=shop", Duration::from_secs(3600)).spawn(shutdown.clone());
    assert_eq!(recv(&mut rx).await, "tenant_a");
    // b snapshots the same data as a; c other data, every 50 ms.
    let b = task("tenant_b", "schemas=shop", Duration::from_secs(3600)).spawn(shutdown.clone());
    let c = task("tenant_c", "schemas=billing", Duration::from_millis(50)).spawn(shutdown.clone());
    let mut c_runs = 0;
    while c_runs < 5 {
        let who = recv(&mut rx).await;
        assert_eq!(who, "tenant_c", "b ran the task on a's data while a ran it");
        c_runs += 1;
    }
    release.cancel();
    loop {
        match recv(&mut rx).await {
            "tenant_b" => break,
            "tenant_c" => {}
            other => panic!("{other} ran twice"),
        }
    }
    shutdown.cancel();
    for s in [a, b, c] {
        s.await.unwrap();
    }
}

#[test]
fn background_keys_parse_and_bad_values_are_refused_by_name() {
    let config = sanare::SanareConfig::from_toml_str(
        "[background]\nlease = \"90s\"\nheartbeat = \"10s\"\nrestart_backoff = \"250ms\"",
        "sanare.toml",
    )
    .unwrap();
    assert_eq!(config.background.lease, Duration::from_secs(90));
    assert_eq!(config.background.heartbeat, Duration::from_secs(10));
    assert_eq!(
        config.background.restart_backoff,
        Duration::from_millis(250)
    );
    for (toml, key) in [
        ("lease = \"30s\"\nheartbeat = \"20s\"", "background.lease"),
        ("heartbeat = \"1ms\"", "background.heartbeat"),
        ("restart_backoff = \"0s\"", "background.restart_backoff"),
    ] {
        let err = sanare::SanareConfig::from_toml_str(&format!("[background]\n{toml}"), "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{toml}: {err}");
    }
}

/// `background.lease` and `background.heartbeat` reach the job worker of a running
/// service: a table validation held up by a lock keeps a 10-minute lease, renewed
/// every 50 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_renews_a_running_jobs_lease_as_configured() {
    let db = sanare_testing::test_db().await;
    common::shop_items(&db, 100).await;
    let mut config = sanare::SanareConfig::default();
    config.snapshots.schemas = vec!["shop".into()];
    config.snapshots.interval = None;
    config.journal.compaction_interval = None;
    config.corruption.scan_interval = None;
    config.validation.interval = Some(Duration::from_secs(1));
    config.background.lease = Duration::from_secs(600);
    config.background.heartbeat = Duration::from_millis(50);
    let mut blocker = db.connect().await;
    let hold = blocker.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE shop.items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sanare = sanare::Sanare::builder()
        .config(config)
        .pool(db.pool().clone())
        .data_dir(dir.path())
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    let lease_left = || async {
        db.client()
            .await
            .query_opt(
                "SELECT lease_until, extract(epoch FROM lease_until - now())::float8
                   FROM sanare.jobs WHERE status = 'running'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| (r.get::<_, time::OffsetDateTime>(0), r.get::<_, f64>(1)))
    };
    eventually("the validation job to be running", || async {
        lease_left().await.is_some()
    })
    .await;
    let (first, left) = lease_left().await.unwrap();
    assert!(left > 590.0, "a 10-minute lease, {left} s left");
    // The default heartbeat (20 s) would not renew it this soon.
    within(
        Duration::from_secs(5),
        "the lease to be renewed",
        || async { lease_left().await.is_some_and(|(until, _)| until > first) },
    )
    .await;
    hold.commit().await.unwrap();
    eventually("the job to finish", || async {
        lease_left().await.is_none()
    })
    .await;
    // Both loops run supervised, and neither has panicked.
    let loops: Vec<(String, bool, u64, u64)> = sanare
        .background_status()
        .into_iter()
        .map(|s| (s.name, s.running, s.starts, s.panics))
        .collect();
    assert_eq!(
        loops,
        [
            ("scheduler".to_owned(), true, 1, 0),
            ("job-worker".to_owned(), true, 1, 0)
        ]
    );
    sanare.shutdown().await.unwrap();
}
