//! `repair plan|dry-run|approve|apply|rollback|history|rows|quarantine`.
//!
//! Lists (plans, history, rows, quarantine) are printed as they are read: `--json`
//! writes one JSON array element by element, the human form prints tables of at
//! most [`PAGE`] rows, so no list is ever held whole in memory.

use std::io::Write as _;

use clap::Subcommand;
use futures_util::StreamExt as _;
use sanare::core::{
    BoxStream, CheckId, Error, ExecuteOptions, IntegrityService, RepairId, RepairPlan,
    RepairService, RepairStatus, Violation,
};
use sanare::corruption::IssueQuery;
use sanare_pg::PgResultExt;
use serde::Serialize;
use time::OffsetDateTime;

use crate::output::{Human, with_progress};
use crate::{Context, EXIT_NEEDS_APPROVAL};

/// Rows per human table of a streamed list.
const PAGE: usize = 100;

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
    /// and quarantine kept. Exits 4 when it still needs an approval.
    Apply {
        /// The repair.
        id: RepairId,
        /// Who runs it (recorded in the audit trail).
        #[arg(long, default_value = "sanare-cli")]
        by: String,
    },
    /// Undo a completed repair from its undo log and quarantine.
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
    /// Every row a repair covers, and what its last run did with each (repaired, or
    /// skipped because it changed since planning or no longer violated).
    Rows {
        /// The repair.
        id: RepairId,
    },
    /// Rows repairs removed, kept whole: list them, or put one back.
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum QuarantineCommand {
    /// Quarantined rows, oldest first.
    List {
        /// Only those of this repair.
        #[arg(long)]
        repair: Option<RepairId>,
    },
    /// Put a quarantined row back into its table, exactly as it was.
    Restore {
        /// The quarantined row's id (from `repair quarantine list`).
        id: i64,
        /// Who puts it back (recorded in the audit trail).
        #[arg(long)]
        by: String,
    },
}

pub(crate) async fn run(ctx: &Context, command: RepairCommand) -> anyhow::Result<u8> {
    let sanare = ctx.sanare().await?;
    let repair = sanare.repair();
    match command {
        RepairCommand::Plan {
            check,
            no_corruption,
        } => plan(ctx, &sanare, check, no_corruption).await,
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
            let options = ExecuteOptions::new().executed_by(by);
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
        RepairCommand::History { since, id } => history(ctx, repair, since, id).await,
        RepairCommand::Rows { id } => {
            let rows = repair.targets(id).await?;
            let n = print_stream(ctx, rows, &["row", "violation", "outcome"], |t| {
                vec![
                    t.row.to_string(),
                    t.violation.map(|v| v.to_string()).unwrap_or_default(),
                    t.outcome.clone().unwrap_or_else(|| "not run".into()),
                ]
            })
            .await?;
            if n == 0 && !ctx.out.json() {
                Human.line(format!(
                    "repair {id} covers no recorded row (it works on a whole table or index)"
                ));
            }
            Ok(0)
        }
        RepairCommand::Quarantine { command } => quarantine(ctx, repair, command).await,
    }
}

async fn plan(
    ctx: &Context,
    sanare: &sanare::Sanare,
    check: Option<CheckId>,
    no_corruption: bool,
) -> anyhow::Result<u8> {
    let check = match check {
        Some(c) => Some(c),
        None => latest_check(ctx).await?,
    };
    let from_check: BoxStream<'_, sanare::Result<Violation>> = match check {
        Some(check) => sanare.integrity().violations(check),
        None => futures_util::stream::empty().boxed(),
    };
    let issues = if no_corruption {
        Vec::new()
    } else {
        sanare
            .corruption()
            .issues(&IssueQuery::new().unresolved())
            .await?
    };
    let violations = from_check
        .chain(futures_util::stream::iter(
            issues.into_iter().map(|i| Ok(i.to_violation())),
        ))
        .boxed();
    let repair = sanare.repair();
    let plans = with_progress(&ctx.out, "planning", |control| async move {
        repair.plan_stream(violations, &control).await
    })
    .await?;
    let waiting = plans.iter().filter(|p| p.requires_approval).count();
    if plans.is_empty() && !ctx.out.json() {
        Human.line(match check {
            Some(c) => format!(
                "nothing to repair automatically: check {c} and the open corruption issues gave no plan"
            ),
            None => "nothing to repair: no integrity check has completed yet (run `sanare validate`) and no corruption issue gave a plan".into(),
        });
        return Ok(0);
    }
    let planned = plans.len();
    print_plans(ctx, plans.into_iter()).await?;
    if !ctx.out.json() {
        Human.line(format!(
            "{planned} repairs planned ({waiting} need an approval); next: `sanare repair dry-run <id>`, \
             `sanare repair approve <id> --by <you>`, `sanare repair apply <id>`"
        ));
    }
    Ok(if waiting > 0 { EXIT_NEEDS_APPROVAL } else { 0 })
}

async fn history(
    ctx: &Context,
    repair: &sanare::repair::RepairEngine,
    since: Option<OffsetDateTime>,
    id: Option<RepairId>,
) -> anyhow::Result<u8> {
    if let Some(id) = id {
        let record = repair.get(id).await?;
        ctx.out.show(&record, |out| {
            out.table(&PLAN_HEADER, [plan_row(&record.plan)]);
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
                .filter_map(|(k, v)| v.map(|v| vec![k.to_owned(), crate::output::time(v)])),
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
    let from = since.unwrap_or_else(|| OffsetDateTime::now_utc() - time::Duration::days(30));
    let records = repair.history(from, OffsetDateTime::now_utc() + time::Duration::minutes(1));
    let n = print_stream(
        ctx,
        records,
        &[
            "id", "planned", "table", "strategy", "status", "rows", "skipped", "by",
        ],
        |r| {
            vec![
                r.plan.id.to_string(),
                crate::output::time(r.created_at),
                r.plan.table.to_string(),
                sanare::repair::strategy_code(&r.plan.strategy),
                r.plan.status.to_string(),
                r.rows_affected.map(|n| n.to_string()).unwrap_or_default(),
                r.rows_skipped.map(|n| n.to_string()).unwrap_or_default(),
                r.executed_by.clone().unwrap_or_default(),
            ]
        },
    )
    .await?;
    if n == 0 && !ctx.out.json() {
        Human.line("no repairs in this window");
    }
    Ok(0)
}

async fn quarantine(
    ctx: &Context,
    repair: &sanare::repair::RepairEngine,
    command: QuarantineCommand,
) -> anyhow::Result<u8> {
    match command {
        QuarantineCommand::List { repair: of } => {
            let rows = repair.quarantine(of);
            let n = print_stream(
                ctx,
                rows,
                &["id", "repair", "table", "key", "quarantined", "restored"],
                |q| {
                    vec![
                        q.id.to_string(),
                        q.repair.to_string(),
                        q.table.to_string(),
                        q.key.join(", "),
                        crate::output::time(q.quarantined_at),
                        match (&q.restored_at, &q.restored_by) {
                            (Some(at), by) => format!(
                                "{} by {}",
                                crate::output::time(*at),
                                by.as_deref().unwrap_or("?")
                            ),
                            (None, _) => String::new(),
                        },
                    ]
                },
            )
            .await?;
            if n == 0 && !ctx.out.json() {
                Human.line("the quarantine is empty");
            }
            Ok(0)
        }
        QuarantineCommand::Restore { id, by } => {
            let row = repair.restore_quarantined(id, &by).await?;
            ctx.out.show(&row, |out| {
                out.line(format!(
                    "quarantined row {id} is back in {} (key {}), put back by {by}",
                    row.table,
                    row.key.join(", ")
                ));
            })?;
            Ok(0)
        }
    }
}

/// Prints `items` as they are read: with `--json` one JSON array written element by
/// element, else tables of at most [`PAGE`] rows. Returns how many were printed.
async fn print_stream<T: Serialize>(
    ctx: &Context,
    mut items: BoxStream<'_, sanare::Result<T>>,
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<u64> {
    let json = ctx.out.json();
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let mut page = Vec::with_capacity(PAGE);
    let mut n = 0u64;
    if json {
        out.write_all(b"[")?;
    }
    while let Some(item) = items.next().await {
        let item = item?;
        if json {
            out.write_all(if n == 0 { b"\n" } else { b",\n" })?;
            serde_json::to_writer_pretty(&mut out, &item)?;
        } else {
            page.push(row(&item));
            if page.len() == PAGE {
                out.flush()?;
                Human.table(header, page.drain(..));
            }
        }
        n += 1;
    }
    if json {
        out.write_all(if n == 0 { b"]\n" } else { b"\n]\n" })?;
    } else if !page.is_empty() {
        Human.table(header, page.drain(..));
    }
    out.flush()?;
    Ok(n)
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
            "repair {}: {}{} — {} rows changed, {} left alone, in {:.2}s",
            outcome.repair,
            outcome.status,
            if outcome.dry_run {
                " (dry run, rolled back)"
            } else {
                ""
            },
            outcome.rows_affected,
            outcome.rows_skipped,
            outcome.duration.as_secs_f64()
        ));
        for row in outcome.rows.iter().take(20) {
            out.line(format!("  {row}"));
        }
        if outcome.rows_affected > 20 {
            out.line(format!(
                "  … and {} more (`sanare repair rows {}`)",
                outcome.rows_affected - 20,
                outcome.repair
            ));
        }
        if let Some(m) = &outcome.message {
            out.line(m);
        }
    })
}

const PLAN_HEADER: [&str; 8] = [
    "id", "table", "strategy", "severity", "rows", "approval", "status", "what",
];

fn plan_row(p: &RepairPlan) -> Vec<String> {
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
        p.status.to_string(),
        p.description.clone(),
    ]
}

async fn print_plans(
    ctx: &Context,
    plans: impl Iterator<Item = RepairPlan> + Send + 'static,
) -> anyhow::Result<u64> {
    let stream = futures_util::stream::iter(plans.map(Ok)).boxed();
    print_stream(ctx, stream, &PLAN_HEADER, plan_row).await
}
