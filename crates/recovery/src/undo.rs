//! Undoing a recovery that restored tables: `sanare recover --undo <id>`.

use std::time::Instant;

use sanare_core::{Control, Error, RecoveryId, Result};

use crate::plan::{RecoveryOption, RecoveryResult, RecoveryStep, StepOutcome};
use crate::recovery::Recovery;
use crate::steps;

impl Recovery {
    /// Returns the tables recovery `id` restored to their state before it, from the
    /// backup snapshot named in its record. The state they have now is backed up
    /// first, so the undo itself is undoable (its record names that backup). Runs
    /// as a recovery of its own (option [`RecoveryOption::Undo`]), recorded and
    /// announced like any other; nothing is replayed.
    ///
    /// Fails with [`Error::InvalidInput`] when the recovery restored no table
    /// (repairs are undone with the repair engine's rollback), with
    /// [`Error::Conflict`] when it was undone already, and with
    /// [`Error::NotFound`] when there is no such record.
    pub async fn undo(&self, id: RecoveryId, control: &Control) -> Result<RecoveryResult> {
        let s = &*self.services;
        let store = s.store.as_ref().ok_or_else(|| {
            Error::unavailable("no crash store configured: recovery records are kept there")
        })?;
        let snaps = s
            .snapshots
            .as_ref()
            .ok_or_else(|| Error::unavailable("no snapshot service configured"))?;
        let undone = store.recovery(id).await?;
        steps::undoable(id, undone.undone_by)?;
        let started = Instant::now();
        // Not tied to the crash: the crash record keeps the outcome of its recovery.
        let mut result = RecoveryResult::new(RecoveryOption::Undo, None);
        result.undoes = Some(id);
        control.checkpoint()?;
        let r = steps::undo_restore(snaps.as_ref(), &undone.result, &mut result, control).await;
        let (success, detail) = match &r {
            Ok(d) => (true, d.clone()),
            Err(e) => (false, e.to_string()),
        };
        result.steps.push(StepOutcome {
            step: RecoveryStep::RestoreSnapshot,
            success,
            detail,
            duration: started.elapsed(),
        });
        if let Err(e) = r {
            if matches!(e, Error::InvalidInput(_)) {
                return Err(e);
            }
            result.errors.push(format!("undo failed: {e}"));
        }
        result.success = success;
        result.duration = started.elapsed();
        if success && let Err(e) = store.mark_undone(id, result.id).await {
            result
                .warnings
                .push(format!("could not mark recovery {id} undone: {e}"));
        }
        self.finish(&mut result).await;
        Ok(result)
    }
}
