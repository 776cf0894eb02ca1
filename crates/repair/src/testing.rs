//! Fakes of the snapshot and journal services, backed by real PostgreSQL tables, for
//! this crate's tests and benches (feature `testing`). They are not snapshots: a
//! "snapshot" here is a plain copy table per captured table and snapshot id, kept
//! until the fake is dropped with its database.

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

use crate::catalog::lit;

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

    fn copy_of(&self, snapshot: SnapshotId, table: &TableRef) -> String {
        let id = snapshot.as_uuid().simple().to_string();
        format!(
            "{}.{}",
            quote_ident(&self.copy_schema),
            quote_ident(&format!("{}__{}__{}", &id[20..], table.schema, table.name))
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
        let id = SnapshotId::new();
        for t in &tables {
            let copy = self.copy_of(id, t);
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
            "id": id,
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
                        self.copy_of(request.snapshot, t)
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
        let known = self
            .snapshots
            .lock()
            .map(|s| s.iter().any(|i| i.id == snapshot))
            .unwrap_or(false);
        if !known {
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
                        self.copy_of(snapshot, &table)
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

/// The recompute rule the corpus's consistency violations name.
pub const ORDER_TOTAL_RULE: &str = "order_total_matches_lines";

/// Registers the corpus's recompute rule (orders' `total_cents` is the sum of their
/// lines' `amount_cents`) for the order-service fixture in `schema`.
pub fn corpus_rules(
    builder: crate::RepairEngineBuilder,
    schema: &str,
) -> crate::RepairEngineBuilder {
    builder.recompute_rule(
        ORDER_TOTAL_RULE,
        TableRef::new(schema, "orders"),
        "total_cents",
        format!(
            "(SELECT coalesce(sum(l.amount_cents), 0) FROM {}.order_lines l WHERE l.order_id = t.id)",
            quote_ident(schema)
        ),
    )
}

/// A labelled corpus of planted violations: each with the decision-table row
/// (`"R1"` … or `"manual"`) that must be chosen for it.
pub type Corpus = Vec<(sanare_core::Violation, &'static str)>;

/// Plants a labelled corpus of violations in `schema`, which must hold the
/// order-service fixture generated with at least 200 orders. Adds three small tables
/// (`notes`: nullable foreign key, `tags`: duplicates, `settings`: nulls and
/// defaults), takes a snapshot through `snapshots` of customers, products and orders,
/// then damages the data (foreign-key triggers off while planting). Engines analysing
/// the corpus should have `snapshots` and a journal attached, and [`corpus_rules`].
pub async fn plant_corpus(
    client: &tokio_postgres::Client,
    schema: &str,
    snapshots: &dyn SnapshotService,
) -> Result<Corpus> {
    let s = quote_ident(schema);
    let t = |name: &str| TableRef::new(schema, name);
    let run = |sql: String| async move {
        client
            .batch_execute(&sql)
            .await
            .with_context(|| format!("planting the corpus: {sql}"))
    };
    run(format!(
        "CREATE TABLE {s}.notes (id bigint PRIMARY KEY, order_id bigint REFERENCES {s}.orders (id), body text);
         INSERT INTO {s}.notes SELECT g, g, 'note ' || g FROM generate_series(1, 10) g;
         CREATE TABLE {s}.tags (id bigint PRIMARY KEY, name text);
         INSERT INTO {s}.tags SELECT g, 'tag ' || (g % 7) FROM generate_series(1, 10) g;
         CREATE TABLE {s}.settings (id bigint PRIMARY KEY, v text DEFAULT 'x', w text);"
    ))
    .await?;
    snapshots
        .create(
            SnapshotRequest::new().tables([t("customers"), t("products"), t("orders")]),
            &Control::detached(),
        )
        .await?;
    run(format!(
        "INSERT INTO {s}.settings SELECT g, CASE WHEN g <= 4 THEN NULL ELSE 'v' END,
                CASE WHEN g BETWEEN 5 AND 8 THEN NULL ELSE 'w' END FROM generate_series(1, 12) g;
         INSERT INTO {s}.products (id, sku, name, price_cents) VALUES
                (100001, 'INJ-1', 'injected 1', 1), (100002, 'INJ-2', 'injected 2', 2);
         UPDATE {s}.products SET name = name || ' (corrupt)' WHERE id <= 8;
         UPDATE {s}.orders SET total_cents = total_cents + 1 WHERE id IN (150, 151, 152);
         UPDATE {s}.settings SET w = 'damaged' WHERE id IN (9, 10);
         SET session_replication_role = replica;
         DELETE FROM {s}.orders WHERE id BETWEEN 1 AND 4 OR id BETWEEN 101 AND 104 OR id BETWEEN 121 AND 123;
         DELETE FROM {s}.customers WHERE id IN (5, 6);
         SET session_replication_role = origin;"
    ))
    .await?;
    let mut corpus = referential_corpus(client, schema).await?;
    corpus.extend(other_corpus(schema));
    corpus.extend(corruption_corpus(schema));
    Ok(corpus)
}

use sanare_core::{ColumnValue, CorruptionKind, Severity, Violation, ViolationKind};

fn key_of(schema: &str, table: &str, cols: &[(&str, &str, String)]) -> RowRef {
    RowRef::new(
        TableRef::new(schema, table),
        cols.iter()
            .map(|(c, ty, v)| ColumnValue::new(*c, *ty, Some(v.clone())))
            .collect(),
    )
}

fn planted(
    schema: &str,
    kind: ViolationKind,
    sev: Severity,
    table: &str,
    row: Option<RowRef>,
) -> Violation {
    Violation::new(kind, sev, TableRef::new(schema, table), row, "planted")
}

/// The corpus's referential violations (R1 to R4).
async fn referential_corpus(client: &tokio_postgres::Client, schema: &str) -> Result<Corpus> {
    let s = quote_ident(schema);
    let key = |table: &str, cols: &[(&str, &str, String)]| key_of(schema, table, cols);
    let v = |kind, sev, table: &str, row| planted(schema, kind, sev, table, row);
    let referential = |table: &str, col: &str, parent: &str| ViolationKind::Referential {
        constraint: format!("{table}_{col}_fkey"),
        columns: vec![col.to_owned()],
        parent_table: TableRef::new(schema, parent),
        parent_columns: vec!["id".into()],
    };
    let mut corpus: Corpus = Vec::new();
    // R4: orphaned order lines, parent unknown to the snapshot lookup (no details).
    for r in client
        .query(&format!("SELECT order_id::text, line_no::text FROM {s}.order_lines WHERE order_id BETWEEN 101 AND 104 ORDER BY 1, 2 LIMIT 8"), &[])
        .await
        .context("listing orphans")?
    {
        let row = key("order_lines", &[("order_id", "bigint", r.get(0)), ("line_no", "integer", r.get(1))]);
        corpus.push((v(referential("order_lines", "order_id", "orders"), Severity::High, "order_lines", Some(row)), "R4"));
    }
    // R1: orders of deleted customers, which the snapshot still holds.
    for r in client
        .query(&format!("SELECT id::text, customer_id FROM {s}.orders WHERE customer_id IN (5, 6) ORDER BY id LIMIT 6"), &[])
        .await
        .context("listing orphans")?
    {
        let cid: i64 = r.get(1);
        let row = key("orders", &[("id", "bigint", r.get(0))]);
        corpus.push((
            v(referential("orders", "customer_id", "customers"), Severity::High, "orders", Some(row))
                .with_details(serde_json::json!({"missing_parent_key": {"id": cid}})),
            "R1",
        ));
    }
    // R3: notes with a nullable reference to deleted orders 1..4.
    for id in 1..=4 {
        let row = key("notes", &[("id", "bigint", id.to_string())]);
        corpus.push((
            v(
                referential("notes", "order_id", "orders"),
                Severity::Medium,
                "notes",
                Some(row),
            ),
            "R3",
        ));
    }
    // R2: payments of deleted orders, with journal entries that re-create them.
    for r in client
        .query(&format!("SELECT id::text FROM {s}.payments WHERE order_id BETWEEN 121 AND 123 ORDER BY id LIMIT 3"), &[])
        .await
        .context("listing orphans")?
    {
        let id: String = r.get(0);
        let row = key("payments", &[("id", "bigint", id.clone())]);
        corpus.push((
            v(referential("payments", "order_id", "orders"), Severity::High, "payments", Some(row))
                .with_details(serde_json::json!({"idempotency_keys": [format!("order-{id}")]})),
            "R2",
        ));
    }
    Ok(corpus)
}

/// The corpus's violations of single rows and columns (R5, R7 to R10).
fn other_corpus(schema: &str) -> Corpus {
    let key = |table: &str, cols: &[(&str, &str, String)]| key_of(schema, table, cols);
    let v = |kind, sev, table: &str, row| planted(schema, kind, sev, table, row);
    let mut corpus: Corpus = Vec::new();
    // R5: checksum mismatches and a check violation on rows the snapshot holds.
    for id in 1..=5 {
        let row = key("products", &[("id", "bigint", id.to_string())]);
        corpus.push((
            v(
                ViolationKind::ChecksumMismatch {
                    column: "checksum".into(),
                },
                Severity::High,
                "products",
                Some(row),
            ),
            "R5",
        ));
    }
    for id in 6..=8 {
        let row = key("products", &[("id", "bigint", id.to_string())]);
        corpus.push((
            v(
                ViolationKind::CheckConstraint {
                    constraint: "products_name_check".into(),
                    columns: vec!["name".into()],
                },
                Severity::Medium,
                "products",
                Some(row),
            ),
            "R5",
        ));
    }
    // R7 / R10: nulls in settings (rows newer than the snapshot).
    for id in 1..=4 {
        let row = key("settings", &[("id", "bigint", id.to_string())]);
        corpus.push((
            v(
                ViolationKind::NullConstraint { column: "v".into() },
                Severity::Low,
                "settings",
                Some(row),
            ),
            "R7",
        ));
    }
    for id in 5..=8 {
        let row = key("settings", &[("id", "bigint", id.to_string())]);
        corpus.push((
            v(
                ViolationKind::NullConstraint { column: "w".into() },
                Severity::Low,
                "settings",
                Some(row),
            ),
            "R10",
        ));
    }
    // R9: duplicate tag names.
    for _ in 0..3 {
        corpus.push((
            v(
                ViolationKind::UniqueConstraint {
                    constraint: "tags_name_key".into(),
                    columns: vec!["name".into()],
                },
                Severity::Medium,
                "tags",
                None,
            ),
            "R9",
        ));
    }
    // R8: order totals that disagree with their lines.
    for id in 150..=152 {
        let row = key("orders", &[("id", "bigint", id.to_string())]);
        corpus.push((
            v(
                ViolationKind::Consistency {
                    rule: "order_total_matches_lines".into(),
                },
                Severity::Medium,
                "orders",
                Some(row),
            )
            .with_details(serde_json::json!({"recompute": {"rule": ORDER_TOTAL_RULE, "column": "total_cents"}})),
            "R8",
        ));
    }
    corpus
}

/// The corpus's corruption and manual violations (R6, R11 to R13, manual).
fn corruption_corpus(schema: &str) -> Corpus {
    let key = |table: &str, cols: &[(&str, &str, String)]| key_of(schema, table, cols);
    let v = |kind, sev, table: &str, row| planted(schema, kind, sev, table, row);
    let mut corpus: Corpus = Vec::new();
    // R12: damaged indexes.
    for (table, index) in [
        ("orders", "orders_customer_id_idx"),
        ("order_lines", "order_lines_product_id_idx"),
    ] {
        corpus.push((
            v(
                ViolationKind::Corruption {
                    kind: CorruptionKind::Index,
                    column: None,
                    index: Some(index.into()),
                },
                Severity::Medium,
                table,
                None,
            ),
            "R12",
        ));
    }
    // R11: injected products.
    for id in [100001, 100002] {
        let row = key("products", &[("id", "bigint", id.to_string())]);
        corpus.push((
            v(
                ViolationKind::Corruption {
                    kind: CorruptionKind::Injection,
                    column: None,
                    index: None,
                },
                Severity::High,
                "products",
                Some(row),
            ),
            "R11",
        ));
    }
    // R13: a truncated table.
    corpus.push((
        v(
            ViolationKind::Corruption {
                kind: CorruptionKind::Truncation,
                column: None,
                index: None,
            },
            Severity::Critical,
            "products",
            None,
        ),
        "R13",
    ));
    // R6: checksum mismatches on rows the snapshot does not hold, with journal entries.
    for id in 9..=10 {
        let row = key("settings", &[("id", "bigint", id.to_string())]);
        corpus.push((
            v(
                ViolationKind::ChecksumMismatch {
                    column: "checksum".into(),
                },
                Severity::High,
                "settings",
                Some(row),
            )
            .with_details(serde_json::json!({"idempotency_keys": [format!("setting-{id}")]})),
            "R6",
        ));
    }
    // Manual: a schema difference; a checksum mismatch nothing can explain.
    corpus.push((
        v(
            ViolationKind::Schema {
                detail: "column body is text, expected varchar".into(),
            },
            Severity::Medium,
            "notes",
            None,
        ),
        "manual",
    ));
    let row = key("settings", &[("id", "bigint", "11".into())]);
    corpus.push((
        v(
            ViolationKind::ChecksumMismatch {
                column: "checksum".into(),
            },
            Severity::High,
            "settings",
            Some(row),
        ),
        "manual",
    ));
    corpus
}
