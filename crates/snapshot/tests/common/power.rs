//! A simulated disk with a power switch: the `n`-th write, sync, create, rename or
//! remove after arming cuts the power (`SimDisk::cut_power` with the run's seed)
//! instead of happening, and from then on every operation fails, as on a machine
//! that is off. The disk is then "rebooted" by opening it again directly.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use sanare_fs::sim::{CutReport, SimDisk};
use sanare_fs::{DirEntry, File, LockGuard, OpenMode, Storage};

/// How many seeds a randomized power-cut test runs: `default`, or
/// `SANARE_POWER_CUT_ITERATIONS`. The first is `SANARE_POWER_CUT_FIRST_SEED`
/// (0), so a failure (which names its seed) is replayed with
/// `SANARE_POWER_CUT_FIRST_SEED=s SANARE_POWER_CUT_ITERATIONS=1`.
pub(crate) fn seeds(default: u64) -> std::ops::Range<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let first = var("SANARE_POWER_CUT_FIRST_SEED").unwrap_or(0);
    first..first + var("SANARE_POWER_CUT_ITERATIONS").unwrap_or(default)
}

#[derive(Debug, Default)]
struct State {
    /// Operations that change the disk, so far.
    ops: u64,
    /// The operation at which the power goes.
    cut_at: Option<u64>,
    /// What the cut did, once it happened.
    report: Option<CutReport>,
}

/// A [`SimDisk`] behind a power switch. Cheap to clone: clones share the switch.
#[derive(Clone, Debug)]
pub(crate) struct Switched {
    disk: SimDisk,
    seed: u64,
    state: Arc<Mutex<State>>,
}

fn gone() -> io::Error {
    io::Error::other("the power is gone")
}

impl Switched {
    pub(crate) fn new(disk: SimDisk, seed: u64) -> Self {
        Self {
            disk,
            seed,
            state: Arc::default(),
        }
    }

    /// Operations that changed the disk so far.
    pub(crate) fn ops(&self) -> u64 {
        self.state.lock().unwrap().ops
    }

    /// Cuts the power at the `after`-th change from now (0: the next one).
    pub(crate) fn arm(&self, after: u64) {
        let mut s = self.state.lock().unwrap();
        s.cut_at = Some(s.ops + after);
    }

    /// Cuts the power now, unless an armed cut already did; returns what the cut
    /// did and whether it had happened before (during the work).
    pub(crate) fn cut_now(&self) -> (CutReport, bool) {
        let mut s = self.state.lock().unwrap();
        match &s.report {
            Some(r) => (r.clone(), true),
            None => {
                let r = self.disk.cut_power(self.seed);
                s.report = Some(r.clone());
                (r, false)
            }
        }
    }

    /// Runs `f` unless the power is gone; a change (`counts`) at the armed point
    /// cuts it instead. The switch's lock is held while `f` runs, so nothing
    /// reaches the disk after the cut.
    fn run<T>(&self, counts: bool, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let mut s = self.state.lock().unwrap();
        if s.report.is_some() {
            return Err(gone());
        }
        if counts {
            if s.cut_at == Some(s.ops) {
                s.report = Some(self.disk.cut_power(self.seed));
                return Err(gone());
            }
            s.ops += 1;
        }
        f()
    }
}

#[derive(Debug)]
struct SwitchedFile {
    switch: Switched,
    inner: Arc<dyn File>,
}

impl File for SwitchedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.switch.run(false, || self.inner.read_at(buf, offset))
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.switch
            .run(true, || self.inner.write_all_at(buf, offset))
    }
    fn len(&self) -> io::Result<u64> {
        self.switch.run(false, || self.inner.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.switch.run(true, || self.inner.set_len(len))
    }
    fn sync_data(&self) -> io::Result<()> {
        self.switch.run(true, || self.inner.sync_data())
    }
    fn sync_all(&self) -> io::Result<()> {
        self.switch.run(true, || self.inner.sync_all())
    }
}

impl Storage for Switched {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        let inner = self.run(mode.writable(), || self.disk.open(path, mode))?;
        Ok(Arc::new(SwitchedFile {
            switch: self.clone(),
            inner,
        }))
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.run(true, || self.disk.create_dir_all(dir))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.run(false, || self.disk.list(dir))
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.run(false, || self.disk.exists(path))
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.run(true, || self.disk.sync_dir(dir))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.run(true, || self.disk.rename(from, to))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.run(true, || self.disk.remove_file(path))
    }
    fn try_lock(&self, path: &Path) -> io::Result<Option<LockGuard>> {
        self.run(true, || self.disk.try_lock(path))
    }
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        self.run(false, || self.disk.read_dir(dir))
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.run(true, || self.disk.hard_link(from, to))
    }
}

/// Every temporary file under `dir` on `disk`.
pub(crate) fn temp_files(disk: &SimDisk, dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in disk.read_dir(dir).unwrap_or_default() {
        let path = dir.join(&e.name);
        match e.kind {
            sanare_fs::EntryKind::Dir => out.extend(temp_files(disk, &path)),
            _ if e.name.starts_with(".tmp-") => out.push(path.display().to_string()),
            _ => {}
        }
    }
    out
}
