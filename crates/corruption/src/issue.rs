//! Corruption issues: what was found, stored in `corruption_issues` (spec §8.6).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_postgres::GenericClient;

use sanare_core::{
    ColumnValue, CorruptionKind, Error, IssueId, Result, RowRef, Severity, TableRef, Violation,
    ViolationId, ViolationKind,
};
use sanare_pg::{PgResultExt, SchemaName};

/// Which detection layer found an issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Layer {
    /// A row's stored checksum disagrees with its values.
    Checksum,
    /// amcheck or the server's data-page checksums.
    Physical,
    /// A value or row compared with its last known good version.
    Pattern,
    /// Column statistics drifted from the stored baseline.
    Statistics,
}

impl Layer {
    /// The stable name, as stored.
    pub const fn as_str(self) -> &'static str {
        match self {
            Layer::Checksum => "checksum",
            Layer::Physical => "physical",
            Layer::Pattern => "pattern",
            Layer::Statistics => "statistics",
        }
    }

    fn parse(s: &str) -> Layer {
        match s {
            "checksum" => Layer::Checksum,
            "physical" => Layer::Physical,
            "statistics" => Layer::Statistics,
            _ => Layer::Pattern,
        }
    }
}

/// One corruption finding, as stored in `<schema>.corruption_issues`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CorruptionIssue {
    /// Its id.
    pub id: IssueId,
    /// When it was found.
    #[serde(with = "time::serde::rfc3339")]
    pub detected_at: OffsetDateTime,
    /// The damaged table.
    pub table: TableRef,
    /// The shape of the damage.
    pub kind: CorruptionKind,
    /// How bad.
    pub severity: Severity,
    /// Which layer found it.
    pub layer: Layer,
    /// The damaged row, when one is known.
    pub row: Option<RowRef>,
    /// The damaged column, when one is known.
    pub column: Option<String>,
    /// The damaged index, when one is known.
    pub index: Option<String>,
    /// One line of what was found.
    pub description: String,
    /// The affected data: the current and last known good values, block numbers,
    /// amcheck messages, statistics.
    pub affected: serde_json::Value,
    /// What an operator (or the repair engine) should do.
    pub recommended_action: String,
    /// When it was resolved.
    #[serde(with = "time::serde::rfc3339::option")]
    pub resolved_at: Option<OffsetDateTime>,
    /// How it was resolved.
    pub resolution: Option<String>,
}

impl CorruptionIssue {
    /// A new, unresolved issue found now.
    pub fn new(
        table: TableRef,
        kind: CorruptionKind,
        layer: Layer,
        description: impl Into<String>,
    ) -> Self {
        Self {
            id: IssueId::new(),
            detected_at: sanare_core::now(),
            severity: default_severity(kind),
            recommended_action: default_action(kind).to_owned(),
            table,
            kind,
            layer,
            row: None,
            column: None,
            index: None,
            description: description.into(),
            affected: serde_json::Value::Null,
            resolved_at: None,
            resolution: None,
        }
    }

    /// Sets the row.
    pub fn with_row(mut self, row: RowRef) -> Self {
        self.row = Some(row);
        self
    }

    /// Sets the column.
    pub fn with_column(mut self, column: impl Into<String>) -> Self {
        self.column = Some(column.into());
        self
    }

    /// Sets the index.
    pub fn with_index(mut self, index: impl Into<String>) -> Self {
        self.index = Some(index.into());
        self
    }

    /// Sets the affected data.
    pub fn with_affected(mut self, affected: serde_json::Value) -> Self {
        self.affected = affected;
        self
    }

    /// Sets the severity.
    pub fn with_severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    /// A stable identity of the problem (kind, table, row, column, index): the same
    /// damage found twice has the same fingerprint, and only one unresolved issue is
    /// stored per fingerprint. Also the alert dedup key.
    pub fn fingerprint(&self) -> String {
        let row = self
            .row
            .as_ref()
            .map(|r| {
                r.key
                    .iter()
                    .map(|c| format!("{}={}", c.column, c.value.as_deref().unwrap_or("NULL")))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        format!(
            "corruption:{}:{}:{}:{}:{}",
            self.kind.as_str(),
            self.table,
            row,
            self.column.as_deref().unwrap_or(""),
            self.index.as_deref().unwrap_or("")
        )
    }

    /// The finding as a [`Violation`] for the repair engine (same id bytes, kind
    /// [`ViolationKind::Corruption`]).
    pub fn to_violation(&self) -> Violation {
        let mut v = Violation::new(
            ViolationKind::Corruption {
                kind: self.kind,
                column: self.column.clone(),
                index: self.index.clone(),
            },
            self.severity,
            self.table.clone(),
            self.row.clone(),
            self.description.clone(),
        )
        .with_recommended_action(self.recommended_action.clone())
        .with_details(serde_json::json!({
            "issue": self.id.to_string(),
            "layer": self.layer.as_str(),
            "affected": self.affected,
        }));
        v.id = ViolationId::from_uuid(self.id.as_uuid());
        v.detected_at = self.detected_at;
        v
    }
}

/// The default severity of a kind: physical and structural damage is critical,
/// value damage high, statistical suspicion medium.
pub fn default_severity(kind: CorruptionKind) -> Severity {
    match kind {
        CorruptionKind::Metadata | CorruptionKind::Index => Severity::Critical,
        CorruptionKind::BitFlip
        | CorruptionKind::Truncation
        | CorruptionKind::Injection
        | CorruptionKind::Deletion => Severity::High,
        _ => Severity::Medium,
    }
}

/// The default recommended action of a kind.
pub fn default_action(kind: CorruptionKind) -> &'static str {
    match kind {
        CorruptionKind::BitFlip | CorruptionKind::Truncation => {
            "restore the row from the latest good snapshot (repair strategy: restore from snapshot)"
        }
        CorruptionKind::Injection => {
            "review the row and delete it if no application wrote it (repair strategy: delete row)"
        }
        CorruptionKind::Deletion => {
            "re-insert the row from the latest good snapshot (repair strategy: restore from snapshot)"
        }
        CorruptionKind::Index => "REINDEX the index (CONCURRENTLY when online)",
        CorruptionKind::Metadata => {
            "stop writes to the table, check the storage, and restore the table from the latest good snapshot"
        }
        _ => "investigate the table and compare it with the latest good snapshot",
    }
}

/// A query over stored issues.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IssueQuery {
    /// Detected at or after.
    pub from: Option<OffsetDateTime>,
    /// Detected before.
    pub to: Option<OffsetDateTime>,
    /// Only this table.
    pub table: Option<TableRef>,
    /// Only unresolved issues.
    pub unresolved_only: bool,
    /// At most this many, newest first (all when `None`).
    pub limit: Option<i64>,
}

impl IssueQuery {
    /// Every issue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Detected in `[from, to)`.
    pub fn between(mut self, from: OffsetDateTime, to: OffsetDateTime) -> Self {
        self.from = Some(from);
        self.to = Some(to);
        self
    }

    /// Only `table`.
    pub fn table(mut self, table: TableRef) -> Self {
        self.table = Some(table);
        self
    }

    /// Only unresolved.
    pub fn unresolved(mut self) -> Self {
        self.unresolved_only = true;
        self
    }
}

/// Inserts `issue` unless an unresolved issue with the same fingerprint exists.
/// Returns whether it was new.
pub(crate) async fn insert_issue(
    client: &impl GenericClient,
    schema: &SchemaName,
    issue: &CorruptionIssue,
) -> Result<bool> {
    let row_key = issue
        .row
        .as_ref()
        .map(|r| serde_json::to_value(&r.key))
        .transpose()
        .map_err(|e| Error::other("encoding a row key", e))?;
    let n = client
        .execute(
            &format!(
                "INSERT INTO {} (id, detected_at, table_schema, table_name, corruption_type, \
                 severity, layer, row_key, column_name, index_name, description, affected, \
                 recommended_action, fingerprint) \
                 VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14) \
                 ON CONFLICT (fingerprint) WHERE resolved_at IS NULL DO NOTHING",
                schema.table("corruption_issues")
            ),
            &[
                &issue.id.as_uuid(),
                &issue.detected_at,
                &issue.table.schema,
                &issue.table.name,
                &issue.kind.as_str(),
                &issue.severity.as_str(),
                &issue.layer.as_str(),
                &row_key,
                &issue.column,
                &issue.index,
                &issue.description,
                &issue.affected,
                &issue.recommended_action,
                &issue.fingerprint(),
            ],
        )
        .await
        .context("recording a corruption issue")?;
    Ok(n == 1)
}

pub(crate) async fn query_issues(
    client: &impl GenericClient,
    schema: &SchemaName,
    q: &IssueQuery,
) -> Result<Vec<CorruptionIssue>> {
    let (ts, tn) = q
        .table
        .as_ref()
        .map(|t| (Some(t.schema.clone()), Some(t.name.clone())))
        .unwrap_or((None, None));
    let rows = client
        .query(
            &format!(
                "SELECT id, detected_at, table_schema, table_name, corruption_type, severity, \
                 layer, row_key, column_name, index_name, description, affected, \
                 recommended_action, resolved_at, resolution FROM {} \
                 WHERE ($1::timestamptz IS NULL OR detected_at >= $1) \
                   AND ($2::timestamptz IS NULL OR detected_at < $2) \
                   AND ($3::text IS NULL OR (table_schema = $3 AND table_name = $4)) \
                   AND (NOT $5 OR resolved_at IS NULL) \
                 ORDER BY detected_at DESC, id LIMIT $6",
                schema.table("corruption_issues")
            ),
            &[&q.from, &q.to, &ts, &tn, &q.unresolved_only, &q.limit],
        )
        .await
        .context("querying corruption issues")?;
    rows.iter().map(issue_from_row).collect()
}

fn issue_from_row(r: &tokio_postgres::Row) -> Result<CorruptionIssue> {
    let table = TableRef::new(r.get::<_, String>(2), r.get::<_, String>(3));
    let kind_s: String = r.get(4);
    let kind: CorruptionKind = serde_json::from_value(serde_json::Value::String(kind_s.clone()))
        .map_err(|_| Error::corrupt("corruption issue row", format!("unknown type `{kind_s}`")))?;
    let severity: Severity = r.get::<_, String>(5).parse()?;
    let row_key: Option<serde_json::Value> = r.get(7);
    let row = row_key
        .map(serde_json::from_value::<Vec<ColumnValue>>)
        .transpose()
        .map_err(|e| Error::other("decoding a stored row key", e))?
        .map(|key| RowRef::new(table.clone(), key));
    Ok(CorruptionIssue {
        id: IssueId::from_uuid(r.get(0)),
        detected_at: r.get(1),
        table,
        kind,
        severity,
        layer: Layer::parse(&r.get::<_, String>(6)),
        row,
        column: r.get(8),
        index: r.get(9),
        description: r.get(10),
        affected: r.get(11),
        recommended_action: r.get(12),
        resolved_at: r.get(13),
        resolution: r.get(14),
    })
}

pub(crate) async fn resolve_issue(
    client: &impl GenericClient,
    schema: &SchemaName,
    id: IssueId,
    resolution: &str,
) -> Result<bool> {
    let n = client
        .execute(
            &format!(
                "UPDATE {} SET resolved_at = now(), resolution = $2 WHERE id = $1 AND resolved_at IS NULL",
                schema.table("corruption_issues")
            ),
            &[&id.as_uuid(), &resolution],
        )
        .await
        .context("resolving a corruption issue")?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issue_becomes_a_violation_with_the_same_id_and_facts() {
        let t = TableRef::new("public", "customers");
        let issue = CorruptionIssue::new(t.clone(), CorruptionKind::BitFlip, Layer::Checksum, "x")
            .with_row(RowRef::new(
                t.clone(),
                vec![ColumnValue::new("id", "bigint", Some("7"))],
            ))
            .with_column("email");
        let v = issue.to_violation();
        assert_eq!(v.id.as_uuid(), issue.id.as_uuid());
        assert_eq!(v.severity, Severity::High);
        assert_eq!(v.table, t);
        assert_eq!(
            v.kind,
            ViolationKind::Corruption {
                kind: CorruptionKind::BitFlip,
                column: Some("email".into()),
                index: None
            }
        );
        assert!(v.recommended_action.contains("snapshot"));
        assert_eq!(
            issue.fingerprint(),
            "corruption:bit_flip:public.customers:id=7:email:"
        );
    }
}
