//! The WAL's pipelined group commit: groups written to the active segment and
//! waiting for their `fdatasync`, the sync threads that run those `fdatasync`s
//! (up to `depth` at once, so the disk flushes one group while the writer thread
//! writes the next), and the answering of callers strictly in position order.
//!
//! # Invariants
//! - Sync `n` is started by the writer only after group `n`'s `pwrite` returned, and
//!   groups are written one after another by one thread: a successful sync `n`
//!   therefore covers every group `≤ n`. `durable` is the highest sync number that
//!   succeeded, and every pending group with `sync ≤ durable` is answered.
//! - Groups leave `pending` from the front only, under the state lock, into
//!   `ready`, which one thread at a time answers outside the lock: replies, the
//!   durable head, the active segment's in-memory index, metrics and
//!   `JournalRecorded` events advance in position order.
//! - Each sync thread flushes through its own open file description of the segment
//!   (not a `dup`): Linux reports a writeback error once per open file description,
//!   so a concurrent `fdatasync` on a shared descriptor could consume the error and
//!   let the other one return success for lost data.
//! - The first failed sync sets `failed`: every pending group fails, no later sync
//!   result is trusted and the writer stops accepting entries.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::{Duration, Instant};

use sanare_core::{Error, EventBus, Result};

use crate::entry::{JournalEntry, Recorded};
use crate::wal::{Checkpoints, Reply, Shared};

/// An I/O step of the writer, as seen by a fault hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FaultPoint {
    /// The `pwrite` of the group that sync number `group` will make durable.
    Write { group: u64 },
    /// Sync number `sync`, before its `fdatasync`.
    Sync { sync: u64 },
}

type FaultFn = dyn Fn(FaultPoint) -> std::io::Result<()> + Send + Sync;

/// An optional hook that can fail (or hold up) the writer's I/O; tests only.
#[derive(Clone, Default)]
pub(crate) struct Faults(Option<Arc<FaultFn>>);

impl Faults {
    #[cfg(feature = "testing")]
    pub(crate) fn new(hook: Arc<FaultFn>) -> Self {
        Self(Some(hook))
    }

    pub(crate) fn check(&self, at: FaultPoint) -> std::io::Result<()> {
        match &self.0 {
            Some(hook) => hook(at),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Faults(hook)"
        } else {
            "Faults(none)"
        })
    }
}

/// One group commit: callers whose entries were written by one `pwrite`, answered
/// once sync number `sync` (or a later one) has succeeded.
pub(crate) struct Group {
    /// The sync that makes this group durable (for a group with nothing written,
    /// the last one started before it: it is answered after the groups before it).
    pub(crate) sync: u64,
    /// Data length of the active segment once this group is durable.
    pub(crate) end: u64,
    /// The entries written, in position order.
    pub(crate) entries: Vec<JournalEntry>,
    /// Each caller with its answer (an error already for a group whose write failed).
    pub(crate) replies: Vec<(Reply, Result<Recorded>)>,
}

/// A failed sync: what the error said.
#[derive(Clone)]
struct Failure {
    kind: std::io::ErrorKind,
    message: String,
}

struct State {
    /// Groups written and not settled yet, in position order.
    pending: VecDeque<Group>,
    /// Groups settled (durable, or failed), waiting to be answered, in order.
    ready: VecDeque<Group>,
    /// Whether a thread is answering groups (one at a time, outside the lock).
    answering: bool,
    /// The highest sync number that succeeded.
    durable: u64,
    /// Sync threads with nothing to do.
    idle: Vec<usize>,
    /// When each busy sync thread got its group (indexed by slot).
    started: Vec<Option<Instant>>,
    /// Moving average of a sync's duration, in nanoseconds.
    sync_ns: u64,
    /// The first failed sync.
    failed: Option<Failure>,
}

/// A request to a sync thread: `fdatasync` through `file`, then report `sync`.
pub(crate) struct SyncJob {
    pub(crate) sync: u64,
    pub(crate) file: Arc<dyn sanare_fs::File>,
}

/// The groups in flight and the threads syncing them.
pub(crate) struct Pipeline {
    state: Mutex<State>,
    /// Signalled when a sync finishes.
    changed: Condvar,
    depth: usize,
    shared: Arc<Shared>,
    events: Option<EventBus>,
    faults: Faults,
    /// Asks for a checkpoint of the active segment as it grows.
    checkpoints: Mutex<Checkpoints>,
    /// Hands answered groups' replies to a task on the multi-threaded runtime the
    /// journal was opened on (see [`Answerer`]); `None` outside one.
    answerer: Option<Answerer>,
}

/// Sends the callers' answers from a task of the runtime they wait on: a wake-up
/// from a runtime worker queues the woken task locally, where one from the sync
/// thread wakes a parked worker through the kernel, once per caller (a group of a
/// hundred callers cost a hundred futex wake-ups and the context switches that
/// follow). Only on a multi-threaded runtime, whose workers keep polling while a
/// caller blocks; a reply the task can no longer take (its runtime shut down) is
/// sent from the sync thread as before.
struct Answerer(tokio::sync::mpsc::UnboundedSender<Vec<(Reply, Result<Recorded>)>>);

impl Answerer {
    fn start() -> Option<Self> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return None;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<(Reply, Result<Recorded>)>>();
        handle.spawn(async move {
            while let Some(replies) = rx.recv().await {
                for (reply, r) in replies {
                    let _ = reply.send(r);
                }
            }
        });
        Some(Self(tx))
    }

    /// Hands `replies` over; gives them back when the task is gone.
    fn send(
        &self,
        replies: Vec<(Reply, Result<Recorded>)>,
    ) -> std::result::Result<(), Vec<(Reply, Result<Recorded>)>> {
        self.0.send(replies).map_err(|e| e.0)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pipeline {
    /// Starts `depth` sync threads. Returns the pipeline and one job sender per
    /// sync thread (dropping them stops the threads).
    pub(crate) fn start(
        depth: usize,
        shared: Arc<Shared>,
        events: Option<EventBus>,
        faults: Faults,
        checkpoints: Checkpoints,
    ) -> Result<(Arc<Self>, Vec<mpsc::Sender<SyncJob>>)> {
        let depth = depth.max(1);
        let pipeline = Arc::new(Self {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                ready: VecDeque::new(),
                answering: false,
                durable: 0,
                idle: (0..depth).rev().collect(),
                started: vec![None; depth],
                sync_ns: 0,
                failed: None,
            }),
            changed: Condvar::new(),
            depth,
            shared,
            events,
            faults,
            checkpoints: Mutex::new(checkpoints),
            answerer: Answerer::start(),
        });
        let mut senders = Vec::with_capacity(depth);
        for slot in 0..depth {
            let (tx, rx) = mpsc::channel::<SyncJob>();
            let p = pipeline.clone();
            std::thread::Builder::new()
                .name(format!("sanare-journal-sync-{slot}"))
                .spawn(move || p.sync_thread(slot, &rx))
                .map_err(|e| Error::io("starting a journal sync thread", e))?;
            senders.push(tx);
        }
        Ok((pipeline, senders))
    }

    pub(crate) fn faults(&self) -> &Faults {
        &self.faults
    }

    fn sync_thread(&self, slot: usize, jobs: &mpsc::Receiver<SyncJob>) {
        while let Ok(job) = jobs.recv() {
            // A panic (of a test hook) must not leave the group unanswered.
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.faults
                    .check(FaultPoint::Sync { sync: job.sync })
                    .and_then(|()| job.file.sync_data())
            }))
            .unwrap_or_else(|_| Err(std::io::Error::other("the journal sync thread panicked")));
            drop(job.file);
            self.complete(slot, job.sync, res);
        }
    }

    /// Waits for an idle sync thread (while every one is busy, callers queue up and
    /// join the next group). `Err` with the failure once a sync has failed.
    pub(crate) fn acquire(&self) -> std::result::Result<usize, String> {
        let mut st = lock(&self.state);
        loop {
            if let Some(f) = &st.failed {
                return Err(f.message.clone());
            }
            if !st.idle.is_empty() {
                // A sync that is past half its usual time ends soon: the callers
                // queued now join the group after it instead of starting a
                // second, concurrent flush (which slows both). One that just
                // started, or runs late, is overlapped.
                let avg = Duration::from_nanos(st.sync_ns);
                let now = Instant::now();
                let ends_soon = st
                    .started
                    .iter()
                    .flatten()
                    .map(|t| now.saturating_duration_since(*t))
                    .filter(|e| *e >= avg / 2 && *e < avg * 3 / 2)
                    .min();
                match ends_soon {
                    Some(elapsed) => {
                        st = self
                            .changed
                            .wait_timeout(st, avg * 3 / 2 - elapsed)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                        continue;
                    }
                    None => {
                        if let Some(slot) = st.idle.pop() {
                            st.started[slot] = Some(now);
                            return Ok(slot);
                        }
                    }
                }
            }
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Gives back a sync thread that got no job.
    pub(crate) fn release(&self, slot: usize) {
        let mut st = lock(&self.state);
        st.started[slot] = None;
        st.idle.push(slot);
        drop(st);
        self.changed.notify_all();
    }

    /// Queues `group` behind the groups in flight. Returns false when a sync has
    /// failed: the group's callers have been answered with the error, and its sync
    /// must not be started.
    pub(crate) fn push(&self, mut group: Group) -> bool {
        let mut st = lock(&self.state);
        let accepted = match st.failed.clone() {
            Some(f) => {
                fail_group(&mut group, &f);
                st.ready.push_back(group);
                false
            }
            None => {
                st.pending.push_back(group);
                self.advance(&mut st);
                true
            }
        };
        self.answer(st);
        accepted
    }

    /// Waits until every group is answered and no sync runs. `Err` with the
    /// failure when a sync failed.
    pub(crate) fn drain(&self) -> std::result::Result<(), String> {
        let mut st = lock(&self.state);
        while !st.pending.is_empty()
            || !st.ready.is_empty()
            || st.answering
            || st.idle.len() < self.depth
        {
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        match &st.failed {
            Some(f) => Err(f.message.clone()),
            None => Ok(()),
        }
    }

    /// Reports sync number `sync` done on `slot` with `res`.
    pub(crate) fn complete(&self, slot: usize, sync: u64, res: std::io::Result<()>) {
        let mut st = lock(&self.state);
        if let Some(t) = st.started[slot].take() {
            let took = u64::try_from(t.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .min(10_000_000_000);
            st.sync_ns = if st.sync_ns == 0 {
                took
            } else {
                (st.sync_ns * 7 + took) / 8
            };
        }
        st.idle.push(slot);
        match res {
            Ok(()) => {
                metrics::counter!("sanare_journal_fsyncs_total", "backend" => "wal").increment(1);
                if st.failed.is_none() {
                    st.durable = st.durable.max(sync);
                    self.advance(&mut st);
                }
            }
            Err(e) => {
                if st.failed.is_none() {
                    let failure = Failure {
                        kind: e.kind(),
                        message: format!("fdatasync {sync} failed: {e}"),
                    };
                    tracing::error!(error = %e, sync, in_flight = st.pending.len(), "journal fdatasync failed; the journal stops accepting writes");
                    while let Some(mut group) = st.pending.pop_front() {
                        fail_group(&mut group, &failure);
                        st.ready.push_back(group);
                    }
                    st.failed = Some(failure);
                }
            }
        }
        self.answer(st);
        self.changed.notify_all();
    }

    /// Moves the groups at the front that are durable to `ready`.
    fn advance(&self, st: &mut State) {
        while st.pending.front().is_some_and(|g| g.sync <= st.durable) {
            if let Some(g) = st.pending.pop_front() {
                st.ready.push_back(g);
            }
        }
    }

    /// Answers the ready groups, in order, outside the state lock (so the writer
    /// and the other sync threads are not held up by the wake-ups). One thread
    /// answers at a time; groups made ready meanwhile are answered by it too.
    fn answer<'a>(&'a self, mut st: MutexGuard<'a, State>) {
        if st.answering || st.ready.is_empty() {
            return;
        }
        st.answering = true;
        loop {
            let groups: Vec<Group> = st.ready.drain(..).collect();
            if groups.is_empty() {
                st.answering = false;
                break;
            }
            drop(st);
            self.answer_groups(groups);
            st = lock(&self.state);
        }
        drop(st);
        self.changed.notify_all();
    }

    fn answer_groups(&self, groups: Vec<Group>) {
        {
            let mut segs = lock(&self.shared.segments);
            if let Some(active) = segs.last_mut() {
                for g in groups.iter().filter(|g| !g.entries.is_empty()) {
                    for e in &g.entries {
                        active.add(e);
                    }
                    active.len = g.end;
                    active.raw_len = g.end;
                }
                lock(&self.checkpoints).offer(active);
            }
        }
        if let Some(last) = groups.iter().rev().find_map(|g| g.entries.last()) {
            self.shared.head.store(last.position.0, Ordering::Release);
            self.sample(groups.iter().flat_map(|g| &g.entries));
        }
        let mut replies = Vec::new();
        for g in groups {
            if let (Some(first), Some(last)) = (g.entries.first(), g.entries.last()) {
                metrics::counter!("sanare_journal_records_total", "backend" => "wal")
                    .increment(g.entries.len() as u64);
                if let Some(bus) = &self.events {
                    bus.publish(sanare_core::Event::JournalRecorded {
                        entries: g.entries.len() as u64,
                        first_position: Some(first.position),
                        last_position: Some(last.position),
                    });
                }
            }
            replies.extend(g.replies);
        }
        let replies = match &self.answerer {
            Some(answerer) => match answerer.send(replies) {
                Ok(()) => return,
                Err(back) => back,
            },
            None => replies,
        };
        for (reply, r) in replies {
            let _ = reply.send(r);
        }
    }
}

impl Pipeline {
    /// Remembers when the entries just made durable were recorded (one sample per
    /// answered batch), for cuts that leave out what was recorded too recently.
    fn sample<'a>(&self, entries: impl Iterator<Item = &'a JournalEntry>) {
        let mut last = None;
        let mut max_t = i128::MIN;
        for e in entries {
            max_t = max_t.max(e.recorded_at.unix_timestamp_nanos());
            last = Some(e.position.0);
        }
        let Some(last) = last else { return };
        let mut recent = lock(&self.shared.recent);
        let max_t = recent.back().map_or(max_t, |&(_, t)| t.max(max_t));
        recent.push_back((last, max_t));
        // Keep an hour, and at most 100,000 samples; the oldest kept sample still
        // answers for everything before it.
        let horizon = max_t - 3_600_000_000_000;
        while recent.len() > 100_000 || recent.get(1).is_some_and(|&(_, t)| t <= horizon) {
            recent.pop_front();
        }
    }
}

/// Turns the answers of `group` that would have succeeded into the sync failure;
/// its entries are not durable, so nothing else advances for it.
fn fail_group(group: &mut Group, f: &Failure) {
    group.entries.clear();
    for (_, r) in &mut group.replies {
        if r.is_ok() {
            *r = Err(Error::io(
                "making journal entries durable: an fdatasync failed, so these entries may or \
                 may not be in the journal after a reopen (reopen it, then retry with the same \
                 idempotency key)",
                std::io::Error::new(f.kind, f.message.clone()),
            ));
        }
    }
}
