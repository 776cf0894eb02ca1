//! The plain data of recovery: options, steps, plans, results, readiness.

use std::fmt;
use std::time::Duration;

use sanare_core::{CrashId, CrashKind, RecoveryId, SnapshotId, TableRef};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What recovery should do (spec §4.1 `RecoveryOptions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RecoveryOption {
    /// By evidence: replay what the journal holds unapplied, validate and scan
    /// what the crash could have touched, repair only what they found, restore
    /// only tables damaged beyond row repair (after a backup of them), check
    /// readiness. The crash kind only chooses how deep to look.
    Auto,
    /// The operator's choice: restore the latest good snapshot over the live
    /// tables (after a backup of their current state), replay the journal from its
    /// cut, validate.
    RestoreLatestSnapshot,
    /// Replay journal entries not yet applied, validate.
    ReplayJournal,
    /// Validate and scan, and repair what they find.
    RepairOnly,
    /// Every start that follows no crash: replay journal entries not yet applied,
    /// check readiness.
    Startup,
    /// Plan only: [`Recovery::recover`](crate::Recovery::recover) refuses a manual plan.
    Manual,
    /// The record of [`Recovery::undo`](crate::Recovery::undo); not a plan to run.
    Undo,
}

impl fmt::Display for RecoveryOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecoveryOption::Auto => "auto",
            RecoveryOption::RestoreLatestSnapshot => "restore latest snapshot",
            RecoveryOption::ReplayJournal => "replay journal",
            RecoveryOption::RepairOnly => "repair only",
            RecoveryOption::Startup => "start-up",
            RecoveryOption::Manual => "manual",
            RecoveryOption::Undo => "undo",
        })
    }
}

/// Options of a recovery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecoveryOptions {
    /// Which recovery.
    pub option: RecoveryOption,
    /// Take a snapshot of the current state of every table first.
    pub backup_first: bool,
    /// Execute repairs that require approval (approved as `approver`).
    pub auto_approve: bool,
    /// Execute the repairs that need no approval (off: repairs are only planned
    /// and dry-run, and wait for an operator).
    pub execute_repairs: bool,
    /// Who approves and executes repairs.
    pub approver: String,
    /// Restore only snapshots taken at or before this time (latest when `None`).
    #[serde(with = "time::serde::rfc3339::option")]
    pub restore_before: Option<OffsetDateTime>,
    /// The tables validation and the corruption scan cover (every host table when
    /// empty).
    #[serde(default)]
    pub tables: Vec<TableRef>,
    /// Verify pages and indexes physically (amcheck) in the scan. `None`: when the
    /// crash says the host itself went down (power failure, system crash, unknown).
    #[serde(default)]
    pub physical_checks: Option<bool>,
    /// Validation and the scan stop once the recovery has run this long; what they
    /// did not reach is named in the warnings. Replay, repairs and restores always
    /// finish. `None`: no limit.
    #[serde(default)]
    pub time_target: Option<Duration>,
}

impl Default for RecoveryOptions {
    fn default() -> Self {
        Self {
            option: RecoveryOption::Auto,
            backup_first: false,
            auto_approve: false,
            execute_repairs: true,
            approver: "sanare-recovery".into(),
            restore_before: None,
            tables: Vec::new(),
            physical_checks: None,
            time_target: None,
        }
    }
}

impl RecoveryOptions {
    /// Options with `option`.
    pub fn new(option: RecoveryOption) -> Self {
        Self {
            option,
            ..Self::default()
        }
    }

    /// Take a backup snapshot first.
    pub fn backup_first(mut self, yes: bool) -> Self {
        self.backup_first = yes;
        self
    }

    /// Run repairs that need approval.
    pub fn auto_approve(mut self, yes: bool) -> Self {
        self.auto_approve = yes;
        self
    }

    /// Run the repairs that need no approval (else plan and dry-run only).
    pub fn execute_repairs(mut self, yes: bool) -> Self {
        self.execute_repairs = yes;
        self
    }

    /// Check only these tables.
    pub fn tables(mut self, tables: impl IntoIterator<Item = TableRef>) -> Self {
        self.tables = tables.into_iter().collect();
        self
    }

    /// Force the physical checks on or off.
    pub fn physical_checks(mut self, yes: bool) -> Self {
        self.physical_checks = Some(yes);
        self
    }

    /// Stop validation and the scan once the recovery has run this long.
    pub fn time_target(mut self, target: Duration) -> Self {
        self.time_target = Some(target);
        self
    }
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RecoveryStep {
    /// Snapshot the current state of every table before changing anything.
    BackupSnapshot,
    /// The operator's whole restore: back up the current state of the tables the
    /// latest good snapshot holds, then restore it over them.
    RestoreSnapshot,
    /// Replay the journal: from the restored snapshot's cut when a restore ran
    /// before, else every entry not yet applied (applied ones are skipped by the
    /// journal).
    ReplayJournal,
    /// Validate integrity.
    Validate,
    /// Scan for corruption (row checksums; pages and indexes with amcheck when the
    /// plan says so).
    ScanCorruption,
    /// Repair what validation and the scan found, row by row, then re-validate the
    /// tables repaired.
    Repair,
    /// Restore only the tables the scan found damaged beyond row repair (pages
    /// that do not read or fail verification), after a backup snapshot of their
    /// current state; then replay the journal into them from the snapshot's cut.
    RestoreDamagedTables,
    /// Run the readiness check.
    ReadinessCheck,
}

impl RecoveryStep {
    /// The step's name in words.
    pub fn name(&self) -> &'static str {
        match self {
            RecoveryStep::BackupSnapshot => "backup snapshot",
            RecoveryStep::RestoreSnapshot => "restore snapshot",
            RecoveryStep::ReplayJournal => "replay journal",
            RecoveryStep::Validate => "validate",
            RecoveryStep::ScanCorruption => "scan for corruption",
            RecoveryStep::Repair => "repair",
            RecoveryStep::RestoreDamagedTables => "restore damaged tables",
            RecoveryStep::ReadinessCheck => "readiness check",
        }
    }
}

impl fmt::Display for RecoveryStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A recovery plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecoveryPlan {
    /// The crash it recovers from.
    pub crash: Option<CrashId>,
    /// The crash's kind.
    pub crash_kind: Option<CrashKind>,
    /// The options it was made with.
    pub options: RecoveryOptions,
    /// The steps, in order.
    pub steps: Vec<RecoveryStep>,
    /// Whether the scan verifies pages and indexes physically.
    pub physical_checks: bool,
    /// Why these steps, and which were left out for lack of a service.
    pub notes: Vec<String>,
}

/// What one step did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StepOutcome {
    /// The step.
    pub step: RecoveryStep,
    /// Whether it succeeded.
    pub success: bool,
    /// What it did or why it failed.
    pub detail: String,
    /// How long it took.
    pub duration: Duration,
}

/// What a recovery did (spec §4.1 `RecoveryResult`), as kept in its record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecoveryResult {
    /// The recovery run.
    pub id: RecoveryId,
    /// The crash it recovered from.
    pub crash: Option<CrashId>,
    /// Which recovery it was.
    #[serde(default = "auto")]
    pub option: RecoveryOption,
    /// Whether the service is ready.
    pub success: bool,
    /// Each step's outcome.
    pub steps: Vec<StepOutcome>,
    /// The snapshot of the state before any table was restored: restoring it
    /// ([`Recovery::undo`](crate::Recovery::undo)) returns those tables to before.
    pub backup_snapshot: Option<SnapshotId>,
    /// Snapshots restored.
    pub snapshots_used: Vec<SnapshotId>,
    /// Tables whose contents were replaced from a snapshot.
    #[serde(default)]
    pub tables_restored: Vec<TableRef>,
    /// Journal entries applied by replay.
    pub entries_replayed: u64,
    /// Findings of validation and the corruption scan.
    #[serde(default)]
    pub findings: u64,
    /// Violations repaired.
    pub errors_fixed: u64,
    /// The recovery this one undid.
    #[serde(default)]
    pub undoes: Option<RecoveryId>,
    /// Things that did not stop recovery but need attention.
    pub warnings: Vec<String>,
    /// Errors that stopped recovery.
    pub errors: Vec<String>,
    /// When it started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// How long it took.
    pub duration: Duration,
}

fn auto() -> RecoveryOption {
    RecoveryOption::Auto
}

impl RecoveryResult {
    pub(crate) fn new(option: RecoveryOption, crash: Option<CrashId>) -> Self {
        Self {
            id: RecoveryId::new(),
            crash,
            option,
            success: false,
            steps: Vec::new(),
            backup_snapshot: None,
            snapshots_used: Vec::new(),
            tables_restored: Vec::new(),
            entries_replayed: 0,
            findings: 0,
            errors_fixed: 0,
            undoes: None,
            warnings: Vec::new(),
            errors: Vec::new(),
            started_at: sanare_core::now(),
            duration: Duration::ZERO,
        }
    }
}

/// Whether the service may serve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Readiness {
    /// Ready or not.
    pub ready: bool,
    /// Why.
    pub detail: String,
}

impl Readiness {
    /// Ready.
    pub fn ready(detail: impl Into<String>) -> Self {
        Self {
            ready: true,
            detail: detail.into(),
        }
    }

    /// Not ready.
    pub fn not_ready(detail: impl Into<String>) -> Self {
        Self {
            ready: false,
            detail: detail.into(),
        }
    }
}
