//! The axum reference integration: orders through HTTP, health endpoints that
//! reflect recovery and the database, bad input answered clearly.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use sanare::Sanare;
use sanare_examples::{orders, web};
use sanare_testing::fixtures::order_service;
use tower::ServiceExt as _;

async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

fn post(body: &str) -> Request<Body> {
    Request::post("/orders")
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_health_and_recovery_over_http() {
    let db = sanare_testing::test_db().await;
    let client = db.client().await;
    order_service::install(&**client, "shop").await.unwrap();
    order_service::generate(&**client, "shop", 100)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start = |probe: web::DatabaseAnswers| {
        Sanare::builder()
            .pool(db.pool().clone())
            .data_dir(dir.path())
            .background(false)
            .journal(orders::register)
            .readiness(Arc::new(probe))
            .build()
    };
    // A first run that dies (no shutdown), so the second start recovers.
    drop(
        start(web::DatabaseAnswers::new(db.pool().clone()))
            .await
            .unwrap(),
    );
    let sanare = Arc::new(
        start(web::DatabaseAnswers::new(db.pool().clone()))
            .await
            .unwrap(),
    );
    let app = web::router(sanare.clone());

    let order = r#"{"order_id": 1001, "customer_id": 3, "lines": [[2, 1], [5, 3]]}"#;
    let (status, body) = call(&app, post(order)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = call(&app, post(order)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["duplicate"], true);
    let lines: i64 = client
        .query_one(
            "SELECT count(*) FROM shop.order_lines WHERE order_id = 1001",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(lines, 2, "placed once");

    // Bad input: a clear 4xx, nothing journaled.
    let before = sanare.journal().stats().await.unwrap().entries;
    let (status, _) = call(&app, post(r#"{"order_id": "x"}"#)).await;
    assert!(status.is_client_error(), "{status}");
    let (status, body) = call(
        &app,
        post(r#"{"order_id": 1002, "customer_id": 999999, "lines": []}"#),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("placing the order")
    );
    assert_eq!(
        sanare.journal().stats().await.unwrap().entries,
        before + 1,
        "the rejected order was journaled write-ahead; replay will reject it again, never half-apply it"
    );

    let (status, body) = call(
        &app,
        Request::get("/health/ready").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ready"], true);
    let (status, body) = call(&app, Request::get("/recovery").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["previous_run"], "crashed");
    assert_eq!(body["crash"]["kind"], "application_crash");
    assert_eq!(body["recovery"]["success"], true);
    let (status, _) = call(
        &app,
        Request::get("/health/live").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    drop(app);
    Arc::try_unwrap(sanare).unwrap().shutdown().await.unwrap();

    // The database gone from the probe's point of view: not ready, and why.
    let unreachable = sanare_pg::connect_pool("postgres://nobody@127.0.0.1:1/none", 1).unwrap();
    let sanare = Arc::new(start(web::DatabaseAnswers::new(unreachable)).await.unwrap());
    let app = web::router(sanare.clone());
    let (status, body) = call(
        &app,
        Request::get("/health/ready").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["ready"], false);
    assert!(
        body["detail"].as_str().unwrap().contains("database"),
        "{body}"
    );
}
