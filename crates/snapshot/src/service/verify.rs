//! Verify, and a snapshot's status following the evidence of a verify.
//!
//! Only a verify of a snapshot in its own repository marks it corrupted, and the
//! mark carries the verify's report. A read that fails anywhere else (a restore,
//! the latest-good check) asks for such a verify instead of marking. A verify
//! that finds a snapshot marked corrupted intact sets it ready again and records
//! who had marked it, when and why. Verify holds the repository's shared lock (and
//! the catalog's advisory lock) for its whole length, so no GC runs between its
//! passes; a pack that vanished anyway is looked for again, not condemned.

use super::blocks::plan;
use super::catalog::Opened;
use super::*;

impl Snapshots {
    pub(super) async fn verify_inner(
        &self,
        id: SnapshotId,
        control: &Control,
    ) -> Result<VerifyReport> {
        let (info, repo) = self.here(id).await?;
        if matches!(
            info.status,
            SnapshotStatus::Deleted | SnapshotStatus::Creating
        ) {
            return Err(Error::conflict(format!(
                "snapshot {id} is {}: there is nothing to verify",
                status_str(info.status)
            )));
        }
        let lock = RepoLock::acquire(
            &self.inner.store,
            false,
            "a verify",
            self.inner.config.lock_wait,
        )
        .await?;
        let mut report = VerifyReport::new(id);
        report.repository = Some(repo.config.id);
        let checked = self.check_shared(id, &mut report, control).await;
        super::release(lock).await;
        checked?;
        self.apply_verdict(&info, &repo, &mut report).await?;
        metrics::counter!("sanare_snapshot_verifications_total").increment(1);
        Ok(report)
    }

    /// [`Snapshots::check`] under the catalog's advisory lock (shared; GC of this
    /// catalog takes it exclusively).
    async fn check_shared(
        &self,
        id: SnapshotId,
        report: &mut VerifyReport,
        control: &Control,
    ) -> Result<()> {
        if !self.inner.catalog {
            report
                .notes
                .push("read from the store alone: nothing is marked".into());
            return self.check(id, report, control).await;
        }
        let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let tx = conn.transaction().await.context("starting a verify")?;
        tx.execute(
            "SELECT pg_advisory_xact_lock_shared($1)",
            &[&advisory_key(&self.inner.schema)],
        )
        .await
        .context("waiting for a running GC before verifying")?;
        let out = self.check(id, report, control).await;
        tx.commit().await.context("ending a verify")?;
        out
    }

    /// Reads everything snapshot `id` needs and records each problem in `report`.
    async fn check(
        &self,
        id: SnapshotId,
        report: &mut VerifyReport,
        control: &Control,
    ) -> Result<()> {
        *self.inner.index_cache.lock().await = None;
        // Damage is a problem found; any other failure (the store unreachable)
        // proves nothing and ends the verify with an error.
        let manifest = match self.load_manifest(id).await {
            Ok(m) => m,
            Err(e @ Error::Corrupt { .. }) => {
                report.problems.push(e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.note_authentication(id, report).await?;
        let index = match self.load_index_of(id, &manifest).await {
            Ok(i) => i,
            Err(e @ Error::Corrupt { .. }) => {
                report.problems.push(e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut ids = index.block_ids();
        // The count is of the index's blocks; a capture of the development
        // version for a while counted the DDL block too, which is as consistent.
        let with_ddl =
            ids.len() as u64 + u64::from(manifest.ddl.is_some_and(|d| !ids.contains(&d)));
        if manifest.block_count != with_ddl && manifest.block_count != ids.len() as u64 {
            report.problems.push(format!(
                "manifest counts {} blocks, the index references {}",
                manifest.block_count,
                ids.len()
            ));
        }
        let expected_tables: Vec<(String, String, u64)> = index
            .tables
            .iter()
            .map(|t| (t.schema.clone(), t.name.clone(), t.rows))
            .collect();
        if expected_tables != manifest.tables {
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
        ids.extend(manifest.ddl);
        let ids: Vec<BlockId> = ids.into_iter().collect();
        let by_pack = self.check_blocks(&ids, report, control).await?;
        self.check_packs(by_pack, report, control).await?;
        if let Some(ddl) = manifest.ddl
            && let Ok(content) = self.read_block(id, ddl).await
            && let Err(e) = crate::ddl::SchemaDdl::decode(&content)
        {
            report.problems.push(e.to_string());
        }
        Ok(())
    }

    /// Says in `report` what authenticated the manifest of `id`.
    async fn note_authentication(&self, id: SnapshotId, report: &mut VerifyReport) -> Result<()> {
        let Some(bytes) = self.inner.store.get(&manifest_key(id)).await? else {
            return Ok(());
        };
        let auth = match &self.inner.key {
            Some(key) => crate::format::Manifest::authenticate(&bytes, key),
            None => crate::format::ManifestAuth::Unsigned,
        };
        if auth != crate::format::ManifestAuth::Valid {
            report.notes.push(if self.inner.catalog {
                "manifest authenticated by the hash the catalog recorded (it is not signed with this service's key)".into()
            } else {
                "manifest not authenticated (no key, or not signed with the key given): its blocks are intact, its origin unproven".into()
            });
        }
        Ok(())
    }

    /// Reads and checks every block of `ids` (each against its hash), in store
    /// order; returns the blocks of each pack, for [`Snapshots::check_packs`].
    async fn check_blocks(
        &self,
        ids: &[BlockId],
        report: &mut VerifyReport,
        control: &Control,
    ) -> Result<BTreeMap<String, Vec<(BlockId, BlockLocation)>>> {
        control
            .progress()
            .phase("verifying blocks", "blocks", Some(ids.len() as u64));
        // In store order, so each pack is read front to back in few reads.
        let mut located: Vec<(BlockId, Option<BlockLocation>)> = ids
            .iter()
            .copied()
            .zip(self.locate_all(ids).await?)
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
        if report.blocks_missing > 0 {
            for (pack, why) in &self.inner.packs.read().await.unreadable {
                report
                    .problems
                    .push(format!("pack {pack} is unreadable: {why}"));
            }
        }
        Ok(by_pack)
    }

    /// Checks each pack's own table of contents, as a reader without this
    /// process's map would find the blocks. A pack gone since the blocks were
    /// read (moved by a GC that does not honour the lock) is not damage by
    /// itself: its blocks are looked for again and read where they are now.
    async fn check_packs(
        &self,
        by_pack: BTreeMap<String, Vec<(BlockId, BlockLocation)>>,
        report: &mut VerifyReport,
        control: &Control,
    ) -> Result<()> {
        let mut moved: Vec<BlockId> = Vec::new();
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
                Err(Error::NotFound { .. }) => {
                    moved.extend(blocks.iter().map(|b| b.0));
                    None
                }
                Err(e @ Error::Corrupt { .. }) => Some(e.to_string()),
                Err(e) => return Err(e),
            };
            if let Some(why) = problem {
                report.blocks_corrupt += blocks.len() as u64;
                report.problems.push(format!(
                    "pack {key} holding {} of this snapshot's blocks is damaged: {why}",
                    blocks.len()
                ));
            }
        }
        if moved.is_empty() {
            return Ok(());
        }
        self.refresh_packs().await?;
        let mut again = VerifyReport::new(report.snapshot);
        let by_pack = Box::pin(self.check_blocks(&moved, &mut again, control)).await?;
        // Their new packs' tables of contents, once (a pack gone again is damage).
        for key in by_pack.keys() {
            if !self.inner.store.contains(key).await? {
                again.blocks_missing += 1;
                again
                    .problems
                    .push(format!("pack {key} vanished twice while being verified"));
            }
        }
        report.blocks_missing += again.blocks_missing;
        report.blocks_corrupt += again.blocks_corrupt;
        report.problems.extend(again.problems);
        Ok(())
    }

    /// The status the evidence of `report` calls for: corrupted (with the report
    /// recorded) when it found damage, ready again when it found intact a
    /// snapshot marked corrupted (recording who had marked it).
    async fn apply_verdict(
        &self,
        info: &SnapshotInfo,
        repo: &Opened,
        report: &mut VerifyReport,
    ) -> Result<()> {
        if !self.inner.catalog {
            return Ok(());
        }
        let id = info.id;
        let evidence = serde_json::json!({
            "verified_by": crate::repo::holder(),
            "verified_at": OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "repository": repo.config.id,
            "location": self.inner.store.location(),
            "report": report,
        });
        if !report.is_ok() {
            tracing::error!(%id, problems = ?report.problems, "verify found the snapshot damaged");
            metrics::counter!("sanare_snapshot_corrupted_total").increment(1);
            self.change_status(
                id,
                SnapshotStatus::Corrupted,
                Some(&report.problems.join("; ")),
                Some(&evidence),
            )
            .await?;
            let mut cache = self.inner.index_cache.lock().await;
            if cache.as_ref().is_some_and(|(cached, _)| *cached == id) {
                *cache = None;
            }
            return Ok(());
        }
        if info.status != SnapshotStatus::Corrupted {
            return Ok(());
        }
        let (by, at, error) = self.last_mark(id).await?;
        let why = format!(
            "verify finds it intact; it had been marked corrupted by {} at {}{}",
            by.unwrap_or_else(|| "an older version of sanare, which did not record who".into()),
            at.map_or_else(|| "a time not recorded".into(), |t| t.to_string()),
            error.map(|e| format!(" ({e})")).unwrap_or_default()
        );
        tracing::warn!(%id, %why, "a snapshot marked corrupted is ready again");
        self.change_status(id, SnapshotStatus::Ready, Some(&why), Some(&evidence))
            .await?;
        report
            .notes
            .push(format!("status set back to ready: {why}"));
        Ok(())
    }

    /// Who marked `id` with its current status, when, and why.
    async fn last_mark(
        &self,
        id: SnapshotId,
    ) -> Result<(Option<String>, Option<OffsetDateTime>, Option<String>)> {
        let conn = sanare_pg::get_conn(&self.inner.pool).await?;
        let r = conn
            .query_one(
                &format!(
                    "SELECT status_by, status_at, error FROM {} WHERE id = $1",
                    self.table("snapshots")
                ),
                &[&id.as_uuid()],
            )
            .await
            .with_context(|| format!("reading who marked snapshot {id}"))?;
        Ok((r.get(0), r.get(1), r.get(2)))
    }

    /// Reading snapshot `id` failed with `e`. That is not proof of damage (the
    /// store may have been changed under the reader, or be another one): when `e`
    /// says damage, a verify of the snapshot in its own repository is started in
    /// the background, which marks it corrupted only if it finds damage, with its
    /// report as the evidence. The failing operation does not wait for it (it may
    /// hold the connections the verify needs); [`SnapshotService::verify`] gives
    /// the verdict to whoever needs it now.
    pub(super) async fn mark_corrupted(&self, id: SnapshotId, e: &Error) {
        if !matches!(e, Error::Corrupt { .. }) {
            return;
        }
        {
            let mut cache = self.inner.index_cache.lock().await;
            if cache.as_ref().is_some_and(|(cached, _)| *cached == id) {
                *cache = None;
            }
        }
        let fresh = self
            .inner
            .verifying
            .lock()
            .map(|mut v| v.insert(id))
            .unwrap_or(false);
        if !fresh {
            return;
        }
        tracing::warn!(%id, error = %e, "reading a snapshot failed; verifying it in the background");
        let this = self.clone();
        let why = e.to_string();
        tokio::spawn(async move {
            match this.verify_inner(id, &Control::detached()).await {
                Ok(report) if !report.is_ok() => {}
                Ok(_) => {
                    tracing::warn!(%id, error = %why, "reading the snapshot failed but a verify finds it intact; its status is unchanged");
                }
                Err(e2) => {
                    tracing::warn!(%id, error = %why, verify_error = %e2, "reading the snapshot failed and it could not be verified; its status is unchanged");
                }
            }
            if let Ok(mut v) = this.inner.verifying.lock() {
                v.remove(&id);
            }
        });
    }
}
