//! The repository: the identity written in its store when it is created (the
//! `config` object), the key that authenticates its manifests (kept outside the
//! store), and its lock objects (`locks/…`), which keep garbage collection away
//! from captures, verifications and restores, also those of other databases
//! sharing the store (see `docs/formats.md`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sanare_core::{Error, RepositoryId, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::format::{open, seal};
use crate::store::BlockStore;

/// Store key of a repository's identity.
pub const CONFIG_KEY: &str = "config";
/// Magic of the repository's `config` object.
pub const CONFIG_MAGIC: [u8; 4] = *b"SNRC";
/// Magic of a lock object.
pub const LOCK_MAGIC: [u8; 4] = *b"SNLK";
/// Store keys of lock objects start with this.
pub const LOCK_PREFIX: &str = "locks/";
/// A lock not refreshed for this long is stale: its holder is gone.
pub const LOCK_STALE_AFTER: Duration = Duration::from_secs(30 * 60);
/// How often a held lock is refreshed.
const LOCK_REFRESH: Duration = Duration::from_secs(5 * 60);
/// The first line of a key file.
const KEY_FILE_HEADER: &str = "sanare-snapshot-key 1";

/// A repository's identity, as its `config` object holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepositoryConfig {
    /// The repository's id.
    pub id: RepositoryId,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Which process created it (host, process id, program).
    pub created_by: String,
    /// Where its store was when it was created ([`BlockStore::location`]).
    pub location: String,
}

#[derive(Serialize, Deserialize)]
struct StoredConfig {
    id: [u8; 16],
    created_at_us: i64,
    created_by: String,
    location: String,
}

impl RepositoryConfig {
    /// Encodes the `config` object (an envelope, magic `SNRC`, version 1).
    pub fn encode(&self) -> Result<Vec<u8>> {
        seal(
            CONFIG_MAGIC,
            &StoredConfig {
                id: *self.id.as_uuid().as_bytes(),
                created_at_us: unix_us(self.created_at),
                created_by: self.created_by.clone(),
                location: self.location.clone(),
            },
        )
    }

    /// Decodes and checks a `config` object.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let s: StoredConfig = open(CONFIG_MAGIC, "repository config", bytes)?;
        Ok(Self {
            id: RepositoryId::from_uuid(uuid::Uuid::from_bytes(s.id)),
            created_at: from_unix_us(s.created_at_us),
            created_by: s.created_by,
            location: s.location,
        })
    }
}

/// The repository in `store`, if one was created there.
pub(crate) async fn read_config(store: &dyn BlockStore) -> Result<Option<RepositoryConfig>> {
    match store.get(CONFIG_KEY).await? {
        Some(bytes) => RepositoryConfig::decode(&bytes).map(Some).map_err(|e| {
            Error::corrupt(
                format!("the repository config of {}", store.location()),
                format!("{e}; the repository's identity is unreadable, so nothing in it is verified or collected until it is repaired"),
            )
        }),
        None => Ok(None),
    }
}

/// Creates the repository of `store`, or returns the one another process created
/// there first.
pub(crate) async fn create_config(store: &dyn BlockStore) -> Result<RepositoryConfig> {
    let config = RepositoryConfig {
        id: RepositoryId::new(),
        created_at: OffsetDateTime::now_utc(),
        created_by: holder(),
        location: store.location(),
    };
    if store
        .put_new(CONFIG_KEY, Bytes::from(config.encode()?))
        .await?
    {
        tracing::info!(repository = %config.id, location = %config.location, "snapshot repository created");
    }
    // Whoever won, the store now says which repository this is.
    read_config(store).await?.ok_or_else(|| {
        Error::corrupt(
            format!("the repository config of {}", store.location()),
            "it vanished right after it was written",
        )
    })
}

/// Who this process is, in words: `host pid 123 (program)`.
pub(crate) fn holder() -> String {
    let program = std::env::args()
        .next()
        .and_then(|p| {
            Path::new(&p)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "?".into());
    format!("{} pid {} ({program})", hostname(), std::process::id())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

pub(crate) fn unix_us(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

pub(crate) fn from_unix_us(us: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The secret that authenticates a repository's manifests: a keyed blake3 hash
/// over each manifest, checked before any SQL is built from it. It is kept
/// outside the store (a file in the data directory by default), so whoever can
/// write to the store cannot forge a manifest that passes.
#[derive(Clone)]
pub struct RepositoryKey {
    mac_key: [u8; 32],
    id: [u8; 8],
}

impl std::fmt::Debug for RepositoryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepositoryKey({})", self.id_hex())
    }
}

impl RepositoryKey {
    /// A key from its 32 secret bytes.
    pub fn from_bytes(secret: [u8; 32]) -> Self {
        let mac_key = blake3::derive_key("sanare snapshot manifest authentication v1", &secret);
        let mut id = [0u8; 8];
        id.copy_from_slice(
            &blake3::keyed_hash(&mac_key, b"sanare snapshot key id").as_bytes()[..8],
        );
        Self { mac_key, id }
    }

    /// A new random key.
    pub fn generate() -> Result<Self> {
        Ok(Self::from_bytes(random_secret()?))
    }

    /// The key in the file at `path` (see `docs/formats.md`).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading snapshot key file {}", path.display()), e))?;
        Self::parse(&text).map_err(|why| {
            Error::config(
                "snapshots.key_file",
                format!("{} is not a snapshot key file: {why}", path.display()),
            )
        })
    }

    fn parse(text: &str) -> std::result::Result<Self, &'static str> {
        let mut lines = text.lines();
        if lines.next() != Some(KEY_FILE_HEADER) {
            return Err("its first line is not `sanare-snapshot-key 1`");
        }
        let hex = lines.next().unwrap_or_default().trim();
        let hash = blake3::Hash::from_hex(hex)
            .map_err(|_| "its second line is not 64 hexadecimal digits")?;
        Ok(Self::from_bytes(*hash.as_bytes()))
    }

    /// The key in the file at `path`, made (random, readable by its owner only)
    /// when the file does not exist.
    ///
    /// The new file is written whole under a temporary name, fsynced, linked to
    /// `path` (which never replaces a key another process made first: that one is
    /// used), and the directory fsynced. So a crash or a power cut leaves either no
    /// key file or a complete one, and a key that was returned survives.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        if path.exists() {
            return Self::load(path);
        }
        let secret = random_secret()?;
        let text = format!(
            "{KEY_FILE_HEADER}\n{}\n",
            blake3::Hash::from_bytes(secret).to_hex()
        );
        if write_private_new(path, text.as_bytes())? {
            tracing::info!(path = %path.display(), "snapshot key created; keep a copy outside the data directory");
            Ok(Self::from_bytes(secret))
        } else {
            // Another process made it first: use that one.
            Self::load(path)
        }
    }

    /// The key's public id (8 bytes): which key signed a manifest.
    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    /// The key's id in hex.
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The keyed hash of `data`.
    pub(crate) fn mac(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.mac_key, data).as_bytes()
    }
}

/// Writes `bytes` as the new file `path`, readable by its owner only, durably and
/// whole: `false` (and nothing written) when `path` exists.
fn write_private_new(path: &Path, bytes: &[u8]) -> Result<bool> {
    use sanare_fs::Storage;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let os = sanare_fs::OsStorage;
    let ctx = || format!("writing snapshot key file {}", path.display());
    let dir = sanare_fs::parent(path).map_err(|e| Error::io(ctx(), e))?;
    // Durable in its parent when it returns (the directory is new only once).
    os.create_dir_all(dir).map_err(|e| Error::io(ctx(), e))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io(ctx(), e))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(ctx(), e))?;
        let created = match os.hard_link(&tmp, path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(Error::io(ctx(), e)),
        };
        os.sync_dir(dir).map_err(|e| Error::io(ctx(), e))?;
        Ok(created)
    })();
    let _ = os.remove_file(&tmp);
    result
}

fn random_secret() -> Result<[u8; 32]> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| {
        Error::unavailable(format!(
            "the operating system's random source failed ({e}); a snapshot key cannot be made"
        ))
    })?;
    Ok(secret)
}

/// A lock object, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LockInfo {
    pub(crate) exclusive: bool,
    pub(crate) host: String,
    pub(crate) pid: u32,
    pub(crate) holder: String,
    pub(crate) purpose: String,
    pub(crate) created_at_us: i64,
    pub(crate) refreshed_at_us: i64,
}

impl LockInfo {
    fn describe(&self) -> String {
        format!(
            "{} lock for {} held by {} since {}",
            if self.exclusive { "an exclusive" } else { "a" },
            self.purpose,
            self.holder,
            from_unix_us(self.created_at_us)
        )
    }

    /// Whether the holder is gone: not refreshed for [`LOCK_STALE_AFTER`], or a
    /// process of this host that no longer runs.
    fn is_stale(&self, now: OffsetDateTime) -> bool {
        let age = now - from_unix_us(self.refreshed_at_us);
        if age > LOCK_STALE_AFTER {
            return true;
        }
        self.host == hostname()
            && Path::new("/proc/self").exists()
            && !Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// A lock this process holds on a repository; refreshed in the background while
/// held, removed by [`RepoLock::release`] (or, best effort, on drop).
pub(crate) struct RepoLock {
    store: Arc<dyn BlockStore>,
    key: String,
    refresher: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RepoLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoLock").field("key", &self.key).finish()
    }
}

/// The live locks of `store` other than `own`, each with its key; an unreadable
/// lock object counts as a live exclusive lock (it may be one).
async fn live_locks(store: &dyn BlockStore, own: Option<&str>) -> Result<Vec<(String, LockInfo)>> {
    let now = OffsetDateTime::now_utc();
    let mut out = Vec::new();
    for meta in store.list(LOCK_PREFIX).await? {
        if Some(meta.key.as_str()) == own {
            continue;
        }
        let Some(bytes) = store.get(&meta.key).await? else {
            continue;
        };
        let info = match open::<LockInfo>(LOCK_MAGIC, "lock", &bytes) {
            Ok(info) => info,
            Err(e) => LockInfo {
                exclusive: true,
                host: String::new(),
                pid: 0,
                holder: format!(
                    "an unreadable lock object ({e}); delete {} if no sanare process uses the repository",
                    meta.key
                ),
                purpose: "unknown".into(),
                created_at_us: unix_us(meta.modified),
                refreshed_at_us: unix_us(now),
            },
        };
        if !info.is_stale(now) {
            out.push((meta.key, info));
        }
    }
    Ok(out)
}

fn conflicts(exclusive: bool, others: &[(String, LockInfo)]) -> Option<&LockInfo> {
    others
        .iter()
        .map(|(_, l)| l)
        .find(|l| exclusive || l.exclusive)
}

impl RepoLock {
    /// Takes a lock on the repository in `store`: shared (captures, verify,
    /// restore) or exclusive (GC). Waits up to `wait` for conflicting locks to go,
    /// then fails naming the holder.
    ///
    /// Two-phase, as restic does: check for conflicting locks, write our own,
    /// then check again and back off if a conflicting one appeared meanwhile. Of
    /// two processes racing, at least the later one sees the other's lock.
    pub(crate) async fn acquire(
        store: &Arc<dyn BlockStore>,
        exclusive: bool,
        purpose: &str,
        wait: Duration,
    ) -> Result<Self> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut backoff = Duration::from_millis(50);
        loop {
            let blocker = match conflicts(exclusive, &live_locks(&**store, None).await?) {
                Some(l) => Some(l.describe()),
                None => {
                    let lock = Self::write(store, exclusive, purpose).await?;
                    match conflicts(exclusive, &live_locks(&**store, Some(&lock.key)).await?) {
                        None => return Ok(lock),
                        Some(l) => {
                            let why = l.describe();
                            lock.release().await?;
                            Some(why)
                        }
                    }
                }
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::conflict(format!(
                    "the snapshot repository in {} is locked: {}; wait for it to finish (a lock not refreshed for {} minutes is ignored)",
                    store.location(),
                    blocker.unwrap_or_default(),
                    LOCK_STALE_AFTER.as_secs() / 60
                )));
            }
            let jitter = Duration::from_millis(u64::from(getrandom::u32().unwrap_or(0) % 256));
            tokio::time::sleep((backoff + jitter).min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn write(store: &Arc<dyn BlockStore>, exclusive: bool, purpose: &str) -> Result<Self> {
        let now = unix_us(OffsetDateTime::now_utc());
        let mut info = LockInfo {
            exclusive,
            host: hostname(),
            pid: std::process::id(),
            holder: holder(),
            purpose: purpose.to_owned(),
            created_at_us: now,
            refreshed_at_us: now,
        };
        let key = format!("{LOCK_PREFIX}{}", uuid::Uuid::now_v7().simple());
        store
            .put(&key, Bytes::from(seal(LOCK_MAGIC, &info)?))
            .await?;
        let refresher = {
            let store = Arc::clone(store);
            let key = key.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(LOCK_REFRESH).await;
                    info.refreshed_at_us = unix_us(OffsetDateTime::now_utc());
                    let put = match seal(LOCK_MAGIC, &info) {
                        Ok(bytes) => store.put(&key, Bytes::from(bytes)).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = put {
                        tracing::warn!(lock = %key, error = %e, "could not refresh a repository lock");
                    }
                }
            })
        };
        Ok(Self {
            store: Arc::clone(store),
            key,
            refresher: Some(refresher),
        })
    }

    /// Removes the lock.
    pub(crate) async fn release(mut self) -> Result<()> {
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
        self.store.delete(&self.key).await
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        let Some(r) = self.refresher.take() else {
            return;
        };
        r.abort();
        // Dropped without `release` (an error or a cancelled future): remove the
        // lock in the background; if that cannot run, it goes stale.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = Arc::clone(&self.store);
            let key = std::mem::take(&mut self.key);
            rt.spawn(async move {
                if let Err(e) = store.delete(&key).await {
                    tracing::warn!(lock = %key, error = %e, "could not remove a repository lock");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FsStore;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn config_golden_vector() {
        let config = RepositoryConfig {
            id: RepositoryId::from_uuid(uuid::Uuid::from_bytes([7; 16])),
            created_at: from_unix_us(1_700_000_000_000_000),
            created_by: "h pid 1 (p)".into(),
            location: "l".into(),
        };
        let bytes = config.encode().unwrap();
        assert_eq!(hex(&bytes[..6]), "534e52430100", "magic SNRC, version 1");
        assert_eq!(
            hex(&bytes[10..bytes.len() - 32]),
            concat!(
                "07070707070707070707070707070707", // id
                "8080f28183898506",                 // created_at_us (zigzag varint)
                "0b",
                "6820706964203120287029", // created_by "h pid 1 (p)"
                "01",
                "6c", // location "l"
            )
        );
        assert_eq!(RepositoryConfig::decode(&bytes).unwrap(), config);
        let mut bad = bytes.clone();
        bad[12] ^= 1;
        assert!(RepositoryConfig::decode(&bad).is_err());
    }

    #[test]
    fn key_files_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/snapshot.key");
        let made = RepositoryKey::load_or_create(&path).unwrap();
        let again = RepositoryKey::load_or_create(&path).unwrap();
        assert_eq!(made.id(), again.id());
        assert_eq!(made.mac(b"x"), again.mac(b"x"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = RepositoryKey::generate().unwrap();
        assert_ne!(other.id(), made.id());
        assert_ne!(other.mac(b"x"), made.mac(b"x"));
        // A known key: its id and mac are fixed.
        let known = RepositoryKey::from_bytes([1; 32]);
        assert_eq!(known.id().len(), 8);
        assert_eq!(
            RepositoryKey::parse(&format!("{KEY_FILE_HEADER}\n{}\n", hex(&[1; 32])))
                .unwrap()
                .id(),
            known.id()
        );
        for bad in ["", "sanare-snapshot-key 2\n00", "sanare-snapshot-key 1\nzz"] {
            std::fs::write(&path, bad).unwrap();
            let err = RepositoryKey::load(&path).unwrap_err();
            assert!(err.to_string().contains("not a snapshot key file"), "{err}");
        }
    }

    fn store() -> (tempfile::TempDir, Arc<dyn BlockStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlockStore> = Arc::new(FsStore::new(dir.path()).unwrap());
        (dir, store)
    }

    #[tokio::test]
    async fn a_repository_is_created_once() {
        let (_dir, store) = store();
        assert!(read_config(&*store).await.unwrap().is_none());
        let (a, b) = tokio::join!(create_config(&*store), create_config(&*store));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.id, b.id, "racing creators agree on one repository");
        assert_eq!(read_config(&*store).await.unwrap().unwrap(), a);
        assert!(a.location.contains("filesystem directory"));
    }

    #[tokio::test]
    async fn shared_locks_share_and_exclusive_ones_wait_or_fail() {
        let (_dir, store) = store();
        let s1 = RepoLock::acquire(&store, false, "capture", Duration::ZERO)
            .await
            .unwrap();
        let s2 = RepoLock::acquire(&store, false, "verify", Duration::ZERO)
            .await
            .unwrap();
        let err = RepoLock::acquire(&store, true, "gc", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("locked") && err.to_string().contains("capture"),
            "{err}"
        );
        s1.release().await.unwrap();
        s2.release().await.unwrap();
        let x = RepoLock::acquire(&store, true, "gc", Duration::ZERO)
            .await
            .unwrap();
        assert!(
            RepoLock::acquire(&store, false, "capture", Duration::ZERO)
                .await
                .is_err()
        );
        // A waiting shared lock gets in once the exclusive one goes.
        let waiting = {
            let store = store.clone();
            tokio::spawn(async move {
                RepoLock::acquire(&store, false, "capture", Duration::from_secs(30)).await
            })
        };
        x.release().await.unwrap();
        waiting.await.unwrap().unwrap().release().await.unwrap();
        assert!(store.list(LOCK_PREFIX).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn stale_and_dead_locks_are_ignored() {
        let (_dir, store) = store();
        let now = unix_us(OffsetDateTime::now_utc());
        let old = LockInfo {
            exclusive: true,
            host: "elsewhere".into(),
            pid: 1,
            holder: "old".into(),
            purpose: "gc".into(),
            created_at_us: now - 3_600_000_000,
            refreshed_at_us: now - 3_600_000_000,
        };
        store
            .put("locks/old", Bytes::from(seal(LOCK_MAGIC, &old).unwrap()))
            .await
            .unwrap();
        // A process of this host that no longer runs (pid beyond pid_max).
        let dead = LockInfo {
            host: hostname(),
            pid: u32::MAX - 1,
            refreshed_at_us: now,
            ..old.clone()
        };
        store
            .put("locks/dead", Bytes::from(seal(LOCK_MAGIC, &dead).unwrap()))
            .await
            .unwrap();
        let lock = RepoLock::acquire(&store, false, "capture", Duration::ZERO)
            .await
            .unwrap();
        lock.release().await.unwrap();
        // The same lock, fresh and held elsewhere, blocks.
        let live = LockInfo {
            refreshed_at_us: now,
            ..old
        };
        store
            .put("locks/live", Bytes::from(seal(LOCK_MAGIC, &live).unwrap()))
            .await
            .unwrap();
        assert!(
            RepoLock::acquire(&store, false, "capture", Duration::ZERO)
                .await
                .is_err()
        );
        // So does a damaged lock object.
        store.delete("locks/live").await.unwrap();
        store
            .put("locks/garbled", Bytes::from_static(b"nonsense"))
            .await
            .unwrap();
        let err = RepoLock::acquire(&store, false, "capture", Duration::ZERO)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("locks/garbled"), "{err}");
    }
}
