//! Real-time monitoring: re-verify rows soon after they change.
//!
//! The monitor polls. Each poll, per table, reads the rows whose `xmin` is at or
//! after the previous poll's snapshot horizon (`pg_snapshot_xmin`, compared through
//! `age()`), in one
//! REPEATABLE READ read-only transaction, and verifies their checksums; suspects
//! are re-read and classified like a periodic scan's. It takes only the
//! AccessShareLock every `SELECT` takes.
//!
//! Why not a trigger with `LISTEN/NOTIFY`: a `NOTIFY` in the host's transaction
//! takes a database-wide lock on the notification queue at commit, serialising the
//! host's commits; a trigger also runs inside every write. Polling adds nothing to
//! the host's commit path, costs one sequential read of each monitored table per
//! interval (an index on an update timestamp would make it cheaper, but sanare must
//! not add columns or indexes to host tables), and bounds the detection latency by
//! the interval.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use sanare_core::{Result, TableRef};
use sanare_pg::{PgResultExt, catalog, get_conn};

use crate::detector::CorruptionDetector;
use crate::scan::{self, TablePlan};

/// Counters of a running monitor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MonitorStats {
    /// Completed polls.
    pub polls: u64,
    /// Changed rows re-verified.
    pub rows_checked: u64,
    /// New issues recorded.
    pub issues: u64,
    /// Polls that failed (logged; the monitor keeps going).
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    polls: AtomicU64,
    rows: AtomicU64,
    issues: AtomicU64,
    errors: AtomicU64,
}

/// A running monitor; stop it with [`MonitorHandle::stop`] (dropping it stops it too).
#[derive(Debug)]
pub struct MonitorHandle {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counters")
    }
}

impl MonitorHandle {
    /// Its counters so far.
    pub fn stats(&self) -> MonitorStats {
        MonitorStats {
            polls: self.counters.polls.load(Ordering::Relaxed),
            rows_checked: self.counters.rows.load(Ordering::Relaxed),
            issues: self.counters.issues.load(Ordering::Relaxed),
            errors: self.counters.errors.load(Ordering::Relaxed),
        }
    }

    /// Stops the monitor and waits for its current poll to end.
    pub async fn stop(mut self) -> MonitorStats {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.stats()
    }
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl CorruptionDetector {
    /// Starts real-time monitoring of the configured host schemas (or of `tables`
    /// when not empty) on the current tokio runtime; `pg_stat_database.checksum_failures`
    /// is polled too.
    ///
    /// The first poll runs before this returns: it reads the tables' plans and the
    /// snapshot horizon, so every row changed by a transaction that commits after
    /// the call returns is re-verified (rows changed before are the periodic
    /// scan's). Later polls that fail are logged and counted in
    /// [`MonitorStats::errors`], and the monitor keeps going.
    ///
    /// # Errors
    /// When the first poll fails: the database is unreachable, or a monitored table
    /// cannot be described.
    pub async fn start_monitor(&self, tables: Vec<TableRef>) -> Result<MonitorHandle> {
        let mut state = MonitorState::default();
        let (rows, issues) = self.poll_once(&tables, &mut state).await?;
        let counters = Arc::new(Counters::default());
        counters.polls.store(1, Ordering::Relaxed);
        counters.rows.store(rows, Ordering::Relaxed);
        counters.issues.store(issues, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let detector = self.clone();
        let token = cancel.clone();
        let c = Arc::clone(&counters);
        let task = tokio::spawn(async move {
            let period = detector.inner.config.monitor_interval;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                match detector.poll_once(&tables, &mut state).await {
                    Ok((rows, issues)) => {
                        c.rows.fetch_add(rows, Ordering::Relaxed);
                        c.issues.fetch_add(issues, Ordering::Relaxed);
                    }
                    Err(e) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "a corruption monitor poll failed; retrying next interval");
                        state.plans = None;
                    }
                }
                c.polls.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(MonitorHandle {
            cancel,
            task: Some(task),
            counters,
        })
    }

    async fn poll_once(&self, tables: &[TableRef], state: &mut MonitorState) -> Result<(u64, u64)> {
        let conn = get_conn(&self.inner.pool).await?;
        if state.plans.is_none() || state.polls.is_multiple_of(60) {
            let list = if tables.is_empty() {
                catalog::list_tables(
                    &**conn,
                    &self.inner.config.host_schemas,
                    self.inner.schema.as_str(),
                )
                .await?
            } else {
                tables.to_vec()
            };
            let mut plans = Vec::new();
            for t in &list {
                let info = catalog::describe(&**conn, t).await?;
                if let Some(p) = TablePlan::new(&info, &self.inner.config.checksum_column) {
                    plans.push(p.with_text_forms(&**conn, info.oid).await?);
                }
            }
            state.plans = Some(plans);
        }
        state.polls += 1;
        let plans = state.plans.clone().unwrap_or_default();
        conn.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .context("starting a monitor poll")?;
        let horizon: i64 = conn
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                &[],
            )
            .await
            .context("reading the snapshot horizon")?
            .get(0);
        let mut rows = 0;
        let mut suspects = Vec::new();
        for plan in &plans {
            let Some(&prev) = state.horizons.get(&plan.table) else {
                state.horizons.insert(plan.table.clone(), horizon);
                continue;
            };
            // Rows written by transactions at or after the previous horizon. `age()`
            // is the distance from the current transaction id (wraparound-safe, frozen
            // rows are as old as can be) and costs an integer subtraction per row,
            // where comparing `xmin::text::bigint` printed and parsed every xmin.
            let lo = prev & 0xffff_ffff;
            let predicate = format!("age(xmin) <= age('{lo}'::xid)");
            let (n, s) = scan::verify_where(&conn, plan, &*self.inner.checksum, &predicate).await?;
            rows += n;
            if !s.is_empty() {
                suspects.push((plan.clone(), s));
            }
        }
        conn.batch_execute("COMMIT")
            .await
            .context("ending a monitor poll")?;
        for plan in &plans {
            state.horizons.insert(plan.table.clone(), horizon);
        }
        let mut found = Vec::new();
        for (plan, s) in &suspects {
            found.extend(
                scan::confirm_and_classify(
                    &**conn,
                    plan,
                    &*self.inner.checksum,
                    self.inner.snapshots.as_ref(),
                    s,
                )
                .await?,
            );
        }
        drop(conn);
        let mut new = self.record(&found).await?.len() as u64;
        if self.check_checksum_failures().await?.is_some() {
            new += 1;
        }
        metrics::counter!("sanare_corruption_monitor_rows_total").increment(rows);
        Ok((rows, new))
    }
}

#[derive(Default)]
struct MonitorState {
    plans: Option<Vec<TablePlan>>,
    horizons: HashMap<TableRef, i64>,
    polls: u64,
}
