//! Verify, retention, deletion, garbage collection and storage statistics.

use super::blocks::plan;
use super::*;

impl Snapshots {
    pub(super) async fn verify_inner(
        &self,
        id: SnapshotId,
        control: &Control,
    ) -> Result<VerifyReport> {
        let mut report = VerifyReport::new(id);
        let info = self.get(id).await?;
        let prior = info.status;
        let manifest = match self.load_manifest(id).await {
            Ok(m) => Some(m),
            Err(e) => {
                report.problems.push(e.to_string());
                None
            }
        };
        *self.inner.index_cache.lock().await = None;
        let index = match &manifest {
            Some(_) => match self.load_index(id).await {
                Ok(i) => Some(i),
                Err(e) => {
                    report.problems.push(e.to_string());
                    None
                }
            },
            None => None,
        };
        if let (Some(m), Some(index)) = (&manifest, &index) {
            let ids = index.block_ids();
            if m.block_count != ids.len() as u64 {
                report.problems.push(format!(
                    "manifest counts {} blocks, the index references {}",
                    m.block_count,
                    ids.len()
                ));
            }
            let expected_tables: Vec<(String, String, u64)> = index
                .tables
                .iter()
                .map(|t| (t.schema.clone(), t.name.clone(), t.rows))
                .collect();
            if expected_tables != m.tables {
                report
                    .problems
                    .push("manifest table list differs from the index".into());
            }
            for t in &index.tables {
                let rows: u64 = t.blocks.iter().map(|b| u64::from(b.rows)).sum();
                if rows != t.rows {
                    report.problems.push(format!(
                        "table {}.{}: block rows do not add up",
                        t.schema, t.name
                    ));
                }
            }
            control
                .progress()
                .phase("verifying blocks", "blocks", Some(ids.len() as u64));
            // In store order, so each pack is read front to back in few reads.
            let ids: Vec<BlockId> = ids.into_iter().collect();
            let mut located: Vec<(BlockId, Option<BlockLocation>)> = ids
                .iter()
                .copied()
                .zip(self.locate_all(&ids).await?)
                .collect();
            located.sort_by(|a, b| {
                let key = |l: &Option<BlockLocation>| l.as_ref().map(|l| (l.key.clone(), l.offset));
                key(&a.1).cmp(&key(&b.1))
            });
            let mut by_pack: BTreeMap<String, Vec<(BlockId, BlockLocation)>> = BTreeMap::new();
            for (id, loc) in &located {
                if let Some(loc) = loc.as_ref().filter(|l| l.key.starts_with(PACK_PREFIX)) {
                    by_pack
                        .entry(loc.key.clone())
                        .or_default()
                        .push((*id, loc.clone()));
                }
            }
            let checks = futures_util::stream::iter(plan(located))
                .map(|f| self.fetch(f))
                .buffer_unordered(self.inner.config.read_concurrency.max(1));
            futures_util::pin_mut!(checks);
            while let Some(blocks) = checks.next().await {
                control.checkpoint()?;
                for (b, got) in blocks? {
                    report.blocks_checked += 1;
                    match got {
                        Ok(_) => {}
                        Err(Error::NotFound { .. }) => {
                            report.blocks_missing += 1;
                            report.problems.push(format!("block {b} is missing"));
                        }
                        Err(e) => {
                            report.blocks_corrupt += 1;
                            report.problems.push(e.to_string());
                        }
                    }
                    control.progress().advance(1);
                }
            }
            // Each pack's own table of contents, as a reader without this process's
            // map would find the blocks.
            for (key, blocks) in by_pack {
                control.checkpoint()?;
                let size = self.inner.packs.read().await.pack(&key).map(|p| p.size);
                let Some(size) = size else { continue };
                let meta = crate::store::ObjectMeta {
                    key: key.clone(),
                    size,
                    modified: OffsetDateTime::UNIX_EPOCH,
                };
                let problem = match crate::pack::read_toc(&*self.inner.store, &meta).await {
                    Ok(entries) => {
                        let listed: HashMap<BlockId, (u64, u64)> = entries
                            .iter()
                            .map(|e| (e.id, (u64::from(e.offset), u64::from(e.len))))
                            .collect();
                        blocks
                            .iter()
                            .any(|(id, l)| listed.get(id) != Some(&(l.offset, l.len)))
                            .then(|| "its table of contents no longer lists this snapshot's blocks where they are".to_owned())
                    }
                    Err(Error::NotFound { .. }) => Some("it is gone".to_owned()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = problem {
                    report.blocks_corrupt += blocks.len() as u64;
                    report.problems.push(format!(
                        "pack {key} holding {} of this snapshot's blocks is damaged: {why}",
                        blocks.len()
                    ));
                }
            }
            if report.blocks_missing > 0 {
                for (pack, why) in &self.inner.packs.read().await.unreadable {
                    report
                        .problems
                        .push(format!("pack {pack} is unreadable: {why}"));
                }
            }
        }
        if !report.is_ok() {
            let e = Error::corrupt(format!("snapshot {id}"), report.problems.join("; "));
            self.mark_corrupted(id, &e).await;
        } else if prior == SnapshotStatus::Corrupted {
            tracing::warn!(%id, "a snapshot marked corrupted now verifies; leaving it corrupted");
        }
        metrics::counter!("sanare_snapshot_verifications_total").increment(1);
        Ok(report)
    }

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
        let info = self.get(id).await?;
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

    /// Mark-and-sweep of blocks no live snapshot references. Waits for running
    /// captures (a capture holds a shared lock GC takes exclusively) and keeps
    /// unreferenced blocks younger than `grace` (a capture that crashed may be retried).
    pub async fn gc(&self, grace: Duration, control: &Control) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let tx = conn.transaction().await.context("starting GC")?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&advisory_key(&self.inner.schema)],
        )
        .await
        .context("waiting for running snapshots before GC")?;
        let mut live: BTreeSet<BlockId> = BTreeSet::new();
        for s in self.list().await? {
            if matches!(s.status, SnapshotStatus::Deleted | SnapshotStatus::Creating) {
                continue;
            }
            control.checkpoint()?;
            match self.load_index(s.id).await {
                Ok(i) => live.extend(i.block_ids()),
                Err(e) => {
                    // An unreadable index: keep every block rather than guess.
                    tracing::warn!(snapshot = %s.id, error = %e, "GC skipped: an index is unreadable");
                    return Err(Error::conflict(format!(
                        "GC refused: the index of snapshot {} is unreadable ({e}); verify or delete it first",
                        s.id
                    )));
                }
            }
        }
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
        tx.commit().await.context("ending GC")?;
        metrics::counter!("sanare_snapshot_gc_blocks_deleted_total")
            .increment(report.blocks_deleted);
        Ok(report)
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
        // The copies are durable; only now the originals go.
        let mut freed = 0u64;
        for old in &done {
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
