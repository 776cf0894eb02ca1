//! The operating system's files.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{FlockOperation, flock};

use crate::{DirEntry, EntryKind, File, LockGuard, OpenMode, Storage};

/// Files of the operating system: `pwrite`/`pread`, `fdatasync`, `fsync` of a
/// directory, `rename`, `flock`. Each [`open`](Storage::open) is a separate open
/// file description (Linux reports a writeback error once per description, so a
/// caller that syncs from several threads opens the file once per thread).
#[derive(Clone, Copy, Debug, Default)]
pub struct OsStorage;

#[derive(Debug)]
struct OsFile(fs::File);

impl File for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match self.0.read_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }
}

impl Storage for OsStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        let mut o = fs::OpenOptions::new();
        o.read(true);
        match mode {
            OpenMode::Read => {}
            OpenMode::ReadWrite => {
                o.write(true);
            }
            OpenMode::Create => {
                o.write(true).create(true).truncate(false);
            }
            OpenMode::CreateNew => {
                o.write(true).create_new(true);
            }
        }
        Ok(Arc::new(OsFile(o.open(path)?)))
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut d = dir;
        while !d.is_dir() {
            missing.push(d);
            match d.parent() {
                Some(p) if !p.as_os_str().is_empty() => d = p,
                _ => break,
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        fs::create_dir_all(dir)?;
        // Each new directory's entry is durable once its parent is synced.
        for created in missing {
            if let Some(p) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
                self.sync_dir(p)?;
            }
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for item in fs::read_dir(dir)? {
            let item = item?;
            if item.file_type()?.is_file() {
                out.push(item.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(out)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        match fs::metadata(path) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        fs::File::open(dir)?.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for item in fs::read_dir(dir)? {
            let item = item?;
            let meta = match item.metadata() {
                Ok(m) => m,
                // Removed between the listing and the look.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let kind = if meta.is_dir() {
                EntryKind::Dir
            } else if meta.is_file() {
                EntryKind::File
            } else {
                continue;
            };
            let len = if meta.is_file() { meta.len() } else { 0 };
            out.push(DirEntry {
                name: item.file_name().to_string_lossy().into_owned(),
                kind,
                len,
                modified: meta.modified()?,
            });
        }
        Ok(out)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::hard_link(from, to)
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<LockGuard>> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(LockGuard::new(file))),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
