//! The audit trail: `repair_operations` rows read back, status changes, log lines.

use sanare_core::{
    BoxStream, Error, RepairId, RepairPlan, RepairStatus, Result, SnapshotId, TableRef,
};
use sanare_pg::{PgResultExt, Pool, SchemaName, get_conn};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::engine::RepairEngine;

/// One `repair_operations` row: a plan and its audit trail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepairRecord {
    /// The plan, with its current status and approver.
    pub plan: RepairPlan,
    /// The decision-table row that chose the strategy.
    pub rule: String,
    /// When it was planned.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was approved.
    #[serde(with = "time::serde::rfc3339::option")]
    pub approved_at: Option<OffsetDateTime>,
    /// When it last started.
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    /// When it completed or failed.
    #[serde(with = "time::serde::rfc3339::option")]
    pub completed_at: Option<OffsetDateTime>,
    /// When it was rolled back.
    #[serde(with = "time::serde::rfc3339::option")]
    pub rolled_back_at: Option<OffsetDateTime>,
    /// Who ran it.
    pub executed_by: Option<String>,
    /// Rows it changed (page through them with
    /// [`RepairEngine::targets`](crate::RepairEngine::targets) and
    /// [`RepairEngine::quarantine`](crate::RepairEngine::quarantine)).
    pub rows_affected: Option<u64>,
    /// Rows it left alone: changed since planning, or no longer violating.
    pub rows_skipped: Option<u64>,
    /// The snapshot taken before it ran (critical repairs).
    pub pre_repair_snapshot: Option<SnapshotId>,
    /// What happened while it ran, one line per step.
    pub execution_log: Vec<String>,
    /// What happened while it was rolled back.
    pub rollback_log: Vec<String>,
    /// Why it last failed.
    pub error_message: Option<String>,
}

/// A record with its stored action (not yet decoded) and table.
pub(crate) struct Loaded {
    pub(crate) record: RepairRecord,
    pub(crate) action: serde_json::Value,
    pub(crate) table: TableRef,
}

pub(crate) const RECORD_COLUMNS: &str =
    "id, plan, rule, action, status, approved_by, created_at, approved_at, started_at, completed_at,
     rolled_back_at, executed_by, rows_affected, rows_skipped, pre_repair_snapshot, execution_log,
     rollback_log, error_message, table_schema, table_name, violation_count";

pub(crate) fn status_code(s: RepairStatus) -> &'static str {
    s.as_str()
}

fn parse_status(s: &str) -> Result<RepairStatus> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|e| Error::corrupt("repair_operations.status", format!("`{s}`: {e}")))
}

fn nonneg(n: Option<i64>) -> Option<u64> {
    n.map(|n| u64::try_from(n).unwrap_or(0))
}

pub(crate) fn loaded_from_row(r: &tokio_postgres::Row) -> Result<Loaded> {
    let id = RepairId::from_uuid(r.get("id"));
    let mut plan: RepairPlan = serde_json::from_value(r.get("plan")).map_err(|e| {
        Error::corrupt(
            format!("repair_operations.plan of repair {id}"),
            e.to_string(),
        )
    })?;
    plan.status = parse_status(r.get("status"))?;
    plan.approved_by = r.get("approved_by");
    if plan.violation_count == 0 {
        plan.violation_count = nonneg(r.get("violation_count")).unwrap_or(0);
    }
    let strings = |v: serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Loaded {
        record: RepairRecord {
            plan,
            rule: r.get("rule"),
            created_at: r.get("created_at"),
            approved_at: r.get("approved_at"),
            started_at: r.get("started_at"),
            completed_at: r.get("completed_at"),
            rolled_back_at: r.get("rolled_back_at"),
            executed_by: r.get("executed_by"),
            rows_affected: nonneg(r.get("rows_affected")),
            rows_skipped: nonneg(r.get("rows_skipped")),
            pre_repair_snapshot: r
                .get::<_, Option<uuid::Uuid>>("pre_repair_snapshot")
                .map(SnapshotId::from_uuid),
            execution_log: strings(r.get("execution_log")),
            rollback_log: strings(r.get("rollback_log")),
            error_message: r.get("error_message"),
        },
        action: r.get("action"),
        table: TableRef::new(
            r.get::<_, String>("table_schema"),
            r.get::<_, String>("table_name"),
        ),
    })
}

/// How many records a history page reads.
const HISTORY_PAGE: i64 = 200;

/// Repairs planned in `from..to`, oldest first, read a page at a time.
pub(crate) fn history(
    pool: Pool,
    schema: SchemaName,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> BoxStream<'static, Result<RepairRecord>> {
    let table = schema.table("repair_operations");
    crate::page::paged((from, uuid::Uuid::nil()), move |(at, id)| {
        let (pool, table) = (pool.clone(), table.clone());
        async move {
            let conn = get_conn(&pool).await?;
            let rows = conn
                .query(
                    &format!(
                        "SELECT {RECORD_COLUMNS} FROM {table}
                          WHERE (created_at, id) > ($1, $2) AND created_at < $3
                          ORDER BY created_at, id LIMIT {HISTORY_PAGE}"
                    ),
                    &[&at, &id, &to],
                )
                .await
                .context("reading the repair history")?;
            let next = (rows.len() as i64 == HISTORY_PAGE)
                .then(|| rows.last().map(|r| (r.get("created_at"), r.get("id"))))
                .flatten();
            let page = rows
                .iter()
                .map(|r| loaded_from_row(r).map(|l| l.record))
                .collect::<Result<Vec<_>>>()?;
            Ok((page, next))
        }
    })
}

/// An error with its sources, for the audit trail.
pub(crate) fn error_chain(e: &Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

impl RepairEngine {
    pub(crate) async fn load(&self, repair: RepairId) -> Result<Loaded> {
        let conn = get_conn(self.pool()).await?;
        let row = conn
            .query_opt(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM {} WHERE id = $1",
                    self.t("repair_operations")
                ),
                &[&repair.as_uuid()],
            )
            .await
            .with_context(|| format!("reading repair {repair}"))?
            .ok_or_else(|| Error::not_found(format!("repair {repair}")))?;
        loaded_from_row(&row)
    }

    /// Appends a line to the execution or rollback log.
    pub(crate) async fn log(&self, repair: RepairId, rollback: bool, line: String) -> Result<()> {
        let column = if rollback {
            "rollback_log"
        } else {
            "execution_log"
        };
        let conn = get_conn(self.pool()).await?;
        conn.execute(
            &format!(
                "UPDATE {} SET {column} = {column} || jsonb_build_array($2::text) WHERE id = $1",
                self.t("repair_operations")
            ),
            &[&repair.as_uuid(), &line],
        )
        .await
        .with_context(|| format!("appending to the log of repair {repair}"))?;
        Ok(())
    }

    pub(crate) async fn set_status(
        &self,
        repair: RepairId,
        status: RepairStatus,
        error: Option<&str>,
    ) -> Result<()> {
        // A connection killed during the repair may come back from the pool once
        // before the pool notices: retry once on a retryable error.
        match self.set_status_once(repair, status, error).await {
            Err(e) if e.is_retryable() => self.set_status_once(repair, status, error).await,
            other => other,
        }
    }

    async fn set_status_once(
        &self,
        repair: RepairId,
        status: RepairStatus,
        error: Option<&str>,
    ) -> Result<()> {
        let conn = get_conn(self.pool()).await?;
        let times = match status {
            RepairStatus::InProgress => ", started_at = now()",
            RepairStatus::Failed | RepairStatus::Completed => ", completed_at = now()",
            _ => "",
        };
        conn.execute(
            &format!(
                "UPDATE {} SET status = $2, error_message = coalesce($3, error_message) {times} WHERE id = $1",
                self.t("repair_operations")
            ),
            &[&repair.as_uuid(), &status_code(status), &error],
        )
        .await
        .with_context(|| format!("recording status {} of repair {repair}", status_code(status)))?;
        Ok(())
    }
}
