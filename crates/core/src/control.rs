//! Cancellation and progress for long operations.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where a long operation is: a phase name, units done, and the total when known.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The current phase (`"restoring snapshot"`, `"scanning public.orders"`).
    pub phase: Cow<'static, str>,
    /// Units of work done in this phase (rows, bytes, entries, chunks).
    pub done: u64,
    /// Total units in this phase, when known.
    pub total: Option<u64>,
    /// The unit (`"rows"`, `"bytes"`, `"entries"`).
    pub unit: Cow<'static, str>,
    /// A short note on the latest step, if any.
    pub message: Option<String>,
    /// Whether the operation has finished (successfully or not).
    pub finished: bool,
}

impl Progress {
    /// The fraction done in `0.0..=1.0`, when the total is known.
    pub fn fraction(&self) -> Option<f64> {
        self.total.map(|total| {
            if total == 0 {
                1.0
            } else {
                (self.done as f64 / total as f64).min(1.0)
            }
        })
    }
}

/// The sending side of a progress channel, held by the operation.
///
/// Cheap to clone and share between worker tasks. Updates never block and never fail:
/// an operation nobody watches pays one uncontended lock per update.
#[derive(Clone, Debug)]
pub struct ProgressReporter {
    tx: Arc<watch::Sender<Progress>>,
}

impl ProgressReporter {
    /// Starts a new phase with an optional known total.
    pub fn phase(
        &self,
        phase: impl Into<Cow<'static, str>>,
        unit: impl Into<Cow<'static, str>>,
        total: Option<u64>,
    ) {
        let phase = phase.into();
        let unit = unit.into();
        self.tx.send_modify(|p| {
            p.phase = phase;
            p.unit = unit;
            p.total = total;
            p.done = 0;
            p.message = None;
            p.finished = false;
        });
    }

    /// Adds `n` units done in the current phase.
    pub fn advance(&self, n: u64) {
        self.tx.send_modify(|p| p.done = p.done.saturating_add(n));
    }

    /// Sets the units done in the current phase.
    pub fn set_done(&self, done: u64) {
        self.tx.send_modify(|p| p.done = done);
    }

    /// Sets a short note on the latest step.
    pub fn message(&self, message: impl Into<String>) {
        let message = message.into();
        self.tx.send_modify(|p| p.message = Some(message));
    }

    /// Marks the operation finished.
    pub fn finish(&self) {
        self.tx.send_modify(|p| p.finished = true);
    }

    /// The progress as last reported.
    pub fn current(&self) -> Progress {
        self.tx.borrow().clone()
    }

    /// A new watcher of this progress.
    pub fn watch(&self) -> ProgressHandle {
        ProgressHandle {
            rx: self.tx.subscribe(),
        }
    }
}

/// The watching side of a progress channel: what a caller (a CLI progress bar, a
/// health endpoint) holds. Wraps a [`watch::Receiver`].
#[derive(Clone, Debug)]
pub struct ProgressHandle {
    rx: watch::Receiver<Progress>,
}

impl ProgressHandle {
    /// The latest progress.
    pub fn get(&self) -> Progress {
        self.rx.borrow().clone()
    }

    /// Waits for the next update. Returns `None` once the operation has dropped its
    /// reporter (it is over).
    pub async fn changed(&mut self) -> Option<Progress> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }

    /// The underlying receiver, for `tokio::select!` or a `WatchStream`.
    pub fn into_receiver(self) -> watch::Receiver<Progress> {
        self.rx
    }
}

/// What every long sanare operation takes: a cancellation token and a progress
/// reporter.
///
/// ```
/// use sanare_core::Control;
///
/// let (control, progress) = Control::new();
/// control.progress().phase("copying", "rows", Some(10));
/// control.progress().advance(4);
/// assert_eq!(progress.get().done, 4);
/// control.cancel_token().cancel();
/// assert!(control.checkpoint().is_err());
/// ```
///
/// # Contract for operations
///
/// An operation calls [`Control::checkpoint`] between units of work (a chunk, a
/// batch, a block) and returns [`Error::Cancelled`](crate::Error::Cancelled) promptly
/// when cancelled, leaving nothing half-committed: each unit is its own transaction or
/// is rolled back.
#[derive(Clone, Debug)]
pub struct Control {
    cancel: CancellationToken,
    progress: ProgressReporter,
}

impl Control {
    /// A new control and the handle to watch its progress.
    pub fn new() -> (Self, ProgressHandle) {
        Self::with_token(CancellationToken::new())
    }

    /// A new control cancelled by `cancel` (for example a child of the host's
    /// shutdown token).
    pub fn with_token(cancel: CancellationToken) -> (Self, ProgressHandle) {
        let (tx, rx) = watch::channel(Progress::default());
        (
            Self {
                cancel,
                progress: ProgressReporter { tx: Arc::new(tx) },
            },
            ProgressHandle { rx },
        )
    }

    /// A control nobody watches or cancels except through the returned value.
    pub fn detached() -> Self {
        Self::new().0
    }

    /// A control for a sub-operation: cancelled with this one (and on its own), with
    /// its own progress.
    pub fn child(&self) -> (Self, ProgressHandle) {
        Self::with_token(self.cancel.child_token())
    }

    /// The cancellation token.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// The progress reporter.
    pub fn progress(&self) -> &ProgressReporter {
        &self.progress
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// `Err(Error::Cancelled)` if cancellation was requested; call between units of work.
    pub fn checkpoint(&self) -> crate::Result<()> {
        if self.cancel.is_cancelled() {
            Err(crate::Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

impl Default for Control {
    fn default() -> Self {
        Self::detached()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn progress_is_watched_and_cancellation_propagates_to_children() {
        let (control, mut handle) = Control::new();
        let reporter = control.progress().clone();
        let task = tokio::spawn(async move {
            reporter.phase("scan", "rows", Some(100));
            reporter.advance(60);
            reporter.advance(40);
            reporter.finish();
        });
        task.await.unwrap();
        let last = handle.changed().await.unwrap();
        assert_eq!(last.phase, "scan");
        assert_eq!(last.done, 100);
        assert_eq!(last.fraction(), Some(1.0));
        assert!(last.finished);

        let (child, _) = control.child();
        assert!(child.checkpoint().is_ok());
        control.cancel_token().cancel();
        assert!(child.is_cancelled());
        assert!(matches!(child.checkpoint(), Err(crate::Error::Cancelled)));
    }
}
