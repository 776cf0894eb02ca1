//! Decoding PostgreSQL's COPY text format (rows streamed from the server).

/// Splits one COPY text line (without its `\n`) into fields, unescaping each into
/// `out[i]` (`None` for `\N`). Returns the number of fields, or `None` when the line
/// has more fields than `out` or an escape is malformed.
pub(crate) fn decode_line(line: &[u8], out: &mut [Option<String>]) -> Option<usize> {
    let mut field = 0usize;
    let mut start = 0usize;
    let mut i = 0usize;
    loop {
        if i == line.len() || line[i] == b'\t' {
            let slot = out.get_mut(field)?;
            decode_field(&line[start..i], slot)?;
            field += 1;
            if i == line.len() {
                return Some(field);
            }
            start = i + 1;
        }
        i += 1;
    }
}

fn decode_field(raw: &[u8], slot: &mut Option<String>) -> Option<()> {
    if raw == b"\\N" {
        *slot = None;
        return Some(());
    }
    let s = slot.get_or_insert_with(String::new);
    s.clear();
    if !raw.contains(&b'\\') {
        s.push_str(std::str::from_utf8(raw).ok()?);
        return Some(());
    }
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' {
            bytes.push(b);
            i += 1;
            continue;
        }
        let e = *raw.get(i + 1)?;
        i += 2;
        match e {
            b'b' => bytes.push(8),
            b'f' => bytes.push(12),
            b'n' => bytes.push(b'\n'),
            b'r' => bytes.push(b'\r'),
            b't' => bytes.push(b'\t'),
            b'v' => bytes.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                let mut n = 1;
                while n < 3 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                    v = v * 8 + u32::from(raw[i] - b'0');
                    i += 1;
                    n += 1;
                }
                bytes.push(u8::try_from(v & 0xff).ok()?);
            }
            b'x' => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                    v = v * 16 + char::from(raw[i]).to_digit(16)?;
                    i += 1;
                    n += 1;
                }
                if n == 0 {
                    return None;
                }
                bytes.push(u8::try_from(v).ok()?);
            }
            other => bytes.push(other),
        }
    }
    s.push_str(std::str::from_utf8(&bytes).ok()?);
    Some(())
}

/// Decodes a `bytea` in hex output form (`\x0a1b…`) into bytes.
pub(crate) fn decode_bytea_hex(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let b = hex.as_bytes();
    (0..b.len())
        .step_by(2)
        .map(|i| {
            let hi = char::from(b[i]).to_digit(16)?;
            let lo = char::from(b[i + 1]).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_nulls_and_escapes_decode() {
        let mut out = vec![None; 4];
        let n = decode_line(b"42\t\\N\ta\\tb\\\\c\\nd\t\\\\x0aff", &mut out).unwrap();
        assert_eq!(n, 4);
        assert_eq!(out[0].as_deref(), Some("42"));
        assert_eq!(out[1], None);
        assert_eq!(out[2].as_deref(), Some("a\tb\\c\nd"));
        assert_eq!(out[3].as_deref(), Some("\\x0aff"));
        assert_eq!(
            decode_bytea_hex(out[3].as_deref().unwrap()),
            Some(vec![0x0a, 0xff])
        );
    }

    #[test]
    fn malformed_lines_are_refused() {
        let mut out = vec![None; 1];
        assert_eq!(decode_line(b"a\tb", &mut out), None);
        assert_eq!(decode_line(b"a\\", &mut out), None);
        assert_eq!(decode_bytea_hex("\\x0"), None);
        assert_eq!(decode_bytea_hex("zz"), None);
        let mut out = vec![None; 1];
        assert_eq!(decode_line(b"\\101\\x42", &mut out), Some(1));
        assert_eq!(out[0].as_deref(), Some("AB"));
    }
}
