//! One process per data directory.
//!
//! The marker, the spool and the journal of a data directory belong to one running
//! process. A second process started on the same directory would read the live
//! first one's `running` marker as a crash, record it, and clear its spool; so the
//! directory is locked before anything in it is read, and the second process is
//! refused with an error that says who holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};
use sanare_core::{Error, Result};

/// The exclusive lock on a data directory, held until dropped (or until the
/// process dies, even by SIGKILL or a power loss: the kernel releases it, so a
/// crashed run never blocks the next start).
///
/// An advisory `flock` on `<dir>/sanare.lock`. It excludes other processes and
/// other opens in the same process alike: a second [`DataDirLock::acquire`] of the
/// same directory fails while this one is held.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    dir: PathBuf,
}

impl DataDirLock {
    /// The lock file's name inside the data directory.
    pub const FILE_NAME: &'static str = "sanare.lock";

    /// Takes the lock on `dir` (created if missing) without waiting. Fails with
    /// [`Error::Conflict`] naming the holder's pid when another process (or
    /// another handle in this one) holds it; nothing in `dir` is changed then.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating the data directory {}", dir.display()), e))?;
        let path = dir.join(Self::FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                Error::io(
                    format!(
                        "opening the data directory lock {} (check the directory is writable)",
                        path.display()
                    ),
                    e,
                )
            })?;
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(Error::conflict(format!(
                "the data directory {} is in use by another running sanare process{}: one process \
                 owns a data directory (its shutdown marker, crash spool and journal); stop the other \
                 process, or give this one its own `data_dir`",
                dir.display(),
                if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                }
            )));
        }
        // Who holds it, for the next one's message. Best effort: the lock holds
        // whether or not this is written.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(Self {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = DataDirLock::acquire(&data).unwrap();
        assert_eq!(first.dir(), data);
        let err = DataDirLock::acquire(&data).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Conflict(_)), "{err:?}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains("data_dir"),
            "{msg}"
        );
        drop(first);
        DataDirLock::acquire(&data).unwrap();
    }
}
