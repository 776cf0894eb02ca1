//! The stored formats: blocks, the index and the manifest (see `docs/formats.md`).
//! Blocks and their encodings live in `format/block.rs`, the index, its groups and
//! key filters in `format/index.rs`; the envelope here, the manifest in `manifest.rs`.
//!
//! Every object starts with a 4-byte magic and a version; integers are little-endian.
//! Structured bodies are postcard (a stable, documented encoding) and are sealed with
//! a blake3 hash of everything before it.

use sanare_core::{Error, Result};
use serde::{Deserialize, Serialize};

mod block;
mod index;

pub use block::*;
pub(crate) use index::bloom;
pub use index::*;

pub use crate::manifest::{MANIFEST_MAGIC, MANIFEST_VERSION, Manifest, ManifestAuth, StoredCut};

/// The version of the envelope of objects that have only one (the manifest and
/// the index before grouped indexes, the repository config, locks, DDL).
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
