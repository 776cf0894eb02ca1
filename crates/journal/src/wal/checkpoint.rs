//! Checkpoints of the active segment (`<base>.ckpt`, format in `docs/formats.md`):
//! what a segment summary says, for the prefix of the active segment that was
//! durable when it was written, so that opening decodes only what follows it.
//!
//! A checkpoint is a hint, never trusted over the segment: opening uses it only
//! when it checks, describes a version-2 segment of its base, and the bytes just
//! before the offset it names are an intact group trailer whose last position is
//! the checkpoint's. A missing, torn, stale or lying checkpoint makes opening
//! decode the whole segment, as it would without one.
//!
//! The answering thread of the group commit hands the active segment's metadata to
//! the checkpoint thread each time `every` more bytes are durable; that thread
//! writes it (write, `fsync`, rename, directory `fsync`) off the writers' path.
//! The idempotency keys of the prefix are not in it: the key loader reads them from
//! the segment, in the background (see `writer::KeyLoad`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use sanare_fs::{OpenMode, Storage};

use super::{DecodedSegment, SegmentInfo, decode_tail};
use crate::frame;
use crate::summary::Summary;

/// Durable bytes of the active segment between two checkpoints, at most.
const EVERY: u64 = 4 << 20;

/// Bytes between checkpoints for segments of `segment_size` bytes: at most
/// [`EVERY`], and several per segment.
pub(super) fn interval(segment_size: u64) -> u64 {
    (segment_size / 8).clamp(4096, EVERY)
}

/// The path of the checkpoint of the active segment `base`.
pub(crate) fn path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.ckpt"))
}

/// The checkpoint's contents for `info` (its durable prefix: `info.len` bytes).
fn summary_of(info: &SegmentInfo) -> Summary {
    let clamp = |ns: i128| i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX });
    Summary {
        base: info.base,
        file_len: info.len,
        sealed: false,
        entries: info.entries,
        first: info.first,
        last: info.last,
        min_ns: clamp(info.min_time_ns),
        max_ns: clamp(info.max_time_ns),
        op_types: info.op_types.iter().cloned().collect(),
        keys: Vec::new(),
    }
}

/// Writes the checkpoint of the active segment `info` durably.
pub(super) fn store(storage: &dyn Storage, dir: &Path, info: &SegmentInfo) -> std::io::Result<()> {
    sanare_fs::write_atomic(storage, &path(dir, info.base), &summary_of(info).encode())
}

/// Sends the active segment's metadata to the checkpoint thread every
/// [`interval`] bytes.
pub(crate) struct Checkpoints {
    tx: mpsc::Sender<SegmentInfo>,
    every: u64,
    /// (base, length) of the last checkpoint asked for.
    last: (u64, u64),
}

impl Checkpoints {
    /// Starts the checkpoint thread of `dir`; `active` is the active segment as
    /// opened (it needs no checkpoint until `every` more bytes are durable).
    pub(super) fn start(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        every: u64,
        active: &SegmentInfo,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<SegmentInfo>();
        std::thread::Builder::new()
            .name("sanare-journal-checkpoint".into())
            .spawn(move || {
                while let Ok(mut info) = rx.recv() {
                    // Only the newest matters.
                    while let Ok(newer) = rx.try_recv() {
                        info = newer;
                    }
                    if let Err(e) = store(&*storage, &dir, &info) {
                        tracing::warn!(error = %e, segment = info.base, "journal checkpoint not written; the next open decodes more of the active segment");
                    }
                }
            })?;
        Ok(Self {
            tx,
            every,
            last: (active.base, active.len),
        })
    }

    /// Called with the active segment after groups became durable.
    pub(crate) fn offer(&mut self, active: &SegmentInfo) {
        if active.base != self.last.0 {
            self.last = (active.base, frame::SEGMENT_HEADER as u64);
        }
        if active.len >= self.last.1 + self.every && active.last.is_some() {
            self.last.1 = active.len;
            // The thread only stops when this sender is dropped.
            let _ = self.tx.send(active.clone());
        }
    }
}

/// What opening learnt from an active segment's checkpoint.
pub(super) struct Resumed {
    /// The segment as the checkpoint and the frames after it describe it.
    pub(super) info: SegmentInfo,
    /// The entries after the checkpoint (offsets in the segment's coordinates).
    pub(super) tail: DecodedSegment,
    /// Where the checkpointed prefix ends.
    pub(super) origin: u64,
    /// The length of the segment file.
    pub(super) file_len: u64,
}

/// The active segment `base` at `seg`, resumed from its checkpoint: `None` when
/// there is none or it does not verify against the segment (the caller decodes
/// the whole segment).
pub(super) fn resume(storage: &dyn Storage, dir: &Path, base: u64, seg: &Path) -> Option<Resumed> {
    let s = crate::summary::load_from(storage, &path(dir, base), base)?;
    let last = s.last?;
    if s.sealed || s.entries == 0 {
        return None;
    }
    let f = storage.open(seg, OpenMode::Read).ok()?;
    let file_len = f.len().ok()?;
    let trailer = (frame::FRAME_HEADER + frame::GROUP_BODY) as u64;
    let origin = s.file_len;
    if origin < frame::SEGMENT_HEADER as u64 + trailer || origin > file_len {
        return None;
    }
    let mut header = [0u8; frame::SEGMENT_HEADER];
    read_exact_at(&*f, &mut header, 0)?;
    let (version, at_base) = frame::parse_segment_header_versioned(&header, "").ok()?;
    if version != frame::SEGMENT_VERSION_GROUPS || at_base != base {
        return None;
    }
    let from = origin - trailer;
    let mut bytes = vec![0u8; usize::try_from(file_len - from).ok()?];
    read_exact_at(&*f, &mut bytes, from)?;
    // The checkpointed prefix ends with the trailer of its last group.
    let frame::Decoded::Frame {
        kind: frame::KIND_GROUP,
        body,
        ..
    } = frame::decode_frame(&bytes)
    else {
        return None;
    };
    let t = frame::decode_group(body)?;
    if t.count == 0 || t.first + u64::from(t.count) - 1 != last || t.start >= from {
        return None;
    }
    let mut info = SegmentInfo::new(base, seg.to_owned(), false);
    info.first = s.first;
    info.last = s.last;
    info.entries = s.entries;
    info.min_time_ns = i128::from(s.min_ns);
    info.max_time_ns = i128::from(s.max_ns);
    info.op_types = s.op_types.into_iter().collect();
    let name = info.name();
    let tail = decode_tail(&bytes[trailer as usize..], origin, last, &name);
    Some(Resumed {
        info,
        tail,
        origin,
        file_len,
    })
}

/// Fills `buf` from `f` at `at`; `None` when the file ends first or a read fails.
pub(super) fn read_exact_at(f: &dyn sanare_fs::File, buf: &mut [u8], at: u64) -> Option<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], at + done as u64).ok()?;
        if n == 0 {
            return None;
        }
        done += n;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_asked_for_each_time_enough_more_bytes_are_durable() {
        let (tx, rx) = mpsc::channel();
        let mut active = SegmentInfo::new(1, PathBuf::from("a.wal"), false);
        active.len = 24;
        let mut c = Checkpoints {
            tx,
            every: 100,
            last: (1, 24),
        };
        let asked = |c: &mut Checkpoints, info: &SegmentInfo| {
            c.offer(info);
            rx.try_iter().map(|i| (i.base, i.len)).collect::<Vec<_>>()
        };
        active.len = 123;
        assert_eq!(asked(&mut c, &active), vec![], "99 bytes: not yet");
        active.len = 124;
        assert_eq!(asked(&mut c, &active), vec![], "no entry to vouch for");
        active.last = Some(7);
        assert_eq!(asked(&mut c, &active), vec![(1, 124)]);
        active.len = 200;
        assert_eq!(asked(&mut c, &active), vec![], "counted from the last one");
        active.len = 224;
        assert_eq!(asked(&mut c, &active), vec![(1, 224)]);
        // A new active segment counts from its header.
        let mut next = SegmentInfo::new(9, PathBuf::from("b.wal"), false);
        next.last = Some(9);
        next.len = 100;
        assert_eq!(asked(&mut c, &next), vec![]);
        next.len = 124;
        assert_eq!(asked(&mut c, &next), vec![(9, 124)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_that_names_another_last_position_than_its_group_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let journal = crate::Journal::wal(dir.path()).build().await.unwrap();
        for i in 0..5 {
            let e = crate::NewEntry::new("op", &format!("e{i}")).unwrap();
            journal.record(e).await.unwrap();
        }
        journal.checkpoint().await.unwrap();
        drop(journal);
        let storage = sanare_fs::os();
        let seg = dir.path().join(format!("{:020}.wal", 1));
        let resumed = resume(&*storage, dir.path(), 1, &seg).expect("a true checkpoint is used");
        assert_eq!((resumed.info.entries, resumed.info.last), (5, Some(5)));
        assert!(resumed.tail.entries.is_empty());
        // The checksum is right, the offset is a group's end, the positions lie.
        let mut s = crate::summary::load_from(&*storage, &path(dir.path(), 1), 1).unwrap();
        s.last = Some(4);
        sanare_fs::write_atomic(&*storage, &path(dir.path(), 1), &s.encode()).unwrap();
        assert!(resume(&*storage, dir.path(), 1, &seg).is_none());
    }
}
