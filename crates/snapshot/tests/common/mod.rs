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
