//! The order service as an axum web service: sanare's panic hook and fatal-signal
//! handlers installed, orders journaled write-ahead, and health endpoints that
//! report whether recovery has made the service ready.
//!
//! | route | what |
//! |---|---|
//! | `POST /orders` | place an order (`{"order_id", "customer_id", "lines": [[product, qty]]}`); the order id is the idempotency key, a repeat returns the first |
//! | `GET /health/live` | the process is up |
//! | `GET /health/ready` | 200 when ready, 503 with the reason otherwise (the recovery at start-up failed, or the database is unreachable) |
//! | `GET /recovery` | how the previous run ended and what the start-up recovery did |

use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use sanare::Sanare;
use sanare::journal::NewEntry;
use sanare::recovery::{Readiness, ReadinessCheck, RecoveryStep};

use crate::orders::{self, PlaceOrder};

/// The readiness probe the service gives sanare: the database answers.
#[derive(Debug, Clone)]
pub struct DatabaseAnswers {
    pool: sanare_pg::Pool,
}

impl DatabaseAnswers {
    /// A probe on `pool`.
    pub fn new(pool: sanare_pg::Pool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl ReadinessCheck for DatabaseAnswers {
    async fn check(&self) -> sanare::Result<Readiness> {
        let client = match sanare_pg::get_conn(&self.pool).await {
            Ok(c) => c,
            Err(e) => return Ok(Readiness::not_ready(format!("no database connection: {e}"))),
        };
        Ok(match client.query_one("SELECT 1", &[]).await {
            Ok(_) => Readiness::ready("the database answers"),
            Err(e) => Readiness::not_ready(format!("the database does not answer: {e}")),
        })
    }
}

/// The service's routes over a running sanare.
pub fn router(sanare: Arc<Sanare>) -> Router {
    Router::new()
        .route("/orders", post(place))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/recovery", get(recovery))
        // A panicking request answers 500; sanare's panic hook has recorded it.
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .with_state(sanare)
}

async fn place(State(sanare): State<Arc<Sanare>>, Json(order): Json<PlaceOrder>) -> Response {
    let recorded = match NewEntry::new(orders::PLACE_ORDER, &order) {
        Ok(entry) => {
            sanare
                .journal()
                .record(
                    entry
                        .idempotency_key(format!("order-{}", order.order_id))
                        .source_system("web"),
                )
                .await
        }
        Err(e) => Err(e),
    };
    let recorded = match recorded {
        Ok(r) => r,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    if recorded.duplicate {
        return (
            StatusCode::OK,
            Json(serde_json::json!({ "order_id": order.order_id, "duplicate": true })),
        )
            .into_response();
    }
    let applied = async {
        let mut client = sanare_pg::get_conn(sanare.pool()).await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| sanare::Error::database("starting the order", e, true))?;
        orders::apply_order(&*tx, &order)
            .await
            .map_err(|e| sanare::Error::database("placing the order", e, false))?;
        tx.commit()
            .await
            .map_err(|e| sanare::Error::database("committing the order", e, true))
    }
    .await;
    match applied {
        Ok(()) => (
            StatusCode::CREATED,
            Json(serde_json::json!({ "order_id": order.order_id, "duplicate": false })),
        )
            .into_response(),
        // Journaled but not applied: the next replay applies it; tell the client
        // it was accepted, not that it failed.
        Err(e) if e.is_retryable() => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "order_id": order.order_id, "journaled": true, "applied": false })),
        )
            .into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, &e),
    }
}

async fn ready(State(sanare): State<Arc<Sanare>>) -> Response {
    // A start-up recovery that failed before its readiness check (a replay or a
    // restore that did not go through) keeps the service out of rotation; a
    // readiness check that failed then is simply asked again below.
    if let Some(result) = &sanare.startup_report().recovery
        && result
            .steps
            .iter()
            .any(|s| !s.success && s.step != RecoveryStep::ReadinessCheck)
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "detail": "the start-up recovery failed", "errors": result.errors })),
        )
            .into_response();
    }
    match sanare.recovery().check_readiness().await {
        Ok(r) if r.ready => (StatusCode::OK, Json(r)).into_response(),
        Ok(r) => (StatusCode::SERVICE_UNAVAILABLE, Json(r)).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
    }
}

async fn recovery(State(sanare): State<Arc<Sanare>>) -> Json<serde_json::Value> {
    let report = sanare.startup_report();
    Json(serde_json::json!({
        "previous_run": report.previous_run.outcome,
        "crash": report.crash(),
        "recovery": report.recovery.as_ref().map(|r| serde_json::to_value(r).unwrap_or_default()),
    }))
}

fn error(status: StatusCode, e: &sanare::Error) -> Response {
    (status, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
}
