//! [`TxGuard`]: a pooled connection inside a transaction that never goes back to the
//! pool still inside it.

use std::ops::Deref;

use deadpool_postgres::{Object, Pool};
use sanare_core::Result;

use crate::{PgResultExt, get_conn};

/// A pooled connection with a transaction open on it, begun with a statement of
/// the caller's choice (`BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET
/// TRANSACTION SNAPSHOT …`, `SET LOCAL …`).
///
/// The pool's fast recycling does not reset a connection, so a connection returned
/// inside an open (or aborted) transaction would hand that transaction to the next
/// user of the pool — a host sharing the pool would see its writes fail in a
/// read-only transaction. A guard returns its connection only after
/// [`commit`](Self::commit) or [`rollback`](Self::rollback) succeeded. Dropped in
/// any other state — an error returned with `?`, a cancelled future, a panic — it
/// detaches the connection from the pool instead, and the connection closes (the
/// server rolls the transaction back). That costs one new connection on an error
/// path, and never leaks a transaction.
///
/// Deref gives the [`Object`] for queries.
#[derive(Debug)]
pub struct TxGuard {
    conn: Option<Object>,
}

impl TxGuard {
    /// Takes a connection from `pool` and runs `begin` on it (a simple query: it may
    /// hold several statements).
    pub async fn begin(pool: &Pool, begin: &str) -> Result<Self> {
        Self::begin_on(get_conn(pool).await?, begin).await
    }

    /// Runs `begin` on `conn`, which must not be in a transaction.
    pub async fn begin_on(conn: Object, begin: &str) -> Result<Self> {
        // Guard first: a failed `begin` may leave an aborted transaction behind.
        let guard = Self { conn: Some(conn) };
        guard
            .client()
            .batch_execute(begin)
            .await
            .context("beginning a transaction")?;
        Ok(guard)
    }

    fn client(&self) -> &Object {
        match &self.conn {
            Some(c) => c,
            // `conn` is taken only by `finish`, which consumes the guard.
            None => unreachable!("a TxGuard's connection is present until it is consumed"),
        }
    }

    /// Commits, and returns the connection to the pool.
    pub async fn commit(self) -> Result<()> {
        self.finish("COMMIT", "committing").await
    }

    /// Rolls back, and returns the connection to the pool.
    pub async fn rollback(self) -> Result<()> {
        self.finish("ROLLBACK", "rolling back").await
    }

    async fn finish(mut self, sql: &str, what: &'static str) -> Result<()> {
        let result = self.client().batch_execute(sql).await.context(what);
        if result.is_ok() {
            // Back to the pool with no transaction open. On error the guard is
            // dropped with its connection and detaches it.
            drop(self.conn.take());
        }
        result
    }
}

impl Deref for TxGuard {
    type Target = Object;

    fn deref(&self) -> &Object {
        self.client()
    }
}

impl Drop for TxGuard {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            tracing::debug!("closing a pooled connection left inside a transaction");
            // Removed from the pool; dropping the client closes the connection.
            drop(Object::take(conn));
        }
    }
}
