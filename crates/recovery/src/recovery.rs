//! Recovery orchestration (spec §6): plans per crash type, run through the core
//! service traits with progress, cancellation, events and a readiness check.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sanare_core::{
    Control, CrashId, CrashKind, Error, Event, EventBus, IntegrityService, JournalService,
    RecoveryId, RepairPolicy, RepairService, ReplayRange, ReplayRequest, RestoreRequest, Result,
    SnapshotId, SnapshotRequest, SnapshotService, ValidationScope,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::detect::CrashRecord;
use crate::store::CrashStore;

/// What recovery should do (spec §4.1 `RecoveryOptions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RecoveryOption {
    /// Pick the steps from the crash type.
    Auto,
    /// Restore the latest good snapshot, replay the journal from its cut, validate.
    RestoreLatestSnapshot,
    /// Replay journal entries not yet applied, validate.
    ReplayJournal,
    /// Validate and repair what validation finds.
    RepairOnly,
    /// Plan only: [`Recovery::recover`] refuses a manual plan.
    Manual,
}

/// Options of a recovery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecoveryOptions {
    /// Which recovery.
    pub option: RecoveryOption,
    /// Take a snapshot of the current (crashed) state first.
    pub backup_first: bool,
    /// Execute repairs that require approval (approved as `approver`).
    pub auto_approve: bool,
    /// Who approves and executes repairs.
    pub approver: String,
    /// Restore only snapshots taken at or before this time (latest when `None`).
    #[serde(with = "time::serde::rfc3339::option")]
    pub restore_before: Option<OffsetDateTime>,
}

impl Default for RecoveryOptions {
    fn default() -> Self {
        Self {
            option: RecoveryOption::Auto,
            backup_first: false,
            auto_approve: false,
            approver: "sanare-recovery".into(),
            restore_before: None,
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
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RecoveryStep {
    /// Snapshot the current state before changing anything.
    BackupSnapshot,
    /// Restore the latest good snapshot into the live tables.
    RestoreSnapshot,
    /// Replay the journal: from the restored snapshot's cut when a restore ran
    /// before, else every entry (already-applied entries are skipped by the journal).
    ReplayJournal,
    /// Validate integrity.
    Validate,
    /// Repair the violations of the last validation, then re-validate.
    Repair,
    /// Run the readiness check.
    ReadinessCheck,
}

impl RecoveryStep {
    fn name(&self) -> &'static str {
        match self {
            RecoveryStep::BackupSnapshot => "backup snapshot",
            RecoveryStep::RestoreSnapshot => "restore snapshot",
            RecoveryStep::ReplayJournal => "replay journal",
            RecoveryStep::Validate => "validate",
            RecoveryStep::Repair => "repair",
            RecoveryStep::ReadinessCheck => "readiness check",
        }
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

/// What a recovery did (spec §4.1 `RecoveryResult`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecoveryResult {
    /// The recovery run.
    pub id: RecoveryId,
    /// The crash it recovered from.
    pub crash: Option<CrashId>,
    /// Whether the service is ready.
    pub success: bool,
    /// Each step's outcome.
    pub steps: Vec<StepOutcome>,
    /// The backup snapshot taken first, if any.
    pub backup_snapshot: Option<SnapshotId>,
    /// Snapshots restored.
    pub snapshots_used: Vec<SnapshotId>,
    /// Journal entries applied by replay.
    pub entries_replayed: u64,
    /// Violations repaired.
    pub errors_fixed: u64,
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

/// A host's readiness probe, run as the last recovery step.
///
/// # Contract
/// `Send + Sync`; should answer within seconds (it is run once per recovery and on
/// every [`Recovery::check_readiness`]).
#[async_trait]
pub trait ReadinessCheck: Send + Sync {
    /// Whether the service can serve.
    async fn check(&self) -> Result<Readiness>;
}

/// Builds a [`Recovery`].
#[derive(Default)]
pub struct RecoveryBuilder {
    snapshots: Option<Arc<dyn SnapshotService>>,
    journal: Option<Arc<dyn JournalService>>,
    integrity: Option<Arc<dyn IntegrityService>>,
    repair: Option<Arc<dyn RepairService>>,
    readiness: Option<Arc<dyn ReadinessCheck>>,
    store: Option<CrashStore>,
    events: Option<EventBus>,
}

impl std::fmt::Debug for RecoveryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryBuilder").finish_non_exhaustive()
    }
}

impl RecoveryBuilder {
    /// The snapshot service.
    pub fn snapshots(mut self, s: Arc<dyn SnapshotService>) -> Self {
        self.snapshots = Some(s);
        self
    }

    /// The journal.
    pub fn journal(mut self, j: Arc<dyn JournalService>) -> Self {
        self.journal = Some(j);
        self
    }

    /// The integrity validator.
    pub fn integrity(mut self, i: Arc<dyn IntegrityService>) -> Self {
        self.integrity = Some(i);
        self
    }

    /// The repair engine.
    pub fn repair(mut self, r: Arc<dyn RepairService>) -> Self {
        self.repair = Some(r);
        self
    }

    /// The host's readiness probe.
    pub fn readiness(mut self, r: Arc<dyn ReadinessCheck>) -> Self {
        self.readiness = Some(r);
        self
    }

    /// Where recovery outcomes are written onto crash records.
    pub fn crash_store(mut self, s: CrashStore) -> Self {
        self.store = Some(s);
        self
    }

    /// Publishes [`Event::RecoveryCompleted`] here.
    pub fn events(mut self, bus: EventBus) -> Self {
        self.events = Some(bus);
        self
    }

    /// Builds.
    pub fn build(self) -> Recovery {
        Recovery {
            snapshots: self.snapshots,
            journal: self.journal,
            integrity: self.integrity,
            repair: self.repair,
            readiness: self.readiness,
            store: self.store,
            events: self.events,
            last: Arc::new(RwLock::new(Readiness::not_ready("no recovery has run yet"))),
        }
    }
}

/// Plans and runs recoveries.
#[derive(Clone)]
pub struct Recovery {
    snapshots: Option<Arc<dyn SnapshotService>>,
    journal: Option<Arc<dyn JournalService>>,
    integrity: Option<Arc<dyn IntegrityService>>,
    repair: Option<Arc<dyn RepairService>>,
    readiness: Option<Arc<dyn ReadinessCheck>>,
    store: Option<CrashStore>,
    events: Option<EventBus>,
    last: Arc<RwLock<Readiness>>,
}

impl std::fmt::Debug for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recovery")
            .field("snapshots", &self.snapshots.is_some())
            .field("journal", &self.journal.is_some())
            .field("integrity", &self.integrity.is_some())
            .field("repair", &self.repair.is_some())
            .finish_non_exhaustive()
    }
}

/// Mutable state while running a plan.
struct Run {
    result: RecoveryResult,
    restored_cut: Option<Option<sanare_core::JournalCut>>,
    last_check: Option<sanare_core::CheckId>,
    last_clean: Option<bool>,
}

impl Recovery {
    /// A builder.
    pub fn builder() -> RecoveryBuilder {
        RecoveryBuilder::default()
    }

    /// The plan for `crash` (or for a routine start-up check when `None`).
    ///
    /// Auto picks by crash type (spec §6): a power failure, system crash or unknown
    /// end may have left host data torn or half-written outside PostgreSQL's own
    /// guarantees, so it restores the latest good snapshot and replays the journal
    /// from its cut; an application crash, out-of-memory or stack overflow leaves
    /// committed transactions intact, so it replays journal entries not yet applied;
    /// every plan then validates, repairs what validation finds, and checks readiness.
    pub fn plan(&self, crash: Option<&CrashRecord>, options: RecoveryOptions) -> RecoveryPlan {
        use RecoveryStep::*;
        let kind = crash.map(|c| c.kind);
        let mut notes = Vec::new();
        let mut steps = match options.option {
            RecoveryOption::Auto => match kind {
                None => {
                    notes.push("no crash: validate and check readiness".into());
                    vec![Validate, ReadinessCheck]
                }
                Some(CrashKind::PowerFailure | CrashKind::SystemCrash | CrashKind::Unknown) => {
                    notes.push(
                        "the host went down or the end is unknown: restore the latest good snapshot and replay the journal"
                            .into(),
                    );
                    vec![
                        RestoreSnapshot,
                        ReplayJournal,
                        Validate,
                        Repair,
                        ReadinessCheck,
                    ]
                }
                Some(_) => {
                    notes.push(
                        "the process died but committed data is intact: replay unapplied journal entries"
                            .into(),
                    );
                    vec![ReplayJournal, Validate, Repair, ReadinessCheck]
                }
            },
            RecoveryOption::RestoreLatestSnapshot => {
                vec![RestoreSnapshot, ReplayJournal, Validate, ReadinessCheck]
            }
            RecoveryOption::ReplayJournal => vec![ReplayJournal, Validate, ReadinessCheck],
            RecoveryOption::RepairOnly => vec![Validate, Repair, ReadinessCheck],
            RecoveryOption::Manual => {
                notes.push("manual: run the steps yourself; recover() refuses this plan".into());
                vec![
                    RestoreSnapshot,
                    ReplayJournal,
                    Validate,
                    Repair,
                    ReadinessCheck,
                ]
            }
        };
        if options.backup_first {
            steps.insert(0, BackupSnapshot);
        }
        steps.retain(|s| {
            let missing = match s {
                BackupSnapshot | RestoreSnapshot => self.snapshots.is_none().then_some("snapshot"),
                ReplayJournal => self.journal.is_none().then_some("journal"),
                Validate => self.integrity.is_none().then_some("integrity"),
                Repair => (self.integrity.is_none() || self.repair.is_none())
                    .then_some("integrity and repair"),
                ReadinessCheck => None,
            };
            if let Some(m) = missing {
                notes.push(format!("step `{}` left out: no {m} service", s.name()));
            }
            missing.is_none()
        });
        RecoveryPlan {
            crash: crash.map(|c| c.id),
            crash_kind: kind,
            options,
            steps,
            notes,
        }
    }

    /// The readiness found by the last recovery or check.
    pub fn readiness(&self) -> Readiness {
        self.last
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|_| Readiness::not_ready("readiness state poisoned"))
    }

    /// Runs the readiness check now (the host's probe, when configured).
    pub async fn check_readiness(&self) -> Result<Readiness> {
        let r = match &self.readiness {
            Some(check) => check.check().await?,
            None => Readiness::ready("no readiness probe configured"),
        };
        if let Ok(mut last) = self.last.write() {
            *last = r.clone();
        }
        Ok(r)
    }

    /// Runs `plan`. Cancelling through `control` stops between steps (and inside
    /// long steps, which take a child control) and returns
    /// [`Error::Cancelled`]; a step's failure stops the run and is reported in the
    /// result with `success = false`.
    #[tracing::instrument(skip_all, fields(crash = ?plan.crash))]
    pub async fn recover(&self, plan: &RecoveryPlan, control: &Control) -> Result<RecoveryResult> {
        if plan.options.option == RecoveryOption::Manual {
            return Err(Error::conflict(
                "a manual recovery plan is not run automatically; run its steps yourself",
            ));
        }
        let started = Instant::now();
        let mut run = Run {
            result: RecoveryResult {
                id: RecoveryId::new(),
                crash: plan.crash,
                success: false,
                steps: Vec::new(),
                backup_snapshot: None,
                snapshots_used: Vec::new(),
                entries_replayed: 0,
                errors_fixed: 0,
                warnings: plan
                    .notes
                    .iter()
                    .filter(|n| n.contains("left out"))
                    .cloned()
                    .collect(),
                errors: Vec::new(),
                started_at: sanare_core::now(),
                duration: Duration::ZERO,
            },
            restored_cut: None,
            last_check: None,
            last_clean: None,
        };
        metrics::counter!("sanare_recovery_runs_total").increment(1);
        let total = plan.steps.len() as u64;
        let mut outcome = Ok(());
        for (i, step) in plan.steps.iter().enumerate() {
            if let Err(e) = control.checkpoint() {
                outcome = Err(e);
                break;
            }
            control
                .progress()
                .phase(format!("recovery: {}", step.name()), "steps", Some(total));
            control.progress().set_done(i as u64);
            let t = Instant::now();
            let r = self.run_step(step, plan, &mut run, control).await;
            let (success, detail) = match &r {
                Ok(d) => (true, d.clone()),
                Err(e) => (false, e.to_string()),
            };
            tracing::info!(step = step.name(), success, %detail, "recovery step");
            run.result.steps.push(StepOutcome {
                step: step.clone(),
                success,
                detail,
                duration: t.elapsed(),
            });
            if let Err(e) = r {
                if e.is_cancelled() {
                    outcome = Err(e);
                } else {
                    run.result
                        .errors
                        .push(format!("step `{}` failed: {e}", step.name()));
                }
                break;
            }
        }
        control.progress().set_done(run.result.steps.len() as u64);
        control.progress().finish();
        let mut result = run.result;
        result.duration = started.elapsed();
        let ready = result
            .steps
            .iter()
            .find(|s| s.step == RecoveryStep::ReadinessCheck)
            .is_some_and(|s| s.success);
        result.success = outcome.is_ok() && result.errors.is_empty() && ready;
        if outcome.is_err() {
            result.errors.push("cancelled".into());
        }
        if !result.success
            && let Ok(mut last) = self.last.write()
        {
            *last = Readiness::not_ready(
                result
                    .errors
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "recovery did not finish".into()),
            );
        }
        if let (Some(store), Some(crash)) = (&self.store, result.crash) {
            let notes = serde_json::to_string(&result.steps).unwrap_or_default();
            if let Err(e) = store
                .record_recovery(
                    crash,
                    result.started_at,
                    sanare_core::now(),
                    result.success,
                    &notes,
                )
                .await
            {
                result
                    .warnings
                    .push(format!("could not record the recovery outcome: {e}"));
            }
        }
        if let Some(bus) = &self.events {
            bus.publish(Event::RecoveryCompleted {
                recovery: result.id,
                crash: result.crash,
                success: result.success,
                entries_replayed: result.entries_replayed,
                errors_fixed: result.errors_fixed,
            });
        }
        metrics::histogram!("sanare_recovery_duration_seconds")
            .record(result.duration.as_secs_f64());
        outcome?;
        Ok(result)
    }

    async fn run_step(
        &self,
        step: &RecoveryStep,
        plan: &RecoveryPlan,
        run: &mut Run,
        control: &Control,
    ) -> Result<String> {
        let (child, _) = control.child();
        let unavailable = |what: &str| Error::unavailable(format!("no {what} service configured"));
        match step {
            RecoveryStep::BackupSnapshot => {
                let s = self
                    .snapshots
                    .as_ref()
                    .ok_or_else(|| unavailable("snapshot"))?;
                let mut req = SnapshotRequest::new().label(format!(
                    "pre-recovery {}",
                    plan.crash.map(|c| c.to_string()).unwrap_or_default()
                ));
                req.metadata
                    .insert("sanare.recovery".into(), run.result.id.to_string());
                let info = s.create(req, &child).await?;
                run.result.backup_snapshot = Some(info.id);
                Ok(format!("backup snapshot {}", info.id))
            }
            RecoveryStep::RestoreSnapshot => {
                let s = self
                    .snapshots
                    .as_ref()
                    .ok_or_else(|| unavailable("snapshot"))?;
                let Some(info) = s.latest_good(plan.options.restore_before).await? else {
                    run.result
                        .warnings
                        .push("no good snapshot to restore; replaying the whole journal".into());
                    run.restored_cut = Some(None);
                    return Ok("no snapshot available".into());
                };
                let out = s.restore(RestoreRequest::new(info.id), &child).await?;
                run.result.snapshots_used.push(out.snapshot);
                run.restored_cut = Some(out.journal_cut.clone().or(info.journal_cut));
                let rows: u64 = out.tables.iter().map(|t| t.rows).sum();
                if let Some(bus) = &self.events {
                    bus.publish(Event::RestoreCompleted {
                        snapshot: out.snapshot,
                        tables: out.tables.iter().map(|t| t.table.clone()).collect(),
                        rows,
                    });
                }
                Ok(format!(
                    "restored snapshot {} ({} tables, {rows} rows)",
                    out.snapshot,
                    out.tables.len()
                ))
            }
            RecoveryStep::ReplayJournal => {
                let j = self
                    .journal
                    .as_ref()
                    .ok_or_else(|| unavailable("journal"))?;
                let range = match &run.restored_cut {
                    Some(Some(cut)) => ReplayRange::After(cut.clone()),
                    _ => ReplayRange::All,
                };
                let summary = j.replay(ReplayRequest::new(range), &child).await?;
                run.result.entries_replayed += summary.applied;
                for f in &summary.failures {
                    run.result.warnings.push(format!(
                        "journal entry at {} not applied: {}",
                        f.position, f.reason
                    ));
                }
                Ok(format!(
                    "{} entries applied, {} already applied, {} failed",
                    summary.applied,
                    summary.already_applied,
                    summary.failures.len()
                ))
            }
            RecoveryStep::Validate => {
                let i = self
                    .integrity
                    .as_ref()
                    .ok_or_else(|| unavailable("integrity"))?;
                let summary = i.validate(ValidationScope::all(), &child).await?;
                run.last_check = Some(summary.check);
                run.last_clean = Some(summary.is_clean());
                Ok(format!(
                    "{} tables, {} rows checked, {} violations",
                    summary.tables_checked,
                    summary.rows_checked,
                    summary.total_violations()
                ))
            }
            RecoveryStep::Repair => {
                let i = self
                    .integrity
                    .as_ref()
                    .ok_or_else(|| unavailable("integrity"))?;
                let r = self.repair.as_ref().ok_or_else(|| unavailable("repair"))?;
                if run.last_clean == Some(true) {
                    return Ok("nothing to repair".into());
                }
                let check = match run.last_check {
                    Some(c) => c,
                    None => {
                        let s = i.validate(ValidationScope::all(), &child).await?;
                        s.check
                    }
                };
                let policy = RepairPolicy::new(plan.options.approver.clone())
                    .auto_approve(plan.options.auto_approve)
                    .dry_run_first(false);
                let done = r.repair_all(i.violations(check), &policy, &child).await?;
                if done.violations_read == 0 {
                    return Ok("nothing to repair".into());
                }
                for id in &done.awaiting_approval {
                    run.result
                        .warnings
                        .push(format!("repair {id} needs approval and was not run"));
                }
                for (id, why) in &done.not_completed {
                    run.result
                        .warnings
                        .push(format!("repair {id} did not complete: {why}"));
                }
                let fixed = done.violations_fixed;
                let skipped = done.awaiting_approval.len();
                run.result.errors_fixed += fixed;
                let after = i.validate(ValidationScope::all(), &child).await?;
                run.last_check = Some(after.check);
                run.last_clean = Some(after.is_clean());
                if !after.is_clean() {
                    run.result.warnings.push(format!(
                        "{} violations remain after repair",
                        after.total_violations()
                    ));
                }
                Ok(format!(
                    "{fixed} violations repaired, {skipped} repairs awaiting approval, {} remain",
                    after.total_violations()
                ))
            }
            RecoveryStep::ReadinessCheck => {
                let r = self.check_readiness().await?;
                if r.ready {
                    Ok(r.detail)
                } else {
                    Err(Error::unavailable(format!("not ready: {}", r.detail)))
                }
            }
        }
    }
}
