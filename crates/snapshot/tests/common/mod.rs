//! Setup shared by the snapshot tests.

use sanare_pg::SchemaName;
use sanare_testing::fixtures::order_service;
use sanare_testing::{TestDb, test_db};

/// A database with the order-service fixture (`orders` orders) in schema `shop` and
/// the snapshot catalog in sanare's default schema.
pub(crate) async fn shop_db(orders: u64) -> TestDb {
    let db = test_db().await;
    {
        let client = db.client().await;
        order_service::install(&**client, "shop").await.unwrap();
        order_service::generate(&**client, "shop", orders)
            .await
            .unwrap();
    }
    sanare_snapshot::migrate(&mut db.connect().await, &SchemaName::default_schema())
        .await
        .unwrap();
    db
}

/// Changes rows spread over the fixture's `orders` and `payments` (so a second
/// snapshot stores deltas against the first's blocks).
#[allow(dead_code)] // not every test file uses it
pub(crate) async fn change_spread_rows(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "UPDATE shop.orders SET note = 'changed' WHERE id % 5 = 0;
             DELETE FROM shop.payments WHERE id % 7 = 0;",
        )
        .await
        .unwrap();
}
