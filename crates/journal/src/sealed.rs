//! Sealed segments, version 2: the segment's bytes in blocks of at most
//! [`BLOCK`] bytes, each compressed on its own and checked on its own, so damage
//! costs the records of one block, never the segment (`docs/formats.md`).
//!
//! Version 1 (one brotli stream for the whole segment) is still read.

use std::io::Read as _;

use sanare_core::{Error, Result};

use crate::frame::{self, CorruptRegion};

/// Uncompressed bytes per block.
pub(crate) const BLOCK: usize = 64 << 10;
/// Version of a block-compressed sealed segment.
pub(crate) const VERSION: u32 = 2;
/// Magic of a block.
const BLOCK_MAGIC: [u8; 4] = *b"SJB1";
/// Length of a block header.
const BLOCK_HEADER: usize = 28;
/// Length of the file header.
const HEADER: usize = 32;

/// Seals a segment's bytes: header, then each block compressed alone.
pub(crate) fn seal(raw: &[u8]) -> Result<Vec<u8>> {
    let blocks = raw.len().div_ceil(BLOCK);
    let mut out = Vec::with_capacity(HEADER + raw.len() / 4);
    out.extend_from_slice(&frame::SEALED_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&frame::CODEC_BROTLI.to_le_bytes());
    out.extend_from_slice(&(raw.len() as u64).to_le_bytes());
    out.extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let params = brotli::enc::BrotliEncoderParams {
        quality: 5,
        lgwin: 17,
        ..Default::default()
    };
    let mut compressed = Vec::with_capacity(BLOCK);
    for (i, block) in raw.chunks(BLOCK).enumerate() {
        compressed.clear();
        brotli::BrotliCompress(&mut &block[..], &mut compressed, &params)
            .map_err(|e| Error::io("compressing a journal segment", e))?;
        let mut h = [0u8; BLOCK_HEADER];
        h[0..4].copy_from_slice(&BLOCK_MAGIC);
        h[4..12].copy_from_slice(&((i * BLOCK) as u64).to_le_bytes());
        h[12..16].copy_from_slice(&(block.len() as u32).to_le_bytes());
        h[16..20].copy_from_slice(&(compressed.len() as u32).to_le_bytes());
        h[20..24].copy_from_slice(&crc32c::crc32c(block).to_le_bytes());
        let hcrc = crc32c::crc32c(&h[0..24]);
        h[24..28].copy_from_slice(&hcrc.to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&compressed);
    }
    Ok(out)
}

/// A block header that checks.
struct BlockHeader {
    raw_offset: u64,
    raw_len: usize,
    comp_len: usize,
    raw_crc: u32,
}

fn block_header(buf: &[u8]) -> Option<BlockHeader> {
    let h = buf.get(..BLOCK_HEADER)?;
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    if h[0..4] != BLOCK_MAGIC || crc32c::crc32c(&h[0..24]) != word(24) {
        return None;
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&h[4..12]);
    let raw_len = word(12) as usize;
    if raw_len > BLOCK {
        return None;
    }
    Some(BlockHeader {
        raw_offset: u64::from_le_bytes(off),
        raw_len,
        comp_len: word(16) as usize,
        raw_crc: word(20),
    })
}

/// Opens a sealed segment (version 1 or 2): the segment's bytes, with the ranges
/// of damaged blocks zero-filled (whatever of a damaged block decompressed
/// before the damage is kept: its frames are still checked one by one), and
/// those ranges. Never allocates more than the file's size allows.
pub(crate) fn unseal(buf: &[u8], name: &str) -> Result<(Vec<u8>, Vec<CorruptRegion>)> {
    if buf.len() >= 12 && buf[0..8] == frame::SEALED_MAGIC && buf[8..12] == 1u32.to_le_bytes() {
        return Ok((frame::unseal(frame::SEALED_MAGIC, buf, name)?, Vec::new()));
    }
    let bad = |why: &str| Error::corrupt(name.to_owned(), why.to_owned());
    if buf.len() < HEADER || buf[0..8] != frame::SEALED_MAGIC {
        return Err(bad("not a sealed journal segment (bad magic or too short)"));
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    if crc32c::crc32c(&buf[0..28]) != word(28) {
        return Err(bad("sealed segment header checksum mismatch"));
    }
    if word(8) != VERSION {
        return Err(bad("unsupported sealed segment version"));
    }
    if word(12) != frame::CODEC_BROTLI {
        return Err(bad("unknown codec"));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&buf[16..24]);
    let raw_len = u64::from_le_bytes(len);
    // Each block of at most BLOCK raw bytes takes at least its header in the
    // file: a claim beyond that is damage.
    let plausible = (buf.len() / BLOCK_HEADER + 1) as u64 * BLOCK as u64;
    if raw_len > plausible || raw_len > (1 << 34) {
        return Err(bad("implausible uncompressed length"));
    }
    let raw_len = usize::try_from(raw_len).map_err(|_| bad("implausible uncompressed length"))?;
    let mut raw = vec![0u8; raw_len];
    let mut good = vec![false; raw_len.div_ceil(BLOCK)];
    let mut at = HEADER;
    while at < buf.len() {
        let Some(h) = block_header(&buf[at..]) else {
            // A damaged header: look for the next block that checks.
            at += 1;
            while at < buf.len() && block_header(&buf[at..]).is_none() {
                at += 1;
            }
            continue;
        };
        let start = at + BLOCK_HEADER;
        let comp = &buf[start..(start + h.comp_len).min(buf.len())];
        at = start + comp.len();
        let (Ok(off), true) = (
            usize::try_from(h.raw_offset),
            h.raw_offset % BLOCK as u64 == 0,
        ) else {
            continue;
        };
        let Some(dest) = raw.get_mut(off..off + h.raw_len) else {
            continue;
        };
        let mut out = Vec::with_capacity(h.raw_len);
        let ok = brotli::Decompressor::new(comp, 4096)
            .take(h.raw_len as u64 + 1)
            .read_to_end(&mut out)
            .is_ok();
        if ok && out.len() == h.raw_len && crc32c::crc32c(&out) == h.raw_crc {
            dest.copy_from_slice(&out);
            good[off / BLOCK] = true;
        } else {
            // Keep what came out before the damage; the frames check themselves.
            let n = out.len().min(dest.len());
            dest[..n].copy_from_slice(&out[..n]);
        }
    }
    let damage = good
        .iter()
        .enumerate()
        .filter(|(_, g)| !**g)
        .map(|(i, _)| CorruptRegion {
            segment: name.to_owned(),
            offset: (i * BLOCK) as u64,
            len: (BLOCK.min(raw_len - i * BLOCK)) as u64,
            reason: "damaged compressed block of a sealed segment".into(),
        })
        .collect();
    Ok((raw, damage))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| format!("record {i} ").into_bytes())
            .take(3 * BLOCK + 1234)
            .collect()
    }

    #[test]
    fn blocks_round_trip_and_damage_costs_one_block() {
        let raw = sample();
        let mut sealed = seal(&raw).unwrap();
        assert!(sealed.len() * 3 < raw.len());
        assert_eq!(unseal(&sealed, "t").unwrap(), (raw.clone(), Vec::new()));
        // Flip a bit in the second block's compressed bytes.
        let second = HEADER
            + BLOCK_HEADER
            + usize::try_from(u32::from_le_bytes(
                sealed[HEADER + 16..HEADER + 20].try_into().unwrap(),
            ))
            .unwrap();
        let second_len = u32::from_le_bytes(sealed[second + 16..second + 20].try_into().unwrap());
        let at = second + BLOCK_HEADER + second_len as usize / 2;
        sealed[at] ^= 0x08;
        let (back, damage) = unseal(&sealed, "t").unwrap();
        assert_eq!(damage.len(), 1);
        assert_eq!(damage[0].offset, BLOCK as u64);
        assert_eq!(back[..BLOCK], raw[..BLOCK]);
        assert_eq!(back[2 * BLOCK..], raw[2 * BLOCK..]);
        // A damaged block header: the blocks after it are found again.
        let mut sealed = seal(&raw).unwrap();
        sealed[second + 5] ^= 1;
        let (back, damage) = unseal(&sealed, "t").unwrap();
        assert_eq!(damage.len(), 1);
        assert_eq!(back[2 * BLOCK..], raw[2 * BLOCK..]);
    }

    #[test]
    fn a_length_no_checksum_vouches_for_is_never_allocated() {
        let mut sealed = seal(b"tiny").unwrap();
        // Claim 16 GiB uncompressed, with a header checksum that matches.
        sealed[16..24].copy_from_slice(&(16u64 << 30).to_le_bytes());
        let crc = crc32c::crc32c(&sealed[0..28]);
        sealed[28..32].copy_from_slice(&crc.to_le_bytes());
        let err = unseal(&sealed, "t").unwrap_err();
        assert!(err.to_string().contains("implausible"), "{err}");
    }
}
