//! The marker of the running process and its heartbeat.
//!
//! While the process runs, a thread rewrites the `running` marker every few seconds
//! with the time (`heartbeat_unix_ms`), so the next start knows when this run was
//! last alive: the time of a kill -9 or a power loss, and whether an incident in
//! the spool (a caught panic) was outlived. Writes are atomic (temporary file,
//! fsync, rename, fsync of the folder) and serialized with the clean-shutdown write
//! under one mutex, so a heartbeat never overwrites `clean`. The heartbeat stays
//! quiet for a grace period after every captured incident (see
//! [`capture::heartbeat_allowed`]). It is a plain thread: it needs no async runtime
//! and nothing of it runs in a crash path.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use sanare_core::{Error, Result};

use crate::capture;
use crate::marker::{self, Marker, MarkerState};

#[derive(Debug, Default)]
struct State {
    /// The marker last written by this process.
    marker: Option<Marker>,
    /// Asks the heartbeat thread to end.
    stop: bool,
}

/// The marker file as this process writes it.
#[derive(Debug)]
pub(crate) struct MarkerCell {
    path: PathBuf,
    state: Mutex<State>,
    wake: Condvar,
}

impl MarkerCell {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::conflict("the shutdown marker's writer is poisoned"))
    }

    /// Writes `marker` and remembers it.
    pub(crate) fn write(&self, marker: Marker) -> Result<()> {
        let mut state = self.lock()?;
        marker::write_atomic(&self.path, marker.encode().as_bytes())?;
        if marker.state == MarkerState::Clean {
            state.stop = true;
            self.wake.notify_all();
        }
        state.marker = Some(marker);
        Ok(())
    }

    /// The marker this process last wrote.
    pub(crate) fn current(&self) -> Option<Marker> {
        self.state.lock().ok().and_then(|s| s.marker.clone())
    }

    /// Writes one heartbeat now, unless this process wrote no `running` marker or
    /// an incident was captured within the grace period. Returns whether it wrote.
    pub(crate) fn beat(&self) -> Result<bool> {
        let mut state = self.lock()?;
        Self::beat_locked(&self.path, &mut state)
    }

    fn beat_locked(path: &std::path::Path, state: &mut State) -> Result<bool> {
        let now = capture::now_unix_ms();
        let Some(marker) = state.marker.as_mut() else {
            return Ok(false);
        };
        if marker.state != MarkerState::Running || !capture::heartbeat_allowed(now) {
            return Ok(false);
        }
        let mut next = marker.clone();
        next.heartbeat_unix_ms = Some(now);
        marker::write_atomic(path, next.encode().as_bytes())?;
        *marker = next;
        Ok(true)
    }

    /// Starts the heartbeat thread, beating every `every`.
    pub(crate) fn start(self: &Arc<Self>, every: Duration) -> Result<JoinHandle<()>> {
        self.lock()?.stop = false;
        let cell = Arc::clone(self);
        std::thread::Builder::new()
            .name("sanare-heartbeat".into())
            .spawn(move || cell.run(every))
            .map_err(|e| Error::io("starting the heartbeat thread", e))
    }

    fn run(&self, every: Duration) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        loop {
            match self.wake.wait_timeout_while(state, every, |s| !s.stop) {
                Ok((guard, _)) => state = guard,
                Err(_) => return,
            }
            if state.stop {
                return;
            }
            if let Err(e) = Self::beat_locked(&self.path, &mut state) {
                tracing::warn!(error = %e, "writing the heartbeat failed; retrying at the next beat");
            }
        }
    }

    /// Asks the heartbeat thread to end.
    pub(crate) fn stop(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.stop = true;
        }
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> Marker {
        Marker {
            state: MarkerState::Running,
            pid: 1,
            boot_id: "b".into(),
            started_unix_ms: 1,
            oom_kill: None,
            version: "v".into(),
            run_id: None,
            heartbeat_unix_ms: None,
        }
    }

    fn on_disk(path: &std::path::Path) -> Marker {
        Marker::decode(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn no_heartbeat_before_the_run_within_the_grace_period_or_after_a_clean_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marker");
        let cell = MarkerCell::new(path.clone());
        assert!(!cell.beat().unwrap(), "nothing to beat before mark_running");
        cell.write(running()).unwrap();
        assert!(cell.beat().unwrap());
        let first = on_disk(&path).heartbeat_unix_ms.expect("a heartbeat");
        assert!(first >= capture::now_unix_ms() - 60_000);
        // Right after an incident the process may be dying of it: no heartbeat.
        capture::note_incident();
        assert!(!cell.beat().unwrap());
        assert_eq!(on_disk(&path).heartbeat_unix_ms, Some(first));
        let mut clean = running();
        clean.state = MarkerState::Clean;
        cell.write(clean).unwrap();
        assert!(!cell.beat().unwrap(), "never after a clean shutdown");
        assert_eq!(on_disk(&path).state, MarkerState::Clean);
    }
}
