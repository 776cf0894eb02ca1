//! `recover`: the recovery wizard, interactive on a terminal and scriptable with
//! flags.

use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use sanare::core::{CrashId, RecoveryId};
use sanare::recovery::{
    RecoveryOption, RecoveryOptions, RecoveryPlan, RecoveryResult, StoredCrash,
};

use crate::output::with_progress;
use crate::{Context, EXIT_NEEDS_APPROVAL};

#[derive(Debug, Args)]
pub(crate) struct RecoverArgs {
    /// Undo the recovery with this id: return the tables it restored to their
    /// state before it, from the backup snapshot its record names (the state they
    /// have now is backed up first).
    #[arg(long, value_name = "RECOVERY_ID", conflicts_with_all = ["crash", "option", "backup_first", "auto_approve"])]
    undo: Option<RecoveryId>,
    /// The crash to recover from (default: the newest one not yet recovered).
    #[arg(long)]
    crash: Option<CrashId>,
    /// Which recovery; asked interactively on a terminal when not given.
    #[arg(long, value_enum)]
    option: Option<OptionArg>,
    /// Snapshot the current state before changing anything.
    #[arg(long)]
    backup_first: bool,
    /// Also run repairs that need an approval (approved as `--by`).
    #[arg(long)]
    auto_approve: bool,
    /// Who approves and runs the repairs (audit trail).
    #[arg(long, default_value = "sanare-cli")]
    by: String,
    /// Run without asking (required when not on a terminal; without it the plan
    /// is printed and the command exits 4).
    #[arg(long)]
    yes: bool,
}

/// The recovery options of the spec's wizard.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum OptionArg {
    /// By evidence: replay, validate and scan, repair only what they find
    /// (recommended).
    Auto,
    /// Restore the latest good snapshot over the tables it holds (after a backup of
    /// their current state; undo with `--undo`), replay the journal, validate.
    RestoreLatestSnapshot,
    /// Replay journal entries not yet applied, validate.
    ReplayJournal,
    /// Validate and repair what validation finds.
    RepairOnly,
    /// Show the full plan only; run nothing.
    Manual,
}

impl From<OptionArg> for RecoveryOption {
    fn from(o: OptionArg) -> Self {
        match o {
            OptionArg::Auto => RecoveryOption::Auto,
            OptionArg::RestoreLatestSnapshot => RecoveryOption::RestoreLatestSnapshot,
            OptionArg::ReplayJournal => RecoveryOption::ReplayJournal,
            OptionArg::RepairOnly => RecoveryOption::RepairOnly,
            OptionArg::Manual => RecoveryOption::Manual,
        }
    }
}

pub(crate) async fn run(ctx: &Context, args: RecoverArgs) -> anyhow::Result<u8> {
    let sanare = ctx.sanare().await?;
    if let Some(id) = args.undo {
        return undo(ctx, &sanare, id, args.yes).await;
    }
    let crash: Option<StoredCrash> = match args.crash {
        Some(id) => Some(sanare.crashes().get(id).await?),
        None => sanare
            .crashes()
            .history(None, None)
            .await?
            .into_iter()
            .find(|c| c.recovery_successful.is_none()),
    };
    let interactive = !args.yes && !ctx.out.json() && std::io::stdin().is_terminal();
    if !ctx.out.json() {
        match &crash {
            Some(c) => eprintln!(
                "crash {} — {} ({}), detected {}: {}",
                c.crash.id,
                c.crash.kind.as_str(),
                c.crash.severity,
                crate::output::time(c.crash.detected_at),
                c.crash.message.as_deref().unwrap_or("no message")
            ),
            None => eprintln!(
                "no crash waiting for recovery; a recovery now validates, repairs and checks readiness"
            ),
        }
    }
    let option = match (args.option, interactive) {
        (Some(o), _) => o,
        (None, true) => ask_option()?,
        (None, false) => OptionArg::Auto,
    };
    let backup_first = if interactive && !args.backup_first {
        dialoguer::Confirm::new()
            .with_prompt("Take a backup snapshot of the current state first?")
            .default(true)
            .interact()?
    } else {
        args.backup_first
    };
    let mut options = RecoveryOptions::new(option.into())
        .backup_first(backup_first)
        .auto_approve(args.auto_approve);
    options.approver = args.by.clone();
    let plan = sanare
        .recovery()
        .plan(crash.as_ref().map(|c| &c.crash), options);
    print_plan(ctx, &plan)?;
    if matches!(option, OptionArg::Manual) {
        if ctx.out.json() {
            ctx.out.show(&plan, |_| {})?;
        }
        return Ok(0);
    }
    let go = if interactive {
        dialoguer::Confirm::new()
            .with_prompt("Run this recovery now?")
            .default(false)
            .interact()?
    } else {
        args.yes
    };
    if !go {
        if ctx.out.json() {
            // The one JSON document: the plan that was not run.
            ctx.out.show(&plan, |_| {})?;
        } else {
            eprintln!("not run: pass --yes to run this plan");
        }
        return Ok(EXIT_NEEDS_APPROVAL);
    }
    let recovery = sanare.recovery();
    let result = with_progress(&ctx.out, "recover", |control| async move {
        recovery.recover(&plan, &control).await
    })
    .await?;
    show_result(ctx, &result)
}

/// `recover --undo <id>`: without `--yes` (or a terminal's confirmation), says
/// what it would do and exits 4.
async fn undo(
    ctx: &Context,
    sanare: &sanare::Sanare,
    id: RecoveryId,
    yes: bool,
) -> anyhow::Result<u8> {
    let record = sanare.crashes().recovery(id).await?;
    let what = format!(
        "undo recovery {id} ({}, {}): restore {} from backup snapshot {}",
        record.result.option,
        crate::output::time(record.result.started_at),
        if record.result.tables_restored.is_empty() {
            "no table".to_owned()
        } else {
            record
                .result
                .tables_restored
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
        record
            .result
            .backup_snapshot
            .map_or_else(|| "(none)".to_owned(), |s| s.to_string())
    );
    let interactive = !yes && !ctx.out.json() && std::io::stdin().is_terminal();
    let go = if interactive {
        eprintln!("{what}");
        dialoguer::Confirm::new()
            .with_prompt("Undo it now?")
            .default(false)
            .interact()?
    } else {
        yes
    };
    if !go {
        if ctx.out.json() {
            ctx.out.show(&record, |_| {})?;
        } else {
            eprintln!("{what}\nnot run: pass --yes to undo it");
        }
        return Ok(EXIT_NEEDS_APPROVAL);
    }
    let recovery = sanare.recovery();
    let result = with_progress(&ctx.out, "undo", |control| async move {
        recovery.undo(id, &control).await
    })
    .await?;
    show_result(ctx, &result)
}

fn show_result(ctx: &Context, result: &RecoveryResult) -> anyhow::Result<u8> {
    ctx.out.show(result, |out| {
        out.line(format!(
            "recovery {}: {} in {:.1}s — {} entries replayed, {} errors fixed",
            result.id,
            if result.success { "READY" } else { "NOT READY" },
            result.duration.as_secs_f64(),
            result.entries_replayed,
            result.errors_fixed
        ));
        if let Some(backup) = result.backup_snapshot {
            out.line(format!(
                "backup snapshot {backup} holds the state before; undo with `sanare recover --undo {}`",
                result.id
            ));
        }
        out.table(
            &["step", "ok", "seconds", "detail"],
            result.steps.iter().map(|s| {
                vec![
                    s.step.to_string(),
                    if s.success { "yes" } else { "NO" }.into(),
                    format!("{:.2}", s.duration.as_secs_f64()),
                    s.detail.clone(),
                ]
            }),
        );
        for w in &result.warnings {
            out.line(format!("warning: {w}"));
        }
        for e in &result.errors {
            out.line(format!("error: {e}"));
        }
    })?;
    if result.success {
        Ok(0)
    } else {
        anyhow::bail!(
            "recovery did not reach readiness: {}",
            result.errors.join("; ")
        )
    }
}

fn ask_option() -> anyhow::Result<OptionArg> {
    let choices = [
        (
            OptionArg::Auto,
            "Automatic — replay, check, repair only what is found (recommended)",
        ),
        (
            OptionArg::RestoreLatestSnapshot,
            "Restore the latest good snapshot (current state backed up first), then replay the journal",
        ),
        (
            OptionArg::ReplayJournal,
            "Replay journal entries not yet applied",
        ),
        (OptionArg::RepairOnly, "Validate and repair only"),
        (OptionArg::Manual, "Show the full plan; run nothing"),
    ];
    let picked = dialoguer::Select::new()
        .with_prompt("Which recovery?")
        .items(choices.iter().map(|(_, label)| *label))
        .default(0)
        .interact()?;
    Ok(choices[picked].0)
}

fn print_plan(ctx: &Context, plan: &RecoveryPlan) -> anyhow::Result<()> {
    if ctx.out.json() {
        // With --json the result (or the plan, when not run) is the one document.
        return Ok(());
    }
    eprintln!("plan ({}):", plan.options.option);
    for (i, step) in plan.steps.iter().enumerate() {
        eprintln!("  {}. {step}", i + 1);
    }
    for note in &plan.notes {
        eprintln!("  note: {note}");
    }
    if plan
        .steps
        .iter()
        .any(|s| matches!(s, sanare::recovery::RecoveryStep::ReplayJournal))
    {
        eprintln!(
            "  note: journal entries replay through the service's registered handlers; entries this CLI has no handler for are reported, not applied — the service replays them at its next start"
        );
    }
    Ok(())
}
