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
//! - Groups leave `pending` from the front only, under the state lock: replies, the
//!   durable head, the active segment's in-memory index, metrics and
//!   `JournalRecorded` events advance in position order.
//! - Each sync thread flushes through its own open file description of the segment
//!   (not a `dup`): Linux reports a writeback error once per open file description,
//!   so a concurrent `fdatasync` on a shared descriptor could consume the error and
//!   let the other one return success for lost data.
//! - The first failed sync sets `failed`: every pending group fails, no later sync
//!   result is trusted and the writer stops accepting entries.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};

use sanare_core::{Error, EventBus, Result};

use crate::entry::{JournalEntry, Recorded};
use crate::wal::{Reply, Shared};

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
    /// Groups written and not answered yet, in position order.
    pending: VecDeque<Group>,
    /// The highest sync number that succeeded.
    durable: u64,
    /// Sync threads with nothing to do.
    idle: Vec<usize>,
    /// The first failed sync.
    failed: Option<Failure>,
}

/// A request to a sync thread: `fdatasync` through `file`, then report `sync`.
pub(crate) struct SyncJob {
    pub(crate) sync: u64,
    pub(crate) file: Arc<File>,
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
    ) -> Result<(Arc<Self>, Vec<mpsc::Sender<SyncJob>>)> {
        let depth = depth.max(1);
        let pipeline = Arc::new(Self {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                durable: 0,
                idle: (0..depth).rev().collect(),
                failed: None,
            }),
            changed: Condvar::new(),
            depth,
            shared,
            events,
            faults,
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
            let res = self
                .faults
                .check(FaultPoint::Sync { sync: job.sync })
                .and_then(|()| job.file.sync_data());
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
            if let Some(slot) = st.idle.pop() {
                return Ok(slot);
            }
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Gives back a sync thread that got no job.
    pub(crate) fn release(&self, slot: usize) {
        lock(&self.state).idle.push(slot);
        self.changed.notify_all();
    }

    /// Queues `group` behind the groups in flight. Returns false when a sync has
    /// failed: the group's callers have been answered with the error, and its sync
    /// must not be started.
    pub(crate) fn push(&self, mut group: Group) -> bool {
        let mut st = lock(&self.state);
        if let Some(f) = st.failed.clone() {
            fail_group(&mut group, &f);
            return false;
        }
        st.pending.push_back(group);
        self.advance(&mut st);
        true
    }

    /// Waits until every group is answered and no sync runs. `Err` with the
    /// failure when a sync failed.
    pub(crate) fn drain(&self) -> std::result::Result<(), String> {
        let mut st = lock(&self.state);
        while !st.pending.is_empty() || st.idle.len() < self.depth {
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
                    for mut group in st.pending.drain(..) {
                        fail_group(&mut group, &failure);
                    }
                    st.failed = Some(failure);
                }
            }
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Answers the groups at the front that are durable, in order.
    fn advance(&self, st: &mut State) {
        let ready = st
            .pending
            .iter()
            .take_while(|g| g.sync <= st.durable)
            .count();
        if ready == 0 {
            return;
        }
        let groups: Vec<Group> = st.pending.drain(..ready).collect();
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
            }
        }
        if let Some(last) = groups.iter().rev().find_map(|g| g.entries.last()) {
            self.shared.head.store(last.position.0, Ordering::Release);
        }
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
            for (reply, r) in g.replies {
                let _ = reply.send(r);
            }
        }
    }
}

/// Answers every caller of `group` that would have succeeded with the sync failure.
fn fail_group(group: &mut Group, f: &Failure) {
    for (reply, r) in group.replies.drain(..) {
        let r = match r {
            Ok(_) => Err(Error::io(
                "making journal entries durable: an fdatasync failed, so these entries may or \
                 may not be in the journal after a reopen (reopen it, then retry with the same \
                 idempotency key)",
                std::io::Error::new(f.kind, f.message.clone()),
            )),
            Err(e) => Err(e),
        };
        let _ = reply.send(r);
    }
}
