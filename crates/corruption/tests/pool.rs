//! A pool shared with the host: no connection goes back to it inside a scan's or a
//! monitor poll's transaction, whether the work is cancelled, aborted or fails.

mod common;

use std::time::Duration;

use common::*;
use sanare_core::Control;
use sanare_corruption::DetectorConfig;
use sanare_testing::test_db;

/// Takes every connection of `pool` at once and writes through each, as a host
/// would: none may be read-only, in a transaction, or aborted.
async fn host_writes_through_every_connection(pool: &sanare_pg::Pool, size: usize, round: i64) {
    let mut held = Vec::new();
    for i in 0..size {
        let c = tokio::time::timeout(Duration::from_secs(10), pool.get())
            .await
            .expect("the pool hands out its connections")
            .unwrap();
        assert!(
            !in_transaction(&c).await,
            "connection {i} came back inside a transaction"
        );
        let id = 100_000 + round * 100 + i as i64;
        upsert(&**c, id, &format!("host{id}@example.com"), None, "1.00").await;
        held.push(c);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_or_aborted_scan_leaves_the_shared_pool_clean() {
    let db = test_db().await;
    install(&**db.client().await, 1500).await;
    let size = 3;
    let pool = sanare_pg::connect_pool(db.url(), size).unwrap();
    let mut cfg = DetectorConfig::default();
    cfg.parallelism = 2;
    cfg.chunk_blocks = 1;
    let det = detector_with(&pool, cfg);
    det.migrate().await.unwrap();

    // Cancelled: the workers have begun their snapshot transactions when they see
    // the cancellation.
    let (control, _) = Control::new();
    control.cancel_token().cancel();
    let err = det.scan_table(&accounts(), &control).await.unwrap_err();
    assert!(err.is_cancelled(), "{err}");
    host_writes_through_every_connection(&pool, size, 1).await;

    // Aborted: the scan's task is dropped while chunks are being read.
    let (control, progress) = Control::new();
    let scan = {
        let det = det.clone();
        tokio::spawn(async move { det.scan_table(&accounts(), &control).await })
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        while progress.get().done == 0 && !scan.is_finished() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the scan makes progress");
    scan.abort();
    let _ = scan.await;
    host_writes_through_every_connection(&pool, size, 2).await;

    // A scan after all that is whole and clean.
    let report = det
        .scan_table(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(report.rows_scanned, 1500 + 2 * size as u64);
    assert!(report.issues.is_empty(), "{:?}", report.issues);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_monitor_poll_leaves_the_shared_pool_clean_and_the_monitor_recovers() {
    let db = test_db().await;
    install(&**db.client().await, 50).await;
    // One connection, shared by the monitor and the host.
    let pool = sanare_pg::connect_pool(db.url(), 1).unwrap();
    let mut cfg = DetectorConfig::default();
    cfg.monitor_interval = Duration::from_millis(50);
    let det = detector_with(&pool, cfg);
    det.migrate().await.unwrap();
    let monitor = det.start_monitor(vec![accounts()]).await.unwrap();

    // The monitor's cached plan reads a column that no longer exists: its poll
    // fails inside its REPEATABLE READ transaction.
    db.client()
        .await
        .batch_execute("ALTER TABLE accounts RENAME COLUMN full_name TO display_name")
        .await
        .unwrap();
    wait_for(|| monitor.stats().errors >= 1).await;
    // It plans again and keeps polling without failing.
    let errors = monitor.stats().errors;
    let polls = monitor.stats().polls;
    wait_for(|| monitor.stats().polls >= polls + 3).await;
    let stats = monitor.stop().await;
    assert_eq!(stats.errors, errors, "polls after the failure succeed");

    // The host writes through the pool's only connection.
    let c = pool.get().await.unwrap();
    assert!(!in_transaction(&c).await);
    c.execute(
        "INSERT INTO accounts (id, email, display_name, balance) VALUES (999, 'h@x', 'H', 1)",
        &[],
    )
    .await
    .expect("the host's write succeeds on the shared connection");
}

/// Whether `c` is inside a transaction begun before this statement: in one simple
/// query (one message), a statement that starts its own transaction has
/// `now() = statement_timestamp()`. An aborted transaction fails the query.
async fn in_transaction(c: &tokio_postgres::Client) -> bool {
    let rows = match c
        .simple_query("SELECT now() <> statement_timestamp()")
        .await
    {
        Ok(rows) => rows,
        Err(e) => panic!("the connection cannot run a query: {e}"),
    };
    rows.iter().any(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0) == Some("t"),
        _ => false,
    })
}
