//! The transactional repairs of recorded rows (quarantine, update, restore), run in
//! one transaction a batch of rows at a time.
//!
//! Per batch: lock the live rows, re-check each (changed since planning, or no longer
//! violating: skipped), change the rest while writing their before-images (undo log)
//! or full images (quarantine) in the same statement. After the last batch the
//! violation is re-checked over every row of the repair; a repair that left a row
//! violating rolls back.

use sanare_core::{Control, Error, RepairId, Result, RowRef, SnapshotId, TableRef};
use sanare_pg::{PgResultExt, quote_ident, quote_literal};
use tokio_postgres::Transaction;
use tokio_postgres::types::ToSql;

use crate::action::{Bound, Op};
use crate::catalog::Meta;
use crate::engine::{RepairEngine, advisory_key};
use crate::targets;

/// What a run did.
pub(crate) struct Ran {
    pub(crate) rows: Vec<RowRef>,
    pub(crate) affected: u64,
    pub(crate) skipped: u64,
    pub(crate) log: Vec<String>,
}

/// The names of the engine's tables, quoted.
pub(crate) struct Tables {
    pub(crate) ops: String,
    pub(crate) targets: String,
    pub(crate) undo: String,
    pub(crate) quarantine: String,
}

impl Tables {
    pub(crate) fn of(engine: &RepairEngine) -> Self {
        Self {
            ops: engine.t("repair_operations"),
            targets: engine.t("repair_targets"),
            undo: engine.t("repair_undo"),
            quarantine: engine.t("repair_quarantine"),
        }
    }
}

/// Starts a transaction on a pooled connection, under the canonical session
/// settings ([`CANONICAL`](crate::catalog::CANONICAL)).
pub(crate) async fn transaction<'c>(
    conn: &'c mut deadpool_postgres::Object,
    what: &'static str,
) -> Result<Transaction<'c>> {
    let client: &mut tokio_postgres::Client = conn;
    let tx = client.transaction().await.context(what)?;
    tx.batch_execute(crate::catalog::CANONICAL)
        .await
        .context("applying the canonical session settings")?;
    Ok(tx)
}

/// Opens a repair's transaction: timeouts, the repair's advisory lock, and (for a
/// real run) a status that may still run.
pub(crate) async fn begin(
    tx: &Transaction<'_>,
    engine: &RepairEngine,
    id: RepairId,
    dry_run: bool,
) -> Result<()> {
    let c = engine.config();
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
        c.lock_timeout.as_millis(),
        c.statement_timeout.as_millis()
    ))
    .await
    .context("setting the repair transaction's timeouts")?;
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&advisory_key(id)])
        .await
        .context("taking the repair's advisory lock")?
        .get(0);
    if !locked {
        return Err(Error::conflict(format!(
            "repair {id} is being run or rolled back by another session"
        )));
    }
    if !dry_run {
        let status: String = tx
            .query_one(
                &format!(
                    "SELECT status FROM {} WHERE id = $1",
                    engine.t("repair_operations")
                ),
                &[&id.as_uuid()],
            )
            .await
            .context("re-reading the repair status")?
            .get(0);
        if status == "completed" || status == "rolled_back" {
            return Err(Error::conflict(format!("repair {id} is already {status}")));
        }
    }
    Ok(())
}

/// Runs a repair of recorded rows in one transaction.
pub(crate) async fn run_rows(
    engine: &RepairEngine,
    bound: &Bound,
    dry_run: bool,
    control: &Control,
) -> Result<Ran> {
    let mut conn = sanare_pg::get_conn(engine.pool()).await?;
    let tx = crate::apply::transaction(&mut conn, "starting the repair transaction").await?;
    begin(&tx, engine, bound.repair, dry_run).await?;
    let tables = Tables::of(engine);
    let meta = &bound.meta;
    targets::check_fit(&tx, &tables.targets, bound.repair, meta).await?;
    let restoring = matches!(
        bound.action.op,
        Op::Restore { .. } | Op::RestoreParent { .. }
    );
    if restoring {
        tx.batch_execute(
            "CREATE TEMP TABLE _sanare_src (sanare_seq bigint PRIMARY KEY, img text NOT NULL) ON COMMIT DROP",
        )
        .await
        .context("creating the restore staging table")?;
    }
    let cascades = if matches!(bound.action.op, Op::Quarantine { .. }) {
        cascading_keys(&tx, meta).await?
    } else {
        Vec::new()
    };
    let total: i64 = tx
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE repair_id = $1",
                tables.targets
            ),
            &[&bound.repair.as_uuid()],
        )
        .await
        .context("counting a repair's rows")?
        .get(0);
    control
        .progress()
        .phase("repair", "rows", Some(u64::try_from(total).unwrap_or(0)));
    let mut after = 0i64;
    let batch = engine.config().batch_rows;
    while let Some(hi) =
        targets::next_batch(&tx, &tables.targets, bound.repair, after, batch).await?
    {
        control.checkpoint()?;
        let range = (after, hi);
        lock(&tx, &tables, bound, range).await?;
        classify(&tx, &tables, bound, range).await?;
        let done = match &bound.action.op {
            Op::Quarantine { .. } => {
                let removed = format!(
                    "FROM {} t JOIN {} g ON {} WHERE {PENDING}",
                    meta.quoted,
                    tables.targets,
                    meta.key_match("t", "g.key")?
                );
                let params: [&(dyn ToSql + Sync); 3] =
                    [&bound.repair.as_uuid(), &range.0, &range.1];
                refuse_cascades(&tx, meta, &cascades, &removed, &params).await?;
                quarantine(&tx, &tables, bound, range).await?
            }
            Op::Update { .. } => update(&tx, &tables, bound, range).await?,
            Op::Restore { snapshot } | Op::RestoreParent { snapshot, .. } => {
                stage(&tx, engine, &tables, bound, *snapshot, range).await?;
                restore(&tx, &tables, bound, range).await?
            }
            _ => return Err(Error::invalid_input("not a repair of recorded rows")),
        };
        control.progress().advance(done);
        after = hi;
    }
    control.checkpoint()?;
    let left = revalidate(&tx, &tables, bound).await?;
    if left > 0 {
        return Err(Error::conflict(format!(
            "re-validation failed: {left} row(s) of {} still violate after the repair; rolled back",
            meta.table
        )));
    }
    conclude(
        tx,
        &tables,
        bound,
        dry_run,
        vec!["re-validation clean".to_owned()],
    )
    .await
}

/// Locks the live rows of a batch, in key order.
async fn lock(tx: &Transaction<'_>, t: &Tables, bound: &Bound, range: (i64, i64)) -> Result<()> {
    let meta = &bound.meta;
    tx.query_one(
        &format!(
            "SELECT count(*) FROM (SELECT 1 FROM {q} t JOIN {g} g ON {m}
                                   WHERE g.repair_id = $1 AND g.seq > $2 AND g.seq <= $3
                                   ORDER BY {pk} FOR UPDATE OF t) x",
            q = meta.quoted,
            g = t.targets,
            m = meta.key_match("t", "g.key")?,
            pk = Meta::list("t", &meta.pk),
        ),
        &[&bound.repair.as_uuid(), &range.0, &range.1],
    )
    .await
    .with_context(|| format!("locking rows of {}", meta.table))?;
    Ok(())
}

/// Re-checks each row of a batch and records why a row is skipped.
async fn classify(
    tx: &Transaction<'_>,
    t: &Tables,
    bound: &Bound,
    range: (i64, i64),
) -> Result<()> {
    let meta = &bound.meta;
    let first = quote_ident(&meta.pk[0]);
    let row = Meta::row_text("t");
    let case = match (&bound.action.op, &bound.check) {
        (Op::Restore { .. }, _) => format!(
            "CASE WHEN t.{first} IS NULL THEN CASE WHEN g2.digest IS NULL THEN 'pending' ELSE 'changed' END
                  WHEN md5({row}) IS DISTINCT FROM g2.digest THEN 'changed' ELSE 'pending' END"
        ),
        (Op::RestoreParent { .. }, _) => {
            format!("CASE WHEN t.{first} IS NULL THEN 'pending' ELSE 'fixed' END")
        }
        (_, Some(check)) => format!(
            "CASE WHEN t.{first} IS NULL OR md5({row}) IS DISTINCT FROM g2.digest THEN 'changed'
                  WHEN {} THEN 'pending' ELSE 'fixed' END",
            check.sql(meta, "t", "g2")
        ),
        _ => return Err(Error::invalid_input("a repair of rows without a check")),
    };
    tx.execute(
        &format!(
            "UPDATE {g} g SET outcome = c.outcome FROM (
               SELECT g2.seq, {case} AS outcome
                 FROM {g} g2 LEFT JOIN {q} t ON {m}
                WHERE g2.repair_id = $1 AND g2.seq > $2 AND g2.seq <= $3) c
             WHERE g.repair_id = $1 AND g.seq = c.seq",
            g = t.targets,
            q = meta.quoted,
            m = meta.key_match("t", "g2.key")?,
        ),
        &[&bound.repair.as_uuid(), &range.0, &range.1],
    )
    .await
    .with_context(|| format!("re-checking rows of {}", meta.table))?;
    Ok(())
}

/// `g.repair_id = $1 AND g.seq > $2 AND g.seq <= $3 AND g.outcome = 'pending'`.
const PENDING: &str = "g.repair_id = $1 AND g.seq > $2 AND g.seq <= $3 AND g.outcome = 'pending'";

/// Moves the batch's pending rows to the quarantine.
async fn quarantine(
    tx: &Transaction<'_>,
    t: &Tables,
    bound: &Bound,
    range: (i64, i64),
) -> Result<u64> {
    let meta = &bound.meta;
    tx.execute(
        &format!(
            "WITH d AS (DELETE FROM {q} t USING {g} g WHERE {PENDING} AND {m}
                        RETURNING g.seq AS sanare_seq, g.key AS sanare_key, {row} AS sanare_img),
                  k AS (INSERT INTO {qt} (repair_id, table_schema, table_name, key, row_image)
                        SELECT $1, $4, $5, sanare_key, sanare_img FROM d ORDER BY sanare_seq)
             UPDATE {g} g SET outcome = 'repaired' FROM d WHERE g.repair_id = $1 AND g.seq = d.sanare_seq",
            q = meta.quoted,
            g = t.targets,
            qt = t.quarantine,
            m = meta.key_match("t", "g.key")?,
            row = Meta::row_text("t"),
        ),
        &[&bound.repair.as_uuid(), &range.0, &range.1, &meta.table.schema, &meta.table.name],
    )
    .await
    .with_context(|| format!("moving rows of {} to the quarantine", meta.table))
}

/// Updates the batch's pending rows, saving before- and after-images.
async fn update(tx: &Transaction<'_>, t: &Tables, bound: &Bound, range: (i64, i64)) -> Result<u64> {
    let meta = &bound.meta;
    let set = bound
        .set
        .as_deref()
        .ok_or_else(|| Error::invalid_input("an update without assignments"))?;
    let o = format!(
        "SELECT g.seq AS sanare_seq, g.key AS sanare_key, {} AS sanare_before
           FROM {} g JOIN {} t ON {} WHERE {PENDING}",
        Meta::row_text("t"),
        t.targets,
        meta.quoted,
        meta.key_match("t", "g.key")?
    );
    tx.execute(
        &update_sql(meta, t, &o, set)?,
        &[
            &bound.repair.as_uuid(),
            &range.0,
            &range.1,
            &meta.table.schema,
            &meta.table.name,
        ],
    )
    .await
    .with_context(|| format!("updating rows of {}", meta.table))
}

/// Updates with `set` the rows the query `o` selects (by `sanare_key`, with their
/// `sanare_seq` and `sanare_before` image), writes their before- and after-images to
/// the undo log and marks their targets repaired, in one statement. Parameters: $1
/// the repair, $4 and $5 the table's schema and name.
fn update_sql(meta: &Meta, t: &Tables, o: &str, set: &str) -> Result<String> {
    Ok(format!(
        "WITH o AS ({o}),
              u AS (UPDATE {q} t SET {set} FROM o WHERE {mo}
                    RETURNING o.sanare_seq, o.sanare_key, o.sanare_before, {row} AS sanare_after),
              w AS (INSERT INTO {undo} (repair_id, table_schema, table_name, action, key, before_row, after_row)
                    SELECT $1, $4, $5, 'updated', sanare_key, sanare_before, sanare_after FROM u ORDER BY sanare_seq)
         UPDATE {g} g SET outcome = 'repaired' FROM u WHERE g.repair_id = $1 AND g.seq = u.sanare_seq",
        q = meta.quoted,
        g = t.targets,
        undo = t.undo,
        mo = meta.key_match("t", "o.sanare_key")?,
        row = Meta::row_text("t"),
    ))
}

/// Fetches the snapshot images of the batch's pending rows into `_sanare_src`.
async fn stage(
    tx: &Transaction<'_>,
    engine: &RepairEngine,
    t: &Tables,
    bound: &Bound,
    snapshot: SnapshotId,
    range: (i64, i64),
) -> Result<()> {
    let meta = &bound.meta;
    let snapshots = engine
        .inner
        .snapshots
        .as_ref()
        .ok_or_else(|| Error::unavailable("no snapshot service is attached"))?;
    let rows = tx
        .query(
            &format!(
                "SELECT g.seq, g.key FROM {} g WHERE {PENDING} ORDER BY g.seq",
                t.targets
            ),
            &[&bound.repair.as_uuid(), &range.0, &range.1],
        )
        .await
        .context("reading a batch of rows to restore")?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut by_key = std::collections::HashMap::with_capacity(rows.len());
    let mut refs = Vec::with_capacity(rows.len());
    for r in &rows {
        let key: Vec<String> = r.get(1);
        let row = meta.row_ref(key.iter().cloned().map(Some).collect());
        by_key.insert(key, r.get::<_, i64>(0));
        refs.push(row);
    }
    let images = snapshots.fetch_rows(snapshot, &refs).await?;
    let mut seqs = Vec::with_capacity(images.len());
    let mut imgs = Vec::with_capacity(images.len());
    for image in &images {
        let key: Option<Vec<String>> = meta
            .pk
            .iter()
            .map(|k| image.get(k).flatten().map(str::to_owned))
            .collect();
        if let Some(seq) = key.and_then(|k| by_key.get(&k).copied()) {
            seqs.push(seq);
            imgs.push(meta.record_literal(image)?);
        }
    }
    if seqs.len() < rows.len() {
        return Err(Error::not_found(format!(
            "{} of {} row(s) of {} in snapshot {snapshot}",
            rows.len() - seqs.len(),
            rows.len(),
            meta.table
        )));
    }
    tx.execute(
        "INSERT INTO _sanare_src SELECT * FROM unnest($1::bigint[], $2::text[])
         ON CONFLICT (sanare_seq) DO UPDATE SET img = excluded.img",
        &[&seqs, &imgs],
    )
    .await
    .with_context(|| format!("staging snapshot rows of {}", meta.table))?;
    Ok(())
}

/// `(column is damaged per g.columns AND live text differs from the image) OR …`
/// over the columns an update may write.
fn differs(meta: &Meta, t: &str, s: &str, g: &str) -> String {
    let parts: Vec<String> = meta
        .update_cols()
        .iter()
        .map(|c| {
            format!(
                "(({g}.columns IS NULL OR {lit} = ANY({g}.columns)) AND {t}.{c}::text IS DISTINCT FROM {s}.{c}::text)",
                lit = quote_literal(c),
                c = quote_ident(c),
            )
        })
        .collect();
    if parts.is_empty() {
        "false".into()
    } else {
        format!("({})", parts.join(" OR "))
    }
}

/// Restores the batch's pending rows from `_sanare_src`: damaged columns of rows
/// that exist, whole rows that are gone.
async fn restore(
    tx: &Transaction<'_>,
    t: &Tables,
    bound: &Bound,
    range: (i64, i64),
) -> Result<u64> {
    let meta = &bound.meta;
    let params: [&(dyn ToSql + Sync); 5] = [
        &bound.repair.as_uuid(),
        &range.0,
        &range.1,
        &meta.table.schema,
        &meta.table.name,
    ];
    let img = meta.cast_row("s.img");
    let src = format!("(SELECT s.sanare_seq, {img}.* FROM _sanare_src s)");
    // Rows whose damaged columns already equal the snapshot: nothing to do.
    tx.execute(
        &format!(
            "UPDATE {g} g SET outcome = 'fixed' FROM {src} s, {q} t
              WHERE {PENDING} AND s.sanare_seq = g.seq AND {m} AND NOT {d}",
            g = t.targets,
            q = meta.quoted,
            m = meta.key_match("t", "g.key")?,
            d = differs(meta, "t", "s", "g"),
        ),
        &params[..3],
    )
    .await
    .with_context(|| format!("comparing rows of {} with the snapshot", meta.table))?;
    let set = meta
        .update_cols()
        .iter()
        .map(|c| {
            format!(
                "{c} = CASE WHEN o.sanare_columns IS NULL OR {lit} = ANY(o.sanare_columns) THEN o.{c} ELSE t.{c} END",
                lit = quote_literal(c),
                c = quote_ident(c)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let o = format!(
        "SELECT g.seq AS sanare_seq, g.key AS sanare_key, g.columns AS sanare_columns,
                {} AS sanare_before, {}
           FROM {} g JOIN {src} s ON s.sanare_seq = g.seq JOIN {} t ON {} WHERE {PENDING}",
        Meta::row_text("t"),
        Meta::list("s", &meta.update_cols()),
        t.targets,
        meta.quoted,
        meta.key_match("t", "g.key")?,
    );
    let updated = tx
        .execute(&update_sql(meta, t, &o, &set)?, &params)
        .await
        .with_context(|| format!("restoring damaged columns of {}", meta.table))?;
    let ins = meta.insert_cols();
    let inserted = tx
        .execute(
            &format!(
                "WITH i AS (INSERT INTO {q} AS t ({cols}) OVERRIDING SYSTEM VALUE
                            SELECT {vals} FROM {g} g JOIN {src} s ON s.sanare_seq = g.seq
                             WHERE {PENDING} AND NOT EXISTS (SELECT 1 FROM {q} t WHERE {m})
                            RETURNING {key} AS sanare_key, {row} AS sanare_after),
                      w AS (INSERT INTO {undo} (repair_id, table_schema, table_name, action, key, after_row)
                            SELECT $1, $4, $5, 'inserted', sanare_key, sanare_after FROM i)
                 UPDATE {g} g SET outcome = 'repaired' FROM i
                  WHERE g.repair_id = $1 AND g.seq > $2 AND g.seq <= $3 AND {mi}",
                q = meta.quoted,
                g = t.targets,
                undo = t.undo,
                cols = ins.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", "),
                vals = Meta::list("s", &ins),
                m = meta.key_match("t", "g.key")?,
                key = meta.key_array("t"),
                row = Meta::row_text("t"),
                mi = typed_keys_equal(meta, "i.sanare_key", "g.key")?,
            ),
            &params,
        )
        .await
        .with_context(|| format!("re-inserting missing rows of {}", meta.table))?;
    Ok(updated + inserted)
}

/// `(a)[1]::ty1 = (b)[1]::ty1 AND …`: two stored keys naming the same row.
fn typed_keys_equal(meta: &Meta, a: &str, b: &str) -> Result<String> {
    Ok(meta
        .key_types()?
        .iter()
        .enumerate()
        .map(|(i, ty)| format!("({a})[{n}]::{ty} = ({b})[{n}]::{ty}", n = i + 1))
        .collect::<Vec<_>>()
        .join(" AND "))
}

/// Rows of the repair that still violate after it ran (0 when it fixed them all).
async fn revalidate(tx: &Transaction<'_>, t: &Tables, bound: &Bound) -> Result<i64> {
    let meta = &bound.meta;
    let uid = bound.repair.as_uuid();
    let done = "g.repair_id = $1 AND g.outcome IN ('pending', 'repaired')";
    let sql = match (&bound.action.op, &bound.check) {
        (Op::Restore { .. }, _) => format!(
            "SELECT count(*) FROM {g} g JOIN (SELECT s.sanare_seq, {img}.* FROM _sanare_src s) s ON s.sanare_seq = g.seq
               LEFT JOIN {q} t ON {m}
              WHERE {done} AND (t.{first} IS NULL OR {d})",
            g = t.targets,
            img = meta.cast_row("s.img"),
            q = meta.quoted,
            m = meta.key_match("t", "g.key")?,
            first = quote_ident(&meta.pk[0]),
            d = differs(meta, "t", "s", "g"),
        ),
        (Op::RestoreParent { .. }, _) => {
            let (child, pairs) = bound
                .child
                .as_ref()
                .ok_or_else(|| Error::invalid_input("a parent restore without its child"))?;
            let types = meta.key_types()?;
            let on = pairs
                .iter()
                .map(|(c, pos)| format!("c.{} = (g.key)[{}]::{}", quote_ident(c), pos + 1, types[*pos]))
                .collect::<Vec<_>>()
                .join(" AND ");
            let orphan = pairs
                .iter()
                .map(|(c, pos)| format!("p.{} = c.{}", quote_ident(&meta.pk[*pos]), quote_ident(c)))
                .collect::<Vec<_>>()
                .join(" AND ");
            format!(
                "SELECT count(*) FROM {g} g JOIN {cq} c ON {on}
                  WHERE {done} AND NOT EXISTS (SELECT 1 FROM {q} p WHERE {orphan})",
                g = t.targets,
                cq = child.quoted,
                q = meta.quoted,
            )
        }
        (_, Some(check)) => format!(
            "SELECT count(*) FROM {g} g JOIN {q} t ON {m} WHERE {done} AND {v}",
            g = t.targets,
            q = meta.quoted,
            m = meta.key_match("t", "g.key")?,
            v = check.sql(meta, "t", "g"),
        ),
        _ => return Err(Error::invalid_input("a repair of rows without a check")),
    };
    Ok(tx
        .query_one(&sql, &[&uid])
        .await
        .with_context(|| format!("re-validating {}", meta.table))?
        .get(0))
}

/// Counts, samples and records what the run did, then commits (or, for a dry run,
/// rolls back).
pub(crate) async fn conclude(
    tx: Transaction<'_>,
    t: &Tables,
    bound: &Bound,
    dry_run: bool,
    mut log: Vec<String>,
) -> Result<Ran> {
    let uid = bound.repair.as_uuid();
    let (repaired, changed, fixed) = targets::outcome_counts(&tx, &t.targets, bound.repair).await?;
    let affected: i64 = tx
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {} WHERE repair_id = $1) + (SELECT count(*) FROM {} WHERE repair_id = $1)",
                t.undo, t.quarantine
            ),
            &[&uid],
        )
        .await
        .context("counting the changed rows")?
        .get(0);
    let rows = sample_rows(&tx, t, bound.repair, &bound.meta).await?;
    let skipped = changed + fixed;
    if bound.action.op.uses_targets() {
        log.insert(
            0,
            format!(
                "{} of {}: {repaired} row(s) repaired, {changed} skipped as changed since planning, {fixed} skipped as no longer violating",
                bound.action.op.name(),
                bound.meta.table
            ),
        );
    }
    let affected = u64::try_from(affected).unwrap_or(0);
    if dry_run {
        tx.rollback().await.context("rolling back the dry run")?;
    } else {
        tx.execute(
            &format!(
                "UPDATE {} SET status = 'completed', completed_at = now(), rows_affected = $2, rows_skipped = $3,
                        error_message = NULL, execution_log = execution_log || $4::jsonb WHERE id = $1",
                t.ops
            ),
            &[
                &uid,
                &i64::try_from(affected).unwrap_or(i64::MAX),
                &i64::try_from(skipped).unwrap_or(i64::MAX),
                &serde_json::json!(log),
            ],
        )
        .await
        .context("recording the completed repair")?;
        tx.commit().await.context("committing the repair")?;
    }
    Ok(Ran {
        rows,
        affected,
        skipped,
        log,
    })
}

/// The first rows a repair changed (undo log, then quarantine).
pub(crate) async fn sample_rows(
    client: &impl tokio_postgres::GenericClient,
    t: &Tables,
    repair: RepairId,
    meta: &Meta,
) -> Result<Vec<RowRef>> {
    let limit = i64::try_from(sanare_core::PLAN_VIOLATION_SAMPLE).unwrap_or(i64::MAX);
    let rows = client
        .query(
            &format!(
                "SELECT key FROM (SELECT 0 AS src, seq AS n, key FROM {} WHERE repair_id = $1
                                  UNION ALL SELECT 1, id, key FROM {} WHERE repair_id = $1) x
                  ORDER BY src, n LIMIT $2",
                t.undo, t.quarantine
            ),
            &[&repair.as_uuid(), &limit],
        )
        .await
        .context("listing the repaired rows")?;
    Ok(rows
        .iter()
        .map(|r| meta.row_ref(r.get::<_, Vec<String>>(0).into_iter().map(Some).collect()))
        .collect())
}

/// Foreign keys whose `ON DELETE` action (cascade, set null, set default) would
/// change rows of another table when rows of `meta` are removed.
pub(crate) async fn cascading_keys(
    tx: &Transaction<'_>,
    meta: &Meta,
) -> Result<Vec<(String, TableRef, Vec<String>, Vec<String>)>> {
    let fks = tx
        .query(
            "SELECT con.conname::text, cn.nspname::text, cc.relname::text,
                    ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
                            JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o),
                    ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, o)
                            JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.o)
               FROM pg_constraint con
               JOIN pg_class cc ON cc.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
              WHERE con.contype = 'f' AND con.confrelid = $1 AND con.confdeltype NOT IN ('a', 'r')",
            &[&meta.oid],
        )
        .await
        .with_context(|| format!("reading cascading foreign keys to {}", meta.table))?;
    Ok(fks
        .iter()
        .map(|fk| {
            (
                fk.get(0),
                TableRef::new(fk.get::<_, String>(1), fk.get::<_, String>(2)),
                fk.get(3),
                fk.get(4),
            )
        })
        .collect())
}

/// Refuses to remove rows of `meta` (those `removed`, an SQL `FROM … WHERE …` over
/// the table aliased `t`, with `params`) when one of the cascading foreign keys `fks`
/// would extend the removal to rows the quarantine does not capture.
pub(crate) async fn refuse_cascades(
    tx: &Transaction<'_>,
    meta: &Meta,
    fks: &[(String, TableRef, Vec<String>, Vec<String>)],
    removed: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<()> {
    for (name, child, cols, pcols) in fks {
        let n: i64 = tx
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} c WHERE ({}) IN (SELECT {} {removed})",
                    child.quoted(),
                    Meta::list("c", cols),
                    Meta::list("t", pcols),
                ),
                params,
            )
            .await
            .with_context(|| format!("counting rows of {child} a removal would cascade to"))?
            .get(0);
        if n > 0 {
            return Err(Error::conflict(format!(
                "removing these rows of {} would cascade to {n} row(s) of {child} through {name} \
                 (not captured by the quarantine): repair {child} first",
                meta.table
            )));
        }
    }
    Ok(())
}
