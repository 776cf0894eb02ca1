//! Do no harm: repairs touch only what is still wrong, removals are quarantined and
//! restorable, restores put back only damaged columns, rollback disables only the
//! foreign keys it must, session settings change nothing.

use std::sync::Arc;

use futures_util::TryStreamExt as _;
use sanare_core::{
    Control, CorruptionKind, Error, ExecuteOptions, RepairService, RepairStatus,
    RepairStrategyKind, Severity, SnapshotRequest, SnapshotService, Violation, ViolationKind,
};
use sanare_repair::testing::PgCopySnapshots;
use sanare_repair::{Decision, RepairConfig};

use crate::common::*;

/// Rows that changed since planning, or no longer violate, are skipped and reported;
/// never overwritten.
#[tokio::test]
async fn rows_changed_since_planning_or_no_longer_violating_are_skipped_and_reported() {
    let db = setup(60).await;
    let engine = engine(&db).config(lenient()).build().unwrap();
    engine.migrate().await.unwrap();
    let violations = orphan_lines(&db, "7, 8, 12").await;
    let plan = engine.plan(&violations).await.unwrap().remove(0);
    assert_eq!(plan.estimated_rows, violations.len() as u64);
    // A second client, after planning: writes one orphan line, and brings order 8
    // back (its lines are no longer orphans).
    exec(
        &db,
        &format!(
            "UPDATE {S}.order_lines SET quantity = quantity + 1, amount_cents = (quantity + 1) * unit_price_cents
              WHERE order_id = 7 AND line_no = 1;
             SET session_replication_role = replica;
             INSERT INTO {S}.orders (id, customer_id, status, total_cents) VALUES (8, 1, 'paid', 0);
             SET session_replication_role = origin;"
        ),
    )
    .await;
    let lines_of_8 = count(
        &db,
        &format!("SELECT count(*) FROM {S}.order_lines WHERE order_id = 8"),
    )
    .await;
    let written = count(
        &db,
        &format!("SELECT count(*) FROM {S}.order_lines WHERE order_id = 7 AND line_no = 1"),
    )
    .await;
    assert_eq!(written, 1);
    let out = engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(out.status, RepairStatus::Completed, "{:?}", out.message);
    let skipped = 1 + lines_of_8 as u64;
    assert_eq!(out.rows_skipped, skipped, "{:?}", out.message);
    assert_eq!(out.rows_affected, violations.len() as u64 - skipped);
    assert!(out.message.unwrap().contains("skipped"));
    // The written row and the lines of order 8 are still there, untouched.
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM {S}.order_lines WHERE order_id = 7 AND line_no = 1")
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM {S}.order_lines WHERE order_id = 8")
        )
        .await,
        lines_of_8
    );
    let targets: Vec<_> = engine
        .targets(plan.id)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let outcome = |o: &str| {
        targets
            .iter()
            .filter(|t| t.outcome.as_deref() == Some(o))
            .count() as u64
    };
    assert_eq!(outcome("changed"), 1);
    assert_eq!(outcome("fixed"), lines_of_8 as u64);
    assert_eq!(outcome("repaired"), out.rows_affected);
    let rec = engine.get(plan.id).await.unwrap();
    assert_eq!(rec.rows_skipped, Some(skipped));
}

/// A restore puts back the damaged column of the damaged row; a legitimate change to
/// another column made after the snapshot stays.
#[tokio::test]
async fn a_restore_replaces_only_the_damaged_columns_of_the_damaged_rows() {
    let db = setup(60).await;
    let snaps = Arc::new(PgCopySnapshots::new(db.pool().clone(), "snapcopy"));
    let engine = engine(&db)
        .snapshots(snaps.clone())
        .config(lenient())
        .build()
        .unwrap();
    engine.migrate().await.unwrap();
    snaps
        .create(
            SnapshotRequest::new().tables([t("products")]),
            &Control::detached(),
        )
        .await
        .unwrap();
    let good_name: String = db
        .client()
        .await
        .query_one(&format!("SELECT name FROM {S}.products WHERE id = 1"), &[])
        .await
        .unwrap()
        .get(0);
    // Legitimate writes after the snapshot, then damage to one column.
    exec(
        &db,
        &format!(
            "UPDATE {S}.products SET price_cents = 4242 WHERE id IN (1, 2);
             UPDATE {S}.products SET name = 'Produc\u{1}t 1' WHERE id = 1;
             UPDATE {S}.products SET name = 'garbage' WHERE id = 2;"
        ),
    )
    .await;
    let bit_flip = |id: i64| {
        Violation::new(
            ViolationKind::Corruption {
                kind: CorruptionKind::BitFlip,
                column: Some("name".into()),
                index: None,
            },
            Severity::High,
            t("products"),
            Some(row("products", &[("id", "bigint", id.to_string())])),
            "bit flip",
        )
    };
    let plan = engine
        .plan(&[bit_flip(1), bit_flip(2)])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(plan.strategy, RepairStrategyKind::RestoreFromSnapshot);
    // Product 2 is written again after planning: it is left alone.
    exec(
        &db,
        &format!("UPDATE {S}.products SET name = 'renamed by the app' WHERE id = 2"),
    )
    .await;
    let out = engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(out.status, RepairStatus::Completed, "{:?}", out.message);
    assert_eq!((out.rows_affected, out.rows_skipped), (1, 1));
    let rows = db
        .client()
        .await
        .query(
            &format!(
                "SELECT id, name, price_cents FROM {S}.products WHERE id IN (1, 2) ORDER BY id"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        rows[0].get::<_, String>(1),
        good_name,
        "damaged column restored"
    );
    assert_eq!(rows[0].get::<_, i64>(2), 4242, "later change kept");
    assert_eq!(rows[1].get::<_, String>(1), "renamed by the app");
    assert_eq!(rows[1].get::<_, i64>(2), 4242);
}

#[tokio::test]
async fn removals_wait_for_an_approval_unless_the_configuration_says_otherwise() {
    let db = setup(40).await;
    let mut violations = orphan_lines(&db, "5").await;
    for v in &mut violations {
        v.severity = Severity::Low;
    }
    let strict = engine(&db)
        .config(RepairConfig::new().approval_severity(None))
        .build()
        .unwrap();
    strict.migrate().await.unwrap();
    let before = hash(&db, "order_lines").await;
    let plan = strict.plan(&violations).await.unwrap().remove(0);
    assert!(plan.requires_approval, "a removal waits for an approval");
    let err = strict
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ApprovalRequired(_)), "{err}");
    assert_eq!(hash(&db, "order_lines").await, before);
    let lenient = engine(&db).config(lenient()).build().unwrap();
    let plan = lenient.plan(&violations).await.unwrap().remove(0);
    assert!(!plan.requires_approval);
}

/// R10 never removes a row for one bad column that a column fix can mend.
#[tokio::test]
async fn a_bad_column_with_a_fix_is_fixed_not_removed() {
    let db = setup(40).await;
    // A NOT VALID check lets bad totals in; total_cents has a default (0).
    exec(
        &db,
        &format!(
            "ALTER TABLE {S}.orders DROP CONSTRAINT orders_total_cents_check;
             UPDATE {S}.orders SET total_cents = -5 WHERE id IN (3, 4);
             ALTER TABLE {S}.orders ADD CONSTRAINT orders_total_cents_check CHECK (total_cents >= 0) NOT VALID;
             ALTER TABLE {S}.orders ADD COLUMN memo text;"
        ),
    )
    .await;
    let engine = engine(&db).config(lenient()).build().unwrap();
    engine.migrate().await.unwrap();
    let check = |id: i64, constraint: &str, column: &str| {
        Violation::new(
            ViolationKind::CheckConstraint {
                constraint: constraint.into(),
                columns: vec![column.into()],
            },
            Severity::Medium,
            t("orders"),
            Some(row("orders", &[("id", "bigint", id.to_string())])),
            "check fails",
        )
    };
    let fixable = check(3, "orders_total_cents_check", "total_cents");
    // A declared rule on a column with no default has no column fix.
    let unfixable = check(5, "memo_format", "memo");
    let analysis = engine
        .analyze(&[fixable.clone(), unfixable.clone()])
        .await
        .unwrap();
    let rules: Vec<_> = analysis
        .iter()
        .map(|(d, _)| match d {
            Decision::Strategy { rule, .. } => rule.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(rules, ["R7", "R10"]);
    let plan = engine.plan(&[fixable]).await.unwrap().remove(0);
    let out = engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(out.status, RepairStatus::Completed, "{:?}", out.message);
    let total: i64 = db
        .client()
        .await
        .query_one(
            &format!("SELECT total_cents FROM {S}.orders WHERE id = 3"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 0, "set to its default, the row kept");
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM {S}.orders WHERE id = 4 AND total_cents = -5")
        )
        .await,
        1
    );
}

/// Quarantined rows come back one by one, by id, exactly as they were.
#[tokio::test]
async fn a_quarantined_row_is_restored_by_id() {
    let db = setup(40).await;
    let engine = engine(&db).config(lenient()).build().unwrap();
    engine.migrate().await.unwrap();
    let before = hash(&db, "order_lines").await;
    let violations = orphan_lines(&db, "9").await;
    let broken = hash(&db, "order_lines").await;
    let _ = before;
    let plan = engine.plan(&violations).await.unwrap().remove(0);
    engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    let rows: Vec<_> = engine
        .quarantine(Some(plan.id))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rows.len(), violations.len());
    let first = &rows[0];
    assert!(first.row_image.starts_with('('));
    let back = engine.restore_quarantined(first.id, "alice").await.unwrap();
    assert_eq!(back.restored_by.as_deref(), Some("alice"));
    let err = engine
        .restore_quarantined(first.id, "alice")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already"), "{err}");
    let err = engine
        .restore_quarantined(i64::MAX, "alice")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    // The rest comes back with the rollback, which skips the one already back.
    engine
        .rollback(plan.id, &Control::detached())
        .await
        .unwrap();
    assert_eq!(hash(&db, "order_lines").await, broken);
    let rec = engine.get(plan.id).await.unwrap();
    assert!(
        rec.rollback_log
            .iter()
            .any(|l| l.contains("put back by alice")),
        "{:?}",
        rec.rollback_log
    );
}

/// Putting orphans back disables their foreign key's trigger and nothing else: a
/// host trigger still fires, and the foreign key is enforced again afterwards.
#[tokio::test]
async fn rollback_disables_only_the_foreign_key_it_must() {
    let db = setup(40).await;
    exec(
        &db,
        &format!(
            "CREATE TABLE {S}.audit (line text);
             CREATE FUNCTION {S}.audit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO {S}.audit VALUES (NEW.order_id || '/' || NEW.line_no); RETURN NEW; END $$;
             CREATE TRIGGER audit AFTER INSERT ON {S}.order_lines FOR EACH ROW EXECUTE FUNCTION {S}.audit();"
        ),
    )
    .await;
    let engine = engine(&db).config(lenient()).build().unwrap();
    engine.migrate().await.unwrap();
    let violations = orphan_lines(&db, "10").await;
    let broken = hash(&db, "order_lines").await;
    let plan = engine.plan(&violations).await.unwrap().remove(0);
    engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    let rb = engine
        .rollback(plan.id, &Control::detached())
        .await
        .unwrap();
    assert_eq!(hash(&db, "order_lines").await, broken);
    assert_eq!(
        count(&db, &format!("SELECT count(*) FROM {S}.audit")).await,
        violations.len() as i64,
        "the host's trigger fired for every row put back"
    );
    let message = rb.message.unwrap();
    assert!(message.contains("order_lines_order_id_fkey"), "{message}");
    assert!(
        !message.contains("order_lines_product_id_fkey"),
        "{message}"
    );
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '{S}.order_lines'::regclass AND tgenabled <> 'O'")
        )
        .await,
        0,
        "every trigger is enabled again"
    );
    let orphan = db
        .client()
        .await
        .batch_execute(&format!(
            "INSERT INTO {S}.order_lines VALUES (999999, 1, 1, 1, 1, 1)"
        ))
        .await;
    assert!(orphan.is_err(), "the foreign key is enforced again");
}

/// A session's own DateStyle and TimeZone change nothing: digests, before-images and
/// quarantined rows are written and read under fixed settings, so a row quarantined
/// by a session printing dates day-first comes back exactly through one that reads
/// them month-first.
#[tokio::test]
async fn other_session_settings_change_nothing() {
    let db = setup(40).await;
    let odd = sanare_pg::connect_pool(
        &format!(
            "{}{}options=-c%20DateStyle%3DSQL%2CDMY%20-c%20TimeZone%3DAsia%2FTokyo%20-c%20IntervalStyle%3Dsql_standard",
            db.url(),
            if db.url().contains('?') { "&" } else { "?" }
        ),
        4,
    )
    .unwrap();
    let usual = engine(&db).config(lenient()).build().unwrap();
    usual.migrate().await.unwrap();
    let odd = sanare_repair::RepairEngine::builder()
        .pool(odd)
        .config(lenient())
        .build()
        .unwrap();
    exec(
        &db,
        &format!(
            "SET session_replication_role = replica; DELETE FROM {S}.orders WHERE id IN (1, 2, 3, 6, 7, 8);
             SET session_replication_role = origin;"
        ),
    )
    .await;
    let ids: Vec<i64> = db
        .client()
        .await
        .query(
            &format!(
                "SELECT id FROM {S}.payments WHERE order_id IN (1, 2, 3, 6, 7, 8) ORDER BY id"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ids.len() >= 2, "{ids:?}");
    let violations: Vec<_> = ids
        .iter()
        .map(|id| {
            Violation::new(
                referential("payments", "order_id", "orders"),
                Severity::High,
                t("payments"),
                Some(row("payments", &[("id", "bigint", id.to_string())])),
                "orphaned payment",
            )
        })
        .collect();
    let broken = hash(&db, "payments").await;
    // Planned by one kind of session, run by the other, rolled back by the first.
    let plan = usual.plan(&violations).await.unwrap().remove(0);
    let out = odd
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(out.status, RepairStatus::Completed, "{:?}", out.message);
    assert_eq!(
        out.rows_skipped, 0,
        "no row looked changed under other settings: {:?}",
        out.message
    );
    assert_eq!(out.rows_affected, ids.len() as u64);
    usual.rollback(plan.id, &Control::detached()).await.unwrap();
    assert_eq!(hash(&db, "payments").await, broken);
}

/// Rows of a partitioned table are quarantined and put back like any others; a
/// table without a primary key gets no automatic repair and keeps every row.
#[tokio::test]
async fn partitions_are_repaired_and_tables_without_a_key_are_left_alone() {
    let db = setup(40).await;
    exec(
        &db,
        &format!(
            "CREATE TABLE {S}.events (id bigint, part int, order_id bigint NOT NULL REFERENCES {S}.orders (id),
                                      PRIMARY KEY (id, part)) PARTITION BY LIST (part);
             CREATE TABLE {S}.events_1 PARTITION OF {S}.events FOR VALUES IN (1);
             CREATE TABLE {S}.events_2 PARTITION OF {S}.events FOR VALUES IN (2);
             INSERT INTO {S}.events SELECT g, 1 + g % 2, g FROM generate_series(1, 20) g;
             CREATE TABLE {S}.keyless (order_id bigint, note text);
             INSERT INTO {S}.keyless SELECT g, 'n' FROM generate_series(1, 20) g;
             SET session_replication_role = replica;
             DELETE FROM {S}.orders WHERE id IN (6, 7);
             SET session_replication_role = origin;"
        ),
    )
    .await;
    let engine = engine(&db).config(lenient()).build().unwrap();
    engine.migrate().await.unwrap();
    let events = |id: i64| {
        Violation::new(
            referential("events", "order_id", "orders"),
            Severity::High,
            t("events"),
            Some(row(
                "events",
                &[
                    ("id", "bigint", id.to_string()),
                    ("part", "integer", (1 + id % 2).to_string()),
                ],
            )),
            "orphaned event",
        )
    };
    let keyless = Violation::new(
        referential("keyless", "order_id", "orders"),
        Severity::High,
        t("keyless"),
        Some(row("keyless", &[("ctid", "tid", "(0,6)".into())])),
        "orphaned note",
    );
    let before_events = hash(&db, "events").await;
    let before_keyless = hash(&db, "keyless").await;
    let plans = engine.plan(&[events(6), events(7), keyless]).await.unwrap();
    assert_eq!(plans.len(), 1, "the keyless table gets no plan");
    let out = engine
        .execute(plans[0].id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(
        (out.status, out.rows_affected),
        (RepairStatus::Completed, 2),
        "{:?}",
        out.message
    );
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM {S}.events WHERE id IN (6, 7)")
        )
        .await,
        0
    );
    engine
        .rollback(plans[0].id, &Control::detached())
        .await
        .unwrap();
    assert_eq!(hash(&db, "events").await, before_events);
    assert_eq!(hash(&db, "keyless").await, before_keyless);
}
