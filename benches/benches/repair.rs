//! Repair engine benchmarks: `cargo xtask bench repair`.
//!
//! Big workloads are measured once with `Instant` (each against a baseline of the
//! bare SQL doing the same change without the engine, in the same run); the pure
//! decision table is measured with criterion.

use std::sync::Arc;
use std::time::Instant;

use criterion::Criterion;
use sanare_benches::Figures;
use sanare_core::{
    ColumnValue, Control, ExecuteOptions, RepairService, RepairStatus, RowRef, Severity,
    SnapshotRequest, SnapshotService, TableRef, Violation, ViolationKind,
};
use sanare_repair::testing::{FakeJournal, PgCopySnapshots, plant_corpus};
use sanare_repair::{Decision, RepairConfig, RepairEngine};
use sanare_testing::fixtures::order_service;

const S: &str = "shop";

async fn hash(c: &tokio_postgres::Client, table: &str) -> String {
    c.query_one(
        &format!("SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {S}.{table} t"),
        &[],
    )
    .await
    .expect("hash")
    .get(0)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut figures = Figures::new();
    let corpus_analysis = rt.block_on(async {
        let db = sanare_testing::test_db().await;
        let c = db.connect().await;
        order_service::install(&c, S).await.expect("fixture");
        order_service::generate(&c, S, 5_000).await.expect("data");
        let snaps = Arc::new(PgCopySnapshots::new(db.pool().clone(), "snapcopy"));
        let engine = RepairEngine::builder()
            .pool(db.pool().clone())
            .snapshots(snaps.clone())
            .config(RepairConfig::new().approval_severity(None).approval_max_rows(u64::MAX))
            .build()
            .expect("engine");
        engine.migrate().await.expect("migrate");

        // 1,000 orphaned order lines.
        c.batch_execute(&format!(
            "SET session_replication_role = replica; DELETE FROM {S}.orders WHERE id <= 400; SET session_replication_role = origin;"
        ))
        .await
        .expect("plant orphans");
        let lines = TableRef::new(S, "order_lines");
        let violations: Vec<Violation> = c
            .query(&format!("SELECT order_id::text, line_no::text FROM {S}.order_lines l WHERE NOT EXISTS (SELECT 1 FROM {S}.orders o WHERE o.id = l.order_id) ORDER BY 1, 2 LIMIT 1000"), &[])
            .await
            .expect("orphans")
            .iter()
            .map(|r| {
                Violation::new(
                    ViolationKind::Referential {
                        constraint: "order_lines_order_id_fkey".into(),
                        columns: vec!["order_id".into()],
                        parent_table: TableRef::new(S, "orders"),
                        parent_columns: vec!["id".into()],
                    },
                    Severity::High,
                    lines.clone(),
                    Some(RowRef::new(lines.clone(), vec![
                        ColumnValue::new("order_id", "bigint", Some(r.get::<_, String>(0))),
                        ColumnValue::new("line_no", "integer", Some(r.get::<_, String>(1))),
                    ])),
                    "orphan",
                )
            })
            .collect();
        assert_eq!(violations.len(), 1000);
        let keys = violations.iter().map(|v| {
            let k = &v.row.as_ref().expect("row").key;
            format!("({}, {})", k[0].value.as_deref().unwrap_or("0"), k[1].value.as_deref().unwrap_or("0"))
        }).collect::<Vec<_>>().join(", ");
        // Baseline: the bare delete in a transaction that rolls back.
        let t = Instant::now();
        c.batch_execute(&format!("BEGIN; DELETE FROM {S}.order_lines WHERE (order_id, line_no) IN ({keys}); ROLLBACK;")).await.expect("baseline");
        figures.set("orphan_baseline_bare_delete_s", t.elapsed().as_secs_f64());
        let before = hash(&c, "order_lines").await;
        let t = Instant::now();
        let plan = engine.plan(&violations).await.expect("plan").remove(0);
        let out = engine.execute(plan.id, ExecuteOptions::new(), &Control::detached()).await.expect("execute");
        assert_eq!(out.status, RepairStatus::Completed);
        assert_eq!(out.rows_affected, 1000);
        figures.set("orphan_repair_s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        engine.rollback(plan.id, &Control::detached()).await.expect("rollback");
        let rollback_orphans = t.elapsed().as_secs_f64();
        figures.set("orphan_rollback_s", rollback_orphans);
        assert_eq!(hash(&c, "order_lines").await, before);

        // 100 checksum mismatches restored from a snapshot.
        let customers = TableRef::new(S, "customers");
        snaps.create(SnapshotRequest::new().tables([customers.clone()]), &Control::detached()).await.expect("snapshot");
        c.batch_execute(&format!("UPDATE {S}.customers SET full_name = 'corrupt' WHERE id <= 100")).await.expect("corrupt");
        let corrupted = hash(&c, "customers").await;
        let violations: Vec<Violation> = (1..=100).map(|id| Violation::new(
            ViolationKind::ChecksumMismatch { column: "checksum".into() },
            Severity::High,
            customers.clone(),
            Some(RowRef::new(customers.clone(), vec![ColumnValue::new("id", "bigint", Some(id.to_string()))])),
            "checksum mismatch",
        )).collect();
        // Baseline: the bare update from the copy table, rolled back.
        let copy: String = c
            .query_one("SELECT quote_ident(table_name) FROM information_schema.tables WHERE table_schema = 'snapcopy' LIMIT 1", &[])
            .await
            .expect("copy table")
            .get(0);
        let t = Instant::now();
        c.batch_execute(&format!(
            "BEGIN; UPDATE {S}.customers c SET full_name = s.full_name FROM snapcopy.{copy} s WHERE s.id = c.id AND c.id <= 100; ROLLBACK;"
        )).await.expect("baseline");
        figures.set("snapshot_row_baseline_bare_update_s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let plan = engine.plan(&violations).await.expect("plan").remove(0);
        let out = engine.execute(plan.id, ExecuteOptions::new(), &Control::detached()).await.expect("execute");
        assert_eq!(out.status, RepairStatus::Completed);
        assert_eq!(out.rows_affected, 100);
        figures.set("snapshot_row_repair_s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        engine.rollback(plan.id, &Control::detached()).await.expect("rollback");
        let rollback_rows = t.elapsed().as_secs_f64();
        figures.set("snapshot_row_rollback_s", rollback_rows);
        assert_eq!(hash(&c, "customers").await, corrupted);
        figures.set("rollback_max_s", rollback_orphans.max(rollback_rows));

        // Strategy accuracy over the labelled corpus, on a fresh database.
        let db2 = sanare_testing::test_db().await;
        let c2 = db2.connect().await;
        order_service::install(&c2, S).await.expect("fixture");
        order_service::generate(&c2, S, 200).await.expect("data");
        let snaps2 = Arc::new(PgCopySnapshots::new(db2.pool().clone(), "snapcopy"));
        let corpus = plant_corpus(&c2, S, snaps2.as_ref()).await.expect("corpus");
        let engine2 = RepairEngine::builder()
            .pool(db2.pool().clone())
            .snapshots(snaps2)
            .journal(Arc::new(FakeJournal::new(db2.pool().clone(), Vec::new())))
            .build()
            .expect("engine");
        engine2.migrate().await.expect("migrate");
        let vs: Vec<Violation> = corpus.iter().map(|(v, _)| v.clone()).collect();
        let analysis = engine2.analyze(&vs).await.expect("analyze");
        let right = corpus.iter().zip(&analysis).filter(|((_, want), (d, _))| match d {
            Decision::Strategy { rule, .. } => rule == want,
            Decision::Manual { .. } => *want == "manual",
            _ => false,
        }).count();
        figures.set("strategy_accuracy_pct", 100.0 * right as f64 / corpus.len() as f64);
        figures.set("strategy_corpus_size", corpus.len() as f64);
        analysis
    });

    // The pure decision table, with criterion.
    let mut criterion = Criterion::default()
        .sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2))
        .configure_from_args();
    let facts: Vec<_> = corpus_analysis.iter().map(|(_, f)| f.clone()).collect();
    let v = Violation::new(
        ViolationKind::NullConstraint { column: "v".into() },
        Severity::Low,
        TableRef::new(S, "settings"),
        None,
        "x",
    );
    criterion.bench_function("repair/decide", |b| {
        b.iter(|| {
            for f in &facts {
                std::hint::black_box(sanare_repair::decide(&v, f));
            }
        })
    });
    criterion.final_summary();
    figures.note(
        "machine",
        "2 cores, 24 GiB, shared with other engineers' builds",
    );
    figures
        .write(&Figures::path_for("repair"))
        .expect("writing figures");
}
