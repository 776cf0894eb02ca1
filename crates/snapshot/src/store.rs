//! Block stores: where blocks, indexes and manifests live.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use sanare_core::{Error, Result};
use sanare_pg::{PgResultExt, Pool, SchemaName};
use time::OffsetDateTime;

/// An object listed by a store.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ObjectMeta {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written.
    pub modified: OffsetDateTime,
}

impl ObjectMeta {
    /// An object `key` of `size` bytes last written at `modified` (for
    /// [`BlockStore::list`] implementations outside this crate).
    pub fn new(key: impl Into<String>, size: u64, modified: OffsetDateTime) -> Self {
        Self {
            key: key.into(),
            size,
            modified,
        }
    }
}

/// A content store of immutable objects addressed by keys (`blocks/ab/ab12…`,
/// `indexes/<id>`, `manifests/<id>`).
///
/// # Contract
/// - `put` is atomic and durable when it returns: a reader sees either nothing or
///   the whole object, also after a crash. Putting an existing key replaces it with
///   the same bytes (blocks are content-addressed), so concurrent puts are harmless.
/// - `get` of a missing key is `Ok(None)`, never an error.
/// - Every method may be called concurrently from many tasks. Methods do not time
///   out on their own; cancel by dropping the future (a dropped `put` leaves either
///   no object or the whole object).
#[async_trait]
pub trait BlockStore: Send + Sync + fmt::Debug {
    /// Stores `data` under `key`.
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;
    /// The object under `key`.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;
    /// The bytes `range` of the object under `key` (`Ok(None)` when it is missing).
    /// A range reaching past the object's end is [`Error::Corrupt`]: the object is
    /// shorter than whoever asked expected. The provided implementation reads the
    /// whole object; stores that can read part of one override it.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Option<Bytes>> {
        let Some(all) = self.get(key).await? else {
            return Ok(None);
        };
        slice_range(key, all, range).map(Some)
    }
    /// Whether `key` exists.
    async fn contains(&self, key: &str) -> Result<bool>;
    /// Deletes `key` (no error if missing).
    async fn delete(&self, key: &str) -> Result<()>;
    /// Every object whose key starts with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
}

/// `range` of `all`, the object `key`, or why it cannot be.
pub(crate) fn slice_range(key: &str, all: Bytes, range: Range<u64>) -> Result<Bytes> {
    if range.start > range.end || range.end > all.len() as u64 {
        return Err(short_object(key, all.len() as u64, &range));
    }
    Ok(all.slice(range.start as usize..range.end as usize))
}

pub(crate) fn short_object(key: &str, size: u64, range: &Range<u64>) -> Error {
    Error::corrupt(
        format!("object {key}"),
        format!(
            "bytes {}..{} were asked for, it holds {size} (truncated?)",
            range.start, range.end
        ),
    )
}

pub(crate) fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 512
        && key
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_input(format!(
            "`{key}` is not a valid block store key (ASCII letters, digits, `-_./`, no empty or dot segments)"
        )))
    }
}

/// Objects as files under a directory: the embedded default.
///
/// A put writes a temporary file, fsyncs it, renames it into place and fsyncs the
/// directory, so an object is either absent or complete after a crash.
#[derive(Clone, Debug)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// A store rooted at `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(|e| Error::io(format!("creating block store {}", root.display()), e))?;
        Ok(Self { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

#[async_trait]
impl BlockStore for FsStore {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        tokio::task::spawn_blocking(move || write_atomic(&path, &data))
            .await
            .map_err(|e| Error::other("writing a block file", e))?
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Option<Bytes>> {
        let path = self.path(key)?;
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || read_range(&path, &key, range))
            .await
            .map_err(|e| Error::other("reading part of a block store file", e))?
    }

    async fn contains(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        tokio::fs::try_exists(&path)
            .await
            .map_err(|e| Error::io(format!("checking {}", path.display()), e))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("deleting {}", path.display()), e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&root, &root, &prefix, &mut out)?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .map_err(|e| Error::other("listing the block store", e))?
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .ok_or_else(|| Error::invalid_input("a block path has no parent"))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    let ctx = || format!("writing {}", path.display());
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(ctx(), e))?;
        f.write_all(data).map_err(|e| Error::io(ctx(), e))?;
        f.sync_all().map_err(|e| Error::io(ctx(), e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(ctx(), e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn read_range(path: &Path, key: &str, range: Range<u64>) -> Result<Option<Bytes>> {
    use std::os::unix::fs::FileExt;
    let ctx = || format!("reading {}", path.display());
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(ctx(), e)),
    };
    let size = file.metadata().map_err(|e| Error::io(ctx(), e))?.len();
    if range.start > range.end || range.end > size {
        return Err(short_object(key, size, &range));
    }
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    file.read_exact_at(&mut buf, range.start)
        .map_err(|e| Error::io(ctx(), e))?;
    Ok(Some(Bytes::from(buf)))
}

fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<ObjectMeta>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let path = entry.path();
        let meta = entry
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        let key = rel.to_string_lossy().replace('\\', "/");
        if meta.is_dir() {
            if prefix.starts_with(&format!("{key}/"))
                || key.starts_with(prefix)
                || prefix.is_empty()
            {
                walk(root, &path, prefix, out)?;
            }
        } else if key.starts_with(prefix)
            && !entry.file_name().to_string_lossy().starts_with(".tmp-")
        {
            let modified = meta
                .modified()
                .map(OffsetDateTime::from)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
            out.push(ObjectMeta {
                key,
                size: meta.len(),
                modified,
            });
        }
    }
    Ok(())
}

/// Objects as rows of `{schema}.snapshot_objects` (created by [`crate::MIGRATIONS`]):
/// for hosts that want everything in the one database they already back up.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    table: String,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("table", &self.table)
            .finish()
    }
}

impl PgStore {
    /// A store in `schema` of the database behind `pool` (run [`crate::migrate`] first).
    pub fn new(pool: Pool, schema: &SchemaName) -> Self {
        Self {
            pool,
            table: schema.table("snapshot_objects"),
        }
    }
}

#[async_trait]
impl BlockStore for PgStore {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        check_key(key)?;
        let conn = sanare_pg::get_conn(&self.pool).await?;
        let data: &[u8] = &data;
        conn.execute(
            &format!(
                "INSERT INTO {} (key, data) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET data = EXCLUDED.data, created_at = now()",
                self.table
            ),
            &[&key, &data],
        )
        .await
        .with_context(|| format!("storing object {key}"))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        check_key(key)?;
        let conn = sanare_pg::get_conn(&self.pool).await?;
        let row = conn
            .query_opt(
                &format!("SELECT data FROM {} WHERE key = $1", self.table),
                &[&key],
            )
            .await
            .with_context(|| format!("reading object {key}"))?;
        Ok(row.map(|r| Bytes::from(r.get::<_, Vec<u8>>(0))))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Option<Bytes>> {
        check_key(key)?;
        let (Ok(from), Ok(len)) = (
            i64::try_from(range.start),
            i64::try_from(range.end.saturating_sub(range.start)),
        ) else {
            return Err(short_object(key, 0, &range));
        };
        let conn = sanare_pg::get_conn(&self.pool).await?;
        // `data` is stored uncompressed (STORAGE EXTERNAL), so substring reads only
        // the TOAST chunks it needs.
        let row = conn
            .query_opt(
                &format!(
                    "SELECT substring(data FROM ($2::bigint + 1)::int FOR $3::bigint::int),
                            octet_length(data)::bigint FROM {} WHERE key = $1",
                    self.table
                ),
                &[&key, &from, &len],
            )
            .await
            .with_context(|| format!("reading part of object {key}"))?;
        let Some(row) = row else { return Ok(None) };
        let size: i64 = row.get(1);
        if range.start > range.end || range.end > size.max(0) as u64 {
            return Err(short_object(key, size.max(0) as u64, &range));
        }
        Ok(Some(Bytes::from(row.get::<_, Vec<u8>>(0))))
    }

    async fn contains(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        let conn = sanare_pg::get_conn(&self.pool).await?;
        let row = conn
            .query_opt(
                &format!("SELECT 1 FROM {} WHERE key = $1", self.table),
                &[&key],
            )
            .await
            .with_context(|| format!("looking up object {key}"))?;
        Ok(row.is_some())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        let conn = sanare_pg::get_conn(&self.pool).await?;
        conn.execute(
            &format!("DELETE FROM {} WHERE key = $1", self.table),
            &[&key],
        )
        .await
        .with_context(|| format!("deleting object {key}"))?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let conn = sanare_pg::get_conn(&self.pool).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT key, octet_length(data)::bigint, created_at FROM {}
                      WHERE starts_with(key, $1) ORDER BY key",
                    self.table
                ),
                &[&prefix],
            )
            .await
            .context("listing objects")?;
        Ok(rows
            .iter()
            .map(|r| ObjectMeta {
                key: r.get(0),
                size: r.get::<_, i64>(1).max(0) as u64,
                modified: r.get(2),
            })
            .collect())
    }
}
