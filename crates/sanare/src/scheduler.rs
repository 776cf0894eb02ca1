//! Scheduled work, led by one instance at a time.
//!
//! A [`Scheduler`] runs named tasks at intervals (snapshots, scans, compaction,
//! retention). Every instance runs a scheduler; only the one holding the
//! [`LeaderLease`] runs tasks, and when it dies another takes over within one poll
//! interval. When each task last ran is kept in `<schema>.scheduled_tasks`, so a new
//! leader continues the schedule instead of restarting it. A task's first run comes
//! one interval after it is first registered, not at start-up.
//!
//! # One run at a time, each run finished once
//!
//! A run is claimed in its task's row (`run_id`, `running_until`) and the claim is
//! renewed every heartbeat while the run goes on, so a run longer than the lease is
//! never started twice. The leader checks its leadership at every heartbeat too: a
//! leader that lost it (its lock's session ended or stopped answering) cancels the
//! running task at once and aborts it one heartbeat later. A run interrupted that way
//! or by shutdown is handed back; a run whose leader died is taken over once its
//! claim expires. Either way the next leader resumes that same run (the schedule does
//! not move), up to 3 attempts; a run abandoned 3 times is finished as `abandoned`
//! and the task waits for its next interval. A run's outcome is written only by the
//! holder of its claim.
//!
//! A task added with [`Scheduler::task_on`] also holds a database-wide work lock on
//! the data it works on while it runs, so two installations of sanare in different
//! schemas of one database never run the same task on the same data at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sanare_core::{Control, Result};
use sanare_pg::{PgResultExt, Pool, SchemaName, get_conn};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::LeaderLease;
use crate::supervise::{Held, Renewal, run_held};

type TaskFn =
    Arc<dyn Fn(Control) -> Pin<Box<dyn Future<Output = Result<()>> + Send>> + Send + Sync>;

/// Attempts at one run before it is finished as abandoned.
const MAX_ATTEMPTS: i32 = 3;

#[derive(Clone)]
struct Task {
    name: String,
    /// The work lock held while it runs, for tasks on shared data.
    work_lock: Option<String>,
    interval: Duration,
    run: TaskFn,
}

/// Runs named tasks at intervals on the leading instance.
#[derive(Clone)]
pub struct Scheduler {
    pool: Pool,
    schema: SchemaName,
    instance: String,
    poll: Duration,
    renewal: Renewal,
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

/// What the round does after a task.
enum Next {
    Continue,
    /// Leadership or the database is in doubt, or shutdown: end the round.
    Stop,
}

impl Scheduler {
    /// A scheduler for `instance` (a name unique among the host's instances).
    pub fn new(pool: Pool, schema: SchemaName, instance: impl Into<String>) -> Self {
        Self {
            pool,
            schema,
            instance: instance.into(),
            poll: Duration::from_secs(5),
            renewal: Renewal {
                every: Duration::from_secs(20),
                lease: Duration::from_secs(120),
            },
            tasks: Vec::new(),
        }
    }

    /// How often a follower checks for leadership and a leader for due tasks
    /// (default 5 s).
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll.max(Duration::from_millis(10));
        self
    }

    /// How long a run's claim lasts without renewal: how soon after a leader died
    /// its interrupted run is resumed elsewhere (default 2 min).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.renewal.lease = lease.max(Duration::from_millis(30));
        self
    }

    /// How often a running task's claim is renewed and leadership checked: how soon
    /// a leader that lost leadership stops its task (default 20 s; keep it at a
    /// third of the lease or less).
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.renewal.every = every.max(Duration::from_millis(10));
        self
    }

    /// Adds a task run every `interval`. The task gets a [`Control`] cancelled at
    /// shutdown or when leadership is lost; it must stop then.
    pub fn task<F, Fut>(self, name: impl Into<String>, interval: Duration, run: F) -> Self
    where
        F: Fn(Control) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.add(name.into(), None, interval, run)
    }

    /// Adds a task run every `interval` on `data`: a stable description of what it
    /// works on (the host schemas a snapshot covers). While it runs the leader holds
    /// the database-wide work lock `(name, data)`; a leader of another schema whose
    /// task of the same name works on the same data skips its run while the lock is
    /// held and tries again at its next poll.
    pub fn task_on<F, Fut>(
        self,
        name: impl Into<String>,
        data: impl AsRef<str>,
        interval: Duration,
        run: F,
    ) -> Self
    where
        F: Fn(Control) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let name = name.into();
        let lock = format!("sanare:work:{name}:{}", data.as_ref());
        self.add(name, Some(lock), interval, run)
    }

    fn add<F, Fut>(
        mut self,
        name: String,
        work_lock: Option<String>,
        interval: Duration,
        run: F,
    ) -> Self
    where
        F: Fn(Control) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.tasks.push(Task {
            name,
            work_lock,
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

    /// The scheduler loop, until `shutdown` is cancelled (then leadership is
    /// released and a running task handed back to the next leader).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut lease: Option<LeaderLease> = None;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if let Some(l) = &lease
                && !l.is_held_within(self.renewal.every).await
            {
                tracing::warn!(instance = %self.instance, "lost scheduler leadership");
                metrics::counter!("sanare_scheduler_leadership_lost_total").increment(1);
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
            if let Some(l) = &lease {
                for task in &self.tasks {
                    match self.run_task(l, task, &shutdown).await {
                        Ok(Next::Continue) => {}
                        Ok(Next::Stop) => break,
                        Err(e) => {
                            tracing::warn!(task = %task.name, error = %e, "scheduler round failed");
                            break;
                        }
                    }
                }
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

    /// Runs `task` when it is due (or an abandoned run of it can be resumed).
    async fn run_task(
        &self,
        lease: &LeaderLease,
        task: &Task,
        shutdown: &CancellationToken,
    ) -> Result<Next> {
        if shutdown.is_cancelled() {
            return Ok(Next::Stop);
        }
        if let Some(lock) = &task.work_lock
            && !lease.try_lock_work(lock).await?
        {
            tracing::info!(task = %task.name, "another installation runs this task on the same data now; trying again later");
            return Ok(Next::Continue);
        }
        let outcome = self.claim_and_run(lease, task, shutdown).await;
        if let Some(lock) = &task.work_lock
            && let Err(e) = lease.unlock_work(lock).await
        {
            // A dead session has let go of it already; leadership is in doubt.
            tracing::warn!(task = %task.name, error = %e, "cannot release a work lock");
            return outcome.map(|_| Next::Stop);
        }
        outcome
    }

    async fn claim_and_run(
        &self,
        lease: &LeaderLease,
        task: &Task,
        shutdown: &CancellationToken,
    ) -> Result<Next> {
        let table = self.schema.table("scheduled_tasks");
        let run_id = Uuid::now_v7();
        let Some(claim) = self.claim(&table, task, run_id).await? else {
            return Ok(Next::Continue);
        };
        if let Some(previous) = &claim.resumed_from {
            tracing::warn!(task = %task.name, %previous, attempt = claim.attempt, "resuming a run its leader abandoned");
        }
        let token = shutdown.child_token();
        let (control, _) = Control::with_token(token.clone());
        let span = tracing::info_span!("scheduled_task", task = %task.name, instance = %self.instance, run = %run_id);
        let work = tracing::Instrument::instrument((task.run)(control), span);
        let held = run_held(work, &token, shutdown, self.renewal, || {
            self.renew(lease, &table, &task.name, run_id)
        })
        .await;
        let (label, error, next) = match &held {
            Held::Finished(Ok(())) => ("ok", None, Next::Continue),
            Held::Finished(Err(e)) => ("failed", Some(e.to_string()), Next::Continue),
            Held::Panicked(m) => ("panicked", Some(format!("panicked: {m}")), Next::Continue),
            Held::Interrupted(why) => ("interrupted", Some(why.as_str().to_owned()), Next::Stop),
        };
        metrics::counter!("sanare_scheduled_task_runs_total", "task" => task.name.clone(), "outcome" => label).increment(1);
        match &held {
            Held::Finished(Err(e)) => {
                tracing::warn!(task = %task.name, error = %e, "scheduled task failed");
            }
            Held::Panicked(m) => {
                tracing::error!(task = %task.name, panic = %m, "scheduled task panicked");
                metrics::counter!("sanare_background_task_panics_total", "task" => task.name.clone()).increment(1);
            }
            Held::Interrupted(why) => {
                tracing::warn!(task = %task.name, why = why.as_str(), "scheduled task interrupted; the next leader resumes it");
            }
            Held::Finished(Ok(())) => {}
        }
        let client = get_conn(&self.pool).await?;
        let written = if let Held::Interrupted(_) = held {
            // Hand the run back: the claim expires now and the attempt does not
            // count, so the next leader resumes it at once.
            client
                .execute(
                    &format!(
                        "UPDATE {table} SET running_until = now(), attempts = attempts - 1,
                                last_outcome = $3, last_error = $4
                          WHERE name = $1 AND run_id = $2"
                    ),
                    &[&task.name, &run_id, &label, &error],
                )
                .await
                .context("handing a scheduled run back")?
        } else {
            let panicked = i64::from(matches!(held, Held::Panicked(_)));
            client
                .execute(
                    &format!(
                        "UPDATE {table} SET last_finished_at = now(), last_outcome = $3, last_error = $4,
                                run_id = NULL, running_until = NULL, panics = panics + $5
                          WHERE name = $1 AND run_id = $2"
                    ),
                    &[&task.name, &run_id, &label, &error, &panicked],
                )
                .await
                .context("recording a scheduled task outcome")?
        };
        if written == 0 {
            tracing::warn!(task = %task.name, "the run was taken over; its outcome is not recorded");
            return Ok(Next::Stop);
        }
        Ok(next)
    }

    /// Renews the claim of run `run_id`: false when leadership or the claim is gone.
    async fn renew(
        &self,
        lease: &LeaderLease,
        table: &str,
        name: &str,
        run_id: Uuid,
    ) -> Result<bool> {
        if !lease.is_held_within(self.renewal.every).await {
            return Ok(false);
        }
        let n = get_conn(&self.pool)
            .await?
            .execute(
                &format!(
                    "UPDATE {table} SET running_until = now() + $3::bigint * interval '1 millisecond'
                      WHERE name = $1 AND run_id = $2"
                ),
                &[&name, &run_id, &millis(self.renewal.lease)],
            )
            .await
            .context("renewing a scheduled run's claim")?;
        Ok(n == 1)
    }

    /// Claims a due run of `task`, or resumes its abandoned one.
    async fn claim(&self, table: &str, task: &Task, run_id: Uuid) -> Result<Option<Claim>> {
        let client = get_conn(&self.pool).await?;
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
        if registered == 1 {
            return Ok(None);
        }
        let abandoned = client
            .execute(
                &format!(
                    "UPDATE {table} SET run_id = NULL, running_until = NULL, last_finished_at = now(),
                            last_outcome = 'abandoned',
                            last_error = format('abandoned: the claim of %s expired on attempt %s of %s; '
                                                'the next run comes at the next interval', leader, attempts, $2::int)
                      WHERE name = $1 AND run_id IS NOT NULL AND running_until < now() AND attempts >= $2"
                ),
                &[&task.name, &MAX_ATTEMPTS],
            )
            .await
            .context("finishing an abandoned scheduled run")?;
        if abandoned > 0 {
            tracing::error!(task = %task.name, attempts = MAX_ATTEMPTS, "a scheduled run was abandoned on every attempt; it waits for its next interval");
        }
        // Atomic: only when due by the shared record, or abandoned by a leader
        // whose claim expired. A resumed run keeps its start (the schedule stays).
        let row = client
            .query_opt(
                &format!(
                    "WITH old AS (SELECT name, leader, run_id FROM {table} WHERE name = $1 FOR UPDATE)
                     UPDATE {table} t SET run_id = $2, leader = $3,
                            running_until = now() + $5::bigint * interval '1 millisecond',
                            attempts = CASE WHEN t.run_id IS NULL THEN 1 ELSE t.attempts + 1 END,
                            last_started_at = CASE WHEN t.run_id IS NULL THEN now() ELSE t.last_started_at END
                       FROM old
                      WHERE t.name = old.name
                        AND ((t.run_id IS NULL
                              AND (t.last_started_at IS NULL
                                   OR t.last_started_at + $4::bigint * interval '1 millisecond' <= now()))
                          OR (t.run_id IS NOT NULL AND t.running_until < now()))
                  RETURNING t.attempts, CASE WHEN old.run_id IS NULL THEN NULL ELSE old.leader END"
                ),
                &[
                    &task.name,
                    &run_id,
                    &self.instance,
                    &millis(task.interval),
                    &millis(self.renewal.lease),
                ],
            )
            .await
            .context("claiming a scheduled task")?;
        Ok(row.map(|r| Claim {
            attempt: r.get(0),
            resumed_from: r.get(1),
        }))
    }
}

/// A claimed run.
struct Claim {
    attempt: i32,
    /// The leader whose abandoned run this resumes.
    resumed_from: Option<String>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
