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
    ReplayRange, ReplayRequest, ReplaySummary, RestoreOutcome, RestoreRequest, RestoreTarget,
    Result, RowImage, RowRef, SnapshotId, SnapshotInfo, SnapshotRequest, SnapshotService,
    SnapshotStatus, TableRef, TableRowCount, VerifyReport,
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
use crate::source::{ByteChunker, SourceInfo, StateSource};
use crate::store::BlockStore;

mod blocks;
mod capture;
mod encode;
mod maintenance;
mod parallel;
mod restore;
mod rows;
mod sources;

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
    /// The journal replay after it (none without a journal).
    pub replay: Option<ReplaySummary>,
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
}

impl SnapshotsBuilder {
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
        let pool = self
            .pool
            .ok_or_else(|| Error::config("snapshot.pool", "a database pool is required"))?;
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
    match s {
        SnapshotStatus::Creating => "creating",
        SnapshotStatus::Ready => "ready",
        SnapshotStatus::Validating => "validating",
        SnapshotStatus::Corrupted => "corrupted",
        SnapshotStatus::Archived => "archived",
        _ => "deleted",
    }
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

    async fn set_status(
        &self,
        id: SnapshotId,
        status: SnapshotStatus,
        error: Option<&str>,
    ) -> Result<()> {
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        conn.execute(
            &format!(
                "UPDATE {} SET status = $2, error = coalesce($3, error) WHERE id = $1",
                self.table("snapshots")
            ),
            &[&id.as_uuid(), &status_str(status), &error],
        )
        .await
        .with_context(|| format!("marking snapshot {id} {}", status_str(status)))?;
        Ok(())
    }

    /// Every snapshot in the catalog, newest first.
    pub async fn list(&self) -> Result<Vec<SnapshotInfo>> {
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT id, status, created_at, info FROM {} ORDER BY created_at DESC, id DESC",
                    self.table("snapshots")
                ),
                &[],
            )
            .await
            .context("listing snapshots")?;
        rows.iter().map(row_info).collect()
    }

    /// One snapshot's catalog entry.
    pub async fn get(&self, id: SnapshotId) -> Result<SnapshotInfo> {
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let row = conn
            .query_opt(
                &format!(
                    "SELECT id, status, created_at, info FROM {} WHERE id = $1",
                    self.table("snapshots")
                ),
                &[&id.as_uuid()],
            )
            .await
            .with_context(|| format!("reading snapshot {id}"))?
            .ok_or_else(|| Error::not_found(format!("snapshot {id}")))?;
        row_info(&row)
    }

    async fn load_manifest(&self, id: SnapshotId) -> Result<Manifest> {
        let bytes = self
            .inner
            .store
            .get(&manifest_key(id))
            .await?
            .ok_or_else(|| Error::corrupt(format!("snapshot {id}"), "its manifest is missing"))?;
        Manifest::decode(&bytes)
            .map_err(|e| Error::corrupt(format!("snapshot {id}"), e.to_string()))
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
        let mut index = self.read_index(id).await?;
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
        let index = Arc::new(index);
        *self.inner.index_cache.lock().await = Some((id, index.clone()));
        Ok(index)
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
    Ok(out)
}

#[async_trait]
impl SnapshotService for Snapshots {
    async fn create(&self, request: SnapshotRequest, control: &Control) -> Result<SnapshotInfo> {
        self.capture(request, control).await
    }

    async fn latest_good(&self, before: Option<OffsetDateTime>) -> Result<Option<SnapshotInfo>> {
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT id, status, created_at, info, manifest_hash FROM {}
                      WHERE status = 'ready' AND created_at <= coalesce($1, now())
                      ORDER BY created_at DESC, id DESC",
                    self.table("snapshots")
                ),
                &[&before],
            )
            .await
            .context("looking for the latest good snapshot")?;
        drop(conn);
        for r in rows {
            let info = row_info(&r)?;
            let hash: Option<Vec<u8>> = r.get(4);
            // A cheap check: the manifest is there and is the one recorded.
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
        self.restore_inner(request, control).await
    }

    async fn fetch_rows(&self, snapshot: SnapshotId, rows: &[RowRef]) -> Result<Vec<RowImage>> {
        self.fetch_inner(snapshot, rows).await
    }

    async fn verify(&self, snapshot: SnapshotId, control: &Control) -> Result<VerifyReport> {
        self.verify_inner(snapshot, control).await
    }
}
