//! Corruption detection for sanare: find damage before it spreads, say what kind it
//! is, and tell someone.
//!
//! # Layers
//! - **checksum**: every row of a table with a checksum column (default
//!   `row_checksum`, `bytea`) — every partition of a partitioned table — is re-hashed
//!   through the canonical [`RowChecksum`](sanare_core::RowChecksum) (implemented by
//!   the integrity crate) and compared with the stored value
//!   ([`CorruptionDetector::scan_table`], [`CorruptionDetector::scan_all`]). A table
//!   failing on too many rows is one [`TableWideMismatch`]: a configuration problem,
//!   recorded without rows, never repaired;
//! - **pattern**: a confirmed mismatch is classified against the row's last known
//!   good version from the latest good snapshot ([`classify_value`]): one flipped bit
//!   is a `BitFlip`, a prefix a `Truncation`, a row the snapshot does not have an
//!   `Injection`; rows the snapshot has and the table lost are `Deletion`s
//!   ([`CorruptionDetector::check_deletions`]);
//! - **physical**: amcheck over every relation of a table — partitions, TOAST
//!   tables, B-tree indexes — in parallel: `verify_heapam` by block ranges, bisected
//!   to the block when a page cannot be read, and `bt_index_check` (never the parent
//!   checks), an index blamed only when its own check fails; degrading to a report
//!   that says why when the extension or grants are missing
//!   ([`CorruptionDetector::check_physical_tables`]); `pg_stat_database.checksum_failures`
//!   ([`CorruptionDetector::check_checksum_failures`]);
//! - **statistics**: per-column null fraction, distinct count, length and range
//!   against a stored baseline; a row-count drop flags a truncated table
//!   ([`CorruptionDetector::check_statistics`]).
//!
//! Every reader runs in a transaction on a [`TxGuard`](sanare_pg::TxGuard) (no
//! connection goes back to the pool inside it, on error, cancellation or panic) under
//! the canonical session settings ([`sanare_pg::canonical`]), so that values print
//! as the checksum writer printed them whatever the database's or role's settings.
//!
//! Findings are [`CorruptionIssue`]s stored in `<schema>.corruption_issues`, published
//! as `Event::CorruptionDetected`, sent as alerts ([`AlertDispatcher`] in front of
//! [`WebhookSink`], [`SlackSink`], [`PagerDutySink`], [`EmailSink`]) and convertible
//! into [`Violation`](sanare_core::Violation)s for the repair engine. The real-time
//! [monitor](CorruptionDetector::start_monitor) polls changed rows; see [`monitor`]
//! for why it polls.
//!
//! ```no_run
//! # async fn f(pool: sanare_pg::Pool, checksum: std::sync::Arc<dyn sanare_core::RowChecksum>) -> sanare_core::Result<()> {
//! use sanare_corruption::CorruptionDetector;
//! let detector = CorruptionDetector::builder().pool(pool).checksum(checksum).build()?;
//! detector.migrate().await?;
//! let report = detector.scan_all(&sanare_core::Control::detached()).await?;
//! println!("{} rows, {} issues", report.rows_scanned, report.issues.len());
//! # Ok(()) }
//! ```
//!
//! # Architecture invariant
//!
//! Detection never writes to host tables and never takes more than the
//! AccessShareLock of a `SELECT`: scans read ctid ranges in one exported snapshot,
//! the monitor polls by `xmin` (nothing is added to the host's commit path), and a
//! suspect is re-read in a fresh snapshot before it is reported, so concurrent writes
//! do not produce false positives. Alerts go through queues drained by background
//! tasks: a slow or dead alert endpoint never blocks detection. The crate depends on
//! `sanare-core` and `sanare-pg` only; snapshots, the journal and the row checksum
//! come in through core traits.
//!
//! # Dependencies
//! `reqwest` (HTTP sinks), `lettre` (SMTP), `hmac` + `sha2` + `base64` (Standard
//! Webhooks signatures): well-kept, widely used crates, so no HTTP, SMTP or HMAC code
//! is hand-written here. reqwest is built with its `rustls` feature (rustls with the
//! aws-lc-rs provider and the platform's root certificates; no OpenSSL), since Slack
//! and PagerDuty accept only HTTPS. Email goes over plain SMTP to a relay.

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod alert;
mod classify;
mod confirm;
mod deletion;
mod detector;
mod issue;
pub mod monitor;
mod physical;
mod run;
mod scan;
mod service;
mod session;
mod stats;
mod trends;

pub use alert::{
    AlertDispatcher, AlertDispatcherBuilder, DispatchStats, EmailSink, PagerDutySink, Route,
    SlackSink, WEBHOOK_SCHEMA, WebhookSink, pagerduty_payload, slack_payload,
    standard_webhooks_signature, webhook_payload,
};
pub use classify::{bit_distance, classify_bytes, classify_value};
pub use detector::{
    CorruptionDetector, CorruptionDetectorBuilder, DetectorConfig, ScanReport, alert_for,
};
pub use issue::{CorruptionIssue, IssueQuery, Layer, default_action, default_severity};
pub use monitor::{MonitorHandle, MonitorStats};
pub use physical::{AmcheckStatus, PhysicalReport, RelationKind, RelationReport};
pub use run::TableWideMismatch;
pub use stats::{ColumnStats, TableStats};
pub use trends::{Count, Direction, RecoveryAnalysis, Trends, direction};

use sanare_core::Result;
use sanare_pg::{Migration, MigrationReport, Migrations, SchemaName};

/// This crate's tables: `corruption_issues` (spec §8.6, with the detecting layer,
/// the affected data as JSON and a fingerprint so one problem is stored once while
/// unresolved) and `corruption_baselines` (statistics baselines).
pub const MIGRATIONS: Migrations = Migrations::new(
    "corruption",
    &[Migration::new(
        1,
        "create_corruption_tables",
        "CREATE TABLE {schema}.corruption_issues (
            id uuid PRIMARY KEY,
            detected_at timestamptz NOT NULL DEFAULT now(),
            table_schema text NOT NULL,
            table_name text NOT NULL,
            corruption_type text NOT NULL,
            severity text NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
            layer text NOT NULL,
            row_key jsonb,
            column_name text,
            index_name text,
            description text NOT NULL,
            affected jsonb NOT NULL DEFAULT 'null',
            recommended_action text NOT NULL,
            fingerprint text NOT NULL,
            resolved_at timestamptz,
            resolution text
        );
        CREATE INDEX corruption_issues_detected_at ON {schema}.corruption_issues (detected_at);
        CREATE INDEX corruption_issues_table ON {schema}.corruption_issues (table_schema, table_name, detected_at);
        CREATE UNIQUE INDEX corruption_issues_open_fingerprint
            ON {schema}.corruption_issues (fingerprint) WHERE resolved_at IS NULL;
        CREATE TABLE {schema}.corruption_baselines (
            table_schema text NOT NULL,
            table_name text NOT NULL,
            captured_at timestamptz NOT NULL,
            row_count bigint NOT NULL,
            columns jsonb NOT NULL,
            PRIMARY KEY (table_schema, table_name)
        );",
    )],
);

/// Applies [`MIGRATIONS`] in `schema`.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &SchemaName,
) -> Result<MigrationReport> {
    MIGRATIONS.run(client, schema).await
}
