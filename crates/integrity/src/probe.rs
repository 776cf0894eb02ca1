//! Running probes: SQL in, suspects out.

use futures_util::{StreamExt, pin_mut};
use sanare_core::{CheckFamily, Error, Result, Severity, ViolationKind};
use sanare_pg::copy_text::{TextCopyRows, bytea_hex_eq, decode_bytea_hex};
use sanare_pg::{PgResultExt, quote_ident};
use tokio_postgres::types::ToSql;

use crate::plan::{Probe, TablePlan, TextForm};

/// A row that looks wrong in one snapshot.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Suspect {
    /// The row key (text forms), in key column order.
    pub(crate) key: Vec<Option<String>>,
    pub(crate) kind: ViolationKind,
    pub(crate) severity: Severity,
    pub(crate) family: CheckFamily,
    pub(crate) description: String,
    pub(crate) action: String,
    pub(crate) details: serde_json::Value,
}

impl Suspect {
    /// What must match between the first read and the re-read.
    pub(crate) fn identity(&self) -> (Vec<Option<String>>, String) {
        (self.key.clone(), format!("{:?}", self.kind))
    }
}

/// The outcome of one probe over one predicate.
#[derive(Debug, Default)]
pub(crate) struct ProbeResult {
    pub(crate) rows: Option<u64>,
    pub(crate) suspects: Vec<Suspect>,
}

/// Runs `sql` with the planner settings `off` (`enable_*` names) turned off for it
/// alone: `SET LOCAL` before, `RESET` after, so the chunk's later statements plan
/// normally. `what` names the query in its error.
async fn query_with_plans_off(
    client: &tokio_postgres::Client,
    off: &[&str],
    sql: &str,
    what: impl FnOnce() -> String,
) -> Result<Vec<tokio_postgres::Row>> {
    let settings = |f: fn(&str) -> String| off.iter().map(|s| f(s)).collect::<String>();
    if !off.is_empty() {
        client
            .batch_execute(&settings(|s| format!("SET LOCAL {s} = off; ")))
            .await
            .context("setting planner options")?;
    }
    let rows = client.query(sql, &[]).await.with_context(what)?;
    if !off.is_empty() {
        client
            .batch_execute(&settings(|s| format!("RESET {s}; ")))
            .await
            .context("resetting planner options")?;
    }
    Ok(rows)
}

/// Runs `probe` over the rows of `plan` selected by `pred` (an SQL boolean over
/// alias `t`), on `client` (already inside the wanted transaction).
pub(crate) async fn run_probe(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    probe: &Probe,
    pred: &str,
) -> Result<ProbeResult> {
    let t = plan.table.quoted();
    let name = plan.table.to_string();
    let nkey = plan.key.len();
    match probe {
        Probe::Fused(rules) => {
            let any: Vec<String> = rules.iter().map(|r| format!("({})", r.violated)).collect();
            let flags: Vec<String> = rules.iter().map(|r| format!("({})", r.violated)).collect();
            let sql = format!(
                "SELECT count(*), coalesce(json_agg(json_build_array({keys}, {flags})) FILTER (WHERE {any}), '[]')::text
                   FROM {t} t WHERE {pred}",
                keys = plan.key_select(),
                flags = flags.join(", "),
                any = any.join(" OR "),
            );
            let row = client
                .query_one(&sql, &[])
                .await
                .with_context(|| format!("running the fused schema checks of {name}"))?;
            let rows: i64 = row.get(0);
            let found: Vec<Vec<serde_json::Value>> = serde_json::from_str(row.get::<_, &str>(1))
                .map_err(|e| Error::other("decoding fused check results", e))?;
            let mut suspects = Vec::new();
            for f in found {
                let key = json_key(&f[..nkey.min(f.len())]);
                for (i, rule) in rules.iter().enumerate() {
                    if f.get(nkey + i).and_then(serde_json::Value::as_bool) == Some(true) {
                        suspects.push(Suspect {
                            key: key.clone(),
                            kind: rule.kind.clone(),
                            severity: rule.severity,
                            family: rule.family,
                            description: rule.description.clone(),
                            action: rule.action.clone(),
                            details: serde_json::Value::Null,
                        });
                    }
                }
            }
            Ok(ProbeResult {
                rows: Some(u64::try_from(rows).unwrap_or(0)),
                suspects,
            })
        }
        Probe::Orphans(rel) => {
            let fk_sel: Vec<String> = rel
                .columns
                .iter()
                .map(|c| format!("t.{}::text", quote_ident(c)))
                .collect();
            let not_null: Vec<String> = rel
                .columns
                .iter()
                .map(|c| format!("t.{} IS NOT NULL", quote_ident(c)))
                .collect();
            let join: Vec<String> = rel
                .columns
                .iter()
                .zip(&rel.parent_columns)
                .map(|(c, p)| format!("p.{} = t.{}", quote_ident(p), quote_ident(c)))
                .collect();
            let sql = format!(
                "SELECT {keys}, {fk} FROM {t} t
                  WHERE ({pred}) AND {nn}
                    AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE {join})",
                keys = plan.key_select(),
                fk = fk_sel.join(", "),
                nn = not_null.join(" AND "),
                parent = rel.parent.quoted(),
                join = join.join(" AND "),
            );
            // Against a parent much larger than the chunk: probe its key index per
            // row instead of hashing the whole parent for every chunk.
            let joins_off: &[&str] = if rel.probe_parent_index {
                &["enable_hashjoin", "enable_mergejoin"]
            } else {
                &[]
            };
            let rows = query_with_plans_off(client, joins_off, &sql, || {
                format!("looking for orphans of {name} ({})", rel.name)
            })
            .await?;
            let suspects = rows
                .iter()
                .map(|r| {
                    let key: Vec<Option<String>> = (0..nkey).map(|i| r.get(i)).collect();
                    let fk: Vec<Option<String>> = (0..rel.columns.len()).map(|i| r.get(nkey + i)).collect();
                    let missing: serde_json::Map<String, serde_json::Value> = rel
                        .parent_columns
                        .iter()
                        .zip(&fk)
                        .map(|(c, v)| (c.clone(), serde_json::json!(v)))
                        .collect();
                    let child: serde_json::Map<String, serde_json::Value> = rel
                        .columns
                        .iter()
                        .zip(&fk)
                        .map(|(c, v)| (c.clone(), serde_json::json!(v)))
                        .collect();
                    Suspect {
                        key,
                        kind: ViolationKind::Referential {
                            constraint: rel.name.clone(),
                            columns: rel.columns.clone(),
                            parent_table: rel.parent.clone(),
                            parent_columns: rel.parent_columns.clone(),
                        },
                        severity: rel.severity,
                        family: CheckFamily::Referential,
                        description: format!(
                            "{name} row references a missing {} row ({})",
                            rel.parent,
                            rel.name
                        ),
                        action: format!(
                            "restore the missing {} row from a snapshot, or delete / re-point the orphan",
                            rel.parent
                        ),
                        details: serde_json::json!({
                            "child_key": child,
                            "missing_parent_key": missing,
                            "constraint_validated": rel.validated,
                        }),
                    }
                })
                .collect();
            Ok(ProbeResult {
                rows: None,
                suspects,
            })
        }
        Probe::Checksum {
            column,
            columns,
            forms,
            checksummer,
            severity,
        } => {
            // Text COPY: most values arrive in their output form (under the canonical
            // settings of the transaction), which is their `::text`; `character(n)`
            // is trimmed here and the few types whose cast prints differently are
            // cast in SQL (see `TextForm`). Casting every column in SQL instead costs
            // the server several times more per row.
            let cols: Vec<String> = columns
                .iter()
                .zip(forms)
                .map(|(c, f)| match f {
                    TextForm::Cast => format!("t.{}::text", quote_ident(c)),
                    TextForm::Raw | TextForm::TrimBlanks => format!("t.{}", quote_ident(c)),
                })
                .collect();
            // Where every key column is also a checksummed column, its field there
            // is already the key's `::text` (trimmed for `character(n)`): the key is
            // not sent twice (about a fifth of the server's work per row).
            let key_at: Option<Vec<usize>> = if plan.by_ctid() {
                None
            } else {
                plan.key
                    .iter()
                    .map(|k| columns.iter().position(|c| *c == k.name))
                    .collect()
            };
            let key_fields = if key_at.is_some() { 0 } else { nkey };
            let sql = format!(
                "COPY (SELECT {keys}{stored}{sep}{cols} FROM {t} t WHERE {pred}) TO STDOUT",
                keys = if key_at.is_some() {
                    String::new()
                } else {
                    format!("{}, ", plan.key_select())
                },
                stored = format_args!("t.{}", quote_ident(column)),
                sep = if cols.is_empty() { "" } else { ", " },
                cols = cols.join(", "),
            );
            let stream = client
                .copy_out(&sql)
                .await
                .with_context(|| format!("reading rows of {name} for checksum verification"))?;
            pin_mut!(stream);
            // Decoding and hashing run on a blocking thread fed with batches of the
            // stream, so the chunks of a run (polled together on one task) are
            // verified in parallel and the task only moves bytes.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<bytes::Bytes>>(4);
            let verify = {
                let (column, forms, checksummer, severity, name) = (
                    column.clone(),
                    forms.clone(),
                    checksummer.clone(),
                    *severity,
                    name.clone(),
                );
                let nfields = key_fields + 1 + columns.len();
                tokio::task::spawn_blocking(move || -> Result<(u64, Vec<Suspect>)> {
                    let mut lines = TextCopyRows::default();
                    let mut rows = 0u64;
                    let mut suspects = Vec::new();
                    let ncols = u32::try_from(forms.len()).unwrap_or(u32::MAX);
                    let mut hasher = checksummer.row(ncols);
                    let mut on_row = |fields: &[Option<&[u8]>]| -> Result<()> {
                        rows += 1;
                        if fields.len() != nfields {
                            return Err(Error::corrupt(
                                "COPY row",
                                format!("expected {nfields} fields, got {}", fields.len()),
                            ));
                        }
                        hasher.restart(ncols);
                        for (f, form) in fields[key_fields + 1..].iter().zip(&forms) {
                            hasher.field(if *form == TextForm::TrimBlanks {
                                f.map(trim_blanks)
                            } else {
                                *f
                            });
                        }
                        let computed = hasher.digest();
                        if !fields[key_fields].is_some_and(|h| bytea_hex_eq(h, &computed)) {
                            let stored = fields[key_fields].and_then(decode_bytea_hex);
                            let text = |f: Option<&[u8]>| {
                                f.map(|b| String::from_utf8_lossy(b).into_owned())
                            };
                            let key = match &key_at {
                                Some(at) => at
                                    .iter()
                                    .map(|&i| {
                                        let f = fields[key_fields + 1 + i];
                                        text(if forms[i] == TextForm::TrimBlanks {
                                            f.map(trim_blanks)
                                        } else {
                                            f
                                        })
                                    })
                                    .collect(),
                                None => fields[..key_fields].iter().map(|f| text(*f)).collect(),
                            };
                            suspects.push(Suspect {
                                key,
                                kind: ViolationKind::ChecksumMismatch { column: column.clone() },
                                severity,
                                family: CheckFamily::Checksum,
                                description: format!("{name}.{column} does not match the row's values"),
                                action: "compare with the latest snapshot and the journal; restore the row if it was tampered with".into(),
                                details: serde_json::json!({
                                    "stored": stored.as_deref().map(hex),
                                    "computed": hex(&computed),
                                    "algorithm": checksummer.algorithm().as_str(),
                                    "encoding_version": crate::checksum::ENCODING_VERSION,
                                }),
                            });
                        }
                        Ok(())
                    };
                    while let Some(batch) = rx.blocking_recv() {
                        for chunk in &batch {
                            lines.feed(chunk, &mut on_row)?;
                        }
                    }
                    lines.finish()?;
                    Ok((rows, suspects))
                })
            };
            let mut batch = Vec::new();
            let mut size = 0usize;
            let mut streamed: Result<()> = Ok(());
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk.context("streaming rows for checksum verification") {
                    Ok(c) => c,
                    Err(e) => {
                        streamed = Err(e);
                        break;
                    }
                };
                size += chunk.len();
                batch.push(chunk);
                if size >= 256 * 1024 {
                    size = 0;
                    // A closed channel means the verifier stopped on an error: its
                    // result below says which.
                    if tx.send(std::mem::take(&mut batch)).await.is_err() {
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(batch).await;
            }
            drop(tx);
            let verified = verify
                .await
                .map_err(|e| Error::other("the checksum verifier thread failed", e))?;
            streamed?;
            let (rows, suspects) = verified?;
            Ok(ProbeResult {
                rows: Some(rows),
                suspects,
            })
        }
        Probe::Unique {
            constraint,
            columns,
            severity,
        } => {
            let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
            let tcols: Vec<String> = columns
                .iter()
                .map(|c| format!("t.{}", quote_ident(c)))
                .collect();
            let txt: Vec<String> = tcols.iter().map(|c| format!("{c}::text")).collect();
            let nn: Vec<String> = cols.iter().map(|c| format!("{c} IS NOT NULL")).collect();
            // No join: the planner would trust the unique index to stop at the first
            // match ("inner unique"), hiding exactly the duplicates looked for.
            let sql = format!(
                "SELECT {keys}, {txt} FROM (SELECT t.*, t.ctid AS ctid, count(*) OVER (PARTITION BY {tc}) AS sanare_n
                                              FROM {t} t WHERE {nn}) t
                  WHERE t.sanare_n > 1 AND ({pred})",
                keys = plan.key_select(),
                txt = txt.join(", "),
                tc = tcols.join(", "),
                nn = nn.join(" AND "),
            );
            // The index backing the constraint is what may be damaged: do not trust it.
            let rows = query_with_plans_off(
                client,
                &[
                    "enable_indexscan",
                    "enable_indexonlyscan",
                    "enable_bitmapscan",
                ],
                &sql,
                || format!("looking for duplicates of {constraint} on {name}"),
            )
            .await?;
            let suspects = rows
                .iter()
                .map(|r| {
                    let key = (0..nkey).map(|i| r.get(i)).collect();
                    let values: serde_json::Map<String, serde_json::Value> = columns
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (c.clone(), serde_json::json!(r.get::<_, Option<String>>(nkey + i))))
                        .collect();
                    Suspect {
                        key,
                        kind: ViolationKind::UniqueConstraint {
                            constraint: constraint.clone(),
                            columns: columns.clone(),
                        },
                        severity: *severity,
                        family: CheckFamily::Schema,
                        description: format!("{name}: rows share a value of unique {constraint}"),
                        action: "keep one of the duplicates (compare with the journal), delete or change the others, then REINDEX".into(),
                        details: serde_json::json!({ "duplicate_value": values }),
                    }
                })
                .collect();
            Ok(ProbeResult {
                rows: None,
                suspects,
            })
        }
        Probe::Query {
            rule,
            sql,
            params,
            severity,
            action,
        } => {
            let keys: Vec<String> = plan
                .key
                .iter()
                .map(|k| format!("q.{}::text", quote_ident(&k.name)))
                .collect();
            // `pred` is written over alias `t`; the query's rows are aliased `t` too.
            let full = format!(
                "SELECT {keys} FROM (SELECT * FROM ({sql}) q0) q, LATERAL (SELECT {tk}) t WHERE {pred}",
                keys = keys.join(", "),
                tk = plan
                    .key
                    .iter()
                    .map(|k| format!("q.{} AS {}", quote_ident(&k.name), quote_ident(&k.name)))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            let p: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            let rows = client
                .query(&full, &p)
                .await
                .with_context(|| format!("running business rule `{rule}` on {name}"))?;
            let suspects = rows
                .iter()
                .map(|r| Suspect {
                    key: (0..nkey).map(|i| r.get(i)).collect(),
                    kind: ViolationKind::Consistency { rule: rule.clone() },
                    severity: *severity,
                    family: CheckFamily::Consistency,
                    description: format!("{name}: business rule `{rule}` fails"),
                    action: action.clone(),
                    details: serde_json::Value::Null,
                })
                .collect();
            Ok(ProbeResult {
                rows: None,
                suspects,
            })
        }
    }
}

fn json_key(values: &[serde_json::Value]) -> Vec<Option<String>> {
    values
        .iter()
        .map(|v| match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        })
        .collect()
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// `character(n)` output without its trailing blanks (what `::text` gives).
fn trim_blanks(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|&c| c != b' ').map_or(0, |i| i + 1);
    &b[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn character_n_output_loses_its_trailing_blanks_only() {
        assert_eq!(trim_blanks(b"ab  "), b"ab");
        assert_eq!(trim_blanks(b" a b "), b" a b");
        assert_eq!(trim_blanks(b"   "), b"");
    }
}
