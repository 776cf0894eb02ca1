//! Journal benchmarks (`cargo xtask bench journal`).
//!
//! Big workloads are measured once with `Instant`, each against a baseline measured
//! in the same run; a small criterion group measures one durable append's latency.
//! Figures go to `target/bench/journal.json`.

#![allow(missing_docs, clippy::print_stdout)]

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use criterion::Criterion;
use sanare_benches::Figures;
use sanare_core::{Control, JournalService, ReplayRange, ReplayRequest};
use sanare_journal::{Journal, JournalEntry, NewEntry, NoopHandler, PgHandler};
use sanare_pg::SchemaName;

const WRITERS: usize = 32;

fn scratch() -> tempfile::TempDir {
    // On the same disk as the workspace (not a tmpfs).
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-scratch");
    let _ = std::fs::create_dir_all(&base);
    tempfile::tempdir_in(base).expect("scratch directory")
}

fn payload256(i: usize) -> Vec<u8> {
    let mut p = format!("entry-{i:010}-").into_bytes();
    p.resize(256, b'x');
    p
}

fn order_json(i: usize) -> String {
    format!(
        r#"{{"order_id":{i},"customer":{{"id":{c},"email":"customer{c}@example.com","name":"Customer {c}"}},"status":"{s}","currency":"EUR","placed_at":"2026-11-23T10:{m:02}:{sec:02}Z","lines":[{{"product_id":{p},"sku":"SKU-{p:05}","qty":{q},"unit_price_cents":{u}}},{{"product_id":{p2},"sku":"SKU-{p2:05}","qty":1,"unit_price_cents":499}}],"payment":{{"method":"card","status":"captured","amount_cents":{t}}}}}"#,
        c = i % 997,
        s = ["placed", "paid", "shipped", "delivered"][i % 4],
        m = (i / 60) % 60,
        sec = i % 60,
        p = i % 211,
        p2 = (i * 7) % 211,
        q = 1 + i % 5,
        u = 100 + (i * 37) % 9000,
        t = 499 + (1 + i % 5) * (100 + (i * 37) % 9000),
    )
}

async fn concurrent_records(journal: &Journal, per_writer: usize) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let j = journal.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                j.record(NewEntry::from_bytes(
                    "bench",
                    payload256(w * per_writer + i),
                ))
                .await
                .expect("record");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    (WRITERS * per_writer) as f64 / start.elapsed().as_secs_f64()
}

fn naive_fsync_per_entry(n: usize) -> f64 {
    let dir = scratch();
    let mut f = std::fs::File::create(dir.path().join("naive.log")).expect("naive file");
    let start = Instant::now();
    for i in 0..n {
        let p = payload256(i);
        f.write_all(&(p.len() as u32).to_le_bytes()).expect("write");
        f.write_all(&p).expect("write");
        f.sync_data().expect("fsync");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

struct InsertRow;

#[async_trait]
impl PgHandler for InsertRow {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entry: &JournalEntry,
    ) -> sanare_core::Result<()> {
        tx.execute(
            "INSERT INTO bench_applied (position, payload) VALUES ($1, $2)",
            &[&(entry.position.0 as i64), &entry.payload],
        )
        .await
        .map_err(|e| sanare_pg::map_pg_error("bench insert", e))?;
        Ok(())
    }
}

async fn run_figures(figures: &mut Figures) {
    // --- Segment WAL, durable group commit vs fsync per entry.
    let dir = scratch();
    let wal = Journal::wal(dir.path()).build().await.expect("wal");
    let _ = concurrent_records(&wal, 50).await; // warm-up
    let wal_rate = concurrent_records(&wal, 4000).await;
    let naive = naive_fsync_per_entry(3000);
    println!("wal: {wal_rate:.0} entries/s, naive fsync per entry: {naive:.0}/s");
    figures.set("wal_appends_per_s", wal_rate);
    figures.set("wal_naive_fsync_per_s", naive);
    figures.set("wal_vs_naive_fsync_ratio", wal_rate / naive);
    drop(wal);

    // --- Replay into a no-op handler (WAL).
    let dir = scratch();
    let wal = Journal::wal(dir.path())
        .handler("bench", NoopHandler)
        .build()
        .await
        .expect("wal");
    concurrent_records(&wal, 200_000 / WRITERS).await;
    let start = Instant::now();
    let s = wal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .expect("replay");
    let replay_noop = s.applied as f64 / start.elapsed().as_secs_f64();
    println!("replay noop: {} entries, {replay_noop:.0}/s", s.applied);
    figures.set("replay_noop_per_s", replay_noop);
    drop(wal);

    // --- Compaction of order-service payloads.
    let dir = scratch();
    let wal = Journal::wal(dir.path())
        .segment_size(4 << 20)
        .build()
        .await
        .expect("wal");
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let j = wal.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..1000 {
                let n = w * 1000 + i;
                j.record(
                    NewEntry::new("order.updated", &order_json(n))
                        .expect("payload")
                        .idempotency_key(format!("order-{n}"))
                        .user("checkout")
                        .source_system("order-service"),
                )
                .await
                .expect("record");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    wal.rotate().await.expect("rotate");
    let report = wal.compact(&Control::detached()).await.expect("compact");
    let pct = 100.0 * (1.0 - report.bytes_after as f64 / report.bytes_before.max(1) as f64);
    println!("compaction: {report:?} -> {pct:.1}% smaller");
    figures.set("compaction_reduction_pct", pct);
    drop(wal);

    // --- PostgreSQL backend.
    let Ok(url) = std::env::var("DATABASE_URL") else {
        println!("DATABASE_URL unset: PostgreSQL figures skipped (run through cargo xtask bench)");
        return;
    };
    let admin = sanare_pg::connect_pool(&url, 4).expect("pool");
    let admin_client = sanare_pg::get_conn(&admin).await.expect("connect");
    let _ = admin_client
        .batch_execute("DROP DATABASE IF EXISTS sanare_bench_journal WITH (FORCE)")
        .await;
    admin_client
        .batch_execute("CREATE DATABASE sanare_bench_journal")
        .await
        .expect("create bench database");
    let db_url = with_dbname(&url, "sanare_bench_journal");
    let pool = sanare_pg::connect_pool(&db_url, 40).expect("pool");
    let journal = Journal::postgres(pool.clone(), SchemaName::default())
        .pg_handler("bench", InsertRow)
        .build()
        .await
        .expect("pg journal");
    let client = sanare_pg::get_conn(&pool).await.expect("connect");
    client
        .batch_execute("CREATE TABLE bench_applied (position bigint PRIMARY KEY, payload bytea)")
        .await
        .expect("bench table");
    let _ = concurrent_records(&journal, 20).await; // warm-up
    let pg_rate = concurrent_records(&journal, 1500).await;

    // Baseline: the same 32 callers, one autocommit INSERT per entry.
    let per = 150;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let c = sanare_pg::get_conn(&pool).await.expect("connect");
            let stmt = c
                .prepare(
                    "INSERT INTO sanare.transaction_journal (entry_id, transaction_id, operation_type, \
                     entry_timestamp, payload, payload_hash) VALUES (gen_random_uuid(), 'tx', 'single', now(), $1, $2)",
                )
                .await
                .expect("prepare");
            for i in 0..per {
                let p = payload256(w * per + i);
                let h = vec![0u8; 32];
                c.execute(&stmt, &[&p, &h]).await.expect("insert");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let single = (WRITERS * per) as f64 / start.elapsed().as_secs_f64();
    println!("pg record(): {pg_rate:.0}/s, single INSERT per entry: {single:.0}/s");
    figures.set("pg_records_per_s", pg_rate);
    figures.set("pg_single_insert_per_s", single);
    figures.set("pg_vs_single_insert_ratio", pg_rate / single);

    // Replay into a handler that applies rows to PostgreSQL (exactly-once marks).
    let start = Instant::now();
    let s = journal
        .replay(
            ReplayRequest::new(ReplayRange::All).operation_types(["bench"]),
            &Control::detached(),
        )
        .await
        .expect("replay");
    let replay_pg = s.applied as f64 / start.elapsed().as_secs_f64();
    println!("replay pg: {} entries, {replay_pg:.0}/s", s.applied);
    figures.set("replay_pg_per_s", replay_pg);
    drop(journal);
    drop(client);
    drop(pool);
    let _ = admin_client
        .batch_execute("DROP DATABASE IF EXISTS sanare_bench_journal WITH (FORCE)")
        .await;
}

fn with_dbname(url: &str, db: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, rest)) if url.contains("://") => match rest.split_once('?') {
            Some((_, query)) => format!("{base}/{db}?{query}"),
            None => format!("{base}/{db}"),
        },
        _ => format!("{url} dbname={db}"),
    }
}

fn main() {
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime"),
    );
    let mut figures = Figures::new();
    figures.note(
        "machine",
        "2 cores, 24 GiB, shared with other engineers' builds",
    );
    figures.note("workload", "32 concurrent writers, 256-byte payloads");
    rt.block_on(run_figures(&mut figures));

    // Criterion: one durable append's latency with no concurrency.
    let mut c = Criterion::default()
        .sample_size(20)
        .measurement_time(std::time::Duration::from_secs(2))
        .configure_from_args();
    let dir = scratch();
    let wal = rt.block_on(Journal::wal(dir.path()).build()).expect("wal");
    let mut i = 0usize;
    c.bench_function("journal/wal_single_durable_append", |b| {
        b.iter(|| {
            i += 1;
            rt.block_on(wal.record(NewEntry::from_bytes("bench", payload256(i))))
                .expect("record")
        })
    });
    c.final_summary();

    let path = Figures::path_for("journal");
    figures.write(&path).expect("writing figures");
    println!("figures written to {}", path.display());
}
