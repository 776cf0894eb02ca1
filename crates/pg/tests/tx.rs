//! A connection never goes back to the pool inside a transaction: after an error, a
//! cancelled query or a panic, the next user of the pool can write.

use std::time::Duration;

use sanare_pg::{TxGuard, connect_pool};
use sanare_testing::test_db;

const READ_ONLY: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

/// The next pooled connection can write (a read-only transaction left open on it
/// would refuse).
async fn host_can_write(pool: &sanare_pg::Pool) {
    let conn = pool.get().await.expect("a connection");
    conn.batch_execute("INSERT INTO host_writes VALUES (1)")
        .await
        .expect("the host's write on a pooled connection");
}

async fn setup() -> (sanare_testing::TestDb, sanare_pg::Pool) {
    let db = test_db().await;
    db.client()
        .await
        .batch_execute("CREATE TABLE host_writes (i int)")
        .await
        .unwrap();
    // One connection: whatever the guard leaves is what the host gets next.
    let pool = connect_pool(db.url(), 1).unwrap();
    (db, pool)
}

#[tokio::test]
async fn an_error_inside_the_transaction_does_not_reach_the_pool() {
    let (_db, pool) = setup().await;
    let result: sanare_core::Result<()> = async {
        let tx = TxGuard::begin(&pool, READ_ONLY).await?;
        tx.batch_execute("SELECT 1/0")
            .await
            .map_err(|e| sanare_core::Error::database("planted", e, false))?;
        tx.commit().await
    }
    .await;
    assert!(result.is_err());
    host_can_write(&pool).await;
}

#[tokio::test]
async fn a_cancelled_scan_does_not_reach_the_pool() {
    let (_db, pool) = setup().await;
    let scan = async {
        let tx = TxGuard::begin(&pool, READ_ONLY).await.unwrap();
        tx.batch_execute("SELECT pg_sleep(30)").await.unwrap();
        tx.commit().await.unwrap();
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(300), scan)
            .await
            .is_err(),
        "the scan is cancelled mid-query"
    );
    host_can_write(&pool).await;
}

#[tokio::test]
async fn a_panic_inside_the_transaction_does_not_reach_the_pool() {
    let (_db, pool) = setup().await;
    let p = pool.clone();
    let task = tokio::spawn(async move {
        let _tx = TxGuard::begin(&p, READ_ONLY).await.unwrap();
        panic!("planted panic inside a transaction");
    });
    assert!(task.await.unwrap_err().is_panic());
    host_can_write(&pool).await;
}

#[tokio::test]
async fn commit_and_rollback_return_a_clean_connection() {
    let (_db, pool) = setup().await;
    let tx = TxGuard::begin(&pool, READ_ONLY).await.unwrap();
    tx.batch_execute("SELECT 1").await.unwrap();
    tx.commit().await.unwrap();
    host_can_write(&pool).await;
    let tx = TxGuard::begin(&pool, READ_ONLY).await.unwrap();
    let pid: i32 = tx
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();
    // The same connection came back (nothing was closed on the clean path).
    let conn = pool.get().await.unwrap();
    let again: i32 = conn
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid, again);
}
