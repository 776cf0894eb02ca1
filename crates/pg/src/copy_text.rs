//! Decoding PostgreSQL's text `COPY … TO STDOUT` stream on the client.
//!
//! Rows end in `\n`, fields are separated by tabs, `\N` is NULL, and backslash
//! escapes (`\\`, `\t`, `\n`, `\r`, `\b`, `\f`, `\v`, octal `\ooo`, hex `\xhh`)
//! are decoded. The stream may arrive cut anywhere (tokio-postgres yields one
//! `CopyData` message at a time, but nothing here relies on that).
//!
//! Used where rows are verified on the client (integrity checksums, corruption
//! scans), so it is built for throughput: `memchr` finds row, field and escape
//! boundaries, fields without a backslash are passed through without copying, and
//! the buffers are reused from row to row.

use sanare_core::{Error, Result};

/// One field of the current row: where its bytes are.
#[derive(Clone, Copy, Debug)]
enum Span {
    Null,
    /// A range of the line itself (no escape in it).
    Line(usize, usize),
    /// A range of the decode buffer (the field had escapes).
    Decoded(usize, usize),
}

/// Splits a text COPY stream into rows of decoded fields: feed it the stream's
/// chunks with [`feed`](Self::feed), then call [`finish`](Self::finish).
///
/// ```
/// # use sanare_pg::copy_text::TextCopyRows;
/// let mut rows = TextCopyRows::default();
/// let mut seen = Vec::new();
/// for chunk in [&b"1\t\\N\ta\\tb\n2"[..], &b"\t\t\\\\x0a\n"[..]] {
///     rows.feed(chunk, &mut |fields| {
///         seen.push(fields.iter().map(|f| f.map(<[u8]>::to_vec)).collect::<Vec<_>>());
///         Ok(())
///     })?;
/// }
/// rows.finish()?;
/// assert_eq!(seen[0], vec![Some(b"1".to_vec()), None, Some(b"a\tb".to_vec())]);
/// assert_eq!(seen[1], vec![Some(b"2".to_vec()), Some(Vec::new()), Some(b"\\x0a".to_vec())]);
/// # Ok::<(), sanare_core::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct TextCopyRows {
    /// The start of a row cut by a chunk boundary.
    pending: Vec<u8>,
    spans: Vec<Span>,
    decoded: Vec<u8>,
}

impl TextCopyRows {
    /// Decodes every complete row in `data` (after what an earlier chunk left
    /// pending) and calls `on_row` with its fields (`None` for NULL).
    ///
    /// # Errors
    /// A malformed row (an escape cut off at the end of a field) is
    /// [`Error::Corrupt`]; an error of `on_row` is passed on.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        on_row: &mut impl FnMut(&[Option<&[u8]>]) -> Result<()>,
    ) -> Result<()> {
        if !self.pending.is_empty() {
            let Some(p) = memchr::memchr(b'\n', data) else {
                self.pending.extend_from_slice(data);
                return Ok(());
            };
            let mut line = std::mem::take(&mut self.pending);
            line.extend_from_slice(&data[..p]);
            let r = self.row(&line, on_row);
            line.clear();
            self.pending = line;
            r?;
            data = &data[p + 1..];
        }
        let mut start = 0;
        for p in memchr::memchr_iter(b'\n', data) {
            self.row(&data[start..p], on_row)?;
            start = p + 1;
        }
        self.pending.extend_from_slice(&data[start..]);
        Ok(())
    }

    /// Checks that the stream ended at a row boundary.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when the stream stopped in the middle of a row.
    pub fn finish(&self) -> Result<()> {
        if self.pending.is_empty() {
            Ok(())
        } else {
            Err(Error::corrupt(
                "text COPY stream",
                "ended in the middle of a row (torn stream)",
            ))
        }
    }

    fn row(
        &mut self,
        line: &[u8],
        on_row: &mut impl FnMut(&[Option<&[u8]>]) -> Result<()>,
    ) -> Result<()> {
        self.spans.clear();
        self.decoded.clear();
        let mut start = 0;
        loop {
            let end = memchr::memchr(b'\t', &line[start..]).map_or(line.len(), |p| start + p);
            let raw = &line[start..end];
            let span = if raw == b"\\N" {
                Span::Null
            } else if memchr::memchr(b'\\', raw).is_none() {
                Span::Line(start, end)
            } else {
                let from = self.decoded.len();
                unescape(raw, &mut self.decoded)?;
                Span::Decoded(from, self.decoded.len())
            };
            self.spans.push(span);
            if end == line.len() {
                break;
            }
            start = end + 1;
        }
        let fields: Vec<Option<&[u8]>> = self
            .spans
            .iter()
            .map(|s| match *s {
                Span::Null => None,
                Span::Line(a, b) => Some(&line[a..b]),
                Span::Decoded(a, b) => Some(&self.decoded[a..b]),
            })
            .collect();
        on_row(&fields)
    }
}

/// Appends the decoded form of the escaped field `f` to `out`.
fn unescape(mut f: &[u8], out: &mut Vec<u8>) -> Result<()> {
    while let Some(p) = memchr::memchr(b'\\', f) {
        out.extend_from_slice(&f[..p]);
        let Some(&e) = f.get(p + 1) else {
            return Err(Error::corrupt(
                "text COPY stream",
                "a field ends in the middle of a backslash escape",
            ));
        };
        let mut i = p + 2;
        match e {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                let mut n = 1;
                while n < 3 && i < f.len() && (b'0'..=b'7').contains(&f[i]) {
                    v = v * 8 + u32::from(f[i] - b'0');
                    i += 1;
                    n += 1;
                }
                out.push((v & 0xff) as u8);
            }
            b'x' if f.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u8;
                let mut n = 0;
                while n < 2 && i < f.len() {
                    let Some(d) = hex_digit(f[i]) else { break };
                    v = (v << 4) | d;
                    i += 1;
                    n += 1;
                }
                out.push(v);
            }
            other => out.push(other),
        }
        f = &f[i..];
    }
    out.extend_from_slice(f);
    Ok(())
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A `bytea` in hex output form (`\x0a1b…`) → its bytes; `None` if malformed.
pub fn decode_bytea_hex(text: &[u8]) -> Option<Vec<u8>> {
    let hex = bytea_hex_digits(text)?;
    let mut out = Vec::with_capacity(hex.len() / 2);
    for p in hex.chunks_exact(2) {
        out.push((hex_digit(p[0])? << 4) | hex_digit(p[1])?);
    }
    Some(out)
}

/// Whether a `bytea` in hex output form holds exactly `bytes`, without decoding it
/// into a buffer (a checksum column is compared once per row scanned).
pub fn bytea_hex_eq(text: &[u8], bytes: &[u8]) -> bool {
    let Some(hex) = bytea_hex_digits(text) else {
        return false;
    };
    if hex.len() != bytes.len() * 2 {
        return false;
    }
    // PostgreSQL prints lowercase digits: compare with the expected lowercase text
    // (predictable branches; decoding random digits mispredicts twice per byte),
    // and decode only when that differs (uppercase input, or a real mismatch).
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let lowercase = hex
        .chunks_exact(2)
        .zip(bytes)
        .all(|(p, &b)| p[0] == DIGITS[usize::from(b >> 4)] && p[1] == DIGITS[usize::from(b & 15)]);
    lowercase
        || hex.chunks_exact(2).zip(bytes).all(|(p, &b)| {
            matches!((hex_digit(p[0]), hex_digit(p[1])), (Some(h), Some(l)) if (h << 4) | l == b)
        })
}

fn bytea_hex_digits(text: &[u8]) -> Option<&[u8]> {
    let hex = text.strip_prefix(b"\\x")?;
    (hex.len() % 2 == 0).then_some(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Row = Vec<Option<Vec<u8>>>;

    fn decode(chunks: &[&[u8]]) -> Result<Vec<Row>> {
        let mut rows = TextCopyRows::default();
        let mut seen = Vec::new();
        for c in chunks {
            rows.feed(c, &mut |fields| {
                seen.push(fields.iter().map(|f| f.map(<[u8]>::to_vec)).collect());
                Ok(())
            })?;
        }
        rows.finish()?;
        Ok(seen)
    }

    #[test]
    fn escapes_nulls_and_empty_fields_decode_whatever_the_chunking() {
        let data: &[u8] = b"1\t\\N\ta\\tb\\\\c\\101\\x41\\q\n22\t\t\\\\x0aff\n";
        let whole = decode(&[data]).unwrap();
        assert_eq!(
            whole,
            vec![
                vec![Some(b"1".to_vec()), None, Some(b"a\tb\\cAAq".to_vec()),],
                vec![
                    Some(b"22".to_vec()),
                    Some(Vec::new()),
                    Some(b"\\x0aff".to_vec())
                ],
            ]
        );
        for split in 0..data.len() {
            let (a, b) = data.split_at(split);
            assert_eq!(decode(&[a, b]).unwrap(), whole, "split at {split}");
        }
        assert_eq!(
            decode_bytea_hex(whole[1][2].as_deref().unwrap()),
            Some(vec![0x0a, 0xff])
        );
    }

    #[test]
    fn a_torn_stream_and_a_cut_escape_are_errors() {
        assert!(matches!(
            decode(&[b"1\t2\n3\t"]),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(decode(&[b"a\\\n"]), Err(Error::Corrupt { .. })));
        assert_eq!(decode_bytea_hex(b"\\x0"), None);
        assert_eq!(decode_bytea_hex(b"\\xzz"), None);
        assert_eq!(decode_bytea_hex(b"0a"), None);
    }

    #[test]
    fn bytea_hex_compares_without_decoding() {
        assert!(bytea_hex_eq(b"\\x0aFf", &[0x0a, 0xff]));
        assert!(bytea_hex_eq(b"\\x", &[]));
        assert!(!bytea_hex_eq(b"\\x0aff", &[0x0a, 0xfe]));
        assert!(!bytea_hex_eq(b"\\x0aff", &[0x0a]));
        assert!(!bytea_hex_eq(b"\\x0a", &[0x0a, 0xff]));
        assert!(!bytea_hex_eq(b"\\x0g", &[0x00]));
        assert!(!bytea_hex_eq(b"0aff", &[0x0a, 0xff]));
        assert!(!bytea_hex_eq(b"\\x0af", &[0x0a]));
    }
}
