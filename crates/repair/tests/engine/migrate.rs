//! Rows written by version 1 (SQL text) are never run after the upgrade, and a
//! completed version-1 repair still rolls back.

use sanare_core::{
    Control, ExecuteOptions, RepairId, RepairPlan, RepairService, RepairStatus, RepairStrategyKind,
    Severity,
};
use sanare_pg::{Migrations, SchemaName};
use sanare_repair::MIGRATIONS;

use crate::common::*;

#[tokio::test]
async fn version_one_repairs_need_a_new_plan_and_completed_ones_still_roll_back() {
    let db = setup(30).await;
    canary(&db).await;
    let schema = SchemaName::default_schema();
    let v1 = Migrations::new("repair", &MIGRATIONS.migrations()[..1]);
    v1.run(&mut db.connect().await, &schema).await.unwrap();
    orphan_lines(&db, "4, 5").await;
    let c = db.client().await;
    let insert = |id: RepairId, status: &'static str, action: serde_json::Value| {
        let plan = RepairPlan::new(
            id,
            Vec::new(),
            t("order_lines"),
            RepairStrategyKind::RemoveOrphanedRecord,
            Severity::High,
        );
        (id, status, serde_json::to_value(plan).unwrap(), action)
    };
    let pending = insert(
        RepairId::new(),
        "pending",
        serde_json::json!({
            "table": {"schema": S, "name": "order_lines"},
            "op": {"op": "delete", "cond": "true) OR (SELECT shop.canary()) OR (true"},
            "keys": null
        }),
    );
    let done = insert(
        RepairId::new(),
        "completed",
        serde_json::json!({
            "table": {"schema": S, "name": "order_lines"},
            "op": {"op": "delete", "cond": "true"},
            "keys": [["4", "1"]]
        }),
    );
    for (id, status, plan, action) in [&pending, &done] {
        c.execute(
            "INSERT INTO sanare.repair_operations (id, violation_ids, violation_type, table_schema, table_name,
                    strategy, rule, severity, status, requires_approval, estimated_rows, plan, action, violations,
                    completed_at)
             VALUES ($1, '{}', 'referential', 'shop', 'order_lines', 'remove_orphaned_record', 'R4', 'high', $2,
                     false, 1, $3, $4, '[]', now())",
            &[&id.as_uuid(), status, plan, action],
        )
        .await
        .unwrap();
    }
    // Version 1 deleted line (4, 1) and kept its before-image.
    let broken = hash(&db, "order_lines").await;
    c.execute(
        &format!(
            "WITH d AS (DELETE FROM {S}.order_lines t WHERE order_id = 4 AND line_no = 1 RETURNING t.*)
             INSERT INTO sanare.repair_undo (repair_id, table_schema, table_name, action, key, before_row)
             SELECT $1, 'shop', 'order_lines', 'deleted', ARRAY['4', '1'], d::text FROM d"
        ),
        &[&done.0.as_uuid()],
    )
    .await
    .unwrap();
    drop(c);

    let engine = engine(&db).build().unwrap();
    let report = engine.migrate().await.unwrap();
    assert!(!report.applied.is_empty(), "{report:?}");
    let rec = engine.get(pending.0).await.unwrap();
    assert_eq!(rec.plan.status, RepairStatus::ReplanNeeded);
    assert!(rec.error_message.unwrap().contains("plan the repair again"));
    for options in [ExecuteOptions::new(), ExecuteOptions::dry_run()] {
        let err = engine
            .execute(pending.0, options, &Control::detached())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("plan it again"), "{err}");
    }
    assert!(!engine.validate(pending.0).await.unwrap().is_ok());
    assert!(engine.approve(pending.0, "ops").await.is_err());
    assert_eq!(canary_calls(&db).await, 0);

    let quarantined = count(&db, "SELECT count(*) FROM sanare.repair_quarantine").await;
    assert_eq!(
        quarantined, 1,
        "the deleted row's image moved to the quarantine"
    );
    let out = engine.rollback(done.0, &Control::detached()).await.unwrap();
    assert_eq!(out.status, RepairStatus::RolledBack);
    assert_eq!(
        hash(&db, "order_lines").await,
        broken,
        "the line is back exactly"
    );
}
