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

/// Magic of an active (raw) segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"SANAREJW";
/// Magic of a sealed, compressed segment file.
pub(crate) const SEALED_MAGIC: [u8; 8] = *b"SANAREJZ";
/// Magic of an archive file.
pub(crate) const ARCHIVE_MAGIC: [u8; 8] = *b"SANAREJA";
/// Version of the segment, sealed segment and archive formats.
pub(crate) const FILE_VERSION: u32 = 1;
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

/// Encodes `entry` as an entry frame appended to `out`.
pub(crate) fn encode_entry(entry: &JournalEntry, out: &mut Vec<u8>) -> Result<()> {
    let body = EntryBody {
        position: entry.position.0,
        id: *entry.id.as_uuid().as_bytes(),
        recorded_at_unix_ns: entry.recorded_at.unix_timestamp_nanos(),
        transaction_id: entry.transaction_id.clone(),
        operation_type: entry.operation_type.clone(),
        idempotency_key: entry.idempotency_key.clone(),
        user: entry.user.clone(),
        source_system: entry.source_system.clone(),
        payload_hash: entry.payload_hash,
        payload: entry.payload.clone(),
    };
    let bytes = postcard::to_allocvec(&body)
        .map_err(|e| Error::other("encoding a journal record with postcard", e))?;
    if bytes.len() > MAX_BODY {
        return Err(Error::invalid_input("journal record over the 16 MiB limit"));
    }
    encode_frame(KIND_ENTRY, &bytes, out);
    Ok(())
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

/// The header of a raw segment whose first entry is at `base` or later.
pub(crate) fn segment_header(base: u64) -> [u8; SEGMENT_HEADER] {
    let mut h = [0u8; SEGMENT_HEADER];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FILE_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&base.to_le_bytes());
    h
}

/// Checks a raw segment header, returning its base position.
pub(crate) fn parse_segment_header(buf: &[u8], what: &str) -> Result<u64> {
    if buf.len() < SEGMENT_HEADER || buf[0..8] != SEGMENT_MAGIC {
        return Err(Error::corrupt(
            what.to_owned(),
            "not a sanare journal segment (bad magic or too short)",
        ));
    }
    let version = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if version != FILE_VERSION {
        return Err(Error::corrupt(
            what.to_owned(),
            format!("segment format version {version} is not supported (this build reads 1)"),
        ));
    }
    let mut base = [0u8; 8];
    base.copy_from_slice(&buf[16..24]);
    Ok(u64::from_le_bytes(base))
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
    let mut raw = Vec::with_capacity(usize::try_from(raw_len).unwrap_or(0));
    brotli::BrotliDecompress(&mut &compressed[..], &mut raw)
        .map_err(|e| Error::corrupt(what.to_owned(), format!("does not decompress: {e}")))?;
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
