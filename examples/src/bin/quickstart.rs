//! Quickstart: an order service that survives a kill -9 and heals planted damage.
//!
//! Run with `cargo xtask demo` (a throwaway PostgreSQL, `DATABASE_URL` set). The story:
//!
//! 1. an order service (the `shop` schema) starts with sanare on embedded defaults
//!    (segment-file journal and filesystem snapshots in a data directory), snapshots
//!    its tables, and places orders — each one journaled write-ahead, then applied;
//! 2. it is killed with SIGKILL in the middle of the workload;
//! 3. it restarts: sanare detects the crash, records it, replays the journal
//!    exactly once, validates and scans (restoring nothing over committed data)
//!    and checks readiness;
//! 4. damage is planted behind the database's back (a deleted parent, a flipped bit);
//! 5. integrity validation and the corruption scan find it, the repair engine plans,
//!    approves and executes repairs (each in one transaction with an undo log);
//! 6. a final report.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use sanare::core::{
    Control, IntegrityService, RepairPolicy, RepairService, SnapshotRequest, SnapshotService,
    TableRef, ValidationScope, Violation,
};
use sanare::{Sanare, SanareConfig};
use sanare_examples::orders::{self, PlaceOrder};
use sanare_testing::fixtures::order_service;

/// Orders the fixture generates before the workload starts.
const BASE_ORDERS: u64 = 2_000;

fn config() -> SanareConfig {
    let mut config = SanareConfig::default();
    config.snapshots.schemas = vec!["shop".into()];
    config
}

async fn start(url: &str, dir: &std::path::Path) -> anyhow::Result<Sanare> {
    Ok(Sanare::builder()
        .config(config())
        .database_url(url)
        .data_dir(dir)
        .journal(orders::register)
        .build()
        .await?)
}

/// The order service's process: snapshot, then place orders until killed.
async fn worker(url: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let sanare = start(url, dir).await?;
    sanare
        .snapshots()
        .create(
            SnapshotRequest::new()
                .schemas(["shop"])
                .label("before workload"),
            &Control::detached(),
        )
        .await?;
    let base = i64::try_from(BASE_ORDERS)?;
    let (customers, products) = {
        let client = sanare_pg::get_conn(sanare.pool()).await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM shop.customers), (SELECT count(*) FROM shop.products)",
                &[],
            )
            .await?;
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    for i in 1.. {
        // Write-ahead: the entry is durable before the change is applied.
        let order = PlaceOrder::nth(base, i, customers, products);
        orders::place_order(&sanare, &order).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let url = std::env::var("DATABASE_URL")
        .context("DATABASE_URL is not set: run this example with `cargo xtask demo`")?;
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--worker") {
        let dir = args.get(2).context("--worker needs a data directory")?;
        return worker(&url, std::path::Path::new(dir)).await;
    }
    let started = Instant::now();
    let data = tempfile::Builder::new()
        .prefix("sanare-quickstart-")
        .tempdir()?;

    println!("== 1. an order service on PostgreSQL, with sanare on embedded defaults");
    let admin = sanare_pg::connect_pool(&url, 4)?;
    let client = sanare_pg::get_conn(&admin).await?;
    client
        .batch_execute("DROP SCHEMA IF EXISTS shop CASCADE; DROP SCHEMA IF EXISTS sanare CASCADE")
        .await?;
    order_service::install(&**client, "shop").await?;
    let counts = order_service::generate(&**client, "shop", BASE_ORDERS).await?;
    client
        .batch_execute("ALTER TABLE shop.customers ADD COLUMN row_checksum bytea")
        .await?;
    sanare_integrity_trigger(&admin).await?;
    println!(
        "   {} customers, {} products, {} orders, {} order lines, {} payments; data directory {}",
        counts.customers,
        counts.products,
        counts.orders,
        counts.order_lines,
        counts.payments,
        data.path().display()
    );

    println!(
        "== 2. the service snapshots, places orders (journaled write-ahead), and is killed -9"
    );
    let placed_before = kill_mid_workload(&url, data.path(), &client).await?;

    println!("== 3. restart: sanare detects the crash, records it and recovers before serving");
    let (sanare, crash, placed_after) = restart_and_recover(&url, data.path(), &client).await?;

    println!("== 4. damage planted behind the database's back");
    client
        .batch_execute(
            "SET session_replication_role = replica;
             DELETE FROM shop.customers WHERE id = 7;
             UPDATE shop.customers SET email = overlay(email placing chr(ascii(substr(email, 1, 1)) # 1) from 1 for 1) WHERE id = 11;
             SET session_replication_role = origin;",
        )
        .await?;
    println!("   customer 7 deleted under its orders; one bit of customer 11's email flipped");

    println!("== 5. detect and repair");
    let control = Control::detached();
    let (summary, scan, repaired) = detect_and_repair(&sanare, &control).await?;

    println!("== 6. final report");
    let after = sanare
        .integrity()
        .validate(ValidationScope::all(), &control)
        .await?;
    let rescan = sanare.corruption().scan_all(&control).await?;
    let customer7: i64 = client
        .query_one("SELECT count(*) FROM shop.customers WHERE id = 7", &[])
        .await?
        .get(0);
    println!("   crash detected:            {}", crash.kind.as_str());
    println!("   orders after recovery:     {placed_after} (killed at {placed_before})");
    println!(
        "   violations found / left:   {} / {}",
        summary.total_violations(),
        after.total_violations()
    );
    println!(
        "   corruption found / left:   {} / {}",
        scan.issues.len(),
        rescan.issues.len()
    );
    println!(
        "   repairs run / rows changed: {} / {}",
        repaired.completed, repaired.rows_changed
    );
    println!("   customer 7 present again:  {}", customer7 == 1);
    println!(
        "   total time:                {:.1} s",
        started.elapsed().as_secs_f64()
    );
    sanare.shutdown().await?;
    if after.total_violations() > 0 || !rescan.issues.is_empty() {
        bail!("damage left after repair");
    }
    Ok(())
}

/// Step 2: the order service runs in its own process, snapshots and places orders,
/// and is killed with SIGKILL once it placed 300; returns the orders placed.
async fn kill_mid_workload(
    url: &str,
    data: &std::path::Path,
    client: &tokio_postgres::Client,
) -> anyhow::Result<i64> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--worker")
        .arg(data)
        .env("DATABASE_URL", url)
        .spawn()
        .context("starting the order service process")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the order service exited on its own ({status})");
        }
        let placed: i64 = client
            .query_one(
                "SELECT count(*) FROM shop.orders WHERE id > $1",
                &[&(BASE_ORDERS as i64)],
            )
            .await?
            .get(0);
        if placed >= 300 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the order service placed only {placed} orders in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill()?; // SIGKILL: no handler runs, nothing is flushed
    child.wait()?;
    let placed_before: i64 = client
        .query_one(
            "SELECT count(*) FROM shop.orders WHERE id > $1",
            &[&(BASE_ORDERS as i64)],
        )
        .await?
        .get(0);
    println!("   killed with {placed_before} new orders in the database");
    Ok(placed_before)
}

/// Step 3: the restart detects the crash and recovers before serving; returns the
/// service, the crash and the orders in the database after recovery.
async fn restart_and_recover(
    url: &str,
    data: &std::path::Path,
    client: &tokio_postgres::Client,
) -> anyhow::Result<(Sanare, sanare::recovery::CrashRecord, i64)> {
    let sanare = start(url, data).await?;
    let crash = sanare
        .startup_report()
        .crash()
        .context("the crash was not detected")?
        .clone();
    println!(
        "   previous run crashed: {} ({}), evidence: {}",
        crash.kind.as_str(),
        crash.severity,
        crash.evidence.join("; ")
    );
    let journaled = sanare.journal().stats().await?;
    let Some(result) = sanare.startup_report().recovery.clone() else {
        bail!("no recovery ran at start-up")
    };
    println!(
        "   automatic recovery {}: steps {}; journal entries replayed {}, errors fixed {}",
        if result.success {
            "succeeded"
        } else {
            "FAILED"
        },
        result
            .steps
            .iter()
            .map(|s| s.step.to_string())
            .collect::<Vec<_>>()
            .join(" → "),
        result.entries_replayed,
        result.errors_fixed,
    );
    let placed_after: i64 = client
        .query_one(
            "SELECT count(*) FROM shop.orders WHERE id > $1",
            &[&(BASE_ORDERS as i64)],
        )
        .await?
        .get(0);
    println!(
        "   journal holds {} entries; the database now has {placed_after} new orders (every journaled order, once)",
        journaled.entries
    );
    if !result.success {
        bail!("recovery failed: {:?}", result.errors);
    }
    if u64::try_from(placed_after)? != journaled.entries {
        bail!(
            "{placed_after} orders in the database but {} journaled",
            journaled.entries
        );
    }
    Ok((sanare, crash, placed_after))
}

/// Step 5: validation and the corruption scan find the damage; the repair engine
/// plans, approves and runs the repairs.
async fn detect_and_repair(
    sanare: &Sanare,
    control: &Control,
) -> anyhow::Result<(
    sanare::core::ValidationSummary,
    sanare::corruption::ScanReport,
    sanare::core::RepairRunSummary,
)> {
    let summary = sanare
        .integrity()
        .validate(ValidationScope::all(), control)
        .await?;
    let mut violations: Vec<Violation> = sanare
        .integrity()
        .violations(summary.check)
        .filter_map(|v| async move { v.ok() })
        .collect()
        .await;
    println!(
        "   integrity validation: {} rows checked, {} violations",
        summary.rows_checked,
        summary.total_violations()
    );
    let scan = sanare.corruption().scan_all(control).await?;
    println!(
        "   corruption scan: {} rows scanned, {} issues ({})",
        scan.rows_scanned,
        scan.issues.len(),
        scan.issues
            .iter()
            .map(|i| format!("{} in {}", i.kind, i.table))
            .collect::<Vec<_>>()
            .join(", ")
    );
    violations.extend(scan.issues.iter().map(|i| i.to_violation()));
    // The one repair loop: plan, approve (the quickstart plays the operator who
    // approves everything), dry-run, then run each repair in its own transaction.
    let policy = RepairPolicy::new("quickstart-operator").auto_approve(true);
    let repaired = sanare
        .repair()
        .repair_all(
            futures_util::stream::iter(violations.into_iter().map(Ok)).boxed(),
            &policy,
            control,
        )
        .await?;
    println!(
        "   {} repairs planned, {} completed, {} rows changed",
        repaired.planned, repaired.completed, repaired.rows_changed
    );
    for (id, why) in &repaired.not_completed {
        println!("   repair {id} did not complete: {why}");
    }
    Ok((summary, scan, repaired))
}

/// Adds the checksum column's trigger (sanare's built-in SQL) to `shop.customers`,
/// so the corruption scan can tell a flipped bit from a legitimate update.
async fn sanare_integrity_trigger(admin: &sanare_pg::Pool) -> anyhow::Result<()> {
    let schema = sanare_pg::SchemaName::default();
    let mut client = sanare_pg::get_conn(admin).await?;
    sanare::integrity::migrate(&mut client, &schema).await?;
    sanare::integrity::install_checksum_trigger(
        &**client,
        &schema,
        &TableRef::new("shop", "customers"),
        "row_checksum",
        true,
    )
    .await?;
    Ok(())
}
