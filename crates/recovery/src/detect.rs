//! The crash detector: installs capture when asked, and at the next start reads the
//! shutdown marker, the crash spool, the boot id and the cgroup OOM-kill count to
//! classify how the previous run ended.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sanare_core::{CrashId, CrashKind, Error, Event, EventBus, Result, Severity};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::capture;
use crate::marker::{self, Marker, MarkerState};
use crate::spool::{self, RecordSource, SpoolProblem, SpoolRecord};

/// File names inside the data folder.
const MARKER_FILE: &str = "sanare-shutdown.marker";
const SPOOL_FILE: &str = "sanare-crash.spool";

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
    /// When it happened (the spool record's time, else the marker's start time).
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

/// What [`CrashDetector::detect_previous_run`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PreviousRun {
    /// How the previous run ended.
    pub outcome: PreviousOutcome,
    /// The crash, when it crashed.
    pub crash: Option<CrashRecord>,
    /// Every spool record (panics caught or in supervised tasks of a clean run too).
    pub records: Vec<SpoolRecord>,
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
            records: Vec::new(),
            spool_problems: Vec::new(),
            detection_time: Duration::ZERO,
        }
    }

    /// Whether the previous run crashed.
    pub fn crashed(&self) -> bool {
        self.outcome == PreviousOutcome::Crashed
    }
}

/// Which handlers [`CrashDetector::install_handlers`] installs.
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

/// Builds a [`CrashDetector`].
#[derive(Debug, Default)]
pub struct CrashDetectorBuilder {
    data_dir: Option<PathBuf>,
    boot_id_path: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
    version: Option<String>,
    events: Option<EventBus>,
}

impl CrashDetectorBuilder {
    /// The folder for the marker and the spool (required; created if missing).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Where the boot id is read (default `/proc/sys/kernel/random/boot_id`; tests
    /// point it at a file to simulate a reboot).
    pub fn boot_id_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.boot_id_path = Some(path.into());
        self
    }

    /// The memory cgroup folder holding `memory.events` (v2) or
    /// `memory.oom_control` (v1); default: this process's own cgroup.
    pub fn cgroup_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.cgroup_root = Some(path.into());
        self
    }

    /// The host's version, saved in the marker.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Publishes [`Event::CrashDetected`] here.
    pub fn events(mut self, bus: EventBus) -> Self {
        self.events = Some(bus);
        self
    }

    /// Builds the detector, creating the data folder.
    pub fn build(self) -> Result<CrashDetector> {
        let data_dir = self
            .data_dir
            .ok_or_else(|| Error::config("recovery.data_dir", "a data folder is required"))?;
        std::fs::create_dir_all(&data_dir).map_err(|e| {
            Error::io(
                format!("creating the recovery data folder {}", data_dir.display()),
                e,
            )
        })?;
        Ok(CrashDetector {
            inner: Arc::new(Inner {
                marker_path: data_dir.join(MARKER_FILE),
                spool_path: data_dir.join(SPOOL_FILE),
                data_dir,
                boot_id_path: self
                    .boot_id_path
                    .unwrap_or_else(|| PathBuf::from("/proc/sys/kernel/random/boot_id")),
                cgroup_root: self.cgroup_root.unwrap_or_else(marker::own_cgroup_root),
                version: self.version.unwrap_or_default(),
                events: self.events,
                installed: Mutex::new(false),
            }),
        })
    }
}

#[derive(Debug)]
struct Inner {
    data_dir: PathBuf,
    marker_path: PathBuf,
    spool_path: PathBuf,
    boot_id_path: PathBuf,
    cgroup_root: PathBuf,
    version: String,
    events: Option<EventBus>,
    installed: Mutex<bool>,
}

/// The fatal-signal registration, process-wide and never dropped.
#[cfg(any(target_os = "linux", target_os = "android"))]
static SIGNALS: Mutex<Option<capture::signals::Attached>> = Mutex::new(None);

/// Detects and classifies crashes of the host process.
///
/// Start-up order: [`detect_previous_run`](Self::detect_previous_run) (read-only),
/// persist the report (`CrashStore::record`), then
/// [`mark_running`](Self::mark_running) (clears the spool, writes the marker), then
/// [`install_handlers`](Self::install_handlers); at clean exit
/// [`mark_clean_shutdown`](Self::mark_clean_shutdown).
#[derive(Clone, Debug)]
pub struct CrashDetector {
    inner: Arc<Inner>,
}

impl CrashDetector {
    /// A builder.
    pub fn builder() -> CrashDetectorBuilder {
        CrashDetectorBuilder::default()
    }

    /// The data folder.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// The crash spool's path.
    pub fn spool_path(&self) -> &Path {
        &self.inner.spool_path
    }

    /// The shutdown marker's path.
    pub fn marker_path(&self) -> &Path {
        &self.inner.marker_path
    }

    /// Reads the marker, the spool, the boot id and the OOM-kill count and classifies
    /// how the previous run ended. Changes nothing on disk. A damaged spool or marker
    /// is reported in the result, not returned as an error.
    #[tracing::instrument(skip(self), fields(data_dir = %self.inner.data_dir.display()))]
    pub fn detect_previous_run(&self) -> Result<PreviousRun> {
        let started = Instant::now();
        let marker_text = match std::fs::read_to_string(&self.inner.marker_path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(Error::io(
                    format!("reading {}", self.inner.marker_path.display()),
                    e,
                ));
            }
        };
        let spool_bytes = match std::fs::read(&self.inner.spool_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(Error::io(
                    format!("reading {}", self.inner.spool_path.display()),
                    e,
                ));
            }
        };
        let (records, spool_problems) = spool::decode(&spool_bytes);
        let facts = Facts {
            boot_id: marker::read_boot_id(&self.inner.boot_id_path),
            oom_kill: marker::read_oom_kill_count(&self.inner.cgroup_root),
        };
        let mut run = classify(marker_text.as_deref(), records, spool_problems, &facts);
        run.detection_time = started.elapsed();
        metrics::histogram!("sanare_recovery_detection_seconds")
            .record(run.detection_time.as_secs_f64());
        if let Some(crash) = &run.crash {
            metrics::counter!("sanare_recovery_crashes_detected_total", "kind" => crash.kind.as_str())
                .increment(1);
            tracing::warn!(kind = crash.kind.as_str(), evidence = ?crash.evidence, "previous run crashed");
            if let Some(bus) = &self.inner.events {
                bus.publish(Event::CrashDetected {
                    crash: crash.id,
                    kind: crash.kind,
                    severity: crash.severity,
                });
            }
        }
        Ok(run)
    }

    /// Starts a run: clears the spool (its records must be persisted first) and
    /// writes a `running` marker with the boot id and the OOM-kill count.
    pub fn mark_running(&self) -> Result<()> {
        let ctx = || {
            format!(
                "clearing the crash spool {}",
                self.inner.spool_path.display()
            )
        };
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.inner.spool_path)
            .map_err(|e| Error::io(ctx(), e))?;
        use std::io::Write;
        let mut f = f;
        f.write_all(&spool::header())
            .map_err(|e| Error::io(ctx(), e))?;
        f.sync_all().map_err(|e| Error::io(ctx(), e))?;
        self.write_marker(MarkerState::Running)
    }

    /// Records a clean shutdown: the next start sees no crash.
    pub fn mark_clean_shutdown(&self) -> Result<()> {
        self.write_marker(MarkerState::Clean)
    }

    fn write_marker(&self, state: MarkerState) -> Result<()> {
        let m = Marker {
            state,
            pid: std::process::id(),
            boot_id: marker::read_boot_id(&self.inner.boot_id_path).unwrap_or_default(),
            started_unix_ms: capture::now_unix_ms(),
            oom_kill: marker::read_oom_kill_count(&self.inner.cgroup_root),
            version: self.inner.version.clone(),
        };
        marker::write_atomic(&self.inner.marker_path, m.encode().as_bytes())
    }

    /// Installs the chained panic hook and the fatal-signal handler, writing to this
    /// detector's spool (opened now, so nothing is opened in a crash path). The hook
    /// and handlers are process-wide and installed once; installing from another
    /// detector redirects them to that detector's spool.
    pub fn install_handlers(&self, options: HandlerOptions) -> Result<()> {
        let mut installed = self
            .inner
            .installed
            .lock()
            .map_err(|_| Error::conflict("the crash handler registry is poisoned"))?;
        if *installed {
            return Ok(());
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&self.inner.spool_path)
            .map_err(|e| {
                Error::io(
                    format!(
                        "opening the crash spool {}",
                        self.inner.spool_path.display()
                    ),
                    e,
                )
            })?;
        if file.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
            use std::io::Write;
            (&file)
                .write_all(&spool::header())
                .map_err(|e| Error::io("writing the crash spool header", e))?;
        }
        // A previous detector's descriptor is left open on purpose: a thread crashing
        // right now may still be writing to it, and closing could let the number be
        // reused by an unrelated file.
        let _previous = capture::set_spool_fd(file.into_raw_fd());
        // The panic hook and signal handlers are process-wide: a second detector in
        // the same process only redirects them to its own spool (above).
        *installed = true;
        if PROCESS_HANDLERS.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        if options.panic_hook {
            let previous = std::panic::take_hook();
            let backtrace = options.panic_backtrace;
            std::panic::set_hook(Box::new(move |info| {
                capture::panic_record_hook(info, backtrace);
                previous(info);
            }));
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if options.fatal_signals {
            let attached = capture::signals::attach()?;
            if let Ok(mut slot) = SIGNALS.lock() {
                *slot = Some(attached);
            }
        }
        tracing::info!(spool = %self.inner.spool_path.display(), "crash capture installed");
        Ok(())
    }
}

/// Whether some detector already installed the process-wide hook and handlers.
static PROCESS_HANDLERS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Host facts read at detection.
pub(crate) struct Facts {
    pub(crate) boot_id: Option<String>,
    pub(crate) oom_kill: Option<u64>,
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGFPE => "SIGFPE".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGTRAP => "SIGTRAP".into(),
        other => format!("signal {other}"),
    }
}

fn system_state(marker: Option<&Marker>, facts: &Facts) -> SystemState {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = |key: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        })
    };
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split('.').next()?.parse().ok());
    let threads = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
        });
    SystemState {
        previous_boot_id: marker.map(|m| m.boot_id.clone()).filter(|b| !b.is_empty()),
        boot_id: facts.boot_id.clone(),
        previous_pid: marker.map(|m| m.pid),
        previous_version: marker.map(|m| m.version.clone()).filter(|v| !v.is_empty()),
        previous_started_at: marker.and_then(|m| ms_to_time(m.started_unix_ms)),
        oom_kill_at_start: marker.and_then(|m| m.oom_kill),
        oom_kill_now: facts.oom_kill,
        uptime_s: uptime,
        mem_total_kib: mem("MemTotal"),
        mem_available_kib: mem("MemAvailable"),
        threads,
    }
}

fn ms_to_time(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

/// The classification rules, in order of precedence (documented in the crate docs).
pub(crate) fn classify(
    marker_text: Option<&str>,
    records: Vec<SpoolRecord>,
    spool_problems: Vec<SpoolProblem>,
    facts: &Facts,
) -> PreviousRun {
    let mut run = PreviousRun {
        outcome: PreviousOutcome::Crashed,
        crash: None,
        records,
        spool_problems,
        detection_time: Duration::ZERO,
    };
    let marker = match marker_text.map(Marker::decode) {
        None => {
            run.outcome = PreviousOutcome::FirstRun;
            return run;
        }
        Some(Ok(m)) => Some(m),
        Some(Err(_)) => None,
    };
    if marker
        .as_ref()
        .is_some_and(|m| m.state == MarkerState::Clean)
    {
        run.outcome = PreviousOutcome::Clean;
        return run;
    }
    let now = sanare_core::now();
    let mut crash = CrashRecord {
        id: CrashId::new(),
        kind: CrashKind::Unknown,
        severity: Severity::High,
        crashed_at: marker
            .as_ref()
            .and_then(|m| ms_to_time(m.started_unix_ms))
            .unwrap_or(now),
        detected_at: now,
        exception_type: None,
        message: None,
        location: None,
        backtrace: None,
        signal: None,
        fault_address: None,
        thread: None,
        affected_components: Vec::new(),
        evidence: Vec::new(),
        system_state: system_state(marker.as_ref(), facts),
        spool_problems: run.spool_problems.clone(),
    };
    if marker.is_none() {
        crash
            .evidence
            .push("the shutdown marker is damaged, so the previous run's end is unknown".into());
    } else {
        crash
            .evidence
            .push("the shutdown marker says the previous run was still running".into());
    }
    for r in &run.records {
        if r.source == RecordSource::TaskPanic && !crash.affected_components.contains(&r.thread) {
            crash.affected_components.push(r.thread.clone());
        }
    }
    let find = |pred: &dyn Fn(&SpoolRecord) -> bool| run.records.iter().rev().find(|r| pred(r));
    let take_time = |crash: &mut CrashRecord, r: &SpoolRecord| {
        if let Some(t) = ms_to_time(r.unix_ms) {
            crash.crashed_at = t;
        }
    };
    if let Some(r) = find(&|r| r.source == RecordSource::AllocFailure) {
        crash.kind = CrashKind::OutOfMemory;
        crash.severity = Severity::High;
        crash.exception_type = Some("allocation failure".into());
        crash.message = Some(format!(
            "memory allocation of {} bytes failed",
            r.alloc_size
        ));
        crash
            .evidence
            .push("the allocator recorded a failed allocation".into());
        take_time(&mut crash, r);
    } else if let Some(r) = find(&|r| r.source == RecordSource::Signal && r.stack_overflow) {
        crash.kind = CrashKind::StackOverflow;
        crash.severity = Severity::High;
        crash.exception_type = Some(signal_name(r.signal));
        crash.signal = Some(r.signal);
        crash.fault_address = Some(r.fault_address);
        crash.message = Some(format!(
            "stack overflow: {} at {:#x}, next to the stack pointer",
            signal_name(r.signal),
            r.fault_address
        ));
        crash
            .evidence
            .push("a fatal signal's fault address was in the stack guard area".into());
        take_time(&mut crash, r);
    } else if let Some(r) = find(&|r| r.source == RecordSource::Panic) {
        crash.kind = CrashKind::ApplicationCrash;
        crash.severity = Severity::High;
        crash.exception_type = Some("panic".into());
        crash.message = Some(r.message.clone());
        crash.location = Some(r.location.clone()).filter(|l| !l.is_empty());
        crash.backtrace = Some(r.backtrace.clone()).filter(|b| !b.is_empty());
        crash.thread = Some(r.thread.clone());
        crash
            .evidence
            .push("the panic hook recorded a panic".into());
        if let Some(s) = find(&|r| r.source == RecordSource::Signal) {
            crash.signal = Some(s.signal);
        }
        take_time(&mut crash, r);
    } else if let Some(r) = find(&|r| r.source == RecordSource::Signal) {
        crash.kind = CrashKind::ApplicationCrash;
        crash.severity = Severity::High;
        crash.exception_type = Some(signal_name(r.signal));
        crash.signal = Some(r.signal);
        crash.fault_address = (r.fault_address != 0).then_some(r.fault_address);
        crash.message = Some(format!("fatal signal {}", signal_name(r.signal)));
        crash
            .evidence
            .push("the signal handler recorded a fatal signal".into());
        take_time(&mut crash, r);
    } else if let Some(r) = find(&|r| r.source == RecordSource::TaskPanic) {
        crash.kind = CrashKind::ApplicationCrash;
        crash.severity = Severity::Medium;
        crash.exception_type = Some("task panic".into());
        crash.message = Some(r.message.clone());
        crash
            .evidence
            .push("a supervised task panicked and the process then ended uncleanly".into());
        take_time(&mut crash, r);
    } else if let Some(m) = &marker {
        let boot_changed = match (&facts.boot_id, m.boot_id.is_empty()) {
            (Some(now), false) => Some(*now != m.boot_id),
            _ => None,
        };
        let oom_rose = match (m.oom_kill, facts.oom_kill) {
            (Some(before), Some(now)) => now > before,
            _ => false,
        };
        match boot_changed {
            Some(true) => {
                crash.kind = CrashKind::PowerFailure;
                crash.severity = Severity::Critical;
                crash.exception_type = Some("host went down".into());
                crash.message = Some(
                    "the machine restarted while the service was running (power loss or host crash)"
                        .into(),
                );
                crash.evidence.push(format!(
                    "the boot id changed from {} to {}",
                    m.boot_id,
                    facts.boot_id.as_deref().unwrap_or("?")
                ));
            }
            Some(false) if oom_rose => {
                crash.kind = CrashKind::OutOfMemory;
                crash.severity = Severity::High;
                crash.exception_type = Some("kernel OOM kill".into());
                crash.message = Some("the kernel's OOM killer ended the process".into());
                crash.evidence.push(format!(
                    "the cgroup oom_kill count rose from {} to {}",
                    m.oom_kill.unwrap_or(0),
                    facts.oom_kill.unwrap_or(0)
                ));
            }
            Some(false) => {
                crash.kind = CrashKind::ApplicationCrash;
                crash.severity = Severity::High;
                crash.exception_type = Some("killed".into());
                crash.message = Some(
                    "the process was killed by a signal no handler sees (SIGKILL) or exited without a clean shutdown"
                        .into(),
                );
                crash
                    .evidence
                    .push("same boot id, no crash record, no new OOM kill in the cgroup".into());
            }
            None => {
                crash.kind = CrashKind::Unknown;
                crash.severity = Severity::High;
                crash
                    .evidence
                    .push("no crash record and the boot id could not be compared".into());
            }
        }
    }
    if !run.spool_problems.is_empty() {
        crash.evidence.push(format!(
            "{} damaged spool region(s) were skipped",
            run.spool_problems.len()
        ));
    }
    run.crash = Some(crash);
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(boot: &str, oom: Option<u64>) -> String {
        Marker {
            state: MarkerState::Running,
            pid: 1,
            boot_id: boot.into(),
            started_unix_ms: 1_700_000_000_000,
            oom_kill: oom,
            version: "v".into(),
        }
        .encode()
    }

    fn facts(boot: &str, oom: Option<u64>) -> Facts {
        Facts {
            boot_id: Some(boot.into()),
            oom_kill: oom,
        }
    }

    fn rec(source: RecordSource, signal: i32, overflow: bool) -> SpoolRecord {
        SpoolRecord {
            source,
            stack_overflow: overflow,
            signal,
            fault_address: 0x1000,
            unix_ms: 1_700_000_001_000,
            pid: 1,
            tid: 1,
            alloc_size: 64,
            message: "m".into(),
            location: "l".into(),
            thread: "t".into(),
            backtrace: String::new(),
        }
    }

    fn kind(run: &PreviousRun) -> CrashKind {
        run.crash.as_ref().map(|c| c.kind).unwrap()
    }

    #[test]
    fn classification_rules() {
        let f = facts("a", Some(1));
        assert_eq!(
            classify(None, vec![], vec![], &f).outcome,
            PreviousOutcome::FirstRun
        );
        let clean = Marker::decode(&running("a", Some(1)))
            .map(|mut m| {
                m.state = MarkerState::Clean;
                m.encode()
            })
            .unwrap();
        let run = classify(
            Some(&clean),
            vec![rec(RecordSource::TaskPanic, 0, false)],
            vec![],
            &f,
        );
        assert_eq!(run.outcome, PreviousOutcome::Clean);
        assert_eq!(run.records.len(), 1);

        let m = running("a", Some(1));
        let r = |v| classify(Some(&m), v, vec![], &f);
        assert_eq!(kind(&r(vec![])), CrashKind::ApplicationCrash);
        assert_eq!(
            kind(&r(vec![rec(RecordSource::Signal, libc::SIGSEGV, true)])),
            CrashKind::StackOverflow
        );
        assert_eq!(
            kind(&r(vec![
                rec(RecordSource::AllocFailure, 0, false),
                rec(RecordSource::Signal, libc::SIGABRT, false)
            ])),
            CrashKind::OutOfMemory
        );
        let panic = r(vec![
            rec(RecordSource::Panic, 0, false),
            rec(RecordSource::Signal, libc::SIGABRT, false),
        ]);
        assert_eq!(kind(&panic), CrashKind::ApplicationCrash);
        assert_eq!(
            panic.crash.as_ref().unwrap().exception_type.as_deref(),
            Some("panic")
        );
        let task = r(vec![rec(RecordSource::TaskPanic, 0, false)]);
        assert_eq!(task.crash.as_ref().unwrap().affected_components, vec!["t"]);

        assert_eq!(
            kind(&classify(Some(&m), vec![], vec![], &facts("b", Some(1)))),
            CrashKind::PowerFailure
        );
        assert_eq!(
            kind(&classify(Some(&m), vec![], vec![], &facts("a", Some(2)))),
            CrashKind::OutOfMemory
        );
        // no cgroup readable: degrade to "killed"
        assert_eq!(
            kind(&classify(Some(&m), vec![], vec![], &facts("a", None))),
            CrashKind::ApplicationCrash
        );
        let no_boot = Facts {
            boot_id: None,
            oom_kill: None,
        };
        assert_eq!(
            kind(&classify(Some(&m), vec![], vec![], &no_boot)),
            CrashKind::Unknown
        );
        let damaged = classify(Some("SANARE-MARKER 1\nstate="), vec![], vec![], &f);
        assert_eq!(kind(&damaged), CrashKind::Unknown);
    }
}
