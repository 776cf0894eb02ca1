//! pgbench fixtures: its tables at a scale, its foreign keys, and the million
//! orphans of ten branches deleted behind the database's back.

use std::path::PathBuf;
use std::process::Command;

use futures_util::{StreamExt as _, TryStreamExt as _};
use sanare_core::{BoxStream, ColumnValue, RowRef, Severity, TableRef, Violation, ViolationKind};
use sanare_pg::{PgResultExt, Pool, get_conn};

/// The `pgbench` binary: in `$SANARE_PG_BINDIR` (set by `cargo xtask bench`), else
/// on `PATH`.
pub fn binary() -> PathBuf {
    std::env::var_os("SANARE_PG_BINDIR")
        .map(|d| PathBuf::from(d).join("pgbench"))
        .unwrap_or_else(|| "pgbench".into())
}

/// `pgbench -i -q -s <scale>` on `url` (tables dropped and created again), with its
/// foreign keys when `foreign_keys`. Panics with pgbench's output when it fails.
pub fn init(url: &str, scale: u64, foreign_keys: bool) {
    let mut cmd = Command::new(binary());
    cmd.args(["-i", "-q", "-s", &scale.to_string()]);
    if foreign_keys {
        cmd.arg("--foreign-keys");
    }
    let out = cmd.arg(url).output().expect("pgbench -i runs");
    assert!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Adds the foreign keys `pgbench -i --foreign-keys` creates to tables initialised
/// without them (each one validated, so on a scale-100 database this reads the
/// 10M accounts once).
pub async fn add_foreign_keys(
    client: &tokio_postgres::Client,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "ALTER TABLE pgbench_tellers ADD CONSTRAINT pgbench_tellers_bid_fkey
                 FOREIGN KEY (bid) REFERENCES pgbench_branches;
             ALTER TABLE pgbench_accounts ADD CONSTRAINT pgbench_accounts_bid_fkey
                 FOREIGN KEY (bid) REFERENCES pgbench_branches;
             ALTER TABLE pgbench_history ADD CONSTRAINT pgbench_history_bid_fkey
                 FOREIGN KEY (bid) REFERENCES pgbench_branches;
             ALTER TABLE pgbench_history ADD CONSTRAINT pgbench_history_tid_fkey
                 FOREIGN KEY (tid) REFERENCES pgbench_tellers;
             ALTER TABLE pgbench_history ADD CONSTRAINT pgbench_history_aid_fkey
                 FOREIGN KEY (aid) REFERENCES pgbench_accounts;",
        )
        .await
}

/// What [`orphan_branches`] left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Orphans {
    /// Accounts whose branch is gone.
    pub accounts: i64,
    /// Tellers whose branch is gone.
    pub tellers: i64,
    /// History rows whose branch, teller or account is gone.
    pub history: i64,
}

impl Orphans {
    /// Every orphan.
    pub fn total(&self) -> i64 {
        self.accounts + self.tellers + self.history
    }
}

/// Deletes branches `1..=branches` with `session_replication_role = replica`, so
/// their accounts and tellers stay behind as orphans (100,000 accounts and 10
/// tellers each), then analyses the tables as autovacuum eventually would.
pub async fn orphan_branches(
    client: &tokio_postgres::Client,
    branches: i32,
) -> Result<Orphans, tokio_postgres::Error> {
    client
        .execute(
            "SELECT set_config('session_replication_role', 'replica', false)",
            &[],
        )
        .await?;
    client
        .execute("DELETE FROM pgbench_branches WHERE bid <= $1", &[&branches])
        .await?;
    client
        .batch_execute("SET session_replication_role = origin; ANALYZE pgbench_branches")
        .await?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pgbench_accounts WHERE bid <= $1),
                    (SELECT count(*) FROM pgbench_tellers WHERE bid <= $1),
                    (SELECT count(*) FROM pgbench_history WHERE bid <= $1)",
            &[&branches],
        )
        .await?;
    Ok(Orphans {
        accounts: row.get(0),
        tellers: row.get(1),
        history: row.get(2),
    })
}

/// The million-orphans database of the integrity and repair benchmarks: pgbench at
/// scale 100 with its foreign keys, ten branches deleted behind the database's back
/// (1,000,000 accounts and 100 tellers orphaned). `scale` other than 100 scales the
/// orphans with it (a tenth of the branches).
pub async fn million_orphans(
    url: &str,
    client: &tokio_postgres::Client,
    scale: u64,
) -> Result<Orphans, tokio_postgres::Error> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || init(&url, scale, true))
        .await
        .expect("pgbench -i task");
    let branches = i32::try_from((scale / 10).max(1)).unwrap_or(i32::MAX);
    orphan_branches(client, branches).await
}

/// Every orphaned account and teller as a referential violation, read from the
/// database a page of `page` rows at a time (by key), so the caller holds one page.
pub fn orphan_violations(
    pool: Pool,
    page: i64,
) -> BoxStream<'static, sanare_core::Result<Violation>> {
    let tables = [("pgbench_accounts", "aid"), ("pgbench_tellers", "tid")];
    let pages = futures_util::stream::try_unfold(Some((0usize, 0i32)), move |cursor| {
        let pool = pool.clone();
        async move {
            let Some((i, after)) = cursor else {
                return Ok(None);
            };
            let Some((table, key)) = tables.get(i).copied() else {
                return Ok(None);
            };
            let conn = get_conn(&pool).await?;
            let rows = conn
                .query(
                    &format!(
                        "SELECT x.{key}, x.bid FROM {table} x
                          WHERE x.{key} > $1 AND NOT EXISTS (SELECT 1 FROM pgbench_branches b WHERE b.bid = x.bid)
                          ORDER BY x.{key} LIMIT $2"
                    ),
                    &[&after, &page],
                )
                .await
                .with_context(|| format!("reading orphans of {table}"))?;
            let next = match rows.last() {
                Some(r) if rows.len() as i64 == page => Some((i, r.get::<_, i32>(0))),
                _ => Some((i + 1, 0)),
            };
            let found: Vec<Violation> = rows
                .iter()
                .map(|r| violation(table, key, r.get(0), r.get(1)))
                .collect();
            Ok::<_, sanare_core::Error>(Some((found, next)))
        }
    });
    pages
        .map_ok(|page| futures_util::stream::iter(page.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
}

fn violation(table: &str, key: &str, id: i32, bid: i32) -> Violation {
    let t = TableRef::new("public", table);
    Violation::new(
        ViolationKind::Referential {
            constraint: format!("{table}_bid_fkey"),
            columns: vec!["bid".into()],
            parent_table: TableRef::new("public", "pgbench_branches"),
            parent_columns: vec!["bid".into()],
        },
        Severity::High,
        t.clone(),
        Some(RowRef::new(
            t,
            vec![ColumnValue::new(key, "integer", Some(id.to_string()))],
        )),
        format!("{table} row references missing branch {bid}"),
    )
    .with_details(serde_json::json!({"missing_parent_key": {"bid": bid}}))
}
