//! Fakes of the snapshot and journal services, backed by real PostgreSQL tables, for
//! this crate's tests and benches (feature `testing`). They are not snapshots: a
//! "snapshot" here is a plain copy table per captured table, and only the latest one
//! is kept.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use sanare_core::{
    Control, Error, JournalCut, JournalPosition, JournalService, ReplayRequest, ReplaySummary,
    RestoreOutcome, RestoreRequest, RestoreTarget, Result, RowImage, RowRef, SnapshotId,
    SnapshotInfo, SnapshotRequest, SnapshotService, TableRef, VerifyReport,
};
use sanare_pg::{PgResultExt, Pool, get_conn, quote_ident};
use time::OffsetDateTime;

use crate::sql::lit;

/// A [`SnapshotService`] whose snapshot is a copy of each table in `copy_schema`.
#[derive(Debug)]
pub struct PgCopySnapshots {
    pool: Pool,
    copy_schema: String,
    snapshots: Mutex<Vec<SnapshotInfo>>,
    /// How many times [`SnapshotService::create`] ran.
    pub creates: std::sync::atomic::AtomicU64,
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::other("building a fake record", e))
}

impl PgCopySnapshots {
    /// A fake keeping its copies in `copy_schema`.
    pub fn new(pool: Pool, copy_schema: &str) -> Self {
        Self {
            pool,
            copy_schema: copy_schema.to_owned(),
            snapshots: Mutex::new(Vec::new()),
            creates: Default::default(),
        }
    }

    fn copy_of(&self, table: &TableRef) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.copy_schema),
            quote_ident(&format!("{}__{}", table.schema, table.name))
        )
    }

    fn latest(&self) -> Option<SnapshotInfo> {
        self.snapshots.lock().ok()?.last().cloned()
    }
}

#[async_trait]
impl SnapshotService for PgCopySnapshots {
    async fn create(&self, request: SnapshotRequest, _control: &Control) -> Result<SnapshotInfo> {
        self.creates
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let conn = get_conn(&self.pool).await?;
        let mut tables = request.tables.clone();
        if !request.schemas.is_empty() {
            tables.extend(
                sanare_pg::catalog::list_tables(&**conn, &request.schemas, &self.copy_schema)
                    .await?,
            );
        }
        conn.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(&self.copy_schema)
        ))
        .await
        .context("creating the copy schema")?;
        let mut counts = Vec::new();
        for t in &tables {
            let copy = self.copy_of(t);
            conn.batch_execute(&format!(
                "DROP TABLE IF EXISTS {copy}; CREATE TABLE {copy} AS SELECT * FROM {}",
                t.quoted()
            ))
            .await
            .with_context(|| format!("copying {t}"))?;
            let n: i64 = conn
                .query_one(&format!("SELECT count(*) FROM {copy}"), &[])
                .await
                .context("counting a copy")?
                .get(0);
            counts.push(serde_json::json!({"table": t, "rows": n}));
        }
        let info: SnapshotInfo = from_json(serde_json::json!({
            "id": SnapshotId::new(),
            "created_at": OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).map_err(|e| Error::other("formatting a time", e))?,
            "status": "ready",
            "label": request.label,
            "base": null,
            "journal_cut": null,
            "tables": counts,
            "size_bytes": 0,
            "stored_bytes": 0,
            "metadata": BTreeMap::<String, String>::new(),
        }))?;
        if let Ok(mut s) = self.snapshots.lock() {
            s.push(info.clone());
        }
        Ok(info)
    }

    async fn latest_good(&self, _before: Option<OffsetDateTime>) -> Result<Option<SnapshotInfo>> {
        Ok(self.latest())
    }

    async fn restore(&self, request: RestoreRequest, _control: &Control) -> Result<RestoreOutcome> {
        let RestoreTarget::Scratch { schema } = &request.target else {
            return Err(Error::invalid_input(
                "the fake restores into a scratch schema only",
            ));
        };
        let conn = get_conn(&self.pool).await?;
        conn.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        ))
        .await
        .context("creating a scratch schema")?;
        let mut tables = Vec::new();
        for t in &request.tables {
            let target = TableRef::new(schema.clone(), t.name.clone());
            let n = conn
                .execute(
                    &format!(
                        "CREATE TABLE {} AS SELECT * FROM {}",
                        target.quoted(),
                        self.copy_of(t)
                    ),
                    &[],
                )
                .await
                .with_context(|| format!("restoring {t} into {schema}"))?;
            tables.push(serde_json::json!({"table": t, "rows": n}));
        }
        from_json(
            serde_json::json!({"snapshot": request.snapshot, "tables": tables, "journal_cut": null}),
        )
    }

    async fn fetch_rows(&self, snapshot: SnapshotId, rows: &[RowRef]) -> Result<Vec<RowImage>> {
        if self.latest().is_none_or(|s| s.id != snapshot) {
            return Err(Error::not_found(format!("snapshot {snapshot}")));
        }
        let conn = get_conn(&self.pool).await?;
        let mut by_table: BTreeMap<TableRef, Vec<&RowRef>> = BTreeMap::new();
        for r in rows {
            by_table.entry(r.table.clone()).or_default().push(r);
        }
        let mut found: Vec<(String, RowImage)> = Vec::new();
        for (table, refs) in by_table {
            let info = sanare_pg::catalog::describe(&**conn, &table).await?;
            let cols = info
                .columns
                .iter()
                .map(|c| format!("t.{}::text", quote_ident(&c.name)))
                .collect::<Vec<_>>()
                .join(", ");
            let Some(first) = refs.first() else { continue };
            let key_cols = first
                .key
                .iter()
                .map(|c| format!("t.{}", quote_ident(&c.column)))
                .collect::<Vec<_>>()
                .join(", ");
            let tuples = refs
                .iter()
                .map(|r| {
                    let vals = r
                        .key
                        .iter()
                        .map(|c| lit(c.value.as_deref(), &c.type_name))
                        .collect::<Vec<_>>()
                        .join(", ");
                    format!("({vals})")
                })
                .collect::<Vec<_>>()
                .join(", ");
            let result = conn
                .query(
                    &format!(
                        "SELECT ARRAY[{cols}] FROM {} t WHERE ({key_cols}) IN ({tuples})",
                        self.copy_of(&table)
                    ),
                    &[],
                )
                .await;
            let result = match result {
                Ok(r) => r,
                // A table the snapshot did not capture has no rows in it.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                    continue;
                }
                Err(e) => return Err(sanare_pg::map_pg_error("reading snapshot rows", e)),
            };
            for r in result {
                let values: Vec<Option<String>> = r.get(0);
                let image = RowImage {
                    table: table.clone(),
                    values: info
                        .columns
                        .iter()
                        .zip(values)
                        .map(|(c, v)| {
                            sanare_core::ColumnValue::new(c.name.clone(), c.type_name.clone(), v)
                        })
                        .collect(),
                };
                let key = first
                    .key
                    .iter()
                    .map(|c| {
                        image
                            .get(&c.column)
                            .flatten()
                            .unwrap_or_default()
                            .to_owned()
                    })
                    .collect::<Vec<_>>()
                    .join("\u{1}");
                found.push((format!("{table}\u{0}{key}"), image));
            }
        }
        let mut out = Vec::new();
        for r in rows {
            let key = r
                .key
                .iter()
                .map(|c| c.value.clone().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\u{1}");
            let want = format!("{}\u{0}{key}", r.table);
            if let Some((_, img)) = found.iter().find(|(k, _)| *k == want) {
                out.push(img.clone());
            }
        }
        Ok(out)
    }

    async fn verify(&self, snapshot: SnapshotId, _control: &Control) -> Result<VerifyReport> {
        from_json(
            serde_json::json!({"snapshot": snapshot, "blocks_checked": 0, "blocks_missing": 0, "blocks_corrupt": 0, "problems": []}),
        )
    }
}

/// A [`JournalService`] whose entries are SQL statements by idempotency key, applied
/// exactly once each.
#[derive(Debug)]
pub struct FakeJournal {
    pool: Pool,
    entries: Vec<(String, String)>,
    applied: Mutex<HashSet<String>>,
}

impl FakeJournal {
    /// A journal of `(idempotency key, SQL)` entries.
    pub fn new(pool: Pool, entries: Vec<(String, String)>) -> Self {
        Self {
            pool,
            entries,
            applied: Mutex::new(HashSet::new()),
        }
    }
}

#[async_trait]
impl JournalService for FakeJournal {
    async fn head(&self) -> Result<JournalPosition> {
        Ok(JournalPosition(self.entries.len() as u64))
    }

    async fn cut(&self, db_snapshot: Option<&str>) -> Result<JournalCut> {
        Ok(JournalCut {
            position: self.head().await?,
            db_snapshot: db_snapshot.map(str::to_owned),
        })
    }

    async fn replay(&self, request: ReplayRequest, control: &Control) -> Result<ReplaySummary> {
        let conn = get_conn(&self.pool).await?;
        let (mut seen, mut applied, mut already) = (0u64, 0u64, 0u64);
        for (key, sql) in &self.entries {
            control.checkpoint()?;
            if !request.idempotency_keys.is_empty() && !request.idempotency_keys.contains(key) {
                continue;
            }
            seen += 1;
            let done = self
                .applied
                .lock()
                .map(|a| a.contains(key))
                .unwrap_or(false);
            if done {
                already += 1;
                continue;
            }
            applied += 1;
            if !request.dry_run {
                conn.batch_execute(sql)
                    .await
                    .with_context(|| format!("applying journal entry {key}"))?;
                if let Ok(mut a) = self.applied.lock() {
                    a.insert(key.clone());
                }
            }
        }
        from_json(serde_json::json!({
            "entries_seen": seen, "applied": applied, "already_applied": already,
            "failures": [], "last_position": null, "dry_run": request.dry_run,
        }))
    }
}
