//! The segment-file WAL backend: group commit, rotation, recovery on open,
//! compression of sealed segments, retention.
//!
//! Every file operation goes through a [`sanare_fs::Storage`], so the tests can run
//! the WAL on a simulated disk and cut its power.

mod checkpoint;
pub(crate) mod keys;
mod marks;
mod open;
mod writer;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sanare_fs::{OpenMode, Storage};
use tokio::sync::{mpsc, oneshot};

use sanare_core::{Error, JournalEntryId, JournalPosition, Result};

use crate::entry::{JournalEntry, NewEntry, Recorded};
use crate::frame::{self, CorruptRegion};
use crate::index::{self, SegmentIndex};
use crate::lock::DirLock;
use crate::pipeline::Faults;
use crate::query::ScanPlan;

pub(crate) use checkpoint::Checkpoints;
pub(crate) use marks::Marks;

/// What opening the WAL found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct OpenReport {
    /// Segments found.
    pub segments: u64,
    /// Entries found.
    pub entries: u64,
    /// A torn tail cut off the active segment: (segment, offset, bytes removed).
    pub truncated_tail: Option<(String, u64, u64)>,
    /// The offset from which the active segment was decoded when its checkpoint
    /// vouched for what comes before (`None`: decoded whole).
    pub resumed_at: Option<u64>,
    /// Damaged regions isolated (each followed by valid records, which stay readable).
    pub corrupt: Vec<CorruptRegion>,
}

/// Metadata of one segment, kept in memory: the sparse index used to skip segments
/// for position, time and operation-type queries.
#[derive(Clone, Debug)]
pub(crate) struct SegmentInfo {
    pub(crate) base: u64,
    pub(crate) path: PathBuf,
    pub(crate) sealed: bool,
    pub(crate) first: Option<u64>,
    pub(crate) last: Option<u64>,
    pub(crate) min_time_ns: i128,
    pub(crate) max_time_ns: i128,
    pub(crate) op_types: BTreeSet<String>,
    /// Number of entries.
    pub(crate) entries: u64,
    /// Durable length of a raw segment (bytes readers may look at).
    pub(crate) len: u64,
    pub(crate) raw_len: u64,
}

impl SegmentInfo {
    fn new(base: u64, path: PathBuf, sealed: bool) -> Self {
        Self {
            base,
            path,
            sealed,
            first: None,
            last: None,
            min_time_ns: i128::MAX,
            max_time_ns: i128::MIN,
            op_types: BTreeSet::new(),
            entries: 0,
            len: 0,
            raw_len: 0,
        }
    }

    pub(crate) fn add(&mut self, e: &JournalEntry) {
        self.first.get_or_insert(e.position.0);
        self.last = Some(e.position.0);
        self.entries += 1;
        let t = e.recorded_at.unix_timestamp_nanos();
        self.min_time_ns = self.min_time_ns.min(t);
        self.max_time_ns = self.max_time_ns.max(t);
        if !self.op_types.contains(&e.operation_type) {
            self.op_types.insert(e.operation_type.clone());
        }
    }

    fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Whether the plan could match anything in this segment.
    fn may_match(&self, plan: &ScanPlan) -> bool {
        let Some(last) = self.last else { return false };
        if last <= plan.after {
            return false;
        }
        if let (Some(to), Some(first)) = (plan.to, self.first)
            && first > to
        {
            return false;
        }
        if let Some(from) = plan.time_from
            && self.max_time_ns < from.unix_timestamp_nanos()
        {
            return false;
        }
        if let Some(to) = plan.time_to
            && self.min_time_ns >= to.unix_timestamp_nanos()
        {
            return false;
        }
        plan.operation_types.is_empty()
            || plan
                .operation_types
                .iter()
                .any(|t| self.op_types.contains(t))
    }
}

pub(crate) type Reply = oneshot::Sender<Result<Recorded>>;

/// A decoded segment and what it was decoded from: (base, sealed, length).
type CachedSegment = ((u64, bool, u64), Arc<DecodedSegment>);

enum Cmd {
    Append(NewEntry, Reply),
    Rotate(oneshot::Sender<Result<()>>),
    Checkpoint(oneshot::Sender<Result<()>>),
}

pub(crate) struct Shared {
    /// The last durable position.
    pub(crate) head: AtomicU64,
    /// Every segment; the last one is the active one.
    pub(crate) segments: Mutex<Vec<SegmentInfo>>,
    /// Readers hold it shared while they read a segment file; compaction and
    /// purge hold it exclusively while they remove one, so a reader never finds
    /// a file it listed gone.
    files: RwLock<()>,
    /// The last segment decoded (segment base, sealed, length), for the next batch
    /// of the same scan.
    decoded: Mutex<Option<CachedSegment>>,
    /// Recent (position, recorded at, in ns) samples, one per group commit.
    pub(crate) recent: Mutex<std::collections::VecDeque<(u64, i128)>>,
    report: OpenReport,
    marks: Mutex<Marks>,
    storage: Arc<dyn Storage>,
}

/// Options of the WAL.
#[derive(Clone, Debug)]
pub(crate) struct WalOptions {
    pub(crate) segment_size: u64,
    pub(crate) max_batch: usize,
    /// Most group commits whose `fdatasync` runs at once (at least 1).
    pub(crate) sync_pipeline_depth: usize,
    /// Test hook that can fail the writer's I/O.
    pub(crate) faults: Faults,
    pub(crate) events: Option<sanare_core::EventBus>,
    /// Open for reading only: no lock, nothing written (a torn or in-flight tail is
    /// left alone), appends and maintenance refused.
    pub(crate) read_only: bool,
    /// How long to wait for another writer to release the directory.
    pub(crate) lock_wait: std::time::Duration,
    /// Where the files are.
    pub(crate) storage: Arc<dyn Storage>,
}

/// The segment-file WAL.
pub(crate) struct Wal {
    dir: PathBuf,
    tx: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    /// The writer lock (`None` when read-only).
    _lock: Option<DirLock>,
}

fn seg_name(base: u64, sealed: bool) -> String {
    if sealed {
        format!("{base:020}.walz")
    } else {
        format!("{base:020}.wal")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The largest file the journal reads whole (a sealed segment or an index).
const READ_LIMIT: u64 = 16 << 30;

fn sync_dir(storage: &dyn Storage, dir: &Path) -> Result<()> {
    storage
        .sync_dir(dir)
        .map_err(|e| Error::io(format!("syncing journal directory {}", dir.display()), e))
}

/// Reads the uncompressed bytes of a segment (up to its durable length), and the
/// damaged blocks of a sealed one (zero-filled in the bytes).
fn read_raw(storage: &dyn Storage, info: &SegmentInfo) -> Result<(Vec<u8>, Vec<CorruptRegion>)> {
    let io_err = |e| {
        Error::io(
            format!("reading journal segment {}", info.path.display()),
            e,
        )
    };
    if info.sealed {
        let bytes = sanare_fs::read_file(storage, &info.path, READ_LIMIT).map_err(io_err)?;
        return Ok(match crate::sealed::unseal(&bytes, &info.name()) {
            Ok(r) => r,
            // A container that does not open at all (a damaged version-1 one, or
            // its header): its entries are lost, the journal is not.
            Err(e) => (
                frame::segment_header_v2(info.base).to_vec(),
                vec![CorruptRegion {
                    segment: info.name(),
                    offset: 0,
                    len: bytes.len() as u64,
                    reason: format!("sealed segment unreadable, its entries are lost: {e}"),
                }],
            ),
        });
    }
    let f = storage.open(&info.path, OpenMode::Read).map_err(io_err)?;
    let mut bytes = sanare_fs::read_all(&*f, READ_LIMIT).map_err(io_err)?;
    if info.len > 0 {
        bytes.truncate(usize::try_from(info.len).unwrap_or(usize::MAX));
    }
    Ok((bytes, Vec::new()))
}

/// What [`decode_segment`] found.
#[derive(Debug, Default)]
pub(crate) struct DecodedSegment {
    pub(crate) entries: Vec<JournalEntry>,
    pub(crate) corrupt: Vec<CorruptRegion>,
    /// Where a torn tail starts.
    pub(crate) torn: Option<usize>,
    /// Where the data ends (before a torn tail or preallocated zeros).
    pub(crate) end: usize,
}

/// Decodes every entry of a segment's bytes, isolating damage. `sealed`: the
/// segment is not the active one (damage at its end is corruption, not a tail).
pub(crate) fn decode_segment(raw: &[u8], name: &str, sealed: bool) -> Result<DecodedSegment> {
    let (version, base) = frame::parse_segment_header_versioned(raw, name)?;
    let scan = if version == frame::SEGMENT_VERSION_GROUPS {
        frame::scan_groups(raw, frame::SEGMENT_HEADER, base, sealed)
    } else {
        frame::scan(raw, frame::SEGMENT_HEADER)
    };
    Ok(decode_scan(raw, 0, scan, name))
}

/// Decodes the part of an active version-2 segment that follows its checkpoint:
/// `tail` holds the segment's bytes from offset `origin`, right after the
/// complete group whose last position is `prev_last`. Offsets in the result are
/// the segment's.
pub(crate) fn decode_tail(tail: &[u8], origin: u64, prev_last: u64, name: &str) -> DecodedSegment {
    let scan = frame::scan_groups_from(tail, 0, origin, prev_last, false);
    decode_scan(tail, origin as usize, scan, name)
}

/// The entries and damage of a scan of `raw`, whose byte 0 is at segment offset
/// `origin`.
fn decode_scan(raw: &[u8], origin: usize, scan: frame::Scan, name: &str) -> DecodedSegment {
    let mut corrupt: Vec<CorruptRegion> = scan
        .corrupt
        .iter()
        .map(|&(offset, len, reason)| CorruptRegion {
            segment: name.to_owned(),
            offset: (origin + offset) as u64,
            len: len as u64,
            reason: reason.to_owned(),
        })
        .collect();
    let mut entries = Vec::with_capacity(scan.frames.len());
    for (offset, kind, range) in scan.frames {
        if kind != frame::KIND_ENTRY {
            continue;
        }
        match frame::decode_entry(&raw[range.clone()]) {
            Ok(e) => entries.push(e),
            Err(e) => corrupt.push(CorruptRegion {
                segment: name.to_owned(),
                offset: (origin + offset) as u64,
                len: (range.end - offset) as u64,
                reason: e.to_string(),
            }),
        }
    }
    DecodedSegment {
        entries,
        corrupt,
        torn: scan.torn_tail_at.map(|at| origin + at),
        end: origin + scan.end,
    }
}

impl Wal {
    /// Refuses a change when opened read-only.
    fn writable(&self, what: &str) -> Result<()> {
        if self._lock.is_some() {
            Ok(())
        } else {
            Err(Error::conflict(format!(
                "cannot {what}: the journal in {} is open read-only (another process writes it)",
                self.dir.display()
            )))
        }
    }

    /// The directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn storage(&self) -> &dyn Storage {
        &*self.shared.storage
    }

    pub(crate) fn report(&self) -> &OpenReport {
        &self.shared.report
    }

    pub(crate) fn head(&self) -> JournalPosition {
        JournalPosition(self.shared.head.load(Ordering::Acquire))
    }

    /// The highest position whose entries were all recorded at or before
    /// `before_ns` (ns since the Unix epoch), as far as the recent samples tell;
    /// entries recorded before this journal was opened count as old.
    pub(crate) fn position_recorded_before(&self, before_ns: i128) -> JournalPosition {
        let recent = lock(&self.shared.recent);
        // Samples are (last position of a group, its time); the floor sample is
        // the head at open.
        let mut pos = 0;
        for &(p, t) in recent.iter() {
            if t > before_ns {
                break;
            }
            pos = p;
        }
        JournalPosition(pos)
    }

    /// Appends `entry`; returns once it is durable (group commit).
    pub(crate) async fn append(&self, entry: NewEntry) -> Result<Recorded> {
        self.writable("record an entry")?;
        entry.validate()?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Append(entry, reply))
            .map_err(|_| Error::unavailable("the journal writer has stopped"))?;
        rx.await.map_err(|_| {
            Error::unavailable("the journal writer stopped before the entry was durable")
        })?
    }

    /// Seals the active segment and starts a new one.
    pub(crate) async fn rotate(&self) -> Result<()> {
        self.writable("rotate segments")?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Rotate(reply))
            .map_err(|_| Error::unavailable("the journal writer has stopped"))?;
        rx.await
            .map_err(|_| Error::unavailable("the journal writer stopped"))?
    }

    /// Writes a checkpoint of the active segment once every entry recorded so
    /// far is durable.
    pub(crate) async fn checkpoint(&self) -> Result<()> {
        self.writable("checkpoint the active segment")?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Checkpoint(reply))
            .map_err(|_| Error::unavailable("the journal writer has stopped"))?;
        rx.await
            .map_err(|_| Error::unavailable("the journal writer stopped"))?
    }

    fn segments(&self) -> Vec<SegmentInfo> {
        lock(&self.shared.segments).clone()
    }

    /// The segment with base `base` as it is now (compaction may have sealed it
    /// since it was listed), or `None` when purged. Call with `files` held.
    fn current(&self, base: u64) -> Option<SegmentInfo> {
        lock(&self.shared.segments)
            .iter()
            .find(|s| s.base == base)
            .cloned()
    }

    /// The decoded segment, from the one-segment cache when it is still current.
    fn decoded(
        &self,
        info: &SegmentInfo,
        raw: Option<(Vec<u8>, Vec<CorruptRegion>)>,
    ) -> Result<Arc<DecodedSegment>> {
        let key = (info.base, info.sealed, info.len);
        if let Some((k, d)) = lock(&self.shared.decoded).as_ref()
            && *k == key
        {
            return Ok(d.clone());
        }
        let (raw, damage) = match raw {
            Some(r) => r,
            None => read_raw(self.storage(), info)?,
        };
        let last = lock(&self.shared.segments).last().map(|s| s.base);
        let sealed = info.sealed || Some(info.base) != last;
        let mut d = decode_segment(&raw, &info.name(), sealed)?;
        d.corrupt.extend(damage);
        let d = Arc::new(d);
        *lock(&self.shared.decoded) = Some((key, d.clone()));
        Ok(d)
    }

    /// At most `limit` entries matching `plan` with positions after `after`, in
    /// order, and the corrupt regions of the segments read. Blocks: call it off
    /// the async runtime.
    pub(crate) fn scan(
        &self,
        plan: &ScanPlan,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<JournalEntry>, Vec<CorruptRegion>)> {
        let mut plan = plan.clone();
        plan.after = after;
        let mut out = Vec::new();
        let mut damage = Vec::new();
        let listed = self.segments();
        let active = listed.last().map(|s| s.base);
        for listed in listed {
            if out.len() >= limit {
                break;
            }
            if !listed.may_match(&plan) {
                continue;
            }
            let _files = self.shared.files.read().unwrap_or_else(|e| e.into_inner());
            let Some(info) = self.current(listed.base) else {
                continue; // purged since it was listed
            };
            let selective = plan.time_from.is_some()
                || plan.time_to.is_some()
                || !plan.operation_types.is_empty();
            if selective && Some(info.base) != active {
                let raw = read_raw(self.storage(), &info)?;
                if raw.1.is_empty()
                    && let Some(entries) =
                        scan_indexed(self.storage(), &self.dir, &info, &raw.0, &plan)
                {
                    out.extend(entries.into_iter().take(limit - out.len()));
                    continue;
                }
                if self._lock.is_some() && raw.1.is_empty() {
                    // Missing, damaged or stale: rebuilt for the next query.
                    ensure_index(self.storage(), &self.dir, &info, &raw.0);
                }
                let d = self.decoded(&info, Some(raw))?;
                damage.extend(d.corrupt.iter().cloned());
                take_matching(&d.entries, &plan, limit, &mut out);
                continue;
            }
            let d = self.decoded(&info, None)?;
            damage.extend(d.corrupt.iter().cloned());
            take_matching(&d.entries, &plan, limit, &mut out);
        }
        Ok((out, damage))
    }

    /// Every entry and damaged region (for `validate` and `stats`). Blocks.
    pub(crate) fn validate(&self) -> Result<(u64, u64, Vec<CorruptRegion>)> {
        let mut entries = 0u64;
        let mut damage = Vec::new();
        let segs = self.segments();
        let mut last = 0u64;
        let mut count = 0u64;
        for listed in &segs {
            let _files = self.shared.files.read().unwrap_or_else(|e| e.into_inner());
            let Some(info) = self.current(listed.base) else {
                continue;
            };
            count += 1;
            let (raw, blocks) = read_raw(self.storage(), &info)?;
            damage.extend(blocks);
            let sealed = info.sealed || Some(info.base) != segs.last().map(|s| s.base);
            let DecodedSegment {
                entries: es,
                corrupt,
                torn,
                ..
            } = decode_segment(&raw, &info.name(), sealed)?;
            damage.extend(corrupt);
            if let Some(at) = torn {
                damage.push(CorruptRegion {
                    segment: info.name(),
                    offset: at as u64,
                    len: (raw.len() - at) as u64,
                    reason: "unreadable data at the end of the segment".into(),
                });
            }
            for e in es {
                if !e.payload_intact() {
                    damage.push(CorruptRegion {
                        segment: info.name(),
                        offset: 0,
                        len: 0,
                        reason: format!("entry {} payload does not match its hash", e.position),
                    });
                }
                if e.position.0 <= last {
                    damage.push(CorruptRegion {
                        segment: info.name(),
                        offset: 0,
                        len: 0,
                        reason: format!("entry {} out of order", e.position),
                    });
                }
                last = e.position.0;
                entries += 1;
            }
        }
        Ok((count, entries, damage))
    }

    /// Compresses every sealed raw segment. Returns (segments, raw bytes, stored
    /// bytes). Blocks.
    pub(crate) fn compact(&self) -> Result<(u64, u64, u64)> {
        self.writable("compact")?;
        let storage = self.storage();
        let segs = self.segments();
        let active = segs.last().map(|s| s.base);
        let (mut n, mut before, mut after) = (0u64, 0u64, 0u64);
        for info in segs {
            if info.sealed || Some(info.base) == active {
                continue;
            }
            let (raw, _) = read_raw(storage, &info)?;
            let sealed = crate::sealed::seal(&raw)?;
            let path = self.dir.join(seg_name(info.base, true));
            sanare_fs::write_atomic(storage, &path, &sealed)
                .map_err(|e| Error::io(format!("installing {}", path.display()), e))?;
            {
                // Readers finish with the raw file before it goes.
                let _files = self.shared.files.write().unwrap_or_else(|e| e.into_inner());
                let mut list = lock(&self.shared.segments);
                if let Some(s) = list.iter_mut().find(|s| s.base == info.base) {
                    s.sealed = true;
                    s.path = path.clone();
                }
                drop(list);
                storage
                    .remove_file(&info.path)
                    .map_err(|e| Error::io(format!("removing {}", info.path.display()), e))?;
            }
            sync_dir(storage, &self.dir)?;
            let mut now_sealed = info.clone();
            now_sealed.sealed = true;
            now_sealed.path = path.clone();
            let decoded = decode_segment(&raw, &info.name(), true)?;
            ensure_summary(storage, &self.dir, &now_sealed, &decoded.entries);
            n += 1;
            before += raw.len() as u64;
            after += sealed.len() as u64;
        }
        Ok((n, before, after))
    }

    /// Removes whole sealed segments whose entries are all at or before
    /// `retain_after`, and the applied marks of those entries. Blocks.
    pub(crate) fn purge(&self, retain_after: JournalPosition) -> Result<u64> {
        self.writable("purge")?;
        let storage = self.storage();
        let segs = self.segments();
        let active = segs.last().map(|s| s.base);
        let mut removed = 0;
        let mut purged_up_to = 0;
        for info in segs {
            if Some(info.base) == active {
                continue;
            }
            if info.last.is_some_and(|l| l <= retain_after.0) {
                let _files = self.shared.files.write().unwrap_or_else(|e| e.into_inner());
                lock(&self.shared.segments).retain(|s| s.base != info.base);
                storage
                    .remove_file(&info.path)
                    .map_err(|e| Error::io(format!("removing {}", info.path.display()), e))?;
                for derived in [
                    index::path(&self.dir, info.base),
                    crate::summary::path(&self.dir, info.base),
                    checkpoint::path(&self.dir, info.base),
                ] {
                    match storage.remove_file(&derived) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(Error::io(format!("removing {}", derived.display()), e));
                        }
                        _ => {}
                    }
                }
                purged_up_to = purged_up_to.max(info.last.unwrap_or(0));
                removed += 1;
            }
        }
        sync_dir(storage, &self.dir)?;
        if purged_up_to > 0 {
            lock(&self.shared.marks).prune(storage, &self.dir, purged_up_to)?;
        }
        Ok(removed)
    }

    /// Sets the status of every entry with an applied mark (one lock per batch).
    pub(crate) fn apply_marks(&self, entries: &mut [JournalEntry]) {
        let marks = lock(&self.shared.marks);
        for e in entries {
            if marks.contains(e.position.0) {
                e.status = crate::entry::EntryStatus::Replayed;
            }
        }
    }

    /// Appends applied marks and makes them durable. Blocks.
    pub(crate) fn mark(&self, marks: &[(JournalPosition, JournalEntryId)]) -> Result<()> {
        if marks.is_empty() {
            return Ok(());
        }
        self.writable("mark entries applied")?;
        lock(&self.shared.marks).append(marks)
    }

    /// Voids the applied marks of every position after `cut` (a restore undid
    /// their effects). Returns how many were voided. Blocks.
    pub(crate) fn reopen_after(&self, cut: JournalPosition) -> Result<u64> {
        self.writable("reopen entries after a restore")?;
        lock(&self.shared.marks).reopen_after(cut.0)
    }
}

/// Up to `limit` entries of `entries` that match `plan`, appended to `out`.
fn take_matching(
    entries: &[JournalEntry],
    plan: &ScanPlan,
    limit: usize,
    out: &mut Vec<JournalEntry>,
) {
    for e in entries {
        if out.len() >= limit {
            return;
        }
        if e.position.0 > plan.after && plan.matches(e) {
            out.push(e.clone());
        }
    }
}

/// Makes sure the sealed segment `info` (whose entries are `entries`) has a summary
/// that describes its file as it is now. A failure to write it is logged (the next
/// open decodes the segment instead).
fn ensure_summary(storage: &dyn Storage, dir: &Path, info: &SegmentInfo, entries: &[JournalEntry]) {
    let Ok(file_len) = storage
        .open(&info.path, OpenMode::Read)
        .and_then(|f| f.len())
    else {
        return;
    };
    let wanted = crate::summary::Summary::of(info.base, file_len, info.sealed, entries);
    if crate::summary::load(storage, dir, info.base).is_some_and(|s| {
        (s.file_len, s.sealed, s.entries, s.first, s.last)
            == (
                wanted.file_len,
                wanted.sealed,
                wanted.entries,
                wanted.first,
                wanted.last,
            )
    }) {
        return;
    }
    if let Err(e) = crate::summary::store(storage, dir, &wanted) {
        tracing::warn!(error = %e, segment = %info.name(), "journal segment summary not written");
    }
}

/// Makes sure the sealed segment `info` (raw bytes `raw`) has a valid index file:
/// a missing, damaged or stale one is rebuilt. A failure to write it is logged
/// (queries then decode the whole segment).
fn ensure_index(storage: &dyn Storage, dir: &Path, info: &SegmentInfo, raw: &[u8]) {
    let current = index::load(storage, dir, info.base).filter(|idx| {
        idx.records.first().map(|r| r.position) == info.first
            && idx.records.last().map(|r| r.position) == info.last
    });
    if current.is_some() {
        return;
    }
    let built = SegmentIndex::build(info.base, raw);
    if let Err(e) = index::store(storage, dir, &built) {
        tracing::warn!(error = %e, segment = %info.name(), "journal index not written");
    } else {
        tracing::info!(segment = %info.name(), entries = built.records.len(), "journal index (re)built");
    }
}

/// Entries of a sealed segment matching `plan`, picked with its index (only the
/// matching frames are decoded). `None` when the index is missing or does not fit
/// the bytes: the caller decodes the whole segment.
fn scan_indexed(
    storage: &dyn Storage,
    dir: &Path,
    info: &SegmentInfo,
    raw: &[u8],
    plan: &ScanPlan,
) -> Option<Vec<JournalEntry>> {
    let idx = index::load(storage, dir, info.base)?;
    let mut out = Vec::new();
    for r in idx.select(plan) {
        let at = r.offset as usize;
        let frame = raw.get(at..at.checked_add(r.len as usize)?)?;
        let frame::Decoded::Frame {
            kind: frame::KIND_ENTRY,
            body,
            ..
        } = frame::decode_frame(frame)
        else {
            return None;
        };
        let e = frame::decode_entry(body).ok()?;
        if e.position.0 != r.position {
            return None;
        }
        if plan.matches(&e) {
            out.push(e);
        }
    }
    Some(out)
}

/// Creates a new, empty active segment with base `base`, durable with its entry.
fn create_segment(storage: &dyn Storage, dir: &Path, base: u64) -> Result<SegmentInfo> {
    let path = dir.join(seg_name(base, false));
    sanare_fs::create_durable(storage, &path, &frame::segment_header_v2(base))
        .map_err(|e| Error::io(format!("creating journal segment {}", path.display()), e))?;
    let mut info = SegmentInfo::new(base, path, false);
    info.len = frame::SEGMENT_HEADER as u64;
    info.raw_len = info.len;
    Ok(info)
}

/// Opens a segment for positional writes (not append: the file is preallocated).
fn open_segment(storage: &dyn Storage, path: &Path) -> Result<Arc<dyn sanare_fs::File>> {
    storage
        .open(path, OpenMode::ReadWrite)
        .map_err(|e| Error::io(format!("opening journal segment {}", path.display()), e))
}

/// Opens `n` file descriptions of a segment for the sync threads (separate
/// `open`s, not `dup`s: see the invariants of the pipeline module).
fn open_sync_files(
    storage: &dyn Storage,
    path: &Path,
    n: usize,
) -> Result<Vec<Arc<dyn sanare_fs::File>>> {
    (0..n)
        .map(|_| {
            storage.open(path, OpenMode::Read).map_err(|e| {
                Error::io(
                    format!("opening journal segment {} for fdatasync", path.display()),
                    e,
                )
            })
        })
        .collect()
}
