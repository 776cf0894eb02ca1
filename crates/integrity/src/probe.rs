//! Running probes: SQL in, suspects out.

use bytes::Buf;
use futures_util::{StreamExt, pin_mut};
use sanare_core::{CheckFamily, Error, Result, Severity, ViolationKind};
use sanare_pg::{PgResultExt, quote_ident};
use tokio_postgres::types::ToSql;

use crate::plan::{Probe, TablePlan};

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
            let rows = client
                .query(&sql, &[])
                .await
                .with_context(|| format!("looking for orphans of {name} ({})", rel.name))?;
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
            checksummer,
            severity,
        } => {
            let cols: Vec<String> = columns
                .iter()
                .map(|c| format!("t.{}::text", quote_ident(c)))
                .collect();
            let sql = format!(
                "COPY (SELECT {keys}, {stored}{sep}{cols} FROM {t} t WHERE {pred}) TO STDOUT (FORMAT binary)",
                keys = plan.key_select(),
                stored = format_args!("t.{}", quote_ident(column)),
                sep = if cols.is_empty() { "" } else { ", " },
                cols = cols.join(", "),
            );
            let stream = client
                .copy_out(&sql)
                .await
                .with_context(|| format!("reading rows of {name} for checksum verification"))?;
            pin_mut!(stream);
            let mut parser = CopyParser::default();
            let mut rows = 0u64;
            let mut suspects = Vec::new();
            let ncols = u32::try_from(columns.len()).unwrap_or(u32::MAX);
            let mut on_tuple = |fields: &[Option<&[u8]>]| -> Result<()> {
                rows += 1;
                if fields.len() != nkey + 1 + columns.len() {
                    return Err(Error::corrupt(
                        "COPY tuple",
                        format!(
                            "expected {} fields, got {}",
                            nkey + 1 + columns.len(),
                            fields.len()
                        ),
                    ));
                }
                let mut h = checksummer.row(ncols);
                for f in &fields[nkey + 1..] {
                    h.field(*f);
                }
                let computed = h.finish();
                let stored = fields[nkey];
                if stored != Some(&computed[..]) {
                    let key = fields[..nkey]
                        .iter()
                        .map(|f| f.map(|b| String::from_utf8_lossy(b).into_owned()))
                        .collect();
                    suspects.push(Suspect {
                        key,
                        kind: ViolationKind::ChecksumMismatch { column: column.clone() },
                        severity: *severity,
                        family: CheckFamily::Checksum,
                        description: format!("{name}.{column} does not match the row's values"),
                        action: "compare with the latest snapshot and the journal; restore the row if it was tampered with".into(),
                        details: serde_json::json!({
                            "stored": stored.map(hex),
                            "computed": hex(&computed),
                            "algorithm": checksummer.algorithm().as_str(),
                            "encoding_version": crate::checksum::ENCODING_VERSION,
                        }),
                    });
                }
                Ok(())
            };
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.context("streaming rows for checksum verification")?;
                parser.feed(&chunk, &mut on_tuple)?;
            }
            parser.finish()?;
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
            // The index backing the constraint is what may be damaged: do not trust it.
            client
                .batch_execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_indexonlyscan = off; SET LOCAL enable_bitmapscan = off")
                .await
                .context("setting planner options for a unique check")?;
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
            let rows = client
                .query(&sql, &[])
                .await
                .with_context(|| format!("looking for duplicates of {constraint} on {name}"))?;
            client
                .batch_execute(
                    "RESET enable_indexscan; RESET enable_indexonlyscan; RESET enable_bitmapscan",
                )
                .await
                .context("resetting planner options")?;
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

/// An incremental parser of PostgreSQL's binary COPY format: a 19-byte header
/// (`PGCOPY\n\xff\r\n\0`, flags, extension length + extension), tuples of an i16 field
/// count and (i32 length or -1, bytes) fields, and a trailer of field count -1.
#[derive(Debug, Default)]
pub(crate) struct CopyParser {
    buf: Vec<u8>,
    header_done: bool,
    ended: bool,
}

const COPY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

impl CopyParser {
    pub(crate) fn feed(
        &mut self,
        data: &[u8],
        on_tuple: &mut impl FnMut(&[Option<&[u8]>]) -> Result<()>,
    ) -> Result<()> {
        self.buf.extend_from_slice(data);
        let mut pos = 0usize;
        if !self.header_done {
            if self.buf.len() < 19 {
                return Ok(());
            }
            if &self.buf[..11] != COPY_SIGNATURE {
                return Err(Error::corrupt("binary COPY stream", "bad signature"));
            }
            let ext = read_i32(&self.buf[15..19]);
            let ext = usize::try_from(ext)
                .map_err(|_| Error::corrupt("binary COPY stream", "negative header extension"))?;
            if self.buf.len() < 19 + ext {
                return Ok(());
            }
            pos = 19 + ext;
            self.header_done = true;
        }
        let mut fields: Vec<Option<&[u8]>> = Vec::new();
        loop {
            if self.ended {
                pos = self.buf.len();
                break;
            }
            let mut p = pos;
            if self.buf.len() < p + 2 {
                break;
            }
            let n = i16::from_be_bytes([self.buf[p], self.buf[p + 1]]);
            p += 2;
            if n == -1 {
                self.ended = true;
                pos = p;
                continue;
            }
            let n = usize::try_from(n)
                .map_err(|_| Error::corrupt("binary COPY stream", "bad field count"))?;
            fields.clear();
            let mut complete = true;
            for _ in 0..n {
                if self.buf.len() < p + 4 {
                    complete = false;
                    break;
                }
                let len = read_i32(&self.buf[p..p + 4]);
                p += 4;
                if len < 0 {
                    fields.push(None);
                    continue;
                }
                let len = usize::try_from(len).unwrap_or(0);
                if self.buf.len() < p + len {
                    complete = false;
                    break;
                }
                fields.push(Some(&self.buf[p..p + len]));
                p += len;
            }
            if !complete {
                break;
            }
            on_tuple(&fields)?;
            pos = p;
        }
        drop(fields);
        self.buf.drain(..pos);
        Ok(())
    }

    pub(crate) fn finish(&self) -> Result<()> {
        if !self.ended || !self.buf.is_empty() {
            return Err(Error::corrupt(
                "binary COPY stream",
                "ended without its trailer (torn stream)",
            ));
        }
        Ok(())
    }
}

fn read_i32(b: &[u8]) -> i32 {
    let mut s = b;
    s.get_i32()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(tuples: &[Vec<Option<&[u8]>>], trailer: bool) -> Vec<u8> {
        let mut out = COPY_SIGNATURE.to_vec();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        for t in tuples {
            out.extend_from_slice(&i16::try_from(t.len()).unwrap().to_be_bytes());
            for f in t {
                match f {
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(b) => {
                        out.extend_from_slice(&i32::try_from(b.len()).unwrap().to_be_bytes());
                        out.extend_from_slice(b);
                    }
                }
            }
        }
        if trailer {
            out.extend_from_slice(&(-1i16).to_be_bytes());
        }
        out
    }

    #[test]
    fn copy_parser_handles_any_split_and_rejects_torn_streams() {
        let tuples = vec![
            vec![Some(&b"1"[..]), None],
            vec![Some(&b"22"[..]), Some(&b""[..])],
        ];
        let data = stream(&tuples, true);
        for split in 0..data.len() {
            let mut p = CopyParser::default();
            let mut seen: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
            let mut f = |fs: &[Option<&[u8]>]| {
                seen.push(fs.iter().map(|x| x.map(<[u8]>::to_vec)).collect());
                Ok(())
            };
            p.feed(&data[..split], &mut f).unwrap();
            p.feed(&data[split..], &mut f).unwrap();
            p.finish().unwrap();
            assert_eq!(seen.len(), 2);
            assert_eq!(seen[0][1], None);
            assert_eq!(seen[1][0].as_deref(), Some(&b"22"[..]));
        }
        let torn = stream(&tuples, false);
        let mut p = CopyParser::default();
        p.feed(&torn[..torn.len() - 1], &mut |_| Ok(())).unwrap();
        assert!(p.finish().is_err());
        let mut p = CopyParser::default();
        assert!(
            p.feed(&b"NOTCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0"[..], &mut |_| Ok(()))
                .is_err()
        );
    }
}
