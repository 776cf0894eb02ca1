//! Fakes of the core traits and a small host schema with row checksums.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sanare_core::{
    ColumnValue, Control, Error, RestoreOutcome, RestoreRequest, Result, RowChecksum, RowImage,
    RowRef, SnapshotId, SnapshotInfo, SnapshotRequest, SnapshotService, TableRef, VerifyReport,
};
use sanare_corruption::CorruptionDetector;
use tokio_postgres::GenericClient;

/// The canonical row checksum (BLAKE3 over the integrity crate's version-1
/// encoding): the same one a host and the integrity crate use.
pub struct Blake3Rows;

impl RowChecksum for Blake3Rows {
    fn encoding_version(&self) -> u16 {
        sanare_integrity::Checksummer::blake3().encoding_version()
    }

    fn checksum(&self, values: &[ColumnValue]) -> [u8; 32] {
        sanare_integrity::Checksummer::blake3().checksum(values)
    }
}

pub const DDL: &str = "CREATE TABLE public.accounts (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    full_name text,
    balance numeric(12,2) NOT NULL,
    row_checksum bytea
);
CREATE INDEX accounts_email ON public.accounts (email);";

pub fn accounts() -> TableRef {
    TableRef::new("public", "accounts")
}

pub fn values(id: i64, email: &str, name: Option<&str>, balance: &str) -> Vec<ColumnValue> {
    vec![
        ColumnValue::new("id", "bigint", Some(id.to_string())),
        ColumnValue::new("email", "text", Some(email)),
        ColumnValue::new("full_name", "text", name),
        ColumnValue::new("balance", "numeric(12,2)", Some(balance)),
    ]
}

/// Inserts (or updates) a row the way the application does: with its checksum.
pub async fn upsert(
    c: &impl GenericClient,
    id: i64,
    email: &str,
    name: Option<&str>,
    balance: &str,
) {
    let sum = Blake3Rows
        .checksum(&values(id, email, name, balance))
        .to_vec();
    c.execute(
        "INSERT INTO public.accounts VALUES ($1, $2, $3, $4::text::numeric, $5)
         ON CONFLICT (id) DO UPDATE SET email = $2, full_name = $3, balance = $4::text::numeric, row_checksum = $5",
        &[&id, &email, &name, &balance, &sum],
    )
    .await
    .unwrap();
}

pub fn balance(i: i64) -> String {
    format!("{}.{:02}", i * 3, i % 100)
}

/// Creates and fills `accounts` with `n` rows.
pub async fn install(c: &impl GenericClient, n: i64) {
    c.batch_execute(DDL).await.unwrap();
    for i in 1..=n {
        upsert(
            c,
            i,
            &format!("user{i}@example.com"),
            Some(&format!("User {i}")),
            &balance(i),
        )
        .await;
    }
}

/// A snapshot service holding real row images copied from the database.
#[derive(Default)]
pub struct FakeSnapshots {
    pub info: Mutex<Option<SnapshotInfo>>,
    pub rows: Mutex<HashMap<String, RowImage>>,
    /// Problems `verify` reports (none: intact).
    pub damage: Mutex<Vec<String>>,
}

fn key_of(r: &RowRef) -> String {
    format!("{r}")
}

impl FakeSnapshots {
    /// Captures every row of `table` (keyed by `id`) as they are now.
    pub async fn capture(&self, c: &impl GenericClient, table: &TableRef) {
        let rows = c
            .query(
                &format!(
                    "SELECT id::text, email, full_name, balance::text FROM {}",
                    table.quoted()
                ),
                &[],
            )
            .await
            .unwrap();
        let mut map = self.rows.lock().unwrap();
        for r in &rows {
            let img = RowImage {
                table: table.clone(),
                values: vec![
                    ColumnValue::new("id", "bigint", r.get::<_, Option<String>>(0)),
                    ColumnValue::new("email", "text", r.get::<_, Option<String>>(1)),
                    ColumnValue::new("full_name", "text", r.get::<_, Option<String>>(2)),
                    ColumnValue::new("balance", "numeric(12,2)", r.get::<_, Option<String>>(3)),
                ],
            };
            map.insert(key_of(&img.row_ref(&["id"]).unwrap()), img);
        }
        let mut info = snapshot_info();
        info.tables.push(table_rows(table, rows.len()));
        *self.info.lock().unwrap() = Some(info);
    }
}

impl FakeSnapshots {
    /// Captures every row of `table` (all columns, as text under the canonical
    /// settings, keyed by its primary key) and adds it to the snapshot.
    pub async fn capture_table(&self, c: &impl GenericClient, table: &TableRef) {
        let info = sanare_pg::catalog::describe(c, table).await.unwrap();
        let select: Vec<String> = info
            .columns
            .iter()
            .map(|col| format!("{}::text", sanare_pg::quote_ident(&col.name)))
            .collect();
        c.batch_execute(&format!(
            "BEGIN; {}",
            sanare_pg::canonical_settings_local_sql()
        ))
        .await
        .unwrap();
        let rows = c
            .query(
                &format!("SELECT {} FROM {}", select.join(", "), table.quoted()),
                &[],
            )
            .await
            .unwrap();
        c.batch_execute("COMMIT").await.unwrap();
        let key: Vec<&str> = info.primary_key.iter().map(String::as_str).collect();
        let mut map = self.rows.lock().unwrap();
        for r in &rows {
            let img = RowImage {
                table: table.clone(),
                values: info
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, col)| {
                        ColumnValue::new(
                            col.name.clone(),
                            col.type_name.clone(),
                            r.get::<_, Option<String>>(i),
                        )
                    })
                    .collect(),
            };
            map.insert(key_of(&img.row_ref(&key).unwrap()), img);
        }
        let mut info_slot = self.info.lock().unwrap();
        let mut snapshot = info_slot.clone().unwrap_or_else(snapshot_info);
        snapshot.tables.push(table_rows(table, rows.len()));
        *info_slot = Some(snapshot);
    }
}

/// A ready snapshot with no tables yet.
fn snapshot_info() -> SnapshotInfo {
    serde_json::from_value(serde_json::json!({
        "id": SnapshotId::new(),
        "created_at": "2026-01-01T00:00:00Z",
        "status": "ready",
        "label": null,
        "base": null,
        "journal_cut": null,
        "tables": [],
        "size_bytes": 0,
        "stored_bytes": 0,
        "metadata": {}
    }))
    .unwrap()
}

fn table_rows(table: &TableRef, rows: usize) -> sanare_core::TableRowCount {
    serde_json::from_value(serde_json::json!({ "table": table, "rows": rows })).unwrap()
}

#[async_trait]
impl SnapshotService for FakeSnapshots {
    async fn create(&self, _: SnapshotRequest, _: &Control) -> Result<SnapshotInfo> {
        Err(Error::unavailable("fake"))
    }
    async fn latest_good(&self, _: Option<time::OffsetDateTime>) -> Result<Option<SnapshotInfo>> {
        Ok(self.info.lock().unwrap().clone())
    }
    async fn restore(&self, _: RestoreRequest, _: &Control) -> Result<RestoreOutcome> {
        Err(Error::unavailable("fake"))
    }
    async fn fetch_rows(&self, _: SnapshotId, rows: &[RowRef]) -> Result<Vec<RowImage>> {
        let map = self.rows.lock().unwrap();
        Ok(rows
            .iter()
            .filter_map(|r| map.get(&key_of(r)).cloned())
            .collect())
    }
    async fn verify(&self, id: SnapshotId, _: &Control) -> Result<VerifyReport> {
        let problems = self.damage.lock().unwrap().clone();
        Ok(serde_json::from_value(serde_json::json!({
            "snapshot": id,
            "blocks_checked": 10,
            "blocks_missing": 0,
            "blocks_corrupt": problems.len(),
            "problems": problems,
        }))
        .unwrap())
    }
}

pub fn detector(pool: &sanare_pg::Pool, snaps: Option<Arc<FakeSnapshots>>) -> CorruptionDetector {
    let mut b = CorruptionDetector::builder()
        .pool(pool.clone())
        .checksum(Arc::new(Blake3Rows));
    if let Some(s) = snaps {
        b = b.snapshots(s);
    }
    b.build().unwrap()
}

/// A detector with BLAKE3 checksums (the application's) and `config`.
pub fn detector_with(
    pool: &sanare_pg::Pool,
    config: sanare_corruption::DetectorConfig,
) -> CorruptionDetector {
    CorruptionDetector::builder()
        .pool(pool.clone())
        .checksum(Arc::new(Blake3Rows))
        .config(config)
        .build()
        .unwrap()
}

/// Waits (polling) until `f` holds, at most 30 s.
pub async fn wait_for(mut f: impl FnMut() -> bool) {
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while !f() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("condition not reached within 30 s");
}
