//! Snapshot benchmarks on the order-service schema filled with realistic rows
//! (`sanare_benches::shop`: natural-language text, timestamps, numerics, jsonb;
//! ≥ 100 MB of table data): capture and restore against `pg_dump -Fc` /
//! `pg_restore` in the same run, the parallel restore against `pg_restore --jobs 2`,
//! lz4 reduction, incremental growth after changing 1 % of rows (clustered, and
//! spread uniformly over every table), capture peak RSS. A small criterion group
//! measures block encoding alone.

#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, Throughput};
use sanare_benches::{Figures, checkpoint};
use sanare_core::{Control, RestoreMode, RestoreRequest, SnapshotRequest, SnapshotService};
use sanare_pg::SchemaName;
use sanare_snapshot::{Codec, FsStore, Snapshots};
use sanare_testing::fixtures::order_service;

fn bin(name: &str) -> String {
    std::env::var("SANARE_PG_BINDIR")
        .map(|d| format!("{d}/{name}"))
        .unwrap_or_else(|_| name.to_owned())
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn with_db(url: &str, db: &str) -> String {
    sanare_testing::with_dbname(url, db)
}

async fn run(figures: &mut Figures) {
    let admin_url =
        std::env::var("DATABASE_URL").expect("DATABASE_URL (run through cargo xtask bench)");
    let orders: u64 = std::env::var("SANARE_BENCH_SNAPSHOT_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    // SANARE_BENCH_SNAPSHOT_KEEP=1 keeps the fixture database after the run and
    // reuses it (it ends the run as generated: the last step restores the full
    // snapshot), for quick repeated runs while profiling.
    let keep = std::env::var_os("SANARE_BENCH_SNAPSHOT_KEEP").is_some();
    let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let reuse = keep
        && admin
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = 'sanare_bench_snapshot'",
                &[],
            )
            .await
            .unwrap()
            .is_some();
    let fixture_db: &[&str] = if reuse {
        &[]
    } else {
        &["sanare_bench_snapshot"]
    };
    for db in fixture_db.iter().chain(&[
        "sanare_bench_snapshot_restore",
        "sanare_bench_snapshot_restore_j2",
    ]) {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await
            .unwrap();
    }
    if !reuse {
        admin
            .batch_execute("CREATE DATABASE sanare_bench_snapshot")
            .await
            .unwrap();
    }
    let url = with_db(&admin_url, "sanare_bench_snapshot");
    let pool = sanare_pg::connect_pool(&url, 8).unwrap();
    let mut client = {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    };
    let t = Instant::now();
    if reuse {
        client
            .batch_execute("DROP SCHEMA IF EXISTS sanare CASCADE")
            .await
            .unwrap();
        client.batch_execute("VACUUM ANALYZE").await.unwrap();
    } else {
        order_service::install(&client, "shop").await.unwrap();
        sanare_benches::shop::generate(&client, "shop", orders, 42)
            .await
            .unwrap();
        client.batch_execute("VACUUM ANALYZE").await.unwrap();
    }
    let table_mb: i64 = client
        .query_one(
            "SELECT (sum(pg_table_size(c.oid)) / 1000000)::bigint FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'shop' AND c.relkind = 'r'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    println!(
        "generated {orders} orders ({table_mb} MB of table data) in {:?}",
        t.elapsed()
    );
    let schema = SchemaName::default_schema();
    sanare_snapshot::migrate(&mut client, &schema)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snaps = Snapshots::builder()
        .store(Arc::new(FsStore::new(dir.path().join("store")).unwrap()))
        .pool(pool.clone())
        .schema(schema)
        .build()
        .unwrap();
    let request = || SnapshotRequest::new().schemas(["shop"]);

    // Each timed step (ours and the baselines) starts from a checkpoint, so none
    // of them pays for writing out what the fixture or the step before it left
    // dirty ([`checkpoint`]).

    // pg_dump -Fc baseline.
    let dump = dir.path().join("shop.dump");
    checkpoint(&admin, "snapshot").await;
    let t = Instant::now();
    let st = Command::new(bin("pg_dump"))
        .args(["-Fc", "-n", "shop", "-f"])
        .arg(&dump)
        .arg(&url)
        .status()
        .unwrap();
    assert!(st.success(), "pg_dump failed");
    let pg_dump_s = t.elapsed().as_secs_f64();

    // Our capture.
    let rss_before = peak_rss_mb();
    checkpoint(&admin, "snapshot").await;
    let t = Instant::now();
    let full = snaps.create(request(), &Control::detached()).await.unwrap();
    let capture_s = t.elapsed().as_secs_f64();
    let rss_capture = peak_rss_mb();
    let raw_mb = full.size_bytes as f64 / 1e6;
    println!(
        "capture: {raw_mb:.1} MB raw COPY data in {capture_s:.2}s (pg_dump -Fc {pg_dump_s:.2}s), stored {:.1} MB",
        full.stored_bytes as f64 / 1e6
    );

    // Incremental after changing 1% of rows: the newest orders (clustered, as OLTP
    // updates usually are) and, separately, rows spread uniformly.
    let n = i64::try_from(orders).unwrap();
    client
        .execute(
            "UPDATE shop.orders SET note = 'changed' WHERE id > $1",
            &[&(n - n / 100)],
        )
        .await
        .unwrap();
    let inc = snaps.create(request(), &Control::detached()).await.unwrap();
    let spread = sanare_benches::shop::spread_update(&client, "shop", 1.0, 7)
        .await
        .unwrap();
    let inc_spread = snaps.create(request(), &Control::detached()).await.unwrap();
    println!(
        "incremental: {:.1} KB after the newest 1 % of orders changed, {:.1} KB after {spread} rows (1 % of every table) changed at random",
        inc.stored_bytes as f64 / 1e3,
        inc_spread.stored_bytes as f64 / 1e3
    );

    // Restore: ours into the live tables vs pg_restore into a fresh database.
    checkpoint(&admin, "snapshot").await;
    let t = Instant::now();
    snaps
        .restore(RestoreRequest::new(full.id), &Control::detached())
        .await
        .unwrap();
    let restore_s = t.elapsed().as_secs_f64();
    admin
        .batch_execute("CREATE DATABASE sanare_bench_snapshot_restore")
        .await
        .unwrap();
    checkpoint(&admin, "snapshot").await;
    let t = Instant::now();
    let st = Command::new(bin("pg_restore"))
        .args(["--no-owner", "-d"])
        .arg(with_db(&admin_url, "sanare_bench_snapshot_restore"))
        .arg(&dump)
        .status()
        .unwrap();
    assert!(st.success(), "pg_restore failed");
    let pg_restore_s = t.elapsed().as_secs_f64();
    println!("restore: {restore_s:.2}s (pg_restore {pg_restore_s:.2}s)");

    // Parallel: ours (shadow tables on 2 connections, then the swap) against
    // pg_restore --jobs 2 into a fresh database.
    checkpoint(&admin, "snapshot").await;
    let t = Instant::now();
    snaps
        .restore(
            RestoreRequest::new(full.id).mode(RestoreMode::Parallel { connections: 2 }),
            &Control::detached(),
        )
        .await
        .unwrap();
    let parallel_s = t.elapsed().as_secs_f64();
    admin
        .batch_execute("CREATE DATABASE sanare_bench_snapshot_restore_j2")
        .await
        .unwrap();
    checkpoint(&admin, "snapshot").await;
    let t = Instant::now();
    let st = Command::new(bin("pg_restore"))
        .args(["--no-owner", "--jobs", "2", "-d"])
        .arg(with_db(&admin_url, "sanare_bench_snapshot_restore_j2"))
        .arg(&dump)
        .status()
        .unwrap();
    assert!(st.success(), "pg_restore --jobs 2 failed");
    let pg_restore_j2_s = t.elapsed().as_secs_f64();
    println!("parallel restore: {parallel_s:.2}s (pg_restore --jobs 2 {pg_restore_j2_s:.2}s)");

    figures
        .set("table_data_mb", table_mb as f64)
        .set("raw_copy_mb", raw_mb)
        .set("capture_s", capture_s)
        .set("pg_dump_s", pg_dump_s)
        .set("capture_mb_per_s", raw_mb / capture_s)
        .set("capture_vs_pg_dump_ratio", pg_dump_s / capture_s)
        .set("restore_s", restore_s)
        .set("pg_restore_s", pg_restore_s)
        .set("restore_vs_pg_restore_ratio", pg_restore_s / restore_s)
        .set("parallel_restore_s", parallel_s)
        .set("pg_restore_j2_s", pg_restore_j2_s)
        .set(
            "parallel_restore_vs_pg_restore_j2_ratio",
            pg_restore_j2_s / parallel_s,
        )
        .set(
            "lz4_reduction_pct",
            100.0 * (1.0 - full.stored_bytes as f64 / full.size_bytes as f64),
        )
        .set(
            "incremental_added_pct",
            100.0 * inc.stored_bytes as f64 / full.stored_bytes as f64,
        )
        .set(
            "incremental_spread_added_pct",
            100.0 * inc_spread.stored_bytes as f64 / full.stored_bytes as f64,
        )
        .set("capture_peak_rss_mb", rss_capture)
        .set("rss_before_capture_mb", rss_before)
        .note(
            "workload",
            format!(
                "order-service schema, {orders} orders of realistic rows (sanare_benches::shop, seed 42), schema shop"
            ),
        );
    drop(pool);
    let fixture_db: &[&str] = if keep {
        &[]
    } else {
        &["sanare_bench_snapshot"]
    };
    for db in fixture_db.iter().chain(&[
        "sanare_bench_snapshot_restore",
        "sanare_bench_snapshot_restore_j2",
    ]) {
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await;
    }
}

fn main() {
    let mut figures = Figures::new();
    // Block encoding alone, against a plain copy of the same bytes as baseline.
    let data: Vec<u8> = (0..1_000_000u32)
        .flat_map(|i| format!("{i},customer{},{}\n", i % 977, i % 13).into_bytes())
        .take(1 << 20)
        .collect();
    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2))
        .configure_from_args();
    let mut g = c.benchmark_group("snapshot_block");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("memcpy_baseline", |b| {
        b.iter(|| std::hint::black_box(data.clone()))
    });
    g.bench_function("encode_lz4", |b| {
        b.iter(|| sanare_snapshot::format::encode_block(&data, Codec::Lz4).unwrap())
    });
    g.finish();
    let t = Instant::now();
    let n = 20;
    for _ in 0..n {
        std::hint::black_box(sanare_snapshot::format::encode_block(&data, Codec::Lz4).unwrap());
    }
    figures.set(
        "lz4_encode_mb_per_s",
        (n * data.len()) as f64 / 1e6 / t.elapsed().as_secs_f64(),
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(&mut figures));
    figures
        .note("machine", "2 cores, 24 GiB, shared with other builds")
        .write(&Figures::path_for("snapshot"))
        .unwrap();
    println!(
        "figures written to {}",
        Figures::path_for("snapshot").display()
    );
}
