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
    order_event(i, i)
}

/// One event of an order service: order `order_id`'s document after event `i`.
fn order_event(order_id: usize, i: usize) -> String {
    format!(
        r#"{{"order_id":{order_id},"customer":{{"id":{c},"email":"customer{c}@example.com","name":"Customer {c}"}},"status":"{s}","currency":"EUR","placed_at":"2026-11-23T10:{m:02}:{sec:02}Z","lines":[{{"product_id":{p},"sku":"SKU-{p:05}","qty":{q},"unit_price_cents":{u}}},{{"product_id":{p2},"sku":"SKU-{p2:05}","qty":1,"unit_price_cents":499}}],"payment":{{"method":"card","status":"captured","amount_cents":{t}}}}}"#,
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
    concurrent_records_by(journal, WRITERS, per_writer).await
}

/// `writers` tasks, each recording `per_writer` entries one at a time (each
/// waits for its entry to be durable before the next); entries per second.
async fn concurrent_records_by(journal: &Journal, writers: usize, per_writer: usize) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
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
    (writers * per_writer) as f64 / start.elapsed().as_secs_f64()
}

/// The `okaywal` crate driven the same way: `writers` OS threads (it is
/// synchronous), each committing one 256-byte entry at a time (`commit` returns
/// once the entry is durable; the crate batches the flushes of concurrent
/// committers). Entries per second.
fn okaywal_records(writers: usize, per_writer: usize) -> f64 {
    let dir = scratch();
    let log = okaywal::WriteAheadLog::recover(dir.path(), okaywal::LogVoid).expect("okaywal");
    let start = Instant::now();
    std::thread::scope(|s| {
        for w in 0..writers {
            let log = &log;
            s.spawn(move || {
                for i in 0..per_writer {
                    let mut entry = log.begin_entry().expect("begin");
                    entry
                        .write_chunk(&payload256(w * per_writer + i))
                        .expect("write");
                    entry.commit().expect("commit");
                }
            });
        }
    });
    let rate = (writers * per_writer) as f64 / start.elapsed().as_secs_f64();
    drop(log);
    rate
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

/// An order row as an order service keeps it: the latest document per order.
/// `write + fdatasync` of a 264-byte record per entry over a preallocated
/// (already written) file: the fsync rate the group-commit writer can get at best,
/// so `32 ×` this is the ceiling of 32 one-at-a-time writers.
fn fdatasync_preallocated(n: usize) -> f64 {
    use std::os::unix::fs::FileExt;
    let dir = scratch();
    let f = std::fs::File::create(dir.path().join("prealloc.log")).expect("prealloc file");
    f.write_all_at(&vec![0u8; n * 264], 0).expect("prefill");
    f.sync_all().expect("fsync");
    let rec = [b'x'; 264];
    let start = Instant::now();
    for i in 0..n {
        f.write_all_at(&rec, (i * 264) as u64).expect("write");
        f.sync_data().expect("fdatasync");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// `threads` threads each doing `n` × (`write` + `fdatasync` of a 264-byte
/// record) on their own part of one preallocated file, each through its own file
/// description: the flush rate two pipelined group commits can get at best.
fn fdatasync_preallocated_threads(threads: usize, n: usize) -> f64 {
    use std::os::unix::fs::FileExt;
    let dir = scratch();
    let path = dir.path().join("prealloc-threads.log");
    let f = std::fs::File::create(&path).expect("prealloc file");
    f.write_all_at(&vec![0u8; threads * n * 264], 0)
        .expect("prefill");
    f.sync_all().expect("fsync");
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let path = &path;
            s.spawn(move || {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .expect("prealloc file");
                let rec = [b'x'; 264];
                for i in 0..n {
                    f.write_all_at(&rec, ((t * n + i) * 264) as u64)
                        .expect("write");
                    f.sync_data().expect("fdatasync");
                }
            });
        }
    });
    (threads * n) as f64 / start.elapsed().as_secs_f64()
}

/// The textbook group commit, as a second baseline: `writers` OS threads (no async
/// runtime, no encoding) each appending one 264-byte record at a time to a shared
/// buffer and waiting until it is durable; one flusher thread writes whatever has
/// gathered with one `pwrite` and one `fdatasync`, then wakes the waiters. What 32
/// one-at-a-time writers get on this machine with nothing but the flush and the
/// wake-ups. Returns (entries/s, average group size).
fn textbook_group_commit(writers: usize, per_writer: usize) -> (f64, f64) {
    use std::os::unix::fs::FileExt;
    use std::sync::{Condvar, Mutex};
    struct State {
        buf: Vec<u8>,
        /// The group that records appended now join (1-based).
        group: u64,
        /// The last durable group; `u64::MAX` tells the flusher to stop.
        durable: u64,
        in_group: usize,
    }
    let dir = scratch();
    let file = std::fs::File::create(dir.path().join("textbook.log")).expect("textbook file");
    file.write_all_at(&vec![0u8; writers * per_writer * 264], 0)
        .expect("prefill");
    file.sync_all().expect("fsync");
    let state = Mutex::new(State {
        buf: Vec::new(),
        group: 1,
        durable: 0,
        in_group: 0,
    });
    let (gathered, flushed) = (Condvar::new(), Condvar::new());
    let lock = || state.lock().expect("state");
    let start = Instant::now();
    let (groups, entries) = std::thread::scope(|s| {
        let flusher = s.spawn(|| {
            let (mut off, mut groups, mut entries) = (0u64, 0u64, 0usize);
            loop {
                let (buf, group, n) = {
                    let mut g = lock();
                    while g.buf.is_empty() {
                        if g.durable == u64::MAX {
                            return (groups, entries);
                        }
                        g = gathered.wait(g).expect("state");
                    }
                    g.group += 1;
                    let n = std::mem::take(&mut g.in_group);
                    (std::mem::take(&mut g.buf), g.group - 1, n)
                };
                file.write_all_at(&buf, off).expect("write");
                file.sync_data().expect("fdatasync");
                off += buf.len() as u64;
                groups += 1;
                entries += n;
                lock().durable = group;
                flushed.notify_all();
            }
        });
        let workers: Vec<_> = (0..writers)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..per_writer {
                        let mut g = lock();
                        g.buf.extend_from_slice(&[b'x'; 264]);
                        g.in_group += 1;
                        let mine = g.group;
                        gathered.notify_one();
                        while g.durable < mine {
                            g = flushed.wait(g).expect("state");
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("writer");
        }
        lock().durable = u64::MAX;
        gathered.notify_all();
        flusher.join().expect("flusher")
    });
    let rate = (writers * per_writer) as f64 / start.elapsed().as_secs_f64();
    (rate, entries as f64 / groups.max(1) as f64)
}

/// CPU seconds used by this process so far (all threads).
struct OrderRow {
    order_id: i64,
    customer_id: i64,
    status: String,
    total_cents: i64,
    doc: String,
    position: i64,
}

fn order_row(entry: &JournalEntry) -> sanare_core::Result<OrderRow> {
    let doc: String = entry.payload_as()?;
    let v: serde_json::Value = serde_json::from_str(&doc)
        .map_err(|e| sanare_core::Error::invalid_input(format!("order payload: {e}")))?;
    let int = |x: &serde_json::Value| x.as_i64().unwrap_or_default();
    Ok(OrderRow {
        order_id: int(&v["order_id"]),
        customer_id: int(&v["customer"]["id"]),
        status: v["status"].as_str().unwrap_or_default().to_owned(),
        total_cents: int(&v["payment"]["amount_cents"]),
        doc,
        position: entry.position.0 as i64,
    })
}

const UPSERT_ONE: &str = "INSERT INTO orders (order_id, customer_id, status, total_cents, doc, journal_position) \
     VALUES ($1, $2, $3, $4, $5::text::jsonb, $6) \
     ON CONFLICT (order_id) DO UPDATE SET customer_id = excluded.customer_id, status = excluded.status, \
     total_cents = excluded.total_cents, doc = excluded.doc, journal_position = excluded.journal_position";

const UPSERT_MANY: &str = "INSERT INTO orders (order_id, customer_id, status, total_cents, doc, journal_position) \
     SELECT o, c, s, t, d::jsonb, p FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], \
     $5::text[], $6::bigint[]) AS u(o, c, s, t, d, p) \
     ON CONFLICT (order_id) DO UPDATE SET customer_id = excluded.customer_id, status = excluded.status, \
     total_cents = excluded.total_cents, doc = excluded.doc, journal_position = excluded.journal_position";

/// The order service's replay handler: upserts the order's latest document. The
/// batch path sends a whole run as one multi-row upsert (the last event per order
/// wins, as it would applied one by one).
struct OrderUpsert;

#[async_trait]
impl PgHandler for OrderUpsert {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entry: &JournalEntry,
    ) -> sanare_core::Result<()> {
        let r = order_row(entry)?;
        tx.execute(
            UPSERT_ONE,
            &[
                &r.order_id,
                &r.customer_id,
                &r.status,
                &r.total_cents,
                &r.doc,
                &r.position,
            ],
        )
        .await
        .map_err(|e| sanare_pg::map_pg_error("upserting an order", e))?;
        Ok(())
    }

    async fn apply_batch(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entries: &[&JournalEntry],
    ) -> sanare_core::Result<()> {
        let mut latest: std::collections::HashMap<i64, OrderRow> =
            std::collections::HashMap::with_capacity(entries.len());
        for e in entries {
            let r = order_row(e)?;
            latest.insert(r.order_id, r);
        }
        let rows: Vec<OrderRow> = latest.into_values().collect();
        let ids: Vec<i64> = rows.iter().map(|r| r.order_id).collect();
        let customers: Vec<i64> = rows.iter().map(|r| r.customer_id).collect();
        let statuses: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
        let totals: Vec<i64> = rows.iter().map(|r| r.total_cents).collect();
        let docs: Vec<&str> = rows.iter().map(|r| r.doc.as_str()).collect();
        let positions: Vec<i64> = rows.iter().map(|r| r.position).collect();
        tx.execute(
            UPSERT_MANY,
            &[&ids, &customers, &statuses, &totals, &docs, &positions],
        )
        .await
        .map_err(|e| sanare_pg::map_pg_error("upserting a batch of orders", e))?;
        Ok(())
    }
}

/// The same handler without its batch path: one upsert round trip per entry.
struct OrderUpsertPerEntry;

#[async_trait]
impl PgHandler for OrderUpsertPerEntry {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entry: &JournalEntry,
    ) -> sanare_core::Result<()> {
        OrderUpsert.apply(tx, entry).await
    }
}

/// Records `n` order-service events (four per order, events `first..first + n`)
/// with 32 concurrent callers.
async fn record_orders(journal: &Journal, first: usize, n: usize) {
    let per = n / WRITERS;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let j = journal.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let k = first + w * per + i;
                j.record(
                    NewEntry::new("order.updated", &order_event(k / 4, k))
                        .expect("payload")
                        .idempotency_key(format!("order-event-{k}"))
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
}

/// The baseline of the PostgreSQL backend: the same 32 callers, each with its own
/// connection, one autocommit INSERT per entry (`per` each); entries per second.
async fn single_inserts(pool: &sanare_pg::Pool, per: usize) -> f64 {
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
    (WRITERS * per) as f64 / start.elapsed().as_secs_f64()
}

/// Whether to run the section `name`: all unless `SANARE_BENCH_ONLY` lists some
/// (comma-separated: wal, open, replay, compaction, pg, record_in), for quick
/// iterations; `record_in` runs only the host-transaction figures of `pg`.
fn section(name: &str) -> bool {
    std::env::var("SANARE_BENCH_ONLY")
        .map_or(true, |only| only.split(',').any(|s| s.trim() == name))
}

async fn run_figures(figures: &mut Figures) {
    // --- Segment WAL, durable group commit vs fsync per entry.
    if section("wal") {
        wal_figures(figures).await;
    }
    // --- Opening a long journal (10 million entries by default).
    if section("open") {
        open_figures(figures).await;
    }
    // --- Replay into a no-op handler (WAL).
    if section("replay") {
        replay_noop_figures(figures).await;
    }
    // --- Compaction of order-service payloads.
    if section("compaction") {
        compaction_figures(figures).await;
    }
    // --- PostgreSQL backend.
    if section("pg") || section("record_in") {
        pg_figures(figures).await;
    }
}

/// The segment WAL: durable group commit against fsync per entry, a textbook
/// group commit, okaywal and the disk's own flush rate; then 256 writers.
async fn wal_figures(figures: &mut Figures) {
    let dir = scratch();
    let wal = Journal::wal(dir.path()).build().await.expect("wal");
    let _ = concurrent_records(&wal, 50).await; // warm-up
    let cpu = sanare_benches::cpu_seconds(false);
    let started = Instant::now();
    let wal_rate = concurrent_records(&wal, 4000).await;
    let cpu_share = (sanare_benches::cpu_seconds(false) - cpu) / started.elapsed().as_secs_f64();
    drop(wal);
    // The same workload with one flush at a time (classic group commit).
    let dir1 = scratch();
    let wal1 = Journal::wal(dir1.path())
        .sync_pipeline_depth(1)
        .build()
        .await
        .expect("wal");
    let _ = concurrent_records(&wal1, 50).await;
    let depth1 = concurrent_records(&wal1, 4000).await;
    drop(wal1);
    let naive = naive_fsync_per_entry(3000);
    let (textbook, textbook_group) =
        tokio::task::spawn_blocking(|| textbook_group_commit(WRITERS, 2000))
            .await
            .expect("textbook group commit");
    let prealloc = fdatasync_preallocated(3000);
    let two = tokio::task::spawn_blocking(|| fdatasync_preallocated_threads(2, 1500))
        .await
        .expect("two flushers");
    println!(
        "wal: {wal_rate:.0} entries/s ({:.0} % of one core), one flush at a time: \
         {depth1:.0}/s, naive fsync per entry: {naive:.0}/s, fdatasync on a \
         preallocated file: {prealloc:.0}/s (ceiling {:.0}/s), two threads: {two:.0}/s, \
         textbook group commit (32 OS threads): {textbook:.0}/s in groups of {textbook_group:.1}",
        cpu_share * 100.0,
        WRITERS as f64 * prealloc
    );
    figures.set("wal_fdatasync_preallocated_per_s", prealloc);
    figures.set("wal_fdatasync_preallocated_2_threads_per_s", two);
    figures.set("wal_ceiling_32_writers_per_s", WRITERS as f64 * prealloc);
    figures.set("wal_appends_per_s", wal_rate);
    figures.set("wal_cpu_cores_used", cpu_share);
    figures.set("wal_one_flush_at_a_time_per_s", depth1);
    figures.set("wal_naive_fsync_per_s", naive);
    figures.set("wal_textbook_group_commit_per_s", textbook);
    figures.set("wal_textbook_group_commit_group_size", textbook_group);
    figures.set("wal_vs_naive_fsync_ratio", wal_rate / naive);
    figures.set("wal_vs_textbook_ratio", wal_rate / textbook);

    // Many requests in flight: 256 one-at-a-time writers. The group commits
    // are counted from the journal's events: entries per flush, flushes per
    // second, against the disk's own fdatasync rate measured just before.
    let dir = scratch();
    let bus = sanare_core::EventBus::new(1 << 16);
    let wal = Journal::wal(dir.path())
        .events(bus.clone())
        .build()
        .await
        .expect("wal");
    let _ = concurrent_records_by(&wal, 256, 10).await;
    let prealloc_256 = fdatasync_preallocated(2000);
    let mut sub = bus.subscribe();
    let started = Instant::now();
    let many = concurrent_records_by(&wal, 256, 800).await;
    let elapsed = started.elapsed().as_secs_f64();
    drop(wal);
    let (mut groups, mut grouped) = (0u64, 0u64);
    while let Some(r) = sub.try_recv() {
        if let sanare_core::Event::JournalRecorded { entries, .. } = r.event {
            groups += 1;
            grouped += entries;
        }
    }
    let group_size = grouped as f64 / groups.max(1) as f64;
    println!(
        "wal, 256 writers: {many:.0}/s in {groups} groups of {group_size:.1} \
         ({:.0} flushes/s); fdatasync alone just before: {prealloc_256:.0}/s \
         (ceiling 256 × that = {:.0}/s)",
        groups as f64 / elapsed,
        256.0 * prealloc_256
    );
    figures.set("wal_256_writers_group_size", group_size);
    figures.set("wal_256_writers_flushes_per_s", groups as f64 / elapsed);
    figures.set("wal_256_fdatasync_preallocated_per_s", prealloc_256);
    figures.set("wal_ceiling_256_writers_per_s", 256.0 * prealloc_256);
    // okaywal, same 32 writers, and ours again right after (alternated, so
    // a change in the disk's flush rate hits both).
    let okay = tokio::task::spawn_blocking(|| okaywal_records(WRITERS, 2000))
        .await
        .expect("okaywal");
    let dir = scratch();
    let wal = Journal::wal(dir.path()).build().await.expect("wal");
    let ours_again = concurrent_records(&wal, 2000).await;
    drop(wal);
    let okay2 = tokio::task::spawn_blocking(|| okaywal_records(WRITERS, 2000))
        .await
        .expect("okaywal");
    let ours = (wal_rate + ours_again) / 2.0;
    let okay = (okay + okay2) / 2.0;
    println!(
        "wal, 256 writers: {many:.0}/s; okaywal (32 OS threads): {okay:.0}/s, ours {ours:.0}/s"
    );
    figures.set("wal_appends_256_writers_per_s", many);
    figures.set("wal_okaywal_appends_per_s", okay);
    figures.set("wal_vs_okaywal_ratio", ours / okay);
}

/// Replay of 200,000 entries into a no-op handler (WAL).
async fn replay_noop_figures(figures: &mut Figures) {
    let dir = scratch();
    let wal = Journal::wal(dir.path())
        .handler("bench", NoopHandler)
        .build()
        .await
        .expect("wal");
    concurrent_records(&wal, 200_000 / WRITERS).await;
    let start = Instant::now();
    let cpu = sanare_benches::cpu_seconds(false);
    let s = wal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .expect("replay");
    let replay_noop = s.applied as f64 / start.elapsed().as_secs_f64();
    let per_cpu = s.applied as f64 / (sanare_benches::cpu_seconds(false) - cpu).max(1e-9);
    println!(
        "replay noop: {} entries, {replay_noop:.0}/s wall, {per_cpu:.0} per CPU-second",
        s.applied
    );
    figures.set("replay_noop_per_s", replay_noop);
    figures.set("replay_noop_per_cpu_s", per_cpu);
    drop(wal);
}

/// Compaction of 32,000 order-service payloads.
async fn compaction_figures(figures: &mut Figures) {
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
}

/// The PostgreSQL backend: `record()` against single INSERTs, `record_in`, and
/// replay into the order service's upsert handler.
async fn pg_figures(figures: &mut Figures) {
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
        .pg_handler("order.updated", OrderUpsert)
        .build()
        .await
        .expect("pg journal");
    let client = sanare_pg::get_conn(&pool).await.expect("connect");
    client
        .batch_execute(
            "CREATE TABLE orders (order_id bigint PRIMARY KEY, customer_id bigint NOT NULL, \
             status text NOT NULL, total_cents bigint NOT NULL, doc jsonb NOT NULL, \
             journal_position bigint NOT NULL)",
        )
        .await
        .expect("orders table");
    if !section("pg") {
        record_in_figures(figures, &pool, &journal).await;
        return;
    }
    let _ = concurrent_records(&journal, 20).await; // warm-up
    // Batched `record()` and the baseline alternate (ours, baseline, ours,
    // baseline), each about two seconds, so a change in the disk's flush rate or
    // an autovacuum of the journal table during the run hits both sides.
    let (mut pg_rate, mut single) = (0.0, 0.0);
    let mut rounds = Vec::new();
    for _ in 0..2 {
        let ours = concurrent_records(&journal, 2000).await;
        let base = single_inserts(&pool, 600).await;
        rounds.push(format!("record() {ours:.0}/s, single INSERT {base:.0}/s"));
        pg_rate += ours / 2.0;
        single += base / 2.0;
    }
    figures.note("pg_rounds", rounds.join("; "));
    println!("pg record(): {pg_rate:.0}/s, single INSERT per entry: {single:.0}/s");
    figures.set("pg_records_per_s", pg_rate);
    figures.set("pg_single_insert_per_s", single);
    figures.set("pg_vs_single_insert_ratio", pg_rate / single);
    record_in_figures(figures, &pool, &journal).await;
    pg_replay_figures(figures, &pool, &journal).await;
    drop(journal);
    drop(client);
    drop(pool);
    let _ = admin_client
        .batch_execute("DROP DATABASE IF EXISTS sanare_bench_journal WITH (FORCE)")
        .await;
}

/// Replay into the order service's upsert handler (exactly-once marks in the
/// same transaction): 3,000 events one round trip per entry, then 50,000 events
/// through the batch path.
async fn pg_replay_figures(figures: &mut Figures, pool: &sanare_pg::Pool, journal: &Journal) {
    let replay = async |journal: &Journal, first: usize, n: usize| {
        let from = journal.head().await.expect("head").0 + 1;
        record_orders(journal, first, n).await;
        let to = journal.head().await.expect("head");
        let start = Instant::now();
        let s = journal
            .replay(
                ReplayRequest::new(ReplayRange::Positions {
                    from: sanare_core::JournalPosition(from),
                    to: Some(to),
                })
                .operation_types(["order.updated"]),
                &Control::detached(),
            )
            .await
            .expect("replay");
        assert_eq!(s.applied as usize, n, "{s:?}");
        assert!(s.failures.is_empty(), "{s:?}");
        s.applied as f64 / start.elapsed().as_secs_f64()
    };
    let per_entry_journal = Journal::postgres(pool.clone(), SchemaName::default())
        .pg_handler("order.updated", OrderUpsertPerEntry)
        .build()
        .await
        .expect("pg journal");
    let replay_per_entry = replay(&per_entry_journal, 0, 3_200).await;
    drop(per_entry_journal);
    let replay_pg = replay(journal, 3_200, 51_200).await;
    println!(
        "replay pg (order upsert): batch path {replay_pg:.0}/s, one round trip per entry {replay_per_entry:.0}/s"
    );
    figures.set("replay_pg_per_s", replay_pg);
    figures.set("replay_pg_per_entry_handler_per_s", replay_per_entry);
}

/// A journal of `SANARE_BENCH_OPEN_ENTRIES` entries (10 million by default; 64-byte
/// payloads, each with an idempotency key), built once per run by 4,096 concurrent
/// writers (groups of thousands of entries per flush), then the time to open it
/// and to record the first entry after: one without a key (which does not wait
/// for the idempotency window) and one whose key repeats a recent entry (which
/// does).
async fn open_figures(figures: &mut Figures) {
    let n: usize = std::env::var("SANARE_BENCH_OPEN_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let dir = scratch();
    let build = || Journal::wal(dir.path()).max_batch(8192).build();
    let wal = build().await.expect("wal");
    let writers = 4096;
    let per = n.div_ceil(writers);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let j = wal.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let k = w * per + i;
                let mut p = format!("entry-{k:010}-").into_bytes();
                p.resize(64, b'x');
                j.record(NewEntry::from_bytes("bench", p).idempotency_key(format!("k-{k}")))
                    .await
                    .expect("record");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let wrote = start.elapsed();
    let total = writers * per;
    drop(wal);
    // Once untimed: summaries that sealing left to a background thread are
    // written by then.
    drop(build().await.expect("reopen"));
    // The last entry of writer 0: among the last `writers` entries recorded.
    let recent_key = format!("k-{}", per - 1);
    let (mut opens, mut first_append, mut first_keyed) = (Vec::new(), Vec::new(), Vec::new());
    let mut report = None;
    for round in 0..3 {
        let start = Instant::now();
        let wal = build().await.expect("reopen");
        opens.push(start.elapsed().as_secs_f64() * 1000.0);
        report = wal.open_report().cloned();
        let start = Instant::now();
        let r = wal
            .record(NewEntry::from_bytes("bench", b"after".to_vec()))
            .await
            .expect("record");
        first_append.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r.position.0 as usize, total + round + 1);
        let start = Instant::now();
        let again = wal
            .record(NewEntry::from_bytes("bench", b"again".to_vec()).idempotency_key(&recent_key))
            .await
            .expect("record");
        first_keyed.push(start.elapsed().as_secs_f64() * 1000.0);
        assert!(again.duplicate, "a recent key is remembered after open");
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (open_ms, append_ms, keyed_ms) = (
        median(&mut opens),
        median(&mut first_append),
        median(&mut first_keyed),
    );
    let report = report.expect("open report");
    println!(
        "open: {total} entries written in {:.1} s ({:.0}/s); {} segments, active segment \
         decoded from offset {:?}; open {open_ms:.1} ms (median of 3), first append \
         after open {append_ms:.1} ms, first append with a key (waits for the \
         idempotency window) {keyed_ms:.1} ms",
        wrote.as_secs_f64(),
        total as f64 / wrote.as_secs_f64(),
        report.segments,
        report.resumed_at,
    );
    figures.set("open_entries", total as f64);
    figures.set("open_build_s", wrote.as_secs_f64());
    figures.set("open_ms_10m_entries", open_ms);
    figures.set("open_first_append_ms", append_ms);
    figures.set("open_first_keyed_append_ms", keyed_ms);
}

/// The host's tables for [`record_in_figures`]: the order service of the
/// reference integration (`examples/src/orders.rs`), 10,000 customers and 1,000
/// products, plus a one-row table.
const HOST_TABLES: &str = "
    CREATE TABLE host_customers (id bigint PRIMARY KEY, name text NOT NULL);
    CREATE TABLE host_products (id bigint PRIMARY KEY, name text NOT NULL,
        price_cents bigint NOT NULL);
    CREATE TABLE host_orders (id bigint PRIMARY KEY,
        customer_id bigint NOT NULL REFERENCES host_customers,
        status text NOT NULL, total_cents bigint NOT NULL,
        placed_at timestamptz NOT NULL DEFAULT now());
    CREATE INDEX ON host_orders (customer_id);
    CREATE TABLE host_order_lines (order_id bigint NOT NULL REFERENCES host_orders,
        line_no int NOT NULL, product_id bigint NOT NULL REFERENCES host_products,
        quantity int NOT NULL, unit_price_cents bigint NOT NULL,
        amount_cents bigint NOT NULL, PRIMARY KEY (order_id, line_no));
    CREATE INDEX ON host_order_lines (product_id);
    INSERT INTO host_customers SELECT g, 'Customer ' || g FROM generate_series(1, 10000) g;
    INSERT INTO host_products SELECT g, 'Product ' || g, 199 + (g * 37) % 9800
        FROM generate_series(1, 1000) g;
    CREATE TABLE host_events (id bigint PRIMARY KEY, doc text NOT NULL);
    ANALYZE;";

/// Which host transaction [`record_in_figures`] runs.
#[derive(Clone, Copy, PartialEq)]
enum HostTx {
    /// The reference integration's order placement: the order, two lines priced
    /// from the products, the order's total (`examples/src/orders.rs`).
    PlaceOrder,
    /// [`HostTx::PlaceOrder`] with `record_in` sent together with the order's
    /// last statement (pipelined on the connection).
    PlaceOrderPipelined,
    /// One small row: the smallest write transaction there is.
    OneRow,
}

/// Runs `host` on 32 sessions, `per` transactions each, with one `record_in`
/// inside each when `record`; returns host transactions per second. Statements
/// are prepared once per connection (deadpool's statement cache), as a service's
/// would be.
async fn host_transactions(
    pool: &sanare_pg::Pool,
    journal: &Journal,
    next: &Arc<std::sync::atomic::AtomicI64>,
    host: HostTx,
    record: bool,
    per: usize,
) -> f64 {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (pool, journal, next) = (pool.clone(), journal.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = sanare_pg::get_conn(&pool).await.expect("connect");
            for _ in 0..per {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let tx = c.transaction().await.expect("begin");
                let payload = match host {
                    HostTx::PlaceOrderPipelined if record => {
                        place_order(&tx, n, Some(&journal)).await;
                        tx.commit().await.expect("commit");
                        continue;
                    }
                    HostTx::PlaceOrder | HostTx::PlaceOrderPipelined => {
                        place_order(&tx, n, None).await
                    }
                    HostTx::OneRow => {
                        let doc = order_json(n as usize);
                        let st = tx
                            .prepare_cached("INSERT INTO host_events (id, doc) VALUES ($1, $2)")
                            .await
                            .expect("prepare");
                        tx.execute(&st, &[&n, &doc]).await.expect("insert");
                        doc
                    }
                };
                if record {
                    journal
                        .record_in(
                            &tx,
                            NewEntry::new("order.placed", &payload).expect("payload"),
                        )
                        .await
                        .expect("record_in");
                }
                tx.commit().await.expect("commit");
            }
        }));
    }
    for t in tasks {
        t.await.expect("session");
    }
    (WRITERS * per) as f64 / start.elapsed().as_secs_f64()
}

/// Places order `n` as the reference integration does; returns the event's
/// payload. With `pipelined`, also records it with `record_in`, sent together
/// with the order's last statement.
async fn place_order(
    tx: &deadpool_postgres::Transaction<'_>,
    n: i64,
    pipelined: Option<&Journal>,
) -> String {
    let customer = 1 + n % 10_000;
    let lines = [(1 + n % 1000, 1 + (n % 3) as i32), (1 + (n * 7) % 1000, 2)];
    let order = tx
        .prepare_cached(
            "INSERT INTO host_orders (id, customer_id, status, total_cents) \
             VALUES ($1, $2, 'pending', 0)",
        )
        .await
        .expect("prepare");
    tx.execute(&order, &[&n, &customer]).await.expect("order");
    let line = tx
        .prepare_cached(
            "INSERT INTO host_order_lines (order_id, line_no, product_id, quantity, \
             unit_price_cents, amount_cents) SELECT $1, $2, p.id, $4::int, p.price_cents, \
             $4::int * p.price_cents FROM host_products p WHERE p.id = $3",
        )
        .await
        .expect("prepare");
    for (no, (product, qty)) in (1i32..).zip(lines) {
        tx.execute(&line, &[&n, &no, &product, &qty])
            .await
            .expect("line");
    }
    let total = tx
        .prepare_cached(
            "UPDATE host_orders SET total_cents = (SELECT coalesce(sum(amount_cents), 0) \
             FROM host_order_lines WHERE order_id = $1) WHERE id = $1",
        )
        .await
        .expect("prepare");
    let payload =
        serde_json::json!({ "order_id": n, "customer_id": customer, "lines": lines }).to_string();
    let update = async {
        tx.execute(&total, &[&n])
            .await
            .map_err(|e| sanare_core::Error::database("the order's total", e, false))
    };
    let updated = match pipelined {
        None => update.await,
        Some(journal) => futures_util::future::try_join(
            update,
            journal.record_in(
                tx,
                NewEntry::new("order.placed", &payload).expect("payload"),
            ),
        )
        .await
        .map(|(updated, _)| updated),
    };
    assert_eq!(updated.expect("the order's total"), 1);
    payload
}

/// A host's own write transactions per second on 32 sessions (durable server),
/// with one `record_in` inside each and without it, alternated five times: the
/// reference integration's order placement (`record_in_retained_pct`) and a
/// one-row transaction (`record_in_one_row_retained_pct`).
async fn record_in_figures(figures: &mut Figures, pool: &sanare_pg::Pool, journal: &Journal) {
    let client = sanare_pg::get_conn(pool).await.expect("connect");
    client
        .batch_execute(HOST_TABLES)
        .await
        .expect("host tables");
    drop(client);
    let next = Arc::new(std::sync::atomic::AtomicI64::new(1));
    // Before each timed run: the tables vacuumed (so autovacuum does not start
    // inside one side's run) and a checkpoint (so neither pays for the other's
    // dirty pages).
    let settle = async || {
        let client = sanare_pg::get_conn(pool).await.expect("connect");
        client.batch_execute("VACUUM").await.expect("vacuum");
        sanare_benches::checkpoint(&client, "journal").await;
    };
    for (host, per, name) in [
        (HostTx::PlaceOrder, 500, "record_in"),
        (HostTx::PlaceOrderPipelined, 500, "record_in_pipelined"),
        (HostTx::OneRow, 1000, "record_in_one_row"),
    ] {
        let _ = host_transactions(pool, journal, &next, host, true, per / 4).await; // warm-up
        let (mut with, mut without, mut ratios) = (0.0, 0.0, Vec::new());
        const PAIRS: usize = 5;
        for _ in 0..PAIRS {
            settle().await;
            let w = host_transactions(pool, journal, &next, host, true, per).await;
            settle().await;
            let wo = host_transactions(pool, journal, &next, host, false, per).await;
            with += w / PAIRS as f64;
            without += wo / PAIRS as f64;
            ratios.push(100.0 * w / wo);
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "{name}: host transactions {with:.0}/s with record_in, {without:.0}/s without; \
             retained per pair {ratios:.1?}"
        );
        figures.set(&format!("{name}_host_tx_per_s"), with);
        figures.set(&format!("{name}_baseline_host_tx_per_s"), without);
        // The median of the alternated pairs: a pair shares the machine's state,
        // and a disturbed pair does not move the median.
        figures.set(&format!("{name}_retained_pct"), ratios[PAIRS / 2]);
    }
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
