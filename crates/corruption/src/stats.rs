//! The statistics layer (per-column drift against a stored baseline) and deletion
//! checks against the latest good snapshot.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use sanare_core::{CorruptionKind, Error, Result, TableRef};
use sanare_pg::{PgResultExt, catalog, get_conn, quote_ident};

use crate::detector::CorruptionDetector;
use crate::issue::{CorruptionIssue, Layer};
use crate::session;

/// Statistics of one column.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ColumnStats {
    /// Fraction of rows where it is `NULL`.
    pub null_fraction: f64,
    /// Distinct non-null values.
    pub distinct: i64,
    /// Average length of the text form of non-null values.
    pub avg_length: f64,
    /// Smallest value (numeric columns only).
    pub min: Option<f64>,
    /// Largest value (numeric columns only).
    pub max: Option<f64>,
}

/// Statistics of a table, stored as its baseline in `corruption_baselines`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TableStats {
    /// The table.
    pub table: TableRef,
    /// Rows.
    pub row_count: i64,
    /// Per column.
    pub columns: BTreeMap<String, ColumnStats>,
}

/// Types whose minimum and maximum are kept (as `float8`): the integer, float and
/// numeric types, and domains over them. Arrays of them are not numbers.
const NUMERIC_TYPES: &str = "'int2'::regtype, 'int4'::regtype, 'int8'::regtype, \
    'float4'::regtype, 'float8'::regtype, 'numeric'::regtype";

impl CorruptionDetector {
    /// Computes the statistics of `table` now (one full pass; a partitioned table's
    /// partitions together, an inheritance parent without its children), under the
    /// canonical session settings so that text lengths do not depend on the
    /// database's `DateStyle` or `TimeZone`.
    ///
    /// Distinct counts are of the values' text forms, so that every type counts,
    /// `json`, `xml` and `point` (which have no equality) included.
    pub async fn table_stats(&self, table: &TableRef) -> Result<TableStats> {
        let tx = session::read_committed(&self.inner.pool).await?;
        let info = catalog::describe(&***tx, table).await?;
        let shape = tx
            .query(
                &format!(
                    "SELECT a.attname::text,
                            coalesce(nullif(t.typbasetype, 0), t.oid) IN ({NUMERIC_TYPES}),
                            (SELECT relkind = 'p' FROM pg_class WHERE oid = $1)
                       FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                      WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped"
                ),
                &[&info.oid],
            )
            .await
            .with_context(|| format!("reading the column types of {table}"))?;
        let numeric: HashSet<String> = shape
            .iter()
            .filter(|r| r.get::<_, bool>(1))
            .map(|r| r.get(0))
            .collect();
        let partitioned = shape.first().is_some_and(|r| r.get::<_, bool>(2));
        let mut select = vec!["count(*)::bigint".to_owned()];
        for c in &info.columns {
            let q = quote_ident(&c.name);
            select.push(format!("count({q})::bigint"));
            select.push(format!("count(DISTINCT {q}::text)::bigint"));
            select.push(format!("coalesce(avg(length({q}::text)), 0)::float8"));
            if numeric.contains(&c.name) {
                select.push(format!("min({q})::float8"));
                select.push(format!("max({q})::float8"));
            } else {
                select.push("NULL::float8".into());
                select.push("NULL::float8".into());
            }
        }
        let from = if partitioned {
            table.quoted()
        } else {
            format!("ONLY {}", table.quoted())
        };
        let row = tx
            .query_one(&format!("SELECT {} FROM {from}", select.join(", ")), &[])
            .await
            .with_context(|| format!("computing the statistics of {table}"))?;
        tx.commit().await?;
        let rows: i64 = row.get(0);
        let mut columns = BTreeMap::new();
        for (i, c) in info.columns.iter().enumerate() {
            let b = 1 + i * 5;
            let non_null: i64 = row.get(b);
            columns.insert(
                c.name.clone(),
                ColumnStats {
                    null_fraction: if rows == 0 {
                        0.0
                    } else {
                        (rows - non_null) as f64 / rows as f64
                    },
                    distinct: row.get(b + 1),
                    avg_length: row.get(b + 2),
                    min: row.get(b + 3),
                    max: row.get(b + 4),
                },
            );
        }
        Ok(TableStats {
            table: table.clone(),
            row_count: rows,
            columns,
        })
    }

    /// Computes and stores `table`'s baseline (replacing the previous one).
    pub async fn capture_baseline(&self, table: &TableRef) -> Result<TableStats> {
        let stats = self.table_stats(table).await?;
        let conn = get_conn(&self.inner.pool).await?;
        let columns = serde_json::to_value(&stats.columns)
            .map_err(|e| Error::other("encoding column statistics", e))?;
        conn.execute(
            &format!(
                "INSERT INTO {} (table_schema, table_name, captured_at, row_count, columns)
                 VALUES ($1, $2, now(), $3, $4)
                 ON CONFLICT (table_schema, table_name)
                 DO UPDATE SET captured_at = now(), row_count = $3, columns = $4",
                self.inner.schema.table("corruption_baselines")
            ),
            &[&table.schema, &table.name, &stats.row_count, &columns],
        )
        .await
        .context("storing a statistics baseline")?;
        Ok(stats)
    }

    /// Compares `table`'s statistics with its stored baseline and records drift
    /// beyond the configured thresholds: a row-count drop is a
    /// [`CorruptionKind::Truncation`] of the table, a column's drift is
    /// [`CorruptionKind::Unknown`] with the figures. No baseline: no findings.
    pub async fn check_statistics(&self, table: &TableRef) -> Result<Vec<CorruptionIssue>> {
        let baseline = {
            let conn = get_conn(&self.inner.pool).await?;
            conn.query_opt(
                &format!(
                    "SELECT row_count, columns FROM {} WHERE table_schema = $1 AND table_name = $2",
                    self.inner.schema.table("corruption_baselines")
                ),
                &[&table.schema, &table.name],
            )
            .await
            .context("reading a statistics baseline")?
        };
        let Some(baseline) = baseline else {
            return Ok(Vec::new());
        };
        let base_rows: i64 = baseline.get(0);
        let base_cols: BTreeMap<String, ColumnStats> = serde_json::from_value(baseline.get(1))
            .map_err(|e| {
                Error::corrupt(format!("statistics baseline of {table}"), e.to_string())
            })?;
        let now = self.table_stats(table).await?;
        let cfg = &self.inner.config;
        let mut issues = Vec::new();
        if base_rows > 0 {
            let drop = (base_rows - now.row_count) as f64 / base_rows as f64;
            if drop > cfg.max_row_count_drop {
                issues.push(
                    CorruptionIssue::new(
                        table.clone(),
                        CorruptionKind::Truncation,
                        Layer::Statistics,
                        format!(
                            "{table} has {} rows, {:.0}% fewer than its baseline of {base_rows}",
                            now.row_count,
                            drop * 100.0
                        ),
                    )
                    .with_affected(serde_json::json!({
                        "baseline_rows": base_rows, "rows": now.row_count,
                    })),
                );
            }
        }
        let rel = |a: f64, b: f64| {
            if a.abs() < f64::EPSILON {
                b.abs()
            } else {
                (b - a).abs() / a.abs()
            }
        };
        for (name, base) in &base_cols {
            let Some(cur) = now.columns.get(name) else {
                continue;
            };
            let mut reasons = Vec::new();
            if (cur.null_fraction - base.null_fraction).abs() > cfg.max_null_fraction_drift {
                reasons.push(format!(
                    "null fraction {:.2} → {:.2}",
                    base.null_fraction, cur.null_fraction
                ));
            }
            if base.distinct > 10
                && rel(base.distinct as f64, cur.distinct as f64) > cfg.max_relative_drift
            {
                reasons.push(format!(
                    "distinct values {} → {}",
                    base.distinct, cur.distinct
                ));
            }
            if base.avg_length > 0.0
                && rel(base.avg_length, cur.avg_length) > cfg.max_relative_drift
            {
                reasons.push(format!(
                    "average length {:.1} → {:.1}",
                    base.avg_length, cur.avg_length
                ));
            }
            if let (Some(bmin), Some(bmax), Some(cmin), Some(cmax)) =
                (base.min, base.max, cur.min, cur.max)
            {
                let span = (bmax - bmin).abs().max(1.0);
                if cmin < bmin - span * cfg.max_relative_drift
                    || cmax > bmax + span * cfg.max_relative_drift
                {
                    reasons.push(format!("range [{bmin}, {bmax}] → [{cmin}, {cmax}]"));
                }
            }
            if !reasons.is_empty() {
                issues.push(
                    CorruptionIssue::new(
                        table.clone(),
                        CorruptionKind::Unknown,
                        Layer::Statistics,
                        format!(
                            "column {name} of {table} drifted from its baseline: {}",
                            reasons.join("; ")
                        ),
                    )
                    .with_column(name.clone())
                    .with_severity(sanare_core::Severity::Medium)
                    .with_affected(serde_json::json!({ "baseline": base, "current": cur })),
                );
            }
        }
        self.record(&issues).await?;
        Ok(issues)
    }
}
