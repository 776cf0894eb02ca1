//! Quickstart: an order service on a real PostgreSQL, seen through sanare.
//!
//! Run with `cargo xtask demo` (which starts a throwaway PostgreSQL and sets
//! `DATABASE_URL`). This first version exercises the foundation: it installs the
//! order-service schema with generated data, applies sanare's migrations, reads the
//! catalog the way every component does, and follows a long operation through its
//! progress handle and the event bus. The facade issue grows it into the full
//! crash → recover → corrupt → repair story.

use anyhow::Context as _;
use sanare_core::{Control, Event, EventBus, SnapshotId};
use sanare_pg::{Migration, Migrations, SchemaName, catalog};
use sanare_testing::fixtures::order_service;

const DEMO_MIGRATIONS: Migrations = Migrations::new(
    "quickstart",
    &[Migration::new(
        1,
        "create_demo_log",
        "CREATE TABLE {schema}.quickstart_log (id bigserial PRIMARY KEY, note text NOT NULL, at timestamptz NOT NULL DEFAULT now())",
    )],
);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sanare=info".into()),
        )
        .init();
    let url = std::env::var("DATABASE_URL")
        .context("DATABASE_URL is not set: run this example with `cargo xtask demo`")?;
    let pool = sanare_pg::connect_pool(&url, 4)?;
    let mut client = sanare_pg::get_conn(&pool).await?;

    // A fresh demo schema every run.
    client
        .batch_execute("DROP SCHEMA IF EXISTS shop CASCADE")
        .await?;
    order_service::install(&**client, "shop").await?;
    let counts = order_service::generate(&**client, "shop", 20_000).await?;
    println!(
        "order service ready: {} customers, {} products, {} orders, {} order lines, {} payments",
        counts.customers, counts.products, counts.orders, counts.order_lines, counts.payments
    );

    let schema = SchemaName::default();
    let report = DEMO_MIGRATIONS.run(&mut client, &schema).await?;
    let again = DEMO_MIGRATIONS.run(&mut client, &schema).await?;
    println!(
        "migrations in schema `{schema}`: {} applied, {} on the second run",
        report.applied.len(),
        again.applied.len()
    );

    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let (control, progress) = Control::new();
    let tables = catalog::list_tables(&**client, &["shop".into()], schema.as_str()).await?;
    control
        .progress()
        .phase("describing tables", "tables", Some(tables.len() as u64));
    let mut infos = Vec::new();
    for table in &tables {
        control.checkpoint()?;
        infos.push(catalog::describe(&**client, table).await?);
        control.progress().advance(1);
    }
    control.progress().finish();
    let p = progress.get();
    println!(
        "{}: {}/{} {}",
        p.phase,
        p.done,
        p.total.unwrap_or(0),
        p.unit
    );

    println!("tables in foreign-key load order:");
    for table in catalog::fk_order(&infos) {
        let info = infos
            .iter()
            .find(|i| i.table == table)
            .context("table vanished")?;
        let fks: Vec<String> = info
            .foreign_keys
            .iter()
            .map(|fk| format!("{} -> {}", fk.columns.join(","), fk.parent))
            .collect();
        println!(
            "  {:<20} key ({:<17}) {} columns  {}",
            table.to_string(),
            info.primary_key.join(", "),
            info.columns.len(),
            fks.join("; ")
        );
    }

    bus.publish(Event::SnapshotCreated {
        snapshot: SnapshotId::new(),
        size_bytes: 0,
        stored_bytes: 0,
    });
    if let Some(record) = events.try_recv() {
        println!(
            "event bus delivered `{}` (subscribers get every sanare event as it happens)",
            record.event.name()
        );
    }
    client
        .execute(
            "INSERT INTO sanare.quickstart_log (note) VALUES ($1)",
            &[&"quickstart finished"],
        )
        .await?;
    println!("quickstart finished");
    Ok(())
}
