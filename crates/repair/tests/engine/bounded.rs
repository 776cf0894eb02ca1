//! Bounded by design: more violations than one batch become one plan, run in
//! batches inside one transaction, and roll back byte-exact; the one repair loop
//! (`repair_all`) leaves what needs an approval waiting, names what failed, and
//! stops on cancellation without leaving half-recorded plans.

use futures_util::StreamExt as _;
use sanare_core::{
    Control, ExecuteOptions, PLAN_VIOLATION_SAMPLE, RepairPolicy, RepairService, RepairStatus,
    Result, Severity, Violation,
};
use sanare_repair::{REPAIR_BATCH, RepairConfig};
use sanare_testing::TestDb;

use crate::common::*;

fn stream(violations: Vec<Violation>) -> sanare_core::BoxStream<'static, Result<Violation>> {
    futures_util::stream::iter(violations.into_iter().map(Ok)).boxed()
}

/// Orphans more lines than one planning batch: every order above `keep` goes.
async fn many_orphans(db: &TestDb, keep: i64) -> Vec<Violation> {
    exec(
        db,
        &format!(
            "SET session_replication_role = replica; DELETE FROM {S}.orders WHERE id > {keep};
             SET session_replication_role = origin;"
        ),
    )
    .await;
    orphan_violations(db).await
}

#[tokio::test]
async fn more_violations_than_one_batch_are_one_plan_run_in_batches_and_roll_back_byte_exact() {
    let db = setup(1_000).await;
    let violations = many_orphans(&db, 100).await;
    let n = violations.len();
    assert!(n > 2 * REPAIR_BATCH, "{n} orphans");
    let engine = engine(&db)
        .config(RepairConfig::new().approval_severity(None).batch_rows(700))
        .build()
        .unwrap();
    engine.migrate().await.unwrap();
    let broken = hash(&db, "order_lines").await;
    let plans = engine
        .plan_stream(stream(violations), &Control::detached())
        .await
        .unwrap();
    assert_eq!(plans.len(), 1, "one plan, whatever the batches");
    let plan = &plans[0];
    assert_eq!(plan.violation_count, n as u64);
    assert_eq!(
        plan.violations.len(),
        PLAN_VIOLATION_SAMPLE,
        "a sample of ids, not all"
    );
    assert_eq!(plan.estimated_rows, n as u64, "counted by the database");
    assert!(
        plan.requires_approval,
        "more rows than the threshold, and removals"
    );
    let recorded = count(
        &db,
        &format!(
            "SELECT count(*) FROM sanare.repair_targets WHERE repair_id = '{}'",
            plan.id
        ),
    )
    .await;
    assert_eq!(recorded, n as i64);
    let (control, progress) = Control::new();
    let dry = engine
        .execute(plan.id, ExecuteOptions::dry_run(), &control)
        .await
        .unwrap();
    assert_eq!(dry.rows_affected, n as u64, "{:?}", dry.message);
    assert_eq!(dry.rows.len(), PLAN_VIOLATION_SAMPLE);
    assert_eq!(
        progress.get().done,
        n as u64,
        "every batch advanced the progress"
    );
    assert_eq!(hash(&db, "order_lines").await, broken);
    engine.approve(plan.id, "ops").await.unwrap();
    let out = engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(out.status, RepairStatus::Completed, "{:?}", out.message);
    assert_eq!(out.rows_affected, n as u64);
    assert_eq!(orphans(&db).await, 0);
    engine
        .rollback(plan.id, &Control::detached())
        .await
        .unwrap();
    assert_eq!(hash(&db, "order_lines").await, broken);
}

#[tokio::test]
async fn the_repair_loop_plans_every_batch_runs_what_it_may_and_names_the_rest() {
    let db = setup(1_000).await;
    let mut violations = many_orphans(&db, 300).await;
    let lines = violations.len();
    for v in &mut violations {
        v.severity = Severity::Low;
    }
    // Orders of a deleted customer: removing them would cascade to their lines.
    exec(
        &db,
        &format!(
            "SET session_replication_role = replica; DELETE FROM {S}.customers WHERE id = 7;
             SET session_replication_role = origin;"
        ),
    )
    .await;
    let cascading: Vec<Violation> = db
        .client()
        .await
        .query(
            &format!("SELECT id::text FROM {S}.orders WHERE customer_id = 7"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            orphan(
                "orders",
                "customer_id",
                "customers",
                &[("id", "bigint", r.get::<_, String>(0))],
                Severity::Low,
            )
        })
        .collect();
    assert!(!cascading.is_empty());
    violations.extend(cascading.iter().cloned());
    let engine = engine(&db)
        .config(
            RepairConfig::new()
                .approval_severity(None)
                .approval_max_rows(u64::MAX),
        )
        .build()
        .unwrap();
    engine.migrate().await.unwrap();
    let before = hash(&db, "order_lines").await;

    // By default nothing is approved: both removals wait, nothing changes.
    let policy = RepairPolicy::new("test");
    let summary = engine
        .repair_all(stream(violations.clone()), &policy, &Control::detached())
        .await
        .unwrap();
    assert_eq!(summary.violations_read, violations.len() as u64);
    assert_eq!(summary.planned, 2);
    assert_eq!(summary.awaiting_approval.len(), 2);
    assert_eq!(summary.completed, 0);
    assert_eq!(hash(&db, "order_lines").await, before);

    // Approved by policy: the lines are removed; the orders' removal fails by name.
    let summary = engine
        .repair_all(
            stream(violations.clone()),
            &policy.clone().auto_approve(true),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(summary.completed, 1, "{summary:?}");
    assert_eq!(summary.violations_fixed, lines as u64);
    assert_eq!(summary.rows_changed, lines as u64);
    assert_eq!(summary.not_completed.len(), 1, "{summary:?}");
    assert!(
        summary.not_completed[0].1.contains("cascade"),
        "{summary:?}"
    );
    assert_eq!(orphans(&db).await, 0);

    // Cancelled while planning: an error, and no half-recorded plan left behind.
    let plans_before = count(&db, "SELECT count(*) FROM sanare.repair_operations").await;
    let (control, _) = Control::new();
    let token = control.cancel_token().clone();
    let cancelling = stream(violations.clone())
        .enumerate()
        .map(move |(i, v)| {
            if i == REPAIR_BATCH + 10 {
                token.cancel();
            }
            v
        })
        .boxed();
    let err = engine
        .repair_all(cancelling, &policy.clone().auto_approve(true), &control)
        .await
        .unwrap_err();
    assert!(err.is_cancelled(), "{err}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM sanare.repair_operations").await,
        plans_before,
        "no plan of the cancelled run remains"
    );
}
