//! The steps of a recovery, each through one core service trait.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use sanare_core::{
    CheckId, Control, CorruptionKind, CorruptionScope, Error, Event, JournalCut, RecoveryId,
    RepairPolicy, ReplayRange, ReplayRequest, RestoreRequest, Result, SnapshotInfo,
    SnapshotRequest, SnapshotService, TableRef, ValidationScope, Violation, ViolationKind,
};

use crate::plan::{RecoveryPlan, RecoveryResult};
use crate::recovery::Services;

/// Mutable state while running a plan.
pub(crate) struct Run {
    pub(crate) result: RecoveryResult,
    started: Instant,
    /// `Some` once a snapshot was restored over every table: replay from its cut.
    restored_cut: Option<Option<JournalCut>>,
    /// Whether a backup of every table was taken first.
    full_backup: bool,
    last_check: Option<CheckId>,
    last_clean: Option<bool>,
    /// Corruption findings on rows, for the repair step.
    row_findings: Vec<Violation>,
    /// Tables the scan found damaged beyond row repair.
    beyond_repair: BTreeSet<TableRef>,
}

fn unavailable(what: &str) -> Error {
    Error::unavailable(format!("no {what} service configured"))
}

/// A child control cancelled when the recovery's time target is reached.
struct Deadline {
    control: Control,
    expired: Arc<AtomicBool>,
    _stop: Option<std::sync::mpsc::Sender<()>>,
}

impl Deadline {
    fn new(control: &Control, remaining: Option<Duration>) -> Self {
        let (child, _) = control.child();
        let expired = Arc::new(AtomicBool::new(false));
        let Some(remaining) = remaining else {
            return Self {
                control: child,
                expired,
                _stop: None,
            };
        };
        // A plain thread, so no timer of the async runtime is needed; it ends
        // early when the step finishes (the sender is dropped).
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let token = child.cancel_token().clone();
        let flag = Arc::clone(&expired);
        let spawned = std::thread::Builder::new()
            .name("sanare-recovery-deadline".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(remaining)
                {
                    flag.store(true, Ordering::SeqCst);
                    token.cancel();
                }
            });
        if spawned.is_err() {
            tracing::warn!("no thread for the recovery time target; checks run unbounded");
        }
        Self {
            control: child,
            expired,
            _stop: Some(tx),
        }
    }

    /// `Ok(None)` when `r` failed because the time target was reached.
    fn judge<T>(&self, r: Result<T>) -> Result<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_cancelled() && self.expired.load(Ordering::SeqCst) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn names(tables: impl IntoIterator<Item = impl std::fmt::Display>) -> String {
    tables
        .into_iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `v` says its table's pages are damaged: no row repair covers it.
fn beyond_row_repair(v: &Violation) -> bool {
    v.row.is_none()
        && v.table.schema != "*"
        && matches!(
            v.kind,
            ViolationKind::Corruption {
                kind: CorruptionKind::Metadata,
                ..
            }
        )
}

impl Run {
    pub(crate) fn new(plan: &RecoveryPlan, started: Instant) -> Self {
        let mut result = RecoveryResult::new(plan.options.option, plan.crash);
        result.warnings = plan
            .notes
            .iter()
            .filter(|n| n.contains("left out"))
            .cloned()
            .collect();
        Self {
            result,
            started,
            restored_cut: None,
            full_backup: false,
            last_check: None,
            last_clean: None,
            row_findings: Vec::new(),
            beyond_repair: BTreeSet::new(),
        }
    }

    /// A child control for a check, cancelled at the time target; `None` when
    /// the target is reached already.
    fn deadline(&self, plan: &RecoveryPlan, control: &Control) -> Option<Deadline> {
        let remaining = plan
            .options
            .time_target
            .map(|t| t.saturating_sub(self.started.elapsed()));
        (remaining != Some(Duration::ZERO)).then(|| Deadline::new(control, remaining))
    }

    fn out_of_time(&mut self, plan: &RecoveryPlan, what: &str) -> String {
        let target = plan.options.time_target.unwrap_or_default();
        let text = format!(
            "{what} stopped at the recovery time target ({}s): what it did not reach was not checked now; \
             the scheduled checks (or `sanare validate` / `sanare scan`) cover it",
            target.as_secs_f64()
        );
        self.result.warnings.push(text.clone());
        text
    }

    fn backup_request(&self, tables: Vec<TableRef>, what: &str) -> SnapshotRequest {
        let mut req = SnapshotRequest::new().tables(tables).label(format!(
            "backup before recovery {} ({what})",
            self.result.id
        ));
        req.metadata
            .insert("sanare.recovery".into(), self.result.id.to_string());
        req
    }

    pub(crate) async fn backup_everything(
        &mut self,
        s: &Services,
        control: &Control,
    ) -> Result<String> {
        let snaps = s
            .snapshots
            .as_ref()
            .ok_or_else(|| unavailable("snapshot"))?;
        let (child, _) = control.child();
        let info = snaps
            .create(self.backup_request(Vec::new(), "every table"), &child)
            .await?;
        self.result.backup_snapshot = Some(info.id);
        self.full_backup = true;
        Ok(format!("backup snapshot {}", info.id))
    }

    /// Takes a backup of `tables` (unless everything was backed up first) and
    /// restores them from `info`; returns the restore's journal cut.
    async fn backup_and_restore(
        &mut self,
        snaps: &dyn SnapshotService,
        info: &SnapshotInfo,
        tables: Vec<TableRef>,
        control: &Control,
    ) -> Result<(String, Option<JournalCut>)> {
        let (child, _) = control.child();
        if !self.full_backup {
            let list = names(&tables);
            let backup = snaps
                .create(self.backup_request(tables.clone(), "the tables it restores"), &child)
                .await
                .map_err(|e| {
                    Error::unavailable(format!(
                        "backing up the current state of {list} failed ({e}); nothing was restored: \
                         a table is only restored after a backup of what it holds"
                    ))
                })?;
            self.result.backup_snapshot = Some(backup.id);
        }
        let mut request = RestoreRequest::new(info.id);
        if !tables.is_empty() {
            request = request.tables(tables);
        }
        let out = snaps.restore(request, &child).await?;
        self.result.snapshots_used.push(out.snapshot);
        let rows: u64 = out.tables.iter().map(|t| t.rows).sum();
        let restored: Vec<TableRef> = out.tables.iter().map(|t| t.table.clone()).collect();
        self.result.tables_restored.extend(restored.iter().cloned());
        let detail = format!(
            "restored {} from snapshot {} ({rows} rows), after backup snapshot {}",
            names(&restored),
            out.snapshot,
            self.result
                .backup_snapshot
                .map(|b| b.to_string())
                .unwrap_or_default()
        );
        Ok((detail, out.journal_cut.or_else(|| info.journal_cut.clone())))
    }

    fn announce_restore(&self, s: &Services, snapshot: sanare_core::SnapshotId) {
        if let Some(bus) = &s.events {
            bus.publish(Event::RestoreCompleted {
                snapshot,
                tables: self.result.tables_restored.clone(),
                rows: 0,
            });
        }
    }

    pub(crate) async fn restore_latest(
        &mut self,
        s: &Services,
        plan: &RecoveryPlan,
        control: &Control,
    ) -> Result<String> {
        let snaps = s
            .snapshots
            .as_ref()
            .ok_or_else(|| unavailable("snapshot"))?;
        let Some(info) = snaps.latest_good(plan.options.restore_before).await? else {
            self.result
                .warnings
                .push("no good snapshot to restore: nothing was restored".into());
            return Ok("no snapshot available; nothing restored".into());
        };
        let tables: Vec<TableRef> = info.tables.iter().map(|t| t.table.clone()).collect();
        let (detail, cut) = self
            .backup_and_restore(snaps.as_ref(), &info, tables, control)
            .await?;
        self.restored_cut = Some(cut);
        self.announce_restore(s, info.id);
        Ok(detail)
    }

    async fn replay_range(
        &mut self,
        s: &Services,
        range: ReplayRange,
        control: &Control,
    ) -> Result<String> {
        let j = s.journal.as_ref().ok_or_else(|| unavailable("journal"))?;
        let (child, _) = control.child();
        let summary = j.replay(ReplayRequest::new(range), &child).await?;
        self.result.entries_replayed += summary.applied;
        for f in &summary.failures {
            self.result.warnings.push(format!(
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

    pub(crate) async fn replay(&mut self, s: &Services, control: &Control) -> Result<String> {
        let range = match &self.restored_cut {
            Some(Some(cut)) => ReplayRange::After(cut.clone()),
            _ => ReplayRange::All,
        };
        self.replay_range(s, range, control).await
    }

    pub(crate) async fn validate(
        &mut self,
        s: &Services,
        plan: &RecoveryPlan,
        control: &Control,
    ) -> Result<String> {
        let i = s
            .integrity
            .as_ref()
            .ok_or_else(|| unavailable("integrity"))?;
        let Some(deadline) = self.deadline(plan, control) else {
            return Ok(self.out_of_time(plan, "validation"));
        };
        let scope = ValidationScope::all().tables(plan.options.tables.iter().cloned());
        let r = i.validate(scope, &deadline.control).await;
        let Some(summary) = deadline.judge(r)? else {
            return Ok(self.out_of_time(plan, "validation"));
        };
        self.last_check = Some(summary.check);
        self.last_clean = Some(summary.is_clean());
        self.result.findings += summary.total_violations();
        Ok(format!(
            "{} tables, {} rows checked, {} violations",
            summary.tables_checked,
            summary.rows_checked,
            summary.total_violations()
        ))
    }

    pub(crate) async fn scan(
        &mut self,
        s: &Services,
        plan: &RecoveryPlan,
        control: &Control,
    ) -> Result<String> {
        let c = s
            .corruption
            .as_ref()
            .ok_or_else(|| unavailable("corruption"))?;
        let Some(deadline) = self.deadline(plan, control) else {
            return Ok(self.out_of_time(plan, "the corruption scan"));
        };
        let scope = CorruptionScope::all()
            .tables(plan.options.tables.iter().cloned())
            .physical(plan.physical_checks);
        let r = c.scan(&scope, &deadline.control).await;
        let Some(summary) = deadline.judge(r)? else {
            return Ok(self.out_of_time(plan, "the corruption scan"));
        };
        if let (true, Some(why)) = (plan.physical_checks, &summary.physical_skipped) {
            self.result
                .warnings
                .push(format!("pages and indexes were not verified: {why}"));
        }
        self.result.findings += summary.findings.len() as u64;
        for v in summary.findings {
            if beyond_row_repair(&v) {
                self.beyond_repair.insert(v.table.clone());
            } else if v.table.schema == "*" {
                self.result.warnings.push(format!(
                    "database-wide finding: {} ({})",
                    v.description, v.recommended_action
                ));
            } else {
                self.row_findings.push(v);
            }
        }
        Ok(format!(
            "{} tables, {} rows scanned, {} checked physically; {} rows and {} tables found damaged",
            summary.tables_scanned.len(),
            summary.rows_scanned,
            summary.tables_checked_physically.len(),
            self.row_findings.len(),
            self.beyond_repair.len()
        ))
    }

    pub(crate) async fn repair(
        &mut self,
        s: &Services,
        plan: &RecoveryPlan,
        control: &Control,
    ) -> Result<String> {
        let r = s.repair.as_ref().ok_or_else(|| unavailable("repair"))?;
        let validation = match (&s.integrity, self.last_check, self.last_clean) {
            (Some(i), Some(check), Some(false)) => Some(i.violations(check)),
            _ => None,
        };
        if validation.is_none() && self.row_findings.is_empty() {
            return Ok("nothing to repair".into());
        }
        let touched = Arc::new(Mutex::new(BTreeSet::new()));
        let seen = Arc::clone(&touched);
        let findings =
            futures_util::stream::iter(std::mem::take(&mut self.row_findings).into_iter().map(Ok));
        let stream = match validation {
            Some(v) => v.chain(findings).boxed(),
            None => findings.boxed(),
        }
        .inspect(move |v| {
            if let (Ok(v), Ok(mut seen)) = (v, seen.lock()) {
                seen.insert(v.table.clone());
            }
        })
        .boxed();
        let execute = plan.options.execute_repairs;
        let policy = RepairPolicy::new(plan.options.approver.clone())
            .auto_approve(plan.options.auto_approve)
            .dry_run_first(false)
            .dry_run_only(!execute);
        let (child, _) = control.child();
        let done = r.repair_all(stream, &policy, &child).await?;
        for id in &done.awaiting_approval {
            self.result
                .warnings
                .push(format!("repair {id} needs approval and was not run"));
        }
        for (id, why) in &done.not_completed {
            self.result
                .warnings
                .push(format!("repair {id} did not complete: {why}"));
        }
        if !execute {
            self.result.warnings.push(format!(
                "{} repairs were planned and not run (`repair.auto_repair` is off): review them with `sanare repair plan`",
                done.planned
            ));
            return Ok(format!(
                "{} findings, {} repairs planned, none run",
                done.violations_read, done.planned
            ));
        }
        self.result.errors_fixed += done.violations_fixed;
        let touched: Vec<TableRef> = touched
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        let remain = match (&s.integrity, done.completed) {
            (Some(i), n) if n > 0 && !touched.is_empty() => {
                let revalidated = match self.deadline(plan, control) {
                    Some(deadline) => {
                        let scope = ValidationScope::all().tables(touched);
                        deadline.judge(i.validate(scope, &deadline.control).await)?
                    }
                    None => None,
                };
                if revalidated.is_none() {
                    self.out_of_time(plan, "re-validation after the repairs");
                }
                revalidated.map(|after| after.total_violations())
            }
            _ => Some(done.violations_read.saturating_sub(done.violations_fixed)),
        };
        if let Some(n) = remain.filter(|n| *n > 0) {
            self.result
                .warnings
                .push(format!("{n} violations remain after repair"));
        }
        Ok(format!(
            "{} violations repaired, {} repairs awaiting approval, {} remain in the tables repaired",
            done.violations_fixed,
            done.awaiting_approval.len(),
            remain.map_or_else(
                || "an unknown number (out of time)".into(),
                |n| n.to_string()
            )
        ))
    }

    pub(crate) async fn restore_damaged(
        &mut self,
        s: &Services,
        plan: &RecoveryPlan,
        control: &Control,
    ) -> Result<String> {
        if self.beyond_repair.is_empty() {
            return Ok("no table is damaged beyond row repair".into());
        }
        let tables: Vec<TableRef> = self.beyond_repair.iter().cloned().collect();
        let list = names(&tables);
        let snaps = s
            .snapshots
            .as_ref()
            .ok_or_else(|| unavailable("snapshot"))?;
        let info = snaps
            .latest_good(plan.options.restore_before)
            .await?
            .ok_or_else(|| {
                Error::unavailable(format!(
                    "{list} damaged beyond row repair, and there is no good snapshot to restore from: \
                     nothing was restored; restore from a backup of your own, or rebuild the tables"
                ))
            })?;
        let missing: Vec<&TableRef> = tables
            .iter()
            .filter(|t| !info.tables.iter().any(|c| &c.table == *t))
            .collect();
        if !missing.is_empty() {
            return Err(Error::unavailable(format!(
                "{} damaged beyond row repair but not in snapshot {}: nothing was restored",
                names(missing),
                info.id
            )));
        }
        let (detail, cut) = self
            .backup_and_restore(snaps.as_ref(), &info, tables, control)
            .await?;
        self.announce_restore(s, info.id);
        let replay = match cut {
            Some(cut) => {
                self.replay_range(s, ReplayRange::After(cut), control)
                    .await?
            }
            None => "no journal cut: nothing replayed".into(),
        };
        self.result.warnings.push(format!(
            "{list} were damaged beyond row repair and were restored: undo with `sanare recover --undo {}`",
            self.result.id
        ));
        Ok(format!("{detail}; journal: {replay}"))
    }
}

/// The record of an undo: what it restored, for [`crate::Recovery::undo`].
pub(crate) async fn undo_restore(
    snaps: &dyn SnapshotService,
    undone: &RecoveryResult,
    result: &mut RecoveryResult,
    control: &Control,
) -> Result<String> {
    let backup = undone.backup_snapshot.ok_or_else(|| {
        Error::invalid_input(format!(
            "recovery {} took no backup snapshot: it restored no table, so there is nothing to undo \
             (repairs are undone with `sanare repair rollback <id>`)",
            undone.id
        ))
    })?;
    if undone.tables_restored.is_empty() {
        return Err(Error::invalid_input(format!(
            "recovery {} restored no table: nothing to undo (repairs are undone with `sanare repair rollback <id>`)",
            undone.id
        )));
    }
    let (child, _) = control.child();
    let tables = undone.tables_restored.clone();
    let mut req = SnapshotRequest::new()
        .tables(tables.clone())
        .label(format!("backup before undoing recovery {}", undone.id));
    req.metadata
        .insert("sanare.recovery".into(), result.id.to_string());
    let before = snaps.create(req, &child).await.map_err(|e| {
        Error::unavailable(format!(
            "backing up the current state of {} failed ({e}); nothing was undone",
            names(&tables)
        ))
    })?;
    result.backup_snapshot = Some(before.id);
    let out = snaps
        .restore(RestoreRequest::new(backup).tables(tables), &child)
        .await?;
    result.snapshots_used.push(out.snapshot);
    result
        .tables_restored
        .extend(out.tables.iter().map(|t| t.table.clone()));
    Ok(format!(
        "restored {} from backup snapshot {backup} (their state before recovery {}); \
         their state until now is in backup snapshot {}",
        names(&result.tables_restored),
        undone.id,
        before.id
    ))
}

/// Checks that `id` can be undone.
pub(crate) fn undoable(id: RecoveryId, undone_by: Option<RecoveryId>) -> Result<()> {
    match undone_by {
        Some(by) => Err(Error::conflict(format!(
            "recovery {id} was undone already, by recovery {by}"
        ))),
        None => Ok(()),
    }
}
