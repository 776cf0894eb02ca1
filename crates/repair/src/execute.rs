//! Running a planned repair: the status and approval gates, the binding of its stored
//! action to the live catalog (refused before anything runs when it does not fit),
//! the pre-repair snapshot, and the audit of the outcome.

use std::time::Instant;

use sanare_core::{
    Control, Error, ExecuteOptions, RepairId, RepairOutcome, RepairStatus, Result, Severity,
    SnapshotRequest,
};
use sanare_pg::{PgResultExt, get_conn};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use crate::action::{BindContext, Bound, Op, Stored, bind};
use crate::apply::{Ran, Tables, run_rows, sample_rows};
use crate::catalog::Meta;
use crate::engine::{RepairEngine, strategy_code};
use crate::record::{Loaded, error_chain, status_code};

/// What [`RepairEngine::validate`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ValidationReport {
    /// The repair.
    pub repair: Option<RepairId>,
    /// Preconditions that do not hold; empty when the repair may run.
    pub problems: Vec<String>,
}

impl ValidationReport {
    /// Whether every precondition holds.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl RepairEngine {
    /// Decodes a repair's stored action and matches it against the live catalog and
    /// this engine's configuration. Fails, running nothing, when it does not fit.
    pub(crate) async fn bind_loaded(&self, loaded: &Loaded) -> Result<Bound> {
        let repair = loaded.record.plan.id;
        let action = match Stored::parse(repair, &loaded.action)? {
            Stored::Current(a) => *a,
            Stored::Legacy => {
                return Err(Error::conflict(format!(
                    "repair {repair} was planned by an older version as SQL text, which is never run: plan it again"
                )));
            }
        };
        let ctx = BindContext {
            repair,
            plan_table: &loaded.table,
            own_schema: self.inner.schema.as_str(),
            rules: &self.inner.rules,
            key: self.inner.action_key.as_ref(),
        };
        let mut conn = get_conn(self.pool()).await?;
        let tx =
            crate::apply::transaction(&mut conn, "starting a check of a stored repair").await?;
        let bound = bind(&tx, action, &ctx).await?;
        if bound.action.op.uses_targets() {
            crate::targets::check_fit(&tx, &self.t("repair_targets"), repair, &bound.meta).await?;
        }
        tx.commit()
            .await
            .context("ending a check of a stored repair")?;
        Ok(bound)
    }

    /// Checks that a planned repair may run now: its stored action fits the live
    /// catalog, its snapshot service or journal is attached, it is approved if it
    /// must be, and it is not rolled back or waiting to be planned again.
    pub async fn validate(&self, repair: RepairId) -> Result<ValidationReport> {
        let loaded = self.load(repair).await?;
        let mut problems = Vec::new();
        let plan = &loaded.record.plan;
        if plan.requires_approval && plan.approved_by.is_none() {
            problems.push("the repair needs an approval and has none".to_owned());
        }
        match plan.status {
            RepairStatus::RolledBack => {
                problems.push("the repair was rolled back; plan it again".to_owned());
            }
            RepairStatus::ReplanNeeded | RepairStatus::Planning => problems.push(format!(
                "the repair is {}; plan it again",
                status_code(plan.status)
            )),
            _ => {}
        }
        match self.bind_loaded(&loaded).await {
            Ok(bound) => match &bound.action.op {
                Op::Restore { .. } | Op::RestoreParent { .. } | Op::Reload { .. }
                    if self.inner.snapshots.is_none() =>
                {
                    problems.push("no snapshot service is attached".into());
                }
                Op::Replay { .. } if self.inner.journal.is_none() => {
                    problems.push("no journal is attached".into());
                }
                _ => {}
            },
            Err(e) => problems.push(e.to_string()),
        }
        Ok(ValidationReport {
            repair: Some(repair),
            problems,
        })
    }
}

/// The outcome recorded for a completed repair, re-run: nothing to do.
async fn recorded(engine: &RepairEngine, loaded: &Loaded) -> Result<RepairOutcome> {
    let record = &loaded.record;
    let mut out = RepairOutcome::new(record.plan.id, RepairStatus::Completed, false);
    out.rows_affected = record.rows_affected.unwrap_or(0);
    out.rows_skipped = record.rows_skipped.unwrap_or(0);
    let conn = get_conn(engine.pool()).await?;
    if let Ok(meta) = Meta::load(&**conn, &loaded.table).await {
        out.rows = sample_rows(&**conn, &Tables::of(engine), record.plan.id, &meta).await?;
    }
    out.message = Some("already completed: nothing to do".into());
    Ok(out)
}

/// [`RepairService::execute`](sanare_core::RepairService::execute) of the engine.
pub(crate) async fn execute(
    engine: &RepairEngine,
    repair: RepairId,
    options: ExecuteOptions,
    control: &Control,
) -> Result<RepairOutcome> {
    let span = tracing::info_span!("repair.execute", %repair, dry_run = options.dry_run);
    async move {
        let started = Instant::now();
        let loaded = engine.load(repair).await?;
        let plan = &loaded.record.plan;
        match plan.status {
            RepairStatus::Completed if !options.dry_run => return recorded(engine, &loaded).await,
            RepairStatus::RolledBack | RepairStatus::ReplanNeeded | RepairStatus::Planning => {
                return Err(Error::conflict(format!(
                    "repair {repair} is {}: plan it again",
                    status_code(plan.status)
                )));
            }
            _ => {}
        }
        if !options.dry_run && plan.requires_approval && plan.approved_by.is_none() {
            metrics::counter!("sanare_repair_refused_total", "reason" => "approval").increment(1);
            return Err(Error::ApprovalRequired(
                format!(
                    "repair {repair} ({}, severity {}, about {} row(s)) waits for approve(repair, approver)",
                    strategy_code(&plan.strategy),
                    plan.severity.as_str(),
                    plan.estimated_rows
                )
                .into(),
            ));
        }
        let bound = match engine.bind_loaded(&loaded).await {
            Ok(b) => b,
            Err(e) => {
                metrics::counter!("sanare_repair_refused_total", "reason" => "stored_action").increment(1);
                tracing::warn!(%repair, error = %e, "repair refused: its stored action does not fit");
                engine.log(repair, false, format!("refused, nothing was run: {e}")).await?;
                return Err(e);
            }
        };
        let services = match &bound.action.op {
            Op::Restore { .. } | Op::RestoreParent { .. } | Op::Reload { .. } => {
                engine.inner.snapshots.is_some()
            }
            Op::Replay { .. } => engine.inner.journal.is_some(),
            _ => true,
        };
        if !services {
            return Err(Error::unavailable(format!(
                "repair {repair} needs a {} service, and none is attached",
                if matches!(bound.action.op, Op::Replay { .. }) { "journal" } else { "snapshot" }
            )));
        }
        if !options.dry_run {
            start(engine, &bound, &options, plan.severity, control).await?;
        }
        let result = dispatch(engine, &bound, options.dry_run, control).await;
        let mut out = RepairOutcome::new(repair, RepairStatus::Completed, options.dry_run);
        out.duration = started.elapsed();
        match result {
            Ok(ran) => {
                out.rows_affected = ran.affected;
                out.rows = ran.rows.clone();
                out.rows_skipped = ran.skipped;
                if options.dry_run {
                    out.status = plan.status;
                    out.message = Some(format!("dry run, rolled back: {}", ran.log.join("; ")));
                } else {
                    if !bound.action.op.undoable() {
                        record_completed(engine, repair, &ran).await?;
                    }
                    out.message = Some(ran.log.join("; "));
                }
                control.progress().finish();
                engine.finish(plan, &out, "execute");
                Ok(out)
            }
            Err(e) => {
                let message = error_chain(&e);
                tracing::warn!(%repair, error = %message, "repair failed; its transaction rolled back");
                if !options.dry_run {
                    engine.set_status(repair, RepairStatus::Failed, Some(&message)).await?;
                    engine.log(repair, false, format!("failed: {message}")).await?;
                }
                out.status = RepairStatus::Failed;
                out.message = Some(message);
                engine.finish(plan, &out, "execute");
                if e.is_cancelled() { Err(e) } else { Ok(out) }
            }
        }
    }
    .instrument(span)
    .await
}

/// Marks a real run started: status, executor, and the pre-repair snapshot of a
/// critical repair.
async fn start(
    engine: &RepairEngine,
    bound: &Bound,
    options: &ExecuteOptions,
    severity: Severity,
    control: &Control,
) -> Result<()> {
    let repair = bound.repair;
    engine
        .set_status(repair, RepairStatus::InProgress, None)
        .await?;
    let conn = get_conn(engine.pool()).await?;
    conn.execute(
        &format!(
            "UPDATE {} SET executed_by = $2 WHERE id = $1",
            engine.t("repair_operations")
        ),
        &[&repair.as_uuid(), &options.executed_by],
    )
    .await
    .context("recording who runs the repair")?;
    if severity == Severity::Critical
        && engine.config().snapshot_before_critical
        && let Some(snapshots) = &engine.inner.snapshots
    {
        let info = snapshots
            .create(
                SnapshotRequest::new()
                    .tables([bound.meta.table.clone()])
                    .label(format!("before repair {repair}")),
                control,
            )
            .await?;
        conn.execute(
            &format!(
                "UPDATE {} SET pre_repair_snapshot = $2 WHERE id = $1",
                engine.t("repair_operations")
            ),
            &[&repair.as_uuid(), &info.id.as_uuid()],
        )
        .await
        .context("recording the pre-repair snapshot")?;
        engine
            .log(
                repair,
                false,
                format!("snapshot {} taken before the repair", info.id),
            )
            .await?;
    }
    Ok(())
}

async fn dispatch(
    engine: &RepairEngine,
    bound: &Bound,
    dry_run: bool,
    control: &Control,
) -> Result<Ran> {
    match &bound.action.op {
        Op::Quarantine { .. }
        | Op::Update { .. }
        | Op::Restore { .. }
        | Op::RestoreParent { .. } => run_rows(engine, bound, dry_run, control).await,
        Op::Reload { snapshot } => {
            crate::whole::reload(engine, bound, *snapshot, dry_run, control).await
        }
        Op::Custom { .. } => crate::whole::custom(engine, bound, dry_run, control).await,
        Op::Reindex { .. } => crate::whole::reindex(engine, bound, dry_run, control).await,
        Op::Replay { .. } => crate::whole::replay(engine, bound, dry_run, control).await,
    }
}

/// Records a completed repair that has no transaction of its own (index rebuild,
/// journal replay).
async fn record_completed(engine: &RepairEngine, repair: RepairId, ran: &Ran) -> Result<()> {
    let conn = get_conn(engine.pool()).await?;
    conn.execute(
        &format!(
            "UPDATE {} SET status = 'completed', completed_at = now(), rows_affected = 0, rows_skipped = $3,
                    error_message = NULL, execution_log = execution_log || $2::jsonb WHERE id = $1",
            engine.t("repair_operations")
        ),
        &[
            &repair.as_uuid(),
            &serde_json::json!(ran.log),
            &i64::try_from(ran.skipped).unwrap_or(i64::MAX),
        ],
    )
    .await
    .context("recording the completed repair")?;
    Ok(())
}
