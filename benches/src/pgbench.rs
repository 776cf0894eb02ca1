//! The pgbench fixture with foreign keys, and orphans planted behind the database's
//! back: the workload of the "one million orphans" figures (integrity and repair).

use std::path::PathBuf;
use std::process::Command;

use futures_util::{StreamExt as _, TryStreamExt as _};
use sanare_core::{BoxStream, ColumnValue, RowRef, Severity, TableRef, Violation, ViolationKind};
use sanare_pg::{PgResultExt, Pool, get_conn};

/// The `pgbench` binary (`$SANARE_PG_BINDIR/pgbench`, else from `PATH`).
pub fn binary() -> PathBuf {
    std::env::var_os("SANARE_PG_BINDIR")
        .map(|d| PathBuf::from(d).join("pgbench"))
        .unwrap_or_else(|| "pgbench".into())
}

/// `pgbench -i -q --foreign-keys -s <scale>`: `scale` branches, 10 tellers and
/// 100,000 accounts per branch, with the foreign keys of tellers, accounts and
/// history to their branch (and of history to its teller and account).
pub fn init_with_foreign_keys(url: &str, scale: u64) -> Result<(), String> {
    let out = Command::new(binary())
        .args(["-i", "-q", "--foreign-keys", "-s", &scale.to_string(), url])
        .output()
        .map_err(|e| format!("running {}: {e}", binary().display()))?;
    if !out.status.success() {
        return Err(format!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Deletes the `branches` highest-numbered branches with
/// `session_replication_role = replica`, as a bug or an operator bypassing the
/// foreign keys would: their tellers and accounts become orphans. Returns how many
/// rows are orphaned (`branches` × 100,010 for a fresh fixture).
pub async fn orphan_branches(
    client: &tokio_postgres::Client,
    branches: u64,
) -> Result<u64, tokio_postgres::Error> {
    let n = i64::try_from(branches).unwrap_or(i64::MAX);
    client
        .execute(
            "CREATE TEMP TABLE sanare_gone AS SELECT bid FROM pgbench_branches ORDER BY bid DESC LIMIT $1",
            &[&n],
        )
        .await?;
    client
        .batch_execute(
            "SET session_replication_role = replica;
             DELETE FROM pgbench_branches WHERE bid IN (SELECT bid FROM sanare_gone);
             SET session_replication_role = origin;",
        )
        .await?;
    let orphans: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM pgbench_accounts WHERE bid IN (SELECT bid FROM sanare_gone))
                  + (SELECT count(*) FROM pgbench_tellers WHERE bid IN (SELECT bid FROM sanare_gone))",
            &[],
        )
        .await?
        .get(0);
    client.batch_execute("DROP TABLE sanare_gone").await?;
    Ok(u64::try_from(orphans).unwrap_or(0))
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
