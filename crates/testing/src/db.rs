use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::{Client, NoTls};

/// A fresh database for one test, dropped (`DROP DATABASE … WITH (FORCE)`) when this
/// value is dropped.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
    pool: Option<Pool>,
}

/// The URL of a database on the shared test server where databases may be created:
/// `DATABASE_URL` when set, else the throwaway cluster of this process.
///
/// # Panics
/// When no server is available; the message says what to install.
pub fn admin_url() -> String {
    match crate::cluster::shared_admin_url() {
        Ok(url) => url,
        Err(e) => panic!("sanare-testing: no PostgreSQL for tests: {e}"),
    }
}

/// A fresh, empty database on a real PostgreSQL server.
///
/// # Panics
/// When no server can be reached or started (tests want the failure loud); the
/// message says why and what to do.
pub async fn test_db() -> TestDb {
    test_db_on(&admin_url()).await
}

/// A fresh, empty database on the server of `admin_url` (a superuser's URL, e.g.
/// of a [`Cluster`](crate::cluster::Cluster) a test started with settings of its own).
///
/// # Panics
/// When the server cannot be reached or the database created.
pub async fn test_db_on(admin_url: &str) -> TestDb {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let admin_url = admin_url.to_owned();
    let name = format!(
        "sanare_test_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        &uuid::Uuid::now_v7().simple().to_string()[24..]
    );
    let admin = connect(&admin_url).await;
    if let Err(e) = admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"))
        .await
    {
        panic!("sanare-testing: cannot create test database {name}: {e}");
    }
    let url = with_dbname(&admin_url, &name);
    let config: tokio_postgres::Config = match url.parse() {
        Ok(c) => c,
        Err(e) => panic!("sanare-testing: bad test database URL: {e}"),
    };
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = match Pool::builder(manager).max_size(16).build() {
        Ok(pool) => pool,
        Err(e) => panic!("sanare-testing: cannot build a pool: {e}"),
    };
    TestDb {
        name,
        url,
        admin_url,
        pool: Some(pool),
    }
}

impl TestDb {
    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection URL for this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A pool of up to 16 connections to this database.
    pub fn pool(&self) -> &Pool {
        match &self.pool {
            Some(pool) => pool,
            None => unreachable!("the pool lives until drop"),
        }
    }

    /// A pooled connection.
    pub async fn client(&self) -> Object {
        match self.pool().get().await {
            Ok(c) => c,
            Err(e) => panic!("sanare-testing: cannot connect to {}: {e}", self.name),
        }
    }

    /// A new, unpooled connection (for tests that need to own or kill one).
    pub async fn connect(&self) -> Client {
        connect(&self.url).await
    }

    /// Drops the database now, reporting failure instead of only logging it.
    pub async fn close(mut self) -> Result<(), tokio_postgres::Error> {
        if let Some(pool) = self.pool.take() {
            pool.close();
        }
        let result = drop_database(&self.admin_url, &self.name).await;
        self.name.clear();
        result
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.close();
        }
        if self.name.is_empty() {
            return;
        }
        let admin_url = self.admin_url.clone();
        let name = std::mem::take(&mut self.name);
        // Drop runs inside the test's runtime, which cannot be blocked on; drop the
        // database from a thread with its own runtime and wait for it.
        let joined = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match rt {
                Ok(rt) => rt
                    .block_on(drop_database(&admin_url, &name))
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .join();
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("sanare-testing: could not drop test database: {e}"),
            Err(_) => eprintln!("sanare-testing: the thread dropping a test database panicked"),
        }
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<(), tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(admin_url, NoTls).await?;
    let task = tokio::spawn(conn);
    let result = client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await;
    drop(client);
    let _ = task.await;
    result
}

async fn connect(url: &str) -> Client {
    match tokio_postgres::connect(url, NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        Err(e) => panic!("sanare-testing: cannot connect to the test server: {e}"),
    }
}

/// `url` with its database replaced by `dbname`; works for `postgres://` URLs and
/// for `key=value` connection strings.
pub fn with_dbname(url: &str, dbname: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let authority = before_query.split('/').next().unwrap_or(before_query);
        let mut out = format!("{scheme}://{authority}/{dbname}");
        if let Some(q) = query {
            // Drop a `dbname=` parameter, which would override the path.
            let kept: Vec<&str> = q
                .split('&')
                .filter(|kv| !kv.starts_with("dbname="))
                .collect();
            if !kept.is_empty() {
                out.push('?');
                out.push_str(&kept.join("&"));
            }
        }
        out
    } else {
        let kept: Vec<&str> = url
            .split_whitespace()
            .filter(|kv| !kv.starts_with("dbname="))
            .collect();
        format!("{} dbname={dbname}", kept.join(" "))
            .trim()
            .to_owned()
    }
}

/// The statements `pg_stat_statements` counted in `client`'s current database
/// whose text matches `filter` (an SQL condition over the column `query`); the
/// extension must be installed there. For tests that show a statement never ran.
///
/// # Panics
/// When the query fails (the extension missing, a bad filter).
#[allow(clippy::expect_used)]
pub async fn statements_counted(client: &Client, filter: &str) -> Vec<String> {
    client
        .query(
            &format!(
                "SELECT query FROM pg_stat_statements
                  WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND ({filter})"
            ),
            &[],
        )
        .await
        .expect("reading pg_stat_statements")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dbname_is_replaced_in_both_url_forms() {
        assert_eq!(
            with_dbname("postgres://u:p@h:1/postgres?sslmode=disable", "t1"),
            "postgres://u:p@h:1/t1?sslmode=disable"
        );
        assert_eq!(with_dbname("postgres://h", "t1"), "postgres://h/t1");
        assert_eq!(
            with_dbname("postgresql://h/x?dbname=y&application_name=a", "t"),
            "postgresql://h/t?application_name=a"
        );
        assert_eq!(
            with_dbname("host=h dbname=postgres user=u", "t"),
            "host=h user=u dbname=t"
        );
    }
}
