//! No committed row is lost, whatever way the service dies.
//!
//! For each crash kind (panic, SIGKILL, power failure with and without the database
//! killed, out of memory, unknown) a real service process writes through the
//! journal (an operation whose effect is not idempotent) and straight to a table,
//! while a second client that is not the service writes too; then it dies. After
//! the automatic recovery of the next start, every row the database had committed
//! is present and unchanged, and every journaled entry is applied exactly once.
//! A seeded randomized variant kills the service at random points; it runs
//! `SANARE_CRASH_ITERATIONS` iterations (3 by default) and prints its seed
//! (`SANARE_CRASH_SEED` replays one).
//!
//! The test binary re-executes itself as the service (`service_child_entry`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sanare::core::{
    Control, CrashKind, JournalPosition, JournalService, ReplayRange, ReplayRequest,
    SnapshotRequest, SnapshotService,
};
use sanare::recovery::{RecoveryOption, SanareAllocator};
use sanare_testing::cluster::{Cluster, ClusterOptions};
use support::{connect, dump, entry, start};

#[global_allocator]
static GLOBAL: SanareAllocator = SanareAllocator::system();

const MODE: &str = "SANARE_NRL_MODE";
const KILL_AT: &str = "SANARE_NRL_KILL_AT";
const DIR: &str = "SANARE_NRL_DIR";
const BOOT: &str = "SANARE_NRL_BOOT";
const URL: &str = "SANARE_NRL_URL";

/// How the service dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Death {
    /// A panic on the main thread at step `KILL_AT`.
    Panic,
    /// kill -9 of itself at step `KILL_AT`.
    Kill,
    /// An allocation that cannot be served at step `KILL_AT`.
    OutOfMemory,
    /// Runs until the test kills it (SIGKILL) at a moment of its choosing.
    External,
}

impl Death {
    fn env(self) -> &'static str {
        match self {
            Death::Panic => "panic",
            Death::Kill => "kill",
            Death::OutOfMemory => "oom",
            Death::External => "external",
        }
    }
}

/// In the child: dies as `SANARE_NRL_MODE` says at step `SANARE_NRL_KILL_AT`.
fn die(mode: &str, step: u64) {
    match mode {
        "panic" => panic!("the service panics at step {step}"),
        "kill" => {
            // SAFETY: killing ourselves.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            std::thread::sleep(Duration::from_secs(30));
        }
        "oom" => {
            // SAFETY: lowering this process's own address-space limit.
            unsafe {
                let lim = libc::rlimit {
                    rlim_cur: 4 << 30,
                    rlim_max: libc::RLIM_INFINITY,
                };
                assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &lim), 0);
            }
            let v: Vec<u8> = vec![0u8; 8 << 30];
            std::hint::black_box(&v);
        }
        _ => {}
    }
    unreachable!("the service died at step {step}");
}

/// In a child: the service, writing through the journal and straight to a
/// table, dying as told. Ignored in a normal run (it is not a test of its own).
#[test]
#[ignore = "the child process of this file's tests: they run it, it is not a test of its own"]
fn service_child_entry() {
    let mode = std::env::var(MODE)
        .expect("a child entry: run by this file's tests (with --ignored), not on its own");
    let kill_at: u64 = std::env::var(KILL_AT).unwrap().parse().unwrap();
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let boot = PathBuf::from(std::env::var(BOOT).unwrap());
    let url = std::env::var(URL).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let sanare = start(&url, &dir, &boot, support::config(), true)
            .await
            .expect("the service starts");
        // A snapshot older than everything below: restoring it would lose rows.
        sanare
            .snapshots()
            .create(SnapshotRequest::new(), &Control::detached())
            .await
            .unwrap();
        let client = support::connect(&url).await;
        let mut step = 0u64;
        let mut tick = || {
            step += 1;
            if step == kill_at {
                die(&mode, step);
            }
        };
        for i in 1i64..=100_000 {
            let recorded = sanare
                .journal()
                .record(entry(&format!("k{i}"), i))
                .await
                .unwrap();
            tick();
            // Every third entry is left for the next start's replay.
            if i % 3 != 0 {
                let at = JournalPosition(recorded.position.0);
                sanare
                    .journal()
                    .replay(
                        ReplayRequest::new(ReplayRange::Positions {
                            from: at,
                            to: Some(at),
                        }),
                        &Control::detached(),
                    )
                    .await
                    .unwrap();
            }
            tick();
            client
                .execute(
                    "INSERT INTO app.direct (id, v) VALUES ($1::bigint, 'v' || ($1::bigint)::text)",
                    &[&i],
                )
                .await
                .unwrap();
            tick();
            client
                .execute(
                    "UPDATE app.direct SET v = v || '+' WHERE id = $1",
                    &[&(i - 1)],
                )
                .await
                .unwrap();
            tick();
        }
    });
}

/// A database for one run: a fresh one on the shared server, or a server of its
/// own that the run can kill (a power loss of the database host too).
enum Db {
    Shared(sanare_testing::TestDb),
    Own(Box<Cluster>),
}

impl Db {
    async fn new(own: bool) -> Self {
        let db = if own {
            Db::Own(Box::new(
                Cluster::start_with(ClusterOptions::default().durable(true)).unwrap(),
            ))
        } else {
            Db::Shared(sanare_testing::test_db().await)
        };
        connect(&db.url())
            .await
            .batch_execute(support::APP_SQL)
            .await
            .unwrap();
        db
    }

    fn url(&self) -> String {
        match self {
            Db::Shared(db) => db.url().to_owned(),
            Db::Own(c) => c.url("postgres"),
        }
    }
}

/// One crash and the recovery after it.
struct Case {
    death: Death,
    kill_at: u64,
    /// For `Death::External`: kill once the ledger has this many rows.
    kill_after_rows: i64,
    /// The machine "reboots" (a new boot id).
    reboot: bool,
    /// The database server dies too (a server of its own).
    database_dies: bool,
    /// The boot id cannot be read at the next start.
    boot_unreadable: bool,
    expected: CrashKind,
    /// Entries the recovery must replay, when known.
    replayed: Option<u64>,
}

impl Case {
    fn new(death: Death, expected: CrashKind) -> Self {
        Self {
            death,
            // Right after recording k13, before applying it (never, for a death
            // the test brings from outside).
            kill_at: if death == Death::External { 0 } else { 49 },
            kill_after_rows: 10,
            reboot: false,
            database_dies: false,
            boot_unreadable: false,
            expected,
            // k3, k6, k9 and k12 are left for the replay; k13 was not applied yet.
            replayed: (death != Death::External).then_some(5),
        }
    }
}

fn spawn(case: &Case, url: &str, dir: &Path, boot: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "service_child_entry",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MODE, case.death.env())
        .env(KILL_AT, case.kill_at.to_string())
        .env(DIR, dir)
        .env(BOOT, boot)
        .env(URL, url)
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::null())
        // `SANARE_NRL_CHILD_STDERR=1` shows what the service says while it dies.
        .stderr(if std::env::var_os("SANARE_NRL_CHILD_STDERR").is_some() {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .spawn()
        .unwrap()
}

async fn count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// The second client: writes its own rows and changes the service's, until told
/// to stop. Returns how many rows it inserted.
fn second_client(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let client = connect(&url).await;
        let mut n = 0i64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            client
                .execute(
                    "INSERT INTO app.outside (id, v) VALUES ($1::bigint, 'o' || ($1::bigint)::text)",
                    &[&n],
                )
                .await
                .unwrap();
            client
                .execute(
                    "UPDATE app.direct SET v = v || '#' WHERE id % 7 = $1::bigint % 7",
                    &[&n],
                )
                .await
                .unwrap();
            // Pacing, so the two cores are left to the service.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    })
}

/// Runs `case`: the service writes and dies, the next start recovers, and every
/// committed row is still there, unchanged, and every journaled entry is applied
/// once. `label` names the run in failures.
async fn crash_and_recover(case: &Case, label: &str) {
    let mut db = Db::new(case.database_dies).await;
    let url = db.url();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let boot = tmp.path().join("boot_id");
    std::fs::write(&boot, "aaaaaaaa-0000-0000-0000-00000000000a\n").unwrap();
    let client = connect(&url).await;

    let stop = Arc::new(AtomicBool::new(false));
    let outside = second_client(url.clone(), Arc::clone(&stop));
    let mut child = spawn(case, &url, &dir, &boot);
    let deadline = Instant::now() + Duration::from_secs(180);
    if case.death == Death::External {
        while count(&client, "app.ledger").await < case.kill_after_rows {
            assert!(
                child.try_wait().unwrap().is_none(),
                "{label}: the service exited"
            );
            assert!(Instant::now() < deadline, "{label}: too few writes");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().unwrap();
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "{label}: the service died ({status:?})");
    stop.store(true, Ordering::SeqCst);
    assert!(
        outside.await.unwrap() > 0,
        "{label}: the second client wrote"
    );
    drop(client);
    if case.database_dies
        && let Db::Own(cluster) = &mut db
    {
        cluster.kill();
        cluster.restart().unwrap();
    }
    if case.reboot {
        std::fs::write(&boot, "bbbbbbbb-0000-0000-0000-00000000000b\n").unwrap();
    }
    let boot_path = if case.boot_unreadable {
        tmp.path().join("no-boot-id-here")
    } else {
        boot.clone()
    };
    let client = connect(&url).await;
    // The service is down; the other client goes on.
    client
        .execute(
            "INSERT INTO app.outside (id, v) VALUES (-1, 'while down')",
            &[],
        )
        .await
        .unwrap();
    // What the database committed: PostgreSQL's own crash recovery decided it.
    let [ledger_before, direct_before, outside_before] = dump(&client).await;

    let sanare = start(&url, &dir, &boot_path, support::config(), false)
        .await
        .unwrap_or_else(|e| panic!("{label}: the restart failed: {e}"));
    let report = sanare.startup_report();
    let crash = report
        .crash()
        .unwrap_or_else(|| panic!("{label}: no crash detected"));
    assert_eq!(crash.kind, case.expected, "{label}: {crash:#?}");
    let recovery = report.recovery.as_ref().unwrap();
    assert_eq!(recovery.option, RecoveryOption::Auto, "{label}");
    assert!(recovery.success, "{label}: {recovery:#?}");
    assert!(
        recovery.tables_restored.is_empty() && recovery.snapshots_used.is_empty(),
        "{label}: nothing is restored over committed data: {recovery:#?}"
    );
    let [ledger_after, direct_after, outside_after] = dump(&client).await;
    assert_eq!(direct_after, direct_before, "{label}: app.direct changed");
    assert_eq!(
        outside_after, outside_before,
        "{label}: app.outside changed"
    );
    for row in &ledger_before {
        assert!(
            ledger_after.contains(row),
            "{label}: ledger row {row} lost or changed"
        );
    }
    assert_eq!(
        recovery.entries_replayed as usize,
        ledger_after.len() - ledger_before.len(),
        "{label}: the recovery added exactly the entries it replayed"
    );
    if let Some(n) = case.replayed {
        assert_eq!(recovery.entries_replayed, n, "{label}: {recovery:#?}");
    }
    support::assert_each_entry_applied_once(&sanare, &client).await;
    sanare.shutdown().await.unwrap();
    drop(sanare);

    // The next, clean start changes nothing.
    let again = start(&url, &dir, &boot_path, support::config(), false)
        .await
        .unwrap();
    assert!(again.startup_report().crash().is_none(), "{label}");
    assert_eq!(
        again
            .startup_report()
            .recovery
            .as_ref()
            .unwrap()
            .entries_replayed,
        0
    );
    assert_eq!(
        dump(&client).await,
        [ledger_after, direct_after, outside_after],
        "{label}"
    );
    again.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_loses_no_committed_row() {
    let case = Case::new(Death::Panic, CrashKind::ApplicationCrash);
    crash_and_recover(&case, "panic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_loses_no_committed_row() {
    let case = Case::new(Death::Kill, CrashKind::ApplicationCrash);
    crash_and_recover(&case, "sigkill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_failure_of_the_service_host_loses_no_committed_row() {
    let mut case = Case::new(Death::Kill, CrashKind::PowerFailure);
    case.reboot = true;
    crash_and_recover(&case, "power failure").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_failure_that_takes_the_database_down_too_loses_no_committed_row() {
    let mut case = Case::new(Death::External, CrashKind::PowerFailure);
    case.reboot = true;
    case.database_dies = true;
    case.kill_after_rows = 15;
    crash_and_recover(&case, "power failure with the database").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_memory_loses_no_committed_row() {
    let case = Case::new(Death::OutOfMemory, CrashKind::OutOfMemory);
    crash_and_recover(&case, "out of memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_end_loses_no_committed_row() {
    let mut case = Case::new(Death::Kill, CrashKind::Unknown);
    case.boot_unreadable = true;
    crash_and_recover(&case, "unknown").await;
}

/// splitmix64: a small, well-known generator, enough to pick kill points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Prints the seed when the test fails.
struct SeedGuard(u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "the randomized crash suite failed; replay it with SANARE_CRASH_SEED={}",
                self.0
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_lose_no_committed_row() {
    let seed = std::env::var("SANARE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let iterations: u64 = std::env::var("SANARE_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    eprintln!("randomized crash suite: seed {seed}, {iterations} iterations");
    let _guard = SeedGuard(seed);
    let mut rng = Rng(seed);
    for i in 0..iterations {
        let (death, expected) = match rng.below(4) {
            0 => (Death::Panic, CrashKind::ApplicationCrash),
            1 => (Death::Kill, CrashKind::ApplicationCrash),
            2 => (Death::External, CrashKind::ApplicationCrash),
            _ => (Death::Kill, CrashKind::PowerFailure),
        };
        let mut case = Case::new(death, expected);
        case.reboot = expected == CrashKind::PowerFailure;
        if death != Death::External {
            case.kill_at = 1 + rng.below(80);
        }
        case.kill_after_rows = 1 + rng.below(25) as i64;
        case.replayed = None;
        let label = format!(
            "seed {seed} iteration {i}: {death:?} at step {} / after {} rows, {expected:?}",
            case.kill_at, case.kill_after_rows
        );
        eprintln!("{label}");
        crash_and_recover(&case, &label).await;
    }
}
