//! The plain data of crash detection: what a crash record holds and what a
//! start-up check found.

use std::time::Duration;

use sanare_core::{CrashId, CrashKind, Severity};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::spool::{SpoolProblem, SpoolRecord};

/// Facts about the host, saved with a crash record (spec §8.1 `system_state`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SystemState {
    /// The boot id of the crashed run.
    pub previous_boot_id: Option<String>,
    /// The boot id now.
    pub boot_id: Option<String>,
    /// The crashed process's id.
    pub previous_pid: Option<u32>,
    /// The crashed run's version.
    pub previous_version: Option<String>,
    /// When the crashed run started.
    #[serde(with = "time::serde::rfc3339::option")]
    pub previous_started_at: Option<OffsetDateTime>,
    /// The crashed run's last heartbeat, when it wrote one.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub previous_heartbeat_at: Option<OffsetDateTime>,
    /// The cgroup OOM-kill count at the crashed run's start.
    pub oom_kill_at_start: Option<u64>,
    /// The cgroup OOM-kill count now.
    pub oom_kill_now: Option<u64>,
    /// Host uptime now, in seconds.
    pub uptime_s: Option<u64>,
    /// `MemTotal` in KiB.
    pub mem_total_kib: Option<u64>,
    /// `MemAvailable` in KiB.
    pub mem_available_kib: Option<u64>,
    /// Threads of this (the new) process.
    pub threads: Option<u64>,
}

/// How the previous run crashed, with the evidence (spec §4.1 `CrashInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CrashRecord {
    /// Its id.
    pub id: CrashId,
    /// The classification.
    pub kind: CrashKind,
    /// How bad it is.
    pub severity: Severity,
    /// When it happened: the time of the record of the fatal event, else the run's
    /// last sign of life (its last heartbeat, else its start).
    #[serde(with = "time::serde::rfc3339")]
    pub crashed_at: OffsetDateTime,
    /// When this start detected it.
    #[serde(with = "time::serde::rfc3339")]
    pub detected_at: OffsetDateTime,
    /// `panic`, `SIGSEGV`, `allocation failure`, `SIGKILL or power loss`, …
    pub exception_type: Option<String>,
    /// The panic message or the signal's description.
    pub message: Option<String>,
    /// `file:line:col` of a panic.
    pub location: Option<String>,
    /// The backtrace captured at the panic.
    pub backtrace: Option<String>,
    /// The fatal signal number.
    pub signal: Option<i32>,
    /// The fault address of a SIGSEGV/SIGBUS.
    pub fault_address: Option<u64>,
    /// The crashing thread's name.
    pub thread: Option<String>,
    /// Components whose supervised tasks failed.
    pub affected_components: Vec<String>,
    /// What the classification rests on, in words.
    pub evidence: Vec<String>,
    /// Host facts.
    pub system_state: SystemState,
    /// Spool regions that could not be read.
    pub spool_problems: Vec<SpoolProblem>,
}

/// How the previous run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreviousOutcome {
    /// No marker: the first run with this data folder.
    FirstRun,
    /// The previous run shut down cleanly.
    Clean,
    /// It crashed; see [`PreviousRun::crash`].
    Crashed,
    /// Not checked: crash detection is off, or the handle belongs to an operator
    /// tool rather than the service.
    NotChecked,
}

/// What [`CrashDetector::detect_previous_run`](crate::CrashDetector::detect_previous_run) found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PreviousRun {
    /// How the previous run ended.
    pub outcome: PreviousOutcome,
    /// The crash, when it crashed.
    pub crash: Option<CrashRecord>,
    /// The previous run's identity (its marker's run id; for a marker without one,
    /// an id derived from the marker and spool bytes, the same at every read).
    /// `None` on a first run.
    pub run_id: Option<uuid::Uuid>,
    /// Every spool record (panics caught or in supervised tasks of a clean run too).
    pub records: Vec<SpoolRecord>,
    /// The index in [`records`](Self::records) of the record of the event the run
    /// died of, when a record explains the crash. The others are incidents the run
    /// went on after (or, without a heartbeat, could not be told apart).
    pub fatal_record: Option<usize>,
    /// Spool regions that could not be read (reported, not fatal).
    pub spool_problems: Vec<SpoolProblem>,
    /// How long detection took.
    pub detection_time: Duration,
}

impl PreviousRun {
    /// The report of a start that did not check how the previous run ended.
    pub fn unchecked() -> Self {
        Self {
            outcome: PreviousOutcome::NotChecked,
            crash: None,
            run_id: None,
            records: Vec::new(),
            fatal_record: None,
            spool_problems: Vec::new(),
            detection_time: Duration::ZERO,
        }
    }

    /// Whether the previous run crashed.
    pub fn crashed(&self) -> bool {
        self.outcome == PreviousOutcome::Crashed
    }
}

/// Which handlers [`CrashDetector::install_handlers`](crate::CrashDetector::install_handlers) installs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerOptions {
    /// The chained panic hook.
    pub panic_hook: bool,
    /// Capture a backtrace in the panic hook (costs a few ms per panic).
    pub panic_backtrace: bool,
    /// The fatal-signal handler.
    pub fatal_signals: bool,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        Self {
            panic_hook: true,
            panic_backtrace: true,
            fatal_signals: true,
        }
    }
}
