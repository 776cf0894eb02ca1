//! `repair plan|dry-run|approve|apply|rollback|history`.

use clap::Subcommand;
use sanare::core::{
    CheckId, Error, ExecuteOptions, RepairId, RepairPlan, RepairService, RepairStatus, Violation,
};
use sanare::corruption::IssueQuery;
use sanare::integrity::ViolationQuery;
use sanare_pg::PgResultExt;
use time::OffsetDateTime;

use crate::output::with_progress;
use crate::{Context, EXIT_NEEDS_APPROVAL};

#[derive(Debug, Subcommand)]
pub(crate) enum RepairCommand {
    /// Propose a repair for each violation of an integrity check (the latest
    /// completed one unless `--check`) and each unresolved corruption issue. Plans
    /// are recorded; nothing changes yet. Exits 4 when some need an approval.
    Plan {
        /// The integrity check whose violations to repair.
        #[arg(long)]
        check: Option<CheckId>,
        /// Leave out unresolved corruption issues.
        #[arg(long)]
        no_corruption: bool,
    },
    /// Run a planned repair in a transaction that is rolled back, reporting the
    /// rows it would change.
    DryRun {
        /// The repair.
        id: RepairId,
    },
    /// Approve a repair that needs it.
    Approve {
        /// The repair.
        id: RepairId,
        /// Who approves (recorded in the audit trail).
        #[arg(long)]
        by: String,
    },
    /// Run a planned (and, when needed, approved) repair: one transaction, undo log
    /// kept. Exits 4 when it still needs an approval.
    Apply {
        /// The repair.
        id: RepairId,
        /// Who runs it (recorded in the audit trail).
        #[arg(long, default_value = "sanare-cli")]
        by: String,
    },
    /// Undo a completed repair from its undo log.
    Rollback {
        /// The repair.
        id: RepairId,
    },
    /// Repairs planned in a time window, oldest first.
    History {
        /// From (RFC 3339, or a duration ago); default 30 days ago.
        #[arg(long, value_parser = crate::parse_time)]
        since: Option<OffsetDateTime>,
        /// Show one repair in full (its audit trail and undo status).
        #[arg(long)]
        id: Option<RepairId>,
    },
}

pub(crate) async fn run(ctx: &Context, command: RepairCommand) -> anyhow::Result<u8> {
    let sanare = ctx.sanare().await?;
    let repair = sanare.repair();
    match command {
        RepairCommand::Plan {
            check,
            no_corruption,
        } => {
            let check = match check {
                Some(c) => Some(c),
                None => latest_check(ctx).await?,
            };
            let mut violations: Vec<Violation> = Vec::new();
            if let Some(check) = check {
                let mut q = ViolationQuery::new().check(check);
                q.limit = Some(100_000);
                violations.extend(sanare.integrity().query_violations(&q).await?);
            }
            if !no_corruption {
                let issues = sanare
                    .corruption()
                    .issues(&IssueQuery::new().unresolved())
                    .await?;
                violations.extend(issues.iter().map(|i| i.to_violation()));
            }
            if violations.is_empty() {
                ctx.out.show(&Vec::<RepairPlan>::new(), |out| {
                    out.line(match check {
                        Some(c) => format!("nothing to repair: check {c} found no violations and no corruption issue is open"),
                        None => "nothing to repair: no integrity check has completed yet (run `sanare validate`) and no corruption issue is open".into(),
                    });
                })?;
                return Ok(0);
            }
            let plans = repair.plan(&violations).await?;
            let waiting = plans.iter().filter(|p| p.requires_approval).count();
            ctx.out.show(&plans, |out| {
                out.line(format!(
                    "{} violations → {} repairs planned ({} need an approval)",
                    violations.len(),
                    plans.len(),
                    waiting
                ));
                print_plans(out, &plans);
                out.line("next: `sanare repair dry-run <id>`, `sanare repair approve <id> --by <you>`, `sanare repair apply <id>`");
            })?;
            Ok(if waiting > 0 { EXIT_NEEDS_APPROVAL } else { 0 })
        }
        RepairCommand::DryRun { id } => {
            let outcome = with_progress(&ctx.out, "dry run", |control| async move {
                repair
                    .execute(id, ExecuteOptions::dry_run(), &control)
                    .await
            })
            .await;
            outcome_or_approval(ctx, outcome)
        }
        RepairCommand::Approve { id, by } => {
            let plan = repair.approve(id, &by).await?;
            ctx.out.show(&plan, |out| {
                out.line(format!("repair {} approved by {by}", plan.id));
            })?;
            Ok(0)
        }
        RepairCommand::Apply { id, by } => {
            let mut options = ExecuteOptions::new();
            options.executed_by = Some(by);
            let outcome = with_progress(&ctx.out, "repair", |control| async move {
                repair.execute(id, options, &control).await
            })
            .await;
            outcome_or_approval(ctx, outcome)
        }
        RepairCommand::Rollback { id } => {
            let outcome = with_progress(&ctx.out, "rollback", |control| async move {
                repair.rollback(id, &control).await
            })
            .await?;
            print_outcome(ctx, &outcome)?;
            Ok(0)
        }
        RepairCommand::History { since, id } => {
            if let Some(id) = id {
                let record = repair.get(id).await?;
                ctx.out.show(&record, |out| {
                    print_plans(out, std::slice::from_ref(&record.plan));
                    out.table(
                        &["event", "at"],
                        [
                            ("planned", Some(record.created_at)),
                            ("approved", record.approved_at),
                            ("started", record.started_at),
                            ("completed", record.completed_at),
                            ("rolled back", record.rolled_back_at),
                        ]
                        .into_iter()
                        .filter_map(|(k, v)| v.map(|v| vec![k.to_owned(), v.to_string()])),
                    );
                    for line in record.execution_log.iter().chain(&record.rollback_log) {
                        out.line(format!("  {line}"));
                    }
                    if let Some(e) = &record.error_message {
                        out.line(format!("error: {e}"));
                    }
                })?;
                return Ok(0);
            }
            let from =
                since.unwrap_or_else(|| OffsetDateTime::now_utc() - time::Duration::days(30));
            let records = repair
                .history(from, OffsetDateTime::now_utc() + time::Duration::minutes(1))
                .await?;
            ctx.out.show(&records, |out| {
                if records.is_empty() {
                    out.line("no repairs in this window");
                    return;
                }
                out.table(
                    &["id", "planned", "table", "strategy", "status", "rows", "by"],
                    records.iter().map(|r| {
                        vec![
                            r.plan.id.to_string(),
                            r.created_at.to_string(),
                            r.plan.table.to_string(),
                            sanare::repair::strategy_code(&r.plan.strategy),
                            format!("{:?}", r.plan.status),
                            r.rows_affected.map(|n| n.to_string()).unwrap_or_default(),
                            r.executed_by.clone().unwrap_or_default(),
                        ]
                    }),
                );
            })?;
            Ok(0)
        }
    }
}

/// The newest completed integrity check.
async fn latest_check(ctx: &Context) -> anyhow::Result<Option<CheckId>> {
    let client = ctx.client().await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT id FROM {} WHERE status = 'completed' ORDER BY started_at DESC LIMIT 1",
                ctx.schema.table("integrity_checks")
            ),
            &[],
        )
        .await
        .context("finding the latest integrity check")?;
    Ok(row.map(|r| CheckId::from_uuid(r.get(0))))
}

fn outcome_or_approval(
    ctx: &Context,
    outcome: sanare::Result<sanare::core::RepairOutcome>,
) -> anyhow::Result<u8> {
    match outcome {
        Ok(outcome) if outcome.status == RepairStatus::Failed => {
            print_outcome(ctx, &outcome)?;
            anyhow::bail!(
                "repair {} failed and changed nothing: {}",
                outcome.repair,
                outcome.message.as_deref().unwrap_or("no reason recorded")
            )
        }
        Ok(outcome) => {
            print_outcome(ctx, &outcome)?;
            Ok(0)
        }
        Err(Error::ApprovalRequired(why)) => {
            eprintln!("sanare: {why}; approve it with `sanare repair approve <id> --by <you>`");
            Ok(EXIT_NEEDS_APPROVAL)
        }
        Err(e) => Err(e.into()),
    }
}

fn print_outcome(ctx: &Context, outcome: &sanare::core::RepairOutcome) -> anyhow::Result<()> {
    ctx.out.show(outcome, |out| {
        out.line(format!(
            "repair {}: {:?}{} — {} rows in {:.2}s",
            outcome.repair,
            outcome.status,
            if outcome.dry_run {
                " (dry run, rolled back)"
            } else {
                ""
            },
            outcome.rows_affected,
            outcome.duration.as_secs_f64()
        ));
        for row in outcome.rows.iter().take(20) {
            out.line(format!("  {row}"));
        }
        if outcome.rows.len() > 20 {
            out.line(format!("  … and {} more", outcome.rows.len() - 20));
        }
        if let Some(m) = &outcome.message {
            out.line(m);
        }
    })
}

fn print_plans(out: &mut crate::output::Human, plans: &[RepairPlan]) {
    out.table(
        &[
            "id", "table", "strategy", "severity", "rows", "approval", "status", "what",
        ],
        plans.iter().map(|p| {
            vec![
                p.id.to_string(),
                p.table.to_string(),
                sanare::repair::strategy_code(&p.strategy),
                p.severity.to_string(),
                p.estimated_rows.to_string(),
                match (&p.approved_by, p.requires_approval) {
                    (Some(by), _) => format!("approved by {by}"),
                    (None, true) => "NEEDED".into(),
                    (None, false) => "not needed".into(),
                },
                format!("{:?}", p.status),
                p.description.clone(),
            ]
        }),
    );
}
