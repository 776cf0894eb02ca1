//! The writer thread of the WAL: group commit, pipelined.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use sanare_fs::File;
use tokio::sync::mpsc;
use uuid::Uuid;

use sanare_core::{Error, JournalEntryId, JournalPosition, Result};

use super::keys::{KeyHash, KeyWindow};
use super::{
    Cmd, Reply, Shared, WalOptions, create_segment, decode_segment, ensure_index, ensure_summary,
    lock, open_segment, open_sync_files, read_raw,
};
use crate::entry::{JournalEntry, Recorded};
use crate::frame;
use crate::pipeline::{FaultPoint, Group, Pipeline, SyncJob};

/// Where the idempotency keys of one segment (or part of it) are.
pub(super) enum KeySource {
    /// Decoded on open.
    Decoded(Vec<(u64, KeyHash, Uuid)>),
    /// In the summary of the sealed segment with this base.
    Summary(u64),
    /// In the first `len` bytes of the segment `base`, the active one at open
    /// (its checkpointed prefix, which opening did not decode).
    Prefix { base: u64, len: u64 },
}

/// Fills the idempotency window of an opened journal on a thread of its own, so
/// that opening and appends without a key do not wait for it; the writer waits
/// for it before it answers the first append with a key.
pub(super) struct KeyLoad {
    pub(super) dir: PathBuf,
    /// Every segment's keys, in position order.
    pub(super) sources: Vec<KeySource>,
    pub(super) capacity: usize,
}

impl KeyLoad {
    /// Starts loading; the window arrives on the receiver.
    pub(super) fn start(self, shared: Arc<Shared>) -> Result<std::sync::mpsc::Receiver<KeyWindow>> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("sanare-journal-keys".into())
            .spawn(move || {
                let _ = tx.send(self.window(&shared));
            })
            .map_err(|e| Error::io("starting the journal key loader thread", e))?;
        Ok(rx)
    }

    /// The keys of one source, in position order (`None` when unreadable).
    fn load(&self, shared: &Shared, source: KeySource) -> Option<Vec<(u64, KeyHash, Uuid)>> {
        match source {
            KeySource::Decoded(keys) => Some(keys),
            KeySource::Summary(base) => {
                crate::summary::load_keys(&*shared.storage, &self.dir, base)
            }
            KeySource::Prefix { base, len } => {
                // The segment as it is now (sealed and compacted since open,
                // maybe), not removed while it is read.
                let (mut raw, damage) = {
                    let _files = shared.files.read().unwrap_or_else(|e| e.into_inner());
                    let info = lock(&shared.segments)
                        .iter()
                        .find(|s| s.base == base)
                        .cloned()?;
                    read_raw(&*shared.storage, &info).ok()?
                };
                if !damage.is_empty() {
                    return None;
                }
                // `len` was checked against the segment's frames on open.
                raw.truncate(usize::try_from(len).ok()?);
                let (version, base) = frame::parse_segment_header_versioned(&raw, "").ok()?;
                if version != frame::SEGMENT_VERSION_GROUPS {
                    return None;
                }
                // Only the keys: the entries are not decoded.
                let scan = frame::scan_groups(&raw, frame::SEGMENT_HEADER, base, false);
                Some(
                    scan.frames
                        .iter()
                        .filter(|(_, kind, _)| *kind == frame::KIND_ENTRY)
                        .filter_map(|(_, _, body)| {
                            let (p, id, key) = frame::entry_key(&raw[body.clone()])?;
                            Some((p, super::keys::hash(key?), id))
                        })
                        .collect(),
                )
            }
        }
    }

    /// The window of the newest `capacity` keys: sources are read newest first
    /// until the window is full, then inserted oldest first.
    fn window(mut self, shared: &Shared) -> KeyWindow {
        let mut chunks = Vec::new();
        let mut total = 0usize;
        while total < self.capacity
            && let Some(source) = self.sources.pop()
        {
            match self.load(shared, source) {
                Some(keys) => {
                    total += keys.len();
                    chunks.push(keys);
                }
                None => tracing::warn!(
                    "journal segment summary or checkpointed prefix unreadable; its idempotency keys are not remembered"
                ),
            }
        }
        let mut window = KeyWindow::with_capacity(self.capacity, total.min(self.capacity));
        let skip = total.saturating_sub(self.capacity);
        for (p, h, id) in chunks.into_iter().rev().flatten().skip(skip) {
            window.insert_hash(h, (p, id));
        }
        window
    }
}

/// Zeros written ahead of the data in one go: the group that crosses the
/// preallocated end pays one metadata flush, the next ~1 MiB of groups none.
const PREALLOCATE: u64 = 1 << 20;

pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) file: Arc<dyn File>,
    /// Bytes of data in the active segment (the next write goes here).
    pub(super) len: u64,
    /// Bytes of the active segment's file already written and synced (data, then
    /// zeros): writes below this overwrite allocated blocks, so `fdatasync` has no
    /// metadata to flush.
    pub(super) alloc: u64,
    pub(super) next: u64,
    /// Idempotency keys of the most recent entries written (durable or in flight).
    pub(super) keys: KeyWindow,
    /// The keys recorded before this open, while they are being loaded.
    pub(super) older_keys: Option<std::sync::mpsc::Receiver<KeyWindow>>,
    pub(super) options: WalOptions,
    pub(super) shared: Arc<Shared>,
    /// Groups in flight and the sync threads.
    pub(super) pipe: Arc<Pipeline>,
    /// One job queue per sync thread.
    pub(super) jobs: Vec<std::sync::mpsc::Sender<SyncJob>>,
    /// One open file description of the active segment per sync thread.
    pub(super) sync_files: Vec<Arc<dyn File>>,
    /// Syncs started so far (sync `n` makes the `n`-th group with data durable).
    pub(super) submitted: u64,
    pub(super) poisoned: Option<String>,
}

impl Writer {
    /// The writer thread: takes the callers queued, encodes their entries and
    /// writes them with one `pwrite`, hands the group's `fdatasync` to an idle sync
    /// thread and goes on with the next group; the sync threads answer callers in
    /// order. While every sync thread is busy the writer waits, and callers queue
    /// up for the next group.
    pub(super) fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        // Buffers reused from group to group: no allocation per group beyond the
        // entries themselves.
        let mut buf = Vec::with_capacity(1 << 20);
        let mut batch = Vec::with_capacity(self.options.max_batch.min(4096));
        let mut batch_keys: HashMap<String, (u64, Uuid)> = HashMap::new();
        let mut rotate = Vec::new();
        let mut checkpoint = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            // An idle sync thread; while there is none, more callers queue up.
            let slot = match self.pipe.acquire() {
                Ok(slot) => Some(slot),
                Err(msg) => {
                    self.poisoned.get_or_insert(msg);
                    None
                }
            };
            while batch.len() < self.options.max_batch {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let mut replies: Vec<(Reply, Result<Recorded>)> = Vec::with_capacity(batch.len());
            let mut written: Vec<JournalEntry> = Vec::with_capacity(batch.len());
            buf.clear();
            batch_keys.clear();
            for cmd in batch.drain(..) {
                match cmd {
                    Cmd::Rotate(r) => rotate.push(r),
                    Cmd::Checkpoint(r) => checkpoint.push(r),
                    Cmd::Append(entry, reply) => {
                        if let Some(p) = &self.poisoned {
                            let _ = reply.send(Err(Error::unavailable(format!(
                                "the journal stopped accepting writes after a failed write ({p}); reopen it"
                            ))));
                            continue;
                        }
                        if entry.idempotency_key.is_some() {
                            self.older_keys_loaded();
                        }
                        // A key seen before, durable or still in flight: the
                        // duplicate is answered in its own group, after the
                        // original's.
                        if let Some(k) = &entry.idempotency_key
                            && let Some((pos, id)) =
                                batch_keys.get(k).copied().or_else(|| self.keys.get(k))
                        {
                            replies.push((
                                reply,
                                Ok(Recorded {
                                    position: JournalPosition(pos),
                                    id: JournalEntryId::from_uuid(id),
                                    duplicate: true,
                                }),
                            ));
                            continue;
                        }
                        let e = entry.into_entry(JournalPosition(self.next));
                        if let Err(err) = frame::encode_entry(&e, &mut buf) {
                            let _ = reply.send(Err(err));
                            continue;
                        }
                        self.next += 1;
                        if let Some(k) = &e.idempotency_key {
                            batch_keys.insert(k.clone(), (e.position.0, e.id.as_uuid()));
                        }
                        replies.push((
                            reply,
                            Ok(Recorded {
                                position: e.position,
                                id: e.id,
                                duplicate: false,
                            }),
                        ));
                        written.push(e);
                    }
                }
            }
            if let (Some(first), Ok(count)) = (written.first(), u32::try_from(written.len())) {
                // The group ends with its trailer: a reader after a power cut
                // tells a torn, never acknowledged group from damage in the middle.
                frame::encode_group(
                    &frame::GroupTrailer {
                        first: first.position.0,
                        count,
                        start: self.len,
                        durable: self.shared.head.load(std::sync::atomic::Ordering::Acquire),
                    },
                    &mut buf,
                );
            }
            self.commit(slot, &mut buf, &mut batch_keys, written, replies);
            if self.len >= self.options.segment_size || !rotate.is_empty() {
                let res = self.durable().and_then(|()| self.rotate_now());
                if let Err(e) = &res {
                    tracing::error!(error = %e, "journal segment rotation failed");
                }
                for r in rotate.drain(..) {
                    let _ = r.send(match &res {
                        Ok(()) => Ok(()),
                        Err(e) => Err(Error::unavailable(format!("rotation failed: {e}"))),
                    });
                }
            }
            if !checkpoint.is_empty() {
                let res = self.durable().and_then(|()| self.checkpoint_now());
                for r in checkpoint.drain(..) {
                    let _ = r.send(match &res {
                        Ok(()) => Ok(()),
                        Err(e) => Err(Error::unavailable(format!("checkpoint failed: {e}"))),
                    });
                }
            }
        }
        // Every caller answered before the thread ends; dropping `self.jobs`
        // stops the sync threads.
        let _ = self.pipe.drain();
    }

    /// Waits until every group written is durable and answered, no sync running.
    fn durable(&mut self) -> Result<()> {
        match self.pipe.drain() {
            Err(msg) => {
                self.poisoned.get_or_insert(msg.clone());
                Err(Error::unavailable(format!(
                    "the journal stopped accepting writes after a failed write ({msg}); reopen it"
                )))
            }
            Ok(()) if self.poisoned.is_some() => Err(Error::unavailable("journal write failed")),
            Ok(()) => Ok(()),
        }
    }

    /// Writes the active segment's checkpoint (call with every group durable).
    fn checkpoint_now(&self) -> Result<()> {
        let Some(active) = lock(&self.shared.segments).last().cloned() else {
            return Ok(());
        };
        if active.last.is_none() {
            return Ok(()); // nothing to vouch for
        }
        super::checkpoint::store(&*self.shared.storage, &self.dir, &active)
            .map_err(|e| Error::io("writing the journal checkpoint", e))
    }

    /// Waits for the keys recorded before this open (once), and puts the keys
    /// recorded since after them.
    fn older_keys_loaded(&mut self) {
        let Some(rx) = self.older_keys.take() else {
            return;
        };
        match rx.recv() {
            Ok(mut older) => {
                older.extend(std::mem::replace(&mut self.keys, KeyWindow::new(1)));
                self.keys = older;
            }
            Err(_) => tracing::warn!(
                "the journal key loader stopped; idempotency keys recorded before this open are not remembered"
            ),
        }
    }

    /// Queues callers whose entries were not written (nothing to write, a duplicate
    /// key, or a failed write: their answers are set): they are answered after the
    /// groups already in flight, which their own fdatasyncs settle.
    fn push_unwritten(&mut self, replies: Vec<(Reply, Result<Recorded>)>) {
        self.pipe.push(Group {
            sync: self.submitted,
            end: self.len,
            entries: Vec::new(),
            replies,
        });
    }

    /// Writes one group and starts its sync on `slot`, or queues its answers
    /// (duplicates only, or the write failed) behind the groups in flight.
    fn commit(
        &mut self,
        slot: Option<usize>,
        buf: &mut Vec<u8>,
        batch_keys: &mut HashMap<String, (u64, Uuid)>,
        written: Vec<JournalEntry>,
        mut replies: Vec<(Reply, Result<Recorded>)>,
    ) {
        let slot = match slot {
            Some(slot) if !buf.is_empty() => slot,
            slot => {
                // Nothing written (or poisoned: then nothing was encoded).
                if let Some(slot) = slot {
                    self.pipe.release(slot);
                }
                if !replies.is_empty() {
                    self.push_unwritten(replies);
                }
                return;
            }
        };
        let group = self.submitted + 1;
        if let Err(e) = self.write(buf, group) {
            let msg = e.to_string();
            tracing::error!(error = %msg, "journal append failed; the journal stops accepting writes");
            self.poisoned = Some(msg.clone());
            self.next -= written.len() as u64;
            self.pipe.release(slot);
            for (_, r) in &mut replies {
                *r = Err(Error::io(
                    "appending to the journal (the entry is not recorded)",
                    std::io::Error::new(e.kind(), msg.clone()),
                ));
            }
            self.push_unwritten(replies);
            return;
        }
        for (k, at) in batch_keys.drain() {
            self.keys.insert(&k, at);
        }
        self.submitted = group;
        let accepted = self.pipe.push(Group {
            sync: group,
            end: self.len,
            entries: written,
            replies,
        });
        let job = SyncJob {
            sync: group,
            file: self.sync_files[slot].clone(),
        };
        if !accepted {
            self.pipe.release(slot);
        } else if self.jobs[slot].send(job).is_err() {
            // Only if the sync thread died: fail the group like a failed sync.
            self.pipe.complete(
                slot,
                group,
                Err(std::io::Error::other("a journal sync thread has stopped")),
            );
        }
    }

    /// Writes `buf` at the end of the data with one `pwrite` (not yet durable).
    /// When the data would run past the preallocated part, the same write carries
    /// zeros up to `PREALLOCATE` bytes further, so only that group's `fdatasync`
    /// flushes a size change.
    fn write(&mut self, buf: &mut Vec<u8>, group: u64) -> std::io::Result<()> {
        let data = buf.len() as u64;
        let end = self.len + data;
        if end > self.alloc {
            let target = (end + PREALLOCATE).max(self.alloc);
            buf.resize(usize::try_from(target - self.len).unwrap_or(buf.len()), 0);
        }
        let res = self
            .pipe
            .faults()
            .check(FaultPoint::Write { group })
            .and_then(|()| self.file.write_all_at(buf, self.len));
        if res.is_ok() {
            self.alloc = self.alloc.max(self.len + buf.len() as u64);
            self.len = end;
        }
        buf.truncate(usize::try_from(data).unwrap_or(0));
        res
    }

    fn rotate_now(&mut self) -> Result<()> {
        if self.len <= frame::SEGMENT_HEADER as u64 {
            return Ok(());
        }
        // A sealed segment ends with its data: drop the preallocated zeros.
        self.file
            .set_len(self.len)
            .and_then(|()| self.file.sync_all())
            .map_err(|e| Error::io("sealing a journal segment", e))?;
        // Index the sealed segment off the writer's path.
        if let Some(sealed) = lock(&self.shared.segments).last().cloned() {
            let dir = self.dir.clone();
            let storage = self.shared.storage.clone();
            let spawned = std::thread::Builder::new()
                .name("sanare-journal-index".into())
                .spawn(move || match read_raw(&*storage, &sealed) {
                    Ok((raw, _)) => {
                        ensure_index(&*storage, &dir, &sealed, &raw);
                        match decode_segment(&raw, &sealed.name(), true) {
                            Ok(d) => ensure_summary(&*storage, &dir, &sealed, &d.entries),
                            Err(e) => tracing::warn!(error = %e, "journal summary not built"),
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "journal index not built"),
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "journal index thread not started; rebuilt on open");
            }
        }
        let storage = self.shared.storage.clone();
        let info = create_segment(&*storage, &self.dir, self.next)?;
        let file = open_segment(&*storage, &info.path)?;
        let sync_files = open_sync_files(&*storage, &info.path, self.jobs.len())?;
        self.file = file;
        self.sync_files = sync_files;
        self.len = info.len;
        self.alloc = info.len;
        lock(&self.shared.segments).push(info);
        Ok(())
    }
}
