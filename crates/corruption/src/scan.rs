//! The checksum layer: streaming rows by ctid ranges, verifying their checksums, and
//! confirming and classifying suspects.

use sanare_pg::catalog::TextForm;
use std::sync::Arc;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

use sanare_core::{
    ColumnValue, CorruptionKind, Error, Result, RowChecksum, RowImage, RowRef, TableRef,
};
use sanare_pg::catalog::TableInfo;
use sanare_pg::{PgResultExt, quote_ident};

use crate::classify::{bit_distance, classify_value};
use crate::issue::{CorruptionIssue, Layer};
use sanare_pg::copy_text::{TextCopyRows, bytea_hex_eq, decode_bytea_hex};

/// How a table is read by the checksum layer.
#[derive(Clone, Debug)]
pub(crate) struct TablePlan {
    pub(crate) table: TableRef,
    /// Every column in table order, checksum column included.
    pub(crate) columns: Vec<(String, String)>,
    /// Index of the checksum column in `columns`.
    pub(crate) checksum_idx: usize,
    /// Indexes of the primary-key columns in `columns`.
    pub(crate) key_idx: Vec<usize>,
    /// How each of `columns` is read so that its text is its `::text` form, the one
    /// the canonical row encoding hashes.
    pub(crate) forms: Vec<TextForm>,
}

impl TablePlan {
    /// The plan of `info`, `None` when the table has no checksum column or no
    /// primary key.
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
        })
    }

    /// Reads from `pg_cast` how each column of table `oid` prints as `::text`.
    pub(crate) async fn with_text_forms(
        mut self,
        client: &impl GenericClient,
        oid: u32,
    ) -> Result<Self> {
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

    /// The `WHERE` clause selecting `row` by its key.
    pub(crate) fn key_predicate(&self, row: &RowRef) -> (String, Vec<Option<String>>) {
        let clause = row
            .key
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "{}::text IS NOT DISTINCT FROM ${}",
                    quote_ident(&c.column),
                    i + 1
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        (clause, row.key.iter().map(|c| c.value.clone()).collect())
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
    decoder: TextCopyRows,
    /// Every column but the checksum, as templates (no values) for the checksum.
    columns: Vec<ColumnValue>,
    /// The allocation of a row's values, kept between rows (empty).
    spare: Vec<Option<&'static str>>,
    pub(crate) rows: u64,
    pub(crate) suspects: Vec<Suspect>,
}

impl<'a> RowVerifier<'a> {
    pub(crate) fn new(plan: &'a TablePlan, checksum: &'a dyn RowChecksum) -> Self {
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
        if !raw[plan.checksum_idx].is_some_and(|h| bytea_hex_eq(h, &computed)) {
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

/// Streams `COPY (SELECT … WHERE predicate) TO STDOUT` through a verifier.
pub(crate) async fn verify_where(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    checksum: &dyn RowChecksum,
    predicate: &str,
) -> Result<(u64, Vec<Suspect>)> {
    let sql = format!(
        "COPY (SELECT {} FROM {} WHERE {predicate}) TO STDOUT",
        plan.select_list(),
        plan.table.quoted()
    );
    let stream = client
        .copy_out(&sql)
        .await
        .with_context(|| format!("streaming rows of {}", plan.table))?;
    let mut stream = std::pin::pin!(stream);
    let mut verifier = RowVerifier::new(plan, checksum);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("streaming rows of {}", plan.table))?;
        verifier.feed(&chunk)?;
    }
    verifier.finish()?;
    Ok((verifier.rows, verifier.suspects))
}

/// Re-reads a suspect in a fresh snapshot: `Some` if it is still damaged (with its
/// current values), `None` if it changed or vanished since (a concurrent write).
pub(crate) async fn confirm(
    client: &impl GenericClient,
    plan: &TablePlan,
    checksum: &dyn RowChecksum,
    suspect: &Suspect,
) -> Result<Option<Suspect>> {
    let (clause, params) = plan.key_predicate(&suspect.row);
    let sql = format!(
        "SELECT {} FROM {} WHERE {clause}",
        plan.columns
            .iter()
            .map(|(n, _)| format!("{}::text", quote_ident(n)))
            .collect::<Vec<_>>()
            .join(", "),
        plan.table.quoted()
    );
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let row = client
        .query_opt(&sql, &refs)
        .await
        .with_context(|| format!("re-reading suspect row {}", suspect.row))?;
    let Some(row) = row else { return Ok(None) };
    let fields: Vec<Option<String>> = (0..plan.columns.len()).map(|i| row.get(i)).collect();
    let values: Vec<ColumnValue> = plan
        .columns
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != plan.checksum_idx)
        .map(|(i, (n, t))| ColumnValue::new(n.clone(), t.clone(), fields[i].clone()))
        .collect();
    let computed = checksum.checksum(&values);
    let stored = fields[plan.checksum_idx]
        .as_deref()
        .map(str::as_bytes)
        .and_then(decode_bytea_hex);
    if stored.as_deref() == Some(&computed[..]) {
        return Ok(None);
    }
    Ok(Some(Suspect {
        row: suspect.row.clone(),
        values,
        stored,
        computed,
    }))
}

/// Classifies a confirmed suspect against its last known good image (`None` when
/// the snapshot does not have the row, or there is no snapshot).
pub(crate) fn classify_suspect(
    plan: &TablePlan,
    suspect: &Suspect,
    good: Option<&RowImage>,
    have_reference: bool,
) -> CorruptionIssue {
    let checksum_column = &plan.columns[plan.checksum_idx].0;
    let table = plan.table.clone();
    let Some(good) = good else {
        if have_reference {
            return CorruptionIssue::new(
                table,
                CorruptionKind::Injection,
                Layer::Pattern,
                format!(
                    "row {} has no valid checksum and is not in the latest good snapshot: \
                     nothing the application wrote explains it",
                    suspect.row
                ),
            )
            .with_row(suspect.row.clone())
            .with_affected(serde_json::json!({ "current": image_json(&suspect.values) }));
        }
        return CorruptionIssue::new(
            table,
            CorruptionKind::Unknown,
            Layer::Checksum,
            format!(
                "row {} fails its checksum; no last known good version to classify it against",
                suspect.row
            ),
        )
        .with_row(suspect.row.clone())
        .with_affected(serde_json::json!({ "current": image_json(&suspect.values) }));
    };
    // The first damaged column decides the kind; BitFlip and Truncation win over
    // Unknown when several columns differ.
    let mut found: Option<(CorruptionKind, &ColumnValue, Option<&str>)> = None;
    for cur in &suspect.values {
        let Some(g) = good.get(&cur.column) else {
            continue;
        };
        if let Some(kind) = classify_value(g, cur.value.as_deref()) {
            let better = match &found {
                None => true,
                Some((CorruptionKind::Unknown, _, _)) => kind != CorruptionKind::Unknown,
                Some(_) => false,
            };
            if better {
                found = Some((kind, cur, g));
            }
        }
    }
    match found {
        Some((kind, cur, g)) => CorruptionIssue::new(
            table,
            kind,
            Layer::Pattern,
            format!(
                "{} of row {} is damaged ({}) against the latest good snapshot",
                cur.column,
                suspect.row,
                kind.as_str()
            ),
        )
        .with_row(suspect.row.clone())
        .with_column(cur.column.clone())
        .with_affected(serde_json::json!({
            "column": cur.column,
            "current": cur.value,
            "last_known_good": g,
        })),
        None => {
            // Every value matches the snapshot: the checksum itself is damaged.
            let kind = match suspect
                .stored
                .as_deref()
                .and_then(|s| bit_distance(s, &suspect.computed))
            {
                Some(1) => CorruptionKind::BitFlip,
                _ => CorruptionKind::Unknown,
            };
            CorruptionIssue::new(
                table,
                kind,
                Layer::Checksum,
                format!(
                    "the stored checksum of row {} is damaged; its values match the latest good snapshot",
                    suspect.row
                ),
            )
            .with_row(suspect.row.clone())
            .with_column(checksum_column.clone())
            .with_affected(serde_json::json!({
                "stored": suspect.stored.as_deref().map(hex),
                "computed": hex(&suspect.computed),
            }))
        }
    }
}

pub(crate) fn image_json(values: &[ColumnValue]) -> serde_json::Value {
    serde_json::Value::Object(
        values
            .iter()
            .map(|c| {
                (
                    c.column.clone(),
                    c.value
                        .clone()
                        .map_or(serde_json::Value::Null, serde_json::Value::String),
                )
            })
            .collect(),
    )
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Confirms, then classifies, suspects (shared by periodic scans and the monitor).
pub(crate) async fn confirm_and_classify(
    client: &impl GenericClient,
    plan: &TablePlan,
    checksum: &dyn RowChecksum,
    snapshots: Option<&Arc<dyn sanare_core::SnapshotService>>,
    suspects: &[Suspect],
) -> Result<Vec<CorruptionIssue>> {
    let mut confirmed = Vec::new();
    for s in suspects {
        if let Some(c) = confirm(client, plan, checksum, s).await? {
            confirmed.push(c);
        }
    }
    if confirmed.is_empty() {
        return Ok(Vec::new());
    }
    let mut goods: Vec<Option<RowImage>> = vec![None; confirmed.len()];
    let mut have_reference = false;
    if let Some(snap) = snapshots
        && let Some(info) = snap.latest_good(None).await?
    {
        have_reference = true;
        let keys: Vec<RowRef> = confirmed.iter().map(|s| s.row.clone()).collect();
        let key_cols: Vec<&str> = plan
            .key_idx
            .iter()
            .map(|&i| plan.columns[i].0.as_str())
            .collect();
        let images = snap.fetch_rows(info.id, &keys).await?;
        for img in images {
            if let Some(r) = img.row_ref(&key_cols)
                && let Some(pos) = keys.iter().position(|k| same_key(k, &r))
            {
                goods[pos] = Some(img);
            }
        }
    }
    Ok(confirmed
        .iter()
        .zip(&goods)
        .map(|(s, g)| classify_suspect(plan, s, g.as_ref(), have_reference))
        .collect())
}

fn same_key(a: &RowRef, b: &RowRef) -> bool {
    a.key.len() == b.key.len()
        && a.key
            .iter()
            .zip(&b.key)
            .all(|(x, y)| x.column == y.column && x.value == y.value)
}
