//! Segment summaries (`<base>.sum`, format in `docs/formats.md`): what opening
//! the journal needs of a sealed segment — its positions, time range, operation
//! types, entry count — and, after them, the idempotency keys of its entries.
//!
//! Opening reads the summary part of each sealed segment's file (a few hundred
//! bytes) instead of decoding the segment, so open time does not grow with the
//! journal's length; the keys are read later by the key loader thread, newest segment
//! first, until the idempotency window is full. A summary is derived data: one
//! that is missing, damaged, or describes another file (length, sealed or not)
//! is ignored and the segment decoded (and the summary written anew).

use std::path::{Path, PathBuf};

use sanare_fs::{OpenMode, Storage};
use uuid::Uuid;

use crate::entry::JournalEntry;
use crate::wal::keys::{KeyHash, hash};

const MAGIC: [u8; 8] = *b"SANAREJS";
const VERSION: u32 = 1;
const FIXED: usize = 92;
const KEY: usize = 40;

/// What a sealed segment holds, as its summary file says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    pub(crate) base: u64,
    /// Length of the segment file described (the `.wal` or `.walz`).
    pub(crate) file_len: u64,
    pub(crate) sealed: bool,
    pub(crate) entries: u64,
    pub(crate) first: Option<u64>,
    pub(crate) last: Option<u64>,
    pub(crate) min_ns: i64,
    pub(crate) max_ns: i64,
    pub(crate) op_types: Vec<String>,
    /// Idempotency keys: (position, key hash, entry id), in position order.
    pub(crate) keys: Vec<(u64, KeyHash, Uuid)>,
}

/// The path of the summary of the segment `base`.
pub(crate) fn path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.sum"))
}

fn clamp(ns: i128) -> i64 {
    i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX })
}

impl Summary {
    /// The summary of a segment's decoded entries.
    pub(crate) fn of(base: u64, file_len: u64, sealed: bool, entries: &[JournalEntry]) -> Self {
        let mut s = Summary {
            base,
            file_len,
            sealed,
            min_ns: i64::MAX,
            max_ns: i64::MIN,
            ..Summary::default()
        };
        for e in entries {
            s.entries += 1;
            s.first.get_or_insert(e.position.0);
            s.last = Some(e.position.0);
            let t = clamp(e.recorded_at.unix_timestamp_nanos());
            s.min_ns = s.min_ns.min(t);
            s.max_ns = s.max_ns.max(t);
            if !s.op_types.contains(&e.operation_type) {
                s.op_types.push(e.operation_type.clone());
            }
            if let Some(k) = &e.idempotency_key {
                s.keys.push((e.position.0, hash(k), e.id.as_uuid()));
            }
        }
        s
    }

    /// The file's bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED + 64 + self.keys.len() * KEY);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // summary length, below
        out.extend_from_slice(&self.base.to_le_bytes());
        out.extend_from_slice(&self.file_len.to_le_bytes());
        out.extend_from_slice(&[u8::from(self.sealed), 0, 0, 0]);
        out.extend_from_slice(&(self.op_types.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.entries.to_le_bytes());
        out.extend_from_slice(&self.first.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.last.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.min_ns.to_le_bytes());
        out.extend_from_slice(&self.max_ns.to_le_bytes());
        out.extend_from_slice(&(self.keys.len() as u32).to_le_bytes());
        let mut keys = Vec::with_capacity(self.keys.len() * KEY);
        for (p, h, id) in &self.keys {
            keys.extend_from_slice(&p.to_le_bytes());
            keys.extend_from_slice(h);
            keys.extend_from_slice(id.as_bytes());
        }
        out.extend_from_slice(&crc32c::crc32c(&keys).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // summary checksum, below
        for t in &self.op_types {
            out.extend_from_slice(&(t.len() as u32).to_le_bytes());
            out.extend_from_slice(t.as_bytes());
        }
        let len = out.len() as u32;
        out[12..16].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..88]), &out[FIXED..]);
        out[88..92].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&keys);
        out
    }

    /// Parses the summary part (`bytes` from the file's start, at least the
    /// summary length). Never panics; `None` when anything does not check.
    fn decode_head(bytes: &[u8]) -> Option<(Self, usize, u32, usize)> {
        let u32_at = |i: usize| -> Option<u32> {
            Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?))
        };
        let u64_at = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?))
        };
        if bytes.get(0..8)? != MAGIC || u32_at(8)? != VERSION {
            return None;
        }
        let len = u32_at(12)? as usize;
        let head = bytes.get(..len)?;
        if len < FIXED
            || crc32c::crc32c_append(crc32c::crc32c(&head[..88]), &head[FIXED..]) != u32_at(88)?
        {
            return None;
        }
        let mut op_types = Vec::new();
        let mut at = FIXED;
        for _ in 0..u32_at(36)? {
            let n = u32_at(at)? as usize;
            let text = head.get(at + 4..at.checked_add(4 + n)?)?;
            op_types.push(String::from_utf8(text.to_vec()).ok()?);
            at += 4 + n;
        }
        let entries = u64_at(40)?;
        let s = Summary {
            base: u64_at(16)?,
            file_len: u64_at(24)?,
            sealed: head[32] == 1,
            entries,
            first: (entries > 0).then_some(u64_at(48)?),
            last: (entries > 0).then_some(u64_at(56)?),
            min_ns: u64_at(64)? as i64,
            max_ns: u64_at(72)? as i64,
            op_types,
            keys: Vec::new(),
        };
        Some((s, len, u32_at(84)?, u32_at(80)? as usize))
    }
}

/// Writes the summary durably.
pub(crate) fn store(storage: &dyn Storage, dir: &Path, s: &Summary) -> std::io::Result<()> {
    sanare_fs::write_atomic(storage, &path(dir, s.base), &s.encode())
}

/// The summary part of the segment `base`'s summary, when it checks. Reads the
/// file's first few kilobytes only.
pub(crate) fn load(storage: &dyn Storage, dir: &Path, base: u64) -> Option<Summary> {
    load_from(storage, &path(dir, base), base)
}

/// The summary part of the file at `file` (a summary, or an active segment's
/// checkpoint, which has the same format) when it checks and describes the
/// segment `base`.
pub(crate) fn load_from(storage: &dyn Storage, file: &Path, base: u64) -> Option<Summary> {
    let f = storage.open(file, OpenMode::Read).ok()?;
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0).ok()?;
    buf.truncate(n);
    let want = buf
        .get(12..16)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)?;
    if want > buf.len() {
        if want > 1 << 24 {
            return None;
        }
        buf.resize(want, 0);
        let mut at = n;
        while at < want {
            let m = f.read_at(&mut buf[at..], at as u64).ok()?;
            if m == 0 {
                return None;
            }
            at += m;
        }
    }
    let (s, _, _, _) = Summary::decode_head(&buf)?;
    (s.base == base).then_some(s)
}

/// The idempotency keys of the segment `base`'s summary, when they check.
pub(crate) fn load_keys(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
) -> Option<Vec<(u64, KeyHash, Uuid)>> {
    let bytes = sanare_fs::read_file(storage, &path(dir, base), 1 << 32).ok()?;
    let (_, len, crc, count) = Summary::decode_head(&bytes)?;
    let keys = bytes.get(len..len.checked_add(count.checked_mul(KEY)?)?)?;
    if crc32c::crc32c(keys) != crc || bytes.len() != len + keys.len() {
        return None;
    }
    Some(
        keys.chunks_exact(KEY)
            .map(|k| {
                let mut p = [0u8; 8];
                p.copy_from_slice(&k[0..8]);
                let mut h = [0u8; 16];
                h.copy_from_slice(&k[8..24]);
                let mut id = [0u8; 16];
                id.copy_from_slice(&k[24..40]);
                (u64::from_le_bytes(p), h, Uuid::from_bytes(id))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_round_trip_and_damage_is_refused() {
        let s = Summary {
            base: 7,
            file_len: 4096,
            sealed: true,
            entries: 3,
            first: Some(7),
            last: Some(9),
            min_ns: 1,
            max_ns: 3,
            op_types: vec!["a".into(), "order.placed".into()],
            keys: vec![(8, [3u8; 16], Uuid::from_u128(5))],
        };
        let bytes = s.encode();
        let (head, len, _, count) = Summary::decode_head(&bytes).unwrap();
        assert_eq!(
            (len + count * KEY, head.op_types.clone()),
            (bytes.len(), s.op_types.clone())
        );
        assert_eq!(
            Summary {
                keys: s.keys.clone(),
                ..head
            },
            s
        );
        for i in [20, 40, 95] {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(Summary::decode_head(&bad).is_none(), "byte {i}");
        }
        for cut in 0..bytes.len() {
            let _ = Summary::decode_head(&bytes[..cut]);
        }
    }
}
