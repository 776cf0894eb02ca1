//! Recovery benchmarks: crash detection at the next start, classification accuracy
//! over real crashed child processes, and recovery to ready on PostgreSQL.
//!
//! Figures: `detection_ms` (median `detect_previous_run` after a panic with a
//! backtrace; baseline `detection_baseline_read_ms`, reading the same two files),
//! `classification_accuracy_pct` (10 ways of dying × 5 children), and
//! `recovery_to_ready_s` (restore a ~100 MB table + replay 100,000 journal entries
//! one statement each + validate + readiness, through the core traits backed by
//! PostgreSQL; baseline `recovery_baseline_copy_s`, the bare table copy).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use criterion::Criterion;
use sanare_benches::Figures;
use sanare_core::{
    BoxStream, CheckId, Control, CrashKind, IntegrityService, JournalCut, JournalPosition,
    JournalService, ReplayRequest, ReplaySummary, RestoreOutcome, RestoreRequest, Result, RowImage,
    RowRef, SnapshotId, SnapshotInfo, SnapshotRequest, SnapshotService, ValidationScope,
    ValidationSummary, VerifyReport, Violation,
};
use sanare_recovery::{
    CrashDetector, HandlerOptions, PreviousOutcome, Readiness, ReadinessCheck, Recovery,
    RecoveryOption, RecoveryOptions, SanareAllocator,
};
use serde_json::json;

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

/// Snapshots backed by a PostgreSQL table copy.
struct PgSnapshots(Arc<tokio_postgres::Client>);

fn info() -> SnapshotInfo {
    serde_json::from_value(json!({
        "id": SnapshotId::new(), "created_at": "2026-11-23T09:00:00Z", "status": "ready",
        "label": null, "base": null, "journal_cut": {"position": 0, "db_snapshot": null},
        "tables": [], "size_bytes": 0, "stored_bytes": 0, "metadata": {}
    }))
    .expect("info")
}

#[async_trait]
impl SnapshotService for PgSnapshots {
    async fn create(&self, _: SnapshotRequest, _: &Control) -> Result<SnapshotInfo> {
        Ok(info())
    }
    async fn latest_good(&self, _: Option<time::OffsetDateTime>) -> Result<Option<SnapshotInfo>> {
        Ok(Some(info()))
    }
    async fn restore(&self, r: RestoreRequest, _: &Control) -> Result<RestoreOutcome> {
        self.0
            .batch_execute(
                "BEGIN; TRUNCATE orders; INSERT INTO orders SELECT * FROM snap_orders; COMMIT",
            )
            .await
            .map_err(|e| sanare_core::Error::database("restoring", e, false))?;
        Ok(serde_json::from_value(json!({
            "snapshot": r.snapshot, "tables": [],
            "journal_cut": {"position": 0, "db_snapshot": null}
        }))
        .expect("outcome"))
    }
    async fn fetch_rows(&self, _: SnapshotId, _: &[RowRef]) -> Result<Vec<RowImage>> {
        Ok(Vec::new())
    }
    async fn verify(&self, s: SnapshotId, _: &Control) -> Result<VerifyReport> {
        Ok(
            serde_json::from_value(json!({"snapshot": s, "blocks_checked": 0,
            "blocks_missing": 0, "blocks_corrupt": 0, "problems": []}))
            .expect("report"),
        )
    }
}

/// A journal table replayed one entry per statement, 1,000 per transaction,
/// the applied mark committed with the effect.
struct PgJournal(Arc<tokio_postgres::Client>);

#[async_trait]
impl JournalService for PgJournal {
    async fn head(&self) -> Result<JournalPosition> {
        Ok(JournalPosition(100_000))
    }
    async fn cut(&self, _: Option<&str>) -> Result<JournalCut> {
        Ok(JournalCut::default())
    }
    async fn replay(&self, _: ReplayRequest, control: &Control) -> Result<ReplaySummary> {
        let db = |e| sanare_core::Error::database("replaying", e, false);
        let c = &self.0;
        let apply = c
            .prepare(
                "WITH e AS (UPDATE journal SET applied = true WHERE pos = $1 AND NOT applied
                    RETURNING id, payload)
                 INSERT INTO orders SELECT id, payload FROM e
                 ON CONFLICT (id) DO UPDATE SET payload = excluded.payload",
            )
            .await
            .map_err(db)?;
        let mut s = ReplaySummary::default();
        for batch in 0..100i64 {
            control.checkpoint()?;
            c.batch_execute("BEGIN").await.map_err(db)?;
            let futs = (1..=1000i64).map(|i| {
                let pos = batch * 1000 + i;
                let apply = &apply;
                async move { c.execute(apply, &[&pos]).await }
            });
            let n: u64 = futures_util::future::try_join_all(futs)
                .await
                .map_err(db)?
                .into_iter()
                .sum();
            c.batch_execute("COMMIT").await.map_err(db)?;
            s.applied += n;
        }
        s.entries_seen = 100_000;
        Ok(s)
    }
}

struct PgIntegrity(Arc<tokio_postgres::Client>);

#[async_trait]
impl IntegrityService for PgIntegrity {
    async fn validate(&self, _: ValidationScope, _: &Control) -> Result<ValidationSummary> {
        let row = self
            .0
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE payload IS NULL) FROM orders",
                &[],
            )
            .await
            .map_err(|e| sanare_core::Error::database("validating", e, false))?;
        let (rows, bad): (i64, i64) = (row.get(0), row.get(1));
        Ok(serde_json::from_value(json!({
            "check": CheckId::new(), "started_at": "2026-11-23T09:00:00Z",
            "duration": {"secs": 0, "nanos": 0}, "tables_checked": 1, "rows_checked": rows,
            "violations_by_severity": if bad > 0 { json!({"high": bad}) } else { json!({}) }
        }))
        .expect("summary"))
    }
    fn violations(&self, _: CheckId) -> BoxStream<'_, Result<Violation>> {
        Box::pin(futures_util::stream::empty())
    }
    async fn recheck(&self, _: &Violation) -> Result<bool> {
        Ok(false)
    }
}

struct Ready(Arc<tokio_postgres::Client>);

#[async_trait]
impl ReadinessCheck for Ready {
    async fn check(&self) -> Result<Readiness> {
        let n: i64 = self
            .0
            .query_one("SELECT count(*) FROM orders", &[])
            .await
            .map_err(|e| sanare_core::Error::database("readiness", e, true))?
            .get(0);
        Ok(if n == 200_000 {
            Readiness::ready("orders complete")
        } else {
            Readiness::not_ready(format!("{n} orders"))
        })
    }
}

async fn recovery_figures(figures: &mut Figures) {
    let db = sanare_testing::test_db().await;
    let client = Arc::new(db.connect().await);
    client
        .batch_execute(
            "CREATE TABLE snap_orders AS SELECT g::bigint AS id, md5(g::text) || repeat('x', 960) AS payload
                 FROM generate_series(1, 100000) g;
             CREATE TABLE orders (id bigint PRIMARY KEY, payload text);
             CREATE TABLE journal (pos bigint PRIMARY KEY, id bigint, payload text,
                 applied boolean NOT NULL DEFAULT false);
             INSERT INTO journal SELECT g, 100000 + g, md5(g::text) FROM generate_series(1, 100000) g;",
        )
        .await
        .expect("workload");
    let size: i64 = client
        .query_one("SELECT pg_total_relation_size('snap_orders')", &[])
        .await
        .expect("size")
        .get(0);
    figures.note(
        "recovery_workload",
        format!(
            "snapshot table of 100,000 rows ({} MB), 100,000 journal entries",
            size / 1_000_000
        ),
    );
    // Baseline: the bare copy the restore does.
    let t = Instant::now();
    client
        .batch_execute("BEGIN; INSERT INTO orders SELECT * FROM snap_orders; ROLLBACK")
        .await
        .expect("baseline");
    figures.set("recovery_baseline_copy_s", t.elapsed().as_secs_f64());

    let recovery = Recovery::builder()
        .snapshots(Arc::new(PgSnapshots(client.clone())))
        .journal(Arc::new(PgJournal(client.clone())))
        .integrity(Arc::new(PgIntegrity(client.clone())))
        .readiness(Arc::new(Ready(client.clone())))
        .build();
    let plan = recovery.plan(
        None,
        RecoveryOptions::new(RecoveryOption::RestoreLatestSnapshot),
    );
    let t = Instant::now();
    let result = recovery
        .recover(&plan, &Control::detached())
        .await
        .expect("recovery");
    let secs = t.elapsed().as_secs_f64();
    assert!(result.success, "{result:#?}");
    assert_eq!(result.entries_replayed, 100_000);
    figures.set("recovery_to_ready_s", secs);
    eprintln!("recovery_to_ready_s = {secs:.2}");
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
