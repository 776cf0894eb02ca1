//! What other crates need of corruption detection.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{Control, Result, TableRef, Violation};

/// What a corruption scan covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CorruptionScope {
    /// These tables (every table the service is configured to scan when empty).
    pub tables: Vec<TableRef>,
    /// Also verify heap pages and B-tree indexes physically (amcheck), where the
    /// extension is available to the role.
    pub physical: bool,
}

impl CorruptionScope {
    /// Every configured table, logical checks only.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only these tables.
    pub fn tables(mut self, tables: impl IntoIterator<Item = TableRef>) -> Self {
        self.tables = tables.into_iter().collect();
        self
    }

    /// With or without the physical (amcheck) checks.
    pub fn physical(mut self, yes: bool) -> Self {
        self.physical = yes;
        self
    }
}

/// What one scan did and found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CorruptionScanSummary {
    /// Tables whose rows were verified.
    pub tables_scanned: Vec<TableRef>,
    /// Tables not verified, each with the reason (no checksum column, no key).
    pub tables_skipped: Vec<(TableRef, String)>,
    /// Rows verified.
    pub rows_scanned: u64,
    /// Tables whose heap and indexes were verified physically.
    pub tables_checked_physically: Vec<TableRef>,
    /// Why the physical checks did not run, when they were asked for and did not.
    pub physical_skipped: Option<String>,
    /// Confirmed findings, as violations of kind
    /// [`ViolationKind::Corruption`](crate::ViolationKind::Corruption).
    pub findings: Vec<Violation>,
    /// Wall time.
    pub duration: Duration,
}

impl CorruptionScanSummary {
    /// Whether nothing was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Corruption detection, as the other components use it (recovery scans what a
/// crash could have touched).
///
/// # Contract
/// - `Send + Sync`; `scan` may run concurrently with the host's writes.
/// - Read-only on host tables: never more than the AccessShareLock of a `SELECT`.
/// - Every finding is confirmed before it is returned (re-read in a fresh snapshot),
///   so a concurrent write is never reported as damage; findings are also recorded
///   in the implementation's own store.
/// - A finding with a row names damage to that row. A finding with no row of kind
///   [`CorruptionKind::Metadata`](crate::CorruptionKind::Metadata) on a table means
///   its pages could not be read or failed physical verification: no row repair
///   covers it. A table whose schema is `*` names a database-wide finding.
/// - Checks its [`Control`] between chunks and tables; a cancelled scan returns
///   [`Error::Cancelled`](crate::Error::Cancelled) and reports nothing.
#[async_trait]
pub trait CorruptionService: Send + Sync {
    /// Scans `scope` and returns what it found.
    async fn scan(
        &self,
        scope: &CorruptionScope,
        control: &Control,
    ) -> Result<CorruptionScanSummary>;
}
