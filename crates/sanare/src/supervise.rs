//! Supervision of background work: nothing sanare runs on its own dies silently.
//!
//! Two shapes of work run in the background, and each has its guard here:
//!
//! - **Loops that run until shutdown** (the scheduler, the job worker) run under
//!   [`supervise`]: a panic is logged with its message, counted in
//!   `sanare_background_task_panics_total{task}` and in the loop's
//!   [`BackgroundTaskStatus`], and the loop restarts after a backoff that doubles
//!   with each panic in a row (from `background.restart_backoff` up to a minute, or
//!   the configured backoff when it is longer).
//! - **One unit of claimed work** (a scheduled task's run, a job) runs under
//!   [`run_held`]: in a task of its own, so its panic is caught and reported as
//!   its outcome, while its claim is renewed every heartbeat. When the claim cannot
//!   be renewed (leadership lost, the claim taken over, the database unreachable
//!   for half a lease) the work is cancelled at once and aborted after a grace
//!   period, before anyone else may take the claim over.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sanare_core::Result;
use serde::{Deserialize, Serialize};
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// The state of one supervised background loop of this instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BackgroundTaskStatus {
    /// Its name (`"scheduler"`, `"job-worker"`).
    pub name: String,
    /// Whether it runs now (false while it waits to restart, and after shutdown).
    pub running: bool,
    /// Times it started, the first start included.
    pub starts: u64,
    /// Times it panicked.
    pub panics: u64,
    /// The message of its last panic.
    pub last_panic: Option<String>,
    /// When it last panicked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_panic_at: Option<time::OffsetDateTime>,
}

impl BackgroundTaskStatus {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            running: false,
            starts: 0,
            panics: 0,
            last_panic: None,
            last_panic_at: None,
        }
    }
}

/// A shared, readable status of one supervised loop.
pub(crate) type StatusCell = Arc<Mutex<BackgroundTaskStatus>>;

fn update(cell: &StatusCell, f: impl FnOnce(&mut BackgroundTaskStatus)) {
    f(&mut cell.lock().unwrap_or_else(PoisonError::into_inner));
}

/// A snapshot of a status cell.
pub(crate) fn read(cell: &StatusCell) -> BackgroundTaskStatus {
    cell.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// The message a panic carried (`panic!("…")` payloads are `&str` or `String`).
pub(crate) fn panic_message(error: JoinError) -> String {
    if !error.is_panic() {
        return error.to_string();
    }
    let payload = error.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// How long the next restart waits after `panics_in_a_row` panics.
pub(crate) fn restart_delay(base: Duration, panics_in_a_row: u32) -> Duration {
    let cap = base.max(Duration::from_secs(60));
    base.saturating_mul(1 << panics_in_a_row.saturating_sub(1).min(16))
        .min(cap)
}

/// Runs the loop `make()` builds until `shutdown`, restarting it after a panic (or
/// an unexpected end) with a growing backoff. Aborting the returned handle aborts
/// the loop too.
pub(crate) fn supervise<F, Fut>(
    name: &'static str,
    shutdown: CancellationToken,
    backoff: Duration,
    make: F,
) -> (JoinHandle<()>, StatusCell)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let status: StatusCell = Arc::new(Mutex::new(BackgroundTaskStatus::new(name)));
    let cell = status.clone();
    let handle = tokio::spawn(async move {
        let mut in_a_row = 0u32;
        loop {
            update(&cell, |s| {
                s.running = true;
                s.starts += 1;
            });
            let started = Instant::now();
            let outcome = AbortOnDropHandle::new(tokio::spawn(make())).await;
            update(&cell, |s| s.running = false);
            if shutdown.is_cancelled() {
                break;
            }
            // A loop that ran a good while before failing starts its backoff over.
            if started.elapsed() > restart_delay(backoff, u32::MAX) {
                in_a_row = 0;
            }
            in_a_row = in_a_row.saturating_add(1);
            let delay = restart_delay(backoff, in_a_row);
            match outcome {
                Ok(()) => {
                    tracing::error!(
                        task = name,
                        ?delay,
                        "background task ended before shutdown; restarting"
                    );
                }
                Err(e) => {
                    let message = panic_message(e);
                    tracing::error!(task = name, panic = %message, ?delay, "background task panicked; restarting");
                    metrics::counter!("sanare_background_task_panics_total", "task" => name)
                        .increment(1);
                    update(&cell, |s| {
                        s.panics += 1;
                        s.last_panic = Some(message);
                        s.last_panic_at = Some(sanare_core::now());
                    });
                }
            }
            metrics::counter!("sanare_background_task_restarts_total", "task" => name).increment(1);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
    });
    (handle, status)
}

/// Why claimed work stopped before it finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Interrupted {
    /// The instance is shutting down.
    Shutdown,
    /// The claim is gone: leadership lost, or the claim taken over.
    Lost,
    /// The claim could not be renewed for half a lease (the database unreachable).
    Unconfirmed,
}

impl Interrupted {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Shutdown => "the instance shut down",
            Self::Lost => "its claim was lost (leadership lost or the claim taken over)",
            Self::Unconfirmed => "its claim could not be renewed for half a lease",
        }
    }
}

/// How claimed work ended.
#[derive(Debug)]
pub(crate) enum Held<T> {
    /// It returned while its claim held (after a shutdown too, within the grace).
    Finished(Result<T>),
    /// It panicked, with this message.
    Panicked(String),
    /// It was cancelled (and aborted when it did not stop within the grace).
    Interrupted(Interrupted),
}

/// How claimed work renews its claim.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Renewal {
    /// How often the claim is renewed.
    pub(crate) every: Duration,
    /// The claim's lease: the work stops when no renewal succeeded for half of it.
    pub(crate) lease: Duration,
}

/// Runs `work` in a task of its own, calling `renew` every `renewal.every` (true:
/// the claim still holds). The work must stop when `token` is cancelled; it is
/// aborted when it has not stopped one renewal period later.
pub(crate) async fn run_held<T, W, R, RFut>(
    work: W,
    token: &CancellationToken,
    shutdown: &CancellationToken,
    renewal: Renewal,
    mut renew: R,
) -> Held<T>
where
    T: Send + 'static,
    W: Future<Output = Result<T>> + Send + 'static,
    R: FnMut() -> RFut,
    RFut: Future<Output = Result<bool>>,
{
    let mut handle = AbortOnDropHandle::new(tokio::spawn(work));
    let mut ticks =
        tokio::time::interval_at(tokio::time::Instant::now() + renewal.every, renewal.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut confirmed = Instant::now();
    let why = loop {
        tokio::select! {
            joined = &mut handle => return joined_outcome(joined),
            () = shutdown.cancelled() => break Interrupted::Shutdown,
            _ = ticks.tick() => {
                match tokio::time::timeout(renewal.every, renew()).await {
                    Ok(Ok(true)) => confirmed = Instant::now(),
                    Ok(Ok(false)) => break Interrupted::Lost,
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew a claim; retrying"),
                    Err(_) => tracing::warn!(timeout = ?renewal.every, "renewing a claim timed out; retrying"),
                }
                if confirmed.elapsed() >= renewal.lease / 2 {
                    break Interrupted::Unconfirmed;
                }
            }
        }
    };
    token.cancel();
    match tokio::time::timeout(renewal.every, &mut handle).await {
        // Work that completes at shutdown still holds its claim: keep its result.
        Ok(Ok(Ok(value))) if why == Interrupted::Shutdown => Held::Finished(Ok(value)),
        Ok(Err(e)) if e.is_panic() => Held::Panicked(panic_message(e)),
        Ok(_) => Held::Interrupted(why),
        Err(_) => {
            tracing::warn!(grace = ?renewal.every, "work did not stop when cancelled; aborting it");
            handle.abort();
            Held::Interrupted(why)
        }
    }
}

fn joined_outcome<T>(joined: std::result::Result<Result<T>, JoinError>) -> Held<T> {
    match joined {
        Ok(outcome) => Held::Finished(outcome),
        Err(e) => Held::Panicked(panic_message(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute_or_the_base() {
        let s = Duration::from_secs;
        assert_eq!(restart_delay(s(1), 1), s(1));
        assert_eq!(restart_delay(s(1), 2), s(2));
        assert_eq!(restart_delay(s(1), 4), s(8));
        assert_eq!(restart_delay(s(1), 10), s(60));
        assert_eq!(restart_delay(s(1), u32::MAX), s(60));
        assert_eq!(restart_delay(s(90), 3), s(90));
    }

    #[tokio::test]
    async fn a_panicking_loop_is_counted_and_restarted_until_shutdown() {
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (handle, status) = supervise("flaky", shutdown.clone(), Duration::from_millis(1), {
            move || {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(());
                    panic!("flaky loop broke");
                }
            }
        });
        for _ in 0..3 {
            rx.recv().await.unwrap();
        }
        shutdown.cancel();
        handle.await.unwrap();
        let s = read(&status);
        assert!(s.starts >= 3, "{s:?}");
        assert!(s.panics >= 2, "{s:?}");
        assert_eq!(s.last_panic.as_deref(), Some("flaky loop broke"));
        assert!(!s.running);
    }

    #[tokio::test]
    async fn held_work_reports_a_panic_and_stops_when_its_claim_is_lost() {
        let shutdown = CancellationToken::new();
        let renewal = Renewal {
            every: Duration::from_millis(10),
            lease: Duration::from_secs(60),
        };
        let token = CancellationToken::new();
        let panicked = run_held(
            async { panic!("job exploded") },
            &token,
            &shutdown,
            renewal,
            || async { Ok::<_, sanare_core::Error>(true) },
        )
        .await;
        assert!(
            matches!(&panicked, Held::<()>::Panicked(m) if m == "job exploded"),
            "{panicked:?}"
        );

        // Work that never ends is cancelled once its claim is lost.
        let token = CancellationToken::new();
        let cancelled = token.clone();
        let mut renewals = 0;
        let lost = run_held(
            async move {
                cancelled.cancelled().await;
                Ok::<_, sanare_core::Error>(())
            },
            &token,
            &shutdown,
            renewal,
            || {
                renewals += 1;
                let held = renewals < 3;
                async move { Ok(held) }
            },
        )
        .await;
        assert!(
            matches!(lost, Held::Interrupted(Interrupted::Lost)),
            "{lost:?}"
        );
        assert!(token.is_cancelled());

        // Work that ignores its cancellation is aborted after the grace.
        let token = CancellationToken::new();
        let ignored = run_held(
            std::future::pending::<Result<()>>(),
            &token,
            &shutdown,
            renewal,
            || async { Ok(false) },
        )
        .await;
        assert!(
            matches!(ignored, Held::Interrupted(Interrupted::Lost)),
            "{ignored:?}"
        );
    }
}
