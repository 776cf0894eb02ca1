//! The snapshot service: capture, restore, rows by key, verify, retention, GC.
//!
//! This module holds the configuration, the builder, the service type and its
//! catalog; each concern of the service lives in a child module.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use sanare_core::{
    ColumnValue, Control, Error, Event, EventBus, JournalCut, JournalPosition, JournalService,
    ReplayRange, ReplayRequest, ReplaySummary, RepositoryId, RestoreOutcome, RestoreRequest,
    RestoreTarget, Result, RowImage, RowRef, SnapshotId, SnapshotInfo, SnapshotRequest,
    SnapshotService, SnapshotStatus, TableRef, TableRowCount, VerifyReport,
};
use sanare_pg::{PgResultExt, Pool, SchemaName, quote_ident, quote_literal};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio_postgres::IsolationLevel;

use crate::copy::{self, Chunker, RowBlock};
use crate::format::{
    BlockId, BlockRef, ChunkParams, Codec, ColumnDef, Index, Manifest, SequenceState, StoredCut,
    StreamIndex, TableIndex, bloom, decode_block, encode_block,
};
use crate::pack::{
    BlockLocation, PACK_PREFIX, PackBuilder, PackEntry, PackInfo, PackMap, PackWriter,
};
use crate::repo::{RepoLock, RepositoryConfig, RepositoryKey};
use crate::source::{ByteChunker, SourceInfo, StateSource};
use crate::store::BlockStore;

mod blocks;
mod capture;
mod catalog;
mod encode;
mod maintenance;
mod parallel;
mod pitr;
mod restore;
mod rows;
mod schema;
mod sources;
mod verify;

pub use catalog::{Availability, ListedSnapshot, RepositoryListing};

/// How a [`Snapshots`] service captures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SnapshotConfig {
    /// Content-defined chunking parameters.
    pub chunking: ChunkParams,
    /// Codec for new blocks.
    pub codec: Codec,
    /// Schemas captured when a request names neither tables nor schemas (every
    /// non-system schema except sanare's when empty).
    pub default_schemas: Vec<String>,
    /// Blocks compressed at once per table.
    pub write_concurrency: usize,
    /// Bytes of blocks collected into one pack object before it is stored (see
    /// `docs/formats.md`): larger packs mean fewer store writes (for [`crate::FsStore`]
    /// fewer fsyncs), smaller ones let GC free space in finer steps. 64 KiB to 1 GiB.
    pub pack_size: u32,
    /// Tables captured at once, each on its own connection importing the capture's
    /// snapshot (`pg_export_snapshot`); 1 captures on one connection. Never more
    /// than the pool's size.
    pub capture_concurrency: usize,
    /// Blocks fetched at once during restore and verify.
    pub read_concurrency: usize,
    /// `maintenance_work_mem` (MiB) of the restore transaction, in which the
    /// restored tables' indexes and keys are rebuilt; 0 keeps the server's setting.
    pub restore_maintenance_work_mem_mb: u32,
    /// How long a capture, verify or restore waits for a garbage collection
    /// holding the repository's lock (and GC for them) before giving up.
    pub lock_wait: Duration,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            chunking: ChunkParams::default(),
            codec: Codec::Lz4,
            default_schemas: Vec::new(),
            write_concurrency: 4,
            pack_size: 8 * 1024 * 1024,
            capture_concurrency: 2,
            restore_maintenance_work_mem_mb: 256,
            read_concurrency: 8,
            lock_wait: Duration::from_secs(10 * 60),
        }
    }
}

/// Which snapshots to keep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RetentionPolicy {
    /// Keep the newest `keep_last` ready snapshots.
    pub keep_last: usize,
    /// Keep every snapshot younger than this.
    pub keep_within: Duration,
}

impl RetentionPolicy {
    /// Keep the last `n` and everything younger than `within` (always at least one).
    pub fn new(keep_last: usize, keep_within: Duration) -> Self {
        Self {
            keep_last,
            keep_within,
        }
    }
}

/// What a garbage collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GcReport {
    /// Snapshots marked deleted by retention.
    pub snapshots_deleted: u64,
    /// Blocks referenced by a live snapshot.
    pub blocks_live: u64,
    /// Unreferenced blocks deleted.
    pub blocks_deleted: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Unreferenced blocks kept because they are younger than the grace period.
    pub blocks_in_grace: u64,
    /// Packs deleted because none of their blocks is referenced.
    pub packs_deleted: u64,
    /// Packs rewritten without their unreferenced blocks, or merged because they
    /// were small.
    pub packs_rewritten: u64,
    /// Packs left as they were because a live block in them did not decode (a
    /// damaged block, or a delta whose base is damaged or gone): verify the
    /// snapshots that use them.
    #[serde(default)]
    pub packs_kept_damaged: u64,
    /// Snapshots whose blocks were kept: every manifest in the store, also those
    /// of other databases sharing it.
    pub snapshots_in_store: u64,
    /// Catalog rows of captures that never finished (the process ended), marked
    /// deleted, with their index and manifest removed.
    pub crashed_captures: u64,
}

/// What the store holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StorageStats {
    /// Snapshots by status.
    pub snapshots: BTreeMap<String, u64>,
    /// Blocks stored.
    pub blocks: u64,
    /// Bytes of stored blocks (of the packs holding them, tables of contents included).
    pub block_bytes: u64,
    /// Pack objects.
    pub packs: u64,
    /// Sum of the uncompressed sizes of ready snapshots.
    pub logical_bytes: u64,
}

/// What a point-in-time recovery did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PitrOutcome {
    /// The restore.
    pub restore: RestoreOutcome,
    /// The journal replay after it, up to the point in time (none without a
    /// journal).
    pub replay: Option<ReplaySummary>,
    /// Newer snapshots before the point in time that could not be restored
    /// (damaged), each with why, newest first.
    #[serde(default)]
    pub skipped: Vec<(SnapshotId, String)>,
}

/// Builds a [`Snapshots`] service.
#[derive(Default)]
#[must_use]
pub struct SnapshotsBuilder {
    store: Option<Arc<dyn BlockStore>>,
    pool: Option<Pool>,
    schema: Option<SchemaName>,
    journal: Option<Arc<dyn JournalService>>,
    events: Option<EventBus>,
    config: SnapshotConfig,
    sources: Vec<Arc<dyn StateSource>>,
    key: Option<RepositoryKey>,
    new_repository: bool,
    without_catalog: bool,
}

impl SnapshotsBuilder {
    /// The key that signs new manifests and authenticates stored ones (see
    /// [`RepositoryKey`]). Without one, a manifest is trusted only when the
    /// catalog holds its hash, so nothing can be restored from the store alone.
    pub fn key(mut self, key: RepositoryKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Lets a capture create a new repository in a store that holds none even
    /// though the catalog's snapshots live in another repository (default: such a
    /// capture is refused, naming the repository the catalog expects).
    pub fn new_repository(mut self, allow: bool) -> Self {
        self.new_repository = allow;
        self
    }

    /// A service over the store alone, for when the database is gone: it lists
    /// and verifies what the store holds (nothing is marked: there is no catalog).
    /// Capture, restore and rows by key need a database and are refused.
    pub fn without_catalog(mut self) -> Self {
        self.without_catalog = true;
        self
    }

    /// A host byte stream captured in every snapshot after the tables (see
    /// [`StateSource`]); call once per source.
    pub fn source(mut self, source: Arc<dyn StateSource>) -> Self {
        self.sources.push(source);
        self
    }

    /// Where blocks go (required).
    pub fn store(mut self, store: Arc<dyn BlockStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The database whose tables are captured and where the catalog lives (required).
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// sanare's schema (default `sanare`).
    pub fn schema(mut self, schema: SchemaName) -> Self {
        self.schema = Some(schema);
        self
    }

    /// The journal whose cut each snapshot records and which point-in-time recovery
    /// replays.
    pub fn journal(mut self, journal: Arc<dyn JournalService>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Where events go.
    pub fn events(mut self, events: EventBus) -> Self {
        self.events = Some(events);
        self
    }

    /// Capture settings.
    pub fn config(mut self, config: SnapshotConfig) -> Self {
        self.config = config;
        self
    }

    /// The service. Run [`crate::migrate`] once before using it.
    pub fn build(self) -> Result<Snapshots> {
        let store = self
            .store
            .ok_or_else(|| Error::config("snapshot.store", "a block store is required"))?;
        let pool = match (self.pool, self.without_catalog) {
            (Some(pool), false) => pool,
            (None, true) => catalog::no_database_pool()?,
            (Some(_), true) => {
                return Err(Error::config(
                    "snapshot.pool",
                    "a service without a catalog takes no database pool",
                ));
            }
            (None, false) => {
                return Err(Error::config(
                    "snapshot.pool",
                    "a database pool is required",
                ));
            }
        };
        let c = &self.config.chunking;
        if !(64 <= c.min_size && c.min_size <= c.avg_size && c.avg_size <= c.max_size)
            || c.avg_size < 256
            || c.max_size < 1024
            || c.max_size > 16 * 1024 * 1024
        {
            return Err(Error::config(
                "snapshot.chunking",
                "expected 64 <= min <= avg <= max, avg >= 256, 1 KiB <= max <= 16 MiB",
            ));
        }
        if !(64 * 1024..=1 << 30).contains(&self.config.pack_size) {
            return Err(Error::config(
                "snapshot.pack_size",
                format!("{} bytes is outside 64 KiB to 1 GiB", self.config.pack_size),
            ));
        }
        let mut names = BTreeSet::new();
        for source in &self.sources {
            crate::source::check_name(source.name())?;
            if !names.insert(source.name().to_owned()) {
                return Err(Error::config(
                    "snapshot.sources",
                    format!("two state sources are named `{}`", source.name()),
                ));
            }
        }
        Ok(Snapshots {
            inner: Arc::new(Inner {
                sources: self.sources,
                store,
                pool,
                schema: self.schema.unwrap_or_else(SchemaName::default_schema),
                journal: self.journal,
                events: self.events,
                config: self.config,
                index_cache: Mutex::new(None),
                packs: tokio::sync::RwLock::new(PackMap::default()),
                packs_loaded: std::sync::atomic::AtomicBool::new(false),
                index: crate::pack_index::SharedIndex::default(),
                key: self.key,
                new_repository: self.new_repository,
                catalog: !self.without_catalog,
                repo: Mutex::new(None),
                verifying: std::sync::Mutex::default(),
                manifest_cache: Mutex::new(None),
            }),
        })
    }
}

/// Snapshots of PostgreSQL tables in a block store; implements [`SnapshotService`].
#[derive(Clone)]
pub struct Snapshots {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots")
            .field("store", &self.inner.store)
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<dyn BlockStore>,
    pool: Pool,
    schema: SchemaName,
    journal: Option<Arc<dyn JournalService>>,
    events: Option<EventBus>,
    config: SnapshotConfig,
    sources: Vec<Arc<dyn StateSource>>,
    index_cache: Mutex<Option<(SnapshotId, Arc<Index>)>>,
    /// Where every packed block is; loaded on first use, refreshed when a block is
    /// not found in it (another process may have written or rewritten packs).
    packs: tokio::sync::RwLock<PackMap>,
    packs_loaded: std::sync::atomic::AtomicBool,
    /// Where every packed block is, in bounded memory (on local disk past a bound):
    /// what capture, restore and rows by key use.
    index: crate::pack_index::SharedIndex,
    /// Signs new manifests and authenticates stored ones.
    key: Option<RepositoryKey>,
    /// Whether a capture may create a repository the catalog does not expect.
    new_repository: bool,
    /// Whether there is a catalog (false: the store alone).
    catalog: bool,
    /// The repository of the store, once opened.
    repo: Mutex<Option<catalog::Opened>>,
    /// Snapshots being verified after a failed read.
    verifying: std::sync::Mutex<std::collections::HashSet<SnapshotId>>,
    /// The last manifest loaded, authenticated.
    manifest_cache: Mutex<Option<(SnapshotId, Arc<Manifest>)>>,
}

fn advisory_key(schema: &SchemaName) -> i64 {
    let h = blake3::hash(format!("sanare:snapshot:gc:{schema}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    i64::from_le_bytes(b)
}

fn manifest_key(id: SnapshotId) -> String {
    format!("manifests/{id}")
}

fn index_key(id: SnapshotId) -> String {
    format!("indexes/{id}")
}

fn status_str(s: SnapshotStatus) -> &'static str {
    s.as_str()
}

fn parse_status(s: &str) -> SnapshotStatus {
    match s {
        "creating" => SnapshotStatus::Creating,
        "ready" => SnapshotStatus::Ready,
        "validating" => SnapshotStatus::Validating,
        "corrupted" => SnapshotStatus::Corrupted,
        "archived" => SnapshotStatus::Archived,
        _ => SnapshotStatus::Deleted,
    }
}

impl Snapshots {
    /// A builder.
    pub fn builder() -> SnapshotsBuilder {
        SnapshotsBuilder::default()
    }

    /// The block store.
    pub fn store(&self) -> &Arc<dyn BlockStore> {
        &self.inner.store
    }

    fn table(&self, name: &str) -> String {
        self.inner.schema.table(name)
    }

    /// Sets the catalog status of `id` (and its error, when given), recording
    /// the change and who made it in the status log.
    async fn set_status(
        &self,
        id: SnapshotId,
        status: SnapshotStatus,
        error: Option<&str>,
    ) -> Result<()> {
        self.change_status(id, status, error, None).await
    }

    /// The snapshots of this database in the repository this service opens,
    /// newest first: what it may restore, verify, keep or delete. Snapshots of
    /// other repositories are listed by [`Snapshots::list_all`].
    pub async fn list(&self) -> Result<Vec<SnapshotInfo>> {
        let Some(repo) = self.repository().await? else {
            return Ok(Vec::new());
        };
        if !self.inner.catalog {
            return Ok(self
                .list_all()
                .await?
                .snapshots
                .into_iter()
                .map(|s| s.info)
                .collect());
        }
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT id, status, created_at, info, repository FROM {}
                      WHERE repository = $1 AND database_id = $2
                      ORDER BY created_at DESC, id DESC",
                    self.table("snapshots")
                ),
                &[&repo.config.id.as_uuid(), &repo.database],
            )
            .await
            .context("listing snapshots")?;
        rows.iter().map(row_info).collect()
    }

    /// One snapshot's catalog entry (in any repository); without a catalog, what
    /// its manifest in the store says.
    pub async fn get(&self, id: SnapshotId) -> Result<SnapshotInfo> {
        if !self.inner.catalog {
            return self.store_info(id).await;
        }
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let row = conn
            .query_opt(
                &format!(
                    "SELECT id, status, created_at, info, repository FROM {} WHERE id = $1",
                    self.table("snapshots")
                ),
                &[&id.as_uuid()],
            )
            .await
            .with_context(|| format!("reading snapshot {id}"))?
            .ok_or_else(|| Error::not_found(format!("snapshot {id}")))?;
        row_info(&row)
    }

    /// The manifest of snapshot `id`, checked intact and authentic before anything
    /// (SQL included) is built from what it says: signed with this service's key,
    /// or matching the hash the catalog recorded when the snapshot was taken.
    /// Without a catalog no SQL can run, and an unsigned manifest is read as is.
    async fn load_manifest(&self, id: SnapshotId) -> Result<Arc<Manifest>> {
        let bytes = self
            .inner
            .store
            .get(&manifest_key(id))
            .await?
            .ok_or_else(|| Error::corrupt(format!("snapshot {id}"), "its manifest is missing"))?;
        let manifest = Manifest::decode(&bytes)
            .map_err(|e| Error::corrupt(format!("snapshot {id}"), e.to_string()))?;
        self.authenticate_manifest(id, &manifest, &bytes).await?;
        let manifest = Arc::new(manifest);
        *self.inner.manifest_cache.lock().await = Some((id, manifest.clone()));
        Ok(manifest)
    }

    /// The manifest of `id` loaded (and authenticated) last, if it is the last
    /// one loaded; else [`Snapshots::load_manifest`]. For a restore, which
    /// loads the index (and so the manifest) before it takes a connection.
    async fn cached_manifest(&self, id: SnapshotId) -> Result<Arc<Manifest>> {
        let cached = self
            .inner
            .manifest_cache
            .lock()
            .await
            .as_ref()
            .filter(|(cached, _)| *cached == id)
            .map(|(_, m)| m.clone());
        match cached {
            Some(m) => Ok(m),
            None => self.load_manifest(id).await,
        }
    }

    async fn load_index(&self, id: SnapshotId) -> Result<Arc<Index>> {
        let cached = self
            .inner
            .index_cache
            .lock()
            .await
            .as_ref()
            .filter(|(cached, _)| *cached == id)
            .map(|(_, idx)| idx.clone());
        if let Some(idx) = cached {
            return Ok(idx);
        }
        let manifest = self.load_manifest(id).await?;
        let index = self.load_index_of(id, &manifest).await?;
        *self.inner.index_cache.lock().await = Some((id, index.clone()));
        Ok(index)
    }

    /// The index `manifest` names, with every table's block references read from
    /// its groups; each checked against its hash.
    async fn load_index_of(&self, id: SnapshotId, manifest: &Manifest) -> Result<Arc<Index>> {
        let mut index = self.read_index_of(id, manifest).await?;
        for table in &mut index.tables {
            if !table.blocks.is_empty() {
                continue;
            }
            let ids: Vec<BlockId> = table.groups.iter().map(|g| g.id).collect();
            let contents: Vec<Vec<u8>> = self.read_blocks(id, ids).try_collect().await?;
            let mut groups: Vec<Vec<BlockRef>> = Vec::with_capacity(contents.len());
            for (g, content) in table.groups.iter().zip(contents) {
                let refs = crate::format::decode_group(&g.id, &content)
                    .map_err(|e| Error::corrupt(format!("snapshot {id}"), e.to_string()))?;
                if refs.len() != g.blocks as usize {
                    return Err(Error::corrupt(
                        format!("snapshot {id}"),
                        format!(
                            "index group {} holds {} block references, the index says {}",
                            g.id,
                            refs.len(),
                            g.blocks
                        ),
                    ));
                }
                groups.push(refs);
            }
            table.blocks = groups.into_iter().flatten().collect();
        }
        Ok(Arc::new(index))
    }

    async fn resolve_tables(
        &self,
        client: &impl tokio_postgres::GenericClient,
        request: &SnapshotRequest,
    ) -> Result<Vec<TableRef>> {
        let own = self.inner.schema.as_str();
        let mut tables: BTreeSet<TableRef> = request.tables.iter().cloned().collect();
        if tables.iter().any(|t| t.schema == own) {
            return Err(Error::invalid_input(format!(
                "sanare's own schema `{own}` is never snapshotted"
            )));
        }
        let schemas = if request.tables.is_empty() && request.schemas.is_empty() {
            Some(self.inner.config.default_schemas.clone())
        } else if !request.schemas.is_empty() {
            Some(request.schemas.clone())
        } else {
            None
        };
        if let Some(schemas) = schemas {
            tables.extend(sanare_pg::catalog::list_tables(client, &schemas, own).await?);
        }
        Ok(tables.into_iter().collect())
    }
}

/// A catalog row (`id, status, created_at, info, repository`) as a snapshot.
fn row_info(r: &tokio_postgres::Row) -> Result<SnapshotInfo> {
    let id = SnapshotId::from_uuid(r.get(0));
    let status = parse_status(r.get::<_, &str>(1));
    let created_at: OffsetDateTime = r.get(2);
    let info: Option<serde_json::Value> = r.get(3);
    let mut out = match info {
        Some(v) => serde_json::from_value::<SnapshotInfo>(v).map_err(|e| {
            Error::corrupt(format!("catalog entry of snapshot {id}"), e.to_string())
        })?,
        None => SnapshotInfo::new(id, created_at, status),
    };
    out.status = status;
    out.repository = r
        .get::<_, Option<uuid::Uuid>>(4)
        .map(RepositoryId::from_uuid);
    Ok(out)
}

#[async_trait]
impl SnapshotService for Snapshots {
    async fn create(&self, request: SnapshotRequest, control: &Control) -> Result<SnapshotInfo> {
        self.require_catalog("taking a snapshot")?;
        let repo = self.repository_for_capture().await?;
        let lock = RepoLock::acquire(
            &self.inner.store,
            false,
            "a capture",
            self.inner.config.lock_wait,
        )
        .await?;
        let out = self.capture(request, control).await;
        release(lock).await;
        tracing::debug!(repository = %repo.config.id, "capture done");
        out
    }

    async fn latest_good(&self, before: Option<OffsetDateTime>) -> Result<Option<SnapshotInfo>> {
        if !self.inner.catalog {
            return self.latest_in_store(before).await;
        }
        let Some(repo) = self.repository().await? else {
            return Ok(None);
        };
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT id, status, created_at, info, repository, manifest_hash FROM {}
                      WHERE status = 'ready' AND repository = $2 AND database_id = $3
                        AND created_at <= coalesce($1, now())
                      ORDER BY created_at DESC, id DESC",
                    self.table("snapshots")
                ),
                &[&before, &repo.config.id.as_uuid(), &repo.database],
            )
            .await
            .context("looking for the latest good snapshot")?;
        drop(conn);
        for r in rows {
            let info = row_info(&r)?;
            let hash: Option<Vec<u8>> = r.get(5);
            // A cheap check: the manifest is there and is the one recorded. A
            // failure is not proof: the snapshot is verified before it is marked.
            let check = match self.inner.store.get(&manifest_key(info.id)).await? {
                None => Err(Error::corrupt(
                    format!("snapshot {}", info.id),
                    "its manifest is missing",
                )),
                Some(b) if hash.as_deref() != Some(blake3::hash(&b).as_bytes()) => {
                    Err(Error::corrupt(
                        format!("snapshot {}", info.id),
                        "its manifest does not match the catalog",
                    ))
                }
                Some(_) => Ok(()),
            };
            match check {
                Ok(()) => return Ok(Some(info)),
                Err(e) => self.mark_corrupted(info.id, &e).await,
            }
        }
        Ok(None)
    }

    async fn restore(&self, request: RestoreRequest, control: &Control) -> Result<RestoreOutcome> {
        self.require_catalog("restoring a snapshot")?;
        self.restorable_here(request.snapshot).await?;
        let lock = RepoLock::acquire(
            &self.inner.store,
            false,
            "a restore",
            self.inner.config.lock_wait,
        )
        .await?;
        let out = self.restore_inner(request, control).await;
        release(lock).await;
        out
    }

    async fn fetch_rows(&self, snapshot: SnapshotId, rows: &[RowRef]) -> Result<Vec<RowImage>> {
        self.require_catalog("reading rows of a snapshot")?;
        self.here(snapshot).await?;
        self.fetch_inner(snapshot, rows).await
    }

    async fn verify(&self, snapshot: SnapshotId, control: &Control) -> Result<VerifyReport> {
        self.verify_inner(snapshot, control).await
    }
}

/// Removes a repository lock; a failure only leaves a lock that goes stale.
async fn release(lock: RepoLock) {
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "could not remove a repository lock; it goes stale in 30 minutes");
    }
}
