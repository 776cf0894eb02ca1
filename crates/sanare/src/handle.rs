//! The handle a host holds: [`Sanare`], and what its start-up found.

use std::sync::{Arc, Mutex};

use sanare_core::{EventBus, EventRecord, Result};
use sanare_corruption::CorruptionDetector;
use sanare_integrity::Integrity;
use sanare_journal::Journal;
use sanare_pg::{MigrationReport, Pool, SchemaName};
use sanare_recovery::{
    CrashDetector, CrashStore, PreviousRun, Recovery, RecoveryPlan, RecoveryResult,
};
use sanare_repair::RepairEngine;
use sanare_snapshot::Snapshots;
use tokio_util::sync::CancellationToken;

use crate::JobQueue;
use crate::background::Background;
use crate::config::SanareConfig;

/// What start-up found and did.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StartupReport {
    /// How the previous run ended (with the crash record when it crashed).
    pub previous_run: PreviousRun,
    /// Migrations applied at this start, per component.
    pub migrations: Vec<MigrationReport>,
    /// The recovery this start ran; `None` only for an operator handle. After a
    /// crash with `auto_recovery`, the recovery by evidence
    /// ([`RecoveryOption::Auto`](sanare_recovery::RecoveryOption::Auto));
    /// otherwise the start-up plan
    /// ([`RecoveryOption::Startup`](sanare_recovery::RecoveryOption::Startup)):
    /// the journal entries not yet applied are replayed and readiness checked. A
    /// failed recovery does not fail the start: its `success` is false, its
    /// `errors` say why, and [`Sanare::recovery`]`().readiness()` reports not ready.
    pub recovery: Option<RecoveryResult>,
    /// The plan that recovery ran (its steps, why, and the options the
    /// configuration gave it); `None` only for an operator handle.
    pub plan: Option<RecoveryPlan>,
    /// Crash records, incidents and recovery records purged as older than
    /// `crash_detection.history_days`.
    pub crash_history_purged: u64,
    /// The events published while `build()` ran, in order: `CrashDetected`, the
    /// start-up replay's `JournalReplayed`, the start-up `RecoveryCompleted`, …
    /// (a subscriber to [`Sanare::events`] sees only what comes after `build()`).
    /// When the start-up recovery publishes more events than the bus holds, the
    /// oldest of its own are missing here (their rows are in sanare's tables).
    pub events: Vec<EventRecord>,
}

impl StartupReport {
    /// The crash of the previous run, if it crashed.
    pub fn crash(&self) -> Option<&sanare_recovery::CrashRecord> {
        self.previous_run.crash.as_ref()
    }
}

/// sanare, running inside a host: every component, wired.
#[derive(Debug)]
pub struct Sanare {
    pub(crate) config: Arc<SanareConfig>,
    pub(crate) pool: Pool,
    pub(crate) schema: SchemaName,
    pub(crate) events: EventBus,
    pub(crate) detector: CrashDetector,
    pub(crate) crash_store: CrashStore,
    pub(crate) journal: Journal,
    pub(crate) snapshots: Arc<Snapshots>,
    pub(crate) integrity: Arc<Integrity>,
    pub(crate) repair: Arc<RepairEngine>,
    pub(crate) corruption: Arc<CorruptionDetector>,
    pub(crate) recovery: Recovery,
    pub(crate) startup: StartupReport,
    pub(crate) shutdown: CancellationToken,
    pub(crate) operator: bool,
    pub(crate) background: Mutex<Option<Background>>,
    pub(crate) monitor: Mutex<Option<sanare_corruption::MonitorHandle>>,
}

impl Sanare {
    /// What start-up found (the previous run's crash, migrations applied).
    pub fn startup_report(&self) -> &StartupReport {
        &self.startup
    }

    /// The configuration in effect.
    pub fn config(&self) -> &SanareConfig {
        &self.config
    }

    /// The job queue shared by the service's instances.
    pub fn jobs(&self) -> JobQueue {
        JobQueue::new(self.pool.clone(), &self.schema)
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The schema of sanare's tables.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// The transaction journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Snapshots.
    pub fn snapshots(&self) -> &Arc<Snapshots> {
        &self.snapshots
    }

    /// Integrity validation.
    pub fn integrity(&self) -> &Arc<Integrity> {
        &self.integrity
    }

    /// The repair engine.
    pub fn repair(&self) -> &Arc<RepairEngine> {
        &self.repair
    }

    /// Corruption detection.
    pub fn corruption(&self) -> &Arc<CorruptionDetector> {
        &self.corruption
    }

    /// Recovery orchestration.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Crash records.
    pub fn crashes(&self) -> &CrashStore {
        &self.crash_store
    }

    /// The event bus; `events().subscribe()` to follow everything.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// The state of each supervised background loop of this instance (empty when
    /// background work is off): panics and restarts are counted here.
    pub fn background_status(&self) -> Vec<crate::BackgroundTaskStatus> {
        self.background
            .lock()
            .ok()
            .and_then(|b| b.as_ref().map(Background::status))
            .unwrap_or_default()
    }

    /// A token cancelled at shutdown, for the host's own long work.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Shuts down cleanly: cancels running work, waits for the background tasks
    /// and the real-time monitor to stop, and marks the run clean (the heartbeat
    /// stops), so the next start knows this run ended cleanly. Takes `&self`, so
    /// a handle shared in an `Arc` shuts down too; calling it again only marks
    /// clean again. The data directory (its lock, the journal's files) is released
    /// when the last handle is dropped.
    pub async fn shutdown(&self) -> Result<()> {
        self.shutdown.cancel();
        let background = self.background.lock().ok().and_then(|mut b| b.take());
        if let Some(background) = background {
            background.join().await;
        }
        let monitor = self.monitor.lock().ok().and_then(|mut m| m.take());
        if let Some(monitor) = monitor {
            monitor.stop().await;
        }
        if self.operator {
            return Ok(());
        }
        self.detector.mark_clean_shutdown()
    }
}

impl Drop for Sanare {
    /// Dropped without [`Sanare::shutdown`]: background work stops (its tasks let go
    /// of the journal), but the shutdown marker stays `running`, so the next start
    /// sees an unclean end.
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Ok(background) = self.background.get_mut()
            && let Some(background) = background.as_ref()
        {
            background.abort();
        }
    }
}
