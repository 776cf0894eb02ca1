//! Crash records in PostgreSQL (`<schema>.crash_records`, spec §8.1 widened).

use sanare_core::{CrashId, CrashKind, Error, Result, Severity};
use sanare_pg::{Migration, Migrations, PgResultExt, Pool, SchemaName, get_conn};
use time::OffsetDateTime;
use tokio_postgres::types::Json;

use crate::detect::{CrashRecord, SystemState};
use crate::spool::SpoolProblem;

/// The recovery component's migrations.
pub const MIGRATIONS: Migrations = Migrations::new(
    "recovery",
    &[Migration::new(
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
    )],
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

/// Reads and writes `crash_records`.
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
