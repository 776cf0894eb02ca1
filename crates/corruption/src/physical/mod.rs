//! The physical layer: amcheck over every relation of a table, and the server's
//! data-page checksum failures.

mod check;
mod relations;
mod report;

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::Instrument;

use sanare_core::{Control, CorruptionKind, Error, Result, TableRef};
use sanare_pg::{PgResultExt, get_conn};

use crate::detector::CorruptionDetector;
use crate::issue::{CorruptionIssue, Layer};

pub use relations::RelationKind;
pub use report::RelationReport;

/// Whether amcheck could run, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AmcheckStatus {
    /// amcheck ran.
    Available {
        /// The installed extension version.
        version: String,
    },
    /// amcheck is disabled in the configuration.
    Disabled,
    /// amcheck is not installed and could not be installed, or its functions may not
    /// be executed by this role: heap and index verification were skipped.
    Unavailable {
        /// Why, and what to do (`CREATE EXTENSION amcheck` as a superuser, `GRANT
        /// EXECUTE ON FUNCTION verify_heapam…`).
        reason: String,
    },
}

impl std::fmt::Display for AmcheckStatus {
    /// `available (1.3)`, `disabled`, or `unavailable: <why>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AmcheckStatus::Available { version } => write!(f, "available ({version})"),
            AmcheckStatus::Disabled => f.write_str("disabled"),
            AmcheckStatus::Unavailable { reason } => write!(f, "unavailable: {reason}"),
        }
    }
}

/// What a physical check did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PhysicalReport {
    /// The table.
    pub table: TableRef,
    /// Whether amcheck ran.
    pub amcheck: AmcheckStatus,
    /// Heap blocks verified by `verify_heapam` (of every partition and TOAST table).
    pub heap_blocks_checked: u64,
    /// B-tree indexes verified by `bt_index_check` (`schema.name`).
    pub indexes_checked: Vec<String>,
    /// Every relation checked, with what was found in it.
    pub relations: Vec<RelationReport>,
    /// Findings.
    pub issues: Vec<CorruptionIssue>,
}

/// The installed amcheck's version, if it is installed.
async fn amcheck_version(client: &tokio_postgres::Client) -> Result<Option<String>> {
    Ok(client
        .query_opt(
            "SELECT extversion FROM pg_extension WHERE extname = 'amcheck'",
            &[],
        )
        .await
        .context("looking for the amcheck extension")?
        .map(|r| r.get(0)))
}

impl CorruptionDetector {
    /// Whether amcheck is usable by this role (installing it when configured to).
    pub async fn amcheck_status(&self) -> Result<AmcheckStatus> {
        if !self.inner.config.amcheck {
            return Ok(AmcheckStatus::Disabled);
        }
        let conn = get_conn(&self.inner.pool).await?;
        let mut version = amcheck_version(&conn).await?;
        if version.is_none() && self.inner.config.create_amcheck {
            match conn
                .batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck")
                .await
            {
                Ok(()) => version = amcheck_version(&conn).await?,
                Err(e) => {
                    return Ok(AmcheckStatus::Unavailable {
                        reason: format!(
                            "amcheck is not installed and this role cannot install it ({}); \
                             run `CREATE EXTENSION amcheck` as a superuser",
                            e.as_db_error()
                                .map_or_else(|| e.to_string(), |d| d.message().to_owned())
                        ),
                    });
                }
            }
        }
        let Some(version) = version else {
            return Ok(AmcheckStatus::Unavailable {
                reason: "amcheck is not installed; run `CREATE EXTENSION amcheck` as a superuser"
                    .into(),
            });
        };
        let row = conn
            .query_one(
                "SELECT has_function_privilege('verify_heapam(regclass, boolean, boolean, text, bigint, bigint)', 'EXECUTE'),
                        has_function_privilege('bt_index_check(regclass, boolean)', 'EXECUTE')",
                &[],
            )
            .await
            .context("checking amcheck privileges")?;
        let (heap, idx): (bool, bool) = (row.get(0), row.get(1));
        if !heap || !idx {
            return Ok(AmcheckStatus::Unavailable {
                reason: "this role may not execute amcheck's verify_heapam / bt_index_check; \
                         GRANT EXECUTE on them (and pg_read_all_data or SELECT on the tables) \
                         to the role sanare connects as"
                    .into(),
            });
        }
        Ok(AmcheckStatus::Available { version })
    }

    /// Verifies `table` physically: see [`check_physical_tables`](Self::check_physical_tables).
    pub async fn check_physical(
        &self,
        table: &TableRef,
        control: &Control,
    ) -> Result<PhysicalReport> {
        let mut reports = self
            .check_physical_tables(std::slice::from_ref(table), control)
            .await?;
        reports
            .pop()
            .ok_or_else(|| Error::not_found(format!("table {table}")))
    }

    /// Verifies `tables` with amcheck, as `pg_amcheck` does and more: every
    /// relation holding their data — each leaf partition of a partitioned table, its
    /// TOAST table, and the valid B-tree indexes of both — checked by
    /// [`physical_jobs`](crate::DetectorConfig::physical_jobs) parallel workers.
    ///
    /// - Heaps and TOAST tables go through `verify_heapam` by block ranges (TOAST
    ///   pointers checked). When the server cannot read a page (a failed data
    ///   checksum, an invalid page header), the range is halved until the block is
    ///   found; the rest of the relation is still checked. Each damaged block is
    ///   one issue, with the offsets and PostgreSQL's messages.
    /// - Indexes go through `bt_index_check` (never the parent checks, which take
    ///   heavier locks): first their own pages; an index is blamed only when that
    ///   check fails. Then, for indexes whose heap checked clean, with
    ///   `heapallindexed` (every heap tuple has its entry).
    ///
    /// Degrades to reports saying why when amcheck is missing or not granted.
    /// Findings are recorded. One report per table, in the order given.
    pub async fn check_physical_tables(
        &self,
        tables: &[TableRef],
        control: &Control,
    ) -> Result<Vec<PhysicalReport>> {
        let span = tracing::info_span!("corruption.physical", tables = tables.len());
        async {
            let amcheck = self.amcheck_status().await?;
            let mut reports: Vec<PhysicalReport> = tables
                .iter()
                .map(|t| PhysicalReport {
                    table: t.clone(),
                    amcheck: amcheck.clone(),
                    heap_blocks_checked: 0,
                    indexes_checked: Vec::new(),
                    relations: Vec::new(),
                    issues: Vec::new(),
                })
                .collect();
            if !matches!(amcheck, AmcheckStatus::Available { .. }) {
                tracing::info!(status = ?amcheck, "amcheck unavailable; physical heap/index checks skipped");
                return Ok(reports);
            }
            let mut relations = Vec::new();
            {
                let conn = get_conn(&self.inner.pool).await?;
                for (i, t) in tables.iter().enumerate() {
                    let info = sanare_pg::catalog::describe(&**conn, t).await?;
                    relations.extend(relations::relations_of(&**conn, info.oid, i).await?);
                }
            }
            let checker = Arc::new(check::Checker {
                pool: self.inner.pool.clone(),
                relations,
                timeout: self.inner.config.chunk_timeout,
            });
            let chunk = i64::from(self.inner.config.chunk_blocks);
            let mut jobs = Vec::new();
            let mut heap_blocks = 0;
            for (rel, r) in checker.relations.iter().enumerate() {
                match r.kind {
                    RelationKind::Index => jobs.push(check::Job::IndexStructure { rel }),
                    RelationKind::Heap | RelationKind::Toast => {
                        heap_blocks += r.blocks;
                        let mut start = 0;
                        while start < r.blocks {
                            let end = (start + chunk).min(r.blocks) - 1;
                            jobs.push(check::Job::Heap { rel, start, end });
                            start = end + 1;
                        }
                    }
                }
            }
            control
                .progress()
                .phase("amcheck", "heap blocks", Some(u64::try_from(heap_blocks).unwrap_or(0)));
            let workers = self.inner.config.physical_jobs;
            let mut out = checker.run(jobs, workers, control).await?;
            // Indexes against their heaps, where the heap and the index are sound.
            let damaged: HashSet<u32> = out
                .findings
                .iter()
                .map(|f| checker.relations[f.rel].oid)
                .collect();
            let cross: Vec<check::Job> = out
                .sound_indexes
                .iter()
                .filter(|&&rel| {
                    checker.relations[rel]
                        .indexed
                        .is_some_and(|heap| !damaged.contains(&heap))
                })
                .map(|&rel| check::Job::IndexHeapAll { rel })
                .collect();
            out.merge(checker.run(cross, workers, control).await?);
            let issues = report::issues(&checker.relations, &out.findings);
            self.record(&issues).await?;
            report::fill(&mut reports, &checker.relations, out, issues);
            control.progress().finish();
            Ok(reports)
        }
        .instrument(span)
        .await
    }

    /// Polls `pg_stat_database.checksum_failures` of the current database; an
    /// increase since the previous poll (the first poll only sets the mark unless
    /// it is above zero) is recorded as a database-wide issue (table `*.<database>`).
    pub async fn check_checksum_failures(&self) -> Result<Option<CorruptionIssue>> {
        let conn = get_conn(&self.inner.pool).await?;
        let row = conn
            .query_one(
                "SELECT current_database()::text, coalesce(checksum_failures, 0), checksum_last_failure, \
                        current_setting('data_checksums') = 'on'
                   FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await
            .context("reading pg_stat_database.checksum_failures")?;
        let db: String = row.get(0);
        let failures: i64 = row.get(1);
        let last: Option<time::OffsetDateTime> = row.get(2);
        let enabled: bool = row.get(3);
        let previous = self
            .inner
            .last_checksum_failures
            .swap(failures, std::sync::atomic::Ordering::SeqCst);
        let baseline = previous.max(0);
        if !enabled || failures <= baseline {
            return Ok(None);
        }
        let issue = CorruptionIssue::new(
            TableRef::new("*", db.clone()),
            CorruptionKind::Metadata,
            Layer::Physical,
            format!(
                "PostgreSQL counted {} new data-page checksum failure(s) in database {db}",
                failures - baseline
            ),
        )
        .with_affected(serde_json::json!({
            "checksum_failures": failures,
            "previous": baseline,
            "last_failure": last.map(|t| t.to_string()),
        }));
        self.record(std::slice::from_ref(&issue)).await?;
        Ok(Some(issue))
    }
}

impl CorruptionDetector {
    /// Verifies the blocks of the latest good snapshot through the snapshot service
    /// (block checksums and manifest); a damaged snapshot is recorded as a
    /// [`CorruptionKind::Metadata`] issue on table `*.snapshot` naming the problems.
    /// Returns `None` when there is no snapshot service or no snapshot.
    pub async fn verify_latest_snapshot(
        &self,
        control: &Control,
    ) -> Result<Option<sanare_core::VerifyReport>> {
        let Some(snapshots) = &self.inner.snapshots else {
            return Ok(None);
        };
        let Some(info) = snapshots.latest_good(None).await? else {
            return Ok(None);
        };
        let report = snapshots.verify(info.id, control).await?;
        if !report.is_ok() {
            let issue = CorruptionIssue::new(
                TableRef::new("*", "snapshot"),
                CorruptionKind::Metadata,
                Layer::Checksum,
                format!(
                    "snapshot {} is damaged: {} block(s) corrupt, {} missing",
                    info.id, report.blocks_corrupt, report.blocks_missing
                ),
            )
            .with_affected(serde_json::json!({
                "snapshot": info.id.to_string(),
                "blocks_checked": report.blocks_checked,
                "blocks_corrupt": report.blocks_corrupt,
                "blocks_missing": report.blocks_missing,
                "problems": report.problems,
            }));
            self.record(std::slice::from_ref(&issue)).await?;
        }
        Ok(Some(report))
    }
}
