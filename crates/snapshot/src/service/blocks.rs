//! Reading blocks: the pack map, locating, fetching and decoding.

use super::*;

impl Snapshots {
    /// The index of snapshot `id`, checked against its manifest, its tables' block
    /// references still in their groups (see [`Index::decode`]).
    pub(super) async fn read_index(&self, id: SnapshotId) -> Result<Index> {
        let manifest = self.load_manifest(id).await?;
        self.read_index_of(id, &manifest).await
    }

    /// The index `manifest` names, checked against its hash; block references
    /// still in their groups.
    pub(super) async fn read_index_of(&self, id: SnapshotId, manifest: &Manifest) -> Result<Index> {
        let bytes = self
            .inner
            .store
            .get(&index_key(id))
            .await?
            .ok_or_else(|| Error::corrupt(format!("snapshot {id}"), "its index is missing"))?;
        if blake3::hash(&bytes).as_bytes() != &manifest.index_hash {
            return Err(Error::corrupt(
                format!("snapshot {id}"),
                "its index does not match the hash in its manifest",
            ));
        }
        Index::decode(&bytes).map_err(|e| Error::corrupt(format!("snapshot {id}"), e.to_string()))
    }

    /// Loads the pack map unless it is loaded.
    pub(super) async fn ensure_packs(&self) -> Result<()> {
        if !self
            .inner
            .packs_loaded
            .load(std::sync::atomic::Ordering::Acquire)
        {
            self.refresh_packs().await?;
        }
        Ok(())
    }

    /// Brings the pack map up to the store.
    pub(super) async fn refresh_packs(&self) -> Result<()> {
        let mut map = self.inner.packs.write().await;
        map.refresh(&*self.inner.store).await?;
        self.inner
            .packs_loaded
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Brings the block index (what capture and the read paths use) up to the store.
    pub(super) async fn refresh_index(&self) -> Result<()> {
        self.inner.index.refresh(&*self.inner.store).await
    }

    /// Where each of `ids` is in a pack, from the block index (`None`: in none,
    /// maybe a loose block object of a repository written before packs). Refreshes
    /// the index once when one is not in it.
    pub(super) async fn locate_indexed(
        &self,
        ids: &[BlockId],
    ) -> Result<Vec<Option<BlockLocation>>> {
        let index = &self.inner.index;
        index.ensure(&*self.inner.store).await?;
        let mut out: Vec<Option<BlockLocation>> = index
            .locate(ids)
            .await?
            .into_iter()
            .map(|l| l.map(|(loc, _)| loc))
            .collect();
        if out.iter().any(Option::is_none) {
            self.refresh_index().await?;
            let again = index.locate(ids).await?;
            for (slot, found) in out.iter_mut().zip(again) {
                if slot.is_none() {
                    *slot = found.map(|(loc, _)| loc);
                }
            }
        }
        Ok(out)
    }

    /// Where each of `ids` is in a pack (`None`: in none, maybe a loose block
    /// object of a repository written before packs). Refreshes the map once when
    /// one is not in it.
    pub(super) async fn locate_all(&self, ids: &[BlockId]) -> Result<Vec<Option<BlockLocation>>> {
        self.ensure_packs().await?;
        let mut out: Vec<Option<BlockLocation>> = {
            let map = self.inner.packs.read().await;
            ids.iter().map(|id| map.locate(id)).collect()
        };
        if out.iter().any(Option::is_none) {
            self.refresh_packs().await?;
            let map = self.inner.packs.read().await;
            for (slot, id) in out.iter_mut().zip(ids) {
                if slot.is_none() {
                    *slot = map.locate(id);
                }
            }
        }
        Ok(out)
    }

    /// Every block snapshot `id` references (table blocks, index groups, state
    /// source blocks, the block of its DDL).
    pub async fn block_ids(&self, id: SnapshotId) -> Result<BTreeSet<BlockId>> {
        let mut ids = self.load_index(id).await?.block_ids();
        ids.extend(self.load_manifest(id).await?.ddl);
        Ok(ids)
    }

    /// Where block `id` lives in the store: the pack holding it, or its own object
    /// in a repository written before packs; `None` when the store does not have it.
    pub async fn locate(&self, id: BlockId) -> Result<Option<BlockLocation>> {
        if let Some(loc) = self.locate_indexed(&[id]).await?.pop().flatten() {
            return Ok(Some(loc));
        }
        let key = id.key();
        Ok(self
            .inner
            .store
            .list(&key)
            .await?
            .into_iter()
            .find(|o| o.key == key)
            .map(|o| BlockLocation {
                key,
                offset: 0,
                len: o.size,
            }))
    }

    /// Reads what `fetch` names: each block with its content, or why not
    /// ([`Error::NotFound`] when the store does not have it, [`Error::Corrupt`] when
    /// it is damaged). A block stored as a delta is read with its base. The outer
    /// error is a store failure unrelated to one block.
    pub(super) async fn fetch(&self, fetch: Fetch) -> Result<Vec<(BlockId, Result<Vec<u8>>)>> {
        let raw = self.fetch_raw(fetch).await?;
        if !raw.iter().any(|(_, r)| matches!(r, Ok(Raw::Delta { .. }))) {
            return Ok(raw
                .into_iter()
                .map(|(id, r)| (id, r.map(Raw::into_content)))
                .collect());
        }
        // The bases, each a whole block (a delta is never the base of another).
        let bases: Vec<BlockId> = raw
            .iter()
            .filter_map(|(_, r)| match r {
                Ok(Raw::Delta { base, .. }) => Some(*base),
                _ => None,
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let locs = self.locate_indexed(&bases).await?;
        let mut contents: HashMap<BlockId, Result<Vec<u8>>> = HashMap::new();
        for f in plan(bases.into_iter().zip(locs)) {
            for (id, got) in Box::pin(self.fetch_raw(f)).await? {
                let got = got.and_then(|r| match r {
                    Raw::Content(c) => Ok(c),
                    Raw::Delta { .. } => Err(Error::corrupt(
                        format!("block {id}"),
                        "it is the base of a delta and a delta itself",
                    )),
                });
                contents.insert(id, got);
            }
        }
        let contents = Arc::new(contents);
        tokio::task::spawn_blocking(move || {
            raw.into_iter()
                .map(|(id, r)| {
                    let got = r.and_then(|r| match r {
                        Raw::Content(c) => Ok(c),
                        Raw::Delta { base, object } => match contents.get(&base) {
                            Some(Ok(base_content)) => {
                                crate::format::decode_block_with(&id, &object, Some(base_content))
                            }
                            Some(Err(e)) => Err(Error::corrupt(
                                format!("block {id}"),
                                format!("its delta base {base} cannot be read: {e}"),
                            )),
                            None => Err(Error::corrupt(
                                format!("block {id}"),
                                format!("its delta base {base} is missing from the store"),
                            )),
                        },
                    });
                    (id, got)
                })
                .collect()
        })
        .await
        .map_err(|e| Error::other("decoding blocks stored as deltas", e))
    }

    /// [`Snapshots::fetch`] without reading the bases of deltas.
    async fn fetch_raw(&self, fetch: Fetch) -> Result<Vec<(BlockId, Result<Raw>)>> {
        let run = match fetch {
            Fetch::Loose(id) => {
                let got = match self.inner.store.get(&id.key()).await? {
                    Some(object) => decode_off_thread(id, object).await?,
                    None => Err(Error::not_found(format!("block {id}"))),
                };
                return Ok(vec![(id, got)]);
            }
            Fetch::Run(run) => run,
        };
        let bytes = match self
            .inner
            .store
            .get_range(&run.key, run.range.clone())
            .await
        {
            Ok(Some(bytes)) => bytes,
            // The pack is gone: GC rewrote it since the index was read. Look again.
            Ok(None) => {
                self.refresh_index().await?;
                // Verify and GC read the pack map: bring it up too if it is loaded.
                if self
                    .inner
                    .packs_loaded
                    .load(std::sync::atomic::Ordering::Acquire)
                {
                    self.refresh_packs().await?;
                }
                let ids: Vec<BlockId> = run.blocks.iter().map(|b| b.0).collect();
                let locs = self.locate_indexed(&ids).await?;
                let mut out = Vec::with_capacity(ids.len());
                for (id, loc) in ids.into_iter().zip(locs) {
                    let got = match loc {
                        Some(loc) => match self
                            .inner
                            .store
                            .get_range(&loc.key, loc.offset..loc.offset + loc.len)
                            .await?
                        {
                            Some(object) => decode_off_thread(id, object).await?,
                            None => Err(Error::not_found(format!("block {id}"))),
                        },
                        None => Box::pin(self.fetch_raw(Fetch::Loose(id)))
                            .await?
                            .pop()
                            .map_or_else(|| Err(Error::not_found(format!("block {id}"))), |b| b.1),
                    };
                    out.push((id, got));
                }
                return Ok(out);
            }
            // Shorter than its table of contents says: every block in the run is lost.
            Err(e @ Error::Corrupt { .. }) => {
                let why = e.to_string();
                return Ok(run
                    .blocks
                    .iter()
                    .map(|(id, _)| (*id, Err(Error::corrupt(format!("block {id}"), why.clone()))))
                    .collect());
            }
            Err(e) => return Err(e),
        };
        tokio::task::spawn_blocking(move || {
            run.blocks
                .into_iter()
                .map(|(id, r)| (id, decode_raw(id, bytes.slice(r))))
                .collect()
        })
        .await
        .map_err(|e| Error::other("decoding blocks", e))
    }

    /// The contents of blocks `ids` of snapshot `snapshot`, in order, each checked
    /// against its hash. Adjacent blocks of a pack are read together.
    pub(super) fn read_blocks(
        &self,
        snapshot: SnapshotId,
        ids: Vec<BlockId>,
    ) -> impl futures_util::Stream<Item = Result<Vec<u8>>> + Send + '_ {
        let concurrency = self.inner.config.read_concurrency.max(1);
        futures_util::stream::once(async move {
            let locs = self.locate_indexed(&ids).await?;
            Ok(plan(ids.into_iter().zip(locs)))
        })
        .map_ok(move |plan| {
            futures_util::stream::iter(plan)
                .map(move |f| self.fetch(f))
                .buffered(concurrency)
                .map_ok(|blocks| futures_util::stream::iter(blocks.into_iter().map(Ok)))
                .try_flatten()
        })
        .try_flatten()
        .map(move |r| r.and_then(|(id, got)| got.map_err(|e| block_error(snapshot, id, e))))
    }

    /// Table `t`'s block references, in order, in batches: read group by group (a
    /// few groups at a time) when the index lists groups, so a table of any size
    /// is restored or searched holding only a batch.
    pub(super) fn table_refs<'a>(
        &'a self,
        snapshot: SnapshotId,
        t: &'a TableIndex,
    ) -> impl futures_util::Stream<Item = Result<Vec<BlockRef>>> + Send + 'a {
        /// Groups (of up to 256 references each) read at once.
        const GROUPS_AT_ONCE: usize = 16;
        let inline = (!t.blocks.is_empty()).then(|| Ok(t.blocks.clone()));
        let batches = t
            .groups
            .chunks(GROUPS_AT_ONCE)
            .map(move |batch| async move {
                let ids: Vec<BlockId> = batch.iter().map(|g| g.id).collect();
                let contents: Vec<Vec<u8>> = self.read_blocks(snapshot, ids).try_collect().await?;
                let mut refs = Vec::new();
                for (g, content) in batch.iter().zip(contents) {
                    let group = crate::format::decode_group(&g.id, &content).map_err(|e| {
                        Error::corrupt(format!("snapshot {snapshot}"), e.to_string())
                    })?;
                    if group.len() != g.blocks as usize {
                        return Err(Error::corrupt(
                            format!("snapshot {snapshot}"),
                            format!(
                                "index group {} holds {} block references, the index says {}",
                                g.id,
                                group.len(),
                                g.blocks
                            ),
                        ));
                    }
                    refs.extend(group);
                }
                Ok(refs)
            });
        futures_util::stream::iter(inline)
            .chain(futures_util::stream::iter(batches).then(|f| f))
            .boxed()
    }

    pub(super) async fn read_block(&self, snapshot: SnapshotId, id: BlockId) -> Result<Vec<u8>> {
        let blocks = self.read_blocks(snapshot, vec![id]);
        futures_util::pin_mut!(blocks);
        blocks.next().await.unwrap_or_else(|| {
            Err(Error::other(
                "reading a block",
                std::io::Error::other("no result"),
            ))
        })
    }
}

/// A read of blocks: a run of adjacent blocks in a pack, or one loose block object.
#[derive(Debug)]
pub(super) enum Fetch {
    Run(crate::pack::Run),
    Loose(BlockId),
}

/// Most bytes read at once for adjacent blocks of a pack.
const RUN_MAX: u64 = 1024 * 1024;

/// The reads that fetch located blocks in order.
pub(super) fn plan(
    located: impl IntoIterator<Item = (BlockId, Option<BlockLocation>)>,
) -> Vec<Fetch> {
    let mut out = Vec::new();
    let mut packed = Vec::new();
    for (id, loc) in located {
        match loc {
            Some(loc) => packed.push((id, loc)),
            None => {
                out.extend(
                    crate::pack::runs(std::mem::take(&mut packed), RUN_MAX)
                        .into_iter()
                        .map(Fetch::Run),
                );
                out.push(Fetch::Loose(id));
            }
        }
    }
    out.extend(
        crate::pack::runs(packed, RUN_MAX)
            .into_iter()
            .map(Fetch::Run),
    );
    out
}

/// A block as read: its content, or a delta still to be applied to its base.
pub(super) enum Raw {
    Content(Vec<u8>),
    Delta { base: BlockId, object: Bytes },
}

impl Raw {
    /// The content (a delta is never asked for it: its base is read first).
    fn into_content(self) -> Vec<u8> {
        match self {
            Raw::Content(c) => c,
            Raw::Delta { .. } => Vec::new(),
        }
    }
}

/// Decodes block object `object` of block `id`, or sets it aside when it is a delta.
fn decode_raw(id: BlockId, object: Bytes) -> Result<Raw> {
    match crate::format::delta_base(&object) {
        Some(base) => Ok(Raw::Delta { base, object }),
        None => decode_block(&id, &object).map(Raw::Content),
    }
}

/// Decodes a block object on a blocking thread; the inner result is the block's.
pub(super) async fn decode_off_thread(id: BlockId, object: Bytes) -> Result<Result<Raw>> {
    tokio::task::spawn_blocking(move || decode_raw(id, object))
        .await
        .map_err(|e| Error::other("decoding a block", e))
}

/// A block of snapshot `snapshot` that could not be read, as the snapshot's damage.
pub(super) fn block_error(snapshot: SnapshotId, id: BlockId, e: Error) -> Error {
    match e {
        Error::NotFound { .. } => Error::corrupt(
            format!("snapshot {snapshot}"),
            format!("block {id} is missing from the store"),
        ),
        e => Error::corrupt(format!("snapshot {snapshot}"), e.to_string()),
    }
}
