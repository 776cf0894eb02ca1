//! The harness itself: isolation, cleanup, and the shared server.

use std::time::Duration;

use sanare_testing::{TestDb, admin_url, test_db};

async fn database_exists(name: &str) -> bool {
    let (client, conn) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 1
}

async fn write_and_read(db: &TestDb, value: i32) -> Vec<i32> {
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE isolation (v int)")
        .await
        .unwrap();
    client
        .execute("INSERT INTO isolation VALUES ($1)", &[&value])
        .await
        .unwrap();
    // Give the other task time to write into its own database meanwhile.
    tokio::time::sleep(Duration::from_millis(50)).await;
    client
        .query("SELECT v FROM isolation", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_tests_get_isolated_databases() {
    let (a, b) = tokio::join!(test_db(), test_db());
    assert_ne!(a.name(), b.name());
    let (ra, rb) = tokio::join!(write_and_read(&a, 1), write_and_read(&b, 2));
    assert_eq!(ra, vec![1]);
    assert_eq!(rb, vec![2]);
}

#[tokio::test]
async fn a_test_database_is_dropped_afterwards() {
    let db = test_db().await;
    let name = db.name().to_owned();
    // Hold an open connection: dropping must still succeed (WITH (FORCE)).
    let _open = db.connect().await;
    assert!(database_exists(&name).await);
    drop(db);
    assert!(
        !database_exists(&name).await,
        "{name} still exists after drop"
    );

    let db = test_db().await;
    let name = db.name().to_owned();
    db.close().await.unwrap();
    assert!(!database_exists(&name).await);
}

#[tokio::test]
async fn test_databases_are_real_postgresql_with_contrib() {
    let db = test_db().await;
    let client = db.client().await;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    assert!(version >= 130_000, "PostgreSQL 13+ required, got {version}");
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        .await
        .unwrap();
}
