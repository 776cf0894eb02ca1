//! [`CorruptionService`] for the detector: the scan recovery runs after a crash,
//! built on the detector's public scans only.

use std::time::Instant;

use async_trait::async_trait;
use sanare_core::{
    Control, CorruptionScanSummary, CorruptionScope, CorruptionService, Result, TableRef,
};

use crate::detector::CorruptionDetector;
use crate::physical::AmcheckStatus;

#[async_trait]
impl CorruptionService for CorruptionDetector {
    /// The checksum layer over `scope.tables` (every table of the configured host
    /// schemas when empty), then, when `scope.physical`, amcheck over every table
    /// the scan reached (also those without a checksum column) and the server's
    /// data-page checksum failure count. Findings are recorded as issues and
    /// returned as violations.
    async fn scan(
        &self,
        scope: &CorruptionScope,
        control: &Control,
    ) -> Result<CorruptionScanSummary> {
        let started = Instant::now();
        let report = if scope.tables.is_empty() {
            self.scan_all(control).await?
        } else {
            self.scan_tables(&scope.tables, control).await?
        };
        let mut summary = CorruptionScanSummary::default();
        summary.findings = report.issues.iter().map(|i| i.to_violation()).collect();
        summary.rows_scanned = report.rows_scanned;
        summary.tables_scanned = report.tables_scanned;
        summary.tables_skipped = report.tables_skipped;
        if scope.physical {
            let tables: Vec<TableRef> = summary
                .tables_scanned
                .iter()
                .chain(summary.tables_skipped.iter().map(|(t, _)| t))
                .cloned()
                .collect();
            for table in tables {
                control.checkpoint()?;
                let physical = self.check_physical(&table, control).await?;
                match physical.amcheck {
                    AmcheckStatus::Available { .. } => {
                        summary.tables_checked_physically.push(table);
                        summary
                            .findings
                            .extend(physical.issues.iter().map(|i| i.to_violation()));
                    }
                    AmcheckStatus::Disabled => {
                        summary.physical_skipped =
                            Some("amcheck is disabled in the configuration".into());
                        break;
                    }
                    AmcheckStatus::Unavailable { reason } => {
                        summary.physical_skipped = Some(reason);
                        break;
                    }
                }
            }
            if let Some(issue) = self.check_checksum_failures().await? {
                summary.findings.push(issue.to_violation());
            }
        }
        summary.duration = started.elapsed();
        Ok(summary)
    }
}
