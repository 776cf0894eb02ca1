//! Every transaction this crate opens: on a [`TxGuard`] (a pooled connection never
//! goes back to the pool inside a transaction, on error, cancellation or panic) and
//! under the canonical session settings (values print the same way the checksum
//! writer printed them, whatever the database's or role's `DateStyle`, `TimeZone`…).

use std::time::Duration;

use sanare_core::Result;
use sanare_pg::{Pool, TxGuard, canonical_settings_local_sql, quote_literal};

/// A read-only transaction under the canonical settings, in READ COMMITTED (each
/// statement sees the latest committed data: re-reading suspects, statistics).
pub(crate) async fn read_committed(pool: &Pool) -> Result<TxGuard> {
    TxGuard::begin(
        pool,
        &format!("BEGIN READ ONLY; {}", canonical_settings_local_sql()),
    )
    .await
}

/// A REPEATABLE READ read-only transaction under the canonical settings: one
/// snapshot for the whole transaction (a monitor poll, the coordinator of a scan).
pub(crate) async fn repeatable_read(pool: &Pool) -> Result<TxGuard> {
    TxGuard::begin(
        pool,
        &format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {}",
            canonical_settings_local_sql()
        ),
    )
    .await
}

/// A scan worker's transaction: joins the exported snapshot `snapshot_id`, under
/// the canonical settings, each statement bounded by `timeout`.
pub(crate) async fn join_snapshot(
    pool: &Pool,
    snapshot_id: &str,
    timeout: Duration,
) -> Result<TxGuard> {
    TxGuard::begin(
        pool,
        &format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; \
             SET LOCAL statement_timeout = {}; {}",
            quote_literal(snapshot_id),
            timeout.as_millis(),
            canonical_settings_local_sql()
        ),
    )
    .await
}

/// A read-only transaction (READ COMMITTED) whose statements are bounded by
/// `timeout`: physical checks, where one relation's check is one statement.
pub(crate) async fn bounded(pool: &Pool, timeout: Duration) -> Result<TxGuard> {
    TxGuard::begin(
        pool,
        &format!(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = {}; {}",
            timeout.as_millis(),
            canonical_settings_local_sql()
        ),
    )
    .await
}
