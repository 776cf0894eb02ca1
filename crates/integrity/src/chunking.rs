//! Splits a table into chunks of about `chunk_rows` rows: key ranges, or heap block
//! ranges for a table without a primary key. The first and last chunks are open, so
//! rows inserted after planning are covered too.
//!
//! Statistics are a hint, never a requirement. A single integer key of an analysed
//! table is split into equal-width ranges between its `min` and `max` (two index
//! reads), the row count scaled from `reltuples / relpages` to the table's current
//! size as the planner does; any other key, or a table never analysed
//! (`reltuples = -1`), is walked through its key index, one bound per `chunk_rows`
//! rows. A table without a key is split by blocks, its rows per block from the
//! statistics or, without them, counted in its first blocks.

use sanare_core::Result;
use sanare_pg::PgResultExt;

use crate::plan::TablePlan;
use crate::units::{Pred, Rows};

/// Blocks counted to estimate the rows per block of a table without statistics.
const SAMPLE_BLOCKS: i64 = 16;

/// The chunks of `plan`'s table. `client` is inside the scan's snapshot, with the
/// probes' session settings (bounds are read as text under them).
pub(crate) async fn plan_chunks(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    chunk_rows: u64,
) -> Result<Vec<Rows>> {
    let blocks = relation_blocks(client, plan).await?;
    let chunk_rows = i64::try_from(chunk_rows).unwrap_or(i64::MAX).max(1);
    if plan.by_ctid() {
        return by_blocks(client, plan, blocks, chunk_rows).await;
    }
    let integer = plan.key.len() == 1
        && matches!(
            plan.key[0].type_name.as_str(),
            "bigint" | "integer" | "smallint"
        );
    match estimated_rows(plan, blocks) {
        Some(rows) if integer => by_width(client, plan, rows, chunk_rows).await,
        _ => by_walk(client, plan, chunk_rows).await,
    }
}

async fn relation_blocks(client: &tokio_postgres::Client, plan: &TablePlan) -> Result<i64> {
    let row = client
        .query_one(
            "SELECT (pg_relation_size(c.oid) / current_setting('block_size')::int)::bigint
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&plan.table.schema, &plan.table.name],
        )
        .await
        .with_context(|| format!("measuring {}", plan.table))?;
    Ok(row.get(0))
}

/// The rows of the table now, from its statistics scaled to its current size;
/// `None` without statistics.
fn estimated_rows(plan: &TablePlan, blocks: i64) -> Option<i64> {
    if plan.reltuples < 0.0 || plan.relpages <= 0 {
        return None;
    }
    let density = plan.reltuples / plan.relpages as f64;
    // Rounded; a count, far below i64::MAX.
    #[allow(clippy::cast_possible_truncation)]
    let rows = (density * blocks as f64).round() as i64;
    Some(rows.max(1))
}

async fn by_blocks(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    blocks: i64,
    chunk_rows: i64,
) -> Result<Vec<Rows>> {
    let per_block = match estimated_rows(plan, blocks) {
        Some(rows) if blocks > 0 => (rows / blocks).max(1),
        _ if blocks > 0 => {
            let sample = blocks.min(SAMPLE_BLOCKS);
            let pred = Pred::of_rows(
                plan,
                &Rows::Blocks {
                    from: None,
                    to: u32::try_from(sample).ok(),
                },
            );
            let sql = format!(
                "SELECT count(*) FROM {} t WHERE {}",
                plan.rows_sql(),
                pred.render(0)
            );
            let n: i64 = client
                .query_one(&sql, &pred.params())
                .await
                .with_context(|| {
                    format!("counting the rows of the first blocks of {}", plan.table)
                })?
                .get(0);
            (n / sample).max(1)
        }
        _ => 1,
    };
    let step = (chunk_rows / per_block).max(1);
    let mut cuts = Vec::new();
    let mut b = step;
    while b < blocks {
        cuts.push(u32::try_from(b).unwrap_or(u32::MAX));
        b += step;
    }
    Ok(ranges(cuts, |from, to| Rows::Blocks {
        from: from.copied(),
        to: to.copied(),
    }))
}

/// Equal-width ranges of a single integer key between its `min` and `max`: plain
/// aggregates, answered from the two ends of the key's index.
async fn by_width(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    rows: i64,
    chunk_rows: i64,
) -> Result<Vec<Rows>> {
    let k = plan.key_expr(&plan.key[0]);
    let row = client
        .query_one(
            &format!(
                "SELECT min({k})::bigint, max({k})::bigint FROM {} t",
                plan.rows_sql()
            ),
            &[],
        )
        .await
        .with_context(|| format!("reading the key range of {}", plan.table))?;
    let (lo, hi): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
    let mut cuts = Vec::new();
    if let (Some(lo), Some(hi)) = (lo, hi) {
        let span = hi.saturating_sub(lo).saturating_add(1).max(1);
        let nchunks = (rows + chunk_rows - 1) / chunk_rows;
        let width = (span / nchunks.max(1)).max(1);
        let mut b = lo.saturating_add(width);
        while b <= hi {
            cuts.push(vec![b.to_string()]);
            b = b.saturating_add(width);
        }
    }
    Ok(ranges(cuts, |from, to| Rows::Range {
        from: from.cloned(),
        to: to.cloned(),
    }))
}

/// Walks the key index: each bound is the key `chunk_rows` rows after the previous
/// one.
async fn by_walk(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    chunk_rows: i64,
) -> Result<Vec<Rows>> {
    let order: Vec<String> = plan.key.iter().map(|k| plan.key_expr(k)).collect();
    let mut cuts: Vec<Vec<String>> = Vec::new();
    loop {
        let pred = Pred::of_rows(
            plan,
            &Rows::Range {
                from: cuts.last().cloned(),
                to: None,
            },
        );
        let sql = format!(
            "SELECT {} FROM {} t WHERE {} ORDER BY {} OFFSET {chunk_rows} LIMIT 1",
            plan.key_select(),
            plan.rows_sql(),
            pred.render(0),
            order.join(", ")
        );
        let row = client
            .query_opt(&sql, &pred.params())
            .await
            .with_context(|| format!("planning key-range chunks of {}", plan.table))?;
        let Some(row) = row else { break };
        let key: Option<Vec<String>> = (0..plan.key.len())
            .map(|i| row.get::<_, Option<String>>(i))
            .collect();
        // A primary key has no nulls; a null would end the walk early, and the
        // open last chunk still covers the rest.
        let Some(key) = key else { break };
        cuts.push(key);
    }
    Ok(ranges(cuts, |from, to| Rows::Range {
        from: from.cloned(),
        to: to.cloned(),
    }))
}

/// `[−∞, c1), [c1, c2), …, [cn, +∞)`.
fn ranges<T>(cuts: Vec<T>, make: impl Fn(Option<&T>, Option<&T>) -> Rows) -> Vec<Rows> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut prev: Option<&T> = None;
    for c in &cuts {
        out.push(make(prev, Some(c)));
        prev = Some(c);
    }
    out.push(make(prev, None));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_become_open_ended_ranges() {
        let r = ranges(vec![3u32, 7], |from, to| Rows::Blocks {
            from: from.copied(),
            to: to.copied(),
        });
        assert_eq!(
            r,
            vec![
                Rows::Blocks {
                    from: None,
                    to: Some(3)
                },
                Rows::Blocks {
                    from: Some(3),
                    to: Some(7)
                },
                Rows::Blocks {
                    from: Some(7),
                    to: None
                },
            ]
        );
        assert_eq!(ranges(Vec::<u32>::new(), |_, _| Rows::All), vec![Rows::All]);
    }
}
