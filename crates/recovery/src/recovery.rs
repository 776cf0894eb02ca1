//! Recovery orchestration (spec §6), by evidence: the crash kind chooses how deep
//! to look, never what to overwrite. Runs through the core service traits with
//! progress, cancellation, a time target, events, a record per run and a
//! readiness check.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use async_trait::async_trait;
use sanare_core::{
    Control, CorruptionService, CrashKind, Error, Event, EventBus, IntegrityService,
    JournalService, RepairService, Result, SnapshotService,
};

use crate::plan::{
    Readiness, RecoveryOption, RecoveryOptions, RecoveryPlan, RecoveryResult, RecoveryStep,
    StepOutcome,
};
use crate::steps::Run;
use crate::store::CrashStore;
use crate::types::CrashRecord;

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
    corruption: Option<Arc<dyn CorruptionService>>,
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

    /// The corruption scanner.
    pub fn corruption(mut self, c: Arc<dyn CorruptionService>) -> Self {
        self.corruption = Some(c);
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

    /// Where recovery records are kept (and outcomes written onto crash records).
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
            services: Arc::new(Services {
                snapshots: self.snapshots,
                journal: self.journal,
                integrity: self.integrity,
                corruption: self.corruption,
                repair: self.repair,
                readiness: self.readiness,
                store: self.store,
                events: self.events,
            }),
            last: Arc::new(RwLock::new(Readiness::not_ready("no recovery has run yet"))),
        }
    }
}

/// The services a recovery runs through.
pub(crate) struct Services {
    pub(crate) snapshots: Option<Arc<dyn SnapshotService>>,
    pub(crate) journal: Option<Arc<dyn JournalService>>,
    pub(crate) integrity: Option<Arc<dyn IntegrityService>>,
    pub(crate) corruption: Option<Arc<dyn CorruptionService>>,
    pub(crate) repair: Option<Arc<dyn RepairService>>,
    pub(crate) readiness: Option<Arc<dyn ReadinessCheck>>,
    pub(crate) store: Option<CrashStore>,
    pub(crate) events: Option<EventBus>,
}

/// Plans and runs recoveries. Cheap to clone.
#[derive(Clone)]
pub struct Recovery {
    pub(crate) services: Arc<Services>,
    last: Arc<RwLock<Readiness>>,
}

impl std::fmt::Debug for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.services;
        f.debug_struct("Recovery")
            .field("snapshots", &s.snapshots.is_some())
            .field("journal", &s.journal.is_some())
            .field("integrity", &s.integrity.is_some())
            .field("corruption", &s.corruption.is_some())
            .field("repair", &s.repair.is_some())
            .finish_non_exhaustive()
    }
}

impl Recovery {
    /// A builder.
    pub fn builder() -> RecoveryBuilder {
        RecoveryBuilder::default()
    }

    /// The plan for `crash` (or for a check with no crash when `None`).
    ///
    /// Auto recovers by evidence, whatever the crash: PostgreSQL's own crash
    /// recovery is the authority on committed data, so nothing is restored over
    /// it because of how the process died. It replays the journal entries not yet
    /// applied, validates and scans for corruption, repairs only what those found,
    /// restores whole tables only where the scan found a table damaged beyond row
    /// repair (after a backup of them), and checks readiness. The crash kind is a
    /// hint for how deep to look: when the host itself went down (power failure,
    /// system crash, unknown end) the scan also verifies pages and indexes.
    pub fn plan(&self, crash: Option<&CrashRecord>, options: RecoveryOptions) -> RecoveryPlan {
        use RecoveryStep::*;
        let kind = crash.map(|c| c.kind);
        let host_went_down = matches!(
            kind,
            Some(CrashKind::PowerFailure | CrashKind::SystemCrash | CrashKind::Unknown)
        );
        let physical_checks = options.physical_checks.unwrap_or(host_went_down);
        let mut notes = Vec::new();
        let evidence = vec![
            ReplayJournal,
            Validate,
            ScanCorruption,
            Repair,
            RestoreDamagedTables,
            ReadinessCheck,
        ];
        let mut steps = match options.option {
            RecoveryOption::Auto => {
                notes.push(
                    "by evidence: committed data stays as PostgreSQL recovered it; only what the checks find damaged is repaired"
                        .into(),
                );
                if options.physical_checks.is_none() {
                    notes.push(if host_went_down {
                        "the host may have gone down: the scan also verifies pages and indexes (amcheck)".into()
                    } else {
                        "PostgreSQL did not go down with the process: the scan checks rows, not pages".into()
                    });
                }
                evidence
            }
            RecoveryOption::RestoreLatestSnapshot => {
                notes.push(
                    "the operator's choice: the current state of the restored tables is backed up first; `sanare recover --undo <id>` returns to it"
                        .into(),
                );
                vec![RestoreSnapshot, ReplayJournal, Validate, ReadinessCheck]
            }
            RecoveryOption::ReplayJournal => vec![ReplayJournal, Validate, ReadinessCheck],
            RecoveryOption::RepairOnly => vec![Validate, ScanCorruption, Repair, ReadinessCheck],
            RecoveryOption::Startup => vec![ReplayJournal, ReadinessCheck],
            RecoveryOption::Manual => {
                notes.push("manual: run the steps yourself; recover() refuses this plan".into());
                evidence
            }
            RecoveryOption::Undo => {
                notes.push("an undo is run with Recovery::undo(<recovery id>)".into());
                Vec::new()
            }
        };
        if options.backup_first && !steps.is_empty() {
            steps.insert(0, BackupSnapshot);
        }
        let s = &self.services;
        steps.retain(|step| {
            let missing = match step {
                BackupSnapshot | RestoreSnapshot => s.snapshots.is_none().then_some("snapshot"),
                ReplayJournal => s.journal.is_none().then_some("journal"),
                Validate => s.integrity.is_none().then_some("integrity"),
                ScanCorruption => s.corruption.is_none().then_some("corruption"),
                Repair => (s.repair.is_none() || (s.integrity.is_none() && s.corruption.is_none()))
                    .then_some("repair, or integrity and corruption"),
                RestoreDamagedTables => (s.snapshots.is_none() || s.corruption.is_none())
                    .then_some("snapshot or corruption"),
                ReadinessCheck => None,
            };
            if let Some(m) = missing {
                notes.push(format!("step `{}` left out: no {m} service", step.name()));
            }
            missing.is_none()
        });
        RecoveryPlan {
            crash: crash.map(|c| c.id),
            crash_kind: kind,
            options,
            steps,
            physical_checks,
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
        let r = match &self.services.readiness {
            Some(check) => check.check().await?,
            None => Readiness::ready("no readiness probe configured"),
        };
        self.set_readiness(r.clone());
        Ok(r)
    }

    pub(crate) fn set_readiness(&self, r: Readiness) {
        if let Ok(mut last) = self.last.write() {
            *last = r;
        }
    }

    /// Runs `plan`. Cancelling through `control` stops between steps (and inside
    /// long steps, which take a child control) and returns
    /// [`Error::Cancelled`]; a step's failure stops the run and is reported in the
    /// result with `success = false`. The run is recorded (`recoveries`, and the
    /// crash record's outcome) when a crash store is configured.
    #[tracing::instrument(skip_all, fields(crash = ?plan.crash))]
    pub async fn recover(&self, plan: &RecoveryPlan, control: &Control) -> Result<RecoveryResult> {
        if matches!(
            plan.options.option,
            RecoveryOption::Manual | RecoveryOption::Undo
        ) {
            return Err(Error::conflict(
                "a manual recovery plan is not run automatically; run its steps yourself",
            ));
        }
        let started = Instant::now();
        let mut run = Run::new(plan, started);
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
                .phase(format!("recovery: {step}"), "steps", Some(total));
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
                    run.result.errors.push(format!("step `{step}` failed: {e}"));
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
        if !result.success {
            self.set_readiness(Readiness::not_ready(
                result
                    .errors
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "recovery did not finish".into()),
            ));
        }
        self.finish(&mut result).await;
        metrics::histogram!("sanare_recovery_duration_seconds")
            .record(result.duration.as_secs_f64());
        outcome?;
        Ok(result)
    }

    /// Records `result` and announces it.
    pub(crate) async fn finish(&self, result: &mut RecoveryResult) {
        if let Some(store) = &self.services.store {
            if let Some(crash) = result.crash {
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
            if let Err(e) = store.record_recovery_run(result).await {
                result
                    .warnings
                    .push(format!("could not save the recovery record: {e}"));
            }
        }
        if let Some(bus) = &self.services.events {
            bus.publish(Event::RecoveryCompleted {
                recovery: result.id,
                crash: result.crash,
                success: result.success,
                entries_replayed: result.entries_replayed,
                errors_fixed: result.errors_fixed,
            });
        }
    }

    async fn run_step(
        &self,
        step: &RecoveryStep,
        plan: &RecoveryPlan,
        run: &mut Run,
        control: &Control,
    ) -> Result<String> {
        let s = &*self.services;
        match step {
            RecoveryStep::BackupSnapshot => run.backup_everything(s, control).await,
            RecoveryStep::RestoreSnapshot => run.restore_latest(s, plan, control).await,
            RecoveryStep::ReplayJournal => run.replay(s, control).await,
            RecoveryStep::Validate => run.validate(s, plan, control).await,
            RecoveryStep::ScanCorruption => run.scan(s, plan, control).await,
            RecoveryStep::Repair => run.repair(s, plan, control).await,
            RecoveryStep::RestoreDamagedTables => run.restore_damaged(s, plan, control).await,
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
