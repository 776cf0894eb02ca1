//! The one repair loop: plan → approve (by policy) → dry-run → execute, over a stream
//! of violations read in bounded batches.

use futures_util::StreamExt as _;
use sanare_core::{
    BoxStream, Control, Error, ExecuteOptions, RepairPolicy, RepairRunSummary, RepairService,
    RepairStatus, Result, Violation,
};

/// How many violations are planned together. Bounds the memory of one loop run by
/// this many violations and their plans, whatever the stream's length.
pub const REPAIR_BATCH: usize = 1_000;

/// Runs the repair loop over `violations` with `service`.
///
/// This is the body of [`RepairService::repair_all`] for the engine; it is public so
/// that a host's own [`RepairService`] can reuse it.
pub async fn repair_all<S: RepairService + ?Sized>(
    service: &S,
    mut violations: BoxStream<'_, Result<Violation>>,
    policy: &RepairPolicy,
    control: &Control,
) -> Result<RepairRunSummary> {
    let mut summary = RepairRunSummary::default();
    let mut batch = Vec::with_capacity(REPAIR_BATCH);
    loop {
        batch.clear();
        while batch.len() < REPAIR_BATCH {
            match violations.next().await {
                Some(v) => batch.push(v?),
                None => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        control.checkpoint()?;
        summary.violations_read += batch.len() as u64;
        let plans = service.plan(&batch).await?;
        summary.planned += plans.len() as u64;
        for plan in plans {
            control.checkpoint()?;
            if plan.requires_approval && plan.approved_by.is_none() {
                if !policy.auto_approve {
                    summary.awaiting_approval.push(plan.id);
                    continue;
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
                    Ok(out) if policy.dry_run_only => {
                        summary.rows_changed += out.rows_affected;
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) if e.is_cancelled() => return Err(e),
                    Err(e) => {
                        summary
                            .not_completed
                            .push((plan.id, format!("dry run: {e}")));
                        continue;
                    }
                }
            }
            match service
                .execute(
                    plan.id,
                    ExecuteOptions::new().executed_by(policy.actor.clone()),
                    control,
                )
                .await
            {
                Ok(out) if out.status == RepairStatus::Completed => {
                    summary.completed += 1;
                    summary.violations_fixed += plan.violations.len() as u64;
                    summary.rows_changed += out.rows_affected;
                }
                Ok(out) => summary.not_completed.push((
                    plan.id,
                    out.message
                        .unwrap_or_else(|| format!("ended {:?}", out.status)),
                )),
                Err(e) if e.is_cancelled() => return Err(e),
                Err(Error::ApprovalRequired(why)) => {
                    summary.awaiting_approval.push(plan.id);
                    tracing::info!(repair = %plan.id, %why, "repair waits for an approval");
                }
                Err(e) => summary.not_completed.push((plan.id, e.to_string())),
            }
        }
    }
    Ok(summary)
}
