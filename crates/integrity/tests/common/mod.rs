//! Helpers shared by the integrity tests.

// Each test crate uses some of these.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use sanare_core::{TableRef, Violation, ViolationKind};
use sanare_integrity::ConsistencyRule;

/// `shop.orders.total_cents` is the sum of its lines' `amount_cents`.
pub(crate) fn order_total() -> ConsistencyRule {
    ConsistencyRule::aggregate_equals(
        "order_total",
        &TableRef::new("shop", "orders"),
        "id",
        "total_cents",
        &TableRef::new("shop", "order_lines"),
        "order_id",
        "amount_cents",
    )
}

/// The first column of every row of `sql`, as text.
pub(crate) async fn texts(c: &tokio_postgres::Client, sql: &str) -> BTreeSet<String> {
    c.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// A gate for the fused pass of `shop.orders`: every row waits for a shared
/// advisory lock on `key`. A test that holds the lock keeps a scan waiting inside
/// its transaction, its snapshot taken, until it lets go.
pub(crate) fn gate(key: i64) -> ConsistencyRule {
    ConsistencyRule::predicate(
        "gate",
        &TableRef::new("shop", "orders"),
        format!("pg_advisory_xact_lock_shared({key})::text IS NOT NULL"),
    )
}

/// Waits (a minute at most) until a session of this database waits for the
/// advisory lock `key`.
pub(crate) async fn wait_at_gate(c: &tokio_postgres::Client, key: i64) {
    let sql = format!(
        "SELECT count(*) > 0 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE a.datname = current_database() AND l.locktype = 'advisory'
            AND l.objid = {key} AND NOT l.granted"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !c.query_one(&sql, &[]).await.unwrap().get::<_, bool>(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "no session reached the gate {key}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a kind is about: its constraint, rule or column.
pub(crate) fn kind_name(k: &ViolationKind) -> String {
    match k {
        ViolationKind::NullConstraint { column }
        | ViolationKind::TypeMismatch { column, .. }
        | ViolationKind::ChecksumMismatch { column } => column.clone(),
        ViolationKind::UniqueConstraint { constraint, .. }
        | ViolationKind::CheckConstraint { constraint, .. }
        | ViolationKind::Referential { constraint, .. } => constraint.clone(),
        ViolationKind::Consistency { rule } => rule.clone(),
        other => format!("{other:?}"),
    }
}

/// The key values of a violation's row, joined by `/`.
pub(crate) fn row_key(v: &Violation) -> String {
    v.row
        .as_ref()
        .unwrap()
        .key
        .iter()
        .map(|c| c.value.clone().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("/")
}
