//! Suspects, confirmed and classified: a row that failed its checksum in the scan
//! snapshot is re-read in a fresh one (a concurrent write explains it otherwise),
//! then compared with its last known good version.

use std::sync::Arc;

use tokio_postgres::GenericClient;

use sanare_core::{ColumnValue, CorruptionKind, Result, RowChecksum, RowImage, RowRef};
use sanare_pg::copy_text::decode_bytea_hex;
use sanare_pg::{PgResultExt, Pool, quote_ident};

use crate::classify::{bit_distance, classify_value};
use crate::issue::{CorruptionIssue, Layer};
use crate::scan::{Suspect, TablePlan};
use crate::session;

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
        plan.source_clause()
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
///
/// The re-reads run in one READ COMMITTED read-only transaction under the canonical
/// settings (each statement a fresh snapshot), on a guarded connection.
pub(crate) async fn confirm_and_classify(
    pool: &Pool,
    plan: &TablePlan,
    checksum: &dyn RowChecksum,
    snapshots: Option<&Arc<dyn sanare_core::SnapshotService>>,
    suspects: &[Suspect],
) -> Result<Vec<CorruptionIssue>> {
    if suspects.is_empty() {
        return Ok(Vec::new());
    }
    let mut confirmed = Vec::new();
    {
        let tx = session::read_committed(pool).await?;
        for s in suspects {
            if let Some(c) = confirm(&***tx, plan, checksum, s).await? {
                confirmed.push(c);
            }
        }
        tx.commit().await?;
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
