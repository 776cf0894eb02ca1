//! The service: builder, runner, persistence, queries.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use sanare_core::{
    BoxStream, CheckFamily, CheckId, ColumnValue, Control, Error, Event, EventBus,
    IntegrityService, Result, RowRef, Severity, TableRef, ValidationScope, ValidationSummary,
    Violation, ViolationKind,
};
use sanare_pg::{PgResultExt, Pool, SchemaName, get_conn};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, RwLock};
use tracing::Instrument;

use crate::checksum::canonical_settings_sql;
use crate::plan::{Probe, TablePlan, plan_table, wants};
use crate::probe::{Suspect, run_probe};
use crate::report::{CheckStatus, FamilyResult, IntegrityReport};
use crate::rules::Rules;

/// Tuning of a validation run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct IntegrityConfig {
    /// Rows per chunk (default 50,000).
    pub chunk_rows: u64,
    /// Chunks checked at once, each on its own connection (default 2). The pool needs
    /// `parallelism + 1` connections.
    pub parallelism: usize,
    /// `statement_timeout` of each chunk query (default 60 s).
    pub chunk_timeout: Duration,
    /// `statement_timeout` of whole-table queries: unique checks, business-rule
    /// queries (default 10 min).
    pub table_timeout: Duration,
    /// `lock_timeout` of every query (default 5 s): validation never queues behind DDL
    /// for long.
    pub lock_timeout: Duration,
    /// How long one exported snapshot serves before a fresh one is exported
    /// (default 5 min).
    pub snapshot_max_age: Duration,
    /// Where the JSON-lines violation files go (default `$TMPDIR/sanare-integrity`).
    pub report_dir: PathBuf,
    /// Whether each violation is also published as an `Event::ViolationDetected`
    /// (default true).
    pub publish_violations: bool,
    /// The share of wall time each worker may spend running chunks, in `(0, 1]`
    /// (default 1: no pause). Below 1, a worker pauses after each chunk for as long
    /// as keeps it at this share (a chunk of 0.1 s at 0.25 is followed by a 0.3 s
    /// pause), like PostgreSQL's cost-based vacuum delay: the way to keep a
    /// validation from taking CPU that a busy host's writes need. The exported
    /// snapshot is not held through a pause (it would keep the host's dead row
    /// versions from being pruned), so chunks after a pause read a newer one.
    pub duty_cycle: f64,
}

impl IntegrityConfig {
    /// Checks a [`duty_cycle`](Self::duty_cycle) value: it must be in `(0, 1]`.
    ///
    /// # Errors
    /// [`Error::Config`] for key `validation.duty_cycle` otherwise (NaN included).
    pub fn check_duty_cycle(duty_cycle: f64) -> Result<()> {
        if duty_cycle > 0.0 && duty_cycle <= 1.0 {
            Ok(())
        } else {
            Err(Error::config(
                "validation.duty_cycle",
                format!("must be in (0, 1] (the share of time a worker may run), got {duty_cycle}"),
            ))
        }
    }
}

impl Default for IntegrityConfig {
    fn default() -> Self {
        Self {
            chunk_rows: 50_000,
            parallelism: 2,
            chunk_timeout: Duration::from_secs(60),
            table_timeout: Duration::from_secs(600),
            lock_timeout: Duration::from_secs(5),
            snapshot_max_age: Duration::from_secs(300),
            report_dir: std::env::temp_dir().join("sanare-integrity"),
            publish_violations: true,
            duty_cycle: 1.0,
        }
    }
}

/// Integrity validation over one database: build with [`Integrity::builder`].
#[derive(Clone, Debug)]
pub struct Integrity {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: Pool,
    schema: SchemaName,
    rules: Rules,
    events: Option<EventBus>,
    config: IntegrityConfig,
    checksum_key: Option<[u8; 32]>,
}

/// Builds an [`Integrity`].
#[derive(Debug, Default)]
pub struct IntegrityBuilder {
    pool: Option<Pool>,
    schema: Option<SchemaName>,
    rules: Rules,
    events: Option<EventBus>,
    config: IntegrityConfig,
    checksum_key: Option<[u8; 32]>,
}

impl IntegrityBuilder {
    /// The connection pool (required).
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// sanare's schema (default `sanare`).
    pub fn schema(mut self, schema: SchemaName) -> Self {
        self.schema = Some(schema);
        self
    }

    /// Declared rules (added to any given before).
    pub fn rules(mut self, rules: Rules) -> Self {
        self.rules.extend(rules);
        self
    }

    /// The bus violations are published on.
    pub fn events(mut self, events: EventBus) -> Self {
        self.events = Some(events);
        self
    }

    /// Tuning.
    pub fn config(mut self, config: IntegrityConfig) -> Self {
        self.config = config;
        self
    }

    /// The secret key of `blake3_keyed` checksum rules.
    pub fn checksum_key(mut self, key: [u8; 32]) -> Self {
        self.checksum_key = Some(key);
        self
    }

    /// The service.
    pub fn build(self) -> Result<Integrity> {
        let pool = self.pool.ok_or_else(|| {
            Error::config(
                "pool",
                "Integrity::builder() needs a connection pool: call .pool(..)",
            )
        })?;
        self.rules.validate()?;
        IntegrityConfig::check_duty_cycle(self.config.duty_cycle)?;
        if self.config.chunk_rows == 0 || self.config.parallelism == 0 {
            return Err(Error::config(
                "integrity config",
                "chunk_rows and parallelism must be at least 1",
            ));
        }
        Ok(Integrity {
            inner: Arc::new(Inner {
                pool,
                schema: self.schema.unwrap_or_else(SchemaName::default_schema),
                rules: self.rules,
                events: self.events,
                config: self.config,
                checksum_key: self.checksum_key,
            }),
        })
    }
}

/// A query over persisted violations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ViolationQuery {
    /// Of this run only.
    pub check: Option<CheckId>,
    /// Of this table only.
    pub table: Option<TableRef>,
    /// Of this type only ([`ViolationKind::code`], `"referential"`).
    pub violation_type: Option<String>,
    /// At most this many (default 1000).
    pub limit: Option<i64>,
}

impl ViolationQuery {
    /// Every violation (up to the limit).
    pub fn new() -> Self {
        Self::default()
    }
    /// Of this run.
    pub fn check(mut self, check: CheckId) -> Self {
        self.check = Some(check);
        self
    }
    /// Of this table.
    pub fn table(mut self, table: TableRef) -> Self {
        self.table = Some(table);
        self
    }
    /// Of this type.
    pub fn violation_type(mut self, code: &str) -> Self {
        self.violation_type = Some(code.to_owned());
        self
    }
    /// At most `n`.
    pub fn limit(mut self, n: i64) -> Self {
        self.limit = Some(n);
        self
    }
}

/// Sent before every `BEGIN` on a pooled connection: a unit cancelled mid-transaction
/// (its future dropped) returns its connection to the pool still inside the
/// transaction; this ends it (a no-op, with a warning, otherwise).
const RESET_TX: &str = "ROLLBACK;";

fn ms(d: Duration) -> u128 {
    d.as_millis().max(1)
}

/// The coordinator's exported snapshot, rotated when old.
struct SnapshotHolder {
    pool: Pool,
    max_age: Duration,
    state: RwLock<Option<(deadpool_postgres::Object, String, Instant)>>,
}

impl SnapshotHolder {
    async fn open(pool: &Pool) -> Result<(deadpool_postgres::Object, String)> {
        let client = get_conn(pool).await?;
        client
            .batch_execute(&format!(
                "{RESET_TX} BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
            ))
            .await
            .context("opening the coordinator transaction")?;
        let id: String = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .context("exporting the scan snapshot")?
            .get(0);
        Ok((client, id))
    }

    /// Runs `f` with the current snapshot id, guaranteed alive while `f` runs.
    async fn with_snapshot<T>(&self, f: impl AsyncFnOnce(&str) -> Result<T>) -> Result<T> {
        {
            let needs = {
                let g = self.state.read().await;
                g.as_ref()
                    .is_none_or(|(_, _, at)| at.elapsed() > self.max_age)
            };
            if needs {
                let mut g = self.state.write().await;
                if g.as_ref()
                    .is_none_or(|(_, _, at)| at.elapsed() > self.max_age)
                {
                    if let Some((old, _, _)) = g.take() {
                        // Ending a read-only transaction cannot lose anything.
                        let _ = old.batch_execute("COMMIT").await;
                        metrics::counter!("sanare_integrity_snapshot_rotations_total").increment(1);
                    }
                    let (client, id) = Self::open(&self.pool).await?;
                    *g = Some((client, id, Instant::now()));
                }
            }
        }
        let g = self.state.read().await;
        let id = g.as_ref().map(|(_, id, _)| id.clone()).unwrap_or_default();
        f(&id).await
    }

    async fn close(&self) {
        if let Some((c, _, _)) = self.state.write().await.take() {
            let _ = c.batch_execute("COMMIT").await;
        }
    }

    /// Ends the exported snapshot when no chunk is using it (the next chunk exports
    /// a fresh one): a snapshot held through a pause would keep the host's dead row
    /// versions from being pruned, which slows its writes more than the chunks do.
    async fn release_if_idle(&self) {
        let Ok(mut g) = self.state.try_write() else {
            return;
        };
        if let Some((c, _, _)) = g.take() {
            let _ = c.batch_execute("COMMIT").await;
            metrics::counter!("sanare_integrity_snapshot_rotations_total").increment(1);
        }
    }
}

/// Shared counters of a run.
#[derive(Default)]
struct RunStats {
    rows_by_table: Mutex<BTreeMap<TableRef, u64>>,
    families: Mutex<BTreeMap<CheckFamily, FamilyResult>>,
    by_severity: Mutex<BTreeMap<Severity, u64>>,
    written: AtomicU64,
}

/// A finished work unit, as recorded in `integrity_chunks`.
struct UnitDone<'a> {
    table: &'a TableRef,
    unit: i32,
    rows: u64,
    families: &'a BTreeMap<CheckFamily, FamilyResult>,
}

/// Writes violations to the JSON-lines file and the database, and publishes them.
struct Sink {
    file: Mutex<tokio::io::BufWriter<tokio::fs::File>>,
    path: PathBuf,
}

impl Integrity {
    /// A builder.
    pub fn builder() -> IntegrityBuilder {
        IntegrityBuilder::default()
    }

    /// The declared rules.
    pub fn rules(&self) -> &Rules {
        &self.inner.rules
    }

    /// Applies [`crate::MIGRATIONS`] in the configured schema.
    pub async fn migrate(&self) -> Result<sanare_pg::MigrationReport> {
        let mut conn = get_conn(&self.inner.pool).await?;
        let client: &mut tokio_postgres::Client = &mut conn;
        crate::migrate(client, &self.inner.schema).await
    }

    fn s(&self) -> String {
        self.inner.schema.quoted()
    }

    /// Runs a validation and returns the full report.
    pub async fn run(&self, scope: ValidationScope, control: &Control) -> Result<IntegrityReport> {
        let id = CheckId::new();
        let span = tracing::info_span!("integrity.validate", check = %id);
        self.run_inner(id, scope, None, control)
            .instrument(span)
            .await
    }

    /// Resumes a run that was cancelled, failed or interrupted (its process died):
    /// the work units (chunks and whole-table probes) it completed are skipped, the
    /// rest run in a fresh snapshot, and the run ends with the same report an
    /// uninterrupted run would have produced, under the same id. Violations found
    /// before the interruption are kept (each unit's violations and its completion
    /// are recorded in one statement, so none is lost or doubled).
    ///
    /// Errors: `NotFound` for an unknown id, `Conflict` for a run that already
    /// completed. Do not resume a run that is still running in another process.
    pub async fn resume(&self, check: CheckId, control: &Control) -> Result<IntegrityReport> {
        let client = get_conn(&self.inner.pool).await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT status, scope, started_at FROM {}.integrity_checks WHERE id = $1",
                    self.s()
                ),
                &[&check.as_uuid()],
            )
            .await
            .context("reading the integrity check to resume")?
            .ok_or_else(|| Error::not_found(format!("integrity check {check}")))?;
        let status: String = row.get(0);
        if status == CheckStatus::Completed.as_str() {
            return Err(Error::conflict(format!(
                "integrity check {check} already completed: start a new run instead of resuming it"
            )));
        }
        let scope: ValidationScope = serde_json::from_value(row.get(1))
            .map_err(|e| Error::corrupt("stored scope of an integrity check", e.to_string()))?;
        let started_at: time::OffsetDateTime = row.get(2);
        drop(client);
        let span = tracing::info_span!("integrity.resume", check = %check);
        self.run_inner(check, scope, Some(started_at), control)
            .instrument(span)
            .await
    }

    async fn run_inner(
        &self,
        id: CheckId,
        scope: ValidationScope,
        resumed_from: Option<time::OffsetDateTime>,
        control: &Control,
    ) -> Result<IntegrityReport> {
        let started_at = resumed_from.unwrap_or_else(sanare_core::now);
        let resuming = resumed_from.is_some();
        let t0 = Instant::now();
        let client = get_conn(&self.inner.pool).await?;
        let scope_json =
            serde_json::to_value(&scope).map_err(|e| Error::other("encoding the scope", e))?;
        if resuming {
            client
                .execute(
                    &format!(
                        "UPDATE {}.integrity_checks SET status = 'running', finished_at = NULL, error = NULL WHERE id = $1",
                        self.s()
                    ),
                    &[&id.as_uuid()],
                )
                .await
                .context("marking the resumed integrity check as running")?;
        } else {
            client
            .execute(
                &format!(
                    "INSERT INTO {}.integrity_checks (id, started_at, status, scope) VALUES ($1, $2, 'running', $3)",
                    self.s()
                ),
                &[&id.as_uuid(), &started_at, &scope_json],
            )
            .await
            .context("recording the integrity check (has sanare-integrity's migration run?)")?;
        }
        drop(client);
        let dir = &self.inner.config.report_dir;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| Error::io(format!("creating the report folder {}", dir.display()), e))?;
        let path = dir.join(format!("{id}.violations.jsonl"));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let sink = Sink {
            file: Mutex::new(tokio::io::BufWriter::new(file)),
            path: path.clone(),
        };
        let stats = RunStats::default();
        let outcome = self
            .scan(id, &scope, resuming, control, &sink, &stats)
            .await;
        let flushed = sink.file.lock().await.flush().await;
        let outcome = match outcome {
            Ok(tables) if resuming && flushed.is_ok() => self
                .totals_from_db(id, &sink, &stats)
                .await
                .map(|()| tables),
            other => other,
        };
        let mut report = IntegrityReport {
            id,
            started_at,
            duration: t0.elapsed(),
            status: CheckStatus::Completed,
            error: None,
            tables_checked: 0,
            rows_checked: stats.rows_by_table.lock().await.values().sum(),
            families: stats.families.lock().await.clone(),
            violations_by_severity: stats.by_severity.lock().await.clone(),
            recommended_action: String::new(),
            violations_file: Some(sink.path.clone()),
        };
        let result = match (outcome, flushed) {
            (Ok(tables), Ok(())) => {
                report.tables_checked = tables;
                Ok(())
            }
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(Error::io(format!("writing {}", path.display()), e)),
        };
        if let Err(e) = &result {
            report.status = if e.is_cancelled() {
                CheckStatus::Cancelled
            } else {
                CheckStatus::Failed
            };
            report.error = Some(e.to_string());
        }
        report.recommend();
        let report_json =
            serde_json::to_value(&report).map_err(|e| Error::other("encoding the report", e))?;
        let sev = serde_json::to_value(&report.violations_by_severity)
            .map_err(|e| Error::other("encoding counts", e))?;
        // Record the outcome even when the scan failed; use a fresh connection in case
        // the failure was this one's.
        let client = match get_conn(&self.inner.pool).await {
            Ok(c) => c,
            Err(e) => return Err(result.err().unwrap_or(e)),
        };
        let recorded = client
            .execute(
                &format!(
                    "UPDATE {}.integrity_checks SET finished_at = now(), status = $2, tables_checked = $3,
                            rows_checked = $4, violations_total = $5, violations_by_severity = $6, report = $7, error = $8
                      WHERE id = $1",
                    self.s()
                ),
                &[
                    &id.as_uuid(),
                    &report.status.as_str(),
                    &i64::try_from(report.tables_checked).unwrap_or(i64::MAX),
                    &i64::try_from(report.rows_checked).unwrap_or(i64::MAX),
                    &i64::try_from(report.total_violations()).unwrap_or(i64::MAX),
                    &sev,
                    &report_json,
                    &report.error,
                ],
            )
            .await
            .context("recording the outcome of the integrity check");
        control.progress().finish();
        metrics::histogram!("sanare_integrity_run_seconds").record(report.duration.as_secs_f64());
        result?;
        recorded?;
        tracing::info!(
            rows = report.rows_checked,
            violations = report.total_violations(),
            "integrity check done"
        );
        Ok(report)
    }

    /// The totals of a resumed run, read back from what its units recorded (those of
    /// the interrupted attempts and of this one): rows and family counts from
    /// `integrity_chunks`, severities from `integrity_violations`; and its violations
    /// file, rewritten from the stored violations.
    async fn totals_from_db(&self, check: CheckId, sink: &Sink, stats: &RunStats) -> Result<()> {
        let client = get_conn(&self.inner.pool).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT table_schema, table_name, rows_checked, families FROM {}.integrity_chunks
                      WHERE check_id = $1 AND done_at IS NOT NULL",
                    self.s()
                ),
                &[&check.as_uuid()],
            )
            .await
            .context("reading the completed units of the resumed run")?;
        {
            let mut by_table = stats.rows_by_table.lock().await;
            let mut fams = stats.families.lock().await;
            by_table.clear();
            fams.clear();
            for r in rows {
                let table = TableRef::new(r.get::<_, String>(0), r.get::<_, String>(1));
                let n: i64 = r.get(2);
                *by_table.entry(table).or_default() += u64::try_from(n).unwrap_or(0);
                let f: BTreeMap<CheckFamily, FamilyResult> = serde_json::from_value(r.get(3))
                    .map_err(|e| Error::corrupt("stored unit results", e.to_string()))?;
                for (k, v) in f {
                    fams.entry(k).or_default().add(&v);
                }
            }
        }
        let sev = client
            .query(
                &format!(
                    "SELECT severity, count(*) FROM {}.integrity_violations WHERE check_id = $1 GROUP BY severity",
                    self.s()
                ),
                &[&check.as_uuid()],
            )
            .await
            .context("counting the violations of the resumed run")?;
        {
            let mut by_sev = stats.by_severity.lock().await;
            by_sev.clear();
            for r in sev {
                let s: Severity = serde_json::from_value(serde_json::Value::String(r.get(0)))
                    .map_err(|e| Error::corrupt("stored violation severity", e.to_string()))?;
                let n: i64 = r.get(1);
                *by_sev.entry(s).or_default() += u64::try_from(n).unwrap_or(0);
            }
        }
        drop(client);
        let file = tokio::fs::File::create(&sink.path)
            .await
            .map_err(|e| Error::io(format!("rewriting {}", sink.path.display()), e))?;
        let mut file = tokio::io::BufWriter::new(file);
        let mut stream = std::pin::pin!(self.violations(check));
        while let Some(v) = stream.next().await {
            let mut line =
                serde_json::to_vec(&v?).map_err(|e| Error::other("encoding a violation", e))?;
            line.push(b'\n');
            file.write_all(&line)
                .await
                .map_err(|e| Error::io(format!("writing {}", sink.path.display()), e))?;
        }
        file.flush()
            .await
            .map_err(|e| Error::io(format!("writing {}", sink.path.display()), e))?;
        Ok(())
    }

    async fn tables_of(&self, scope: &ValidationScope) -> Result<Vec<TableRef>> {
        let mut tables: BTreeSet<TableRef> = scope.tables.iter().cloned().collect();
        tables.extend(scope.rows.iter().map(|r| r.table.clone()));
        if tables.is_empty() || !scope.schemas.is_empty() {
            let client = get_conn(&self.inner.pool).await?;
            tables.extend(
                sanare_pg::catalog::list_tables(
                    &**client,
                    &scope.schemas,
                    self.inner.schema.as_str(),
                )
                .await?,
            );
        }
        Ok(tables.into_iter().collect())
    }

    async fn scan(
        &self,
        check: CheckId,
        scope: &ValidationScope,
        resuming: bool,
        control: &Control,
        sink: &Sink,
        stats: &RunStats,
    ) -> Result<u64> {
        let tables = self.tables_of(scope).await?;
        let cfg = &self.inner.config;
        let holder = SnapshotHolder {
            pool: self.inner.pool.clone(),
            max_age: cfg.snapshot_max_age,
            state: RwLock::new(None),
        };
        let mut plans = Vec::new();
        {
            let client = get_conn(&self.inner.pool).await?;
            for t in &tables {
                plans.push(
                    plan_table(
                        &**client,
                        t,
                        &self.inner.rules,
                        &scope.families,
                        self.inner.checksum_key,
                        self.inner.config.chunk_rows,
                    )
                    .await?,
                );
            }
        }
        let total: i64 = plans.iter().map(|p| p.estimated_rows.max(0)).sum();
        control.progress().phase(
            "validating integrity",
            "rows",
            Some(u64::try_from(total).unwrap_or(0)),
        );
        let result = async {
            for plan in &plans {
                control.checkpoint()?;
                let span = tracing::info_span!("integrity.table", table = %plan.table);
                self.scan_table(check, plan, scope, resuming, control, sink, stats, &holder)
                    .instrument(span)
                    .await?;
            }
            Ok(())
        }
        .await;
        holder.close().await;
        result.map(|()| plans.len() as u64)
    }

    #[allow(clippy::too_many_arguments)]
    async fn scan_table(
        &self,
        check: CheckId,
        plan: &TablePlan,
        scope: &ValidationScope,
        resuming: bool,
        control: &Control,
        sink: &Sink,
        stats: &RunStats,
        holder: &SnapshotHolder,
    ) -> Result<()> {
        let cfg = &self.inner.config;
        let chunked: Vec<&Probe> = plan.probes.iter().filter(|p| p.chunked()).collect();
        let whole: Vec<&Probe> = plan.probes.iter().filter(|p| !p.chunked()).collect();
        if chunked.is_empty() && whole.is_empty() {
            return Ok(());
        }
        let rows: Vec<Vec<Option<String>>> = scope
            .rows
            .iter()
            .filter(|r| r.table == plan.table)
            .map(|r| key_of(plan, r))
            .collect::<Result<_>>()?;
        if !scope.rows.is_empty() && rows.is_empty() {
            return Ok(());
        }
        // The work units of the table: one per chunk (all chunked probes of the table
        // in it), then one per whole-table probe. A resumed run reuses the stored
        // units (the chunk bounds of the first attempt) and skips the done ones.
        let stored = if resuming {
            self.stored_units(check, &plan.table).await?
        } else {
            Vec::new()
        };
        let units: Vec<(i32, String, bool)> = if stored.is_empty() {
            let preds: Vec<String> = if chunked.is_empty() {
                Vec::new()
            } else if !scope.rows.is_empty() {
                vec![plan.keys_predicate(&rows)]
            } else {
                holder
                    .with_snapshot(async |snap| {
                        let client = get_conn(&self.inner.pool).await?;
                        chunk_predicates(&client, plan, cfg.chunk_rows, snap).await
                    })
                    .await?
            };
            let table_pred = if scope.rows.is_empty() {
                "true".to_owned()
            } else {
                plan.keys_predicate(&rows)
            };
            let units: Vec<(i32, String, bool)> = preds
                .into_iter()
                .chain(whole.iter().map(|_| table_pred.clone()))
                .enumerate()
                .map(|(i, p)| (i32::try_from(i).unwrap_or(i32::MAX), p, false))
                .collect();
            self.store_units(check, &plan.table, &units).await?;
            units
        } else {
            stored
        };
        let nchunks = units.len().saturating_sub(whole.len());
        let chunked = &chunked;
        let whole = &whole;
        let mut todo: Vec<(usize, i32, String)> = Vec::new();
        for (i, (unit, pred, done)) in units.into_iter().enumerate() {
            if !done {
                todo.push((i, unit, pred));
            }
        }
        // After the first error (a cancel included) no new unit starts, but the
        // units in flight run to their end: a unit dropped mid-way would return its
        // connection to the pool inside a transaction.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let stop = &stop;
        let work = futures_util::stream::iter(todo)
            .map(|(i, unit, pred)| async move {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                control.checkpoint()?;
                let (probes, timeout) = if i < nchunks {
                    (chunked.clone(), cfg.chunk_timeout)
                } else {
                    (vec![whole[i - nchunks]], cfg.table_timeout)
                };
                let began = std::time::Instant::now();
                self.run_unit(
                    check, plan, &probes, unit, &pred, timeout, control, sink, stats, holder,
                )
                .await?;
                if cfg.duty_cycle < 1.0 {
                    let pause = began.elapsed().mul_f64(1.0 / cfg.duty_cycle - 1.0);
                    holder.release_if_idle().await;
                    // Sleeps for the pause, or less when the run is cancelled.
                    let _ = tokio::time::timeout(pause, control.cancel_token().cancelled()).await;
                }
                Ok(())
            })
            .buffer_unordered(cfg.parallelism);
        futures_util::pin_mut!(work);
        let mut first_error = None;
        while let Some(r) = work.next().await {
            if let Err(e) = r {
                stop.store(true, Ordering::Relaxed);
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn stored_units(
        &self,
        check: CheckId,
        table: &TableRef,
    ) -> Result<Vec<(i32, String, bool)>> {
        let client = get_conn(&self.inner.pool).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT unit, predicate, done_at IS NOT NULL FROM {}.integrity_chunks
                      WHERE check_id = $1 AND table_schema = $2 AND table_name = $3 ORDER BY unit",
                    self.s()
                ),
                &[&check.as_uuid(), &table.schema, &table.name],
            )
            .await
            .with_context(|| format!("reading the stored work units of {table}"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    async fn store_units(
        &self,
        check: CheckId,
        table: &TableRef,
        units: &[(i32, String, bool)],
    ) -> Result<()> {
        let client = get_conn(&self.inner.pool).await?;
        let ids: Vec<i32> = units.iter().map(|u| u.0).collect();
        let preds: Vec<&str> = units.iter().map(|u| u.1.as_str()).collect();
        client
            .execute(
                &format!(
                    "INSERT INTO {}.integrity_chunks (check_id, table_schema, table_name, unit, predicate)
                     SELECT $1, $2, $3, u, p FROM unnest($4::int[], $5::text[]) x(u, p)",
                    self.s()
                ),
                &[&check.as_uuid(), &table.schema, &table.name, &ids, &preds],
            )
            .await
            .with_context(|| format!("recording the work units of {table}"))?;
        Ok(())
    }

    /// One unit of work: `probes` over `pred` in the shared snapshot, then the
    /// re-read of the suspects in a fresh snapshot, then the report.
    #[allow(clippy::too_many_arguments)]
    async fn run_unit(
        &self,
        check: CheckId,
        plan: &TablePlan,
        probes: &[&Probe],
        unit: i32,
        pred: &str,
        timeout: Duration,
        control: &Control,
        sink: &Sink,
        stats: &RunStats,
        holder: &SnapshotHolder,
    ) -> Result<()> {
        let t0 = Instant::now();
        let client = get_conn(&self.inner.pool).await?;
        let setup = self.tx_setup(timeout);
        let mut rows_seen = 0u64;
        let mut found: Vec<(usize, Vec<Suspect>)> = Vec::new();
        let scan = holder
            .with_snapshot(async |snap| {
                client
                    .batch_execute(&format!(
                        "{RESET_TX} BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snap}'; {setup}"
                    ))
                    .await
                    .context("starting a chunk transaction in the shared snapshot")
            })
            .await;
        let scanned: Result<()> = async {
            scan?;
            for (i, p) in probes.iter().enumerate() {
                let r = run_probe(&client, plan, p, pred).await?;
                if let Some(n) = r.rows {
                    rows_seen = rows_seen.max(n);
                }
                found.push((i, r.suspects));
            }
            client
                .batch_execute("COMMIT")
                .await
                .context("ending a chunk transaction")
        }
        .await;
        if let Err(e) = scanned {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
        // Re-read every suspect in a fresh snapshot.
        let mut confirmed: Vec<Suspect> = Vec::new();
        let mut fam: BTreeMap<CheckFamily, FamilyResult> = BTreeMap::new();
        for (i, suspects) in found {
            let probe = probes[i];
            let f = fam.entry(probe.family()).or_default();
            f.probes_run += 1;
            if suspects.is_empty() {
                continue;
            }
            let keys: Vec<Vec<Option<String>>> = suspects
                .iter()
                .map(|s| s.key.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut again: BTreeSet<(Vec<Option<String>>, String)> = BTreeSet::new();
            for batch in keys.chunks(1000) {
                client
                    .batch_execute(&format!(
                        "{RESET_TX} BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {setup}"
                    ))
                    .await
                    .context("starting the re-check transaction")?;
                let r = run_probe(&client, plan, probe, &plan.keys_predicate(batch)).await;
                let _ = client.batch_execute("COMMIT").await;
                again.extend(r?.suspects.iter().map(Suspect::identity));
            }
            for s in suspects {
                let fam = fam.entry(s.family).or_default();
                fam.suspects += 1;
                if again.contains(&s.identity()) {
                    fam.violations += 1;
                    confirmed.push(s);
                } else {
                    fam.dismissed += 1;
                    metrics::counter!("sanare_integrity_suspects_dismissed_total").increment(1);
                }
            }
        }
        let violations: Vec<Violation> = confirmed
            .into_iter()
            .map(|s| to_violation(plan, s))
            .collect();
        let done = UnitDone {
            table: &plan.table,
            unit,
            rows: rows_seen,
            families: &fam,
        };
        if !self.record(check, &violations, &done, sink, stats).await? {
            return Ok(());
        }
        {
            let mut f = stats.families.lock().await;
            for (k, v) in fam {
                f.entry(k).or_default().add(&v);
            }
        }
        if rows_seen > 0 {
            *stats
                .rows_by_table
                .lock()
                .await
                .entry(plan.table.clone())
                .or_default() += rows_seen;
            control.progress().advance(rows_seen);
            metrics::counter!("sanare_integrity_rows_checked_total").increment(rows_seen);
        }
        metrics::counter!("sanare_integrity_chunks_total").increment(1);
        metrics::histogram!("sanare_integrity_chunk_seconds").record(t0.elapsed().as_secs_f64());
        Ok(())
    }

    fn tx_setup(&self, timeout: Duration) -> String {
        format!(
            "SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}; {}",
            ms(timeout),
            ms(self.inner.config.lock_timeout),
            canonical_settings_sql().replace("SET ", "SET LOCAL ")
        )
    }

    /// Records a finished unit: its violations and its completion in one statement
    /// (so a resumed run neither loses nor repeats them), then the file and events.
    async fn record(
        &self,
        check: CheckId,
        violations: &[Violation],
        done: &UnitDone<'_>,
        sink: &Sink,
        stats: &RunStats,
    ) -> Result<bool> {
        let families = serde_json::to_value(done.families)
            .map_err(|e| Error::other("encoding unit results", e))?;
        let json =
            serde_json::to_value(violations).map_err(|e| Error::other("encoding violations", e))?;
        let client = get_conn(&self.inner.pool).await?;
        let recorded: i64 = client
            .query_one(
                &format!(
                    "WITH u AS (
                       UPDATE {s}.integrity_chunks SET done_at = now(), rows_checked = $6, families = $7
                        WHERE check_id = $1 AND table_schema = $3 AND table_name = $4 AND unit = $5
                          AND done_at IS NULL
                       RETURNING 1),
                     v AS (
                       INSERT INTO {s}.integrity_violations
                         (id, check_id, table_schema, table_name, violation_type, severity, row_key,
                          description, recommended_action, detected_at, violation)
                       SELECT (v->>'id')::uuid, $1, v->'table'->>'schema', v->'table'->>'name', v->'kind'->>'type',
                              v->>'severity', v->'row'->'key', v->>'description', v->>'recommended_action',
                              (v->>'detected_at')::timestamptz, v
                         FROM jsonb_array_elements($2::jsonb) v
                        WHERE EXISTS (SELECT 1 FROM u)
                       RETURNING 1)
                     SELECT (SELECT count(*) FROM u), (SELECT count(*) FROM v)",
                    s = self.s()
                ),
                &[
                    &check.as_uuid(),
                    &json,
                    &done.table.schema,
                    &done.table.name,
                    &done.unit,
                    &i64::try_from(done.rows).unwrap_or(i64::MAX),
                    &families,
                ],
            )
            .await
            .context("persisting violations and the completion of a work unit")?
            .get(0);
        drop(client);
        if recorded == 0 {
            // An earlier attempt of this resumed run recorded the unit already.
            return Ok(false);
        }
        if violations.is_empty() {
            return Ok(true);
        }
        let mut lines = Vec::new();
        for v in violations {
            serde_json::to_writer(&mut lines, v)
                .map_err(|e| Error::other("encoding a violation", e))?;
            lines.push(b'\n');
        }
        sink.file
            .lock()
            .await
            .write_all(&lines)
            .await
            .map_err(|e| Error::io(format!("writing {}", sink.path.display()), e))?;
        let mut sev = stats.by_severity.lock().await;
        for v in violations {
            *sev.entry(v.severity).or_default() += 1;
            metrics::counter!("sanare_integrity_violations_total", "type" => v.kind.code(), "severity" => v.severity.as_str())
                .increment(1);
            if self.inner.config.publish_violations
                && let Some(bus) = &self.inner.events
            {
                bus.publish(Event::ViolationDetected {
                    violation: v.id,
                    check: Some(check),
                    table: v.table.clone(),
                    kind: v.kind.clone(),
                    severity: v.severity,
                });
            }
        }
        stats
            .written
            .fetch_add(violations.len() as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// The persisted report of a run.
    pub async fn report(&self, check: CheckId) -> Result<IntegrityReport> {
        let client = get_conn(&self.inner.pool).await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT report FROM {}.integrity_checks WHERE id = $1",
                    self.s()
                ),
                &[&check.as_uuid()],
            )
            .await
            .context("reading an integrity report")?
            .ok_or_else(|| Error::not_found(format!("integrity check {check}")))?;
        let report: Option<serde_json::Value> = row.get(0);
        let report = report
            .ok_or_else(|| Error::conflict(format!("integrity check {check} has not finished")))?;
        serde_json::from_value(report)
            .map_err(|e| Error::corrupt("stored integrity report", e.to_string()))
    }

    /// Persisted violations matching `query`, oldest first.
    pub async fn query_violations(&self, query: &ViolationQuery) -> Result<Vec<Violation>> {
        let client = get_conn(&self.inner.pool).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT violation FROM {}.integrity_violations
                      WHERE ($1::uuid IS NULL OR check_id = $1)
                        AND ($2::text IS NULL OR (table_schema = $2 AND table_name = $3))
                        AND ($4::text IS NULL OR violation_type = $4)
                      ORDER BY id LIMIT $5",
                    self.s()
                ),
                &[
                    &query.check.map(|c| c.as_uuid()),
                    &query.table.as_ref().map(|t| t.schema.clone()),
                    &query.table.as_ref().map(|t| t.name.clone()),
                    &query.violation_type,
                    &query.limit.unwrap_or(1000),
                ],
            )
            .await
            .context("querying violations")?;
        rows.iter()
            .map(|r| {
                serde_json::from_value(r.get(0))
                    .map_err(|e| Error::corrupt("stored violation", e.to_string()))
            })
            .collect()
    }

    /// Exports a run as one JSON document (see [`crate::report::write_json`]).
    pub async fn export_json(&self, check: CheckId, out: &mut impl std::io::Write) -> Result<()> {
        let report = self.report(check).await?;
        let vs: Vec<Result<Violation>> = self.violations(check).collect().await;
        crate::report::write_json(&report, vs, out)
    }

    /// Exports a run's violations as CSV, one row per affected record.
    pub async fn export_csv(&self, check: CheckId, out: &mut impl std::io::Write) -> Result<()> {
        let mut stream = self.violations(check);
        let mut batch = Vec::new();
        crate::report::write_csv(check, std::iter::empty(), out)?;
        while let Some(v) = stream.next().await {
            batch.push(v);
            if batch.len() >= 1000 {
                write_csv_rows(check, std::mem::take(&mut batch), out)?;
            }
        }
        write_csv_rows(check, batch, out)
    }
}

fn write_csv_rows(
    check: CheckId,
    rows: Vec<Result<Violation>>,
    out: &mut impl std::io::Write,
) -> Result<()> {
    // write_csv emits the header first; drop it for the continuation batches.
    let mut buf = Vec::new();
    crate::report::write_csv(check, rows, &mut buf)?;
    let body = buf
        .iter()
        .position(|b| *b == b'\n')
        .map_or(&buf[..0], |i| &buf[i + 1..]);
    out.write_all(body)
        .map_err(|e| Error::io("writing the CSV report", e))
}

fn key_of(plan: &TablePlan, r: &RowRef) -> Result<Vec<Option<String>>> {
    plan.key
        .iter()
        .map(|k| {
            r.key
                .iter()
                .find(|c| c.column == k.name)
                .map(|c| c.value.clone())
                .ok_or_else(|| {
                    Error::invalid_input(format!(
                        "row {r} lacks key column `{}` of {}",
                        k.name, plan.table
                    ))
                })
        })
        .collect()
}

fn to_violation(plan: &TablePlan, s: Suspect) -> Violation {
    let row = RowRef::new(
        plan.table.clone(),
        plan.key
            .iter()
            .zip(s.key)
            .map(|(k, v)| ColumnValue {
                column: k.name.clone(),
                type_name: k.type_name.clone(),
                value: v,
            })
            .collect(),
    );
    let description = format!("{} at {row}", s.description);
    Violation::new(
        s.kind,
        s.severity,
        plan.table.clone(),
        Some(row),
        description,
    )
    .with_recommended_action(s.action)
    .with_details(s.details)
}

/// Key-range predicates covering every row of the table (with open ends, so rows
/// inserted after planning are covered too).
async fn chunk_predicates(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    chunk_rows: u64,
    snapshot: &str,
) -> Result<Vec<String>> {
    client
        .batch_execute(&format!(
            "{RESET_TX} BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot}'"
        ))
        .await
        .context("starting the chunk planning transaction")?;
    let r = plan_chunks(client, plan, chunk_rows).await;
    let _ = client.batch_execute("COMMIT").await;
    r
}

async fn plan_chunks(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    chunk_rows: u64,
) -> Result<Vec<String>> {
    let t = plan.table.quoted();
    let kt = plan.key_tuple();
    let mut bounds: Vec<String> = Vec::new();
    // For a composite key, each bound's first column: the planner estimates a row
    // comparison `(k1, k2) >= (…)` with a fixed selectivity (a third of the table
    // per side) and would scan the whole table for every chunk; a redundant range
    // on the first column is estimated from its statistics and lets it use the
    // key's index.
    let mut leading: Vec<String> = Vec::new();
    if plan.by_ctid() {
        let row = client
            .query_one(
                &format!("SELECT (pg_relation_size('{}'::regclass) / current_setting('block_size')::int)::bigint", t.replace('\'', "''")),
                &[],
            )
            .await
            .context("measuring a table without primary key")?;
        let blocks: i64 = row.get(0);
        let per_block = if blocks > 0 {
            (plan.estimated_rows.max(1) / blocks).max(1)
        } else {
            1
        };
        let step = (i64::try_from(chunk_rows).unwrap_or(i64::MAX) / per_block).max(1);
        let mut b = step;
        while b < blocks {
            bounds.push(format!("'({b},0)'::tid"));
            b += step;
        }
    } else if plan.key.len() == 1
        && matches!(
            plan.key[0].type_name.as_str(),
            "bigint" | "integer" | "smallint"
        )
    {
        // Plain min/max: answered from the two ends of the key's index (an
        // aggregate beside them would scan the whole table).
        let row = client
            .query_one(
                &format!(
                    "SELECT min({c})::bigint, max({c})::bigint FROM {t} t",
                    c = format_args!("t.{}", sanare_pg::quote_ident(&plan.key[0].name))
                ),
                &[],
            )
            .await
            .context("reading the key range")?;
        let (lo, hi): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
        if let (Some(lo), Some(hi)) = (lo, hi) {
            let est = u64::try_from(plan.estimated_rows.max(1)).unwrap_or(1);
            let span = u64::try_from(hi - lo).unwrap_or(u64::MAX).saturating_add(1);
            let nchunks = est.div_ceil(chunk_rows).max(1);
            let width = i64::try_from(span.div_ceil(nchunks))
                .unwrap_or(i64::MAX)
                .max(1);
            let mut b = lo.saturating_add(width);
            while b <= hi {
                bounds.push(format!("{b}::{}", plan.key[0].type_name));
                b = b.saturating_add(width);
            }
        }
    } else {
        // Keyset walk over the primary-key index.
        let mut last: Option<Vec<Option<String>>> = None;
        loop {
            let from = last
                .as_ref()
                .map(|k| format!("WHERE {kt} >= {}", plan.key_literal(k)))
                .unwrap_or_default();
            let order: Vec<String> = plan
                .key
                .iter()
                .map(|k| format!("t.{}", sanare_pg::quote_ident(&k.name)))
                .collect();
            let sql = format!(
                "SELECT {} FROM {t} t {from} ORDER BY {} OFFSET {chunk_rows} LIMIT 1",
                plan.key_select(),
                order.join(", ")
            );
            let row = client
                .query_opt(&sql, &[])
                .await
                .context("planning key-range chunks")?;
            let Some(row) = row else { break };
            let key: Vec<Option<String>> = (0..plan.key.len()).map(|i| row.get(i)).collect();
            bounds.push(plan.key_literal(&key));
            if plan.key.len() > 1 {
                leading.push(plan.first_key_literal(&key));
            }
            last = Some(key);
        }
    }
    let kt = if plan.by_ctid() {
        "t.ctid".to_owned()
    } else {
        kt
    };
    let k1 = plan
        .key
        .first()
        .map(|k| format!("t.{}", sanare_pg::quote_ident(&k.name)));
    let hint = |i: usize, lower: bool| match (leading.get(i), &k1) {
        (Some(v), Some(k1)) if lower => format!(" AND {k1} >= {v}"),
        (Some(v), Some(k1)) => format!(" AND {k1} <= {v}"),
        _ => String::new(),
    };
    let mut preds = Vec::with_capacity(bounds.len() + 1);
    for (i, b) in bounds.iter().enumerate() {
        preds.push(match i.checked_sub(1).map(|j| (j, &bounds[j])) {
            None => format!("{kt} < {b}{}", hint(i, false)),
            Some((j, p)) => format!(
                "{kt} >= {p} AND {kt} < {b}{}{}",
                hint(j, true),
                hint(i, false)
            ),
        });
    }
    preds.push(match bounds.len().checked_sub(1) {
        None => "true".to_owned(),
        Some(j) => format!("{kt} >= {}{}", bounds[j], hint(j, true)),
    });
    Ok(preds)
}

#[async_trait]
impl IntegrityService for Integrity {
    async fn validate(
        &self,
        scope: ValidationScope,
        control: &Control,
    ) -> Result<ValidationSummary> {
        Ok(self.run(scope, control).await?.summary())
    }

    fn violations(&self, check: CheckId) -> BoxStream<'_, Result<Violation>> {
        let this = self.clone();
        let stream = async_stream(this, check);
        Box::pin(stream)
    }

    async fn recheck(&self, violation: &Violation) -> Result<bool> {
        let Some(row) = &violation.row else {
            return Err(Error::invalid_input(
                "only violations that name a row can be re-checked; re-run validation for the table",
            ));
        };
        let client = get_conn(&self.inner.pool).await?;
        let families: Vec<CheckFamily> = CheckFamily::ALL.to_vec();
        let plan = plan_table(
            &**client,
            &violation.table,
            &self.inner.rules,
            &families,
            self.inner.checksum_key,
            1,
        )
        .await?;
        let key = key_of(&plan, row)?;
        let pred = plan.keys_predicate(std::slice::from_ref(&key));
        let setup = self.tx_setup(self.inner.config.table_timeout);
        for probe in &plan.probes {
            if !probe_can_find(probe, &violation.kind) {
                continue;
            }
            client
                .batch_execute(&format!(
                    "{RESET_TX} BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {setup}"
                ))
                .await
                .context("starting the re-check transaction")?;
            let r = run_probe(&client, &plan, probe, &pred).await;
            let _ = client.batch_execute("COMMIT").await;
            if r?
                .suspects
                .iter()
                .any(|s| s.key == key && s.kind == violation.kind)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn probe_can_find(probe: &Probe, kind: &ViolationKind) -> bool {
    let fam = match kind {
        ViolationKind::Referential { .. } => CheckFamily::Referential,
        ViolationKind::ChecksumMismatch { .. } => CheckFamily::Checksum,
        ViolationKind::Consistency { .. } => CheckFamily::Consistency,
        _ => CheckFamily::Schema,
    };
    match probe {
        Probe::Fused(rules) => rules.iter().any(|r| r.kind == *kind),
        other => wants(&[fam], other.family()),
    }
}

/// Streams a run's violations from `integrity_violations` in pages (keyset on id).
fn async_stream(
    this: Integrity,
    check: CheckId,
) -> impl futures_util::Stream<Item = Result<Violation>> + Send {
    futures_util::stream::try_unfold(
        (this, Some(uuid::Uuid::nil())),
        move |(this, after)| async move {
            let Some(after) = after else { return Ok(None) };
            let client = get_conn(&this.inner.pool).await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT id, violation FROM {}.integrity_violations WHERE check_id = $1 AND id > $2 ORDER BY id LIMIT 1000",
                        this.s()
                    ),
                    &[&check.as_uuid(), &after],
                )
                .await
                .context("streaming violations")?;
            drop(client);
            let next = if rows.len() == 1000 { rows.last().map(|r| r.get::<_, uuid::Uuid>(0)) } else { None };
            let page: Vec<Result<Violation>> = rows
                .iter()
                .map(|r| serde_json::from_value(r.get(1)).map_err(|e| Error::corrupt("stored violation", e.to_string())))
                .collect();
            Ok::<_, Error>(Some((futures_util::stream::iter(page), (this, next))))
        },
    )
    .try_flatten()
}
