//! The crash detector: installs capture when asked, and at the next start reads the
//! shutdown marker, the crash spool, the boot id and the cgroup OOM-kill count to
//! classify how the previous run ended (rules: [`crate::classify`]).

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sanare_core::{Error, Event, EventBus, Result};

use crate::capture;
use crate::classify::{self, Facts};
use crate::heartbeat::MarkerCell;
use crate::lock::DataDirLock;
use crate::marker::{self, Marker, MarkerState};
use crate::spool;
use crate::types::{HandlerOptions, PreviousRun};

/// File names inside the data folder.
const MARKER_FILE: &str = "sanare-shutdown.marker";
const SPOOL_FILE: &str = "sanare-crash.spool";

/// Builds a [`CrashDetector`].
#[derive(Debug, Default)]
pub struct CrashDetectorBuilder {
    data_dir: Option<PathBuf>,
    lock_dir: Option<PathBuf>,
    read_only: bool,
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

    /// The directory whose [`DataDirLock`] the detector takes (default: its data
    /// folder). The facade locks the whole data directory, of which the detector's
    /// folder is a part.
    pub fn lock_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.lock_dir = Some(dir.into());
        self
    }

    /// A detector that only reads the evidence (a tool looking at a service's data
    /// folder): it takes no lock, and refuses to write the marker, clear the spool,
    /// beat or install handlers.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
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

    /// Builds the detector: takes the exclusive lock of the data directory
    /// (unless [`read_only`](Self::read_only)) before anything in it is read, then
    /// creates the data folder. Fails with [`Error::Conflict`] when another process
    /// holds the lock; nothing is read or written then.
    pub fn build(self) -> Result<CrashDetector> {
        let data_dir = self
            .data_dir
            .ok_or_else(|| Error::config("recovery.data_dir", "a data folder is required"))?;
        let lock = if self.read_only {
            None
        } else {
            Some(DataDirLock::acquire(
                self.lock_dir.as_deref().unwrap_or(&data_dir),
            )?)
        };
        std::fs::create_dir_all(&data_dir).map_err(|e| {
            Error::io(
                format!("creating the recovery data folder {}", data_dir.display()),
                e,
            )
        })?;
        let marker_path = data_dir.join(MARKER_FILE);
        Ok(CrashDetector {
            inner: Arc::new(Inner {
                cell: Arc::new(MarkerCell::new(marker_path.clone())),
                marker_path,
                spool_path: data_dir.join(SPOOL_FILE),
                data_dir,
                boot_id_path: self
                    .boot_id_path
                    .unwrap_or_else(|| PathBuf::from("/proc/sys/kernel/random/boot_id")),
                cgroup_root: self.cgroup_root.unwrap_or_else(marker::own_cgroup_root),
                version: self.version.unwrap_or_default(),
                events: self.events,
                installed: Mutex::new(false),
                heartbeat: Mutex::new(None),
                lock,
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
    cell: Arc<MarkerCell>,
    heartbeat: Mutex<Option<JoinHandle<()>>>,
    /// Held for the detector's life; `None` for a read-only detector.
    lock: Option<DataDirLock>,
}

impl Drop for Inner {
    /// The last handle is gone: the heartbeat stops (the marker keeps `running`,
    /// so the next start sees an unclean end) and the lock is released.
    fn drop(&mut self) {
        self.cell.stop();
        if let Some(h) = self.heartbeat.get_mut().ok().and_then(Option::take) {
            let _ = h.join();
        }
    }
}

/// The fatal-signal registration, process-wide and never dropped.
#[cfg(any(target_os = "linux", target_os = "android"))]
static SIGNALS: Mutex<Option<capture::signals::Attached>> = Mutex::new(None);

/// Detects and classifies crashes of the host process.
///
/// Start-up order: [`build`](CrashDetectorBuilder::build) (locks the data
/// directory), [`detect_previous_run`](Self::detect_previous_run) (read-only),
/// persist the report (`CrashStore::record_run`), then
/// [`mark_running`](Self::mark_running) (clears the spool, writes the marker), then
/// [`start_heartbeat`](Self::start_heartbeat) and
/// [`install_handlers`](Self::install_handlers); at clean exit
/// [`mark_clean_shutdown`](Self::mark_clean_shutdown). Dropping the last handle
/// stops the heartbeat and releases the lock.
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

    /// The directory this detector holds the lock of (`None` when read-only).
    pub fn locked_dir(&self) -> Option<&Path> {
        self.inner.lock.as_ref().map(DataDirLock::dir)
    }

    fn writer(&self, what: &str) -> Result<()> {
        if self.inner.lock.is_none() {
            return Err(Error::conflict(format!(
                "a read-only crash detector may not {what}: only the process holding the data directory's lock writes its marker and spool"
            )));
        }
        Ok(())
    }

    /// Reads the marker, the spool, the boot id and the OOM-kill count and classifies
    /// how the previous run ended. Changes nothing on disk. A damaged spool or marker
    /// is reported in the result, not returned as an error.
    #[tracing::instrument(skip(self), fields(data_dir = %self.inner.data_dir.display()))]
    pub fn detect_previous_run(&self) -> Result<PreviousRun> {
        let started = Instant::now();
        let read = |path: &Path| match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let marker_bytes = read(&self.inner.marker_path)?;
        let spool_bytes = read(&self.inner.spool_path)?.unwrap_or_default();
        let marker_text = marker_bytes
            .as_deref()
            .map(|b| String::from_utf8_lossy(b).into_owned());
        let (records, spool_problems) = spool::decode(&spool_bytes);
        let facts = Facts {
            boot_id: marker::read_boot_id(&self.inner.boot_id_path),
            oom_kill: marker::read_oom_kill_count(&self.inner.cgroup_root),
        };
        let content_id =
            classify::content_run_id(marker_bytes.as_deref().unwrap_or_default(), &spool_bytes);
        let mut run = classify::classify(
            marker_text.as_deref(),
            records,
            spool_problems,
            &facts,
            content_id,
        );
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

    /// [`detect_previous_run`](Self::detect_previous_run) on a thread of its own,
    /// giving up after `timeout` (a data folder on a disk that stopped answering, a
    /// hung `/proc`) with [`Error::Unavailable`]. Needs no timer of the async
    /// runtime.
    pub async fn detect_previous_run_within(&self, timeout: Duration) -> Result<PreviousRun> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let detector = self.clone();
        // A waiter thread gives the detection `timeout`; the detection runs on a
        // thread of its own, which is left behind if it never returns.
        std::thread::Builder::new()
            .name("sanare-detect".into())
            .spawn(move || {
                let (done_tx, done_rx) = std::sync::mpsc::channel();
                let spawned = std::thread::Builder::new()
                    .name("sanare-detect-read".into())
                    .spawn(move || {
                        let _ = done_tx.send(detector.detect_previous_run());
                    });
                let outcome = match spawned {
                    Ok(_) => done_rx.recv_timeout(timeout).ok(),
                    Err(e) => Some(Err(Error::io("starting crash detection", e))),
                };
                let _ = tx.send(outcome);
            })
            .map_err(|e| Error::io("starting crash detection", e))?;
        match rx.await {
            Ok(Some(result)) => result,
            _ => Err(Error::unavailable(format!(
                "crash detection did not finish within {timeout:?} (`crash_detection.detection_timeout`): \
                 reading the marker and spool in {} or the boot id at {} does not answer; check that disk, or raise the timeout",
                self.inner.data_dir.display(),
                self.inner.boot_id_path.display()
            ))),
        }
    }

    /// Starts a run: clears the spool (persist the previous run's records first,
    /// with `CrashStore::record_run`) and writes a `running` marker with a new run
    /// id, the boot id and the OOM-kill count.
    pub fn mark_running(&self) -> Result<()> {
        self.writer("start a run")?;
        let ctx = || {
            format!(
                "clearing the crash spool {}",
                self.inner.spool_path.display()
            )
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.inner.spool_path)
            .map_err(|e| Error::io(ctx(), e))?;
        use std::io::Write;
        f.write_all(&spool::header())
            .map_err(|e| Error::io(ctx(), e))?;
        f.sync_all().map_err(|e| Error::io(ctx(), e))?;
        self.inner.cell.write(Marker {
            state: MarkerState::Running,
            pid: std::process::id(),
            boot_id: marker::read_boot_id(&self.inner.boot_id_path).unwrap_or_default(),
            started_unix_ms: capture::now_unix_ms(),
            oom_kill: marker::read_oom_kill_count(&self.inner.cgroup_root),
            version: self.inner.version.clone(),
            run_id: Some(uuid::Uuid::now_v7()),
            heartbeat_unix_ms: None,
        })
    }

    /// Starts the heartbeat: a thread that rewrites the `running` marker every
    /// `every` with the time, so the next start knows when this run was last
    /// alive. Call after [`mark_running`](Self::mark_running); a second call
    /// changes nothing. It stops at [`mark_clean_shutdown`](Self::mark_clean_shutdown)
    /// or when the last handle is dropped.
    pub fn start_heartbeat(&self, every: Duration) -> Result<()> {
        self.writer("beat")?;
        if every.is_zero() {
            return Err(Error::invalid_input(
                "a heartbeat interval must be above zero",
            ));
        }
        let mut slot = self
            .inner
            .heartbeat
            .lock()
            .map_err(|_| Error::conflict("the heartbeat registry is poisoned"))?;
        if slot.is_none() {
            *slot = Some(self.inner.cell.start(every)?);
        }
        Ok(())
    }

    /// Writes one heartbeat now. Returns `false` (and writes nothing) before
    /// [`mark_running`](Self::mark_running), after a clean shutdown, or within the
    /// grace period after a captured incident.
    pub fn heartbeat(&self) -> Result<bool> {
        self.writer("beat")?;
        self.inner.cell.beat()
    }

    /// Records a clean shutdown (the next start sees no crash) and stops the
    /// heartbeat.
    pub fn mark_clean_shutdown(&self) -> Result<()> {
        self.writer("mark a clean shutdown")?;
        let now = capture::now_unix_ms();
        let running = self.inner.cell.current();
        self.inner.cell.write(Marker {
            state: MarkerState::Clean,
            pid: std::process::id(),
            boot_id: marker::read_boot_id(&self.inner.boot_id_path).unwrap_or_default(),
            started_unix_ms: running.as_ref().map_or(now, |m| m.started_unix_ms),
            oom_kill: marker::read_oom_kill_count(&self.inner.cgroup_root),
            version: self.inner.version.clone(),
            run_id: running.and_then(|m| m.run_id),
            heartbeat_unix_ms: Some(now),
        })?;
        let handle = self
            .inner
            .heartbeat
            .lock()
            .ok()
            .and_then(|mut slot| slot.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
        Ok(())
    }

    /// Installs the chained panic hook and the fatal-signal handler, writing to this
    /// detector's spool (opened now, so nothing is opened in a crash path). The hook
    /// and handlers are process-wide and installed once; installing from another
    /// detector redirects them to that detector's spool.
    pub fn install_handlers(&self, options: HandlerOptions) -> Result<()> {
        self.writer("install the crash handlers")?;
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
                // Printing the panic may take a while: the grace counts from here.
                capture::note_incident();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_detector_reads_the_evidence_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let writer = CrashDetector::builder()
            .data_dir(dir.path())
            .build()
            .unwrap();
        assert_eq!(writer.locked_dir(), Some(dir.path()));
        writer.mark_running().unwrap();
        let marker = std::fs::read(writer.marker_path()).unwrap();
        // A tool beside the running process: no lock, reads, refuses to write.
        let reader = CrashDetector::builder()
            .data_dir(dir.path())
            .read_only()
            .build()
            .unwrap();
        assert_eq!(reader.locked_dir(), None);
        assert!(reader.detect_previous_run().unwrap().crashed());
        for refused in [
            reader.mark_running(),
            reader.mark_clean_shutdown(),
            reader.heartbeat().map(|_| ()),
            reader.start_heartbeat(Duration::from_secs(1)),
            reader.install_handlers(HandlerOptions::default()),
        ] {
            assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
        }
        assert_eq!(std::fs::read(writer.marker_path()).unwrap(), marker);
        // A second writer is refused while the first holds the directory.
        let second = CrashDetector::builder().data_dir(dir.path()).build();
        assert!(matches!(second, Err(Error::Conflict(_))));
        drop(writer);
        CrashDetector::builder()
            .data_dir(dir.path())
            .build()
            .unwrap();
    }
}
