//! Real-time monitoring: re-verify rows soon after they change.
//!
//! The monitor polls. Each poll, per table (per partition of a partitioned table),
//! reads the rows whose `xmin` is at or after the previous read's snapshot horizon
//! (`pg_snapshot_xmin`, compared through `age()`), in one REPEATABLE READ read-only
//! transaction under the canonical session settings, and verifies their checksums;
//! suspects are re-read and classified like a periodic scan's. It takes only the
//! AccessShareLock every `SELECT` takes.
//!
//! What a poll reads: PostgreSQL has no index on `xmin`, and sanare adds none to
//! host tables, so each poll reads every monitored table sequentially and hashes
//! only the rows changed since the previous poll. The cost of monitoring is one
//! sequential read of each monitored table per interval; monitor the tables that
//! matter (`start_monitor(tables)`) and leave the rest to the periodic scan.
//! (Skipping tables whose write counters in `pg_stat_all_tables` did not move was
//! measured and rejected: a backend flushes its counters up to 10 s after a commit,
//! which would stretch the detection latency to that.)
//!
//! A poll whose changed rows of one table mostly fail their checksums (at least 10,
//! or more than the suspect limit) reports one table-wide mismatch, as a scan does:
//! the application writing with another checksum configuration looks like that. A
//! burst of tampering looks the same to a poll; it is still reported (one issue, no
//! automatic repair), and the next periodic scan, which weighs the whole table,
//! names its rows.
//!
//! Why not a trigger with `LISTEN/NOTIFY`: a `NOTIFY` in the host's transaction
//! takes a database-wide lock on the notification queue at commit, serialising the
//! host's commits; a trigger also runs inside every write. Polling adds nothing to
//! the host's commit path, and bounds the detection latency by the interval.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use sanare_core::{Result, TableRef};
use sanare_pg::{PgResultExt, TxGuard, catalog, get_conn};

use crate::confirm;
use crate::detector::CorruptionDetector;
use crate::run::{table_wide, table_wide_issue};
use crate::scan::{self, SuspectBudget, TablePlan};

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

impl Counters {
    fn add(&self, poll: &Poll) {
        self.polls.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(poll.rows, Ordering::Relaxed);
        self.issues.fetch_add(poll.issues, Ordering::Relaxed);
    }
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
        let first = self.poll_once(&tables, &mut state).await?;
        let counters = Arc::new(Counters::default());
        counters.add(&first);
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
                    Ok(poll) => c.add(&poll),
                    Err(e) => {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        c.polls.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "a corruption monitor poll failed; retrying next interval");
                        state.plans = None;
                    }
                }
            }
        });
        Ok(MonitorHandle {
            cancel,
            task: Some(task),
            counters,
        })
    }

    async fn poll_once(&self, tables: &[TableRef], state: &mut MonitorState) -> Result<Poll> {
        state.pending.clear();
        let mut poll = Poll::default();
        let conn = get_conn(&self.inner.pool).await?;
        if state.plans.is_none() || state.polls.is_multiple_of(60) {
            state.plans = Some(self.monitor_plans(&**conn, tables).await?);
        }
        state.polls += 1;
        let plans = state.plans.clone().unwrap_or_default();
        let tx = TxGuard::begin_on(
            conn,
            &format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {}",
                sanare_pg::canonical_settings_local_sql()
            ),
        )
        .await?;
        let horizon: i64 = tx
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                &[],
            )
            .await
            .context("reading the snapshot horizon")?
            .get(0);
        let mut suspects = Vec::new();
        let mut budgets = Vec::new();
        for plan in &plans {
            let budget = SuspectBudget::new(self.inner.config.max_suspects_per_table);
            let mut mine = Vec::new();
            for (relation, oid) in &plan.relations {
                let Some(&prev) = state.horizons.get(oid) else {
                    state.horizons.insert(*oid, horizon);
                    continue;
                };
                // Rows written by transactions at or after the previous horizon.
                // `age()` is the distance from the current transaction id
                // (wraparound-safe, frozen rows are as old as can be) and costs an
                // integer subtraction per row.
                let lo = prev & 0xffff_ffff;
                let predicate = format!("age(xmin) <= age('{lo}'::xid)");
                let (n, s) = scan::verify_where(
                    &tx,
                    plan,
                    relation,
                    &*self.inner.checksum,
                    &budget,
                    &predicate,
                )
                .await?;
                poll.rows += n;
                mine.extend(s);
                state.pending.insert(*oid, horizon);
            }
            suspects.push(mine);
            budgets.push(budget);
        }
        tx.commit().await?;
        let wide = table_wide(&plans, &budgets, self.inner.config.table_wide_fraction);
        let mut found = Vec::new();
        for (plan, s) in plans.iter().zip(suspects) {
            if let Some(w) = wide.iter().find(|w| w.table == plan.table) {
                found.push(table_wide_issue(w));
                continue;
            }
            for batch in s.chunks(crate::detector::RECORD_BATCH) {
                found.extend(
                    confirm::confirm_and_classify(
                        &self.inner.pool,
                        plan,
                        &*self.inner.checksum,
                        self.inner.snapshots.as_ref(),
                        batch,
                    )
                    .await?,
                );
            }
        }
        poll.issues = self.record(&found).await?.len() as u64;
        // Horizons advance only once what was read is recorded: a failed poll is
        // read again from the same horizons.
        state.horizons.extend(state.pending.drain());
        if self.check_checksum_failures().await?.is_some() {
            poll.issues += 1;
        }
        metrics::counter!("sanare_corruption_monitor_rows_total").increment(poll.rows);
        Ok(poll)
    }

    /// The plans of the monitored tables (the configured host schemas when
    /// `tables` is empty).
    async fn monitor_plans(
        &self,
        client: &impl tokio_postgres::GenericClient,
        tables: &[TableRef],
    ) -> Result<Vec<TablePlan>> {
        let list = if tables.is_empty() {
            catalog::list_tables(
                client,
                &self.inner.config.host_schemas,
                self.inner.schema.as_str(),
            )
            .await?
        } else {
            tables.to_vec()
        };
        let mut plans = Vec::new();
        for t in &list {
            let info = catalog::describe(client, t).await?;
            if let Some(p) = TablePlan::new(&info, &self.inner.config.checksum_column) {
                plans.push(p.resolve(client, info.oid).await?);
            }
        }
        Ok(plans)
    }
}

/// What one poll did.
#[derive(Clone, Copy, Debug, Default)]
struct Poll {
    rows: u64,
    issues: u64,
}

#[derive(Default)]
struct MonitorState {
    plans: Option<Vec<TablePlan>>,
    /// The snapshot horizon of each relation's last read (by oid): the next read
    /// starts there.
    horizons: HashMap<u32, i64>,
    /// Horizons of the current poll's reads, applied once its findings are recorded.
    pending: HashMap<u32, i64>,
    polls: u64,
}
