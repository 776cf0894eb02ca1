//! Replay handlers, registered per operation type.

use async_trait::async_trait;

use sanare_core::Result;

use crate::entry::JournalEntry;

/// Applies entries of one operation type during a replay (no database transaction).
///
/// # Contract
/// Called from one task at a time per idempotency key (entries with the same key
/// arrive in position order); entries with different keys may be applied
/// concurrently in a parallel replay. An `Err` marks the entry failed (reported in
/// the summary, no applied mark written); replay goes on with the next entry.
///
/// # Exactly-once
/// After `apply` returns `Ok`, the journal writes the entry's applied mark (WAL
/// backend: the fsync'd `applied.marks` file beside the segments; PostgreSQL
/// backend: a row in `journal_applied`), at the latest at the end of each replay
/// batch, before the replay reports. A crash between the effect and the mark would
/// apply the entry again on the next replay, so a plain handler gets exactly-once
/// in effect in one of two ways:
/// - its effect is idempotent by [`JournalEntry::id`] (an upsert keyed on the id), or
/// - it keeps its own applied marks atomically with its effects and answers
///   [`is_applied`](Handler::is_applied) from them: the journal asks before applying.
///
/// Handlers whose effects live in PostgreSQL should implement [`PgHandler`]
/// instead: there, the effect and the mark commit in one transaction.
#[async_trait]
pub trait Handler: Send + Sync {
    /// Applies the entry's effect.
    async fn apply(&self, entry: &JournalEntry) -> Result<()>;

    /// Whether the handler's own store already holds this entry's effect. The default
    /// says no (the journal's applied mark is the only record).
    async fn is_applied(&self, entry: &JournalEntry) -> Result<bool> {
        let _ = entry;
        Ok(false)
    }
}

/// Applies entries inside a PostgreSQL transaction that also inserts the entry's
/// applied mark into `journal_applied`: the effect and the mark commit together, so
/// an interrupted replay followed by another applies nothing twice.
///
/// # Contract
/// Do not commit or roll back `tx`; return `Err` to roll the effect and the mark
/// back together. Same concurrency as [`Handler`].
#[async_trait]
pub trait PgHandler: Send + Sync {
    /// Applies the entry's effect in `tx`.
    async fn apply(&self, tx: &tokio_postgres::Transaction<'_>, entry: &JournalEntry)
    -> Result<()>;

    /// Applies a run of entries of this handler's operation type in `tx`, in
    /// position order, in as few round trips as the handler can manage (a multi-row
    /// `INSERT … SELECT FROM unnest($1::…[], …)` or a binary `COPY`). The journal
    /// calls it during a sequential replay with every not-yet-applied entry of a run
    /// (up to the builder's `replay_batch`); their applied marks are in the same
    /// transaction, so the effect of the whole run and its marks commit together.
    ///
    /// On `Err` the run's transaction rolls back and the journal retries the run one
    /// entry at a time through [`apply`](Self::apply), so one bad entry fails alone.
    /// The default calls `apply` for each entry in order (one round trip each).
    async fn apply_batch(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entries: &[&JournalEntry],
    ) -> Result<()> {
        for entry in entries {
            self.apply(tx, entry).await?;
        }
        Ok(())
    }
}

/// A handler that does nothing (useful for benchmarks and to mark entries applied).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopHandler;

#[async_trait]
impl Handler for NoopHandler {
    async fn apply(&self, _entry: &JournalEntry) -> Result<()> {
        Ok(())
    }
}
