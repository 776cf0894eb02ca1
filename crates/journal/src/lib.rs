//! The transaction journal of sanare.
//!
//! A host records every state change as a [`NewEntry`]; a replay hands recorded
//! entries to the [`Handler`] or [`PgHandler`] registered for their operation type.
//! Two backends sit behind one [`Journal`] type, which implements
//! [`sanare_core::JournalService`]:
//!
//! - **Segment-file WAL** ([`Journal::wal`]), the embedded default. Records are framed
//!   (magic, version, kind, length, CRC-32C; `docs/formats.md`) and appended to
//!   segment files by one writer thread that commits in groups, pipelined: it
//!   writes a group with one `pwrite` and hands its `fdatasync` to a sync thread,
//!   then writes the next group while up to
//!   [`sync_pipeline_depth`](JournalBuilder::sync_pipeline_depth) (default 2)
//!   flushes run; callers arriving while that many are in flight share the next
//!   group. [`Journal::record`] returns only once the entry is durable, and callers,
//!   the head, events and metrics advance in position order. See
//!   [Write failures](#write-failures). Each group commit ends with a group trailer
//!   (its entries, and what was durable when it was written), so after a power
//!   cut a torn, never acknowledged group is cut off as a tail, while damage in a
//!   group a later one vouches for is isolated and reported in [`OpenReport`] (the
//!   rest stays readable). Segments rotate at a size limit. [`Journal::compact`]
//!   compresses sealed segments in 64 KiB blocks (brotli; damage costs the records
//!   of one block, never the segment), [`Journal::purge`] drops whole segments
//!   before a retained position, and the applied marks of their entries. A summary
//!   per sealed segment (positions, time range, operation types, idempotency keys)
//!   lets open skip decoding it, and a checkpoint of the active segment, written
//!   every few MiB of durable data off the writers' path (and by
//!   [`Journal::checkpoint`]), lets open decode only what follows it: open time
//!   grows neither with the journal nor with the active segment (a checkpoint is
//!   a hint checked against the segment's frames; without a valid one the segment
//!   is decoded whole). The idempotency keys are loaded on a thread of their own
//!   after open: appends without a key do not wait for them. Summaries also
//!   let queries skip segments; every sealed segment has an index file (position,
//!   time, operation type and frame offset of each entry; rebuilt when missing or
//!   damaged) so queries decode only the entries they select. The active segment
//!   is zero-filled ahead of its data, so a group commit's `fdatasync` rarely has
//!   metadata to flush. All file I/O goes through a [`sanare_fs::Storage`]
//!   ([`JournalBuilder::storage`]): the tests cut the power of a simulated disk
//!   under it. Queries, replay, statistics, validation and compaction do their
//!   file I/O, decoding and compression on blocking threads, never on the async
//!   runtime's.
//! - **PostgreSQL** ([`Journal::postgres`]): the `transaction_journal` table in sanare's
//!   schema ([`MIGRATIONS`]). [`Journal::record_in`] writes inside the host's own
//!   transaction, atomic with its change; [`Journal::record`] batches concurrent
//!   callers into one multi-row `INSERT … SELECT FROM unnest(…)` per round trip.
//!   Each row stores its writer's `pg_current_xact_id()`.
//!
//! # The sequence-gap race
//! Sequence numbers are drawn at insert time, but writers commit in any order: a
//! reader that saw position 5 may later see 4 appear. The PostgreSQL backend never
//! hands out a position past which an entry can still appear. Because `writer_xid`
//! is the table's first column, a writer's xid exists before its sequence number.
//! [`JournalService::cut`] and every replay first *settle*: they take an xid of
//! their own after the snapshot (the horizon) and wait until every transaction
//! with a lower xid has ended and, if it committed, is visible to new snapshots.
//! (A snapshot's own in-progress list is not enough: PostgreSQL leaves out running
//! transactions whose xid is at or above the snapshot's xmax.) The cut is then the
//! highest position visible in the snapshot, lowered below the first entry of any
//! other writer under the horizon; a replay reads up to the last number drawn
//! before the horizon. A replay of
//! [`ReplayRange::After`](sanare_core::ReplayRange::After) a cut additionally skips every entry whose writer is visible
//! in the cut's snapshot (`pg_visible_in_snapshot`), so restore + replay is exact
//! even with out-of-order commits.
//!
//! # Write failures
//! A failed `pwrite` or `fdatasync` stops the WAL from accepting entries until it
//! is reopened (later callers get [`Error::Unavailable`]). When a group's `pwrite`
//! fails, its callers get [`Error::Io`] and their entries are not recorded; groups
//! written before it are settled by their own `fdatasync`. When an `fdatasync`
//! fails, every caller not answered yet — the failed group's and every other group
//! in flight — gets [`Error::Io`]: their entries are *maybe durable*. They were
//! written, but whether they reached the disk is unknown (Linux may have dropped
//! the dirty pages), so after a reopen any of them may or may not be in the
//! journal, always after the last acknowledged entry. A caller that
//! must know retries after the reopen with the same idempotency key: it gets the
//! entry if it is there, or records it. Every entry acknowledged before the
//! failure is durable: a group is acknowledged only after an `fdatasync` that
//! started after its `pwrite` succeeded, and no outcome is trusted after the first
//! failure. Each sync thread flushes through its own open file description, so a
//! writeback error is reported to each concurrent `fdatasync` rather than consumed
//! by one of them.
//!
//! # Cuts and write-ahead entries
//! The reference pattern is [`Journal::record`], then the host's transaction
//! commits its change. An entry can thus be durable before a snapshot is taken
//! while its change commits after it. A [cut](JournalService::cut) therefore
//! leaves out every entry recorded with `record()` within the
//! [write-ahead window](JournalBuilder::write_ahead_window) (60 s) before it, on
//! both backends; a replay after the cut applies them (handlers are idempotent),
//! and on PostgreSQL it does so even when their rows are visible in the cut's
//! snapshot. Entries written with [`Journal::record_in`] commit with the change
//! and need no window.
//!
//! # Restores
//! A restore undoes the effects of the entries after its cut, but not their
//! applied marks. [`JournalService::reopen_after`] voids those marks (WAL: a
//! reopen record in `applied.marks`; PostgreSQL: the rows of `journal_applied`),
//! so the replay that follows applies them again, exactly once; call it right
//! after the restore commits.
//!
//! # Exactly-once replay
//! Each applied entry gets an applied mark keyed by its id. A [`PgHandler`] runs in a
//! transaction that first inserts the mark (`ON CONFLICT DO NOTHING`; zero rows means
//! already applied) and then applies the effect: both commit or neither does. In a
//! sequential replay a run of entries shares one transaction: one multi-row mark
//! insert, then [`PgHandler::apply_batch`] per operation type with the entries not
//! applied yet (a handler that implements it applies the run in one statement); if
//! the run fails it is rolled back and retried entry by entry. A plain
//! [`Handler`] (no PostgreSQL needed) is marked after it returns: see its docs for
//! how it reaches exactly-once. Entries whose payload no longer matches their
//! blake3 hash are reported and never applied.
//!
//! # Architecture invariant
//! This crate depends on `sanare-core`, `sanare-pg` and `sanare-fs` only, never on
//! another component. Positions strictly increase for the life of the journal
//! (across rotation, purge, compaction and restarts: a segment's base, written
//! before any entry goes in, bounds every position handed out); a position
//! handed out by `head`, `cut` or a replay summary never gains an entry at or
//! before it later. Nothing is allocated from a length no checksum has vouched for.
//!
//! # Dependencies
//! `crc32c` (hardware CRC-32C for frames), `postcard` (the documented, stable
//! encoding of record bodies and payloads), `blake3` (payload hashes), `brotli`
//! (dense compression of sealed segments and archives: order-service JSON shrinks
//! by well over 80 %).

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod entry;
mod frame;
mod handler;
mod index;
mod lock;
mod pg;
mod pipeline;
mod query;
mod replay;
mod sealed;
mod summary;
mod wal;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tracing::Instrument;

use sanare_core::{
    Control, Error, Event, EventBus, JournalCut, JournalPosition, JournalService, ReplayRequest,
    ReplaySummary, Result,
};
use sanare_pg::SchemaName;

pub use entry::{EntryStatus, JournalEntry, NewEntry, Recorded};
pub use frame::CorruptRegion;
pub use handler::{Handler, NoopHandler, PgHandler};
pub use pg::{HostTransaction, MIGRATIONS, migrate};
pub use query::Query;
pub use wal::OpenReport;

/// Fault injection for tests of the WAL's failure paths (feature `testing`).
#[cfg(feature = "testing")]
pub mod testing {
    /// An I/O step of the WAL writer, passed to the hook of
    /// [`JournalBuilder::inject_wal_faults`](crate::JournalBuilder::inject_wal_faults).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[non_exhaustive]
    pub enum WalFault {
        /// The `pwrite` of the `group`-th group commit with data since the journal
        /// was opened (1-based).
        Write {
            /// Which group.
            group: u64,
        },
        /// The `fdatasync` that makes the `sync`-th group durable (1-based; it
        /// also covers every group before it).
        Sync {
            /// Which sync.
            sync: u64,
        },
    }

    impl From<crate::pipeline::FaultPoint> for WalFault {
        fn from(p: crate::pipeline::FaultPoint) -> Self {
            match p {
                crate::pipeline::FaultPoint::Write { group } => Self::Write { group },
                crate::pipeline::FaultPoint::Sync { sync } => Self::Sync { sync },
            }
        }
    }
}

use query::ScanPlan;

#[derive(Clone)]
enum AnyHandler {
    Plain(Arc<dyn Handler>),
    Pg(Arc<dyn PgHandler>),
}

enum Kind {
    Wal(PathBuf),
    Pg(Pool, SchemaName),
}

/// Builds a [`Journal`]: `Journal::wal(dir)` or `Journal::postgres(pool, schema)`, then
/// options, then [`build`](JournalBuilder::build).
#[must_use]
pub struct JournalBuilder {
    kind: Kind,
    handlers: HashMap<String, AnyHandler>,
    events: Option<EventBus>,
    segment_size: u64,
    max_batch: usize,
    sync_pipeline_depth: usize,
    faults: pipeline::Faults,
    settle_timeout: Duration,
    handler_db: Option<(Pool, SchemaName)>,
    migrate: bool,
    replay_batch: usize,
    replay_concurrency: usize,
    read_only: bool,
    lock_wait: Duration,
    storage: Arc<dyn sanare_fs::Storage>,
    idempotency_window: usize,
    write_ahead_window: Duration,
}

impl JournalBuilder {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            handlers: HashMap::new(),
            events: None,
            segment_size: 64 << 20,
            max_batch: 4096,
            sync_pipeline_depth: 2,
            faults: pipeline::Faults::default(),
            settle_timeout: Duration::from_secs(30),
            handler_db: None,
            migrate: true,
            replay_batch: 1024,
            replay_concurrency: 8,
            read_only: false,
            lock_wait: Duration::from_secs(5),
            storage: sanare_fs::os(),
            idempotency_window: 1_000_000,
            write_ahead_window: Duration::from_secs(60),
        }
    }

    /// WAL: where its files live (default: the operating system's files). Tests
    /// pass a `sanare_fs::sim::SimDisk` to cut the power under the journal.
    pub fn storage(mut self, storage: Arc<dyn sanare_fs::Storage>) -> Self {
        self.storage = storage;
        self
    }

    /// WAL: how many of the most recent idempotency keys are remembered (default
    /// 1,000,000, about 60 MB). A key recorded again within the last `n` keyed
    /// entries returns the first entry; an older key is recorded anew. Memory
    /// stays bounded however long the journal grows. After an open the window is
    /// loaded in the background (newest segments first, at most `n` keys); the first
    /// append *with* a key waits until it is, appends without a key do not.
    /// (The PostgreSQL backend keeps every key, in its table's unique index.)
    pub fn idempotency_window(mut self, n: usize) -> Self {
        self.idempotency_window = n.max(1);
        self
    }

    /// How long a host may take, after [`Journal::record`] returns, to commit the
    /// change the entry describes (default 60 s). A [cut](JournalService::cut)
    /// leaves out every entry recorded with `record()` less than this long before
    /// it, so a snapshot never claims an entry whose change had not committed
    /// yet; replay after a restore applies those entries again (handlers are
    /// idempotent). Enforce it on the host's side with PostgreSQL's
    /// `idle_in_transaction_session_timeout` and `statement_timeout` (or
    /// `transaction_timeout`). Entries written with [`Journal::record_in`] commit
    /// with the host's change and need no window. Zero when the host applies
    /// changes only through replay.
    pub fn write_ahead_window(mut self, window: Duration) -> Self {
        self.write_ahead_window = window;
        self
    }

    /// Registers `handler` for `operation_type`.
    pub fn handler(
        mut self,
        operation_type: impl Into<String>,
        handler: impl Handler + 'static,
    ) -> Self {
        self.handlers
            .insert(operation_type.into(), AnyHandler::Plain(Arc::new(handler)));
        self
    }

    /// Registers a PostgreSQL `handler` for `operation_type` (effect and applied mark
    /// commit together). The WAL backend needs [`handler_database`](Self::handler_database).
    pub fn pg_handler(
        mut self,
        operation_type: impl Into<String>,
        handler: impl PgHandler + 'static,
    ) -> Self {
        self.handlers
            .insert(operation_type.into(), AnyHandler::Pg(Arc::new(handler)));
        self
    }

    /// The database PostgreSQL handlers apply to (and where their applied marks live)
    /// when the journal itself is the WAL. The PostgreSQL backend uses its own pool.
    pub fn handler_database(mut self, pool: Pool, schema: SchemaName) -> Self {
        self.handler_db = Some((pool, schema));
        self
    }

    /// Publishes events on `bus`: [`Event::JournalRecorded`] per durable batch of
    /// `record()` calls (one WAL group commit or one batched PostgreSQL insert),
    /// [`Event::JournalCompacted`] per compaction, [`Event::JournalReplayed`] per
    /// replay.
    pub fn events(mut self, bus: EventBus) -> Self {
        self.events = Some(bus);
        self
    }

    /// WAL: rotate segments at this size (default 64 MiB).
    pub fn segment_size(mut self, bytes: u64) -> Self {
        self.segment_size = bytes.max(4096);
        self
    }

    /// Most entries committed together (default 4096).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// WAL: how many group commits may have their `fdatasync` in flight at once
    /// (default 2, at most 16). The writer thread writes the next group while
    /// earlier groups are being flushed, each by its own sync thread; a caller is
    /// still answered only once its entry is durable, and callers are answered in
    /// position order. A further flush starts only while the ones in flight have
    /// run less than half their usual time (or run late); near the end of one,
    /// callers wait for it and join the group after it, since two overlapping
    /// flushes each take longer than one. 1 is classic group commit (one flush at a
    /// time); more than 2 helps only on a device that flushes several requests in
    /// parallel.
    pub fn sync_pipeline_depth(mut self, n: usize) -> Self {
        self.sync_pipeline_depth = n.clamp(1, 16);
        self
    }

    /// WAL: calls `hook` before each `pwrite` and `fdatasync` of the writer; an
    /// error it returns replaces the operation's outcome (the operation is not
    /// run). It may also block, to hold a group in flight. For tests of the
    /// failure paths (feature `testing`).
    #[cfg(feature = "testing")]
    pub fn inject_wal_faults(
        mut self,
        hook: impl Fn(testing::WalFault) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.faults = pipeline::Faults::new(Arc::new(move |at| hook(at.into())));
        self
    }

    /// PostgreSQL: how long a cut or replay waits for in-progress writers (default 30 s).
    pub fn settle_timeout(mut self, timeout: Duration) -> Self {
        self.settle_timeout = timeout;
        self
    }

    /// Whether `build` applies [`MIGRATIONS`] (default true).
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Entries read per replay batch (default 1024).
    pub fn replay_batch(mut self, n: usize) -> Self {
        self.replay_batch = n.max(1);
        self
    }

    /// Keys applied at once in a parallel replay (default 8).
    pub fn replay_concurrency(mut self, n: usize) -> Self {
        self.replay_concurrency = n.max(1);
        self
    }

    /// Opens a WAL journal for reading only, beside the process that writes it (an
    /// operator tool while the service runs): no lock is taken and nothing is
    /// written — a torn or in-flight tail is read up to, not cut — and recording,
    /// compaction, purge and replay marks are refused. Queries, statistics,
    /// validation and dry-run replays work. Without it, opening a WAL takes its
    /// directory's writer lock and a second writer is refused. No effect on the
    /// PostgreSQL backend.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// How long opening a WAL waits for another writer to release the directory
    /// before failing (default 5 s: a restart may race the old process's exit).
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// Opens the journal (WAL: recovers the directory; PostgreSQL: migrates).
    pub async fn build(self) -> Result<Journal> {
        async fn migrate_pool(pool: &Pool, schema: &SchemaName) -> Result<()> {
            let mut client = sanare_pg::get_conn(pool).await?;
            let client: &mut tokio_postgres::Client = &mut client;
            MIGRATIONS.run(client, schema).await?;
            Ok(())
        }
        let handler_db = match (&self.kind, self.handler_db) {
            (Kind::Pg(pool, schema), _) => Some((pool.clone(), schema.clone())),
            (Kind::Wal(_), db) => db,
        };
        if self.migrate
            && let Some((pool, schema)) = &handler_db
        {
            migrate_pool(pool, schema).await?;
        }
        if handler_db.is_none()
            && self
                .handlers
                .values()
                .any(|h| matches!(h, AnyHandler::Pg(_)))
        {
            return Err(Error::config(
                "journal.handler_database",
                "a PostgreSQL handler is registered but the WAL journal has no handler database",
            ));
        }
        let backend = match self.kind {
            Kind::Wal(dir) => {
                let options = wal::WalOptions {
                    segment_size: self.segment_size,
                    max_batch: self.max_batch,
                    sync_pipeline_depth: self.sync_pipeline_depth,
                    faults: self.faults.clone(),
                    events: self.events.clone(),
                    read_only: self.read_only,
                    lock_wait: self.lock_wait,
                    storage: self.storage.clone(),
                };
                let keys = self.idempotency_window;
                let wal = tokio::task::spawn_blocking(move || wal::Wal::open(&dir, options, keys))
                    .await
                    .map_err(|e| Error::other("opening the journal", e))??;
                Backend::Wal(wal)
            }
            Kind::Pg(pool, schema) => Backend::Pg(pg::PgJournal::new(
                pool,
                &schema,
                self.max_batch,
                self.settle_timeout,
                self.events.clone(),
            )),
        };
        Ok(Journal {
            inner: Arc::new(Inner {
                backend,
                handlers: self.handlers,
                handler_db: handler_db.map(|(p, s)| (p, Arc::new(pg::Sql::new(&s)))),
                events: self.events,
                replay_batch: self.replay_batch,
                replay_concurrency: self.replay_concurrency,
                write_ahead_window: self.write_ahead_window,
            }),
        })
    }
}

enum Backend {
    Wal(wal::Wal),
    Pg(pg::PgJournal),
}

struct Inner {
    backend: Backend,
    handlers: HashMap<String, AnyHandler>,
    handler_db: Option<(Pool, Arc<pg::Sql>)>,
    events: Option<EventBus>,
    replay_batch: usize,
    replay_concurrency: usize,
    write_ahead_window: Duration,
}

/// The transaction journal: cheap to clone, shared by every task of the host.
///
/// ```no_run
/// # async fn demo() -> sanare_core::Result<()> {
/// use sanare_journal::{Journal, NewEntry, NoopHandler};
///
/// let journal = Journal::wal("/var/lib/app/journal")
///     .handler("order.placed", NoopHandler)
///     .build()
///     .await?;
/// let recorded = journal.record(NewEntry::new("order.placed", &42u64)?).await?;
/// assert!(!recorded.duplicate);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.inner.backend {
            Backend::Wal(w) => format!("wal({})", w.dir().display()),
            Backend::Pg(_) => "postgres".to_owned(),
        };
        f.debug_struct("Journal")
            .field("backend", &backend)
            .finish()
    }
}

/// Statistics of a journal.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct JournalStats {
    /// The head position.
    pub head: JournalPosition,
    /// Entries stored.
    pub entries: u64,
    /// WAL segments (0 for PostgreSQL).
    pub segments: u64,
}

/// What [`Journal::validate`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct JournalValidation {
    /// Entries checked.
    pub entries: u64,
    /// Segments checked (WAL).
    pub segments: u64,
    /// Damage found (frames, payload hashes, order).
    pub problems: Vec<CorruptRegion>,
}

impl JournalValidation {
    /// Whether nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What [`Journal::compact`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct CompactionReport {
    /// Segments compressed.
    pub segments: u64,
    /// Their size before.
    pub bytes_before: u64,
    /// Their size after.
    pub bytes_after: u64,
}

impl Journal {
    /// A builder for a segment-file WAL journal in `dir` (created if missing).
    pub fn wal(dir: impl AsRef<Path>) -> JournalBuilder {
        JournalBuilder::new(Kind::Wal(dir.as_ref().to_owned()))
    }

    /// A builder for a PostgreSQL journal in `schema`.
    pub fn postgres(pool: Pool, schema: SchemaName) -> JournalBuilder {
        JournalBuilder::new(Kind::Pg(pool, schema))
    }

    /// Records `entry` and returns once it is durable (WAL: fsync'd with a group;
    /// PostgreSQL: committed in a batch). A known idempotency key returns the first
    /// entry with `duplicate: true`.
    pub async fn record(&self, entry: NewEntry) -> Result<Recorded> {
        match &self.inner.backend {
            Backend::Wal(w) => w.append(entry).await,
            Backend::Pg(p) => p.record(entry).await,
        }
    }

    /// Records `entry` inside the host's transaction `tx` (PostgreSQL backend): it
    /// commits or rolls back with the host's change. Its position is final once `tx`
    /// commits.
    ///
    /// `tx` is a [`tokio_postgres::Transaction`] or a [`deadpool_postgres::Transaction`]
    /// ([`HostTransaction`]). With the latter the insert is prepared once per
    /// connection, in the connection's statement cache, and then costs one round trip
    /// with no parsing or planning on the server; with the former it is sent with
    /// its parameters' types (one round trip, parsed and planned each time). Behind
    /// a pooler in transaction mode, where a prepared statement may not outlive a
    /// transaction, pass the inner transaction (`&*tx`).
    ///
    /// The call does not depend on the results of the host's statements, so it can
    /// run concurrently with one of them on the same transaction (for example with
    /// `futures::join!`, checking both results): the client pipelines both, and the
    /// entry costs no round trip of its own. If either fails, roll the transaction
    /// back.
    pub async fn record_in<'a, 'c: 'a>(
        &self,
        tx: impl Into<HostTransaction<'a, 'c>>,
        entry: NewEntry,
    ) -> Result<Recorded> {
        match &self.inner.backend {
            Backend::Pg(p) => pg::record_in(&p.sql, tx.into(), entry).await,
            Backend::Wal(_) => Err(Error::invalid_input(
                "record_in needs the PostgreSQL journal backend; the WAL records with record()",
            )),
        }
    }

    /// What opening found (WAL); `None` for PostgreSQL.
    pub fn open_report(&self) -> Option<&OpenReport> {
        match &self.inner.backend {
            Backend::Wal(w) => Some(w.report()),
            Backend::Pg(_) => None,
        }
    }

    /// Entries matching `query`, in position order.
    pub async fn query(&self, query: &Query) -> Result<Vec<JournalEntry>> {
        let plan = query.plan();
        let limit = query.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut after = plan.after;
        loop {
            let (batch, _) = self.scan(&plan, after, limit.min(10_000)).await?;
            let Some(last) = batch.last() else { break };
            after = last.position.0;
            for e in batch {
                if out.len() >= limit {
                    return Ok(out);
                }
                out.push(e);
            }
        }
        Ok(out)
    }

    async fn scan(
        &self,
        plan: &ScanPlan,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<JournalEntry>, Vec<CorruptRegion>)> {
        match &self.inner.backend {
            Backend::Wal(_) => {
                let mut plan = plan.clone();
                plan.snapshot = None;
                self.on_wal(move |w| {
                    let (mut entries, damage) = w.scan(&plan, after, limit)?;
                    w.apply_marks(&mut entries);
                    Ok((entries, damage))
                })
                .await
            }
            Backend::Pg(p) => Ok((p.scan(plan, after, limit).await?, Vec::new())),
        }
    }

    /// Checks every record (frames, payload hashes, order).
    pub async fn validate(&self, control: &Control) -> Result<JournalValidation> {
        control.checkpoint()?;
        match &self.inner.backend {
            Backend::Wal(_) => {
                let (segments, entries, problems) = self.on_wal(|w| w.validate()).await?;
                Ok(JournalValidation {
                    entries,
                    segments,
                    problems,
                })
            }
            Backend::Pg(_) => {
                let mut v = JournalValidation::default();
                let plan = ScanPlan::default();
                let mut after = 0;
                loop {
                    control.checkpoint()?;
                    let (batch, _) = self.scan(&plan, after, 10_000).await?;
                    let Some(last) = batch.last() else { break };
                    after = last.position.0;
                    for e in batch {
                        v.entries += 1;
                        if !e.payload_intact() {
                            v.problems.push(CorruptRegion {
                                segment: "transaction_journal".into(),
                                offset: e.position.0,
                                len: 0,
                                reason: format!(
                                    "entry {} payload does not match its hash",
                                    e.position
                                ),
                            });
                        }
                    }
                    control.progress().set_done(v.entries);
                }
                Ok(v)
            }
        }
    }

    /// Runs `f` on the WAL on a blocking thread: file I/O, decoding and
    /// compression never run on the async runtime's threads.
    async fn on_wal<T: Send + 'static>(
        &self,
        f: impl FnOnce(&wal::Wal) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || match &inner.backend {
            Backend::Wal(w) => f(w),
            Backend::Pg(_) => Err(Error::invalid_input("not a WAL journal")),
        })
        .await
        .map_err(|e| Error::other("a journal task stopped", e))?
    }

    /// Statistics.
    pub async fn stats(&self) -> Result<JournalStats> {
        let head = self.head().await?;
        match &self.inner.backend {
            Backend::Wal(_) => {
                let (segments, entries, _) = self.on_wal(|w| w.validate()).await?;
                Ok(JournalStats {
                    head,
                    entries,
                    segments,
                })
            }
            Backend::Pg(p) => {
                let client = sanare_pg::get_conn(&p.pool).await?;
                let row = client
                    .query_one(&format!("SELECT count(*) FROM {}", p.sql.table), &[])
                    .await
                    .map_err(|e| sanare_pg::map_pg_error("counting journal entries", e))?;
                Ok(JournalStats {
                    head,
                    entries: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
                    segments: 0,
                })
            }
        }
    }

    /// WAL: seals the active segment and starts a new one (rotation also happens
    /// at the size limit). No-op for PostgreSQL.
    pub async fn rotate(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Wal(w) => w.rotate().await,
            Backend::Pg(_) => Ok(()),
        }
    }

    /// WAL: writes a checkpoint of the active segment once everything recorded so
    /// far is durable, so that the next open decodes only what is recorded after
    /// it. The WAL also checkpoints by itself every few MiB; this is for a planned
    /// shutdown. No-op for PostgreSQL.
    pub async fn checkpoint(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Wal(w) => w.checkpoint().await,
            Backend::Pg(_) => Ok(()),
        }
    }

    /// WAL: compresses every sealed segment (sealed segments never change). No-op for
    /// PostgreSQL, whose storage is the server's.
    pub async fn compact(&self, control: &Control) -> Result<CompactionReport> {
        control.checkpoint()?;
        self.compact_inner()
            .instrument(tracing::info_span!("journal.compact"))
            .await
    }

    async fn compact_inner(&self) -> Result<CompactionReport> {
        match &self.inner.backend {
            Backend::Wal(_) => {
                let (segments, bytes_before, bytes_after) = self.on_wal(|w| w.compact()).await?;
                metrics::counter!("sanare_journal_compacted_segments_total").increment(segments);
                tracing::info!(segments, bytes_before, bytes_after, "journal compacted");
                if let Some(bus) = &self.inner.events {
                    bus.publish(Event::JournalCompacted {
                        segments,
                        bytes_before,
                        bytes_after,
                    });
                }
                Ok(CompactionReport {
                    segments,
                    bytes_before,
                    bytes_after,
                })
            }
            Backend::Pg(_) => Ok(CompactionReport::default()),
        }
    }

    /// Removes entries at or before `retain_after` (WAL: whole sealed segments only;
    /// PostgreSQL: rows). Returns segments (WAL) or rows (PostgreSQL) removed.
    pub async fn purge(&self, retain_after: JournalPosition) -> Result<u64> {
        let removed = match &self.inner.backend {
            Backend::Wal(_) => self.on_wal(move |w| w.purge(retain_after)).await?,
            Backend::Pg(p) => {
                let client = sanare_pg::get_conn(&p.pool).await?;
                let n = client
                    .execute(
                        &format!("DELETE FROM {} WHERE sequence_number <= $1", p.sql.table),
                        &[&i64::try_from(retain_after.0).unwrap_or(i64::MAX)],
                    )
                    .await
                    .map_err(|e| sanare_pg::map_pg_error("purging journal entries", e))?;
                pg::prune_marks(&p.pool, &p.sql, retain_after).await?;
                n
            }
        };
        // The marks of purged entries are needed by no replay any more.
        if let (Backend::Wal(_), Some((pool, sql))) = (&self.inner.backend, &self.inner.handler_db)
        {
            let first_left = self
                .query(&Query::all().limit(1))
                .await?
                .first()
                .map_or(self.head().await?.0, |e| e.position.0.saturating_sub(1));
            pg::prune_marks(pool, sql, JournalPosition(first_left)).await?;
        }
        Ok(removed)
    }

    /// Exports the entries matching `query` to a compressed, checksummed archive file
    /// at `path` (format in `docs/formats.md`). Returns the number of entries.
    pub async fn archive(&self, query: &Query, path: &Path) -> Result<u64> {
        let entries = self.query(query).await?;
        let base = entries.first().map_or(0, |e| e.position.0);
        let mut raw = frame::segment_header(base).to_vec();
        for e in &entries {
            frame::encode_entry(e, &mut raw)?;
        }
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let sealed = frame::seal(frame::ARCHIVE_MAGIC, &raw)?;
            sanare_fs::write_atomic(&sanare_fs::OsStorage, &path, &sealed)
                .map_err(|e| Error::io(format!("writing journal archive {}", path.display()), e))
        })
        .await
        .map_err(|e| Error::other("writing a journal archive", e))??;
        Ok(entries.len() as u64)
    }

    /// Reads an archive written by [`archive`](Self::archive), verifying it whole.
    pub fn read_archive(path: &Path) -> Result<Vec<JournalEntry>> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::io(format!("reading journal archive {}", path.display()), e))?;
        let name = path.display().to_string();
        let raw = frame::unseal(frame::ARCHIVE_MAGIC, &bytes, &name)?;
        let wal::DecodedSegment {
            entries,
            corrupt,
            torn,
            ..
        } = wal::decode_segment(&raw, &name, true)?;
        if let Some(c) = corrupt.first() {
            return Err(Error::corrupt(name, c.reason.clone()));
        }
        if torn.is_some() {
            return Err(Error::corrupt(name, "truncated"));
        }
        Ok(entries)
    }
}

/// Decodes the bytes of a segment file, raw (`SANAREJW`) or sealed (`SANAREJZ`):
/// the entries that check, and every damaged region (including a torn tail). Never
/// panics on any input (a proptest and the `fuzz/` target check this); an unreadable
/// header or container is an [`Error::Corrupt`].
pub fn decode_segment_file(bytes: &[u8]) -> Result<(Vec<JournalEntry>, Vec<CorruptRegion>)> {
    let name = "segment";
    let raw;
    let mut damage = Vec::new();
    let bytes = if bytes.starts_with(&frame::SEALED_MAGIC) {
        (raw, damage) = sealed::unseal(bytes, name)?;
        &raw[..]
    } else {
        bytes
    };
    let wal::DecodedSegment {
        entries,
        mut corrupt,
        torn,
        ..
    } = wal::decode_segment(bytes, name, false)?;
    corrupt.extend(damage);
    if let Some(at) = torn {
        corrupt.push(CorruptRegion {
            segment: name.to_owned(),
            offset: at as u64,
            len: (bytes.len() - at) as u64,
            reason: "torn tail".into(),
        });
    }
    Ok((entries, corrupt))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait]
impl JournalService for Journal {
    async fn head(&self) -> Result<JournalPosition> {
        match &self.inner.backend {
            Backend::Wal(w) => Ok(w.head()),
            Backend::Pg(p) => p.head().await,
        }
    }

    async fn cut(&self, db_snapshot: Option<&str>) -> Result<JournalCut> {
        match &self.inner.backend {
            Backend::Wal(w) => {
                // Entries recorded within the write-ahead window may have changes
                // not committed yet: they stay after the cut.
                let before = sanare_core::now() - self.inner.write_ahead_window;
                let recent = w.position_recorded_before(before.unix_timestamp_nanos());
                Ok(JournalCut {
                    position: recent.min(w.head()),
                    db_snapshot: None,
                })
            }
            Backend::Pg(p) => p.cut(db_snapshot, self.inner.write_ahead_window).await,
        }
    }

    async fn reopen_after(&self, cut: &JournalCut) -> Result<u64> {
        let mut voided = match &self.inner.backend {
            Backend::Wal(_) => {
                let position = cut.position;
                self.on_wal(move |w| w.reopen_after(position)).await?
            }
            Backend::Pg(p) => pg::reopen_after(&p.pool, &p.sql, cut, true).await?,
        };
        if let (Backend::Wal(_), Some((pool, sql))) = (&self.inner.backend, &self.inner.handler_db)
        {
            voided += pg::reopen_after(pool, sql, cut, false).await?;
        }
        tracing::info!(cut = %cut.position, voided, "journal entries after a restored cut reopened");
        Ok(voided)
    }

    async fn replay(&self, request: ReplayRequest, control: &Control) -> Result<ReplaySummary> {
        let span = tracing::info_span!(
            "journal.replay",
            dry_run = request.dry_run,
            parallel = request.parallel
        );
        self.replay_inner(request, control).instrument(span).await
    }
}
