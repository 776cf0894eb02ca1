//! What other crates need of snapshots.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{Control, JournalCut, RepositoryId, Result, RowImage, RowRef, SnapshotId, TableRef};

/// Where a snapshot is in its life (spec §4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SnapshotStatus {
    /// Being written; never restorable.
    Creating,
    /// Complete and verified at write time.
    Ready,
    /// Being verified.
    Validating,
    /// Verification failed; skipped in favour of an older good snapshot.
    Corrupted,
    /// Kept in colder storage.
    Archived,
    /// Deleted; its blocks are garbage once unreferenced.
    Deleted,
}

impl SnapshotStatus {
    /// The stable snake_case name, as serialized and printed.
    pub const fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::Creating => "creating",
            SnapshotStatus::Ready => "ready",
            SnapshotStatus::Validating => "validating",
            SnapshotStatus::Corrupted => "corrupted",
            SnapshotStatus::Archived => "archived",
            SnapshotStatus::Deleted => "deleted",
        }
    }
}

impl std::fmt::Display for SnapshotStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Rows captured for one table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRowCount {
    /// The table.
    pub table: TableRef,
    /// Its rows.
    pub rows: u64,
}

/// What other components need to know about a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// Its id.
    pub id: SnapshotId,
    /// When its consistent view was taken.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Its status.
    pub status: SnapshotStatus,
    /// An optional human label.
    pub label: Option<String>,
    /// The snapshot it is incremental on, if any.
    pub base: Option<SnapshotId>,
    /// The journal cut it is consistent with, if a journal is attached.
    pub journal_cut: Option<JournalCut>,
    /// Rows per captured table.
    pub tables: Vec<TableRowCount>,
    /// Uncompressed bytes.
    pub size_bytes: u64,
    /// Bytes newly stored for it.
    pub stored_bytes: u64,
    /// Host metadata.
    pub metadata: BTreeMap<String, String>,
    /// The repository (store) holding its blocks, index and manifest; `None` for a
    /// snapshot taken before repositories had ids whose store has not been opened
    /// since.
    #[serde(default)]
    pub repository: Option<RepositoryId>,
}

impl SnapshotInfo {
    /// A snapshot record with no tables, no sizes and no metadata (fill the public
    /// fields; the type is `#[non_exhaustive]`).
    pub fn new(id: SnapshotId, created_at: OffsetDateTime, status: SnapshotStatus) -> Self {
        Self {
            id,
            created_at,
            status,
            label: None,
            base: None,
            journal_cut: None,
            tables: Vec::new(),
            size_bytes: 0,
            stored_bytes: 0,
            metadata: BTreeMap::new(),
            repository: None,
        }
    }
}

/// What to capture.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SnapshotRequest {
    /// These tables (in addition to `schemas`).
    pub tables: Vec<TableRef>,
    /// Every table of these schemas. When both are empty, the configured default set.
    pub schemas: Vec<String>,
    /// An optional label.
    pub label: Option<String>,
    /// Host metadata stored in the manifest.
    pub metadata: BTreeMap<String, String>,
}

impl SnapshotRequest {
    /// The configured default set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only these tables.
    pub fn tables(mut self, tables: impl IntoIterator<Item = TableRef>) -> Self {
        self.tables = tables.into_iter().collect();
        self
    }

    /// Every table of these schemas.
    pub fn schemas<I: IntoIterator<Item = S>, S: Into<String>>(mut self, schemas: I) -> Self {
        self.schemas = schemas.into_iter().map(Into::into).collect();
        self
    }

    /// A label.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }
}

/// Where restored rows go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "target", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RestoreTarget {
    /// Into the live tables, replacing their contents, in one transaction.
    Live,
    /// Into tables of the same names in `schema` (created if missing).
    Scratch {
        /// The scratch schema.
        schema: String,
    },
}

/// How a restore into the live tables loads them.
///
/// The choice is between atomicity and speed: [`RestoreMode::Transaction`] replaces
/// every table in one transaction on one connection (nothing changes unless all of
/// it commits; the tables are locked for the whole load), [`RestoreMode::Parallel`]
/// loads the rows into shadow tables on several connections while the live tables
/// stay as they are, then swaps the shadow tables in with one short transaction
/// (twice the disk space while it runs; the swapped tables are new relations, so
/// their OIDs change).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RestoreMode {
    /// One transaction, one connection: atomic, the default.
    #[default]
    Transaction,
    /// Shadow tables loaded on `connections` connections, then swapped in one
    /// short transaction.
    Parallel {
        /// Connections loading at once (at least 2 to gain anything).
        connections: u16,
    },
}

/// What to restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RestoreRequest {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// Only these tables (all when empty).
    pub tables: Vec<TableRef>,
    /// Where to.
    pub target: RestoreTarget,
    /// Whether the restored tables' own triggers fire for the restored rows (and
    /// their `TRUNCATE` triggers for the emptying). Off by default: a restore puts
    /// rows back as they were, it does not replay the side effects of inserting them.
    #[serde(default)]
    pub fire_triggers: bool,
    /// How the live tables are loaded (ignored for a scratch target).
    #[serde(default)]
    pub mode: RestoreMode,
}

impl RestoreRequest {
    /// Restore every table of `snapshot` into the live tables.
    pub fn new(snapshot: SnapshotId) -> Self {
        Self {
            snapshot,
            tables: Vec::new(),
            target: RestoreTarget::Live,
            fire_triggers: false,
            mode: RestoreMode::Transaction,
        }
    }

    /// Fire the restored tables' triggers (see [`RestoreRequest::fire_triggers`]).
    pub fn fire_triggers(mut self, fire: bool) -> Self {
        self.fire_triggers = fire;
        self
    }

    /// Load the live tables this way (see [`RestoreMode`]).
    pub fn mode(mut self, mode: RestoreMode) -> Self {
        self.mode = mode;
        self
    }

    /// Only these tables.
    pub fn tables(mut self, tables: impl IntoIterator<Item = TableRef>) -> Self {
        self.tables = tables.into_iter().collect();
        self
    }

    /// Restore into `target`.
    pub fn target(mut self, target: RestoreTarget) -> Self {
        self.target = target;
        self
    }
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RestoreOutcome {
    /// The snapshot restored.
    pub snapshot: SnapshotId,
    /// Rows written per table.
    pub tables: Vec<TableRowCount>,
    /// The journal cut the restored state is consistent with: replay from here.
    pub journal_cut: Option<JournalCut>,
    /// What the restore did beyond loading rows, in words (a table restored in
    /// place by key because tables outside the restore reference it, an invalid
    /// index left as it was, …).
    #[serde(default)]
    pub notes: Vec<String>,
    /// Tables the database lacked, created from the DDL stored with the snapshot.
    #[serde(default)]
    pub recreated: Vec<TableRef>,
}

impl RestoreOutcome {
    /// An outcome with no tables restored yet.
    pub fn new(snapshot: SnapshotId) -> Self {
        Self {
            snapshot,
            tables: Vec::new(),
            journal_cut: None,
            notes: Vec::new(),
            recreated: Vec::new(),
        }
    }
}

/// What verifying a snapshot found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VerifyReport {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// Blocks whose hash was checked.
    pub blocks_checked: u64,
    /// Blocks referenced but not in the store.
    pub blocks_missing: u64,
    /// Blocks whose content does not match their id.
    pub blocks_corrupt: u64,
    /// Each problem found, in words.
    pub problems: Vec<String>,
    /// The repository the snapshot was verified in.
    #[serde(default)]
    pub repository: Option<RepositoryId>,
    /// What the verification did or could not check, beyond damage (a status set
    /// back to ready, a manifest that could not be authenticated), in words.
    #[serde(default)]
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// An empty report (nothing checked, nothing found).
    pub fn new(snapshot: SnapshotId) -> Self {
        Self {
            snapshot,
            blocks_checked: 0,
            blocks_missing: 0,
            blocks_corrupt: 0,
            problems: Vec::new(),
            repository: None,
            notes: Vec::new(),
        }
    }

    /// Whether the snapshot is intact.
    pub fn is_ok(&self) -> bool {
        self.blocks_missing == 0 && self.blocks_corrupt == 0 && self.problems.is_empty()
    }
}

/// Snapshots, as the other components use them (recovery restores the latest good
/// one; repair fetches rows by primary key; corruption detection compares values).
///
/// # Contract
/// `Send + Sync`, methods callable concurrently. Long methods check their
/// [`Control`] between blocks and tables; a cancelled restore into live tables rolls
/// back completely.
#[async_trait]
pub trait SnapshotService: Send + Sync {
    /// Captures a snapshot.
    async fn create(&self, request: SnapshotRequest, control: &Control) -> Result<SnapshotInfo>;

    /// The newest snapshot in status `Ready` taken at or before `before` (now when
    /// `None`) in the repository this service opens, skipping any found corrupted.
    async fn latest_good(&self, before: Option<OffsetDateTime>) -> Result<Option<SnapshotInfo>>;

    /// Restores a snapshot.
    async fn restore(&self, request: RestoreRequest, control: &Control) -> Result<RestoreOutcome>;

    /// The rows of `snapshot` with the given primary keys. Rows absent from the
    /// snapshot are absent from the result; order follows `rows`.
    async fn fetch_rows(&self, snapshot: SnapshotId, rows: &[RowRef]) -> Result<Vec<RowImage>>;

    /// Verifies every block and the manifest of a snapshot in its own repository,
    /// marking it corrupted (with the report as evidence) if it is not intact and
    /// ready again if it is. A snapshot in a repository this service cannot see is
    /// refused, never marked.
    async fn verify(&self, snapshot: SnapshotId, control: &Control) -> Result<VerifyReport>;
}
