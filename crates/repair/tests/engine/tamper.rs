//! Stored work is data: a repair row altered in the database is refused and nothing
//! of it runs. Whatever SQL an attacker smuggles in calls `shop.canary()`, which
//! writes a row to `shop.canary`: that table must stay empty, the host tables
//! unchanged, the repair unrun.

use std::sync::Arc;

use sanare_core::{
    Control, Error, ExecuteOptions, RepairId, RepairService, RepairStatus, Severity, Violation,
    ViolationKind,
};
use sanare_repair::{CustomStrategy, Decision, RepairConfig, RepairEngine, RowAction, TableFacts};
use sanare_testing::TestDb;

use crate::common::*;

/// Runs `sql` against the repair's row (`$1` is its id).
async fn tamper(db: &TestDb, repair: RepairId, sql: &str) {
    db.client()
        .await
        .execute(sql, &[&repair.as_uuid()])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// The stored action of `repair`.
async fn stored_action(db: &TestDb, repair: RepairId) -> serde_json::Value {
    db.client()
        .await
        .query_one(
            "SELECT action FROM sanare.repair_operations WHERE id = $1",
            &[&repair.as_uuid()],
        )
        .await
        .unwrap()
        .get(0)
}

/// Puts `action` back as the stored action of `repair`.
async fn put_action(db: &TestDb, repair: RepairId, action: &serde_json::Value) {
    db.client()
        .await
        .execute(
            "UPDATE sanare.repair_operations SET action = $2 WHERE id = $1",
            &[&repair.as_uuid(), action],
        )
        .await
        .unwrap();
}

/// Both a dry run and a real run of `repair` are refused; nothing ran.
async fn refused(
    db: &TestDb,
    engine: &RepairEngine,
    repair: RepairId,
    tables: &[&str],
    before: &[String],
    why: &str,
) {
    for options in [ExecuteOptions::dry_run(), ExecuteOptions::new()] {
        let result = engine
            .execute(repair, options.clone(), &Control::detached())
            .await;
        assert_eq!(canary_calls(db).await, 0, "no smuggled SQL ran: {result:?}");
        let err = result.expect_err("a tampered repair must be refused");
        assert!(
            err.to_string().contains(why),
            "{why:?} not in the refusal: {err}"
        );
        assert!(!matches!(err, Error::ApprovalRequired(_)), "{err}");
    }
    assert_eq!(canary_calls(db).await, 0, "no smuggled SQL ran");
    for (table, hash_before) in tables.iter().zip(before) {
        assert_eq!(&hash(db, table).await, hash_before, "{table} untouched");
    }
    let rec = engine.get(repair).await.unwrap();
    assert_ne!(rec.plan.status, RepairStatus::Completed);
    assert!(
        rec.execution_log.iter().any(|l| l.contains("refused")),
        "{:?}",
        rec.execution_log
    );
    let quarantined = count(db, "SELECT count(*) FROM sanare.repair_quarantine").await
        + count(db, "SELECT count(*) FROM sanare.repair_undo").await;
    assert_eq!(quarantined, 0);
}

async fn planned_orphans(db: &TestDb) -> (RepairEngine, RepairId, Vec<String>) {
    let engine = engine(db).config(lenient()).build().unwrap();
    engine.migrate().await.unwrap();
    canary(db).await;
    let violations = orphan_lines(db, "7, 8").await;
    let plan = engine.plan(&violations).await.unwrap().remove(0);
    let before = vec![hash(db, "order_lines").await, hash(db, "orders").await];
    (engine, plan.id, before)
}

#[tokio::test]
async fn a_condition_smuggled_into_a_stored_repair_is_refused_and_nothing_runs() {
    let db = setup(40).await;
    let (engine, id, before) = planned_orphans(&db).await;
    let tables = ["order_lines", "orders"];
    // The old shape of a stored action, with the issue's injected condition.
    tamper(
        &db,
        id,
        r#"UPDATE sanare.repair_operations SET action = jsonb_build_object('op', 'delete',
             'cond', 'true) OR (SELECT pg_sleep(0)) IS NULL OR (SELECT shop.canary()) OR (true',
             'table', jsonb_build_object('schema', 'shop', 'name', 'order_lines'), 'keys', null)
           WHERE id = $1"#,
    )
    .await;
    refused(&db, &engine, id, &tables, &before, "not a repair action").await;
}

#[tokio::test]
async fn extra_fields_unknown_columns_and_wrong_tables_in_a_stored_action_are_refused() {
    let db = setup(40).await;
    let (engine, id, before) = planned_orphans(&db).await;
    let tables = ["order_lines", "orders"];
    let original = stored_action(&db, id).await;
    let cases = [
        (
            "jsonb_set(action, '{op,cond}', '\"true) OR (SELECT shop.canary()) OR (true\"')",
            "fields a repair action does not have",
        ),
        (
            "jsonb_set(action, '{op,check,columns,0}', '\"order_id IS NULL OR shop.canary()\"')",
            "has no column",
        ),
        (
            "jsonb_set(action, '{table,name}', '\"order_lines; SELECT shop.canary()\"')",
            "not the plan's table",
        ),
        (
            "jsonb_set(action, '{op,check,parent,name}', '\"orders; SELECT shop.canary()\"')",
            "does not exist",
        ),
        (
            "jsonb_set(action, '{op,check,parent}', '{\"schema\": \"sanare\", \"name\": \"repair_operations\"}')",
            "outside what sanare repairs",
        ),
        (
            "jsonb_set(action, '{key_columns}', '[\"line_no\", \"order_id\"]')",
            "primary key",
        ),
        ("jsonb_set(action, '{version}', '1')", "version"),
    ];
    for (edit, why) in cases {
        tamper(
            &db,
            id,
            &format!("UPDATE sanare.repair_operations SET action = {edit} WHERE id = $1"),
        )
        .await;
        refused(&db, &engine, id, &tables, &before, why).await;
        put_action(&db, id, &original).await;
    }
    // A table name with a `;`, changed everywhere the plan names it, names no table.
    tamper(
        &db,
        id,
        "UPDATE sanare.repair_operations SET table_name = 'order_lines; SELECT shop.canary()',
                action = jsonb_set(action, '{table,name}', '\"order_lines; SELECT shop.canary()\"')
          WHERE id = $1",
    )
    .await;
    refused(&db, &engine, id, &tables, &before, "does not exist").await;
    db.client()
        .await
        .execute(
            "UPDATE sanare.repair_operations SET table_name = 'order_lines', action = $2 WHERE id = $1",
            &[&id.as_uuid(), &original],
        )
        .await
        .unwrap();
    // Untampered, the same repair runs: the refusals were the tampering's.
    let out = engine
        .execute(id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(out.status, RepairStatus::Completed, "{:?}", out.message);
    assert_eq!(orphans(&db).await, 0);
    assert_eq!(canary_calls(&db).await, 0);
    // The canary works: calling it is seen.
    exec(&db, "SELECT shop.canary()").await;
    assert_eq!(canary_calls(&db).await, 1);
}

#[tokio::test]
async fn a_stored_row_key_of_the_wrong_type_is_refused_before_any_row_changes() {
    let db = setup(40).await;
    let (engine, id, before) = planned_orphans(&db).await;
    let tables = ["order_lines", "orders"];
    tamper(
        &db,
        id,
        "UPDATE sanare.repair_targets SET key = ARRAY['1) OR shop.canary() OR (1', '1']
          WHERE repair_id = $1 AND seq = (SELECT max(seq) FROM sanare.repair_targets WHERE repair_id = $1)",
    )
    .await;
    refused(
        &db,
        &engine,
        id,
        &tables,
        &before,
        "does not fit the primary key",
    )
    .await;
    tamper(
        &db,
        id,
        "UPDATE sanare.repair_targets SET key = ARRAY['1'] WHERE repair_id = $1
           AND seq = (SELECT max(seq) FROM sanare.repair_targets WHERE repair_id = $1)",
    )
    .await;
    refused(&db, &engine, id, &tables, &before, "do not fit").await;
}

/// A recompute detail may only name a configured rule; its SQL is never taken from
/// the finding, and a stored rule name the engine does not know is refused.
#[tokio::test]
async fn a_tampered_recompute_detail_or_rule_name_is_refused() {
    let db = setup(40).await;
    canary(&db).await;
    exec(
        &db,
        &format!("UPDATE {S}.orders SET total_cents = total_cents + 1 WHERE id IN (3, 4)"),
    )
    .await;
    let engine = sanare_repair::testing::corpus_rules(engine(&db), S)
        .config(RepairConfig::new().approval_severity(None))
        .build()
        .unwrap();
    engine.migrate().await.unwrap();
    let total = |id: i64, details: serde_json::Value| {
        Violation::new(
            ViolationKind::Consistency {
                rule: "order_total_matches_lines".into(),
            },
            Severity::Medium,
            t("orders"),
            Some(row("orders", &[("id", "bigint", id.to_string())])),
            "total disagrees",
        )
        .with_details(details)
    };
    let smuggled = [
        serde_json::json!({"recompute": {"column": "total_cents", "expression": "(SELECT 0 WHERE shop.canary())"}}),
        serde_json::json!({"recompute": {"rule": sanare_repair::testing::ORDER_TOTAL_RULE, "column": "total_cents",
                                         "expression": "(SELECT 0 WHERE shop.canary())"}}),
        serde_json::json!({"recompute": {"rule": "(SELECT 0 WHERE shop.canary())", "column": "total_cents"}}),
        serde_json::json!({"recompute": {"rule": sanare_repair::testing::ORDER_TOTAL_RULE, "column": "status"}}),
    ];
    let violations: Vec<_> = smuggled.iter().map(|d| total(3, d.clone())).collect();
    let analysis = engine.analyze(&violations).await.unwrap();
    for (d, (decision, _)) in smuggled.iter().zip(&analysis) {
        assert!(
            matches!(decision, Decision::Manual { .. }),
            "{d}: {decision:?}"
        );
    }
    assert!(engine.plan(&violations).await.unwrap().is_empty());
    // A good detail plans R8; then the stored rule name is altered.
    let good = total(
        4,
        serde_json::json!({"recompute": {"rule": sanare_repair::testing::ORDER_TOTAL_RULE, "column": "total_cents"}}),
    );
    let plan = engine.plan(&[good]).await.unwrap().remove(0);
    let before = vec![hash(&db, "orders").await];
    for edit in [
        "jsonb_set(jsonb_set(action, '{op,set,0,rule}', '\"(SELECT shop.canary())\"'), '{op,check,rule}', '\"(SELECT shop.canary())\"')",
        "jsonb_set(action, '{op,set,0}', '{\"set\": \"expression\", \"column\": \"total_cents\", \"sql\": \"shop.canary()\"}')",
    ] {
        let original = stored_action(&db, plan.id).await;
        tamper(
            &db,
            plan.id,
            &format!("UPDATE sanare.repair_operations SET action = {edit} WHERE id = $1"),
        )
        .await;
        let why = if edit.contains("expression") {
            "not a repair action"
        } else {
            "not in this engine's configuration"
        };
        refused(&db, &engine, plan.id, &["orders"], &before, why).await;
        put_action(&db, plan.id, &original).await;
    }
    // An engine configured without the rule refuses the untampered plan too.
    let bare = engine_without_rules(&db);
    let err = bare
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("recompute rule"), "{err}");
    let out = engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(out.status, RepairStatus::Completed, "{:?}", out.message);
    assert_eq!(canary_calls(&db).await, 0);
}

fn engine_without_rules(db: &TestDb) -> RepairEngine {
    engine(db).build().unwrap()
}

struct Smuggler;

impl CustomStrategy for Smuggler {
    fn name(&self) -> &str {
        "smuggler"
    }
    fn matches(&self, _v: &Violation, _facts: &TableFacts) -> bool {
        true
    }
    fn action(&self, _v: &Violation) -> sanare_core::Result<RowAction> {
        Ok(RowAction::Update {
            assignments: vec![("quantity".into(), "t.quantity + 1".into())],
            predicate: "t.order_id = 5 AND t.quantity < 0".into(),
        })
    }
}

/// A host strategy's SQL is code: it runs only under a keyed hash that verifies.
#[tokio::test]
async fn an_assignment_calling_a_function_is_refused_unless_its_keyed_hash_verifies() {
    let db = setup(40).await;
    canary(&db).await;
    let engine = engine(&db)
        .action_key(key())
        .strategy(Arc::new(Smuggler))
        .config(RepairConfig::new().approval_severity(None))
        .build()
        .unwrap();
    engine.migrate().await.unwrap();
    let v = Violation::new(
        ViolationKind::CheckConstraint {
            constraint: "x".into(),
            columns: vec![],
        },
        Severity::Low,
        t("order_lines"),
        None,
        "host-detected",
    );
    let plan = engine.plan(&[v]).await.unwrap().remove(0);
    let before = vec![hash(&db, "order_lines").await];
    tamper(
        &db,
        plan.id,
        "UPDATE sanare.repair_operations
            SET action = jsonb_set(jsonb_set(action, '{op,set,0,1}', '\"t.quantity + (SELECT CASE WHEN shop.canary() THEN 0 END)\"'),
                                   '{op,predicate}', '\"t.order_id = 5 AND shop.canary()\"')
          WHERE id = $1",
    )
    .await;
    refused(
        &db,
        &engine,
        plan.id,
        &["order_lines"],
        &before,
        "keyed hash",
    )
    .await;
    // The right SQL under another key, or with no key at all, is refused too.
    tamper(
        &db,
        plan.id,
        "UPDATE sanare.repair_operations SET action = jsonb_set(jsonb_set(action, '{op,set,0,1}', '\"t.quantity + 1\"'),
                '{op,predicate}', '\"t.order_id = 5 AND t.quantity < 0\"') WHERE id = $1",
    )
    .await;
    let other = crate::common::engine(&db)
        .action_key(sanare_repair::ActionKey::from_bytes([1; 32]))
        .strategy(Arc::new(Smuggler))
        .build()
        .unwrap();
    refused(
        &db,
        &other,
        plan.id,
        &["order_lines"],
        &before,
        "keyed hash",
    )
    .await;
    let keyless = engine_without_rules(&db);
    refused(
        &db,
        &keyless,
        plan.id,
        &["order_lines"],
        &before,
        "no action key",
    )
    .await;
    // Host strategies without a key are refused when the engine is built.
    let err = crate::common::engine(&db)
        .strategy(Arc::new(Smuggler))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("action key"), "{err}");
    let out = engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(out.status, RepairStatus::Completed, "{:?}", out.message);
}

/// The issue's own payloads (a condition that calls `pg_sleep`, an assignment that
/// calls a function, a table name with a `;`) on a server that logs every statement
/// and counts them with `pg_stat_statements`: each is refused, and after the
/// tampering no statement the server saw carried the payload or touched a host
/// table; the canary table stays empty.
#[tokio::test]
async fn tampered_repairs_are_refused_as_the_server_log_and_pg_stat_statements_show() {
    use sanare_testing::cluster::{Cluster, ClusterOptions};
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start_with(ClusterOptions::default().logging_every_statement())
    })
    .await
    .unwrap()
    .unwrap();
    let db = sanare_testing::test_db_on(&cluster.url("postgres")).await;
    {
        let c = db.client().await;
        sanare_testing::fixtures::order_service::install(&**c, S)
            .await
            .unwrap();
        sanare_testing::fixtures::order_service::generate(&**c, S, 40)
            .await
            .unwrap();
        c.batch_execute("CREATE EXTENSION pg_stat_statements")
            .await
            .unwrap();
    }
    let (engine, id, before) = planned_orphans(&db).await;
    let tables = ["order_lines", "orders"];
    let original = stored_action(&db, id).await;
    let cases = [
        (
            "a condition calling pg_sleep",
            r#"UPDATE sanare.repair_operations SET action = jsonb_build_object('op', 'delete',
                 'cond', 'true) OR (SELECT pg_sleep(0)) IS NULL OR (SELECT shop.canary()) OR (true',
                 'table', jsonb_build_object('schema', 'shop', 'name', 'order_lines'), 'keys', null)
               WHERE id = $1"#,
            "not a repair action",
        ),
        (
            "an assignment calling a function",
            r#"UPDATE sanare.repair_operations SET action = jsonb_set(action, '{op}',
                 '{"op": "update", "set": [{"set": "null", "column": "product_id = shop.canary()::int, quantity"}],
                   "check": {"check": "unchanged"}}')
               WHERE id = $1"#,
            "has no column",
        ),
        (
            "a table name with a `;`",
            r#"UPDATE sanare.repair_operations SET action = jsonb_set(action, '{table,name}',
                 '"order_lines; SELECT pg_sleep(0); SELECT shop.canary()"')
               WHERE id = $1"#,
            "not the plan's table",
        ),
    ];
    for (what, sql, why) in cases {
        tamper(&db, id, sql).await;
        let c = db.client().await;
        c.batch_execute("SELECT pg_stat_statements_reset()")
            .await
            .unwrap();
        let log_at = cluster.log().len();
        refused(&db, &engine, id, &tables, &before, why).await;
        let logged = cluster.statements_logged_since(log_at);
        assert!(!logged.is_empty(), "the server logs statements");
        for word in ["pg_sleep", "canary()", "order_lines;"] {
            assert!(!logged.contains(word), "{what}: `{word}` in\n{logged}");
        }
        let ran = sanare_testing::statements_counted(
            &c,
            "query LIKE '%pg_sleep%' OR query LIKE '%canary()%'
             OR query ~* '(update|delete from|insert into)\\s+\"?shop\"?\\.'",
        )
        .await;
        assert!(ran.is_empty(), "{what}: {ran:#?}");
        put_action(&db, id, &original).await;
    }
    drop(engine);
    drop(db);
}
