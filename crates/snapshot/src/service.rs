//! The snapshot service: capture, restore, rows by key, verify, retention, GC.

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
        let manifest = self.load_manifest(id).await?;
        let bytes = self
            .inner
            .store
            .get(&index_key(id))
            .await?
            .ok_or_else(|| Error::corrupt(format!("snapshot {id}"), "its index is missing"))?;
        if blake3::hash(&bytes).as_bytes() != &manifest.index_hash {
            return Err(Error::corrupt(
                format!("snapshot {id}"),
                "its index does not match the hash in its manifest",
            ));
        }
        let mut index = Index::decode(&bytes)
            .map_err(|e| Error::corrupt(format!("snapshot {id}"), e.to_string()))?;
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

    /// Captures a snapshot (see [`SnapshotService::create`]).
    #[tracing::instrument(skip_all, fields(snapshot))]
    async fn capture(&self, request: SnapshotRequest, control: &Control) -> Result<SnapshotInfo> {
        let inner = &self.inner;
        let id = SnapshotId::new();
        tracing::Span::current().record("snapshot", tracing::field::display(id));
        let base = self.latest_good(None).await?.map(|s| s.id);
        {
            let conn = sanare_pg::get_conn(&inner.pool).await?;
            conn.execute(
                &format!(
                    "INSERT INTO {} (id, status, created_at, label) VALUES ($1, 'creating', now(), $2)",
                    self.table("snapshots")
                ),
                &[&id.as_uuid(), &request.label],
            )
            .await
            .context("recording a new snapshot")?;
        }
        let result = self.capture_inner(id, base, &request, control).await;
        match result {
            Ok(info) => Ok(info),
            Err(e) => {
                // The row stays `creating` (never restorable); record why.
                let _ = self
                    .set_status(id, SnapshotStatus::Creating, Some(&e.to_string()))
                    .await;
                metrics::counter!("sanare_snapshot_failures_total").increment(1);
                Err(e)
            }
        }
    }

    async fn capture_inner(
        &self,
        id: SnapshotId,
        base: Option<SnapshotId>,
        request: &SnapshotRequest,
        control: &Control,
    ) -> Result<SnapshotInfo> {
        let inner = &self.inner;
        let mut conn = sanare_pg::get_conn(&inner.pool).await?;
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .context("starting the snapshot transaction")?;
        // GC waits while any capture holds this (released at commit or on a crash).
        tx.execute(
            "SELECT pg_advisory_xact_lock_shared($1)",
            &[&advisory_key(&inner.schema)],
        )
        .await
        .context("taking the snapshot lock")?;
        let row = tx
            .query_one("SELECT pg_current_snapshot()::text, now()", &[])
            .await
            .context("reading the snapshot's transaction view")?;
        let db_snapshot: String = row.get(0);
        let created_at: OffsetDateTime = row.get(1);
        let cut = match &inner.journal {
            Some(j) => Some(j.cut(Some(&db_snapshot)).await?),
            None => None,
        };
        let tables = self.resolve_tables(&*tx, request).await?;
        let progress = control.progress();
        progress.phase("capturing tables", "tables", Some(tables.len() as u64));
        let mut index = Index {
            snapshot: *id.as_uuid().as_bytes(),
            tables: Vec::with_capacity(tables.len()),
            streams: Vec::new(),
        };
        // Read the packs afresh, under the lock GC waits for: a map loaded before a
        // GC in another process could name blocks that GC has since deleted, and
        // this capture must not reuse those.
        self.refresh_packs().await?;
        let writer = PackWriter::new(&inner.store, &inner.packs, inner.config.pack_size);
        let mut compressed_bytes = 0u64;
        // Tables are captured by up to `capture_concurrency` connections whose
        // transactions all import this transaction's snapshot, so every table is
        // read at the same instant. This transaction stays open until they finish.
        // Worker 0 uses the capture's own connection, every other one takes one
        // more: never ask for more than the pool can ever give.
        let pool_max = inner.pool.status().max_size;
        let workers = inner
            .config
            .capture_concurrency
            .min(pool_max.max(1))
            .clamp(1, tables.len().max(1));
        let exported: Option<String> = if workers > 1 {
            Some(
                tx.query_one("SELECT pg_export_snapshot()", &[])
                    .await
                    .context("exporting the snapshot for parallel capture")?
                    .get(0),
            )
        } else {
            None
        };
        let queue = std::sync::Mutex::new(tables.iter().enumerate().collect::<Vec<_>>());
        let next = || {
            queue.lock().ok().and_then(|mut q| {
                if q.is_empty() {
                    None
                } else {
                    Some(q.remove(0))
                }
            })
        };
        let worker = |n: usize| {
            let tx_main = &tx;
            let exported = exported.clone();
            let next = &next;
            let writer = &writer;
            async move {
                let mut done: Vec<(usize, TableIndex, u64)> = Vec::new();
                let mut pack = PackBuilder::new();
                let mut own_conn;
                let own_tx;
                let tx: &tokio_postgres::Transaction<'_> = match (&exported, n) {
                    (Some(snapshot), n) if n > 0 => {
                        own_conn = sanare_pg::get_conn(&inner.pool).await?;
                        own_tx = own_conn
                            .build_transaction()
                            .isolation_level(IsolationLevel::RepeatableRead)
                            .read_only(true)
                            .start()
                            .await
                            .context("starting a parallel capture transaction")?;
                        own_tx
                            .batch_execute(&format!(
                                "SET TRANSACTION SNAPSHOT {}",
                                quote_literal(snapshot)
                            ))
                            .await
                            .context(
                                "importing the snapshot into a parallel capture transaction",
                            )?;
                        &own_tx
                    }
                    _ => tx_main,
                };
                while let Some((i, table)) = next() {
                    control.checkpoint()?;
                    progress.message(format!("capturing {table}"));
                    let (ti, compressed) = self
                        .capture_table(tx, table, writer, &mut pack, control)
                        .await?;
                    done.push((i, ti, compressed));
                    progress.advance(1);
                }
                writer.flush(&mut pack).await?;
                Ok::<_, Error>(done)
            }
        };
        let results = futures_util::future::try_join_all((0..workers).map(worker)).await?;
        let mut captured: Vec<(usize, TableIndex, u64)> = results.into_iter().flatten().collect();
        captured.sort_by_key(|c| c.0);
        for (_, ti, compressed) in captured {
            compressed_bytes += compressed;
            index.tables.push(ti);
        }
        // The capture's transaction stays open (holding the lock GC waits for) until
        // the manifest is written, so GC never deletes a block this capture reuses.
        control.checkpoint()?;
        let mut pack = PackBuilder::new();
        for source in &inner.sources {
            control.checkpoint()?;
            progress.message(format!("capturing state source {}", source.name()));
            let (si, compressed) = self
                .capture_source(&**source, &writer, &mut pack, control)
                .await?;
            compressed_bytes += compressed;
            index.streams.push(si);
        }

        // Each table's block references go into content-defined group blocks, so an
        // unchanged run of blocks costs nothing in this snapshot's index either.
        for table in &mut index.tables {
            control.checkpoint()?;
            let mut groups = Vec::new();
            for group in crate::format::group_blocks(&table.blocks) {
                let content = crate::format::encode_group(group)?;
                let (r, object) = encode(
                    RowBlock {
                        content,
                        rows: 0,
                        key_filter: Vec::new(),
                    },
                    inner.config.codec,
                )
                .await?;
                compressed_bytes += object.len() as u64;
                writer.add(&mut pack, r.id, &object).await?;
                groups.push(crate::format::GroupRef {
                    id: r.id,
                    blocks: u32::try_from(group.len()).unwrap_or(u32::MAX),
                });
            }
            table.groups = groups;
        }
        writer.flush(&mut pack).await?;
        let mut stored_bytes = writer.finish().await?;

        // Blocks are durable; now the index, then the manifest.
        let index_bytes = index.encode()?;
        let index_hash = *blake3::hash(&index_bytes).as_bytes();
        stored_bytes += index_bytes.len() as u64;
        inner
            .store
            .put(&index_key(id), Bytes::from(index_bytes))
            .await?;
        let size_bytes: u64 = index.tables.iter().map(|t| t.raw_bytes).sum::<u64>()
            + index.streams.iter().map(|s| s.len).sum::<u64>();
        let manifest = Manifest {
            id: *id.as_uuid().as_bytes(),
            created_at_us: i64::try_from(created_at.unix_timestamp_nanos() / 1000)
                .unwrap_or(i64::MAX),
            label: request.label.clone(),
            base: base.map(|b| *b.as_uuid().as_bytes()),
            journal_cut: cut.as_ref().map(|c| StoredCut {
                position: c.position.0,
                db_snapshot: c.db_snapshot.clone(),
            }),
            chunking: inner.config.chunking,
            codec: inner.config.codec,
            tables: index
                .tables
                .iter()
                .map(|t| (t.schema.clone(), t.name.clone(), t.rows))
                .collect(),
            size_bytes,
            compressed_bytes,
            stored_bytes,
            block_count: index.block_ids().len() as u64,
            index_hash,
            metadata: request.metadata.clone(),
        };
        let manifest_bytes = manifest.encode()?;
        let manifest_hash = blake3::hash(&manifest_bytes).as_bytes().to_vec();
        inner
            .store
            .put(&manifest_key(id), Bytes::from(manifest_bytes))
            .await?;

        let mut info = SnapshotInfo::new(id, created_at, SnapshotStatus::Ready);
        info.label = request.label.clone();
        info.base = base;
        info.journal_cut = cut;
        info.tables = index
            .tables
            .iter()
            .map(|t| TableRowCount {
                table: TableRef::new(&t.schema, &t.name),
                rows: t.rows,
            })
            .collect();
        info.size_bytes = size_bytes;
        info.stored_bytes = stored_bytes;
        info.metadata = request.metadata.clone();
        let json =
            serde_json::to_value(&info).map_err(|e| Error::other("encoding snapshot info", e))?;
        tx.commit()
            .await
            .context("ending the snapshot transaction")?;
        conn.execute(
            &format!(
                "UPDATE {} SET status = 'ready', created_at = $2, finished_at = now(), base_id = $3,
                        journal_position = $4, size_bytes = $5, stored_bytes = $6,
                        manifest_hash = $7, info = $8, error = NULL
                  WHERE id = $1",
                self.table("snapshots")
            ),
            &[
                &id.as_uuid(),
                &created_at,
                &base.map(|b| b.as_uuid()),
                &info
                    .journal_cut
                    .as_ref()
                    .map(|c| i64::try_from(c.position.0).unwrap_or(i64::MAX)),
                &i64::try_from(size_bytes).unwrap_or(i64::MAX),
                &i64::try_from(stored_bytes).unwrap_or(i64::MAX),
                &manifest_hash,
                &json,
            ],
        )
        .await
        .context("marking the snapshot ready")?;
        metrics::counter!("sanare_snapshots_created_total").increment(1);
        metrics::counter!("sanare_snapshot_bytes_stored_total").increment(stored_bytes);
        control.progress().finish();
        tracing::info!(%id, size_bytes, stored_bytes, tables = index.tables.len(), "snapshot ready");
        if let Some(bus) = &inner.events {
            bus.publish(Event::SnapshotCreated {
                snapshot: id,
                size_bytes,
                stored_bytes,
            });
        }
        Ok(info)
    }

    async fn capture_table(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        table: &TableRef,
        writer: &PackWriter<'_>,
        pack: &mut PackBuilder,
        control: &Control,
    ) -> Result<(TableIndex, u64)> {
        let (columns, primary_key) = describe(tx, table).await?;
        let sequences = sequences(tx, table).await?;
        let cols = columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        // Rows in primary key order: where a row lives in the heap (which updates
        // change) then does not move it between blocks, so an update touches only
        // the blocks around its key and appended keys only the last blocks.
        let sql = if primary_key.is_empty() {
            format!("COPY {} ({cols}) TO STDOUT (FORMAT binary)", table.quoted())
        } else {
            let order = primary_key
                .iter()
                .filter_map(|&i| columns.get(usize::from(i)))
                .map(|c| quote_ident(&c.name))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "COPY (SELECT {cols} FROM {} ORDER BY {order}) TO STDOUT (FORMAT binary)",
                table.quoted()
            )
        };
        let stream = tx
            .copy_out(&sql)
            .await
            .with_context(|| format!("starting to copy {table}"))?;
        futures_util::pin_mut!(stream);
        let mut chunker = Chunker::new(self.inner.config.chunking, primary_key.clone());
        let mut blocks: Vec<BlockRef> = Vec::new();
        let mut raw_bytes = 0u64;
        let mut compressed = 0u64;
        let mut pending: Vec<RowBlock> = Vec::new();
        let conc = self.inner.config.write_concurrency.max(1);
        let codec = self.inner.config.codec;
        loop {
            let next = stream.next().await;
            let done = next.is_none();
            match next {
                Some(data) => {
                    let data = data.with_context(|| format!("copying {table}"))?;
                    pending.extend(chunker.push(&data)?);
                }
                None => {
                    let c = std::mem::replace(
                        &mut chunker,
                        Chunker::new(ChunkParams::default(), Vec::new()),
                    );
                    pending.extend(
                        c.finish()
                            .map_err(|e| Error::other(format!("copying {table}"), e))?,
                    );
                }
            }
            if pending.len() >= conc || (done && !pending.is_empty()) {
                control.checkpoint()?;
                let batch = std::mem::take(&mut pending);
                let encoded =
                    futures_util::future::try_join_all(batch.into_iter().map(|b| encode(b, codec)))
                        .await?;
                for (r, object) in encoded {
                    raw_bytes += u64::from(r.raw_len);
                    compressed += object.len() as u64;
                    writer.add(pack, r.id, &object).await?;
                    blocks.push(r);
                }
            }
            if done {
                break;
            }
        }
        let rows = blocks.iter().map(|b| u64::from(b.rows)).sum();
        metrics::counter!("sanare_snapshot_rows_captured_total").increment(rows);
        Ok((
            TableIndex {
                schema: table.schema.clone(),
                name: table.name.clone(),
                columns,
                primary_key,
                sequences,
                rows,
                raw_bytes,
                blocks,
                groups: Vec::new(),
            },
            compressed,
        ))
    }

    /// Reads a host byte stream to its end, cutting it into deduplicated blocks.
    async fn capture_source(
        &self,
        source: &dyn StateSource,
        writer: &PackWriter<'_>,
        pack: &mut PackBuilder,
        control: &Control,
    ) -> Result<(StreamIndex, u64)> {
        let name = source.name().to_owned();
        let mut reader = source.open().await?;
        let mut chunker = ByteChunker::new(self.inner.config.chunking);
        let mut buf = vec![0u8; 256 * 1024];
        let mut index = StreamIndex {
            name: name.clone(),
            len: 0,
            blocks: Vec::new(),
            metadata: source.metadata(),
        };
        let mut compressed = 0u64;
        let conc = self.inner.config.write_concurrency.max(1);
        let codec = self.inner.config.codec;
        let mut pending: Vec<Vec<u8>> = Vec::new();
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .map_err(|e| Error::io(format!("reading state source {name}"), e))?;
            index.len += n as u64;
            if n == 0 {
                let rest =
                    std::mem::replace(&mut chunker, ByteChunker::new(ChunkParams::default()));
                pending.extend(rest.finish());
            } else {
                pending.extend(chunker.push(&buf[..n]));
            }
            if pending.len() >= conc || (n == 0 && !pending.is_empty()) {
                control.checkpoint()?;
                let batch = std::mem::take(&mut pending);
                let encoded =
                    futures_util::future::try_join_all(batch.into_iter().map(|content| {
                        encode(
                            RowBlock {
                                content,
                                rows: 0,
                                key_filter: Vec::new(),
                            },
                            codec,
                        )
                    }))
                    .await?;
                for (r, object) in encoded {
                    compressed += object.len() as u64;
                    writer.add(pack, r.id, &object).await?;
                    index.blocks.push(r.id);
                }
            }
            if n == 0 {
                break;
            }
        }
        Ok((index, compressed))
    }

    /// The host byte streams captured in snapshot `id`.
    pub async fn sources(&self, id: SnapshotId) -> Result<Vec<SourceInfo>> {
        let index = self.load_index(id).await?;
        Ok(index
            .streams
            .iter()
            .map(|s| SourceInfo {
                name: s.name.clone(),
                len: s.len,
                blocks: s.blocks.len() as u64,
                metadata: s.metadata.clone(),
            })
            .collect())
    }

    /// Writes the stream `name` captured in snapshot `id` to `out` (flushed at the
    /// end) and returns its length. Every block's hash is checked before its bytes
    /// are written; a damaged or missing block stops the restore with an error
    /// naming it and marks the snapshot corrupted, so `out` then holds a prefix of
    /// the stream and must be discarded.
    pub async fn restore_source(
        &self,
        id: SnapshotId,
        name: &str,
        out: &mut (dyn AsyncWrite + Send + Unpin),
        control: &Control,
    ) -> Result<u64> {
        let info = self.get(id).await?;
        if info.status != SnapshotStatus::Ready && info.status != SnapshotStatus::Archived {
            return Err(Error::conflict(format!(
                "snapshot {id} is {} and cannot be restored",
                status_str(info.status)
            )));
        }
        let index = self.load_index(id).await?;
        let stream = index
            .streams
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::not_found(format!("state source `{name}` in snapshot {id}")))?;
        let blocks = self.read_blocks(id, stream.blocks.clone());
        futures_util::pin_mut!(blocks);
        let mut written = 0u64;
        while let Some(block) = blocks.next().await {
            control.checkpoint()?;
            let block = match block {
                Ok(b) => b,
                Err(e) => {
                    self.mark_corrupted(id, &e).await;
                    return Err(e);
                }
            };
            out.write_all(&block)
                .await
                .map_err(|e| Error::io(format!("writing restored state source {name}"), e))?;
            written += block.len() as u64;
        }
        out.flush()
            .await
            .map_err(|e| Error::io(format!("writing restored state source {name}"), e))?;
        if written != stream.len {
            let e = Error::corrupt(
                format!("snapshot {id}"),
                format!(
                    "state source {name} restored {written} bytes, its index says {}",
                    stream.len
                ),
            );
            self.mark_corrupted(id, &e).await;
            return Err(e);
        }
        Ok(written)
    }

    /// Loads the pack map unless it is loaded.
    async fn ensure_packs(&self) -> Result<()> {
        if !self
            .inner
            .packs_loaded
            .load(std::sync::atomic::Ordering::Acquire)
        {
            self.refresh_packs().await?;
        }
        Ok(())
    }

    /// Brings the pack map up to the store.
    async fn refresh_packs(&self) -> Result<()> {
        let mut map = self.inner.packs.write().await;
        map.refresh(&*self.inner.store).await?;
        self.inner
            .packs_loaded
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Where each of `ids` is in a pack (`None`: in none, maybe a loose block
    /// object of a repository written before packs). Refreshes the map once when
    /// one is not in it.
    async fn locate_all(&self, ids: &[BlockId]) -> Result<Vec<Option<BlockLocation>>> {
        self.ensure_packs().await?;
        let mut out: Vec<Option<BlockLocation>> = {
            let map = self.inner.packs.read().await;
            ids.iter().map(|id| map.locate(id)).collect()
        };
        if out.iter().any(Option::is_none) {
            self.refresh_packs().await?;
            let map = self.inner.packs.read().await;
            for (slot, id) in out.iter_mut().zip(ids) {
                if slot.is_none() {
                    *slot = map.locate(id);
                }
            }
        }
        Ok(out)
    }

    /// Every block snapshot `id` references (table blocks, index groups, state
    /// source blocks).
    pub async fn block_ids(&self, id: SnapshotId) -> Result<BTreeSet<BlockId>> {
        Ok(self.load_index(id).await?.block_ids())
    }

    /// Where block `id` lives in the store: the pack holding it, or its own object
    /// in a repository written before packs; `None` when the store does not have it.
    pub async fn locate(&self, id: BlockId) -> Result<Option<BlockLocation>> {
        if let Some(loc) = self.locate_all(&[id]).await?.pop().flatten() {
            return Ok(Some(loc));
        }
        let key = id.key();
        Ok(self
            .inner
            .store
            .list(&key)
            .await?
            .into_iter()
            .find(|o| o.key == key)
            .map(|o| BlockLocation {
                key,
                offset: 0,
                len: o.size,
            }))
    }

    /// Reads what `fetch` names: each block with its content, or why not
    /// ([`Error::NotFound`] when the store does not have it, [`Error::Corrupt`] when
    /// it is damaged). The outer error is a store failure unrelated to one block.
    async fn fetch(&self, fetch: Fetch) -> Result<Vec<(BlockId, Result<Vec<u8>>)>> {
        let run = match fetch {
            Fetch::Loose(id) => {
                let got = match self.inner.store.get(&id.key()).await? {
                    Some(object) => decode_off_thread(id, object).await?,
                    None => Err(Error::not_found(format!("block {id}"))),
                };
                return Ok(vec![(id, got)]);
            }
            Fetch::Run(run) => run,
        };
        let bytes = match self
            .inner
            .store
            .get_range(&run.key, run.range.clone())
            .await
        {
            Ok(Some(bytes)) => bytes,
            // The pack is gone: GC rewrote it since the map was read. Look again.
            Ok(None) => {
                self.refresh_packs().await?;
                let ids: Vec<BlockId> = run.blocks.iter().map(|b| b.0).collect();
                let locs = self.locate_all(&ids).await?;
                let mut out = Vec::with_capacity(ids.len());
                for (id, loc) in ids.into_iter().zip(locs) {
                    let got = match loc {
                        Some(loc) => match self
                            .inner
                            .store
                            .get_range(&loc.key, loc.offset..loc.offset + loc.len)
                            .await?
                        {
                            Some(object) => decode_off_thread(id, object).await?,
                            None => Err(Error::not_found(format!("block {id}"))),
                        },
                        None => Box::pin(self.fetch(Fetch::Loose(id)))
                            .await?
                            .pop()
                            .map_or_else(|| Err(Error::not_found(format!("block {id}"))), |b| b.1),
                    };
                    out.push((id, got));
                }
                return Ok(out);
            }
            // Shorter than its table of contents says: every block in the run is lost.
            Err(e @ Error::Corrupt { .. }) => {
                let why = e.to_string();
                return Ok(run
                    .blocks
                    .iter()
                    .map(|(id, _)| (*id, Err(Error::corrupt(format!("block {id}"), why.clone()))))
                    .collect());
            }
            Err(e) => return Err(e),
        };
        tokio::task::spawn_blocking(move || {
            run.blocks
                .into_iter()
                .map(|(id, r)| (id, decode_block(&id, &bytes[r])))
                .collect()
        })
        .await
        .map_err(|e| Error::other("decoding blocks", e))
    }

    /// The contents of blocks `ids` of snapshot `snapshot`, in order, each checked
    /// against its hash. Adjacent blocks of a pack are read together.
    fn read_blocks(
        &self,
        snapshot: SnapshotId,
        ids: Vec<BlockId>,
    ) -> impl futures_util::Stream<Item = Result<Vec<u8>>> + Send + '_ {
        let concurrency = self.inner.config.read_concurrency.max(1);
        futures_util::stream::once(async move {
            let locs = self.locate_all(&ids).await?;
            Ok(plan(ids.into_iter().zip(locs)))
        })
        .map_ok(move |plan| {
            futures_util::stream::iter(plan)
                .map(move |f| self.fetch(f))
                .buffered(concurrency)
                .map_ok(|blocks| futures_util::stream::iter(blocks.into_iter().map(Ok)))
                .try_flatten()
        })
        .try_flatten()
        .map(move |r| r.and_then(|(id, got)| got.map_err(|e| block_error(snapshot, id, e))))
    }

    async fn read_block(&self, snapshot: SnapshotId, id: BlockId) -> Result<Vec<u8>> {
        let blocks = self.read_blocks(snapshot, vec![id]);
        futures_util::pin_mut!(blocks);
        blocks.next().await.unwrap_or_else(|| {
            Err(Error::other(
                "reading a block",
                std::io::Error::other("no result"),
            ))
        })
    }

    /// Restores a snapshot (see [`SnapshotService::restore`]).
    #[tracing::instrument(skip_all, fields(snapshot = %request.snapshot))]
    async fn restore_inner(
        &self,
        request: RestoreRequest,
        control: &Control,
    ) -> Result<RestoreOutcome> {
        let id = request.snapshot;
        let info = self.get(id).await?;
        if info.status != SnapshotStatus::Ready && info.status != SnapshotStatus::Archived {
            return Err(Error::conflict(format!(
                "snapshot {id} is {} and cannot be restored",
                status_str(info.status)
            )));
        }
        let index = match self.load_index(id).await {
            Ok(i) => i,
            Err(e) => {
                self.mark_corrupted(id, &e).await;
                return Err(e);
            }
        };
        let wanted: BTreeSet<&TableRef> = request.tables.iter().collect();
        let mut chosen: Vec<&TableIndex> = index
            .tables
            .iter()
            .filter(|t| wanted.is_empty() || wanted.contains(&TableRef::new(&t.schema, &t.name)))
            .collect();
        for w in &wanted {
            if !index
                .tables
                .iter()
                .any(|t| t.schema == w.schema && t.name == w.name)
            {
                return Err(Error::not_found(format!("table {w} in snapshot {id}")));
            }
        }
        let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let tx = conn
            .transaction()
            .await
            .context("starting the restore transaction")?;
        tx.batch_execute("SET CONSTRAINTS ALL DEFERRED")
            .await
            .context("deferring constraints for the restore")?;
        let mwm = self.inner.config.restore_maintenance_work_mem_mb;
        if mwm > 0 {
            tx.batch_execute(&format!("SET LOCAL maintenance_work_mem = '{mwm}MB'"))
                .await
                .context("setting maintenance_work_mem for the restore's index builds")?;
        }
        // Statements that recreate the indexes and keys dropped for the load.
        let mut rebuild: Vec<(String, String)> = Vec::new();
        let target_of = |t: &TableIndex| -> TableRef {
            match &request.target {
                RestoreTarget::Scratch { schema } => TableRef::new(schema, &t.name),
                _ => TableRef::new(&t.schema, &t.name),
            }
        };
        // Parents before children.
        if let RestoreTarget::Live = request.target {
            let mut infos = Vec::new();
            for t in &chosen {
                infos.push(
                    sanare_pg::catalog::describe(&*tx, &TableRef::new(&t.schema, &t.name)).await?,
                );
            }
            let order = sanare_pg::catalog::fk_order(&infos);
            chosen.sort_by_key(|t| {
                order
                    .iter()
                    .position(|o| o.schema == t.schema && o.name == t.name)
                    .unwrap_or(usize::MAX)
            });
            let list = chosen
                .iter()
                .map(|t| target_of(t).quoted())
                .collect::<Vec<_>>()
                .join(", ");
            if !list.is_empty() {
                tx.batch_execute(&format!("TRUNCATE {list}")).await.with_context(|| {
                    format!("emptying {list} (a table outside the restore that references them blocks this: restore it too)")
                })?;
            }
            let names: Vec<String> = chosen.iter().map(|t| target_of(t).quoted()).collect();
            rebuild = defer_indexes_and_keys(&tx, &names).await?;
        } else if let RestoreTarget::Scratch { schema } = &request.target {
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(schema)
            ))
            .await
            .context("creating the scratch schema")?;
            for t in &chosen {
                let target = target_of(t);
                let cols = t
                    .columns
                    .iter()
                    .map(|c| format!("{} {}", quote_ident(&c.name), c.type_name))
                    .collect::<Vec<_>>()
                    .join(", ");
                tx.batch_execute(&format!(
                    "DROP TABLE IF EXISTS {q}; CREATE TABLE {q} ({cols})",
                    q = target.quoted()
                ))
                .await
                .with_context(|| format!("creating scratch table {target}"))?;
            }
        }
        let progress = control.progress();
        let total_blocks: usize = chosen.iter().map(|t| t.blocks.len()).sum();
        progress.phase("restoring tables", "blocks", Some(total_blocks as u64));
        let mut outcome = RestoreOutcome::new(id);
        outcome.journal_cut = info.journal_cut.clone();
        let mut total_rows = 0u64;
        for t in &chosen {
            control.checkpoint()?;
            let target = target_of(t);
            let cols = t
                .columns
                .iter()
                .map(|c| quote_ident(&c.name))
                .collect::<Vec<_>>()
                .join(", ");
            // FREEZE writes the rows already frozen (no later vacuum rewrite); it
            // needs a plain table emptied or created in this transaction, as here.
            let plain: bool = tx
                .query_one(
                    "SELECT relkind = 'r' FROM pg_class WHERE oid = $1::text::regclass",
                    &[&target.quoted()],
                )
                .await
                .with_context(|| format!("looking up {target}"))?
                .get(0);
            let freeze = if plain { ", FREEZE" } else { "" };
            let sink = tx
                .copy_in(&format!(
                    "COPY {} ({cols}) FROM STDIN (FORMAT binary{freeze})",
                    target.quoted()
                ))
                .await
                .with_context(|| format!("starting to load {target}"))?;
            futures_util::pin_mut!(sink);
            sink.send(Bytes::from_static(&copy::HEADER))
                .await
                .with_context(|| format!("loading {target}"))?;
            let ids: Vec<BlockId> = t.blocks.iter().map(|b| b.id).collect();
            let blocks = self.read_blocks(id, ids);
            futures_util::pin_mut!(blocks);
            while let Some(block) = blocks.next().await {
                let block = match block {
                    Ok(b) => b,
                    Err(e) => {
                        self.mark_corrupted(id, &e).await;
                        return Err(e);
                    }
                };
                control.checkpoint()?;
                sink.send(Bytes::from(block))
                    .await
                    .with_context(|| format!("loading {target}"))?;
                progress.advance(1);
            }
            sink.send(Bytes::from_static(&copy::TRAILER))
                .await
                .with_context(|| format!("loading {target}"))?;
            let rows = sink
                .finish()
                .await
                .with_context(|| format!("loading {target}"))?;
            if rows != t.rows {
                return Err(Error::corrupt(
                    format!("snapshot {id}"),
                    format!(
                        "table {target}: loaded {rows} rows, the index says {}",
                        t.rows
                    ),
                ));
            }
            if let RestoreTarget::Live = request.target {
                for s in &t.sequences {
                    tx.execute(
                        "SELECT setval($1::text::regclass, $2, $3)",
                        &[&s.name, &s.last_value, &s.is_called],
                    )
                    .await
                    .with_context(|| format!("restoring sequence {}", s.name))?;
                }
            }
            total_rows += rows;
            outcome.tables.push(TableRowCount {
                table: target,
                rows,
            });
        }
        if !rebuild.is_empty() {
            progress.message("rebuilding indexes and checking foreign keys".to_owned());
        }
        for (what, sql) in &rebuild {
            control.checkpoint()?;
            tx.batch_execute(sql).await.with_context(|| {
                format!("rebuilding {what} after the restore (the restored rows violate it?)")
            })?;
        }
        control.checkpoint()?;
        tx.commit().await.context("committing the restore")?;
        progress.finish();
        metrics::counter!("sanare_snapshot_restores_total").increment(1);
        metrics::counter!("sanare_snapshot_rows_restored_total").increment(total_rows);
        tracing::info!(%id, rows = total_rows, "restore committed");
        if let Some(bus) = &self.inner.events {
            bus.publish(Event::RestoreCompleted {
                snapshot: id,
                tables: outcome.tables.iter().map(|t| t.table.clone()).collect(),
                rows: total_rows,
            });
        }
        Ok(outcome)
    }

    async fn mark_corrupted(&self, id: SnapshotId, e: &Error) {
        if matches!(e, Error::Corrupt { .. }) {
            tracing::error!(%id, error = %e, "snapshot is corrupted");
            metrics::counter!("sanare_snapshot_corrupted_total").increment(1);
            if let Err(e2) = self
                .set_status(id, SnapshotStatus::Corrupted, Some(&e.to_string()))
                .await
            {
                tracing::warn!(%id, error = %e2, "could not mark the snapshot corrupted");
            }
            let mut cache = self.inner.index_cache.lock().await;
            if cache.as_ref().is_some_and(|(cached, _)| *cached == id) {
                *cache = None;
            }
        }
    }

    /// Restores the latest good snapshot taken at or before `at`, then replays the
    /// journal from the cut it recorded (point-in-time recovery).
    pub async fn restore_to(&self, at: OffsetDateTime, control: &Control) -> Result<PitrOutcome> {
        let snap = self
            .latest_good(Some(at))
            .await?
            .ok_or_else(|| Error::not_found(format!("a good snapshot taken before {at}")))?;
        let restore = self
            .restore_inner(RestoreRequest::new(snap.id), control)
            .await?;
        let replay = match &self.inner.journal {
            Some(j) => {
                let cut = restore.journal_cut.clone().unwrap_or(JournalCut {
                    position: JournalPosition::START,
                    db_snapshot: None,
                });
                Some(
                    j.replay(ReplayRequest::new(ReplayRange::After(cut)), control)
                        .await?,
                )
            }
            None => None,
        };
        Ok(PitrOutcome { restore, replay })
    }

    async fn fetch_inner(&self, id: SnapshotId, rows: &[RowRef]) -> Result<Vec<RowImage>> {
        let index = self.load_index(id).await?;
        let mut by_table: BTreeMap<&TableRef, Vec<usize>> = BTreeMap::new();
        for (i, r) in rows.iter().enumerate() {
            by_table.entry(&r.table).or_default().push(i);
        }
        let mut found: Vec<Option<RowImage>> = vec![None; rows.len()];
        let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
        for (table, idxs) in by_table {
            let t = index
                .tables
                .iter()
                .find(|t| t.schema == table.schema && t.name == table.name)
                .ok_or_else(|| Error::not_found(format!("table {table} in snapshot {id}")))?;
            if t.primary_key.is_empty() {
                return Err(Error::invalid_input(format!(
                    "table {table} had no primary key when snapshot {id} was taken: rows cannot be fetched by key"
                )));
            }
            // The key values, in the key's binary COPY encoding, via the server.
            let mut selects = Vec::new();
            for &i in &idxs {
                let r = &rows[i];
                let mut exprs = Vec::new();
                for &k in &t.primary_key {
                    let col = &t.columns[k as usize];
                    let v = r.key.iter().find(|c| c.column == col.name).ok_or_else(|| {
                        Error::invalid_input(format!(
                            "row {r} does not give key column {}",
                            col.name
                        ))
                    })?;
                    exprs.push(match &v.value {
                        Some(v) => format!("{}::{}", quote_literal(v), col.type_name),
                        None => format!("NULL::{}", col.type_name),
                    });
                }
                selects.push(format!("SELECT {}", exprs.join(", ")));
            }
            let stream = conn
                .copy_out(&format!(
                    "COPY ({}) TO STDOUT (FORMAT binary)",
                    selects.join(" UNION ALL ")
                ))
                .await
                .with_context(|| format!("encoding keys of {table}"))?;
            let bytes: Vec<Bytes> = stream
                .try_collect()
                .await
                .with_context(|| format!("encoding keys of {table}"))?;
            let all: Vec<u8> = bytes.concat();
            let body = all.get(19..all.len().saturating_sub(2)).ok_or_else(|| {
                Error::other("encoding keys", std::io::Error::other("short COPY output"))
            })?;
            let all_key_cols: Vec<u16> = (0..t.primary_key.len() as u16).collect();
            let mut wanted: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
            for (row, &i) in copy::rows(body).zip(&idxs) {
                let row = row?;
                let ranges = copy::fields(row);
                wanted
                    .entry(copy::key_hash(row, &ranges, &all_key_cols))
                    .or_default()
                    .push(i);
            }
            let candidates: Vec<&BlockRef> = t
                .blocks
                .iter()
                .filter(|b| wanted.keys().any(|k| bloom::may_contain(&b.key_filter, k)))
                .collect();
            metrics::counter!("sanare_snapshot_fetch_blocks_read_total")
                .increment(candidates.len() as u64);
            let mut matched: Vec<(usize, Vec<u8>)> = Vec::new();
            for b in candidates {
                let content = self.read_block(id, b.id).await?;
                for row in copy::rows(&content) {
                    let row = row?;
                    let ranges = copy::fields(row);
                    let h = copy::key_hash(row, &ranges, &t.primary_key);
                    if let Some(is) = wanted.remove(&h) {
                        for i in is {
                            matched.push((i, row.to_vec()));
                        }
                    }
                }
                if wanted.is_empty() {
                    break;
                }
            }
            if matched.is_empty() {
                continue;
            }
            // Binary to text through the server, which owns every type's output.
            let tx = conn
                .transaction()
                .await
                .context("starting to decode fetched rows")?;
            let cols = t
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| format!("c{i} {}", c.type_name))
                .collect::<Vec<_>>()
                .join(", ");
            tx.batch_execute(&format!(
                "CREATE TEMP TABLE sanare_fetched_rows (ord int4, {cols}) ON COMMIT DROP"
            ))
            .await
            .context("creating a temporary table for fetched rows")?;
            let sink = tx
                .copy_in("COPY sanare_fetched_rows FROM STDIN (FORMAT binary)")
                .await
                .context("decoding fetched rows")?;
            futures_util::pin_mut!(sink);
            let mut buf = copy::HEADER.to_vec();
            for (i, row) in &matched {
                let n = i16::from_be_bytes([row[0], row[1]]) + 1;
                buf.extend_from_slice(&n.to_be_bytes());
                buf.extend_from_slice(&4i32.to_be_bytes());
                buf.extend_from_slice(&i32::try_from(*i).unwrap_or(i32::MAX).to_be_bytes());
                buf.extend_from_slice(&row[2..]);
            }
            buf.extend_from_slice(&copy::TRAILER);
            sink.send(Bytes::from(buf))
                .await
                .context("decoding fetched rows")?;
            sink.finish().await.context("decoding fetched rows")?;
            let select = (0..t.columns.len())
                .map(|i| format!("c{i}::text"))
                .collect::<Vec<_>>()
                .join(", ");
            let out = tx
                .query(
                    &format!("SELECT ord, {select} FROM sanare_fetched_rows"),
                    &[],
                )
                .await
                .context("decoding fetched rows")?;
            for r in out {
                let ord: i32 = r.get(0);
                let values = t
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        ColumnValue::new(&c.name, &c.type_name, r.get::<_, Option<String>>(i + 1))
                    })
                    .collect();
                if let Some(slot) = usize::try_from(ord).ok().and_then(|o| found.get_mut(o)) {
                    *slot = Some(RowImage {
                        table: table.clone(),
                        values,
                    });
                }
            }
            tx.rollback()
                .await
                .context("dropping the temporary table")?;
        }
        Ok(found.into_iter().flatten().collect())
    }

    async fn verify_inner(&self, id: SnapshotId, control: &Control) -> Result<VerifyReport> {
        let mut report = VerifyReport::new(id);
        let info = self.get(id).await?;
        let prior = info.status;
        let manifest = match self.load_manifest(id).await {
            Ok(m) => Some(m),
            Err(e) => {
                report.problems.push(e.to_string());
                None
            }
        };
        *self.inner.index_cache.lock().await = None;
        let index = match &manifest {
            Some(_) => match self.load_index(id).await {
                Ok(i) => Some(i),
                Err(e) => {
                    report.problems.push(e.to_string());
                    None
                }
            },
            None => None,
        };
        if let (Some(m), Some(index)) = (&manifest, &index) {
            let ids = index.block_ids();
            if m.block_count != ids.len() as u64 {
                report.problems.push(format!(
                    "manifest counts {} blocks, the index references {}",
                    m.block_count,
                    ids.len()
                ));
            }
            let expected_tables: Vec<(String, String, u64)> = index
                .tables
                .iter()
                .map(|t| (t.schema.clone(), t.name.clone(), t.rows))
                .collect();
            if expected_tables != m.tables {
                report
                    .problems
                    .push("manifest table list differs from the index".into());
            }
            for t in &index.tables {
                let rows: u64 = t.blocks.iter().map(|b| u64::from(b.rows)).sum();
                if rows != t.rows {
                    report.problems.push(format!(
                        "table {}.{}: block rows do not add up",
                        t.schema, t.name
                    ));
                }
            }
            control
                .progress()
                .phase("verifying blocks", "blocks", Some(ids.len() as u64));
            // In store order, so each pack is read front to back in few reads.
            let ids: Vec<BlockId> = ids.into_iter().collect();
            let mut located: Vec<(BlockId, Option<BlockLocation>)> = ids
                .iter()
                .copied()
                .zip(self.locate_all(&ids).await?)
                .collect();
            located.sort_by(|a, b| {
                let key = |l: &Option<BlockLocation>| l.as_ref().map(|l| (l.key.clone(), l.offset));
                key(&a.1).cmp(&key(&b.1))
            });
            let mut by_pack: BTreeMap<String, Vec<(BlockId, BlockLocation)>> = BTreeMap::new();
            for (id, loc) in &located {
                if let Some(loc) = loc.as_ref().filter(|l| l.key.starts_with(PACK_PREFIX)) {
                    by_pack
                        .entry(loc.key.clone())
                        .or_default()
                        .push((*id, loc.clone()));
                }
            }
            let checks = futures_util::stream::iter(plan(located))
                .map(|f| self.fetch(f))
                .buffer_unordered(self.inner.config.read_concurrency.max(1));
            futures_util::pin_mut!(checks);
            while let Some(blocks) = checks.next().await {
                control.checkpoint()?;
                for (b, got) in blocks? {
                    report.blocks_checked += 1;
                    match got {
                        Ok(_) => {}
                        Err(Error::NotFound { .. }) => {
                            report.blocks_missing += 1;
                            report.problems.push(format!("block {b} is missing"));
                        }
                        Err(e) => {
                            report.blocks_corrupt += 1;
                            report.problems.push(e.to_string());
                        }
                    }
                    control.progress().advance(1);
                }
            }
            // Each pack's own table of contents, as a reader without this process's
            // map would find the blocks.
            for (key, blocks) in by_pack {
                control.checkpoint()?;
                let size = self.inner.packs.read().await.pack(&key).map(|p| p.size);
                let Some(size) = size else { continue };
                let meta = crate::store::ObjectMeta {
                    key: key.clone(),
                    size,
                    modified: OffsetDateTime::UNIX_EPOCH,
                };
                let problem = match crate::pack::read_toc(&*self.inner.store, &meta).await {
                    Ok(entries) => {
                        let listed: HashMap<BlockId, (u64, u64)> = entries
                            .iter()
                            .map(|e| (e.id, (u64::from(e.offset), u64::from(e.len))))
                            .collect();
                        blocks
                            .iter()
                            .any(|(id, l)| listed.get(id) != Some(&(l.offset, l.len)))
                            .then(|| "its table of contents no longer lists this snapshot's blocks where they are".to_owned())
                    }
                    Err(Error::NotFound { .. }) => Some("it is gone".to_owned()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = problem {
                    report.blocks_corrupt += blocks.len() as u64;
                    report.problems.push(format!(
                        "pack {key} holding {} of this snapshot's blocks is damaged: {why}",
                        blocks.len()
                    ));
                }
            }
            if report.blocks_missing > 0 {
                for (pack, why) in &self.inner.packs.read().await.unreadable {
                    report
                        .problems
                        .push(format!("pack {pack} is unreadable: {why}"));
                }
            }
        }
        if !report.is_ok() {
            let e = Error::corrupt(format!("snapshot {id}"), report.problems.join("; "));
            self.mark_corrupted(id, &e).await;
        } else if prior == SnapshotStatus::Corrupted {
            tracing::warn!(%id, "a snapshot marked corrupted now verifies; leaving it corrupted");
        }
        metrics::counter!("sanare_snapshot_verifications_total").increment(1);
        Ok(report)
    }

    /// Applies `policy`: marks older snapshots deleted and removes their index and
    /// manifest (never the newest ready one). Blocks are freed by [`Snapshots::gc`].
    pub async fn apply_retention(&self, policy: &RetentionPolicy) -> Result<u64> {
        let now = OffsetDateTime::now_utc();
        let all = self.list().await?;
        let mut kept_ready = 0usize;
        let mut deleted = 0u64;
        for s in all {
            if s.status == SnapshotStatus::Creating || s.status == SnapshotStatus::Deleted {
                continue;
            }
            let young = now - s.created_at < policy.keep_within;
            let keep = young
                || (s.status == SnapshotStatus::Ready && (kept_ready < policy.keep_last.max(1)));
            if s.status == SnapshotStatus::Ready && keep {
                kept_ready += 1;
            }
            if !keep {
                self.set_status(s.id, SnapshotStatus::Deleted, None).await?;
                self.inner.store.delete(&manifest_key(s.id)).await?;
                self.inner.store.delete(&index_key(s.id)).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Deletes one snapshot: marks it deleted and removes its index and manifest.
    /// Its blocks are freed by [`Snapshots::gc`] once no other snapshot uses them.
    /// A snapshot still being written cannot be deleted.
    pub async fn delete(&self, id: SnapshotId) -> Result<SnapshotInfo> {
        let info = self.get(id).await?;
        match info.status {
            SnapshotStatus::Creating => {
                return Err(Error::conflict(format!(
                    "snapshot {id} is still being written; wait for it to finish, or let GC clean up after a crashed capture"
                )));
            }
            SnapshotStatus::Deleted => return Ok(info),
            _ => {}
        }
        self.set_status(id, SnapshotStatus::Deleted, None).await?;
        self.inner.store.delete(&manifest_key(id)).await?;
        self.inner.store.delete(&index_key(id)).await?;
        self.get(id).await
    }

    /// Mark-and-sweep of blocks no live snapshot references. Waits for running
    /// captures (a capture holds a shared lock GC takes exclusively) and keeps
    /// unreferenced blocks younger than `grace` (a capture that crashed may be retried).
    pub async fn gc(&self, grace: Duration, control: &Control) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let tx = conn.transaction().await.context("starting GC")?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&advisory_key(&self.inner.schema)],
        )
        .await
        .context("waiting for running snapshots before GC")?;
        let mut live: BTreeSet<BlockId> = BTreeSet::new();
        for s in self.list().await? {
            if matches!(s.status, SnapshotStatus::Deleted | SnapshotStatus::Creating) {
                continue;
            }
            control.checkpoint()?;
            match self.load_index(s.id).await {
                Ok(i) => live.extend(i.block_ids()),
                Err(e) => {
                    // An unreadable index: keep every block rather than guess.
                    tracing::warn!(snapshot = %s.id, error = %e, "GC skipped: an index is unreadable");
                    return Err(Error::conflict(format!(
                        "GC refused: the index of snapshot {} is unreadable ({e}); verify or delete it first",
                        s.id
                    )));
                }
            }
        }
        report.blocks_live = live.len() as u64;
        let now = OffsetDateTime::now_utc();
        self.refresh_packs().await?;
        let packs: Vec<PackInfo> = self.inner.packs.read().await.packs().to_vec();
        let small = u64::from(self.inner.config.pack_size) / 4;
        let mut rewrite: Vec<&PackInfo> = Vec::new();
        for pack in &packs {
            control.checkpoint()?;
            let dead: Vec<&PackEntry> = pack
                .entries
                .iter()
                .filter(|e| !live.contains(&e.id))
                .collect();
            if now - pack.modified < grace {
                report.blocks_in_grace += dead.len() as u64;
                continue;
            }
            if dead.len() == pack.entries.len() {
                self.inner.store.delete(&pack.key).await?;
                report.packs_deleted += 1;
                report.blocks_deleted += dead.len() as u64;
                report.bytes_freed += pack.size;
                continue;
            }
            let dead_bytes: u64 = dead.iter().map(|e| u64::from(e.len)).sum();
            if dead_bytes * 4 > pack.size || pack.size < small {
                rewrite.push(pack);
            }
        }
        // Rewriting one small pack with nothing to drop would gain nothing.
        if let [only] = rewrite[..]
            && only.entries.iter().all(|e| live.contains(&e.id))
        {
            rewrite.clear();
        }
        if !rewrite.is_empty() {
            self.rewrite_packs(&rewrite, &live, &mut report, control)
                .await?;
        }
        self.refresh_packs().await?;
        // Loose block objects of a repository written before packs.
        for obj in self.inner.store.list("blocks/").await? {
            control.checkpoint()?;
            let Some(id) = obj.key.rsplit('/').next().and_then(BlockId::from_hex) else {
                continue;
            };
            if live.contains(&id) {
                continue;
            }
            if now - obj.modified < grace {
                report.blocks_in_grace += 1;
                continue;
            }
            self.inner.store.delete(&obj.key).await?;
            report.blocks_deleted += 1;
            report.bytes_freed += obj.size;
        }
        tx.commit().await.context("ending GC")?;
        metrics::counter!("sanare_snapshot_gc_blocks_deleted_total")
            .increment(report.blocks_deleted);
        Ok(report)
    }

    /// Copies the live blocks of `packs` into new packs (checking each block's
    /// hash), then deletes the old packs. A pack with a damaged live block is kept.
    async fn rewrite_packs(
        &self,
        packs: &[&PackInfo],
        live: &BTreeSet<BlockId>,
        report: &mut GcReport,
        control: &Control,
    ) -> Result<()> {
        // The new packs must not be deduplicated against the old ones.
        let scratch = tokio::sync::RwLock::new(PackMap::default());
        let writer = PackWriter::new(&self.inner.store, &scratch, self.inner.config.pack_size);
        let mut pack = PackBuilder::new();
        let mut done: Vec<&PackInfo> = Vec::new();
        for old in packs {
            control.checkpoint()?;
            let Some(bytes) = self.inner.store.get(&old.key).await? else {
                continue;
            };
            let entries: Vec<PackEntry> = old
                .entries
                .iter()
                .filter(|e| live.contains(&e.id))
                .copied()
                .collect();
            let checked = {
                let bytes = bytes.clone();
                let entries = entries.clone();
                tokio::task::spawn_blocking(move || {
                    entries.iter().try_for_each(|e| {
                        let object = bytes
                            .get(e.offset as usize..(e.offset as usize + e.len as usize))
                            .ok_or_else(|| {
                                Error::corrupt(format!("block {}", e.id), "outside its pack")
                            })?;
                        decode_block(&e.id, object).map(drop)
                    })
                })
                .await
                .map_err(|e| Error::other("checking blocks before rewriting a pack", e))?
            };
            if let Err(e) = checked {
                tracing::warn!(pack = %old.key, error = %e, "GC keeps a pack with a damaged block; verify the snapshots that use it");
                continue;
            }
            for e in &entries {
                let object = &bytes[e.offset as usize..e.offset as usize + e.len as usize];
                writer.add(&mut pack, e.id, object).await?;
            }
            report.blocks_deleted += (old.entries.len() - entries.len()) as u64;
            done.push(old);
        }
        writer.flush(&mut pack).await?;
        let written = writer.finish().await?;
        // The copies are durable; only now the originals go.
        let mut freed = 0u64;
        for old in &done {
            self.inner.store.delete(&old.key).await?;
            freed += old.size;
        }
        report.packs_rewritten += done.len() as u64;
        report.bytes_freed += freed.saturating_sub(written);
        Ok(())
    }

    /// What the store holds.
    pub async fn stats(&self) -> Result<StorageStats> {
        let mut stats = StorageStats::default();
        for s in self.list().await? {
            *stats
                .snapshots
                .entry(status_str(s.status).to_owned())
                .or_default() += 1;
            if s.status == SnapshotStatus::Ready {
                stats.logical_bytes += s.size_bytes;
            }
        }
        self.refresh_packs().await?;
        {
            let map = self.inner.packs.read().await;
            stats.packs = map.packs().len() as u64;
            stats.blocks = map.block_count() as u64;
            stats.block_bytes = map.packs().iter().map(|p| p.size).sum();
        }
        for o in self.inner.store.list("blocks/").await? {
            stats.blocks += 1;
            stats.block_bytes += o.size;
        }
        Ok(stats)
    }
}

/// A read of blocks: a run of adjacent blocks in a pack, or one loose block object.
#[derive(Debug)]
enum Fetch {
    Run(crate::pack::Run),
    Loose(BlockId),
}

/// Most bytes read at once for adjacent blocks of a pack.
const RUN_MAX: u64 = 1024 * 1024;

/// The reads that fetch located blocks in order.
fn plan(located: impl IntoIterator<Item = (BlockId, Option<BlockLocation>)>) -> Vec<Fetch> {
    let mut out = Vec::new();
    let mut packed = Vec::new();
    for (id, loc) in located {
        match loc {
            Some(loc) => packed.push((id, loc)),
            None => {
                out.extend(
                    crate::pack::runs(std::mem::take(&mut packed), RUN_MAX)
                        .into_iter()
                        .map(Fetch::Run),
                );
                out.push(Fetch::Loose(id));
            }
        }
    }
    out.extend(
        crate::pack::runs(packed, RUN_MAX)
            .into_iter()
            .map(Fetch::Run),
    );
    out
}

/// Compresses a block on a blocking thread: its reference and its block object.
async fn encode(block: RowBlock, codec: Codec) -> Result<(BlockRef, Vec<u8>)> {
    let RowBlock {
        content,
        rows,
        key_filter,
    } = block;
    let raw_len = u32::try_from(content.len()).unwrap_or(u32::MAX);
    let (id, object) = tokio::task::spawn_blocking(move || {
        let id = BlockId::of(&content);
        encode_block(&content, codec).map(|e| (id, e))
    })
    .await
    .map_err(|e| Error::other("compressing a block", e))??;
    Ok((
        BlockRef {
            id,
            raw_len,
            rows,
            key_filter,
        },
        object,
    ))
}

/// Decodes a block object on a blocking thread; the inner result is the block's.
async fn decode_off_thread(id: BlockId, object: Bytes) -> Result<Result<Vec<u8>>> {
    tokio::task::spawn_blocking(move || decode_block(&id, &object))
        .await
        .map_err(|e| Error::other("decoding a block", e))
}

/// A block of snapshot `snapshot` that could not be read, as the snapshot's damage.
fn block_error(snapshot: SnapshotId, id: BlockId, e: Error) -> Error {
    match e {
        Error::NotFound { .. } => Error::corrupt(
            format!("snapshot {snapshot}"),
            format!("block {id} is missing from the store"),
        ),
        e => Error::corrupt(format!("snapshot {snapshot}"), e.to_string()),
    }
}

/// Drops the secondary indexes, primary/unique/exclusion constraints and foreign
/// keys of `tables` (quoted names, already emptied in `tx`) so the load does not
/// maintain them row by row, and returns what recreates them afterwards, in order:
/// keys and indexes first, then foreign keys, each checked by PostgreSQL in one
/// pass over the loaded rows. Everything happens in the restore's transaction, so a
/// failure or a crash leaves the tables, indexes and keys as they were.
async fn defer_indexes_and_keys(
    tx: &tokio_postgres::Transaction<'_>,
    tables: &[String],
) -> Result<Vec<(String, String)>> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let ctx = "reading the indexes and keys of the restored tables";
    let (fks, hashjoin) = crate::restore::foreign_keys(tx, tables).await?;
    let keys = tx
        .query(
            "SELECT c.conrelid::regclass::text, quote_ident(c.conname), pg_get_constraintdef(c.oid)
               FROM pg_constraint c
              WHERE c.contype IN ('p', 'u', 'x') AND c.conrelid = ANY($1::text[]::regclass[])
              ORDER BY c.oid",
            &[&tables],
        )
        .await
        .context(ctx)?;
    let indexes = tx
        .query(
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
               FROM pg_index i
              WHERE i.indrelid = ANY($1::text[]::regclass[])
                AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                                 WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u', 'x'))
              ORDER BY i.indexrelid",
            &[&tables],
        )
        .await
        .context(ctx)?;
    let mut drop = String::new();
    let mut rebuild = Vec::new();
    for k in &fks {
        drop.push_str(&k.drop_sql());
    }
    for r in &keys {
        let (table, name): (String, String) = (r.get(0), r.get(1));
        drop.push_str(&format!("ALTER TABLE {table} DROP CONSTRAINT {name};\n"));
    }
    for r in &indexes {
        let name: String = r.get(0);
        drop.push_str(&format!("DROP INDEX {name};\n"));
    }
    for r in &keys {
        let (table, name, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        rebuild.push((
            format!("constraint {name} of {table}"),
            format!("ALTER TABLE {table} ADD CONSTRAINT {name} {def}"),
        ));
    }
    for r in &indexes {
        let (name, def): (String, String) = (r.get(0), r.get(1));
        rebuild.push((format!("index {name}"), def));
    }
    for k in &fks {
        rebuild.push((
            format!("foreign key {} of {}", k.name, k.table),
            k.rebuild_sql(&hashjoin),
        ));
    }
    if !drop.is_empty() {
        tx.batch_execute(&drop).await.context(
            "dropping indexes and keys for the restore (they are rebuilt before it commits)",
        )?;
    }
    Ok(rebuild)
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

/// The captured columns (stored generated columns excluded) and primary key positions.
async fn describe(
    client: &impl tokio_postgres::GenericClient,
    table: &TableRef,
) -> Result<(Vec<ColumnDef>, Vec<u16>)> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    coalesce(array_position(i.indkey::int2[], a.attnum)
                             - array_lower(i.indkey::int2[], 1) + 1, 0)::int4
               FROM pg_attribute a
               LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
              WHERE a.attrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass
                AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
              ORDER BY a.attnum",
            &[&table.schema, &table.name],
        )
        .await
        .with_context(|| format!("reading the columns of {table}"))?;
    if rows.is_empty() {
        return Err(Error::not_found(format!(
            "table {table} (or it has no columns)"
        )));
    }
    let mut columns = Vec::with_capacity(rows.len());
    let mut pk: Vec<(i32, u16)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        columns.push(ColumnDef {
            name: r.get(0),
            type_name: r.get(1),
        });
        let pos: i32 = r.get(2);
        if pos > 0 {
            pk.push((pos, u16::try_from(i).unwrap_or(u16::MAX)));
        }
    }
    pk.sort();
    Ok((columns, pk.into_iter().map(|(_, i)| i).collect()))
}

/// The sequences owned by `table`'s columns (serial and identity), with their state.
async fn sequences(
    client: &impl tokio_postgres::GenericClient,
    table: &TableRef,
) -> Result<Vec<SequenceState>> {
    let rows = client
        .query(
            "SELECT d.objid::regclass::text
               FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
              WHERE d.refobjid = (quote_ident($1) || '.' || quote_ident($2))::regclass
                AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
              ORDER BY 1",
            &[&table.schema, &table.name],
        )
        .await
        .with_context(|| format!("listing the sequences of {table}"))?;
    let mut out = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let s = client
            .query_one(&format!("SELECT last_value, is_called FROM {name}"), &[])
            .await
            .with_context(|| format!("reading sequence {name}"))?;
        out.push(SequenceState {
            name,
            last_value: s.get(0),
            is_called: s.get(1),
        });
    }
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
