//! Deduplicated, compressed, verified, point-in-time snapshots of PostgreSQL tables.
//!
//! ```no_run
//! # async fn demo(pool: sanare_pg::Pool) -> sanare_core::Result<()> {
//! use std::sync::Arc;
//! use sanare_core::{Control, SnapshotRequest, SnapshotService};
//! use sanare_snapshot::{FsStore, Snapshots};
//!
//! let schema = sanare_pg::SchemaName::default_schema();
//! sanare_snapshot::migrate(&mut **sanare_pg::get_conn(&pool).await?, &schema).await?;
//! let snapshots = Snapshots::builder()
//!     .store(Arc::new(FsStore::new("/var/lib/app/snapshots")?))
//!     .pool(pool)
//!     .schema(schema)
//!     .build()?;
//! let info = snapshots.create(SnapshotRequest::new().schemas(["public"]), &Control::detached()).await?;
//! println!("{} rows", info.tables.iter().map(|t| t.rows).sum::<u64>());
//! # Ok(()) }
//! ```
//!
//! # How it works
//! - **Capture**: one REPEATABLE READ, read-only transaction reads
//!   `pg_current_snapshot()` and hands it to the journal
//!   ([`sanare_core::JournalService::cut`]), so the manifest records exactly which
//!   journal entries the snapshot reflects. It exports its snapshot
//!   (`pg_export_snapshot()`) and [`SnapshotConfig::capture_concurrency`] connections,
//!   each `SET TRANSACTION SNAPSHOT` to it, stream the tables with binary COPY in
//!   parallel: every table is read at the same instant.
//! - **Host state**: [`StateSource`]s registered with the builder (state that lives
//!   outside the database) are captured into the same deduplicated blocks and
//!   restored to any `AsyncWrite` with [`Snapshots::restore_source`].
//! - **Blocks**: the COPY stream is cut into blocks of whole rows at content-defined
//!   points (FastCDC picks the cut, the block extends to the end of that row), named
//!   by blake3, compressed alone (lz4 by default, brotli for archives, none when it
//!   does not pay) and stored once across all snapshots. Tables with a primary key
//!   are copied in key order, so an update changes only the blocks around its key. Each block's entry in the
//!   index carries a bloom filter of its rows' primary keys, so rows by key
//!   ([`sanare_core::SnapshotService::fetch_rows`]) decode only the few blocks that
//!   may hold them. A table's block references are themselves stored in
//!   content-defined group blocks, so an incremental snapshot re-stores only the
//!   groups around what changed.
//! - **Packs**: new blocks are appended to packs of about
//!   [`SnapshotConfig::pack_size`] (8 MiB), each ending with a table of its blocks,
//!   so the store gets one write (one file and fsync for [`FsStore`]) per pack, not
//!   per 16 KiB block. A map from block id to (pack, offset, length), read from the
//!   packs' tables, finds any block with one range read; adjacent blocks are read
//!   together. GC deletes packs nothing references and rewrites packs that are
//!   mostly unreferenced or small.
//! - **Write order**: packs, then the index, then the manifest, then the catalog row
//!   flips from `creating` to `ready`: a crash at any point leaves no ready snapshot
//!   with missing data. GC, under the repository's exclusive lock, cleans up after
//!   captures that never finished.
//! - **Repository**: a store holds one repository, whose identity (`config`) is
//!   written in it when the first snapshot is taken. Every manifest names its
//!   repository, the database it was captured from, and the block holding the DDL
//!   of its tables, and is signed with a [`RepositoryKey`] kept outside the store:
//!   the store describes itself, and the catalog in the database is a cache of it.
//!   A process only verifies, restores, collects, lists as available or marks the
//!   snapshots of the repository its store holds ([`Snapshots::list_all`] shows the
//!   others as not opened here), and refuses to start a new repository beside a
//!   catalog that expects another ([`SnapshotsBuilder::new_repository`]). Only a
//!   verify marks a snapshot corrupted, with its report as evidence; a verify that
//!   finds one intact sets it ready again. Lock objects in the store keep GC away
//!   from captures, verifies and restores, also of other databases sharing it.
//! - **From the store alone**: with the database lost, the snapshots are listed and
//!   verified from the store ([`SnapshotsBuilder::without_catalog`]), and a restore
//!   into an empty database recreates the tables from the stored DDL before loading
//!   them.
//! - **Restore** loads tables in foreign-key order in one transaction: `TRUNCATE`,
//!   then the tables' foreign keys, primary/unique keys and secondary indexes are
//!   dropped, the rows are loaded with binary `COPY … FREEZE` (which also marks
//!   every page all-visible), and the keys and indexes are rebuilt before the commit,
//!   then every foreign key is re-added, which makes PostgreSQL check it over all
//!   rows in one anti-join, so a violation rolls everything back. Keys whose two
//!   tables were both just loaded and have an index leading with the key's columns
//!   are checked with hash joins off for that one statement: a merge of two
//!   index-only scans, about half the time of the hash join the planner picks on
//!   fresh tables (same result, only faster). Keys are always re-checked, even when
//!   both ends come from the same snapshot: the schema may have gained a key since
//!   the capture. Every block's hash is checked as it is read; a damaged block
//!   aborts the whole restore, names the block and marks the snapshot corrupted.
//! - **Stores**: [`FsStore`] (embedded default), [`PgStore`] (a table), and with the
//!   `s3` feature `S3Store` (any S3-compatible server through `object_store`), all
//!   held to one conformance suite (`testing::conformance`, feature `testing`).
//!   [`FsStore`] does every file operation through `sanare-fs`'s storage trait: an
//!   object is put as a temporary file, fsynced, renamed into place, its directory
//!   fsynced, so after a power cut it is absent or whole and every put or delete
//!   that returned holds ([`FsStore::with_storage`] runs it on a simulated disk
//!   whose power the tests cut).
//! - **Point in time**: [`Snapshots::restore_to`] restores the latest good snapshot
//!   before T (falling back to an older one when it turns out damaged) and replays
//!   the journal after its cut up to T, through the core trait.
//!
//! # Architecture invariant
//! This crate depends on `sanare-core`, `sanare-pg` and `sanare-fs` only; the journal is reached
//! through [`sanare_core::JournalService`]. It never writes to host tables except in
//! a restore, and then in one transaction that either commits every table or none.
//! It never snapshots its own schema. It never marks a snapshot it cannot see: only
//! a verify of the snapshot in its own repository changes its status, and it
//! builds no SQL from a manifest it has not authenticated. Every stored object
//! begins with a magic and a version (see `docs/formats.md`).
//!
//! # Dependencies
//! `fastcdc` (content-defined chunking, a maintained implementation of the paper's
//! algorithm), `blake3` (fast cryptographic block ids), `lz4_flex` and `brotli` (pure
//! Rust codecs), `postcard` (a stable, specified encoding for index and manifest),
//! `object_store` (feature `s3`: the Apache Arrow project's object storage client),
//! `getrandom` (the operating system's random source, for repository keys),
//! `sanare-fs` (durable file I/O with a documented contract, and the simulated disk
//! the power-cut tests cut).

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod copy;
pub mod ddl;
pub mod format;
mod fs_store;
mod manifest;
pub mod pack;
mod pack_index;
pub mod repo;
mod restore;
#[cfg(feature = "s3")]
mod s3;
mod service;
mod sorted;
mod source;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use format::{BlockId, ChunkParams, Codec};
pub use pack::BlockLocation;
pub use repo::{RepositoryConfig, RepositoryKey};
#[cfg(feature = "s3")]
pub use s3::S3Store;
pub use service::{
    Availability, GcReport, ListedSnapshot, PitrOutcome, RepositoryListing, RetentionPolicy,
    SnapshotConfig, Snapshots, SnapshotsBuilder, StorageStats,
};
pub use source::{SourceInfo, StateSource};
pub use store::{BlockStore, FsStore, ObjectMeta, PgStore};

use sanare_pg::{Migration, Migrations, SchemaName};

/// The snapshot catalog and the PostgreSQL block store's table, in sanare's schema.
pub const MIGRATIONS: Migrations = Migrations::new(
    "snapshot",
    &[
        Migration::new(
            1,
            "snapshot_catalog",
        "CREATE TABLE {schema}.snapshots (
            id               uuid PRIMARY KEY,
            status           text NOT NULL CHECK (status IN
                               ('creating', 'ready', 'validating', 'corrupted', 'archived', 'deleted')),
            created_at       timestamptz NOT NULL,
            finished_at      timestamptz,
            label            text,
            base_id          uuid,
            journal_position bigint,
            size_bytes       bigint NOT NULL DEFAULT 0,
            stored_bytes     bigint NOT NULL DEFAULT 0,
            manifest_hash    bytea,
            info             jsonb,
            error            text
        );
        CREATE INDEX snapshots_status_created_idx ON {schema}.snapshots (status, created_at DESC);
        CREATE TABLE {schema}.snapshot_objects (
            key        text PRIMARY KEY,
            data       bytea NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        ALTER TABLE {schema}.snapshot_objects ALTER COLUMN data SET STORAGE EXTERNAL;",
        ),
        Migration::new(
            2,
            "snapshot_repositories",
            "ALTER TABLE {schema}.snapshots
                 ADD COLUMN repository      uuid,
                 ADD COLUMN database_id     uuid,
                 ADD COLUMN status_at       timestamptz,
                 ADD COLUMN status_by       text,
                 ADD COLUMN status_evidence jsonb;
            CREATE INDEX snapshots_repository_idx
                ON {schema}.snapshots (repository, database_id, status, created_at DESC);
            CREATE TABLE {schema}.snapshot_repositories (
                id         uuid PRIMARY KEY,
                location   text NOT NULL,
                first_seen timestamptz NOT NULL DEFAULT now(),
                last_seen  timestamptz NOT NULL DEFAULT now()
            );
            CREATE TABLE {schema}.snapshot_database (
                one          boolean PRIMARY KEY DEFAULT true CHECK (one),
                id           uuid NOT NULL,
                created_at   timestamptz NOT NULL DEFAULT now(),
                adopted_at   timestamptz,
                adopted_from text
            );
            INSERT INTO {schema}.snapshot_database (id) VALUES (gen_random_uuid());
            CREATE TABLE {schema}.snapshot_status_log (
                id          bigserial PRIMARY KEY,
                snapshot_id uuid NOT NULL,
                at          timestamptz NOT NULL DEFAULT now(),
                from_status text,
                to_status   text NOT NULL,
                by          text NOT NULL,
                repository  uuid,
                reason      text,
                evidence    jsonb
            );
            CREATE INDEX snapshot_status_log_snapshot_idx
                ON {schema}.snapshot_status_log (snapshot_id, at);",
        ),
    ],
);

/// Creates or upgrades the snapshot tables in `schema`.
pub async fn migrate(
    client: &mut sanare_pg::tokio_postgres::Client,
    schema: &SchemaName,
) -> sanare_core::Result<sanare_pg::MigrationReport> {
    MIGRATIONS.run(client, schema).await
}
