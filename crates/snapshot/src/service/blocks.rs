//! Reading blocks: the pack map, locating, fetching and decoding.

use super::*;

impl Snapshots {
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
        if let Some(loc) = self.locate_all(&[id]).await?.pop().flatten() {
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
    /// it is damaged). The outer error is a store failure unrelated to one block.
    pub(super) async fn fetch(&self, fetch: Fetch) -> Result<Vec<(BlockId, Result<Vec<u8>>)>> {
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
            // The pack is gone: GC rewrote it since the map was read. Look again.
            Ok(None) => {
                self.refresh_packs().await?;
                let ids: Vec<BlockId> = run.blocks.iter().map(|b| b.0).collect();
                let locs = self.locate_all(&ids).await?;
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
                        None => Box::pin(self.fetch(Fetch::Loose(id)))
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
                .map(|(id, r)| (id, decode_block(&id, &bytes[r])))
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
            let locs = self.locate_all(&ids).await?;
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

/// Decodes a block object on a blocking thread; the inner result is the block's.
pub(super) async fn decode_off_thread(id: BlockId, object: Bytes) -> Result<Result<Vec<u8>>> {
    tokio::task::spawn_blocking(move || decode_block(&id, &object))
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
