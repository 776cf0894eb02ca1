//! Events a host can subscribe to.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use crate::{
    CheckId, CorruptionKind, CrashId, EventId, IssueId, JournalPosition, RecoveryId, RepairId,
    RepairStatus, Severity, SnapshotId, TableRef, ViolationId, ViolationKind,
};

/// How a previous run ended, as crash detection classifies it (spec §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CrashKind {
    /// The process died on its own: a panic, a fatal signal, kill -9 on a running host.
    ApplicationCrash,
    /// The operating system went down without a power loss signature (kernel panic, reboot).
    SystemCrash,
    /// The machine lost power (boot id changed, no clean shutdown of the host).
    PowerFailure,
    /// Memory ran out (allocation failure or a kernel OOM kill).
    OutOfMemory,
    /// A thread overflowed its stack.
    StackOverflow,
    /// The process did not shut down cleanly and no evidence says why.
    Unknown,
}

impl CrashKind {
    /// The stable snake_case name, as stored.
    pub const fn as_str(self) -> &'static str {
        match self {
            CrashKind::ApplicationCrash => "application_crash",
            CrashKind::SystemCrash => "system_crash",
            CrashKind::PowerFailure => "power_failure",
            CrashKind::OutOfMemory => "out_of_memory",
            CrashKind::StackOverflow => "stack_overflow",
            CrashKind::Unknown => "unknown",
        }
    }
}

/// Something that happened in sanare that a host may want to know about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// Start-up found that the previous run crashed.
    CrashDetected {
        /// The crash record.
        crash: CrashId,
        /// Its classification.
        kind: CrashKind,
        /// How bad it is.
        severity: Severity,
    },
    /// A recovery run finished (successfully or not).
    RecoveryCompleted {
        /// The recovery run.
        recovery: RecoveryId,
        /// The crash it recovered from, if any.
        crash: Option<CrashId>,
        /// Whether the service is ready to run.
        success: bool,
        /// Journal entries replayed.
        entries_replayed: u64,
        /// Violations repaired.
        errors_fixed: u64,
    },
    /// Validation found a violation.
    ViolationDetected {
        /// The violation.
        violation: ViolationId,
        /// The check run that found it.
        check: Option<CheckId>,
        /// Its table.
        table: TableRef,
        /// What rule it breaks.
        kind: ViolationKind,
        /// How bad it is.
        severity: Severity,
    },
    /// A repair finished, was rolled back, or failed.
    RepairCompleted {
        /// The repair.
        repair: RepairId,
        /// Its final status.
        status: RepairStatus,
        /// Rows changed.
        rows_affected: u64,
    },
    /// A snapshot became ready.
    SnapshotCreated {
        /// The snapshot.
        snapshot: SnapshotId,
        /// Uncompressed bytes captured.
        size_bytes: u64,
        /// Bytes newly written to the store (after deduplication and compression).
        stored_bytes: u64,
    },
    /// A restore finished.
    RestoreCompleted {
        /// The snapshot restored.
        snapshot: SnapshotId,
        /// Tables restored.
        tables: Vec<TableRef>,
        /// Rows written.
        rows: u64,
    },
    /// A journal replay finished.
    JournalReplayed {
        /// Entries whose handlers ran (or would have, in a dry run).
        applied: u64,
        /// Entries skipped (already applied, filtered, bad hash).
        skipped: u64,
        /// The last position reached.
        last_position: Option<JournalPosition>,
        /// Whether it was a dry run.
        dry_run: bool,
    },
    /// The journal made a batch of entries durable (one WAL group commit, or one
    /// batched PostgreSQL insert of concurrent `record()` calls).
    JournalRecorded {
        /// Entries newly recorded in the batch (idempotent repeats not counted).
        entries: u64,
        /// The first position of the batch.
        first_position: Option<JournalPosition>,
        /// The last position of the batch.
        last_position: Option<JournalPosition>,
    },
    /// The journal compacted sealed data.
    JournalCompacted {
        /// Segments compressed.
        segments: u64,
        /// Their size before.
        bytes_before: u64,
        /// Their size after.
        bytes_after: u64,
    },
    /// Corruption detection found damage.
    CorruptionDetected {
        /// The issue.
        issue: IssueId,
        /// The damaged table.
        table: TableRef,
        /// The shape of the damage.
        kind: CorruptionKind,
        /// How bad it is.
        severity: Severity,
    },
}

impl Event {
    /// A stable snake_case name of the event type.
    pub const fn name(&self) -> &'static str {
        match self {
            Event::CrashDetected { .. } => "crash_detected",
            Event::RecoveryCompleted { .. } => "recovery_completed",
            Event::ViolationDetected { .. } => "violation_detected",
            Event::RepairCompleted { .. } => "repair_completed",
            Event::SnapshotCreated { .. } => "snapshot_created",
            Event::RestoreCompleted { .. } => "restore_completed",
            Event::JournalReplayed { .. } => "journal_replayed",
            Event::JournalRecorded { .. } => "journal_recorded",
            Event::JournalCompacted { .. } => "journal_compacted",
            Event::CorruptionDetected { .. } => "corruption_detected",
        }
    }
}

/// An [`Event`] as delivered to subscribers: with an id and the time it was published.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Unique id of this delivery.
    pub id: EventId,
    /// When it was published.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// A multi-subscriber event bus (a [`tokio::sync::broadcast`] channel).
///
/// Publishing never blocks and never fails, whether or not anyone listens. A
/// subscriber that falls more than `capacity` events behind loses the oldest ones and
/// is told how many (see [`EventSubscription::recv`]): events are notifications, the
/// durable record of each is its table row.
#[derive(Clone, Debug)]
pub struct EventBus {
    tx: broadcast::Sender<EventRecord>,
}

impl EventBus {
    /// The default number of events buffered per subscriber.
    pub const DEFAULT_CAPACITY: usize = 1024;

    /// A bus buffering `capacity` events per subscriber (at least 1).
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self { tx }
    }

    /// Publishes `event` to every current subscriber and returns its record.
    pub fn publish(&self, event: Event) -> EventRecord {
        let record = EventRecord {
            id: EventId::new(),
            at: crate::now(),
            event,
        };
        tracing::event!(target: "sanare::events", tracing::Level::DEBUG, event = record.event.name(), id = %record.id);
        // An error only means nobody is subscribed.
        let _ = self.tx.send(record.clone());
        record
    }

    /// A new subscription receiving every event published from now on.
    pub fn subscribe(&self) -> EventSubscription {
        EventSubscription {
            rx: self.tx.subscribe(),
        }
    }

    /// The number of current subscribers.
    pub fn subscriber_count(&self) -> usize {
        self.tx.receiver_count()
    }
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

/// One subscriber's view of an [`EventBus`].
#[derive(Debug)]
pub struct EventSubscription {
    rx: broadcast::Receiver<EventRecord>,
}

impl EventSubscription {
    /// The next event. Returns `Ok(None)` when the bus is gone, and
    /// `Err(missed)` once when this subscriber fell behind and `missed` events were
    /// dropped (the next call continues with the oldest retained event).
    pub async fn recv(&mut self) -> Result<Option<EventRecord>, u64> {
        match self.rx.recv().await {
            Ok(record) => Ok(Some(record)),
            Err(broadcast::error::RecvError::Closed) => Ok(None),
            Err(broadcast::error::RecvError::Lagged(n)) => Err(n),
        }
    }

    /// The next event if one is waiting, without blocking.
    pub fn try_recv(&mut self) -> Option<EventRecord> {
        loop {
            match self.rx.try_recv() {
                Ok(record) => return Some(record),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_subscriber_sees_every_event_and_laggards_are_told() {
        let bus = EventBus::new(2);
        let mut a = bus.subscribe();
        let mut b = bus.subscribe();
        assert_eq!(bus.subscriber_count(), 2);
        let snapshot = SnapshotId::new();
        bus.publish(Event::SnapshotCreated {
            snapshot,
            size_bytes: 10,
            stored_bytes: 4,
        });
        let got = a.recv().await.unwrap().unwrap();
        assert_eq!(got.event.name(), "snapshot_created");
        let json = serde_json::to_value(&got).unwrap();
        assert_eq!(json["event"], "snapshot_created");
        assert_eq!(serde_json::from_value::<EventRecord>(json).unwrap(), got);

        for _ in 0..3 {
            bus.publish(Event::JournalReplayed {
                applied: 1,
                skipped: 0,
                last_position: Some(JournalPosition(1)),
                dry_run: false,
            });
        }
        assert_eq!(b.recv().await, Err(2));
        assert!(b.recv().await.unwrap().is_some());
        drop(bus);
        assert!(b.recv().await.unwrap().is_some());
        assert_eq!(b.recv().await, Ok(None));
    }
}
