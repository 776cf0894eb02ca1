//! Queries over the journal: position, time and operation-type filters.

use time::OffsetDateTime;

use sanare_core::JournalPosition;

use crate::entry::JournalEntry;

/// A query for entries: everything is optional and combined with AND.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Query {
    /// Entries after this position.
    pub after: JournalPosition,
    /// Entries at or before this position.
    pub to: Option<JournalPosition>,
    /// Recorded at or after.
    pub time_from: Option<OffsetDateTime>,
    /// Recorded before.
    pub time_to: Option<OffsetDateTime>,
    /// Only these operation types (all when empty).
    pub operation_types: Vec<String>,
    /// At most this many entries (all when `None`).
    pub limit: Option<usize>,
}

impl Query {
    /// Every entry.
    pub fn all() -> Self {
        Self::default()
    }

    /// Entries after `position`.
    pub fn after(mut self, position: JournalPosition) -> Self {
        self.after = position;
        self
    }

    /// Entries at or before `position`.
    pub fn to(mut self, position: JournalPosition) -> Self {
        self.to = Some(position);
        self
    }

    /// Entries recorded in `from..to`.
    pub fn time(mut self, from: Option<OffsetDateTime>, to: Option<OffsetDateTime>) -> Self {
        self.time_from = from;
        self.time_to = to;
        self
    }

    /// Entries of these operation types.
    pub fn operation_types<I: IntoIterator<Item = S>, S: Into<String>>(mut self, t: I) -> Self {
        self.operation_types = t.into_iter().map(Into::into).collect();
        self
    }

    /// At most `n` entries.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }

    pub(crate) fn plan(&self) -> ScanPlan {
        ScanPlan {
            after: self.after.0,
            to: self.to.map(|p| p.0),
            time_from: self.time_from,
            time_to: self.time_to,
            operation_types: self.operation_types.clone(),
            idempotency_keys: Vec::new(),
            snapshot: None,
        }
    }
}

/// What a backend scans for.
#[derive(Clone, Debug, Default)]
pub(crate) struct ScanPlan {
    pub(crate) after: u64,
    pub(crate) to: Option<u64>,
    pub(crate) time_from: Option<OffsetDateTime>,
    pub(crate) time_to: Option<OffsetDateTime>,
    pub(crate) operation_types: Vec<String>,
    pub(crate) idempotency_keys: Vec<String>,
    /// PostgreSQL only: skip entries whose writer is visible in this snapshot.
    pub(crate) snapshot: Option<String>,
}

impl ScanPlan {
    pub(crate) fn matches(&self, e: &JournalEntry) -> bool {
        e.position.0 > self.after
            && self.to.is_none_or(|to| e.position.0 <= to)
            && self.time_from.is_none_or(|t| e.recorded_at >= t)
            && self.time_to.is_none_or(|t| e.recorded_at < t)
            && (self.operation_types.is_empty() || self.operation_types.contains(&e.operation_type))
            && (self.idempotency_keys.is_empty()
                || e.idempotency_key
                    .as_ref()
                    .is_some_and(|k| self.idempotency_keys.contains(k)))
    }
}
