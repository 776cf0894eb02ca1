//! Repair engine benchmarks: `cargo xtask bench repair`.
//!
//! Big workloads are measured once with `Instant` (each against a baseline measured
//! in the same run); the pure decision table is measured with criterion.
//!
//! `repair_plan_1m_*`: planning and dry-running the repair of one million orphans
//! (`pgbench -i --foreign-keys` at scale 100, ten branches deleted behind the
//! database's back), in a child process whose peak RSS is the figure; the baseline is
//! a child that only reads the same violations. Environment:
//! `SANARE_BENCH_REPAIR_SCALE` (pgbench scale, default 100),
//! `SANARE_BENCH_REPAIR_ONLY=plan1m` (only those figures) or `=small` (only the
//! others).

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use criterion::Criterion;
use futures_util::StreamExt as _;
use sanare_benches::{Figures, peak_rss_mb, pgbench};
use sanare_core::{
    ColumnValue, Control, ExecuteOptions, RepairService, RepairStatus, RowRef, Severity,
    SnapshotRequest, SnapshotService, TableRef, Violation, ViolationKind,
};
use sanare_repair::testing::{FakeJournal, PgCopySnapshots, corpus_rules, plant_corpus};
use sanare_repair::{Decision, RepairConfig, RepairEngine};
use sanare_testing::fixtures::order_service;

const S: &str = "shop";
const CHILD: &str = "SANARE_BENCH_REPAIR_CHILD";
const CHILD_URL: &str = "SANARE_BENCH_REPAIR_URL";

async fn hash(c: &tokio_postgres::Client, table: &str) -> String {
    c.query_one(
        &format!("SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {S}.{table} t"),
        &[],
    )
    .await
    .expect("hash")
    .get(0)
}

fn lenient() -> RepairConfig {
    RepairConfig::new()
        .approval_severity(None)
        .approval_max_rows(u64::MAX)
        .removals_need_approval(false)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    if let Ok(mode) = std::env::var(CHILD) {
        let url = std::env::var(CHILD_URL).expect("child database URL");
        rt.block_on(child(&mode, &url));
        return;
    }
    let only = std::env::var("SANARE_BENCH_REPAIR_ONLY").unwrap_or_default();
    let mut figures = Figures::new();
    figures.note(
        "machine",
        "2 cores, 24 GiB, shared with other engineers' builds",
    );
    if only != "small" {
        rt.block_on(plan_1m(&mut figures));
    }
    if only != "plan1m" {
        let corpus_analysis = rt.block_on(small(&mut figures));
        decide(&corpus_analysis);
    }
    figures
        .write(&Figures::path_for("repair"))
        .expect("writing figures");
}

/// The child: plans (and dry-runs) the repair of every orphan of the pgbench
/// fixture at `url`, or only reads them (`mode` = `stream`), then prints its figures
/// as one JSON line.
async fn child(mode: &str, url: &str) {
    let pool = sanare_pg::connect_pool(url, 4).expect("pool");
    let violations = pgbench::orphan_violations(pool.clone(), 10_000);
    let t = Instant::now();
    let out = if mode == "stream" {
        let n = violations
            .fold(0u64, |n, v| async move {
                v.expect("violation");
                n + 1
            })
            .await;
        serde_json::json!({"violations": n, "read_s": t.elapsed().as_secs_f64()})
    } else {
        let engine = RepairEngine::builder().pool(pool).build().expect("engine");
        engine.migrate().await.expect("migrate");
        let plans = engine
            .plan_stream(violations, &Control::detached())
            .await
            .expect("plan");
        let plan_s = t.elapsed().as_secs_f64();
        let (mut rows, mut planned) = (0u64, 0u64);
        let t = Instant::now();
        for p in &plans {
            planned += p.violation_count;
            let dry = engine
                .execute(p.id, ExecuteOptions::dry_run(), &Control::detached())
                .await
                .expect("dry run");
            assert_ne!(dry.status, RepairStatus::Failed, "{:?}", dry.message);
            rows += dry.rows_affected;
        }
        serde_json::json!({
            "plans": plans.len(), "violations": planned, "rows": rows,
            "plan_s": plan_s, "dry_run_s": t.elapsed().as_secs_f64(),
            "requires_approval": plans.iter().all(|p| p.requires_approval),
        })
    };
    let mut out = out;
    out["peak_rss_mb"] = serde_json::json!(peak_rss_mb());
    println!("{out}");
}

fn run_child(mode: &str, url: &str) -> serde_json::Value {
    let out = Command::new(std::env::current_exe().expect("exe"))
        .env(CHILD, mode)
        .env(CHILD_URL, url)
        .output()
        .expect("child");
    assert!(
        out.status.success(),
        "repair bench child `{mode}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("child `{mode}` printed {text:?}: {e}"))
}

/// `repair_plan_1m_*`.
async fn plan_1m(figures: &mut Figures) {
    let scale: u64 = std::env::var("SANARE_BENCH_REPAIR_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let db = sanare_testing::test_db().await;
    let t = Instant::now();
    let url = db.url().to_owned();
    tokio::task::spawn_blocking(move || pgbench::init_with_foreign_keys(&url, scale))
        .await
        .expect("pgbench task")
        .expect("pgbench -i");
    let c = db.connect().await;
    let orphans = pgbench::orphan_branches(&c, scale / 10)
        .await
        .expect("orphans");
    c.batch_execute("VACUUM ANALYZE").await.expect("analyze");
    sanare_benches::checkpoint(&c, "repair").await;
    eprintln!(
        "repair bench: pgbench -s {scale} with {orphans} orphans ready in {:.1?}",
        t.elapsed()
    );
    let base = run_child("stream", db.url());
    let plan = run_child("plan", db.url());
    eprintln!("repair bench: baseline {base}, plan {plan}");
    assert_eq!(base["violations"].as_u64(), Some(orphans));
    assert_eq!(plan["violations"].as_u64(), Some(orphans));
    assert_eq!(
        plan["rows"].as_u64(),
        Some(orphans),
        "the dry run removes every orphan"
    );
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    figures
        .set("repair_plan_1m_orphans", orphans as f64)
        .set("repair_plan_1m_peak_rss_mb", num(&plan, "peak_rss_mb"))
        .set("repair_plan_1m_s", num(&plan, "plan_s"))
        .set("repair_dry_run_1m_s", num(&plan, "dry_run_s"))
        .set(
            "repair_plan_1m_baseline_read_peak_rss_mb",
            num(&base, "peak_rss_mb"),
        )
        .set("repair_plan_1m_baseline_read_s", num(&base, "read_s"));
}

/// The small workloads: 1,000 orphans, 100 snapshot rows, the labelled corpus.
async fn small(figures: &mut Figures) -> Vec<(Decision, sanare_repair::TableFacts)> {
    let db = sanare_testing::test_db().await;
    let c = db.connect().await;
    order_service::install(&c, S).await.expect("fixture");
    order_service::generate(&c, S, 5_000).await.expect("data");
    let snaps = Arc::new(PgCopySnapshots::new(db.pool().clone(), "snapcopy"));
    let engine = RepairEngine::builder()
        .pool(db.pool().clone())
        .snapshots(snaps.clone())
        .config(lenient())
        .build()
        .expect("engine");
    engine.migrate().await.expect("migrate");
    orphans(figures, &c, &engine).await;
    snapshot_rows(figures, &c, &engine, &snaps).await;
    // Strategy accuracy over the labelled corpus, on a fresh database.
    let db2 = sanare_testing::test_db().await;
    let c2 = db2.connect().await;
    order_service::install(&c2, S).await.expect("fixture");
    order_service::generate(&c2, S, 200).await.expect("data");
    let snaps2 = Arc::new(PgCopySnapshots::new(db2.pool().clone(), "snapcopy"));
    let corpus = plant_corpus(&c2, S, snaps2.as_ref()).await.expect("corpus");
    let engine2 = corpus_rules(RepairEngine::builder(), S)
        .pool(db2.pool().clone())
        .snapshots(snaps2)
        .journal(Arc::new(FakeJournal::new(db2.pool().clone(), Vec::new())))
        .build()
        .expect("engine");
    engine2.migrate().await.expect("migrate");
    let vs: Vec<Violation> = corpus.iter().map(|(v, _)| v.clone()).collect();
    let analysis = engine2.analyze(&vs).await.expect("analyze");
    let right = corpus
        .iter()
        .zip(&analysis)
        .filter(|((_, want), (d, _))| match d {
            Decision::Strategy { rule, .. } => rule == want,
            Decision::Manual { .. } => *want == "manual",
            _ => false,
        })
        .count();
    figures.set(
        "strategy_accuracy_pct",
        100.0 * right as f64 / corpus.len() as f64,
    );
    figures.set("strategy_corpus_size", corpus.len() as f64);
    analysis
}

/// 1,000 orphaned order lines quarantined and put back, against the bare delete.
async fn orphans(figures: &mut Figures, c: &tokio_postgres::Client, engine: &RepairEngine) {
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
    let keys = violations
        .iter()
        .map(|v| {
            let k = &v.row.as_ref().expect("row").key;
            format!(
                "({}, {})",
                k[0].value.as_deref().unwrap_or("0"),
                k[1].value.as_deref().unwrap_or("0")
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    // Baseline: the bare delete in a transaction that rolls back.
    let t = Instant::now();
    c.batch_execute(&format!(
        "BEGIN; DELETE FROM {S}.order_lines WHERE (order_id, line_no) IN ({keys}); ROLLBACK;"
    ))
    .await
    .expect("baseline");
    figures.set("orphan_baseline_bare_delete_s", t.elapsed().as_secs_f64());
    timed_repair(figures, c, engine, &violations, "order_lines", "orphan").await;
}

/// 100 corrupted customers restored by primary key from a snapshot, against the
/// bare update from the copy table.
async fn snapshot_rows(
    figures: &mut Figures,
    c: &tokio_postgres::Client,
    engine: &RepairEngine,
    snaps: &PgCopySnapshots,
) {
    let customers = TableRef::new(S, "customers");
    snaps
        .create(
            SnapshotRequest::new().tables([customers.clone()]),
            &Control::detached(),
        )
        .await
        .expect("snapshot");
    c.batch_execute(&format!(
        "UPDATE {S}.customers SET full_name = 'corrupt' WHERE id <= 100"
    ))
    .await
    .expect("corrupt");
    let violations: Vec<Violation> = (1..=100)
        .map(|id| {
            Violation::new(
                ViolationKind::ChecksumMismatch {
                    column: "checksum".into(),
                },
                Severity::High,
                customers.clone(),
                Some(RowRef::new(
                    customers.clone(),
                    vec![ColumnValue::new("id", "bigint", Some(id.to_string()))],
                )),
                "checksum mismatch",
            )
        })
        .collect();
    let copy: String = c
        .query_one("SELECT quote_ident(table_name) FROM information_schema.tables WHERE table_schema = 'snapcopy' LIMIT 1", &[])
        .await
        .expect("copy table")
        .get(0);
    let t = Instant::now();
    c.batch_execute(&format!(
        "BEGIN; UPDATE {S}.customers c SET full_name = s.full_name FROM snapcopy.{copy} s WHERE s.id = c.id AND c.id <= 100; ROLLBACK;"
    ))
    .await
    .expect("baseline");
    figures.set(
        "snapshot_row_baseline_bare_update_s",
        t.elapsed().as_secs_f64(),
    );
    let rollback_rows =
        timed_repair(figures, c, engine, &violations, "customers", "snapshot_row").await;
    let orphans = figures.get("orphan_rollback_s").unwrap_or(0.0);
    figures.set("rollback_max_s", orphans.max(rollback_rows));
}

/// Plans, runs and rolls back the repair of `violations` (one plan, every row
/// changed), recording `<name>_repair_s` and `<name>_rollback_s`; checks the
/// rollback is byte-exact and returns its seconds.
async fn timed_repair(
    figures: &mut Figures,
    c: &tokio_postgres::Client,
    engine: &RepairEngine,
    violations: &[Violation],
    table: &str,
    name: &str,
) -> f64 {
    let before = hash(c, table).await;
    let t = Instant::now();
    let plan = engine.plan(violations).await.expect("plan").remove(0);
    let out = engine
        .execute(plan.id, ExecuteOptions::new(), &Control::detached())
        .await
        .expect("execute");
    assert_eq!(out.status, RepairStatus::Completed, "{:?}", out.message);
    assert_eq!(out.rows_affected, violations.len() as u64);
    figures.set(&format!("{name}_repair_s"), t.elapsed().as_secs_f64());
    let t = Instant::now();
    engine
        .rollback(plan.id, &Control::detached())
        .await
        .expect("rollback");
    let rollback = t.elapsed().as_secs_f64();
    figures.set(&format!("{name}_rollback_s"), rollback);
    assert_eq!(hash(c, table).await, before, "rollback is byte-exact");
    rollback
}

/// The pure decision table, with criterion.
fn decide(analysis: &[(Decision, sanare_repair::TableFacts)]) {
    let mut criterion = Criterion::default()
        .sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2))
        .configure_from_args();
    let facts: Vec<_> = analysis.iter().map(|(_, f)| f.clone()).collect();
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
}
