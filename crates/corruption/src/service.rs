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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sanare_core::{ColumnValue, RowChecksum, ViolationKind};

    use super::*;

    fn values(id: i64, email: &str) -> Vec<ColumnValue> {
        vec![
            ColumnValue::new("id", "bigint", Some(id.to_string())),
            ColumnValue::new("email", "text", Some(email)),
        ]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_scan_finds_the_damaged_row_and_says_what_it_covered() {
        let db = sanare_testing::test_db().await;
        let client = db.client().await;
        client
            .batch_execute(
                "CREATE TABLE public.accounts (id bigint PRIMARY KEY, email text NOT NULL, row_checksum bytea);
                 CREATE TABLE public.plain (id bigint PRIMARY KEY)",
            )
            .await
            .unwrap();
        let sums = sanare_integrity::Checksummer::blake3();
        for id in 1..=3i64 {
            let email = format!("a{id}@example.com");
            let sum = sums.checksum(&values(id, &email)).to_vec();
            client
                .execute(
                    "INSERT INTO public.accounts VALUES ($1, $2, $3)",
                    &[&id, &email, &sum],
                )
                .await
                .unwrap();
        }
        // Damage that bypassed the application: the checksum no longer matches.
        client
            .batch_execute("UPDATE public.accounts SET email = 'b2@example.com' WHERE id = 2")
            .await
            .unwrap();
        let detector = CorruptionDetector::builder()
            .pool(db.pool().clone())
            .checksum(Arc::new(sums))
            .build()
            .unwrap();
        detector.migrate().await.unwrap();
        let service: &dyn CorruptionService = &detector;
        let accounts = TableRef::new("public", "accounts");
        let plain = TableRef::new("public", "plain");
        let scope = CorruptionScope::all().tables([accounts.clone(), plain.clone()]);

        let logical = service.scan(&scope, &Control::detached()).await.unwrap();
        assert_eq!(logical.tables_scanned, vec![accounts.clone()]);
        assert_eq!(logical.tables_skipped.len(), 1);
        assert_eq!(logical.tables_skipped[0].0, plain);
        assert_eq!(logical.rows_scanned, 3);
        assert!(logical.tables_checked_physically.is_empty());
        assert_eq!(logical.physical_skipped, None);
        assert_eq!(logical.findings.len(), 1, "{:?}", logical.findings);
        let finding = &logical.findings[0];
        assert!(matches!(finding.kind, ViolationKind::Corruption { .. }));
        let row = finding.row.as_ref().expect("the damaged row");
        assert_eq!(row.key[0].value.as_deref(), Some("2"));

        let physical = service
            .scan(&scope.clone().physical(true), &Control::detached())
            .await
            .unwrap();
        // amcheck either ran on both tables or the summary says why not.
        match &physical.physical_skipped {
            None => assert_eq!(physical.tables_checked_physically, vec![accounts, plain]),
            Some(why) => assert!(!why.is_empty()),
        }
        assert_eq!(physical.findings.len(), 1, "{:?}", physical.findings);

        let (control, _) = Control::new();
        control.cancel_token().cancel();
        assert!(
            service
                .scan(&scope, &control)
                .await
                .unwrap_err()
                .is_cancelled()
        );
    }
}
