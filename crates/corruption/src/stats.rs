//! The statistics layer (per-column drift against a stored baseline) and deletion
//! checks against the latest good snapshot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use sanare_core::{ColumnValue, Control, CorruptionKind, Error, Result, RowRef, TableRef};
use sanare_pg::{PgResultExt, catalog, get_conn, quote_ident};

use crate::detector::CorruptionDetector;
use crate::issue::{CorruptionIssue, Layer};

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

const NUMERIC: [&str; 7] = [
    "smallint",
    "integer",
    "bigint",
    "real",
    "double precision",
    "numeric",
    "money",
];

impl CorruptionDetector {
    /// Computes the statistics of `table` now (one full pass).
    pub async fn table_stats(&self, table: &TableRef) -> Result<TableStats> {
        let conn = get_conn(&self.inner.pool).await?;
        let info = catalog::describe(&**conn, table).await?;
        let mut select = vec!["count(*)::bigint".to_owned()];
        for c in &info.columns {
            let q = quote_ident(&c.name);
            let numeric =
                NUMERIC.iter().any(|n| c.type_name.starts_with(n)) && c.type_name != "money";
            select.push(format!("count({q})::bigint"));
            select.push(format!("count(DISTINCT {q})::bigint"));
            select.push(format!("coalesce(avg(length({q}::text)), 0)::float8"));
            if numeric {
                select.push(format!("min({q})::float8"));
                select.push(format!("max({q})::float8"));
            } else {
                select.push("NULL::float8".into());
                select.push("NULL::float8".into());
            }
        }
        let row = conn
            .query_one(
                &format!("SELECT {} FROM {}", select.join(", "), table.quoted()),
                &[],
            )
            .await
            .with_context(|| format!("computing the statistics of {table}"))?;
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

    /// Finds rows of `table` that the latest good snapshot has and the table no
    /// longer has, for tables with a single integer primary key: the gaps in the
    /// key range (up to the configured probe limit) are looked up in the snapshot.
    /// Each row found there is recorded as a [`CorruptionKind::Deletion`].
    ///
    /// Run it right after a snapshot or restore: rows the application deleted since
    /// the snapshot are reported too, because the journal service does not expose
    /// per-row history through its trait.
    pub async fn check_deletions(
        &self,
        table: &TableRef,
        control: &Control,
    ) -> Result<Vec<CorruptionIssue>> {
        let Some(snapshots) = &self.inner.snapshots else {
            return Err(Error::unavailable(
                "deletion checks need a snapshot service (CorruptionDetector::builder().snapshots(..))",
            ));
        };
        let Some(snap) = snapshots.latest_good(None).await? else {
            return Ok(Vec::new());
        };
        let conn = get_conn(&self.inner.pool).await?;
        let info = catalog::describe(&**conn, table).await?;
        let [pk] = info.primary_key.as_slice() else {
            return Err(Error::invalid_input(format!(
                "deletion checks need a single-column integer primary key; {table} has {:?}",
                info.primary_key
            )));
        };
        let ty = info
            .column(pk)
            .map(|c| c.type_name.clone())
            .unwrap_or_default();
        if !["smallint", "integer", "bigint"].contains(&ty.as_str()) {
            return Err(Error::invalid_input(format!(
                "deletion checks need an integer primary key; {table}.{pk} is {ty}"
            )));
        }
        let expected = snap
            .tables
            .iter()
            .find(|t| &t.table == table)
            .map_or(0, |t| i64::try_from(t.rows).unwrap_or(i64::MAX));
        let q = quote_ident(pk);
        // Probe gaps inside the key range and just past it (deleted tail rows).
        let rows = conn
            .query(
                &format!(
                    "WITH b AS (SELECT coalesce(min({q}), 1)::bigint lo, coalesce(max({q}), 0)::bigint hi FROM {t})
                     SELECT g FROM b, generate_series(b.lo, b.hi + greatest($2 - (SELECT count(*) FROM {t}), 0)) g
                      WHERE NOT EXISTS (SELECT 1 FROM {t} x WHERE x.{q} = g)
                      ORDER BY g LIMIT $1",
                    t = table.quoted()
                ),
                &[&self.inner.config.deletion_probe_limit, &expected],
            )
            .await
            .with_context(|| format!("probing key gaps of {table}"))?;
        control.checkpoint()?;
        let keys: Vec<RowRef> = rows
            .iter()
            .map(|r| {
                RowRef::new(
                    table.clone(),
                    vec![ColumnValue::new(
                        pk.clone(),
                        ty.clone(),
                        Some(r.get::<_, i64>(0).to_string()),
                    )],
                )
            })
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let images = snapshots.fetch_rows(snap.id, &keys).await?;
        let issues: Vec<CorruptionIssue> = images
            .iter()
            .filter_map(|img| {
                let row = img.row_ref(&[pk.as_str()])?;
                Some(
                    CorruptionIssue::new(
                        table.clone(),
                        CorruptionKind::Deletion,
                        Layer::Pattern,
                        format!(
                            "row {row} is in snapshot {} but gone from the table",
                            snap.id
                        ),
                    )
                    .with_row(row)
                    .with_affected(serde_json::json!({
                        "snapshot": snap.id.to_string(),
                        "last_known_good": crate::scan::image_json(&img.values),
                    })),
                )
            })
            .collect();
        self.record(&issues).await?;
        Ok(issues)
    }
}
