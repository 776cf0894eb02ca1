//! Host byte streams ([`StateSource`]s) in snapshots.

use super::*;

impl Snapshots {
    /// The host byte streams captured in snapshot `id`.
    pub async fn sources(&self, id: SnapshotId) -> Result<Vec<SourceInfo>> {
        let index = self.load_index(id).await?;
        Ok(index
            .streams
            .iter()
            .map(|s| SourceInfo {
                name: s.name.clone(),
                len: s.len,
                blocks: s.blocks.len() as u64,
                metadata: s.metadata.clone(),
            })
            .collect())
    }

    /// Writes the stream `name` captured in snapshot `id` to `out` (flushed at the
    /// end) and returns its length. Every block's hash is checked before its bytes
    /// are written; a damaged or missing block stops the restore with an error
    /// naming it and marks the snapshot corrupted, so `out` then holds a prefix of
    /// the stream and must be discarded.
    pub async fn restore_source(
        &self,
        id: SnapshotId,
        name: &str,
        out: &mut (dyn AsyncWrite + Send + Unpin),
        control: &Control,
    ) -> Result<u64> {
        self.require_catalog("restoring a state source")?;
        let (info, _) = self.here(id).await?;
        if info.status != SnapshotStatus::Ready && info.status != SnapshotStatus::Archived {
            return Err(Error::conflict(format!(
                "snapshot {id} is {} and cannot be restored",
                status_str(info.status)
            )));
        }
        let index = self.load_index(id).await?;
        let stream = index
            .streams
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::not_found(format!("state source `{name}` in snapshot {id}")))?;
        let blocks = self.read_blocks(id, stream.blocks.clone());
        futures_util::pin_mut!(blocks);
        let mut written = 0u64;
        while let Some(block) = blocks.next().await {
            control.checkpoint()?;
            let block = match block {
                Ok(b) => b,
                Err(e) => {
                    self.mark_corrupted(id, &e).await;
                    return Err(e);
                }
            };
            out.write_all(&block)
                .await
                .map_err(|e| Error::io(format!("writing restored state source {name}"), e))?;
            written += block.len() as u64;
        }
        out.flush()
            .await
            .map_err(|e| Error::io(format!("writing restored state source {name}"), e))?;
        if written != stream.len {
            let e = Error::corrupt(
                format!("snapshot {id}"),
                format!(
                    "state source {name} restored {written} bytes, its index says {}",
                    stream.len
                ),
            );
            self.mark_corrupted(id, &e).await;
            return Err(e);
        }
        Ok(written)
    }
}
