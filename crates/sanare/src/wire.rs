//! Wiring the components of a [`Sanare`](crate::Sanare) from the configuration.

use std::path::Path;
use std::sync::Arc;

use sanare_core::{AlertSink, Error, EventBus, JournalService, Result, SnapshotService};
use sanare_corruption::CorruptionDetector;
use sanare_integrity::{Checksummer, Integrity, IntegrityConfig, Rules};
use sanare_journal::Journal;
use sanare_pg::{Pool, SchemaName};
use sanare_repair::RepairEngine;
use sanare_snapshot::{BlockStore, FsStore, PgStore, Snapshots};

use crate::builder::SanareBuilder;
use crate::config::{AlertsConfig, JournalBackend, SanareConfig, StorageConfig};

/// The components, wired.
pub(crate) struct Wired {
    pub(crate) journal: Journal,
    pub(crate) snapshots: Arc<Snapshots>,
    pub(crate) integrity: Arc<Integrity>,
    pub(crate) repair: Arc<RepairEngine>,
    pub(crate) corruption: Arc<CorruptionDetector>,
}

/// What every component is built from.
pub(crate) struct Env<'a> {
    pub(crate) config: &'a SanareConfig,
    pub(crate) pool: &'a Pool,
    pub(crate) schema: &'a SchemaName,
    pub(crate) data_dir: &'a Path,
    pub(crate) events: &'a EventBus,
}

/// The services other components reach each other through.
struct Shared {
    journal: Arc<dyn JournalService>,
    snapshots: Arc<dyn SnapshotService>,
}

/// Builds every component (taking the builder's hooks, sources, rules and alerts).
pub(crate) async fn wire(b: &mut SanareBuilder, env: &Env<'_>) -> Result<Wired> {
    let journal = journal(b, env).await?;
    let journal_service: Arc<dyn JournalService> = Arc::new(journal.clone());
    let snapshots = snapshots(b, env, &journal_service)?;
    let shared = Shared {
        journal: journal_service,
        snapshots: snapshots.clone(),
    };
    let rules = match &env.config.validation.rules_file {
        Some(path) => Rules::from_toml_file(path)?,
        None => std::mem::take(&mut b.rules),
    };
    Ok(Wired {
        repair: repair(env, &shared, &rules)?,
        integrity: integrity(b, env, rules)?,
        corruption: corruption(b, env, &shared)?,
        journal,
        snapshots,
    })
}

async fn journal(b: &mut SanareBuilder, env: &Env<'_>) -> Result<Journal> {
    let Env {
        config,
        pool,
        schema,
        data_dir,
        events,
    } = *env;
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
    let journal = match b.journal_hook.take() {
        Some(hook) => hook(journal_builder(false)).build().await?,
        None => match journal_builder(false).build().await {
            // An operator tool beside the running service, which holds the
            // journal's writer lock: read it without changing it.
            Err(Error::Conflict(why)) if b.operator => {
                tracing::info!(%why, "the journal is in use; opening it read-only");
                journal_builder(true).build().await?
            }
            other => other?,
        },
    };
    Ok(journal)
}

fn snapshots(
    b: &mut SanareBuilder,
    env: &Env<'_>,
    journal_service: &Arc<dyn JournalService>,
) -> Result<Arc<Snapshots>> {
    let Env {
        config,
        pool,
        schema,
        data_dir,
        events,
    } = *env;
    let store = config.snapshot_store(data_dir, Some(pool))?;
    let key = config.snapshot_key(data_dir, true)?;
    let mut snapshots = Snapshots::builder()
        .store(store)
        .new_repository(config.snapshots.new_repository)
        .pool(pool.clone())
        .schema(schema.clone())
        .journal(journal_service.clone())
        .events(events.clone())
        .config(snapshot_config(config));
    if let Some(key) = key {
        snapshots = snapshots.key(key);
    }
    for source in std::mem::take(&mut b.sources) {
        snapshots = snapshots.source(source);
    }
    let snapshots = Arc::new(snapshots.build()?);

    Ok(snapshots)
}

fn integrity(b: &SanareBuilder, env: &Env<'_>, rules: Rules) -> Result<Arc<Integrity>> {
    let Env {
        config,
        pool,
        schema,
        data_dir,
        events,
    } = *env;
    let mut integrity = Integrity::builder()
        .pool(pool.clone())
        .schema(schema.clone())
        .rules(rules)
        .events(events.clone())
        .config(integrity_config(config, data_dir));
    if let Some(key) = b.checksum_key {
        integrity = integrity.checksum_key(key);
    }
    let integrity = Arc::new(integrity.build()?);

    Ok(integrity)
}

/// The repair engine; the business rules that name a recompute column and its
/// expression become its recompute rules (so a violation of one is repaired by
/// setting the column, by the rule's name, from this trusted configuration).
fn repair(env: &Env<'_>, shared: &Shared, rules: &Rules) -> Result<Arc<RepairEngine>> {
    let Env {
        config,
        pool,
        schema,
        events,
        ..
    } = *env;
    let (snapshot_service, journal_service) = (&shared.snapshots, &shared.journal);
    let mut repair = RepairEngine::builder()
        .pool(pool.clone())
        .schema(schema.clone())
        .snapshots(snapshot_service.clone())
        .journal(journal_service.clone())
        .events(events.clone())
        .config(repair_config(config));
    for rule in &rules.consistency {
        if let (Some(column), Some(expression)) = (&rule.recompute, &rule.recompute_expression) {
            repair = repair.recompute_rule(&rule.name, rule.table_ref()?, column, expression);
        }
    }
    let repair = Arc::new(repair.build()?);

    Ok(repair)
}

/// The snapshot component's settings from `[snapshots]`.
fn snapshot_config(config: &SanareConfig) -> sanare_snapshot::SnapshotConfig {
    let mut c = sanare_snapshot::SnapshotConfig::default();
    c.codec = config.snapshots.codec;
    c.default_schemas = config.snapshots.schemas.clone();
    c
}

/// The integrity component's settings from `[validation]`.
fn integrity_config(config: &SanareConfig, data_dir: &Path) -> IntegrityConfig {
    let mut c = IntegrityConfig::default();
    c.chunk_rows = u64::from(config.validation.chunk_size);
    c.parallelism = usize::from(config.validation.parallelism);
    c.duty_cycle = config.validation.duty_cycle;
    c.chunk_timeout = config.validation.chunk_timeout;
    c.report_dir = data_dir.join("reports");
    c.families = config.validation.families();
    c
}

/// The repair engine's settings from `[repair]`.
fn repair_config(config: &SanareConfig) -> sanare_repair::RepairConfig {
    let mut c = sanare_repair::RepairConfig::default();
    c.approval_severity = Some(config.repair.approval_threshold);
    c.approval_max_rows = config.repair.max_rows_without_approval;
    c.removals_need_approval = config.repair.removals_need_approval;
    c.statement_timeout = config.repair.max_duration;
    c
}

fn corruption(
    b: &mut SanareBuilder,
    env: &Env<'_>,
    shared: &Shared,
) -> Result<Arc<CorruptionDetector>> {
    let Env {
        config,
        pool,
        schema,
        events,
        ..
    } = *env;
    let (snapshot_service, journal_service) = (&shared.snapshots, &shared.journal);
    let checksum = Checksummer::for_algorithm(config.corruption.checksum_algorithm, b.checksum_key)
        .map_err(|_| {
            Error::config(
                "corruption.checksum_algorithm",
                "blake3_keyed needs the key: pass it with SanareBuilder::checksum_key",
            )
        })?;
    let mut corruption = CorruptionDetector::builder()
        .pool(pool.clone())
        .schema(schema.clone())
        .checksum(Arc::new(checksum))
        .config(config.corruption.detector_config())
        .snapshots(snapshot_service.clone())
        .journal(journal_service.clone())
        .events(events.clone());
    if let Some(alerts) = detection_alerts(config, b.alerts.take())? {
        corruption = corruption.alerts(alerts);
    }
    let corruption = Arc::new(corruption.build()?);

    Ok(corruption)
}

/// Where the detector's alerts go: the host's sink, else the configured ones;
/// none when `corruption.alert_on_detection` is off.
fn detection_alerts(
    config: &SanareConfig,
    host: Option<Arc<dyn AlertSink>>,
) -> Result<Option<Arc<dyn AlertSink>>> {
    let sinks = match host {
        Some(sink) => Some(sink),
        None => alert_sinks(&config.corruption.alerts)?,
    };
    Ok(sinks.filter(|_| config.corruption.alert_on_detection))
}

/// The alert sinks named by the configuration, behind one dispatcher (batching,
/// rate limits, retries, never blocking detection); `None` when none is configured.
fn alert_sinks(config: &AlertsConfig) -> Result<Option<Arc<dyn AlertSink>>> {
    Ok(dispatcher(alert_routes(config)?, config))
}

/// `routes` behind one dispatcher, each taking alerts at or above
/// `corruption.alerts.min_severity`; `None` without routes.
fn dispatcher(
    routes: Vec<sanare_corruption::Route>,
    config: &AlertsConfig,
) -> Option<Arc<dyn AlertSink>> {
    if routes.is_empty() {
        return None;
    }
    let min = config.min_severity.unwrap_or(sanare_core::Severity::Low);
    let mut dispatcher = sanare_corruption::AlertDispatcher::builder();
    for route in routes {
        dispatcher = dispatcher.route(route.min_severity(min));
    }
    Some(Arc::new(dispatcher.build()))
}

/// A route for each sink the configuration names.
fn alert_routes(config: &AlertsConfig) -> Result<Vec<sanare_corruption::Route>> {
    use sanare_corruption::{EmailSink, PagerDutySink, Route, SlackSink, WebhookSink};
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
    Ok(routes)
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

impl SanareConfig {
    /// The snapshot block store `snapshots.storage` names (the filesystem store
    /// defaults to `<data_dir>/snapshots`; the PostgreSQL store needs `pool`).
    pub fn snapshot_store(
        &self,
        data_dir: &std::path::Path,
        pool: Option<&Pool>,
    ) -> Result<Arc<dyn BlockStore>> {
        Ok(match &self.snapshots.storage {
            StorageConfig::Filesystem { path } => Arc::new(FsStore::new(
                path.clone().unwrap_or_else(|| data_dir.join("snapshots")),
            )?),
            StorageConfig::Postgres => match pool {
                Some(pool) => Arc::new(PgStore::new(pool.clone(), &self.schema_name()?)),
                None => {
                    return Err(Error::config(
                        "snapshots.storage",
                        "the postgres store keeps its blocks in the database: it needs a database connection",
                    ));
                }
            },
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
        })
    }

    /// The key that signs snapshot manifests: the file `snapshots.key_file`
    /// (default `<data_dir>/snapshot.key`), made when missing if `create`
    /// (otherwise `None` when there is none).
    pub fn snapshot_key(
        &self,
        data_dir: &std::path::Path,
        create: bool,
    ) -> Result<Option<sanare_snapshot::RepositoryKey>> {
        let path = self
            .snapshots
            .key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("snapshot.key"));
        if create {
            sanare_snapshot::RepositoryKey::load_or_create(&path).map(Some)
        } else if path.exists() {
            sanare_snapshot::RepositoryKey::load(&path).map(Some)
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sanare_core::{CheckFamily, Severity};

    use super::*;

    fn from(text: &str) -> SanareConfig {
        SanareConfig::from_toml_str(text, "test").unwrap()
    }

    /// Each key reaches the component that honours it: set to a value other
    /// than the component's default, it must come out in the component's config.
    #[test]
    fn snapshot_keys_reach_the_snapshot_component() {
        for (name, codec) in [
            ("none", sanare_snapshot::Codec::None),
            ("brotli", sanare_snapshot::Codec::Brotli),
            ("lz4", sanare_snapshot::Codec::Lz4),
        ] {
            let c = from(&format!("[snapshots]\ncodec = \"{name}\""));
            assert_eq!(snapshot_config(&c).codec, codec, "{name}");
        }
        let err = SanareConfig::from_toml_str("[snapshots]\ncodec = \"zstd\"", "f").unwrap_err();
        assert!(err.to_string().contains("snapshots.codec"), "{err}");
        let c = from("[snapshots]\nschemas = [\"shop\", \"billing\"]");
        assert_eq!(snapshot_config(&c).default_schemas, ["shop", "billing"]);
    }

    #[test]
    fn validation_keys_reach_the_integrity_component() {
        let c = from(
            "[validation]\nchunk_size = 77\nchunk_timeout = \"7s\"\nparallelism = 5\n\
             duty_cycle = 0.5\nchecksum = false\nconsistency = false",
        );
        let i = integrity_config(&c, Path::new("/data"));
        assert_eq!(i.chunk_rows, 77);
        assert_eq!(i.chunk_timeout, Duration::from_secs(7));
        assert_eq!(i.parallelism, 5);
        assert!((i.duty_cycle - 0.5).abs() < f64::EPSILON);
        assert_eq!(i.families, [CheckFamily::Schema, CheckFamily::Referential]);
        assert_eq!(i.report_dir, Path::new("/data/reports"));
    }

    #[tokio::test]
    async fn alert_keys_make_their_sinks_or_name_what_is_missing() {
        assert!(
            alert_sinks(&SanareConfig::default().corruption.alerts)
                .unwrap()
                .is_none()
        );
        for key in [
            "slack_webhook_url = \"https://hooks.slack.test/x\"",
            "pagerduty_routing_key = \"r0ut1ng\"",
            "webhook_url = \"https://hooks.test/x\"\nwebhook_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"",
            "smtp_url = \"smtp://mail.test:2525\"\nemail_from = \"s@x.test\"\nemail_to = [\"o@x.test\"]",
        ] {
            let c = from(&format!("[corruption.alerts]\n{key}"));
            assert!(
                alert_sinks(&c.corruption.alerts).unwrap().is_some(),
                "{key}"
            );
        }
        for (key, missing) in [
            (
                "webhook_url = \"https://hooks.test/x\"",
                "corruption.alerts.webhook_secret",
            ),
            (
                "smtp_url = \"smtp://mail.test\"\nemail_to = [\"o@x.test\"]",
                "corruption.alerts.email_from",
            ),
            (
                "smtp_url = \"smtp://mail.test\"\nemail_from = \"s@x.test\"",
                "corruption.alerts.email_to",
            ),
            ("smtp_url = \"mail.test\"", "corruption.alerts.smtp_url"),
        ] {
            let c = from(&format!("[corruption.alerts]\n{key}"));
            let err = alert_sinks(&c.corruption.alerts)
                .err()
                .map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains(missing)),
                "{key}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn alert_on_detection_off_sends_no_alert_anywhere() {
        struct Host;
        #[async_trait::async_trait]
        impl AlertSink for Host {
            fn name(&self) -> &str {
                "host"
            }
            async fn send(&self, _: &sanare_core::Alert) -> Result<()> {
                Ok(())
            }
        }
        let slack = "[corruption.alerts]\nslack_webhook_url = \"https://hooks.slack.test/x\"";
        for (text, host, sends) in [
            (slack.to_owned(), false, true),
            (
                format!("{slack}\n[corruption]\nalert_on_detection = false"),
                false,
                false,
            ),
            (
                "[corruption]\nalert_on_detection = false".to_owned(),
                true,
                false,
            ),
            (String::new(), true, true),
        ] {
            let host = host.then(|| Arc::new(Host) as Arc<dyn AlertSink>);
            let alerts = detection_alerts(&from(&text), host).unwrap();
            assert_eq!(alerts.is_some(), sends, "{text}");
        }
    }

    /// `corruption.alerts.min_severity` holds back what is below it from every
    /// configured sink; unset, every severity goes out.
    #[tokio::test]
    async fn alerts_below_min_severity_reach_no_sink() {
        #[derive(Default)]
        struct Recording(std::sync::Mutex<Vec<Severity>>);
        #[async_trait::async_trait]
        impl AlertSink for Recording {
            fn name(&self) -> &str {
                "recording"
            }
            async fn send(&self, alert: &sanare_core::Alert) -> Result<()> {
                self.0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(alert.severity);
                Ok(())
            }
        }
        for (text, want) in [
            (
                "[corruption.alerts]\nmin_severity = \"high\"",
                vec![Severity::High, Severity::Critical],
            ),
            ("", vec![Severity::Low, Severity::High, Severity::Critical]),
        ] {
            let sink = Arc::new(Recording::default());
            let route = sanare_corruption::Route::new(sink.clone()).batch(false);
            let alerts = dispatcher(vec![route], &from(text).corruption.alerts).unwrap();
            for severity in [Severity::Low, Severity::High, Severity::Critical] {
                let alert = sanare_core::Alert::new(severity, "test", "k", "t", "s");
                alerts.send(&alert).await.unwrap();
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while sink.0.lock().unwrap().len() < want.len() && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Whatever was held back would have arrived by now.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut got = sink.0.lock().unwrap().clone();
            got.sort();
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn repair_keys_reach_the_repair_engine() {
        let c = from(
            "[repair]\napproval_threshold = \"critical\"\nmax_rows_without_approval = 12\n\
             removals_need_approval = false\nmax_duration = \"9s\"",
        );
        let r = repair_config(&c);
        assert_eq!(r.approval_severity, Some(Severity::Critical));
        assert_eq!(r.approval_max_rows, 12);
        assert!(!r.removals_need_approval);
        assert_eq!(r.statement_timeout, Duration::from_secs(9));
        let d = repair_config(&SanareConfig::default());
        assert!(d.removals_need_approval);
    }
}
