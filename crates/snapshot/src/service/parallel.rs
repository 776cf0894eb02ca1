//! Parallel restore ([`RestoreMode::Parallel`]): shadow tables loaded on several
//! connections, swapped in for the live tables with one short transaction (see
//! [`crate::restore::shadow`]).
//!
//! The live tables stay readable and writable while the shadows load (writes made
//! to them meanwhile are replaced by the swap, as the restore replaces their
//! contents), and are locked only for the swap. Until the swap commits nothing live
//! has changed: a failure or a cancellation drops the shadows. The price is disk
//! space for a second copy of the restored tables while it runs, and new relations
//! (new OIDs) for the restored tables.

use sanare_core::RestoreMode;

use super::*;
use crate::restore::conflict;
use crate::restore::shadow::{self, ShadowPlan};

impl Snapshots {
    /// Restores `chosen` of snapshot `id` through shadow tables, loaded on up to
    /// `connections` connections.
    pub(super) async fn restore_parallel(
        &self,
        id: SnapshotId,
        chosen: &[&TableIndex],
        request: &RestoreRequest,
        connections: u16,
        control: &Control,
    ) -> Result<RestoreOutcome> {
        debug_assert!(matches!(request.mode, RestoreMode::Parallel { .. }));
        if request.fire_triggers {
            return Err(Error::invalid_input(
                "a parallel restore loads shadow tables, which have no triggers, so it cannot \
                 fire them; restore in one transaction (the default mode) to fire them",
            ));
        }
        let tables: Vec<(TableRef, Vec<String>)> = chosen
            .iter()
            .map(|t| {
                (
                    TableRef::new(&t.schema, &t.name),
                    t.columns.iter().map(|c| c.name.clone()).collect(),
                )
            })
            .collect();
        let token = uuid::Uuid::now_v7().simple().to_string()[24..].to_owned();
        let plan = {
            let conn = sanare_pg::get_conn(&self.inner.pool).await?;
            shadow::plan(&**conn, &tables, &token).await?
        };
        let result = self
            .load_and_swap(id, chosen, &plan, connections, control)
            .await;
        if result.is_err() {
            self.drop_shadows(&plan).await;
        }
        let rows = result?;
        let mut outcome = RestoreOutcome::new(id);
        outcome.tables = tables
            .into_iter()
            .zip(rows)
            .map(|((table, _), rows)| TableRowCount { table, rows })
            .collect();
        outcome.notes.push(format!(
            "{} tables loaded into shadow tables on up to {connections} connections and swapped in",
            plan.tables.len()
        ));
        Ok(outcome)
    }

    /// Loads every shadow, adds the foreign keys among them, swaps them in; returns
    /// the rows loaded per table, in the order of `chosen`.
    async fn load_and_swap(
        &self,
        id: SnapshotId,
        chosen: &[&TableIndex],
        plan: &ShadowPlan,
        connections: u16,
        control: &Control,
    ) -> Result<Vec<u64>> {
        let pool_max = self.inner.pool.status().max_size.max(1);
        let workers = usize::from(connections.max(1))
            .min(pool_max)
            .min(chosen.len().max(1));
        // The largest tables first, so the last one to finish is a small one.
        let mut order: Vec<usize> = (0..chosen.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(chosen[i].raw_bytes));
        let queue = std::sync::Mutex::new(std::collections::VecDeque::from(order));
        let next = || queue.lock().ok().and_then(|mut q| q.pop_front());
        let rows = std::sync::Mutex::new(vec![0u64; chosen.len()]);
        let load = |_: usize| async {
            let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
            while let Some(i) = next() {
                control.checkpoint()?;
                let (t, s) = (chosen[i], &plan.tables[i]);
                control
                    .progress()
                    .message(format!("loading {} (shadow)", s.live));
                let tx = conn
                    .transaction()
                    .await
                    .context("starting a shadow table's load")?;
                self.prepare_restore_tx(&tx).await?;
                for sql in &s.create {
                    super::restore::run(&tx, &s.live, "creating its shadow table", sql).await?;
                }
                let n = self.copy_in(&tx, &s.copy, &s.live, id, t, control).await?;
                for sql in &s.build {
                    control.checkpoint()?;
                    super::restore::run(
                        &tx,
                        &s.live,
                        "building its shadow's keys and indexes",
                        sql,
                    )
                    .await?;
                }
                tx.commit()
                    .await
                    .with_context(|| format!("committing the shadow of {}", s.live))?;
                if let Ok(mut r) = rows.lock() {
                    r[i] = n;
                }
            }
            Ok::<_, Error>(())
        };
        futures_util::future::try_join_all((0..workers).map(load)).await?;
        let keys = std::sync::Mutex::new((0..plan.keys.len()).rev().collect::<Vec<_>>());
        let next_key = || keys.lock().ok().and_then(|mut k| k.pop());
        let check = |_: usize| async {
            let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
            while let Some(k) = next_key() {
                control.checkpoint()?;
                let (what, sql) = &plan.keys[k];
                let tx = conn
                    .transaction()
                    .await
                    .context("starting a foreign key check")?;
                super::restore::run(&tx, "the restored tables", what, sql).await?;
                tx.commit()
                    .await
                    .context("committing a foreign key check")?;
            }
            Ok::<_, Error>(())
        };
        control
            .progress()
            .message("checking foreign keys".to_owned());
        futures_util::future::try_join_all((0..workers.min(plan.keys.len().max(1))).map(check))
            .await?;
        control.checkpoint()?;
        self.swap(chosen, plan).await?;
        Ok(rows.into_inner().unwrap_or_default())
    }

    /// The swap: one transaction (see [`crate::restore::shadow`]).
    async fn swap(&self, chosen: &[&TableIndex], plan: &ShadowPlan) -> Result<()> {
        let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let tx = conn
            .transaction()
            .await
            .context("starting the swap of the shadow tables")?;
        let step = |table: &'static str, what: &'static str| conflict::on(table, what);
        let all = "the restored tables";
        tx.batch_execute(&plan.lock)
            .await
            .map_err(step(all, "locking the live tables for the swap"))?;
        for s in &plan.tables {
            for sql in s.detach.iter().chain(&s.rename) {
                super::restore::run(&tx, &s.live, "swapping in its shadow", sql).await?;
            }
        }
        for view in &plan.views {
            tx.batch_execute(view)
                .await
                .map_err(step(all, "recreating a view over the restored tables"))?;
        }
        let olds: Vec<&str> = plan.tables.iter().map(|s| s.old.as_str()).collect();
        tx.batch_execute(&format!("DROP TABLE {}", olds.join(", ")))
            .await
            .map_err(step(all, "dropping the replaced tables"))?;
        for s in &plan.tables {
            for sql in &s.attach {
                super::restore::run(
                    &tx,
                    &s.live,
                    "giving its new table its names and settings",
                    sql,
                )
                .await?;
            }
            for (col, old_name) in &s.identity {
                let seq: Option<String> = tx
                    .query_one("SELECT pg_get_serial_sequence($1, $2)", &[&s.live, col])
                    .await
                    .with_context(|| format!("reading the identity sequence of {}", s.live))?
                    .get(0);
                if let Some(seq) = seq {
                    super::restore::run(
                        &tx,
                        &s.live,
                        "naming its identity sequence",
                        &format!("ALTER SEQUENCE {seq} RENAME TO {old_name}"),
                    )
                    .await?;
                }
            }
        }
        for t in chosen {
            for s in &t.sequences {
                tx.execute(
                    "SELECT setval($1::text::regclass, $2, $3)",
                    &[&s.name, &s.last_value, &s.is_called],
                )
                .await
                .with_context(|| format!("restoring sequence {}", s.name))?;
            }
        }
        tx.commit().await.context("committing the swap")?;
        Ok(())
    }

    /// Drops the shadows of a parallel restore that did not swap (best effort: a
    /// shadow left behind is named in the log).
    async fn drop_shadows(&self, plan: &ShadowPlan) {
        let conn = match sanare_pg::get_conn(&self.inner.pool).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "could not drop the shadow tables of a failed parallel restore");
                return;
            }
        };
        for s in &plan.tables {
            if let Err(e) = conn
                .batch_execute(&format!("DROP TABLE IF EXISTS {}", s.shadow))
                .await
            {
                tracing::warn!(shadow = %s.shadow, error = %e, "could not drop a shadow table of a failed parallel restore; drop it by hand");
            }
        }
    }
}
