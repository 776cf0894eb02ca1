//! The physical layer: amcheck and the server's data-page checksum failures.

use serde::{Deserialize, Serialize};
use tracing::Instrument;

use sanare_core::{Control, CorruptionKind, Result, TableRef};
use sanare_pg::{PgResultExt, get_conn, quote_literal};

use crate::detector::{CorruptionDetector, is_data_corrupted};
use crate::issue::{CorruptionIssue, Layer};

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

/// What a physical check did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PhysicalReport {
    /// The table.
    pub table: TableRef,
    /// Whether amcheck ran.
    pub amcheck: AmcheckStatus,
    /// Heap blocks verified by `verify_heapam`.
    pub heap_blocks_checked: u64,
    /// B-tree indexes verified by `bt_index_check(heapallindexed => true)`.
    pub indexes_checked: Vec<String>,
    /// Findings.
    pub issues: Vec<CorruptionIssue>,
}

impl CorruptionDetector {
    /// Whether amcheck is usable by this role (installing it when configured to).
    pub async fn amcheck_status(&self) -> Result<AmcheckStatus> {
        if !self.inner.config.amcheck {
            return Ok(AmcheckStatus::Disabled);
        }
        let conn = get_conn(&self.inner.pool).await?;
        let mut version: Option<String> = conn
            .query_opt(
                "SELECT extversion FROM pg_extension WHERE extname = 'amcheck'",
                &[],
            )
            .await
            .context("looking for the amcheck extension")?
            .map(|r| r.get(0));
        if version.is_none() && self.inner.config.create_amcheck {
            match conn
                .batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck")
                .await
            {
                Ok(()) => {
                    version = conn
                        .query_opt(
                            "SELECT extversion FROM pg_extension WHERE extname = 'amcheck'",
                            &[],
                        )
                        .await
                        .context("looking for the amcheck extension")?
                        .map(|r| r.get(0));
                }
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

    /// Verifies `table`'s heap (by block ranges) and its B-tree indexes with amcheck
    /// (never the parent checks, which take heavier locks). Degrades to a report
    /// saying why when amcheck is missing or not granted. Findings are recorded.
    pub async fn check_physical(
        &self,
        table: &TableRef,
        control: &Control,
    ) -> Result<PhysicalReport> {
        let span = tracing::info_span!("corruption.physical", %table);
        async {
            let mut report = PhysicalReport {
                table: table.clone(),
                amcheck: self.amcheck_status().await?,
                heap_blocks_checked: 0,
                indexes_checked: Vec::new(),
                issues: Vec::new(),
            };
            if !matches!(report.amcheck, AmcheckStatus::Available { .. }) {
                tracing::info!(%table, status = ?report.amcheck, "amcheck unavailable; physical heap/index checks skipped");
                return Ok(report);
            }
            let conn = get_conn(&self.inner.pool).await?;
            let regclass = quote_literal(&table.quoted());
            let blocks: i64 = conn
                .query_one(
                    &format!("SELECT pg_relation_size({regclass}::regclass) / current_setting('block_size')::bigint"),
                    &[],
                )
                .await
                .with_context(|| format!("reading the size of {table}"))?
                .get(0);
            let chunk = i64::from(self.inner.config.chunk_blocks);
            control.progress().phase("amcheck heap", "blocks", Some(u64::try_from(blocks).unwrap_or(0)));
            let mut start = 0;
            while start < blocks {
                control.checkpoint()?;
                let end = (start + chunk).min(blocks) - 1;
                let res = conn
                    .query(
                        &format!(
                            "SELECT blkno, offnum, attnum, msg FROM verify_heapam({regclass}::regclass, \
                             on_error_stop => false, check_toast => true, skip => 'none', \
                             startblock => $1, endblock => $2)"
                        ),
                        &[&start, &end],
                    )
                    .await
                    .with_context(|| format!("verifying heap blocks {start}..={end} of {table}"));
                match res {
                    Ok(rows) => {
                        for r in rows {
                            let blk: i64 = r.get(0);
                            let off: Option<i32> = r.get(1);
                            let msg: String = r.get(3);
                            report.issues.push(
                                CorruptionIssue::new(
                                    table.clone(),
                                    CorruptionKind::Metadata,
                                    Layer::Physical,
                                    format!("heap block {blk} of {table}: {msg}"),
                                )
                                .with_affected(serde_json::json!({
                                    "block": blk, "offset": off, "attnum": r.get::<_, Option<i32>>(2), "message": msg,
                                })),
                            );
                        }
                    }
                    Err(e) if is_data_corrupted(&e) => {
                        report.issues.push(
                            CorruptionIssue::new(
                                table.clone(),
                                CorruptionKind::Metadata,
                                Layer::Physical,
                                format!("heap blocks {start}..={end} of {table} are damaged: {e}"),
                            )
                            .with_affected(serde_json::json!({
                                "start_block": start, "end_block": end, "error": e.to_string(),
                            })),
                        );
                    }
                    Err(e) => return Err(e),
                }
                report.heap_blocks_checked += u64::try_from(end - start + 1).unwrap_or(0);
                control.progress().advance(u64::try_from(end - start + 1).unwrap_or(0));
                start = end + 1;
            }
            let indexes = conn
                .query(
                    &format!(
                        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relname::text
                           FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                           JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_am a ON a.oid = c.relam
                          WHERE i.indrelid = {regclass}::regclass AND a.amname = 'btree' AND i.indisvalid
                          ORDER BY 2"
                    ),
                    &[],
                )
                .await
                .with_context(|| format!("listing the indexes of {table}"))?;
            for ix in indexes {
                control.checkpoint()?;
                let qualified: String = ix.get(0);
                let name: String = ix.get(1);
                let res = conn
                    .query(
                        &format!("SELECT bt_index_check({}::regclass, true)", quote_literal(&qualified)),
                        &[],
                    )
                    .await
                    .with_context(|| format!("verifying index {qualified}"));
                match res {
                    Ok(_) => {}
                    Err(e) if is_data_corrupted(&e) => report.issues.push(
                        CorruptionIssue::new(
                            table.clone(),
                            CorruptionKind::Index,
                            Layer::Physical,
                            format!("index {name} of {table} is damaged: {e}"),
                        )
                        .with_index(name.clone())
                        .with_affected(serde_json::json!({ "index": name, "error": e.to_string() })),
                    ),
                    Err(e) => return Err(e),
                }
                report.indexes_checked.push(name);
            }
            self.record(&report.issues).await?;
            Ok(report)
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
