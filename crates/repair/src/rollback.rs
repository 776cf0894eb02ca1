//! Undoing a completed repair: the rows it inserted are removed, the rows it updated
//! get their before-images back, the rows it quarantined are re-inserted; all in one
//! transaction, refused when a row changed since the repair, and verified byte for
//! byte before commit.
//!
//! Putting back exactly what was there can mean putting back rows that break a
//! foreign key (the orphans a repair removed). Only the triggers of the foreign keys
//! that a statement actually breaks are disabled, for that transaction; every other
//! trigger fires as usual.

use std::time::Instant;

use sanare_core::{Control, Error, RepairId, RepairOutcome, RepairStatus, Result, TableRef};
use sanare_pg::{PgResultExt, get_conn, map_pg_error, quote_ident};
use tokio_postgres::Transaction;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tracing::Instrument as _;

use crate::action::Stored;
use crate::apply::{Tables, cascading_keys};
use crate::catalog::Meta;
use crate::engine::{RepairEngine, advisory_key, strategy_code};
use crate::record::status_code;

/// Foreign-key triggers disabled for one transaction, re-enabled before it commits.
pub(crate) struct Relief {
    oid: u32,
    table: String,
    disabled: Vec<String>,
    pub(crate) log: Vec<String>,
}

impl Relief {
    pub(crate) fn new(meta: &Meta) -> Self {
        Self {
            oid: meta.oid,
            table: meta.quoted.clone(),
            disabled: Vec::new(),
            log: Vec::new(),
        }
    }

    /// Runs `sql`; when it breaks a foreign key, disables that key's triggers on this
    /// table and runs it again.
    pub(crate) async fn run(
        &mut self,
        tx: &mut Transaction<'_>,
        what: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        for _ in 0..32 {
            let sp = tx
                .savepoint("sanare_fk")
                .await
                .context("creating a savepoint")?;
            match sp.execute(sql, params).await {
                Ok(n) => {
                    sp.commit().await.context("releasing a savepoint")?;
                    return Ok(n);
                }
                Err(e) => {
                    let broken = (e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION))
                        .then(|| {
                            e.as_db_error()
                                .and_then(|d| d.constraint())
                                .map(str::to_owned)
                        })
                        .flatten();
                    sp.rollback().await.context("rolling back a savepoint")?;
                    match broken {
                        Some(constraint) => self.disable(tx, &constraint).await?,
                        None => return Err(map_pg_error(what.to_owned(), e)),
                    }
                }
            }
        }
        Err(Error::conflict(format!(
            "{what}: too many foreign keys broken"
        )))
    }

    /// Disables the triggers of foreign key `constraint` on this table.
    pub(crate) async fn disable(&mut self, tx: &Transaction<'_>, constraint: &str) -> Result<()> {
        let names: Vec<String> = tx
            .query(
                "SELECT quote_ident(tg.tgname::text) FROM pg_trigger tg
                   JOIN pg_constraint c ON c.oid = tg.tgconstraint
                  WHERE tg.tgrelid = $1 AND c.conname = $2 AND c.contype = 'f' AND tg.tgenabled = 'O'",
                &[&self.oid, &constraint],
            )
            .await
            .context("reading a foreign key's triggers")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if names.is_empty() {
            return Err(Error::conflict(format!(
                "putting the rows of {} back breaks foreign key {constraint}, whose triggers are \
                 not on that table: nothing changed",
                self.table
            )));
        }
        for name in names {
            tx.batch_execute(&format!("ALTER TABLE {} DISABLE TRIGGER {name}", self.table))
                .await
                .map_err(|e| {
                    Error::conflict(format!(
                        "putting the rows of {} back breaks foreign key {constraint} (their parent \
                         rows are gone), and this role may not disable its trigger ({}): run the \
                         rollback as a superuser, or restore the parent rows first; nothing changed",
                        self.table,
                        e.as_db_error().map(|d| d.message()).unwrap_or("refused")
                    ))
                })?;
            self.disabled.push(name);
        }
        self.log.push(format!(
            "foreign key {constraint}: its triggers on {} disabled for this transaction only",
            self.table
        ));
        Ok(())
    }

    /// Re-enables what [`disable`](Self::disable) disabled.
    pub(crate) async fn restore(&self, tx: &Transaction<'_>) -> Result<()> {
        for name in &self.disabled {
            tx.batch_execute(&format!("ALTER TABLE {} ENABLE TRIGGER {name}", self.table))
                .await
                .context("re-enabling a foreign key's trigger")?;
        }
        Ok(())
    }
}

/// [`RepairService::rollback`](sanare_core::RepairService::rollback) of the engine.
pub(crate) async fn rollback(
    engine: &RepairEngine,
    repair: RepairId,
    control: &Control,
) -> Result<RepairOutcome> {
    let span = tracing::info_span!("repair.rollback", %repair);
    async move {
        let started = Instant::now();
        let loaded = engine.load(repair).await?;
        let record = &loaded.record;
        let mut out = RepairOutcome::new(repair, RepairStatus::RolledBack, false);
        match record.plan.status {
            RepairStatus::RolledBack => {
                out.rows_affected = record.rows_affected.unwrap_or(0);
                out.message = Some("already rolled back: nothing to do".into());
                return Ok(out);
            }
            RepairStatus::Completed => {}
            other => {
                return Err(Error::conflict(format!(
                    "repair {repair} is {} and only a completed repair can be rolled back",
                    status_code(other)
                )));
            }
        }
        let undoable = match Stored::parse(repair, &loaded.action)? {
            Stored::Current(a) => a.op.undoable(),
            Stored::Legacy => !matches!(
                record.plan.strategy,
                sanare_core::RepairStrategyKind::RebuildIndex
                    | sanare_core::RepairStrategyKind::ReplayTransaction
            ),
        };
        if !undoable {
            return Err(Error::invalid_input(format!(
                "repair {repair} ({}) has no undo log: {}",
                strategy_code(&record.plan.strategy),
                record.plan.rollback_plan
            )));
        }
        match rollback_tx(engine, repair, &loaded.table, control).await {
            Ok((n, log)) => {
                out.rows_affected = n;
                out.duration = started.elapsed();
                out.message = Some(log.join("; "));
                control.progress().finish();
                engine.finish(&record.plan, &out, "rollback");
                Ok(out)
            }
            Err(e) => {
                engine
                    .log(
                        repair,
                        true,
                        format!("rollback failed, nothing changed: {e}"),
                    )
                    .await?;
                metrics::counter!("sanare_repair_rollback_failed_total").increment(1);
                Err(e)
            }
        }
    }
    .instrument(span)
    .await
}

/// Opens the rollback's transaction and checks what it will put back belongs to the
/// repair's table and fits it.
async fn open(
    tx: &Transaction<'_>,
    engine: &RepairEngine,
    repair: RepairId,
    table: &TableRef,
    t: &Tables,
) -> Result<Meta> {
    let locked: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock($1)",
            &[&advisory_key(repair)],
        )
        .await
        .context("taking the repair's advisory lock")?
        .get(0);
    if !locked {
        return Err(Error::conflict(format!(
            "repair {repair} is being run or rolled back by another session"
        )));
    }
    let status: String = tx
        .query_one(
            &format!("SELECT status FROM {} WHERE id = $1 FOR UPDATE", t.ops),
            &[&repair.as_uuid()],
        )
        .await
        .context("re-reading the repair status")?
        .get(0);
    if status != "completed" {
        return Err(Error::conflict(format!(
            "repair {repair} is {status}, not completed"
        )));
    }
    Meta::check_scope(table, engine.inner.schema.as_str())?;
    let meta = Meta::load(tx, table).await?;
    meta.require_pk()?;
    let foreign: i64 = tx
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {} WHERE repair_id = $1 AND (table_schema, table_name) <> ($2, $3))
                      + (SELECT count(*) FROM {} WHERE repair_id = $1 AND (table_schema, table_name) <> ($2, $3))",
                t.undo, t.quarantine
            ),
            &[&repair.as_uuid(), &table.schema, &table.name],
        )
        .await
        .context("reading the undo log")?
        .get(0);
    if foreign > 0 {
        return Err(Error::invalid_input(format!(
            "repair {repair}'s undo log names {foreign} row(s) outside the repair's table {table}: \
             rollback refused, nothing changed"
        )));
    }
    Ok(meta)
}

async fn rollback_tx(
    engine: &RepairEngine,
    repair: RepairId,
    table: &TableRef,
    control: &Control,
) -> Result<(u64, Vec<String>)> {
    let t = Tables::of(engine);
    let mut conn = get_conn(engine.pool()).await?;
    let mut tx = crate::apply::transaction(&mut conn, "starting the rollback transaction").await?;
    let meta = open(&tx, engine, repair, table, &t).await?;
    control.progress().phase("rollback", "steps", Some(3));
    let q = &meta.quoted;
    let row = Meta::row_text("t");
    let uid = repair.as_uuid();
    let params: [&(dyn ToSql + Sync); 1] = [&uid];
    let mine = "u.repair_id = $1";
    let unrestored = "k.repair_id = $1 AND k.restored_at IS NULL";
    let conflicts: i64 = tx
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {undo} u WHERE {mine}
                           AND NOT EXISTS (SELECT 1 FROM {q} t WHERE {mu} AND {row} = u.after_row))
                      + (SELECT count(*) FROM {qt} k WHERE {unrestored} AND EXISTS (SELECT 1 FROM {q} t WHERE {mk}))",
                undo = t.undo,
                qt = t.quarantine,
                mu = meta.key_match("t", "u.key")?,
                mk = meta.key_match("t", "k.key")?,
            ),
            &params,
        )
        .await
        .with_context(|| format!("checking {} for writes made after the repair", meta.table))?
        .get(0);
    if conflicts > 0 {
        return Err(Error::conflict(format!(
            "{conflicts} row(s) of {} changed after the repair; rollback refused so newer writes are not \
             overwritten (reconcile them by hand, then retry)",
            meta.table
        )));
    }
    tx.batch_execute("SET CONSTRAINTS ALL IMMEDIATE")
        .await
        .context("making constraints immediate")?;
    let mut relief = Relief::new(&meta);
    relieve_cascades(&tx, &mut relief, &meta, &t, repair).await?;
    let removed = relief
        .run(
            &mut tx,
            "removing the rows the repair inserted",
            &format!(
                "DELETE FROM {q} t USING {undo} u WHERE {mine} AND u.action = 'inserted' AND {mu}",
                undo = t.undo,
                mu = meta.key_match("t", "u.key")?
            ),
            &params,
        )
        .await?;
    control.progress().advance(1);
    let cols = meta.update_cols();
    let set = cols
        .iter()
        .map(|c| format!("{0} = b.{0}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let restored = relief
        .run(
            &mut tx,
            "restoring the rows the repair updated",
            &format!(
                "UPDATE {q} t SET {set}
                   FROM (SELECT u.key AS sanare_key, {img}.* FROM {undo} u WHERE {mine} AND u.action = 'updated') b
                  WHERE {mb}",
                img = meta.cast_row("u.before_row"),
                undo = t.undo,
                mb = meta.key_match("t", "b.sanare_key")?
            ),
            &params,
        )
        .await?;
    control.progress().advance(1);
    let reinserted = reinsert(&mut tx, &mut relief, &meta, &t, unrestored, &params).await?;
    control.progress().advance(1);
    relief.restore(&tx).await?;
    verify(&tx, &meta, &t, repair).await?;
    tx.execute(
        &format!(
            "UPDATE {} k SET restored_at = now(), restored_by = $2 WHERE {unrestored}",
            t.quarantine
        ),
        &[&uid, &format!("rollback of repair {repair}")],
    )
    .await
    .context("recording the quarantined rows put back")?;
    let mut log = relief.log.clone();
    log.push(format!(
        "{}: removed {removed} inserted, restored {restored} updated, re-inserted {reinserted} quarantined row(s)",
        meta.table
    ));
    tx.execute(
        &format!(
            "UPDATE {} SET status = 'rolled_back', rolled_back_at = now(), rollback_log = rollback_log || $2::jsonb
              WHERE id = $1",
            t.ops
        ),
        &[&uid, &serde_json::json!(log)],
    )
    .await
    .context("recording the rollback")?;
    tx.commit().await.context("committing the rollback")?;
    Ok((removed + restored + reinserted, log))
}

/// Re-inserts quarantined rows (`filter` over the quarantine aliased `k`).
pub(crate) async fn reinsert(
    tx: &mut Transaction<'_>,
    relief: &mut Relief,
    meta: &Meta,
    t: &Tables,
    filter: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64> {
    let ins = meta.insert_cols();
    relief
        .run(
            tx,
            "putting quarantined rows back",
            &format!(
                "INSERT INTO {q} ({cols}) OVERRIDING SYSTEM VALUE
                 SELECT {vals} FROM (SELECT {img}.* FROM {qt} k WHERE {filter} ORDER BY k.id) b",
                q = meta.quoted,
                cols = ins
                    .iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", "),
                vals = Meta::list("b", &ins),
                img = meta.cast_row("k.row_image"),
                qt = t.quarantine,
            ),
            params,
        )
        .await
}

/// Deleting rows a repair inserted must not cascade to the rows that reference
/// them: the triggers of such foreign keys are disabled first.
async fn relieve_cascades(
    tx: &Transaction<'_>,
    relief: &mut Relief,
    meta: &Meta,
    t: &Tables,
    repair: RepairId,
) -> Result<()> {
    for (name, child, cols, pcols) in cascading_keys(tx, meta).await? {
        let n: i64 = tx
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} c WHERE ({}) IN (SELECT {} FROM {} t JOIN {} u ON {}
                                                             WHERE u.repair_id = $1 AND u.action = 'inserted')",
                    child.quoted(),
                    Meta::list("c", &cols),
                    Meta::list("t", &pcols),
                    meta.quoted,
                    t.undo,
                    meta.key_match("t", "u.key")?
                ),
                &[&repair.as_uuid()],
            )
            .await
            .with_context(|| format!("counting rows of {child} that reference rows to remove"))?
            .get(0);
        if n > 0 {
            relief.disable(tx, &name).await?;
        }
    }
    Ok(())
}

/// Every before-image is back byte for byte, every inserted row gone.
async fn verify(tx: &Transaction<'_>, meta: &Meta, t: &Tables, repair: RepairId) -> Result<()> {
    let q = &meta.quoted;
    let row = Meta::row_text("t");
    let wrong: i64 = tx
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {undo} u WHERE u.repair_id = $1 AND u.action = 'updated'
                           AND NOT EXISTS (SELECT 1 FROM {q} t WHERE {mu} AND {row} = u.before_row))
                      + (SELECT count(*) FROM {undo} u WHERE u.repair_id = $1 AND u.action = 'inserted'
                           AND EXISTS (SELECT 1 FROM {q} t WHERE {mu}))
                      + (SELECT count(*) FROM {qt} k WHERE k.repair_id = $1 AND k.restored_at IS NULL
                           AND NOT EXISTS (SELECT 1 FROM {q} t WHERE {mk} AND {row} = k.row_image))",
                undo = t.undo,
                qt = t.quarantine,
                mu = meta.key_match("t", "u.key")?,
                mk = meta.key_match("t", "k.key")?,
            ),
            &[&repair.as_uuid()],
        )
        .await
        .with_context(|| format!("verifying the rollback of {}", meta.table))?
        .get(0);
    if wrong > 0 {
        return Err(Error::conflict(format!(
            "{wrong} row(s) of {} differ from their before-image after rollback (a trigger changed \
             them?): rollback refused, nothing changed",
            meta.table
        )));
    }
    Ok(())
}
