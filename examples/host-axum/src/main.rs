//! An order service on axum with sanare. Run it with `DATABASE_URL` set; `LISTEN`
//! defaults to `127.0.0.1:8080`, sanare's settings come from `SANARE__…` variables
//! (its data directory, `SANARE__DATA_DIR`, defaults to `./sanare-data`).

use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use sanare::async_trait;
use sanare::journal::{JournalEntry, NewEntry, PgHandler};
use sanare::recovery::{Readiness, ReadinessCheck, SanareAllocator};
use sanare::{Sanare, SanareConfig};
use serde::{Deserialize, Serialize};

// Records an allocation failure before the abort, so that the next start reports
// `OutOfMemory` instead of an application crash by SIGABRT.
#[global_allocator]
static GLOBAL: SanareAllocator = SanareAllocator::system();

/// What the service journals: one placed order.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: i64,
    customer: String,
    total_cents: i64,
}

/// Writes an order; an order already there is left alone, so applying twice is
/// harmless.
async fn insert_order(
    client: &impl tokio_postgres::GenericClient,
    order: &Order,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO orders (id, customer, total_cents) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO NOTHING",
            &[&order.id, &order.customer, &order.total_cents],
        )
        .await
}

/// Replays `order.placed` entries a crash left unapplied, inside sanare's replay
/// transaction (the order and the entry's applied mark commit together).
struct ApplyOrder;

#[async_trait]
impl PgHandler for ApplyOrder {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entry: &JournalEntry,
    ) -> sanare::Result<()> {
        let order: Order = entry.payload_as()?;
        insert_order(tx, &order)
            .await
            .map(drop)
            .map_err(|e| sanare::Error::database("applying order.placed", e, false))
    }
}

/// The last step of every recovery, and the readiness endpoint: the database
/// answers.
struct DatabaseAnswers(deadpool_postgres::Pool);

#[async_trait]
impl ReadinessCheck for DatabaseAnswers {
    async fn check(&self) -> sanare::Result<Readiness> {
        let client = match self.0.get().await {
            Ok(client) => client,
            Err(e) => return Ok(Readiness::not_ready(format!("no connection: {e}"))),
        };
        Ok(match client.query_one("SELECT 1", &[]).await {
            Ok(_) => Readiness::ready("the database answers"),
            Err(e) => Readiness::not_ready(format!("the database does not answer: {e}")),
        })
    }
}

#[derive(Clone)]
struct App {
    sanare: Arc<Sanare>,
    pool: deadpool_postgres::Pool,
}

type Failure = (StatusCode, String);

fn unavailable(e: impl std::fmt::Display) -> Failure {
    (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// `POST /orders`: journal first, then apply. Once `record` returns the order
/// survives a crash: if the process dies before the insert, the next start
/// replays it.
async fn place_order(
    State(app): State<App>,
    Json(order): Json<Order>,
) -> Result<StatusCode, Failure> {
    let entry = NewEntry::new("order.placed", &order)
        .map_err(unavailable)?
        .idempotency_key(format!("order-{}", order.id));
    let recorded = app
        .sanare
        .journal()
        .record(entry)
        .await
        .map_err(unavailable)?;
    if recorded.duplicate {
        return Ok(StatusCode::OK);
    }
    let client = app.pool.get().await.map_err(unavailable)?;
    insert_order(&**client, &order).await.map_err(unavailable)?;
    Ok(StatusCode::CREATED)
}

/// `GET /health/ready`: 200 once recovery has made the service ready, 503 with
/// the reason otherwise.
async fn ready(State(app): State<App>) -> Result<String, Failure> {
    match app.sanare.recovery().check_readiness().await {
        Ok(r) if r.ready => Ok(r.detail),
        Ok(r) => Err(unavailable(r.detail)),
        Err(e) => Err(unavailable(e)),
    }
}

async fn stop_requested() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        Err(_) => drop(tokio::signal::ctrl_c().await),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());

    // The pool the service already has; sanare works through it too.
    let pool = deadpool_postgres::Config {
        url: Some(url),
        ..Default::default()
    }
    .create_pool(
        Some(deadpool_postgres::Runtime::Tokio1),
        tokio_postgres::NoTls,
    )?;
    pool.get()
        .await?
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS orders (
                 id bigint PRIMARY KEY, customer text NOT NULL, total_cents bigint NOT NULL)",
        )
        .await?;

    // Migrations, how the previous run ended, and (after a crash) recovery: replay
    // of unapplied entries, validation, repair. Only then does the service serve.
    let sanare = Sanare::builder()
        .config(SanareConfig::from_env()?) // defaults, then SANARE__… variables
        .pool(pool.clone())
        .install_crash_handlers() // panic hook and fatal signals, recorded for the next start
        .journal(|j| j.pg_handler("order.placed", ApplyOrder))
        .readiness(Arc::new(DatabaseAnswers(pool.clone())))
        .build()
        .await?;
    if let Some(crash) = sanare.startup_report().crash() {
        eprintln!("the previous run crashed: {}", crash.kind.as_str());
    }

    let sanare = Arc::new(sanare);
    let app = Router::new()
        .route("/orders", post(place_order))
        .route("/health/ready", get(ready))
        .with_state(App {
            sanare: Arc::clone(&sanare),
            pool,
        });
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_requested())
        .await?;

    // A clean shutdown marks the run clean; without it, the next start treats this
    // run as a crash.
    sanare.shutdown().await?;
    Ok(())
}
