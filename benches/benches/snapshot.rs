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

/// The peak resident set size so far, in MiB (NaN where the kernel does not say).
fn peak_rss_mb() -> f64 {
    sanare_benches::peak_rss_mb().unwrap_or(f64::NAN)
}

fn with_db(url: &str, db: &str) -> String {
    sanare_testing::with_dbname(url, db)
}

/// The restore targets of the baselines, dropped before and after a run.
const BASELINE_DBS: [&str; 2] = [
    "sanare_bench_snapshot_restore",
    "sanare_bench_snapshot_restore_j2",
];

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
    let (url, mut client, table_mb) = fixture(&admin, &admin_url, orders, keep).await;
    let pool = sanare_pg::connect_pool(&url, 8).unwrap();
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

    restore_figures(&admin, &admin_url, &snaps, &full, &dump, figures).await;
    figures
        .set("table_data_mb", table_mb as f64)
        .set("raw_copy_mb", raw_mb)
        .set("capture_s", capture_s)
        .set("pg_dump_s", pg_dump_s)
        .set("capture_mb_per_s", raw_mb / capture_s)
        .set("capture_vs_pg_dump_ratio", pg_dump_s / capture_s)
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
    index_memory_figures(&client, &url, figures).await;
    drop(pool);
    drop_databases(&admin, !keep).await;
}

/// Drops the baselines' restore targets, and the fixture's database with
/// `fixture`.
async fn drop_databases(admin: &tokio_postgres::Client, fixture: bool) {
    let fixture_db: &[&str] = if fixture {
        &["sanare_bench_snapshot"]
    } else {
        &[]
    };
    for db in fixture_db.iter().chain(&BASELINE_DBS) {
        if let Err(e) = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await
        {
            eprintln!("snapshot bench: dropping {db}: {e}");
        }
    }
}

/// The fixture database `sanare_bench_snapshot` with `orders` orders of
/// realistic rows in schema `shop` (reused when `keep` and it exists); returns
/// its URL, a connection and its table data in MB.
async fn fixture(
    admin: &tokio_postgres::Client,
    admin_url: &str,
    orders: u64,
    keep: bool,
) -> (String, tokio_postgres::Client, i64) {
    let reuse = keep
        && admin
            .query_opt(
                "SELECT 1 FROM pg_database WHERE datname = 'sanare_bench_snapshot'",
                &[],
            )
            .await
            .unwrap()
            .is_some();
    drop_databases(admin, !reuse).await;
    if !reuse {
        admin
            .batch_execute("CREATE DATABASE sanare_bench_snapshot")
            .await
            .unwrap();
    }
    let url = with_db(admin_url, "sanare_bench_snapshot");
    let client = {
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
    } else {
        order_service::install(&client, "shop").await.unwrap();
        sanare_benches::shop::generate(&client, "shop", orders, 42)
            .await
            .unwrap();
    }
    client.batch_execute("VACUUM ANALYZE").await.unwrap();
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
    (url, client, table_mb)
}

/// Seconds `pg_restore` (with `jobs` jobs) takes to restore `dump` into a new
/// database `db`.
async fn timed_pg_restore(
    admin: &tokio_postgres::Client,
    admin_url: &str,
    db: &str,
    dump: &std::path::Path,
    jobs: u32,
) -> f64 {
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    checkpoint(admin, "snapshot").await;
    let t = Instant::now();
    let st = Command::new(bin("pg_restore"))
        .args(["--no-owner", "--jobs", &jobs.to_string(), "-d"])
        .arg(with_db(admin_url, db))
        .arg(dump)
        .status()
        .unwrap();
    assert!(st.success(), "pg_restore --jobs {jobs} failed");
    t.elapsed().as_secs_f64()
}

/// Restores: ours into the live tables against pg_restore into a fresh
/// database, then ours in parallel (shadow tables on 2 connections, then the
/// swap) against `pg_restore --jobs 2`.
async fn restore_figures(
    admin: &tokio_postgres::Client,
    admin_url: &str,
    snaps: &Snapshots,
    full: &sanare_core::SnapshotInfo,
    dump: &std::path::Path,
    figures: &mut Figures,
) {
    // Seconds, and the client's CPU seconds (this process's; pg_restore's own).
    let timed = async |request: RestoreRequest| {
        checkpoint(admin, "snapshot").await;
        let (t, cpu) = (Instant::now(), sanare_benches::cpu_seconds(false));
        snaps.restore(request, &Control::detached()).await.unwrap();
        (
            t.elapsed().as_secs_f64(),
            sanare_benches::cpu_seconds(false) - cpu,
        )
    };
    let baseline = async |db: &str, jobs: u32| {
        let cpu = sanare_benches::cpu_seconds(true);
        let s = timed_pg_restore(admin, admin_url, db, dump, jobs).await;
        (s, sanare_benches::cpu_seconds(true) - cpu)
    };
    let (restore_s, restore_cpu) = timed(RestoreRequest::new(full.id)).await;
    let (pg_restore_s, pg_restore_cpu) = baseline(BASELINE_DBS[0], 1).await;
    println!(
        "restore: {restore_s:.2}s, client CPU {restore_cpu:.2}s (pg_restore {pg_restore_s:.2}s, \
         client CPU {pg_restore_cpu:.2}s)"
    );
    let (parallel_s, parallel_cpu) =
        timed(RestoreRequest::new(full.id).mode(RestoreMode::Parallel { connections: 2 })).await;
    let (pg_restore_j2_s, pg_restore_j2_cpu) = baseline(BASELINE_DBS[1], 2).await;
    println!(
        "parallel restore: {parallel_s:.2}s, client CPU {parallel_cpu:.2}s (pg_restore --jobs 2 \
         {pg_restore_j2_s:.2}s, client CPU {pg_restore_j2_cpu:.2}s)"
    );
    figures
        .set("restore_client_cpu_s", restore_cpu)
        .set("pg_restore_client_cpu_s", pg_restore_cpu)
        .set("parallel_restore_client_cpu_s", parallel_cpu)
        .set("pg_restore_j2_client_cpu_s", pg_restore_j2_cpu)
        .set("restore_s", restore_s)
        .set("pg_restore_s", pg_restore_s)
        .set("restore_vs_pg_restore_ratio", pg_restore_s / restore_s)
        .set("parallel_restore_s", parallel_s)
        .set("pg_restore_j2_s", pg_restore_j2_s)
        .set(
            "parallel_restore_vs_pg_restore_j2_ratio",
            pg_restore_j2_s / parallel_s,
        );
}

/// Memory of capture planning against a 100 GB repository (synthetic: index
/// entries only), in a child process of its own.
async fn index_memory_figures(client: &tokio_postgres::Client, url: &str, figures: &mut Figures) {
    client
        .batch_execute(
            "DROP SCHEMA IF EXISTS index_bench CASCADE; CREATE SCHEMA index_bench;
             CREATE TABLE index_bench.t AS SELECT id, note, placed_at FROM shop.orders LIMIT 20000;
             ALTER TABLE index_bench.t ADD PRIMARY KEY (id);",
        )
        .await
        .unwrap();
    let t = Instant::now();
    let index = index_figures(url);
    println!(
        "index: {index} (child ran {:.1}s)",
        t.elapsed().as_secs_f64()
    );
    for name in [
        "index_peak_rss_mb_100gb",
        "index_build_and_capture_s",
        "index_entries",
        "index_repository_gb",
    ] {
        if let Some(v) = index[name].as_f64() {
            figures.set(name, v);
        }
    }
    client
        .batch_execute("DROP SCHEMA index_bench CASCADE; DROP SCHEMA sanare_index_bench CASCADE")
        .await
        .unwrap();
}

fn main() {
    if let Ok(url) = std::env::var("SANARE_BENCH_INDEX_CHILD") {
        index_child(&url);
        return;
    }
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

/// A repository of index entries only: `packs` packs of `per_pack` blocks of
/// `block_len` bytes each, whose tables of contents are made up when read (no block
/// bytes exist), plus whatever is put into it.
#[derive(Debug)]
struct SyntheticStore {
    packs: u32,
    per_pack: u32,
    block_len: u32,
    real: std::sync::Mutex<std::collections::BTreeMap<String, bytes::Bytes>>,
}

impl SyntheticStore {
    /// Room at the end of a pack for its table of contents (whatever its length).
    const TAIL_ROOM: u64 = 256 * 1024;

    fn key(p: u32) -> String {
        let h = blake3::hash(&p.to_le_bytes()).to_hex();
        format!("packs/{}/{h}", &h[..2])
    }

    fn size(&self) -> u64 {
        8 + u64::from(self.per_pack) * u64::from(self.block_len) + Self::TAIL_ROOM
    }

    fn tail(&self, p: u32) -> Vec<u8> {
        let entries: Vec<(sanare_snapshot::BlockId, u32, u32)> = (0..self.per_pack)
            .map(|i| {
                let mut seed = [0u8; 8];
                seed[..4].copy_from_slice(&p.to_le_bytes());
                seed[4..].copy_from_slice(&i.to_le_bytes());
                (
                    sanare_snapshot::BlockId::of(&seed),
                    8 + i * self.block_len,
                    self.block_len,
                )
            })
            .collect();
        sanare_snapshot::pack::synthetic_tail(&entries).unwrap()
    }

    fn pack_of(&self, key: &str) -> Option<u32> {
        let hex = key.rsplit('/').next()?;
        // Keys are the hash of the pack number: find it by recomputing (the
        // listing hands them out in order, so a map is cheap).
        static KEYS: std::sync::OnceLock<std::collections::HashMap<String, u32>> =
            std::sync::OnceLock::new();
        let keys = KEYS.get_or_init(|| {
            (0..self.packs)
                .map(|p| {
                    (
                        Self::key(p)
                            .rsplit('/')
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                        p,
                    )
                })
                .collect()
        });
        keys.get(hex).copied()
    }
}

#[async_trait::async_trait]
impl sanare_snapshot::BlockStore for SyntheticStore {
    async fn put(&self, key: &str, data: bytes::Bytes) -> sanare_core::Result<()> {
        self.real.lock().unwrap().insert(key.to_owned(), data);
        Ok(())
    }

    async fn get(&self, key: &str) -> sanare_core::Result<Option<bytes::Bytes>> {
        Ok(self.real.lock().unwrap().get(key).cloned())
    }

    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> sanare_core::Result<Option<bytes::Bytes>> {
        let Some(p) = self.pack_of(key) else {
            let all = self.real.lock().unwrap().get(key).cloned();
            return Ok(all.map(|a| a.slice(range.start as usize..range.end as usize)));
        };
        let tail = self.tail(p);
        let size = self.size();
        let tail_start = size - tail.len() as u64;
        let out: Vec<u8> = range
            .map(|at| {
                if at >= tail_start {
                    tail[(at - tail_start) as usize]
                } else {
                    0
                }
            })
            .collect();
        Ok(Some(out.into()))
    }

    async fn contains(&self, key: &str) -> sanare_core::Result<bool> {
        Ok(self.pack_of(key).is_some() || self.real.lock().unwrap().contains_key(key))
    }

    async fn delete(&self, key: &str) -> sanare_core::Result<()> {
        self.real.lock().unwrap().remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> sanare_core::Result<Vec<sanare_snapshot::ObjectMeta>> {
        let mut out: Vec<sanare_snapshot::ObjectMeta> =
            if "packs/".starts_with(prefix) || prefix.starts_with("packs/") {
                (0..self.packs)
                    .map(|p| {
                        sanare_snapshot::ObjectMeta::new(
                            Self::key(p),
                            self.size(),
                            time::OffsetDateTime::UNIX_EPOCH,
                        )
                    })
                    .filter(|m| m.key.starts_with(prefix))
                    .collect()
            } else {
                Vec::new()
            };
        out.extend(
            self.real
                .lock()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| {
                    sanare_snapshot::ObjectMeta::new(
                        k.clone(),
                        v.len() as u64,
                        time::OffsetDateTime::now_utc(),
                    )
                }),
        );
        Ok(out)
    }
}

/// In a child process (so that its peak RSS is its own): a capture of a small
/// table against a synthetic repository of `gb` GB of blocks, 6 KiB each (the
/// fixture's average stored block) in 8 MiB packs: the index of every block is
/// built from the packs' tables of contents and each new block is looked up in
/// it. Prints the figures as JSON.
fn index_child(url: &str) {
    let gb: f64 = std::env::var("SANARE_BENCH_INDEX_GB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100.0);
    let block_len = 6 * 1024u32;
    let per_pack = (8 * 1024 * 1024) / block_len;
    let packs = (gb * 1e9 / f64::from(per_pack * block_len)).ceil() as u32;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (build_s, entries) = rt.block_on(async {
        let pool = sanare_pg::connect_pool(url, 4).unwrap();
        let schema = SchemaName::new("sanare_index_bench").unwrap();
        sanare_snapshot::migrate(&mut sanare_pg::get_conn(&pool).await.unwrap(), &schema)
            .await
            .unwrap();
        let store = Arc::new(SyntheticStore {
            packs,
            per_pack,
            block_len,
            real: Default::default(),
        });
        let snaps = Snapshots::builder()
            .store(store)
            .pool(pool)
            .schema(schema)
            .build()
            .unwrap();
        let t = Instant::now();
        let info = snaps
            .create(
                SnapshotRequest::new().schemas(["index_bench"]),
                &Control::detached(),
            )
            .await
            .unwrap();
        assert!(info.stored_bytes > 0);
        (
            t.elapsed().as_secs_f64(),
            u64::from(packs) * u64::from(per_pack),
        )
    });
    println!(
        "{}",
        serde_json::json!({
            "index_peak_rss_mb_100gb": peak_rss_mb(),
            "index_build_and_capture_s": build_s,
            "index_entries": entries,
            "index_repository_gb": gb,
        })
    );
}

/// Runs [`index_child`] in a child process on database `url`; returns its figures.
fn index_figures(url: &str) -> serde_json::Value {
    let out = Command::new(std::env::current_exe().unwrap())
        .env("SANARE_BENCH_INDEX_CHILD", url)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the index child failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("index child said {text:?}: {e}"))
}
