//! Recovery orchestration through the core traits, with in-crate fakes that record
//! their calls and return realistic results.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures_util::TryStreamExt as _;
use sanare_core::{
    BoxStream, CheckId, ColumnValue, Control, CorruptionKind, CorruptionScanSummary,
    CorruptionScope, CorruptionService, CrashKind, Error, Event, EventBus, ExecuteOptions,
    IntegrityService, JournalCut, JournalPosition, JournalService, RepairId, RepairOutcome,
    RepairPlan, RepairPolicy, RepairRunSummary, RepairService, ReplayRange, ReplayRequest,
    ReplaySummary, RestoreOutcome, RestoreRequest, Result, RowRef, Severity, SnapshotId,
    SnapshotInfo, SnapshotRequest, SnapshotService, TableRef, ValidationScope, ValidationSummary,
    VerifyReport, Violation, ViolationKind,
};
use sanare_recovery::{
    CrashDetector, CrashRecord, CrashStore, Readiness, ReadinessCheck, Recovery, RecoveryOption,
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

fn customers() -> TableRef {
    TableRef::new("public", "customers")
}

fn names(tables: &[TableRef]) -> String {
    tables
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A snapshot store with one good snapshot (orders and customers) whose cut is at
/// journal position 100. Logs the tables each capture and restore covers.
struct FakeSnapshots {
    log: Log,
    snapshot: SnapshotId,
    has_snapshot: bool,
    fail_create: bool,
}

fn info(id: SnapshotId) -> SnapshotInfo {
    serde_json::from_value(json!({
        "id": id, "created_at": "2026-11-23T09:00:00Z", "status": "ready", "label": null,
        "base": null, "journal_cut": {"position": 100, "db_snapshot": null},
        "tables": [{"table": {"schema": "public", "name": "orders"}, "rows": 5000},
                   {"table": {"schema": "public", "name": "customers"}, "rows": 500}],
        "size_bytes": 1_000_000, "stored_bytes": 400_000, "metadata": {}
    }))
    .unwrap()
}

#[async_trait]
impl SnapshotService for FakeSnapshots {
    async fn create(&self, request: SnapshotRequest, control: &Control) -> Result<SnapshotInfo> {
        control.checkpoint()?;
        if self.fail_create {
            return Err(Error::unavailable("the block store is full"));
        }
        let id = SnapshotId::new();
        log(
            &self.log,
            format!("snapshot.create [{}] -> {id}", names(&request.tables)),
        );
        Ok(info(id))
    }
    async fn latest_good(&self, before: Option<OffsetDateTime>) -> Result<Option<SnapshotInfo>> {
        log(&self.log, format!("snapshot.latest_good {before:?}"));
        Ok(self.has_snapshot.then(|| info(self.snapshot)))
    }
    async fn restore(&self, request: RestoreRequest, control: &Control) -> Result<RestoreOutcome> {
        control.checkpoint()?;
        let tables = if request.tables.is_empty() {
            vec![table(), customers()]
        } else {
            request.tables.clone()
        };
        log(
            &self.log,
            format!("snapshot.restore {} [{}]", request.snapshot, names(&tables)),
        );
        let tables: Vec<_> = tables
            .iter()
            .map(|t| json!({"table": t, "rows": 10}))
            .collect();
        Ok(serde_json::from_value(json!({
            "snapshot": request.snapshot,
            "tables": tables,
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

/// Finds `violations` violations on the first run, none after a repair. With
/// `hang`, a validation runs until it is cancelled.
struct FakeIntegrity {
    log: Log,
    violations: Mutex<u64>,
    hang: bool,
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
        if self.hang {
            log(&self.log, "integrity.validate (until cancelled)");
            control.cancel_token().cancelled().await;
            return Err(Error::Cancelled);
        }
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
        log(&self.log, format!("repair.execute {}", plan.table));
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
            summary.planned += 1;
            if policy.dry_run_only {
                continue;
            }
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

/// A corruption scan that finds what it is told to.
struct FakeCorruption {
    log: Log,
    findings: Vec<Violation>,
}

/// A table whose pages do not read: no row repair covers it.
fn unreadable(t: TableRef) -> Violation {
    Violation::new(
        ViolationKind::Corruption {
            kind: CorruptionKind::Metadata,
            column: None,
            index: None,
        },
        Severity::Critical,
        t,
        None,
        "reading blocks 0..end failed: invalid page in block 3",
    )
}

/// One row with a flipped bit.
fn bit_flip(id: &str) -> Violation {
    Violation::new(
        ViolationKind::Corruption {
            kind: CorruptionKind::BitFlip,
            column: Some("amount".into()),
            index: None,
        },
        Severity::High,
        table(),
        Some(RowRef::new(
            table(),
            vec![ColumnValue::new("id", "bigint", Some(id))],
        )),
        "one bit of amount flipped",
    )
}

#[async_trait]
impl CorruptionService for FakeCorruption {
    async fn scan(
        &self,
        scope: &CorruptionScope,
        control: &Control,
    ) -> Result<CorruptionScanSummary> {
        control.checkpoint()?;
        log(
            &self.log,
            format!("corruption.scan physical={}", scope.physical),
        );
        let mut s = CorruptionScanSummary::default();
        s.tables_scanned = vec![table(), customers()];
        s.rows_scanned = 5500;
        s.findings = self.findings.clone();
        Ok(s)
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

#[derive(Default)]
struct Setup {
    violations: u64,
    not_ready: bool,
    cancel: Option<sanare_core::CancellationToken>,
    findings: Vec<Violation>,
    fail_create: bool,
    hang: bool,
    store: Option<CrashStore>,
}

fn world(violations: u64, ready: bool, cancel: Option<sanare_core::CancellationToken>) -> World {
    build(Setup {
        violations,
        not_ready: !ready,
        cancel,
        ..Setup::default()
    })
}

fn build(setup: Setup) -> World {
    let log: Log = Arc::default();
    let integrity = Arc::new(FakeIntegrity {
        log: log.clone(),
        violations: Mutex::new(setup.violations),
        hang: setup.hang,
    });
    let journal = Arc::new(FakeJournal {
        log: log.clone(),
        head: 250,
        applied: Mutex::new(180),
        cancel_on_replay: setup.cancel,
    });
    let bus = EventBus::default();
    let mut recovery = Recovery::builder()
        .snapshots(Arc::new(FakeSnapshots {
            log: log.clone(),
            snapshot: SnapshotId::new(),
            has_snapshot: true,
            fail_create: setup.fail_create,
        }))
        .journal(journal.clone())
        .integrity(integrity.clone())
        .corruption(Arc::new(FakeCorruption {
            log: log.clone(),
            findings: setup.findings,
        }))
        .repair(Arc::new(FakeRepair {
            log: log.clone(),
            integrity,
            plans: Mutex::new(Vec::new()),
        }))
        .readiness(Arc::new(Ready(!setup.not_ready)))
        .events(bus.clone());
    if let Some(store) = setup.store {
        recovery = recovery.crash_store(store);
    }
    World {
        log,
        recovery: recovery.build(),
        bus,
        journal,
    }
}

fn log_of(w: &World) -> Vec<String> {
    w.log.lock().unwrap().clone()
}

fn touched_data(calls: &[String]) -> Vec<&String> {
    calls
        .iter()
        .filter(|c| c.starts_with("snapshot.restore") || c.starts_with("repair.execute"))
        .collect()
}

/// A real crash record, from a detector on a data folder whose marker says "running".
fn crash(kind_boot_changed: bool) -> CrashRecord {
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("boot");
    std::fs::write(&boot, "a").unwrap();
    {
        let d = CrashDetector::builder()
            .data_dir(dir.path())
            .boot_id_path(&boot)
            .build()
            .unwrap();
        d.mark_running().unwrap();
    }
    if kind_boot_changed {
        std::fs::write(&boot, "b").unwrap();
    }
    CrashDetector::builder()
        .data_dir(dir.path())
        .boot_id_path(&boot)
        .read_only()
        .build()
        .unwrap()
        .detect_previous_run()
        .unwrap()
        .crash
        .unwrap()
}

const EVIDENCE: [RecoveryStep; 6] = [
    RecoveryStep::ReplayJournal,
    RecoveryStep::Validate,
    RecoveryStep::ScanCorruption,
    RecoveryStep::Repair,
    RecoveryStep::RestoreDamagedTables,
    RecoveryStep::ReadinessCheck,
];

#[tokio::test]
async fn a_power_failure_is_recovered_by_evidence_and_restores_nothing_over_committed_data() {
    let w = world(3, true, None);
    let c = crash(true);
    assert_eq!(c.kind, CrashKind::PowerFailure);
    let plan = w.recovery.plan(
        Some(&c),
        RecoveryOptions::new(RecoveryOption::Auto).auto_approve(true),
    );
    assert_eq!(plan.steps, EVIDENCE);
    assert!(
        plan.physical_checks,
        "the host went down: pages are verified"
    );
    let mut sub = w.bus.subscribe();
    let (control, progress) = Control::new();
    let r = w.recovery.recover(&plan, &control).await.unwrap();
    assert!(r.success, "{r:#?}");
    assert!(r.backup_snapshot.is_none());
    assert!(r.snapshots_used.is_empty() && r.tables_restored.is_empty());
    // Every entry not yet applied (181..=250), once.
    assert_eq!(r.entries_replayed, 70);
    assert_eq!(r.findings, 3);
    assert_eq!(r.errors_fixed, 3);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let calls = log_of(&w);
    assert!(
        !calls.iter().any(|c| c.starts_with("snapshot.")),
        "no snapshot is read or restored: {calls:?}"
    );
    assert!(calls.contains(&"journal.replay after 0".to_owned()));
    assert!(calls.contains(&"corruption.scan physical=true".to_owned()));
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.starts_with("repair.execute"))
            .count(),
        3
    );
    assert_eq!(calls.last().unwrap(), "integrity.validate -> 0");
    let p = progress.get();
    assert!(p.finished);
    assert_eq!(p.done, 6);
    assert!(w.recovery.readiness().ready);
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
    assert_eq!(names, ["recovery_completed"]);
}

#[tokio::test]
async fn application_crash_replays_unapplied_entries_once_and_leaves_unapproved_repairs() {
    let w = world(2, true, None);
    let c = crash(false);
    assert_eq!(c.kind, CrashKind::ApplicationCrash);
    let plan = w.recovery.plan(Some(&c), RecoveryOptions::default());
    assert_eq!(plan.steps, EVIDENCE);
    assert!(!plan.physical_checks, "PostgreSQL did not go down");
    let r = w
        .recovery
        .recover(&plan, &Control::detached())
        .await
        .unwrap();
    assert_eq!(r.entries_replayed, 70);
    assert!(log_of(&w).contains(&"corruption.scan physical=false".to_owned()));
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
async fn with_repairs_off_findings_are_planned_and_nothing_changes() {
    let w = build(Setup {
        violations: 2,
        findings: vec![bit_flip("7")],
        ..Setup::default()
    });
    let plan = w.recovery.plan(
        Some(&crash(true)),
        RecoveryOptions::default()
            .execute_repairs(false)
            .auto_approve(true),
    );
    let r = w
        .recovery
        .recover(&plan, &Control::detached())
        .await
        .unwrap();
    assert!(r.success, "{r:#?}");
    assert_eq!(r.findings, 3);
    assert_eq!(r.errors_fixed, 0);
    let calls = log_of(&w);
    assert!(calls.contains(&"repair.plan 3".to_owned()), "{calls:?}");
    assert!(touched_data(&calls).is_empty(), "{calls:?}");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("3 repairs were planned and not run")),
        "{:?}",
        r.warnings
    );
}

#[tokio::test]
async fn only_a_table_beyond_row_repair_is_restored_after_a_backup_and_undo_returns_it() {
    let db = sanare_testing::test_db().await;
    let schema = sanare_pg::SchemaName::default_schema();
    sanare_recovery::migrate(&mut db.connect().await, &schema)
        .await
        .unwrap();
    let store = CrashStore::new(db.pool().clone(), schema);
    let w = build(Setup {
        findings: vec![unreadable(table()), bit_flip("7")],
        store: Some(store.clone()),
        ..Setup::default()
    });
    let c = crash(true);
    store.record(&c).await.unwrap();
    let plan = w.recovery.plan(Some(&c), RecoveryOptions::default());
    let r = w
        .recovery
        .recover(&plan, &Control::detached())
        .await
        .unwrap();
    assert!(r.success, "{r:#?}");
    assert_eq!(r.tables_restored, vec![table()], "customers is left alone");
    assert_eq!(
        store.get(c.id).await.unwrap().recovery_successful,
        Some(true)
    );
    let backup = r.backup_snapshot.expect("a backup before the restore");
    let calls = log_of(&w);
    let create = calls
        .iter()
        .position(|c| c.starts_with("snapshot.create [public.orders] -> "))
        .expect("the damaged table is backed up");
    let restore = calls
        .iter()
        .position(|c| c.starts_with("snapshot.restore") && c.ends_with("[public.orders]"))
        .expect("and then restored");
    assert!(create < restore, "{calls:?}");
    assert!(calls[create].ends_with(&backup.to_string()));
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.starts_with("snapshot.restore"))
            .count(),
        1
    );
    assert!(
        calls[restore..].contains(&"journal.replay after 100".to_owned()),
        "the journal is replayed into it from the snapshot's cut: {calls:?}"
    );
    // The bit flip went to the repair engine, row by row.
    assert!(calls.contains(&"repair.execute public.orders".to_owned()));
    assert!(r.warnings.iter().any(|w| w.contains("--undo")));
    let stored = store.recovery(r.id).await.unwrap();
    assert_eq!(stored.result, r);

    // Undo: the current state is backed up, then the first backup restored.
    w.log.lock().unwrap().clear();
    let undo = w.recovery.undo(r.id, &Control::detached()).await.unwrap();
    assert!(undo.success, "{undo:#?}");
    assert_eq!(undo.undoes, Some(r.id));
    assert_eq!(undo.tables_restored, vec![table()]);
    let calls = log_of(&w);
    assert!(
        calls[0].starts_with("snapshot.create [public.orders]"),
        "{calls:?}"
    );
    assert_eq!(
        calls[1],
        format!("snapshot.restore {backup} [public.orders]")
    );
    assert_eq!(store.recovery(r.id).await.unwrap().undone_by, Some(undo.id));
    let again = w
        .recovery
        .undo(r.id, &Control::detached())
        .await
        .unwrap_err();
    assert!(matches!(again, Error::Conflict(_)), "{again}");
    // A recovery that restored nothing has nothing to undo.
    let plain = w
        .recovery
        .recover(
            &w.recovery
                .plan(None, RecoveryOptions::new(RecoveryOption::Startup)),
            &Control::detached(),
        )
        .await
        .unwrap();
    let err = w
        .recovery
        .undo(plain.id, &Control::detached())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("rollback"), "{err}");
}

#[tokio::test]
async fn a_table_that_cannot_be_backed_up_is_not_restored() {
    let w = build(Setup {
        findings: vec![unreadable(table())],
        fail_create: true,
        ..Setup::default()
    });
    let plan = w
        .recovery
        .plan(Some(&crash(true)), RecoveryOptions::default());
    let r = w
        .recovery
        .recover(&plan, &Control::detached())
        .await
        .unwrap();
    assert!(!r.success);
    assert!(
        r.errors[0].contains("nothing was restored") && r.errors[0].contains("block store is full"),
        "{:?}",
        r.errors
    );
    assert!(touched_data(&log_of(&w)).is_empty());
    assert!(r.tables_restored.is_empty());
    assert!(!w.recovery.readiness().ready);
}

#[tokio::test]
async fn the_operators_restore_backs_up_what_it_replaces_then_replays_from_the_cut() {
    let w = world(0, true, None);
    let plan = w.recovery.plan(
        Some(&crash(false)),
        RecoveryOptions::new(RecoveryOption::RestoreLatestSnapshot),
    );
    assert_eq!(
        plan.steps,
        [
            RecoveryStep::RestoreSnapshot,
            RecoveryStep::ReplayJournal,
            RecoveryStep::Validate,
            RecoveryStep::ReadinessCheck
        ]
    );
    let r = w
        .recovery
        .recover(&plan, &Control::detached())
        .await
        .unwrap();
    assert!(r.success, "{r:#?}");
    let calls = log_of(&w);
    assert!(
        calls[1].starts_with("snapshot.create [public.orders,public.customers]"),
        "{calls:?}"
    );
    assert!(calls[2].starts_with("snapshot.restore"));
    assert!(calls.contains(&"journal.replay after 100".to_owned()));
    assert_eq!(r.tables_restored, vec![table(), customers()]);
    assert!(r.backup_snapshot.is_some());
}

#[tokio::test]
async fn checks_stop_at_the_time_target_and_the_recovery_goes_on() {
    let w = build(Setup {
        hang: true,
        ..Setup::default()
    });
    let plan = w.recovery.plan(
        Some(&crash(false)),
        RecoveryOptions::default().time_target(std::time::Duration::from_millis(300)),
    );
    let r = w
        .recovery
        .recover(&plan, &Control::detached())
        .await
        .unwrap();
    assert!(r.success, "{r:#?}");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("validation stopped at the recovery time target")),
        "{:?}",
        r.warnings
    );
    // Past the target, the scan does not start; replay and readiness did run.
    assert!(
        r.steps
            .iter()
            .any(|s| s.step == RecoveryStep::ScanCorruption
                && s.detail.contains("stopped at the recovery time target")),
        "{:?}",
        r.steps
    );
    assert!(!log_of(&w).iter().any(|c| c.starts_with("corruption.scan")));
    assert_eq!(r.entries_replayed, 70);
    // A cancel by the caller is still a cancel.
    let (control, _) = Control::new();
    control.cancel_token().cancel();
    assert!(
        w.recovery
            .recover(&plan, &control)
            .await
            .unwrap_err()
            .is_cancelled()
    );
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
            RecoveryStep::ScanCorruption,
            RecoveryStep::Repair,
            RecoveryStep::ReadinessCheck
        ]
    );
    assert_eq!(
        s(RecoveryOption::Startup),
        [RecoveryStep::ReplayJournal, RecoveryStep::ReadinessCheck]
    );
    assert_eq!(
        s(RecoveryOption::RestoreLatestSnapshot)[0],
        RecoveryStep::RestoreSnapshot
    );
    assert_eq!(s(RecoveryOption::Auto), EVIDENCE);
    assert!(s(RecoveryOption::Undo).is_empty());
    let with_backup = w
        .recovery
        .plan(None, RecoveryOptions::default().backup_first(true));
    assert_eq!(with_backup.steps[0], RecoveryStep::BackupSnapshot);
    for refused in [RecoveryOption::Manual, RecoveryOption::Undo] {
        let plan = w.recovery.plan(None, RecoveryOptions::new(refused));
        assert!(matches!(
            w.recovery.recover(&plan, &Control::detached()).await,
            Err(Error::Conflict(_))
        ));
    }

    let bare = Recovery::builder().build();
    let plan = bare.plan(Some(&crash(true)), RecoveryOptions::default());
    assert_eq!(plan.steps, [RecoveryStep::ReadinessCheck]);
    assert_eq!(
        plan.notes.iter().filter(|n| n.contains("left out")).count(),
        5
    );
    let r = bare.recover(&plan, &Control::detached()).await.unwrap();
    assert!(r.success);
    assert_eq!(r.warnings.len(), 5);
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
    assert!(!log_of(&w).iter().any(|c| c.starts_with("integrity")));
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
