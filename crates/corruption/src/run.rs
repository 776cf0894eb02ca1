//! A periodic checksum scan: plans, one exported snapshot shared by parallel
//! workers reading ctid-range chunks, bounded suspects, and what is recorded.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tracing::Instrument;

use sanare_core::{Control, CorruptionKind, Error, Result, Severity, TableRef};
use sanare_pg::{PgResultExt, catalog, get_conn};

use crate::detector::{CorruptionDetector, Inner, ScanReport};
use crate::issue::{CorruptionIssue, Layer};
use crate::scan::{self, SuspectBudget, TablePlan};
use crate::{confirm, session};

/// Below this many mismatches a table is never called table-wide by the fraction
/// rule: a few damaged rows of a small table are plausible damage.
const TABLE_WIDE_MIN_MISMATCHES: u64 = 10;

/// A table whose checksum mismatches are too many to be corruption: the checksum
/// configuration (algorithm, key, column list, a trigger not re-installed after a
/// column change) disagrees with what wrote the checksums. Nothing is recorded row
/// by row, so no repair is ever planned from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TableWideMismatch {
    /// The table.
    pub table: TableRef,
    /// Rows verified.
    pub rows_scanned: u64,
    /// Rows whose checksum failed in the scan snapshot.
    pub mismatches: u64,
    /// Why it is called table-wide.
    pub reason: String,
}

/// The rows of one table a scan chunk reads.
#[derive(Clone, Debug)]
struct Job {
    plan: usize,
    relation: usize,
    start: i64,
    end: Option<i64>,
}

impl CorruptionDetector {
    /// Scans `tables`: every row's checksum is verified in one exported snapshot,
    /// ctid-range chunks of every table (of every partition of a partitioned table)
    /// read in parallel, under the canonical session settings.
    ///
    /// Suspects are bounded: past
    /// [`max_suspects_per_table`](crate::DetectorConfig::max_suspects_per_table)
    /// mismatches of one table (or when most of its rows mismatch), the table is a
    /// [`TableWideMismatch`] — "probably configuration, not corruption" — recorded
    /// as one issue without a row, from which no repair is planned. Other suspects
    /// are re-read in a fresh snapshot, classified against the latest good
    /// snapshot, and recorded table by table in bounded batches.
    pub async fn scan_tables(&self, tables: &[TableRef], control: &Control) -> Result<ScanReport> {
        let span = tracing::info_span!("corruption.scan", tables = tables.len());
        async {
            let started = Instant::now();
            let mut report = ScanReport::default();
            let plans = self.plan_tables(tables, &mut report).await?;
            let jobs = self.chunk_jobs(&plans).await?;
            let progress = control.progress();
            progress.phase("corruption scan", "chunks", Some(jobs.len() as u64));
            let budgets: Vec<Arc<SuspectBudget>> = plans
                .iter()
                .map(|_| SuspectBudget::new(self.inner.config.max_suspects_per_table))
                .collect();
            let out = self.run_workers(&plans, &budgets, jobs, control).await?;
            report.rows_scanned = out.rows;
            report.chunks = out.chunks;
            metrics::counter!("sanare_corruption_rows_scanned_total")
                .increment(report.rows_scanned);
            let mut found = out.physical;
            self.record(&found).await?;
            let wide = table_wide(&plans, &budgets, self.inner.config.table_wide_fraction);
            let mut suspects = out.suspects;
            for (i, plan) in plans.iter().enumerate() {
                control.checkpoint()?;
                report.suspects += budgets[i].mismatches();
                report.tables_scanned.push(plan.table.clone());
                let mine = std::mem::take(&mut suspects[i]);
                if let Some(w) = wide.iter().find(|w| w.table == plan.table) {
                    let issue = table_wide_issue(w);
                    self.record(std::slice::from_ref(&issue)).await?;
                    tracing::warn!(table = %w.table, mismatches = w.mismatches, "{}", w.reason);
                    found.push(issue);
                    continue;
                }
                for batch in mine.chunks(crate::detector::RECORD_BATCH) {
                    let issues = confirm::confirm_and_classify(
                        &self.inner.pool,
                        plan,
                        &*self.inner.checksum,
                        self.inner.snapshots.as_ref(),
                        batch,
                    )
                    .await?;
                    self.record(&issues).await?;
                    found.extend(issues);
                }
            }
            report.table_wide = wide;
            report.issues = found;
            report.duration = started.elapsed();
            progress.finish();
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// The plans of `tables` (tables without a checksum column or a key are noted
    /// in the report as skipped).
    async fn plan_tables(
        &self,
        tables: &[TableRef],
        report: &mut ScanReport,
    ) -> Result<Vec<TablePlan>> {
        let conn = get_conn(&self.inner.pool).await?;
        let mut plans = Vec::new();
        for t in tables {
            let info = catalog::describe(&**conn, t).await?;
            match TablePlan::new(&info, &self.inner.config.checksum_column) {
                Some(p) => plans.push(p.resolve(&**conn, info.oid).await?),
                None => report.tables_skipped.push((
                    t.clone(),
                    format!(
                        "no `{}` checksum column or no primary key",
                        self.inner.config.checksum_column
                    ),
                )),
            }
        }
        Ok(plans)
    }

    /// One job per chunk of `chunk_blocks` heap blocks of every relation. Sizes
    /// come from the relations' files, not from the planner's statistics (which a
    /// never-analysed table or a partitioned parent does not have); the last chunk
    /// of a relation is open-ended, so rows added during the scan are not missed.
    async fn chunk_jobs(&self, plans: &[TablePlan]) -> Result<Vec<Job>> {
        let conn = get_conn(&self.inner.pool).await?;
        let chunk = i64::from(self.inner.config.chunk_blocks);
        let mut jobs = Vec::new();
        for (p, plan) in plans.iter().enumerate() {
            for (r, (relation, oid)) in plan.relations.iter().enumerate() {
                let blocks: i64 = conn
                    .query_one(
                        "SELECT pg_relation_size($1::oid) / current_setting('block_size')::bigint",
                        &[oid],
                    )
                    .await
                    .with_context(|| format!("reading the size of {relation}"))?
                    .get(0);
                let mut start = 0;
                loop {
                    let end = start + chunk;
                    if end >= blocks {
                        jobs.push(Job {
                            plan: p,
                            relation: r,
                            start,
                            end: None,
                        });
                        break;
                    }
                    jobs.push(Job {
                        plan: p,
                        relation: r,
                        start,
                        end: Some(end),
                    });
                    start = end;
                }
            }
        }
        Ok(jobs)
    }

    /// Runs the chunk jobs on `parallelism` workers sharing one exported snapshot.
    async fn run_workers(
        &self,
        plans: &[TablePlan],
        budgets: &[Arc<SuspectBudget>],
        jobs: Vec<Job>,
        control: &Control,
    ) -> Result<WorkerOut> {
        // One snapshot for every worker, held open by the coordinator until they
        // have all joined it (and finished).
        let coordinator = session::repeatable_read(&self.inner.pool).await?;
        let snapshot_id: String = coordinator
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .context("exporting the scan snapshot")?
            .get(0);
        let shared = Arc::new(Shared {
            plans: plans.to_vec(),
            budgets: budgets.to_vec(),
            queue: std::sync::Mutex::new(jobs.into_iter()),
        });
        let mut set = JoinSet::new();
        for _ in 0..self.inner.config.parallelism {
            let inner = Arc::clone(&self.inner);
            let shared = Arc::clone(&shared);
            let snapshot_id = snapshot_id.clone();
            let control = control.clone();
            set.spawn(async move { worker(inner, shared, snapshot_id, control).await });
        }
        let mut total = WorkerOut::new(plans.len());
        let mut first_err = None;
        while let Some(res) = set.join_next().await {
            match res {
                Ok(Ok(out)) => total.merge(out),
                Ok(Err(e)) => {
                    control.cancel_token().cancel();
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    control.cancel_token().cancel();
                    first_err.get_or_insert(Error::other("a scan worker panicked", e));
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        coordinator.commit().await?;
        Ok(total)
    }
}

/// What every worker shares.
struct Shared {
    plans: Vec<TablePlan>,
    budgets: Vec<Arc<SuspectBudget>>,
    queue: std::sync::Mutex<std::vec::IntoIter<Job>>,
}

struct WorkerOut {
    rows: u64,
    chunks: u64,
    /// Kept suspects, by plan.
    suspects: Vec<Vec<scan::Suspect>>,
    physical: Vec<CorruptionIssue>,
}

impl WorkerOut {
    fn new(plans: usize) -> Self {
        Self {
            rows: 0,
            chunks: 0,
            suspects: vec![Vec::new(); plans],
            physical: Vec::new(),
        }
    }

    fn merge(&mut self, other: WorkerOut) {
        self.rows += other.rows;
        self.chunks += other.chunks;
        for (mine, theirs) in self.suspects.iter_mut().zip(other.suspects) {
            mine.extend(theirs);
        }
        self.physical.extend(other.physical);
    }
}

async fn worker(
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    snapshot_id: String,
    control: Control,
) -> Result<WorkerOut> {
    let mut out = WorkerOut::new(shared.plans.len());
    let tx = session::join_snapshot(&inner.pool, &snapshot_id, inner.config.chunk_timeout).await?;
    loop {
        control.checkpoint()?;
        let job = match shared.queue.lock() {
            Ok(mut q) => q.next(),
            Err(_) => return Err(Error::conflict("the scan job queue was poisoned")),
        };
        let Some(job) = job else { break };
        let plan = &shared.plans[job.plan];
        let budget = &shared.budgets[job.plan];
        let relation = &plan.relations[job.relation].0;
        let (start, end) = (job.start, job.end);
        let predicate = match end {
            Some(end) => format!("ctid >= '({start},0)'::tid AND ctid < '({end},0)'::tid"),
            None => format!("ctid >= '({start},0)'::tid"),
        };
        tx.batch_execute("SAVEPOINT chunk")
            .await
            .context("starting a scan chunk")?;
        match scan::verify_where(&tx, plan, relation, &*inner.checksum, budget, &predicate).await {
            Ok((rows, suspects)) => {
                tx.batch_execute("RELEASE SAVEPOINT chunk")
                    .await
                    .context("ending a scan chunk")?;
                out.rows += rows;
                out.suspects[job.plan].extend(suspects);
            }
            Err(e) if e.server().is_some_and(|s| s.is_data_corrupted()) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT chunk")
                    .await
                    .context("recovering from a damaged chunk")?;
                out.physical
                    .push(damaged_chunk(plan, relation, start, end, &e));
            }
            Err(e) => return Err(e),
        }
        out.chunks += 1;
        control.progress().advance(1);
    }
    tx.commit().await?;
    Ok(out)
}

/// A chunk the server could not read: its pages are damaged. The physical check
/// ([`CorruptionDetector::check_physical`]) locates the damage to the block.
fn damaged_chunk(
    plan: &TablePlan,
    relation: &TableRef,
    start: i64,
    end: Option<i64>,
    e: &Error,
) -> CorruptionIssue {
    let server = e.server();
    CorruptionIssue::new(
        relation.clone(),
        CorruptionKind::Metadata,
        Layer::Physical,
        format!(
            "reading blocks {start}..{} of {relation} failed: {}",
            end.map_or("end".to_owned(), |e| e.to_string()),
            server.map_or_else(|| e.to_string(), |s| s.message.clone())
        ),
    )
    .with_recommended_action(
        "run the physical check (`sanare scan --physical`) to locate the damaged blocks, \
         then stop writes to the table, check the storage, and restore the table from \
         the latest good snapshot",
    )
    .with_affected(serde_json::json!({
        "table": plan.table.to_string(),
        "start_block": start,
        "end_block": end,
        "server": server,
    }))
}

/// The tables of a scan whose mismatches look like configuration, not corruption:
/// more than the suspect limit, or at least [`TABLE_WIDE_MIN_MISMATCHES`] and at
/// least `fraction` of the rows. When one table is table-wide, a table where every
/// row mismatches is too (a small table under the same wrong configuration).
pub(crate) fn table_wide(
    plans: &[TablePlan],
    budgets: &[Arc<SuspectBudget>],
    fraction: f64,
) -> Vec<TableWideMismatch> {
    let mut wide = Vec::new();
    let mut all_rows = Vec::new();
    for (plan, b) in plans.iter().zip(budgets) {
        let (rows, n) = (b.rows(), b.mismatches());
        let reason = if b.exhausted() {
            Some(format!(
                "table-wide mismatch: probably configuration, not corruption: {n} of {rows} rows \
                 of {} fail their checksum, more than the {} suspects a scan keeps per table",
                plan.table, b.limit
            ))
        } else if n >= TABLE_WIDE_MIN_MISMATCHES && n as f64 >= fraction * rows as f64 {
            Some(format!(
                "table-wide mismatch: probably configuration, not corruption: {n} of {rows} rows \
                 of {} fail their checksum",
                plan.table
            ))
        } else {
            if n >= 2 && n == rows {
                all_rows.push((plan, rows));
            }
            None
        };
        if let Some(reason) = reason {
            wide.push(TableWideMismatch {
                table: plan.table.clone(),
                rows_scanned: rows,
                mismatches: n,
                reason,
            });
        }
    }
    if !wide.is_empty() {
        for (plan, rows) in all_rows {
            wide.push(TableWideMismatch {
                table: plan.table.clone(),
                rows_scanned: rows,
                mismatches: rows,
                reason: format!(
                    "table-wide mismatch: probably configuration, not corruption: every row of \
                     {} fails its checksum, as in {} in the same scan",
                    plan.table, wide[0].table
                ),
            });
        }
    }
    wide
}

/// The one issue a table-wide mismatch is recorded as: no row, kind `Unknown`, so
/// the repair engine plans nothing from it.
pub(crate) fn table_wide_issue(w: &TableWideMismatch) -> CorruptionIssue {
    CorruptionIssue::new(
        w.table.clone(),
        CorruptionKind::Unknown,
        Layer::Checksum,
        w.reason.clone(),
    )
    .with_severity(Severity::High)
    .with_recommended_action(
        "check the checksum configuration before repairing anything: the algorithm and key \
         (`corruption.checksum_algorithm`), the checksum column, and that the checksum \
         trigger was re-installed after the table's columns changed; no row is repaired \
         from this scan",
    )
    .with_affected(serde_json::json!({
        "table_wide_mismatch": true,
        "rows_scanned": w.rows_scanned,
        "mismatches": w.mismatches,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sanare_pg::catalog::{Column, TableInfo};

    fn plan(name: &str) -> TablePlan {
        let col = |n: &str| Column {
            name: n.into(),
            type_name: "text".into(),
            type_oid: 25,
            not_null: false,
            default: None,
            generated: false,
        };
        let info = TableInfo {
            table: TableRef::new("public", name),
            oid: 1,
            columns: vec![col("id"), col("v"), col("row_checksum")],
            primary_key: vec!["id".into()],
            foreign_keys: Vec::new(),
            estimated_rows: -1,
        };
        TablePlan::new(&info, "row_checksum").unwrap()
    }

    fn budget(limit: u64, rows: u64, mismatches: u64) -> Arc<SuspectBudget> {
        let b = SuspectBudget::new(limit);
        b.add_rows(rows);
        for _ in 0..mismatches {
            b.count_mismatch();
        }
        b
    }

    #[test]
    fn past_the_limit_or_most_rows_a_table_is_table_wide() {
        let plans = [plan("big"), plan("half"), plan("few")];
        let wide = table_wide(
            &plans,
            &[
                budget(100, 1_000_000, 101),
                budget(100, 40, 20),
                budget(100, 1_000, 9),
            ],
            0.5,
        );
        let names: Vec<&str> = wide.iter().map(|w| w.table.name.as_str()).collect();
        assert_eq!(names, ["big", "half"]);
        assert!(
            wide[0]
                .reason
                .contains("probably configuration, not corruption")
        );
        assert!(wide[0].reason.contains("101 of 1000000"));
    }

    #[test]
    fn a_few_damaged_rows_are_not_table_wide_unless_another_table_is() {
        let plans = [plan("small"), plan("other")];
        // Every row of a 3-row table: plausible damage on its own.
        assert!(table_wide(&plans[..1], &[budget(100, 3, 3)], 0.5).is_empty());
        // 9 of 10 rows: below the minimum count.
        assert!(table_wide(&plans[..1], &[budget(100, 10, 9)], 0.5).is_empty());
        // With a table-wide table in the same scan, a table failing on every row is
        // the same configuration problem.
        let wide = table_wide(&plans, &[budget(100, 3, 3), budget(5, 100, 100)], 0.5);
        let names: Vec<&str> = wide.iter().map(|w| w.table.name.as_str()).collect();
        assert_eq!(names, ["other", "small"]);
        assert!(wide[1].reason.contains("as in public.other"));
    }
}
