//! The stored formats: blocks, the index and the manifest (see `docs/formats.md`).
//!
//! Every object starts with a 4-byte magic and a version; integers are little-endian.
//! Structured bodies are postcard (a stable, documented encoding) and are sealed with
//! a blake3 hash of everything before it.

use std::collections::BTreeMap;

use sanare_core::{Error, Result};
use serde::{Deserialize, Serialize};

pub use crate::manifest::{MANIFEST_MAGIC, MANIFEST_VERSION, Manifest, ManifestAuth, StoredCut};

/// Magic of a block object.
pub const BLOCK_MAGIC: [u8; 4] = *b"SNBK";
/// Magic of an index object.
pub const INDEX_MAGIC: [u8; 4] = *b"SNIX";
/// The version of the block format written by this crate.
pub const BLOCK_VERSION: u8 = 1;
/// The version of the envelope of objects that have only one (the manifest and
/// the index before grouped indexes, the repository config, locks, DDL).
pub const ENVELOPE_VERSION: u16 = 1;
/// The version of the index format written by this crate: block references in
/// content-defined groups stored as blocks (see [`Index::encode`]).
pub const INDEX_VERSION: u16 = 2;

const BLOCK_HEADER: usize = 12;

/// How a block's payload is compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Codec {
    /// Stored as is (chosen automatically when compression does not pay).
    None,
    /// LZ4 block format (`lz4_flex`): fast, the default.
    #[default]
    Lz4,
    /// Brotli at quality 9: denser and slower, for archives.
    Brotli,
}

impl Codec {
    /// The tag byte stored in a block header.
    pub const fn tag(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Brotli => 2,
        }
    }

    /// The codec of a tag byte.
    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Brotli),
            _ => None,
        }
    }
}

/// A block id: the blake3 hash of the block's uncompressed content.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlockId(pub [u8; 32]);

impl BlockId {
    /// The id of `content`.
    pub fn of(content: &[u8]) -> Self {
        Self(*blake3::hash(content).as_bytes())
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses lowercase or uppercase hex.
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s).ok().map(|h| Self(*h.as_bytes()))
    }

    /// The store key of this block (`blocks/ab/abcd…`).
    pub fn key(&self) -> String {
        let hex = self.to_hex();
        format!("blocks/{}/{hex}", &hex[..2])
    }
}

impl std::fmt::Debug for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockId({})", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Encodes `content` as a block object with `codec`, falling back to
/// [`Codec::None`] when compression does not make it smaller.
pub fn encode_block(content: &[u8], codec: Codec) -> Result<Vec<u8>> {
    let raw_len = u32::try_from(content.len())
        .map_err(|_| Error::invalid_input("a block larger than 4 GiB cannot be stored"))?;
    let compressed = match codec {
        Codec::None => None,
        Codec::Lz4 => Some(lz4_compress(content)?),
        Codec::Brotli => {
            let mut out = Vec::with_capacity(content.len() / 2);
            let params = brotli::enc::BrotliEncoderParams {
                quality: 9,
                lgwin: 22,
                ..Default::default()
            };
            brotli::BrotliCompress(&mut &content[..], &mut out, &params)
                .map_err(|e| Error::io("compressing a block with brotli", e))?;
            Some(out)
        }
    };
    let (codec, payload) = match compressed {
        Some(c) if c.len() < content.len() => (codec, c),
        _ => (Codec::None, content.to_vec()),
    };
    let mut out = Vec::with_capacity(BLOCK_HEADER + payload.len());
    out.extend_from_slice(&BLOCK_MAGIC);
    out.push(BLOCK_VERSION);
    out.push(codec.tag());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// LZ4 block format with `lz4_flex`'s large hash table (32-bit entries, 5-byte
/// hashes) even for blocks under 64 KiB, where `lz4_flex::block::compress` picks a
/// 16-bit table with 4-byte hashes: on binary COPY rows, full of zero bytes and
/// length prefixes, the 5-byte hash finds more matches (65.8 % smaller instead of
/// 61.9 % on the order-service fixture in 16 KiB pieces) and is faster too. The
/// output is ordinary LZ4: any decoder reads it.
fn lz4_compress(content: &[u8]) -> Result<Vec<u8>> {
    use lz4_flex::block::{CompressTable, compress_into_with_table, get_maximum_output_size};
    thread_local! {
        static TABLE: std::cell::RefCell<CompressTable> =
            std::cell::RefCell::new(CompressTable::large());
    }
    let mut out = vec![0u8; get_maximum_output_size(content.len())];
    let n = TABLE
        .with_borrow_mut(|table| compress_into_with_table(content, &mut out, table))
        .map_err(|e| Error::other("compressing a block with lz4", e))?;
    out.truncate(n);
    Ok(out)
}

/// Decodes a block object and checks that its content hashes to `id`.
pub fn decode_block(id: &BlockId, object: &[u8]) -> Result<Vec<u8>> {
    let what = || format!("block {id}");
    if object.len() < BLOCK_HEADER {
        return Err(Error::corrupt(what(), "shorter than its header"));
    }
    if object[..4] != BLOCK_MAGIC {
        return Err(Error::corrupt(what(), "bad magic (not a sanare block)"));
    }
    if object[4] != BLOCK_VERSION {
        return Err(Error::corrupt(
            what(),
            format!("unsupported block version {}", object[4]),
        ));
    }
    if object[6] != 0 || object[7] != 0 {
        return Err(Error::corrupt(what(), "reserved header bytes are not zero"));
    }
    let codec = Codec::from_tag(object[5])
        .ok_or_else(|| Error::corrupt(what(), format!("unknown codec tag {}", object[5])))?;
    let raw_len = u32::from_le_bytes([object[8], object[9], object[10], object[11]]) as usize;
    let payload = &object[BLOCK_HEADER..];
    let content = match codec {
        Codec::None => payload.to_vec(),
        Codec::Lz4 => lz4_flex::block::decompress(payload, raw_len)
            .map_err(|e| Error::corrupt(what(), format!("lz4 payload does not decode: {e}")))?,
        Codec::Brotli => {
            let mut out = Vec::with_capacity(raw_len);
            brotli::BrotliDecompress(&mut &payload[..], &mut out).map_err(|e| {
                Error::corrupt(what(), format!("brotli payload does not decode: {e}"))
            })?;
            out
        }
    };
    if content.len() != raw_len {
        return Err(Error::corrupt(
            what(),
            format!("decoded to {} bytes, header says {raw_len}", content.len()),
        ));
    }
    if BlockId::of(&content) != *id {
        return Err(Error::corrupt(
            what(),
            "content does not match its hash (bit rot or tampering)",
        ));
    }
    Ok(content)
}

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
fn open_raw<'a>(
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

/// One column of a captured table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    /// Its name.
    pub name: String,
    /// Its type as `format_type()` prints it.
    pub type_name: String,
}

/// A sequence owned by a captured table, with its state at capture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceState {
    /// The sequence, schema-qualified and quoted as `regclass` prints it.
    pub name: String,
    /// `last_value`.
    pub last_value: i64,
    /// `is_called`.
    pub is_called: bool,
}

/// A block of a table and a filter of the keys of its rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    /// The block.
    pub id: BlockId,
    /// Its uncompressed length.
    pub raw_len: u32,
    /// Rows in it.
    pub rows: u32,
    /// A bloom filter of the blake3 hashes of its rows' primary keys (empty when
    /// the table has no primary key).
    pub key_filter: Vec<u8>,
}

/// Everything needed to restore one table or find rows in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableIndex {
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// Captured columns in COPY order (stored generated columns are not captured).
    pub columns: Vec<ColumnDef>,
    /// Positions in `columns` of the primary key, in key order.
    pub primary_key: Vec<u16>,
    /// Owned sequences.
    pub sequences: Vec<SequenceState>,
    /// Rows captured.
    pub rows: u64,
    /// Uncompressed bytes of its rows.
    pub raw_bytes: u64,
    /// Its blocks, in row order.
    pub blocks: Vec<BlockRef>,
    /// The groups `blocks` is stored in (index version 2; empty in version 1).
    #[serde(skip)]
    pub groups: Vec<GroupRef>,
}

/// A group of consecutive [`BlockRef`]s of one table, stored as a block of its own
/// so that an unchanged run of blocks costs nothing in the next snapshot's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRef {
    /// The block holding the group ([`encode_group`]).
    pub id: BlockId,
    /// How many block references it holds.
    pub blocks: u32,
}

/// Magic at the start of a group block's content.
pub const GROUP_MAGIC: [u8; 4] = *b"SNGR";
const GROUP_MAX: usize = 256;

/// Splits a table's block references into content-defined groups: a group ends
/// after a block whose id's first byte is below 8 (one in 32 on average) or after
/// 256 references, so an edit changes only the groups around it.
pub fn group_blocks(blocks: &[BlockRef]) -> Vec<&[BlockRef]> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, b) in blocks.iter().enumerate() {
        if b.id.0[0] < 8 || i + 1 - start >= GROUP_MAX {
            out.push(&blocks[start..=i]);
            start = i + 1;
        }
    }
    if start < blocks.len() {
        out.push(&blocks[start..]);
    }
    out
}

/// The content of a group block: `SNGR` then the references, postcard.
pub fn encode_group(refs: &[BlockRef]) -> Result<Vec<u8>> {
    let mut out = GROUP_MAGIC.to_vec();
    postcard::to_io(refs, &mut out)
        .map_err(|e| Error::other("encoding a group of block references", e))?;
    Ok(out)
}

/// Decodes a group block's content.
pub fn decode_group(id: &BlockId, content: &[u8]) -> Result<Vec<BlockRef>> {
    let what = || format!("index group {id}");
    let body = content
        .strip_prefix(&GROUP_MAGIC[..])
        .ok_or_else(|| Error::corrupt(what(), "bad magic (not a group of block references)"))?;
    postcard::from_bytes(body).map_err(|e| Error::corrupt(what(), format!("does not decode: {e}")))
}

#[derive(Serialize, Deserialize)]
struct StoredTable {
    schema: String,
    name: String,
    columns: Vec<ColumnDef>,
    primary_key: Vec<u16>,
    sequences: Vec<SequenceState>,
    rows: u64,
    raw_bytes: u64,
    groups: Vec<GroupRef>,
}

#[derive(Serialize, Deserialize)]
struct StoredIndex {
    snapshot: [u8; 16],
    tables: Vec<StoredTable>,
    streams: Vec<StreamIndex>,
}

/// A host byte stream captured with a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamIndex {
    /// The source's name.
    pub name: String,
    /// Its length.
    pub len: u64,
    /// Its blocks, in order.
    pub blocks: Vec<BlockId>,
    /// The metadata its source gave.
    pub metadata: BTreeMap<String, String>,
}

/// The index object of a snapshot (`indexes/<id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// The snapshot.
    pub snapshot: [u8; 16],
    /// Tables.
    pub tables: Vec<TableIndex>,
    /// Host byte streams.
    pub streams: Vec<StreamIndex>,
}

impl Index {
    /// Encodes the index in the current version ([`INDEX_VERSION`]): each table's
    /// block references are given by its `groups`, which must already be stored.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let stored = StoredIndex {
            snapshot: self.snapshot,
            tables: self
                .tables
                .iter()
                .map(|t| {
                    let grouped: u64 = t.groups.iter().map(|g| u64::from(g.blocks)).sum();
                    if grouped != t.blocks.len() as u64 {
                        return Err(Error::invalid_input(format!(
                            "table {}.{}: its groups hold {grouped} block references, it has {}",
                            t.schema,
                            t.name,
                            t.blocks.len()
                        )));
                    }
                    Ok(StoredTable {
                        schema: t.schema.clone(),
                        name: t.name.clone(),
                        columns: t.columns.clone(),
                        primary_key: t.primary_key.clone(),
                        sequences: t.sequences.clone(),
                        rows: t.rows,
                        raw_bytes: t.raw_bytes,
                        groups: t.groups.clone(),
                    })
                })
                .collect::<Result<_>>()?,
            streams: self.streams.clone(),
        };
        seal_version(INDEX_MAGIC, INDEX_VERSION, &stored)
    }

    /// Encodes the index in version 1 (block references inline), as older
    /// versions of this crate wrote it.
    pub fn encode_v1(&self) -> Result<Vec<u8>> {
        seal(INDEX_MAGIC, self)
    }

    /// Decodes and checks an index object of version 1 or 2. A version 2 index
    /// comes back with each table's `groups` set and `blocks` empty: fill them with
    /// [`decode_group`] of each group block ([`Index::needs_groups`]).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        const WHAT: &str = "snapshot index";
        let (version, body) = open_raw(INDEX_MAGIC, WHAT, bytes, &[1, INDEX_VERSION])?;
        let bad = |e: postcard::Error| Error::corrupt(WHAT, format!("body does not decode: {e}"));
        if version == 1 {
            return postcard::from_bytes(body).map_err(bad);
        }
        let stored: StoredIndex = postcard::from_bytes(body).map_err(bad)?;
        Ok(Index {
            snapshot: stored.snapshot,
            tables: stored
                .tables
                .into_iter()
                .map(|t| TableIndex {
                    schema: t.schema,
                    name: t.name,
                    columns: t.columns,
                    primary_key: t.primary_key,
                    sequences: t.sequences,
                    rows: t.rows,
                    raw_bytes: t.raw_bytes,
                    blocks: Vec::new(),
                    groups: t.groups,
                })
                .collect(),
            streams: stored.streams,
        })
    }

    /// Whether some table's block references are still to be read from its groups.
    pub fn needs_groups(&self) -> bool {
        self.tables
            .iter()
            .any(|t| t.blocks.is_empty() && !t.groups.is_empty())
    }

    /// Every block referenced (group blocks included), once.
    pub fn block_ids(&self) -> std::collections::BTreeSet<BlockId> {
        self.tables
            .iter()
            .flat_map(|t| {
                t.blocks
                    .iter()
                    .map(|b| b.id)
                    .chain(t.groups.iter().map(|g| g.id))
            })
            .chain(self.streams.iter().flat_map(|s| s.blocks.iter().copied()))
            .collect()
    }
}

/// A bloom filter over 32-byte key hashes: 8 bits per key, 7 probes (about 2.3%
/// false positives: a rows-by-key lookup decodes a needless block that often; the
/// filters are stored with every block, so fewer bits keep snapshots smaller).
/// Filters written with 10 bits per key (before) are read the same way.
pub(crate) mod bloom {
    const PROBES: u64 = 7;

    /// A filter for `keys`.
    pub(crate) fn build(keys: &[[u8; 32]]) -> Vec<u8> {
        if keys.is_empty() {
            return Vec::new();
        }
        let bytes = keys.len().max(8);
        let mut out = vec![0u8; bytes];
        let bits = (bytes * 8) as u64;
        for k in keys {
            for bit in probes(k, bits) {
                out[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
        out
    }

    /// Whether `key` may be in `filter`.
    pub(crate) fn may_contain(filter: &[u8], key: &[u8; 32]) -> bool {
        if filter.is_empty() {
            return false;
        }
        let bits = (filter.len() * 8) as u64;
        probes(key, bits).all(|bit| filter[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }

    fn probes(k: &[u8; 32], bits: u64) -> impl Iterator<Item = u64> {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&k[..8]);
        b.copy_from_slice(&k[8..16]);
        let h1 = u64::from_le_bytes(a);
        let h2 = u64::from_le_bytes(b) | 1;
        (0..PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn block_golden_vector() {
        let content = b"sanare sanare sanare sanare sanare sanare";
        let id = BlockId::of(content);
        let none = encode_block(content, Codec::None).unwrap();
        assert_eq!(
            hex(&none[..12]),
            "534e424b0100000029000000",
            "magic SNBK, version 1, codec none, reserved, length 41"
        );
        assert_eq!(&none[12..], content);
        let lz4 = encode_block(content, Codec::Lz4).unwrap();
        assert_eq!(
            hex(&lz4),
            "534e424b01010000290000007f73616e617265200700096073616e617265",
        );
        assert_eq!(decode_block(&id, &lz4).unwrap(), content);
        let br = encode_block(content, Codec::Brotli).unwrap();
        assert_eq!(br[5], 2);
        assert_eq!(decode_block(&id, &br).unwrap(), content);
        assert_eq!(
            id.to_hex(),
            blake3::hash(content).to_hex().as_str(),
            "ids are blake3 of the uncompressed content"
        );
    }

    #[test]
    fn lz4_blocks_of_binary_rows_use_the_large_table_and_decode_anywhere() {
        // Binary COPY-like rows: field counts, 4-byte lengths, big-endian integers.
        let mut rows = Vec::new();
        for i in 0..600u64 {
            rows.extend_from_slice(&3i16.to_be_bytes());
            for v in [i * 7, 1_000 + i % 13, (i * 2_654_435_761) % 100_000] {
                rows.extend_from_slice(&8i32.to_be_bytes());
                rows.extend_from_slice(&v.to_be_bytes());
            }
        }
        let ours = lz4_compress(&rows).unwrap();
        let plain = lz4_flex::block::compress(&rows);
        assert!(
            ours.len() < plain.len(),
            "{} vs {}",
            ours.len(),
            plain.len()
        );
        assert_eq!(
            lz4_flex::block::decompress(&ours, rows.len()).unwrap(),
            rows
        );
        let object = encode_block(&rows, Codec::Lz4).unwrap();
        assert_eq!(object[5], Codec::Lz4.tag());
        assert_eq!(decode_block(&BlockId::of(&rows), &object).unwrap(), rows);
    }

    #[test]
    fn incompressible_blocks_are_stored_plain() {
        let content: Vec<u8> = (0u32..64).map(|i| (i * 97 % 251) as u8).collect();
        let enc = encode_block(&content, Codec::Lz4).unwrap();
        assert_eq!(enc[5], Codec::None.tag());
    }

    #[test]
    fn damaged_blocks_are_refused_and_named() {
        let content = vec![7u8; 1000];
        let id = BlockId::of(&content);
        let good = encode_block(&content, Codec::Lz4).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            let err = decode_block(&id, &bad).unwrap_err();
            assert!(err.to_string().contains(&id.to_hex()), "{err}");
        }
        assert!(decode_block(&id, &good[..good.len() - 1]).is_err());
        assert!(decode_block(&id, &good[..5]).is_err());
    }

    #[test]
    fn index_with_a_stream_golden_vector() {
        let index = Index {
            snapshot: [3; 16],
            tables: Vec::new(),
            streams: vec![StreamIndex {
                name: "cache.db".into(),
                len: 300,
                blocks: vec![BlockId([4; 32])],
                metadata: BTreeMap::from([("format".into(), "v3".into())]),
            }],
        };
        let bytes = index.encode().unwrap();
        assert_eq!(hex(&bytes[..4]), "534e4958", "magic SNIX");
        assert_eq!(
            hex(&bytes[10..bytes.len() - 32]),
            concat!(
                "03030303030303030303030303030303", // snapshot
                "00",                               // no tables
                "01",
                "08",
                "63616368652e6462", // one stream, "cache.db"
                "ac02",             // len 300
                "01",
                "0404040404040404040404040404040404040404040404040404040404040404",
                "01",
                "06",
                "666f726d6174",
                "02",
                "7633", // {"format": "v3"}
            )
        );
        assert_eq!(Index::decode(&bytes).unwrap(), index);
    }

    fn sample_table(blocks: Vec<BlockRef>) -> TableIndex {
        TableIndex {
            schema: "s".into(),
            name: "t".into(),
            columns: vec![ColumnDef {
                name: "id".into(),
                type_name: "bigint".into(),
            }],
            primary_key: vec![0],
            sequences: Vec::new(),
            rows: 2,
            raw_bytes: 30,
            blocks,
            groups: Vec::new(),
        }
    }

    #[test]
    fn group_golden_vector_and_content_defined_grouping() {
        let r = BlockRef {
            id: BlockId([9; 32]),
            raw_len: 30,
            rows: 2,
            key_filter: vec![0xff; 8],
        };
        let content = encode_group(std::slice::from_ref(&r)).unwrap();
        assert_eq!(
            hex(&content),
            concat!(
                "534e4752", // SNGR
                "01",       // one reference
                "0909090909090909090909090909090909090909090909090909090909090909",
                "1e",
                "02",
                "08",
                "ffffffffffffffff", // raw_len 30, rows 2, 8-byte filter
            )
        );
        let id = BlockId::of(&content);
        assert_eq!(decode_group(&id, &content).unwrap(), vec![r.clone()]);
        assert!(decode_group(&id, &content[1..]).is_err());

        // Groups end after ids starting below 8, so a change moves few groups.
        let refs: Vec<BlockRef> = (0u32..2000)
            .map(|i| BlockRef {
                id: BlockId::of(&i.to_le_bytes()),
                ..r.clone()
            })
            .collect();
        let groups = group_blocks(&refs);
        assert_eq!(groups.iter().map(|g| g.len()).sum::<usize>(), 2000);
        assert!(groups.len() > 30 && groups.len() < 120, "{}", groups.len());
        assert!(groups.iter().all(|g| g.len() <= GROUP_MAX));
        let mut edited = refs.clone();
        edited[1000].id = BlockId([200; 32]);
        let ids = |g: &[BlockRef]| g.iter().map(|b| b.id).collect::<Vec<_>>();
        let before: std::collections::HashSet<Vec<BlockId>> = groups.into_iter().map(ids).collect();
        let changed = group_blocks(&edited)
            .into_iter()
            .filter(|g| !before.contains(&ids(g)))
            .count();
        assert_eq!(changed, 1);
    }

    #[test]
    fn index_v2_refers_to_groups_and_v1_still_decodes() {
        let blocks = vec![BlockRef {
            id: BlockId([5; 32]),
            raw_len: 30,
            rows: 2,
            key_filter: Vec::new(),
        }];
        let mut index = Index {
            snapshot: [6; 16],
            tables: vec![sample_table(blocks.clone())],
            streams: Vec::new(),
        };
        assert!(index.encode().is_err(), "groups must cover the blocks");
        index.tables[0].groups = vec![GroupRef {
            id: BlockId([7; 32]),
            blocks: 1,
        }];
        let v2 = index.encode().unwrap();
        assert_eq!(hex(&v2[4..6]), "0200", "version 2");
        let decoded = Index::decode(&v2).unwrap();
        assert!(decoded.needs_groups());
        assert!(decoded.tables[0].blocks.is_empty());
        assert_eq!(decoded.tables[0].groups, index.tables[0].groups);
        let ids = index.block_ids();
        assert!(ids.contains(&BlockId([5; 32])) && ids.contains(&BlockId([7; 32])));

        // An index written by the previous version of this crate.
        let mut old = index.clone();
        old.tables[0].groups.clear();
        let v1 = old.encode_v1().unwrap();
        assert_eq!(hex(&v1[4..6]), "0100");
        let decoded = Index::decode(&v1).unwrap();
        assert!(!decoded.needs_groups());
        assert_eq!(decoded, old);
    }

    #[test]
    fn bloom_filters_find_members_and_few_strangers() {
        let keys: Vec<[u8; 32]> = (0u32..500)
            .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
            .collect();
        let f = bloom::build(&keys);
        assert!(keys.iter().all(|k| bloom::may_contain(&f, k)));
        let strangers = (1000u32..11000)
            .filter(|i| bloom::may_contain(&f, blake3::hash(&i.to_le_bytes()).as_bytes()))
            .count();
        assert!(strangers < 300, "{strangers} false positives of 10000");
        assert!(!bloom::may_contain(&[], &keys[0]));
    }
}
