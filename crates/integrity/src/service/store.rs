//! What a run writes: its work units, its violations in batches (to
//! `integrity_violations`, the JSON-lines file and the event bus), the completion of
//! each unit, and the totals a resumed run reads back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use sanare_core::{CheckFamily, CheckId, Error, Event, Result, Severity, TableRef, Violation};
use sanare_pg::{PgResultExt, get_conn};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::Integrity;
use crate::report::FamilyResult;
use crate::units::{StoredUnit, refused};

/// Shared counters of a run.
#[derive(Default)]
pub(super) struct RunStats {
    pub(super) rows_by_table: Mutex<BTreeMap<TableRef, u64>>,
    pub(super) families: Mutex<BTreeMap<CheckFamily, FamilyResult>>,
    pub(super) by_severity: Mutex<BTreeMap<Severity, u64>>,
    pub(super) written: AtomicU64,
}

/// The JSON-lines file of a run's violations.
pub(super) struct Sink {
    pub(super) file: Mutex<tokio::io::BufWriter<tokio::fs::File>>,
    pub(super) path: PathBuf,
}

impl Sink {
    pub(super) async fn create(path: PathBuf) -> Result<Self> {
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok(Self {
            file: Mutex::new(tokio::io::BufWriter::new(file)),
            path,
        })
    }

    pub(super) async fn append(&self, lines: &[u8]) -> Result<()> {
        self.file
            .lock()
            .await
            .write_all(lines)
            .await
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
    }

    pub(super) async fn flush(&self) -> std::io::Result<()> {
        self.file.lock().await.flush().await
    }
}

/// A unit's place in `integrity_chunks`.
#[derive(Clone, Copy)]
pub(super) struct UnitRef<'a> {
    pub(super) check: CheckId,
    pub(super) table: &'a TableRef,
    pub(super) unit: i32,
}

/// A stored unit read back for a resumed run.
pub(super) struct StoredRow {
    pub(super) table: TableRef,
    pub(super) unit: i32,
    pub(super) done: bool,
    pub(super) work: StoredUnit,
}

impl Integrity {
    /// Records the work units of a table before they run.
    pub(super) async fn store_units(
        &self,
        check: CheckId,
        table: &TableRef,
        units: &[(i32, StoredUnit)],
    ) -> Result<()> {
        let client = get_conn(&self.inner.pool).await?;
        let ids: Vec<i32> = units.iter().map(|u| u.0).collect();
        let work = units
            .iter()
            .map(|u| serde_json::to_value(&u.1))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::other("encoding work units", e))?;
        client
            .execute(
                &format!(
                    "INSERT INTO {}.integrity_chunks (check_id, table_schema, table_name, unit, work)
                     SELECT $1, $2, $3, u, w FROM unnest($4::int[], $5::jsonb[]) x(u, w)",
                    self.s()
                ),
                &[&check.as_uuid(), &table.schema, &table.name, &ids, &work],
            )
            .await
            .with_context(|| format!("recording the work units of {table}"))?;
        Ok(())
    }

    /// Every stored unit of `check`, decoded (not yet checked against the live
    /// plans). Refuses a run stored by an earlier version as SQL text.
    pub(super) async fn stored_units(&self, check: CheckId) -> Result<Vec<StoredRow>> {
        let client = get_conn(&self.inner.pool).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT table_schema, table_name, unit, done_at IS NOT NULL, work, replan_needed
                       FROM {}.integrity_chunks WHERE check_id = $1
                      ORDER BY table_schema, table_name, unit",
                    self.s()
                ),
                &[&check.as_uuid()],
            )
            .await
            .context("reading the stored work units of the run to resume")?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let table = TableRef::new(r.get::<_, String>(0), r.get::<_, String>(1));
            let unit: i32 = r.get(2);
            if r.get::<_, bool>(5) {
                return Err(Error::conflict(format!(
                    "integrity check {check} was stored by an earlier version as SQL text, which is never run: start a new validation run instead of resuming it"
                )));
            }
            let work: Option<serde_json::Value> = r.get(4);
            let work = work.ok_or_else(|| refused(&table, unit, "it holds no work"))?;
            out.push(StoredRow {
                work: StoredUnit::decode(&table, unit, work)?,
                table,
                unit,
                done: r.get(3),
            });
        }
        Ok(out)
    }

    /// Deletes the violations of the units of `check` that did not finish (a unit
    /// writes its violations in batches and is marked done after the last one), so
    /// that running them again neither loses nor repeats one.
    pub(super) async fn forget_unfinished(&self, check: CheckId) -> Result<u64> {
        let client = get_conn(&self.inner.pool).await?;
        let n = client
            .execute(
                &format!(
                    "DELETE FROM {s}.integrity_violations v
                      WHERE v.check_id = $1 AND v.unit IS NOT NULL
                        AND NOT EXISTS (SELECT 1 FROM {s}.integrity_chunks c
                                         WHERE c.check_id = v.check_id AND c.table_schema = v.table_schema
                                           AND c.table_name = v.table_name AND c.unit = v.unit
                                           AND c.done_at IS NOT NULL)",
                    s = self.s()
                ),
                &[&check.as_uuid()],
            )
            .await
            .context("forgetting the violations of the unfinished units of the resumed run")?;
        Ok(n)
    }

    /// Writes one batch of a unit's violations: one statement into
    /// `integrity_violations` (only while the unit is not done), then the
    /// JSON-lines file, the counters and the events.
    pub(super) async fn write_batch(
        &self,
        at: UnitRef<'_>,
        violations: &[Violation],
        sink: &Sink,
        stats: &RunStats,
    ) -> Result<()> {
        if violations.is_empty() {
            return Ok(());
        }
        if let Some(v) = violations.iter().find(|v| v.table != *at.table) {
            return Err(Error::invalid_input(format!(
                "a violation of {} in a unit of {} (a bug in sanare-integrity)",
                v.table, at.table
            )));
        }
        let json: Vec<String> = violations
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()
            .map_err(|e| Error::other("encoding violations", e))?;
        let row_keys: Vec<Option<String>> = violations
            .iter()
            .map(|v| {
                v.row
                    .as_ref()
                    .map(|r| serde_json::to_string(&r.key))
                    .transpose()
            })
            .collect::<Result<_, _>>()
            .map_err(|e| Error::other("encoding row keys", e))?;
        let ids: Vec<uuid::Uuid> = violations.iter().map(|v| v.id.as_uuid()).collect();
        let types: Vec<&str> = violations.iter().map(|v| v.kind.code()).collect();
        let severities: Vec<&str> = violations.iter().map(|v| v.severity.as_str()).collect();
        let descriptions: Vec<&str> = violations.iter().map(|v| v.description.as_str()).collect();
        let actions: Vec<&str> = violations
            .iter()
            .map(|v| v.recommended_action.as_str())
            .collect();
        let detected: Vec<time::OffsetDateTime> =
            violations.iter().map(|v| v.detected_at).collect();
        let client = get_conn(&self.inner.pool).await?;
        // The columns come from the client: the server parses each violation once,
        // to check it is JSON, and extracts nothing from it.
        let written = client
            .execute(
                &format!(
                    "INSERT INTO {s}.integrity_violations
                       (id, check_id, table_schema, table_name, violation_type, severity, row_key,
                        description, recommended_action, detected_at, violation, unit)
                     SELECT v.id, $1, $2, $3, v.t, v.sev, v.rk::jsonb, v.d, v.a, v.at, v.j::json, $4
                       FROM unnest($5::uuid[], $6::text[], $7::text[], $8::text[], $9::text[],
                                   $10::text[], $11::timestamptz[], $12::text[])
                            AS v(id, t, sev, rk, d, a, at, j)
                      WHERE EXISTS (SELECT 1 FROM {s}.integrity_chunks c
                                     WHERE c.check_id = $1 AND c.table_schema = $2 AND c.table_name = $3
                                       AND c.unit = $4 AND c.done_at IS NULL)",
                    s = self.s()
                ),
                &[
                    &at.check.as_uuid(),
                    &at.table.schema,
                    &at.table.name,
                    &at.unit,
                    &ids,
                    &types,
                    &severities,
                    &row_keys,
                    &descriptions,
                    &actions,
                    &detected,
                    &json,
                ],
            )
            .await
            .context("persisting a batch of violations")?;
        drop(client);
        if written != violations.len() as u64 {
            return Err(Error::conflict(format!(
                "work unit {} of {} is already recorded as done: is this run being resumed by another process too?",
                at.unit, at.table
            )));
        }
        let mut lines = Vec::with_capacity(json.iter().map(|j| j.len() + 1).sum());
        for j in &json {
            lines.extend_from_slice(j.as_bytes());
            lines.push(b'\n');
        }
        sink.append(&lines).await?;
        let mut sev = stats.by_severity.lock().await;
        let mut counted: BTreeMap<(&'static str, Severity), u64> = BTreeMap::new();
        for v in violations {
            *sev.entry(v.severity).or_default() += 1;
            *counted.entry((v.kind.code(), v.severity)).or_default() += 1;
            if self.inner.config.publish_violations
                && let Some(bus) = &self.inner.events
            {
                bus.publish(Event::ViolationDetected {
                    violation: v.id,
                    check: Some(at.check),
                    table: v.table.clone(),
                    kind: v.kind.clone(),
                    severity: v.severity,
                });
            }
        }
        for ((code, severity), n) in counted {
            metrics::counter!("sanare_integrity_violations_total", "type" => code, "severity" => severity.as_str())
                .increment(n);
        }
        stats
            .written
            .fetch_add(violations.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Marks a unit done, with the rows it read and its per-family counts.
    pub(super) async fn finish_unit(
        &self,
        at: UnitRef<'_>,
        rows: u64,
        families: &BTreeMap<CheckFamily, FamilyResult>,
    ) -> Result<()> {
        let families =
            serde_json::to_value(families).map_err(|e| Error::other("encoding unit results", e))?;
        let client = get_conn(&self.inner.pool).await?;
        let n = client
            .execute(
                &format!(
                    "UPDATE {}.integrity_chunks SET done_at = now(), rows_checked = $5, families = $6
                      WHERE check_id = $1 AND table_schema = $2 AND table_name = $3 AND unit = $4
                        AND done_at IS NULL",
                    self.s()
                ),
                &[
                    &at.check.as_uuid(),
                    &at.table.schema,
                    &at.table.name,
                    &at.unit,
                    &i64::try_from(rows).unwrap_or(i64::MAX),
                    &families,
                ],
            )
            .await
            .context("recording the completion of a work unit")?;
        if n == 0 {
            return Err(Error::conflict(format!(
                "work unit {} of {} is already recorded as done: is this run being resumed by another process too?",
                at.unit, at.table
            )));
        }
        Ok(())
    }

    /// The totals of a resumed run, read back from what its units recorded (those of
    /// the interrupted attempts and of this one): rows and family counts from
    /// `integrity_chunks`, severities from `integrity_violations`; and its violations
    /// file, rewritten from the stored violations.
    pub(super) async fn totals_from_db(
        &self,
        check: CheckId,
        sink: &Sink,
        stats: &RunStats,
    ) -> Result<()> {
        let client = get_conn(&self.inner.pool).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT table_schema, table_name, rows_checked, families FROM {}.integrity_chunks
                      WHERE check_id = $1 AND done_at IS NOT NULL",
                    self.s()
                ),
                &[&check.as_uuid()],
            )
            .await
            .context("reading the completed units of the resumed run")?;
        {
            let mut by_table = stats.rows_by_table.lock().await;
            let mut fams = stats.families.lock().await;
            by_table.clear();
            fams.clear();
            for r in rows {
                let table = TableRef::new(r.get::<_, String>(0), r.get::<_, String>(1));
                let n: i64 = r.get(2);
                *by_table.entry(table).or_default() += u64::try_from(n).unwrap_or(0);
                let f: BTreeMap<CheckFamily, FamilyResult> = serde_json::from_value(r.get(3))
                    .map_err(|e| Error::corrupt("stored unit results", e.to_string()))?;
                for (k, v) in f {
                    fams.entry(k).or_default().add(&v);
                }
            }
        }
        let sev = client
            .query(
                &format!(
                    "SELECT severity, count(*) FROM {}.integrity_violations WHERE check_id = $1 GROUP BY severity",
                    self.s()
                ),
                &[&check.as_uuid()],
            )
            .await
            .context("counting the violations of the resumed run")?;
        {
            let mut by_sev = stats.by_severity.lock().await;
            by_sev.clear();
            for r in sev {
                let s: Severity = serde_json::from_value(serde_json::Value::String(r.get(0)))
                    .map_err(|e| Error::corrupt("stored violation severity", e.to_string()))?;
                let n: i64 = r.get(1);
                *by_sev.entry(s).or_default() += u64::try_from(n).unwrap_or(0);
            }
        }
        drop(client);
        let file = tokio::fs::File::create(&sink.path)
            .await
            .map_err(|e| Error::io(format!("rewriting {}", sink.path.display()), e))?;
        let mut file = tokio::io::BufWriter::new(file);
        let mut stream = std::pin::pin!(sanare_core::IntegrityService::violations(self, check));
        while let Some(v) = stream.next().await {
            let mut line =
                serde_json::to_vec(&v?).map_err(|e| Error::other("encoding a violation", e))?;
            line.push(b'\n');
            file.write_all(&line)
                .await
                .map_err(|e| Error::io(format!("writing {}", sink.path.display()), e))?;
        }
        file.flush()
            .await
            .map_err(|e| Error::io(format!("writing {}", sink.path.display()), e))?;
        Ok(())
    }
}
