//! Journal entries: what a host records, and what replay hands to handlers.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use time::OffsetDateTime;

use sanare_core::{Error, JournalEntryId, JournalPosition, Result};

/// Whether an entry has been applied by a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EntryStatus {
    /// Recorded, not (yet) applied by a replay.
    Recorded,
    /// Applied by a replay (an applied mark exists).
    Replayed,
}

impl EntryStatus {
    /// The stable name, as stored.
    pub const fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Recorded => "recorded",
            EntryStatus::Replayed => "replayed",
        }
    }
}

/// An entry to record: built by the host for each state change.
///
/// ```
/// # fn main() -> sanare_core::Result<()> {
/// #[derive(serde::Serialize)]
/// struct OrderPlaced { order: u64, total_cents: i64 }
///
/// let entry = sanare_journal::NewEntry::new("order.placed", &OrderPlaced { order: 7, total_cents: 1999 })?
///     .idempotency_key("order-7")
///     .user("alice");
/// assert_eq!(entry.operation_type, "order.placed");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NewEntry {
    /// The host's logical transaction id (defaults to the entry id).
    pub transaction_id: Option<String>,
    /// The operation type; replay picks the handler by it.
    pub operation_type: String,
    /// A unique key per logical operation: recording it twice returns the first entry.
    pub idempotency_key: Option<String>,
    /// The payload, encoded with postcard.
    pub payload: Vec<u8>,
    /// Who made the change.
    pub user: Option<String>,
    /// Which system made the change.
    pub source_system: Option<String>,
}

impl NewEntry {
    /// An entry of `operation_type` whose payload is `payload` encoded with postcard.
    pub fn new<T: Serialize + ?Sized>(
        operation_type: impl Into<String>,
        payload: &T,
    ) -> Result<Self> {
        let payload = postcard::to_allocvec(payload)
            .map_err(|e| Error::other("encoding a journal payload with postcard", e))?;
        Ok(Self::from_bytes(operation_type, payload))
    }

    /// An entry whose payload bytes are already encoded.
    pub fn from_bytes(operation_type: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            transaction_id: None,
            operation_type: operation_type.into(),
            idempotency_key: None,
            payload,
            user: None,
            source_system: None,
        }
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the host's transaction id.
    pub fn transaction_id(mut self, id: impl Into<String>) -> Self {
        self.transaction_id = Some(id.into());
        self
    }

    /// Sets the user.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Sets the source system.
    pub fn source_system(mut self, source: impl Into<String>) -> Self {
        self.source_system = Some(source.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.operation_type.is_empty() || self.operation_type.len() > 100 {
            return Err(Error::invalid_input(
                "a journal entry's operation type must be 1 to 100 bytes long",
            ));
        }
        if self.payload.len() > crate::frame::MAX_BODY / 2 {
            return Err(Error::invalid_input(format!(
                "a journal payload of {} bytes is over the limit of {} bytes",
                self.payload.len(),
                crate::frame::MAX_BODY / 2
            )));
        }
        Ok(())
    }

    /// Turns this into a full entry at `position`, recorded now.
    pub(crate) fn into_entry(self, position: JournalPosition) -> JournalEntry {
        let id = JournalEntryId::new();
        let payload_hash = *blake3::hash(&self.payload).as_bytes();
        JournalEntry {
            id,
            position,
            transaction_id: self.transaction_id.unwrap_or_else(|| id.to_string()),
            operation_type: self.operation_type,
            recorded_at: sanare_core::now(),
            idempotency_key: self.idempotency_key,
            payload: self.payload,
            payload_hash,
            user: self.user,
            source_system: self.source_system,
            status: EntryStatus::Recorded,
        }
    }
}

/// A recorded entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JournalEntry {
    /// Its unique id.
    pub id: JournalEntryId,
    /// Its position (sequence number).
    pub position: JournalPosition,
    /// The host's logical transaction id.
    pub transaction_id: String,
    /// The operation type.
    pub operation_type: String,
    /// When it was recorded.
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    /// Its idempotency key.
    pub idempotency_key: Option<String>,
    /// The payload (postcard).
    pub payload: Vec<u8>,
    /// blake3 of the payload, taken when it was recorded.
    pub payload_hash: [u8; 32],
    /// Who made the change.
    pub user: Option<String>,
    /// Which system made the change.
    pub source_system: Option<String>,
    /// Whether a replay applied it.
    pub status: EntryStatus,
}

impl JournalEntry {
    /// Decodes the payload (postcard).
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T> {
        postcard::from_bytes(&self.payload).map_err(|e| {
            Error::corrupt(
                format!("payload of journal entry {}", self.position),
                format!("does not decode as the expected type: {e}"),
            )
        })
    }

    /// Whether the payload still matches the hash taken when it was recorded.
    pub fn payload_intact(&self) -> bool {
        blake3::hash(&self.payload).as_bytes() == &self.payload_hash
    }
}

/// What recording an entry did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Recorded {
    /// The entry's position.
    pub position: JournalPosition,
    /// The entry's id.
    pub id: JournalEntryId,
    /// True when the idempotency key was already recorded: position and id are the
    /// first entry's, and nothing new was written.
    pub duplicate: bool,
}
