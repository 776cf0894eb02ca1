//! The stored formats: blocks, the index and the manifest (see `docs/formats.md`).
//! Blocks and their encodings live in `format/block.rs`, the index, its groups and
//! key filters in `format/index.rs`; the envelope and the manifest here.
//!
//! Every object starts with a 4-byte magic and a version; integers are little-endian.
//! Structured bodies are postcard (a stable, documented encoding) and are sealed with
//! a blake3 hash of everything before it.

use std::collections::BTreeMap;

use sanare_core::{Error, Result};
use serde::{Deserialize, Serialize};

mod block;
mod index;

pub use block::*;
pub(crate) use index::bloom;
pub use index::*;

/// Magic of a manifest object.
pub const MANIFEST_MAGIC: [u8; 4] = *b"SNMF";
/// The version of the manifest format written by this crate (and of the index
/// format before grouped indexes).
pub const ENVELOPE_VERSION: u16 = 1;

/// Seals `body` (postcard) in an envelope: magic, version, body length, body, blake3.
pub(crate) fn seal<T: Serialize>(magic: [u8; 4], body: &T) -> Result<Vec<u8>> {
    seal_version(magic, ENVELOPE_VERSION, body)
}

pub(crate) fn seal_version<T: Serialize>(
    magic: [u8; 4],
    version: u16,
    body: &T,
) -> Result<Vec<u8>> {
    let body = postcard::to_stdvec(body)
        .map_err(|e| Error::other("encoding a snapshot index or manifest", e))?;
    let len = u32::try_from(body.len())
        .map_err(|_| Error::invalid_input("an index or manifest larger than 4 GiB"))?;
    let mut out = Vec::with_capacity(body.len() + 42);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    Ok(out)
}

/// Opens an envelope written by [`seal`], checking magic, version, length and hash.
pub(crate) fn open<T: for<'de> Deserialize<'de>>(
    magic: [u8; 4],
    what: &str,
    bytes: &[u8],
) -> Result<T> {
    open_versions(magic, what, bytes, &[ENVELOPE_VERSION]).map(|(_, t)| t)
}

/// [`open`] for a body whose layout depends on the version: checks the envelope
/// and returns the version with the body bytes.
pub(crate) fn open_raw<'a>(
    magic: [u8; 4],
    what: &str,
    bytes: &'a [u8],
    versions: &[u16],
) -> Result<(u16, &'a [u8])> {
    if bytes.len() < 42 {
        return Err(Error::corrupt(what.to_owned(), "truncated"));
    }
    if bytes[..4] != magic {
        return Err(Error::corrupt(what.to_owned(), "bad magic"));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if !versions.contains(&version) {
        return Err(Error::corrupt(
            what.to_owned(),
            format!("unsupported version {version}"),
        ));
    }
    let len = u32::from_le_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
    if bytes.len() != 10 + len + 32 {
        return Err(Error::corrupt(
            what.to_owned(),
            "length does not match (truncated or extended)",
        ));
    }
    let hash = blake3::hash(&bytes[..10 + len]);
    if hash.as_bytes()[..] != bytes[10 + len..] {
        return Err(Error::corrupt(
            what.to_owned(),
            "hash does not match its content",
        ));
    }
    Ok((version, &bytes[10..10 + len]))
}

pub(crate) fn open_versions<T: for<'de> Deserialize<'de>>(
    magic: [u8; 4],
    what: &str,
    bytes: &[u8],
    versions: &[u16],
) -> Result<(u16, T)> {
    let (version, body) = open_raw(magic, what, bytes, versions)?;
    let body = postcard::from_bytes(body)
        .map_err(|e| Error::corrupt(what.to_owned(), format!("body does not decode: {e}")))?;
    Ok((version, body))
}

/// The content-defined chunking parameters a repository was written with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    /// Smallest block in bytes (except the last of a stream).
    pub min_size: u32,
    /// Average block size FastCDC aims for.
    pub avg_size: u32,
    /// Largest block FastCDC cuts (a table block is extended to the end of the row
    /// the cut falls in).
    pub max_size: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        Self {
            min_size: 4 * 1024,
            avg_size: 16 * 1024,
            max_size: 64 * 1024,
        }
    }
}

/// The journal cut, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCut {
    /// The position.
    pub position: u64,
    /// `pg_current_snapshot()` text.
    pub db_snapshot: Option<String>,
}

/// The manifest object of a snapshot (`manifests/<id>`), written last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The snapshot id (UUID bytes).
    pub id: [u8; 16],
    /// When its consistent view was taken, Unix microseconds.
    pub created_at_us: i64,
    /// The label.
    pub label: Option<String>,
    /// The snapshot it was deduplicated against (its base), if any.
    pub base: Option<[u8; 16]>,
    /// The journal cut.
    pub journal_cut: Option<StoredCut>,
    /// Chunking parameters.
    pub chunking: ChunkParams,
    /// Codec asked for (a block may fall back to none).
    pub codec: Codec,
    /// Per table: schema, name, rows.
    pub tables: Vec<(String, String, u64)>,
    /// Uncompressed bytes.
    pub size_bytes: u64,
    /// Compressed bytes of all referenced blocks.
    pub compressed_bytes: u64,
    /// Bytes newly written for this snapshot.
    pub stored_bytes: u64,
    /// Blocks referenced.
    pub block_count: u64,
    /// blake3 of the index object.
    pub index_hash: [u8; 32],
    /// Host metadata.
    pub metadata: BTreeMap<String, String>,
}

impl Manifest {
    /// Encodes the manifest.
    pub fn encode(&self) -> Result<Vec<u8>> {
        seal(MANIFEST_MAGIC, self)
    }

    /// Decodes and checks a manifest object.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        open(MANIFEST_MAGIC, "snapshot manifest", bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn sample_manifest() -> Manifest {
        Manifest {
            id: [1; 16],
            created_at_us: 1_700_000_000_000_000,
            label: Some("nightly".into()),
            base: None,
            journal_cut: Some(StoredCut {
                position: 42,
                db_snapshot: Some("100:100:".into()),
            }),
            chunking: ChunkParams::default(),
            codec: Codec::Lz4,
            tables: vec![("public".into(), "t".into(), 3)],
            size_bytes: 300,
            compressed_bytes: 200,
            stored_bytes: 200,
            block_count: 1,
            index_hash: [2; 32],
            metadata: BTreeMap::from([("k".into(), "v".into())]),
        }
    }

    #[test]
    fn manifest_golden_vector() {
        let bytes = sample_manifest().encode().unwrap();
        let body = concat!(
            "010101010101010101010101010101018080f2818389850601076e696768746c7900012a0108",
            "3130303a3130303a80208080018080040101067075626c6963017403ac02c801c801010202",
            "02020202020202020202020202020202020202020202020202020202020201016b0176",
        );
        assert_eq!(hex(&bytes[..4]), "534e4d46");
        assert_eq!(hex(&bytes[4..6]), "0100");
        assert_eq!(hex(&bytes[10..bytes.len() - 32]), body);
        assert_eq!(Manifest::decode(&bytes).unwrap(), sample_manifest());
    }

    #[test]
    fn damaged_envelopes_are_refused() {
        let bytes = sample_manifest().encode().unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(Manifest::decode(&bad).is_err(), "flip at {i} not caught");
        }
        assert!(Manifest::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Index::decode(&bytes).is_err(), "wrong magic");
    }
}
