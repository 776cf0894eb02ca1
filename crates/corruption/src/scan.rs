//! The checksum layer: how a table is read (its plan, one per partition), and the
//! verifier that streams rows by ctid ranges and checks their checksums.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

use sanare_core::{ColumnValue, Error, Result, RowChecksum, RowRef, TableRef};
use sanare_pg::catalog::{TableInfo, TextForm};
use sanare_pg::copy_text::{TextCopyRows, bytea_hex_eq, decode_bytea_hex};
use sanare_pg::{PgResultExt, quote_ident};

/// How a table is read by the checksum layer.
#[derive(Clone, Debug)]
pub(crate) struct TablePlan {
    /// The table as the application sees it (a partitioned table, not its
    /// partitions): issues, row references and snapshot look-ups name it.
    pub(crate) table: TableRef,
    /// Every column in the order of `table` (the order the checksum encodes),
    /// checksum column included.
    pub(crate) columns: Vec<(String, String)>,
    /// Index of the checksum column in `columns`.
    pub(crate) checksum_idx: usize,
    /// Indexes of the primary-key columns in `columns`.
    pub(crate) key_idx: Vec<usize>,
    /// How each of `columns` is read so that its text is its `::text` form, the one
    /// the canonical row encoding hashes.
    pub(crate) forms: Vec<TextForm>,
    /// The relations holding the rows, with their oids: `table` itself, or its leaf
    /// partitions ([`leaf_relations`]).
    pub(crate) relations: Vec<(TableRef, u32)>,
}

impl TablePlan {
    /// The plan of `info`, `None` when the table has no checksum column or no
    /// primary key.
    ///
    /// Generated columns (stored generated and identity `ALWAYS`) are not hashed:
    /// the application cannot write them, so a checksum it computes cannot cover
    /// them (see "Row checksum encoding" in `docs/formats.md`).
    pub(crate) fn new(info: &TableInfo, checksum_column: &str) -> Option<TablePlan> {
        let columns: Vec<(String, String)> = info
            .columns
            .iter()
            .filter(|c| !c.generated || c.name == checksum_column)
            .map(|c| (c.name.clone(), c.type_name.clone()))
            .collect();
        let checksum_idx = columns.iter().position(|(n, _)| n == checksum_column)?;
        if info.primary_key.is_empty() {
            return None;
        }
        let key_idx = info
            .primary_key
            .iter()
            .map(|k| columns.iter().position(|(n, _)| n == k))
            .collect::<Option<Vec<_>>>()?;
        let forms = vec![TextForm::Raw; columns.len()];
        Some(TablePlan {
            table: info.table.clone(),
            columns,
            checksum_idx,
            key_idx,
            forms,
            relations: vec![(info.table.clone(), info.oid)],
        })
    }

    /// Completes the plan from the catalog: how each column prints as text, and
    /// which relations hold the rows.
    pub(crate) async fn resolve(self, client: &impl GenericClient, oid: u32) -> Result<Self> {
        let mut plan = self.with_text_forms(client, oid).await?;
        plan.relations = leaf_relations(client, oid).await?;
        Ok(plan)
    }

    /// Reads from `pg_cast` how each column of table `oid` prints as `::text`.
    async fn with_text_forms(mut self, client: &impl GenericClient, oid: u32) -> Result<Self> {
        let forms = sanare_pg::catalog::text_forms(client, oid).await?;
        for (i, (name, _)) in self.columns.iter().enumerate() {
            if i == self.checksum_idx {
                continue;
            }
            if let Some(form) = forms.get(name) {
                self.forms[i] = *form;
            }
        }
        Ok(self)
    }

    pub(crate) fn select_list(&self) -> String {
        self.columns
            .iter()
            .zip(&self.forms)
            .map(|((n, _), f)| match f {
                TextForm::Cast => format!("{}::text", quote_ident(n)),
                TextForm::Raw | TextForm::TrimBlanks => quote_ident(n),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn row_ref(&self, fields: &[Option<String>]) -> RowRef {
        RowRef::new(
            self.table.clone(),
            self.key_idx
                .iter()
                .map(|&i| {
                    ColumnValue::new(
                        self.columns[i].0.clone(),
                        self.columns[i].1.clone(),
                        fields[i].clone(),
                    )
                })
                .collect(),
        )
    }

    /// The `WHERE` clause selecting `row` by its key, with its parameters (the
    /// key's text forms, cast back to the column types so that the primary key's
    /// index serves the look-up).
    pub(crate) fn key_predicate(&self, row: &RowRef) -> (String, Vec<Option<String>>) {
        let clause = row
            .key
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "{} = ${}::text::{}",
                    quote_ident(&c.column),
                    i + 1,
                    c.type_name
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        (clause, row.key.iter().map(|c| c.value.clone()).collect())
    }

    /// What a query reading the table's rows by key selects from: the table alone
    /// (`ONLY`: an inheritance parent's children are tables of their own), or a
    /// partitioned table with its partitions.
    pub(crate) fn source_clause(&self) -> String {
        match self.relations.as_slice() {
            [(only, _)] if *only == self.table => format!("ONLY {}", self.table.quoted()),
            _ => self.table.quoted(),
        }
    }
}

/// The relations holding a table's rows: the table itself, or the leaf partitions
/// of a partitioned table (sub-partitions included). Foreign-table partitions hold
/// no local rows and are left out. Inheritance children are tables of their own,
/// listed and scanned on their own: readers use `FROM ONLY`.
pub(crate) async fn leaf_relations(
    client: &impl GenericClient,
    oid: u32,
) -> Result<Vec<(TableRef, u32)>> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.oid
               FROM (SELECT relid FROM pg_partition_tree($1::oid::regclass) WHERE isleaf
                     UNION SELECT $1::oid) p
               JOIN pg_class c ON c.oid = p.relid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'm')
              ORDER BY 1, 2",
            &[&oid],
        )
        .await
        .context("listing a table's partitions")?;
    let leaves: Vec<(TableRef, u32)> = rows
        .iter()
        .map(|r| {
            (
                TableRef::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                r.get(2),
            )
        })
        .collect();
    Ok(leaves)
}

/// How many rows of one table may be kept as suspects, shared by every worker
/// reading a part of it: past the limit, mismatches are counted, not kept.
#[derive(Debug)]
pub(crate) struct SuspectBudget {
    pub(crate) limit: u64,
    mismatches: AtomicU64,
    rows: AtomicU64,
}

impl SuspectBudget {
    pub(crate) fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            mismatches: AtomicU64::new(0),
            rows: AtomicU64::new(0),
        })
    }

    /// Counts a mismatch; whether it may be kept.
    fn take(&self) -> bool {
        self.mismatches.fetch_add(1, Ordering::Relaxed) < self.limit
    }

    /// Mismatches counted so far (kept or not).
    pub(crate) fn mismatches(&self) -> u64 {
        self.mismatches.load(Ordering::Relaxed)
    }

    /// Rows verified so far.
    pub(crate) fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn add_rows(&self, n: u64) {
        self.rows.fetch_add(n, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn count_mismatch(&self) {
        self.take();
    }

    /// Whether more mismatches were counted than could be kept.
    pub(crate) fn exhausted(&self) -> bool {
        self.mismatches() > self.limit
    }
}

/// A row whose stored checksum disagrees with its values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Suspect {
    pub(crate) row: RowRef,
    pub(crate) values: Vec<ColumnValue>,
    pub(crate) stored: Option<Vec<u8>>,
    pub(crate) computed: [u8; 32],
}

/// Verifies rows decoded from COPY text, reusing buffers across rows.
pub(crate) struct RowVerifier<'a> {
    plan: &'a TablePlan,
    checksum: &'a dyn RowChecksum,
    budget: &'a SuspectBudget,
    decoder: TextCopyRows,
    /// Every column but the checksum, as templates (no values) for the checksum.
    columns: Vec<ColumnValue>,
    /// The allocation of a row's values, kept between rows (empty).
    spare: Vec<Option<&'static str>>,
    pub(crate) rows: u64,
    pub(crate) suspects: Vec<Suspect>,
}

impl<'a> RowVerifier<'a> {
    pub(crate) fn new(
        plan: &'a TablePlan,
        checksum: &'a dyn RowChecksum,
        budget: &'a SuspectBudget,
    ) -> Self {
        let columns = plan
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != plan.checksum_idx)
            .map(|(_, (n, t))| ColumnValue::new(n.clone(), t.clone(), None::<String>))
            .collect();
        Self {
            plan,
            checksum,
            budget,
            columns,
            decoder: TextCopyRows::default(),
            spare: Vec::new(),
            rows: 0,
            suspects: Vec::new(),
        }
    }

    /// Feeds a piece of the COPY stream.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<()> {
        let mut decoder = std::mem::take(&mut self.decoder);
        let r = decoder.feed(data, &mut |fields| self.row(fields));
        self.decoder = decoder;
        r
    }

    /// Ends the stream; a partial last line is an error.
    pub(crate) fn finish(&mut self) -> Result<()> {
        self.budget.rows.fetch_add(self.rows, Ordering::Relaxed);
        self.decoder.finish().map_err(|_| {
            Error::corrupt(
                format!("COPY stream of {}", self.plan.table),
                "ends in the middle of a row",
            )
        })
    }

    fn row(&mut self, raw: &[Option<&[u8]>]) -> Result<()> {
        let plan = self.plan;
        if raw.len() != plan.columns.len() {
            return Err(Error::corrupt(
                format!("COPY stream of {}", plan.table),
                format!(
                    "a row has {} fields, expected {}",
                    raw.len(),
                    plan.columns.len()
                ),
            ));
        }
        fn text<'v>(f: Option<&'v [u8]>, plan: &TablePlan) -> Result<Option<&'v str>> {
            f.map(|b| {
                std::str::from_utf8(b).map_err(|_| {
                    Error::corrupt(
                        format!("COPY stream of {}", plan.table),
                        "a value is not valid UTF-8",
                    )
                })
            })
            .transpose()
        }
        // The values as hashed: every column but the checksum, `character(n)`
        // without its trailing blanks (its `::text`).
        // The spare allocation, retyped for this row's borrows (an empty in-place
        // collect keeps the buffer: no allocation per row).
        let mut values: Vec<Option<&str>> = std::mem::take(&mut self.spare)
            .into_iter()
            .map(|_| None)
            .collect();
        for (i, f) in raw.iter().enumerate() {
            if i == plan.checksum_idx {
                continue;
            }
            let v = text(*f, plan)?;
            values.push(match (v, plan.forms[i]) {
                (Some(v), TextForm::TrimBlanks) => Some(v.trim_end_matches(' ')),
                (v, _) => v,
            });
        }
        self.rows += 1;
        let computed = self.checksum.checksum_text(&self.columns, &values);
        if !raw[plan.checksum_idx].is_some_and(|h| bytea_hex_eq(h, &computed)) && self.budget.take()
        {
            let stored = raw[plan.checksum_idx].and_then(decode_bytea_hex);
            // Rare: only a suspect pays for owned values.
            let fields: Vec<Option<String>> = raw
                .iter()
                .map(|f| text(*f, plan).map(|v| v.map(str::to_owned)))
                .collect::<Result<_>>()?;
            let values = self
                .columns
                .iter()
                .zip(&values)
                .map(|(c, v)| {
                    ColumnValue::new(c.column.clone(), c.type_name.clone(), v.map(str::to_owned))
                })
                .collect();
            self.suspects.push(Suspect {
                row: plan.row_ref(&fields),
                values,
                stored,
                computed,
            });
        }
        values.clear();
        self.spare = values.into_iter().map(|_| None).collect();
        Ok(())
    }
}

/// Streams `COPY (SELECT … FROM ONLY relation WHERE predicate) TO STDOUT` through a
/// verifier. `relation` is the table of `plan` or one of its partitions.
pub(crate) async fn verify_where(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    relation: &TableRef,
    checksum: &dyn RowChecksum,
    budget: &SuspectBudget,
    predicate: &str,
) -> Result<(u64, Vec<Suspect>)> {
    let sql = format!(
        "COPY (SELECT {} FROM ONLY {} WHERE {predicate}) TO STDOUT",
        plan.select_list(),
        relation.quoted()
    );
    let stream = client
        .copy_out(&sql)
        .await
        .with_context(|| format!("streaming rows of {relation}"))?;
    let mut stream = std::pin::pin!(stream);
    let mut verifier = RowVerifier::new(plan, checksum, budget);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("streaming rows of {relation}"))?;
        verifier.feed(&chunk)?;
    }
    verifier.finish()?;
    Ok((verifier.rows, verifier.suspects))
}
