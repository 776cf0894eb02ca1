//! A simulated disk whose power a test can cut (feature `sim`).
//!
//! [`SimDisk`] keeps, for every file, what is durable and what is only written,
//! and for every directory, which entries are durable and which changes are
//! pending. [`SimDisk::cut_power`] then does what a power loss does to everything
//! not made durable by the [contract](crate#durability-contract), at random from a
//! seed (so a failure is replayed from its seed):
//!
//! - each write not yet synced is kept whole, dropped, or **torn**: each of its
//!   512-byte sectors kept or dropped on its own (writes are not ordered among
//!   themselves, so a later one may survive an earlier one);
//! - each `set_len` not yet synced is kept or dropped;
//! - each create, rename and remove not yet made durable by a sync of its
//!   directory is kept or dropped (a rename whole: it is atomic);
//! - files no directory entry reaches any more are gone;
//! - every handle opened before the cut fails from then on (the process is gone),
//!   and every lock is released.
//!
//! Afterwards the disk holds exactly the surviving state, and the code under test
//! opens it again as it would after a reboot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use crate::{DirEntry, EntryKind, File, LockGuard, OpenMode, Storage};

/// The size of a sector: a torn write keeps or drops each one on its own.
pub const SECTOR: u64 = 512;

/// An in-memory disk whose power can be cut. Cheap to clone: clones share the disk.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    disk: Arc<Mutex<Disk>>,
}

/// What a power cut did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CutReport {
    /// Unsynced writes kept whole.
    pub writes_kept: u64,
    /// Unsynced writes dropped whole.
    pub writes_dropped: u64,
    /// Unsynced writes torn (some sectors kept, some dropped).
    pub writes_torn: u64,
    /// Unsynced `set_len`s dropped.
    pub truncations_dropped: u64,
    /// Directory changes not yet durable that were dropped.
    pub entries_dropped: u64,
    /// Directory changes not yet durable that were kept.
    pub entries_kept: u64,
}

impl CutReport {
    /// Whether the cut lost or tore anything.
    pub fn lost_anything(&self) -> bool {
        self.writes_dropped + self.writes_torn + self.truncations_dropped + self.entries_dropped > 0
    }
}

#[derive(Debug, Default)]
struct Disk {
    /// Power cuts so far: a handle from an earlier boot fails.
    boot: u64,
    next_ino: u64,
    inodes: HashMap<u64, Inode>,
    dirs: BTreeMap<PathBuf, Dir>,
    locks: HashSet<PathBuf>,
}

#[derive(Debug)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<DataOp>,
    /// When the contents last changed (the clock's time; kept through a cut).
    modified: SystemTime,
}

impl Inode {
    fn new() -> Self {
        Self {
            durable: Vec::new(),
            current: Vec::new(),
            pending: Vec::new(),
            modified: SystemTime::now(),
        }
    }
}

#[derive(Debug)]
enum DataOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Dir {
    durable: BTreeMap<String, u64>,
    current: BTreeMap<String, u64>,
    pending: Vec<DirOp>,
}

#[derive(Debug)]
enum DirOp {
    Link { name: String, ino: u64 },
    Unlink { name: String, ino: u64 },
    Rename { from: String, to: String, ino: u64 },
}

fn write_into(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let at = usize::try_from(offset).unwrap_or(usize::MAX);
    let end = at.saturating_add(data.len());
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[at..end].copy_from_slice(data);
}

fn set_len(buf: &mut Vec<u8>, len: u64) {
    buf.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
}

impl DataOp {
    fn apply(&self, buf: &mut Vec<u8>) {
        match self {
            DataOp::Write { offset, data } => write_into(buf, *offset, data),
            DataOp::SetLen(len) => set_len(buf, *len),
        }
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file (simulated disk)", path.display()),
    )
}

fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let dir = crate::parent(path)?.to_owned();
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a path without a file name"))?
        .to_string_lossy()
        .into_owned();
    Ok((dir, name))
}

impl Disk {
    fn dir(&mut self, dir: &Path) -> io::Result<&mut Dir> {
        self.dirs.get_mut(dir).ok_or_else(|| not_found(dir))
    }

    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let (dir, name) = split(path)?;
        self.dirs
            .get(&dir)
            .and_then(|d| d.current.get(&name))
            .copied()
            .ok_or_else(|| not_found(path))
    }

    fn inode(&mut self, ino: u64) -> io::Result<&mut Inode> {
        self.inodes
            .get_mut(&ino)
            .ok_or_else(|| io::Error::other("simulated disk: inode vanished"))
    }

    fn create(&mut self, path: &Path) -> io::Result<u64> {
        let (dir, name) = split(path)?;
        self.next_ino += 1;
        let ino = self.next_ino;
        let d = self.dir(&dir)?;
        d.current.insert(name.clone(), ino);
        d.pending.push(DirOp::Link { name, ino });
        self.inodes.insert(ino, Inode::new());
        Ok(ino)
    }
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cuts the power: everything not durable is kept, dropped or torn at random
    /// (seeded by `seed`), every open handle fails from now on, every lock is
    /// released. Returns what happened.
    pub fn cut_power(&self, seed: u64) -> CutReport {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut report = CutReport::default();
        let mut disk = self.lock();
        let disk = &mut *disk;
        for inode in disk.inodes.values_mut() {
            for op in std::mem::take(&mut inode.pending) {
                match op {
                    DataOp::Write { offset, data } => match rng.u8(0..3) {
                        0 => {
                            report.writes_kept += 1;
                            write_into(&mut inode.durable, offset, &data);
                        }
                        1 => report.writes_dropped += 1,
                        _ => {
                            report.writes_torn += 1;
                            tear(&mut rng, &mut inode.durable, offset, &data);
                        }
                    },
                    DataOp::SetLen(len) => {
                        if rng.bool() {
                            set_len(&mut inode.durable, len);
                        } else {
                            report.truncations_dropped += 1;
                        }
                    }
                }
            }
            inode.current = inode.durable.clone();
        }
        for dir in disk.dirs.values_mut() {
            for op in std::mem::take(&mut dir.pending) {
                if !rng.bool() {
                    report.entries_dropped += 1;
                    continue;
                }
                report.entries_kept += 1;
                match op {
                    DirOp::Link { name, ino } => {
                        dir.durable.insert(name, ino);
                    }
                    DirOp::Unlink { name, ino } => {
                        if dir.durable.get(&name) == Some(&ino) {
                            dir.durable.remove(&name);
                        }
                    }
                    DirOp::Rename { from, to, ino } => {
                        if dir.durable.get(&from) == Some(&ino) {
                            dir.durable.remove(&from);
                            dir.durable.insert(to, ino);
                        }
                    }
                }
            }
            dir.current = dir.durable.clone();
        }
        let reachable: HashSet<u64> = disk
            .dirs
            .values()
            .flat_map(|d| d.durable.values().copied())
            .collect();
        disk.inodes.retain(|ino, _| reachable.contains(ino));
        disk.locks.clear();
        disk.boot += 1;
        report
    }

    /// The directory changes (creates, renames, removes) not yet made durable by
    /// a sync of their directory, as paths of the entries they touch.
    pub fn unsynced_entries(&self) -> Vec<PathBuf> {
        let disk = self.lock();
        let mut out = Vec::new();
        for (dir, d) in &disk.dirs {
            for op in &d.pending {
                let name = match op {
                    DirOp::Link { name, .. } | DirOp::Unlink { name, .. } => name,
                    DirOp::Rename { to, .. } => to,
                };
                out.push(dir.join(name));
            }
        }
        out
    }

    /// The durable bytes of the file at `path` (what a power cut now would keep
    /// for sure), or `None` when its entry is not durable.
    pub fn durable_contents(&self, path: &Path) -> Option<Vec<u8>> {
        let (dir, name) = split(path).ok()?;
        let disk = self.lock();
        let ino = disk.dirs.get(&dir)?.durable.get(&name)?;
        Some(disk.inodes.get(ino)?.durable.clone())
    }
}

/// Keeps each sector of a write, or not, at random.
fn tear(rng: &mut fastrand::Rng, buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset + data.len() as u64;
    let mut at = offset;
    while at < end {
        let sector_end = ((at / SECTOR) + 1) * SECTOR;
        let upto = sector_end.min(end);
        if rng.bool() {
            let from = usize::try_from(at - offset).unwrap_or(0);
            let to = usize::try_from(upto - offset).unwrap_or(0);
            write_into(buf, at, &data[from..to]);
        }
        at = upto;
    }
}

#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    ino: u64,
    boot: u64,
    writable: bool,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut Inode) -> io::Result<T>) -> io::Result<T> {
        let mut disk = self.disk.lock();
        if disk.boot != self.boot {
            return Err(io::Error::other(
                "simulated disk: this handle was opened before a power cut",
            ));
        }
        f(disk.inode(self.ino)?)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "simulated disk: file opened read-only",
            ))
        }
    }
}

impl File for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with(|i| {
            let at = usize::try_from(offset).unwrap_or(usize::MAX);
            let Some(src) = i.current.get(at..) else {
                return Ok(0);
            };
            let n = src.len().min(buf.len());
            buf[..n].copy_from_slice(&src[..n]);
            Ok(n)
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        self.with(|i| {
            write_into(&mut i.current, offset, buf);
            i.modified = SystemTime::now();
            i.pending.push(DataOp::Write {
                offset,
                data: buf.to_vec(),
            });
            Ok(())
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with(|i| Ok(i.current.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.with(|i| {
            set_len(&mut i.current, len);
            i.modified = SystemTime::now();
            i.pending.push(DataOp::SetLen(len));
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(|i| {
            for op in std::mem::take(&mut i.pending) {
                op.apply(&mut i.durable);
            }
            Ok(())
        })
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }
}

struct SimLock {
    disk: SimDisk,
    path: PathBuf,
    boot: u64,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut disk = self.disk.lock();
        if disk.boot == self.boot {
            disk.locks.remove(&self.path);
        }
    }
}

impl Storage for SimDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        let mut disk = self.lock();
        let ino = match (disk.lookup(path), mode) {
            (Ok(_), OpenMode::CreateNew) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists (simulated disk)", path.display()),
                ));
            }
            (Ok(ino), _) => ino,
            (Err(_), OpenMode::Create | OpenMode::CreateNew) => disk.create(path)?,
            (Err(e), _) => return Err(e),
        };
        Ok(Arc::new(SimFile {
            disk: self.clone(),
            ino,
            boot: disk.boot,
            writable: mode.writable(),
        }))
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let mut d = Some(dir);
        while let Some(p) = d.filter(|p| !p.as_os_str().is_empty()) {
            disk.dirs.entry(p.to_owned()).or_default();
            d = p.parent();
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut disk = self.lock();
        Ok(disk.dir(dir)?.current.keys().cloned().collect())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        Ok(self.lock().lookup(path).is_ok())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let d = disk.dir(dir)?;
        d.durable = d.current.clone();
        d.pending.clear();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let ino = disk.lookup(from)?;
        let (from_dir, from_name) = split(from)?;
        let (to_dir, to_name) = split(to)?;
        disk.dir(&to_dir)?;
        if from_dir == to_dir {
            let d = disk.dir(&from_dir)?;
            d.current.remove(&from_name);
            d.current.insert(to_name.clone(), ino);
            d.pending.push(DirOp::Rename {
                from: from_name,
                to: to_name,
                ino,
            });
        } else {
            let d = disk.dir(&to_dir)?;
            d.current.insert(to_name.clone(), ino);
            d.pending.push(DirOp::Link { name: to_name, ino });
            let d = disk.dir(&from_dir)?;
            d.current.remove(&from_name);
            d.pending.push(DirOp::Unlink {
                name: from_name,
                ino,
            });
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let ino = disk.lookup(path)?;
        let (dir, name) = split(path)?;
        let d = disk.dir(&dir)?;
        d.current.remove(&name);
        d.pending.push(DirOp::Unlink { name, ino });
        Ok(())
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        let disk = self.lock();
        let d = disk.dirs.get(dir).ok_or_else(|| not_found(dir))?;
        let mut out = Vec::new();
        for (name, ino) in &d.current {
            let inode = disk
                .inodes
                .get(ino)
                .ok_or_else(|| io::Error::other("simulated disk: inode vanished"))?;
            out.push(DirEntry::new(
                name.clone(),
                EntryKind::File,
                inode.current.len() as u64,
                inode.modified,
            ));
        }
        // Subdirectories: the directories whose parent is `dir`.
        for sub in disk.dirs.keys() {
            if sub.parent() == Some(dir)
                && let Some(name) = sub.file_name()
            {
                out.push(DirEntry::new(
                    name.to_string_lossy().into_owned(),
                    EntryKind::Dir,
                    0,
                    SystemTime::UNIX_EPOCH,
                ));
            }
        }
        Ok(out)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut disk = self.lock();
        let ino = disk.lookup(from)?;
        if disk.lookup(to).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists (simulated disk)", to.display()),
            ));
        }
        let (dir, name) = split(to)?;
        let d = disk.dir(&dir)?;
        d.current.insert(name.clone(), ino);
        d.pending.push(DirOp::Link { name, ino });
        Ok(())
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<LockGuard>> {
        let mut disk = self.lock();
        if disk.lookup(path).is_err() {
            disk.create(path)?;
        }
        if !disk.locks.insert(path.to_owned()) {
            return Ok(None);
        }
        Ok(Some(LockGuard::new(SimLock {
            disk: self.clone(),
            path: path.to_owned(),
            boot: disk.boot,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{read_file, write_atomic};

    fn dir() -> &'static Path {
        Path::new("/d")
    }

    #[test]
    fn synced_data_survives_and_unsynced_data_is_kept_dropped_or_torn() {
        let mut outcomes = HashSet::new();
        for seed in 0..64 {
            let disk = SimDisk::new();
            disk.create_dir_all(dir()).unwrap();
            let path = dir().join("f");
            let f = disk.open(&path, OpenMode::CreateNew).unwrap();
            f.write_all_at(&[1u8; 1024], 0).unwrap();
            f.sync_data().unwrap();
            disk.sync_dir(dir()).unwrap();
            f.write_all_at(&[2u8; 1024], 1024).unwrap();
            disk.cut_power(seed);
            assert!(f.len().is_err(), "a handle from before the cut fails");
            let back = read_file(&disk, &path, 1 << 20).unwrap();
            assert_eq!(&back[..1024], &[1u8; 1024], "synced data survives");
            let sectors: Vec<bool> = back[1024..]
                .chunks(SECTOR as usize)
                .map(|s| s.iter().all(|&b| b == 2))
                .collect();
            outcomes.insert((back.len(), sectors));
        }
        // Whole, dropped, and both kinds of half.
        assert!(outcomes.contains(&(2048, vec![true, true])), "{outcomes:?}");
        assert!(outcomes.contains(&(1024, vec![])), "{outcomes:?}");
        assert!(
            outcomes
                .iter()
                .any(|(_, s)| s.len() == 2 && s != &vec![true, true]),
            "{outcomes:?}"
        );
    }

    #[test]
    fn an_entry_not_synced_can_vanish_with_its_synced_data() {
        let mut gone = 0;
        for seed in 0..32 {
            let disk = SimDisk::new();
            disk.create_dir_all(dir()).unwrap();
            let path = dir().join("f");
            let f = disk.open(&path, OpenMode::CreateNew).unwrap();
            f.write_all_at(b"data", 0).unwrap();
            f.sync_data().unwrap();
            disk.cut_power(seed);
            if !disk.exists(&path).unwrap() {
                gone += 1;
            } else {
                assert_eq!(read_file(&disk, &path, 100).unwrap(), b"data");
            }
        }
        assert!(gone > 0 && gone < 32, "{gone}");
    }

    #[test]
    fn an_atomic_write_leaves_the_old_or_the_new_contents() {
        let mut seen = HashSet::new();
        for seed in 0..64 {
            let disk = SimDisk::new();
            disk.create_dir_all(dir()).unwrap();
            let path = dir().join("f");
            write_atomic(&disk, &path, b"old").unwrap();
            // A second replacement, cut before its directory sync would be done:
            // emulate by doing the steps without the final sync.
            let tmp = dir().join("f.tmp");
            let f = disk.open(&tmp, OpenMode::Create).unwrap();
            f.write_all_at(b"new", 0).unwrap();
            f.sync_data().unwrap();
            disk.rename(&tmp, &path).unwrap();
            disk.cut_power(seed);
            let back = read_file(&disk, &path, 100).unwrap();
            assert!(back == b"old" || back == b"new", "{back:?}");
            seen.insert(back);
        }
        assert_eq!(seen.len(), 2, "both outcomes happen");
    }

    #[test]
    fn a_link_is_durable_only_once_its_directory_is_synced() {
        let mut outcomes = HashSet::new();
        for seed in 0..32 {
            let disk = SimDisk::new();
            disk.create_dir_all(dir()).unwrap();
            let (tmp, name, synced) = (dir().join("tmp"), dir().join("f"), dir().join("g"));
            crate::create_durable(&disk, &tmp, b"data").unwrap();
            disk.hard_link(&tmp, &synced).unwrap();
            disk.sync_dir(dir()).unwrap();
            disk.hard_link(&tmp, &name).unwrap();
            disk.remove_file(&tmp).unwrap();
            disk.cut_power(seed);
            assert_eq!(read_file(&disk, &synced, 100).unwrap(), b"data");
            let linked = disk.exists(&name).unwrap();
            if linked {
                assert_eq!(read_file(&disk, &name, 100).unwrap(), b"data");
            }
            outcomes.insert((linked, disk.exists(&tmp).unwrap()));
        }
        // The unsynced link and the unsynced removal each survive or not.
        assert_eq!(outcomes.len(), 4, "{outcomes:?}");
    }

    #[test]
    fn locks_are_exclusive_and_released_by_a_power_cut() {
        let disk = SimDisk::new();
        disk.create_dir_all(dir()).unwrap();
        let path = dir().join("LOCK");
        let held = disk.try_lock(&path).unwrap();
        assert!(held.is_some());
        assert!(disk.try_lock(&path).unwrap().is_none());
        disk.cut_power(1);
        let again = disk.try_lock(&path).unwrap();
        assert!(again.is_some());
        drop(held); // from before the cut: releases nothing of the new holder's
        assert!(disk.try_lock(&path).unwrap().is_none());
    }
}
