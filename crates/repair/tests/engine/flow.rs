//! The main flows: plan, approve, dry-run, execute, roll back.

use std::sync::Arc;

use futures_util::TryStreamExt as _;
use sanare_core::{
    ColumnValue, Control, Error, EventBus, ExecuteOptions, RepairService, RepairStatus,
    RepairStrategyKind, RowRef, Severity, TableRef, Violation, ViolationKind,
};
use sanare_repair::testing::{PgCopySnapshots, plant_corpus};
use sanare_repair::{CustomStrategy, Decision, RepairConfig, RowAction, TableFacts};

use crate::common::*;

#[tokio::test]
async fn orphans_are_removed_only_after_approval_and_rollback_is_byte_exact() {
    let db = setup(100).await;
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let engine = engine(&db).events(bus).build().unwrap();
    engine.migrate().await.unwrap();
    let violations = orphan_lines(&db, "7, 8, 9").await;
    assert!(violations.len() >= 5);
    let broken = hash(&db, "order_lines").await;

    let plans = engine.plan(&violations).await.unwrap();
    assert_eq!(plans.len(), 1, "orphans of one table are one repair");
    let plan = &plans[0];
    assert_eq!(plan.strategy, RepairStrategyKind::RemoveOrphanedRecord);
    assert_eq!(plan.estimated_rows, violations.len() as u64);
    assert!(
        plan.requires_approval,
        "High severity waits for approval by default"
    );
    assert_eq!(plan.status, RepairStatus::AwaitingApproval);
    assert!(!plan.preconditions.is_empty() && !plan.postconditions.is_empty());
    assert!(plan.rollback_plan.contains("undo"));

    // Unapproved: refused, nothing changed.
    let err = engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ApprovalRequired(_)), "{err}");
    assert_eq!(hash(&db, "order_lines").await, broken);

    // Dry run: the exact rows, nothing changed.
    let dry = engine
        .execute(plan.id, ExecuteOptions::dry_run(), &Control::detached())
        .await
        .unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.rows_affected, violations.len() as u64);
    let mut want: Vec<_> = violations.iter().map(|v| v.row.clone().unwrap()).collect();
    let mut got = dry.rows.clone();
    want.sort_by_key(|r| r.to_string());
    got.sort_by_key(|r| r.to_string());
    assert_eq!(got, want);
    assert_eq!(hash(&db, "order_lines").await, broken);
    assert_eq!(
        engine.get(plan.id).await.unwrap().plan.status,
        RepairStatus::AwaitingApproval
    );

    let approved = engine.approve(plan.id, "alice").await.unwrap();
    assert_eq!(approved.approved_by.as_deref(), Some("alice"));
    let (control, progress) = Control::new();
    let out = engine
        .execute(plan.id, ExecuteOptions::new().executed_by("bob"), &control)
        .await
        .unwrap();
    assert_eq!(out.status, RepairStatus::Completed, "{:?}", out.message);
    assert_eq!(out.rows_affected, violations.len() as u64);
    assert_eq!(orphans(&db).await, 0);
    assert!(progress.get().finished);
    let ev = events.try_recv().expect("a RepairCompleted event");
    assert_eq!(ev.event.name(), "repair_completed");

    // Idempotent.
    let again = engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(again.status, RepairStatus::Completed);
    assert_eq!(again.rows_affected, out.rows_affected);
    assert!(again.message.unwrap().contains("already"));

    let rb = engine
        .rollback(plan.id, &Control::detached())
        .await
        .unwrap();
    assert_eq!(rb.status, RepairStatus::RolledBack);
    assert_eq!(
        hash(&db, "order_lines").await,
        broken,
        "rollback restores the rows byte for byte"
    );
    assert!(
        engine
            .rollback(plan.id, &Control::detached())
            .await
            .unwrap()
            .message
            .unwrap()
            .contains("already")
    );

    let rec = engine.get(plan.id).await.unwrap();
    assert_eq!(rec.plan.status, RepairStatus::RolledBack);
    assert_eq!(rec.executed_by.as_deref(), Some("bob"));
    assert_eq!(rec.plan.approved_by.as_deref(), Some("alice"));
    assert!(!rec.execution_log.is_empty() && !rec.rollback_log.is_empty());
    let from = rec.created_at - time::Duration::minutes(1);
    let history: Vec<_> = engine
        .history(from, rec.created_at + time::Duration::minutes(1))
        .try_collect()
        .await
        .unwrap();
    assert!(history.iter().any(|r| r.plan.id == plan.id));
    let none: Vec<_> = engine
        .history(from - time::Duration::days(2), from)
        .try_collect()
        .await
        .unwrap();
    assert!(none.is_empty());
    // Every removed row went to the quarantine whole, and came back from it.
    let quarantined: Vec<_> = engine
        .quarantine(Some(plan.id))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(quarantined.len(), violations.len());
    assert!(quarantined.iter().all(|q| q.restored_at.is_some()));
}

#[tokio::test]
async fn corrupted_rows_and_a_deleted_parent_come_back_from_the_snapshot() {
    let db = setup(100).await;
    let snaps = Arc::new(PgCopySnapshots::new(db.pool().clone(), "snapcopy"));
    let engine = engine(&db)
        .snapshots(snaps.clone())
        .config(RepairConfig::new().approval_severity(None))
        .build()
        .unwrap();
    engine.migrate().await.unwrap();
    let products = TableRef::new(S, "products");
    let customers = TableRef::new(S, "customers");
    use sanare_core::SnapshotService;
    snaps
        .create(
            sanare_core::SnapshotRequest::new().tables([products.clone(), customers.clone()]),
            &Control::detached(),
        )
        .await
        .unwrap();
    let good_products = hash(&db, "products").await;
    let good_customers = hash(&db, "customers").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "UPDATE {S}.products SET name = 'garbage', attributes = '{{\"x\": \"\\\\\\\"\"}}' WHERE id <= 5;
         SET session_replication_role = replica; DELETE FROM {S}.customers WHERE id = 3; SET session_replication_role = origin;"
    ))
    .await
    .unwrap();
    let broken_products = hash(&db, "products").await;
    let broken_customers = hash(&db, "customers").await;
    let mut violations: Vec<Violation> = (1..=5)
        .map(|id| {
            Violation::new(
                ViolationKind::ChecksumMismatch {
                    column: "checksum".into(),
                },
                Severity::High,
                products.clone(),
                Some(RowRef::new(
                    products.clone(),
                    vec![ColumnValue::new("id", "bigint", Some(id.to_string()))],
                )),
                "checksum mismatch",
            )
        })
        .collect();
    violations.push(
        Violation::new(
            ViolationKind::Referential {
                constraint: "orders_customer_id_fkey".into(),
                columns: vec!["customer_id".into()],
                parent_table: customers.clone(),
                parent_columns: vec!["id".into()],
            },
            Severity::High,
            TableRef::new(S, "orders"),
            Some(RowRef::new(
                TableRef::new(S, "orders"),
                vec![ColumnValue::new("id", "bigint", Some("2"))],
            )),
            "order references missing customer 3",
        )
        .with_details(serde_json::json!({"missing_parent_key": {"id": 3}})),
    );
    let plans = engine.plan(&violations).await.unwrap();
    assert_eq!(plans.len(), 2);
    assert!(
        plans
            .iter()
            .all(|p| p.strategy == RepairStrategyKind::RestoreFromSnapshot)
    );
    for p in &plans {
        let out = engine
            .execute(p.id, ExecuteOptions::new(), &Control::detached())
            .await
            .unwrap();
        assert_eq!(out.status, RepairStatus::Completed, "{:?}", out.message);
    }
    assert_eq!(hash(&db, "products").await, good_products);
    assert_eq!(hash(&db, "customers").await, good_customers);
    for p in &plans {
        engine.rollback(p.id, &Control::detached()).await.unwrap();
    }
    assert_eq!(hash(&db, "products").await, broken_products);
    assert_eq!(hash(&db, "customers").await, broken_customers);
}

struct Sabotage {
    name: &'static str,
    expr: &'static str,
    predicate: &'static str,
}

impl CustomStrategy for Sabotage {
    fn name(&self) -> &str {
        self.name
    }
    fn matches(&self, v: &Violation, _facts: &TableFacts) -> bool {
        v.description == self.name
    }
    fn action(&self, _v: &Violation) -> sanare_core::Result<RowAction> {
        Ok(RowAction::Update {
            assignments: vec![("quantity".into(), self.expr.into())],
            predicate: self.predicate.into(),
        })
    }
}

#[tokio::test]
async fn failing_statement_dropped_connection_and_unfixed_violation_leave_data_untouched() {
    let db = setup(50).await;
    let cases = [
        Sabotage {
            name: "div0",
            expr: "t.quantity / 0",
            predicate: "t.order_id = 1",
        },
        Sabotage {
            name: "kill",
            expr: "t.quantity + (SELECT CASE WHEN pg_terminate_backend(pg_backend_pid()) THEN 1 ELSE 1 END)",
            predicate: "t.order_id = 2",
        },
        Sabotage {
            name: "noop",
            expr: "t.quantity",
            predicate: "t.order_id = 3",
        },
    ];
    let mut builder = engine(&db)
        .action_key(key())
        .config(RepairConfig::new().approval_severity(None));
    for s in cases {
        builder = builder.strategy(Arc::new(s));
    }
    let engine = builder.build().unwrap();
    engine.migrate().await.unwrap();
    let before = hash(&db, "order_lines").await;
    for name in ["div0", "kill", "noop"] {
        let v = Violation::new(
            ViolationKind::CheckConstraint {
                constraint: "x".into(),
                columns: vec![],
            },
            Severity::Low,
            TableRef::new(S, "order_lines"),
            None,
            name,
        );
        let plans = engine.plan(&[v]).await.unwrap();
        assert_eq!(plans[0].strategy, RepairStrategyKind::Custom(name.into()));
        let out = engine
            .execute(plans[0].id, ExecuteOptions::new(), &Control::detached())
            .await
            .unwrap();
        assert_eq!(
            out.status,
            RepairStatus::Failed,
            "{name}: {:?}",
            out.message
        );
        assert_eq!(
            hash(&db, "order_lines").await,
            before,
            "{name} left no trace"
        );
        let rec = engine.get(plans[0].id).await.unwrap();
        assert_eq!(rec.plan.status, RepairStatus::Failed);
        assert!(rec.error_message.is_some());
        if name == "noop" {
            assert!(rec.error_message.unwrap().contains("re-validation"));
        }
    }
}

#[tokio::test]
async fn a_concurrent_writer_or_a_cancellation_fails_the_repair_cleanly_and_it_can_be_retried() {
    let db = setup(50).await;
    let engine = engine(&db)
        .config(lenient().lock_timeout(std::time::Duration::from_millis(200)))
        .build()
        .unwrap();
    engine.migrate().await.unwrap();
    let violations = orphan_lines(&db, "11").await;
    let broken = hash(&db, "order_lines").await;
    let plan = engine.plan(&violations).await.unwrap().remove(0);

    let mut writer = db.connect().await;
    let tx = writer.transaction().await.unwrap();
    tx.execute(
        &format!("UPDATE {S}.order_lines SET quantity = quantity WHERE order_id = 11"),
        &[],
    )
    .await
    .unwrap();
    let out = engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(out.status, RepairStatus::Failed);
    assert!(out.message.unwrap().contains("lock"));
    tx.rollback().await.unwrap();
    assert_eq!(hash(&db, "order_lines").await, broken);

    let control = Control::detached();
    control.cancel_token().cancel();
    let err = engine
        .execute(plan.id, ExecuteOptions::new(), &control)
        .await
        .unwrap_err();
    assert!(err.is_cancelled());
    assert_eq!(hash(&db, "order_lines").await, broken);

    let out = engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(out.status, RepairStatus::Completed);
    assert_eq!(orphans(&db).await, 0);
}

#[tokio::test]
async fn rollback_refuses_to_overwrite_later_writes() {
    let db = setup(50).await;
    let engine = engine(&db).config(lenient()).build().unwrap();
    engine.migrate().await.unwrap();
    let violations = orphan_lines(&db, "12").await;
    let plan = engine.plan(&violations).await.unwrap().remove(0);
    engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    // Someone re-creates one of the deleted rows.
    let row = violations[0].row.clone().unwrap();
    let c = db.client().await;
    c.batch_execute(&format!(
        "SET session_replication_role = replica;
         INSERT INTO {S}.order_lines VALUES ({}, {}, 1, 1, 1, 1);
         SET session_replication_role = origin;",
        row.key[0].value.as_deref().unwrap(),
        row.key[1].value.as_deref().unwrap()
    ))
    .await
    .unwrap();
    let err = engine
        .rollback(plan.id, &Control::detached())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    assert_eq!(
        engine.get(plan.id).await.unwrap().plan.status,
        RepairStatus::Completed
    );
}

#[tokio::test]
async fn a_critical_repair_takes_a_snapshot_first() {
    let db = setup(50).await;
    let snaps = Arc::new(PgCopySnapshots::new(db.pool().clone(), "snapcopy"));
    let engine = engine(&db).snapshots(snaps.clone()).build().unwrap();
    engine.migrate().await.unwrap();
    let mut violations = orphan_lines(&db, "13").await;
    for v in &mut violations {
        v.severity = Severity::Critical;
    }
    let plan = engine.plan(&violations).await.unwrap().remove(0);
    engine.approve(plan.id, "ops").await.unwrap();
    engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(snaps.creates.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(
        engine
            .get(plan.id)
            .await
            .unwrap()
            .pre_repair_snapshot
            .is_some()
    );
}

#[tokio::test]
async fn the_labelled_corpus_gets_the_strategy_the_decision_table_names_and_repairs_cleanly() {
    let db = setup(200).await;
    let snaps = Arc::new(PgCopySnapshots::new(db.pool().clone(), "snapcopy"));
    let client = db.connect().await;
    let corpus = plant_corpus(&client, S, snaps.as_ref()).await.unwrap();
    assert!(corpus.len() >= 40, "{}", corpus.len());
    let engine = corpus_engine(&db, snaps);
    engine.migrate().await.unwrap();
    let violations: Vec<Violation> = corpus.iter().map(|(v, _)| v.clone()).collect();
    let analysis = engine.analyze(&violations).await.unwrap();
    let mut wrong = Vec::new();
    let mut kinds = std::collections::BTreeSet::new();
    for ((v, want), (decision, _)) in corpus.iter().zip(&analysis) {
        kinds.insert(v.kind.code());
        let got = match decision {
            Decision::Strategy { rule, .. } => rule.as_str(),
            Decision::Manual { .. } => "manual",
            _ => "?",
        };
        if got != *want {
            wrong.push(format!(
                "{} {:?}: want {want}, got {got}",
                v.kind.code(),
                v.row
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(
        kinds.len(),
        8,
        "every violation kind but type mismatch is planted: {kinds:?}"
    );

    // Every repairable plan of the corpus runs and re-validates clean.
    let tables = CORPUS_TABLES;
    let mut damaged = Vec::new();
    for table in tables {
        damaged.push(hash(&db, table).await);
    }
    let plans = engine.plan(&violations).await.unwrap();
    for p in &plans {
        if p.requires_approval {
            engine.approve(p.id, "test").await.unwrap();
        }
    }
    // Restore parents and reload before the rows that depend on them.
    let order = |p: &sanare_core::RepairPlan| match p.strategy {
        RepairStrategyKind::TruncateAndReload => 0,
        RepairStrategyKind::RestoreFromSnapshot => 1,
        RepairStrategyKind::DeleteInvalidRecord => 3,
        _ => 2,
    };
    let mut plans = plans;
    plans.sort_by_key(order);
    let mut completed = Vec::new();
    for p in &plans {
        let out = engine
            .execute(p.id, ExecuteOptions::new(), &Control::detached())
            .await
            .unwrap();
        let expect_fail =
            p.strategy == RepairStrategyKind::ReplayTransaction && p.table.name == "payments";
        if expect_fail {
            // The fake journal's entries for orders are no-ops: the violation stays,
            // so the repair must report failure instead of claiming success.
            assert_eq!(out.status, RepairStatus::Failed, "{}", p.description);
        } else {
            assert_eq!(
                out.status,
                RepairStatus::Completed,
                "{}: {:?}",
                p.description,
                out.message
            );
            completed.push(p.clone());
        }
    }
    let strategies: std::collections::BTreeSet<_> = completed
        .iter()
        .map(|p| sanare_repair::strategy_code(&p.strategy))
        .collect();
    assert_eq!(
        strategies.len(),
        8,
        "every strategy completed: {strategies:?}"
    );
    // Every repair with an undo log rolls back, newest first, to the damaged state
    // byte for byte (replays and index rebuilds have none).
    for p in completed.iter().rev() {
        if matches!(
            p.strategy,
            RepairStrategyKind::ReplayTransaction | RepairStrategyKind::RebuildIndex
        ) {
            continue;
        }
        let out = engine.rollback(p.id, &Control::detached()).await;
        assert!(out.is_ok(), "{}: {out:?}", p.description);
    }
    // The replayed settings rows (9, 10) keep the journal's values; everything else
    // is as it was.
    exec(
        &db,
        &format!("UPDATE {S}.settings SET w = 'damaged' WHERE id IN (9, 10)"),
    )
    .await;
    for (table, before) in tables.iter().zip(&damaged) {
        assert_eq!(&hash(&db, table).await, before, "{table} after rollback");
    }
}
