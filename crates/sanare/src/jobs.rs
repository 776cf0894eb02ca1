//! Chunk jobs any instance can claim: large work (a scan of a big table) is split
//! into jobs in `<schema>.jobs`, and every instance claims the next one with
//! `FOR UPDATE SKIP LOCKED`, so instances never wait on each other and never take the
//! same job. A claim is a lease that its worker renews ([`JobQueue::heartbeat`])
//! while the job runs, so a job may run as long as it needs: only a job whose worker
//! stopped renewing (it died, hung, or lost the database) is claimed again once its
//! lease expires, up to its attempt limit. A job abandoned on its last attempt is
//! finished as failed, with the reason, so every batch finishes.
//!
//! Every change of a claimed job names the claim (worker and attempt): a worker
//! whose job was taken over can neither renew, complete nor fail it any more.

use std::time::Duration;

use sanare_core::{Error, Result};
use sanare_pg::{PgResultExt, Pool, SchemaName, get_conn};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A claimed job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Job {
    /// Its id.
    pub id: Uuid,
    /// The batch it belongs to.
    pub batch: Uuid,
    /// Its kind (`"integrity.chunk"`).
    pub kind: String,
    /// What to do.
    pub payload: serde_json::Value,
    /// Claims so far, this one included.
    pub attempts: i32,
}

/// Progress of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BatchStatus {
    /// Waiting.
    pub queued: u64,
    /// Claimed and leased.
    pub running: u64,
    /// Finished.
    pub done: u64,
    /// Failed for good.
    pub failed: u64,
}

impl BatchStatus {
    /// Whether every job has finished (done or failed).
    pub fn is_finished(&self) -> bool {
        self.queued == 0 && self.running == 0
    }
}

/// The job queue in sanare's schema.
#[derive(Clone, Debug)]
pub struct JobQueue {
    pool: Pool,
    table: String,
}

impl JobQueue {
    /// The queue in `schema` (created by the facade's migrations).
    pub fn new(pool: Pool, schema: &SchemaName) -> Self {
        Self {
            pool,
            table: schema.table("jobs"),
        }
    }

    /// Enqueues one job per payload as one batch, in one statement.
    pub async fn enqueue_batch(&self, kind: &str, payloads: &[serde_json::Value]) -> Result<Uuid> {
        let batch = Uuid::now_v7();
        let ids: Vec<Uuid> = payloads.iter().map(|_| Uuid::now_v7()).collect();
        let client = get_conn(&self.pool).await?;
        client
            .execute(
                &format!(
                    "INSERT INTO {} (id, batch_id, kind, payload)
                     SELECT id, $1, $2, payload FROM unnest($3::uuid[], $4::jsonb[]) AS t(id, payload)",
                    self.table
                ),
                &[&batch, &kind, &ids, &payloads],
            )
            .await
            .context("enqueueing jobs")?;
        Ok(batch)
    }

    /// Claims the oldest claimable job of one of `kinds` for `worker`, leased for
    /// `lease`. Returns `None` when there is nothing to do. Jobs abandoned on their
    /// last attempt are finished as failed first (see [`reap_abandoned`](Self::reap_abandoned)).
    pub async fn claim(
        &self,
        worker: &str,
        kinds: &[&str],
        lease: Duration,
    ) -> Result<Option<Job>> {
        self.reap_abandoned().await?;
        let kinds: Vec<String> = kinds.iter().map(|k| (*k).to_owned()).collect();
        let lease_ms = millis(lease);
        let client = get_conn(&self.pool).await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE {t} SET status = 'running', claimed_by = $1, attempts = attempts + 1,
                            lease_until = now() + $3::bigint * interval '1 millisecond'
                      WHERE id = (
                            SELECT id FROM {t}
                             WHERE kind = ANY($2)
                               AND (status = 'queued'
                                    OR (status = 'running' AND lease_until < now()))
                               AND attempts < max_attempts
                             ORDER BY created_at
                             LIMIT 1
                             FOR UPDATE SKIP LOCKED)
                  RETURNING id, batch_id, kind, payload, attempts",
                    t = self.table
                ),
                &[&worker, &kinds, &lease_ms],
            )
            .await
            .context("claiming a job")?;
        Ok(row.map(|r| Job {
            id: r.get(0),
            batch: r.get(1),
            kind: r.get(2),
            payload: r.get(3),
            attempts: r.get(4),
        }))
    }

    /// Renews the lease of a job `worker` runs, to `lease` from now. Returns false
    /// when the claim is no longer `worker`'s (its lease expired and the job was
    /// claimed again, or finished as abandoned): the worker must stop the job.
    pub async fn heartbeat(&self, job: &Job, worker: &str, lease: Duration) -> Result<bool> {
        let client = get_conn(&self.pool).await?;
        let n = client
            .execute(
                &format!(
                    "UPDATE {} SET lease_until = now() + $4::bigint * interval '1 millisecond'
                      WHERE id = $1 AND claimed_by = $2 AND attempts = $3 AND status = 'running'",
                    self.table
                ),
                &[&job.id, &worker, &job.attempts, &millis(lease)],
            )
            .await
            .context("renewing a job's lease")?;
        Ok(n == 1)
    }

    /// Finishes as failed every running job whose lease expired on its last
    /// attempt (its worker died or hung every time), with the reason in `error`,
    /// so its batch finishes. Returns how many. [`claim`](Self::claim) calls it.
    pub async fn reap_abandoned(&self) -> Result<u64> {
        let client = get_conn(&self.pool).await?;
        let n = client
            .execute(
                &format!(
                    "UPDATE {} SET status = 'failed', finished_at = now(), lease_until = NULL,
                            error = format('abandoned: the lease of %s expired on attempt %s of %s, '
                                           'and no attempt is left', claimed_by, attempts, max_attempts)
                      WHERE status = 'running' AND lease_until < now() AND attempts >= max_attempts",
                    self.table
                ),
                &[],
            )
            .await
            .context("finishing abandoned jobs")?;
        if n > 0 {
            tracing::warn!(
                jobs = n,
                "jobs abandoned on their last attempt finished as failed"
            );
            metrics::counter!("sanare_jobs_abandoned_total").increment(n);
        }
        Ok(n)
    }

    /// Gives a job `worker` holds back to the queue without counting the attempt
    /// (the worker is shutting down): another worker claims it at once.
    pub async fn release(&self, job: &Job, worker: &str) -> Result<()> {
        let client = get_conn(&self.pool).await?;
        let n = client
            .execute(
                &format!(
                    "UPDATE {} SET status = 'queued', attempts = attempts - 1, lease_until = NULL
                      WHERE id = $1 AND claimed_by = $2 AND attempts = $3 AND status = 'running'",
                    self.table
                ),
                &[&job.id, &worker, &job.attempts],
            )
            .await
            .context("releasing a job")?;
        if n == 0 {
            return Err(not_held(job, worker));
        }
        Ok(())
    }

    /// Marks a job done with its result. Fails with a conflict when `worker` no
    /// longer holds it (its lease expired and another worker claimed it).
    pub async fn complete(&self, job: &Job, worker: &str, result: serde_json::Value) -> Result<()> {
        self.finish(job, worker, "done", Some(result), None).await
    }

    /// Marks a job failed; it is claimable again until its attempt limit.
    pub async fn fail(&self, job: &Job, worker: &str, error: &str) -> Result<()> {
        self.finish(job, worker, "failed", None, Some(error)).await
    }

    async fn finish(
        &self,
        job: &Job,
        worker: &str,
        status: &str,
        result: Option<serde_json::Value>,
        error: Option<&str>,
    ) -> Result<()> {
        let client = get_conn(&self.pool).await?;
        let n = client
            .execute(
                &format!(
                    "UPDATE {} SET
                        status = CASE WHEN $3 = 'failed' AND attempts < max_attempts THEN 'queued' ELSE $3 END,
                        result = $4, error = $5, finished_at = now(), lease_until = NULL
                      WHERE id = $1 AND claimed_by = $2 AND attempts = $6 AND status = 'running'",
                    self.table
                ),
                &[&job.id, &worker, &status, &result, &error, &job.attempts],
            )
            .await
            .context("finishing a job")?;
        if n == 0 {
            return Err(not_held(job, worker));
        }
        Ok(())
    }

    /// How far a batch is.
    pub async fn batch_status(&self, batch: Uuid) -> Result<BatchStatus> {
        let client = get_conn(&self.pool).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT status, count(*) FROM {} WHERE batch_id = $1 GROUP BY status",
                    self.table
                ),
                &[&batch],
            )
            .await
            .context("reading batch status")?;
        let mut s = BatchStatus::default();
        for r in rows {
            let n = u64::try_from(r.get::<_, i64>(1)).unwrap_or(0);
            match r.get::<_, &str>(0) {
                "queued" => s.queued = n,
                "running" => s.running = n,
                "done" => s.done = n,
                _ => s.failed = n,
            }
        }
        Ok(s)
    }

    /// The results of a batch's finished jobs, with the workers that ran them.
    pub async fn batch_results(&self, batch: Uuid) -> Result<Vec<(String, serde_json::Value)>> {
        let client = get_conn(&self.pool).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT claimed_by, result FROM {} WHERE batch_id = $1 AND status = 'done' ORDER BY created_at",
                    self.table
                ),
                &[&batch],
            )
            .await
            .context("reading batch results")?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, Option<String>>(0).unwrap_or_default(),
                    r.get::<_, Option<serde_json::Value>>(1).unwrap_or_default(),
                )
            })
            .collect())
    }
}

fn not_held(job: &Job, worker: &str) -> Error {
    Error::conflict(format!(
        "job {} (attempt {}) is no longer held by {worker} (its lease expired)",
        job.id, job.attempts
    ))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
