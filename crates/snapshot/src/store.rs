//! Block stores: where blocks, indexes and manifests live.

use std::fmt;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use sanare_core::{Error, Result};
use sanare_pg::{PgResultExt, Pool, SchemaName};
use time::OffsetDateTime;

pub use crate::fs_store::FsStore;

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

    /// Stores `data` under `key` only if nothing is stored there yet; `false` when
    /// something was. Used for the repository's `config` and lock objects, which
    /// are not content-addressed. The provided implementation checks, then puts
    /// (two writers racing may both see `true`; the repository then re-reads what
    /// was stored); stores that can create atomically override it.
    async fn put_new(&self, key: &str, data: Bytes) -> Result<bool> {
        if self.contains(key).await? {
            return Ok(false);
        }
        self.put(key, data).await?;
        Ok(true)
    }

    /// Where the store is, in words an operator recognises (`filesystem directory
    /// /var/lib/app/snapshots`, `S3 bucket backups/app at …`), for messages and
    /// the catalog's list of repositories.
    fn location(&self) -> String {
        format!("{self:?}")
    }

    /// Whether the store keeps its objects inside the database it protects (then
    /// losing that database loses the snapshots too).
    fn inside_protected_database(&self) -> bool {
        false
    }
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

/// Objects as rows of `{schema}.snapshot_objects` (created by [`crate::MIGRATIONS`]):
/// for hosts that want everything in the one database they already back up.
///
/// **The blocks live inside the database they protect.** A snapshot in a
/// `PgStore` helps against damaged or deleted rows, not against losing the
/// database: when the database is gone, so are its snapshots. `sanare snapshot
/// list` says so. For recovery from the store alone, use [`FsStore`] on another
/// disk or an S3-compatible store.
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

    async fn put_new(&self, key: &str, data: Bytes) -> Result<bool> {
        check_key(key)?;
        let conn = sanare_pg::get_conn(&self.pool).await?;
        let data: &[u8] = &data;
        let n = conn
            .execute(
                &format!(
                    "INSERT INTO {} (key, data) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                    self.table
                ),
                &[&key, &data],
            )
            .await
            .with_context(|| format!("storing object {key}"))?;
        Ok(n == 1)
    }

    fn location(&self) -> String {
        format!(
            "PostgreSQL table {} (inside the protected database)",
            self.table
        )
    }

    fn inside_protected_database(&self) -> bool {
        true
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
