//! The DDL stored with each snapshot: captured with the tables, run by a restore
//! to recreate the tables the database lacks (see [`crate::ddl`]).

use super::*;

impl Snapshots {
    /// Reads the DDL of `tables` in the capture's transaction and adds it to the
    /// capture's packs as one block (deduplicated like any other: an unchanged
    /// schema costs nothing); returns the block for the manifest.
    pub(super) async fn capture_ddl(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &[TableRef],
        writer: &PackWriter<'_>,
        pack: &mut PackBuilder,
    ) -> Result<(BlockId, u64)> {
        let content = crate::ddl::capture(tx, tables).await?.encode()?;
        let (r, object) = capture::encode(
            RowBlock {
                content,
                rows: 0,
                key_filter: Vec::new(),
                first_key: None,
                last_key: None,
            },
            self.inner.config.codec,
        )
        .await?;
        writer.add(pack, r.id, &object).await?;
        Ok((r.id, object.len() as u64))
    }

    /// Creates, in the restore's transaction, the tables of `chosen` the database
    /// lacks, from the DDL of snapshot `id` (whose manifest is authenticated by
    /// the time its index is loaded); returns them.
    pub(super) async fn recreate_missing(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        id: SnapshotId,
        chosen: &[&TableIndex],
    ) -> Result<Vec<TableRef>> {
        let wanted: Vec<TableRef> = chosen
            .iter()
            .map(|t| TableRef::new(&t.schema, &t.name))
            .collect();
        let missing = crate::ddl::missing(tx, &wanted).await?;
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        // No new connection: the restore holds one, and the pool may have no other.
        let manifest = self.cached_manifest(id).await?;
        let ddl = match manifest.ddl {
            Some(block) => {
                let content = match self.read_block(id, block).await {
                    Ok(c) => c,
                    Err(e) => {
                        self.mark_corrupted(id, &e).await;
                        return Err(e);
                    }
                };
                crate::ddl::SchemaDdl::decode(&content)
                    .map_err(|e| Error::corrupt(format!("snapshot {id}"), e.to_string()))?
            }
            None => crate::ddl::SchemaDdl::default(),
        };
        let done = crate::ddl::recreate(tx, &ddl, missing).await?;
        for skipped in &done.skipped {
            tracing::warn!(snapshot = %id, "not recreated: {skipped}");
        }
        if !done.tables.is_empty() {
            tracing::info!(snapshot = %id, tables = ?done.tables, "tables recreated from the snapshot's DDL");
        }
        Ok(done.tables)
    }
}
