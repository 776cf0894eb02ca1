//! [`FsStore`]: objects as files under a directory, through a [`sanare_fs::Storage`]
//! (the operating system's files by default, a simulated disk whose power a test
//! can cut otherwise).

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use sanare_core::{Error, Result};
use sanare_fs::{EntryKind, OpenMode, Storage};
use time::OffsetDateTime;

use crate::store::{BlockStore, ObjectMeta, check_key, short_object};

/// How the name of a temporary file starts. No key has a segment starting so
/// (keys are checked), so a listing tells them apart.
const TEMP_PREFIX: &str = ".tmp-";

/// Objects as files under a directory: the embedded default.
///
/// # On disk
/// The object `key` is the file `<root>/<key>` (`blocks/ab/ab12…`,
/// `packs/…`, `manifests/<id>`, `config`). A put writes a temporary file
/// `.tmp-<pid>-<uuid>` in the object's directory, fsyncs it, renames it into place
/// (or, for [`BlockStore::put_new`], links it there, which never replaces an
/// object), then fsyncs the directory. A directory the store creates is fsynced
/// into its parent before anything is written in it. A delete fsyncs the directory
/// too. So after a crash or a power cut an object is absent or complete, every put
/// and delete that returned holds, and a reader never sees part of an object.
///
/// Listings skip temporary files, and remove those older than [`FsStore::TEMP_MAX_AGE`]
/// (left by a crash or a power cut; see [`FsStore::temp_max_age`]).
///
/// Every file operation goes through a [`Storage`]: [`FsStore::new`] uses the
/// operating system's, [`FsStore::with_storage`] any other (the power-cut tests
/// use `sanare_fs::sim::SimDisk`).
#[derive(Clone)]
pub struct FsStore {
    root: PathBuf,
    storage: Arc<dyn Storage>,
    /// Directories this store made or found, each durable in its parent.
    known_dirs: Arc<Mutex<HashSet<PathBuf>>>,
    temp_max_age: Duration,
}

impl fmt::Debug for FsStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsStore")
            .field("root", &self.root)
            .field("storage", &self.storage)
            .finish()
    }
}

impl FsStore {
    /// How old a temporary file must be before a listing removes it as left
    /// behind by a crash or a power cut: far longer than any write of one object
    /// takes.
    pub const TEMP_MAX_AGE: Duration = Duration::from_secs(3600);

    /// A store rooted at `root` on the operating system's files (created if
    /// missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        Self::with_storage(sanare_fs::os(), root)
    }

    /// A store rooted at `root` in `storage` (created if missing): for tests on a
    /// simulated disk, or any other [`Storage`].
    pub fn with_storage(storage: Arc<dyn Storage>, root: impl Into<PathBuf>) -> Result<Self> {
        let store = Self {
            root: root.into(),
            storage,
            known_dirs: Arc::default(),
            temp_max_age: Self::TEMP_MAX_AGE,
        };
        let root = store.root.clone();
        store.ensure_dir(&root)?;
        Ok(store)
    }

    /// Sets how old a temporary file must be before a listing removes it
    /// ([`FsStore::TEMP_MAX_AGE`] by default). A shorter age than a put takes makes that
    /// put fail (never return a partial object).
    #[must_use]
    pub fn temp_max_age(mut self, age: Duration) -> Self {
        self.temp_max_age = age;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        if key.split('/').any(|s| s.starts_with(TEMP_PREFIX)) {
            return Err(Error::invalid_input(format!(
                "`{key}` is not a valid block store key (no segment may start with `{TEMP_PREFIX}`)"
            )));
        }
        Ok(self.root.join(key))
    }

    /// Runs `f` on a blocking thread with a clone of the store.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&FsStore) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::other(what, e))?
    }

    /// Makes `dir` exist, durable in its parent. The first time this store sees a
    /// directory it syncs every parent up to the root, even when the directory
    /// existed: another writer may have made it and not synced its parent yet.
    fn ensure_dir(&self, dir: &Path) -> Result<()> {
        let known = |d: &Path| {
            self.known_dirs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(d)
        };
        if known(dir) {
            return Ok(());
        }
        self.storage
            .create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let mut at = dir;
        while let Ok(parent) = sanare_fs::parent(at) {
            self.sync_dir(parent)?;
            if at == self.root || known(parent) {
                break;
            }
            at = parent;
        }
        self.known_dirs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dir.to_owned());
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        self.storage
            .sync_dir(dir)
            .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
    }

    /// Writes `data` as `path` atomically and durably: a temporary file, synced,
    /// then renamed into place (or, with `exclusive`, linked into place, which
    /// fails when `path` exists: then `false`), then the directory synced.
    fn write(&self, path: &Path, data: &[u8], exclusive: bool) -> Result<bool> {
        let dir = sanare_fs::parent(path)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        self.ensure_dir(dir)?;
        let tmp = dir.join(format!(
            "{TEMP_PREFIX}{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        let ctx = || format!("writing {}", path.display());
        let result = (|| {
            let f = match self.storage.open(&tmp, OpenMode::CreateNew) {
                // The directory is gone since this store made it (removed by
                // hand): make it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.known_dirs
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(dir);
                    self.ensure_dir(dir)?;
                    self.storage.open(&tmp, OpenMode::CreateNew)
                }
                opened => opened,
            }
            .map_err(|e| Error::io(ctx(), e))?;
            f.write_all_at(data, 0).map_err(|e| Error::io(ctx(), e))?;
            f.sync_data().map_err(|e| Error::io(ctx(), e))?;
            drop(f);
            let created = if exclusive {
                match self.storage.hard_link(&tmp, path) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                    Err(e) => return Err(Error::io(ctx(), e)),
                }
            } else {
                self.storage
                    .rename(&tmp, path)
                    .map_err(|e| Error::io(ctx(), e))?;
                true
            };
            self.sync_dir(dir)?;
            Ok(created)
        })();
        // After a rename there is nothing left; after a link (or a failure) the
        // temporary name goes. Not synced: a listing removes it if a cut brings it
        // back.
        if exclusive || result.is_err() {
            let _ = self.storage.remove_file(&tmp);
        }
        result
    }

    fn read(&self, path: &Path) -> Result<Option<Bytes>> {
        let ctx = || format!("reading {}", path.display());
        let f = match self.storage.open(path, OpenMode::Read) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(ctx(), e)),
        };
        let bytes = sanare_fs::read_all(&*f, u64::MAX).map_err(|e| Error::io(ctx(), e))?;
        Ok(Some(Bytes::from(bytes)))
    }

    fn read_range(&self, path: &Path, key: &str, range: Range<u64>) -> Result<Option<Bytes>> {
        let ctx = || format!("reading {}", path.display());
        let f = match self.storage.open(path, OpenMode::Read) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(ctx(), e)),
        };
        let size = f.len().map_err(|e| Error::io(ctx(), e))?;
        if range.start > range.end || range.end > size {
            return Err(short_object(key, size, &range));
        }
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| short_object(key, size, &range))?;
        let mut buf = vec![0u8; len];
        let mut at = 0;
        while at < len {
            let n = f
                .read_at(&mut buf[at..], range.start + at as u64)
                .map_err(|e| Error::io(ctx(), e))?;
            if n == 0 {
                return Err(short_object(key, range.start + at as u64, &range));
            }
            at += n;
        }
        Ok(Some(Bytes::from(buf)))
    }

    fn remove(&self, path: &Path) -> Result<()> {
        let dir = sanare_fs::parent(path)
            .map_err(|e| Error::io(format!("deleting {}", path.display()), e))?;
        match self.storage.remove_file(path) {
            Ok(()) => {}
            // Gone already; the sync below makes an earlier removal durable too.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("deleting {}", path.display()), e)),
        }
        match self.storage.sync_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("syncing directory {}", dir.display()), e)),
        }
    }

    /// Adds the objects under `dir` whose keys start with `prefix` to `out`,
    /// skipping temporary files and removing those older than the age limit.
    fn walk(&self, dir: &Path, prefix: &str, out: &mut Vec<ObjectMeta>) -> Result<()> {
        let entries = match self.storage.read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        let now = SystemTime::now();
        for entry in entries {
            let path = dir.join(&entry.name);
            let Ok(rel) = path.strip_prefix(&self.root) else {
                continue;
            };
            let key = rel.to_string_lossy().replace('\\', "/");
            match entry.kind {
                EntryKind::Dir
                    if prefix.is_empty()
                        || key.starts_with(prefix)
                        || prefix.starts_with(&format!("{key}/")) =>
                {
                    self.walk(&path, prefix, out)?;
                }
                EntryKind::File if entry.name.starts_with(TEMP_PREFIX) => {
                    let age = now.duration_since(entry.modified).unwrap_or_default();
                    if age >= self.temp_max_age {
                        match self.storage.remove_file(&path) {
                            Ok(()) => {
                                tracing::info!(path = %path.display(), "removed a temporary file left by a crash")
                            }
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => {
                                tracing::warn!(path = %path.display(), error = %e, "could not remove a leftover temporary file")
                            }
                        }
                    }
                }
                EntryKind::File if key.starts_with(prefix) => out.push(ObjectMeta::new(
                    key,
                    entry.len,
                    OffsetDateTime::from(entry.modified),
                )),
                _ => {}
            }
        }
        Ok(())
    }
}

#[async_trait]
impl BlockStore for FsStore {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        self.blocking("writing a block store file", move |s| {
            s.write(&path, &data, false).map(drop)
        })
        .await
    }

    async fn put_new(&self, key: &str, data: Bytes) -> Result<bool> {
        let path = self.path(key)?;
        self.blocking("writing a block store file", move |s| {
            s.write(&path, &data, true)
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.path(key)?;
        self.blocking("reading a block store file", move |s| s.read(&path))
            .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Option<Bytes>> {
        let path = self.path(key)?;
        let key = key.to_owned();
        self.blocking("reading part of a block store file", move |s| {
            s.read_range(&path, &key, range)
        })
        .await
    }

    async fn contains(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        self.blocking("checking a block store file", move |s| {
            s.storage
                .exists(&path)
                .map_err(|e| Error::io(format!("checking {}", path.display()), e))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        self.blocking("deleting a block store file", move |s| s.remove(&path))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = prefix.to_owned();
        self.blocking("listing the block store", move |s| {
            let mut out = Vec::new();
            s.walk(&s.root, &prefix, &mut out)?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    fn location(&self) -> String {
        let abs = std::path::absolute(&self.root).unwrap_or_else(|_| self.root.clone());
        format!("filesystem directory {}", abs.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_removed_by_hand_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        store
            .put("packs/ab/x", Bytes::from_static(b"x"))
            .await
            .unwrap();
        std::fs::remove_dir_all(dir.path().join("packs")).unwrap();
        store
            .put("packs/ab/y", Bytes::from_static(b"y"))
            .await
            .unwrap();
        assert_eq!(
            store.get("packs/ab/y").await.unwrap().as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(store.get("packs/ab/x").await.unwrap(), None);
    }
}
