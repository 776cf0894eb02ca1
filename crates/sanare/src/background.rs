//! The work a running service does on its own: scheduled snapshots, retention,
//! compaction, validation and corruption scans.
//!
//! Every instance runs the [`Scheduler`] and a job worker. Only the leading
//! instance (see [`LeaderLease`](crate::LeaderLease)) runs the scheduled tasks;
//! a scan is not run by the leader alone but split into one job per table in the
//! [`JobQueue`], which every instance's worker claims with `FOR UPDATE SKIP LOCKED`,
//! so a large validation spreads over all instances.
//!
//! Both loops run supervised: a panic is logged, counted and followed by a restart
//! (see [`BackgroundTaskStatus`]); a panic inside one scheduled run or one job is
//! that run's or job's outcome, and the loop goes on.

use std::sync::Arc;
use std::time::Duration;

use sanare_core::{
    Control, Error, IntegrityService, RepairPolicy, RepairService, Result, SnapshotRequest,
    SnapshotService, TableRef, ValidationScope,
};
use sanare_corruption::CorruptionDetector;
use sanare_integrity::Integrity;
use sanare_journal::Journal;
use sanare_pg::{Pool, SchemaName, get_conn};
use sanare_repair::RepairEngine;
use sanare_snapshot::{RetentionPolicy, Snapshots};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::SanareConfig;
use crate::supervise::{self, StatusCell, supervise};
use crate::{BackgroundTaskStatus, Job, JobQueue, JobWorker, Scheduler};

/// Job kind: validate one table.
pub const JOB_VALIDATE_TABLE: &str = "integrity.table";
/// Job kind: scan one table for corruption.
pub const JOB_SCAN_TABLE: &str = "corruption.table";

/// Names of the scheduled tasks, as they appear in `<schema>.scheduled_tasks`.
pub mod task {
    /// Takes a snapshot, then applies retention and collects unreferenced blocks.
    pub const SNAPSHOT: &str = "snapshots.create";
    /// Compacts sealed journal data and purges entries covered by a snapshot and
    /// older than the retention.
    pub const COMPACT: &str = "journal.compact";
    /// Enqueues one validation job per host table.
    pub const VALIDATE: &str = "integrity.validate";
    /// Enqueues one corruption-scan job per host table.
    pub const SCAN: &str = "corruption.scan";
}

/// Everything the background work needs, cheap to clone.
#[derive(Clone)]
pub(crate) struct Components {
    pub(crate) config: Arc<SanareConfig>,
    pub(crate) pool: Pool,
    pub(crate) schema: SchemaName,
    pub(crate) journal: Journal,
    pub(crate) snapshots: Arc<Snapshots>,
    pub(crate) integrity: Arc<Integrity>,
    pub(crate) repair: Arc<RepairEngine>,
    pub(crate) corruption: Arc<CorruptionDetector>,
}

/// How the background work is tuned (tests shorten the poll).
#[derive(Clone, Debug)]
pub(crate) struct Timing {
    /// Scheduler poll and job-queue poll.
    pub(crate) poll: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(5),
        }
    }
}

/// The running background tasks of one instance, each supervised (see
/// [`supervise`](crate::supervise)).
#[derive(Debug)]
pub(crate) struct Background {
    tasks: Vec<JoinHandle<()>>,
    status: Vec<StatusCell>,
}

impl Background {
    /// Starts the scheduler (tasks from the configuration) and the job worker.
    pub(crate) fn start(
        c: Components,
        instance: &str,
        timing: &Timing,
        shutdown: &CancellationToken,
    ) -> Self {
        let tuning = c.config.background.clone();
        let scheduler = scheduler(&c, instance, timing);
        let (scheduler, scheduler_status) =
            supervise("scheduler", shutdown.clone(), tuning.restart_backoff, {
                let shutdown = shutdown.clone();
                move || scheduler.clone().run(shutdown.clone())
            });
        let worker = JobWorker::new(
            JobQueue::new(c.pool.clone(), &c.schema),
            format!("{instance}/worker"),
            &[JOB_VALIDATE_TABLE, JOB_SCAN_TABLE],
        )
        .lease(tuning.lease)
        .heartbeat(tuning.heartbeat)
        .poll_interval(timing.poll);
        let (worker, worker_status) =
            supervise("job-worker", shutdown.clone(), tuning.restart_backoff, {
                let shutdown = shutdown.clone();
                move || {
                    let c = c.clone();
                    worker.clone().run(shutdown.clone(), move |job, control| {
                        let c = c.clone();
                        async move { run_job(&c, &job, &control).await }
                    })
                }
            });
        Self {
            tasks: vec![scheduler, worker],
            status: vec![scheduler_status, worker_status],
        }
    }

    /// The state of each background loop.
    pub(crate) fn status(&self) -> Vec<BackgroundTaskStatus> {
        self.status.iter().map(supervise::read).collect()
    }

    /// Stops the tasks without waiting (the handle was dropped without `shutdown`).
    pub(crate) fn abort(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Waits for the tasks to stop (after the shutdown token was cancelled).
    pub(crate) async fn join(self) {
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "a background task ended abnormally");
            }
        }
    }
}

/// The scheduler with the tasks of the configuration. Snapshots and scans work on
/// the configured host schemas: they hold the work lock on them while they run.
fn scheduler(c: &Components, instance: &str, timing: &Timing) -> Scheduler {
    let mut scheduler = Scheduler::new(c.pool.clone(), c.schema.clone(), instance)
        .poll_interval(timing.poll)
        .lease(c.config.background.lease)
        .heartbeat(c.config.background.heartbeat);
    let data = covered_schemas(&c.config);
    if let Some(every) = c.config.snapshots.interval {
        let c = c.clone();
        scheduler = scheduler.task_on(task::SNAPSHOT, &data, every, move |control| {
            let c = c.clone();
            async move { scheduled_snapshot(&c, &control).await }
        });
    }
    if let Some(every) = c.config.journal.compaction_interval {
        // The journal is this installation's own: no work lock across schemas.
        let c = c.clone();
        scheduler = scheduler.task(task::COMPACT, every, move |control| {
            let c = c.clone();
            async move { scheduled_compaction(&c, &control).await }
        });
    }
    if let Some(every) = c.config.validation.interval {
        let c = c.clone();
        scheduler = scheduler.task_on(task::VALIDATE, &data, every, move |_| {
            let c = c.clone();
            async move { enqueue_tables(&c, JOB_VALIDATE_TABLE).await }
        });
    }
    if c.config.corruption.monitoring
        && let Some(every) = c.config.corruption.scan_interval
    {
        let c = c.clone();
        scheduler = scheduler.task_on(task::SCAN, &data, every, move |_| {
            let c = c.clone();
            async move { enqueue_tables(&c, JOB_SCAN_TABLE).await }
        });
    }
    scheduler
}

/// The host schemas the scheduled work covers, as a work-lock key: sorted, or `*`
/// for every host schema.
fn covered_schemas(config: &SanareConfig) -> String {
    let mut schemas = config.snapshots.schemas.clone();
    if schemas.is_empty() {
        return "schemas=*".to_owned();
    }
    schemas.sort();
    schemas.dedup();
    format!("schemas={}", schemas.join(","))
}

async fn scheduled_snapshot(c: &Components, control: &Control) -> Result<()> {
    let info = c.snapshots.create(SnapshotRequest::new(), control).await?;
    tracing::info!(snapshot = %info.id, bytes = info.stored_bytes, "scheduled snapshot taken");
    let retired = c
        .snapshots
        .apply_retention(&retention_policy(&c.config))
        .await?;
    // A grace period keeps blocks a snapshot being written right now may reuse.
    let gc = c.snapshots.gc(Duration::from_secs(3600), control).await?;
    tracing::info!(retired, ?gc, "snapshot retention applied");
    Ok(())
}

async fn scheduled_compaction(c: &Components, control: &Control) -> Result<()> {
    let report = c.journal.compact(control).await?;
    tracing::info!(?report, "journal compacted");
    // Purge only what the latest good snapshot covers and the retention allows.
    let cutoff = purge_cutoff(&c.config, sanare_core::now());
    if let Some(snapshot) = c.snapshots.latest_good(Some(cutoff)).await?
        && let Some(cut) = snapshot.journal_cut
    {
        let purged = c.journal.purge(cut.position).await?;
        tracing::info!(purged, up_to = %cut.position, "journal entries purged");
    }
    Ok(())
}

/// The host tables a scan covers: the configured schemas, never sanare's own.
async fn host_tables(c: &Components) -> Result<Vec<TableRef>> {
    let client = get_conn(&c.pool).await?;
    sanare_pg::catalog::list_tables(&**client, &c.config.snapshots.schemas, c.schema.as_str()).await
}

async fn enqueue_tables(c: &Components, kind: &str) -> Result<()> {
    let tables = host_tables(c).await?;
    if tables.is_empty() {
        return Ok(());
    }
    let payloads = tables
        .iter()
        .map(|t| serde_json::json!({ "table": t.to_string() }))
        .collect::<Vec<_>>();
    let batch = JobQueue::new(c.pool.clone(), &c.schema)
        .enqueue_batch(kind, &payloads)
        .await?;
    tracing::info!(%batch, kind, jobs = payloads.len(), "scan split into table jobs");
    Ok(())
}

async fn run_job(c: &Components, job: &Job, control: &Control) -> Result<serde_json::Value> {
    let table = job
        .payload
        .get("table")
        .and_then(|t| t.as_str())
        .ok_or_else(|| Error::invalid_input("a table job's payload has no `table`"))?;
    let table = TableRef::parse(table)?;
    match job.kind.as_str() {
        JOB_VALIDATE_TABLE => {
            let report = c
                .integrity
                .run(ValidationScope::all().tables([table.clone()]), control)
                .await?;
            let repaired = if c.config.repair.auto_repair && report.total_violations() > 0 {
                auto_repair(c, report.id, control).await?
            } else {
                0
            };
            Ok(serde_json::json!({
                "table": table.to_string(),
                "check": report.id,
                "rows": report.rows_checked,
                "violations": report.total_violations(),
                "repaired": repaired,
            }))
        }
        JOB_SCAN_TABLE => {
            let report = c.corruption.scan_table(&table, control).await?;
            Ok(serde_json::json!({
                "table": table.to_string(),
                "rows": report.rows_scanned,
                "issues": report.issues.len(),
            }))
        }
        other => Err(Error::invalid_input(format!(
            "this instance does not run `{other}` jobs"
        ))),
    }
}

/// Plans repairs for a check's violations and runs those that need no approval;
/// the rest wait for an operator (`sanare repair approve`).
async fn auto_repair(
    c: &Components,
    check: sanare_core::CheckId,
    control: &Control,
) -> Result<u64> {
    let summary = c
        .repair
        .repair_all(
            c.integrity.violations(check),
            &auto_repair_policy(&c.config),
            control,
        )
        .await?;
    Ok(summary.completed)
}

/// Which snapshots the scheduled retention keeps: `snapshots.keep_last` and
/// `snapshots.keep_days`.
fn retention_policy(config: &SanareConfig) -> RetentionPolicy {
    RetentionPolicy::new(
        usize::try_from(config.snapshots.keep_last).unwrap_or(usize::MAX),
        Duration::from_secs(u64::from(config.snapshots.keep_days) * 86_400),
    )
}

/// The journal's purge reaches only entries a snapshot taken before this covers:
/// `journal.retention_days` before `now`.
fn purge_cutoff(config: &SanareConfig, now: time::OffsetDateTime) -> time::OffsetDateTime {
    now - time::Duration::days(i64::from(config.journal.retention_days))
}

/// How auto-repair runs: approves nothing itself, dry-runs first as
/// `repair.dry_run_first` says.
fn auto_repair_policy(config: &SanareConfig) -> RepairPolicy {
    RepairPolicy::new("sanare auto-repair").dry_run_first(config.repair.dry_run_first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(text: &str) -> SanareConfig {
        SanareConfig::from_toml_str(text, "test").unwrap()
    }

    /// Each key set away from its default changes what the scheduled work does.
    #[test]
    fn retention_keys_reach_the_scheduled_snapshot_and_purge() {
        let c = from("[snapshots]\nkeep_last = 3\nkeep_days = 2\n[journal]\nretention_days = 5");
        let p = retention_policy(&c);
        assert_eq!(p.keep_last, 3);
        assert_eq!(p.keep_within, Duration::from_secs(2 * 86_400));
        let now = time::macros::datetime!(2026-12-07 12:00 UTC);
        assert_eq!(
            purge_cutoff(&c, now),
            time::macros::datetime!(2026-12-02 12:00 UTC)
        );
        let d = retention_policy(&SanareConfig::default());
        assert_eq!((d.keep_last, d.keep_within.as_secs()), (10, 7 * 86_400));
    }

    #[test]
    fn repair_dry_run_first_reaches_auto_repair() {
        assert!(auto_repair_policy(&SanareConfig::default()).dry_run_first);
        let p = auto_repair_policy(&from("[repair]\ndry_run_first = false"));
        assert!(!p.dry_run_first);
        assert!(!p.auto_approve, "auto-repair never approves by itself");
    }
}
