//! What other crates need of the repair engine.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{
    BoxStream, Control, RepairId, Result, RowRef, Severity, TableRef, Violation, ViolationId,
};

/// How a violation is repaired (spec §4.3).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RepairStrategyKind {
    /// Delete child rows whose parent is gone (or null their nullable reference).
    RemoveOrphanedRecord,
    /// Delete rows that cannot be corrected.
    DeleteInvalidRecord,
    /// Set a column to its default or a recomputed value.
    UpdateInvalidData,
    /// Change data so a constraint holds (deduplicate, clamp).
    FixConstraintViolation,
    /// Bring rows back from the latest good snapshot by primary key.
    RestoreFromSnapshot,
    /// Re-apply journal entries.
    ReplayTransaction,
    /// `REINDEX … CONCURRENTLY`.
    RebuildIndex,
    /// Replace a table's contents from a snapshot.
    TruncateAndReload,
    /// A strategy the host registered, by name.
    Custom(String),
}

/// Where a repair is in its life (spec §8.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RepairStatus {
    /// Being planned: its rows are still being recorded. Never runs.
    Planning,
    /// Planned; may run.
    Pending,
    /// Planned; waits for an approval.
    AwaitingApproval,
    /// Running.
    InProgress,
    /// Committed.
    Completed,
    /// Failed and rolled back by its transaction; nothing changed.
    Failed,
    /// Completed, then undone.
    RolledBack,
    /// Recorded by an older version in a form this version does not run (SQL text):
    /// never runs; plan the repair again.
    ReplanNeeded,
}

impl RepairStatus {
    /// The stable snake_case name, as serialized and printed.
    pub const fn as_str(self) -> &'static str {
        match self {
            RepairStatus::Planning => "planning",
            RepairStatus::Pending => "pending",
            RepairStatus::AwaitingApproval => "awaiting_approval",
            RepairStatus::InProgress => "in_progress",
            RepairStatus::Completed => "completed",
            RepairStatus::Failed => "failed",
            RepairStatus::RolledBack => "rolled_back",
            RepairStatus::ReplanNeeded => "replan_needed",
        }
    }
}

impl std::fmt::Display for RepairStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many violation ids a [`RepairPlan`] carries at most, and how many rows a
/// [`RepairOutcome`] lists at most: a repair may cover millions of rows, which stay
/// in the repair engine's tables.
pub const PLAN_VIOLATION_SAMPLE: usize = 1_000;

/// A planned repair of one or more violations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepairPlan {
    /// The repair.
    pub id: RepairId,
    /// The violations it fixes: all of them up to [`PLAN_VIOLATION_SAMPLE`], the
    /// first ones beyond (a plan may cover millions; the repair engine keeps the full
    /// list in its tables, not in memory). [`violation_count`](Self::violation_count)
    /// has the total.
    pub violations: Vec<ViolationId>,
    /// How many violations it fixes.
    #[serde(default)]
    pub violation_count: u64,
    /// The table it changes.
    pub table: TableRef,
    /// How.
    pub strategy: RepairStrategyKind,
    /// The highest severity among its violations.
    pub severity: Severity,
    /// Rows it is expected to change.
    pub estimated_rows: u64,
    /// Whether it waits for [`RepairService::approve`].
    pub requires_approval: bool,
    /// Who approved it.
    pub approved_by: Option<String>,
    /// What must hold before it runs.
    pub preconditions: Vec<String>,
    /// What holds after it ran.
    pub postconditions: Vec<String>,
    /// How it is undone.
    pub rollback_plan: String,
    /// What it does, in words.
    pub description: String,
    /// Its status.
    pub status: RepairStatus,
}

impl RepairPlan {
    /// A pending plan with no approval requirement, no estimate and empty texts;
    /// the repair engine fills the public fields.
    pub fn new(
        id: RepairId,
        violations: Vec<ViolationId>,
        table: TableRef,
        strategy: RepairStrategyKind,
        severity: Severity,
    ) -> Self {
        Self {
            id,
            violation_count: violations.len() as u64,
            violations,
            table,
            strategy,
            severity,
            estimated_rows: 0,
            requires_approval: false,
            approved_by: None,
            preconditions: Vec::new(),
            postconditions: Vec::new(),
            rollback_plan: String::new(),
            description: String::new(),
            status: RepairStatus::Pending,
        }
    }
}

/// How to run a repair.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExecuteOptions {
    /// Run in a transaction that is rolled back, reporting the rows it would change.
    pub dry_run: bool,
    /// Who runs it (for the audit trail).
    pub executed_by: Option<String>,
}

impl ExecuteOptions {
    /// A real run.
    pub fn new() -> Self {
        Self::default()
    }

    /// A dry run.
    pub fn dry_run() -> Self {
        Self {
            dry_run: true,
            ..Self::default()
        }
    }

    /// Who runs it.
    pub fn executed_by(mut self, who: impl Into<String>) -> Self {
        self.executed_by = Some(who.into());
        self
    }
}

/// What running (or rolling back) a repair did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepairOutcome {
    /// The repair.
    pub repair: RepairId,
    /// Its status afterwards.
    pub status: RepairStatus,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Rows changed (would be changed, in a dry run).
    pub rows_affected: u64,
    /// Which rows: all of them up to [`PLAN_VIOLATION_SAMPLE`], the first ones beyond
    /// (the repair engine keeps the full list in its undo log and quarantine).
    pub rows: Vec<RowRef>,
    /// Rows the plan named that were left alone because they changed since the
    /// repair was planned or no longer violate (re-checked at execute time).
    #[serde(default)]
    pub rows_skipped: u64,
    /// How long it took.
    pub duration: Duration,
    /// A note (why it failed, what was skipped).
    pub message: Option<String>,
}

impl RepairOutcome {
    /// An outcome with no rows, zero duration and no message.
    pub fn new(repair: RepairId, status: RepairStatus, dry_run: bool) -> Self {
        Self {
            repair,
            status,
            dry_run,
            rows_affected: 0,
            rows: Vec::new(),
            rows_skipped: 0,
            duration: Duration::ZERO,
            message: None,
        }
    }
}

/// What one run of the repair loop ([`RepairService::repair_all`]) may do without a
/// person.
///
/// The default approves nothing: plans that need an approval wait for an operator
/// (`sanare repair approve`), and only those that need none run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepairPolicy {
    /// Who plans, approves and executes, for the audit trail.
    pub actor: String,
    /// Approve plans that need an approval, as [`actor`](Self::actor). Off by
    /// default; turn it on only where a person already decided (an operator's
    /// `recover --yes`, a test).
    pub auto_approve: bool,
    /// Dry-run each plan before running it for real.
    pub dry_run_first: bool,
    /// Plan and dry-run only; change nothing.
    pub dry_run_only: bool,
}

impl RepairPolicy {
    /// A policy acting as `actor` that approves nothing, dry-runs first and then runs
    /// the plans that need no approval.
    pub fn new(actor: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            auto_approve: false,
            dry_run_first: true,
            dry_run_only: false,
        }
    }

    /// Approve plans that need an approval.
    pub fn auto_approve(mut self, yes: bool) -> Self {
        self.auto_approve = yes;
        self
    }

    /// Dry-run each plan before running it.
    pub fn dry_run_first(mut self, yes: bool) -> Self {
        self.dry_run_first = yes;
        self
    }

    /// Plan and dry-run only.
    pub fn dry_run_only(mut self, yes: bool) -> Self {
        self.dry_run_only = yes;
        self
    }
}

/// What one run of the repair loop did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepairRunSummary {
    /// Violations read from the stream.
    pub violations_read: u64,
    /// Plans recorded.
    pub planned: u64,
    /// Violations covered by the repairs that completed.
    pub violations_fixed: u64,
    /// Repairs that completed.
    pub completed: u64,
    /// Rows changed by them (would be changed, for a dry-run-only policy).
    pub rows_changed: u64,
    /// Rows their plans named that were left alone (changed since planning, or no
    /// longer violating).
    #[serde(default)]
    pub rows_skipped: u64,
    /// Repairs left waiting for an approval.
    pub awaiting_approval: Vec<RepairId>,
    /// Repairs that ended otherwise (failed, refused), with the reason.
    pub not_completed: Vec<(RepairId, String)>,
}

/// The repair engine, as the other components use it (recovery repairs what
/// validation finds; the corruption detector hands over its issues).
///
/// # Contract
/// `Send + Sync`. `execute` runs one transaction per repair and saves before-images
/// in it; a repair that needs approval and has none fails with
/// [`Error::ApprovalRequired`](crate::Error::ApprovalRequired); re-running a completed
/// repair is a no-op returning its recorded outcome.
#[async_trait]
pub trait RepairService: Send + Sync {
    /// Analyses violations and records a plan for each repair.
    async fn plan(&self, violations: &[Violation]) -> Result<Vec<RepairPlan>>;

    /// Analyses every violation of a stream, read in bounded batches, and records a
    /// plan for each repair. Implementations should merge the batches' repairs of the
    /// same kind into one plan (so approval thresholds see the whole repair); the
    /// default plans each batch of [`PLAN_VIOLATION_SAMPLE`] violations on its own
    /// with [`plan`](Self::plan). Cancellation through `control` stops between
    /// batches.
    async fn plan_stream(
        &self,
        mut violations: BoxStream<'_, Result<Violation>>,
        control: &Control,
    ) -> Result<Vec<RepairPlan>> {
        let mut plans = Vec::new();
        let mut batch = Vec::with_capacity(PLAN_VIOLATION_SAMPLE);
        loop {
            batch.clear();
            while batch.len() < PLAN_VIOLATION_SAMPLE {
                match std::future::poll_fn(|cx| violations.as_mut().poll_next(cx)).await {
                    Some(v) => batch.push(v?),
                    None => break,
                }
            }
            if batch.is_empty() {
                return Ok(plans);
            }
            control.checkpoint()?;
            plans.extend(self.plan(&batch).await?);
        }
    }

    /// Approves a repair that needs it.
    async fn approve(&self, repair: RepairId, approver: &str) -> Result<RepairPlan>;

    /// Runs (or dry-runs) a planned repair.
    async fn execute(
        &self,
        repair: RepairId,
        options: ExecuteOptions,
        control: &Control,
    ) -> Result<RepairOutcome>;

    /// Undoes a completed repair from its undo log.
    async fn rollback(&self, repair: RepairId, control: &Control) -> Result<RepairOutcome>;

    /// The one repair loop: reads every violation of `violations` in bounded batches,
    /// plans their repairs, approves what `policy` allows, and runs (or dry-runs) each
    /// plan in its own transaction. The facade's background auto-repair, recovery's
    /// repair step and the operator's tools all go through it.
    ///
    /// A plan that needs approval the policy cannot give is left waiting and named in
    /// the summary; a repair that fails is named with its reason and the loop goes on.
    /// Cancellation through `control` stops between plans.
    async fn repair_all(
        &self,
        violations: BoxStream<'_, Result<Violation>>,
        policy: &RepairPolicy,
        control: &Control,
    ) -> Result<RepairRunSummary>;
}
