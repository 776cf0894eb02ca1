//! Recovery orchestration through the core traits, with in-crate fakes that record
//! their calls and return realistic results.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures_util::TryStreamExt as _;
use sanare_core::{
    BoxStream, CheckId, Control, CrashKind, Error, Event, EventBus, ExecuteOptions,
    IntegrityService, JournalCut, JournalPosition, JournalService, RepairId, RepairOutcome,
    RepairPlan, RepairPolicy, RepairRunSummary, RepairService, ReplayRange, ReplayRequest,
    ReplaySummary, RestoreOutcome, RestoreRequest, Result, Severity, SnapshotId, SnapshotInfo,
    SnapshotRequest, SnapshotService, TableRef, ValidationScope, ValidationSummary, VerifyReport,
    Violation, ViolationKind,
};
use sanare_recovery::{
    CrashDetector, CrashRecord, Readiness, ReadinessCheck, Recovery, RecoveryOption,
    RecoveryOptions, RecoveryStep,
};
use serde_json::json;
use time::OffsetDateTime;

type Log = Arc<Mutex<Vec<String>>>;

fn log(l: &Log, s: impl Into<String>) {
    l.lock().unwrap().push(s.into());
}

fn table() -> TableRef {
    TableRef::new("public", "orders")
}

/// A snapshot store with one good snapshot whose cut is at journal position 100.
struct FakeSnapshots {
    log: Log,
    snapshot: SnapshotId,
    has_snapshot: bool,
}

fn info(id: SnapshotId) -> SnapshotInfo {
    serde_json::from_value(json!({
        "id": id, "created_at": "2026-11-23T09:00:00Z", "status": "ready", "label": null,
        "base": null, "journal_cut": {"position": 100, "db_snapshot": null},
        "tables": [{"table": {"schema": "public", "name": "orders"}, "rows": 5000}],
        "size_bytes": 1_000_000, "stored_bytes": 400_000, "metadata": {}
    }))
    .unwrap()
}

#[async_trait]
impl SnapshotService for FakeSnapshots {
    async fn create(&self, request: SnapshotRequest, control: &Control) -> Result<SnapshotInfo> {
        control.checkpoint()?;
        log(&self.log, format!("snapshot.create {:?}", request.label));
        Ok(info(SnapshotId::new()))
    }
    async fn latest_good(&self, before: Option<OffsetDateTime>) -> Result<Option<SnapshotInfo>> {
        log(&self.log, format!("snapshot.latest_good {before:?}"));
        Ok(self.has_snapshot.then(|| info(self.snapshot)))
    }
    async fn restore(&self, request: RestoreRequest, control: &Control) -> Result<RestoreOutcome> {
        control.checkpoint()?;
        log(&self.log, format!("snapshot.restore {}", request.snapshot));
        Ok(serde_json::from_value(json!({
            "snapshot": request.snapshot,
            "tables": [{"table": {"schema": "public", "name": "orders"}, "rows": 5000}],
            "journal_cut": {"position": 100, "db_snapshot": null}
        }))
        .unwrap())
    }
    async fn fetch_rows(
        &self,
        _: SnapshotId,
        _: &[sanare_core::RowRef],
    ) -> Result<Vec<sanare_core::RowImage>> {
        Ok(Vec::new())
    }
    async fn verify(&self, snapshot: SnapshotId, _: &Control) -> Result<VerifyReport> {
        Ok(serde_json::from_value(json!({
            "snapshot": snapshot, "blocks_checked": 1, "blocks_missing": 0,
            "blocks_corrupt": 0, "problems": []
        }))
        .unwrap())
    }
}

/// A journal with entries 1..=head, of which those at or below `applied` already ran.
struct FakeJournal {
    log: Log,
    head: u64,
    applied: Mutex<u64>,
    cancel_on_replay: Option<sanare_core::CancellationToken>,
}

#[async_trait]
impl JournalService for FakeJournal {
    async fn head(&self) -> Result<JournalPosition> {
        Ok(JournalPosition(self.head))
    }
    async fn cut(&self, db_snapshot: Option<&str>) -> Result<JournalCut> {
        Ok(JournalCut {
            position: JournalPosition(self.head),
            db_snapshot: db_snapshot.map(str::to_owned),
        })
    }
    async fn replay(&self, request: ReplayRequest, control: &Control) -> Result<ReplaySummary> {
        if let Some(t) = &self.cancel_on_replay {
            t.cancel();
        }
        control.checkpoint()?;
        let from = match &request.range {
            ReplayRange::All => 0,
            ReplayRange::After(cut) => cut.position.0,
            other => panic!("unexpected range {other:?}"),
        };
        log(&self.log, format!("journal.replay after {from}"));
        let mut applied = self.applied.lock().unwrap();
        let mut s = ReplaySummary::default();
        s.entries_seen = self.head - from;
        s.already_applied = applied.saturating_sub(from);
        s.applied = self.head - from.max(*applied);
        s.last_position = Some(JournalPosition(self.head));
        *applied = self.head;
        Ok(s)
    }
}

/// Finds `violations` violations on the first run, none after a repair.
struct FakeIntegrity {
    log: Log,
    violations: Mutex<u64>,
}

fn summary(check: CheckId, n: u64) -> ValidationSummary {
    serde_json::from_value(json!({
        "check": check, "started_at": "2026-11-23T09:00:00Z",
        "duration": {"secs": 0, "nanos": 1000}, "tables_checked": 5, "rows_checked": 10_000,
        "violations_by_severity": if n > 0 { json!({"high": n}) } else { json!({}) }
    }))
    .unwrap()
}

#[async_trait]
impl IntegrityService for FakeIntegrity {
    async fn validate(&self, _: ValidationScope, control: &Control) -> Result<ValidationSummary> {
        control.checkpoint()?;
        let n = *self.violations.lock().unwrap();
        log(&self.log, format!("integrity.validate -> {n}"));
        Ok(summary(CheckId::new(), n))
    }
    fn violations(&self, _: CheckId) -> BoxStream<'_, Result<Violation>> {
        let n = *self.violations.lock().unwrap();
        let v: Vec<Result<Violation>> = (0..n)
            .map(|i| {
                Ok(Violation::new(
                    ViolationKind::NullConstraint {
                        column: "customer_id".into(),
                    },
                    if i == 0 {
                        Severity::Critical
                    } else {
                        Severity::High
                    },
                    table(),
                    None,
                    "customer_id is null",
                ))
            })
            .collect();
        Box::pin(futures_util::stream::iter(v))
    }
    async fn recheck(&self, _: &Violation) -> Result<bool> {
        Ok(true)
    }
}

/// Plans one repair per violation; the critical one needs approval.
struct FakeRepair {
    log: Log,
    integrity: Arc<FakeIntegrity>,
    plans: Mutex<Vec<RepairPlan>>,
}

#[async_trait]
impl RepairService for FakeRepair {
    async fn plan(&self, violations: &[Violation]) -> Result<Vec<RepairPlan>> {
        log(&self.log, format!("repair.plan {}", violations.len()));
        let plans: Vec<RepairPlan> = violations
            .iter()
            .map(|v| {
                serde_json::from_value(json!({
                    "id": RepairId::new(), "violations": [v.id], "table": v.table,
                    "strategy": "update_invalid_data", "severity": v.severity,
                    "estimated_rows": 1, "requires_approval": v.severity == Severity::Critical,
                    "approved_by": null, "preconditions": [], "postconditions": [],
                    "rollback_plan": "re-apply before-image", "description": "set default",
                    "status": if v.severity == Severity::Critical { "awaiting_approval" } else { "pending" }
                }))
                .unwrap()
            })
            .collect();
        *self.plans.lock().unwrap() = plans.clone();
        Ok(plans)
    }
    async fn approve(&self, repair: RepairId, approver: &str) -> Result<RepairPlan> {
        log(&self.log, format!("repair.approve by {approver}"));
        let mut plans = self.plans.lock().unwrap();
        let p = plans.iter_mut().find(|p| p.id == repair).unwrap();
        p.approved_by = Some(approver.to_owned());
        Ok(p.clone())
    }
    async fn execute(
        &self,
        repair: RepairId,
        _: ExecuteOptions,
        _: &Control,
    ) -> Result<RepairOutcome> {
        let plan = self
            .plans
            .lock()
            .unwrap()
            .iter()
            .find(|p| p.id == repair)
            .cloned()
            .unwrap();
        if plan.requires_approval && plan.approved_by.is_none() {
            return Err(Error::ApprovalRequired("critical".into()));
        }
        log(&self.log, "repair.execute");
        let mut left = self.integrity.violations.lock().unwrap();
        *left = left.saturating_sub(1);
        Ok(serde_json::from_value(json!({
            "repair": repair, "status": "completed", "dry_run": false, "rows_affected": 1,
            "rows": [], "duration": {"secs": 0, "nanos": 5}, "message": null
        }))
        .unwrap())
    }
    async fn rollback(&self, _: RepairId, _: &Control) -> Result<RepairOutcome> {
        Err(Error::unavailable("not in this fake"))
    }
    async fn repair_all(
        &self,
        violations: BoxStream<'_, Result<Violation>>,
        policy: &RepairPolicy,
        control: &Control,
    ) -> Result<RepairRunSummary> {
        // The fake plans and runs one repair per violation, approving by policy.
        let violations: Vec<Violation> = violations.try_collect().await?;
        let mut summary = RepairRunSummary::default();
        summary.violations_read = violations.len() as u64;
        for plan in self.plan(&violations).await? {
            if plan.requires_approval {
                if !policy.auto_approve {
                    summary.awaiting_approval.push(plan.id);
                    continue;
                }
                self.approve(plan.id, &policy.actor).await?;
            }
            let out = self
                .execute(plan.id, ExecuteOptions::new(), control)
                .await?;
            summary.completed += 1;
            summary.violations_fixed += 1;
            summary.rows_changed += out.rows_affected;
        }
        Ok(summary)
    }
}

struct Ready(bool);

#[async_trait]
impl ReadinessCheck for Ready {
    async fn check(&self) -> Result<Readiness> {
        Ok(if self.0 {
            Readiness::ready("orders API answers")
        } else {
            Readiness::not_ready("orders API down")
        })
    }
}

struct World {
    log: Log,
    recovery: Recovery,
    bus: EventBus,
    journal: Arc<FakeJournal>,
}

fn world(violations: u64, ready: bool, cancel: Option<sanare_core::CancellationToken>) -> World {
    let log: Log = Arc::default();
    let integrity = Arc::new(FakeIntegrity {
        log: log.clone(),
        violations: Mutex::new(violations),
    });
    let journal = Arc::new(FakeJournal {
        log: log.clone(),
        head: 250,
        applied: Mutex::new(180),
        cancel_on_replay: cancel,
    });
    let bus = EventBus::default();
    let recovery = Recovery::builder()
        .snapshots(Arc::new(FakeSnapshots {
            log: log.clone(),
            snapshot: SnapshotId::new(),
            has_snapshot: true,
        }))
        .journal(journal.clone())
        .integrity(integrity.clone())
        .repair(Arc::new(FakeRepair {
            log: log.clone(),
            integrity,
            plans: Mutex::new(Vec::new()),
        }))
        .readiness(Arc::new(Ready(ready)))
        .events(bus.clone())
        .build();
    World {
        log,
        recovery,
        bus,
        journal,
    }
}

/// A real crash record, from a detector on a data folder whose marker says "running".
fn crash(kind_boot_changed: bool) -> CrashRecord {
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("boot");
    std::fs::write(&boot, "a").unwrap();
    let d = CrashDetector::builder()
        .data_dir(dir.path())
        .boot_id_path(&boot)
        .build()
        .unwrap();
    d.mark_running().unwrap();
    if kind_boot_changed {
        std::fs::write(&boot, "b").unwrap();
    }
    d.detect_previous_run().unwrap().crash.unwrap()
}

#[tokio::test]
async fn power_failure_restores_replays_from_the_cut_validates_repairs_and_is_ready() {
    let w = world(3, true, None);
    let c = crash(true);
    assert_eq!(c.kind, CrashKind::PowerFailure);
    let plan = w.recovery.plan(
        Some(&c),
        RecoveryOptions::new(RecoveryOption::Auto)
            .backup_first(true)
            .auto_approve(true),
    );
    assert_eq!(
        plan.steps,
        vec![
            RecoveryStep::BackupSnapshot,
            RecoveryStep::RestoreSnapshot,
            RecoveryStep::ReplayJournal,
            RecoveryStep::Validate,
            RecoveryStep::Repair,
            RecoveryStep::ReadinessCheck
        ]
    );
    let mut sub = w.bus.subscribe();
    let (control, progress) = Control::new();
    let r = w.recovery.recover(&plan, &control).await.unwrap();
    assert!(r.success, "{r:#?}");
    assert!(r.backup_snapshot.is_some());
    assert_eq!(r.snapshots_used.len(), 1);
    // restored to cut 100: entries 101..=250 replay (the fake counts those above
    // its applied mark of 180 as new, the journal's exactly-once contract).
    assert_eq!(r.entries_replayed, 70);
    assert_eq!(r.errors_fixed, 3);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let calls = w.log.lock().unwrap().clone();
    assert!(calls[0].starts_with("snapshot.create Some(\"pre-recovery"));
    assert!(calls.contains(&"journal.replay after 100".to_owned()));
    assert_eq!(calls.iter().filter(|c| *c == "repair.execute").count(), 3);
    assert_eq!(calls.last().unwrap(), "integrity.validate -> 0");
    let p = progress.get();
    assert!(p.finished);
    assert_eq!(p.done, 6);
    assert!(w.recovery.readiness().ready);
    // RestoreCompleted, then RecoveryCompleted
    let mut names = Vec::new();
    while let Some(e) = sub.try_recv() {
        names.push(e.event.name());
        if let Event::RecoveryCompleted {
            success,
            entries_replayed,
            errors_fixed,
            crash: Some(id),
            ..
        } = e.event
        {
            assert!(success);
            assert_eq!((entries_replayed, errors_fixed), (70, 3));
            assert_eq!(id, c.id);
        }
    }
    assert_eq!(names, ["restore_completed", "recovery_completed"]);
}

#[tokio::test]
async fn application_crash_replays_unapplied_entries_once_and_leaves_unapproved_repairs() {
    let w = world(2, true, None);
    let c = crash(false);
    assert_eq!(c.kind, CrashKind::ApplicationCrash);
    let plan = w.recovery.plan(Some(&c), RecoveryOptions::default());
    assert_eq!(plan.steps[0], RecoveryStep::ReplayJournal);
    assert!(!plan.steps.contains(&RecoveryStep::RestoreSnapshot));
    let r = w
        .recovery
        .recover(&plan, &Control::detached())
        .await
        .unwrap();
    assert_eq!(r.entries_replayed, 70);
    // the critical repair needs approval: 1 fixed, 1 left with a warning
    assert_eq!(r.errors_fixed, 1);
    assert!(r.warnings.iter().any(|w| w.contains("needs approval")));
    assert!(r.warnings.iter().any(|w| w.contains("1 violations remain")));
    assert!(r.success, "ready even with a remaining violation");
    // A second recovery replays nothing: the journal is exactly-once.
    let again = w
        .recovery
        .recover(&plan, &Control::detached())
        .await
        .unwrap();
    assert_eq!(again.entries_replayed, 0);
    assert_eq!(*w.journal.applied.lock().unwrap(), 250);
}

#[tokio::test]
async fn options_choose_steps_and_missing_services_are_left_out_with_a_note() {
    let w = world(0, true, None);
    let s = |o| w.recovery.plan(None, RecoveryOptions::new(o)).steps;
    assert_eq!(
        s(RecoveryOption::ReplayJournal),
        [
            RecoveryStep::ReplayJournal,
            RecoveryStep::Validate,
            RecoveryStep::ReadinessCheck
        ]
    );
    assert_eq!(
        s(RecoveryOption::RepairOnly),
        [
            RecoveryStep::Validate,
            RecoveryStep::Repair,
            RecoveryStep::ReadinessCheck
        ]
    );
    assert_eq!(
        s(RecoveryOption::RestoreLatestSnapshot)[0],
        RecoveryStep::RestoreSnapshot
    );
    assert_eq!(
        s(RecoveryOption::Auto),
        [RecoveryStep::Validate, RecoveryStep::ReadinessCheck]
    );
    let manual = w
        .recovery
        .plan(None, RecoveryOptions::new(RecoveryOption::Manual));
    assert!(matches!(
        w.recovery.recover(&manual, &Control::detached()).await,
        Err(Error::Conflict(_))
    ));

    let bare = Recovery::builder().build();
    let plan = bare.plan(Some(&crash(true)), RecoveryOptions::default());
    assert_eq!(plan.steps, [RecoveryStep::ReadinessCheck]);
    assert_eq!(
        plan.notes.iter().filter(|n| n.contains("left out")).count(),
        4
    );
    let r = bare.recover(&plan, &Control::detached()).await.unwrap();
    assert!(r.success);
    assert_eq!(r.warnings.len(), 4);
}

#[tokio::test]
async fn cancellation_stops_between_steps_and_reports_not_ready() {
    let (control, _) = Control::new();
    let w = world(1, true, Some(control.cancel_token().clone()));
    let plan = w
        .recovery
        .plan(Some(&crash(false)), RecoveryOptions::default());
    let mut sub = w.bus.subscribe();
    let err = w.recovery.recover(&plan, &control).await.unwrap_err();
    assert!(err.is_cancelled());
    assert!(
        !w.log
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.starts_with("integrity"))
    );
    assert!(!w.recovery.readiness().ready);
    match sub.try_recv().map(|e| e.event) {
        Some(Event::RecoveryCompleted { success, .. }) => assert!(!success),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_failing_readiness_check_fails_the_recovery() {
    let w = world(0, false, None);
    let plan = w.recovery.plan(None, RecoveryOptions::default());
    let r = w
        .recovery
        .recover(&plan, &Control::detached())
        .await
        .unwrap();
    assert!(!r.success);
    assert!(r.errors[0].contains("orders API down"));
    assert!(!w.recovery.readiness().ready);
    assert!(!w.recovery.check_readiness().await.unwrap().ready);
}
