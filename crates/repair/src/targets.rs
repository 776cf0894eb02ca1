//! `repair_targets`: the rows a repair covers, written in batches as violations are
//! planned and read in batches when the repair runs, so that no list of keys is ever
//! held in memory.

use sanare_core::{BoxStream, Error, RepairId, Result, RowRef, ViolationId};
use sanare_pg::{PgResultExt, Pool, get_conn};
use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use crate::catalog::Meta;

/// One row to record for a plan.
#[derive(Clone, Debug)]
pub(crate) struct NewTarget {
    pub(crate) key: Vec<String>,
    pub(crate) violation: ViolationId,
    /// Damaged columns a restore puts back (all when `None`).
    pub(crate) columns: Option<Vec<String>>,
}

/// One row a repair covers, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepairTarget {
    /// Its position in the repair.
    pub seq: i64,
    /// The row, by primary key.
    pub row: RowRef,
    /// The violation that named it (none for rows found at planning, such as the
    /// duplicates of a unique constraint).
    pub violation: Option<ViolationId>,
    /// What the last committed run did with it: `repaired`, or left alone because
    /// the row `changed` since planning or is `fixed` (no longer violates); none
    /// before a run.
    pub outcome: Option<String>,
}

/// Records `targets` for `repair`, with each row's digest as it is now. Targets
/// already recorded (same key) are kept as they are.
pub(crate) async fn insert(
    client: &impl GenericClient,
    table: &str,
    repair: RepairId,
    meta: &Meta,
    targets: &[NewTarget],
) -> Result<u64> {
    if targets.is_empty() {
        return Ok(0);
    }
    let n = meta.pk.len();
    let mut columns: Vec<Vec<String>> = vec![Vec::with_capacity(targets.len()); n];
    let mut vids = Vec::with_capacity(targets.len());
    let mut cols = Vec::with_capacity(targets.len());
    for t in targets {
        for (i, v) in t.key.iter().enumerate().take(n) {
            columns[i].push(v.clone());
        }
        vids.push(t.violation.as_uuid());
        cols.push(
            t.columns
                .as_ref()
                .map(|c| serde_json::Value::from(c.clone()).to_string()),
        );
    }
    let uid = repair.as_uuid();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&uid];
    for c in &columns {
        params.push(c);
    }
    params.push(&vids);
    params.push(&cols);
    let arrays = (0..n)
        .map(|i| format!("${}::text[]", i + 2))
        .collect::<Vec<_>>()
        .join(", ");
    let names = (0..n)
        .map(|i| format!("k{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "INSERT INTO {table} (repair_id, key, violation_id, columns, digest)
         SELECT $1, k.key, k.vid, k.cols,
                (SELECT md5({row}) FROM {q} t WHERE {matches})
           FROM (SELECT ARRAY[{names}] AS key, vid,
                        CASE WHEN cols IS NULL THEN NULL
                             ELSE ARRAY(SELECT jsonb_array_elements_text(cols::jsonb)) END AS cols
                   FROM unnest({arrays}, ${v}::uuid[], ${c}::text[]) AS u({names}, vid, cols)) k
         ON CONFLICT (repair_id, key) DO NOTHING",
        row = Meta::row_text("t"),
        q = meta.quoted,
        matches = meta.key_match("t", "k.key")?,
        v = n + 2,
        c = n + 3,
    );
    client
        .execute(&sql, &params)
        .await
        .with_context(|| format!("recording the rows of {} a repair covers", meta.table))
}

/// The upper `seq` of the next batch of at most `limit` targets after `after`.
pub(crate) async fn next_batch(
    client: &impl GenericClient,
    table: &str,
    repair: RepairId,
    after: i64,
    limit: usize,
) -> Result<Option<i64>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    Ok(client
        .query_one(
            &format!(
                "SELECT max(seq) FROM (SELECT seq FROM {table} WHERE repair_id = $1 AND seq > $2
                                       ORDER BY seq LIMIT $3) s"
            ),
            &[&repair.as_uuid(), &after, &limit],
        )
        .await
        .context("reading the next batch of a repair's rows")?
        .get(0))
}

/// Checks that every stored target fits the live table before anything changes: a
/// key of the primary key's arity whose values cast to its column types, and
/// damaged-column lists naming columns the table has.
pub(crate) async fn check_fit(
    client: &impl GenericClient,
    table: &str,
    repair: RepairId,
    meta: &Meta,
) -> Result<()> {
    let uid = repair.as_uuid();
    let n = i32::try_from(meta.pk.len()).unwrap_or(i32::MAX);
    let names: Vec<String> = meta.columns.iter().map(|c| c.name.clone()).collect();
    let bad: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {table}
                  WHERE repair_id = $1 AND (cardinality(key) <> $2 OR array_position(key, NULL) IS NOT NULL
                                            OR NOT coalesce(columns <@ $3::text[], true))"
            ),
            &[&uid, &n, &names],
        )
        .await
        .context("checking a repair's recorded rows")?
        .get(0);
    if bad > 0 {
        return Err(Error::invalid_input(format!(
            "repair {repair} refused, nothing was run: {bad} of its recorded rows do not fit \
             the live {} (wrong key arity or unknown columns; plan the repair again)",
            meta.table
        )));
    }
    // Casting every key to its live type: a value that is not of that type fails here,
    // in the repair's transaction, before any row changes.
    let casts = meta
        .key_types()?
        .iter()
        .enumerate()
        .map(|(i, ty)| format!("(key[{}])::{ty}", i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    // `ROW(…) IS NULL` makes the server evaluate every cast (a count over a subquery
    // would not).
    let sp_sql =
        format!("SELECT count(*) FROM {table} WHERE repair_id = $1 AND ROW({casts}) IS NULL");
    match client.query_one(&sp_sql, &[&uid]).await {
        Ok(_) => Ok(()),
        Err(e) if e.as_db_error().is_some() => Err(Error::invalid_input(format!(
            "repair {repair} refused, nothing was run: a recorded row key does not fit the \
             primary key of {} ({}): plan the repair again",
            meta.table,
            e.as_db_error().map(|d| d.message()).unwrap_or_default()
        ))),
        Err(e) => Err(sanare_pg::map_pg_error(
            "checking a repair's recorded keys",
            e,
        )),
    }
}

/// How many targets ended how: `(repaired, changed, fixed)`.
pub(crate) async fn outcome_counts(
    client: &impl GenericClient,
    table: &str,
    repair: RepairId,
) -> Result<(u64, u64, u64)> {
    let r = client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE outcome = 'repaired'),
                        count(*) FILTER (WHERE outcome = 'changed'),
                        count(*) FILTER (WHERE outcome = 'fixed')
                   FROM {table} WHERE repair_id = $1"
            ),
            &[&repair.as_uuid()],
        )
        .await
        .context("counting a repair's outcomes")?;
    let n = |i: usize| u64::try_from(r.get::<_, i64>(i)).unwrap_or(0);
    Ok((n(0), n(1), n(2)))
}

/// Every recorded row of a repair, in order, read a page at a time.
pub(crate) fn list(
    pool: Pool,
    table: String,
    repair: RepairId,
    meta: Meta,
) -> BoxStream<'static, Result<RepairTarget>> {
    const PAGE: i64 = 1_000;
    crate::page::paged(0i64, move |after| {
        let (pool, table, meta) = (pool.clone(), table.clone(), meta.clone());
        async move {
            let conn = get_conn(&pool).await?;
            let rows = conn
                .query(
                    &format!(
                        "SELECT seq, key, violation_id, outcome FROM {table}
                          WHERE repair_id = $1 AND seq > $2 ORDER BY seq LIMIT {PAGE}"
                    ),
                    &[&repair.as_uuid(), &after],
                )
                .await
                .context("reading a repair's rows")?;
            let next = (rows.len() as i64 == PAGE)
                .then(|| rows.last().map(|r| r.get::<_, i64>(0)))
                .flatten();
            let page: Vec<RepairTarget> = rows
                .iter()
                .map(|r| RepairTarget {
                    seq: r.get(0),
                    row: meta.row_ref(r.get::<_, Vec<String>>(1).into_iter().map(Some).collect()),
                    violation: r
                        .get::<_, Option<uuid::Uuid>>(2)
                        .map(ViolationId::from_uuid),
                    outcome: r.get(3),
                })
                .collect();
            Ok((page, next))
        }
    })
}
