//! Shared by the start-up, crash and second-process suites: an application schema
//! whose journaled operation is *not* idempotent (a second apply adds a second
//! row), so "applied exactly once" is visible in the data; the service as these
//! suites start it; and row dumps to compare committed data before and after.

#![allow(dead_code, unreachable_pub)] // each suite uses its part

use std::path::Path;
use std::time::Duration;

use sanare::journal::{JournalBuilder, JournalEntry, NewEntry, PgHandler};
use sanare::{Sanare, SanareConfig};

/// The journaled operation: add a row to `app.ledger`.
pub const LEDGER_ADD: &str = "ledger.add";

/// Its payload.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct LedgerAdd {
    pub key: String,
    pub amount: i64,
}

/// The application's tables: `ledger` is written only through the journal,
/// `direct` by the service straight to the table, `outside` by a client that is
/// not the service.
pub const APP_SQL: &str = "CREATE SCHEMA app;
    CREATE TABLE app.ledger (id bigserial PRIMARY KEY, key text NOT NULL, amount bigint NOT NULL);
    CREATE TABLE app.direct (id bigint PRIMARY KEY, v text NOT NULL);
    CREATE TABLE app.outside (id bigint PRIMARY KEY, v text NOT NULL);";

/// Applies `ledger.add`: one plain INSERT, no idempotency of its own. Only the
/// journal's applied marks keep a replay from adding a row twice.
pub struct ApplyLedger;

#[async_trait::async_trait]
impl PgHandler for ApplyLedger {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entry: &JournalEntry,
    ) -> sanare::Result<()> {
        let p: LedgerAdd = entry.payload_as()?;
        tx.execute(
            "INSERT INTO app.ledger (key, amount) VALUES ($1, $2)",
            &[&p.key, &p.amount],
        )
        .await
        .map_err(|e| sanare::Error::database("applying ledger.add", e, true))?;
        Ok(())
    }
}

/// Registers the ledger handler.
pub fn register(journal: JournalBuilder) -> JournalBuilder {
    journal.pg_handler(LEDGER_ADD, ApplyLedger)
}

/// The entry adding `key` to the ledger.
pub fn entry(key: &str, amount: i64) -> NewEntry {
    NewEntry::new(
        LEDGER_ADD,
        &LedgerAdd {
            key: key.to_owned(),
            amount,
        },
    )
    .expect("a ledger payload")
    .idempotency_key(key)
}

/// The configuration of these suites: snapshots of `app`, no schedules, a fast
/// heartbeat.
pub fn config() -> SanareConfig {
    let mut config = SanareConfig::default();
    config.snapshots.schemas = vec!["app".into()];
    config.snapshots.interval = None;
    config.validation.interval = None;
    config.corruption.scan_interval = None;
    config.journal.compaction_interval = None;
    config.crash_detection.heartbeat_interval = Duration::from_millis(200);
    config
}

/// The service on `url` with its data in `dir`, the boot id read from `boot`.
pub async fn start(
    url: &str,
    dir: &Path,
    boot: &Path,
    config: SanareConfig,
    handlers: bool,
) -> sanare::Result<Sanare> {
    let mut builder = Sanare::builder()
        .config(config)
        .database_url(url)
        .data_dir(dir)
        .boot_id_path(boot)
        .background(false)
        .journal(register);
    if handlers {
        builder = builder.install_crash_handlers();
    }
    builder.build().await
}

/// Every row of `table` as text, in key order.
pub async fn rows(client: &tokio_postgres::Client, table: &str) -> Vec<String> {
    client
        .query(&format!("SELECT t::text FROM {table} t ORDER BY id"), &[])
        .await
        .expect("dump a table")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every row of the application's tables, in key order.
pub async fn dump(client: &tokio_postgres::Client) -> [Vec<String>; 3] {
    [
        rows(client, "app.ledger").await,
        rows(client, "app.direct").await,
        rows(client, "app.outside").await,
    ]
}

/// A client on `url` (its connection runs on a task).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

/// The ledger keys of every journaled entry, in journal order.
pub async fn journaled_keys(sanare: &Sanare) -> Vec<String> {
    sanare
        .journal()
        .query(&sanare::journal::Query::all())
        .await
        .expect("query the journal")
        .iter()
        .map(|e| e.payload_as::<LedgerAdd>().expect("a ledger payload").key)
        .collect()
}

/// Checks that every journaled entry is in the ledger exactly once, and nothing
/// else is.
pub async fn assert_each_entry_applied_once(sanare: &Sanare, client: &tokio_postgres::Client) {
    let mut journaled = journaled_keys(sanare).await;
    journaled.sort();
    let mut applied: Vec<String> = client
        .query("SELECT key FROM app.ledger ORDER BY key", &[])
        .await
        .expect("ledger keys")
        .iter()
        .map(|r| r.get(0))
        .collect();
    applied.sort();
    assert_eq!(
        applied, journaled,
        "every journaled entry applied exactly once, nothing else"
    );
}
