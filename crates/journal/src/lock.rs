//! One writer per WAL directory, across processes.
//!
//! The writing journal holds an exclusive lock on `<dir>/LOCK` (an `flock` on the
//! OS storage) for as long as it is open; the lock dies with the process (even on
//! SIGKILL), so a crashed writer never blocks the next start. A second writer —
//! another instance configured with the same data directory, or a tool — is
//! refused instead of cutting the first one's in-flight records as a "torn tail".
//! Read-only opens take no lock.

use std::path::Path;
use std::time::{Duration, Instant};

use sanare_core::{Error, Result};
use sanare_fs::{LockGuard, OpenMode, Storage};

/// The held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub(crate) struct DirLock {
    _guard: LockGuard,
}

impl DirLock {
    /// Takes the exclusive writer lock of `dir`, waiting up to `wait` for a
    /// previous writer to let go (a restart racing the old process's exit), or
    /// says who holds it. Blocks the thread: call it off the async runtime.
    pub(crate) fn acquire(storage: &dyn Storage, dir: &Path, wait: Duration) -> Result<Self> {
        let path = dir.join("LOCK");
        let io = |e| Error::io(format!("opening the journal lock {}", path.display()), e);
        let deadline = Instant::now() + wait;
        let guard = loop {
            if let Some(g) = storage.try_lock(&path).map_err(io)? {
                break g;
            }
            if Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let holder = sanare_fs::read_file(storage, &path, 64)
                .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                .unwrap_or_default();
            return Err(Error::conflict(format!(
                "the journal in {} is open for writing by another process{}: one process writes a journal; \
                 give each instance its own data directory, stop the other process, or open this one read-only",
                dir.display(),
                if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                }
            )));
        };
        // Best effort: who holds it, for the next one's message.
        if let Ok(f) = storage.open(&path, OpenMode::ReadWrite) {
            let pid = format!("{}\n", std::process::id());
            let _ = f
                .set_len(0)
                .and_then(|()| f.write_all_at(pid.as_bytes(), 0));
        }
        Ok(Self { _guard: guard })
    }
}
