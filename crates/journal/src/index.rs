//! Per-segment index files (`<base>.idx`, format in `docs/formats.md`): for every
//! entry of a sealed segment its position, timestamp, operation type and the
//! offset of its frame in the segment's raw bytes. Time-range and operation-type
//! queries on sealed segments pick their entries from the index and decode only
//! those frames. An index is derived data: a missing, damaged or stale one is
//! rebuilt from its segment.

use std::path::{Path, PathBuf};

use sanare_core::{Error, Result};
use sanare_fs::Storage;

use crate::frame;
use crate::query::ScanPlan;

/// Magic of an index file.
pub(crate) const INDEX_MAGIC: [u8; 8] = *b"SANAREJI";
/// Format version of an index file.
pub(crate) const INDEX_VERSION: u32 = 1;
const HEADER: usize = 32;
const RECORD: usize = 28;

/// One entry of a segment, as the index describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IndexRecord {
    pub(crate) position: u64,
    pub(crate) time_ns: i64,
    pub(crate) op: u32,
    /// Offset of the entry's frame in the segment's raw bytes.
    pub(crate) offset: u32,
    /// Length of the frame (header and body).
    pub(crate) len: u32,
}

/// The index of one segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SegmentIndex {
    pub(crate) base: u64,
    pub(crate) op_types: Vec<String>,
    pub(crate) records: Vec<IndexRecord>,
}

/// The path of the index of the segment with base `base` in `dir`.
pub(crate) fn path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.idx"))
}

impl SegmentIndex {
    /// Builds the index of a segment's raw bytes (valid entry frames only).
    pub(crate) fn build(base: u64, raw: &[u8]) -> Self {
        let mut index = SegmentIndex {
            base,
            ..Self::default()
        };
        if frame::parse_segment_header(raw, "segment").is_err() {
            return index;
        }
        let scan = frame::scan(raw, frame::SEGMENT_HEADER);
        for (offset, kind, body) in scan.frames {
            if kind != frame::KIND_ENTRY {
                continue;
            }
            let Ok(e) = frame::decode_entry(&raw[body.clone()]) else {
                continue;
            };
            let (Ok(offset), Ok(len)) = (u32::try_from(offset), u32::try_from(body.end - offset))
            else {
                continue;
            };
            let op = match index.op_types.iter().position(|t| *t == e.operation_type) {
                Some(i) => i,
                None => {
                    index.op_types.push(e.operation_type);
                    index.op_types.len() - 1
                }
            };
            index.records.push(IndexRecord {
                position: e.position.0,
                time_ns: clamp_ns(e.recorded_at.unix_timestamp_nanos()),
                op: u32::try_from(op).unwrap_or(u32::MAX),
                offset,
                len,
            });
        }
        index
    }

    /// The index file's bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.records.len() * RECORD + 64);
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.base.to_le_bytes());
        out.extend_from_slice(&(self.op_types.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.records.len() as u32).to_le_bytes());
        for t in &self.op_types {
            let bytes = t.as_bytes();
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        for r in &self.records {
            out.extend_from_slice(&r.position.to_le_bytes());
            out.extend_from_slice(&r.time_ns.to_le_bytes());
            out.extend_from_slice(&r.op.to_le_bytes());
            out.extend_from_slice(&r.offset.to_le_bytes());
            out.extend_from_slice(&r.len.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses an index file. Never panics on any input.
    pub(crate) fn decode(bytes: &[u8], name: &str) -> Result<Self> {
        let bad = |why: &str| Error::corrupt(name.to_owned(), format!("journal index: {why}"));
        if bytes.len() < HEADER + 4 || bytes[0..8] != INDEX_MAGIC {
            return Err(bad("not an index file"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(bad("checksum mismatch"));
        }
        let u32_at = |at: usize| -> u32 {
            u32::from_le_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]])
        };
        if u32_at(8) != INDEX_VERSION {
            return Err(bad("unknown version"));
        }
        let mut base = [0u8; 8];
        base.copy_from_slice(&body[16..24]);
        let ops = u32_at(24) as usize;
        let count = u32_at(28) as usize;
        let mut at = HEADER;
        let mut op_types = Vec::with_capacity(ops.min(1024));
        for _ in 0..ops {
            let len = body
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or_else(|| bad("truncated operation types"))?;
            let text = body
                .get(at + 4..at + 4 + len)
                .ok_or_else(|| bad("truncated operation types"))?;
            op_types.push(
                String::from_utf8(text.to_vec()).map_err(|_| bad("operation type not UTF-8"))?,
            );
            at += 4 + len;
        }
        if body.len() - at != count.saturating_mul(RECORD) {
            return Err(bad("record count does not match the file's length"));
        }
        let records = body[at..]
            .chunks_exact(RECORD)
            .map(|r| {
                let u64_at = |i: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&r[i..i + 8]);
                    b
                };
                let u32_at = |i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
                IndexRecord {
                    position: u64::from_le_bytes(u64_at(0)),
                    time_ns: i64::from_le_bytes(u64_at(8)),
                    op: u32_at(16),
                    offset: u32_at(20),
                    len: u32_at(24),
                }
            })
            .collect::<Vec<_>>();
        if records.iter().any(|r| r.op as usize >= op_types.len()) {
            return Err(bad("operation type out of range"));
        }
        Ok(SegmentIndex {
            base: u64::from_le_bytes(base),
            op_types,
            records,
        })
    }

    /// The records the plan may match (position, time and operation type; the
    /// rest of the plan is checked on the decoded entry).
    pub(crate) fn select<'a>(
        &'a self,
        plan: &'a ScanPlan,
    ) -> impl Iterator<Item = &'a IndexRecord> + 'a {
        let from = plan.time_from.map(|t| clamp_ns(t.unix_timestamp_nanos()));
        let to = plan.time_to.map(|t| clamp_ns(t.unix_timestamp_nanos()));
        let ops: Vec<bool> = self
            .op_types
            .iter()
            .map(|t| plan.operation_types.is_empty() || plan.operation_types.contains(t))
            .collect();
        self.records.iter().filter(move |r| {
            r.position > plan.after
                && plan.to.is_none_or(|to| r.position <= to)
                && from.is_none_or(|f| r.time_ns >= f)
                && to.is_none_or(|t| r.time_ns < t)
                && ops.get(r.op as usize).copied().unwrap_or(false)
        })
    }
}

fn clamp_ns(ns: i128) -> i64 {
    i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX })
}

/// Reads the index of the segment `base` in `dir`, or `None` when it is missing
/// or damaged (the caller rebuilds it).
pub(crate) fn load(storage: &dyn Storage, dir: &Path, base: u64) -> Option<SegmentIndex> {
    let p = path(dir, base);
    let bytes = sanare_fs::read_file(storage, &p, 1 << 32).ok()?;
    match SegmentIndex::decode(&bytes, &p.display().to_string()) {
        Ok(index) if index.base == base => Some(index),
        Ok(_) => {
            tracing::warn!(index = %p.display(), "journal index belongs to another segment; rebuilding");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "journal index damaged; rebuilding");
            None
        }
    }
}

/// Writes `index` durably (temporary file, fsync, rename, fsync of the directory).
pub(crate) fn store(storage: &dyn Storage, dir: &Path, index: &SegmentIndex) -> Result<()> {
    let p = path(dir, index.base);
    sanare_fs::write_atomic(storage, &p, &index.encode())
        .map_err(|e| Error::io(format!("writing journal index {}", p.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> SegmentIndex {
        SegmentIndex {
            base: 1,
            op_types: vec!["order.placed".into(), "order.paid".into()],
            records: vec![
                IndexRecord {
                    position: 1,
                    time_ns: 1_763_892_000_000_000_000,
                    op: 0,
                    offset: 24,
                    len: 100,
                },
                IndexRecord {
                    position: 2,
                    time_ns: 1_763_892_001_000_000_000,
                    op: 1,
                    offset: 124,
                    len: 90,
                },
            ],
        }
    }

    const GOLDEN_INDEX: &str = include_str!("../tests/golden/segment_index.hex");

    #[test]
    fn golden_index() {
        let hex: String = GOLDEN_INDEX.split_whitespace().collect();
        let golden: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(sample().encode(), golden);
        assert_eq!(SegmentIndex::decode(&golden, "golden").unwrap(), sample());
    }

    #[test]
    fn damage_is_detected() {
        let mut bytes = sample().encode();
        bytes[40] ^= 1;
        assert!(SegmentIndex::decode(&bytes, "t").is_err());
        assert!(SegmentIndex::decode(&bytes[..bytes.len() - 1], "t").is_err());
    }

    #[test]
    fn select_filters_by_position_time_and_type() {
        let index = sample();
        let plan = ScanPlan {
            operation_types: vec!["order.paid".into()],
            ..ScanPlan::default()
        };
        let picked: Vec<u64> = index.select(&plan).map(|r| r.position).collect();
        assert_eq!(picked, vec![2]);
        let plan = ScanPlan {
            after: 1,
            ..ScanPlan::default()
        };
        assert_eq!(index.select(&plan).count(), 1);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = SegmentIndex::decode(&bytes, "fuzz");
            let mut framed = INDEX_MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            let crc = crc32c::crc32c(&framed);
            framed.extend_from_slice(&crc.to_le_bytes());
            let _ = SegmentIndex::decode(&framed, "fuzz");
        }
    }
}
