//! The order service as a web service with sanare: `cargo run -p sanare-examples
//! --bin web_service` with `DATABASE_URL` set (and `SANARE_DATA_DIR`, default
//! `./sanare-data`; `LISTEN`, default `127.0.0.1:8080`).
//!
//! Start-up installs the panic hook and fatal-signal handlers, detects how the
//! previous run ended and recovers before serving; SIGTERM or Ctrl-C shuts down
//! gracefully (so the next start knows the run ended cleanly). Routes are in
//! `sanare_examples::web`.

use std::sync::Arc;

use anyhow::Context as _;
use sanare::{Sanare, SanareConfig};
use sanare_examples::{orders, web};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let data_dir = std::env::var("SANARE_DATA_DIR").unwrap_or_else(|_| "sanare-data".into());
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());

    let mut config = SanareConfig::default().with_env(std::env::vars())?;
    config.snapshots.schemas = vec!["shop".into()];
    let pool = sanare_pg::connect_pool(&url, 16)?;
    let sanare = Sanare::builder()
        .config(config)
        .pool(pool.clone())
        .data_dir(&data_dir)
        .install_crash_handlers()
        .journal(orders::register)
        .readiness(Arc::new(web::DatabaseAnswers::new(pool)))
        .build()
        .await?;
    if let Some(crash) = sanare.startup_report().crash() {
        tracing::warn!(kind = crash.kind.as_str(), message = ?crash.message, "the previous run crashed");
    }
    let sanare = Arc::new(sanare);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(address = %listener.local_addr()?, "serving");
    axum::serve(listener, web::router(sanare.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    let sanare = Arc::try_unwrap(sanare)
        .map_err(|_| anyhow::anyhow!("requests still hold sanare at shutdown"))?;
    sanare.shutdown().await?;
    tracing::info!("shut down cleanly");
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
