//! The index of a snapshot (`SNIX`): per table its columns, key, sequences and
//! block references (stored in content-defined group blocks), per host stream its
//! blocks; and the bloom filters of the rows' keys.

use std::collections::BTreeMap;

use sanare_core::{Error, Result};
use serde::{Deserialize, Serialize};

use super::{BlockId, open_raw, seal, seal_version};

/// Magic of an index object.
pub const INDEX_MAGIC: [u8; 4] = *b"SNIX";
/// The version of the index format written by this crate: block references in
/// content-defined groups stored as blocks (see [`Index::encode`]), each group
/// with the block it is stored as a delta against, if it is (version 3; versions 1
/// and 2 are still read).
pub const INDEX_VERSION: u16 = 3;

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
    /// The block it is stored as a delta against, if it is (see
    /// [`crate::format::encode_delta`]): needed to read it, so referenced with it.
    /// Stored in version 2 groups only (`SNG2`); never in a version 1 index.
    #[serde(skip)]
    pub base: Option<BlockId>,
}

/// A [`BlockRef`] as a version 2 group (`SNG2`) stores it.
#[derive(Serialize, Deserialize)]
struct StoredRef {
    id: BlockId,
    raw_len: u32,
    rows: u32,
    key_filter: Vec<u8>,
    base: Option<BlockId>,
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
    /// The block the group block is stored as a delta against, if it is (the
    /// previous snapshot's group of the same rows): needed to read it.
    pub base: Option<BlockId>,
}

/// A [`GroupRef`] as a version 2 index stores it (no delta base).
#[derive(Serialize, Deserialize)]
struct GroupRefV2 {
    id: BlockId,
    blocks: u32,
}

/// Magic at the start of a group block's content, version 1 (references without
/// delta bases; still read).
pub const GROUP_MAGIC: [u8; 4] = *b"SNGR";
/// Magic at the start of a group block's content, version 2 (written since blocks
/// may be stored as deltas): each reference carries its base.
pub const GROUP_MAGIC_V2: [u8; 4] = *b"SNG2";
const GROUP_MAX: usize = 256;

/// Whether a group ends after `r`: when the first byte of the blake3 hash of its
/// key filter (of its block id, for a table without a primary key, whose filters
/// are empty) is below 8, one block in 32 on average. Key filters change only when
/// keys do, so updating rows moves no group boundary: the groups of the next
/// snapshot line up with these, and a changed group is stored as a small delta.
fn ends_group(r: &BlockRef) -> bool {
    let first = if r.key_filter.is_empty() {
        r.id.0[0]
    } else {
        blake3::hash(&r.key_filter).as_bytes()[0]
    };
    first < 8
}

/// Cuts a table's block references into groups as they come (see [`group_blocks`]).
#[derive(Debug, Default)]
pub struct GroupBuilder {
    refs: Vec<BlockRef>,
}

impl GroupBuilder {
    /// Adds the next reference; returns the group it completes, if it does.
    pub fn push(&mut self, r: BlockRef) -> Option<Vec<BlockRef>> {
        let ends = ends_group(&r);
        self.refs.push(r);
        (ends || self.refs.len() >= GROUP_MAX).then(|| std::mem::take(&mut self.refs))
    }

    /// Whether no reference is waiting for its group to end.
    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    /// The last, incomplete group, if any.
    pub fn finish(self) -> Option<Vec<BlockRef>> {
        (!self.refs.is_empty()).then_some(self.refs)
    }
}

/// Splits a table's block references into content-defined groups: a group ends
/// after a reference `ends_group` picks or after 256 references, so an edit
/// changes only the groups around it (and an update of rows moves no boundary).
/// Indexes written before this rule cut groups after block ids below 8; they are
/// read the same way (a reader takes the groups as the index lists them).
pub fn group_blocks(blocks: &[BlockRef]) -> Vec<&[BlockRef]> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, b) in blocks.iter().enumerate() {
        if ends_group(b) || i + 1 - start >= GROUP_MAX {
            out.push(&blocks[start..=i]);
            start = i + 1;
        }
    }
    if start < blocks.len() {
        out.push(&blocks[start..]);
    }
    out
}

/// The content of a group block: `SNG2` then the references, postcard.
pub fn encode_group(refs: &[BlockRef]) -> Result<Vec<u8>> {
    let stored: Vec<StoredRef> = refs
        .iter()
        .map(|r| StoredRef {
            id: r.id,
            raw_len: r.raw_len,
            rows: r.rows,
            key_filter: r.key_filter.clone(),
            base: r.base,
        })
        .collect();
    let mut out = GROUP_MAGIC_V2.to_vec();
    postcard::to_io(&stored, &mut out)
        .map_err(|e| Error::other("encoding a group of block references", e))?;
    Ok(out)
}

/// Decodes a group block's content (version 1 `SNGR` or 2 `SNG2`).
pub fn decode_group(id: &BlockId, content: &[u8]) -> Result<Vec<BlockRef>> {
    let what = || format!("index group {id}");
    let bad = |e: postcard::Error| Error::corrupt(what(), format!("does not decode: {e}"));
    if let Some(body) = content.strip_prefix(&GROUP_MAGIC_V2[..]) {
        let stored: Vec<StoredRef> = postcard::from_bytes(body).map_err(bad)?;
        return Ok(stored
            .into_iter()
            .map(|r| BlockRef {
                id: r.id,
                raw_len: r.raw_len,
                rows: r.rows,
                key_filter: r.key_filter,
                base: r.base,
            })
            .collect());
    }
    let body = content
        .strip_prefix(&GROUP_MAGIC[..])
        .ok_or_else(|| Error::corrupt(what(), "bad magic (not a group of block references)"))?;
    postcard::from_bytes(body).map_err(bad)
}

/// A table as an index of version 2 (`G` = [`GroupRefV2`]) or 3 ([`GroupRef`])
/// stores it.
#[derive(Serialize, Deserialize)]
struct StoredTable<G> {
    schema: String,
    name: String,
    columns: Vec<ColumnDef>,
    primary_key: Vec<u16>,
    sequences: Vec<SequenceState>,
    rows: u64,
    raw_bytes: u64,
    groups: Vec<G>,
}

#[derive(Serialize, Deserialize)]
struct StoredIndex<G> {
    snapshot: [u8; 16],
    tables: Vec<StoredTable<G>>,
    streams: Vec<StreamIndex>,
}

impl<G> StoredIndex<G> {
    fn into_index(self, group: impl Fn(G) -> GroupRef) -> Index {
        Index {
            snapshot: self.snapshot,
            tables: self
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
                    groups: t.groups.into_iter().map(&group).collect(),
                })
                .collect(),
            streams: self.streams,
        }
    }
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
                    // A table captured group by group has no references in memory.
                    if !t.blocks.is_empty() && grouped != t.blocks.len() as u64 {
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

    /// Decodes and checks an index object of version 1, 2 or 3. A version 2 or 3
    /// index comes back with each table's `groups` set and `blocks` empty: fill them with
    /// [`decode_group`] of each group block ([`Index::needs_groups`]).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        const WHAT: &str = "snapshot index";
        let (version, body) = open_raw(INDEX_MAGIC, WHAT, bytes, &[1, 2, INDEX_VERSION])?;
        let bad = |e: postcard::Error| Error::corrupt(WHAT, format!("body does not decode: {e}"));
        match version {
            1 => postcard::from_bytes(body).map_err(bad),
            2 => Ok(postcard::from_bytes::<StoredIndex<GroupRefV2>>(body)
                .map_err(bad)?
                .into_index(|g| GroupRef {
                    id: g.id,
                    blocks: g.blocks,
                    base: None,
                })),
            _ => Ok(postcard::from_bytes::<StoredIndex<GroupRef>>(body)
                .map_err(bad)?
                .into_index(|g| g)),
        }
    }

    /// Whether some table's block references are still to be read from its groups.
    pub fn needs_groups(&self) -> bool {
        self.tables
            .iter()
            .any(|t| t.blocks.is_empty() && !t.groups.is_empty())
    }

    /// Every block referenced (group blocks and the bases of blocks stored as
    /// deltas included), once.
    pub fn block_ids(&self) -> std::collections::BTreeSet<BlockId> {
        self.tables
            .iter()
            .flat_map(|t| {
                t.blocks
                    .iter()
                    .flat_map(|b| std::iter::once(b.id).chain(b.base))
                    .chain(
                        t.groups
                            .iter()
                            .flat_map(|g| std::iter::once(g.id).chain(g.base)),
                    )
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

    fn hex_bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
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
            base: None,
        };
        // Version 1, as written before deltas: still read.
        let v1 = hex_bytes(concat!(
            "534e4752", // SNGR
            "01",       // one reference
            "0909090909090909090909090909090909090909090909090909090909090909",
            "1e",
            "02",
            "08",
            "ffffffffffffffff", // raw_len 30, rows 2, 8-byte filter
        ));
        let id = BlockId::of(&v1);
        assert_eq!(decode_group(&id, &v1).unwrap(), vec![r.clone()]);
        assert!(decode_group(&id, &v1[1..]).is_err());
        // Version 2: each reference with its delta base.
        let delta = BlockRef {
            base: Some(BlockId([3; 32])),
            ..r.clone()
        };
        let content = encode_group(&[r.clone(), delta.clone()]).unwrap();
        assert_eq!(
            hex(&content),
            concat!(
                "534e4732", // SNG2
                "02",       // two references
                "0909090909090909090909090909090909090909090909090909090909090909",
                "1e",
                "02",
                "08",
                "ffffffffffffffff",
                "00", // no base
                "0909090909090909090909090909090909090909090909090909090909090909",
                "1e",
                "02",
                "08",
                "ffffffffffffffff",
                "01", // a base:
                "0303030303030303030303030303030303030303030303030303030303030303",
            )
        );
        let id = BlockId::of(&content);
        assert_eq!(
            decode_group(&id, &content).unwrap(),
            vec![r.clone(), delta.clone()]
        );
        assert!(decode_group(&id, &content[..content.len() - 1]).is_err());

        // Groups end where a key filter's hash starts below 8, so a change moves
        // few groups, and changing a block's rows (its id) moves none.
        let refs: Vec<BlockRef> = (0u32..2000)
            .map(|i| BlockRef {
                id: BlockId::of(&i.to_le_bytes()),
                key_filter: blake3::hash(&(i + 7).to_le_bytes()).as_bytes()[..8].to_vec(),
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
        // Every block's content changed, no key: the same boundaries.
        let updated: Vec<BlockRef> = refs
            .iter()
            .map(|b| BlockRef {
                id: BlockId::of(&b.id.0),
                ..b.clone()
            })
            .collect();
        let lens = |g: Vec<&[BlockRef]>| g.iter().map(|g| g.len()).collect::<Vec<_>>();
        assert_eq!(lens(group_blocks(&updated)), lens(group_blocks(&refs)));
        // Built as they come, the same groups.
        let mut builder = GroupBuilder::default();
        let mut built: Vec<Vec<BlockRef>> = refs
            .iter()
            .filter_map(|r| builder.push(r.clone()))
            .collect();
        built.extend(builder.finish());
        let cut: Vec<Vec<BlockRef>> = group_blocks(&refs)
            .into_iter()
            .map(<[BlockRef]>::to_vec)
            .collect();
        assert_eq!(built, cut);
        // Without keys (empty filters) the ids decide.
        let keyless: Vec<BlockRef> = refs
            .iter()
            .map(|b| BlockRef {
                key_filter: Vec::new(),
                ..b.clone()
            })
            .collect();
        let n = group_blocks(&keyless).len();
        assert!(n > 30 && n < 120, "{n}");
    }

    #[test]
    fn index_v3_refers_to_groups_and_v1_and_v2_still_decode() {
        let blocks = vec![BlockRef {
            id: BlockId([5; 32]),
            raw_len: 30,
            rows: 2,
            key_filter: Vec::new(),
            base: Some(BlockId([8; 32])),
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
            base: Some(BlockId([4; 32])),
        }];
        let v3 = index.encode().unwrap();
        assert_eq!(hex(&v3[4..6]), "0300", "version 3");
        assert_eq!(
            hex(&v3[10..v3.len() - 32]),
            concat!(
                "06060606060606060606060606060606", // snapshot
                "01",
                "0173",
                "0174", // one table, s.t
                "01",
                "026964",
                "06626967696e74", // column id bigint
                "0100",
                "00",
                "02",
                "1e", // key [0], no sequences, 2 rows, 30 bytes
                "01",
                "0707070707070707070707070707070707070707070707070707070707070707",
                "01",
                "01",
                "0404040404040404040404040404040404040404040404040404040404040404",
                "00", // no streams
            ),
            "one group of one reference, stored as a delta against 04×32"
        );
        let decoded = Index::decode(&v3).unwrap();
        assert!(decoded.needs_groups());
        assert!(decoded.tables[0].blocks.is_empty());
        assert_eq!(decoded.tables[0].groups, index.tables[0].groups);
        let ids = index.block_ids();
        for (n, why) in [
            (5, "a block"),
            (7, "a group"),
            (8, "a block's base"),
            (4, "a group's base"),
        ] {
            assert!(ids.contains(&BlockId([n; 32])), "{why} is referenced");
        }
        // A table captured group by group has no references in memory.
        let mut streamed = index.clone();
        streamed.tables[0].blocks.clear();
        assert_eq!(Index::decode(&streamed.encode().unwrap()).unwrap(), decoded);

        // Version 2, written before group deltas: the same without the base.
        let v2 = seal_version(
            INDEX_MAGIC,
            2,
            &StoredIndex {
                snapshot: [6; 16],
                tables: vec![StoredTable {
                    schema: "s".into(),
                    name: "t".into(),
                    columns: index.tables[0].columns.clone(),
                    primary_key: vec![0],
                    sequences: Vec::new(),
                    rows: 2,
                    raw_bytes: 30,
                    groups: vec![GroupRefV2 {
                        id: BlockId([7; 32]),
                        blocks: 1,
                    }],
                }],
                streams: Vec::new(),
            },
        )
        .unwrap();
        let decoded = Index::decode(&v2).unwrap();
        assert_eq!(decoded.tables[0].groups[0].id, BlockId([7; 32]));
        assert_eq!(decoded.tables[0].groups[0].base, None);

        // Version 1, written before groups (and deltas): references inline.
        let mut old = index.clone();
        old.tables[0].groups.clear();
        old.tables[0].blocks[0].base = None;
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
