//! PostgreSQL binary COPY framing and row-aligned content-defined chunking.

use sanare_core::{Error, Result};

use crate::format::{ChunkParams, bloom};

/// The binary COPY header with no flags and no extension.
pub(crate) const HEADER: [u8; 19] = *b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The binary COPY trailer.
pub(crate) const TRAILER: [u8; 2] = [0xff, 0xff];

/// The byte length of the complete row starting at `buf[0]`, `Ok(None)` if `buf`
/// holds only part of it, or the trailer marker as `Some(0)`.
pub(crate) fn row_len(buf: &[u8]) -> Result<Option<usize>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fields = i16::from_be_bytes([buf[0], buf[1]]);
    if fields == -1 {
        return Ok(Some(0));
    }
    if fields < 0 {
        return Err(Error::corrupt(
            "binary COPY stream",
            format!("negative field count {fields}"),
        ));
    }
    let mut at = 2usize;
    for _ in 0..fields {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        at += 4;
        if len >= 0 {
            at += len as usize;
        } else if len != -1 {
            return Err(Error::corrupt(
                "binary COPY stream",
                format!("negative field length {len}"),
            ));
        }
    }
    if buf.len() < at {
        Ok(None)
    } else {
        Ok(Some(at))
    }
}

/// The byte ranges of each field of one complete row (`None` for NULL), each range
/// including its 4-byte length prefix.
pub(crate) fn fields(row: &[u8]) -> Vec<std::ops::Range<usize>> {
    let n = i16::from_be_bytes([row[0], row[1]]).max(0) as usize;
    let mut out = Vec::with_capacity(n);
    let mut at = 2usize;
    for _ in 0..n {
        let len = i32::from_be_bytes([row[at], row[at + 1], row[at + 2], row[at + 3]]);
        let end = at + 4 + len.max(0) as usize;
        out.push(at..end);
        at = end;
    }
    out
}

/// The hash of a row's primary key: blake3 over the key fields' binary COPY
/// encodings (length prefix and bytes), in key order.
pub(crate) fn key_hash(row: &[u8], ranges: &[std::ops::Range<usize>], pk: &[u16]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for &i in pk {
        if let Some(r) = ranges.get(i as usize) {
            h.update(&row[r.clone()]);
        }
    }
    *h.finalize().as_bytes()
}

/// Iterates the complete rows of a buffer of whole rows.
pub(crate) fn rows(mut buf: &[u8]) -> impl Iterator<Item = Result<&[u8]>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        match row_len(buf) {
            Ok(Some(n)) if n > 0 => {
                let (row, rest) = buf.split_at(n);
                buf = rest;
                Some(Ok(row))
            }
            Ok(_) => {
                buf = &[];
                Some(Err(Error::corrupt("table block", "ends inside a row")))
            }
            Err(e) => {
                buf = &[];
                Some(Err(e))
            }
        }
    })
}

/// A finished block of whole rows.
#[derive(Debug)]
pub(crate) struct RowBlock {
    pub(crate) content: Vec<u8>,
    pub(crate) rows: u32,
    pub(crate) key_filter: Vec<u8>,
    /// The key hashes of its first and last rows (none without a primary key):
    /// which block of the previous snapshot it most likely replaces.
    pub(crate) first_key: Option<[u8; 32]>,
    pub(crate) last_key: Option<[u8; 32]>,
}

/// Turns a binary COPY byte stream into blocks of whole rows whose boundaries are
/// content-defined: FastCDC picks a cut point in the buffered rows and the block is
/// extended to the end of the row the cut falls in. An insert or update therefore
/// changes only the blocks around it, and every row lives in exactly one block (so a
/// few rows can be found without decoding the whole table).
#[derive(Debug)]
pub(crate) struct Chunker {
    params: ChunkParams,
    pk: Vec<u16>,
    pending: Vec<u8>,
    header_left: usize,
    ended: bool,
    rows: Vec<u8>,
    row_ends: Vec<usize>,
    keys: Vec<[u8; 32]>,
    /// Rows seen.
    pub(crate) row_count: u64,
}

impl Chunker {
    pub(crate) fn new(params: ChunkParams, pk: Vec<u16>) -> Self {
        Self {
            params,
            pk,
            pending: Vec::new(),
            header_left: usize::MAX,
            ended: false,
            rows: Vec::new(),
            row_ends: Vec::new(),
            keys: Vec::new(),
            row_count: 0,
        }
    }

    /// Feeds stream bytes; returns the blocks completed.
    pub(crate) fn push(&mut self, data: &[u8]) -> Result<Vec<RowBlock>> {
        self.pending.extend_from_slice(data);
        let mut at = 0usize;
        if self.header_left == usize::MAX {
            if self.pending.len() < 19 {
                return Ok(Vec::new());
            }
            if self.pending[..11] != HEADER[..11] {
                return Err(Error::corrupt(
                    "binary COPY stream",
                    "missing PGCOPY signature",
                ));
            }
            let ext = u32::from_be_bytes([
                self.pending[15],
                self.pending[16],
                self.pending[17],
                self.pending[18],
            ]) as usize;
            self.header_left = 19 + ext;
        }
        if self.header_left > 0 {
            if self.pending.len() < self.header_left {
                return Ok(Vec::new());
            }
            at = self.header_left;
            self.header_left = 0;
        }
        let mut out = Vec::new();
        while !self.ended {
            match row_len(&self.pending[at..])? {
                None => break,
                Some(0) => {
                    self.ended = true;
                    at += 2;
                }
                Some(n) => {
                    let row = &self.pending[at..at + n];
                    if !self.pk.is_empty() {
                        let ranges = fields(row);
                        self.keys.push(key_hash(row, &ranges, &self.pk));
                    }
                    self.rows.extend_from_slice(row);
                    self.row_ends.push(self.rows.len());
                    self.row_count += 1;
                    at += n;
                    if self.rows.len() >= self.params.max_size as usize {
                        out.push(self.cut());
                    }
                }
            }
        }
        self.pending.drain(..at);
        Ok(out)
    }

    fn cut(&mut self) -> RowBlock {
        let p = self.params;
        let cdc = fastcdc::v2020::FastCDC::new(
            &self.rows,
            p.min_size as usize,
            p.avg_size as usize,
            p.max_size as usize,
        );
        let cut_at = cdc.into_iter().next().map_or(self.rows.len(), |c| c.length);
        // The first row ending at or after the cut.
        let idx = self.row_ends.partition_point(|&e| e < cut_at);
        let idx = idx.min(self.row_ends.len() - 1);
        let end = self.row_ends[idx];
        let rest = self.rows.split_off(end);
        let content = std::mem::replace(&mut self.rows, rest);
        let nrows = idx + 1;
        self.row_ends.drain(..nrows);
        for e in &mut self.row_ends {
            *e -= end;
        }
        let keys: Vec<[u8; 32]> = if self.keys.is_empty() {
            Vec::new()
        } else {
            self.keys.drain(..nrows).collect()
        };
        RowBlock {
            content,
            rows: u32::try_from(nrows).unwrap_or(u32::MAX),
            key_filter: bloom::build(&keys),
            first_key: keys.first().copied(),
            last_key: keys.last().copied(),
        }
    }

    /// Ends the stream: returns the last blocks, or an error if the stream was cut
    /// short (no trailer).
    pub(crate) fn finish(mut self) -> Result<Vec<RowBlock>> {
        if !self.ended || !self.pending.is_empty() {
            return Err(Error::corrupt(
                "binary COPY stream",
                "ended without its trailer (connection lost mid-table?)",
            ));
        }
        let mut out = Vec::new();
        while !self.rows.is_empty() {
            out.push(self.cut());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, text: &str) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&2i16.to_be_bytes());
        r.extend_from_slice(&8i32.to_be_bytes());
        r.extend_from_slice(&id.to_be_bytes());
        r.extend_from_slice(&(text.len() as i32).to_be_bytes());
        r.extend_from_slice(text.as_bytes());
        r
    }

    fn stream(n: i64, tag: impl Fn(i64) -> String) -> Vec<u8> {
        let mut s = HEADER.to_vec();
        for i in 0..n {
            s.extend_from_slice(&row(i, &tag(i)));
        }
        s.extend_from_slice(&TRAILER);
        s
    }

    fn chunk(s: &[u8], piece: usize) -> Vec<RowBlock> {
        let mut c = Chunker::new(ChunkParams::default(), vec![0]);
        let mut out = Vec::new();
        for p in s.chunks(piece) {
            out.extend(c.push(p).unwrap());
        }
        out.extend(c.finish().unwrap());
        out
    }

    fn text(i: i64) -> String {
        format!("row {i} {}", "x".repeat((i % 37) as usize))
    }

    #[test]
    fn blocks_hold_whole_rows_whatever_the_read_sizes() {
        let s = stream(20_000, text);
        let a = chunk(&s, 7);
        let b = chunk(&s, 65_536);
        assert!(a.len() > 10);
        let ids = |v: &[RowBlock]| {
            v.iter()
                .map(|b| blake3::hash(&b.content))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&b));
        let total: u32 = a.iter().map(|b| b.rows).sum();
        assert_eq!(total, 20_000);
        for b in &a {
            assert_eq!(rows(&b.content).count(), b.rows as usize);
            assert!(b.content.len() <= 64 * 1024 + 100);
        }
    }

    #[test]
    fn a_change_touches_only_nearby_blocks() {
        let before = chunk(&stream(20_000, text), 4096);
        let after = chunk(
            &stream(20_000, |i| {
                if i == 10_000 {
                    "changed!".into()
                } else {
                    text(i)
                }
            }),
            4096,
        );
        let old: std::collections::HashSet<_> =
            before.iter().map(|b| blake3::hash(&b.content)).collect();
        let new_blocks = after
            .iter()
            .filter(|b| !old.contains(&blake3::hash(&b.content)))
            .count();
        assert!(new_blocks <= 2, "{new_blocks} blocks changed");
    }

    /// Golden cut points: the block boundaries for a fixed stream with the default
    /// parameters. A change here means stored repositories stop deduplicating.
    #[test]
    fn golden_cut_points() {
        let s = stream(20_000, text);
        let blocks = chunk(&s, 1 << 20);
        let sizes: Vec<usize> = blocks.iter().map(|b| b.content.len()).collect();
        assert_eq!(
            sizes.iter().sum::<usize>(),
            s.len() - HEADER.len() - TRAILER.len()
        );
        assert_eq!(&sizes[..GOLDEN.len()], GOLDEN, "all sizes: {sizes:?}");
    }

    const GOLDEN: &[usize] = &[6818, 29598, 4795, 14841, 25842, 6720, 10455, 28203];

    #[test]
    fn truncated_streams_are_refused() {
        let s = stream(100, text);
        let mut c = Chunker::new(ChunkParams::default(), vec![0]);
        c.push(&s[..s.len() - 10]).unwrap();
        assert!(c.finish().is_err());
        let mut c = Chunker::new(ChunkParams::default(), vec![0]);
        assert!(c.push(b"NOTCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0").is_err());
    }
}
