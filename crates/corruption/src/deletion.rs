//! Deletion checks: rows the latest good snapshot has and the table lost.

use sanare_core::{ColumnValue, Control, CorruptionKind, Error, Result, RowRef, TableRef};
use sanare_pg::{PgResultExt, catalog, quote_ident};

use crate::detector::CorruptionDetector;
use crate::issue::{CorruptionIssue, Layer};
use crate::session;

/// Candidate keys looked up in the snapshot per call.
const FETCH_BATCH: usize = 1_000;

/// `int2`, `int4`, `int8`.
const INTEGER_OIDS: [u32; 3] = [21, 23, 20];

impl CorruptionDetector {
    /// Finds rows of `table` that the latest good snapshot has and the table no
    /// longer has; each is recorded as a [`CorruptionKind::Deletion`].
    ///
    /// The snapshot service looks rows up by key, so the candidates are keys the
    /// table does not have: the gaps of the primary key's last integer column,
    /// within each value of the key's other columns (composite keys), stepping by
    /// the key's most common increment (so keys spaced by 1,000 are probed at
    /// multiples of 1,000, not at every integer), plus as many keys past the
    /// largest as the table has fewer rows than the snapshot. At most
    /// [`deletion_probe_limit`](crate::DetectorConfig::deletion_probe_limit)
    /// candidates are probed per call, and never more are generated.
    ///
    /// Run it right after a snapshot or restore: rows the application deleted since
    /// the snapshot are reported too, because the journal service does not expose
    /// per-row history through its trait.
    ///
    /// # Errors
    /// Without a snapshot service; when the table has no primary key, or none of
    /// its key columns is an integer (its missing keys cannot be enumerated).
    pub async fn check_deletions(
        &self,
        table: &TableRef,
        control: &Control,
    ) -> Result<Vec<CorruptionIssue>> {
        let Some(snapshots) = &self.inner.snapshots else {
            return Err(Error::unavailable(
                "deletion checks need a snapshot service (CorruptionDetector::builder().snapshots(..))",
            ));
        };
        let Some(snap) = snapshots.latest_good(None).await? else {
            return Ok(Vec::new());
        };
        let expected = snap
            .tables
            .iter()
            .find(|t| &t.table == table)
            .map_or(0, |t| i64::try_from(t.rows).unwrap_or(i64::MAX));
        let (keys, key_columns) = self.candidate_keys(table, expected).await?;
        let mut issues = Vec::new();
        for batch in keys.chunks(FETCH_BATCH) {
            control.checkpoint()?;
            let images = snapshots.fetch_rows(snap.id, batch).await?;
            let key_cols: Vec<&str> = key_columns.iter().map(String::as_str).collect();
            let found: Vec<CorruptionIssue> = images
                .iter()
                .filter_map(|img| {
                    let row = img.row_ref(&key_cols)?;
                    Some(
                        CorruptionIssue::new(
                            table.clone(),
                            CorruptionKind::Deletion,
                            Layer::Pattern,
                            format!(
                                "row {row} is in snapshot {} but gone from the table",
                                snap.id
                            ),
                        )
                        .with_row(row)
                        .with_affected(serde_json::json!({
                            "snapshot": snap.id.to_string(),
                            "last_known_good": crate::confirm::image_json(&img.values),
                        })),
                    )
                })
                .collect();
            self.record(&found).await?;
            issues.extend(found);
        }
        Ok(issues)
    }

    /// Keys `table` does not have that may have been deleted, and the key's
    /// columns in order.
    async fn candidate_keys(
        &self,
        table: &TableRef,
        expected: i64,
    ) -> Result<(Vec<RowRef>, Vec<String>)> {
        let tx = session::read_committed(&self.inner.pool).await?;
        let info = catalog::describe(&***tx, table).await?;
        if info.primary_key.is_empty() {
            return Err(Error::invalid_input(format!(
                "deletion checks look rows up by primary key, and {table} has none"
            )));
        }
        let columns: Vec<&catalog::Column> = info
            .primary_key
            .iter()
            .filter_map(|k| info.column(k))
            .collect();
        let Some(gap) = columns
            .iter()
            .rposition(|c| INTEGER_OIDS.contains(&c.type_oid))
        else {
            return Err(Error::invalid_input(format!(
                "deletion checks enumerate the missing values of an integer key column, and \
                 the primary key of {table} ({}) has none",
                info.primary_key.join(", ")
            )));
        };
        let groups: Vec<String> = columns
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != gap)
            .map(|(_, c)| quote_ident(&c.name))
            .collect();
        let partitioned: bool = tx
            .query_one(
                "SELECT relkind = 'p' FROM pg_class WHERE oid = $1",
                &[&info.oid],
            )
            .await
            .with_context(|| format!("reading the kind of {table}"))?
            .get(0);
        let from = if partitioned {
            table.quoted()
        } else {
            format!("ONLY {}", table.quoted())
        };
        let k = quote_ident(&columns[gap].name);
        let partition = if groups.is_empty() {
            String::new()
        } else {
            format!("PARTITION BY {}", groups.join(", "))
        };
        let group_cols: String = groups.iter().map(|g| format!("{g}, ")).collect();
        let group_text: String = groups.iter().map(|g| format!("{g}::text, ")).collect();
        // Arithmetic in numeric (keys near the ends of bigint do not overflow);
        // each gap's series is cut at the probe limit before it is generated, since
        // a set-returning function in FROM is computed whole before LIMIT applies.
        // Past the largest key (of each group), as many keys are probed as the
        // table has fewer rows than the snapshot.
        let rows = tx
            .query(
                &format!(
                    "WITH d AS (
                       SELECT {group_cols}{k}::numeric AS k,
                              lead({k}::numeric) OVER ({partition} ORDER BY {k}) AS nxt
                         FROM {from}),
                     step AS (
                       SELECT coalesce(mode() WITHIN GROUP (ORDER BY nxt - k), 1) AS s
                         FROM d WHERE nxt IS NOT NULL),
                     tail AS (
                       SELECT greatest($2::bigint - (SELECT count(*) FROM {from}), 0) AS n)
                     SELECT {group_text}c::text
                       FROM d, step, tail,
                            LATERAL generate_series(
                              d.k + step.s,
                              least(coalesce(d.nxt - 1, d.k + step.s * tail.n),
                                    d.k + step.s * $1::bigint, 9223372036854775807),
                              step.s) c
                      WHERE d.nxt IS NULL OR d.nxt - d.k > step.s
                      LIMIT $1::bigint"
                ),
                &[&self.inner.config.deletion_probe_limit, &expected],
            )
            .await
            .with_context(|| format!("probing key gaps of {table}"))?;
        tx.commit().await?;
        if i64::try_from(rows.len()).unwrap_or(i64::MAX) >= self.inner.config.deletion_probe_limit {
            tracing::warn!(%table, limit = self.inner.config.deletion_probe_limit,
                "a deletion check reached its probe limit; later gaps were not probed");
        }
        let order: Vec<usize> = (0..columns.len())
            .filter(|&i| i != gap)
            .chain(std::iter::once(gap))
            .collect();
        let keys = rows
            .iter()
            .map(|r| {
                let mut key: Vec<Option<ColumnValue>> = vec![None; columns.len()];
                for (field, &col) in order.iter().enumerate() {
                    let c = columns[col];
                    key[col] = Some(ColumnValue::new(
                        c.name.clone(),
                        c.type_name.clone(),
                        r.get::<_, Option<String>>(field),
                    ));
                }
                RowRef::new(table.clone(), key.into_iter().flatten().collect())
            })
            .collect();
        Ok((keys, info.primary_key.clone()))
    }
}
