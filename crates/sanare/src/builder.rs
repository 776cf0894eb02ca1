//! `Sanare::builder()…build()`: the one call a host makes at start-up, in phases:
//! lock and connect, migrate, detect, wire, recover.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sanare_core::{AlertSink, Control, Error, EventBus, EventRecord, EventSubscription, Result};
use sanare_integrity::Rules;
use sanare_journal::JournalBuilder;
use sanare_pg::{MigrationReport, Pool, SchemaName, get_conn};
use sanare_recovery::{
    CrashDetector, CrashStore, HandlerOptions, PreviousRun, ReadinessCheck, Recovery,
    RecoveryOption, RecoveryOptions, RecoveryPlan, RecoveryResult,
};
use tokio_util::sync::CancellationToken;

use crate::background::{Background, Components, Timing};
use crate::config::SanareConfig;
use crate::handle::{Sanare, StartupReport};
use crate::wire::{self, Wired};

pub(crate) type JournalHook = Box<dyn FnOnce(JournalBuilder) -> JournalBuilder + Send>;

/// Builds a [`Sanare`].
#[must_use]
pub struct SanareBuilder {
    config: SanareConfig,
    pool: Option<Pool>,
    database_url: Option<String>,
    data_dir: Option<PathBuf>,
    crash_handlers: bool,
    events: Option<EventBus>,
    pub(crate) rules: Rules,
    pub(crate) alerts: Option<Arc<dyn AlertSink>>,
    pub(crate) journal_hook: Option<JournalHook>,
    pub(crate) operator: bool,
    background: bool,
    instance: Option<String>,
    timing: Timing,
    boot_id_path: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
    readiness: Option<Arc<dyn ReadinessCheck>>,
    pub(crate) sources: Vec<Arc<dyn sanare_snapshot::StateSource>>,
    pub(crate) checksum_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for SanareBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SanareBuilder")
            .field("config", &self.config)
            .field("data_dir", &self.data_dir)
            .field("crash_handlers", &self.crash_handlers)
            .field("operator", &self.operator)
            .field("background", &self.background)
            .finish_non_exhaustive()
    }
}

impl Sanare {
    /// A builder with the default configuration.
    pub fn builder() -> SanareBuilder {
        SanareBuilder {
            config: SanareConfig::default(),
            pool: None,
            database_url: None,
            data_dir: None,
            crash_handlers: false,
            events: None,
            rules: Rules::default(),
            alerts: None,
            journal_hook: None,
            operator: false,
            background: true,
            instance: None,
            timing: Timing::default(),
            boot_id_path: None,
            cgroup_root: None,
            readiness: None,
            sources: Vec::new(),
            checksum_key: None,
        }
    }
}

/// The events published while `build()` runs, kept for the start-up report.
struct StartupEvents {
    subscription: EventSubscription,
    events: Vec<EventRecord>,
}

impl StartupEvents {
    fn new(bus: &EventBus) -> Self {
        Self {
            subscription: bus.subscribe(),
            events: Vec::new(),
        }
    }

    /// Takes what was published since the last call.
    fn drain(&mut self) {
        while let Some(e) = self.subscription.try_recv() {
            self.events.push(e);
        }
    }
}

/// What the detect phase found and did.
struct Detected {
    previous_run: PreviousRun,
    purged: u64,
}

impl SanareBuilder {
    /// The 32-byte secret of `blake3_keyed` row checksums (integrity rules and
    /// `corruption.checksum_algorithm = "blake3_keyed"`). Kept out of the
    /// configuration file and never stored in the database.
    pub fn checksum_key(mut self, key: [u8; 32]) -> Self {
        self.checksum_key = Some(key);
        self
    }

    /// The whole configuration (from a file, the environment or code).
    pub fn config(mut self, config: SanareConfig) -> Self {
        self.config = config;
        self
    }

    /// The host's connection pool (preferred).
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// A connection string, when the host has no pool to share.
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// Where the embedded journal, snapshot blocks, crash spool and shutdown marker
    /// live (overrides `data_dir` of the configuration). One running service owns
    /// a data directory: `build()` locks it.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Installs the panic hook and fatal-signal handlers at build (off unless asked).
    pub fn install_crash_handlers(mut self) -> Self {
        self.crash_handlers = true;
        self
    }

    /// The event bus to publish on (a new one by default). Events published
    /// while `build()` runs are also kept in [`StartupReport::events`].
    pub fn events(mut self, events: EventBus) -> Self {
        self.events = Some(events);
        self
    }

    /// Declared integrity rules.
    pub fn rules(mut self, rules: Rules) -> Self {
        self.rules = rules;
        self
    }

    /// Where corruption alerts go.
    pub fn alerts(mut self, sink: Arc<dyn AlertSink>) -> Self {
        self.alerts = Some(sink);
        self
    }

    /// Customises the journal (register replay handlers, tune batching).
    pub fn journal(
        mut self,
        hook: impl FnOnce(JournalBuilder) -> JournalBuilder + Send + 'static,
    ) -> Self {
        self.journal_hook = Some(Box::new(hook));
        self
    }

    /// State outside the database captured in every snapshot (a host byte stream:
    /// a cache file, a model, a spool), restored with
    /// `snapshots().restore_source(..)`. Repeatable.
    pub fn state_source(mut self, source: Arc<dyn sanare_snapshot::StateSource>) -> Self {
        self.sources.push(source);
        self
    }

    /// The host's readiness probe: the last step of every recovery, and what
    /// [`Recovery::check_readiness`] runs (a health endpoint's answer).
    pub fn readiness(mut self, check: Arc<dyn ReadinessCheck>) -> Self {
        self.readiness = Some(check);
        self
    }

    /// Where the machine's boot id is read (default
    /// `/proc/sys/kernel/random/boot_id`). A changed boot id tells a power loss or
    /// host crash from a killed process; point this elsewhere when the service runs
    /// where `/proc` is not the host's.
    pub fn boot_id_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.boot_id_path = Some(path.into());
        self
    }

    /// The memory cgroup directory whose `memory.events` (v2) or
    /// `memory.oom_control` (v1) counts kernel OOM kills (default: this process's
    /// own cgroup).
    pub fn cgroup_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.cgroup_root = Some(path.into());
        self
    }

    /// Builds a handle for a tool that operates on a service's data from outside
    /// (the `sanare` CLI): migrations run and every component is available, but
    /// the data directory is not locked, the crash check and the start-up replay
    /// do not run, the service's shutdown marker and crash spool are left
    /// untouched, no crash handlers are installed and no background work starts.
    pub fn operator(mut self) -> Self {
        self.operator = true;
        self
    }

    /// Whether this instance runs the background work of the configuration
    /// (scheduled snapshots, compaction, validation and scans; on by default).
    /// Scheduled tasks run on one instance at a time; their table jobs on all.
    pub fn background(mut self, on: bool) -> Self {
        self.background = on;
        self
    }

    /// This instance's name among the service's instances (in job and scheduler
    /// records; default `<hostname>:<pid>`).
    pub fn instance_name(mut self, name: impl Into<String>) -> Self {
        self.instance = Some(name.into());
        self
    }

    /// How often the scheduler looks for due tasks and the job worker for jobs
    /// (default 5 s).
    pub fn poll_interval(mut self, every: std::time::Duration) -> Self {
        self.timing.poll = every.max(std::time::Duration::from_millis(10));
        self
    }

    /// Starts sanare inside the host:
    ///
    /// 1. locks the data directory (a second process on it fails here with
    ///    [`Error::Conflict`], having changed nothing) and connects;
    /// 2. runs every component's migrations;
    /// 3. checks how the previous run ended, records its crash and incidents,
    ///    marks this run as running and starts its heartbeat;
    /// 4. wires the components;
    /// 5. recovers: after a crash (with `auto_recovery`) by evidence, otherwise
    ///    by replaying the journal entries not yet applied — every start applies
    ///    them, exactly once, before `build()` returns — and checks readiness.
    ///
    /// A failed recovery does not fail the start: [`StartupReport::recovery`]
    /// holds its errors and [`Recovery::readiness`] says not ready.
    pub async fn build(mut self) -> Result<Sanare> {
        let started = std::time::Instant::now();
        let config = std::mem::take(&mut self.config);
        config.validate()?;
        let schema = config.schema_name()?;
        let data_dir = self
            .data_dir
            .take()
            .unwrap_or_else(|| config.data_dir.clone());
        let events = self.events.take().unwrap_or_default();
        let mut startup_events = StartupEvents::new(&events);
        let service = !self.operator;

        // 1. Lock before anything in the data directory is read; then connect.
        let detector = self.lock(&data_dir, &events)?;
        let pool = self.connect(&config)?;
        // 2.
        let migrations = migrate(&pool, &schema).await?;
        // 3.
        let crash_store = CrashStore::new(pool.clone(), schema.clone());
        let detected = self
            .detect(&config, &detector, &crash_store, service)
            .await?;
        startup_events.drain();
        // 4.
        let readiness = self.readiness.take();
        let env = wire::Env {
            config: &config,
            pool: &pool,
            schema: &schema,
            data_dir: &data_dir,
            events: &events,
        };
        let wired = wire::wire(&mut self, &env).await?;
        let recovery = recovery(&wired, crash_store.clone(), readiness, &events);
        // 5.
        let (plan, recovered) = if service {
            let (plan, result) =
                start_up(&config, &recovery, &detected.previous_run, started).await?;
            (Some(plan), Some(result))
        } else {
            (None, None)
        };
        startup_events.drain();
        let shutdown = CancellationToken::new();
        let monitor = if service && config.corruption.real_time {
            Some(wired.corruption.start_monitor(Vec::new()).await?)
        } else {
            None
        };
        let config = Arc::new(config);
        let background = (service && self.background).then(|| {
            let instance = self.instance.take().unwrap_or_else(default_instance_name);
            Background::start(
                Components {
                    config: config.clone(),
                    pool: pool.clone(),
                    schema: schema.clone(),
                    journal: wired.journal.clone(),
                    snapshots: wired.snapshots.clone(),
                    integrity: wired.integrity.clone(),
                    repair: wired.repair.clone(),
                    corruption: wired.corruption.clone(),
                },
                &instance,
                &self.timing,
                &shutdown,
            )
        });
        Ok(Sanare {
            config,
            pool,
            schema,
            events,
            detector,
            crash_store,
            journal: wired.journal,
            snapshots: wired.snapshots,
            integrity: wired.integrity,
            repair: wired.repair,
            corruption: wired.corruption,
            recovery,
            startup: StartupReport {
                previous_run: detected.previous_run,
                migrations,
                recovery: recovered,
                plan,
                crash_history_purged: detected.purged,
                events: startup_events.events,
            },
            shutdown,
            operator: self.operator,
            background: Mutex::new(background),
            monitor: Mutex::new(monitor),
        })
    }

    /// Builds the crash detector, which locks the data directory (a service) or
    /// only reads it (an operator tool).
    fn lock(&mut self, data_dir: &Path, events: &EventBus) -> Result<CrashDetector> {
        let mut detector = CrashDetector::builder()
            .data_dir(data_dir.join("recovery"))
            .lock_dir(data_dir)
            .version(env!("CARGO_PKG_VERSION"))
            .events(events.clone());
        if self.operator {
            detector = detector.read_only();
        }
        if let Some(path) = self.boot_id_path.take() {
            detector = detector.boot_id_path(path);
        }
        if let Some(path) = self.cgroup_root.take() {
            detector = detector.cgroup_root(path);
        }
        detector.build()
    }

    fn connect(&mut self, config: &SanareConfig) -> Result<Pool> {
        match (
            self.pool.take(),
            self.database_url
                .take()
                .or_else(|| config.database_url.clone()),
        ) {
            (Some(pool), _) => Ok(pool),
            (None, Some(url)) => sanare_pg::connect_pool(&url, 16),
            (None, None) => Err(Error::config(
                "database_url",
                "no database: pass `.pool(..)` or `.database_url(..)`, or set `database_url`",
            )),
        }
    }

    /// How the previous run ended: detected within the timeout, recorded with its
    /// incidents (before the spool is cleared), old history purged, this run marked
    /// running with its heartbeat, crash handlers installed when asked.
    async fn detect(
        &self,
        config: &SanareConfig,
        detector: &CrashDetector,
        store: &CrashStore,
        service: bool,
    ) -> Result<Detected> {
        if !service {
            return Ok(Detected {
                previous_run: PreviousRun::unchecked(),
                purged: 0,
            });
        }
        let cd = &config.crash_detection;
        let previous_run = if cd.enabled {
            detector
                .detect_previous_run_within(cd.detection_timeout)
                .await?
        } else {
            PreviousRun::unchecked()
        };
        // Old history goes before the new crash is recorded, so a crash dated long
        // ago (a service down for weeks) is kept.
        let purged = if cd.history_days > 0 {
            let cutoff = sanare_core::now() - time::Duration::days(i64::from(cd.history_days));
            store.purge_before(cutoff).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "purging old crash history failed; it is retried at the next start");
                0
            })
        } else {
            0
        };
        // Before `mark_running` clears the spool.
        store.record_run(&previous_run).await?;
        detector.mark_running()?;
        detector.start_heartbeat(cd.heartbeat_interval)?;
        if self.crash_handlers {
            detector.install_handlers(HandlerOptions::default())?;
        }
        Ok(Detected {
            previous_run,
            purged,
        })
    }
}

/// Runs every component's migrations, in dependency order.
async fn migrate(pool: &Pool, schema: &SchemaName) -> Result<Vec<MigrationReport>> {
    let mut client = get_conn(pool).await?;
    let mut reports = Vec::new();
    for m in [
        crate::MIGRATIONS,
        sanare_journal::MIGRATIONS,
        sanare_snapshot::MIGRATIONS,
        sanare_integrity::MIGRATIONS,
        sanare_repair::MIGRATIONS,
        sanare_recovery::MIGRATIONS,
        sanare_corruption::MIGRATIONS,
    ] {
        reports.push(m.run(&mut client, schema).await?);
    }
    Ok(reports)
}

fn recovery(
    wired: &Wired,
    store: CrashStore,
    readiness: Option<Arc<dyn ReadinessCheck>>,
    events: &EventBus,
) -> Recovery {
    let mut recovery = Recovery::builder()
        .snapshots(wired.snapshots.clone())
        .journal(Arc::new(wired.journal.clone()))
        .integrity(wired.integrity.clone())
        .corruption(wired.corruption.clone())
        .repair(wired.repair.clone())
        .crash_store(store)
        .events(events.clone());
    if let Some(check) = readiness {
        recovery = recovery.readiness(check);
    }
    recovery.build()
}

/// Time kept back from the checks for what follows them: stopping a check at a
/// chunk boundary, readiness, the recovery's record.
const FINISH_RESERVE: std::time::Duration = std::time::Duration::from_secs(1);

/// The recovery every service start runs: by evidence after a crash (with
/// `auto_recovery`), else the journal replay and the readiness check. The time
/// target counts from the start of `build()` (`started`): it bounds the time to
/// ready, not only the recovery's own part of it.
async fn start_up(
    config: &SanareConfig,
    recovery: &Recovery,
    previous_run: &PreviousRun,
    started: std::time::Instant,
) -> Result<(RecoveryPlan, RecoveryResult)> {
    let (crash, option) = match &previous_run.crash {
        Some(crash) if config.auto_recovery => (Some(crash), RecoveryOption::Auto),
        _ => (None, RecoveryOption::Startup),
    };
    let options = RecoveryOptions::new(option)
        .execute_repairs(config.repair.auto_repair)
        .time_target(
            config
                .recovery
                .time_target
                .saturating_sub(started.elapsed() + FINISH_RESERVE),
        );
    let plan = recovery.plan(crash, options);
    tracing::info!(
        crash = ?crash.map(|c| c.id),
        steps = ?plan.steps,
        "start-up recovery"
    );
    // A detached control is never cancelled, and the plan is never manual: the
    // only errors left are the result's own.
    let result = recovery.recover(&plan, &Control::detached()).await?;
    Ok((plan, result))
}

fn default_instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}
