//! Rows by key from a snapshot.

use super::*;

impl Snapshots {
    pub(super) async fn fetch_inner(
        &self,
        id: SnapshotId,
        rows: &[RowRef],
    ) -> Result<Vec<RowImage>> {
        // Block references are read group by group, keeping only the candidates.
        let index = self.read_index(id).await?;
        let mut by_table: BTreeMap<&TableRef, Vec<usize>> = BTreeMap::new();
        for (i, r) in rows.iter().enumerate() {
            by_table.entry(&r.table).or_default().push(i);
        }
        let mut found: Vec<Option<RowImage>> = vec![None; rows.len()];
        let mut conn = sanare_pg::get_conn(&self.inner.pool).await?;
        for (table, idxs) in by_table {
            let t = index
                .tables
                .iter()
                .find(|t| t.schema == table.schema && t.name == table.name)
                .ok_or_else(|| Error::not_found(format!("table {table} in snapshot {id}")))?;
            if t.primary_key.is_empty() {
                return Err(Error::invalid_input(format!(
                    "table {table} had no primary key when snapshot {id} was taken: rows cannot be fetched by key"
                )));
            }
            let wanted = wanted_keys(&conn, table, t, rows, &idxs).await?;
            let matched = self.matching_rows(id, t, wanted).await?;
            if matched.is_empty() {
                continue;
            }
            for (ord, values) in decode_rows(&mut conn, t, &matched).await? {
                if let Some(slot) = found.get_mut(ord) {
                    *slot = Some(RowImage {
                        table: table.clone(),
                        values,
                    });
                }
            }
        }
        Ok(found.into_iter().flatten().collect())
    }

    /// The rows of `t` in snapshot `id` whose key hashes are `wanted`, each with
    /// the indexes of the requests it answers; reads only the blocks whose key
    /// filters may hold one, and stops once every key is found.
    async fn matching_rows(
        &self,
        id: SnapshotId,
        t: &TableIndex,
        mut wanted: HashMap<[u8; 32], Vec<usize>>,
    ) -> Result<Vec<(usize, Vec<u8>)>> {
        let mut candidates: Vec<BlockId> = Vec::new();
        let batches = self.table_refs(id, t);
        futures_util::pin_mut!(batches);
        while let Some(refs) = batches.next().await {
            candidates.extend(
                refs?
                    .into_iter()
                    .filter(|b| wanted.keys().any(|k| bloom::may_contain(&b.key_filter, k)))
                    .map(|b| b.id),
            );
        }
        metrics::counter!("sanare_snapshot_fetch_blocks_read_total")
            .increment(candidates.len() as u64);
        let mut matched: Vec<(usize, Vec<u8>)> = Vec::new();
        for b in candidates {
            let content = self.read_block(id, b).await?;
            for row in copy::rows(&content) {
                let row = row?;
                let ranges = copy::fields(row);
                let h = copy::key_hash(row, &ranges, &t.primary_key);
                if let Some(is) = wanted.remove(&h) {
                    for i in is {
                        matched.push((i, row.to_vec()));
                    }
                }
            }
            if wanted.is_empty() {
                break;
            }
        }
        Ok(matched)
    }
}

/// The key hashes of the requested rows `idxs` of `table` (stored as `t`), each
/// with the indexes of the requests that name it. The key values are put in the
/// key's binary COPY encoding by the server, which owns every type's input.
async fn wanted_keys(
    conn: &tokio_postgres::Client,
    table: &TableRef,
    t: &TableIndex,
    rows: &[RowRef],
    idxs: &[usize],
) -> Result<HashMap<[u8; 32], Vec<usize>>> {
    let mut selects = Vec::new();
    for &i in idxs {
        let r = &rows[i];
        let mut exprs = Vec::new();
        for &k in &t.primary_key {
            let col = &t.columns[k as usize];
            let v = r.key.iter().find(|c| c.column == col.name).ok_or_else(|| {
                Error::invalid_input(format!("row {r} does not give key column {}", col.name))
            })?;
            exprs.push(match &v.value {
                Some(v) => format!("{}::{}", quote_literal(v), col.type_name),
                None => format!("NULL::{}", col.type_name),
            });
        }
        selects.push(format!("SELECT {}", exprs.join(", ")));
    }
    let stream = conn
        .copy_out(&format!(
            "COPY ({}) TO STDOUT (FORMAT binary)",
            selects.join(" UNION ALL ")
        ))
        .await
        .with_context(|| format!("encoding keys of {table}"))?;
    let bytes: Vec<Bytes> = stream
        .try_collect()
        .await
        .with_context(|| format!("encoding keys of {table}"))?;
    let all: Vec<u8> = bytes.concat();
    let body = all
        .get(19..all.len().saturating_sub(2))
        .ok_or_else(|| Error::other("encoding keys", std::io::Error::other("short COPY output")))?;
    let all_key_cols: Vec<u16> = (0..t.primary_key.len() as u16).collect();
    let mut wanted: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
    for (row, &i) in copy::rows(body).zip(idxs) {
        let row = row?;
        let ranges = copy::fields(row);
        wanted
            .entry(copy::key_hash(row, &ranges, &all_key_cols))
            .or_default()
            .push(i);
    }
    Ok(wanted)
}

/// The `matched` rows of `t` (binary COPY rows, each with its request's index)
/// as text values, decoded by the server, which owns every type's output,
/// through a temporary table that is dropped again.
async fn decode_rows(
    conn: &mut tokio_postgres::Client,
    t: &TableIndex,
    matched: &[(usize, Vec<u8>)],
) -> Result<Vec<(usize, Vec<ColumnValue>)>> {
    let tx = conn
        .transaction()
        .await
        .context("starting to decode fetched rows")?;
    let cols = t
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("c{i} {}", c.type_name))
        .collect::<Vec<_>>()
        .join(", ");
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE sanare_fetched_rows (ord int4, {cols}) ON COMMIT DROP"
    ))
    .await
    .context("creating a temporary table for fetched rows")?;
    let sink = tx
        .copy_in("COPY sanare_fetched_rows FROM STDIN (FORMAT binary)")
        .await
        .context("decoding fetched rows")?;
    futures_util::pin_mut!(sink);
    let mut buf = copy::HEADER.to_vec();
    for (i, row) in matched {
        let n = i16::from_be_bytes([row[0], row[1]]) + 1;
        buf.extend_from_slice(&n.to_be_bytes());
        buf.extend_from_slice(&4i32.to_be_bytes());
        buf.extend_from_slice(&i32::try_from(*i).unwrap_or(i32::MAX).to_be_bytes());
        buf.extend_from_slice(&row[2..]);
    }
    buf.extend_from_slice(&copy::TRAILER);
    sink.send(Bytes::from(buf))
        .await
        .context("decoding fetched rows")?;
    sink.finish().await.context("decoding fetched rows")?;
    let select = (0..t.columns.len())
        .map(|i| format!("c{i}::text"))
        .collect::<Vec<_>>()
        .join(", ");
    let out = tx
        .query(
            &format!("SELECT ord, {select} FROM sanare_fetched_rows"),
            &[],
        )
        .await
        .context("decoding fetched rows")?;
    let decoded = out
        .iter()
        .filter_map(|r| {
            let ord = usize::try_from(r.get::<_, i32>(0)).ok()?;
            let values = t
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    ColumnValue::new(&c.name, &c.type_name, r.get::<_, Option<String>>(i + 1))
                })
                .collect();
            Some((ord, values))
        })
        .collect();
    tx.rollback()
        .await
        .context("dropping the temporary table")?;
    Ok(decoded)
}
