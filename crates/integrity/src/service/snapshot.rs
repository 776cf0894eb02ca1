//! The coordinator's exported snapshot, shared by the units of a run and rotated
//! when old.

use std::time::{Duration, Instant};

use sanare_core::Result;
use sanare_pg::{PgResultExt, Pool, TxGuard};
use tokio::sync::RwLock;

struct Held {
    tx: TxGuard,
    id: String,
    at: Instant,
}

/// A `REPEATABLE READ READ ONLY` transaction that exported its snapshot, so that
/// every unit imports the same one (`SET TRANSACTION SNAPSHOT`).
pub(super) struct SnapshotHolder {
    pool: Pool,
    max_age: Duration,
    state: RwLock<Option<Held>>,
}

impl SnapshotHolder {
    pub(super) fn new(pool: Pool, max_age: Duration) -> Self {
        Self {
            pool,
            max_age,
            state: RwLock::new(None),
        }
    }

    async fn open(pool: &Pool) -> Result<Held> {
        let tx = TxGuard::begin(pool, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
        let id: String = tx
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .context("exporting the scan snapshot")?
            .get(0);
        Ok(Held {
            tx,
            id,
            at: Instant::now(),
        })
    }

    /// Runs `f` with the current snapshot id, guaranteed alive while `f` runs.
    pub(super) async fn with_snapshot<T>(
        &self,
        f: impl AsyncFnOnce(&str) -> Result<T>,
    ) -> Result<T> {
        let stale = |s: &Option<Held>| s.as_ref().is_none_or(|h| h.at.elapsed() > self.max_age);
        if stale(&*self.state.read().await) {
            let mut g = self.state.write().await;
            if stale(&g) {
                if let Some(old) = g.take() {
                    end(old).await;
                    metrics::counter!("sanare_integrity_snapshot_rotations_total").increment(1);
                }
                *g = Some(Self::open(&self.pool).await?);
            }
        }
        let g = self.state.read().await;
        let id = g.as_ref().map(|h| h.id.clone()).unwrap_or_default();
        f(&id).await
    }

    pub(super) async fn close(&self) {
        if let Some(h) = self.state.write().await.take() {
            end(h).await;
        }
    }

    /// Ends the exported snapshot when no unit is using it (the next unit exports a
    /// fresh one): a snapshot held through a pause would keep the host's dead row
    /// versions from being pruned, which slows its writes more than the units do.
    pub(super) async fn release_if_idle(&self) {
        let Ok(mut g) = self.state.try_write() else {
            return;
        };
        if let Some(h) = g.take() {
            end(h).await;
            metrics::counter!("sanare_integrity_snapshot_rotations_total").increment(1);
        }
    }
}

/// Ends a read-only transaction: nothing to lose. On failure the guard drops its
/// connection instead of returning it to the pool.
async fn end(h: Held) {
    if let Err(e) = h.tx.commit().await {
        tracing::debug!(error = %e, "ending the exported snapshot failed; its connection is closed");
    }
}
