//! What other crates need of integrity validation.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{BoxStream, CheckId, Control, Result, RowRef, Severity, TableRef, Violation};

/// A family of integrity checks (spec §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CheckFamily {
    /// Column rules: NOT NULL, CHECK, UNIQUE, types, lengths, declared rules.
    Schema,
    /// Foreign keys and declared relationships.
    Referential,
    /// Stored row checksums.
    Checksum,
    /// Business rules.
    Consistency,
}

impl CheckFamily {
    /// Every family.
    pub const ALL: [CheckFamily; 4] = [
        CheckFamily::Schema,
        CheckFamily::Referential,
        CheckFamily::Checksum,
        CheckFamily::Consistency,
    ];
}

/// What to validate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ValidationScope {
    /// These tables (every host table when both this and `schemas` are empty).
    pub tables: Vec<TableRef>,
    /// Every table of these schemas.
    pub schemas: Vec<String>,
    /// These families (all when empty).
    pub families: Vec<CheckFamily>,
    /// Only these rows (every row when empty), for re-validation after a repair.
    pub rows: Vec<RowRef>,
}

impl ValidationScope {
    /// Every host table, every family.
    pub fn all() -> Self {
        Self::default()
    }

    /// These tables.
    pub fn tables(mut self, tables: impl IntoIterator<Item = TableRef>) -> Self {
        self.tables = tables.into_iter().collect();
        self
    }

    /// These families.
    pub fn families(mut self, families: impl IntoIterator<Item = CheckFamily>) -> Self {
        self.families = families.into_iter().collect();
        self
    }

    /// Only these rows.
    pub fn rows(mut self, rows: impl IntoIterator<Item = RowRef>) -> Self {
        self.rows = rows.into_iter().collect();
        self
    }
}

/// The headline of a validation run; the violations themselves are streamed with
/// [`IntegrityService::violations`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ValidationSummary {
    /// The run (report) id.
    pub check: CheckId,
    /// When it started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// How long it took.
    pub duration: Duration,
    /// Tables checked.
    pub tables_checked: u64,
    /// Rows read.
    pub rows_checked: u64,
    /// Violations by severity.
    pub violations_by_severity: BTreeMap<Severity, u64>,
}

impl ValidationSummary {
    /// An empty summary of run `check` started at `started_at`; set the other fields.
    pub fn new(check: CheckId, started_at: OffsetDateTime) -> Self {
        Self {
            check,
            started_at,
            duration: Duration::ZERO,
            tables_checked: 0,
            rows_checked: 0,
            violations_by_severity: BTreeMap::new(),
        }
    }

    /// All violations found.
    pub fn total_violations(&self) -> u64 {
        self.violations_by_severity.values().sum()
    }

    /// Whether no violation was found.
    pub fn is_clean(&self) -> bool {
        self.total_violations() == 0
    }
}

/// Integrity validation, as the other components use it (recovery validates after a
/// restore; repair re-checks a violation).
///
/// # Contract
/// `Send + Sync`; runs never take more than AccessShareLock on host tables; `validate`
/// checks its [`Control`] between chunks and reports progress in rows.
#[async_trait]
pub trait IntegrityService: Send + Sync {
    /// Runs the checks of `scope` and persists the report.
    async fn validate(
        &self,
        scope: ValidationScope,
        control: &Control,
    ) -> Result<ValidationSummary>;

    /// Every violation of a run, streamed (a report may hold millions).
    fn violations(&self, check: CheckId) -> BoxStream<'_, Result<Violation>>;

    /// Whether `violation` still holds now (re-read in a fresh snapshot).
    async fn recheck(&self, violation: &Violation) -> Result<bool>;
}
