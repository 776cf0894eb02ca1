//! A job worker: claims jobs from a [`JobQueue`] and runs them under a renewed lease.

use std::future::Future;
use std::time::Duration;

use sanare_core::{Control, Result};
use tokio_util::sync::CancellationToken;

use crate::supervise::{Held, Interrupted, Renewal, run_held};
use crate::{Job, JobQueue};

/// Claims jobs of some kinds and runs them, one at a time, until shutdown.
///
/// While a job runs its lease is renewed every [`heartbeat`](Self::heartbeat), so a
/// job may run for hours without being claimed twice. When the lease cannot be
/// renewed (the job was taken over, or the database has been unreachable for half a
/// lease) the job's [`Control`] is cancelled at once, and the job is aborted if it
/// has not stopped one heartbeat later — before another worker may claim it.
///
/// A job that returns an error or panics is failed with the message (and claimed
/// again up to its attempt limit); a job interrupted by shutdown is given back to
/// the queue without counting the attempt.
#[derive(Clone, Debug)]
pub struct JobWorker {
    queue: JobQueue,
    name: String,
    kinds: Vec<String>,
    lease: Duration,
    heartbeat: Duration,
    poll: Duration,
}

impl JobWorker {
    /// A worker named `name` (unique among the service's workers) for jobs of
    /// `kinds`. Defaults: a 2-minute lease renewed every 20 s, polling every 5 s.
    pub fn new(queue: JobQueue, name: impl Into<String>, kinds: &[&str]) -> Self {
        Self {
            queue,
            name: name.into(),
            kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
            lease: Duration::from_secs(120),
            heartbeat: Duration::from_secs(20),
            poll: Duration::from_secs(5),
        }
    }

    /// How long a claim lasts without renewal: how soon another worker takes over a
    /// job whose worker died.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(30));
        self
    }

    /// How often a running job's lease is renewed (keep it at a third of the lease
    /// or less, so one slow renewal does not lose the job).
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every.max(Duration::from_millis(10));
        self
    }

    /// How long the worker waits when the queue is empty.
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll.max(Duration::from_millis(10));
        self
    }

    /// Runs jobs with `handler` until `shutdown` is cancelled. The handler gets the
    /// job and a [`Control`] cancelled when the job must stop; its `Ok` value is the
    /// job's result.
    pub async fn run<H, Fut>(self, shutdown: CancellationToken, handler: H)
    where
        H: Fn(Job, Control) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value>> + Send + 'static,
    {
        let kinds: Vec<&str> = self.kinds.iter().map(String::as_str).collect();
        loop {
            let claimed = tokio::select! {
                () = shutdown.cancelled() => break,
                claimed = self.queue.claim(&self.name, &kinds, self.lease) => claimed,
            };
            match claimed {
                Ok(Some(job)) => {
                    self.run_one(job, &shutdown, &handler).await;
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(worker = %self.name, error = %e, "cannot claim jobs; retrying")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    async fn run_one<H, Fut>(&self, job: Job, shutdown: &CancellationToken, handler: &H)
    where
        H: Fn(Job, Control) -> Fut,
        Fut: Future<Output = Result<serde_json::Value>> + Send + 'static,
    {
        let token = shutdown.child_token();
        let (control, _) = Control::with_token(token.clone());
        let work = handler(job.clone(), control);
        let renewal = Renewal {
            every: self.heartbeat,
            lease: self.lease,
        };
        let outcome = run_held(work, &token, shutdown, renewal, || {
            self.queue.heartbeat(&job, &self.name, self.lease)
        })
        .await;
        let label = match &outcome {
            Held::Finished(Ok(_)) => "done",
            Held::Finished(Err(_)) => "failed",
            Held::Panicked(_) => "panicked",
            Held::Interrupted(_) => "interrupted",
        };
        metrics::counter!("sanare_jobs_total", "kind" => job.kind.clone(), "outcome" => label)
            .increment(1);
        let recorded = match outcome {
            Held::Finished(Ok(result)) => self.queue.complete(&job, &self.name, result).await,
            Held::Finished(Err(e)) => {
                tracing::warn!(job = %job.id, kind = %job.kind, error = %e, "job failed");
                self.queue.fail(&job, &self.name, &e.to_string()).await
            }
            Held::Panicked(message) => {
                tracing::error!(job = %job.id, kind = %job.kind, panic = %message, "job panicked");
                self.queue
                    .fail(&job, &self.name, &format!("panicked: {message}"))
                    .await
            }
            Held::Interrupted(Interrupted::Lost) => {
                tracing::warn!(job = %job.id, kind = %job.kind, "job stopped: its claim was taken over");
                Ok(())
            }
            Held::Interrupted(why) => {
                tracing::warn!(job = %job.id, kind = %job.kind, why = why.as_str(), "job interrupted; giving it back");
                self.queue.release(&job, &self.name).await
            }
        };
        if let Err(e) = recorded {
            tracing::warn!(job = %job.id, error = %e, "cannot record a job's outcome");
        }
    }
}
