//! The crash spool: a local append-only file of crash records written from crash
//! paths (panic hook, fatal-signal handler, failing allocator) and read at the next
//! start. The layout is specified in `docs/formats.md` ("Crash spool").
//!
//! Encoding never allocates (the encoder formats into a caller's buffer), so the
//! signal handler and the allocator can use it; decoding is tolerant: a torn or
//! garbage record is reported as a [`SpoolProblem`] and skipped, never fatal.

use serde::{Deserialize, Serialize};

/// The spool file's magic.
pub const SPOOL_MAGIC: [u8; 8] = *b"SNRSPOOL";
/// The spool format version this crate writes and reads.
pub const SPOOL_VERSION: u16 = 1;
/// The length of the file header.
pub const HEADER_LEN: usize = 16;
/// The magic that opens every record.
pub const RECORD_MAGIC: [u8; 4] = *b"SREC";
/// Record framing: magic, body length, body crc32c.
pub const FRAME_LEN: usize = 12;
/// The fixed part of a record body, before its four strings.
pub const FIXED_BODY_LEN: usize = 40;
/// The largest body a reader accepts (anything larger is garbage).
pub const MAX_BODY_LEN: usize = 1 << 20;

/// The flag bit set when a SIGSEGV/SIGBUS hit next to the stack pointer.
pub const FLAG_STACK_OVERFLOW: u8 = 1;

/// What wrote a spool record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RecordSource {
    /// The panic hook (any thread; the process may live on if the panic is caught).
    Panic,
    /// The fatal-signal handler.
    Signal,
    /// The wrapping global allocator saw an allocation fail.
    AllocFailure,
    /// A supervised tokio task ended in a panic; the process lived on.
    TaskPanic,
}

impl RecordSource {
    /// The stable snake_case name, as stored.
    pub const fn as_str(self) -> &'static str {
        match self {
            RecordSource::Panic => "panic",
            RecordSource::Signal => "signal",
            RecordSource::AllocFailure => "alloc_failure",
            RecordSource::TaskPanic => "task_panic",
        }
    }

    /// The source named `name` (as [`as_str`](Self::as_str) writes it).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "panic" => RecordSource::Panic,
            "signal" => RecordSource::Signal,
            "alloc_failure" => RecordSource::AllocFailure,
            "task_panic" => RecordSource::TaskPanic,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            RecordSource::Panic => 1,
            RecordSource::Signal => 2,
            RecordSource::AllocFailure => 3,
            RecordSource::TaskPanic => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => RecordSource::Panic,
            2 => RecordSource::Signal,
            3 => RecordSource::AllocFailure,
            4 => RecordSource::TaskPanic,
            _ => return None,
        })
    }
}

/// A record to encode, borrowing its strings (no allocation).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawRecord<'a> {
    pub(crate) source: RecordSource,
    pub(crate) flags: u8,
    pub(crate) signal: i32,
    pub(crate) fault_address: u64,
    pub(crate) unix_ms: i64,
    pub(crate) pid: u32,
    pub(crate) tid: u32,
    pub(crate) alloc_size: u64,
    pub(crate) message: &'a [u8],
    pub(crate) location: &'a [u8],
    pub(crate) thread: &'a [u8],
    pub(crate) backtrace: &'a [u8],
}

/// One decoded spool record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SpoolRecord {
    /// What wrote it.
    pub source: RecordSource,
    /// Whether the fault address was next to the stack pointer (stack overflow).
    pub stack_overflow: bool,
    /// The signal number (0 when none).
    pub signal: i32,
    /// The fault address of a SIGSEGV/SIGBUS (0 when none).
    pub fault_address: u64,
    /// When it was written, in milliseconds since the Unix epoch.
    pub unix_ms: i64,
    /// The process id.
    pub pid: u32,
    /// The kernel thread id.
    pub tid: u32,
    /// The allocation size that failed (0 when none).
    pub alloc_size: u64,
    /// The panic message, or the component of a task panic.
    pub message: String,
    /// `file:line:column` of a panic.
    pub location: String,
    /// The thread name (or the component, for a task panic).
    pub thread: String,
    /// The captured backtrace, if any.
    pub backtrace: String,
}

/// A spool region that could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolProblem {
    /// Byte offset in the spool file.
    pub offset: u64,
    /// What was wrong.
    pub detail: String,
}

/// The spool file header.
pub fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&SPOOL_MAGIC);
    h[8..10].copy_from_slice(&SPOOL_VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    h
}

/// Encodes `rec` into `buf`, truncating strings (backtrace first) so that it fits;
/// returns the bytes written, or 0 when `buf` cannot hold even the fixed part.
/// Never allocates: safe in a signal handler.
pub(crate) fn encode_into(buf: &mut [u8], rec: &RawRecord<'_>) -> usize {
    let fixed = FRAME_LEN + FIXED_BODY_LEN + 16;
    if buf.len() < fixed {
        return 0;
    }
    let mut room = buf.len() - fixed;
    let mut take = |s: &[u8]| -> usize {
        let n = s.len().min(room).min(u32::MAX as usize);
        room -= n;
        n
    };
    let lens = [
        take(rec.message),
        take(rec.location),
        take(rec.thread),
        take(rec.backtrace),
    ];
    let body_len = FIXED_BODY_LEN + 16 + lens.iter().sum::<usize>();
    let body = &mut buf[FRAME_LEN..FRAME_LEN + body_len];
    body[0] = rec.source.code();
    body[1] = rec.flags;
    body[2] = 0;
    body[3] = 0;
    body[4..8].copy_from_slice(&rec.signal.to_le_bytes());
    body[8..16].copy_from_slice(&rec.fault_address.to_le_bytes());
    body[16..24].copy_from_slice(&rec.unix_ms.to_le_bytes());
    body[24..28].copy_from_slice(&rec.pid.to_le_bytes());
    body[28..32].copy_from_slice(&rec.tid.to_le_bytes());
    body[32..40].copy_from_slice(&rec.alloc_size.to_le_bytes());
    let mut at = FIXED_BODY_LEN;
    for (s, n) in [rec.message, rec.location, rec.thread, rec.backtrace]
        .iter()
        .zip(lens)
    {
        body[at..at + 4].copy_from_slice(&(n as u32).to_le_bytes());
        at += 4;
        body[at..at + n].copy_from_slice(&s[..n]);
        at += n;
    }
    let crc = crc32c::crc32c(body);
    buf[..4].copy_from_slice(&RECORD_MAGIC);
    buf[4..8].copy_from_slice(&(body_len as u32).to_le_bytes());
    buf[8..12].copy_from_slice(&crc.to_le_bytes());
    FRAME_LEN + body_len
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn decode_body(body: &[u8]) -> Result<SpoolRecord, String> {
    if body.len() < FIXED_BODY_LEN + 16 {
        return Err(format!(
            "body of {} bytes is shorter than its fixed part",
            body.len()
        ));
    }
    let source = RecordSource::from_code(body[0])
        .ok_or_else(|| format!("unknown record source {}", body[0]))?;
    let mut at = FIXED_BODY_LEN;
    let mut strings: [String; 4] = Default::default();
    for s in &mut strings {
        if at + 4 > body.len() {
            return Err("string length runs past the body".into());
        }
        let n = u32_at(body, at) as usize;
        at += 4;
        if at + n > body.len() {
            return Err("string runs past the body".into());
        }
        *s = String::from_utf8_lossy(&body[at..at + n]).into_owned();
        at += n;
    }
    if at != body.len() {
        return Err(format!(
            "{} trailing bytes after the strings",
            body.len() - at
        ));
    }
    let [message, location, thread, backtrace] = strings;
    Ok(SpoolRecord {
        source,
        stack_overflow: body[1] & FLAG_STACK_OVERFLOW != 0,
        signal: u32_at(body, 4) as i32,
        fault_address: u64_at(body, 8),
        unix_ms: u64_at(body, 16) as i64,
        pid: u32_at(body, 24),
        tid: u32_at(body, 28),
        alloc_size: u64_at(body, 32),
        message,
        location,
        thread,
        backtrace,
    })
}

/// Decodes a whole spool file. Torn or garbage regions are skipped (the reader
/// resynchronises on the next record magic) and reported; a bad header reports one
/// problem and still scans for records.
pub fn decode(bytes: &[u8]) -> (Vec<SpoolRecord>, Vec<SpoolProblem>) {
    let mut records = Vec::new();
    let mut problems = Vec::new();
    if bytes.is_empty() {
        return (records, problems);
    }
    let mut at = if bytes.len() >= HEADER_LEN && bytes[..8] == SPOOL_MAGIC {
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != SPOOL_VERSION {
            problems.push(SpoolProblem {
                offset: 0,
                detail: format!(
                    "spool version {version} is not supported (this build reads {SPOOL_VERSION})"
                ),
            });
            return (records, problems);
        }
        usize::from(u16::from_le_bytes([bytes[10], bytes[11]])).max(HEADER_LEN)
    } else {
        problems.push(SpoolProblem {
            offset: 0,
            detail: "missing or damaged spool header".into(),
        });
        0
    };
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < FRAME_LEN || rest[..4] != RECORD_MAGIC {
            let skip = find_magic(&rest[1.min(rest.len())..]).map(|i| i + 1);
            problems.push(SpoolProblem {
                offset: at as u64,
                detail: match skip {
                    Some(n) => format!("{n} bytes of garbage before the next record"),
                    None => format!("{} trailing bytes are not a record", rest.len()),
                },
            });
            match skip {
                Some(n) => {
                    at += n;
                    continue;
                }
                None => break,
            }
        }
        let len = u32_at(rest, 4) as usize;
        let crc = u32_at(rest, 8);
        if len > MAX_BODY_LEN || FRAME_LEN + len > rest.len() {
            problems.push(SpoolProblem {
                offset: at as u64,
                detail: format!(
                    "torn record: body of {len} bytes but {} bytes remain",
                    rest.len() - FRAME_LEN
                ),
            });
            at += 1 + find_magic(&rest[1..]).unwrap_or(rest.len() - 1);
            continue;
        }
        let body = &rest[FRAME_LEN..FRAME_LEN + len];
        if crc32c::crc32c(body) != crc {
            problems.push(SpoolProblem {
                offset: at as u64,
                detail: "record checksum mismatch".into(),
            });
            at += 1 + find_magic(&rest[1..]).unwrap_or(rest.len() - 1);
            continue;
        }
        match decode_body(body) {
            Ok(r) => records.push(r),
            Err(detail) => problems.push(SpoolProblem {
                offset: at as u64,
                detail,
            }),
        }
        at += FRAME_LEN + len;
    }
    (records, problems)
}

fn find_magic(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == RECORD_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RawRecord<'static> {
        RawRecord {
            source: RecordSource::Panic,
            flags: 0,
            signal: 0,
            fault_address: 0,
            unix_ms: 1_700_000_000_000,
            pid: 42,
            tid: 43,
            alloc_size: 0,
            message: b"boom",
            location: b"src/main.rs:1:2",
            thread: b"main",
            backtrace: b"",
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn golden_header_and_record() {
        assert_eq!(hex(&header()), "534e5253504f4f4c0100100000000000");
        let mut buf = [0u8; 256];
        let n = encode_into(&mut buf, &sample());
        // Golden vector, also printed in docs/formats.md.
        assert_eq!(
            hex(&buf[..n]),
            "535245434f000000\
             cae3015a\
             0100000000000000\
             0000000000000000\
             0068e5cf8b010000\
             2a0000002b000000\
             0000000000000000\
             04000000626f6f6d\
             0f0000007372632f6d61696e2e72733a313a32\
             040000006d61696e\
             00000000"
                .replace(' ', "")
        );
        let mut file = header().to_vec();
        file.extend_from_slice(&buf[..n]);
        let (records, problems) = decode(&file);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].message, "boom");
        assert_eq!(records[0].location, "src/main.rs:1:2");
        assert_eq!(records[0].pid, 42);
        assert_eq!(records[0].unix_ms, 1_700_000_000_000);
    }

    #[test]
    fn a_small_buffer_truncates_the_backtrace_not_the_frame() {
        let mut rec = sample();
        let bt = vec![b'x'; 10_000];
        rec.backtrace = &bt;
        let mut buf = [0u8; 200];
        let n = encode_into(&mut buf, &rec);
        assert_eq!(n, 200);
        let mut file = header().to_vec();
        file.extend_from_slice(&buf[..n]);
        let (records, problems) = decode(&file);
        assert!(problems.is_empty());
        assert_eq!(records[0].message, "boom");
        assert!(records[0].backtrace.len() < 200);
        assert_eq!(encode_into(&mut [0u8; 10], &rec), 0);
    }

    #[test]
    fn torn_and_garbage_records_are_reported_not_fatal() {
        let mut one = [0u8; 256];
        let n = encode_into(&mut one, &sample());
        let mut file = header().to_vec();
        file.extend_from_slice(&one[..n]);
        file.extend_from_slice(b"garbage garbage");
        file.extend_from_slice(&one[..n]);
        // a record with a flipped byte
        let mut bad = one[..n].to_vec();
        bad[20] ^= 0xff;
        file.extend_from_slice(&bad);
        file.extend_from_slice(&one[..n]);
        // torn tail
        file.extend_from_slice(&one[..n / 2]);
        let (records, problems) = decode(&file);
        assert_eq!(records.len(), 3, "{problems:?}");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].detail.contains("garbage"));
        assert!(problems[1].detail.contains("checksum"));
        assert!(problems[2].detail.contains("torn"));

        let (records, problems) = decode(b"not a spool at all");
        assert!(records.is_empty());
        assert_eq!(problems.len(), 2);

        let mut future = header();
        future[8] = 9;
        let (_, problems) = decode(&future);
        assert!(problems[0].detail.contains("version 9"));
    }
}
