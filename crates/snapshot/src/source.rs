//! Host byte streams captured next to the tables: state that lives outside the
//! database (an on-disk cache, a model file, a queue's spool).

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use sanare_core::Result;
use tokio::io::AsyncRead;

use crate::format::ChunkParams;

/// A byte stream the host wants in every snapshot, restored with
/// [`crate::Snapshots::restore_source`].
///
/// Its bytes are cut at content-defined points (FastCDC, the repository's chunking
/// parameters) into blocks deduplicated with every other block, so an unchanged or
/// slightly changed stream costs little in the next snapshot.
///
/// # Contract
/// - [`name`](StateSource::name) is stable across snapshots and unique among the
///   sources of one service (ASCII letters, digits, `-_.`, at most 200 bytes).
/// - [`open`](StateSource::open) returns a fresh reader at the start of the state,
///   each time it is called. The reader should present a consistent view (e.g. a
///   copy or a file that is not written meanwhile); sanare reads it once, to its end.
#[async_trait]
pub trait StateSource: Send + Sync + fmt::Debug {
    /// The stream's stable name.
    fn name(&self) -> &str;

    /// Free-form metadata recorded with the stream in the snapshot (e.g. a format
    /// version of the host's state).
    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    /// A reader of the whole state.
    async fn open(&self) -> Result<Box<dyn AsyncRead + Send + Unpin>>;
}

/// A stream captured in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceInfo {
    /// The source's name.
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
    /// The blocks it was cut into.
    pub blocks: u64,
    /// The metadata the source gave.
    pub metadata: BTreeMap<String, String>,
}

pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(sanare_core::Error::invalid_input(format!(
            "`{name}` is not a valid state source name (ASCII letters, digits, `-_.`, 1 to 200 bytes)"
        )))
    }
}

/// Cuts a byte stream into content-defined blocks with bounded memory: FastCDC runs
/// over a window of at least `max_size` bytes and every cut but the last is final.
pub(crate) struct ByteChunker {
    params: ChunkParams,
    buf: Vec<u8>,
}

impl ByteChunker {
    pub(crate) fn new(params: ChunkParams) -> Self {
        Self {
            params,
            buf: Vec::new(),
        }
    }

    /// Adds bytes; returns the blocks whose ends are now certain.
    pub(crate) fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        // A cut is final once max_size bytes follow its start.
        while self.buf.len() >= 2 * self.params.max_size as usize {
            let len = self.first_cut();
            let rest = self.buf.split_off(len);
            out.push(std::mem::replace(&mut self.buf, rest));
        }
        out
    }

    /// The remaining blocks.
    pub(crate) fn finish(mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !self.buf.is_empty() {
            let len = self.first_cut();
            let rest = self.buf.split_off(len);
            out.push(std::mem::replace(&mut self.buf, rest));
        }
        out
    }

    fn first_cut(&self) -> usize {
        let p = self.params;
        fastcdc::v2020::FastCDC::new(
            &self.buf,
            p.min_size as usize,
            p.avg_size as usize,
            p.max_size as usize,
        )
        .next()
        .map_or(self.buf.len(), |c| c.length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (x >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn cuts_do_not_depend_on_how_the_bytes_arrive() {
        let bytes = data(1_000_000, 1);
        let whole = {
            let mut c = ByteChunker::new(ChunkParams::default());
            let mut v = c.push(&bytes);
            v.extend(c.finish());
            v
        };
        for step in [1000, 4096, 65_537, 333_333] {
            let mut c = ByteChunker::new(ChunkParams::default());
            let mut v = Vec::new();
            for part in bytes.chunks(step) {
                v.extend(c.push(part));
            }
            v.extend(c.finish());
            assert_eq!(v, whole, "step {step}");
        }
        assert_eq!(whole.concat(), bytes);
        let p = ChunkParams::default();
        assert!(whole.iter().all(|b| b.len() <= p.max_size as usize));
        assert!(whole.len() > 30, "{} blocks", whole.len());
    }

    #[test]
    fn an_insert_changes_only_nearby_blocks() {
        let bytes = data(1_000_000, 2);
        let mut edited = bytes.clone();
        edited.splice(500_000..500_000, b"inserted".iter().copied());
        let cut = |b: &[u8]| {
            let mut c = ByteChunker::new(ChunkParams::default());
            let mut v = c.push(b);
            v.extend(c.finish());
            v
        };
        let a: std::collections::HashSet<Vec<u8>> = cut(&bytes).into_iter().collect();
        let b = cut(&edited);
        let new = b.iter().filter(|x| !a.contains(*x)).count();
        assert!(new <= 2, "{new} of {} blocks changed", b.len());
        assert!(check_name("cache.db").is_ok());
        assert!(check_name("../x").is_err());
        assert!(check_name("").is_err());
    }
}
