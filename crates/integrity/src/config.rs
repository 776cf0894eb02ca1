//! Tuning of validation runs, and the builder of the service.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sanare_core::{CheckFamily, Error, EventBus, Result};
use sanare_pg::{Pool, SchemaName};

use crate::rules::Rules;
use crate::service::{Inner, Integrity};

/// Tuning of a validation run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct IntegrityConfig {
    /// Rows per chunk (default 50,000).
    pub chunk_rows: u64,
    /// Chunks checked at once, each on its own connection (default 2). The pool needs
    /// `parallelism + 1` connections.
    pub parallelism: usize,
    /// `statement_timeout` of each chunk query (default 60 s).
    pub chunk_timeout: Duration,
    /// `statement_timeout` of whole-table queries: unique checks, business-rule
    /// queries (default 10 min).
    pub table_timeout: Duration,
    /// `lock_timeout` of every query (default 5 s): validation never queues behind DDL
    /// for long.
    pub lock_timeout: Duration,
    /// How long one exported snapshot serves before a fresh one is exported
    /// (default 5 min).
    pub snapshot_max_age: Duration,
    /// Where the JSON-lines violation files go, and the temporary files of units
    /// with more suspects than [`batch_size`](Self::batch_size) (default
    /// `$TMPDIR/sanare-integrity`).
    pub report_dir: PathBuf,
    /// Whether each violation is also published as an `Event::ViolationDetected`
    /// (default true).
    pub publish_violations: bool,
    /// The share of wall time each worker may spend running chunks, in `(0, 1]`
    /// (default 1: no pause). Below 1, a worker pauses after each chunk for as long
    /// as keeps it at this share (a chunk of 0.1 s at 0.25 is followed by a 0.3 s
    /// pause), like PostgreSQL's cost-based vacuum delay: the way to keep a
    /// validation from taking CPU that a busy host's writes need. The exported
    /// snapshot is not held through a pause (it would keep the host's dead row
    /// versions from being pruned), so chunks after a pause read a newer one.
    pub duty_cycle: f64,
    /// Findings handled at once (default 1,000): suspects re-read per query,
    /// violations written per statement, rows per page of the readers. What a run
    /// holds in memory is bounded by this, not by what it finds: the suspects of a
    /// unit beyond one batch wait in a temporary file in
    /// [`report_dir`](Self::report_dir).
    pub batch_size: usize,
    /// The check families runs may use (default all four). A family left out is
    /// never run: a scope that names no family gets the others, and one that names
    /// only families left out is refused.
    pub families: Vec<CheckFamily>,
}

impl IntegrityConfig {
    /// Checks a [`duty_cycle`](Self::duty_cycle) value: it must be in `(0, 1]`.
    ///
    /// # Errors
    /// [`Error::Config`] for key `validation.duty_cycle` otherwise (NaN included).
    pub fn check_duty_cycle(duty_cycle: f64) -> Result<()> {
        if duty_cycle > 0.0 && duty_cycle <= 1.0 {
            Ok(())
        } else {
            Err(Error::config(
                "validation.duty_cycle",
                format!("must be in (0, 1] (the share of time a worker may run), got {duty_cycle}"),
            ))
        }
    }

    /// Checks a [`families`](Self::families) value: at least one family.
    ///
    /// # Errors
    /// [`Error::Config`] for key `validation` when it is empty.
    pub fn check_families(families: &[CheckFamily]) -> Result<()> {
        if families.is_empty() {
            return Err(Error::config(
                "validation",
                "every check family is turned off (schema, referential, checksum and consistency are all false): turn one on, or leave validation.interval unset",
            ));
        }
        Ok(())
    }
}

impl Default for IntegrityConfig {
    fn default() -> Self {
        Self {
            chunk_rows: 50_000,
            parallelism: 2,
            chunk_timeout: Duration::from_secs(60),
            table_timeout: Duration::from_secs(600),
            lock_timeout: Duration::from_secs(5),
            snapshot_max_age: Duration::from_secs(300),
            report_dir: std::env::temp_dir().join("sanare-integrity"),
            publish_violations: true,
            duty_cycle: 1.0,
            batch_size: 1_000,
            families: CheckFamily::ALL.to_vec(),
        }
    }
}

/// Builds an [`Integrity`].
#[derive(Debug, Default)]
pub struct IntegrityBuilder {
    pool: Option<Pool>,
    schema: Option<SchemaName>,
    rules: Rules,
    events: Option<EventBus>,
    config: IntegrityConfig,
    checksum_key: Option<[u8; 32]>,
}

impl IntegrityBuilder {
    /// The connection pool (required).
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// sanare's schema (default `sanare`).
    pub fn schema(mut self, schema: SchemaName) -> Self {
        self.schema = Some(schema);
        self
    }

    /// Declared rules (added to any given before).
    pub fn rules(mut self, rules: Rules) -> Self {
        self.rules.extend(rules);
        self
    }

    /// The bus violations are published on.
    pub fn events(mut self, events: EventBus) -> Self {
        self.events = Some(events);
        self
    }

    /// Tuning.
    pub fn config(mut self, config: IntegrityConfig) -> Self {
        self.config = config;
        self
    }

    /// The secret key of `blake3_keyed` checksum rules.
    pub fn checksum_key(mut self, key: [u8; 32]) -> Self {
        self.checksum_key = Some(key);
        self
    }

    /// The service.
    pub fn build(self) -> Result<Integrity> {
        let pool = self.pool.ok_or_else(|| {
            Error::config(
                "pool",
                "Integrity::builder() needs a connection pool: call .pool(..)",
            )
        })?;
        self.rules.validate()?;
        IntegrityConfig::check_duty_cycle(self.config.duty_cycle)?;
        IntegrityConfig::check_families(&self.config.families)?;
        if self.config.chunk_rows == 0 || self.config.parallelism == 0 {
            return Err(Error::config(
                "integrity config",
                "chunk_rows and parallelism must be at least 1",
            ));
        }
        if self.config.batch_size == 0 {
            return Err(Error::config(
                "integrity config",
                "batch_size must be at least 1",
            ));
        }
        Ok(Integrity {
            inner: Arc::new(Inner {
                pool,
                schema: self.schema.unwrap_or_else(SchemaName::default_schema),
                rules: self.rules,
                events: self.events,
                config: self.config,
                checksum_key: self.checksum_key,
            }),
        })
    }
}
