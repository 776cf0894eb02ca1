//! Packs: many block objects in one store object, and the map from block id to
//! where in which pack it lives.
//!
//! One object per block would cost one store write (for [`crate::FsStore`]: a file,
//! two fsyncs) per 16 KiB block. Blocks are therefore appended to packs of about
//! [`crate::SnapshotConfig::pack_size`] bytes; a pack ends with its own table of
//! contents, so the store alone says where every block is (see `docs/formats.md`).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use sanare_core::{Error, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::format::BlockId;
use crate::pack_index::PackIndex;
use crate::store::{BlockStore, ObjectMeta};

/// Magic at the start and at the very end of a pack object.
pub const PACK_MAGIC: [u8; 4] = *b"SNPK";
/// Magic of a pack's table of contents.
pub const TOC_MAGIC: [u8; 4] = *b"SNPT";
/// The version of the pack format written by this crate: 2 since blocks may be
/// stored as deltas (each entry of the table of contents names its base); packs of
/// version 1 are still read.
pub const PACK_VERSION: u16 = 2;
/// The longest table of contents a reader accepts (over a million blocks; an 8 MiB
/// pack has about 60 KiB): a longer length read from a pack's trailer is damage,
/// refused before anything is read or allocated for it.
pub const MAX_TOC_LEN: u64 = 64 << 20;
/// Store keys of packs start with this.
pub const PACK_PREFIX: &str = "packs/";

const HEADER_LEN: usize = 8;
const TRAILER_LEN: usize = 8;
/// How much of a pack's end is read at first to find its table of contents
/// (a pack of 8 MiB of 6 KiB blocks has a table of about 60 KiB).
const TAIL_GUESS: u64 = 128 * 1024;

/// Where one block is in a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    /// The block.
    pub id: BlockId,
    /// Offset of its block object from the start of the pack.
    pub offset: u32,
    /// Length of its block object.
    pub len: u32,
    /// The block it is stored as a delta against, if it is (version 2).
    pub base: Option<BlockId>,
}

/// An entry of a version 1 table of contents.
#[derive(Deserialize)]
struct PackEntryV1 {
    id: BlockId,
    offset: u32,
    len: u32,
}

impl PackEntry {
    fn range(&self) -> Range<u64> {
        u64::from(self.offset)..u64::from(self.offset) + u64::from(self.len)
    }
}

/// Where a block lives in the store: `len` bytes at `offset` of object `key`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BlockLocation {
    /// The object holding it (a pack, or a loose block object written before packs).
    pub key: String,
    /// Offset of the block object in it.
    pub offset: u64,
    /// Length of the block object.
    pub len: u64,
}

/// Collects block objects into one pack.
#[derive(Debug)]
pub(crate) struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A finished pack, ready to be put.
#[derive(Debug)]
pub(crate) struct SealedPack {
    pub(crate) key: String,
    pub(crate) bytes: Bytes,
    pub(crate) entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub(crate) fn new() -> Self {
        let mut buf = Vec::new();
        buf.extend_from_slice(&PACK_MAGIC);
        buf.extend_from_slice(&PACK_VERSION.to_le_bytes());
        buf.extend_from_slice(&0u16.to_le_bytes());
        Self {
            buf,
            entries: Vec::new(),
        }
    }

    /// Bytes so far.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a block object.
    pub(crate) fn push(&mut self, id: BlockId, object: &[u8]) -> Result<()> {
        let too_big = || Error::invalid_input("a pack cannot grow beyond 4 GiB");
        let offset = u32::try_from(self.buf.len()).map_err(|_| too_big())?;
        let len = u32::try_from(object.len()).map_err(|_| too_big())?;
        offset.checked_add(len).ok_or_else(too_big)?;
        self.buf.extend_from_slice(object);
        self.entries.push(PackEntry {
            id,
            offset,
            len,
            base: crate::format::delta_base(object),
        });
        Ok(())
    }

    /// Appends the table of contents and the trailer; the key is the blake3 hash of
    /// the whole pack, so putting the same pack twice is harmless.
    pub(crate) fn seal(mut self) -> Result<SealedPack> {
        let toc = crate::format::seal_version(TOC_MAGIC, PACK_VERSION, &self.entries)?;
        let toc_len = u32::try_from(toc.len())
            .map_err(|_| Error::invalid_input("a pack's table of contents exceeds 4 GiB"))?;
        self.buf.extend_from_slice(&toc);
        self.buf.extend_from_slice(&toc_len.to_le_bytes());
        self.buf.extend_from_slice(&PACK_MAGIC);
        let hex = blake3::hash(&self.buf).to_hex();
        Ok(SealedPack {
            key: format!("{PACK_PREFIX}{}/{hex}", &hex[..2]),
            bytes: Bytes::from(self.buf),
            entries: self.entries,
        })
    }
}

/// The end of a pack holding blocks `entries` (id, offset, length; none a delta)
/// whose bytes are not given: its table of contents and trailer, which a reader
/// reads from the end of the pack (see `docs/formats.md`). For benchmarks and
/// tests of repositories of index entries only (feature `testing`).
#[cfg(feature = "testing")]
pub fn synthetic_tail(entries: &[(BlockId, u32, u32)]) -> Result<Vec<u8>> {
    let entries: Vec<PackEntry> = entries
        .iter()
        .map(|&(id, offset, len)| PackEntry {
            id,
            offset,
            len,
            base: None,
        })
        .collect();
    let mut out = crate::format::seal_version(TOC_MAGIC, PACK_VERSION, &entries)?;
    let toc_len = u32::try_from(out.len())
        .map_err(|_| Error::invalid_input("a pack's table of contents exceeds 4 GiB"))?;
    out.extend_from_slice(&toc_len.to_le_bytes());
    out.extend_from_slice(&PACK_MAGIC);
    Ok(out)
}

/// What the end of a pack says: its entries, or that more of its end is needed.
#[derive(Debug)]
pub(crate) enum Tail {
    /// The table of contents.
    Entries(Vec<PackEntry>),
    /// Read at least this many bytes from the end and try again.
    NeedLast(u64),
}

/// Parses the end (`tail`, the last bytes) of the pack `key` of `size` bytes.
pub(crate) fn parse_tail(key: &str, size: u64, tail: &[u8]) -> Result<Tail> {
    let bad = |why: String| Error::corrupt(format!("pack {key}"), why);
    if size < (HEADER_LEN + TRAILER_LEN) as u64 || tail.len() < TRAILER_LEN {
        return Err(bad("shorter than a pack's header and trailer".into()));
    }
    let t = &tail[tail.len() - TRAILER_LEN..];
    if t[4..] != PACK_MAGIC {
        return Err(bad(
            "bad trailer magic (truncated, or not a sanare pack)".into()
        ));
    }
    let toc_len = u64::from(u32::from_le_bytes([t[0], t[1], t[2], t[3]]));
    let need = toc_len + TRAILER_LEN as u64;
    if toc_len > MAX_TOC_LEN {
        return Err(bad(format!(
            "its trailer claims a table of contents of {toc_len} bytes, more than any pack has"
        )));
    }
    if need + HEADER_LEN as u64 > size {
        return Err(bad(format!(
            "table of contents of {toc_len} bytes does not fit"
        )));
    }
    if (tail.len() as u64) < need {
        return Ok(Tail::NeedLast(need));
    }
    let toc = &tail[tail.len() - need as usize..tail.len() - TRAILER_LEN];
    let what = format!("pack {key}");
    let (version, body) = crate::format::open_raw(TOC_MAGIC, &what, toc, &[1, PACK_VERSION])?;
    let undecodable =
        |e: postcard::Error| bad(format!("its table of contents does not decode: {e}"));
    let entries: Vec<PackEntry> = if version == 1 {
        postcard::from_bytes::<Vec<PackEntryV1>>(body)
            .map_err(undecodable)?
            .into_iter()
            .map(|e| PackEntry {
                id: e.id,
                offset: e.offset,
                len: e.len,
                base: None,
            })
            .collect()
    } else {
        postcard::from_bytes(body).map_err(undecodable)?
    };
    let data_end = size - need;
    for e in &entries {
        if u64::from(e.offset) < HEADER_LEN as u64 || e.range().end > data_end {
            return Err(bad(format!("block {} lies outside the pack's data", e.id)));
        }
    }
    Ok(Tail::Entries(entries))
}

/// Reads the table of contents of the pack `meta`.
pub(crate) async fn read_toc(store: &dyn BlockStore, meta: &ObjectMeta) -> Result<Vec<PackEntry>> {
    let mut want = TAIL_GUESS.min(meta.size);
    loop {
        let range = meta.size - want..meta.size;
        let tail = store.get_range(&meta.key, range).await?.ok_or_else(|| {
            Error::not_found(format!("pack {} (deleted while being read)", meta.key))
        })?;
        match parse_tail(&meta.key, meta.size, &tail)? {
            Tail::Entries(e) => return Ok(e),
            Tail::NeedLast(n) if n > want => want = n,
            Tail::NeedLast(_) => {
                return Err(Error::corrupt(
                    format!("pack {}", meta.key),
                    "its table of contents does not parse",
                ));
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Loc {
    pack: u32,
    offset: u32,
    len: u32,
    base: Option<BlockId>,
}

/// A pack the map knows.
#[derive(Clone, Debug)]
pub(crate) struct PackInfo {
    pub(crate) key: Arc<str>,
    pub(crate) size: u64,
    pub(crate) modified: OffsetDateTime,
    pub(crate) entries: Vec<PackEntry>,
}

/// Every block in every pack of a store, built from the packs' tables of contents.
#[derive(Debug, Default)]
pub(crate) struct PackMap {
    packs: Vec<PackInfo>,
    by_key: HashMap<Arc<str>, u32>,
    blocks: HashMap<BlockId, Loc>,
    /// Packs whose table of contents could not be read, with why.
    pub(crate) unreadable: Vec<(String, String)>,
}

impl PackMap {
    /// Where `id` is.
    pub(crate) fn locate(&self, id: &BlockId) -> Option<BlockLocation> {
        let loc = self.blocks.get(id)?;
        let pack = self.packs.get(loc.pack as usize)?;
        Some(BlockLocation {
            key: pack.key.to_string(),
            offset: u64::from(loc.offset),
            len: u64::from(loc.len),
        })
    }

    /// Blocks known.
    pub(crate) fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// The pack stored under `key`, if known.
    pub(crate) fn pack(&self, key: &str) -> Option<&PackInfo> {
        self.packs.get(*self.by_key.get(key)? as usize)
    }

    /// The packs known.
    pub(crate) fn packs(&self) -> &[PackInfo] {
        &self.packs
    }

    /// Adds a pack just written (its key must be new to the map).
    pub(crate) fn add(&mut self, info: PackInfo) {
        if self.by_key.contains_key(&info.key) {
            return;
        }
        let n = u32::try_from(self.packs.len()).unwrap_or(u32::MAX);
        for e in &info.entries {
            self.blocks.entry(e.id).or_insert(Loc {
                pack: n,
                offset: e.offset,
                len: e.len,
                base: e.base,
            });
        }
        self.by_key.insert(info.key.clone(), n);
        self.packs.push(info);
    }

    /// Brings the map up to the store: reads the tables of contents of packs it
    /// does not know, and starts over when a known pack is gone (deleted or
    /// rewritten by GC).
    pub(crate) async fn refresh(&mut self, store: &dyn BlockStore) -> Result<()> {
        let mut listed = store.list(PACK_PREFIX).await?;
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        let gone = listed.len() < self.packs.len()
            || self.packs.iter().any(|p| {
                listed
                    .binary_search_by(|m| m.key.as_str().cmp(&p.key))
                    .is_err()
            });
        if gone {
            *self = Self::default();
        }
        self.unreadable.clear();
        for meta in listed {
            if self.by_key.contains_key(meta.key.as_str()) {
                continue;
            }
            match read_toc(store, &meta).await {
                Ok(entries) => self.add(PackInfo {
                    key: Arc::from(meta.key.as_str()),
                    size: meta.size,
                    modified: meta.modified,
                    entries,
                }),
                // Deleted between the listing and the read: the next refresh sees it.
                Err(Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(pack = %meta.key, error = %e, "a pack's table of contents is unreadable");
                    self.unreadable.push((meta.key, e.to_string()));
                }
            }
        }
        Ok(())
    }
}

/// What a store already has of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Known {
    /// The block it is stored as a delta against, if it is.
    pub(crate) base: Option<BlockId>,
    /// The length of its block object.
    pub(crate) len: u32,
}

/// What a [`PackWriter`] asks and tells about the blocks a store already has: the
/// service's [`crate::pack_index::SharedIndex`], or the map a GC rewrite starts empty.
#[async_trait::async_trait]
pub(crate) trait KnownBlocks: Send + Sync {
    /// What the store has of block `id`, `None` when it does not have it.
    async fn known(&self, id: &BlockId) -> Result<Option<Known>>;

    /// Makes the blocks of packs just stored known.
    async fn absorb(&self, packs: PackIndex) -> Result<()>;
}

#[async_trait::async_trait]
impl KnownBlocks for tokio::sync::RwLock<PackMap> {
    async fn known(&self, id: &BlockId) -> Result<Option<Known>> {
        Ok(self.read().await.blocks.get(id).map(|l| Known {
            base: l.base,
            len: l.len,
        }))
    }

    async fn absorb(&self, packs: PackIndex) -> Result<()> {
        let packs = packs.into_packs()?;
        let mut map = self.write().await;
        for p in packs {
            map.add(p);
        }
        Ok(())
    }
}

/// Where a capture's new blocks go: appended to packs (one [`PackBuilder`] per
/// capture worker, so a table's blocks stay together), each pack stored in the
/// background once it reaches the pack size, at most two being stored at once.
/// A block the store or this capture already has is not added again.
///
/// The blocks of this writer's sealed packs are kept in an index of its own (on
/// disk past a bound, so a capture of any size holds little memory) and become
/// known to everyone only once every pack is stored ([`PackWriter::finish`]): no
/// other capture can reuse a block whose pack may never be stored.
pub(crate) struct PackWriter<'a> {
    store: &'a Arc<dyn BlockStore>,
    known: &'a dyn KnownBlocks,
    pack_size: usize,
    uploads: Arc<tokio::sync::Semaphore>,
    state: std::sync::Mutex<WriterState>,
}

#[derive(Default)]
struct WriterState {
    /// Blocks in packs not sealed yet.
    open: HashMap<BlockId, Known>,
    /// Blocks of the packs sealed.
    sealed: PackIndex,
    stored: u64,
    puts: tokio::task::JoinSet<Result<()>>,
}

impl<'a> PackWriter<'a> {
    pub(crate) fn new(
        store: &'a Arc<dyn BlockStore>,
        known: &'a dyn KnownBlocks,
        pack_size: u32,
    ) -> Self {
        Self {
            store,
            known,
            pack_size: pack_size as usize,
            uploads: Arc::new(tokio::sync::Semaphore::new(2)),
            state: std::sync::Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WriterState> {
        // A panic while holding this lock cannot leave it inconsistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What this writer has of block `id` (open or sealed).
    fn own(&self, id: &BlockId) -> Result<Option<Known>> {
        let state = self.state();
        if let Some(k) = state.open.get(id) {
            return Ok(Some(*k));
        }
        Ok(state.sealed.lookup(id)?.map(|(loc, base)| Known {
            base,
            len: u32::try_from(loc.len).unwrap_or(u32::MAX),
        }))
    }

    /// What the store or this capture has of block `id`.
    pub(crate) async fn lookup(&self, id: &BlockId) -> Result<Option<Known>> {
        if let Some(found) = self.own(id)? {
            return Ok(Some(found));
        }
        self.known.known(id).await
    }

    /// Adds block object `object` of block `id` to `pack` unless the store or this
    /// capture already has the block; returns whether it was added.
    pub(crate) async fn add(
        &self,
        pack: &mut PackBuilder,
        id: BlockId,
        object: &[u8],
    ) -> Result<bool> {
        let new = self.known.known(&id).await?.is_none() && {
            let mut state = self.state();
            if state.open.contains_key(&id) || state.sealed.lookup(&id)?.is_some() {
                false
            } else {
                state.open.insert(
                    id,
                    Known {
                        base: crate::format::delta_base(object),
                        len: u32::try_from(object.len()).unwrap_or(u32::MAX),
                    },
                );
                true
            }
        };
        if !new {
            metrics::counter!("sanare_snapshot_blocks_deduplicated_total").increment(1);
            return Ok(false);
        }
        pack.push(id, object)?;
        metrics::counter!("sanare_snapshot_blocks_written_total").increment(1);
        if pack.len() >= self.pack_size {
            self.flush(pack).await?;
        }
        Ok(true)
    }

    /// Seals `pack` (unless empty) and starts storing it; `pack` starts over.
    pub(crate) async fn flush(&self, pack: &mut PackBuilder) -> Result<()> {
        if pack.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(pack, PackBuilder::new());
        let sealed = tokio::task::spawn_blocking(move || full.seal())
            .await
            .map_err(|e| Error::other("sealing a pack", e))??;
        let permit = Arc::clone(&self.uploads)
            .acquire_owned()
            .await
            .map_err(|e| Error::other("waiting to store a pack", e))?;
        let size = sealed.bytes.len() as u64;
        let store = Arc::clone(self.store);
        let mut state = self.state();
        state.sealed.add(
            crate::pack_index::PackMeta {
                key: Arc::from(sealed.key.as_str()),
                size,
                modified: OffsetDateTime::now_utc(),
            },
            &sealed.entries,
        )?;
        for e in &sealed.entries {
            state.open.remove(&e.id);
        }
        state.stored += size;
        let (key, bytes) = (sealed.key, sealed.bytes);
        state.puts.spawn(async move {
            let _permit = permit;
            store.put(&key, bytes).await
        });
        Ok(())
    }

    /// Waits until every pack is stored, then makes their blocks known; returns
    /// the bytes stored. Dropping the writer instead abandons the packs still being
    /// stored (GC removes what was stored).
    pub(crate) async fn finish(self) -> Result<u64> {
        let (mut puts, sealed, stored) = {
            let mut state = self.state();
            (
                std::mem::take(&mut state.puts),
                std::mem::take(&mut state.sealed),
                state.stored,
            )
        };
        while let Some(put) = puts.join_next().await {
            put.map_err(|e| Error::other("storing a pack", e))??;
        }
        self.known.absorb(sealed).await?;
        Ok(stored)
    }
}

/// Consecutive blocks of one object read with one range read.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) key: String,
    pub(crate) range: Range<u64>,
    /// Each block and its range within `range`.
    pub(crate) blocks: Vec<(BlockId, Range<usize>)>,
}

/// Groups located blocks, in order, into runs of adjacent blocks of the same object
/// of at most `max` bytes.
pub(crate) fn runs(located: Vec<(BlockId, BlockLocation)>, max: u64) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (id, loc) in located {
        let end = loc.offset + loc.len;
        if let Some(run) = out.last_mut()
            && run.key == loc.key
            && run.range.end == loc.offset
            && end - run.range.start <= max
        {
            let from = (loc.offset - run.range.start) as usize;
            run.blocks.push((id, from..from + loc.len as usize));
            run.range.end = end;
            continue;
        }
        out.push(Run {
            key: loc.key,
            range: loc.offset..end,
            blocks: vec![(id, 0..loc.len as usize)],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> BlockId {
        BlockId([n; 32])
    }

    #[test]
    fn a_pack_round_trips_through_its_tail() {
        let mut b = PackBuilder::new();
        b.push(id(1), b"first block").unwrap();
        b.push(id(2), b"second").unwrap();
        let pack = b.seal().unwrap();
        assert!(pack.key.starts_with("packs/"));
        let size = pack.bytes.len() as u64;
        let Tail::Entries(entries) = parse_tail(&pack.key, size, &pack.bytes).unwrap() else {
            panic!("the whole pack holds its table of contents")
        };
        assert_eq!(entries, pack.entries);
        for (e, want) in entries.iter().zip([&b"first block"[..], b"second"]) {
            assert_eq!(&pack.bytes[e.offset as usize..][..e.len as usize], want);
        }
        // Too short a tail asks for exactly what it needs.
        match parse_tail(&pack.key, size, &pack.bytes[pack.bytes.len() - 10..]).unwrap() {
            Tail::NeedLast(n) => {
                assert!(n > 10 && n < size);
                let tail = &pack.bytes[pack.bytes.len() - n as usize..];
                assert!(matches!(
                    parse_tail(&pack.key, size, tail).unwrap(),
                    Tail::Entries(_)
                ));
            }
            Tail::Entries(_) => panic!("10 bytes cannot hold the table"),
        }
    }

    #[test]
    fn pack_golden_vector() {
        let mut b = PackBuilder::new();
        b.push(id(7), b"abc").unwrap();
        let pack = b.seal().unwrap();
        let hex: String = pack.bytes.iter().map(|b| format!("{b:02x}")).collect();
        // Magic, version 2, reserved; the block ("abc"); the table of contents
        // (SNPT, version 2, 36 body bytes: one entry of id, offset 8, length 3, no
        // base; blake3); its length (78); the magic again.
        assert_eq!(
            hex,
            "534e504b02000000\
             616263\
             534e5054020024000000\
             010707070707070707070707070707070707070707070707070707070707070707\
             080300\
             52c8d307811a6fedf2ff269ba4bd5fef575a6debd80beeef4bedb40aa6a79437\
             4e000000534e504b"
        );
        assert_eq!(pack.bytes.len(), 8 + 3 + 78 + 8);
        assert_eq!(
            pack.key,
            format!(
                "packs/{}/{}",
                &blake3::hash(&pack.bytes).to_hex()[..2],
                blake3::hash(&pack.bytes).to_hex()
            )
        );
        // A block stored as a delta: its entry names its base.
        let mut b = PackBuilder::new();
        let delta = crate::format::encode_delta(b"abcd", &id(5), b"abc").unwrap();
        b.push(id(6), &delta).unwrap();
        assert_eq!(b.seal().unwrap().entries[0].base, Some(id(5)));
    }

    /// A pack of version 1, as written before deltas: still read.
    #[test]
    fn a_version_1_pack_is_still_read() {
        let v1 = "534e504b01000000\
             616263\
             534e5054010023000000\
             010707070707070707070707070707070707070707070707070707070707070707\
             0803\
             8bd75cb4d65d0408ed5f962f6ce7b503b1bb9da835c28fc7292823c9720b6156\
             4d000000534e504b";
        let bytes: Vec<u8> = (0..v1.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&v1[i..i + 2], 16).unwrap())
            .collect();
        let Tail::Entries(entries) = parse_tail("v1", bytes.len() as u64, &bytes).unwrap() else {
            panic!("the whole pack holds its table of contents")
        };
        assert_eq!(
            entries,
            [PackEntry {
                id: id(7),
                offset: 8,
                len: 3,
                base: None
            }]
        );
    }

    #[test]
    fn damaged_tails_are_refused() {
        let mut b = PackBuilder::new();
        b.push(id(1), b"block").unwrap();
        let pack = b.seal().unwrap();
        let size = pack.bytes.len() as u64;
        let mut flipped = pack.bytes.to_vec();
        let at = flipped.len() - 20;
        flipped[at] ^= 1;
        assert!(parse_tail("k", size, &flipped).is_err());
        let truncated = &pack.bytes[..pack.bytes.len() - 1];
        assert!(parse_tail("k", size - 1, truncated).is_err());
        assert!(parse_tail("k", 3, b"abc").is_err());
        // A length pointing before the start of the pack.
        let mut long = pack.bytes.to_vec();
        let n = long.len();
        long[n - 8..n - 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_tail("k", size, &long).is_err());
        // A length longer than any table of contents, in a pack that large: refused
        // before asking for that much of its end.
        let err = parse_tail("k", 1 << 32, &long).unwrap_err().to_string();
        assert!(err.contains("more than any pack has"), "{err}");
    }

    #[test]
    fn runs_join_adjacent_blocks_of_one_object_up_to_a_size() {
        let loc = |key: &str, offset: u64, len: u64| BlockLocation {
            key: key.into(),
            offset,
            len,
        };
        let runs = runs(
            vec![
                (id(1), loc("a", 8, 10)),
                (id(2), loc("a", 18, 10)),
                (id(3), loc("a", 40, 10)), // a gap
                (id(4), loc("b", 50, 10)), // another object
                (id(5), loc("b", 60, 30)), // over the limit of 35
            ],
            35,
        );
        let shape: Vec<(String, Range<u64>, usize)> = runs
            .iter()
            .map(|r| (r.key.clone(), r.range.clone(), r.blocks.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("a".into(), 8..28, 2),
                ("a".into(), 40..50, 1),
                ("b".into(), 50..60, 1),
                ("b".into(), 60..90, 1),
            ]
        );
        assert_eq!(runs[0].blocks[1].1, 10..20);
    }
}
