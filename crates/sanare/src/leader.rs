//! Leader election through a PostgreSQL advisory lock.
//!
//! Scheduled work (snapshots, scans, compaction, retention) runs on one instance at a
//! time: whichever holds the session advisory lock `sanare:leader:<schema>`. The lock
//! lives on a connection taken out of the pool for good, so it is released when the
//! leader releases it, drops it, or dies (its connection closes).

use sanare_core::Result;
use sanare_pg::{PgResultExt, Pool, SchemaName, get_conn};

/// Leadership, held while this value lives.
#[derive(Debug)]
pub struct LeaderLease {
    // Taken out of the pool: dropping it closes the connection (releasing the lock)
    // instead of handing a locked session to someone else.
    client: deadpool_postgres::ClientWrapper,
    key: i64,
}

impl LeaderLease {
    /// Tries to become the leader of `schema`'s instances; `None` when another
    /// instance leads.
    pub async fn try_acquire(pool: &Pool, schema: &SchemaName) -> Result<Option<Self>> {
        let key = leader_key(schema);
        let conn = get_conn(pool).await?;
        let got: bool = conn
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .context("trying the leader lock")?
            .get(0);
        if !got {
            return Ok(None);
        }
        Ok(Some(Self {
            client: deadpool_postgres::Object::take(conn),
            key,
        }))
    }

    /// Whether leadership still holds (the lock's connection is alive).
    pub async fn is_held(&self) -> bool {
        // The session lock lives exactly as long as its session.
        !self.client.is_closed() && self.client.simple_query("SELECT 1").await.is_ok()
    }

    /// Gives leadership up.
    pub async fn release(self) -> Result<()> {
        self.client
            .execute("SELECT pg_advisory_unlock($1)", &[&self.key])
            .await
            .context("releasing the leader lock")?;
        Ok(())
    }
}

fn leader_key(schema: &SchemaName) -> i64 {
    sanare_pg::advisory_key(&format!("sanare:leader:{schema}"))
}
