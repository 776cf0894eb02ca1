//! Crash records in PostgreSQL (`<schema>.crash_records`, spec §8.1 widened).

use sanare_core::{CrashId, CrashKind, Error, RecoveryId, Result, Severity};
use sanare_pg::{Migration, Migrations, PgResultExt, Pool, SchemaName, get_conn};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_postgres::types::Json;

use crate::plan::RecoveryResult;
use crate::spool::{RecordSource, SpoolProblem};
use crate::types::{CrashRecord, PreviousRun, SystemState};

/// The recovery component's migrations.
pub const MIGRATIONS: Migrations = Migrations::new(
    "recovery",
    &[
        Migration::new(
            1,
            "create_crash_records",
            "CREATE TABLE {schema}.crash_records (
            crash_id uuid PRIMARY KEY,
            crash_timestamp timestamptz NOT NULL,
            detected_at timestamptz NOT NULL,
            crash_type text NOT NULL CHECK (crash_type IN ('application_crash', 'system_crash',
                'power_failure', 'out_of_memory', 'stack_overflow', 'unknown')),
            severity text NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
            exception_type text,
            exception_message text,
            location text,
            stack_trace text,
            signal integer,
            fault_address bigint,
            thread text,
            system_state jsonb NOT NULL,
            affected_components text[] NOT NULL DEFAULT '{}',
            evidence text[] NOT NULL DEFAULT '{}',
            diagnostics jsonb NOT NULL DEFAULT '{}',
            recovery_started_at timestamptz,
            recovery_completed_at timestamptz,
            recovery_successful boolean,
            recovery_notes text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX crash_records_timestamp_idx ON {schema}.crash_records (crash_timestamp DESC);
        CREATE INDEX crash_records_type_idx ON {schema}.crash_records (crash_type);",
        ),
        Migration::new(
            2,
            "create_crash_incidents_and_recoveries",
            "CREATE TABLE {schema}.crash_incidents (
            run_id uuid NOT NULL,
            seq integer NOT NULL,
            crash_id uuid,
            recorded_at timestamptz NOT NULL,
            source text NOT NULL,
            fatal boolean NOT NULL,
            signal integer,
            message text,
            location text,
            thread text,
            backtrace text,
            pid bigint NOT NULL,
            alloc_size bigint,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (run_id, seq)
        );
        CREATE INDEX crash_incidents_recorded_idx ON {schema}.crash_incidents (recorded_at DESC);
        CREATE TABLE {schema}.recoveries (
            recovery_id uuid PRIMARY KEY,
            crash_id uuid,
            option text NOT NULL,
            started_at timestamptz NOT NULL,
            completed_at timestamptz NOT NULL,
            success boolean NOT NULL,
            backup_snapshot uuid,
            undoes uuid,
            undone_by uuid,
            result jsonb NOT NULL
        );
        CREATE INDEX recoveries_started_idx ON {schema}.recoveries (started_at DESC);",
        ),
    ],
);

/// Applies the recovery migrations in `schema`.
pub async fn migrate(client: &mut tokio_postgres::Client, schema: &SchemaName) -> Result<()> {
    MIGRATIONS.run(client, schema).await.map(|_| ())
}

/// A stored crash with its recovery outcome.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct StoredCrash {
    /// The crash.
    pub crash: CrashRecord,
    /// When recovery started.
    #[serde(with = "time::serde::rfc3339::option")]
    pub recovery_started_at: Option<OffsetDateTime>,
    /// When recovery ended.
    #[serde(with = "time::serde::rfc3339::option")]
    pub recovery_completed_at: Option<OffsetDateTime>,
    /// Whether it succeeded.
    pub recovery_successful: Option<bool>,
    /// Notes.
    pub recovery_notes: Option<String>,
}

/// A spool record of a run, kept in `<schema>.crash_incidents`: the panics a run
/// caught, its supervised-task panics, a handled allocation failure, and the
/// record of the event a crashed run died of (`fatal`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StoredIncident {
    /// The run it happened in.
    pub run_id: uuid::Uuid,
    /// Its place in the run's spool.
    pub seq: u32,
    /// The crash of the run, when it crashed.
    pub crash: Option<CrashId>,
    /// When it was recorded.
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    /// What recorded it.
    pub source: RecordSource,
    /// Whether the run died of it.
    pub fatal: bool,
    /// The signal, for a signal record.
    pub signal: Option<i32>,
    /// The panic message (or the component, for a task panic).
    pub message: Option<String>,
    /// `file:line:col` of a panic.
    pub location: Option<String>,
    /// The thread (or component).
    pub thread: Option<String>,
    /// The backtrace captured at a panic.
    pub backtrace: Option<String>,
    /// The process.
    pub pid: u32,
    /// The size of a failed allocation.
    pub alloc_size: Option<u64>,
}

/// A recovery's record, from `<schema>.recoveries`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StoredRecovery {
    /// What the recovery did.
    pub result: RecoveryResult,
    /// The recovery that undid it, if one did.
    pub undone_by: Option<RecoveryId>,
}

/// Reads and writes `crash_records`, `crash_incidents` and `recoveries`.
#[derive(Clone, Debug)]
pub struct CrashStore {
    pool: Pool,
    schema: SchemaName,
}

fn parse_kind(s: &str) -> CrashKind {
    match s {
        "application_crash" => CrashKind::ApplicationCrash,
        "system_crash" => CrashKind::SystemCrash,
        "power_failure" => CrashKind::PowerFailure,
        "out_of_memory" => CrashKind::OutOfMemory,
        "stack_overflow" => CrashKind::StackOverflow,
        _ => CrashKind::Unknown,
    }
}

impl CrashStore {
    /// A store over `pool` in `schema` (run [`migrate`] first).
    pub fn new(pool: Pool, schema: SchemaName) -> Self {
        Self { pool, schema }
    }

    /// Saves a crash record; saving the same id again changes nothing.
    pub async fn record(&self, crash: &CrashRecord) -> Result<()> {
        let conn = get_conn(&self.pool).await?;
        let diagnostics = serde_json::json!({ "spool_problems": crash.spool_problems });
        conn.execute(
            &format!(
                "INSERT INTO {} (crash_id, crash_timestamp, detected_at, crash_type, severity,
                    exception_type, exception_message, location, stack_trace, signal,
                    fault_address, thread, system_state, affected_components, evidence, diagnostics)
                 VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16)
                 ON CONFLICT (crash_id) DO NOTHING",
                self.schema.table("crash_records")
            ),
            &[
                &crash.id.as_uuid(),
                &crash.crashed_at,
                &crash.detected_at,
                &crash.kind.as_str(),
                &crash.severity.as_str(),
                &crash.exception_type,
                &crash.message,
                &crash.location,
                &crash.backtrace,
                &crash.signal,
                &crash.fault_address.map(|a| a as i64),
                &crash.thread,
                &Json(&crash.system_state),
                &crash.affected_components,
                &crash.evidence,
                &Json(&diagnostics),
            ],
        )
        .await
        .with_context(|| format!("saving crash record {}", crash.id))?;
        metrics::counter!("sanare_recovery_crash_records_total").increment(1);
        Ok(())
    }

    /// Saves what a start-up check found: the crash (if the run crashed) and every
    /// spool record of the run as an incident (caught panics and task panics of a
    /// clean run too), before [`CrashDetector::mark_running`](crate::CrashDetector::mark_running)
    /// clears the spool. Idempotent: a start that dies after this and before
    /// `mark_running` saves the same rows again, and nothing is duplicated.
    pub async fn record_run(&self, run: &PreviousRun) -> Result<()> {
        if let Some(crash) = &run.crash {
            self.record(crash).await?;
        }
        let Some(run_id) = run.run_id else {
            return Ok(());
        };
        if run.records.is_empty() {
            return Ok(());
        }
        let conn = get_conn(&self.pool).await?;
        let sql = format!(
            "INSERT INTO {} (run_id, seq, crash_id, recorded_at, source, fatal, signal, message,
                location, thread, backtrace, pid, alloc_size)
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)
             ON CONFLICT (run_id, seq) DO NOTHING",
            self.schema.table("crash_incidents")
        );
        for (i, r) in run.records.iter().enumerate() {
            let recorded_at =
                crate::classify::ms_to_time(r.unix_ms).unwrap_or_else(sanare_core::now);
            let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
            conn.execute(
                &sql,
                &[
                    &run_id,
                    &(i as i32),
                    &run.crash.as_ref().map(|c| c.id.as_uuid()),
                    &recorded_at,
                    &r.source.as_str(),
                    &(run.fatal_record == Some(i)),
                    &(r.signal != 0).then_some(r.signal),
                    &text(&r.message),
                    &text(&r.location),
                    &text(&r.thread),
                    &text(&r.backtrace),
                    &i64::from(r.pid),
                    &(r.alloc_size != 0).then_some(r.alloc_size as i64),
                ],
            )
            .await
            .with_context(|| format!("saving incident {i} of run {run_id}"))?;
        }
        metrics::counter!("sanare_recovery_incidents_total").increment(run.records.len() as u64);
        Ok(())
    }

    /// Incidents recorded in `from..to` (either bound open when `None`), newest first.
    pub async fn incidents(
        &self,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Result<Vec<StoredIncident>> {
        let conn = get_conn(&self.pool).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT run_id, seq, crash_id, recorded_at, source, fatal, signal, message,
                        location, thread, backtrace, pid, alloc_size
                     FROM {}
                     WHERE ($1::timestamptz IS NULL OR recorded_at >= $1)
                       AND ($2::timestamptz IS NULL OR recorded_at < $2)
                     ORDER BY recorded_at DESC, run_id, seq DESC",
                    self.schema.table("crash_incidents")
                ),
                &[&from, &to],
            )
            .await
            .context("reading crash incidents")?;
        Ok(rows
            .iter()
            .map(|row| {
                let source: String = row.get(4);
                StoredIncident {
                    run_id: row.get(0),
                    seq: row.get::<_, i32>(1).max(0) as u32,
                    crash: row.get::<_, Option<uuid::Uuid>>(2).map(CrashId::from_uuid),
                    recorded_at: row.get(3),
                    source: RecordSource::parse(&source).unwrap_or(RecordSource::Panic),
                    fatal: row.get(5),
                    signal: row.get(6),
                    message: row.get(7),
                    location: row.get(8),
                    thread: row.get(9),
                    backtrace: row.get(10),
                    pid: row.get::<_, i64>(11).max(0) as u32,
                    alloc_size: row.get::<_, Option<i64>>(12).map(|n| n.max(0) as u64),
                }
            })
            .collect())
    }

    /// Deletes crash records, incidents and recovery records older than `cutoff`
    /// (`crash_detection.history_days`); returns how many rows went.
    pub async fn purge_before(&self, cutoff: OffsetDateTime) -> Result<u64> {
        let conn = get_conn(&self.pool).await?;
        let mut gone = 0;
        for (table, column) in [
            ("crash_records", "crash_timestamp"),
            ("crash_incidents", "recorded_at"),
            ("recoveries", "completed_at"),
        ] {
            gone += conn
                .execute(
                    &format!(
                        "DELETE FROM {} WHERE {column} < $1",
                        self.schema.table(table)
                    ),
                    &[&cutoff],
                )
                .await
                .with_context(|| format!("purging old rows of {table}"))?;
        }
        if gone > 0 {
            tracing::info!(rows = gone, %cutoff, "purged old crash history");
        }
        Ok(gone)
    }

    /// Saves a recovery's record (what it did, the backup snapshot it took, the
    /// tables it restored), so it can be looked at and undone by id. Saving the same
    /// recovery again changes nothing.
    pub async fn record_recovery_run(&self, result: &RecoveryResult) -> Result<()> {
        let conn = get_conn(&self.pool).await?;
        let option = serde_json::to_value(result.option)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        conn.execute(
            &format!(
                "INSERT INTO {} (recovery_id, crash_id, option, started_at, completed_at, success,
                    backup_snapshot, undoes, result)
                 VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)
                 ON CONFLICT (recovery_id) DO NOTHING",
                self.schema.table("recoveries")
            ),
            &[
                &result.id.as_uuid(),
                &result.crash.map(|c| c.as_uuid()),
                &option,
                &result.started_at,
                &(result.started_at + result.duration),
                &result.success,
                &result.backup_snapshot.map(|s| s.as_uuid()),
                &result.undoes.map(|r| r.as_uuid()),
                &Json(result),
            ],
        )
        .await
        .with_context(|| format!("saving recovery record {}", result.id))?;
        Ok(())
    }

    /// One recovery record by id.
    pub async fn recovery(&self, id: RecoveryId) -> Result<StoredRecovery> {
        self.recoveries_where("WHERE recovery_id = $1", &[&id.as_uuid()])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::not_found(format!("recovery {id}")))
    }

    /// The newest `limit` recovery records, newest first.
    pub async fn recoveries(&self, limit: i64) -> Result<Vec<StoredRecovery>> {
        self.recoveries_where("LIMIT $1", &[&limit]).await
    }

    async fn recoveries_where(
        &self,
        filter: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<StoredRecovery>> {
        let conn = get_conn(&self.pool).await?;
        let (filter, limit) = match filter.strip_prefix("LIMIT") {
            Some(_) => ("", filter),
            None => (filter, ""),
        };
        let rows = conn
            .query(
                &format!(
                    "SELECT result, undone_by FROM {} {filter}
                     ORDER BY started_at DESC, recovery_id DESC {limit}",
                    self.schema.table("recoveries")
                ),
                params,
            )
            .await
            .context("reading recovery records")?;
        rows.iter()
            .map(|row| {
                let Json(result): Json<RecoveryResult> = row.try_get(0).map_err(|e| {
                    Error::corrupt(
                        "a recovery record",
                        format!("its result does not read: {e}"),
                    )
                })?;
                Ok(StoredRecovery {
                    result,
                    undone_by: row
                        .get::<_, Option<uuid::Uuid>>(1)
                        .map(RecoveryId::from_uuid),
                })
            })
            .collect()
    }

    /// Notes that recovery `id` was undone by recovery `by`. Fails with
    /// [`Error::Conflict`] when it was undone already.
    pub async fn mark_undone(&self, id: RecoveryId, by: RecoveryId) -> Result<()> {
        let conn = get_conn(&self.pool).await?;
        let n = conn
            .execute(
                &format!(
                    "UPDATE {} SET undone_by = $2 WHERE recovery_id = $1 AND undone_by IS NULL",
                    self.schema.table("recoveries")
                ),
                &[&id.as_uuid(), &by.as_uuid()],
            )
            .await
            .with_context(|| format!("marking recovery {id} undone"))?;
        if n == 0 {
            return Err(Error::conflict(format!(
                "recovery {id} is unknown or was undone already"
            )));
        }
        Ok(())
    }

    /// Records the outcome of recovering from `crash`.
    pub async fn record_recovery(
        &self,
        crash: CrashId,
        started_at: OffsetDateTime,
        completed_at: OffsetDateTime,
        successful: bool,
        notes: &str,
    ) -> Result<()> {
        let conn = get_conn(&self.pool).await?;
        let n = conn
            .execute(
                &format!(
                    "UPDATE {} SET recovery_started_at = $2, recovery_completed_at = $3,
                        recovery_successful = $4, recovery_notes = $5, updated_at = now()
                     WHERE crash_id = $1",
                    self.schema.table("crash_records")
                ),
                &[
                    &crash.as_uuid(),
                    &started_at,
                    &completed_at,
                    &successful,
                    &notes,
                ],
            )
            .await
            .with_context(|| format!("recording the recovery of crash {crash}"))?;
        if n == 0 {
            return Err(Error::not_found(format!("crash {crash}")));
        }
        Ok(())
    }

    /// One crash by id.
    pub async fn get(&self, crash: CrashId) -> Result<StoredCrash> {
        let rows = self
            .query("WHERE crash_id = $1", &[&crash.as_uuid()])
            .await?;
        rows.into_iter()
            .next()
            .ok_or_else(|| Error::not_found(format!("crash {crash}")))
    }

    /// Crashes that happened in `from..to` (either bound open when `None`), newest first.
    pub async fn history(
        &self,
        from: Option<OffsetDateTime>,
        to: Option<OffsetDateTime>,
    ) -> Result<Vec<StoredCrash>> {
        self.query(
            "WHERE ($1::timestamptz IS NULL OR crash_timestamp >= $1)
               AND ($2::timestamptz IS NULL OR crash_timestamp < $2)",
            &[&from, &to],
        )
        .await
    }

    async fn query(
        &self,
        filter: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<StoredCrash>> {
        let conn = get_conn(&self.pool).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT crash_id, crash_timestamp, detected_at, crash_type, severity,
                        exception_type, exception_message, location, stack_trace, signal,
                        fault_address, thread, system_state, affected_components, evidence,
                        diagnostics, recovery_started_at, recovery_completed_at,
                        recovery_successful, recovery_notes
                     FROM {} {filter} ORDER BY crash_timestamp DESC, crash_id DESC",
                    self.schema.table("crash_records")
                ),
                params,
            )
            .await
            .context("reading crash records")?;
        rows.iter()
            .map(|row| {
                let Json(system_state): Json<SystemState> = row.get(12);
                let Json(diag): Json<serde_json::Value> = row.get(15);
                let spool_problems: Vec<SpoolProblem> =
                    serde_json::from_value(diag["spool_problems"].clone()).unwrap_or_default();
                let severity: String = row.get(4);
                let kind: String = row.get(3);
                Ok(StoredCrash {
                    crash: CrashRecord {
                        id: CrashId::from_uuid(row.get(0)),
                        crashed_at: row.get(1),
                        detected_at: row.get(2),
                        kind: parse_kind(&kind),
                        severity: severity.parse().unwrap_or(Severity::High),
                        exception_type: row.get(5),
                        message: row.get(6),
                        location: row.get(7),
                        backtrace: row.get(8),
                        signal: row.get(9),
                        fault_address: row.get::<_, Option<i64>>(10).map(|a| a as u64),
                        thread: row.get(11),
                        system_state,
                        affected_components: row.get(13),
                        evidence: row.get(14),
                        spool_problems,
                    },
                    recovery_started_at: row.get(16),
                    recovery_completed_at: row.get(17),
                    recovery_successful: row.get(18),
                    recovery_notes: row.get(19),
                })
            })
            .collect()
    }
}
