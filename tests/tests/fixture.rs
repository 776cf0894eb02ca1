//! The order-service fixture is what every scenario stands on: check that it holds
//! its own invariants and that the catalog sees its shape.

use sanare_core::TableRef;
use sanare_pg::catalog;
use sanare_testing::fixtures::order_service;

#[tokio::test]
async fn order_service_fixture_is_consistent_and_introspectable() {
    let db = sanare_testing::test_db().await;
    let client = db.client().await;
    order_service::install(&**client, "shop").await.unwrap();
    let counts = order_service::generate(&**client, "shop", 1_000)
        .await
        .unwrap();
    assert_eq!(counts.orders, 1_000);
    assert_eq!(counts.customers, 100);
    assert_eq!(counts.products, 20);
    // 1 + i % 5 lines per order: 1000 orders * average 3 lines.
    assert_eq!(counts.order_lines, 3_000);
    assert!(counts.payments > 0 && counts.payments < counts.orders);

    // Order totals equal the sum of their lines; payments equal order totals.
    let bad_totals: i64 = client
        .query_one(
            "SELECT count(*) FROM shop.orders o WHERE o.total_cents <>
               (SELECT coalesce(sum(amount_cents), 0) FROM shop.order_lines l WHERE l.order_id = o.id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad_totals, 0);

    // Deterministic: the same size gives the same data.
    let digest = order_service::content_hashes(&**client, "shop")
        .await
        .unwrap();
    let other = sanare_testing::test_db().await;
    let other_client = other.client().await;
    order_service::install(&**other_client, "shop")
        .await
        .unwrap();
    order_service::generate(&**other_client, "shop", 1_000)
        .await
        .unwrap();
    let other_digest = order_service::content_hashes(&**other_client, "shop")
        .await
        .unwrap();
    assert_eq!(digest, other_digest);

    let tables = catalog::list_tables(&**client, &["shop".into()], "sanare")
        .await
        .unwrap();
    assert_eq!(tables.len(), 5);
    let mut infos = Vec::new();
    for t in &tables {
        infos.push(catalog::describe(&**client, t).await.unwrap());
    }
    let order: Vec<String> = catalog::fk_order(&infos)
        .iter()
        .map(|t| t.name.clone())
        .collect();
    let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
    assert!(pos("customers") < pos("orders"));
    assert!(pos("orders") < pos("order_lines"));
    assert!(pos("products") < pos("order_lines"));
    assert!(pos("orders") < pos("payments"));

    let lines = infos
        .iter()
        .find(|i| i.table == TableRef::new("shop", "order_lines"))
        .unwrap();
    assert_eq!(lines.primary_key, vec!["order_id", "line_no"]);
    assert_eq!(lines.foreign_keys.len(), 2);
    assert_eq!(lines.column("amount_cents").unwrap().type_name, "bigint");
    let payments = infos.iter().find(|i| i.table.name == "payments").unwrap();
    assert_eq!(
        payments.column("amount_cents").unwrap().type_name,
        "numeric(12,0)"
    );
    let referencing = catalog::referencing(&**client, &TableRef::new("shop", "orders"))
        .await
        .unwrap();
    let mut children: Vec<&str> = referencing
        .iter()
        .map(|fk| fk.table.name.as_str())
        .collect();
    children.sort_unstable();
    assert_eq!(children, ["order_lines", "payments"]);
}
