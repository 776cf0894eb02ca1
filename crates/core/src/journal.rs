//! What other crates need of the transaction journal.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{Control, JournalEntryId, Result};

/// A position in the journal: the sequence number of an entry. Position 0 is before
/// the first entry; positions grow by one per entry and are never reused.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct JournalPosition(pub u64);

impl JournalPosition {
    /// Before the first entry.
    pub const START: JournalPosition = JournalPosition(0);
}

impl fmt::Display for JournalPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The point of the journal a snapshot is consistent with.
///
/// Every entry at or before `position` is reflected in the snapshot. An entry after
/// `position` is not, unless `db_snapshot` is set and the entry's writing transaction
/// is visible in it: with the PostgreSQL journal backend, `db_snapshot` is the
/// `pg_current_snapshot()` of the snapshot's REPEATABLE READ transaction, so replay
/// from a cut is exact even when writers commit out of sequence order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalCut {
    /// Every entry at or before this position is in the snapshot.
    pub position: JournalPosition,
    /// The database snapshot (`pg_current_snapshot()` text) the cut was taken in.
    pub db_snapshot: Option<String>,
}

/// Which entries a replay covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "range", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReplayRange {
    /// Every entry.
    All,
    /// Every entry not reflected in a snapshot taken at this cut.
    After(JournalCut),
    /// Entries with positions in `from..=to` (`to` open when `None`).
    Positions {
        /// The first position replayed.
        from: JournalPosition,
        /// The last position replayed, if bounded.
        to: Option<JournalPosition>,
    },
    /// Entries recorded in `from..to` (each bound open when `None`).
    Time {
        /// Recorded at or after this time.
        #[serde(with = "time::serde::rfc3339::option")]
        from: Option<OffsetDateTime>,
        /// Recorded before this time.
        #[serde(with = "time::serde::rfc3339::option")]
        to: Option<OffsetDateTime>,
    },
}

/// A replay request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReplayRequest {
    /// Which entries.
    pub range: ReplayRange,
    /// Only these operation types (all when empty).
    pub operation_types: Vec<String>,
    /// Only entries with these idempotency keys (all when empty).
    pub idempotency_keys: Vec<String>,
    /// Run every check and report what would be applied, applying nothing.
    pub dry_run: bool,
    /// Apply entries with different idempotency keys in parallel (entries with the
    /// same key always apply in order).
    pub parallel: bool,
    /// Only entries recorded at or before this time, whatever the range (a
    /// point-in-time replay stops here).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
}

impl ReplayRequest {
    /// A sequential, non-dry-run replay of `range` for every operation type.
    pub fn new(range: ReplayRange) -> Self {
        Self {
            range,
            operation_types: Vec::new(),
            idempotency_keys: Vec::new(),
            dry_run: false,
            parallel: false,
            until: None,
        }
    }

    /// Stops the replay at entries recorded at or before `at` (point in time).
    pub fn until(mut self, at: OffsetDateTime) -> Self {
        self.until = Some(at);
        self
    }

    /// Restricts the replay to these operation types.
    pub fn operation_types<I: IntoIterator<Item = S>, S: Into<String>>(mut self, types: I) -> Self {
        self.operation_types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Restricts the replay to entries with these idempotency keys.
    pub fn idempotency_keys<I: IntoIterator<Item = S>, S: Into<String>>(mut self, keys: I) -> Self {
        self.idempotency_keys = keys.into_iter().map(Into::into).collect();
        self
    }

    /// Sets dry-run.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Sets parallel-by-key.
    pub fn parallel(mut self, parallel: bool) -> Self {
        self.parallel = parallel;
        self
    }
}

/// An entry a replay could not apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayFailure {
    /// Where it is.
    pub position: JournalPosition,
    /// Which entry, when it could be read.
    pub entry: Option<JournalEntryId>,
    /// Its operation type, when it could be read.
    pub operation_type: Option<String>,
    /// Why it was not applied (bad payload hash, handler error, no handler).
    pub reason: String,
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReplaySummary {
    /// Entries in range that passed the filters.
    pub entries_seen: u64,
    /// Entries whose handlers ran (would have run, in a dry run).
    pub applied: u64,
    /// Entries skipped because they were already applied (or already in the snapshot).
    pub already_applied: u64,
    /// Entries that could not be applied; they are never half-applied.
    pub failures: Vec<ReplayFailure>,
    /// The last position reached.
    pub last_position: Option<JournalPosition>,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// The journal, as the other components use it (snapshot point-in-time recovery,
/// recovery orchestration, repair by replay).
///
/// # Contract
/// Implementations are shared between tasks (`Send + Sync`) and every method may be
/// called concurrently. [`replay`](JournalService::replay) checks its [`Control`]
/// between entries, and is exactly-once in effect: an entry applied by an earlier
/// replay (even one interrupted by a crash) is counted in `already_applied`, not
/// applied again.
#[async_trait]
pub trait JournalService: Send + Sync {
    /// The position of the last durable entry.
    async fn head(&self) -> Result<JournalPosition>;

    /// The cut a snapshot taken now is consistent with. `db_snapshot` is the
    /// `pg_current_snapshot()` text of the snapshot's transaction, when it has one.
    async fn cut(&self, db_snapshot: Option<&str>) -> Result<JournalCut>;

    /// Replays entries through the handlers registered for their operation types.
    async fn replay(&self, request: ReplayRequest, control: &Control) -> Result<ReplaySummary>;

    /// Reopens the entries after `cut` once a snapshot taken at that cut has been
    /// restored: the restore undid their effects, so their applied marks no longer
    /// hold and the next replay of [`ReplayRange::After`] this cut applies them
    /// again, exactly once. Entries at or before the cut (and, with a database
    /// snapshot, entries whose writers the snapshot saw) keep their marks.
    /// Returns how many marks were voided.
    ///
    /// Call it right after the restore commits and before anything replays; a
    /// restore followed by a replay without it skips every entry an earlier replay
    /// applied after the cut, and their effects stay lost. The default does
    /// nothing and suits implementations that keep no applied marks;
    /// implementations that keep them must override it.
    async fn reopen_after(&self, cut: &JournalCut) -> Result<u64> {
        let _ = cut;
        Ok(0)
    }
}
