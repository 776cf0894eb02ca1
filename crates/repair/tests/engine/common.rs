//! Fixtures shared by the engine's tests.

#![allow(dead_code)]

use std::sync::Arc;

use sanare_core::{ColumnValue, RowRef, Severity, TableRef, Violation, ViolationKind};
use sanare_repair::testing::{FakeJournal, PgCopySnapshots, corpus_rules};
use sanare_repair::{ActionKey, RepairConfig, RepairEngine, RepairEngineBuilder};
use sanare_testing::fixtures::order_service;
use sanare_testing::{TestDb, test_db};

pub(crate) const S: &str = "shop";

/// A fresh database with the order-service fixture and `orders` orders.
pub(crate) async fn setup(orders: u64) -> TestDb {
    let db = test_db().await;
    let c = db.client().await;
    order_service::install(&**c, S).await.unwrap();
    order_service::generate(&**c, S, orders).await.unwrap();
    db
}

pub(crate) fn engine(db: &TestDb) -> RepairEngineBuilder {
    RepairEngine::builder().pool(db.pool().clone())
}

/// No severity or removal gate (tests that are not about approvals).
pub(crate) fn lenient() -> RepairConfig {
    RepairConfig::new()
        .approval_severity(None)
        .removals_need_approval(false)
}

/// The tables of the labelled corpus.
pub(crate) const CORPUS_TABLES: [&str; 8] = [
    "customers",
    "products",
    "orders",
    "order_lines",
    "payments",
    "notes",
    "tags",
    "settings",
];

/// An engine for the labelled corpus: its snapshots, a journal whose order entries
/// are no-ops and whose settings entries write `w`, its recompute rule, no row gate.
pub(crate) fn corpus_engine(db: &TestDb, snaps: Arc<PgCopySnapshots>) -> RepairEngine {
    let entries = (1..=200)
        .map(|i| (format!("order-{i}"), format!("SELECT {i}")))
        .chain((9..=10).map(|i| {
            (
                format!("setting-{i}"),
                format!("UPDATE {S}.settings SET w = 'w' WHERE id = {i}"),
            )
        }))
        .collect();
    corpus_rules(engine(db), S)
        .snapshots(snaps)
        .journal(Arc::new(FakeJournal::new(db.pool().clone(), entries)))
        .config(
            RepairConfig::new()
                .approval_severity(None)
                .approval_max_rows(u64::MAX),
        )
        .build()
        .unwrap()
}

/// A referential violation of `table.col` (to `parent.id`) on the row `key`.
pub(crate) fn orphan(
    table: &str,
    col: &str,
    parent: &str,
    key: &[(&str, &str, String)],
    severity: Severity,
) -> Violation {
    Violation::new(
        referential(table, col, parent),
        severity,
        t(table),
        Some(row(table, key)),
        "orphaned row",
    )
}

pub(crate) fn key() -> ActionKey {
    ActionKey::from_bytes([42; 32])
}

pub(crate) fn t(name: &str) -> TableRef {
    TableRef::new(S, name)
}

/// md5 of a table's rows (record text, sorted).
pub(crate) async fn hash(db: &TestDb, table: &str) -> String {
    let c = db.client().await;
    c.query_one(
        &format!(
            "SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {S}.{table} t"
        ),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

pub(crate) async fn exec(db: &TestDb, sql: &str) {
    db.client()
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

pub(crate) async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client()
        .await
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

pub(crate) fn row(table: &str, key: &[(&str, &str, String)]) -> RowRef {
    RowRef::new(
        t(table),
        key.iter()
            .map(|(c, ty, v)| ColumnValue::new(*c, *ty, Some(v.clone())))
            .collect(),
    )
}

pub(crate) fn referential(table: &str, col: &str, parent: &str) -> ViolationKind {
    ViolationKind::Referential {
        constraint: format!("{table}_{col}_fkey"),
        columns: vec![col.to_owned()],
        parent_table: t(parent),
        parent_columns: vec!["id".into()],
    }
}

/// Deletes orders with FK triggers off, orphaning their lines; returns one
/// referential violation per orphaned line.
pub(crate) async fn orphan_lines(db: &TestDb, orders: &str) -> Vec<Violation> {
    exec(
        db,
        &format!(
            "SET session_replication_role = replica; DELETE FROM {S}.orders WHERE id IN ({orders}); SET session_replication_role = origin;"
        ),
    )
    .await;
    orphan_violations(db).await
}

/// One referential violation per orphaned order line.
pub(crate) async fn orphan_violations(db: &TestDb) -> Vec<Violation> {
    let c = db.client().await;
    c.query(
        &format!(
            "SELECT order_id::text, line_no::text FROM {S}.order_lines l
              WHERE NOT EXISTS (SELECT 1 FROM {S}.orders o WHERE o.id = l.order_id) ORDER BY 1, 2"
        ),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        orphan(
            "order_lines",
            "order_id",
            "orders",
            &[
                ("order_id", "bigint", r.get::<_, String>(0)),
                ("line_no", "integer", r.get::<_, String>(1)),
            ],
            Severity::High,
        )
    })
    .collect()
}

pub(crate) async fn orphans(db: &TestDb) -> i64 {
    count(
        db,
        &format!("SELECT count(*) FROM {S}.order_lines l WHERE NOT EXISTS (SELECT 1 FROM {S}.orders o WHERE o.id = l.order_id)"),
    )
    .await
}

/// A canary: a table and a function that writes to it and advances a sequence. Any
/// SQL smuggled into a stored repair calls `shop.canary()`; the table must stay empty
/// and the sequence unused. The sequence is not transactional, so it also catches SQL
/// that ran in a dry run (rolled back).
pub(crate) async fn canary(db: &TestDb) {
    exec(
        db,
        &format!(
            "CREATE TABLE {S}.canary (at timestamptz DEFAULT now());
             CREATE SEQUENCE {S}.canary_calls;
             CREATE FUNCTION {S}.canary() RETURNS boolean LANGUAGE sql
               AS $$ SELECT nextval('{S}.canary_calls'); INSERT INTO {S}.canary DEFAULT VALUES RETURNING true $$;"
        ),
    )
    .await;
}

/// How many times the canary was called (committed or not).
pub(crate) async fn canary_calls(db: &TestDb) -> i64 {
    let called = count(
        db,
        &format!("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {S}.canary_calls"),
    )
    .await;
    let rows = count(db, &format!("SELECT count(*) FROM {S}.canary")).await;
    called.max(rows)
}
