//! The one repair loop: plan → approve (by policy) → dry-run → execute, over a stream
//! of violations read in bounded batches.

use sanare_core::{
    BoxStream, Control, Error, ExecuteOptions, RepairPlan, RepairPolicy, RepairRunSummary,
    RepairService, RepairStatus, Result, Violation,
};

/// How many violations are planned together. The engine's own planning merges the
/// batches' repairs into one plan per table, strategy and operation, so memory is
/// bounded by this many violations plus the plans, whatever the stream's length.
pub const REPAIR_BATCH: usize = sanare_core::PLAN_VIOLATION_SAMPLE;

/// Runs the repair loop over `violations` with `service`: plans every violation
/// through [`RepairService::plan_stream`], then approves what `policy` allows and
/// runs (or dry-runs) each plan in its own transaction.
///
/// This is the body of [`RepairService::repair_all`] for the engine; it is public so
/// that a host's own [`RepairService`] can reuse it. A plan that needs approval the
/// policy cannot give is left waiting and named in the summary; a repair that fails
/// is named with its reason and the loop goes on; cancellation stops between batches
/// and between plans.
pub async fn repair_all<S: RepairService + ?Sized>(
    service: &S,
    violations: BoxStream<'_, Result<Violation>>,
    policy: &RepairPolicy,
    control: &Control,
) -> Result<RepairRunSummary> {
    let mut summary = RepairRunSummary::default();
    let counted = count(violations, &mut summary.violations_read);
    let plans = service.plan_stream(counted, control).await?;
    summary.planned = plans.len() as u64;
    for plan in plans {
        control.checkpoint()?;
        run_one(service, &plan, policy, control, &mut summary).await?;
    }
    Ok(summary)
}

/// A stream that counts what it yields into `n`.
fn count<'a>(
    violations: BoxStream<'a, Result<Violation>>,
    n: &'a mut u64,
) -> BoxStream<'a, Result<Violation>> {
    use futures_util::StreamExt as _;
    Box::pin(violations.inspect(move |v| {
        if v.is_ok() {
            *n += 1;
        }
    }))
}

async fn run_one<S: RepairService + ?Sized>(
    service: &S,
    plan: &RepairPlan,
    policy: &RepairPolicy,
    control: &Control,
    summary: &mut RepairRunSummary,
) -> Result<()> {
    if plan.requires_approval && plan.approved_by.is_none() {
        if !policy.auto_approve {
            summary.awaiting_approval.push(plan.id);
            return Ok(());
        }
        service.approve(plan.id, &policy.actor).await?;
    }
    if policy.dry_run_first || policy.dry_run_only {
        let dry = service
            .execute(
                plan.id,
                ExecuteOptions::dry_run().executed_by(policy.actor.clone()),
                control,
            )
            .await;
        match dry {
            Ok(out) if out.status == RepairStatus::Failed => {
                summary.not_completed.push((
                    plan.id,
                    format!("dry run: {}", out.message.unwrap_or_default()),
                ));
                return Ok(());
            }
            Ok(out) if policy.dry_run_only => {
                summary.rows_changed += out.rows_affected;
                summary.rows_skipped += out.rows_skipped;
                return Ok(());
            }
            Ok(_) => {}
            Err(e) if e.is_cancelled() => return Err(e),
            Err(e) => {
                summary
                    .not_completed
                    .push((plan.id, format!("dry run: {e}")));
                return Ok(());
            }
        }
    }
    let options = ExecuteOptions::new().executed_by(policy.actor.clone());
    match service.execute(plan.id, options, control).await {
        Ok(out) if out.status == RepairStatus::Completed => {
            summary.completed += 1;
            summary.violations_fixed += plan.violation_count;
            summary.rows_changed += out.rows_affected;
            summary.rows_skipped += out.rows_skipped;
        }
        Ok(out) => summary.not_completed.push((
            plan.id,
            out.message
                .unwrap_or_else(|| format!("ended {}", out.status)),
        )),
        Err(e) if e.is_cancelled() => return Err(e),
        Err(Error::ApprovalRequired(why)) => {
            summary.awaiting_approval.push(plan.id);
            tracing::info!(repair = %plan.id, %why, "repair waits for an approval");
        }
        Err(e) => summary.not_completed.push((plan.id, e.to_string())),
    }
    Ok(())
}
