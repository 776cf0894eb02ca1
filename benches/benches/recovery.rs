//! Recovery benchmarks: crash detection at the next start, classification accuracy
//! over real crashed child processes, and recovery to ready on PostgreSQL.
//!
//! Figures: `detection_ms` (median `detect_previous_run` after a panic with a
//! backtrace; baseline `detection_baseline_read_ms`, reading the same two files),
//! `classification_accuracy_pct` (10 ways of dying × 5 children), and
//! `recovery_to_ready_s` (the real components through the facade: a power failure
//! after a ≥ 100 MB snapshot of the order-service fixture and 100,000 journaled,
//! unapplied orders; the next start recovers by evidence — replays the journal,
//! validates, scans rows and, since the host went down, pages and indexes with
//! amcheck, repairs what it finds (nothing), restores nothing, checks readiness;
//! baseline `recovery_baseline_copy_s`, the bare copy of the same tables;
//! `recovery_checks_cut_by_time_target` counts the checks `recovery.time_target`
//! stopped, and `recovery_full_checks_s` times the same validation and scan run to
//! the end on the recovered database).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::Criterion;
use sanare::journal::NewEntry;
use sanare::{Sanare, SanareConfig};
use sanare_benches::Figures;
use sanare_core::{Control, CrashKind, SnapshotRequest, SnapshotService};
use sanare_examples::orders::{self, PlaceOrder};
use sanare_recovery::{
    CrashDetector, HandlerOptions, PreviousOutcome, RecoveryOption, RecoveryOptions,
    SanareAllocator,
};
use sanare_testing::fixtures::order_service;

#[global_allocator]
static GLOBAL: SanareAllocator = SanareAllocator::system();

const MODES: [&str; 10] = [
    "clean",
    "panic_main",
    "panic_thread",
    "task_panic",
    "abort",
    "segv",
    "stack_overflow",
    "alloc",
    "sigkill",
    "power",
];

fn detector(dir: &Path, boot: &Path) -> CrashDetector {
    CrashDetector::builder()
        .data_dir(dir)
        .boot_id_path(boot)
        .build()
        .expect("detector")
}

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let buf = [depth as u8; 1024];
    std::hint::black_box(&buf);
    if depth == u64::MAX {
        return 0;
    }
    recurse(depth + 1) + u64::from(std::hint::black_box(buf[3]))
}

fn child(mode: &str) {
    let dir = PathBuf::from(std::env::var_os("SANARE_CRASH_DIR").expect("dir"));
    let boot = PathBuf::from(std::env::var_os("SANARE_CRASH_BOOT").expect("boot"));
    let d = detector(&dir, &boot);
    d.mark_running().expect("mark running");
    d.install_handlers(HandlerOptions::default())
        .expect("install");
    match mode {
        "clean" => {
            d.mark_clean_shutdown().expect("clean");
        }
        "panic_main" => panic!("bench child panics"),
        "panic_thread" => {
            let _ = std::thread::spawn(|| panic!("worker panics")).join();
            std::process::exit(3);
        }
        "task_panic" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("rt");
            let _ = rt.block_on(sanare_recovery::spawn_supervised("billing", async {
                panic!("task panics")
            }));
            std::process::exit(4);
        }
        "abort" => std::process::abort(),
        // SAFETY: deliberately faulting on an inaccessible page.
        "segv" => unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            std::ptr::write_volatile(p.cast::<u8>(), 1);
        },
        "stack_overflow" => {
            let _ = std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(|| recurse(0))
                .expect("spawn")
                .join();
        }
        "alloc" => {
            let lim = libc::rlimit {
                rlim_cur: 4 << 30,
                rlim_max: libc::RLIM_INFINITY,
            };
            // SAFETY: lowering our own limit.
            unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) };
            let v = vec![0u8; 8 << 30];
            std::hint::black_box(&v);
        }
        // SAFETY: killing ourselves.
        _ => unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        },
    }
}

fn spawn(mode: &str, tmp: &Path) -> (PathBuf, PathBuf) {
    let data = tmp.join(format!("data-{mode}"));
    let _ = std::fs::remove_dir_all(&data);
    let boot = tmp.join(format!("boot-{mode}"));
    std::fs::write(&boot, "boot-a").expect("boot file");
    Command::new(std::env::current_exe().expect("exe"))
        .env("SANARE_CRASH_MODE", mode)
        .env("SANARE_CRASH_DIR", &data)
        .env("SANARE_CRASH_BOOT", &boot)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("child");
    if mode == "power" {
        std::fs::write(&boot, "boot-b").expect("boot file");
    }
    (data, boot)
}

fn expected(mode: &str) -> Option<CrashKind> {
    match mode {
        "clean" => None,
        "stack_overflow" => Some(CrashKind::StackOverflow),
        "alloc" => Some(CrashKind::OutOfMemory),
        "power" => Some(CrashKind::PowerFailure),
        _ => Some(CrashKind::ApplicationCrash),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Recovery to ready with the real components, through the facade: the order-service
/// fixture (≥ 100 MB of table data) snapshotted, 100,000 `order.placed` entries
/// journaled after it, then a power failure (the service dies, the boot id
/// changes). The next `build()` detects it and recovers by evidence — replay the
/// journal, validate, scan (with amcheck), repair what was found, readiness —
/// before returning; the snapshot is not restored over the committed data.
async fn recovery_figures(figures: &mut Figures) {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    // Overridable for a quick smoke run; the figure is taken at the defaults.
    let orders_n = env("SANARE_BENCH_RECOVERY_ORDERS", 400_000);
    let entries = i64::try_from(env("SANARE_BENCH_RECOVERY_ENTRIES", 100_000)).expect("entries");
    let db = sanare_testing::test_db().await;
    let client = db.client().await;
    let counts = fixture(&client, orders_n, entries, figures).await;

    let tmp = tempfile::tempdir().expect("tempdir");
    let boot = tmp.path().join("boot_id");
    std::fs::write(&boot, "aaaaaaaa-0000-0000-0000-000000000001\n").expect("boot id");
    let start = || {
        let mut config = SanareConfig::default();
        config.snapshots.schemas = vec!["shop".into()];
        Sanare::builder()
            .config(config)
            .pool(db.pool().clone())
            .data_dir(tmp.path().join("data"))
            .boot_id_path(&boot)
            .background(false)
            .journal(orders::register)
            .build()
    };
    let first = start().await.expect("first start");
    let snapshot = first
        .snapshots()
        .create(SnapshotRequest::new(), &Control::detached())
        .await
        .expect("snapshot");
    figures.set(
        "recovery_snapshot_stored_mb",
        snapshot.stored_bytes as f64 / 1e6,
    );
    // 100,000 orders journaled by 32 concurrent writers; the service died before
    // applying any of them.
    let base = i64::try_from(counts.orders).expect("orders");
    let journal = first.journal().clone();
    journal_orders(&journal, &counts, entries).await;
    drop(journal);
    drop(first); // power failure: no shutdown …
    std::fs::write(&boot, "bbbbbbbb-0000-0000-0000-000000000002\n").expect("boot id"); // … and a new boot

    let t = Instant::now();
    let second = start().await.expect("second start");
    let secs = t.elapsed().as_secs_f64();
    startup_figures(&second, &client, base, entries, secs, figures).await;
    full_checks_figures(&second, figures).await;
    second.shutdown().await.expect("shutdown");
}

fn main() {
    if let Ok(mode) = std::env::var("SANARE_CRASH_MODE") {
        child(&mode);
        return;
    }
    let mut figures = Figures::new();
    let tmp = tempfile::tempdir().expect("tempdir");

    // Classification accuracy over real crashed children.
    let (mut right, mut total) = (0u32, 0u32);
    for mode in MODES {
        for _ in 0..5 {
            let (data, boot) = spawn(mode, tmp.path());
            let run = detector(&data, &boot)
                .detect_previous_run()
                .expect("detect");
            total += 1;
            let ok = run.crash.as_ref().map(|c| c.kind) == expected(mode)
                && (mode != "clean" || run.outcome == PreviousOutcome::Clean);
            if ok {
                right += 1;
            } else {
                eprintln!("misclassified {mode}: {:?}", run.crash.map(|c| c.kind));
            }
        }
    }
    let pct = f64::from(right) * 100.0 / f64::from(total);
    figures.set("classification_accuracy_pct", pct);
    figures.set("classification_children", f64::from(total));
    eprintln!("classification_accuracy_pct = {pct} ({right}/{total})");

    // Detection at the next start, after a panic with a backtrace.
    let (data, boot) = spawn("panic_main", tmp.path());
    let d = detector(&data, &boot);
    let detect: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            let run = d.detect_previous_run().expect("detect");
            assert!(run.crashed());
            t.elapsed()
        })
        .collect();
    let files = [d.marker_path().to_owned(), d.spool_path().to_owned()];
    let read: Vec<Duration> = (0..200)
        .map(|_| {
            let t = Instant::now();
            for f in &files {
                std::hint::black_box(std::fs::read(f).expect("read"));
            }
            t.elapsed()
        })
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    figures.set("detection_ms", ms(median(detect)));
    figures.set("detection_baseline_read_ms", ms(median(read)));

    let mut c = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    c.bench_function("recovery/detect_previous_run", |b| {
        b.iter(|| d.detect_previous_run().expect("detect"))
    });
    c.bench_function("recovery/baseline_read_files", |b| {
        b.iter(|| {
            for f in &files {
                std::hint::black_box(std::fs::read(f).expect("read"));
            }
        })
    });

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(recovery_figures(&mut figures));

    figures.note(
        "machine",
        "2 cores, 24 GiB, shared with other engineers' builds",
    );
    let path = Figures::path_for("recovery");
    figures.write(&path).expect("write figures");
    eprintln!("figures written to {}", path.display());
}

/// The order-service fixture with `orders_n` orders in schema `shop`, and the
/// baseline: the bare copy of every table a restore writes.
async fn fixture(
    client: &sanare::deadpool_postgres::Object,
    orders_n: u64,
    entries: i64,
    figures: &mut Figures,
) -> order_service::Counts {
    order_service::install(&***client, "shop")
        .await
        .expect("fixture");
    let counts = order_service::generate(&***client, "shop", orders_n)
        .await
        .expect("fixture data");
    let size: i64 = client
        .query_one(
            "SELECT sum(pg_table_size(c.oid))::bigint FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'shop' AND c.relkind = 'r'",
            &[],
        )
        .await
        .expect("size")
        .get(0);
    figures.note(
        "recovery_workload",
        format!(
            "order-service fixture, {orders_n} orders ({} MB of table data), snapshot, then {entries} journaled orders; power failure; WAL journal and filesystem blocks in one data dir",
            size / 1_000_000
        ),
    );
    figures.set("recovery_table_mb", size as f64 / 1e6);

    let t = Instant::now();
    client
        .batch_execute(
            "BEGIN;
             CREATE TABLE public.b1 AS SELECT * FROM shop.customers;
             CREATE TABLE public.b2 AS SELECT * FROM shop.products;
             CREATE TABLE public.b3 AS SELECT * FROM shop.orders;
             CREATE TABLE public.b4 AS SELECT * FROM shop.order_lines;
             CREATE TABLE public.b5 AS SELECT * FROM shop.payments;
             ROLLBACK",
        )
        .await
        .expect("baseline");
    figures.set("recovery_baseline_copy_s", t.elapsed().as_secs_f64());
    counts
}

/// `entries` new orders (after the fixture's `counts`) recorded in `journal` by
/// 32 concurrent writers, none applied.
async fn journal_orders(
    journal: &sanare::journal::Journal,
    counts: &order_service::Counts,
    entries: i64,
) {
    let base = i64::try_from(counts.orders).expect("orders");
    let (customers, products) = (
        i64::try_from(counts.customers).expect("customers"),
        i64::try_from(counts.products).expect("products"),
    );
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..32 {
        let journal = journal.clone();
        writers.spawn(async move {
            let mut n = 1 + w;
            while n <= entries {
                let order = PlaceOrder::nth(base, n, customers, products);
                journal
                    .record(
                        NewEntry::new(orders::PLACE_ORDER, &order)
                            .expect("entry")
                            .idempotency_key(format!("order-{}", order.order_id)),
                    )
                    .await
                    .expect("record");
                n += 32;
            }
        });
    }
    while let Some(r) = writers.join_next().await {
        r.expect("writer");
    }
}

/// The start after the power failure (`secs` to ready): the crash classified,
/// nothing restored over committed data, every journaled order placed; its
/// steps' times are the figures.
async fn startup_figures(
    second: &Sanare,
    client: &sanare::deadpool_postgres::Object,
    base: i64,
    entries: i64,
    secs: f64,
    figures: &mut Figures,
) {
    let crash = second
        .startup_report()
        .crash()
        .expect("the power failure is detected");
    assert_eq!(crash.kind, CrashKind::PowerFailure);
    let result = second
        .startup_report()
        .recovery
        .clone()
        .expect("a recovery at start-up");
    assert!(result.success, "{result:#?}");
    assert!(
        result.snapshots_used.is_empty() && result.tables_restored.is_empty(),
        "nothing restored over committed data: {result:#?}"
    );
    assert_eq!(
        result.entries_replayed,
        u64::try_from(entries).expect("entries"),
        "{result:#?}"
    );
    let placed: i64 = client
        .query_one("SELECT count(*) FROM shop.orders WHERE id > $1", &[&base])
        .await
        .expect("count")
        .get(0);
    assert_eq!(placed, entries);
    for step in &result.steps {
        let name = step.step.name().replace(' ', "_");
        figures.set(
            &format!("recovery_step_{name}_s"),
            step.duration.as_secs_f64(),
        );
        eprintln!(
            "  {name}: {:.2} s — {}",
            step.duration.as_secs_f64(),
            step.detail
        );
    }
    figures.set("recovery_to_ready_s", secs);
    let cut_short = result
        .warnings
        .iter()
        .filter(|w| w.contains("recovery time target"))
        .count();
    figures.set("recovery_checks_cut_by_time_target", cut_short as f64);
    eprintln!("recovery_to_ready_s = {secs:.2} ({cut_short} checks stopped at the time target)");
}

/// What the checks of the evidence plan cost when nothing stops them: the same
/// validation and scan (rows, and pages and indexes with amcheck), no time target.
async fn full_checks_figures(second: &Sanare, figures: &mut Figures) {
    let plan = second.recovery().plan(
        None,
        RecoveryOptions::new(RecoveryOption::RepairOnly)
            .physical_checks(true)
            .execute_repairs(false),
    );
    let t = Instant::now();
    let checks = second
        .recovery()
        .recover(&plan, &Control::detached())
        .await
        .expect("checks");
    figures.set("recovery_full_checks_s", t.elapsed().as_secs_f64());
    for step in &checks.steps {
        eprintln!(
            "  full checks, {}: {:.2} s — {}",
            step.step,
            step.duration.as_secs_f64(),
            step.detail
        );
    }
    eprintln!("recovery_full_checks_s = {:.2}", t.elapsed().as_secs_f64());
}
