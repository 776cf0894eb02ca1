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
        if self.inner.pool.status().max_size < 2 {
            return Err(Error::config(
                "snapshot.pool",
                "a parallel restore needs a pool of at least 2 connections",
            ));
        }
        // One parallel restore at a time per database: its connection holds a
        // session lock for the whole restore (released when it ends, or when the
        // connection drops with a crashed process), so shadows found at the start
        // were left by a crashed restore and are dropped.
        let lock = sanare_pg::get_conn(&self.inner.pool).await?;
        let key = parallel_lock_key(&self.inner.schema);
        let locked: bool = lock
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .context("taking the parallel restore lock")?
            .get(0);
        if !locked {
            return Err(Error::conflict(
                "another parallel restore of this database is running; wait for it to end",
            ));
        }
        let result = self
            .restore_parallel_locked(id, chosen, &tables, connections, control, &lock)
            .await;
        if let Err(e) = lock.execute("SELECT pg_advisory_unlock($1)", &[&key]).await {
            // The connection is suspect: never hand it back to the pool with the lock.
            tracing::warn!(error = %e, "could not release the parallel restore lock; closing its connection");
            let _ = deadpool_postgres::Object::take(lock);
        }
        result
    }

    async fn restore_parallel_locked(
        &self,
        id: SnapshotId,
        chosen: &[&TableIndex],
        tables: &[(TableRef, Vec<String>)],
        connections: u16,
        control: &Control,
        lock: &deadpool_postgres::Object,
    ) -> Result<RestoreOutcome> {
        let mut outcome = RestoreOutcome::new(id);
        let schemas: Vec<&str> = tables.iter().map(|(t, _)| t.schema.as_str()).collect();
        let leftovers: Vec<String> = lock
            .query(
                "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = ANY($1) AND c.relkind = 'r' AND c.relname LIKE 'sanare\\_shadow\\_%'",
                &[&schemas],
            )
            .await
            .context("looking for shadow tables of a crashed parallel restore")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !leftovers.is_empty() {
            lock.batch_execute(&format!("DROP TABLE {}", leftovers.join(", ")))
                .await
                .context("dropping the shadow tables of a crashed parallel restore")?;
            outcome.notes.push(format!(
                "dropped the shadow tables a crashed parallel restore left: {}",
                leftovers.join(", ")
            ));
        }
        let token = uuid::Uuid::now_v7().simple().to_string()[24..].to_owned();
        let client: &tokio_postgres::Client = lock;
        let plan = shadow::plan(client, tables, &token).await?;
        let result = self
            .load_and_swap(id, chosen, &plan, connections, control)
            .await;
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                return Err(match self.drop_shadows(&plan).await {
                    None => e,
                    Some(left) => match e {
                        Error::Conflict(msg) => Error::conflict(format!("{msg}; {left}")),
                        e => Error::other(left, e),
                    },
                });
            }
        };
        outcome.tables = tables
            .iter()
            .zip(rows)
            .map(|((table, _), rows)| TableRowCount {
                table: table.clone(),
                rows,
            })
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
        // One connection of the pool holds the parallel restore's lock.
        let pool_max = self.inner.pool.status().max_size.saturating_sub(1).max(1);
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

    /// Drops the shadows of a parallel restore that did not swap; says why not
    /// when it cannot (the next parallel restore drops them too).
    async fn drop_shadows(&self, plan: &ShadowPlan) -> Option<String> {
        // In one statement (the foreign keys among the shadows tie them together),
        // tried twice on two connections (one may still be ending a failed
        // transaction of the restore).
        let all: Vec<&str> = plan.tables.iter().map(|s| s.shadow.as_str()).collect();
        let sql = format!("DROP TABLE IF EXISTS {} CASCADE", all.join(", "));
        let mut why = String::new();
        for _ in 0..2 {
            let attempt = match sanare_pg::get_conn(&self.inner.pool).await {
                Ok(conn) => conn
                    .batch_execute(&sql)
                    .await
                    .context("dropping the shadow tables"),
                Err(e) => Err(e),
            };
            match attempt {
                Ok(()) => return None,
                Err(e) => why = e.to_string(),
            }
        }
        tracing::warn!(shadows = %all.join(", "), error = %why, "could not drop the shadow tables of a failed parallel restore");
        Some(format!(
            "its shadow tables {} could not be dropped ({why}): drop them, or the next parallel restore will",
            all.join(", ")
        ))
    }
}

/// The session advisory lock key of parallel restores into the database of sanare
/// schema `schema`.
fn parallel_lock_key(schema: &SchemaName) -> i64 {
    let h = blake3::hash(format!("sanare:snapshot:parallel-restore:{schema}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    i64::from_le_bytes(b)
}
