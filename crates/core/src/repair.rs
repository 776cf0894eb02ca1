//! What other crates need of the repair engine.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{Control, RepairId, Result, RowRef, Severity, TableRef, Violation, ViolationId};

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
}

/// A planned repair of one or more violations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepairPlan {
    /// The repair.
    pub id: RepairId,
    /// The violations it fixes.
    pub violations: Vec<ViolationId>,
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
    /// Exactly which rows.
    pub rows: Vec<RowRef>,
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
            duration: Duration::ZERO,
            message: None,
        }
    }
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
}
