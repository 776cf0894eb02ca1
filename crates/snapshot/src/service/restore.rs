//! Restore of tables into the live database or a scratch schema.

use super::*;
use crate::restore::conflict;
use crate::restore::merge::InPlace;
use crate::restore::plan::{self, Method};
use sanare_core::RestoreMode;

impl Snapshots {
    /// Restores a snapshot (see [`SnapshotService::restore`]).
    #[tracing::instrument(skip_all, fields(snapshot = %request.snapshot))]
    pub(super) async fn restore_inner(
        &self,
        request: RestoreRequest,
        control: &Control,
    ) -> Result<RestoreOutcome> {
        let id = request.snapshot;
        let info = self.get(id).await?;
        if info.status != SnapshotStatus::Ready && info.status != SnapshotStatus::Archived {
            return Err(Error::conflict(format!(
                "snapshot {id} is {} and cannot be restored",
                status_str(info.status)
            )));
        }
        // The index without its block references: each table's are read group by
        // group as it is loaded.
        let index = match self.read_index(id).await {
            Ok(i) => i,
            Err(e) => {
                self.mark_corrupted(id, &e).await;
                return Err(e);
            }
        };
        let wanted: BTreeSet<&TableRef> = request.tables.iter().collect();
        for w in &wanted {
            if !index
                .tables
                .iter()
                .any(|t| t.schema == w.schema && t.name == w.name)
            {
                return Err(Error::not_found(format!("table {w} in snapshot {id}")));
            }
        }
        let chosen: Vec<&TableIndex> = index
            .tables
            .iter()
            .filter(|t| wanted.is_empty() || wanted.contains(&TableRef::new(&t.schema, &t.name)))
            .collect();
        let progress = control.progress();
        let total_blocks: u64 = chosen
            .iter()
            .map(|t| {
                t.blocks.len() as u64 + t.groups.iter().map(|g| u64::from(g.blocks)).sum::<u64>()
            })
            .sum();
        progress.phase("restoring tables", "blocks", Some(total_blocks));
        let mut outcome = match (&request.target, request.mode) {
            (RestoreTarget::Scratch { schema }, _) => {
                self.restore_scratch(id, schema, &chosen, control).await?
            }
            (_, RestoreMode::Parallel { connections }) => {
                self.restore_parallel(id, &chosen, &request, connections, control)
                    .await?
            }
            _ => self.restore_live(id, chosen, &request, control).await?,
        };
        outcome.journal_cut = info.journal_cut.clone();
        if matches!(request.target, RestoreTarget::Live) {
            self.reopen_journal_after_restore(&mut outcome).await?;
        }
        progress.finish();
        let total_rows: u64 = outcome.tables.iter().map(|t| t.rows).sum();
        metrics::counter!("sanare_snapshot_restores_total").increment(1);
        metrics::counter!("sanare_snapshot_rows_restored_total").increment(total_rows);
        tracing::info!(%id, rows = total_rows, "restore committed");
        if let Some(bus) = &self.inner.events {
            bus.publish(Event::RestoreCompleted {
                snapshot: id,
                tables: outcome.tables.iter().map(|t| t.table.clone()).collect(),
                rows: total_rows,
            });
        }
        Ok(outcome)
    }

    /// After a live restore committed: the journal entries after the restored
    /// snapshot's cut lose their applied marks, since the restore undid their
    /// effects; the next replay (at the next start, or the one a point-in-time
    /// restore runs) applies them again, exactly once.
    async fn reopen_journal_after_restore(&self, outcome: &mut RestoreOutcome) -> Result<()> {
        let (Some(journal), Some(cut)) = (&self.inner.journal, &outcome.journal_cut) else {
            return Ok(());
        };
        match journal.reopen_after(cut).await {
            Ok(0) => {}
            Ok(n) => outcome.notes.push(format!(
                "{n} journal entries after position {} had been applied after the snapshot; \
                 the restore undid them and the next replay applies them again",
                cut.position
            )),
            Err(e) => {
                tracing::error!(snapshot = %outcome.snapshot, error = %e, "the restore committed but the journal's applied marks were not reopened");
                return Err(Error::conflict(format!(
                    "snapshot {} was restored and committed, but the journal entries after \
                     its cut (position {}) could not be marked for replay again: {e}. \
                     Replay them explicitly (`sanare journal replay --after {}`), or the \
                     changes they made after the snapshot stay undone",
                    outcome.snapshot, cut.position, cut.position.0
                )));
            }
        }
        Ok(())
    }

    /// Restores `chosen` into the live tables in one transaction (see
    /// [`crate::restore::plan`]).
    async fn restore_live(
        &self,
        id: SnapshotId,
        mut chosen: Vec<&TableIndex>,
        request: &RestoreRequest,
        control: &Control,
    ) -> Result<RestoreOutcome> {
        let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let tx = conn
            .transaction()
            .await
            .context("starting the restore transaction")?;
        self.prepare_restore_tx(&tx).await?;
        // Tables the database lacks (a lost database) come from the snapshot's DDL.
        let recreated = self.recreate_missing(&tx, id, &chosen).await?;
        // Parents before children.
        let mut infos = Vec::new();
        for t in &chosen {
            infos.push(
                sanare_pg::catalog::describe(&*tx, &TableRef::new(&t.schema, &t.name)).await?,
            );
        }
        let order = sanare_pg::catalog::fk_order(&infos);
        chosen.sort_by_key(|t| {
            order
                .iter()
                .position(|o| o.schema == t.schema && o.name == t.name)
                .unwrap_or(usize::MAX)
        });
        let tables: Vec<(TableRef, Vec<String>)> = chosen
            .iter()
            .map(|t| {
                (
                    TableRef::new(&t.schema, &t.name),
                    t.columns.iter().map(|c| c.name.clone()).collect(),
                )
            })
            .collect();
        let plan = plan::plan(&tx, &tables, request.fire_triggers).await?;
        let mut outcome = RestoreOutcome::new(id);
        outcome.notes = plan.notes.clone();
        outcome.recreated = recreated;
        // Tables restored in place, and the tables outside the restore that
        // reference them, are locked against writes before anything is read.
        for (n, rel) in plan.relations.iter().enumerate() {
            let cols = &tables[n].1;
            if let Method::Merge { outside, .. } = &rel.method {
                let m = InPlace::new(rel, cols, n);
                run(
                    &tx,
                    &rel.name,
                    "locking it for an in-place restore",
                    &m.lock(),
                )
                .await?;
                for fk in outside {
                    run(
                        &tx,
                        &fk.table,
                        "locking it against writes while a table it references is restored",
                        &InPlace::lock_referencing(fk),
                    )
                    .await?;
                }
            }
        }
        for step in &plan.before {
            control.checkpoint()?;
            run(&tx, &step.table, &step.what, &step.sql).await?;
        }
        if let Some(truncate) = &plan.truncate {
            run(&tx, "the restored tables", "emptying them", truncate).await?;
        }
        for (n, (t, rel)) in chosen.iter().zip(&plan.relations).enumerate() {
            control.checkpoint()?;
            let rows = self
                .load_live(&tx, id, t, rel, &tables[n].1, n, control)
                .await?;
            for s in &t.sequences {
                tx.execute(
                    "SELECT setval($1::text::regclass, $2, $3)",
                    &[&s.name, &s.last_value, &s.is_called],
                )
                .await
                .with_context(|| format!("restoring sequence {}", s.name))?;
            }
            outcome.tables.push(TableRowCount {
                table: TableRef::new(&t.schema, &t.name),
                rows,
            });
        }
        if !plan.after.is_empty() {
            control
                .progress()
                .message("rebuilding indexes and checking foreign keys".to_owned());
        }
        for step in &plan.after {
            control.checkpoint()?;
            run(&tx, &step.table, &step.what, &step.sql).await?;
        }
        control.checkpoint()?;
        tx.commit().await.context("committing the restore")?;
        Ok(outcome)
    }

    /// The settings of a restore's transaction: constraints that can wait for the
    /// commit do, and indexes are built with the configured memory.
    pub(super) async fn prepare_restore_tx(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<()> {
        tx.batch_execute("SET CONSTRAINTS ALL DEFERRED")
            .await
            .context("deferring constraints for the restore")?;
        let mwm = self.inner.config.restore_maintenance_work_mem_mb;
        if mwm > 0 {
            tx.batch_execute(&format!("SET LOCAL maintenance_work_mem = '{mwm}MB'"))
                .await
                .context("setting maintenance_work_mem for the restore's index builds")?;
        }
        Ok(())
    }

    /// Loads table `t` of snapshot `id` into live relation `rel` its plan's way;
    /// returns the rows loaded. `n` is the table's position in the restore.
    #[allow(clippy::too_many_arguments)]
    async fn load_live(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        id: SnapshotId,
        t: &TableIndex,
        rel: &plan::Relation,
        columns: &[String],
        n: usize,
        control: &Control,
    ) -> Result<u64> {
        let m = InPlace::new(rel, columns, n);
        let cols = columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        match &rel.method {
            Method::Replace { freeze } => {
                // FREEZE writes the rows already frozen (no later vacuum rewrite); it
                // needs a plain table emptied in this transaction, as here.
                let freeze = if *freeze { ", FREEZE" } else { "" };
                let sql = format!(
                    "COPY {} ({cols}) FROM STDIN (FORMAT binary{freeze})",
                    rel.name
                );
                self.copy_in(tx, &sql, &rel.name, id, t, control).await
            }
            Method::Reload => {
                run(tx, &rel.name, "deleting its rows", &m.delete_all()).await?;
                self.copy_in(tx, &m.copy_to_table(), &rel.name, id, t, control)
                    .await
            }
            Method::Merge { key, outside } => {
                run(
                    tx,
                    &rel.name,
                    "creating a temporary table",
                    &m.create_temp(),
                )
                .await?;
                let rows = self
                    .copy_in(tx, &m.copy_to_temp(), &rel.name, id, t, control)
                    .await?;
                for fk in outside {
                    let lost =
                        tx.query_opt(&m.lost_reference(fk), &[])
                            .await
                            .map_err(conflict::on(
                                &fk.table,
                                "checking references to the restored rows",
                            ))?;
                    if let Some(row) = lost {
                        let values: String = row.get(0);
                        return Err(Error::conflict(format!(
                            "restoring {} alone would delete or change the row with ({}) = ({values})                              that {} still references through foreign key {} (its row with ({}) =                              ({values})); the restore was rolled back and changed nothing: restore {}                              too, or restore into a scratch schema (`--into`) and copy what you need",
                            rel.name,
                            fk.parent_columns.join(", "),
                            fk.table,
                            fk.name,
                            fk.columns.join(", "),
                            fk.table,
                        )));
                    }
                }
                run(
                    tx,
                    &rel.name,
                    "deleting the rows the snapshot does not have",
                    &m.delete_gone(key),
                )
                .await?;
                run(
                    tx,
                    &rel.name,
                    "writing the snapshot's rows by key",
                    &m.upsert(key),
                )
                .await?;
                Ok(rows)
            }
        }
    }

    /// Streams table `t` of snapshot `id` into `COPY … FROM STDIN (FORMAT binary)`
    /// statement `sql` (loading `target`); checks the row count against the index.
    pub(super) async fn copy_in(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        sql: &str,
        target: &str,
        id: SnapshotId,
        t: &TableIndex,
        control: &Control,
    ) -> Result<u64> {
        let doing = format!("loading {target}");
        let sink = tx
            .copy_in(sql)
            .await
            .map_err(conflict::on(target, &doing))?;
        futures_util::pin_mut!(sink);
        sink.send(Bytes::from_static(&copy::HEADER))
            .await
            .map_err(conflict::on(target, &doing))?;
        let progress = control.progress();
        let batches = self.table_refs(id, t);
        futures_util::pin_mut!(batches);
        while let Some(refs) = batches.next().await {
            let refs = match refs {
                Ok(r) => r,
                Err(e) => {
                    self.mark_corrupted(id, &e).await;
                    return Err(e);
                }
            };
            let blocks = self.read_blocks(id, refs.iter().map(|b| b.id).collect());
            futures_util::pin_mut!(blocks);
            while let Some(block) = blocks.next().await {
                let block = match block {
                    Ok(b) => b,
                    Err(e) => {
                        self.mark_corrupted(id, &e).await;
                        return Err(e);
                    }
                };
                control.checkpoint()?;
                sink.send(Bytes::from(block))
                    .await
                    .map_err(conflict::on(target, &doing))?;
                progress.advance(1);
            }
        }
        sink.send(Bytes::from_static(&copy::TRAILER))
            .await
            .map_err(conflict::on(target, &doing))?;
        let rows = sink.finish().await.map_err(conflict::on(target, &doing))?;
        if rows != t.rows {
            return Err(Error::corrupt(
                format!("snapshot {id}"),
                format!(
                    "table {target}: loaded {rows} rows, the index says {}",
                    t.rows
                ),
            ));
        }
        Ok(rows)
    }

    /// Restores `chosen` into tables of the same names in `schema` (created, or
    /// dropped and created again), in one transaction.
    async fn restore_scratch(
        &self,
        id: SnapshotId,
        schema: &str,
        chosen: &[&TableIndex],
        control: &Control,
    ) -> Result<RestoreOutcome> {
        let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let tx = conn
            .transaction()
            .await
            .context("starting the restore transaction")?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        ))
        .await
        .context("creating the scratch schema")?;
        let mut outcome = RestoreOutcome::new(id);
        for t in chosen {
            control.checkpoint()?;
            let target = TableRef::new(schema, &t.name);
            let defs = t
                .columns
                .iter()
                .map(|c| format!("{} {}", quote_ident(&c.name), c.type_name))
                .collect::<Vec<_>>()
                .join(", ");
            tx.batch_execute(&format!(
                "DROP TABLE IF EXISTS {q}; CREATE TABLE {q} ({defs})",
                q = target.quoted()
            ))
            .await
            .with_context(|| format!("creating scratch table {target}"))?;
            let cols = t
                .columns
                .iter()
                .map(|c| quote_ident(&c.name))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "COPY {} ({cols}) FROM STDIN (FORMAT binary, FREEZE)",
                target.quoted()
            );
            let rows = self
                .copy_in(&tx, &sql, &target.to_string(), id, t, control)
                .await?;
            outcome.tables.push(TableRowCount {
                table: target,
                rows,
            });
        }
        control.checkpoint()?;
        tx.commit().await.context("committing the restore")?;
        Ok(outcome)
    }
}

/// Runs one statement of a restore on `table` (doing `what`), a data conflict
/// reported as such (see [`conflict::explain`]).
pub(super) async fn run(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    what: &str,
    sql: &str,
) -> Result<()> {
    tx.batch_execute(sql)
        .await
        .map_err(conflict::on(table, what))
}
