//! One writer per WAL directory, across processes.
//!
//! The writing journal holds an exclusive `flock` on `<dir>/LOCK` for as long as it
//! is open; the lock dies with the process (even on SIGKILL), so a crashed writer
//! never blocks the next start. A second writer — another instance configured with
//! the same data directory, or a tool — is refused instead of cutting the first
//! one's in-flight records as a "torn tail". Read-only opens take no lock.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};
use sanare_core::{Error, Result};

/// The held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the exclusive writer lock of `dir`, waiting up to `wait` for a
    /// previous writer to let go (a restart racing the old process's exit), or
    /// says who holds it. Blocks the thread: call it off the async runtime.
    pub(crate) fn acquire(dir: &Path, wait: Duration) -> Result<Self> {
        let path = dir.join("LOCK");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("opening the journal lock {}", path.display()), e))?;
        let deadline = Instant::now() + wait;
        while flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            if Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
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
        }
        // Best effort: who holds it, for the next one's message.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(Self { _file: file })
    }
}
