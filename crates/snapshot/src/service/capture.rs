//! Capture: tables streamed by binary COPY into blocks, packs, the index and the manifest.

use super::*;

impl Snapshots {
    /// Captures a snapshot (see [`SnapshotService::create`]).
    #[tracing::instrument(skip_all, fields(snapshot))]
    pub(super) async fn capture(
        &self,
        request: SnapshotRequest,
        control: &Control,
    ) -> Result<SnapshotInfo> {
        let id = SnapshotId::new();
        tracing::Span::current().record("snapshot", tracing::field::display(id));
        let base = self.latest_good(None).await?.map(|s| s.id);
        self.insert_creating(id, &request.label).await?;
        let result = self.capture_inner(id, base, &request, control).await;
        match result {
            Ok(info) => Ok(info),
            Err(e) => {
                // The row stays `creating` (never restorable); record why.
                let _ = self
                    .set_status(id, SnapshotStatus::Creating, Some(&e.to_string()))
                    .await;
                metrics::counter!("sanare_snapshot_failures_total").increment(1);
                Err(e)
            }
        }
    }

    pub(super) async fn capture_inner(
        &self,
        id: SnapshotId,
        base: Option<SnapshotId>,
        request: &SnapshotRequest,
        control: &Control,
    ) -> Result<SnapshotInfo> {
        let inner = &self.inner;
        let mut conn = sanare_pg::get_conn(&inner.pool).await?;
        let tx = capture_tx(&mut conn, None).await?;
        // GC waits while any capture holds this (released at commit or on a crash).
        tx.execute(
            "SELECT pg_advisory_xact_lock_shared($1)",
            &[&advisory_key(&inner.schema)],
        )
        .await
        .context("taking the snapshot lock")?;
        let row = tx
            .query_one("SELECT pg_current_snapshot()::text, now()", &[])
            .await
            .context("reading the snapshot's transaction view")?;
        let db_snapshot: String = row.get(0);
        let created_at: OffsetDateTime = row.get(1);
        let cut = match &inner.journal {
            Some(j) => Some(j.cut(Some(&db_snapshot)).await?),
            None => None,
        };
        let tables = self.resolve_tables(&*tx, request).await?;
        let tables = without_nested_partitions(&*tx, tables).await?;
        control
            .progress()
            .phase("capturing tables", "tables", Some(tables.len() as u64));
        // Read the packs afresh, under the lock GC waits for: a map loaded before a
        // GC in another process could name blocks that GC has since deleted, and
        // this capture must not reuse those.
        self.refresh_index().await?;
        let writer = PackWriter::new(&inner.store, &inner.index, inner.config.pack_size);
        // Every id the snapshot references, counted without holding them.
        let ids = std::sync::Mutex::new(crate::sorted::Spill::<32>::new(
            crate::sorted::TempDir::default(),
            1 << 16,
        ));
        let previous = self.previous_index(base).await;
        let (table_indexes, mut compressed_bytes) = self
            .capture_tables(&tx, &tables, &writer, previous.as_ref(), &ids, control)
            .await?;
        let mut index = Index {
            snapshot: *id.as_uuid().as_bytes(),
            tables: table_indexes,
            streams: Vec::new(),
        };
        // The capture's transaction stays open (holding the lock GC waits for) until
        // the manifest is written, so GC never deletes a block this capture reuses.
        control.checkpoint()?;
        let mut pack = PackBuilder::new();
        compressed_bytes += self
            .capture_sources(&writer, &mut pack, &mut index, &ids, control)
            .await?;
        // The DDL that recreates the tables, stored as a block.
        let (ddl, ddl_bytes) = self.capture_ddl(&tx, &tables, &writer, &mut pack).await?;
        compressed_bytes += ddl_bytes;
        writer.flush(&mut pack).await?;
        let stored_bytes = writer.finish().await?;
        let block_count = {
            let ids = ids
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            tokio::task::spawn_blocking(move || ids.count_distinct())
                .await
                .map_err(|e| Error::other("counting the snapshot's blocks", e))??
        };
        let sealed = self
            .seal(
                id,
                base,
                request,
                created_at,
                cut.as_ref(),
                &index,
                Totals {
                    compressed_bytes,
                    stored_bytes,
                    block_count,
                    ddl,
                },
            )
            .await?;
        let mut info = SnapshotInfo::new(id, created_at, SnapshotStatus::Ready);
        info.label = request.label.clone();
        info.base = base;
        info.journal_cut = cut;
        info.tables = index
            .tables
            .iter()
            .map(|t| TableRowCount {
                table: TableRef::new(&t.schema, &t.name),
                rows: t.rows,
            })
            .collect();
        info.size_bytes = sealed.size_bytes;
        info.stored_bytes = sealed.stored_bytes;
        info.metadata = request.metadata.clone();
        tx.commit()
            .await
            .context("ending the snapshot transaction")?;
        self.mark_ready(&conn, &info, &sealed.manifest_hash).await?;
        metrics::counter!("sanare_snapshots_created_total").increment(1);
        metrics::counter!("sanare_snapshot_bytes_stored_total").increment(info.stored_bytes);
        control.progress().finish();
        tracing::info!(%id, size_bytes = info.size_bytes, stored_bytes = info.stored_bytes, tables = index.tables.len(), "snapshot ready");
        if let Some(bus) = &inner.events {
            bus.publish(Event::SnapshotCreated {
                snapshot: id,
                size_bytes: info.size_bytes,
                stored_bytes: info.stored_bytes,
            });
        }
        Ok(info)
    }

    /// The index of `base` (the previous snapshot), whose blocks lend themselves
    /// as delta bases; `None` (with a warning) when it cannot be read.
    async fn previous_index(&self, base: Option<SnapshotId>) -> Option<(SnapshotId, Index)> {
        let b = base?;
        match self.read_index(b).await {
            Ok(i) => Some((b, i)),
            Err(e) => {
                tracing::warn!(base = %b, error = %e, "the previous snapshot's index cannot be read: no block will be stored as a delta");
                None
            }
        }
    }

    /// Captures `tables` with up to `capture_concurrency` connections whose
    /// transactions all import `tx`'s snapshot, so every table is read at the same
    /// instant; `tx` stays open until they finish. Returns the tables' index
    /// entries in the order of `tables` and the compressed bytes they reference.
    async fn capture_tables(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        tables: &[TableRef],
        writer: &PackWriter<'_>,
        previous: Option<&(SnapshotId, Index)>,
        ids: &std::sync::Mutex<crate::sorted::Spill<32>>,
        control: &Control,
    ) -> Result<(Vec<TableIndex>, u64)> {
        let inner = &self.inner;
        let progress = control.progress();
        let preds_of = |table: &TableRef| {
            let (b, index) = previous?;
            let t = index
                .tables
                .iter()
                .find(|t| t.schema == table.schema && t.name == table.name)?;
            Some(super::encode::Predecessors::new(self, *b, t))
        };
        // Worker 0 uses the capture's own connection, every other one takes one
        // more: never ask for more than the pool can ever give.
        let pool_max = inner.pool.status().max_size;
        let workers = inner
            .config
            .capture_concurrency
            .min(pool_max.max(1))
            .clamp(1, tables.len().max(1));
        let exported: Option<String> = if workers > 1 {
            Some(
                tx.query_one("SELECT pg_export_snapshot()", &[])
                    .await
                    .context("exporting the snapshot for parallel capture")?
                    .get(0),
            )
        } else {
            None
        };
        let queue = std::sync::Mutex::new(tables.iter().enumerate().collect::<Vec<_>>());
        let next = || {
            queue.lock().ok().and_then(|mut q| {
                if q.is_empty() {
                    None
                } else {
                    Some(q.remove(0))
                }
            })
        };
        let worker = |n: usize| {
            let exported = exported.clone();
            let next = &next;
            let preds_of = &preds_of;
            let progress = &progress;
            async move {
                let mut done: Vec<(usize, TableIndex, u64)> = Vec::new();
                let mut pack = PackBuilder::new();
                let mut group_pack = PackBuilder::new();
                let mut own_conn;
                let own_tx;
                let tx: &tokio_postgres::Transaction<'_> = match (&exported, n) {
                    (Some(snapshot), n) if n > 0 => {
                        own_conn = sanare_pg::get_conn(&inner.pool).await?;
                        own_tx = capture_tx(&mut own_conn, Some(snapshot)).await?;
                        &own_tx
                    }
                    _ => tx,
                };
                while let Some((i, table)) = next() {
                    control.checkpoint()?;
                    progress.message(format!("capturing {table}"));
                    let (ti, compressed) = self
                        .capture_table(
                            tx,
                            table,
                            writer,
                            (&mut pack, &mut group_pack),
                            control,
                            preds_of(table),
                            ids,
                        )
                        .await?;
                    done.push((i, ti, compressed));
                    progress.advance(1);
                }
                writer.flush(&mut pack).await?;
                writer.flush(&mut group_pack).await?;
                Ok::<_, Error>(done)
            }
        };
        let results = futures_util::future::try_join_all((0..workers).map(worker)).await?;
        let mut captured: Vec<(usize, TableIndex, u64)> = results.into_iter().flatten().collect();
        captured.sort_by_key(|c| c.0);
        let compressed = captured.iter().map(|c| c.2).sum();
        Ok((captured.into_iter().map(|c| c.1).collect(), compressed))
    }

    /// Captures every state source into `pack`, adding their entries to `index`
    /// and their block ids to `ids`; returns the compressed bytes they reference.
    async fn capture_sources(
        &self,
        writer: &PackWriter<'_>,
        pack: &mut PackBuilder,
        index: &mut Index,
        ids: &std::sync::Mutex<crate::sorted::Spill<32>>,
        control: &Control,
    ) -> Result<u64> {
        let mut compressed_bytes = 0;
        for source in &self.inner.sources {
            control.checkpoint()?;
            control
                .progress()
                .message(format!("capturing state source {}", source.name()));
            let (si, compressed) = self
                .capture_source(&**source, writer, pack, control)
                .await?;
            compressed_bytes += compressed;
            {
                let mut ids = ids
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for b in &si.blocks {
                    ids.push(b.0)?;
                }
            }
            index.streams.push(si);
        }
        Ok(compressed_bytes)
    }

    /// Stores the index, then the signed manifest (the blocks are durable by
    /// now): after this the snapshot is complete in the store.
    #[allow(clippy::too_many_arguments)]
    async fn seal(
        &self,
        id: SnapshotId,
        base: Option<SnapshotId>,
        request: &SnapshotRequest,
        created_at: OffsetDateTime,
        cut: Option<&JournalCut>,
        index: &Index,
        totals: Totals,
    ) -> Result<Sealed> {
        let inner = &self.inner;
        let index_bytes = index.encode()?;
        let index_hash = *blake3::hash(&index_bytes).as_bytes();
        let stored_bytes = totals.stored_bytes + index_bytes.len() as u64;
        inner
            .store
            .put(&index_key(id), Bytes::from(index_bytes))
            .await?;
        let size_bytes: u64 = index.tables.iter().map(|t| t.raw_bytes).sum::<u64>()
            + index.streams.iter().map(|s| s.len).sum::<u64>();
        let (repository, database) = self.manifest_origin().await?;
        let manifest = Manifest {
            id: *id.as_uuid().as_bytes(),
            created_at_us: i64::try_from(created_at.unix_timestamp_nanos() / 1000)
                .unwrap_or(i64::MAX),
            label: request.label.clone(),
            base: base.map(|b| *b.as_uuid().as_bytes()),
            journal_cut: cut.map(|c| StoredCut {
                position: c.position.0,
                db_snapshot: c.db_snapshot.clone(),
            }),
            chunking: inner.config.chunking,
            codec: inner.config.codec,
            tables: index
                .tables
                .iter()
                .map(|t| (t.schema.clone(), t.name.clone(), t.rows))
                .collect(),
            size_bytes,
            compressed_bytes: totals.compressed_bytes,
            stored_bytes,
            block_count: totals.block_count,
            index_hash,
            metadata: request.metadata.clone(),
            repository,
            database,
            ddl: Some(totals.ddl),
        };
        let manifest_bytes = manifest.encode(inner.key.as_ref())?;
        let manifest_hash = blake3::hash(&manifest_bytes).as_bytes().to_vec();
        inner
            .store
            .put(&manifest_key(id), Bytes::from(manifest_bytes))
            .await?;
        Ok(Sealed {
            size_bytes,
            stored_bytes,
            manifest_hash,
        })
    }

    /// Marks the catalog row of a sealed snapshot `ready`, with what it holds.
    async fn mark_ready(
        &self,
        conn: &tokio_postgres::Client,
        info: &SnapshotInfo,
        manifest_hash: &[u8],
    ) -> Result<()> {
        let json =
            serde_json::to_value(info).map_err(|e| Error::other("encoding snapshot info", e))?;
        conn.execute(
            &format!(
                "UPDATE {} SET status = 'ready', created_at = $2, finished_at = now(), base_id = $3,
                        journal_position = $4, size_bytes = $5, stored_bytes = $6,
                        manifest_hash = $7, info = $8, error = NULL
                  WHERE id = $1",
                self.table("snapshots")
            ),
            &[
                &info.id.as_uuid(),
                &info.created_at,
                &info.base.map(|b| b.as_uuid()),
                &info
                    .journal_cut
                    .as_ref()
                    .map(|c| i64::try_from(c.position.0).unwrap_or(i64::MAX)),
                &i64::try_from(info.size_bytes).unwrap_or(i64::MAX),
                &i64::try_from(info.stored_bytes).unwrap_or(i64::MAX),
                &manifest_hash,
                &json,
            ],
        )
        .await
        .context("marking the snapshot ready")?;
        Ok(())
    }

    /// Captures one table: its rows by binary COPY into blocks (see
    /// [`super::encode`]), compared with `preds` (its copy in the previous snapshot)
    /// for deltas, every id referenced counted in `ids`; returns its index entry
    /// (groups only) and the compressed bytes it references.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn capture_table(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        table: &TableRef,
        writer: &PackWriter<'_>,
        packs: (&mut PackBuilder, &mut PackBuilder),
        control: &Control,
        preds: Option<super::encode::Predecessors<'_>>,
        ids: &std::sync::Mutex<crate::sorted::Spill<32>>,
    ) -> Result<(TableIndex, u64)> {
        let (columns, primary_key) = describe(tx, table).await?;
        let sequences = sequences(tx, table).await?;
        let sql = copy_out_sql(tx, table, &columns, &primary_key).await?;
        let stream = tx
            .copy_out(&sql)
            .await
            .with_context(|| format!("starting to copy {table}"))?;
        futures_util::pin_mut!(stream);
        let mut chunker = Chunker::new(self.inner.config.chunking, primary_key.clone());
        let mut blocks = super::encode::TableBlocks::new(self, writer, ids, preds);
        let mut pending: Vec<RowBlock> = Vec::new();
        // Blocks handled at once: compressed in parallel, their predecessors read
        // together.
        let batch = self.inner.config.write_concurrency.max(1) * 4;
        loop {
            let next = stream.next().await;
            let done = next.is_none();
            match next {
                Some(data) => {
                    let data = data.with_context(|| format!("copying {table}"))?;
                    pending.extend(chunker.push(&data)?);
                }
                None => {
                    let c = std::mem::replace(
                        &mut chunker,
                        Chunker::new(ChunkParams::default(), Vec::new()),
                    );
                    pending.extend(
                        c.finish()
                            .map_err(|e| Error::other(format!("copying {table}"), e))?,
                    );
                }
            }
            if pending.len() >= batch || (done && !pending.is_empty()) {
                control.checkpoint()?;
                blocks
                    .push((&mut *packs.0, &mut *packs.1), std::mem::take(&mut pending))
                    .await?;
            }
            if done {
                break;
            }
        }
        let blocks = blocks.finish(packs.1).await?;
        metrics::counter!("sanare_snapshot_rows_captured_total").increment(blocks.rows);
        Ok((
            TableIndex {
                schema: table.schema.clone(),
                name: table.name.clone(),
                columns,
                primary_key,
                sequences,
                rows: blocks.rows,
                raw_bytes: blocks.raw_bytes,
                blocks: Vec::new(),
                groups: blocks.groups,
            },
            blocks.compressed,
        ))
    }

    /// Reads a host byte stream to its end, cutting it into deduplicated blocks.
    pub(super) async fn capture_source(
        &self,
        source: &dyn StateSource,
        writer: &PackWriter<'_>,
        pack: &mut PackBuilder,
        control: &Control,
    ) -> Result<(StreamIndex, u64)> {
        let name = source.name().to_owned();
        let mut reader = source.open().await?;
        let mut chunker = ByteChunker::new(self.inner.config.chunking);
        let mut buf = vec![0u8; 256 * 1024];
        let mut index = StreamIndex {
            name: name.clone(),
            len: 0,
            blocks: Vec::new(),
            metadata: source.metadata(),
        };
        let mut compressed = 0u64;
        let conc = self.inner.config.write_concurrency.max(1);
        let codec = self.inner.config.codec;
        let mut pending: Vec<Vec<u8>> = Vec::new();
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .map_err(|e| Error::io(format!("reading state source {name}"), e))?;
            index.len += n as u64;
            if n == 0 {
                let rest =
                    std::mem::replace(&mut chunker, ByteChunker::new(ChunkParams::default()));
                pending.extend(rest.finish());
            } else {
                pending.extend(chunker.push(&buf[..n]));
            }
            if pending.len() >= conc || (n == 0 && !pending.is_empty()) {
                control.checkpoint()?;
                let batch = std::mem::take(&mut pending);
                let encoded =
                    futures_util::future::try_join_all(batch.into_iter().map(|content| {
                        encode(
                            RowBlock {
                                content,
                                rows: 0,
                                key_filter: Vec::new(),
                                first_key: None,
                                last_key: None,
                            },
                            codec,
                        )
                    }))
                    .await?;
                for (r, object) in encoded {
                    compressed += object.len() as u64;
                    writer.add(pack, r.id, &object).await?;
                    index.blocks.push(r.id);
                }
            }
            if n == 0 {
                break;
            }
        }
        Ok((index, compressed))
    }
}

/// Compresses a block on a blocking thread: its reference and its block object.
pub(super) async fn encode(block: RowBlock, codec: Codec) -> Result<(BlockRef, Vec<u8>)> {
    let RowBlock {
        content,
        rows,
        key_filter,
        ..
    } = block;
    let raw_len = u32::try_from(content.len()).unwrap_or(u32::MAX);
    let (id, object) = tokio::task::spawn_blocking(move || {
        let id = BlockId::of(&content);
        encode_block(&content, codec).map(|e| (id, e))
    })
    .await
    .map_err(|e| Error::other("compressing a block", e))??;
    Ok((
        BlockRef {
            id,
            raw_len,
            rows,
            key_filter,
            base: None,
        },
        object,
    ))
}

/// The `COPY … TO STDOUT (FORMAT binary)` that reads `table`'s captured rows.
///
/// Rows come in primary key order: where a row lives in the heap (which updates
/// change) then does not move it between blocks, so an update touches only the
/// blocks around its key and appended keys only the last blocks. A plain table's
/// rows are its own (`ONLY`: the rows of its inheritance children are theirs, and
/// they are captured as tables of their own); a partitioned table's rows are those
/// of all its partitions.
pub(super) async fn copy_out_sql(
    client: &impl tokio_postgres::GenericClient,
    table: &TableRef,
    columns: &[ColumnDef],
    primary_key: &[u16],
) -> Result<String> {
    let plain: bool = client
        .query_one(
            "SELECT relkind = 'r' FROM pg_class WHERE oid = (quote_ident($1) || '.' || quote_ident($2))::regclass",
            &[&table.schema, &table.name],
        )
        .await
        .with_context(|| format!("looking up {table}"))?
        .get(0);
    let cols = columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let only = if plain { "ONLY " } else { "" };
    Ok(if primary_key.is_empty() {
        if plain {
            // COPY TO reads the table's own rows only.
            format!("COPY {} ({cols}) TO STDOUT (FORMAT binary)", table.quoted())
        } else {
            format!(
                "COPY (SELECT {cols} FROM {}) TO STDOUT (FORMAT binary)",
                table.quoted()
            )
        }
    } else {
        let order = primary_key
            .iter()
            .filter_map(|&i| columns.get(usize::from(i)))
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "COPY (SELECT {cols} FROM {only}{} ORDER BY {order}) TO STDOUT (FORMAT binary)",
            table.quoted()
        )
    })
}

/// Leaves out of `tables` every partition whose partitioned ancestor is also in
/// it: the ancestor's rows are its partitions' rows, and they would be captured
/// (and restored) twice.
pub(super) async fn without_nested_partitions(
    client: &impl tokio_postgres::GenericClient,
    tables: Vec<TableRef>,
) -> Result<Vec<TableRef>> {
    let schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let rows = client
        .query(
            "WITH asked AS (
                 SELECT t.ord, c.oid FROM unnest($1::text[], $2::text[]) WITH ORDINALITY t(s, n, ord)
                   JOIN pg_namespace ns ON ns.nspname = t.s
                   JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = t.n)
             SELECT a.ord FROM asked a
              WHERE EXISTS (
                  WITH RECURSIVE up(oid) AS (
                      SELECT i.inhparent FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                       WHERE i.inhrelid = a.oid AND c.relispartition
                    UNION
                      SELECT i.inhparent FROM up JOIN pg_inherits i ON i.inhrelid = up.oid
                        JOIN pg_class c ON c.oid = i.inhrelid AND c.relispartition)
                  SELECT 1 FROM up WHERE up.oid IN (SELECT oid FROM asked))",
            &[&schemas, &names],
        )
        .await
        .context("looking for partitions captured with their partitioned table")?;
    let nested: BTreeSet<i64> = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
    Ok(tables
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !nested.contains(&(*i as i64 + 1)))
        .map(|(_, t)| t)
        .collect())
}

/// The captured columns (stored generated columns excluded) and primary key positions.
pub(super) async fn describe(
    client: &impl tokio_postgres::GenericClient,
    table: &TableRef,
) -> Result<(Vec<ColumnDef>, Vec<u16>)> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    coalesce(array_position(i.indkey::int2[], a.attnum)
                             - array_lower(i.indkey::int2[], 1) + 1, 0)::int4
               FROM pg_attribute a
               LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
              WHERE a.attrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass
                AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
              ORDER BY a.attnum",
            &[&table.schema, &table.name],
        )
        .await
        .with_context(|| format!("reading the columns of {table}"))?;
    if rows.is_empty() {
        return Err(Error::not_found(format!(
            "table {table} (or it has no columns)"
        )));
    }
    let mut columns = Vec::with_capacity(rows.len());
    let mut pk: Vec<(i32, u16)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        columns.push(ColumnDef {
            name: r.get(0),
            type_name: r.get(1),
        });
        let pos: i32 = r.get(2);
        if pos > 0 {
            pk.push((pos, u16::try_from(i).unwrap_or(u16::MAX)));
        }
    }
    pk.sort();
    Ok((columns, pk.into_iter().map(|(_, i)| i).collect()))
}

/// The sequences owned by `table`'s columns (serial and identity), with their state.
pub(super) async fn sequences(
    client: &impl tokio_postgres::GenericClient,
    table: &TableRef,
) -> Result<Vec<SequenceState>> {
    let rows = client
        .query(
            "SELECT d.objid::regclass::text
               FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
              WHERE d.refobjid = (quote_ident($1) || '.' || quote_ident($2))::regclass
                AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
              ORDER BY 1",
            &[&table.schema, &table.name],
        )
        .await
        .with_context(|| format!("listing the sequences of {table}"))?;
    let mut out = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let s = client
            .query_one(&format!("SELECT last_value, is_called FROM {name}"), &[])
            .await
            .with_context(|| format!("reading sequence {name}"))?;
        out.push(SequenceState {
            name,
            last_value: s.get(0),
            is_called: s.get(1),
        });
    }
    Ok(out)
}

/// What a capture wrote besides the index, for its manifest.
struct Totals {
    compressed_bytes: u64,
    stored_bytes: u64,
    block_count: u64,
    ddl: BlockId,
}

/// A snapshot complete in the store: its sizes and the hash of its manifest.
struct Sealed {
    size_bytes: u64,
    stored_bytes: u64,
    manifest_hash: Vec<u8>,
}

/// A read-only repeatable-read transaction on `conn` for a capture; with
/// `snapshot` (exported by the capture's own transaction), one that sees exactly
/// what that one sees, for a parallel capture worker.
async fn capture_tx<'c>(
    conn: &'c mut deadpool_postgres::Object,
    snapshot: Option<&str>,
) -> Result<deadpool_postgres::Transaction<'c>> {
    let tx = conn
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .context("starting a snapshot transaction")?;
    if let Some(snapshot) = snapshot {
        tx.batch_execute(&format!(
            "SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await
        .context("importing the snapshot into a parallel capture transaction")?;
    }
    Ok(tx)
}
