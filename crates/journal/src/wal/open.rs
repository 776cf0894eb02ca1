//! Opening the WAL: recovery of its directory.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use sanare_fs::Storage;
use tokio::sync::mpsc;

use sanare_core::{Error, Result};

use super::checkpoint;
use super::keys::KeyWindow;
use super::writer::{KeyLoad, KeySource, Writer};
use super::{
    DecodedSegment, Marks, OpenReport, SegmentInfo, Shared, Wal, WalOptions, create_segment,
    decode_segment, ensure_index, ensure_summary, open_segment, open_sync_files, read_raw,
    sync_dir,
};
use crate::entry::JournalEntry;
use crate::frame::{self, CorruptRegion};
use crate::lock::DirLock;
use crate::pipeline::Pipeline;

/// The segment files of a directory by base position: (raw, sealed).
type Listing = BTreeMap<u64, (Option<PathBuf>, Option<PathBuf>)>;

fn list(storage: &dyn Storage, dir: &Path) -> Result<Listing> {
    let names = storage
        .list(dir)
        .map_err(|e| Error::io(format!("listing journal directory {}", dir.display()), e))?;
    let mut by_base = Listing::new();
    for name in names {
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
            slot.1 = Some(dir.join(&name));
        } else {
            slot.0 = Some(dir.join(&name));
        }
    }
    Ok(by_base)
}

/// What recovery learnt from the segments.
struct Recovered {
    segments: Vec<SegmentInfo>,
    report: OpenReport,
    /// Where the idempotency keys of each segment are, in position order.
    keys: Vec<KeySource>,
    /// The last position of an entry found.
    last_pos: u64,
    /// The highest base of a segment: no position below it may be handed out again.
    high_base: u64,
    /// (position, recorded at) samples of the last segment's entries.
    recent: VecDeque<(u64, i128)>,
}

impl Wal {
    /// Opens (or creates) the WAL in `dir`: recovers a torn tail, isolates damage.
    /// Blocks: call it off the async runtime.
    pub(crate) fn open(dir: &Path, options: WalOptions, key_window: usize) -> Result<Self> {
        let storage = options.storage.clone();
        let read_only = options.read_only;
        let lock = if read_only {
            if let Err(e) = storage.list(dir) {
                return Err(if e.kind() == std::io::ErrorKind::NotFound {
                    Error::not_found(format!(
                        "journal directory {} (opening read-only creates nothing)",
                        dir.display()
                    ))
                } else {
                    Error::io(format!("listing journal directory {}", dir.display()), e)
                });
            }
            None
        } else {
            storage.create_dir_all(dir).map_err(|e| {
                Error::io(format!("creating journal directory {}", dir.display()), e)
            })?;
            Some(DirLock::acquire(&*storage, dir, options.lock_wait)?)
        };
        let listing = list(&*storage, dir)?;
        let Recovered {
            mut segments,
            report,
            keys,
            last_pos,
            high_base,
            recent,
        } = recover(&*storage, dir, listing, read_only)?;
        for c in &report.corrupt {
            tracing::error!(segment = %c.segment, offset = c.offset, reason = %c.reason, "journal: corrupt region isolated");
        }
        // Positions are never handed out twice: a segment's base was the next
        // position when it was created, so it bounds every position before it,
        // even when the entries themselves were purged.
        let next = (last_pos + 1).max(high_base).max(1);
        let head = next - 1;
        let marks = Marks::open(storage.clone(), dir, read_only)?;
        let shared = Arc::new(Shared {
            head: AtomicU64::new(head),
            segments: Mutex::new(Vec::new()),
            files: RwLock::new(()),
            decoded: Mutex::new(None),
            recent: Mutex::new(recent),
            report,
            marks: Mutex::new(marks),
            storage: storage.clone(),
        });
        if read_only {
            *super::lock(&shared.segments) = segments;
            let (tx, _) = mpsc::unbounded_channel();
            return Ok(Self {
                dir: dir.to_owned(),
                tx,
                shared,
                _lock: None,
            });
        }
        if segments.last().is_none_or(|s| s.sealed) {
            segments.push(create_segment(&*storage, dir, next)?);
        }
        let active = segments
            .last()
            .cloned()
            .ok_or_else(|| Error::invalid_input("journal has no active segment"))?;
        let file = open_segment(&*storage, &active.path)?;
        // Whatever the last process wrote and nobody synced (it died before the
        // fdatasync) is made durable now, before later groups claim it durable.
        let alloc = file
            .sync_data()
            .and_then(|()| file.len())
            .map_err(|e| Error::io(format!("syncing {}", active.path.display()), e))?
            .max(active.len);
        *super::lock(&shared.segments) = segments;
        let depth = options.sync_pipeline_depth.max(1);
        let checkpoints = checkpoint::Checkpoints::start(
            storage.clone(),
            dir.to_owned(),
            checkpoint::interval(options.segment_size),
            &active,
        )
        .map_err(|e| Error::io("starting the journal checkpoint thread", e))?;
        let (pipe, jobs) = Pipeline::start(
            depth,
            shared.clone(),
            options.events.clone(),
            options.faults.clone(),
            checkpoints,
        )?;
        let sync_files = open_sync_files(&*storage, &active.path, depth)?;
        let older_keys = KeyLoad {
            dir: dir.to_owned(),
            sources: keys,
            capacity: key_window,
        }
        .start(shared.clone())?;
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            dir: dir.to_owned(),
            file,
            len: active.len,
            alloc,
            next,
            keys: KeyWindow::new(key_window),
            older_keys: Some(older_keys),
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
}

/// Reads every segment in order: torn tails cut (the active segment's only),
/// damage isolated and reported, indexes of sealed segments made sure of.
fn recover(
    storage: &dyn Storage,
    dir: &Path,
    listing: Listing,
    read_only: bool,
) -> Result<Recovered> {
    let mut r = Recovered {
        segments: Vec::new(),
        report: OpenReport::default(),
        keys: Vec::new(),
        last_pos: 0,
        high_base: 0,
        recent: VecDeque::new(),
    };
    let count = listing.len();
    for (i, (base, (raw, sealed))) in listing.into_iter().enumerate() {
        let is_last = i + 1 == count;
        r.high_base = r.high_base.max(base);
        if !is_last && let Some((info, entries)) = summarized(storage, dir, base, &raw, &sealed) {
            // Known from its summary: not decoded.
            r.report.entries += entries;
            r.last_pos = r.last_pos.max(info.last.unwrap_or(0));
            r.recent.clear();
            if let Some(last) = info.last {
                r.recent.push_back((last, info.max_time_ns));
            }
            r.keys.push(KeySource::Summary(base));
            r.segments.push(info);
            continue;
        }
        if is_last
            && sealed.is_none()
            && let Some(path) = &raw
            && let Some(resumed) = checkpoint::resume(storage, dir, base, path)
            && resumed.info.first.is_some_and(|f| f > r.last_pos)
        {
            // The active segment, from its checkpoint: only what follows is decoded.
            resume_active(storage, &mut r, resumed, read_only)?;
            continue;
        }
        let Some((mut info, bytes)) = load_segment(storage, dir, base, raw, sealed, &mut r.report)?
        else {
            continue;
        };
        if bytes.len() < frame::SEGMENT_HEADER && !info.sealed && is_last {
            if read_only {
                // Being created by the writer right now: nothing to read yet.
                continue;
            }
            // Crashed while creating the segment: write its header anew.
            sanare_fs::write_atomic(storage, &info.path, &frame::segment_header_v2(base))
                .map_err(|e| Error::io("rewriting a torn journal segment header", e))?;
            info.len = frame::SEGMENT_HEADER as u64;
            info.raw_len = info.len;
            r.segments.push(info);
            continue;
        }
        let name = info.name();
        let sealed_or_old = info.sealed || !is_last;
        let DecodedSegment {
            entries,
            corrupt,
            torn,
            end,
        } = match decode_segment(&bytes, &name, sealed_or_old) {
            Ok(d) => d,
            Err(e) => {
                // A segment whose header is unreadable: report it, keep the rest.
                r.report.corrupt.push(CorruptRegion {
                    segment: name.clone(),
                    offset: 0,
                    len: bytes.len() as u64,
                    reason: format!("unreadable segment, skipped: {e}"),
                });
                continue;
            }
        };
        r.report.corrupt.extend(corrupt);
        info.raw_len = end as u64;
        if !info.sealed {
            // Readers and the writer stop at the data's end, not at the
            // preallocated zeros after it.
            info.len = end as u64;
        }
        take_entries(&mut r, &mut info, &entries, is_last, i128::MIN);
        if !is_last && let Some(last) = info.last {
            // Older segments are summed up by one sample.
            r.recent.clear();
            r.recent.push_back((last, info.max_time_ns));
        }
        if let Some(at) = torn {
            cut_tail(
                storage,
                &mut info,
                &mut r.report,
                bytes.len(),
                at,
                is_last,
                read_only,
            )?;
        }
        if sealed_or_old && !read_only {
            ensure_index(storage, dir, &info, &bytes);
            ensure_summary(storage, dir, &info, &entries);
        }
        r.segments.push(info);
    }
    r.report.segments = r.segments.len() as u64;
    Ok(r)
}

/// Adds the decoded `entries` of the segment `info` to what recovery learnt: an
/// entry out of order is reported and ignored, keys are remembered, and (`sample`,
/// for the last segment) every 64th entry's time is sampled, starting from `max_t`.
fn take_entries(
    r: &mut Recovered,
    info: &mut SegmentInfo,
    entries: &[JournalEntry],
    sample: bool,
    mut max_t: i128,
) {
    let name = info.name();
    let mut keys = Vec::new();
    for (n, e) in entries.iter().enumerate() {
        if e.position.0 <= r.last_pos {
            r.report.corrupt.push(CorruptRegion {
                segment: name.clone(),
                offset: 0,
                len: 0,
                reason: format!("position {} out of order; entry ignored", e.position),
            });
            continue;
        }
        r.last_pos = e.position.0;
        info.add(e);
        if let Some(k) = &e.idempotency_key {
            keys.push((e.position.0, super::keys::hash(k), e.id.as_uuid()));
        }
        r.report.entries += 1;
        max_t = max_t.max(e.recorded_at.unix_timestamp_nanos());
        if sample && (n % 64 == 63 || n + 1 == entries.len()) {
            r.recent.push_back((e.position.0, max_t));
        }
    }
    r.keys.push(KeySource::Decoded(keys));
}

/// Takes in the active segment as its checkpoint and the frames after it
/// describe it (the prefix's keys are read later, by the key loader).
fn resume_active(
    storage: &dyn Storage,
    r: &mut Recovered,
    resumed: checkpoint::Resumed,
    read_only: bool,
) -> Result<()> {
    let checkpoint::Resumed {
        mut info,
        tail,
        origin,
        file_len,
    } = resumed;
    r.report.resumed_at = Some(origin);
    r.report.entries += info.entries;
    r.last_pos = r.last_pos.max(info.last.unwrap_or(0));
    r.recent.clear();
    if let Some(last) = info.last {
        r.recent.push_back((last, info.max_time_ns));
    }
    r.report.corrupt.extend(tail.corrupt);
    r.keys.push(KeySource::Prefix {
        base: info.base,
        len: origin,
    });
    let max_t = info.max_time_ns;
    take_entries(r, &mut info, &tail.entries, true, max_t);
    info.len = tail.end as u64;
    info.raw_len = info.len;
    if let Some(at) = tail.torn {
        let total = usize::try_from(file_len).unwrap_or(usize::MAX);
        cut_tail(
            storage,
            &mut info,
            &mut r.report,
            total,
            at,
            true,
            read_only,
        )?;
    }
    r.segments.push(info);
    Ok(())
}

/// Reads one segment: the sealed file when it verifies (a crash during compaction
/// can leave both), else the raw one. A sealed segment that does not verify and
/// has no raw copy is reported and skipped: the rest of the journal opens.
fn load_segment(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
    raw: Option<PathBuf>,
    sealed: Option<PathBuf>,
    report: &mut OpenReport,
) -> Result<Option<(SegmentInfo, Vec<u8>)>> {
    if let Some(path) = sealed {
        let candidate = SegmentInfo::new(base, path.clone(), true);
        let (bytes, damage) = read_raw(storage, &candidate)?;
        if damage.is_empty() || raw.is_none() {
            if let Some(raw) = &raw {
                // Compaction finished but for removing the raw copy.
                let _ = storage.remove_file(raw);
                sync_dir(storage, dir)?;
            }
            report.corrupt.extend(damage);
            return Ok(Some((candidate, bytes)));
        }
        // Compaction was cut short: the raw copy is whole.
        tracing::warn!(segment = %candidate.name(), "sealed journal segment damaged; using its raw copy");
        let _ = storage.remove_file(&path);
        sync_dir(storage, dir)?;
    }
    let Some(path) = raw else { return Ok(None) };
    let mut candidate = SegmentInfo::new(base, path, false);
    let (bytes, _) = read_raw(storage, &candidate)?;
    candidate.len = bytes.len() as u64;
    Ok(Some((candidate, bytes)))
}

/// A torn tail: cut off the active segment (left alone when read-only); anywhere
/// else, reported as corruption.
fn cut_tail(
    storage: &dyn Storage,
    info: &mut SegmentInfo,
    report: &mut OpenReport,
    total: usize,
    at: usize,
    is_last: bool,
    read_only: bool,
) -> Result<()> {
    let name = info.name();
    let removed = total - at;
    if is_last && !info.sealed && read_only {
        // The writer's in-flight group, or a torn tail the writer will cut at
        // its next open: read up to it, change nothing.
        info.len = at as u64;
        info.raw_len = at as u64;
    } else if is_last && !info.sealed {
        let f = storage
            .open(&info.path, sanare_fs::OpenMode::ReadWrite)
            .map_err(|e| Error::io(format!("opening {name} to cut its torn tail"), e))?;
        f.set_len(at as u64)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(format!("cutting the torn tail of {name}"), e))?;
        info.len = at as u64;
        info.raw_len = at as u64;
        tracing::warn!(segment = %name, offset = at, bytes = removed, "journal: torn tail truncated");
        metrics::counter!("sanare_journal_torn_tails_total").increment(1);
        report.truncated_tail = Some((name, at as u64, removed as u64));
    } else {
        report.corrupt.push(CorruptRegion {
            segment: name,
            offset: at as u64,
            len: removed as u64,
            reason: "unreadable data at the end of a sealed segment".into(),
        });
    }
    Ok(())
}

/// The segment `base` as its summary describes it (and its number of entries), when the summary checks and
/// describes the one file there is (a raw or a sealed one, of the same length).
fn summarized(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
    raw: &Option<PathBuf>,
    sealed: &Option<PathBuf>,
) -> Option<(SegmentInfo, u64)> {
    let (path, is_sealed) = match (raw, sealed) {
        (Some(p), None) => (p, false),
        (None, Some(p)) => (p, true),
        _ => return None,
    };
    let s = crate::summary::load(storage, dir, base)?;
    let len = storage
        .open(path, sanare_fs::OpenMode::Read)
        .and_then(|f| f.len())
        .ok()?;
    if s.sealed != is_sealed || s.file_len != len {
        return None;
    }
    let mut info = SegmentInfo::new(base, path.clone(), is_sealed);
    info.first = s.first;
    info.last = s.last;
    info.min_time_ns = i128::from(s.min_ns);
    info.max_time_ns = i128::from(s.max_ns);
    info.op_types = s.op_types.into_iter().collect();
    if !is_sealed {
        info.len = len;
        info.raw_len = len;
    }
    Some((info, s.entries))
}
