//! A run: record it, plan its tables, store their work units (or check the stored
//! ones of a resumed run against the live catalog), run the units, record the
//! outcome.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use futures_util::StreamExt;
use sanare_core::{CheckId, Control, Error, Result, TableRef, ValidationScope};
use sanare_pg::{PgResultExt, TxGuard, get_conn};
use tracing::Instrument;

use super::Integrity;
use super::snapshot::SnapshotHolder;
use super::store::{RunStats, Sink, StoredRow};
use super::unit::{RunCtx, UnitWork};
use crate::catalog::{self, Relation};
use crate::chunking::plan_chunks;
use crate::plan::TablePlan;
use crate::probe::{begin_fresh, begin_in_snapshot};
use crate::report::{CheckStatus, IntegrityReport};
use crate::units::{Pred, Rows, StoredUnit, check_tiling, refused};

/// The units of one table: id, work, and whether an earlier attempt finished it.
type Units = Vec<(i32, StoredUnit, bool)>;

impl Integrity {
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
    /// uninterrupted run would have produced, under the same id. Violations of the
    /// completed units are kept; those an unfinished unit wrote are deleted before
    /// it runs again, so none is lost or doubled.
    ///
    /// The stored units are data (key ranges, block ranges, keys), checked against
    /// the live catalog before anything runs: a unit whose table, key columns,
    /// key types or values no longer match is refused with a clear error, and so is
    /// a run stored by an earlier version as SQL text.
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
        self.record_start(id, &scope, started_at, resuming).await?;
        let dir = &self.inner.config.report_dir;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| Error::io(format!("creating the report folder {}", dir.display()), e))?;
        let sink = Sink::create(dir.join(format!("{id}.violations.jsonl"))).await?;
        let stats = RunStats::default();
        let outcome = self
            .scan(id, &scope, resuming, control, &sink, &stats)
            .await;
        let flushed = sink.flush().await;
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
            (_, Err(e)) => Err(Error::io(format!("writing {}", sink.path.display()), e)),
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
        let recorded = self.record_outcome(&report).await;
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

    async fn record_start(
        &self,
        id: CheckId,
        scope: &ValidationScope,
        started_at: time::OffsetDateTime,
        resuming: bool,
    ) -> Result<()> {
        let client = get_conn(&self.inner.pool).await?;
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
            let scope_json =
                serde_json::to_value(scope).map_err(|e| Error::other("encoding the scope", e))?;
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
        Ok(())
    }

    /// Records the outcome, even of a failed run (on a fresh connection, in case
    /// the failure was the connection's).
    async fn record_outcome(&self, report: &IntegrityReport) -> Result<()> {
        let report_json =
            serde_json::to_value(report).map_err(|e| Error::other("encoding the report", e))?;
        let sev = serde_json::to_value(&report.violations_by_severity)
            .map_err(|e| Error::other("encoding counts", e))?;
        let client = get_conn(&self.inner.pool).await?;
        client
            .execute(
                &format!(
                    "UPDATE {}.integrity_checks SET finished_at = now(), status = $2, tables_checked = $3,
                            rows_checked = $4, violations_total = $5, violations_by_severity = $6, report = $7, error = $8
                      WHERE id = $1",
                    self.s()
                ),
                &[
                    &report.id.as_uuid(),
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
            .context("recording the outcome of the integrity check")?;
        Ok(())
    }

    /// The relations of `scope`: named tables with every partition below them,
    /// and every table of the named schemas (of every host schema when the scope
    /// names neither tables nor rows).
    async fn relations_of(&self, scope: &ValidationScope) -> Result<Vec<Relation>> {
        let client = get_conn(&self.inner.pool).await?;
        let mut rels: BTreeMap<TableRef, Relation> = BTreeMap::new();
        let named: std::collections::BTreeSet<&TableRef> = scope
            .tables
            .iter()
            .chain(scope.rows.iter().map(|r| &r.table))
            .collect();
        for t in &named {
            for r in catalog::relation_tree(&**client, t).await? {
                rels.insert(r.table.clone(), r);
            }
        }
        if named.is_empty() || !scope.schemas.is_empty() {
            let listed = catalog::relations_of_schemas(
                &**client,
                &scope.schemas,
                self.inner.schema.as_str(),
            )
            .await?;
            for r in listed {
                rels.insert(r.table.clone(), r);
            }
        }
        Ok(rels.into_values().collect())
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
        let families = self.families_of(scope)?;
        let relations = self.relations_of(scope).await?;
        let mut plans: Vec<TablePlan> = Vec::new();
        for p in self.plans(&relations, &families).await? {
            if !p.probes.is_empty() && (scope.rows.is_empty() || !rows_of(scope, &p)?.is_empty()) {
                plans.push(p);
            }
        }
        // A resumed run's stored units are all checked before any of them runs.
        let mut stored = if resuming {
            let stored = self.stored_units(check).await?;
            let by_table = self.check_stored(&plans, stored, scope).await?;
            self.forget_unfinished(check).await?;
            by_table
        } else {
            BTreeMap::new()
        };
        let total: f64 = plans.iter().map(|p| p.reltuples.max(0.0)).sum();
        // A row count, far below u64::MAX.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        control
            .progress()
            .phase("validating integrity", "rows", Some(total as u64));
        let holder =
            SnapshotHolder::new(self.inner.pool.clone(), self.inner.config.snapshot_max_age);
        let ctx = RunCtx {
            check,
            control,
            sink,
            stats,
            holder: &holder,
        };
        let result = async {
            for plan in &plans {
                control.checkpoint()?;
                let units = match stored.remove(&plan.table) {
                    Some(units) => units,
                    None => self.new_units(check, plan, scope, &holder).await?,
                };
                let span = tracing::info_span!("integrity.table", table = %plan.table);
                self.scan_table(plan, units, &ctx).instrument(span).await?;
            }
            Ok(())
        }
        .await;
        holder.close().await;
        result.map(|()| plans.len() as u64)
    }

    /// Checks every stored unit against the live plans (table in the scope, key
    /// columns and types, probe, bounds), and that every stored value parses as its
    /// key column's type; returns them by table.
    async fn check_stored(
        &self,
        plans: &[TablePlan],
        stored: Vec<StoredRow>,
        scope: &ValidationScope,
    ) -> Result<BTreeMap<TableRef, Units>> {
        let mut by_table: BTreeMap<TableRef, Units> = BTreeMap::new();
        for row in stored {
            let Some(plan) = plans.iter().find(|p| p.table == row.table) else {
                return Err(refused(
                    &row.table,
                    row.unit,
                    "it names a table that is not in the run's scope (or has nothing to check)",
                ));
            };
            row.work.check(plan, row.unit)?;
            by_table
                .entry(row.table)
                .or_default()
                .push((row.unit, row.work, row.done));
        }
        let setup = self.setup(self.inner.config.table_timeout);
        for (table, units) in &by_table {
            let Some(plan) = plans.iter().find(|p| p.table == *table) else {
                continue;
            };
            let scoped = if scope.rows.is_empty() {
                None
            } else {
                Some(rows_of(scope, plan)?)
            };
            let ordered: Vec<(i32, &StoredUnit)> = units.iter().map(|u| (u.0, &u.1)).collect();
            check_tiling(plan, &ordered, scoped.as_deref())?;
            let mut values: Vec<Vec<String>> = vec![Vec::new(); plan.key.len()];
            for (_, u, _) in units {
                u.values_by_column(&mut values);
            }
            if values.iter().all(Vec::is_empty) {
                continue;
            }
            let tx = TxGuard::begin(&self.inner.pool, &begin_fresh(&setup)).await?;
            for (k, vals) in plan.key.iter().zip(&values) {
                let sql = format!(
                    "SELECT count(*) FROM unnest($1::text[]) v(x) WHERE x::{} IS NULL",
                    k.type_name
                );
                if let Err(e) = tx.query_one(&sql, &[vals]).await {
                    return Err(refused(
                        table,
                        units.first().map_or(0, |u| u.0),
                        format!(
                            "a stored value of key column `{}` is not a valid {}: {}",
                            k.name,
                            k.type_name,
                            sanare_pg::map_pg_error("checking stored key values", e)
                        ),
                    ));
                }
            }
            tx.commit().await?;
        }
        Ok(by_table)
    }

    /// Plans and stores the units of a table: one per chunk (all chunked probes of
    /// the table in it), then one per whole-table probe.
    async fn new_units(
        &self,
        check: CheckId,
        plan: &TablePlan,
        scope: &ValidationScope,
        holder: &SnapshotHolder,
    ) -> Result<Units> {
        let rows = rows_of(scope, plan)?;
        let scoped = (!scope.rows.is_empty()).then_some(Rows::Keys { keys: rows });
        let chunked = plan.probes.iter().any(|p| p.chunked());
        let chunks: Vec<Rows> = match &scoped {
            _ if !chunked => Vec::new(),
            Some(keys) => vec![keys.clone()],
            None => {
                let setup = self.setup(self.inner.config.table_timeout);
                let pool = &self.inner.pool;
                let tx = holder
                    .with_snapshot(async |snap| {
                        TxGuard::begin(pool, &begin_in_snapshot(snap, &setup)?).await
                    })
                    .await?;
                let chunks = plan_chunks(&tx, plan, self.inner.config.chunk_rows).await?;
                tx.commit().await?;
                chunks
            }
        };
        let whole = scoped.unwrap_or(Rows::All);
        let units: Vec<(i32, StoredUnit)> = chunks
            .into_iter()
            .map(|r| StoredUnit::new(plan, None, r))
            .chain(
                plan.probes
                    .iter()
                    .filter(|p| !p.chunked())
                    .map(|p| StoredUnit::new(plan, Some(p.id()), whole.clone())),
            )
            .enumerate()
            .map(|(i, u)| (i32::try_from(i).unwrap_or(i32::MAX), u))
            .collect();
        self.store_units(check, &plan.table, &units).await?;
        Ok(units.into_iter().map(|(i, u)| (i, u, false)).collect())
    }

    /// Runs the units of a table that are not done, `parallelism` at once.
    async fn scan_table(&self, plan: &TablePlan, units: Units, ctx: &RunCtx<'_>) -> Result<()> {
        let todo: Vec<(i32, StoredUnit)> = units
            .into_iter()
            .filter(|u| !u.2)
            .map(|(unit, work, _)| (unit, work))
            .collect();
        // After the first error (a cancel included) no new unit starts, and the
        // units in flight run to their end.
        let stop = AtomicBool::new(false);
        let work = futures_util::stream::iter(todo)
            .map(|(unit, stored)| self.run_paced(plan, unit, stored, ctx, &stop))
            .buffer_unordered(self.inner.config.parallelism);
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
}

impl Integrity {
    /// Runs one unit unless the run is stopping, then pauses for the duty cycle.
    async fn run_paced(
        &self,
        plan: &TablePlan,
        unit: i32,
        stored: StoredUnit,
        ctx: &RunCtx<'_>,
        stop: &AtomicBool,
    ) -> Result<()> {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        ctx.control.checkpoint()?;
        let cfg = &self.inner.config;
        let (probes, timeout) = match &stored.probe {
            None => (
                plan.probes.iter().filter(|p| p.chunked()).collect(),
                cfg.chunk_timeout,
            ),
            Some(id) => (
                plan.probes
                    .iter()
                    .filter(|p| !p.chunked() && p.id() == *id)
                    .collect(),
                cfg.table_timeout,
            ),
        };
        let w = UnitWork {
            plan,
            probes,
            unit,
            pred: Pred::of_rows(plan, &stored.rows),
            timeout,
        };
        let began = Instant::now();
        self.run_unit(&w, ctx).await?;
        let duty = self.inner.config.duty_cycle;
        if duty < 1.0 {
            let pause = began.elapsed().mul_f64(1.0 / duty - 1.0);
            ctx.holder.release_if_idle().await;
            // Sleeps for the pause, or less when the run is cancelled.
            let _ = tokio::time::timeout(pause, ctx.control.cancel_token().cancelled()).await;
        }
        Ok(())
    }
}

/// The keys of `scope.rows` that fall in `plan`'s table (rows named on a
/// partitioned table are looked for in each of its partitions).
fn rows_of(scope: &ValidationScope, plan: &TablePlan) -> Result<Vec<Vec<String>>> {
    scope
        .rows
        .iter()
        .filter(|r| r.table == plan.table || plan.ancestors.contains(&r.table))
        .map(|r| Integrity::key_of(plan, r))
        .collect()
}
