//! The applied marks of plain handlers (`applied.marks` beside the segments).
//!
//! A version-1 segment-format file (base 0) of frames read in order: an applied
//! mark (kind 2) adds a position, a range (kind 5) adds positions `from..=to`, a
//! reopen (kind 4) removes every position after its own. Held in memory as
//! ranges, so a replay of a million entries in order is one range.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sanare_fs::{File, OpenMode, Storage};

use sanare_core::{Error, JournalEntryId, JournalPosition, Result};

use crate::frame;

/// The applied marks, in memory and on disk.
pub(crate) struct Marks {
    /// `None` when the journal is open read-only.
    file: Option<Arc<dyn File>>,
    /// Where the next frame goes.
    len: u64,
    /// Applied positions: start → end, inclusive, disjoint, not adjacent.
    ranges: BTreeMap<u64, u64>,
    path: PathBuf,
    storage: Arc<dyn Storage>,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |e| Error::io(context, e)
}

impl Marks {
    /// Loads the marks of `dir`. Writable: creates the file (durably) when
    /// missing and cuts a torn tail.
    pub(crate) fn open(storage: Arc<dyn Storage>, dir: &Path, read_only: bool) -> Result<Self> {
        let path = dir.join("applied.marks");
        let bytes = match sanare_fs::read_file(&*storage, &path, 1 << 34) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let mut marks = Self {
            file: None,
            len: 0,
            ranges: BTreeMap::new(),
            path,
            storage,
        };
        let mut end = bytes.len();
        if bytes.len() >= frame::SEGMENT_HEADER {
            frame::parse_segment_header(&bytes, "journal applied marks")?;
            let scan = frame::scan(&bytes, frame::SEGMENT_HEADER);
            for (_, kind, range) in scan.frames {
                marks.load(kind, &bytes[range]);
            }
            end = scan.torn_tail_at.unwrap_or(scan.end);
        }
        if read_only {
            return Ok(marks);
        }
        let storage = marks.storage.clone();
        if bytes.len() < frame::SEGMENT_HEADER {
            // Missing, or torn while it was created: write it anew, durably.
            sanare_fs::write_atomic(&*storage, &marks.path, &frame::segment_header(0))
                .map_err(io("creating", &marks.path))?;
            end = frame::SEGMENT_HEADER;
        }
        let file = storage
            .open(&marks.path, OpenMode::ReadWrite)
            .map_err(io("opening", &marks.path))?;
        if end < bytes.len() {
            file.set_len(end as u64)
                .and_then(|()| file.sync_all())
                .map_err(io("cutting the torn tail of", &marks.path))?;
        }
        marks.len = end as u64;
        marks.file = Some(file);
        Ok(marks)
    }

    fn load(&mut self, kind: u8, body: &[u8]) {
        match kind {
            frame::KIND_APPLIED => {
                if let Some((p, _)) = frame::decode_applied(body) {
                    self.insert(p.0, p.0);
                }
            }
            frame::KIND_RANGE => {
                if let Some((from, to)) = frame::decode_pair(body) {
                    self.insert(from, to);
                }
            }
            frame::KIND_REOPEN => {
                if let Some((after, _)) = frame::decode_pair(body) {
                    self.remove_after(after);
                }
            }
            _ => {}
        }
    }

    /// Whether `position` is marked applied.
    pub(crate) fn contains(&self, position: u64) -> bool {
        self.ranges
            .range(..=position)
            .next_back()
            .is_some_and(|(_, &end)| end >= position)
    }

    /// The number of applied positions.
    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s + 1).sum()
    }

    fn insert(&mut self, from: u64, to: u64) {
        if to < from {
            return;
        }
        let (mut from, mut to) = (from, to);
        // Merge with every range that overlaps or touches [from, to].
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=to.saturating_add(1))
            .rev()
            .take_while(|(_, e)| e.saturating_add(1) >= from)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            from = from.min(s);
            to = to.max(e);
        }
        self.ranges.insert(from, to);
    }

    fn remove_after(&mut self, after: u64) -> u64 {
        let mut removed = 0;
        let tail = self.ranges.split_off(&after.saturating_add(1));
        removed += tail.iter().map(|(s, e)| e - s + 1).sum::<u64>();
        if let Some((_, e)) = self.ranges.range_mut(..=after).next_back()
            && *e > after
        {
            removed += *e - after;
            *e = after;
        }
        removed
    }

    fn write(&mut self, buf: &[u8]) -> Result<()> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| Error::conflict("the journal's applied marks are open read-only"))?;
        file.write_all_at(buf, self.len)
            .and_then(|()| file.sync_data())
            .map_err(io("writing", &self.path))?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Appends applied marks and makes them durable.
    pub(crate) fn append(&mut self, marks: &[(JournalPosition, JournalEntryId)]) -> Result<()> {
        let mut buf = Vec::with_capacity(marks.len() * 36);
        for (p, id) in marks {
            frame::encode_applied(*p, *id, &mut buf);
        }
        self.write(&buf)?;
        for (p, _) in marks {
            self.insert(p.0, p.0);
        }
        Ok(())
    }

    /// Voids every mark after `after`, durably. Returns how many.
    pub(crate) fn reopen_after(&mut self, after: u64) -> Result<u64> {
        let mut buf = Vec::new();
        frame::encode_pair(frame::KIND_REOPEN, after, 0, &mut buf);
        self.write(&buf)?;
        Ok(self.remove_after(after))
    }

    /// Forgets the marks at or before `up_to` (their entries are purged) and
    /// rewrites the file as ranges, atomically.
    pub(crate) fn prune(&mut self, storage: &dyn Storage, dir: &Path, up_to: u64) -> Result<()> {
        let kept = self.ranges.split_off(&up_to.saturating_add(1));
        let straddling = self
            .ranges
            .range(..=up_to)
            .next_back()
            .filter(|(_, e)| **e > up_to)
            .map(|(_, &e)| (up_to + 1, e));
        self.ranges = kept;
        if let Some((s, e)) = straddling {
            self.ranges.insert(s, e);
        }
        let mut bytes = frame::segment_header(0).to_vec();
        for (&s, &e) in &self.ranges {
            frame::encode_pair(frame::KIND_RANGE, s, e, &mut bytes);
        }
        let path = dir.join("applied.marks");
        sanare_fs::write_atomic(storage, &path, &bytes).map_err(io("rewriting", &path))?;
        let file = storage
            .open(&path, OpenMode::ReadWrite)
            .map_err(io("opening", &path))?;
        self.len = bytes.len() as u64;
        self.file = Some(file);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks() -> Marks {
        Marks {
            file: None,
            len: 0,
            ranges: BTreeMap::new(),
            path: PathBuf::new(),
            storage: sanare_fs::os(),
        }
    }

    #[test]
    fn ranges_merge_split_and_answer() {
        let mut m = marks();
        for p in [5, 1, 2, 3, 7, 6, 10] {
            m.insert(p, p);
        }
        assert_eq!(m.ranges, BTreeMap::from([(1, 3), (5, 7), (10, 10)]));
        assert!(m.contains(6) && !m.contains(4) && !m.contains(11));
        assert_eq!(m.count(), 7);
        m.insert(4, 4);
        assert_eq!(m.ranges, BTreeMap::from([(1, 7), (10, 10)]));
        assert_eq!(m.remove_after(5), 3);
        assert_eq!(m.ranges, BTreeMap::from([(1, 5)]));
        assert!(m.contains(5) && !m.contains(6));
    }
}
