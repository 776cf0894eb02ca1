//! The WAL's byte formats: record frames, segment headers, sealed segments.
//!
//! Specified in `docs/formats.md` ("Journal WAL"). All integers little-endian.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use sanare_core::{Error, JournalEntryId, JournalPosition, Result};

use crate::entry::{EntryStatus, JournalEntry};

/// Magic of a record frame.
pub(crate) const FRAME_MAGIC: [u8; 2] = *b"SJ";
/// Version of the record frame format.
pub(crate) const FRAME_VERSION: u8 = 1;
/// Length of a frame header.
pub(crate) const FRAME_HEADER: usize = 12;
/// The largest body a frame may carry (16 MiB).
pub(crate) const MAX_BODY: usize = 16 << 20;

/// Kind byte of a frame holding a journal entry.
pub(crate) const KIND_ENTRY: u8 = 1;
/// Kind byte of a frame holding an applied mark.
pub(crate) const KIND_APPLIED: u8 = 2;
/// Kind byte of a group trailer: the end of one group commit (segment version 2).
pub(crate) const KIND_GROUP: u8 = 3;
/// Kind byte of a reopen record in the applied-marks file: marks of positions
/// after it, written before it, no longer count.
pub(crate) const KIND_REOPEN: u8 = 4;
/// Kind byte of a range of applied marks (`from..=to`), as a prune rewrites them.
pub(crate) const KIND_RANGE: u8 = 5;
/// Length of a group trailer's body.
pub(crate) const GROUP_BODY: usize = 32;
/// The last four bytes of a group trailer's body: the data of a segment ends with
/// a non-zero byte, before the preallocated zeros.
pub(crate) const GROUP_END: [u8; 4] = *b"SJGE";

/// Magic of an active (raw) segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"SANAREJW";
/// Magic of a sealed, compressed segment file.
pub(crate) const SEALED_MAGIC: [u8; 8] = *b"SANAREJZ";
/// Magic of an archive file.
pub(crate) const ARCHIVE_MAGIC: [u8; 8] = *b"SANAREJA";
/// Version of the sealed segment and archive formats, and of a segment without
/// group trailers (and of the applied-marks file).
pub(crate) const FILE_VERSION: u32 = 1;
/// Version of a segment whose group commits end with a group trailer.
pub(crate) const SEGMENT_VERSION_GROUPS: u32 = 2;
/// Length of a segment header.
pub(crate) const SEGMENT_HEADER: usize = 24;
/// Length of a sealed segment or archive header.
pub(crate) const SEALED_HEADER: usize = 32;
/// Codec id of brotli.
pub(crate) const CODEC_BROTLI: u32 = 1;

/// Appends one frame of `kind` around `body` to `out`.
pub(crate) fn encode_frame(kind: u8, body: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut header = [0u8; FRAME_HEADER];
    header[0..2].copy_from_slice(&FRAME_MAGIC);
    header[2] = FRAME_VERSION;
    header[3] = kind;
    header[4..8].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[0..8]), body);
    header[8..12].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
}

/// What decoding at an offset found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<'a> {
    /// A valid frame: its kind, its body, and how many bytes it took.
    Frame {
        /// Kind byte.
        kind: u8,
        /// Body.
        body: &'a [u8],
        /// Bytes consumed (header + body).
        len: usize,
    },
    /// The buffer ends inside a frame (or is empty).
    Incomplete,
    /// The bytes here are not a valid frame.
    Invalid(&'static str),
}

/// Decodes the frame at the start of `buf`. Never panics on any input.
pub(crate) fn decode_frame(buf: &[u8]) -> Decoded<'_> {
    if buf.len() < FRAME_HEADER {
        if buf.is_empty() || FRAME_MAGIC.starts_with(&buf[..buf.len().min(2)]) {
            return Decoded::Incomplete;
        }
        return Decoded::Invalid("bad frame magic");
    }
    if buf[0..2] != FRAME_MAGIC {
        return Decoded::Invalid("bad frame magic");
    }
    if buf[2] != FRAME_VERSION {
        return Decoded::Invalid("unknown frame version");
    }
    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if len > MAX_BODY {
        return Decoded::Invalid("frame length over the limit");
    }
    let Some(body) = buf.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Decoded::Incomplete;
    };
    let stored = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[0..8]), body);
    if crc != stored {
        return Decoded::Invalid("frame checksum mismatch");
    }
    Decoded::Frame {
        kind: buf[3],
        body,
        len: FRAME_HEADER + len,
    }
}

/// The postcard body of an entry frame (field order is the format: never reorder).
#[derive(Serialize, Deserialize)]
struct EntryBody {
    position: u64,
    id: [u8; 16],
    recorded_at_unix_ns: i128,
    transaction_id: String,
    operation_type: String,
    idempotency_key: Option<String>,
    user: Option<String>,
    source_system: Option<String>,
    payload_hash: [u8; 32],
    payload: Vec<u8>,
}

/// [`EntryBody`] borrowing the entry's fields: the same bytes (postcard writes a
/// `&str` as a `String` and a `&[u8]` as a `Vec<u8>`), without copying them first.
#[derive(Serialize)]
struct EntryBodyRef<'a> {
    position: u64,
    id: [u8; 16],
    recorded_at_unix_ns: i128,
    transaction_id: &'a str,
    operation_type: &'a str,
    idempotency_key: Option<&'a str>,
    user: Option<&'a str>,
    source_system: Option<&'a str>,
    payload_hash: [u8; 32],
    payload: &'a [u8],
}

/// A postcard output appending to a borrowed buffer.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Encodes `entry` as an entry frame appended to `out`, serialized in place (no
/// copy of its fields, no allocation beyond `out` growing). On error `out` is
/// left as it was.
pub(crate) fn encode_entry(entry: &JournalEntry, out: &mut Vec<u8>) -> Result<()> {
    let body = EntryBodyRef {
        position: entry.position.0,
        id: *entry.id.as_uuid().as_bytes(),
        recorded_at_unix_ns: entry.recorded_at.unix_timestamp_nanos(),
        transaction_id: &entry.transaction_id,
        operation_type: &entry.operation_type,
        idempotency_key: entry.idempotency_key.as_deref(),
        user: entry.user.as_deref(),
        source_system: entry.source_system.as_deref(),
        payload_hash: entry.payload_hash,
        payload: &entry.payload,
    };
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER]);
    if let Err(e) = postcard::serialize_with_flavor(&body, Append(out)) {
        out.truncate(start);
        return Err(Error::other("encoding a journal record with postcard", e));
    }
    let len = out.len() - start - FRAME_HEADER;
    if len > MAX_BODY {
        out.truncate(start);
        return Err(Error::invalid_input("journal record over the 16 MiB limit"));
    }
    let (header, body) = out[start..].split_at_mut(FRAME_HEADER);
    header[0..2].copy_from_slice(&FRAME_MAGIC);
    header[2] = FRAME_VERSION;
    header[3] = KIND_ENTRY;
    header[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[0..8]), body);
    header[8..12].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The leading fields of an entry body, borrowed: enough to know its key.
#[derive(Deserialize)]
struct KeyView<'a> {
    position: u64,
    id: [u8; 16],
    _recorded_at_unix_ns: i128,
    _transaction_id: &'a str,
    _operation_type: &'a str,
    idempotency_key: Option<&'a str>,
}

/// The position, id and idempotency key of an entry frame's body, read without
/// decoding (or copying) the rest of it.
pub(crate) fn entry_key(body: &[u8]) -> Option<(u64, Uuid, Option<&str>)> {
    let v: KeyView<'_> = postcard::from_bytes(body).ok()?;
    Some((v.position, Uuid::from_bytes(v.id), v.idempotency_key))
}

/// Decodes the body of an entry frame.
pub(crate) fn decode_entry(body: &[u8]) -> Result<JournalEntry> {
    let b: EntryBody = postcard::from_bytes(body)
        .map_err(|e| Error::corrupt("journal record body", e.to_string()))?;
    let recorded_at = OffsetDateTime::from_unix_timestamp_nanos(b.recorded_at_unix_ns)
        .map_err(|e| Error::corrupt("journal record timestamp", e.to_string()))?;
    Ok(JournalEntry {
        id: JournalEntryId::from_uuid(Uuid::from_bytes(b.id)),
        position: JournalPosition(b.position),
        transaction_id: b.transaction_id,
        operation_type: b.operation_type,
        recorded_at,
        idempotency_key: b.idempotency_key,
        payload: b.payload,
        payload_hash: b.payload_hash,
        user: b.user,
        source_system: b.source_system,
        status: EntryStatus::Recorded,
    })
}

/// The body of an applied-mark frame: the entry's position and id (24 bytes).
pub(crate) fn encode_applied(position: JournalPosition, id: JournalEntryId, out: &mut Vec<u8>) {
    let mut body = [0u8; 24];
    body[0..8].copy_from_slice(&position.0.to_le_bytes());
    body[8..24].copy_from_slice(id.as_uuid().as_bytes());
    encode_frame(KIND_APPLIED, &body, out);
}

/// Decodes an applied-mark body.
pub(crate) fn decode_applied(body: &[u8]) -> Option<(JournalPosition, JournalEntryId)> {
    if body.len() != 24 {
        return None;
    }
    let mut pos = [0u8; 8];
    pos.copy_from_slice(&body[0..8]);
    let mut id = [0u8; 16];
    id.copy_from_slice(&body[8..24]);
    Some((
        JournalPosition(u64::from_le_bytes(pos)),
        JournalEntryId::from_uuid(Uuid::from_bytes(id)),
    ))
}

/// Appends a frame of `kind` whose body is two u64 LE (16 bytes).
pub(crate) fn encode_pair(kind: u8, a: u64, b: u64, out: &mut Vec<u8>) {
    let mut body = [0u8; 16];
    body[0..8].copy_from_slice(&a.to_le_bytes());
    body[8..16].copy_from_slice(&b.to_le_bytes());
    encode_frame(kind, &body, out);
}

/// Decodes a body of two u64 LE.
pub(crate) fn decode_pair(body: &[u8]) -> Option<(u64, u64)> {
    let a: [u8; 8] = body.get(0..8)?.try_into().ok()?;
    let b: [u8; 8] = body.get(8..16)?.try_into().ok()?;
    (body.len() == 16).then(|| (u64::from_le_bytes(a), u64::from_le_bytes(b)))
}

/// The header of a version-1 file (applied marks, archives) with base `base`.
pub(crate) fn segment_header(base: u64) -> [u8; SEGMENT_HEADER] {
    header_of(FILE_VERSION, base)
}

/// The header of a WAL segment (version 2: group commits end with a trailer)
/// whose first entry is at `base` or later.
pub(crate) fn segment_header_v2(base: u64) -> [u8; SEGMENT_HEADER] {
    header_of(SEGMENT_VERSION_GROUPS, base)
}

fn header_of(version: u32, base: u64) -> [u8; SEGMENT_HEADER] {
    let mut h = [0u8; SEGMENT_HEADER];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[16..24].copy_from_slice(&base.to_le_bytes());
    h
}

/// Checks a raw segment header, returning its base position.
pub(crate) fn parse_segment_header(buf: &[u8], what: &str) -> Result<u64> {
    parse_segment_header_versioned(buf, what).map(|(_, base)| base)
}

/// Checks a raw segment header, returning its version (1 or 2) and base position.
pub(crate) fn parse_segment_header_versioned(buf: &[u8], what: &str) -> Result<(u32, u64)> {
    if buf.len() < SEGMENT_HEADER || buf[0..8] != SEGMENT_MAGIC {
        return Err(Error::corrupt(
            what.to_owned(),
            "not a sanare journal segment (bad magic or too short)",
        ));
    }
    let version = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if version != FILE_VERSION && version != SEGMENT_VERSION_GROUPS {
        return Err(Error::corrupt(
            what.to_owned(),
            format!("segment format version {version} is not supported (this build reads 1 and 2)"),
        ));
    }
    let mut base = [0u8; 8];
    base.copy_from_slice(&buf[16..24]);
    Ok((version, u64::from_le_bytes(base)))
}

/// A group trailer: which entries the group commit holds and what was durable
/// when it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GroupTrailer {
    /// Position of the group's first entry.
    pub(crate) first: u64,
    /// Number of entry frames in the group.
    pub(crate) count: u32,
    /// Offset in the segment of the group's first frame.
    pub(crate) start: u64,
    /// The highest position acknowledged (durable) when the group was written.
    pub(crate) durable: u64,
}

/// Appends a group trailer frame to `out`.
pub(crate) fn encode_group(t: &GroupTrailer, out: &mut Vec<u8>) {
    let mut body = [0u8; GROUP_BODY];
    body[0..8].copy_from_slice(&t.first.to_le_bytes());
    body[8..12].copy_from_slice(&t.count.to_le_bytes());
    body[12..20].copy_from_slice(&t.start.to_le_bytes());
    body[20..28].copy_from_slice(&t.durable.to_le_bytes());
    body[28..32].copy_from_slice(&GROUP_END);
    encode_frame(KIND_GROUP, &body, out);
}

/// Decodes a group trailer body.
pub(crate) fn decode_group(body: &[u8]) -> Option<GroupTrailer> {
    if body.len() != GROUP_BODY || body[28..32] != GROUP_END {
        return None;
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[i..i + 8]);
        u64::from_le_bytes(b)
    };
    Some(GroupTrailer {
        first: u64_at(0),
        count: u32::from_le_bytes([body[8], body[9], body[10], body[11]]),
        start: u64_at(12),
        durable: u64_at(20),
    })
}

/// Wraps `raw` in a compressed container with `magic` (sealed segment or archive):
/// magic, version, codec, raw length, crc32c of raw, crc32c of the compressed bytes.
pub(crate) fn seal(magic: [u8; 8], raw: &[u8]) -> Result<Vec<u8>> {
    let mut compressed = Vec::with_capacity(raw.len() / 4);
    let params = brotli::enc::BrotliEncoderParams {
        quality: 5,
        lgwin: 22,
        ..Default::default()
    };
    brotli::BrotliCompress(&mut &raw[..], &mut compressed, &params)
        .map_err(|e| Error::io("compressing a journal segment", e))?;
    let mut out = Vec::with_capacity(SEALED_HEADER + compressed.len());
    out.extend_from_slice(&magic);
    out.extend_from_slice(&FILE_VERSION.to_le_bytes());
    out.extend_from_slice(&CODEC_BROTLI.to_le_bytes());
    out.extend_from_slice(&(raw.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(raw).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&compressed).to_le_bytes());
    out.extend_from_slice(&compressed);
    Ok(out)
}

/// Opens a container written by [`seal`], verifying both checksums.
pub(crate) fn unseal(magic: [u8; 8], buf: &[u8], what: &str) -> Result<Vec<u8>> {
    if buf.len() < SEALED_HEADER || buf[0..8] != magic {
        return Err(Error::corrupt(what.to_owned(), "bad magic or too short"));
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    if word(8) != FILE_VERSION {
        return Err(Error::corrupt(
            what.to_owned(),
            "unsupported format version",
        ));
    }
    if word(12) != CODEC_BROTLI {
        return Err(Error::corrupt(what.to_owned(), "unknown codec"));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&buf[16..24]);
    let raw_len = u64::from_le_bytes(len);
    let compressed = &buf[SEALED_HEADER..];
    if crc32c::crc32c(compressed) != word(28) {
        return Err(Error::corrupt(
            what.to_owned(),
            "checksum of the compressed data does not match",
        ));
    }
    if raw_len > (1 << 34) {
        return Err(Error::corrupt(what.to_owned(), "implausible length"));
    }
    // The length is not covered by a checksum yet: reserve little up front and let
    // the decompressor stop one byte past what the header claims.
    let mut raw = Vec::with_capacity(
        usize::try_from(raw_len.min(compressed.len() as u64 * 8).min(64 << 20)).unwrap_or(0),
    );
    {
        use std::io::Read as _;
        brotli::Decompressor::new(compressed, 4096)
            .take(raw_len + 1)
            .read_to_end(&mut raw)
            .map_err(|e| Error::corrupt(what.to_owned(), format!("does not decompress: {e}")))?;
    }
    if raw.len() as u64 != raw_len || crc32c::crc32c(&raw) != word(24) {
        return Err(Error::corrupt(
            what.to_owned(),
            "decompressed data does not match its checksum",
        ));
    }
    Ok(raw)
}

/// A damaged region found while scanning a segment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct CorruptRegion {
    /// The segment file.
    pub segment: String,
    /// Byte offset of the damage in the (uncompressed) segment.
    pub offset: u64,
    /// Length of the damaged region in bytes.
    pub len: u64,
    /// What check failed.
    pub reason: String,
}

/// The frames of one segment body, with damage isolated.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// (offset, kind, body range) of each valid frame.
    pub(crate) frames: Vec<(usize, u8, std::ops::Range<usize>)>,
    /// Damaged regions followed by valid frames.
    pub(crate) corrupt: Vec<(usize, usize, &'static str)>,
    /// Where the valid data ends when the rest is a torn tail (no valid frame after).
    pub(crate) torn_tail_at: Option<usize>,
    /// Where the data ends: the end of the buffer, the start of a torn tail, or the
    /// start of zero bytes running to the end (the preallocated, never-written part
    /// of an active segment, which is not damage).
    pub(crate) end: usize,
}

/// Scans `buf` from `start`: reads frames forward; on a bad frame searches forward for
/// the next valid one. Damage followed by a valid frame is corruption; damage running
/// to the end is a torn tail.
pub(crate) fn scan(buf: &[u8], start: usize) -> Scan {
    let mut out = Scan {
        end: buf.len(),
        ..Scan::default()
    };
    let mut off = start;
    while off < buf.len() {
        match decode_frame(&buf[off..]) {
            Decoded::Frame { kind, body, len } => {
                let body_start = off + FRAME_HEADER;
                out.frames
                    .push((off, kind, body_start..body_start + body.len()));
                off += len;
            }
            Decoded::Incomplete | Decoded::Invalid(_) => {
                // Zeros to the end: preallocated space, never written (a frame
                // starts with its magic, so a real frame is never all zeros).
                if buf[off..].iter().all(|&b| b == 0) {
                    out.end = off;
                    break;
                }
                let reason = match decode_frame(&buf[off..]) {
                    Decoded::Invalid(r) => r,
                    _ => "truncated frame",
                };
                // Search for the next valid frame.
                let mut next = None;
                let mut probe = off + 1;
                while probe + FRAME_HEADER <= buf.len() {
                    if buf[probe..probe + 2] == FRAME_MAGIC
                        && matches!(decode_frame(&buf[probe..]), Decoded::Frame { .. })
                    {
                        next = Some(probe);
                        break;
                    }
                    probe += 1;
                }
                match next {
                    Some(n) => {
                        out.corrupt.push((off, n - off, reason));
                        off = n;
                    }
                    None => {
                        out.torn_tail_at = Some(off);
                        out.end = off;
                        break;
                    }
                }
            }
        }
    }
    out
}

/// One piece of a segment body in file order: a valid frame or a damaged range.
#[derive(Clone, Debug)]
enum Piece {
    Frame {
        offset: usize,
        kind: u8,
        body: std::ops::Range<usize>,
    },
    Damage {
        offset: usize,
        len: usize,
        reason: &'static str,
    },
}

impl Piece {
    fn offset(&self) -> usize {
        match self {
            Piece::Frame { offset, .. } | Piece::Damage { offset, .. } => *offset,
        }
    }
}

/// Scans a version-2 segment body (group commits ending with a trailer) from
/// `start`, where `base` is the segment's base position.
///
/// Only entries of complete groups count: a group is complete when its trailer
/// checks and exactly its `count` entry frames run, intact and back to back, from
/// its `start` offset to the trailer. Bytes that are not a complete group are
/// *unconfirmed*. An unconfirmed range followed by a complete group whose trailer
/// says the positions there were already durable is **corruption**: it is reported
/// and its intact frames stay readable. Any other unconfirmed range is the
/// **torn tail** of group commits that were never acknowledged: it, and everything
/// after it, is the tail (`tail` in a sealed segment is corruption instead, since a
/// segment is sealed only once every group in it is durable).
pub(crate) fn scan_groups(buf: &[u8], start: usize, base: u64, sealed: bool) -> Scan {
    scan_groups_from(buf, start, 0, base.saturating_sub(1), sealed)
}

/// [`scan_groups`] of the part of a version-2 segment body that starts at segment
/// offset `origin` (byte 0 of `buf`) right after a complete group whose last
/// position is `prev_last` (an active segment's checkpoint). Offsets in the
/// result are relative to `buf`; a group whose trailer says it starts before
/// `origin` is not complete.
pub(crate) fn scan_groups_from(
    buf: &[u8],
    start: usize,
    origin: u64,
    prev_last: u64,
    sealed: bool,
) -> Scan {
    let raw = scan(buf, start);
    let mut pieces: Vec<Piece> = raw
        .frames
        .iter()
        .map(|(offset, kind, body)| Piece::Frame {
            offset: *offset,
            kind: *kind,
            body: body.clone(),
        })
        .chain(
            raw.corrupt
                .iter()
                .map(|&(offset, len, reason)| Piece::Damage {
                    offset,
                    len,
                    reason,
                }),
        )
        .collect();
    if let Some(at) = raw.torn_tail_at {
        pieces.push(Piece::Damage {
            offset: at,
            len: buf.len() - at,
            reason: "torn frame",
        });
    }
    pieces.sort_by_key(Piece::offset);
    let durable = pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Frame {
                kind: KIND_GROUP,
                body,
                ..
            } => decode_group(&buf[body.clone()]).map(|t| t.durable),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let mut out = Scan {
        end: raw.end,
        ..Scan::default()
    };
    // The last position of the previous complete group.
    let mut prev_last = prev_last;
    let mut pending: Vec<Piece> = Vec::new();
    for piece in pieces {
        let trailer = match &piece {
            Piece::Frame {
                offset,
                kind: KIND_GROUP,
                body,
            } => decode_group(&buf[body.clone()]).map(|t| (*offset, t)),
            _ => None,
        };
        let Some((at, mut t)) = trailer else {
            pending.push(piece);
            continue;
        };
        // In `buf`'s coordinates (a start before `origin` matches no frame).
        t.start = t.start.checked_sub(origin).unwrap_or(u64::MAX);
        let split = pending.partition_point(|p| (p.offset() as u64) < t.start);
        if !group_is_complete(&pending[split..], at, &t) {
            pending.push(piece);
            continue;
        }
        let group: Vec<Piece> = pending.drain(split..).collect();
        if !pending.is_empty() {
            let unconfirmed: Vec<Piece> = std::mem::take(&mut pending);
            if prev_last + 1 > durable {
                // Never acknowledged: the log ends here.
                out.torn_tail_at = Some(unconfirmed[0].offset());
                out.end = unconfirmed[0].offset();
                return out;
            }
            keep_intact(unconfirmed, &mut out);
        }
        for p in group {
            if let Piece::Frame { offset, kind, body } = p {
                out.frames.push((offset, kind, body));
            }
        }
        out.frames.push((
            at,
            KIND_GROUP,
            at + FRAME_HEADER..at + FRAME_HEADER + GROUP_BODY,
        ));
        prev_last = t.first + u64::from(t.count).saturating_sub(1);
    }
    if let Some(first) = pending.first() {
        if sealed {
            keep_intact(pending, &mut out);
        } else {
            out.torn_tail_at = Some(first.offset());
            out.end = first.offset();
        }
    }
    out
}

/// Whether `frames` (the pieces from the trailer's `start` up to the trailer at
/// `at`) are exactly its complete group.
fn group_is_complete(frames: &[Piece], at: usize, t: &GroupTrailer) -> bool {
    let mut next = usize::try_from(t.start).unwrap_or(usize::MAX);
    let mut count = 0u32;
    for p in frames {
        match p {
            Piece::Frame {
                offset,
                kind: KIND_ENTRY,
                body,
            } if *offset == next => {
                next = body.end;
                count += 1;
            }
            _ => return false,
        }
    }
    next == at && count == t.count && count > 0
}

/// A damaged range proven durable: report the damage, keep the intact frames.
fn keep_intact(pieces: Vec<Piece>, out: &mut Scan) {
    for p in pieces {
        match p {
            Piece::Frame { offset, kind, body } => out.frames.push((offset, kind, body)),
            Piece::Damage {
                offset,
                len,
                reason,
            } => out.corrupt.push((offset, len, reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_entry() -> JournalEntry {
        JournalEntry {
            id: JournalEntryId::from_uuid(Uuid::from_u128(
                0x0193_0000_0000_7000_8000_0000_0000_0001,
            )),
            position: JournalPosition(1),
            transaction_id: "tx-1".into(),
            operation_type: "order.placed".into(),
            recorded_at: OffsetDateTime::from_unix_timestamp(1_700_000_000)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            idempotency_key: Some("k1".into()),
            payload: vec![1, 2, 3],
            payload_hash: *blake3::hash(&[1, 2, 3]).as_bytes(),
            user: None,
            source_system: None,
            status: EntryStatus::Recorded,
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Golden vector: an applied-mark frame (fixed bytes, see docs/formats.md).
    #[test]
    fn golden_applied_frame() {
        let mut out = Vec::new();
        encode_applied(
            JournalPosition(1),
            JournalEntryId::from_uuid(Uuid::from_u128(1)),
            &mut out,
        );
        assert_eq!(
            hex(&out),
            "534a010218000000d47bf3890100000000000000\
             00000000000000000000000000000001"
        );
    }

    /// Golden vector: an empty-body frame of kind 1.
    #[test]
    fn golden_empty_frame_and_segment_header() {
        let mut out = Vec::new();
        encode_frame(KIND_ENTRY, b"", &mut out);
        assert_eq!(hex(&out), "534a0101000000006950a7fa");
        assert_eq!(
            hex(&segment_header(1)),
            "53414e4152454a57\
             01000000\
             00000000\
             0100000000000000"
        );
    }

    /// Golden vector: an entry frame, byte for byte.
    #[test]
    fn golden_entry_frame() {
        let mut out = Vec::new();
        encode_entry(&sample_entry(), &mut out).unwrap();
        assert_eq!(hex(&out), GOLDEN_ENTRY);
        match decode_frame(&out) {
            Decoded::Frame { kind, body, .. } => {
                assert_eq!(kind, KIND_ENTRY);
                assert_eq!(decode_entry(body).unwrap(), sample_entry());
            }
            other => panic!("{other:?}"),
        }
    }

    const GOLDEN_ENTRY: &str = include_str!("../tests/golden/entry_frame.hex");
    /// Golden vectors: a version-2 segment header and a group trailer frame.
    #[test]
    fn golden_segment_v2_header_and_group_trailer() {
        assert_eq!(
            hex(&segment_header_v2(1)),
            "53414e4152454a57\
             02000000\
             00000000\
             0100000000000000"
        );
        let mut out = Vec::new();
        encode_group(
            &GroupTrailer {
                first: 5,
                count: 3,
                start: 24,
                durable: 4,
            },
            &mut out,
        );
        assert_eq!(hex(&out), GOLDEN_GROUP);
        let Decoded::Frame { kind, body, .. } = decode_frame(&out) else {
            panic!("a frame")
        };
        assert_eq!(kind, KIND_GROUP);
        assert_eq!(
            decode_group(body).map(|t| (t.first, t.count, t.start, t.durable)),
            Some((5, 3, 24, 4))
        );
    }

    const GOLDEN_GROUP: &str = "534a01032000000092cb4141\
        0500000000000000030000001800000000000000\
        0400000000000000534a4745";

    /// Golden vectors: the applied-marks file's reopen and range frames.
    #[test]
    fn golden_reopen_and_range_frames() {
        let mut out = Vec::new();
        encode_pair(KIND_REOPEN, 4, 0, &mut out);
        encode_pair(KIND_RANGE, 1, 3, &mut out);
        assert_eq!(hex(&out), GOLDEN_MARKS);
    }

    const GOLDEN_MARKS: &str = "534a010410000000def1225f\
        04000000000000000000000000000000\
        534a0105100000004faa64bd\
        01000000000000000300000000000000";

    #[test]
    fn a_torn_group_is_a_tail_and_damage_in_a_durable_group_is_corruption() {
        let entry = |i: u8, out: &mut Vec<u8>| encode_frame(KIND_ENTRY, &[i; 600], out);
        let mut buf = segment_header_v2(1).to_vec();
        // Group 1: entries 1, 2 (nothing durable before); group 2: entry 3
        // (1 and 2 durable); group 3: entry 4, written while group 2's flush
        // was still running (2 durable).
        let mut groups = Vec::new();
        for (first, n, durable) in [(1u64, 2u8, 0u64), (3, 1, 2), (4, 1, 2)] {
            let start = buf.len();
            for i in 0..n {
                entry(first as u8 + i, &mut buf);
            }
            encode_group(
                &GroupTrailer {
                    first,
                    count: u32::from(n),
                    start: start as u64,
                    durable,
                },
                &mut buf,
            );
            groups.push(start);
        }
        let intact = scan_groups(&buf, SEGMENT_HEADER, 1, false);
        assert_eq!((intact.frames.len(), intact.torn_tail_at), (7, None));
        // Group 2 torn (a sector of it lost): group 3 says only 1..=2 were
        // durable when it was written, so 3 never was acknowledged: the tail
        // starts there, and group 3 (never acknowledged either) goes with it.
        let mut torn = buf.clone();
        torn[groups[1] + 100..groups[1] + 200].fill(0);
        let s = scan_groups(&torn, SEGMENT_HEADER, 1, false);
        assert_eq!(s.torn_tail_at, Some(groups[1]));
        assert!(s.corrupt.is_empty());
        // Group 1 damaged: groups 2 and 3 say 1..=2 were durable: corruption,
        // and the intact frames around it stay.
        let mut rot = buf.clone();
        rot[groups[0] + 700] ^= 1;
        let s = scan_groups(&rot, SEGMENT_HEADER, 1, false);
        assert_eq!(s.torn_tail_at, None);
        assert_eq!(s.corrupt.len(), 1);
        let entries = s.frames.iter().filter(|f| f.1 == KIND_ENTRY).count();
        assert_eq!(entries, 3, "entry 2 lost, 1, 3 and 4 kept");
    }

    #[test]
    fn sealed_containers_round_trip_and_detect_damage() {
        let raw = b"hello hello hello hello".repeat(100);
        let mut sealed = seal(SEALED_MAGIC, &raw).unwrap();
        assert_eq!(unseal(SEALED_MAGIC, &sealed, "t").unwrap(), raw);
        let last = sealed.len() - 1;
        sealed[last] ^= 0x40;
        assert!(matches!(
            unseal(SEALED_MAGIC, &sealed, "t"),
            Err(Error::Corrupt { .. })
        ));
        assert!(unseal(ARCHIVE_MAGIC, &sealed, "t").is_err());
    }

    #[test]
    fn scan_tells_a_torn_tail_from_corruption_in_the_middle() {
        let mut buf = Vec::new();
        for i in 0..3u8 {
            encode_frame(KIND_ENTRY, &[i; 10], &mut buf);
        }
        let second = FRAME_HEADER + 10;
        let mut damaged = buf.clone();
        damaged[second + FRAME_HEADER + 3] ^= 1;
        let s = scan(&damaged, 0);
        assert_eq!(s.frames.len(), 2);
        assert_eq!(
            s.corrupt,
            vec![(second, FRAME_HEADER + 10, "frame checksum mismatch")]
        );
        assert_eq!(s.torn_tail_at, None);

        let torn = &buf[..buf.len() - 4];
        let s = scan(torn, 0);
        assert_eq!(s.frames.len(), 2);
        assert_eq!(s.torn_tail_at, Some(2 * (FRAME_HEADER + 10)));
    }

    #[test]
    fn zeros_to_the_end_are_preallocated_space_not_damage() {
        let mut buf = Vec::new();
        encode_frame(KIND_ENTRY, b"0123456789", &mut buf);
        let end = buf.len();
        buf.resize(end + 4096, 0);
        let s = scan(&buf, 0);
        assert_eq!((s.frames.len(), s.end, s.torn_tail_at), (1, end, None));
        assert!(s.corrupt.is_empty());
        // A partial frame in front of the zeros is still a torn tail.
        let mut torn = buf[..end].to_vec();
        encode_frame(KIND_ENTRY, b"0123456789", &mut torn);
        torn.truncate(end + 7);
        torn.resize(end + 4096, 0);
        let s = scan(&torn, 0);
        assert_eq!((s.frames.len(), s.end, s.torn_tail_at), (1, end, Some(end)));
    }

    fn arb_entry() -> impl Strategy<Value = JournalEntry> {
        (
            any::<u64>(),
            any::<u128>(),
            -1_000_000_000_000i64..4_000_000_000i64,
            ".{0,20}",
            "[a-z.]{1,30}",
            proptest::option::of(".{0,40}"),
            proptest::option::of(".{0,10}"),
            proptest::collection::vec(any::<u8>(), 0..600),
        )
            .prop_map(|(pos, id, secs, tx, op, key, user, payload)| JournalEntry {
                id: JournalEntryId::from_uuid(Uuid::from_u128(id)),
                position: JournalPosition(pos),
                transaction_id: tx,
                operation_type: op,
                recorded_at: OffsetDateTime::from_unix_timestamp(secs)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                idempotency_key: key,
                payload_hash: *blake3::hash(&payload).as_bytes(),
                payload,
                user,
                source_system: None,
                status: EntryStatus::Recorded,
            })
    }

    proptest! {
        #[test]
        fn entries_round_trip_through_the_framing(entries in proptest::collection::vec(arb_entry(), 1..8)) {
            let mut buf = Vec::new();
            for e in &entries {
                encode_entry(e, &mut buf).unwrap();
            }
            let s = scan(&buf, 0);
            prop_assert!(s.corrupt.is_empty());
            prop_assert_eq!(s.torn_tail_at, None);
            let back: Vec<JournalEntry> = s.frames.iter()
                .map(|(_, _, r)| decode_entry(&buf[r.clone()]).unwrap())
                .collect();
            prop_assert_eq!(back, entries);
        }

        #[test]
        fn any_truncation_is_a_torn_tail_never_a_panic(entries in proptest::collection::vec(arb_entry(), 1..4), cut in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            for e in &entries {
                encode_entry(e, &mut buf).unwrap();
            }
            let at = cut.index(buf.len());
            let s = scan(&buf[..at], 0);
            prop_assert!(s.corrupt.is_empty());
            for (_, _, r) in &s.frames {
                prop_assert!(decode_entry(&buf[r.clone()]).is_ok());
            }
        }

        #[test]
        fn the_decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_frame(&bytes);
            let s = scan(&bytes, 0);
            for (_, _, r) in &s.frames {
                let _ = decode_entry(&bytes[r.clone()]);
            }
        }
    }
}
