//! A table's rows into stored blocks, in bounded memory.
//!
//! Blocks come from the chunker in row order, a batch at a time. Each is named by
//! its hash; a block the store (or this capture) already has is only referenced. A
//! new block is compared with its predecessor, the block of the previous snapshot's
//! copy of the table that held the same rows: the old block whose key filter holds
//! the new block's first key among the next few old blocks (for a table without a
//! key, the next old block). When the delta against the predecessor (what the two
//! share in front and behind by length, the rest by LZ4 with the predecessor's
//! rest as dictionary: [`crate::format::encode_delta`]) is under half the size of
//! the block compressed alone, the block is stored as that delta: an update of 1 %
//! of the rows spread over a table changes most blocks, by a row or two each.
//!
//! A predecessor stored as a delta lends its own base instead, so a delta's base is
//! always a whole block (read with one more block, never a chain); a delta that has
//! grown past half of the whole block is stored whole again, and becomes the base
//! of the next ones.
//!
//! References are cut into groups as they come ([`GroupBuilder`]), each group stored
//! at once (as a delta against the previous snapshot's group of the same rows when
//! that pays), so no table's references are held whole; every id referenced goes
//! to a [`Spill`] that counts the distinct ones for the manifest.

use std::collections::VecDeque;

use super::*;
use crate::format::{GroupBuilder, GroupRef, decode_group, encode_delta, encode_group};
use crate::pack::Known;
use crate::sorted::Spill;

/// Old blocks searched for a new block's predecessor, on each side of the cursor.
const WINDOW: usize = 64;

/// A block of the previous snapshot's copy of a table, with the group it is in.
#[derive(Clone, Debug)]
struct OldBlock {
    r: BlockRef,
    group: usize,
}

/// The blocks of the previous snapshot's copy of a table, read group by group,
/// with a cursor at the first old block no new block has followed yet.
///
/// A new block's predecessor is found by its keys near the cursor: the old blocks
/// whose key filters hold its first key and its last key, the nearer to the cursor
/// of the two (a block whose start moved into the old block before the cursor, or
/// whose end moved into the one after it, still follows the old block at the
/// cursor), else the old block at the cursor. Nearest wins, so a filter's false
/// positive farther away never pulls the cursor off, and the cursor moves back as
/// well as forward within the window.
pub(super) struct Predecessors<'a> {
    snaps: &'a Snapshots,
    snapshot: SnapshotId,
    groups: std::vec::IntoIter<GroupRef>,
    inline: std::vec::IntoIter<BlockRef>,
    /// The groups read so far.
    read: Vec<GroupRef>,
    /// Up to `WINDOW` blocks before the cursor and `WINDOW` from it.
    window: VecDeque<OldBlock>,
    cursor: usize,
}

impl<'a> Predecessors<'a> {
    /// The blocks of `table` (of the index of `snapshot`, groups not yet read).
    pub(super) fn new(snaps: &'a Snapshots, snapshot: SnapshotId, table: &TableIndex) -> Self {
        Self {
            snaps,
            snapshot,
            groups: table.groups.clone().into_iter(),
            inline: table.blocks.clone().into_iter(),
            read: Vec::new(),
            window: VecDeque::new(),
            cursor: 0,
        }
    }

    /// Reads groups until `WINDOW` blocks lie from the cursor on or the table
    /// ends, and forgets blocks more than `WINDOW` before it. A group that cannot
    /// be read ends the predecessors (the capture stores whole blocks).
    async fn fill(&mut self) {
        while self.cursor > WINDOW {
            self.window.pop_front();
            self.cursor -= 1;
        }
        while self.window.len() < self.cursor + WINDOW {
            if let Some(r) = self.inline.next() {
                self.window.push_back(OldBlock {
                    r,
                    group: usize::MAX,
                });
                continue;
            }
            let Some(g) = self.groups.next() else { return };
            let refs = match self.snaps.read_block(self.snapshot, g.id).await {
                Ok(content) => decode_group(&g.id, &content),
                Err(e) => Err(e),
            };
            match refs {
                Ok(refs) => {
                    let group = self.read.len();
                    self.read.push(g);
                    self.window
                        .extend(refs.into_iter().map(|r| OldBlock { r, group }));
                }
                Err(e) => {
                    tracing::warn!(snapshot = %self.snapshot, error = %e, "the previous snapshot's blocks cannot be read: storing whole blocks");
                    self.groups = Vec::new().into_iter();
                    return;
                }
            }
        }
    }

    /// The position nearest the cursor (from it first, then before it) of an old
    /// block for which `hit` holds.
    fn nearest(&self, hit: impl Fn(&OldBlock) -> bool) -> Option<usize> {
        let c = self.cursor;
        (0..WINDOW).find_map(|d| {
            let ahead = (c + d < self.window.len() && hit(&self.window[c + d])).then_some(c + d);
            let behind = (d > 0 && d <= c && hit(&self.window[c - d])).then(|| c - d);
            ahead.or(behind)
        })
    }

    /// Moves the cursor past block `id` when it is near (an unchanged block);
    /// returns the group it was in.
    async fn skip(&mut self, id: &BlockId) -> Option<usize> {
        self.fill().await;
        let p = self.nearest(|o| o.r.id == *id)?;
        self.cursor = p + 1;
        Some(self.window[p].group)
    }

    /// The old block a changed block with first and last keys `keys` most likely
    /// replaces; the cursor moves past it.
    async fn take(&mut self, keys: (Option<&[u8; 32]>, Option<&[u8; 32]>)) -> Option<OldBlock> {
        self.fill().await;
        let near = |k: Option<&[u8; 32]>| {
            k.and_then(|k| self.nearest(|o| bloom::may_contain(&o.r.key_filter, k)))
        };
        let c = self.cursor;
        let p = [near(keys.0), near(keys.1)]
            .into_iter()
            .flatten()
            .min_by_key(|&p| (p.abs_diff(c), p < c))
            .unwrap_or(c);
        let old = self.window.get(p)?.clone();
        self.cursor = p + 1;
        Some(old)
    }

    /// Group `n` of those read.
    fn group(&self, n: usize) -> Option<GroupRef> {
        self.read.get(n).copied()
    }
}

/// What a block of a batch becomes.
enum Step {
    /// Stored already: referenced.
    Known(BlockRef, Option<usize>),
    /// New: stored whole, or as a delta against `dict` when that pays.
    New {
        block: RowBlock,
        id: BlockId,
        /// The whole block lent as dictionary (the predecessor, or its base).
        dict: Option<BlockId>,
        group: Option<usize>,
    },
}

/// A table's blocks on their way to the store (see the module docs).
pub(super) struct TableBlocks<'a> {
    snaps: &'a Snapshots,
    writer: &'a PackWriter<'a>,
    ids: &'a std::sync::Mutex<Spill<32>>,
    preds: Option<Predecessors<'a>>,
    codec: Codec,
    builder: GroupBuilder,
    /// The old group lined up with the group being built (that of its first block).
    group_pred: Option<usize>,
    /// The table's groups so far.
    pub(super) groups: Vec<GroupRef>,
    /// Rows, uncompressed bytes, compressed bytes referenced.
    pub(super) rows: u64,
    pub(super) raw_bytes: u64,
    pub(super) compressed: u64,
}

impl<'a> TableBlocks<'a> {
    pub(super) fn new(
        snaps: &'a Snapshots,
        writer: &'a PackWriter<'a>,
        ids: &'a std::sync::Mutex<Spill<32>>,
        preds: Option<Predecessors<'a>>,
    ) -> Self {
        Self {
            snaps,
            writer,
            ids,
            preds,
            codec: snaps.inner.config.codec,
            builder: GroupBuilder::default(),
            group_pred: None,
            groups: Vec::new(),
            rows: 0,
            raw_bytes: 0,
            compressed: 0,
        }
    }

    fn remember(&self, id: &BlockId, base: Option<BlockId>) -> Result<()> {
        let mut ids = self
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ids.push(id.0)?;
        if let Some(b) = base {
            ids.push(b.0)?;
        }
        Ok(())
    }

    /// Stores (or references) a batch of consecutive blocks: data blocks into
    /// `packs.0`, the groups they complete into `packs.1` (groups apart, so a
    /// snapshot's index is read back in few reads).
    pub(super) async fn push(
        &mut self,
        packs: (&mut PackBuilder, &mut PackBuilder),
        batch: Vec<RowBlock>,
    ) -> Result<()> {
        let (pack, group_pack) = packs;
        let hashed = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .map(|b| {
                    let id = BlockId::of(&b.content);
                    (b, id)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::other("hashing blocks", e))?;
        let mut steps = Vec::with_capacity(hashed.len());
        for (block, id) in hashed {
            self.rows += u64::from(block.rows);
            self.raw_bytes += block.content.len() as u64;
            match self.writer.lookup(&id).await? {
                Some(known) => {
                    let group = match &mut self.preds {
                        Some(p) => p.skip(&id).await,
                        None => None,
                    };
                    self.compressed += u64::from(known.len);
                    steps.push(Step::Known(block_ref(&block, id, known.base), group));
                }
                None => {
                    let old = match &mut self.preds {
                        Some(p) => {
                            p.take((block.first_key.as_ref(), block.last_key.as_ref()))
                                .await
                        }
                        None => None,
                    };
                    // (A block never its own base: a block the index does not know
                    // may still be stored, loose, by a version before packs.)
                    steps.push(Step::New {
                        dict: old
                            .as_ref()
                            .map(|o| o.r.base.unwrap_or(o.r.id))
                            .filter(|d| *d != id),
                        group: old.map(|o| o.group),
                        block,
                        id,
                    });
                }
            }
        }
        let dicts = self
            .dictionaries(steps.iter().filter_map(|s| match s {
                Step::New { dict, .. } => *dict,
                Step::Known(..) => None,
            }))
            .await;
        let codec = self.codec;
        let encoded = futures_util::future::try_join_all(steps.into_iter().map(|step| {
            let dicts = Arc::clone(&dicts);
            async move {
                match step {
                    Step::Known(r, group) => Ok((r, group, None)),
                    Step::New {
                        block,
                        id,
                        dict,
                        group,
                    } => tokio::task::spawn_blocking(move || {
                        let dict = dict.and_then(|d| dicts.get(&d).map(|c| (d, c.as_slice())));
                        let (object, base) = encode_with(&block.content, codec, dict)?;
                        Ok((block_ref(&block, id, base), group, Some(object)))
                    })
                    .await
                    .map_err(|e| Error::other("compressing a block", e))?,
                }
            }
        }))
        .await?;
        for (mut r, group, object) in encoded {
            if let Some(object) = object {
                self.compressed += object.len() as u64;
                if !self.writer.add(pack, r.id, &object).await? {
                    // Stored meanwhile by another worker of this capture: as it is.
                    r.base = self.writer.lookup(&r.id).await?.and_then(|k| k.base);
                }
            }
            self.add_ref(group_pack, r, group).await?;
        }
        Ok(())
    }

    /// The contents of the dictionaries `ids` (of the previous snapshot), those
    /// that can be read.
    async fn dictionaries(
        &self,
        ids: impl Iterator<Item = BlockId>,
    ) -> Arc<HashMap<BlockId, Vec<u8>>> {
        let ids: Vec<BlockId> = ids.collect::<BTreeSet<_>>().into_iter().collect();
        let mut out = HashMap::new();
        if let Some(p) = &self.preds
            && !ids.is_empty()
        {
            let contents = self.snaps.read_blocks(p.snapshot, ids.clone());
            futures_util::pin_mut!(contents);
            let mut ids = ids.into_iter();
            while let (Some(c), Some(id)) = (contents.next().await, ids.next()) {
                match c {
                    Ok(c) => {
                        out.insert(id, c);
                    }
                    Err(e) => {
                        tracing::debug!(block = %id, error = %e, "a predecessor cannot be read: storing the block whole");
                    }
                }
            }
        }
        Arc::new(out)
    }

    /// Adds a reference to the group being built, storing the group it completes
    /// into `pack`.
    async fn add_ref(
        &mut self,
        pack: &mut PackBuilder,
        r: BlockRef,
        group: Option<usize>,
    ) -> Result<()> {
        self.remember(&r.id, r.base)?;
        if self.builder.is_empty() {
            self.group_pred = group;
        }
        if let Some(g) = self.builder.push(r) {
            self.store_group(pack, g).await?;
        }
        Ok(())
    }

    /// Stores a group of references (as a delta against the previous snapshot's
    /// group of the same rows when that pays).
    async fn store_group(&mut self, pack: &mut PackBuilder, refs: Vec<BlockRef>) -> Result<()> {
        let blocks = u32::try_from(refs.len()).unwrap_or(u32::MAX);
        let content = encode_group(&refs)?;
        let id = BlockId::of(&content);
        let gref = match self.writer.lookup(&id).await? {
            Some(Known { base, len }) => {
                self.compressed += u64::from(len);
                GroupRef { id, blocks, base }
            }
            None => {
                let dict = self
                    .group_pred
                    .and_then(|g| self.preds.as_ref()?.group(g))
                    .map(|g| g.base.unwrap_or(g.id))
                    .filter(|d| *d != id);
                let dicts = self.dictionaries(dict.into_iter()).await;
                let codec = self.codec;
                let (object, base) = tokio::task::spawn_blocking(move || {
                    let dict = dict.and_then(|d| dicts.get(&d).map(|c| (d, c.as_slice())));
                    encode_with(&content, codec, dict)
                })
                .await
                .map_err(|e| Error::other("compressing a group of block references", e))??;
                self.compressed += object.len() as u64;
                let base = if self.writer.add(pack, id, &object).await? {
                    base
                } else {
                    self.writer.lookup(&id).await?.and_then(|k| k.base)
                };
                GroupRef { id, blocks, base }
            }
        };
        self.remember(&gref.id, gref.base)?;
        self.groups.push(gref);
        Ok(())
    }

    /// Stores the last group into `pack`; returns the table's groups.
    pub(super) async fn finish(mut self, pack: &mut PackBuilder) -> Result<Self> {
        if let Some(g) = std::mem::take(&mut self.builder).finish() {
            self.store_group(pack, g).await?;
        }
        Ok(self)
    }
}

fn block_ref(block: &RowBlock, id: BlockId, base: Option<BlockId>) -> BlockRef {
    BlockRef {
        id,
        raw_len: u32::try_from(block.content.len()).unwrap_or(u32::MAX),
        rows: block.rows,
        key_filter: block.key_filter.clone(),
        base,
    }
}

/// `content` compressed alone with `codec`, or as a delta against `dict` (a whole
/// block and its content) when that is under half the size; returns the object and
/// the delta's base.
fn encode_with(
    content: &[u8],
    codec: Codec,
    dict: Option<(BlockId, &[u8])>,
) -> Result<(Vec<u8>, Option<BlockId>)> {
    let whole = encode_block(content, codec)?;
    if let Some((base, dict)) = dict {
        let delta = encode_delta(content, &base, dict)?;
        if delta.len() * 2 < whole.len() {
            return Ok((delta, Some(base)));
        }
    }
    Ok((whole, None))
}
