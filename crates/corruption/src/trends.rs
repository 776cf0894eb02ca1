//! Trends over stored issues and post-recovery analysis.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use sanare_core::{Result, TableRef, Violation, ViolationKind};
use sanare_pg::{PgResultExt, get_conn};

use crate::detector::CorruptionDetector;

/// Issues counted by one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Count {
    /// The key (a table `schema.name`, a corruption type, or a day `YYYY-MM-DD`).
    pub key: String,
    /// Issues.
    pub count: i64,
}

/// Which way the issue rate is going.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Direction {
    /// More issues in the second half of the window than in the first.
    Worsening,
    /// Fewer.
    Improving,
    /// About the same (within 10 %, or both zero).
    Stable,
}

/// Trends of issues detected in a window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Trends {
    /// Window start.
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    /// Window end.
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    /// Per table, most first.
    pub by_table: Vec<Count>,
    /// Per corruption type, most first.
    pub by_type: Vec<Count>,
    /// Per UTC day, in order.
    pub by_day: Vec<Count>,
    /// Overall direction (second half of the window against the first).
    pub direction: Direction,
    /// Tables with more issues in the second half than in the first.
    pub worsening_tables: Vec<TableRef>,
}

/// What post-recovery analysis found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecoveryAnalysis {
    /// Damage the recovery found that corruption detection had already recorded.
    pub caught: u64,
    /// Damage the recovery found (integrity violations, corruption findings) on rows
    /// or tables with no corruption issue recorded since `since`: what the scans
    /// missed.
    pub missed: Vec<Violation>,
}

impl CorruptionDetector {
    /// Counts of issues detected in `[from, to)` by table, type and day, the
    /// direction of change and the tables that get worse.
    pub async fn trends(&self, from: OffsetDateTime, to: OffsetDateTime) -> Result<Trends> {
        let conn = get_conn(&self.inner.pool).await?;
        let t = self.inner.schema.table("corruption_issues");
        let mid = from + (to - from) / 2;
        let counts = |sql: String| {
            let conn = &conn;
            async move {
                let rows = conn
                    .query(&sql, &[&from, &to])
                    .await
                    .context("computing corruption trends")?;
                Ok::<_, sanare_core::Error>(
                    rows.iter()
                        .map(|r| Count {
                            key: r.get(0),
                            count: r.get(1),
                        })
                        .collect::<Vec<_>>(),
                )
            }
        };
        let by_table = counts(format!(
            "SELECT table_schema || '.' || table_name, count(*) FROM {t}
              WHERE detected_at >= $1 AND detected_at < $2 GROUP BY 1 ORDER BY 2 DESC, 1"
        ))
        .await?;
        let by_type = counts(format!(
            "SELECT corruption_type, count(*) FROM {t}
              WHERE detected_at >= $1 AND detected_at < $2 GROUP BY 1 ORDER BY 2 DESC, 1"
        ))
        .await?;
        let by_day = counts(format!(
            "SELECT to_char(detected_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), count(*) FROM {t}
              WHERE detected_at >= $1 AND detected_at < $2 GROUP BY 1 ORDER BY 1"
        ))
        .await?;
        let halves = conn
            .query(
                &format!(
                    "SELECT table_schema, table_name,
                            count(*) FILTER (WHERE detected_at < $3),
                            count(*) FILTER (WHERE detected_at >= $3)
                       FROM {t} WHERE detected_at >= $1 AND detected_at < $2 GROUP BY 1, 2 ORDER BY 1, 2"
                ),
                &[&from, &to, &mid],
            )
            .await
            .context("computing corruption trends")?;
        let (mut first, mut second) = (0i64, 0i64);
        let mut worsening_tables = Vec::new();
        for r in &halves {
            let (a, b): (i64, i64) = (r.get(2), r.get(3));
            first += a;
            second += b;
            if b > a {
                worsening_tables.push(TableRef::new(r.get::<_, String>(0), r.get::<_, String>(1)));
            }
        }
        Ok(Trends {
            from,
            to,
            by_table,
            by_type,
            by_day,
            direction: direction(first, second),
            worsening_tables,
        })
    }

    /// Compares the damage a recovery found and repaired (`found`: integrity
    /// violations and corruption findings) with the issues recorded since `since`:
    /// damage on a row (or, for table-level findings, a table) that no issue names
    /// was missed by the scans. Corruption findings produced by this detector count
    /// as caught.
    pub async fn analyze_recovery(
        &self,
        since: OffsetDateTime,
        found: &[Violation],
    ) -> Result<RecoveryAnalysis> {
        let issues = self
            .issues(&crate::IssueQuery {
                from: Some(since),
                ..Default::default()
            })
            .await?;
        let mut caught = 0;
        let mut missed = Vec::new();
        for v in found {
            let hit = issues.iter().any(|i| {
                i.id.as_uuid() == v.id.as_uuid()
                    || (i.table == v.table
                        && match (&v.row, &i.row) {
                            (Some(a), Some(b)) => a == b,
                            (None, _) => true,
                            (Some(_), None) => {
                                i.row.is_none()
                                    && matches!(v.kind, ViolationKind::Corruption { .. })
                            }
                        })
            });
            if hit {
                caught += 1;
            } else {
                missed.push(v.clone());
            }
        }
        metrics::counter!("sanare_corruption_missed_total").increment(missed.len() as u64);
        Ok(RecoveryAnalysis { caught, missed })
    }
}

/// Direction of change from `first` to `second` half counts.
pub fn direction(first: i64, second: i64) -> Direction {
    let tolerance = (first.max(second) as f64 * 0.1).max(0.0);
    if ((second - first) as f64).abs() <= tolerance {
        Direction::Stable
    } else if second > first {
        Direction::Worsening
    } else {
        Direction::Improving
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions() {
        assert_eq!(direction(0, 0), Direction::Stable);
        assert_eq!(direction(10, 10), Direction::Stable);
        assert_eq!(direction(1, 5), Direction::Worsening);
        assert_eq!(direction(5, 1), Direction::Improving);
    }
}
