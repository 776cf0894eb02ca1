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

    /// Sets the recommended action.
    pub fn with_recommended_action(mut self, action: impl Into<String>) -> Self {
        self.recommended_action = action.into();
        self
    }

    /// A stable identity of the problem (kind, table, row, column, index, and for a
    /// physical finding the relation and block): the same damage found twice has
    /// the same fingerprint, and only one unresolved issue is stored per
    /// fingerprint. Also the alert dedup key.
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
        let mut fp = format!(
            "corruption:{}:{}:{}:{}:{}",
            self.kind.as_str(),
            self.table,
            row,
            self.column.as_deref().unwrap_or(""),
            self.index.as_deref().unwrap_or("")
        );
        if self.layer == Layer::Physical
            && let Some(block) = self.affected.get("block").and_then(|b| b.as_i64())
        {
            let relation = self.affected.get("relation").and_then(|r| r.as_str());
            fp.push_str(&format!(":{}@{block}", relation.unwrap_or("")));
        }
        fp
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

/// Inserts `issues` in one statement, each unless an unresolved issue with the
/// same fingerprint exists (or an earlier one of `issues` has it). Returns the ids
/// of those inserted.
pub(crate) async fn insert_issues(
    client: &impl GenericClient,
    schema: &SchemaName,
    issues: &[CorruptionIssue],
) -> Result<std::collections::HashSet<IssueId>> {
    let mut ids = Vec::with_capacity(issues.len());
    let mut detected = Vec::with_capacity(issues.len());
    let mut text: [Vec<Option<String>>; 10] = Default::default();
    let mut row_keys = Vec::with_capacity(issues.len());
    let mut affected = Vec::with_capacity(issues.len());
    for issue in issues {
        ids.push(issue.id.as_uuid());
        detected.push(issue.detected_at);
        row_keys.push(
            issue
                .row
                .as_ref()
                .map(|r| serde_json::to_value(&r.key))
                .transpose()
                .map_err(|e| Error::other("encoding a row key", e))?,
        );
        affected.push(issue.affected.clone());
        let fields = [
            Some(issue.table.schema.clone()),
            Some(issue.table.name.clone()),
            Some(issue.kind.as_str().to_owned()),
            Some(issue.severity.as_str().to_owned()),
            Some(issue.layer.as_str().to_owned()),
            issue.column.clone(),
            issue.index.clone(),
            Some(issue.description.clone()),
            Some(issue.recommended_action.clone()),
            Some(issue.fingerprint()),
        ];
        for (column, value) in text.iter_mut().zip(fields) {
            column.push(value);
        }
    }
    let [
        ts,
        tn,
        kind,
        severity,
        layer,
        column,
        index,
        description,
        action,
        fingerprint,
    ] = &text;
    let rows = client
        .query(
            &format!(
                "INSERT INTO {} (id, detected_at, table_schema, table_name, corruption_type, \
                 severity, layer, row_key, column_name, index_name, description, affected, \
                 recommended_action, fingerprint) \
                 SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], \
                   $5::text[], $6::text[], $7::text[], $8::jsonb[], $9::text[], $10::text[], \
                   $11::text[], $12::jsonb[], $13::text[], $14::text[]) \
                 ON CONFLICT (fingerprint) WHERE resolved_at IS NULL DO NOTHING \
                 RETURNING id",
                schema.table("corruption_issues")
            ),
            &[
                &ids,
                &detected,
                ts,
                tn,
                kind,
                severity,
                layer,
                &row_keys,
                column,
                index,
                description,
                &affected,
                action,
                fingerprint,
            ],
        )
        .await
        .context("recording corruption issues")?;
    Ok(rows.iter().map(|r| IssueId::from_uuid(r.get(0))).collect())
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
                "SELECT {ISSUE_COLUMNS} FROM {} \
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

/// One stored issue by id.
pub(crate) async fn get_issue(
    client: &impl GenericClient,
    schema: &SchemaName,
    id: IssueId,
) -> Result<Option<CorruptionIssue>> {
    client
        .query_opt(
            &format!(
                "SELECT {ISSUE_COLUMNS} FROM {} WHERE id = $1",
                schema.table("corruption_issues")
            ),
            &[&id.as_uuid()],
        )
        .await
        .context("reading a corruption issue")?
        .as_ref()
        .map(issue_from_row)
        .transpose()
}

const ISSUE_COLUMNS: &str = "id, detected_at, table_schema, table_name, corruption_type, \
    severity, layer, row_key, column_name, index_name, description, affected, \
    recommended_action, resolved_at, resolution";

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
