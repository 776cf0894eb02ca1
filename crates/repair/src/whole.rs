//! Repairs that work on a whole table or object rather than on recorded rows:
//! reload from a snapshot, a host strategy's SQL, an index rebuild, a journal replay.

use sanare_core::{
    Control, Error, ReplayRange, ReplayRequest, RestoreRequest, RestoreTarget, Result, SnapshotId,
    TableRef,
};
use sanare_pg::{PgResultExt, get_conn, quote_ident};

use crate::action::{Bound, Op};
use crate::apply::{Ran, Tables, begin, cascading_keys, conclude, refuse_cascades};
use crate::catalog::Meta;
use crate::engine::RepairEngine;

fn scratch_schema(bound: &Bound) -> String {
    format!("sanare_repair_{}", bound.repair.as_uuid().simple())
}

/// Reloads the table from a snapshot: restores it into a scratch schema, then in one
/// transaction quarantines the rows the snapshot lacks, puts back the rows that
/// differ and re-inserts the missing ones.
pub(crate) async fn reload(
    engine: &RepairEngine,
    bound: &Bound,
    snapshot: SnapshotId,
    dry_run: bool,
    control: &Control,
) -> Result<Ran> {
    let snapshots = engine
        .inner
        .snapshots
        .as_ref()
        .ok_or_else(|| Error::unavailable("no snapshot service is attached"))?;
    let scratch = scratch_schema(bound);
    control.progress().phase("reload", "steps", Some(4));
    snapshots
        .restore(
            RestoreRequest::new(snapshot)
                .tables([bound.meta.table.clone()])
                .target(RestoreTarget::Scratch {
                    schema: scratch.clone(),
                }),
            control,
        )
        .await?;
    control.progress().advance(1);
    let result = reload_tx(engine, bound, &scratch, snapshot, dry_run, control).await;
    let conn = get_conn(engine.pool()).await?;
    if let Err(e) = conn
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(&scratch)
        ))
        .await
    {
        tracing::warn!(schema = %scratch, error = %e, "could not drop the reload's scratch schema");
    }
    result
}

async fn reload_tx(
    engine: &RepairEngine,
    bound: &Bound,
    scratch: &str,
    snapshot: SnapshotId,
    dry_run: bool,
    control: &Control,
) -> Result<Ran> {
    let meta = &bound.meta;
    let t = Tables::of(engine);
    let src = TableRef::new(scratch, meta.table.name.clone()).quoted();
    let mut conn = get_conn(engine.pool()).await?;
    let tx = crate::apply::transaction(&mut conn, "starting the repair transaction").await?;
    begin(&tx, engine, bound.repair, dry_run).await?;
    let q = &meta.quoted;
    let row = Meta::row_text("t");
    let absent = format!(
        "NOT EXISTS (SELECT 1 FROM {src} s WHERE {})",
        meta.pk_eq("s", "t")
    );
    let fks = cascading_keys(&tx, meta).await?;
    refuse_cascades(&tx, meta, &fks, &format!("FROM {q} t WHERE {absent}"), &[]).await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [
        &bound.repair.as_uuid(),
        &meta.table.schema,
        &meta.table.name,
    ];
    let removed = tx
        .execute(
            &format!(
                "WITH d AS (DELETE FROM {q} t WHERE {absent} RETURNING {key} AS k, {row} AS img)
                 INSERT INTO {qt} (repair_id, table_schema, table_name, key, row_image)
                 SELECT $1, $2, $3, k, img FROM d",
                key = meta.key_array("t"),
                qt = t.quarantine,
            ),
            &params,
        )
        .await
        .with_context(|| {
            format!(
                "quarantining rows of {} absent from the snapshot",
                meta.table
            )
        })?;
    control.progress().advance(1);
    control.checkpoint()?;
    let cols = meta.update_cols();
    let set = cols
        .iter()
        .map(|c| format!("{0} = o.{0}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let restored = tx
        .execute(
            &format!(
                "WITH o AS (SELECT {key} AS sanare_key, {row} AS sanare_before, {scols}
                              FROM {q} t JOIN {src} s ON {eq} WHERE {row} IS DISTINCT FROM {srow}),
                      u AS (UPDATE {q} t SET {set} FROM o WHERE {mo}
                            RETURNING o.sanare_key, o.sanare_before, {row} AS sanare_after)
                 INSERT INTO {undo} (repair_id, table_schema, table_name, action, key, before_row, after_row)
                 SELECT $1, $2, $3, 'updated', sanare_key, sanare_before, sanare_after FROM u",
                key = meta.key_array("t"),
                scols = Meta::list("s", &cols),
                eq = meta.pk_eq("s", "t"),
                srow = Meta::row_text("s"),
                mo = meta.key_match("t", "o.sanare_key")?,
                undo = t.undo,
            ),
            &params,
        )
        .await
        .with_context(|| format!("restoring changed rows of {}", meta.table))?;
    control.progress().advance(1);
    control.checkpoint()?;
    let ins = meta.insert_cols();
    let reinserted = tx
        .execute(
            &format!(
                "WITH i AS (INSERT INTO {q} AS t ({cols}) OVERRIDING SYSTEM VALUE
                            SELECT {vals} FROM {src} s WHERE NOT EXISTS (SELECT 1 FROM {q} t WHERE {eq})
                            RETURNING {key} AS k, {row} AS img)
                 INSERT INTO {undo} (repair_id, table_schema, table_name, action, key, after_row)
                 SELECT $1, $2, $3, 'inserted', k, img FROM i",
                cols = ins.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", "),
                vals = Meta::list("s", &ins),
                eq = meta.pk_eq("s", "t"),
                key = meta.key_array("t"),
                undo = t.undo,
            ),
            &params,
        )
        .await
        .with_context(|| format!("re-inserting missing rows of {}", meta.table))?;
    control.progress().advance(1);
    let srow = Meta::row_text("s");
    let left: i64 = tx
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {q} t WHERE NOT EXISTS (SELECT 1 FROM {src} s WHERE {eq} AND {srow} = {row}))
                      + (SELECT count(*) FROM {src} s WHERE NOT EXISTS (SELECT 1 FROM {q} t WHERE {eq} AND {srow} = {row}))",
                eq = meta.pk_eq("s", "t"),
            ),
            &[],
        )
        .await
        .context("re-validating the reload")?
        .get(0);
    if left > 0 {
        return Err(Error::conflict(format!(
            "re-validation failed: {left} row(s) of {} differ from snapshot {snapshot} after the reload; rolled back",
            meta.table
        )));
    }
    let log = vec![
        format!("{removed} row(s) absent from snapshot {snapshot} moved to the quarantine"),
        format!("{restored} changed row(s) restored, {reinserted} missing row(s) re-inserted"),
        "re-validation clean: the table equals its snapshot image".into(),
    ];
    conclude(tx, &t, bound, dry_run, log).await
}

/// Runs a host strategy's authenticated SQL over the rows its predicate selects:
/// removed rows go to the quarantine, updated rows to the undo log; the predicate
/// must match no row afterwards.
pub(crate) async fn custom(
    engine: &RepairEngine,
    bound: &Bound,
    dry_run: bool,
    control: &Control,
) -> Result<Ran> {
    let Op::Custom { predicate, .. } = &bound.action.op else {
        return Err(Error::invalid_input("not a host strategy's repair"));
    };
    let meta = &bound.meta;
    let t = Tables::of(engine);
    let mut conn = get_conn(engine.pool()).await?;
    let tx = crate::apply::transaction(&mut conn, "starting the repair transaction").await?;
    begin(&tx, engine, bound.repair, dry_run).await?;
    control.progress().phase("repair", "rows", None);
    control.checkpoint()?;
    let q = &meta.quoted;
    let row = Meta::row_text("t");
    let key = meta.key_array("t");
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [
        &bound.repair.as_uuid(),
        &meta.table.schema,
        &meta.table.name,
    ];
    tx.query_one(
        &format!(
            "SELECT count(*) FROM (SELECT 1 FROM {q} t WHERE {predicate} ORDER BY {} FOR UPDATE OF t) x",
            Meta::list("t", &meta.pk)
        ),
        &[],
    )
    .await
    .with_context(|| format!("locking rows of {}", meta.table))?;
    let changed = match &bound.set {
        None => {
            let fks = cascading_keys(&tx, meta).await?;
            refuse_cascades(&tx, meta, &fks, &format!("FROM {q} t WHERE {predicate}"), &[]).await?;
            tx.execute(
                &format!(
                    "WITH d AS (DELETE FROM {q} t WHERE {predicate} RETURNING {key} AS k, {row} AS img)
                     INSERT INTO {qt} (repair_id, table_schema, table_name, key, row_image)
                     SELECT $1, $2, $3, k, img FROM d",
                    qt = t.quarantine
                ),
                &params,
            )
            .await
            .with_context(|| format!("moving rows of {} to the quarantine", meta.table))?
        }
        Some(set) => tx
            .execute(
                &format!(
                    "WITH o AS (SELECT {key} AS sanare_key, {row} AS sanare_before FROM {q} t WHERE {predicate}),
                          u AS (UPDATE {q} t SET {set} FROM o WHERE {mo}
                                RETURNING o.sanare_key, o.sanare_before, {row} AS sanare_after)
                     INSERT INTO {undo} (repair_id, table_schema, table_name, action, key, before_row, after_row)
                     SELECT $1, $2, $3, 'updated', sanare_key, sanare_before, sanare_after FROM u",
                    mo = meta.key_match("t", "o.sanare_key")?,
                    undo = t.undo
                ),
                &params,
            )
            .await
            .with_context(|| format!("updating rows of {}", meta.table))?,
    };
    control.progress().set_done(changed);
    control.checkpoint()?;
    let left: i64 = tx
        .query_one(
            &format!("SELECT count(*) FROM {q} t WHERE {predicate}"),
            &[],
        )
        .await
        .with_context(|| format!("re-validating {}", meta.table))?
        .get(0);
    if left > 0 {
        return Err(Error::conflict(format!(
            "re-validation failed: {left} row(s) of {} still violate after the repair; rolled back",
            meta.table
        )));
    }
    conclude(tx, &t, bound, dry_run, vec!["re-validation clean".into()]).await
}

/// `REINDEX INDEX CONCURRENTLY` (which cannot run in a transaction), then checks the
/// index is valid.
pub(crate) async fn reindex(
    engine: &RepairEngine,
    bound: &Bound,
    dry_run: bool,
    control: &Control,
) -> Result<Ran> {
    let index = bound
        .index
        .as_deref()
        .ok_or_else(|| Error::invalid_input("an index rebuild without an index"))?;
    control.progress().phase("reindex", "indexes", Some(1));
    let mut log = Vec::new();
    if dry_run {
        log.push(format!(
            "dry run: would run REINDEX INDEX CONCURRENTLY {index}"
        ));
    } else {
        let conn = get_conn(engine.pool()).await?;
        conn.batch_execute(&format!("REINDEX INDEX CONCURRENTLY {index}"))
            .await
            .with_context(|| format!("rebuilding index {index}"))?;
        let valid: bool = conn
            .query_one(
                "SELECT indisvalid AND indisready FROM pg_index WHERE indexrelid = to_regclass($1)",
                &[&index],
            )
            .await
            .with_context(|| format!("checking index {index}"))?
            .get(0);
        if !valid {
            return Err(Error::conflict(format!(
                "index {index} is still invalid after REINDEX"
            )));
        }
        log.push(format!("rebuilt index {index}: valid"));
        control.progress().advance(1);
    }
    Ok(Ran {
        rows: Vec::new(),
        affected: 0,
        skipped: 0,
        log,
    })
}

/// Replays journal entries by idempotency key through the journal's own
/// exactly-once transactions, then checks the recorded rows no longer violate.
pub(crate) async fn replay(
    engine: &RepairEngine,
    bound: &Bound,
    dry_run: bool,
    control: &Control,
) -> Result<Ran> {
    let Op::Replay {
        idempotency_keys, ..
    } = &bound.action.op
    else {
        return Err(Error::invalid_input("not a journal replay"));
    };
    let journal = engine
        .inner
        .journal
        .as_ref()
        .ok_or_else(|| Error::unavailable("no journal is attached"))?;
    let t = Tables::of(engine);
    let mut conn = get_conn(engine.pool()).await?;
    let tx = crate::apply::transaction(&mut conn, "starting a re-check").await?;
    crate::targets::check_fit(&tx, &t.targets, bound.repair, &bound.meta).await?;
    let (recorded, violating) = still_violating(&tx, &t, bound).await?;
    tx.commit().await.context("ending a re-check")?;
    let mut log = Vec::new();
    if recorded > 0 && violating == 0 {
        log.push(format!(
            "nothing to replay: none of the {recorded} recorded row(s) still violates"
        ));
        return Ok(Ran {
            rows: Vec::new(),
            affected: 0,
            skipped: recorded,
            log,
        });
    }
    let summary = journal
        .replay(
            ReplayRequest::new(ReplayRange::All)
                .idempotency_keys(idempotency_keys.clone())
                .dry_run(dry_run),
            control,
        )
        .await?;
    log.push(format!(
        "journal replay: {} applied, {} already applied, {} failed",
        summary.applied,
        summary.already_applied,
        summary.failures.len()
    ));
    if let Some(f) = summary.failures.first() {
        return Err(Error::conflict(format!(
            "journal replay failed at {}: {}",
            f.position, f.reason
        )));
    }
    if !dry_run {
        let tx = crate::apply::transaction(&mut conn, "starting a re-check").await?;
        let (_, left) = still_violating(&tx, &t, bound).await?;
        tx.commit().await.context("ending a re-check")?;
        if left > 0 {
            return Err(Error::conflict(format!(
                "re-validation failed: {left} row(s) of {} still violate after the journal replay \
                 (the replay's changes are the journal's and stay)",
                bound.meta.table
            )));
        }
        log.push("re-validation clean".into());
    }
    Ok(Ran {
        rows: Vec::new(),
        affected: 0,
        skipped: 0,
        log,
    })
}

/// `(recorded rows, rows that still violate)` of a repair.
async fn still_violating(
    client: &impl tokio_postgres::GenericClient,
    t: &Tables,
    bound: &Bound,
) -> Result<(u64, u64)> {
    let meta = &bound.meta;
    let check = bound
        .check
        .as_ref()
        .ok_or_else(|| Error::invalid_input("a replay without a check"))?;
    let r = client
        .query_one(
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE t.{first} IS NOT NULL AND {v})
                   FROM {g} g LEFT JOIN {q} t ON {m} WHERE g.repair_id = $1",
                first = quote_ident(&meta.pk[0]),
                v = check.sql(meta, "t", "g"),
                g = t.targets,
                q = meta.quoted,
                m = meta.key_match("t", "g.key")?,
            ),
            &[&bound.repair.as_uuid()],
        )
        .await
        .with_context(|| format!("re-checking rows of {}", meta.table))?;
    let n = |i: usize| u64::try_from(r.get::<_, i64>(i)).unwrap_or(0);
    Ok((n(0), n(1)))
}
