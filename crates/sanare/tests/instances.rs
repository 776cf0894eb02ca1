//! Two instances sharing one database: one leader, chunk jobs split between them.

use std::collections::BTreeMap;
use std::time::Duration;

use sanare::{JobQueue, LeaderLease, MIGRATIONS};
use sanare_pg::SchemaName;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_leadership_moves_when_released_or_lost() {
    let db = sanare_testing::test_db().await;
    let schema = SchemaName::default();
    let a = sanare_pg::connect_pool(db.url(), 4).unwrap();
    let b = sanare_pg::connect_pool(db.url(), 4).unwrap();

    let lease = LeaderLease::try_acquire(&a, &schema)
        .await
        .unwrap()
        .expect("a leads");
    assert!(lease.is_held().await);
    assert!(
        LeaderLease::try_acquire(&b, &schema)
            .await
            .unwrap()
            .is_none(),
        "b must not lead while a does"
    );
    lease.release().await.unwrap();

    let lease_b = LeaderLease::try_acquire(&b, &schema)
        .await
        .unwrap()
        .expect("b leads after a released");
    assert!(
        LeaderLease::try_acquire(&a, &schema)
            .await
            .unwrap()
            .is_none()
    );
    // Losing the session (a crashed leader) frees leadership too.
    drop(lease_b);
    let mut acquired = None;
    for _ in 0..100 {
        if let Some(l) = LeaderLease::try_acquire(&a, &schema).await.unwrap() {
            acquired = Some(l);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        acquired.is_some(),
        "leadership returns once the old leader's session is gone"
    );
    // Another schema has its own leader.
    let other = SchemaName::new("tenant_b").unwrap();
    assert!(
        LeaderLease::try_acquire(&b, &other)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_a_batch_without_overlap_and_expired_leases_are_reclaimed() {
    let db = sanare_testing::test_db().await;
    let schema = SchemaName::default();
    MIGRATIONS
        .run(&mut db.connect().await, &schema)
        .await
        .unwrap();
    let queue = JobQueue::new(db.pool().clone(), &schema);
    let payloads: Vec<serde_json::Value> =
        (0..40).map(|i| serde_json::json!({ "chunk": i })).collect();
    let batch = queue.enqueue_batch("scan.chunk", &payloads).await.unwrap();

    let work = |name: &'static str| {
        let queue = queue.clone();
        async move {
            let mut done = Vec::new();
            while let Some(job) = queue
                .claim(name, &["scan.chunk"], Duration::from_secs(30))
                .await
                .unwrap()
            {
                let chunk = job.payload["chunk"].as_i64().unwrap();
                tokio::task::yield_now().await;
                queue
                    .complete(&job, name, serde_json::json!({ "rows": chunk * 10 }))
                    .await
                    .unwrap();
                done.push(chunk);
            }
            done
        }
    };
    let (a, b) = tokio::join!(
        tokio::spawn(work("instance-a")),
        tokio::spawn(work("instance-b"))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.len() + b.len(), 40);
    let mut all: Vec<i64> = a.iter().chain(&b).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 40, "no chunk done twice");
    let status = queue.batch_status(batch).await.unwrap();
    assert!(status.is_finished());
    assert_eq!(status.done, 40);
    let by_worker: BTreeMap<String, usize> =
        queue.batch_results(batch).await.unwrap().into_iter().fold(
            BTreeMap::new(),
            |mut m, (w, _)| {
                *m.entry(w).or_default() += 1;
                m
            },
        );
    assert_eq!(by_worker.values().sum::<usize>(), 40);

    // A worker that dies holding a job: the lease expires and another takes it.
    queue
        .enqueue_batch("scan.chunk", &[serde_json::json!({ "chunk": 99 })])
        .await
        .unwrap();
    let lost = queue
        .claim("dead", &["scan.chunk"], Duration::from_millis(50))
        .await
        .unwrap()
        .unwrap();
    assert!(
        queue
            .claim("alive", &["scan.chunk"], Duration::from_secs(30))
            .await
            .unwrap()
            .is_none()
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    let again = queue
        .claim("alive", &["scan.chunk"], Duration::from_secs(30))
        .await
        .unwrap()
        .expect("an expired lease is claimable");
    assert_eq!(again.id, lost.id);
    assert_eq!(again.attempts, 2);
    let err = queue
        .complete(&lost, "dead", serde_json::Value::Null)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no longer held"), "{err}");
    queue
        .complete(&again, "alive", serde_json::Value::Null)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_tasks_run_on_one_instance_and_fail_over() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use sanare::Scheduler;
    use tokio_util::sync::CancellationToken;

    let db = sanare_testing::test_db().await;
    let schema = SchemaName::default();
    MIGRATIONS
        .run(&mut db.connect().await, &schema)
        .await
        .unwrap();
    let runs_a = Arc::new(AtomicU32::new(0));
    let runs_b = Arc::new(AtomicU32::new(0));
    let scheduler = |name: &'static str, runs: Arc<AtomicU32>| {
        let pool = sanare_pg::connect_pool(db.url(), 4).unwrap();
        Scheduler::new(pool, schema.clone(), name)
            .poll_interval(Duration::from_millis(20))
            .task("snapshot", Duration::from_millis(100), move |_control| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
    };
    let stop_a = CancellationToken::new();
    let stop_b = CancellationToken::new();
    let a = scheduler("a", runs_a.clone()).spawn(stop_a.clone());
    let b = scheduler("b", runs_b.clone()).spawn(stop_b.clone());
    // Wait until the task ran a few times.
    for _ in 0..200 {
        if runs_a.load(Ordering::SeqCst) + runs_b.load(Ordering::SeqCst) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ra, rb) = (runs_a.load(Ordering::SeqCst), runs_b.load(Ordering::SeqCst));
    assert!(ra + rb >= 3, "the task runs on schedule");
    assert!(
        ra == 0 || rb == 0,
        "only the leader runs tasks (a={ra}, b={rb})"
    );
    // Stop the leader: the other instance takes over.
    let (leader_stop, leader, follower_runs) = if ra > 0 {
        (stop_a, a, runs_b.clone())
    } else {
        (stop_b, b, runs_a.clone())
    };
    leader_stop.cancel();
    leader.await.unwrap();
    for _ in 0..200 {
        if follower_runs.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        follower_runs.load(Ordering::SeqCst) > 0,
        "the follower took over"
    );
    let outcome: String = db
        .client()
        .await
        .query_one(
            "SELECT last_outcome FROM sanare.scheduled_tasks WHERE name = 'snapshot'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(outcome, "ok");
}
