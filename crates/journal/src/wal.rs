//! The segment-file WAL backend: group commit, rotation, recovery on open,
//! compression of sealed segments, retention.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use sanare_core::{Error, JournalEntryId, JournalPosition, Result};

use crate::entry::{JournalEntry, NewEntry, Recorded};
use crate::frame::{self, CorruptRegion};
use crate::index::{self, SegmentIndex};
use crate::lock::DirLock;
use crate::pipeline::{FaultPoint, Faults, Group, Pipeline, SyncJob};
use crate::query::ScanPlan;

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
            len: 0,
            raw_len: 0,
        }
    }

    pub(crate) fn add(&mut self, e: &JournalEntry) {
        self.first.get_or_insert(e.position.0);
        self.last = Some(e.position.0);
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

enum Cmd {
    Append(NewEntry, Reply),
    Rotate(oneshot::Sender<Result<()>>),
}

pub(crate) struct Shared {
    /// The last durable position.
    pub(crate) head: AtomicU64,
    /// Every segment; the last one is the active one.
    pub(crate) segments: Mutex<Vec<SegmentInfo>>,
    report: OpenReport,
    marks: Mutex<Marks>,
}

struct Marks {
    /// `None` when the journal is open read-only.
    file: Option<File>,
    applied: HashSet<u64>,
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

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing journal directory {}", dir.display()), e))
}

/// Reads the uncompressed bytes of a segment (up to its durable length).
fn read_raw(info: &SegmentInfo) -> Result<Vec<u8>> {
    let bytes = fs::read(&info.path).map_err(|e| {
        Error::io(
            format!("reading journal segment {}", info.path.display()),
            e,
        )
    })?;
    if info.sealed {
        frame::unseal(frame::SEALED_MAGIC, &bytes, &info.name())
    } else {
        let mut bytes = bytes;
        if info.len > 0 {
            bytes.truncate(usize::try_from(info.len).unwrap_or(usize::MAX));
        }
        Ok(bytes)
    }
}

/// What [`decode_segment`] found.
pub(crate) struct DecodedSegment {
    pub(crate) entries: Vec<JournalEntry>,
    pub(crate) corrupt: Vec<CorruptRegion>,
    /// Where a torn tail starts.
    pub(crate) torn: Option<usize>,
    /// Where the data ends (before a torn tail or preallocated zeros).
    pub(crate) end: usize,
}

/// Decodes every entry of a segment's bytes, isolating damage.
pub(crate) fn decode_segment(raw: &[u8], name: &str) -> Result<DecodedSegment> {
    frame::parse_segment_header(raw, name)?;
    let scan = frame::scan(raw, frame::SEGMENT_HEADER);
    let mut corrupt: Vec<CorruptRegion> = scan
        .corrupt
        .iter()
        .map(|&(offset, len, reason)| CorruptRegion {
            segment: name.to_owned(),
            offset: offset as u64,
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
                offset: offset as u64,
                len: (range.end - offset) as u64,
                reason: e.to_string(),
            }),
        }
    }
    Ok(DecodedSegment {
        entries,
        corrupt,
        torn: scan.torn_tail_at,
        end: scan.end,
    })
}

struct Writer {
    dir: PathBuf,
    file: File,
    base: u64,
    /// Bytes of data in the active segment (the next write goes here).
    len: u64,
    /// Bytes of the active segment's file already written and synced (data, then
    /// zeros): writes below this overwrite allocated blocks, so `fdatasync` has no
    /// metadata to flush.
    alloc: u64,
    next: u64,
    /// Idempotency keys of every entry written (durable or in flight).
    index: HashMap<String, (u64, Uuid)>,
    options: WalOptions,
    shared: Arc<Shared>,
    /// Groups in flight and the sync threads.
    pipe: Arc<Pipeline>,
    /// One job queue per sync thread.
    jobs: Vec<std::sync::mpsc::Sender<SyncJob>>,
    /// One open file description of the active segment per sync thread.
    sync_files: Vec<Arc<File>>,
    /// Syncs started so far (sync `n` makes the `n`-th group with data durable).
    submitted: u64,
    poisoned: Option<String>,
}

impl Wal {
    /// Opens (or creates) the WAL in `dir`: recovers a torn tail, isolates damage.
    pub(crate) fn open(dir: &Path, options: WalOptions) -> Result<Self> {
        let read_only = options.read_only;
        let lock = if read_only {
            if !dir.is_dir() {
                return Err(Error::not_found(format!(
                    "journal directory {} (opening read-only creates nothing)",
                    dir.display()
                )));
            }
            None
        } else {
            fs::create_dir_all(dir).map_err(|e| {
                Error::io(format!("creating journal directory {}", dir.display()), e)
            })?;
            Some(DirLock::acquire(dir, options.lock_wait)?)
        };
        let mut by_base: std::collections::BTreeMap<u64, (Option<PathBuf>, Option<PathBuf>)> =
            Default::default();
        let rd = fs::read_dir(dir)
            .map_err(|e| Error::io(format!("listing journal directory {}", dir.display()), e))?;
        for item in rd {
            let item = item.map_err(|e| Error::io("listing journal directory", e))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let (stem, sealed) = if let Some(s) = name.strip_suffix(".walz") {
                (s, true)
            } else if let Some(s) = name.strip_suffix(".wal") {
                (s, false)
            } else {
                continue;
            };
            let Ok(base) = stem.parse::<u64>() else {
                continue;
            };
            let slot = by_base.entry(base).or_default();
            if sealed {
                slot.1 = Some(item.path());
            } else {
                slot.0 = Some(item.path());
            }
        }
        let mut report = OpenReport::default();
        let mut segments = Vec::new();
        let mut index = HashMap::new();
        let mut last_pos = 0u64;
        let count = by_base.len();
        for (i, (base, (raw, sealed))) in by_base.into_iter().enumerate() {
            let is_last = i + 1 == count;
            // A crash during compaction can leave both files; the sealed one wins
            // when it verifies.
            let mut info = None;
            if let Some(path) = sealed {
                let candidate = SegmentInfo::new(base, path.clone(), true);
                match read_raw(&candidate) {
                    Ok(bytes) => {
                        if let Some(raw) = &raw {
                            let _ = fs::remove_file(raw);
                        }
                        info = Some((candidate, bytes));
                    }
                    Err(e) if raw.is_some() => {
                        tracing::warn!(error = %e, "sealed journal segment unreadable; using its raw copy");
                        let _ = fs::remove_file(&path);
                    }
                    Err(e) => return Err(e),
                }
            }
            let (mut info, bytes) = match info {
                Some(x) => x,
                None => {
                    let Some(path) = raw else { continue };
                    let mut candidate = SegmentInfo::new(base, path, false);
                    let bytes = read_raw(&candidate)?;
                    candidate.len = bytes.len() as u64;
                    (candidate, bytes)
                }
            };
            if bytes.len() < frame::SEGMENT_HEADER && !info.sealed && is_last && read_only {
                // Being created by the writer right now: nothing to read yet.
                continue;
            }
            if bytes.len() < frame::SEGMENT_HEADER && !info.sealed && is_last {
                // Crashed while creating the segment: rewrite its header.
                let mut f = OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&info.path)
                    .map_err(|e| Error::io("rewriting a torn journal segment header", e))?;
                f.write_all(&frame::segment_header(base))
                    .and_then(|()| f.sync_data())
                    .map_err(|e| Error::io("rewriting a torn journal segment header", e))?;
                info.len = frame::SEGMENT_HEADER as u64;
                segments.push(info);
                continue;
            }
            let name = info.name();
            let DecodedSegment {
                entries,
                corrupt,
                torn,
                end,
            } = decode_segment(&bytes, &name)?;
            report.corrupt.extend(corrupt);
            info.raw_len = end as u64;
            if !info.sealed {
                // Readers and the writer stop at the data's end, not at the
                // preallocated zeros after it.
                info.len = end as u64;
            }
            for e in &entries {
                if e.position.0 <= last_pos {
                    report.corrupt.push(CorruptRegion {
                        segment: name.clone(),
                        offset: 0,
                        len: 0,
                        reason: format!("position {} out of order; entry ignored", e.position),
                    });
                    continue;
                }
                last_pos = e.position.0;
                info.add(e);
                if let Some(k) = &e.idempotency_key {
                    index.insert(k.clone(), (e.position.0, e.id.as_uuid()));
                }
                report.entries += 1;
            }
            if let Some(at) = torn {
                let removed = bytes.len() - at;
                if is_last && !info.sealed && read_only {
                    // The writer's in-flight group, or a torn tail the writer will
                    // cut at its next open: read up to it, change nothing.
                    info.len = at as u64;
                    info.raw_len = at as u64;
                } else if is_last && !info.sealed {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&info.path)
                        .map_err(|e| {
                            Error::io(format!("opening {} to cut its torn tail", name), e)
                        })?;
                    f.set_len(at as u64)
                        .and_then(|()| f.sync_all())
                        .map_err(|e| Error::io(format!("cutting the torn tail of {name}"), e))?;
                    info.len = at as u64;
                    info.raw_len = at as u64;
                    tracing::warn!(segment = %name, offset = at, bytes = removed, "journal: torn tail truncated");
                    metrics::counter!("sanare_journal_torn_tails_total").increment(1);
                    report.truncated_tail = Some((name.clone(), at as u64, removed as u64));
                } else {
                    report.corrupt.push(CorruptRegion {
                        segment: name.clone(),
                        offset: at as u64,
                        len: removed as u64,
                        reason: "unreadable data at the end of a sealed segment".into(),
                    });
                }
            }
            if (!is_last || info.sealed) && !read_only {
                ensure_index(dir, &info, &bytes);
            }
            segments.push(info);
        }
        for c in &report.corrupt {
            tracing::error!(segment = %c.segment, offset = c.offset, reason = %c.reason, "journal: corrupt region isolated");
        }
        report.segments = segments.len() as u64;
        let next = last_pos + 1;
        // The active segment: the last raw one, or a new one.
        let need_new = segments.last().is_none_or(|s| s.sealed);
        if read_only {
            let marks = open_marks_read_only(dir)?;
            let (tx, _) = mpsc::unbounded_channel();
            return Ok(Self {
                dir: dir.to_owned(),
                tx,
                shared: Arc::new(Shared {
                    head: AtomicU64::new(last_pos),
                    segments: Mutex::new(segments),
                    report,
                    marks: Mutex::new(marks),
                }),
                _lock: None,
            });
        }
        if need_new {
            let info = create_segment(dir, next)?;
            segments.push(info);
        }
        let active = segments
            .last()
            .cloned()
            .ok_or_else(|| Error::invalid_input("journal has no active segment"))?;
        let file = open_segment(&active.path)?;
        let alloc = file
            .metadata()
            .map_err(|e| Error::io(format!("reading the size of {}", active.path.display()), e))?
            .len()
            .max(active.len);
        let marks = open_marks(dir)?;
        let shared = Arc::new(Shared {
            head: AtomicU64::new(last_pos),
            segments: Mutex::new(segments),
            report,
            marks: Mutex::new(marks),
        });
        let depth = options.sync_pipeline_depth.max(1);
        let (pipe, jobs) = Pipeline::start(
            depth,
            shared.clone(),
            options.events.clone(),
            options.faults.clone(),
        )?;
        let sync_files = open_sync_files(&active.path, depth)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            dir: dir.to_owned(),
            file,
            base: active.base,
            len: active.len,
            alloc,
            next,
            index,
            options,
            shared: shared.clone(),
            pipe,
            jobs,
            sync_files,
            submitted: 0,
            poisoned: None,
        };
        std::thread::Builder::new()
            .name("sanare-journal-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::io("starting the journal writer thread", e))?;
        Ok(Self {
            dir: dir.to_owned(),
            tx,
            shared,
            _lock: lock,
        })
    }

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

    pub(crate) fn report(&self) -> &OpenReport {
        &self.shared.report
    }

    pub(crate) fn head(&self) -> JournalPosition {
        JournalPosition(self.shared.head.load(Ordering::Acquire))
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

    fn segments(&self) -> Vec<SegmentInfo> {
        lock(&self.shared.segments).clone()
    }

    /// Entries matching `plan` with positions after `after`, in order, at most about
    /// `limit` (whole segments are read). Also returns the corrupt regions seen.
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
        let segs = self.segments();
        let active = segs.last().map(|s| s.base);
        for info in segs {
            if !info.may_match(&plan) {
                continue;
            }
            let raw = read_raw(&info)?;
            if Some(info.base) != active
                && let Some(entries) = scan_indexed(&self.dir, &info, &raw, &plan)
            {
                out.extend(entries);
                if out.len() >= limit {
                    break;
                }
                continue;
            }
            let DecodedSegment {
                entries, corrupt, ..
            } = decode_segment(&raw, &info.name())?;
            damage.extend(corrupt);
            out.extend(entries.into_iter().filter(|e| plan.matches(e)));
            if out.len() >= limit {
                break;
            }
        }
        Ok((out, damage))
    }

    /// Every entry and damaged region (for `validate`).
    pub(crate) fn validate(&self) -> Result<(u64, u64, Vec<CorruptRegion>)> {
        let mut entries = 0u64;
        let mut damage = Vec::new();
        let segs = self.segments();
        let mut last = 0u64;
        for info in &segs {
            let raw = read_raw(info)?;
            let DecodedSegment {
                entries: es,
                corrupt,
                torn,
                ..
            } = decode_segment(&raw, &info.name())?;
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
        Ok((segs.len() as u64, entries, damage))
    }

    /// Compresses every sealed raw segment. Returns (segments, raw bytes, stored bytes).
    pub(crate) fn compact(&self) -> Result<(u64, u64, u64)> {
        self.writable("compact")?;
        let segs = self.segments();
        let active = segs.last().map(|s| s.base);
        let (mut n, mut before, mut after) = (0u64, 0u64, 0u64);
        for info in segs {
            if info.sealed || Some(info.base) == active {
                continue;
            }
            let raw = read_raw(&info)?;
            let sealed = frame::seal(frame::SEALED_MAGIC, &raw)?;
            let path = self.dir.join(seg_name(info.base, true));
            let tmp = path.with_extension("walz.tmp");
            write_durable(&tmp, &sealed)?;
            fs::rename(&tmp, &path)
                .map_err(|e| Error::io(format!("installing {}", path.display()), e))?;
            sync_dir(&self.dir)?;
            {
                let mut list = lock(&self.shared.segments);
                if let Some(s) = list.iter_mut().find(|s| s.base == info.base) {
                    s.sealed = true;
                    s.path = path.clone();
                }
            }
            fs::remove_file(&info.path)
                .map_err(|e| Error::io(format!("removing {}", info.path.display()), e))?;
            n += 1;
            before += raw.len() as u64;
            after += sealed.len() as u64;
        }
        Ok((n, before, after))
    }

    /// Removes whole sealed segments whose entries are all at or before `retain_after`.
    pub(crate) fn purge(&self, retain_after: JournalPosition) -> Result<u64> {
        self.writable("purge")?;
        let segs = self.segments();
        let active = segs.last().map(|s| s.base);
        let mut removed = 0;
        for info in segs {
            if Some(info.base) == active {
                continue;
            }
            if info.last.is_some_and(|l| l <= retain_after.0) {
                lock(&self.shared.segments).retain(|s| s.base != info.base);
                fs::remove_file(&info.path)
                    .map_err(|e| Error::io(format!("removing {}", info.path.display()), e))?;
                let idx = index::path(&self.dir, info.base);
                if let Err(e) = fs::remove_file(&idx)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    return Err(Error::io(format!("removing {}", idx.display()), e));
                }
                removed += 1;
            }
        }
        sync_dir(&self.dir)?;
        Ok(removed)
    }

    /// Sets the status of every entry with an applied mark (one lock per batch).
    pub(crate) fn apply_marks(&self, entries: &mut [JournalEntry]) {
        let marks = lock(&self.shared.marks);
        if marks.applied.is_empty() {
            return;
        }
        for e in entries {
            if marks.applied.contains(&e.position.0) {
                e.status = crate::entry::EntryStatus::Replayed;
            }
        }
    }

    /// Appends applied marks and makes them durable.
    pub(crate) fn mark(&self, marks: &[(JournalPosition, JournalEntryId)]) -> Result<()> {
        if marks.is_empty() {
            return Ok(());
        }
        self.writable("mark entries applied")?;
        let mut buf = Vec::with_capacity(marks.len() * 36);
        for (p, id) in marks {
            frame::encode_applied(*p, *id, &mut buf);
        }
        let mut m = lock(&self.shared.marks);
        let file = m
            .file
            .as_mut()
            .ok_or_else(|| Error::conflict("the journal's applied marks are open read-only"))?;
        file.write_all(&buf)
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io("writing journal applied marks", e))?;
        m.applied.extend(marks.iter().map(|(p, _)| p.0));
        Ok(())
    }
}

/// Makes sure the sealed segment `info` (raw bytes `raw`) has a valid index file:
/// a missing, damaged or stale one is rebuilt. A failure to write it is logged
/// (queries then decode the whole segment).
fn ensure_index(dir: &Path, info: &SegmentInfo, raw: &[u8]) {
    let current = index::load(dir, info.base).filter(|idx| {
        idx.records.first().map(|r| r.position) == info.first
            && idx.records.last().map(|r| r.position) == info.last
    });
    if current.is_some() {
        return;
    }
    let built = SegmentIndex::build(info.base, raw);
    if let Err(e) = index::store(dir, &built) {
        tracing::warn!(error = %e, segment = %info.name(), "journal index not written");
    } else {
        tracing::info!(segment = %info.name(), entries = built.records.len(), "journal index (re)built");
    }
}

/// Entries of a sealed segment matching `plan`, picked with its index (only the
/// matching frames are decoded). `None` when the index is missing or does not fit
/// the bytes: the caller decodes the whole segment.
fn scan_indexed(
    dir: &Path,
    info: &SegmentInfo,
    raw: &[u8],
    plan: &ScanPlan,
) -> Option<Vec<JournalEntry>> {
    let idx = index::load(dir, info.base)?;
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

fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        File::create(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn create_segment(dir: &Path, base: u64) -> Result<SegmentInfo> {
    let path = dir.join(seg_name(base, false));
    write_durable(&path, &frame::segment_header(base))?;
    sync_dir(dir)?;
    let mut info = SegmentInfo::new(base, path, false);
    info.len = frame::SEGMENT_HEADER as u64;
    info.raw_len = info.len;
    Ok(info)
}

/// Opens a segment for positional writes (not append: the file is preallocated).
fn open_segment(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening journal segment {}", path.display()), e))
}

/// Zeros written ahead of the data in one go: the group that crosses the
/// preallocated end pays one metadata flush, the next ~1 MiB of groups none.
const PREALLOCATE: u64 = 1 << 20;

fn open_marks(dir: &Path) -> Result<Marks> {
    let path = dir.join("applied.marks");
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let mut applied = HashSet::new();
    if bytes.len() < frame::SEGMENT_HEADER {
        write_durable(&path, &frame::segment_header(0))?;
    } else {
        frame::parse_segment_header(&bytes, "journal applied marks")?;
        let scan = frame::scan(&bytes, frame::SEGMENT_HEADER);
        for (_, kind, range) in scan.frames {
            if kind == frame::KIND_APPLIED
                && let Some((p, _)) = frame::decode_applied(&bytes[range])
            {
                applied.insert(p.0);
            }
        }
        if let Some(at) = scan
            .torn_tail_at
            .or((scan.end < bytes.len()).then_some(scan.end))
        {
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| Error::io("opening journal applied marks", e))?;
            f.set_len(at as u64)
                .and_then(|()| f.sync_all())
                .map_err(|e| Error::io("cutting the torn tail of journal applied marks", e))?;
        }
    }
    let file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    Ok(Marks {
        file: Some(file),
        applied,
    })
}

/// The applied marks as they are, changing nothing.
fn open_marks_read_only(dir: &Path) -> Result<Marks> {
    let path = dir.join("applied.marks");
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let mut applied = HashSet::new();
    if bytes.len() >= frame::SEGMENT_HEADER {
        frame::parse_segment_header(&bytes, "journal applied marks")?;
        for (_, kind, range) in frame::scan(&bytes, frame::SEGMENT_HEADER).frames {
            if kind == frame::KIND_APPLIED
                && let Some((p, _)) = frame::decode_applied(&bytes[range])
            {
                applied.insert(p.0);
            }
        }
    }
    Ok(Marks {
        file: None,
        applied,
    })
}

/// Opens `n` file descriptions of a segment for the sync threads (separate
/// `open`s, not `dup`s: see the invariants of the pipeline module).
fn open_sync_files(path: &Path, n: usize) -> Result<Vec<Arc<File>>> {
    (0..n)
        .map(|_| {
            File::open(path).map(Arc::new).map_err(|e| {
                Error::io(
                    format!("opening journal segment {} for fdatasync", path.display()),
                    e,
                )
            })
        })
        .collect()
}

impl Writer {
    /// The writer thread: takes the callers queued, encodes their entries and
    /// writes them with one `pwrite`, hands the group's `fdatasync` to an idle sync
    /// thread and goes on with the next group; the sync threads answer callers in
    /// order. While every sync thread is busy the writer waits, and callers queue
    /// up for the next group.
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        // Buffers reused from group to group: no allocation per group beyond the
        // entries themselves.
        let mut buf = Vec::with_capacity(1 << 20);
        let mut batch = Vec::with_capacity(self.options.max_batch.min(4096));
        let mut batch_keys: HashMap<String, (u64, Uuid)> = HashMap::new();
        let mut rotate = Vec::new();
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
                    Cmd::Append(entry, reply) => {
                        if let Some(p) = &self.poisoned {
                            let _ = reply.send(Err(Error::unavailable(format!(
                                "the journal stopped accepting writes after a failed write ({p}); reopen it"
                            ))));
                            continue;
                        }
                        // A key seen before, durable or still in flight: the
                        // duplicate is answered in its own group, after the
                        // original's.
                        if let Some(k) = &entry.idempotency_key
                            && let Some(&(pos, id)) =
                                self.index.get(k).or_else(|| batch_keys.get(k))
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
            self.commit(slot, &mut buf, &mut batch_keys, written, replies);
            if self.len >= self.options.segment_size || !rotate.is_empty() {
                // Seal only what is durable: every group answered, no sync running.
                let res = match self.pipe.drain() {
                    Err(msg) => {
                        self.poisoned.get_or_insert(msg.clone());
                        Err(Error::unavailable(format!(
                            "the journal stopped accepting writes after a failed write ({msg}); reopen it"
                        )))
                    }
                    Ok(()) if self.poisoned.is_some() => {
                        Err(Error::unavailable("journal write failed"))
                    }
                    Ok(()) => self.rotate_now(),
                };
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
        }
        // Every caller answered before the thread ends; dropping `self.jobs`
        // stops the sync threads.
        let _ = self.pipe.drain();
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
        self.index.extend(batch_keys.drain());
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
        use std::os::unix::fs::FileExt;
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
            let spawned = std::thread::Builder::new()
                .name("sanare-journal-index".into())
                .spawn(move || match read_raw(&sealed) {
                    Ok(raw) => ensure_index(&dir, &sealed, &raw),
                    Err(e) => tracing::warn!(error = %e, "journal index not built"),
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "journal index thread not started; rebuilt on open");
            }
        }
        let info = create_segment(&self.dir, self.next)?;
        let file = open_segment(&info.path)?;
        let sync_files = open_sync_files(&info.path, self.jobs.len())?;
        self.file = file;
        self.sync_files = sync_files;
        self.base = info.base;
        self.len = info.len;
        self.alloc = info.len;
        lock(&self.shared.segments).push(info);
        Ok(())
    }
}
