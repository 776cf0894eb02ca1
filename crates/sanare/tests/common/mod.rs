//! Fixtures shared by the facade's integration tests.

use sanare_testing::TestDb;

/// A host table `shop.items` with `rows` rows, for scheduled work to snapshot and
/// validate (and for a test to hold up with a lock).
pub(crate) async fn shop_items(db: &TestDb, rows: i64) {
    let client = db.connect().await;
    client
        .batch_execute(
            "CREATE SCHEMA shop;
             CREATE TABLE shop.items (id bigint PRIMARY KEY, name text NOT NULL);",
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO shop.items SELECT g, 'item ' || g FROM generate_series(1, $1::bigint) g",
            &[&rows],
        )
        .await
        .unwrap();
}
