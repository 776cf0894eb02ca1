//! Leader election through a PostgreSQL advisory lock.
//!
//! Scheduled work (snapshots, scans, compaction, retention) runs on one instance at a
//! time: whichever holds the session advisory lock `sanare:leader:<schema>`. The lock
//! lives on a connection taken out of the pool for good, so it is released when the
//! leader releases it, drops it, or dies (its connection closes).
//!
//! The same connection holds the leader's *work locks* (see
//! [`Scheduler::task_on`](crate::Scheduler::task_on)): database-wide advisory locks
//! on the data a running task works on, so two installations in different schemas
//! never run the same task on the same data at once, and a leader that dies lets go
//! of them with its session.

use std::time::Duration;

use sanare_core::Result;
use sanare_pg::{PgResultExt, Pool, SchemaName, get_conn};

/// How long [`LeaderLease::is_held`] waits for the lock's session to answer.
const HELD_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Whether leadership still holds: the lock's session answers within 10 s.
    pub async fn is_held(&self) -> bool {
        self.is_held_within(HELD_TIMEOUT).await
    }

    /// Whether leadership still holds: the lock's session answers within
    /// `timeout`. A session that does not answer counts as lost: the server may
    /// already have ended it and given the lock to another instance.
    pub async fn is_held_within(&self, timeout: Duration) -> bool {
        // The session lock lives exactly as long as its session.
        !self.client.is_closed()
            && matches!(
                tokio::time::timeout(timeout, self.client.simple_query("SELECT 1")).await,
                Ok(Ok(_))
            )
    }

    /// Takes the work lock named `name` on the leader's session; false when
    /// another session (another installation's leader) holds it.
    pub(crate) async fn try_lock_work(&self, name: &str) -> Result<bool> {
        Ok(self
            .client
            .query_one(
                "SELECT pg_try_advisory_lock($1)",
                &[&sanare_pg::advisory_key(name)],
            )
            .await
            .context("trying a work lock")?
            .get(0))
    }

    /// Lets go of a work lock taken with [`try_lock_work`](Self::try_lock_work).
    pub(crate) async fn unlock_work(&self, name: &str) -> Result<()> {
        self.client
            .execute(
                "SELECT pg_advisory_unlock($1)",
                &[&sanare_pg::advisory_key(name)],
            )
            .await
            .context("releasing a work lock")?;
        Ok(())
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
