//! `Sanare::builder()…build()`: the one call a host makes at start-up.

use std::path::PathBuf;
use std::sync::Arc;

use sanare_core::{AlertSink, Error, EventBus, JournalService, Result, SnapshotService};
use sanare_corruption::CorruptionDetector;
use sanare_integrity::{Checksummer, Integrity, IntegrityConfig, Rules};
use sanare_journal::{Journal, JournalBuilder};
use sanare_pg::{MigrationReport, Pool, SchemaName, get_conn};
use sanare_recovery::{
    CrashDetector, CrashStore, HandlerOptions, PreviousRun, ReadinessCheck, Recovery,
    RecoveryOption, RecoveryOptions, RecoveryResult,
};
use sanare_repair::RepairEngine;
use sanare_snapshot::{BlockStore, FsStore, PgStore, Snapshots};
use tokio_util::sync::CancellationToken;

use crate::JobQueue;
use crate::background::{Background, Components, Timing};
use crate::config::{AlertsConfig, Codec, JournalBackend, SanareConfig, StorageConfig};

/// What start-up found and did.
#[derive(Debug)]
#[non_exhaustive]
pub struct StartupReport {
    /// How the previous run ended (with the crash record when it crashed).
    pub previous_run: PreviousRun,
    /// Migrations applied at this start, per component.
    pub migrations: Vec<MigrationReport>,
    /// The automatic recovery run at start-up (`auto_recovery`), when the previous
    /// run crashed: its result, or why it could not run. A failed recovery does not
    /// fail the start; [`Sanare::recovery`]`().readiness()` then reports not ready.
    pub recovery: Option<std::result::Result<RecoveryResult, Error>>,
}

impl StartupReport {
    /// The crash of the previous run, if it crashed.
    pub fn crash(&self) -> Option<&sanare_recovery::CrashRecord> {
        self.previous_run.crash.as_ref()
    }
}

type JournalHook = Box<dyn FnOnce(JournalBuilder) -> JournalBuilder + Send>;

/// Builds a [`Sanare`].
#[must_use]
pub struct SanareBuilder {
    config: SanareConfig,
    pool: Option<Pool>,
    database_url: Option<String>,
    data_dir: Option<PathBuf>,
    crash_handlers: bool,
    events: Option<EventBus>,
    rules: Rules,
    alerts: Option<Arc<dyn AlertSink>>,
    journal_hook: Option<JournalHook>,
    operator: bool,
    background: bool,
    instance: Option<String>,
    timing: Timing,
    boot_id_path: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
    readiness: Option<Arc<dyn ReadinessCheck>>,
    sources: Vec<Arc<dyn sanare_snapshot::StateSource>>,
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

/// sanare, running inside a host: every component, wired.
#[derive(Debug)]
pub struct Sanare {
    config: Arc<SanareConfig>,
    pool: Pool,
    schema: SchemaName,
    events: EventBus,
    detector: CrashDetector,
    crash_store: CrashStore,
    journal: Journal,
    snapshots: Arc<Snapshots>,
    integrity: Arc<Integrity>,
    repair: Arc<RepairEngine>,
    corruption: Arc<CorruptionDetector>,
    recovery: Recovery,
    startup: StartupReport,
    shutdown: CancellationToken,
    operator: bool,
    background: Option<Background>,
    monitor: Option<sanare_corruption::MonitorHandle>,
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
        }
    }
}

impl SanareBuilder {
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
    /// live (overrides `data_dir` of the configuration).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Installs the panic hook and fatal-signal handlers at build (off unless asked).
    pub fn install_crash_handlers(mut self) -> Self {
        self.crash_handlers = true;
        self
    }

    /// The event bus to publish on (a new one by default).
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
    /// the crash check does not run, the service's shutdown marker and crash spool
    /// are left untouched, no crash handlers are installed and no background work
    /// starts.
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

    /// Connects, runs every component's migrations, checks how the previous run
    /// ended (recording its crash), marks this run as running, and wires the
    /// components.
    pub async fn build(self) -> Result<Sanare> {
        let config = self.config;
        config.validate()?;
        let schema = config.schema_name()?;
        let pool = match (
            self.pool,
            self.database_url.or_else(|| config.database_url.clone()),
        ) {
            (Some(pool), _) => pool,
            (None, Some(url)) => sanare_pg::connect_pool(&url, 16)?,
            (None, None) => {
                return Err(Error::config(
                    "database_url",
                    "no database: pass `.pool(..)` or `.database_url(..)`, or set `database_url`",
                ));
            }
        };
        let data_dir = self.data_dir.unwrap_or_else(|| config.data_dir.clone());
        std::fs::create_dir_all(&data_dir).map_err(|e| {
            Error::io(
                format!("creating the data directory {}", data_dir.display()),
                e,
            )
        })?;
        let events = self.events.unwrap_or_default();

        let mut migrations = Vec::new();
        {
            let mut client = get_conn(&pool).await?;
            for m in [
                crate::MIGRATIONS,
                sanare_journal::MIGRATIONS,
                sanare_snapshot::MIGRATIONS,
                sanare_integrity::MIGRATIONS,
                sanare_repair::MIGRATIONS,
                sanare_recovery::MIGRATIONS,
                sanare_corruption::MIGRATIONS,
            ] {
                migrations.push(m.run(&mut client, &schema).await?);
            }
        }

        let mut detector = CrashDetector::builder()
            .data_dir(data_dir.join("recovery"))
            .version(env!("CARGO_PKG_VERSION"))
            .events(events.clone());
        if let Some(path) = self.boot_id_path {
            detector = detector.boot_id_path(path);
        }
        if let Some(path) = self.cgroup_root {
            detector = detector.cgroup_root(path);
        }
        let detector = detector.build()?;
        let crash_store = CrashStore::new(pool.clone(), schema.clone());
        let service = !self.operator;
        let previous_run = if service && config.crash_detection.enabled {
            let previous_run = detector.detect_previous_run()?;
            if let Some(crash) = &previous_run.crash {
                // Persist before `mark_running` clears the spool.
                crash_store.record(crash).await?;
            }
            detector.mark_running()?;
            previous_run
        } else {
            PreviousRun::unchecked()
        };
        if service && self.crash_handlers {
            detector.install_handlers(HandlerOptions::default())?;
        }

        let journal_builder = |read_only: bool| {
            match config.journal.backend {
                JournalBackend::Wal => Journal::wal(data_dir.join("journal")),
                JournalBackend::Postgres => Journal::postgres(pool.clone(), schema.clone()),
            }
            .handler_database(pool.clone(), schema.clone())
            .events(events.clone())
            .migrate(false)
            .read_only(read_only)
        };
        let journal = match self.journal_hook {
            Some(hook) => hook(journal_builder(false)).build().await?,
            None => match journal_builder(false).build().await {
                // An operator tool beside the running service, which holds the
                // journal's writer lock: read it without changing it.
                Err(Error::Conflict(why)) if self.operator => {
                    tracing::info!(%why, "the journal is in use; opening it read-only");
                    journal_builder(true).build().await?
                }
                other => other?,
            },
        };
        let journal_service: Arc<dyn JournalService> = Arc::new(journal.clone());

        let store: Arc<dyn BlockStore> = match &config.snapshots.storage {
            StorageConfig::Filesystem { path } => Arc::new(FsStore::new(
                path.clone().unwrap_or_else(|| data_dir.join("snapshots")),
            )?),
            StorageConfig::Postgres => Arc::new(PgStore::new(pool.clone(), &schema)),
            #[cfg(feature = "s3")]
            StorageConfig::S3 {
                bucket,
                prefix,
                endpoint,
                region,
            } => Arc::new(sanare_snapshot::S3Store::from_settings(
                bucket,
                Some(prefix.as_str()).filter(|p| !p.is_empty()),
                endpoint.as_deref(),
                region.as_deref(),
            )?),
            #[cfg(not(feature = "s3"))]
            StorageConfig::S3 { .. } => {
                return Err(Error::config(
                    "snapshots.storage",
                    "S3-compatible storage needs the `s3` feature of the `sanare` crate; enable it, or use `filesystem` or `postgres`",
                ));
            }
        };
        let mut snapshot_config = sanare_snapshot::SnapshotConfig::default();
        snapshot_config.codec = match config.snapshots.codec {
            Codec::Lz4 => sanare_snapshot::Codec::Lz4,
            Codec::Brotli => sanare_snapshot::Codec::Brotli,
            Codec::None => sanare_snapshot::Codec::None,
        };
        snapshot_config.default_schemas = config.snapshots.schemas.clone();
        let mut snapshots = Snapshots::builder()
            .store(store)
            .pool(pool.clone())
            .schema(schema.clone())
            .journal(journal_service.clone())
            .events(events.clone())
            .config(snapshot_config);
        for source in self.sources {
            snapshots = snapshots.source(source);
        }
        let snapshots = Arc::new(snapshots.build()?);
        let snapshot_service: Arc<dyn SnapshotService> = snapshots.clone();

        let mut integrity_config = IntegrityConfig::default();
        integrity_config.chunk_rows = u64::from(config.validation.chunk_size);
        integrity_config.parallelism = usize::from(config.validation.parallelism);
        integrity_config.duty_cycle = config.validation.duty_cycle;
        integrity_config.chunk_timeout = config.validation.chunk_timeout;
        integrity_config.report_dir = data_dir.join("reports");
        let rules = match &config.validation.rules_file {
            Some(path) => Rules::from_toml_file(path)?,
            None => self.rules,
        };
        let integrity = Arc::new(
            Integrity::builder()
                .pool(pool.clone())
                .schema(schema.clone())
                .rules(rules)
                .events(events.clone())
                .config(integrity_config)
                .build()?,
        );

        let mut repair_config = sanare_repair::RepairConfig::default();
        repair_config.approval_severity = Some(config.repair.approval_threshold);
        repair_config.approval_max_rows = config.repair.max_rows_without_approval;
        repair_config.removals_need_approval = config.repair.removals_need_approval;
        repair_config.statement_timeout = config.repair.max_duration;
        let repair = Arc::new(
            RepairEngine::builder()
                .pool(pool.clone())
                .schema(schema.clone())
                .snapshots(snapshot_service.clone())
                .journal(journal_service.clone())
                .events(events.clone())
                .config(repair_config)
                .build()?,
        );

        let mut corruption = CorruptionDetector::builder()
            .pool(pool.clone())
            .schema(schema.clone())
            .checksum(Arc::new(Checksummer::sha256()))
            .snapshots(snapshot_service.clone())
            .journal(journal_service.clone())
            .events(events.clone());
        if let Some(alerts) = self.alerts.or(alert_sinks(&config.corruption.alerts)?)
            && config.corruption.alert_on_detection
        {
            corruption = corruption.alerts(alerts);
        }
        let corruption = Arc::new(corruption.build()?);

        let mut recovery = Recovery::builder()
            .snapshots(snapshot_service)
            .journal(journal_service)
            .integrity(integrity.clone())
            .repair(repair.clone())
            .crash_store(crash_store.clone())
            .events(events.clone());
        if let Some(check) = self.readiness {
            recovery = recovery.readiness(check);
        }
        let recovery = recovery.build();

        let recovery_outcome = match &previous_run.crash {
            Some(crash) if service && config.auto_recovery => {
                let plan = recovery.plan(Some(crash), RecoveryOptions::new(RecoveryOption::Auto));
                tracing::info!(crash = %crash.id, kind = crash.kind.as_str(), steps = ?plan.steps, "recovering automatically");
                Some(
                    recovery
                        .recover(&plan, &sanare_core::Control::detached())
                        .await,
                )
            }
            _ => None,
        };

        let shutdown = CancellationToken::new();
        let monitor = if service && config.corruption.real_time {
            Some(corruption.start_monitor(Vec::new()).await?)
        } else {
            None
        };
        let config = Arc::new(config);
        let background = (service && self.background).then(|| {
            let instance = self.instance.unwrap_or_else(default_instance_name);
            Background::start(
                Components {
                    config: config.clone(),
                    pool: pool.clone(),
                    schema: schema.clone(),
                    journal: journal.clone(),
                    snapshots: snapshots.clone(),
                    integrity: integrity.clone(),
                    repair: repair.clone(),
                    corruption: corruption.clone(),
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
            journal,
            snapshots,
            integrity,
            repair,
            corruption,
            recovery,
            startup: StartupReport {
                previous_run,
                migrations,
                recovery: recovery_outcome,
            },
            shutdown,
            operator: self.operator,
            background,
            monitor,
        })
    }
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
            .as_ref()
            .map(Background::status)
            .unwrap_or_default()
    }

    /// A token cancelled at shutdown, for the host's own long work.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Shuts down cleanly: cancels running work, waits for the background tasks
    /// and the real-time monitor to stop, and clears the shutdown marker, so the
    /// next start knows this run ended cleanly.
    pub async fn shutdown(mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(background) = self.background.take() {
            background.join().await;
        }
        if let Some(monitor) = self.monitor.take() {
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
    /// of the journal), but the shutdown marker stays, so the next start sees an
    /// unclean end.
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(background) = &self.background {
            background.abort();
        }
    }
}

fn default_instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// The alert sinks named by the configuration, behind one dispatcher (batching,
/// rate limits, retries, never blocking detection); `None` when none is configured.
fn alert_sinks(config: &AlertsConfig) -> Result<Option<Arc<dyn AlertSink>>> {
    use sanare_corruption::{
        AlertDispatcher, EmailSink, PagerDutySink, Route, SlackSink, WebhookSink,
    };
    let min = config.min_severity.unwrap_or(sanare_core::Severity::Low);
    let mut routes = Vec::new();
    if let Some(url) = &config.webhook_url {
        let secret = config.webhook_secret.as_deref().ok_or_else(|| {
            Error::config(
                "corruption.alerts.webhook_secret",
                "a webhook URL needs its signing secret (`whsec_…`)",
            )
        })?;
        routes.push(Route::new(Arc::new(WebhookSink::new(url.clone(), secret)?)));
    }
    if let Some(url) = &config.slack_webhook_url {
        routes.push(Route::new(Arc::new(SlackSink::new(url.clone())?)));
    }
    if let Some(key) = &config.pagerduty_routing_key {
        // PagerDuty keys incidents by dedup key: never merge alerts.
        routes.push(Route::new(Arc::new(PagerDutySink::new(key.clone())?)).batch(false));
    }
    if let Some(smtp) = &config.smtp_url {
        let (host, port) = parse_smtp_url(smtp)?;
        let from = config.email_from.as_deref().ok_or_else(|| {
            Error::config(
                "corruption.alerts.email_from",
                "an SMTP server needs a sender address",
            )
        })?;
        if config.email_to.is_empty() {
            return Err(Error::config(
                "corruption.alerts.email_to",
                "an SMTP server needs at least one recipient",
            ));
        }
        let to: Vec<&str> = config.email_to.iter().map(String::as_str).collect();
        routes.push(Route::new(Arc::new(EmailSink::new(
            &host, port, from, &to,
        )?)));
    }
    if routes.is_empty() {
        return Ok(None);
    }
    let mut dispatcher = AlertDispatcher::builder();
    for route in routes {
        dispatcher = dispatcher.route(route.min_severity(min));
    }
    Ok(Some(Arc::new(dispatcher.build())))
}

fn parse_smtp_url(url: &str) -> Result<(String, u16)> {
    let bad = || {
        Error::config(
            "corruption.alerts.smtp_url",
            format!("`{url}` is not `smtp://host[:port]`"),
        )
    };
    let rest = url.strip_prefix("smtp://").ok_or_else(bad)?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => {
            Ok((host.to_owned(), port.parse().map_err(|_| bad())?))
        }
        None if !rest.is_empty() => Ok((rest.to_owned(), 25)),
        _ => Err(bad()),
    }
}
