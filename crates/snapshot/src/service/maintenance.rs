//! Retention, deletion, garbage collection and storage statistics.
//!
//! GC keeps every block that any manifest in the store references, also those of
//! other databases sharing the store, and runs under the repository's exclusive
//! lock, so no capture, verify or restore of any of them is in flight. Under the
//! same lock it cleans up after captures that never finished.

use super::*;

impl Snapshots {
    /// Applies `policy`: marks older snapshots deleted and removes their index and
    /// manifest (never the newest ready one). Blocks are freed by [`Snapshots::gc`].
    pub async fn apply_retention(&self, policy: &RetentionPolicy) -> Result<u64> {
        let now = OffsetDateTime::now_utc();
        let all = self.list().await?;
        let mut kept_ready = 0usize;
        let mut deleted = 0u64;
        for s in all {
            if s.status == SnapshotStatus::Creating || s.status == SnapshotStatus::Deleted {
                continue;
            }
            let young = now - s.created_at < policy.keep_within;
            let keep = young
                || (s.status == SnapshotStatus::Ready && (kept_ready < policy.keep_last.max(1)));
            if s.status == SnapshotStatus::Ready && keep {
                kept_ready += 1;
            }
            if !keep {
                self.set_status(s.id, SnapshotStatus::Deleted, None).await?;
                self.inner.store.delete(&manifest_key(s.id)).await?;
                self.inner.store.delete(&index_key(s.id)).await?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Deletes one snapshot: marks it deleted and removes its index and manifest.
    /// Its blocks are freed by [`Snapshots::gc`] once no other snapshot uses them.
    /// A snapshot still being written cannot be deleted.
    pub async fn delete(&self, id: SnapshotId) -> Result<SnapshotInfo> {
        self.require_catalog("deleting a snapshot")?;
        let (info, _) = self.here(id).await?;
        match info.status {
            SnapshotStatus::Creating => {
                return Err(Error::conflict(format!(
                    "snapshot {id} is still being written; wait for it to finish, or let GC clean up after a crashed capture"
                )));
            }
            SnapshotStatus::Deleted => return Ok(info),
            _ => {}
        }
        self.set_status(id, SnapshotStatus::Deleted, None).await?;
        self.inner.store.delete(&manifest_key(id)).await?;
        self.inner.store.delete(&index_key(id)).await?;
        self.get(id).await
    }

    /// Mark-and-sweep of blocks no snapshot in the store references. Takes the
    /// repository's exclusive lock (waiting up to [`SnapshotConfig::lock_wait`]
    /// for captures, verifies and restores, of this database or another sharing
    /// the store) and the catalog's advisory lock; keeps unreferenced blocks
    /// younger than `grace`. Refuses to run while a manifest or index it would
    /// need to read is unreadable: it keeps every block rather than guess.
    pub async fn gc(&self, grace: Duration, control: &Control) -> Result<GcReport> {
        self.require_catalog("garbage collection")?;
        let Some(repo) = self.repository().await? else {
            return Ok(GcReport::default());
        };
        let lock = RepoLock::acquire(
            &self.inner.store,
            true,
            "garbage collection",
            self.inner.config.lock_wait,
        )
        .await?;
        let out = self.gc_locked(&repo, grace, control).await;
        super::release(lock).await;
        out
    }

    async fn gc_locked(
        &self,
        repo: &super::catalog::Opened,
        grace: Duration,
        control: &Control,
    ) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let tx = conn.transaction().await.context("starting GC")?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&advisory_key(&self.inner.schema)],
        )
        .await
        .context("waiting for running snapshots before GC")?;
        report.crashed_captures = self.clean_up_captures(repo).await?;
        self.finish_deletions(repo).await?;
        let live = self.live_blocks(repo, &mut report, control).await?;
        report.blocks_live = live.len() as u64;
        let now = OffsetDateTime::now_utc();
        self.refresh_packs().await?;
        let packs: Vec<PackInfo> = self.inner.packs.read().await.packs().to_vec();
        let small = u64::from(self.inner.config.pack_size) / 4;
        let mut rewrite: Vec<&PackInfo> = Vec::new();
        for pack in &packs {
            control.checkpoint()?;
            let dead: Vec<&PackEntry> = pack
                .entries
                .iter()
                .filter(|e| !live.contains(&e.id))
                .collect();
            if now - pack.modified < grace {
                report.blocks_in_grace += dead.len() as u64;
                continue;
            }
            if dead.len() == pack.entries.len() {
                self.inner.store.delete(&pack.key).await?;
                report.packs_deleted += 1;
                report.blocks_deleted += dead.len() as u64;
                report.bytes_freed += pack.size;
                continue;
            }
            let dead_bytes: u64 = dead.iter().map(|e| u64::from(e.len)).sum();
            if dead_bytes * 4 > pack.size || pack.size < small {
                rewrite.push(pack);
            }
        }
        // Rewriting one small pack with nothing to drop would gain nothing.
        if let [only] = rewrite[..]
            && only.entries.iter().all(|e| live.contains(&e.id))
        {
            rewrite.clear();
        }
        if !rewrite.is_empty() {
            self.rewrite_packs(&rewrite, &live, &mut report, control)
                .await?;
        }
        self.refresh_packs().await?;
        // Loose block objects of a repository written before packs.
        for obj in self.inner.store.list("blocks/").await? {
            control.checkpoint()?;
            let Some(id) = obj.key.rsplit('/').next().and_then(BlockId::from_hex) else {
                continue;
            };
            if live.contains(&id) {
                continue;
            }
            if now - obj.modified < grace {
                report.blocks_in_grace += 1;
                continue;
            }
            self.inner.store.delete(&obj.key).await?;
            report.blocks_deleted += 1;
            report.bytes_freed += obj.size;
        }
        // Indexes of captures that never wrote their manifest.
        let manifests: BTreeSet<SnapshotId> = self.manifest_ids().await?.into_iter().collect();
        for obj in self.inner.store.list("indexes/").await? {
            let Some(id) = obj
                .key
                .strip_prefix("indexes/")
                .and_then(|i| i.parse().ok())
            else {
                continue;
            };
            if !manifests.contains(&id) && now - obj.modified >= grace {
                self.inner.store.delete(&obj.key).await?;
            }
        }
        tx.commit().await.context("ending GC")?;
        metrics::counter!("sanare_snapshot_gc_blocks_deleted_total")
            .increment(report.blocks_deleted);
        Ok(report)
    }

    /// Every block a manifest in the store references (its index, the index's
    /// groups, its DDL block). A catalog row of this repository that should be
    /// restorable but whose manifest is gone stops GC: verify it first.
    async fn live_blocks(
        &self,
        repo: &super::catalog::Opened,
        report: &mut GcReport,
        control: &Control,
    ) -> Result<BTreeSet<BlockId>> {
        let ids = self.manifest_ids().await?;
        let in_store: BTreeSet<SnapshotId> = ids.iter().copied().collect();
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT id FROM {} WHERE repository = $1 AND status IN ('ready', 'archived', 'validating')",
                    self.table("snapshots")
                ),
                &[&repo.config.id.as_uuid()],
            )
            .await
            .context("listing the repository's snapshots for GC")?;
        drop(conn);
        if let Some(lost) = rows
            .iter()
            .map(|r| SnapshotId::from_uuid(r.get(0)))
            .find(|id| !in_store.contains(id))
        {
            return Err(Error::conflict(format!(
                "GC refused: snapshot {lost} is ready in the catalog but its manifest is not in the store; `sanare snapshot verify {lost}` marks it, then GC runs"
            )));
        }
        let mut live: BTreeSet<BlockId> = BTreeSet::new();
        for id in ids {
            control.checkpoint()?;
            let index = async {
                let bytes = self
                    .inner
                    .store
                    .get(&manifest_key(id))
                    .await?
                    .ok_or_else(|| Error::not_found(format!("the manifest of snapshot {id}")))?;
                let manifest = Manifest::decode(&bytes)?;
                live.extend(manifest.ddl);
                self.load_index_of(id, &manifest).await
            };
            match index.await {
                Ok(i) => live.extend(i.block_ids()),
                // Deleted since the listing: nothing of it to keep.
                Err(Error::NotFound { .. }) => continue,
                Err(e) => {
                    // Unreadable: keep every block rather than guess.
                    tracing::warn!(snapshot = %id, error = %e, "GC refused: a manifest or index is unreadable");
                    return Err(Error::conflict(format!(
                        "GC refused: the manifest or index of snapshot {id} is unreadable ({e}); verify or delete it first"
                    )));
                }
            }
            report.snapshots_in_store += 1;
        }
        Ok(live)
    }

    /// Under GC's locks no capture of this catalog runs: every `creating` row of
    /// this repository (or from before repositories had ids) is a capture that
    /// never finished. Each is marked deleted, saying so, and its index and
    /// manifest, if written, are removed (its packs go with the sweep).
    async fn clean_up_captures(&self, repo: &super::catalog::Opened) -> Result<u64> {
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT id, error FROM {} WHERE status = 'creating' AND (repository = $1 OR repository IS NULL)",
                    self.table("snapshots")
                ),
                &[&repo.config.id.as_uuid()],
            )
            .await
            .context("looking for captures that never finished")?;
        drop(conn);
        for r in &rows {
            let id = SnapshotId::from_uuid(r.get(0));
            let error: Option<String> = r.get(1);
            let why = match error {
                Some(e) => format!("the capture failed ({e}) and never finished"),
                None => "the capture never finished (its process ended)".to_owned(),
            };
            self.inner.store.delete(&manifest_key(id)).await?;
            self.inner.store.delete(&index_key(id)).await?;
            self.change_status(id, SnapshotStatus::Deleted, Some(&why), None)
                .await?;
            tracing::info!(%id, %why, "crashed capture cleaned up");
        }
        Ok(rows.len() as u64)
    }

    /// Removes the manifest and index of snapshots of this repository marked
    /// deleted whose removal a crash interrupted.
    async fn finish_deletions(&self, repo: &super::catalog::Opened) -> Result<()> {
        let ids: Vec<uuid::Uuid> = self
            .manifest_ids()
            .await?
            .iter()
            .map(SnapshotId::as_uuid)
            .collect();
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT id FROM {} WHERE status = 'deleted' AND repository = $1 AND id = ANY($2)",
                    self.table("snapshots")
                ),
                &[&repo.config.id.as_uuid(), &ids],
            )
            .await
            .context("looking for deletions a crash interrupted")?;
        drop(conn);
        for r in rows {
            let id = SnapshotId::from_uuid(r.get(0));
            self.inner.store.delete(&manifest_key(id)).await?;
            self.inner.store.delete(&index_key(id)).await?;
        }
        Ok(())
    }

    /// Copies the live blocks of `packs` into new packs (checking each block's
    /// hash), then deletes the old packs. A pack with a damaged live block is kept.
    pub(super) async fn rewrite_packs(
        &self,
        packs: &[&PackInfo],
        live: &BTreeSet<BlockId>,
        report: &mut GcReport,
        control: &Control,
    ) -> Result<()> {
        // The new packs must not be deduplicated against the old ones.
        let scratch = tokio::sync::RwLock::new(PackMap::default());
        let writer = PackWriter::new(&self.inner.store, &scratch, self.inner.config.pack_size);
        let mut pack = PackBuilder::new();
        let mut done: Vec<&PackInfo> = Vec::new();
        for old in packs {
            control.checkpoint()?;
            let Some(bytes) = self.inner.store.get(&old.key).await? else {
                continue;
            };
            let entries: Vec<PackEntry> = old
                .entries
                .iter()
                .filter(|e| live.contains(&e.id))
                .copied()
                .collect();
            let checked = {
                let bytes = bytes.clone();
                let entries = entries.clone();
                tokio::task::spawn_blocking(move || {
                    entries.iter().try_for_each(|e| {
                        let object = bytes
                            .get(e.offset as usize..(e.offset as usize + e.len as usize))
                            .ok_or_else(|| {
                                Error::corrupt(format!("block {}", e.id), "outside its pack")
                            })?;
                        decode_block(&e.id, object).map(drop)
                    })
                })
                .await
                .map_err(|e| Error::other("checking blocks before rewriting a pack", e))?
            };
            if let Err(e) = checked {
                tracing::warn!(pack = %old.key, error = %e, "GC keeps a pack with a damaged block; verify the snapshots that use it");
                continue;
            }
            for e in &entries {
                let object = &bytes[e.offset as usize..e.offset as usize + e.len as usize];
                writer.add(&mut pack, e.id, object).await?;
            }
            report.blocks_deleted += (old.entries.len() - entries.len()) as u64;
            done.push(old);
        }
        writer.flush(&mut pack).await?;
        let written = writer.finish().await?;
        // Pack keys are content hashes: a copy identical to its original (every
        // block live, nothing else in the new pack) has the original's key, and
        // deleting "the original" would delete the copy.
        let new_keys: BTreeSet<Arc<str>> = scratch
            .read()
            .await
            .packs()
            .iter()
            .map(|p| p.key.clone())
            .collect();
        // The copies are durable; only now the originals go.
        let mut freed = 0u64;
        for old in &done {
            if new_keys.contains(&old.key) {
                continue;
            }
            self.inner.store.delete(&old.key).await?;
            freed += old.size;
        }
        report.packs_rewritten += done.len() as u64;
        report.bytes_freed += freed.saturating_sub(written);
        Ok(())
    }

    /// What the store holds.
    pub async fn stats(&self) -> Result<StorageStats> {
        let mut stats = StorageStats::default();
        for s in self.list().await? {
            *stats
                .snapshots
                .entry(status_str(s.status).to_owned())
                .or_default() += 1;
            if s.status == SnapshotStatus::Ready {
                stats.logical_bytes += s.size_bytes;
            }
        }
        self.refresh_packs().await?;
        {
            let map = self.inner.packs.read().await;
            stats.packs = map.packs().len() as u64;
            stats.blocks = map.block_count() as u64;
            stats.block_bytes = map.packs().iter().map(|p| p.size).sum();
        }
        for o in self.inner.store.list("blocks/").await? {
            stats.blocks += 1;
            stats.block_bytes += o.size;
        }
        Ok(stats)
    }
}
