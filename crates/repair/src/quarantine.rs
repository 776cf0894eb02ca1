//! The quarantine: every row a repair removed, kept whole (`repair_quarantine`) and
//! restorable by id.

use sanare_core::{BoxStream, Error, RepairId, Result, TableRef};
use sanare_pg::{PgResultExt, Pool, get_conn};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;

use crate::apply::Tables;
use crate::catalog::Meta;
use crate::engine::{RepairEngine, advisory_key};
use crate::rollback::{Relief, reinsert};

/// A row a repair moved to the quarantine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QuarantinedRow {
    /// Its id, by which it is restored.
    pub id: i64,
    /// The repair that removed it.
    pub repair: RepairId,
    /// Its table.
    pub table: TableRef,
    /// Its primary-key values (text), in key order.
    pub key: Vec<String>,
    /// The whole row as PostgreSQL record text (`row::text`), lossless.
    pub row_image: String,
    /// When it was removed.
    #[serde(with = "time::serde::rfc3339")]
    pub quarantined_at: OffsetDateTime,
    /// When it was put back, if it was.
    #[serde(with = "time::serde::rfc3339::option")]
    pub restored_at: Option<OffsetDateTime>,
    /// Who put it back.
    pub restored_by: Option<String>,
}

const COLUMNS: &str = "id, repair_id, table_schema, table_name, key, row_image, quarantined_at, restored_at, restored_by";

fn from_row(r: &tokio_postgres::Row) -> QuarantinedRow {
    QuarantinedRow {
        id: r.get(0),
        repair: RepairId::from_uuid(r.get(1)),
        table: TableRef::new(r.get::<_, String>(2), r.get::<_, String>(3)),
        key: r.get(4),
        row_image: r.get(5),
        quarantined_at: r.get(6),
        restored_at: r.get(7),
        restored_by: r.get(8),
    }
}

fn list(
    pool: Pool,
    table: String,
    repair: Option<RepairId>,
) -> BoxStream<'static, Result<QuarantinedRow>> {
    const PAGE: i64 = 500;
    let repair = repair.map(|r| r.as_uuid());
    crate::page::paged(0i64, move |after| {
        let (pool, table) = (pool.clone(), table.clone());
        async move {
            let conn = get_conn(&pool).await?;
            let rows = conn
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM {table} WHERE id > $1 AND ($2::uuid IS NULL OR repair_id = $2)
                          ORDER BY id LIMIT {PAGE}"
                    ),
                    &[&after, &repair],
                )
                .await
                .context("reading the quarantine")?;
            let next = (rows.len() as i64 == PAGE)
                .then(|| rows.last().map(|r| r.get::<_, i64>(0)))
                .flatten();
            Ok((rows.iter().map(from_row).collect(), next))
        }
    })
}

impl RepairEngine {
    /// The quarantined rows (of one repair, or of all), oldest first, read a page at
    /// a time.
    pub fn quarantine(
        &self,
        repair: Option<RepairId>,
    ) -> BoxStream<'static, Result<QuarantinedRow>> {
        list(self.pool().clone(), self.t("repair_quarantine"), repair)
    }

    /// One quarantined row.
    pub async fn quarantined(&self, id: i64) -> Result<QuarantinedRow> {
        let conn = get_conn(self.pool()).await?;
        conn.query_opt(
            &format!(
                "SELECT {COLUMNS} FROM {} WHERE id = $1",
                self.t("repair_quarantine")
            ),
            &[&id],
        )
        .await
        .context("reading the quarantine")?
        .map(|r| from_row(&r))
        .ok_or_else(|| Error::not_found(format!("quarantined row {id}")))
    }

    /// Every row a repair recorded, with what its last run did with it, read a page
    /// at a time.
    pub async fn targets(
        &self,
        repair: RepairId,
    ) -> Result<BoxStream<'static, Result<crate::RepairTarget>>> {
        let loaded = self.load(repair).await?;
        let conn = get_conn(self.pool()).await?;
        let meta = Meta::load(&**conn, &loaded.table).await?;
        Ok(crate::targets::list(
            self.pool().clone(),
            self.t("repair_targets"),
            repair,
            meta,
        ))
    }

    /// Puts quarantined row `id` back into its table, exactly as it was, recording
    /// `by`. Refused (nothing changes) when it was already put back, when a row with
    /// its key exists, or when its table no longer takes it.
    pub async fn restore_quarantined(&self, id: i64, by: &str) -> Result<QuarantinedRow> {
        if by.trim().is_empty() {
            return Err(Error::invalid_input(
                "restoring a quarantined row needs the operator's name",
            ));
        }
        let t = Tables::of(self);
        let mut conn = get_conn(self.pool()).await?;
        let mut tx =
            crate::apply::transaction(&mut conn, "starting the quarantine restore").await?;
        let entry = tx
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM {} k WHERE id = $1 AND EXISTS (
                       SELECT 1 FROM {} o WHERE o.id = k.repair_id
                          AND (o.table_schema, o.table_name) = (k.table_schema, k.table_name))
                     FOR UPDATE",
                    t.quarantine, t.ops
                ),
                &[&id],
            )
            .await
            .context("reading the quarantine")?
            .map(|r| from_row(&r))
            .ok_or_else(|| {
                Error::not_found(format!("quarantined row {id} of its repair's table"))
            })?;
        if let Some(at) = entry.restored_at {
            return Err(Error::conflict(format!(
                "quarantined row {id} was already put back at {at}"
            )));
        }
        let locked: bool = tx
            .query_one(
                "SELECT pg_try_advisory_xact_lock($1)",
                &[&advisory_key(entry.repair)],
            )
            .await
            .context("taking the repair's advisory lock")?
            .get(0);
        if !locked {
            return Err(Error::conflict(format!(
                "repair {} is being run or rolled back by another session",
                entry.repair
            )));
        }
        Meta::check_scope(&entry.table, self.inner.schema.as_str())?;
        let meta = Meta::load(&tx, &entry.table).await?;
        meta.require_pk()?;
        let q = &meta.quoted;
        let exists: bool = tx
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {q} t, {} k WHERE k.id = $1 AND {})",
                    t.quarantine,
                    meta.key_match("t", "k.key")?
                ),
                &[&id],
            )
            .await
            .with_context(|| format!("looking for a row of {} with the same key", meta.table))?
            .get(0);
        if exists {
            return Err(Error::conflict(format!(
                "a row of {} with the key of quarantined row {id} exists: reconcile them by hand",
                meta.table
            )));
        }
        tx.batch_execute("SET CONSTRAINTS ALL IMMEDIATE")
            .await
            .context("making constraints immediate")?;
        let mut relief = Relief::new(&meta);
        let params: [&(dyn ToSql + Sync); 1] = [&id];
        reinsert(&mut tx, &mut relief, &meta, &t, "k.id = $1", &params).await?;
        relief.restore(&tx).await?;
        let same: bool = tx
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {q} t, {} k WHERE k.id = $1 AND {} AND {} = k.row_image)",
                    t.quarantine,
                    meta.key_match("t", "k.key")?,
                    Meta::row_text("t")
                ),
                &[&id],
            )
            .await
            .context("verifying the restored row")?
            .get(0);
        if !same {
            return Err(Error::conflict(format!(
                "quarantined row {id} came back different (a trigger changed it?): nothing changed"
            )));
        }
        tx.execute(
            &format!(
                "UPDATE {} SET restored_at = now(), restored_by = $2 WHERE id = $1",
                t.quarantine
            ),
            &[&id as &(dyn ToSql + Sync), &by],
        )
        .await
        .context("recording the restored row")?;
        let mut lines = relief.log.clone();
        lines.push(format!("quarantined row {id} put back by {by}"));
        tx.execute(
            &format!(
                "UPDATE {} SET rollback_log = rollback_log || $2::jsonb WHERE id = $1",
                t.ops
            ),
            &[&entry.repair.as_uuid(), &serde_json::json!(lines)],
        )
        .await
        .context("recording the restored row")?;
        tx.commit()
            .await
            .context("committing the quarantine restore")?;
        self.quarantined(id).await
    }
}
