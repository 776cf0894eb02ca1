//! The detector: configuration, builder, periodic scans and issue recording.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tracing::Instrument;

use sanare_core::{
    Alert, AlertSink, Control, CorruptionKind, Error, Event, EventBus, IssueId, JournalService,
    Result, RowChecksum, SnapshotService, TableRef,
};
use sanare_pg::{MigrationReport, PgResultExt, Pool, SchemaName, catalog, get_conn};

use crate::issue::{self, CorruptionIssue, IssueQuery};
use crate::scan::{self, TablePlan};

/// Tunables of the detector. Plain data; `Default` is sensible.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DetectorConfig {
    /// The host schemas scanned by [`CorruptionDetector::scan_all`] and the monitor
    /// (every non-system schema when empty).
    pub host_schemas: Vec<String>,
    /// The `bytea` column holding each row's checksum (the integrity crate's
    /// canonical encoding). Tables without it get no checksum layer.
    pub checksum_column: String,
    /// Heap blocks per scan chunk.
    pub chunk_blocks: u32,
    /// Chunks scanned at once (connections used).
    pub parallelism: usize,
    /// `statement_timeout` of each chunk.
    pub chunk_timeout: Duration,
    /// How often the real-time monitor polls.
    pub monitor_interval: Duration,
    /// Run amcheck's `verify_heapam` and `bt_index_check` in physical checks.
    pub amcheck: bool,
    /// Try `CREATE EXTENSION IF NOT EXISTS amcheck` when it is missing.
    pub create_amcheck: bool,
    /// Statistics drift that raises an issue: absolute change of a column's null
    /// fraction.
    pub max_null_fraction_drift: f64,
    /// Relative change of distinct count or average length that raises an issue.
    pub max_relative_drift: f64,
    /// Relative row-count drop that flags the table as truncated.
    pub max_row_count_drop: f64,
    /// Upper bound of missing keys probed per table by deletion checks.
    pub deletion_probe_limit: i64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            host_schemas: Vec::new(),
            checksum_column: "row_checksum".into(),
            chunk_blocks: 2048,
            parallelism: 2,
            chunk_timeout: Duration::from_secs(300),
            monitor_interval: Duration::from_secs(1),
            amcheck: true,
            create_amcheck: true,
            max_null_fraction_drift: 0.2,
            max_relative_drift: 0.5,
            max_row_count_drop: 0.1,
            deletion_probe_limit: 10_000,
        }
    }
}

/// What a scan did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ScanReport {
    /// Tables whose rows were verified.
    pub tables_scanned: Vec<TableRef>,
    /// Tables skipped (no checksum column or no primary key), with the reason.
    pub tables_skipped: Vec<(TableRef, String)>,
    /// Rows verified.
    pub rows_scanned: u64,
    /// Chunks read.
    pub chunks: u64,
    /// Rows whose checksum failed in the scan snapshot (before re-reading).
    pub suspects: u64,
    /// Confirmed findings (new or already known).
    pub issues: Vec<CorruptionIssue>,
    /// Wall time.
    pub duration: Duration,
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) schema: SchemaName,
    pub(crate) checksum: Arc<dyn RowChecksum>,
    pub(crate) snapshots: Option<Arc<dyn SnapshotService>>,
    pub(crate) journal: Option<Arc<dyn JournalService>>,
    pub(crate) alerts: Option<Arc<dyn AlertSink>>,
    pub(crate) events: EventBus,
    pub(crate) config: DetectorConfig,
    pub(crate) last_checksum_failures: AtomicI64,
}

/// Finds corruption in a PostgreSQL database, records it and tells someone.
///
/// Cheap to clone (an `Arc` inside); every method may be called concurrently.
#[derive(Clone)]
pub struct CorruptionDetector {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for CorruptionDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CorruptionDetector")
            .field("schema", &self.inner.schema)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Builds a [`CorruptionDetector`].
#[derive(Default)]
#[must_use]
pub struct CorruptionDetectorBuilder {
    pool: Option<Pool>,
    schema: Option<SchemaName>,
    checksum: Option<Arc<dyn RowChecksum>>,
    snapshots: Option<Arc<dyn SnapshotService>>,
    journal: Option<Arc<dyn JournalService>>,
    alerts: Option<Arc<dyn AlertSink>>,
    events: Option<EventBus>,
    config: DetectorConfig,
}

impl CorruptionDetectorBuilder {
    /// The host database (required).
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// sanare's schema (default `sanare`).
    pub fn schema(mut self, schema: SchemaName) -> Self {
        self.schema = Some(schema);
        self
    }

    /// The canonical row checksum (required; the integrity crate implements it).
    pub fn checksum(mut self, checksum: Arc<dyn RowChecksum>) -> Self {
        self.checksum = Some(checksum);
        self
    }

    /// Snapshots: last known good row versions for classification.
    pub fn snapshots(mut self, snapshots: Arc<dyn SnapshotService>) -> Self {
        self.snapshots = Some(snapshots);
        self
    }

    /// The journal: its head is recorded with each issue so a repair can replay
    /// from the snapshot up to it.
    pub fn journal(mut self, journal: Arc<dyn JournalService>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Where alerts go; usually an [`AlertDispatcher`](crate::AlertDispatcher).
    /// Sending never blocks detection.
    pub fn alerts(mut self, alerts: Arc<dyn AlertSink>) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// Where `CorruptionDetected` events go (a private bus when unset).
    pub fn events(mut self, events: EventBus) -> Self {
        self.events = Some(events);
        self
    }

    /// Tunables.
    pub fn config(mut self, config: DetectorConfig) -> Self {
        self.config = config;
        self
    }

    /// Builds the detector; fails when the pool or checksum is missing or the
    /// configuration is invalid.
    pub fn build(self) -> Result<CorruptionDetector> {
        let pool = self
            .pool
            .ok_or_else(|| Error::config("corruption.pool", "a connection pool is required"))?;
        let checksum = self.checksum.ok_or_else(|| {
            Error::config(
                "corruption.checksum",
                "a RowChecksum is required (the integrity crate provides it)",
            )
        })?;
        if self.config.chunk_blocks == 0 || self.config.parallelism == 0 {
            return Err(Error::config(
                "corruption.chunk_blocks",
                "chunk_blocks and parallelism must be at least 1",
            ));
        }
        Ok(CorruptionDetector {
            inner: Arc::new(Inner {
                pool,
                schema: self.schema.unwrap_or_default(),
                checksum,
                snapshots: self.snapshots,
                journal: self.journal,
                alerts: self.alerts,
                events: self.events.unwrap_or_default(),
                config: self.config,
                last_checksum_failures: AtomicI64::new(-1),
            }),
        })
    }
}

impl CorruptionDetector {
    /// A builder.
    pub fn builder() -> CorruptionDetectorBuilder {
        CorruptionDetectorBuilder::default()
    }

    /// The configuration.
    pub fn config(&self) -> &DetectorConfig {
        &self.inner.config
    }

    /// The event bus issues are published on.
    pub fn events(&self) -> &EventBus {
        &self.inner.events
    }

    /// Applies this crate's migrations in the configured schema.
    pub async fn migrate(&self) -> Result<MigrationReport> {
        let mut conn = get_conn(&self.inner.pool).await?;
        crate::migrate(&mut conn, &self.inner.schema).await
    }

    /// Records `issues`: stores each (one unresolved issue per fingerprint), and for
    /// each new one publishes `CorruptionDetected`, counts it and sends an alert in
    /// the background. Returns the issues that were new.
    pub async fn record(&self, issues: &[CorruptionIssue]) -> Result<Vec<CorruptionIssue>> {
        if issues.is_empty() {
            return Ok(Vec::new());
        }
        let journal_head = match &self.inner.journal {
            Some(j) => j.head().await.ok(),
            None => None,
        };
        let conn = get_conn(&self.inner.pool).await?;
        let mut new = Vec::new();
        for issue in issues {
            let mut issue = issue.clone();
            if let Some(head) = journal_head
                && let serde_json::Value::Object(map) = &mut issue.affected
            {
                map.insert("journal_head".into(), serde_json::json!(head.0));
            }
            if !issue::insert_issue(&**conn, &self.inner.schema, &issue).await? {
                continue;
            }
            metrics::counter!("sanare_corruption_issues_total",
                "kind" => issue.kind.as_str(), "layer" => issue.layer.as_str())
            .increment(1);
            tracing::warn!(table = %issue.table, kind = issue.kind.as_str(),
                severity = %issue.severity, "{}", issue.description);
            self.inner.events.publish(Event::CorruptionDetected {
                issue: issue.id,
                table: issue.table.clone(),
                kind: issue.kind,
                severity: issue.severity,
            });
            if let Some(sink) = &self.inner.alerts {
                let sink = Arc::clone(sink);
                let alert = alert_for(&issue);
                tokio::spawn(async move {
                    if let Err(e) = sink.send(&alert).await {
                        tracing::warn!(sink = sink.name(), error = %e, "sending a corruption alert failed");
                    }
                });
            }
            new.push(issue);
        }
        Ok(new)
    }

    /// Stored issues matching `query`, newest first.
    pub async fn issues(&self, query: &IssueQuery) -> Result<Vec<CorruptionIssue>> {
        let conn = get_conn(&self.inner.pool).await?;
        issue::query_issues(&**conn, &self.inner.schema, query).await
    }

    /// Marks an issue resolved (and sends a resolving alert, which closes a
    /// PagerDuty incident). Returns whether it was unresolved.
    pub async fn resolve(&self, id: IssueId, resolution: &str) -> Result<bool> {
        let conn = get_conn(&self.inner.pool).await?;
        let done = issue::resolve_issue(&**conn, &self.inner.schema, id, resolution).await?;
        if done && let Some(sink) = &self.inner.alerts {
            let found = issue::query_issues(&**conn, &self.inner.schema, &IssueQuery::new())
                .await?
                .into_iter()
                .find(|i| i.id == id);
            if let Some(i) = found {
                let mut alert = alert_for(&i);
                alert.resolved = true;
                alert.title = format!("resolved: {}", alert.title);
                let sink = Arc::clone(sink);
                tokio::spawn(async move {
                    if let Err(e) = sink.send(&alert).await {
                        tracing::warn!(sink = sink.name(), error = %e, "sending a resolve alert failed");
                    }
                });
            }
        }
        Ok(done)
    }

    /// Scans every table of the configured host schemas.
    pub async fn scan_all(&self, control: &Control) -> Result<ScanReport> {
        let tables = {
            let conn = get_conn(&self.inner.pool).await?;
            catalog::list_tables(
                &**conn,
                &self.inner.config.host_schemas,
                self.inner.schema.as_str(),
            )
            .await?
        };
        self.scan_tables(&tables, control).await
    }

    /// Scans one table.
    pub async fn scan_table(&self, table: &TableRef, control: &Control) -> Result<ScanReport> {
        self.scan_tables(std::slice::from_ref(table), control).await
    }

    /// Scans `tables`: every row's checksum is verified in one exported snapshot,
    /// ctid-range chunks read in parallel; suspects are re-read in a fresh snapshot,
    /// classified against the latest good snapshot, and recorded.
    pub async fn scan_tables(&self, tables: &[TableRef], control: &Control) -> Result<ScanReport> {
        let span = tracing::info_span!("corruption.scan", tables = tables.len());
        async {
            let started = Instant::now();
            let mut report = ScanReport::default();
            let mut plans = Vec::new();
            {
                let conn = get_conn(&self.inner.pool).await?;
                for t in tables {
                    let info = catalog::describe(&**conn, t).await?;
                    match TablePlan::new(&info, &self.inner.config.checksum_column) {
                        Some(p) => {
                            let p = p.with_text_forms(&**conn, info.oid).await?;
                            let blocks: i64 = conn
                                .query_one(
                                    "SELECT (pg_relation_size($1::oid) / current_setting('block_size')::bigint)",
                                    &[&info.oid],
                                )
                                .await
                                .context("reading a table's size")?
                                .get(0);
                            plans.push((p, blocks));
                        }
                        None => report.tables_skipped.push((
                            t.clone(),
                            format!(
                                "no `{}` checksum column or no primary key",
                                self.inner.config.checksum_column
                            ),
                        )),
                    }
                }
            }
            let chunk = i64::from(self.inner.config.chunk_blocks);
            let mut jobs: Vec<(usize, i64, Option<i64>)> = Vec::new();
            for (i, (_, blocks)) in plans.iter().enumerate() {
                let mut start = 0;
                loop {
                    let end = start + chunk;
                    if end >= *blocks {
                        jobs.push((i, start, None));
                        break;
                    }
                    jobs.push((i, start, Some(end)));
                    start = end;
                }
            }
            let progress = control.progress();
            progress.phase("corruption scan", "chunks", Some(jobs.len() as u64));

            // One snapshot for every worker.
            let coordinator = get_conn(&self.inner.pool).await?;
            coordinator
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .context("starting the scan snapshot")?;
            let snapshot_id: String = coordinator
                .query_one("SELECT pg_export_snapshot()", &[])
                .await
                .context("exporting the scan snapshot")?
                .get(0);
            let plans: Arc<Vec<(TablePlan, i64)>> = Arc::new(plans);
            let queue = Arc::new(std::sync::Mutex::new(jobs.into_iter()));
            let mut set = JoinSet::new();
            for _ in 0..self.inner.config.parallelism {
                let inner = Arc::clone(&self.inner);
                let plans = Arc::clone(&plans);
                let queue = Arc::clone(&queue);
                let snapshot_id = snapshot_id.clone();
                let control = control.clone();
                set.spawn(async move { worker(inner, plans, queue, snapshot_id, control).await });
            }
            let mut suspects: Vec<Vec<scan::Suspect>> = vec![Vec::new(); plans.len()];
            let mut physical = Vec::new();
            let mut first_err = None;
            while let Some(res) = set.join_next().await {
                match res {
                    Ok(Ok(out)) => {
                        report.rows_scanned += out.rows;
                        report.chunks += out.chunks;
                        for (i, s) in out.suspects {
                            suspects[i].extend(s);
                        }
                        physical.extend(out.physical);
                    }
                    Ok(Err(e)) => {
                        control.cancel_token().cancel();
                        first_err.get_or_insert(e);
                    }
                    Err(e) => {
                        first_err.get_or_insert(Error::other("a scan worker panicked", e));
                    }
                }
            }
            let _ = coordinator.batch_execute("COMMIT").await;
            if let Some(e) = first_err {
                return Err(e);
            }
            metrics::counter!("sanare_corruption_rows_scanned_total").increment(report.rows_scanned);
            let conn = get_conn(&self.inner.pool).await?;
            let mut found = physical;
            for (i, (plan, _)) in plans.iter().enumerate() {
                report.suspects += suspects[i].len() as u64;
                control.checkpoint()?;
                found.extend(
                    scan::confirm_and_classify(
                        &**conn,
                        plan,
                        &*self.inner.checksum,
                        self.inner.snapshots.as_ref(),
                        &suspects[i],
                    )
                    .await?,
                );
                report.tables_scanned.push(plan.table.clone());
            }
            self.record(&found).await?;
            report.issues = found;
            report.duration = started.elapsed();
            progress.finish();
            Ok(report)
        }
        .instrument(span)
        .await
    }
}

struct WorkerOut {
    rows: u64,
    chunks: u64,
    suspects: Vec<(usize, Vec<scan::Suspect>)>,
    physical: Vec<CorruptionIssue>,
}

type Jobs = Arc<std::sync::Mutex<std::vec::IntoIter<(usize, i64, Option<i64>)>>>;

async fn worker(
    inner: Arc<Inner>,
    plans: Arc<Vec<(TablePlan, i64)>>,
    queue: Jobs,
    snapshot_id: String,
    control: Control,
) -> Result<WorkerOut> {
    let mut out = WorkerOut {
        rows: 0,
        chunks: 0,
        suspects: Vec::new(),
        physical: Vec::new(),
    };
    let conn = get_conn(&inner.pool).await?;
    let sql = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; \
         SET LOCAL statement_timeout = {}",
        sanare_pg::quote_literal(&snapshot_id),
        inner.config.chunk_timeout.as_millis()
    );
    conn.batch_execute(&sql)
        .await
        .context("joining the scan snapshot")?;
    loop {
        control.checkpoint()?;
        let job = match queue.lock() {
            Ok(mut q) => q.next(),
            Err(_) => return Err(Error::conflict("the scan job queue was poisoned")),
        };
        let Some((i, start, end)) = job else { break };
        let plan = &plans[i].0;
        let predicate = match end {
            Some(end) => format!("ctid >= '({start},0)'::tid AND ctid < '({end},0)'::tid"),
            None => format!("ctid >= '({start},0)'::tid"),
        };
        conn.batch_execute("SAVEPOINT chunk")
            .await
            .context("starting a scan chunk")?;
        match scan::verify_where(&conn, plan, &*inner.checksum, &predicate).await {
            Ok((rows, suspects)) => {
                conn.batch_execute("RELEASE SAVEPOINT chunk")
                    .await
                    .context("ending a scan chunk")?;
                out.rows += rows;
                if !suspects.is_empty() {
                    out.suspects.push((i, suspects));
                }
            }
            Err(e) if is_data_corrupted(&e) => {
                conn.batch_execute("ROLLBACK TO SAVEPOINT chunk")
                    .await
                    .context("recovering from a damaged chunk")?;
                out.physical.push(
                    CorruptionIssue::new(
                        plan.table.clone(),
                        CorruptionKind::Metadata,
                        crate::Layer::Physical,
                        format!(
                            "reading blocks {start}..{} of {} failed: {e}",
                            end.map_or("end".to_owned(), |e| e.to_string()),
                            plan.table
                        ),
                    )
                    .with_affected(serde_json::json!({
                        "start_block": start, "end_block": end, "error": e.to_string(),
                    })),
                );
            }
            Err(e) => return Err(e),
        }
        out.chunks += 1;
        control.progress().advance(1);
    }
    let _ = conn.batch_execute("COMMIT").await;
    Ok(out)
}

/// Whether `e` is PostgreSQL's "data corrupted" class (XX001, XX002) or a
/// data-page checksum failure.
pub(crate) fn is_data_corrupted(e: &Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(pg) = s.downcast_ref::<tokio_postgres::Error>()
            && let Some(code) = pg.code()
        {
            let c = code.code();
            return c == "XX001" || c == "XX002";
        }
        src = s.source();
    }
    false
}

/// The alert for an issue.
pub fn alert_for(issue: &CorruptionIssue) -> Alert {
    let mut alert = Alert::new(
        issue.severity,
        "corruption",
        issue.fingerprint(),
        format!("{} corruption in {}", issue.kind.as_str(), issue.table),
        format!(
            "{}\nRecommended action: {}",
            issue.description, issue.recommended_action
        ),
    );
    alert.table = Some(issue.table.clone());
    alert.occurred_at = issue.detected_at;
    alert.details = serde_json::json!({
        "issue": issue.id.to_string(),
        "kind": issue.kind.as_str(),
        "layer": issue.layer.as_str(),
        "row": issue.row.as_ref().map(|r| r.to_string()),
        "column": issue.column,
        "index": issue.index,
        "affected": issue.affected,
        "recommended_action": issue.recommended_action,
    });
    alert
}
