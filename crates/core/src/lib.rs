//! The shared vocabulary of sanare.
//!
//! Every sanare component crate (journal, snapshot, integrity, repair, corruption,
//! recovery) speaks in the types of this crate and reaches the other components only
//! through the service traits defined here. The facade (`sanare`) wires the real
//! implementations together; each component's tests use a fake of the traits it needs.
//!
//! What lives here:
//! - identifiers ([`SnapshotId`], [`ViolationId`], …: newtypes over UUID v7, so they
//!   sort by creation time),
//! - [`Severity`], [`Violation`], [`ViolationKind`], [`RowRef`], [`RowImage`], [`TableRef`],
//! - [`Event`] and the [`EventBus`] a host subscribes to,
//! - [`Control`]: cancellation ([`CancellationToken`]) and progress (a
//!   [`tokio::sync::watch`] of [`Progress`]) for every long operation,
//! - the one [`Error`] type, and
//! - the service traits: [`JournalService`], [`SnapshotService`], [`IntegrityService`],
//!   [`RepairService`], [`AlertSink`] and [`RowChecksum`].
//!
//! # Architecture invariant
//!
//! This crate holds traits, plain data and the shared error. It never depends on
//! PostgreSQL or on any storage backend, and it never installs global state.

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod alert;
mod control;
mod error;
mod event;
mod id;
mod integrity;
mod journal;
mod repair;
mod row;
mod severity;
mod snapshot;
mod violation;

pub use alert::{Alert, AlertSink};
pub use control::{Control, Progress, ProgressHandle, ProgressReporter};
pub use error::{BoxError, Error, Result};
pub use event::{CrashKind, Event, EventBus, EventRecord, EventSubscription};
pub use id::{
    AlertId, CheckId, CrashId, EventId, IssueId, JournalEntryId, RecoveryId, RepairId, ScanId,
    SnapshotId, ViolationId,
};
pub use integrity::{CheckFamily, IntegrityService, ValidationScope, ValidationSummary};
pub use journal::{
    JournalCut, JournalPosition, JournalService, ReplayFailure, ReplayRange, ReplayRequest,
    ReplaySummary,
};
pub use repair::{
    ExecuteOptions, PLAN_VIOLATION_SAMPLE, RepairOutcome, RepairPlan, RepairPolicy,
    RepairRunSummary, RepairService, RepairStatus, RepairStrategyKind,
};
pub use row::{ColumnValue, RowChecksum, RowImage, RowRef, TableRef, quote_ident};
pub use severity::Severity;
pub use snapshot::{
    RestoreOutcome, RestoreRequest, RestoreTarget, SnapshotInfo, SnapshotRequest, SnapshotService,
    SnapshotStatus, TableRowCount, VerifyReport,
};
pub use violation::{CorruptionKind, Violation, ViolationKind};

/// A boxed, `Send` stream, as returned by the services that stream large results
/// (violations of a report, rows of a snapshot).
pub type BoxStream<'a, T> = std::pin::Pin<Box<dyn futures_core::Stream<Item = T> + Send + 'a>>;

pub use tokio_util::sync::CancellationToken;

/// The current time in UTC, as every sanare record stores it.
pub fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}
