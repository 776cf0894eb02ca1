//! A service crashes for real, restarts, and ends with every committed order
//! exactly once: application crash (a panic), a killed process, a power failure
//! (database and service killed, boot id changed).
//!
//! The test binary re-executes itself running only `service_child_entry` with
//! `SANARE_E2E_MODE` saying how the service dies.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use sanare::core::{
    Control, CrashKind, IntegrityService, SnapshotRequest, SnapshotService, ValidationScope,
};
use sanare::recovery::RecoveryStep;
use sanare::{Sanare, SanareConfig};
use sanare_examples::orders::{self, PlaceOrder};
use sanare_testing::fixtures::order_service;

const MODE: &str = "SANARE_E2E_MODE";
const DIR: &str = "SANARE_E2E_DIR";
const BOOT: &str = "SANARE_E2E_BOOT";
/// Orders in the fixture before the workload (it then has `BASE / 10` customers
/// and `BASE / 50` products).
const BASE: i64 = 200;

fn config() -> SanareConfig {
    let mut config = SanareConfig::default();
    config.snapshots.schemas = vec!["shop".into()];
    config
}

async fn service(url: &str, dir: &Path, boot: &Path, handlers: bool) -> Sanare {
    let mut builder = Sanare::builder()
        .config(config())
        .database_url(url)
        .data_dir(dir)
        .boot_id_path(boot)
        .background(false)
        .journal(orders::register);
    if handlers {
        builder = builder.install_crash_handlers();
    }
    builder.build().await.expect("the service starts")
}

/// In a child: the order service, dying as `SANARE_E2E_MODE` says.
/// Ignored in a normal run (it is not a test of its own).
#[test]
#[ignore = "the child process of this file's tests: they run it, it is not a test of its own"]
fn service_child_entry() {
    let mode = std::env::var(MODE)
        .expect("a child entry: run by this file's tests (with --ignored), not on its own");
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    let boot = PathBuf::from(std::env::var(BOOT).unwrap());
    let url = std::env::var("DATABASE_URL").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let sanare = service(&url, &dir, &boot, true).await;
        sanare
            .snapshots()
            .create(
                SnapshotRequest::new().label("before workload"),
                &Control::detached(),
            )
            .await
            .unwrap();
        for n in 1.. {
            orders::place_order(&sanare, &PlaceOrder::nth(BASE, n, BASE / 10, BASE / 50))
                .await
                .unwrap();
            if mode == "panic" && n == 60 {
                // A bug in the service: the panic hook records it before the
                // process dies.
                let cart: Vec<PlaceOrder> = Vec::new();
                let next = cart.get(std::hint::black_box(0));
                let _ = next.expect("order 61 has vanished from the cart");
            }
        }
    });
}

struct Run {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    boot: PathBuf,
}

impl Run {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let boot = tmp.path().join("boot_id");
        std::fs::write(&boot, "aaaaaaaa-1111-1111-1111-111111111111\n").unwrap();
        Self {
            _tmp: tmp,
            dir,
            boot,
        }
    }

    fn spawn(&self, mode: &str, url: &str) -> Child {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "service_child_entry",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(MODE, mode)
            .env(DIR, &self.dir)
            .env(BOOT, &self.boot)
            .env("DATABASE_URL", url)
            .env("RUST_BACKTRACE", "1")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }
}

async fn new_orders(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM shop.orders WHERE id > $1", &[&BASE])
        .await
        .unwrap()
        .get(0)
}

/// Waits until the child has placed `n` orders, then SIGKILLs it.
async fn kill_after(child: &mut Child, client: &tokio_postgres::Client, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while new_orders(client).await < n {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the service exited on its own"
        );
        assert!(
            Instant::now() < deadline,
            "the service placed too few orders"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The state after recovery holds every journaled order exactly once, each order's
/// total equals its lines, and integrity validation finds nothing.
async fn assert_all_committed_work(sanare: &Sanare, client: &tokio_postgres::Client) {
    let journaled = sanare.journal().stats().await.unwrap().entries;
    let placed = new_orders(client).await;
    assert_eq!(
        u64::try_from(placed).unwrap(),
        journaled,
        "every journaled order, once"
    );
    let ids: Vec<i64> = client
        .query(
            "SELECT id FROM shop.orders WHERE id > $1 ORDER BY id",
            &[&BASE],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: Vec<i64> = (1..=placed).map(|n| BASE + n).collect();
    assert_eq!(ids, expected, "no gap, no duplicate");
    let bad_totals: i64 = client
        .query_one(
            "SELECT count(*) FROM shop.orders o WHERE o.total_cents <>
               (SELECT coalesce(sum(amount_cents), 0) FROM shop.order_lines l WHERE l.order_id = o.id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad_totals, 0);
    let summary = sanare
        .integrity()
        .validate(ValidationScope::all(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(summary.total_violations(), 0, "{summary:?}");
}

/// The start-up recovery's result, which must have reached readiness.
fn recovered(sanare: &Sanare) -> &sanare::recovery::RecoveryResult {
    let recovery = sanare
        .startup_report()
        .recovery
        .as_ref()
        .expect("a recovery ran at start-up");
    assert!(recovery.success, "{recovery:?}");
    assert!(
        recovery.tables_restored.is_empty() && recovery.snapshots_used.is_empty(),
        "nothing is restored over committed data: {recovery:?}"
    );
    recovery
}

async fn fixture(client: &tokio_postgres::Client) {
    order_service::install(client, "shop").await.unwrap();
    order_service::generate(client, "shop", u64::try_from(BASE).unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_panic_is_recorded_and_the_restart_recovers_every_order() {
    let db = sanare_testing::test_db().await;
    let client = db.client().await;
    fixture(&client).await;
    let run = Run::new();
    let status = run.spawn("panic", db.url()).wait().unwrap();
    assert!(!status.success(), "the service died of its panic");

    let sanare = service(db.url(), &run.dir, &run.boot, false).await;
    let crash = sanare
        .startup_report()
        .crash()
        .expect("the crash is detected");
    assert_eq!(crash.kind, CrashKind::ApplicationCrash);
    assert!(
        crash
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("order 61 has vanished"),
        "{crash:?}"
    );
    assert!(
        crash
            .location
            .as_deref()
            .unwrap_or_default()
            .contains("crashes.rs")
    );
    let recovery = recovered(&sanare);
    assert_eq!(
        recovery
            .steps
            .iter()
            .map(|s| s.step.clone())
            .collect::<Vec<_>>(),
        vec![
            RecoveryStep::ReplayJournal,
            RecoveryStep::Validate,
            RecoveryStep::ScanCorruption,
            RecoveryStep::Repair,
            RecoveryStep::RestoreDamagedTables,
            RecoveryStep::ReadinessCheck
        ]
    );
    assert_all_committed_work(&sanare, &client).await;
    let stored = sanare.crashes().get(crash.id).await.unwrap();
    assert_eq!(stored.recovery_successful, Some(true));
    sanare.shutdown().await.unwrap();
    drop(sanare);

    // A clean restart finds no crash; its start-up replay has nothing left to apply.
    let again = service(db.url(), &run.dir, &run.boot, false).await;
    assert!(again.startup_report().crash().is_none());
    let startup = recovered(&again);
    assert_eq!(startup.option, sanare::recovery::RecoveryOption::Startup);
    assert_eq!(startup.entries_replayed, 0);
    assert!(again.recovery().readiness().ready);
    again.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_service_mid_workload_loses_and_doubles_nothing() {
    let db = sanare_testing::test_db().await;
    let client = db.client().await;
    fixture(&client).await;
    let run = Run::new();
    let mut child = run.spawn("run", db.url());
    kill_after(&mut child, &client, 150).await;

    let sanare = service(db.url(), &run.dir, &run.boot, false).await;
    let crash = sanare
        .startup_report()
        .crash()
        .expect("the kill is detected");
    assert_eq!(crash.kind, CrashKind::ApplicationCrash);
    assert!(
        crash.evidence.iter().any(|e| e.contains("still running")),
        "{crash:?}"
    );
    assert_all_committed_work(&sanare, &client).await;
    sanare.shutdown().await.unwrap();
}

/// A power failure (or host crash: from the next boot the two look the same): the
/// database server and the service die at once, the machine "reboots" (new boot
/// id). PostgreSQL's own recovery keeps every committed order; sanare restores
/// nothing over them, replays what the journal holds unapplied, and checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_failure_keeps_every_committed_order_and_restores_nothing() {
    let mut cluster = sanare_testing::cluster::Cluster::start_with(
        sanare_testing::cluster::ClusterOptions::default().durable(true),
    )
    .unwrap();
    let url = cluster.url("postgres");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    fixture(&client).await;
    let run = Run::new();
    let mut child = run.spawn("run", &url);
    kill_after(&mut child, &client, 120).await;
    drop(client);
    let _ = conn.await;
    cluster.kill(); // the database server loses power too
    std::fs::write(&run.boot, "bbbbbbbb-2222-2222-2222-222222222222\n").unwrap();
    cluster.restart().unwrap();

    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let sanare = service(&url, &run.dir, &run.boot, false).await;
    let crash = sanare
        .startup_report()
        .crash()
        .expect("the power loss is detected");
    assert_eq!(crash.kind, CrashKind::PowerFailure);
    let recovery = recovered(&sanare);
    assert!(
        recovery
            .steps
            .iter()
            .any(|s| s.step == RecoveryStep::ScanCorruption && s.success),
        "{recovery:?}"
    );
    assert_all_committed_work(&sanare, &client).await;
    sanare.shutdown().await.unwrap();
}
