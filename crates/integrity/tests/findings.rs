//! Findings stream in bounded batches: a run with many more findings than one batch
//! stores the same findings in the table, the JSON-lines file, the CSV and the JSON
//! exports, and readers page through them. And a run that fails or is dropped half
//! way leaves no pooled connection inside a transaction.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt;
use sanare_core::{Control, IntegrityService, TableRef, ValidationScope, Violation};
use sanare_integrity::report::{CSV_HEADER, read_json};
use sanare_integrity::{ConsistencyRule, Integrity, IntegrityConfig, Rules, ViolationQuery};
use sanare_pg::SchemaName;
use sanare_testing::{TestDb, fixtures::order_service, test_db};

mod common;
use common::{gate, order_total, texts, wait_at_gate};

fn t(name: &str) -> TableRef {
    TableRef::new("shop", name)
}

async fn shop(orders: u64) -> TestDb {
    let db = test_db().await;
    let c = db.connect().await;
    order_service::install(&c, "shop").await.unwrap();
    order_service::generate(&c, "shop", orders).await.unwrap();
    sanare_integrity::migrate(&mut db.connect().await, &SchemaName::default_schema())
        .await
        .unwrap();
    db
}

fn integrity(
    pool: sanare_pg::Pool,
    dir: &std::path::Path,
    rules: Rules,
    batch: usize,
) -> Integrity {
    let mut cfg = IntegrityConfig::default();
    cfg.chunk_rows = 150;
    cfg.parallelism = 2;
    cfg.batch_size = batch;
    cfg.report_dir = dir.to_owned();
    Integrity::builder()
        .pool(pool)
        .rules(rules)
        .config(cfg)
        .build()
        .unwrap()
}

fn ids(vs: &[Violation]) -> BTreeSet<String> {
    vs.iter().map(|v| v.id.to_string()).collect()
}

#[tokio::test]
async fn more_findings_than_a_batch_are_the_same_in_the_table_the_files_and_the_exports() {
    let db = shop(400).await;
    let c = db.connect().await;
    c.batch_execute(
        "SET session_replication_role = replica;
         DELETE FROM shop.customers WHERE id <= 40;
         SET session_replication_role = origin;
         UPDATE shop.orders SET total_cents = total_cents + 1 WHERE id % 9 = 0;",
    )
    .await
    .unwrap();
    let orphans = texts(
        &c,
        "SELECT id::text FROM shop.orders o WHERE NOT EXISTS (SELECT 1 FROM shop.customers c WHERE c.id = o.customer_id)",
    )
    .await;
    let batch = 7;
    assert!(orphans.len() > 10 * batch, "{}", orphans.len());
    let rules = Rules::builder().consistency(order_total()).build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let i = integrity(db.pool().clone(), dir.path(), rules, batch);
    let report = i
        .run(
            ValidationScope::all().tables([t("orders")]),
            &Control::detached(),
        )
        .await
        .unwrap();
    let total = report.total_violations();
    let stored: i64 = c
        .query_one(
            "SELECT count(*) FROM sanare.integrity_violations WHERE check_id = $1",
            &[&report.id.as_uuid()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored as u64, total);

    // The stream (pages of the batch size).
    let vs: Vec<Violation> = i.violations(report.id).map(|v| v.unwrap()).collect().await;
    assert_eq!(vs.len() as u64, total);
    let found: BTreeSet<String> = vs
        .iter()
        .filter(|v| v.kind.code() == "referential")
        .map(|v| v.row.as_ref().unwrap().key[0].value.clone().unwrap())
        .collect();
    assert_eq!(found, orphans);
    let bad_totals: i64 = c
        .query_one("SELECT count(*) FROM shop.orders WHERE id % 9 = 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        vs.iter().filter(|v| v.kind.code() == "consistency").count() as i64,
        bad_totals
    );
    let all = ids(&vs);
    assert_eq!(all.len(), vs.len());

    // The JSON-lines file written during the run.
    let file = std::fs::read_to_string(report.violations_file.as_ref().unwrap()).unwrap();
    let lines: Vec<Violation> = file
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), vs.len());
    assert_eq!(ids(&lines), all);

    // The CSV export.
    let mut csv = Vec::new();
    i.export_csv(report.id, &mut csv).await.unwrap();
    let csv = String::from_utf8(csv).unwrap();
    let mut rows = csv.lines();
    assert_eq!(rows.next(), Some(CSV_HEADER));
    let csv_ids: Vec<String> = rows
        .map(|l| l.split(',').next().unwrap().to_owned())
        .collect();
    assert_eq!(csv_ids.len(), vs.len());
    assert_eq!(csv_ids.into_iter().collect::<BTreeSet<_>>(), all);

    // The JSON export: the same violations, field for field.
    let mut json = Vec::new();
    i.export_json(report.id, &mut json).await.unwrap();
    let doc = read_json(&json[..]).unwrap();
    assert_eq!(doc.report.id, report.id);
    assert_eq!(doc.violations, vs);

    // Paging by hand: pages of 10 after the last id of the previous page.
    let mut paged = Vec::new();
    let mut q = ViolationQuery::new().check(report.id).limit(10);
    loop {
        let page = i.query_violations(&q).await.unwrap();
        assert!(page.len() <= 10);
        let Some(last) = page.last() else { break };
        q = q.after(last.id);
        paged.extend(page);
    }
    assert_eq!(paged, vs);
    // And filtered, through the stream.
    let referential: Vec<Violation> = i
        .violations_matching(
            ViolationQuery::new()
                .check(report.id)
                .violation_type("referential")
                .limit(3),
        )
        .map(|v| v.unwrap())
        .collect()
        .await;
    assert_eq!(referential.len(), orphans.len());
}

/// Every connection the pool holds is outside any transaction and takes writes.
async fn pool_is_clean(pool: &sanare_pg::Pool, c: &tokio_postgres::Client) {
    let mut conns = Vec::new();
    for _ in 0..pool.status().max_size {
        conns.push(pool.get().await.unwrap());
    }
    for conn in &conns {
        // Outside a transaction block a SAVEPOINT is refused; inside one (open or
        // aborted) it is not, or fails for another reason.
        let err = conn
            .batch_execute("SAVEPOINT sanare_probe")
            .await
            .unwrap_err();
        assert!(
            err.as_db_error().is_some_and(|e| e
                .message()
                .contains("can only be used in transaction blocks")),
            "a pooled connection is inside a transaction: {err:?}"
        );
        let read_only: String = conn
            .query_one("SELECT current_setting('transaction_read_only')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(read_only, "off");
        conn.execute("INSERT INTO shop.host_writes VALUES (1)", &[])
            .await
            .unwrap();
    }
    drop(conns);
    // Connections the guards took out of the pool close (their server sessions end,
    // rolling back): none stays idle inside a transaction.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let in_tx: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if in_tx == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{in_tx} sessions stay in a transaction"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_failed_or_dropped_run_leaves_no_pooled_connection_in_a_transaction() {
    let db = shop(200).await;
    let c = db.connect().await;
    c.batch_execute("CREATE TABLE shop.host_writes (x int)")
        .await
        .unwrap();
    let pool = sanare_pg::connect_pool(db.url(), 4).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // A unit fails (its statement times out) while others are in flight.
    let slow = Rules::builder()
        .consistency(ConsistencyRule::predicate(
            "slow",
            &t("orders"),
            "pg_sleep(0.01) IS NOT NULL",
        ))
        .build()
        .unwrap();
    let mut cfg = IntegrityConfig::default();
    cfg.chunk_rows = 50;
    cfg.parallelism = 2;
    cfg.chunk_timeout = Duration::from_millis(1);
    cfg.report_dir = dir.path().to_owned();
    let failing = Integrity::builder()
        .pool(pool.clone())
        .rules(slow)
        .config(cfg)
        .build()
        .unwrap();
    let err = failing
        .run(
            ValidationScope::all().tables([t("orders")]),
            &Control::detached(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fused"), "{err}");
    pool_is_clean(&pool, &c).await;

    // A run dropped while a unit waits inside its transaction (at an advisory-lock
    // gate the test holds).
    let gate_rule = Rules::builder().consistency(gate(4343)).build().unwrap();
    let gated = integrity(pool.clone(), dir.path(), gate_rule, 10);
    let gate = db.connect().await;
    gate.execute("SELECT pg_advisory_lock(4343)", &[])
        .await
        .unwrap();
    let run = tokio::spawn(async move {
        gated
            .run(
                ValidationScope::all().tables([t("orders")]),
                &Control::detached(),
            )
            .await
    });
    wait_at_gate(&c, 4343).await;
    run.abort();
    assert!(run.await.unwrap_err().is_cancelled());
    gate.execute("SELECT pg_advisory_unlock(4343)", &[])
        .await
        .unwrap();
    pool_is_clean(&pool, &c).await;
}
