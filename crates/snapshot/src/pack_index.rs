//! Where every block of a repository is, in bounded memory: the entries of every
//! pack's table of contents (block id, pack, offset, length, delta base) in sorted
//! files on local disk, searched by binary search over an in-memory fence (see
//! [`crate::sorted`]). A repository of 100 GB of blocks (about 17 million entries)
//! takes about 1.3 GB of temporary disk and a few MB of memory, where a map in
//! memory took several GB.
//!
//! Capture asks it whether each new block is already stored (and if so, against
//! which base, when it is a delta); restore and rows by key ask where blocks are.
//! It is built from the packs' tables of contents (the store alone says where every
//! block is), brought up to date by reading only the packs it does not know, and
//! rebuilt when a pack it knows is gone (GC deleted or rewrote it) or when a capture
//! that added packs to it failed before they were all stored.
//!
//! Layout: packs just added live in a small map in memory; past
//! [`RECENT_MAX`] entries they are spilled to a sorted run file; past
//! [`SMALL_RUNS_MAX`] such runs those are merged into one. A build from scratch
//! spills every table of contents and merges once into a single run.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use sanare_core::{Error, Result};
use time::OffsetDateTime;

use crate::format::BlockId;
use crate::pack::{BlockLocation, PACK_PREFIX, PackEntry, PackInfo, read_toc};
use crate::sorted::{RunFile, RunWriter, Spill, TempDir, merge_runs};
use crate::store::{BlockStore, ObjectMeta};

/// Bytes of one entry on disk: id (32), pack (u32 LE), offset (u32 LE), length
/// (u32 LE), whether a base follows (u8), base (32).
const REC: usize = 77;
/// Entries kept in memory before they are spilled to a run file (about 8 MB).
pub(crate) const RECENT_MAX: usize = 1 << 16;
/// Run files kept before the small ones are merged into one.
pub(crate) const SMALL_RUNS_MAX: usize = 8;
/// Entries sorted in memory at a time while building from scratch (about 20 MB).
const BUILD_BATCH: usize = 1 << 18;

/// The bounds above, smaller in tests.
#[derive(Clone, Copy, Debug)]
struct Limits {
    recent_max: usize,
    small_runs_max: usize,
    build_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            recent_max: RECENT_MAX,
            small_runs_max: SMALL_RUNS_MAX,
            build_batch: BUILD_BATCH,
        }
    }
}
/// Tables of contents read at once while building.
const TOC_READS: usize = 16;

/// Where a block is and what it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pack: u32,
    offset: u32,
    len: u32,
    /// The block it is a delta against, if it is.
    pub(crate) base: Option<BlockId>,
}

fn encode(id: &BlockId, e: &Entry) -> [u8; REC] {
    let mut r = [0u8; REC];
    r[..32].copy_from_slice(&id.0);
    r[32..36].copy_from_slice(&e.pack.to_le_bytes());
    r[36..40].copy_from_slice(&e.offset.to_le_bytes());
    r[40..44].copy_from_slice(&e.len.to_le_bytes());
    if let Some(b) = e.base {
        r[44] = 1;
        r[45..].copy_from_slice(&b.0);
    }
    r
}

fn decode(r: &[u8; REC]) -> Entry {
    let u = |at: usize| u32::from_le_bytes([r[at], r[at + 1], r[at + 2], r[at + 3]]);
    let base = (r[44] == 1).then(|| {
        let mut b = [0u8; 32];
        b.copy_from_slice(&r[45..]);
        BlockId(b)
    });
    Entry {
        pack: u(32),
        offset: u(36),
        len: u(40),
        base,
    }
}

/// A pack the index knows.
#[derive(Clone, Debug)]
pub(crate) struct PackMeta {
    pub(crate) key: Arc<str>,
    pub(crate) size: u64,
    pub(crate) modified: OffsetDateTime,
}

/// Every block in every pack of a store (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct PackIndex {
    dir: TempDir,
    limits: Limits,
    packs: Vec<PackMeta>,
    by_key: HashMap<Arc<str>, u32>,
    runs: Vec<RunFile<REC>>,
    recent: HashMap<BlockId, Entry>,
    entries: u64,
    /// Packs whose table of contents could not be read, with why.
    pub(crate) unreadable: Vec<(String, String)>,
}

impl PackIndex {
    /// Where `id` is and its base, if the index has it.
    pub(crate) fn lookup(&self, id: &BlockId) -> Result<Option<(BlockLocation, Option<BlockId>)>> {
        let entry = match self.recent.get(id) {
            Some(e) => Some(*e),
            None => {
                let mut found = None;
                // Newest first; any copy of a block is as good as another.
                for run in self.runs.iter().rev() {
                    if let Some(r) = run.find(&id.0)? {
                        found = Some(decode(&r));
                        break;
                    }
                }
                found
            }
        };
        Ok(entry.and_then(|e| {
            let pack = self.packs.get(e.pack as usize)?;
            Some((
                BlockLocation {
                    key: pack.key.to_string(),
                    offset: u64::from(e.offset),
                    len: u64::from(e.len),
                },
                e.base,
            ))
        }))
    }

    /// Entries known (a block stored in two packs counts twice).
    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.entries
    }

    /// The pack stored under `key`, if known.
    #[cfg(test)]
    pub(crate) fn pack(&self, key: &str) -> Option<&PackMeta> {
        self.packs.get(*self.by_key.get(key)? as usize)
    }

    /// Adds a pack and its entries (a pack already known is left as it is).
    pub(crate) fn add(&mut self, meta: PackMeta, entries: &[PackEntry]) -> Result<()> {
        let Some(n) = self.add_meta(meta) else {
            return Ok(());
        };
        for e in entries {
            self.recent.entry(e.id).or_insert(Entry {
                pack: n,
                offset: e.offset,
                len: e.len,
                base: e.base,
            });
            self.entries += 1;
        }
        if self.recent.len() >= self.limits.recent_max {
            self.spill()?;
        }
        Ok(())
    }

    fn add_meta(&mut self, meta: PackMeta) -> Option<u32> {
        if self.by_key.contains_key(&meta.key) {
            return None;
        }
        let n = u32::try_from(self.packs.len()).ok()?;
        self.by_key.insert(meta.key.clone(), n);
        self.packs.push(meta);
        Some(n)
    }

    /// Moves the recent entries to a run file; merges the small runs into one when
    /// there are too many (the largest, oldest run stays unless the others add up
    /// to a quarter of it).
    fn spill(&mut self) -> Result<()> {
        let mut recs: Vec<[u8; REC]> = self.recent.drain().map(|(id, e)| encode(&id, &e)).collect();
        recs.sort_unstable();
        self.runs.push(RunFile::write(&self.dir, 32, recs)?);
        if self.runs.len() > self.limits.small_runs_max {
            let small: u64 = self.runs[1..].iter().map(RunFile::len).sum();
            let from = if small * 4 >= self.runs[0].len() {
                0
            } else {
                1
            };
            let merged = merge_runs(&self.dir, 32, &self.runs[from..])?;
            self.runs.truncate(from);
            self.runs.push(merged);
        }
        Ok(())
    }

    /// Takes in every pack and entry of `other` (its pack numbers renumbered).
    pub(crate) fn absorb(&mut self, other: PackIndex) -> Result<()> {
        let numbers: Vec<Option<u32>> = other
            .packs
            .iter()
            .map(|p| self.add_meta(p.clone()))
            .collect();
        let mut take = |id: BlockId, e: Entry| -> Result<()> {
            // Packs this index knew already keep their own entries.
            let Some(Some(n)) = numbers.get(e.pack as usize).copied() else {
                return Ok(());
            };
            self.recent.entry(id).or_insert(Entry { pack: n, ..e });
            self.entries += 1;
            if self.recent.len() >= self.limits.recent_max {
                self.spill()?;
            }
            Ok(())
        };
        for (id, e) in &other.recent {
            take(*id, *e)?;
        }
        for run in &other.runs {
            for r in run.iter()? {
                let r = r?;
                let mut id = [0u8; 32];
                id.copy_from_slice(&r[..32]);
                take(BlockId(id), decode(&r))?;
            }
        }
        Ok(())
    }

    /// Every pack with its entries, in memory (for a small index: a GC rewrite's).
    pub(crate) fn into_packs(self) -> Result<Vec<PackInfo>> {
        let mut out: Vec<PackInfo> = self
            .packs
            .iter()
            .map(|p| PackInfo {
                key: p.key.clone(),
                size: p.size,
                modified: p.modified,
                entries: Vec::new(),
            })
            .collect();
        let mut put = |id: BlockId, e: Entry| {
            if let Some(p) = out.get_mut(e.pack as usize) {
                p.entries.push(PackEntry {
                    id,
                    offset: e.offset,
                    len: e.len,
                    base: e.base,
                });
            }
        };
        for (id, e) in &self.recent {
            put(*id, *e);
        }
        for run in &self.runs {
            for r in run.iter()? {
                let r = r?;
                let mut id = [0u8; 32];
                id.copy_from_slice(&r[..32]);
                put(BlockId(id), decode(&r));
            }
        }
        for p in &mut out {
            p.entries.sort_by_key(|e| e.offset);
        }
        Ok(out)
    }

    /// Brings the index up to the store: reads the tables of contents of packs it
    /// does not know, and starts over when a known pack is gone (or `rebuild`).
    pub(crate) async fn refresh(&mut self, store: &dyn BlockStore, rebuild: bool) -> Result<()> {
        let mut listed = store.list(PACK_PREFIX).await?;
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        let gone = listed.len() < self.packs.len()
            || self.packs.iter().any(|p| {
                listed
                    .binary_search_by(|m| m.key.as_str().cmp(&p.key))
                    .is_err()
            });
        let from_scratch = rebuild || gone || self.packs.is_empty();
        if from_scratch {
            *self = Self {
                dir: self.dir.clone(),
                limits: self.limits,
                ..Self::default()
            };
        }
        self.unreadable.clear();
        let new: Vec<ObjectMeta> = listed
            .into_iter()
            .filter(|m| !self.by_key.contains_key(m.key.as_str()))
            .collect();
        let mut tocs = futures_util::stream::iter(new)
            .map(|meta| async move {
                let toc = read_toc(store, &meta).await;
                (meta, toc)
            })
            .buffered(TOC_READS);
        let mut build =
            from_scratch.then(|| Spill::<REC>::new(self.dir.clone(), self.limits.build_batch));
        while let Some((meta, toc)) = tocs.next().await {
            let entries = match toc {
                Ok(e) => e,
                // Deleted between the listing and the read: the next refresh sees it.
                Err(Error::NotFound { .. }) => continue,
                Err(e) => {
                    tracing::warn!(pack = %meta.key, error = %e, "a pack's table of contents is unreadable");
                    self.unreadable.push((meta.key, e.to_string()));
                    continue;
                }
            };
            let info = PackMeta {
                key: Arc::from(meta.key.as_str()),
                size: meta.size,
                modified: meta.modified,
            };
            match &mut build {
                Some(spill) => {
                    let Some(n) = self.add_meta(info) else {
                        continue;
                    };
                    for e in &entries {
                        let entry = Entry {
                            pack: n,
                            offset: e.offset,
                            len: e.len,
                            base: e.base,
                        };
                        spill.push(encode(&e.id, &entry))?;
                        self.entries += 1;
                    }
                }
                None => self.add(info, &entries)?,
            }
        }
        if let Some(spill) = build {
            // One sorted run of everything; a block in two packs keeps both
            // entries, and a lookup takes the first.
            let mut w = RunWriter::new(&self.dir, 32)?;
            spill.merge(|r| w.push(&r))?;
            self.runs.push(w.finish()?);
        }
        Ok(())
    }
}

/// The service's [`PackIndex`], shared by its captures and readers.
#[derive(Debug, Default)]
pub(crate) struct SharedIndex {
    pub(crate) index: tokio::sync::RwLock<PackIndex>,
    loaded: AtomicBool,
}

impl SharedIndex {
    /// Brings the index up to the store.
    pub(crate) async fn refresh(&self, store: &dyn BlockStore) -> Result<()> {
        self.index.write().await.refresh(store, false).await?;
        self.loaded.store(true, Ordering::Release);
        Ok(())
    }

    /// Loads the index unless it is loaded.
    pub(crate) async fn ensure(&self, store: &dyn BlockStore) -> Result<()> {
        if !self.loaded.load(Ordering::Acquire) {
            self.refresh(store).await?;
        }
        Ok(())
    }

    /// Where each of `ids` is, with its base (`None`: not in a known pack).
    pub(crate) async fn locate(
        &self,
        ids: &[BlockId],
    ) -> Result<Vec<Option<(BlockLocation, Option<BlockId>)>>> {
        let index = self.index.read().await;
        ids.iter().map(|id| index.lookup(id)).collect()
    }
}

#[async_trait::async_trait]
impl crate::pack::KnownBlocks for SharedIndex {
    async fn known(&self, id: &BlockId) -> Result<Option<crate::pack::Known>> {
        Ok(self
            .index
            .read()
            .await
            .lookup(id)?
            .map(|(loc, base)| crate::pack::Known {
                base,
                len: u32::try_from(loc.len).unwrap_or(u32::MAX),
            }))
    }

    async fn absorb(&self, packs: PackIndex) -> Result<()> {
        self.index.write().await.absorb(packs)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::pack::PackBuilder;
    use crate::store::FsStore;

    fn small() -> PackIndex {
        PackIndex {
            limits: Limits {
                recent_max: 50,
                small_runs_max: 3,
                build_batch: 70,
            },
            ..PackIndex::default()
        }
    }

    /// Packs of `per` blocks each, block `i` of pack `p` with content `p:i`; every
    /// fifth block a delta. Returns each block's expected (pack key, base).
    async fn packs(
        store: &FsStore,
        range: std::ops::Range<u32>,
        per: u32,
    ) -> BTreeMap<BlockId, (String, Option<BlockId>)> {
        let mut out = BTreeMap::new();
        for p in range {
            let mut b = PackBuilder::new();
            let mut bases = Vec::new();
            for i in 0..per {
                let content = format!("{p}:{i}").into_bytes();
                let id = BlockId::of(&content);
                let base = BlockId::of(format!("base {i}").as_bytes());
                let object = if i % 5 == 0 {
                    crate::format::encode_delta(&content, &base, b"base").unwrap()
                } else {
                    crate::format::encode_block(&content, crate::format::Codec::Lz4).unwrap()
                };
                b.push(id, &object).unwrap();
                bases.push((id, (i % 5 == 0).then_some(base)));
            }
            let sealed = b.seal().unwrap();
            store.put(&sealed.key, sealed.bytes.clone()).await.unwrap();
            for (id, base) in bases {
                out.insert(id, (sealed.key.clone(), base));
            }
        }
        out
    }

    async fn check(index: &PackIndex, want: &BTreeMap<BlockId, (String, Option<BlockId>)>) {
        for (id, (key, base)) in want {
            let (loc, b) = index
                .lookup(id)
                .unwrap()
                .unwrap_or_else(|| panic!("{id} lost"));
            assert_eq!((&loc.key, &b), (key, base));
        }
        for i in 0..100u32 {
            assert!(
                index
                    .lookup(&BlockId::of(&i.to_le_bytes()))
                    .unwrap()
                    .is_none()
            );
        }
    }

    #[tokio::test]
    async fn built_from_scratch_spilled_and_merged_it_finds_every_block() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        let mut want = packs(&store, 0..12, 40).await;
        let mut index = small();
        index.refresh(&store, false).await.unwrap();
        assert_eq!(index.len(), 480);
        assert_eq!(index.runs.len(), 1, "one run from the build");
        assert!(index.recent.is_empty());
        check(&index, &want).await;

        // New packs: read alone, kept in memory, spilled, merged.
        want.extend(packs(&store, 12..30, 40).await);
        index.refresh(&store, false).await.unwrap();
        assert_eq!(index.len(), 1200);
        assert!(index.runs.len() <= 4, "{} runs", index.runs.len());
        check(&index, &want).await;

        // A pack gone: built again from the store alone.
        let (gone, _) = want.values().next().unwrap().clone();
        store.delete(&gone).await.unwrap();
        want.retain(|_, (k, _)| *k != gone);
        index.refresh(&store, false).await.unwrap();
        assert_eq!(index.len(), 1160);
        check(&index, &want).await;
        assert!(index.pack(&gone).is_none());
    }

    #[tokio::test]
    async fn a_writers_own_index_is_absorbed_with_its_packs_renumbered() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        let want = packs(&store, 0..10, 30).await;
        let mut shared = small();
        let mut own = small();
        own.refresh(&store, false).await.unwrap();
        // The shared one knows some packs already.
        let first: Vec<_> = store
            .list(PACK_PREFIX)
            .await
            .unwrap()
            .into_iter()
            .take(3)
            .collect();
        for m in &first {
            let entries = read_toc(&store, m).await.unwrap();
            shared
                .add(
                    PackMeta {
                        key: Arc::from(m.key.as_str()),
                        size: m.size,
                        modified: m.modified,
                    },
                    &entries,
                )
                .unwrap();
        }
        shared.absorb(own).unwrap();
        assert_eq!(shared.len(), 300);
        check(&shared, &want).await;
        let packs = shared.into_packs().unwrap();
        assert_eq!(packs.len(), 10);
        assert!(packs.iter().all(|p| p.entries.len() == 30));
    }
}
