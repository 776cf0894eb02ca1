//! The detector: configuration, builder, periodic scans and issue recording.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use sanare_core::{
    Alert, AlertSink, Control, Error, Event, EventBus, IssueId, JournalService, Result,
    RowChecksum, SnapshotService, TableRef,
};
use sanare_pg::{MigrationReport, Pool, SchemaName, catalog, get_conn};

use crate::issue::{self, CorruptionIssue, IssueQuery};
use crate::run::TableWideMismatch;

/// Issues written to the store per statement: a scan records its findings table
/// by table in batches of at most this many, never all at once.
pub(crate) const RECORD_BATCH: usize = 500;

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
    /// Relations (heaps, TOAST tables, indexes) checked at once by physical checks
    /// (connections used).
    pub physical_jobs: usize,
    /// Rows of one table a scan keeps as suspects. Past it the table is reported as
    /// a table-wide mismatch ("probably configuration, not corruption"), its rows
    /// are not recorded one by one, and no repair is planned from the scan.
    pub max_suspects_per_table: u64,
    /// Share of a table's rows (with at least 10 mismatches) whose failing
    /// checksums also make a table-wide mismatch, in `(0, 1]`.
    pub table_wide_fraction: f64,
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
            physical_jobs: 2,
            max_suspects_per_table: 1_000,
            table_wide_fraction: 0.5,
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

impl DetectorConfig {
    /// Checks values that make no sense: zero chunk sizes, workers or suspects, a
    /// fraction outside `(0, 1]`.
    pub fn validate(&self) -> Result<()> {
        let at_least_one = [
            ("corruption.chunk_blocks", u64::from(self.chunk_blocks)),
            ("corruption.parallelism", self.parallelism as u64),
            ("corruption.physical_jobs", self.physical_jobs as u64),
            (
                "corruption.max_suspects_per_table",
                self.max_suspects_per_table,
            ),
        ];
        for (key, v) in at_least_one {
            if v == 0 {
                return Err(Error::config(key, "must be at least 1"));
            }
        }
        if !(self.table_wide_fraction > 0.0 && self.table_wide_fraction <= 1.0) {
            return Err(Error::config(
                "corruption.table_wide_fraction",
                format!("must be in (0, 1], not {}", self.table_wide_fraction),
            ));
        }
        Ok(())
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
    /// Rows whose checksum failed in the scan snapshot (before re-reading), kept
    /// as suspects or not.
    pub suspects: u64,
    /// Tables whose mismatches look like configuration, not corruption: each is
    /// one issue in `issues`, without a row; nothing is planned from it.
    pub table_wide: Vec<TableWideMismatch>,
    /// Confirmed findings (new or already known), recorded as they were confirmed.
    /// Bounded: at most `max_suspects_per_table` row findings per table, plus
    /// damaged chunks and table-wide mismatches.
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
        self.config.validate()?;
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

    /// Records `issues`: stores them (one unresolved issue per fingerprint) in
    /// batches of at most 500 per statement, and for each new one publishes
    /// `CorruptionDetected`, counts it and sends an alert in the background.
    /// Returns the issues that were new.
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
        for batch in issues.chunks(RECORD_BATCH) {
            let batch: Vec<CorruptionIssue> = batch
                .iter()
                .cloned()
                .map(|mut issue| {
                    if let Some(head) = journal_head
                        && let serde_json::Value::Object(map) = &mut issue.affected
                    {
                        map.insert("journal_head".into(), serde_json::json!(head.0));
                    }
                    issue
                })
                .collect();
            let inserted = issue::insert_issues(&**conn, &self.inner.schema, &batch).await?;
            for issue in batch.into_iter().filter(|i| inserted.contains(&i.id)) {
                self.announce(&issue);
                new.push(issue);
            }
        }
        Ok(new)
    }

    /// Counts, logs, publishes and alerts a newly recorded issue.
    fn announce(&self, issue: &CorruptionIssue) {
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
            let alert = alert_for(issue);
            tokio::spawn(async move {
                if let Err(e) = sink.send(&alert).await {
                    tracing::warn!(sink = sink.name(), error = %e, "sending a corruption alert failed");
                }
            });
        }
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
        if done
            && let Some(sink) = &self.inner.alerts
            && let Some(i) = issue::get_issue(&**conn, &self.inner.schema, id).await?
        {
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
