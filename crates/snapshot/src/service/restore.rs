//! Restore of tables into the live database.

use super::*;

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
        let index = match self.load_index(id).await {
            Ok(i) => i,
            Err(e) => {
                self.mark_corrupted(id, &e).await;
                return Err(e);
            }
        };
        let wanted: BTreeSet<&TableRef> = request.tables.iter().collect();
        let mut chosen: Vec<&TableIndex> = index
            .tables
            .iter()
            .filter(|t| wanted.is_empty() || wanted.contains(&TableRef::new(&t.schema, &t.name)))
            .collect();
        for w in &wanted {
            if !index
                .tables
                .iter()
                .any(|t| t.schema == w.schema && t.name == w.name)
            {
                return Err(Error::not_found(format!("table {w} in snapshot {id}")));
            }
        }
        let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let tx = conn
            .transaction()
            .await
            .context("starting the restore transaction")?;
        tx.batch_execute("SET CONSTRAINTS ALL DEFERRED")
            .await
            .context("deferring constraints for the restore")?;
        let mwm = self.inner.config.restore_maintenance_work_mem_mb;
        if mwm > 0 {
            tx.batch_execute(&format!("SET LOCAL maintenance_work_mem = '{mwm}MB'"))
                .await
                .context("setting maintenance_work_mem for the restore's index builds")?;
        }
        // Tables the database lacks (a lost database) come from the snapshot's DDL.
        let recreated = match request.target {
            RestoreTarget::Live => self.recreate_missing(&tx, id, &chosen).await?,
            _ => Vec::new(),
        };
        // Statements that recreate the indexes and keys dropped for the load.
        let mut rebuild: Vec<(String, String)> = Vec::new();
        let target_of = |t: &TableIndex| -> TableRef {
            match &request.target {
                RestoreTarget::Scratch { schema } => TableRef::new(schema, &t.name),
                _ => TableRef::new(&t.schema, &t.name),
            }
        };
        // Parents before children.
        if let RestoreTarget::Live = request.target {
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
            let list = chosen
                .iter()
                .map(|t| target_of(t).quoted())
                .collect::<Vec<_>>()
                .join(", ");
            if !list.is_empty() {
                tx.batch_execute(&format!("TRUNCATE {list}")).await.with_context(|| {
                    format!("emptying {list} (a table outside the restore that references them blocks this: restore it too)")
                })?;
            }
            let names: Vec<String> = chosen.iter().map(|t| target_of(t).quoted()).collect();
            rebuild = defer_indexes_and_keys(&tx, &names).await?;
        } else if let RestoreTarget::Scratch { schema } = &request.target {
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(schema)
            ))
            .await
            .context("creating the scratch schema")?;
            for t in &chosen {
                let target = target_of(t);
                let cols = t
                    .columns
                    .iter()
                    .map(|c| format!("{} {}", quote_ident(&c.name), c.type_name))
                    .collect::<Vec<_>>()
                    .join(", ");
                tx.batch_execute(&format!(
                    "DROP TABLE IF EXISTS {q}; CREATE TABLE {q} ({cols})",
                    q = target.quoted()
                ))
                .await
                .with_context(|| format!("creating scratch table {target}"))?;
            }
        }
        let progress = control.progress();
        let total_blocks: usize = chosen.iter().map(|t| t.blocks.len()).sum();
        progress.phase("restoring tables", "blocks", Some(total_blocks as u64));
        let mut outcome = RestoreOutcome::new(id);
        outcome.journal_cut = info.journal_cut.clone();
        outcome.recreated = recreated;
        let mut total_rows = 0u64;
        for t in &chosen {
            control.checkpoint()?;
            let target = target_of(t);
            let cols = t
                .columns
                .iter()
                .map(|c| quote_ident(&c.name))
                .collect::<Vec<_>>()
                .join(", ");
            // FREEZE writes the rows already frozen (no later vacuum rewrite); it
            // needs a plain table emptied or created in this transaction, as here.
            let plain: bool = tx
                .query_one(
                    "SELECT relkind = 'r' FROM pg_class WHERE oid = $1::text::regclass",
                    &[&target.quoted()],
                )
                .await
                .with_context(|| format!("looking up {target}"))?
                .get(0);
            let freeze = if plain { ", FREEZE" } else { "" };
            let sink = tx
                .copy_in(&format!(
                    "COPY {} ({cols}) FROM STDIN (FORMAT binary{freeze})",
                    target.quoted()
                ))
                .await
                .with_context(|| format!("starting to load {target}"))?;
            futures_util::pin_mut!(sink);
            sink.send(Bytes::from_static(&copy::HEADER))
                .await
                .with_context(|| format!("loading {target}"))?;
            let ids: Vec<BlockId> = t.blocks.iter().map(|b| b.id).collect();
            let blocks = self.read_blocks(id, ids);
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
                    .with_context(|| format!("loading {target}"))?;
                progress.advance(1);
            }
            sink.send(Bytes::from_static(&copy::TRAILER))
                .await
                .with_context(|| format!("loading {target}"))?;
            let rows = sink
                .finish()
                .await
                .with_context(|| format!("loading {target}"))?;
            if rows != t.rows {
                return Err(Error::corrupt(
                    format!("snapshot {id}"),
                    format!(
                        "table {target}: loaded {rows} rows, the index says {}",
                        t.rows
                    ),
                ));
            }
            if let RestoreTarget::Live = request.target {
                for s in &t.sequences {
                    tx.execute(
                        "SELECT setval($1::text::regclass, $2, $3)",
                        &[&s.name, &s.last_value, &s.is_called],
                    )
                    .await
                    .with_context(|| format!("restoring sequence {}", s.name))?;
                }
            }
            total_rows += rows;
            outcome.tables.push(TableRowCount {
                table: target,
                rows,
            });
        }
        if !rebuild.is_empty() {
            progress.message("rebuilding indexes and checking foreign keys".to_owned());
        }
        for (what, sql) in &rebuild {
            control.checkpoint()?;
            tx.batch_execute(sql).await.with_context(|| {
                format!("rebuilding {what} after the restore (the restored rows violate it?)")
            })?;
        }
        control.checkpoint()?;
        tx.commit().await.context("committing the restore")?;
        progress.finish();
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
}

/// Drops the secondary indexes, primary/unique/exclusion constraints and foreign
/// keys of `tables` (quoted names, already emptied in `tx`) so the load does not
/// maintain them row by row, and returns what recreates them afterwards, in order:
/// keys and indexes first, then foreign keys, each checked by PostgreSQL in one
/// pass over the loaded rows. Everything happens in the restore's transaction, so a
/// failure or a crash leaves the tables, indexes and keys as they were.
pub(super) async fn defer_indexes_and_keys(
    tx: &tokio_postgres::Transaction<'_>,
    tables: &[String],
) -> Result<Vec<(String, String)>> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let ctx = "reading the indexes and keys of the restored tables";
    let (fks, hashjoin) = crate::restore::foreign_keys(tx, tables).await?;
    let keys = tx
        .query(
            "SELECT c.conrelid::regclass::text, quote_ident(c.conname), pg_get_constraintdef(c.oid)
               FROM pg_constraint c
              WHERE c.contype IN ('p', 'u', 'x') AND c.conrelid = ANY($1::text[]::regclass[])
              ORDER BY c.oid",
            &[&tables],
        )
        .await
        .context(ctx)?;
    let indexes = tx
        .query(
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
               FROM pg_index i
              WHERE i.indrelid = ANY($1::text[]::regclass[])
                AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                                 WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u', 'x'))
              ORDER BY i.indexrelid",
            &[&tables],
        )
        .await
        .context(ctx)?;
    let mut drop = String::new();
    let mut rebuild = Vec::new();
    for k in &fks {
        drop.push_str(&k.drop_sql());
    }
    for r in &keys {
        let (table, name): (String, String) = (r.get(0), r.get(1));
        drop.push_str(&format!("ALTER TABLE {table} DROP CONSTRAINT {name};\n"));
    }
    for r in &indexes {
        let name: String = r.get(0);
        drop.push_str(&format!("DROP INDEX {name};\n"));
    }
    for r in &keys {
        let (table, name, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        rebuild.push((
            format!("constraint {name} of {table}"),
            format!("ALTER TABLE {table} ADD CONSTRAINT {name} {def}"),
        ));
    }
    for r in &indexes {
        let (name, def): (String, String) = (r.get(0), r.get(1));
        rebuild.push((format!("index {name}"), def));
    }
    for k in &fks {
        rebuild.push((
            format!("foreign key {} of {}", k.name, k.table),
            k.rebuild_sql(&hashjoin),
        ));
    }
    if !drop.is_empty() {
        tx.batch_execute(&drop).await.context(
            "dropping indexes and keys for the restore (they are rebuilt before it commits)",
        )?;
    }
    Ok(rebuild)
}
