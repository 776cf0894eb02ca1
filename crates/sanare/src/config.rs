//! sanare's configuration: one struct, read from TOML and `SANARE__…` environment
//! variables, every unknown key and bad value rejected by name.
//!
//! ```toml
//! schema = "sanare"
//! data_dir = "/var/lib/orders/sanare"
//! auto_recovery = true
//!
//! [snapshots]
//! interval = "30m"
//! keep_last = 10
//!
//! [corruption]
//! scan_interval = "1h"
//! ```
//!
//! Environment variables override the file: `SANARE__SNAPSHOTS__INTERVAL=15m` sets
//! `snapshots.interval` (sections and keys joined by `__`, case-insensitive). Values
//! are read as TOML when they parse as TOML (`true`, `8`, `["slack"]`) and as strings
//! otherwise.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sanare_core::{CheckFamily, Error, Result, Severity};
use serde::{Deserialize, Serialize};

/// The whole configuration (the spec's §19 settings, in Rust shape).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SanareConfig {
    /// The schema of sanare's own tables.
    pub schema: String,
    /// Where the embedded journal, snapshot blocks, crash spool and shutdown marker live.
    pub data_dir: PathBuf,
    /// A connection string, when the host does not hand over a pool.
    pub database_url: Option<String>,
    /// Recover automatically at start-up after a crash (by evidence: replay,
    /// validate and scan, repair what they find). Off: a start after a crash only
    /// replays the journal, as every start does.
    pub auto_recovery: bool,
    /// Crash detection.
    pub crash_detection: CrashDetectionConfig,
    /// Recovery.
    pub recovery: RecoveryConfig,
    /// Integrity validation.
    pub validation: ValidationConfig,
    /// Automatic repair.
    pub repair: RepairConfig,
    /// Snapshots.
    pub snapshots: SnapshotConfig,
    /// The transaction journal.
    pub journal: JournalConfig,
    /// Corruption detection.
    pub corruption: CorruptionConfig,
    /// Supervision of background work: leases, heartbeats, restarts.
    pub background: BackgroundConfig,
}

impl Default for SanareConfig {
    fn default() -> Self {
        Self {
            schema: "sanare".into(),
            data_dir: PathBuf::from("sanare-data"),
            database_url: None,
            auto_recovery: true,
            crash_detection: CrashDetectionConfig::default(),
            recovery: RecoveryConfig::default(),
            validation: ValidationConfig::default(),
            repair: RepairConfig::default(),
            snapshots: SnapshotConfig::default(),
            journal: JournalConfig::default(),
            corruption: CorruptionConfig::default(),
            background: BackgroundConfig::default(),
        }
    }
}

/// Crash detection settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CrashDetectionConfig {
    /// Check how the previous run ended at start-up.
    pub enabled: bool,
    /// Longest time the start-up check (reading the marker, the spool, the boot id
    /// and the cgroup) may take; past it, `build()` fails with an error naming this
    /// key rather than hang on a disk that stopped answering.
    #[serde(with = "humantime_serde")]
    pub detection_timeout: Duration,
    /// Crash records, incidents and recovery records older than this many days are
    /// purged at start-up (`0`: kept forever).
    pub history_days: u32,
    /// How often the running service writes its heartbeat into the shutdown
    /// marker: the next start dates a kill or a power loss to within this.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

impl Default for CrashDetectionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            detection_timeout: Duration::from_secs(2),
            history_days: 30,
            heartbeat_interval: Duration::from_secs(5),
        }
    }
}

/// Recovery settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RecoveryConfig {
    /// The recovery time target, counted from the start of `build()`: the start-up
    /// recovery's validation and corruption scan stop once the start has taken this
    /// long, and name what they did not reach (the scheduled checks cover it).
    /// Journal replay and repairs always finish.
    #[serde(with = "humantime_serde")]
    pub time_target: Duration,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            time_target: Duration::from_secs(30),
        }
    }
}

/// Integrity validation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ValidationConfig {
    /// Run schema checks (NOT NULL, CHECK, types, unique keys, declared column
    /// rules). Off: no validation checks them, scheduled or on demand.
    pub schema: bool,
    /// Run referential checks (foreign keys and declared relationships).
    pub referential: bool,
    /// Run checksum checks (declared checksum columns).
    pub checksum: bool,
    /// Run consistency checks (declared business rules).
    pub consistency: bool,
    /// Rows per chunk.
    pub chunk_size: u32,
    /// Longest time one chunk may take (`statement_timeout`).
    #[serde(with = "humantime_serde")]
    pub chunk_timeout: Duration,
    /// Parallel workers.
    pub parallelism: u16,
    /// The share of wall time each worker may spend checking, in `(0, 1]` (1: no
    /// pause); below 1 a worker pauses after each chunk, leaving CPU to the host.
    pub duty_cycle: f64,
    /// Run a scheduled validation this often (never when unset).
    #[serde(with = "humantime_serde::option")]
    pub interval: Option<Duration>,
    /// A TOML file of declared rules.
    pub rules_file: Option<PathBuf>,
}

impl ValidationConfig {
    /// The check families turned on by `schema`, `referential`, `checksum` and
    /// `consistency`.
    pub fn families(&self) -> Vec<CheckFamily> {
        [
            (self.schema, CheckFamily::Schema),
            (self.referential, CheckFamily::Referential),
            (self.checksum, CheckFamily::Checksum),
            (self.consistency, CheckFamily::Consistency),
        ]
        .into_iter()
        .filter_map(|(on, f)| on.then_some(f))
        .collect()
    }
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            schema: true,
            referential: true,
            checksum: true,
            consistency: true,
            chunk_size: 10_000,
            chunk_timeout: Duration::from_secs(60),
            parallelism: 2,
            duty_cycle: 1.0,
            interval: None,
            rules_file: None,
        }
    }
}

/// Automatic repair settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RepairConfig {
    /// Repair what validation and scans find, by policy, without an operator.
    pub auto_repair: bool,
    /// Repairs at or above this severity wait for an approval.
    pub approval_threshold: Severity,
    /// Repairs touching more rows than this wait for an approval.
    pub max_rows_without_approval: u64,
    /// Repairs that remove rows (to the quarantine) wait for an approval whatever
    /// their severity and size.
    pub removals_need_approval: bool,
    /// Longest time one repair may run.
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    /// Dry-run every repair before running it.
    pub dry_run_first: bool,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            auto_repair: false,
            approval_threshold: Severity::High,
            max_rows_without_approval: 1_000,
            removals_need_approval: true,
            max_duration: Duration::from_secs(120),
            dry_run_first: true,
        }
    }
}

/// Where snapshot blocks are stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields, tag = "kind")]
#[non_exhaustive]
pub enum StorageConfig {
    /// Files under a folder (default: `<data_dir>/snapshots`).
    Filesystem {
        /// The folder.
        path: Option<PathBuf>,
    },
    /// A table in sanare's schema.
    Postgres,
    /// An S3-compatible bucket.
    S3 {
        /// The bucket.
        bucket: String,
        /// A key prefix.
        #[serde(default)]
        prefix: String,
        /// The endpoint, for non-AWS stores.
        endpoint: Option<String>,
        /// The region.
        region: Option<String>,
    },
}

/// Block compression: the snapshot crate's own type (`lz4`, `brotli`, `none`).
pub use sanare_snapshot::Codec;

/// Snapshot settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SnapshotConfig {
    /// Take a scheduled snapshot this often (never when unset).
    #[serde(with = "humantime_serde::option")]
    pub interval: Option<Duration>,
    /// The codec of new blocks. Every snapshot is incremental: blocks are
    /// content-addressed, so a capture stores only blocks no snapshot holds yet.
    pub codec: Codec,
    /// Keep at least the newest N snapshots.
    pub keep_last: u32,
    /// Keep every snapshot younger than this many days.
    pub keep_days: u32,
    /// Where blocks go.
    pub storage: StorageConfig,
    /// Only these schemas are captured (all host schemas when empty).
    pub schemas: Vec<String>,
    /// The file holding the key that signs manifests, so a restore from the
    /// store alone can trust them (default `<data_dir>/snapshot.key`, created when
    /// missing). Keep a copy away from the data directory and the store.
    pub key_file: Option<PathBuf>,
    /// Start a new snapshot repository in a store that holds none even though
    /// this database's catalog expects another (moving to a new store on purpose).
    pub new_repository: bool,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            interval: Some(Duration::from_secs(30 * 60)),
            codec: Codec::Lz4,
            keep_last: 10,
            keep_days: 7,
            storage: StorageConfig::Filesystem { path: None },
            schemas: Vec::new(),
            key_file: None,
            new_repository: false,
        }
    }
}

/// Which journal backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum JournalBackend {
    /// Segment files under `<data_dir>/journal` (the default).
    Wal,
    /// A table in sanare's schema, written inside the host's transactions.
    Postgres,
}

/// Journal settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct JournalConfig {
    /// Which backend. (There is no switch to turn the journal off: every start
    /// replays it, and snapshots, repairs and point-in-time restores read it.)
    pub backend: JournalBackend,
    /// Compact sealed data this often, and purge what `retention_days` allows
    /// (never when unset).
    #[serde(with = "humantime_serde::option")]
    pub compaction_interval: Option<Duration>,
    /// Purge entries older than this many days (and covered by a snapshot).
    pub retention_days: u32,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            backend: JournalBackend::Wal,
            compaction_interval: Some(Duration::from_secs(24 * 3600)),
            retention_days: 90,
        }
    }
}

/// Alert channels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AlertsConfig {
    /// Alerts below this severity are not sent.
    pub min_severity: Option<Severity>,
    /// A generic webhook URL (signed per Standard Webhooks).
    pub webhook_url: Option<String>,
    /// The webhook signing secret (`whsec_…`).
    pub webhook_secret: Option<String>,
    /// A Slack incoming-webhook URL.
    pub slack_webhook_url: Option<String>,
    /// A PagerDuty Events API v2 routing key.
    pub pagerduty_routing_key: Option<String>,
    /// SMTP server URL (`smtp://host:25`).
    pub smtp_url: Option<String>,
    /// Sender address.
    pub email_from: Option<String>,
    /// Recipient addresses.
    pub email_to: Vec<String>,
}

/// Corruption detection settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CorruptionConfig {
    /// Run periodic scans.
    pub monitoring: bool,
    /// Scan this often.
    #[serde(with = "humantime_serde::option")]
    pub scan_interval: Option<Duration>,
    /// Re-verify rows soon after they change.
    pub real_time: bool,
    /// Send alerts when corruption is found.
    pub alert_on_detection: bool,
    /// Where alerts go.
    pub alerts: AlertsConfig,
    /// The algorithm of the row checksums scans verify: `sha256` (what
    /// `install_checksum_trigger` maintains, the default), `blake3`, or
    /// `blake3_keyed` (with `SanareBuilder::checksum_key`).
    pub checksum_algorithm: sanare_integrity::ChecksumAlgorithm,
    /// The `bytea` column holding each row's checksum.
    pub checksum_column: String,
    /// Rows of one table a scan keeps as suspects; past it the table is one
    /// "table-wide mismatch" finding (probably configuration), never repaired.
    pub max_suspects_per_table: u64,
    /// Relations checked at once by physical checks (connections used).
    pub physical_jobs: u16,
}

impl Default for CorruptionConfig {
    fn default() -> Self {
        let detector = sanare_corruption::DetectorConfig::default();
        Self {
            monitoring: true,
            scan_interval: Some(Duration::from_secs(3600)),
            real_time: false,
            alert_on_detection: true,
            alerts: AlertsConfig::default(),
            checksum_algorithm: sanare_integrity::ChecksumAlgorithm::Sha256,
            checksum_column: detector.checksum_column,
            max_suspects_per_table: detector.max_suspects_per_table,
            physical_jobs: u16::try_from(detector.physical_jobs).unwrap_or(u16::MAX),
        }
    }
}

impl CorruptionConfig {
    /// The detector's tunables from this configuration (the rest at their
    /// defaults).
    pub fn detector_config(&self) -> sanare_corruption::DetectorConfig {
        let mut c = sanare_corruption::DetectorConfig::default();
        c.checksum_column = self.checksum_column.clone();
        c.max_suspects_per_table = self.max_suspects_per_table;
        c.physical_jobs = usize::from(self.physical_jobs);
        c
    }
}

/// The prefix of environment variables read by [`SanareConfig::from_env`].
pub const ENV_PREFIX: &str = "SANARE__";

impl SanareConfig {
    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        let value: toml::Value = toml::from_str(text).map_err(|e| {
            Error::config(
                origin.to_owned(),
                format!("not valid TOML: {}", e.message()),
            )
        })?;
        Self::from_value(value)
    }

    /// Reads a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading configuration file {}", path.display()), e))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// The defaults overridden by `SANARE__…` variables of the process environment.
    pub fn from_env() -> Result<Self> {
        Self::default().with_env(std::env::vars())
    }

    /// This configuration overridden by `SANARE__SECTION__KEY=value` pairs from `vars`
    /// (other variables are ignored).
    pub fn with_env(self, vars: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let mut value = toml::Value::try_from(&self)
            .map_err(|e| Error::config("configuration", e.to_string()))?;
        for (name, raw) in vars {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) {
                return Err(Error::config(
                    name,
                    "empty key segment (use `__` between keys)",
                ));
            }
            let parsed = parse_env_value(&raw);
            set_path(&mut value, &path, parsed).map_err(|msg| Error::config(name.clone(), msg))?;
        }
        Self::from_value(value)
    }

    fn from_value(value: toml::Value) -> Result<Self> {
        refuse_removed_keys(&value)?;
        let config: SanareConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            let message = e.inner().to_string();
            Error::config(
                if key == "." {
                    "configuration".into()
                } else {
                    key
                },
                message,
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense together.
    pub fn validate(&self) -> Result<()> {
        sanare_pg::SchemaName::new(self.schema.clone())?;
        if self.validation.chunk_size == 0 {
            return Err(Error::config("validation.chunk_size", "must be at least 1"));
        }
        if let StorageConfig::S3 { bucket, .. } = &self.snapshots.storage
            && bucket.trim().is_empty()
        {
            return Err(Error::config(
                "snapshots.storage.bucket",
                "an S3 bucket name is required",
            ));
        }
        if self.validation.parallelism == 0 {
            return Err(Error::config(
                "validation.parallelism",
                "must be at least 1",
            ));
        }
        sanare_integrity::IntegrityConfig::check_duty_cycle(self.validation.duty_cycle)?;
        sanare_integrity::IntegrityConfig::check_families(&self.validation.families())?;
        self.corruption.detector_config().validate()?;
        if self.snapshots.keep_last == 0 {
            return Err(Error::config(
                "snapshots.keep_last",
                "must be at least 1 (sanare always keeps one snapshot)",
            ));
        }
        self.background.validate()?;
        for (key, d, min) in [
            (
                "crash_detection.detection_timeout",
                self.crash_detection.detection_timeout,
                Duration::from_millis(10),
            ),
            (
                "crash_detection.heartbeat_interval",
                self.crash_detection.heartbeat_interval,
                Duration::from_millis(10),
            ),
            (
                "recovery.time_target",
                self.recovery.time_target,
                Duration::from_secs(1),
            ),
        ] {
            if d < min {
                return Err(Error::config(
                    key,
                    format!("must be at least {}", humantime::format_duration(min)),
                ));
            }
        }
        for (key, d) in [
            ("snapshots.interval", self.snapshots.interval),
            ("validation.interval", self.validation.interval),
            ("corruption.scan_interval", self.corruption.scan_interval),
            (
                "journal.compaction_interval",
                self.journal.compaction_interval,
            ),
        ] {
            if d.is_some_and(|d| d < Duration::from_secs(1)) {
                return Err(Error::config(key, "must be at least 1s"));
            }
        }
        Ok(())
    }

    /// The schema as a validated name.
    pub fn schema_name(&self) -> Result<sanare_pg::SchemaName> {
        sanare_pg::SchemaName::new(self.schema.clone())
    }
}

/// Keys earlier versions accepted but never honoured, with what to do instead:
/// refused by name, so a configuration that relied on one learns it did nothing.
const REMOVED_KEYS: &[(&str, &str, &str)] = &[
    (
        "snapshots",
        "incremental",
        "removed: every snapshot is incremental (blocks are content-addressed, a capture stores only new ones); delete the key",
    ),
    (
        "journal",
        "enabled",
        "removed: the journal cannot be turned off (every start replays it; snapshots and repairs read it); delete the key, and set `journal.compaction_interval = \"off\"` to stop compaction",
    ),
    (
        "journal",
        "archive_after_days",
        "removed: it never archived anything; write archives with `sanare journal archive --until <time> --out <file>`, and `journal.retention_days` purges what a snapshot covers",
    ),
];

fn refuse_removed_keys(value: &toml::Value) -> Result<()> {
    for (section, key, why) in REMOVED_KEYS {
        if value.get(section).and_then(|s| s.get(key)).is_some() {
            return Err(Error::config(format!("{section}.{key}"), *why));
        }
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    // `x = <raw>` parses for numbers, booleans, arrays and quoted strings.
    toml::from_str::<toml::Table>(&format!("x = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("x"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(root: &mut toml::Value, path: &[String], value: toml::Value) -> Result<(), String> {
    let mut cur = root;
    for (i, key) in path.iter().enumerate() {
        let toml::Value::Table(table) = cur else {
            return Err(format!("`{}` is not a section", path[..i].join(".")));
        };
        if i + 1 == path.len() {
            table.insert(key.clone(), value);
            return Ok(());
        }
        cur = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    Err("empty key".into())
}

// ---- [background]: supervision of background work (leases, heartbeats, restarts).

/// How background work survives its own failures (see `docs/operating-at-scale.md`).
///
/// ```toml
/// [background]
/// lease = "2m"            # a claim not renewed this long is taken over
/// heartbeat = "20s"       # how often running work renews its claim
/// restart_backoff = "1s"  # first wait before restarting a panicked loop
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BackgroundConfig {
    /// How long a claim on a job or a scheduled run lasts without renewal: how soon
    /// another instance takes over the work of an instance that died.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often running work renews its claim, and a leader checks its
    /// leadership: how soon a leader that lost leadership stops its task. At most a
    /// third of `lease`.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// How long a background loop that panicked waits before it restarts; the wait
    /// doubles with each panic in a row, up to a minute (or this, when longer).
    #[serde(with = "humantime_serde")]
    pub restart_backoff: Duration,
}

impl Default for BackgroundConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(120),
            heartbeat: Duration::from_secs(20),
            restart_backoff: Duration::from_secs(1),
        }
    }
}

impl BackgroundConfig {
    fn validate(&self) -> Result<()> {
        if self.heartbeat < Duration::from_millis(10) {
            return Err(Error::config(
                "background.heartbeat",
                "must be at least 10ms",
            ));
        }
        if self.heartbeat.saturating_mul(3) > self.lease {
            return Err(Error::config(
                "background.lease",
                format!(
                    "must be at least three heartbeats ({}), so one slow renewal does not lose running work",
                    humantime::format_duration(self.heartbeat.saturating_mul(3))
                ),
            ));
        }
        if self.restart_backoff < Duration::from_millis(1) {
            return Err(Error::config(
                "background.restart_backoff",
                "must be at least 1ms (a panicking loop must not spin)",
            ));
        }
        Ok(())
    }
}
// ---- end of [background].

/// Serde helpers for durations written like `30m`, `1h 30m`, `250ms`.
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration ({e}); write it like `30s`, `15m`, `1h 30m`"
            ))
        })
    }

    pub(crate) mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub(crate) fn serialize<S: Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                // TOML has no null: "off" disables the schedule.
                None => s.serialize_str("off"),
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            let s = String::deserialize(d)?;
            if matches!(s.trim(), "off" | "never" | "") {
                return Ok(None);
            }
            humantime::parse_duration(&s).map(Some).map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{s}` is not a duration ({e}); write it like `30m` or `off`"
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = toml::to_string(&SanareConfig::default()).unwrap();
        let back = SanareConfig::from_toml_str(&text, "defaults").unwrap();
        assert_eq!(back, SanareConfig::default());
    }

    #[test]
    fn removed_keys_are_refused_by_name_with_what_to_do() {
        for (text, key, hint) in [
            (
                "[snapshots]\nincremental = true",
                "snapshots.incremental",
                "content-addressed",
            ),
            (
                "[journal]\nenabled = false",
                "journal.enabled",
                "cannot be turned off",
            ),
            (
                "[journal]\narchive_after_days = 30",
                "journal.archive_after_days",
                "journal archive",
            ),
        ] {
            let err = SanareConfig::from_toml_str(text, "f")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(hint), "{text}: {err}");
        }
        let err = SanareConfig::default()
            .with_env([("SANARE__JOURNAL__ENABLED".to_owned(), "false".to_owned())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("journal.enabled"), "{err}");
        // Other keys of those sections still read.
        let c = SanareConfig::from_toml_str("[journal]\nretention_days = 3", "f").unwrap();
        assert_eq!(c.journal.retention_days, 3);
    }

    #[test]
    fn a_file_sets_values_and_keeps_defaults() {
        let c = SanareConfig::from_toml_str(
            r#"
            schema = "ops"
            [snapshots]
            interval = "15m"
            codec = "brotli"
            storage = { kind = "s3", bucket = "b", endpoint = "http://127.0.0.1:9000" }
            [repair]
            approval_threshold = "critical"
            removals_need_approval = false
            [corruption]
            scan_interval = "off"
            alerts = { slack_webhook_url = "https://hooks.slack.test/x", email_to = ["ops@example.com"] }
            "#,
            "sanare.toml",
        )
        .unwrap();
        assert_eq!(c.schema, "ops");
        assert_eq!(c.snapshots.interval, Some(Duration::from_secs(900)));
        assert_eq!(c.snapshots.codec, Codec::Brotli);
        assert!(
            matches!(c.snapshots.storage, StorageConfig::S3 { ref bucket, .. } if bucket == "b")
        );
        assert_eq!(c.repair.approval_threshold, Severity::Critical);
        assert!(!c.repair.removals_need_approval);
        assert!(SanareConfig::default().repair.removals_need_approval);
        assert_eq!(c.corruption.scan_interval, None);
        assert_eq!(c.corruption.alerts.email_to, vec!["ops@example.com"]);
        assert_eq!(c.journal, JournalConfig::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = SanareConfig::from_toml_str("[snapshots]\nintervall = \"1m\"", "f").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("snapshots") && msg.contains("intervall"),
            "{msg}"
        );

        let err = SanareConfig::from_toml_str("[snapshots]\ninterval = \"soon\"", "f").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("snapshots.interval") && msg.contains("soon"),
            "{msg}"
        );

        let err = SanareConfig::from_toml_str("[repair]\napproval_threshold = \"severe\"", "f")
            .unwrap_err();
        assert!(
            err.to_string().contains("repair.approval_threshold"),
            "{err}"
        );

        let err = SanareConfig::from_toml_str("schema = \"Bad-Name\"", "f").unwrap_err();
        assert!(err.to_string().contains("schema"), "{err}");

        let err = SanareConfig::from_toml_str("[validation]\nchunk_size = 0", "f").unwrap_err();
        assert!(err.to_string().contains("validation.chunk_size"), "{err}");

        let err = SanareConfig::from_toml_str("not toml [", "sanare.toml").unwrap_err();
        assert!(err.to_string().contains("sanare.toml"), "{err}");
    }

    #[test]
    fn environment_overrides_by_path_and_rejects_unknown_keys() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let c = SanareConfig::default()
            .with_env(env(&[
                ("SANARE__SNAPSHOTS__INTERVAL", "5m"),
                ("SANARE__VALIDATION__PARALLELISM", "8"),
                ("SANARE__AUTO_RECOVERY", "false"),
                ("SANARE__CORRUPTION__ALERTS__EMAIL_TO", r#"["a@x.io"]"#),
                ("SANARE_PG_BINDIR", "/ignored"),
                ("PATH", "/ignored"),
            ]))
            .unwrap();
        assert_eq!(c.snapshots.interval, Some(Duration::from_secs(300)));
        assert_eq!(c.validation.parallelism, 8);
        assert!(!c.auto_recovery);
        assert_eq!(c.corruption.alerts.email_to, vec!["a@x.io"]);

        let err = SanareConfig::default()
            .with_env(env(&[("SANARE__SNAPSHOT__INTERVAL", "5m")]))
            .unwrap_err();
        assert!(err.to_string().contains("snapshot"), "{err}");
        let err = SanareConfig::default()
            .with_env(env(&[("SANARE__VALIDATION__PARALLELISM", "many")]))
            .unwrap_err();
        assert!(err.to_string().contains("validation.parallelism"), "{err}");
        let err = SanareConfig::default()
            .with_env(env(&[("SANARE__SCHEMA__X", "1")]))
            .unwrap_err();
        assert!(err.to_string().contains("SANARE__SCHEMA__X"), "{err}");
    }

    #[test]
    fn each_validation_family_key_turns_its_family_off() {
        assert_eq!(ValidationConfig::default().families(), CheckFamily::ALL);
        for (key, family) in [
            ("schema", CheckFamily::Schema),
            ("referential", CheckFamily::Referential),
            ("checksum", CheckFamily::Checksum),
            ("consistency", CheckFamily::Consistency),
        ] {
            let c =
                SanareConfig::from_toml_str(&format!("[validation]\n{key} = false"), "f").unwrap();
            let on = c.validation.families();
            assert!(!on.contains(&family), "{key}");
            assert_eq!(on.len(), 3, "{key}");
            let c = SanareConfig::default()
                .with_env([(
                    format!("SANARE__VALIDATION__{}", key.to_uppercase()),
                    "false".into(),
                )])
                .unwrap();
            assert!(!c.validation.families().contains(&family), "{key}");
        }
        let err = SanareConfig::from_toml_str(
            "[validation]\nschema = false\nreferential = false\nchecksum = false\nconsistency = false",
            "f",
        )
        .unwrap_err();
        assert!(err.to_string().contains("validation"), "{err}");
    }

    #[test]
    fn a_duty_cycle_outside_zero_to_one_is_refused_by_name() {
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let mut c = SanareConfig::default();
            c.validation.duty_cycle = bad;
            let err = c.validate().unwrap_err();
            assert!(err.to_string().contains("validation.duty_cycle"), "{err}");
        }
        let mut c = SanareConfig::default();
        c.validation.duty_cycle = 0.25;
        c.validate().unwrap();
    }

    #[test]
    fn the_corruption_checksum_settings_reach_the_detector_and_are_checked() {
        let c = SanareConfig::from_toml_str(
            "[corruption]\nchecksum_algorithm = \"blake3\"\nchecksum_column = \"sum\"\n\
             max_suspects_per_table = 50\nphysical_jobs = 4",
            "f",
        )
        .unwrap();
        assert_eq!(
            c.corruption.checksum_algorithm,
            sanare_integrity::ChecksumAlgorithm::Blake3
        );
        let d = c.corruption.detector_config();
        assert_eq!(d.checksum_column, "sum");
        assert_eq!(d.max_suspects_per_table, 50);
        assert_eq!(d.physical_jobs, 4);
        assert_eq!(
            SanareConfig::default().corruption.checksum_algorithm,
            sanare_integrity::ChecksumAlgorithm::Sha256
        );
        let err = SanareConfig::from_toml_str("[corruption]\nchecksum_algorithm = \"md5\"", "f")
            .unwrap_err();
        assert!(
            err.to_string().contains("corruption.checksum_algorithm"),
            "{err}"
        );
        let err = SanareConfig::from_toml_str("[corruption]\nmax_suspects_per_table = 0", "f")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("corruption.max_suspects_per_table"),
            "{err}"
        );
    }
}
