//! Durable file I/O for sanare's components.
//!
//! A log writer (the journal's WAL, with group commit) and a content-addressed store
//! (the snapshot crate's filesystem block store: temporary file, fsync, rename into
//! place, fsync of the directory) need the same few operations, and both must be
//! tested against what a **power cut** leaves behind, not only a killed process
//! (which loses nothing it wrote). This crate is that seam:
//!
//! - [`Storage`] and [`File`]: a small, synchronous, object-safe trait
//!   (`Arc<dyn Storage>`), whose durability contract is below;
//! - [`OsStorage`]: the operating system's files (`pwrite`, `fdatasync`, `rename`,
//!   an `fsync` of the directory, `flock`);
//! - `sim::SimDisk` (feature `sim`): an in-memory disk whose power a test can cut.
//!   Everything not yet made durable is then, at random and seeded, kept, dropped or
//!   torn, the way redb and TigerBeetle test their storage;
//! - `conformance::run` (feature `testing`): the checks every implementation
//!   passes.
//!
//! # Durability contract
//! What every implementation guarantees, and all a caller may rely on:
//!
//! 1. **Visibility.** A write, a `set_len`, a create, a rename or a remove is
//!    visible at once to every reader of the same storage, through any handle.
//! 2. **File data.** Bytes written to a file and its length become durable when
//!    [`File::sync_data`] (or [`File::sync_all`]) of that file returns `Ok`, through
//!    any handle of the same file. Until then a power cut may keep them, drop them,
//!    or keep any subset of their 512-byte sectors (a *torn* write); writes not yet
//!    synced are not ordered among themselves.
//! 3. **Directory entries.** A file's creation, a rename and a remove become
//!    durable when [`Storage::sync_dir`] of the directory holding the entry returns
//!    `Ok` (both directories for a rename across directories). Until then a power
//!    cut may undo any of them: a file whose entry is lost is gone with its data,
//!    even data that was synced. Creating directories ([`Storage::create_dir_all`])
//!    is durable when it returns.
//! 4. **Renames are atomic.** After a power cut the target name holds either the old
//!    file or the new one, never a mix.
//! 5. **Failures.** An `Err` from `sync_data`, `sync_all` or `sync_dir` means the
//!    state of everything not durable before is unknown; the caller must not assume
//!    a retry makes it durable (Linux may drop dirty pages after reporting a
//!    writeback error).
//! 6. **Locks.** [`Storage::try_lock`] gives one holder at a time an exclusive lock
//!    named by a path; it is released when the guard drops or the process dies.
//!
//! So: to make a new file durable, write it, `sync_data` it, then `sync_dir` its
//! directory; to replace a file atomically, write a temporary file, sync it, rename
//! it over the target, then `sync_dir` ([`write_atomic`] does all of it).
//!
//! # Dependencies
//! `rustix` (`flock` without `unsafe`), `fastrand` (feature `sim`: a small seeded
//! generator, so a failing power cut is replayed from its seed).

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

#[cfg(feature = "testing")]
pub mod conformance;
mod os;
#[cfg(feature = "sim")]
pub mod sim;

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

pub use os::OsStorage;

/// How [`Storage::open`] opens a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenMode {
    /// An existing file, for reading only.
    Read,
    /// An existing file, for reading and writing.
    ReadWrite,
    /// For reading and writing; created empty when missing, never truncated.
    Create,
    /// A new file, for reading and writing; fails with `AlreadyExists` when the
    /// name exists.
    CreateNew,
}

impl OpenMode {
    /// Whether the mode allows writes.
    pub fn writable(self) -> bool {
        !matches!(self, OpenMode::Read)
    }
}

/// An open file. Positional I/O only, so one handle is shared between threads.
pub trait File: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at
    /// or past the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Writes all of `buf` at `offset`, extending the file if needed (a gap reads
    /// as zeros). Not durable until a sync.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// The file's current length.
    fn len(&self) -> io::Result<u64>;

    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends (with zeros) the file to `len` bytes. Not durable until
    /// a sync.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Makes the file's data and length durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;

    /// Makes the file's data, length and metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
}

/// What a directory entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
}

/// An entry of a directory, as [`Storage::read_dir`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DirEntry {
    /// Its name in the directory.
    pub name: String,
    /// A file or a directory.
    pub kind: EntryKind,
    /// A file's length in bytes (0 for a directory).
    pub len: u64,
    /// When its contents last changed.
    pub modified: SystemTime,
}

impl DirEntry {
    /// An entry (for [`Storage::read_dir`] implementations outside this crate).
    pub fn new(name: impl Into<String>, kind: EntryKind, len: u64, modified: SystemTime) -> Self {
        Self {
            name: name.into(),
            kind,
            len,
            modified,
        }
    }
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("this storage does not implement {what}"),
    )
}

/// An exclusive lock held by [`Storage::try_lock`]; released when dropped.
pub struct LockGuard(#[allow(dead_code)] Box<dyn Send + Sync>);

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LockGuard")
    }
}

impl LockGuard {
    /// Wraps whatever keeps a lock held until it is dropped (for implementations).
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        Self(Box::new(held))
    }
}

/// Files and directories, with the durability contract of the [crate docs](crate).
///
/// # Contract
/// Implementations are shared between threads (`Send + Sync`) and every method
/// may be called concurrently. Methods block the calling thread: call them off an
/// async runtime's threads (`spawn_blocking` or a thread of one's own).
pub trait Storage: Send + Sync + fmt::Debug {
    /// Opens the file at `path`.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>>;

    /// Creates `dir` and its missing parents; durable when it returns.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;

    /// The names of the files in `dir` (not of subdirectories), in no particular
    /// order. `NotFound` when `dir` does not exist.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;

    /// Whether a file exists at `path`.
    fn exists(&self, path: &Path) -> io::Result<bool>;

    /// Makes the entries of `dir` (creates, renames, removes) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;

    /// Renames `from` to `to`, replacing `to` atomically when it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// Removes the file at `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;

    /// Takes the exclusive lock named by `path` (creating the file), or `None`
    /// when another holder has it.
    fn try_lock(&self, path: &Path) -> io::Result<Option<LockGuard>>;

    /// The entries of `dir`, files and subdirectories, with their lengths and
    /// modification times, in no particular order. `NotFound` when `dir` does not
    /// exist; an entry removed while the directory is read is left out.
    ///
    /// The provided implementation fails with `Unsupported` (for implementations
    /// written before this method existed); [`OsStorage`] and the simulated disk
    /// implement it.
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        let _ = dir;
        Err(unsupported("read_dir"))
    }

    /// Gives the file at `from` a second name `to`, never replacing anything:
    /// `AlreadyExists` when `to` exists. The new entry is durable like a create
    /// (when `sync_dir` of `to`'s directory returns). With a temporary file, this
    /// publishes a complete file under a name only if nobody else did first.
    ///
    /// The provided implementation fails with `Unsupported`; [`OsStorage`] and the
    /// simulated disk implement it.
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let _ = (from, to);
        Err(unsupported("hard_link"))
    }
}

/// Reads the whole file at `path`, refusing one longer than `limit` bytes (so a
/// damaged or foreign file cannot make the caller allocate without bound).
pub fn read_file(storage: &dyn Storage, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let f = storage.open(path, OpenMode::Read)?;
    read_all(&*f, limit)
}

/// Reads all of `file` from the start, refusing one longer than `limit` bytes.
pub fn read_all(file: &dyn File, limit: u64) -> io::Result<Vec<u8>> {
    let len = file.len()?;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file of {len} bytes is over the limit of {limit} bytes"),
        ));
    }
    let len = usize::try_from(len).map_err(|_| io::Error::other("file too large to read"))?;
    let mut buf = vec![0u8; len];
    let mut at = 0;
    while at < buf.len() {
        let n = file.read_at(&mut buf[at..], at as u64)?;
        if n == 0 {
            break;
        }
        at += n;
    }
    buf.truncate(at);
    Ok(buf)
}

/// Writes `bytes` as the file `path` durably and atomically: a temporary file
/// beside it is written and synced, renamed over `path`, and the directory is
/// synced. After a power cut `path` holds the old contents or all the new ones.
pub fn write_atomic(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent(path)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let f = storage.open(&tmp, OpenMode::Create)?;
        f.set_len(0)?;
        f.write_all_at(bytes, 0)?;
        f.sync_data()?;
    }
    storage.rename(&tmp, path)?;
    storage.sync_dir(dir)
}

/// Creates the file `path` with `bytes`, durable with its directory entry when it
/// returns (`AlreadyExists` when the name exists).
pub fn create_durable(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let f = storage.open(path, OpenMode::CreateNew)?;
    f.write_all_at(bytes, 0)?;
    f.sync_data()?;
    storage.sync_dir(parent(path)?)
}

/// The directory holding `path`.
pub fn parent(path: &Path) -> io::Result<&Path> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Ok(Path::new(".")),
        Some(p) => Ok(p),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no parent directory", path.display()),
        )),
    }
}

/// The operating system's storage, shared.
pub fn os() -> Arc<dyn Storage> {
    Arc::new(OsStorage)
}
