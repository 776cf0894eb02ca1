//! Quickstart: an order service that survives a kill -9 and heals planted damage.
//!
//! Run with `cargo xtask demo` (a throwaway PostgreSQL, `DATABASE_URL` set). The story:
//!
//! 1. an order service (the `shop` schema) starts with sanare on embedded defaults
//!    (segment-file journal and filesystem snapshots in a data directory), snapshots
//!    its tables, and places orders — each one journaled write-ahead, then applied;
//! 2. it is killed with SIGKILL in the middle of the workload;
//! 3. it restarts: sanare detects the crash, records it, restores the latest
//!    snapshot, replays the journal exactly once, validates and checks readiness;
//! 4. damage is planted behind the database's back (a deleted parent, a flipped bit);
//! 5. integrity validation and the corruption scan find it, the repair engine plans,
//!    approves and executes repairs (each in one transaction with an undo log);
//! 6. a final report.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_trait::async_trait;
use futures_util::StreamExt as _;
use sanare::core::{
    Control, ExecuteOptions, IntegrityService, RepairService, SnapshotRequest, SnapshotService,
    TableRef, ValidationScope, Violation,
};
use sanare::journal::{JournalEntry, NewEntry, PgHandler};
use sanare::recovery::{RecoveryOption, RecoveryOptions};
use sanare::{Sanare, SanareConfig};
use sanare_testing::fixtures::order_service;
use serde::{Deserialize, Serialize};

/// Orders the fixture generates before the workload starts.
const BASE_ORDERS: u64 = 2_000;

/// The journaled operation: one placed order with its lines.
#[derive(Debug, Serialize, Deserialize)]
struct PlaceOrder {
    order_id: i64,
    customer_id: i64,
    lines: Vec<(i64, i32)>,
}

/// Applies a `PlaceOrder` in the replay transaction (idempotent, so an order that is
/// already in the restored snapshot is left alone).
struct ApplyOrder;

#[async_trait]
impl PgHandler for ApplyOrder {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entry: &JournalEntry,
    ) -> sanare::Result<()> {
        let order: PlaceOrder = entry.payload_as()?;
        apply_order(tx, &order)
            .await
            .map_err(|e| sanare::Error::database("applying order.placed", e, false))
    }
}

async fn apply_order(
    tx: &impl tokio_postgres::GenericClient,
    order: &PlaceOrder,
) -> Result<(), tokio_postgres::Error> {
    let inserted = tx
        .execute(
            "INSERT INTO shop.orders (id, customer_id, status, total_cents)
             VALUES ($1, $2, 'pending', 0) ON CONFLICT (id) DO NOTHING",
            &[&order.order_id, &order.customer_id],
        )
        .await?;
    if inserted == 0 {
        return Ok(());
    }
    for (n, (product, qty)) in order.lines.iter().enumerate() {
        let line_no = i32::try_from(n + 1).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO shop.order_lines (order_id, line_no, product_id, quantity, unit_price_cents, amount_cents)
             SELECT $1, $2, p.id, $4::int, p.price_cents, $4::int * p.price_cents FROM shop.products p WHERE p.id = $3",
            &[&order.order_id, &line_no, product, qty],
        )
        .await?;
    }
    tx.execute(
        "UPDATE shop.orders SET total_cents = (SELECT coalesce(sum(amount_cents), 0)
           FROM shop.order_lines WHERE order_id = $1) WHERE id = $1",
        &[&order.order_id],
    )
    .await?;
    Ok(())
}

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
        .journal(|j| j.pg_handler("order.placed", ApplyOrder))
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
    let pool = sanare.pool().clone();
    for i in 1.. {
        let order = PlaceOrder {
            order_id: i64::try_from(BASE_ORDERS).unwrap_or(0) + i,
            customer_id: 1 + i % 150,
            lines: vec![(1 + i % 20, 1 + (i % 3) as i32), (1 + (i * 7) % 20, 2)],
        };
        // Write-ahead: the entry is durable before the change is applied.
        sanare
            .journal()
            .record(
                NewEntry::new("order.placed", &order)?
                    .idempotency_key(format!("order-{}", order.order_id))
                    .source_system("quickstart"),
            )
            .await?;
        let mut client = sanare_pg::get_conn(&pool).await?;
        let tx = client.transaction().await?;
        apply_order(&*tx, &order).await?;
        tx.commit().await?;
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
    sanare_integrity_trigger(&client).await?;
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
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--worker")
        .arg(data.path())
        .env("DATABASE_URL", &url)
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

    println!("== 3. restart: detect, record, recover");
    let sanare = start(&url, data.path()).await?;
    let crash = sanare
        .startup_report()
        .crash()
        .context("the crash was not detected")?
        .clone();
    println!(
        "   previous run crashed: {:?} ({}), evidence: {}",
        crash.kind,
        crash.severity,
        crash.evidence.join("; ")
    );
    let journaled = sanare.journal().stats().await?;
    let plan = sanare.recovery().plan(
        Some(&crash),
        RecoveryOptions::new(RecoveryOption::Auto).auto_approve(true),
    );
    let result = sanare
        .recovery()
        .recover(&plan, &Control::detached())
        .await?;
    println!(
        "   recovery {}: snapshots used {}, journal entries replayed {}, errors fixed {}, in {} steps",
        if result.success {
            "succeeded"
        } else {
            "FAILED"
        },
        result.snapshots_used.len(),
        result.entries_replayed,
        result.errors_fixed,
        result.steps.len()
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
    let summary = sanare
        .integrity()
        .validate(ValidationScope::all(), &control)
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
    let scan = sanare.corruption().scan_all(&control).await?;
    println!(
        "   corruption scan: {} rows scanned, {} issues ({})",
        scan.rows_scanned,
        scan.issues.len(),
        scan.issues
            .iter()
            .map(|i| format!("{:?} in {}", i.kind, i.table))
            .collect::<Vec<_>>()
            .join(", ")
    );
    violations.extend(scan.issues.iter().map(|i| i.to_violation()));
    let plans = sanare.repair().plan(&violations).await?;
    let mut fixed = 0;
    for plan in &plans {
        if plan.requires_approval {
            sanare
                .repair()
                .approve(plan.id, "quickstart-operator")
                .await?;
        }
        let dry = sanare
            .repair()
            .execute(plan.id, ExecuteOptions::dry_run(), &control)
            .await?;
        let outcome = sanare
            .repair()
            .execute(
                plan.id,
                ExecuteOptions::new().executed_by("quickstart"),
                &control,
            )
            .await?;
        println!(
            "   repair {:?} on {}: dry run would change {} rows; {:?}, {} rows changed",
            plan.strategy, plan.table, dry.rows_affected, outcome.status, outcome.rows_affected
        );
        fixed += outcome.rows_affected;
    }

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
    println!("   crash detected:            {:?}", crash.kind);
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
    println!("   repairs run / rows changed: {} / {fixed}", plans.len());
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

async fn sanare_integrity_trigger(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    let schema = sanare_pg::SchemaName::default();
    let mut c = tokio_postgres::connect(&std::env::var("DATABASE_URL")?, tokio_postgres::NoTls)
        .await
        .map(|(c, conn)| {
            tokio::spawn(conn);
            c
        })?;
    sanare::integrity::migrate(&mut c, &schema).await?;
    sanare::integrity::install_checksum_trigger(
        client,
        &schema,
        &TableRef::new("shop", "customers"),
        "row_checksum",
        true,
    )
    .await?;
    Ok(())
}
