//! Scheduled work, led by one instance at a time.
//!
//! A [`Scheduler`] runs named tasks at intervals (snapshots, scans, compaction,
//! retention). Every instance runs a scheduler; only the one holding the
//! [`LeaderLease`] runs tasks, and when it dies another takes over within one poll
//! interval. When each task last ran is kept in `<schema>.scheduled_tasks`, so a new
//! leader continues the schedule instead of restarting it. A task's first run comes
//! one interval after it is first registered, not at start-up.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sanare_core::{Control, Result};
use sanare_pg::{PgResultExt, Pool, SchemaName, get_conn};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::LeaderLease;

type TaskFn =
    Arc<dyn Fn(Control) -> Pin<Box<dyn Future<Output = Result<()>> + Send>> + Send + Sync>;

struct Task {
    name: String,
    interval: Duration,
    run: TaskFn,
}

/// Runs named tasks at intervals on the leading instance.
pub struct Scheduler {
    pool: Pool,
    schema: SchemaName,
    instance: String,
    poll: Duration,
    tasks: Vec<Task>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("instance", &self.instance)
            .field(
                "tasks",
                &self
                    .tasks
                    .iter()
                    .map(|t| (&t.name, t.interval))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Scheduler {
    /// A scheduler for `instance` (a name unique among the host's instances).
    pub fn new(pool: Pool, schema: SchemaName, instance: impl Into<String>) -> Self {
        Self {
            pool,
            schema,
            instance: instance.into(),
            poll: Duration::from_secs(5),
            tasks: Vec::new(),
        }
    }

    /// How often a follower checks for leadership and a leader for due tasks
    /// (default 5 s).
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll.max(Duration::from_millis(10));
        self
    }

    /// Adds a task run every `interval`. The task gets a [`Control`] cancelled at
    /// shutdown or when leadership is lost.
    pub fn task<F, Fut>(mut self, name: impl Into<String>, interval: Duration, run: F) -> Self
    where
        F: Fn(Control) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.tasks.push(Task {
            name: name.into(),
            interval,
            run: Arc::new(move |c| Box::pin(run(c))),
        });
        self
    }

    /// Starts the scheduler loop; it stops (releasing leadership) when `shutdown`
    /// is cancelled.
    pub fn spawn(self, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move { self.run(shutdown).await })
    }

    async fn run(self, shutdown: CancellationToken) {
        let mut lease: Option<LeaderLease> = None;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if let Some(l) = &lease
                && !l.is_held().await
            {
                tracing::warn!(instance = %self.instance, "lost scheduler leadership");
                lease = None;
            }
            if lease.is_none() {
                match LeaderLease::try_acquire(&self.pool, &self.schema).await {
                    Ok(Some(l)) => {
                        tracing::info!(instance = %self.instance, "leading scheduled work");
                        lease = Some(l);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot try scheduler leadership"),
                }
            }
            if lease.is_some()
                && let Err(e) = self.run_due(&shutdown).await
            {
                tracing::warn!(error = %e, "scheduler round failed");
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.poll) => {}
            }
        }
        if let Some(l) = lease
            && let Err(e) = l.release().await
        {
            tracing::warn!(error = %e, "releasing scheduler leadership");
        }
    }

    async fn run_due(&self, shutdown: &CancellationToken) -> Result<()> {
        let table = self.schema.table("scheduled_tasks");
        for task in &self.tasks {
            let client = get_conn(&self.pool).await?;
            let interval_ms = i64::try_from(task.interval.as_millis()).unwrap_or(i64::MAX);
            // A task seen for the first time is registered, not run: its first run
            // comes one interval later (a restart loop must not snapshot each time).
            let registered = client
                .execute(
                    &format!(
                        "INSERT INTO {table} (name, last_started_at, leader) VALUES ($1, now(), $2)
                         ON CONFLICT (name) DO NOTHING"
                    ),
                    &[&task.name, &self.instance],
                )
                .await
                .context("registering a scheduled task")?;
            // Claim the run atomically: only when it is due (by the shared record).
            let due = if registered == 1 {
                0
            } else {
                client
                    .execute(
                        &format!(
                            "UPDATE {table} SET last_started_at = now(), leader = $2
                              WHERE name = $1
                                AND (last_started_at IS NULL
                                     OR last_started_at + $3::bigint * interval '1 millisecond' <= now())"
                        ),
                        &[&task.name, &self.instance, &interval_ms],
                    )
                    .await
                    .context("claiming a scheduled task")?
            };
            drop(client);
            if due == 0 {
                continue;
            }
            let (control, _) = Control::with_token(shutdown.child_token());
            let span =
                tracing::info_span!("scheduled_task", task = %task.name, instance = %self.instance);
            let outcome = tracing::Instrument::instrument((task.run)(control), span).await;
            metrics::counter!("sanare_scheduled_task_runs_total", "task" => task.name.clone(), "ok" => outcome.is_ok().to_string()).increment(1);
            let (label, error) = match &outcome {
                Ok(()) => ("ok", None),
                Err(e) => ("failed", Some(e.to_string())),
            };
            let client = get_conn(&self.pool).await?;
            client
                .execute(
                    &format!("UPDATE {table} SET last_finished_at = now(), last_outcome = $2, last_error = $3 WHERE name = $1"),
                    &[&task.name, &label, &error],
                )
                .await
                .context("recording a scheduled task outcome")?;
            if let Err(e) = outcome {
                tracing::warn!(task = %task.name, error = %e, "scheduled task failed");
            }
        }
        Ok(())
    }
}
