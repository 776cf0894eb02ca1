//! Running probes: SQL in, suspects out, streamed into a [`Collect`] as the rows
//! arrive (never a whole result in memory). Also the session settings every probe
//! and every catalog read runs under.

use futures_util::{StreamExt, TryStreamExt, pin_mut};
use sanare_core::{Error, Result};
use sanare_pg::copy_text::{TextCopyRows, bytea_hex_eq, decode_bytea_hex};
use sanare_pg::{PgResultExt, quote_ident};
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use tokio_postgres::types::ToSql;

use crate::plan::{Probe, Relationship, TablePlan, TextForm, UniqueKey};
use crate::spill::{Collect, Facts, Suspect};
use crate::units::Pred;

/// `SET LOCAL` statements of every transaction that reads host tables or the
/// catalog for them: the timeouts, the canonical output settings (so a value
/// printed in one transaction parses back to the same value in another, and a
/// constant deparsed from the catalog means what it meant), and standard strings
/// (so the literals of declared rules mean what they say whatever the session's
/// defaults, set with `ALTER DATABASE` or `ALTER ROLE`, are).
pub(crate) fn session_setup(statement_timeout_ms: u128, lock_timeout_ms: u128) -> String {
    format!(
        "SET LOCAL statement_timeout = {statement_timeout_ms}; SET LOCAL lock_timeout = {lock_timeout_ms}; \
         SET LOCAL standard_conforming_strings = on; {}",
        crate::checksum::canonical_settings_sql().replace("SET ", "SET LOCAL ")
    )
}

/// `BEGIN` of a read-only transaction in a fresh snapshot, with `setup`.
pub(crate) fn begin_fresh(setup: &str) -> String {
    format!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {setup}")
}

/// `BEGIN` of a read-only transaction importing the exported snapshot `id`.
pub(crate) fn begin_in_snapshot(id: &str, setup: &str) -> Result<String> {
    // An id from `pg_export_snapshot()`: hex digits and dashes.
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(Error::corrupt(
            "exported snapshot id",
            format!("`{id}` is not a snapshot id"),
        ));
    }
    Ok(format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{id}'; {setup}"
    ))
}

/// Runs `probe` over the rows of `plan` selected by `pred`, on `client` (inside
/// the wanted transaction), putting each suspect into `out` as it arrives. Returns
/// the rows read, for the probes that read every row of `pred`.
pub(crate) async fn run_probe(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    probe: &Probe,
    pred: &Pred,
    out: &mut Collect,
) -> Result<Option<u64>> {
    match probe {
        Probe::Fused(rules) => fused(
            client,
            plan,
            rules.len(),
            rules.iter().map(|r| r.violated.as_str()),
            pred,
            out,
        )
        .await
        .map(Some),
        Probe::Orphans(rel) => orphans(client, plan, rel, pred, out).await.map(|()| None),
        Probe::Checksum { .. } => checksum(client, plan, probe, pred, out).await.map(Some),
        Probe::Unique(u) => unique(client, plan, u, pred, out).await.map(|()| None),
        Probe::Query {
            rule, sql, params, ..
        } => query_rule(client, plan, rule, sql, params, pred, out)
            .await
            .map(|()| None),
    }
}

/// Streams the rows of `sql` with the planner settings `off` (`enable_*` names)
/// turned off for it alone (`SET LOCAL` before, `RESET` after the last row), calling
/// `row` for each.
async fn stream_rows(
    client: &tokio_postgres::Client,
    off: &[&str],
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    what: impl Fn() -> String,
    mut row: impl FnMut(&tokio_postgres::Row) -> Result<()>,
) -> Result<()> {
    let settings = |f: fn(&str) -> String| off.iter().map(|s| f(s)).collect::<String>();
    if !off.is_empty() {
        client
            .batch_execute(&settings(|s| format!("SET LOCAL {s} = off; ")))
            .await
            .context("setting planner options")?;
    }
    let stream = client
        .query_raw(sql, params.iter().copied())
        .await
        .with_context(&what)?;
    pin_mut!(stream);
    while let Some(r) = stream.try_next().await.with_context(&what)? {
        row(&r)?;
    }
    if !off.is_empty() {
        client
            .batch_execute(&settings(|s| format!("RESET {s}; ")))
            .await
            .context("resetting planner options")?;
    }
    Ok(())
}

/// The key columns `0..n` of a result row, none of them null.
fn key_of_row(r: &tokio_postgres::Row, n: usize, what: &dyn Fn() -> String) -> Result<Vec<String>> {
    (0..n)
        .map(|i| {
            r.get::<_, Option<String>>(i).ok_or_else(|| {
                Error::invalid_input(format!("{}: a row's key column {} is null", what(), i + 1))
            })
        })
        .collect()
}

/// Every row rule in one pass: one row per unit, the row count and the offending
/// rows (key and which rules each breaks) as a JSON array, parsed element by
/// element into `out`. The array holds at most the unit's rows.
async fn fused<'a>(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    nrules: usize,
    violated: impl Iterator<Item = &'a str>,
    pred: &Pred,
    out: &mut Collect,
) -> Result<u64> {
    let flags: Vec<String> = violated.map(|v| format!("({v})")).collect();
    let sql = format!(
        "SELECT count(*), coalesce(json_agg(json_build_array({keys}, {flags})) FILTER (WHERE {any}), '[]')::text
           FROM {from} t WHERE {pred}",
        keys = plan.key_select(),
        flags = flags.join(", "),
        any = flags.join(" OR "),
        from = plan.rows_sql(),
        pred = pred.render(0),
    );
    let what = || format!("running the fused schema checks of {}", plan.table);
    let row = client
        .query_one(&sql, &pred.params())
        .await
        .with_context(what)?;
    let rows: i64 = row.get(0);
    let text: &str = row.get(1);
    let mut de = serde_json::Deserializer::from_str(text);
    let mut failed = None;
    let seed = FusedRows {
        nkey: plan.key.len(),
        nrules,
        out,
        failed: &mut failed,
    };
    let parsed = seed.deserialize(&mut de);
    if let Some(e) = failed {
        return Err(e);
    }
    parsed.map_err(|e| Error::other("decoding fused check results", e))?;
    Ok(u64::try_from(rows).unwrap_or(0))
}

/// Reads the fused pass's array one element at a time.
struct FusedRows<'a> {
    nkey: usize,
    nrules: usize,
    out: &'a mut Collect,
    failed: &'a mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for FusedRows<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for FusedRows<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of [key…, flag…] arrays")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        use serde::de::Error as _;
        while let Some(row) = seq.next_element::<Vec<serde_json::Value>>()? {
            if row.len() != self.nkey + self.nrules {
                return Err(A::Error::custom(format!(
                    "a row of {} fields, expected {}",
                    row.len(),
                    self.nkey + self.nrules
                )));
            }
            let key: Vec<String> = row[..self.nkey]
                .iter()
                .map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            for (i, flag) in row[self.nkey..].iter().enumerate() {
                if flag.as_bool() == Some(true) {
                    let pushed = self.out.push(Suspect {
                        rule: u32::try_from(i).unwrap_or(u32::MAX),
                        key: key.clone(),
                        facts: Facts::None,
                    });
                    if let Err(e) = pushed {
                        *self.failed = Some(e);
                        return Err(A::Error::custom("storing a suspect failed"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Orphans of one relationship: child rows whose parent row is missing (and, for
/// MATCH FULL, rows with some but not all of the columns null).
async fn orphans(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    rel: &Relationship,
    pred: &Pred,
    out: &mut Collect,
) -> Result<()> {
    let col = |c: &String| format!("t.{}", quote_ident(c));
    let fk_sel: Vec<String> = rel
        .columns
        .iter()
        .map(|c| format!("{}::text", col(c)))
        .collect();
    let join: Vec<String> = rel
        .columns
        .iter()
        .zip(&rel.parent_columns)
        .map(|(c, p)| format!("p.{} = {}", quote_ident(p), col(c)))
        .collect();
    let missing = format!(
        "NOT EXISTS (SELECT 1 FROM {only}{parent} p WHERE {join})",
        only = if rel.parent_only { "ONLY " } else { "" },
        parent = rel.parent.quoted(),
        join = join.join(" AND "),
    );
    let is = |op: &str, j: &str| {
        rel.columns
            .iter()
            .map(|c| format!("{} IS {op}NULL", col(c)))
            .collect::<Vec<_>>()
            .join(j)
    };
    let cond = if rel.match_full {
        format!(
            "({}) AND ({} OR {missing})",
            is("NOT ", " OR "),
            is("", " OR ")
        )
    } else {
        format!("{} AND {missing}", is("NOT ", " AND "))
    };
    let sql = format!(
        "SELECT {keys}, {fk} FROM {from} t WHERE ({pred}) AND {cond}",
        keys = plan.key_select(),
        fk = fk_sel.join(", "),
        from = plan.rows_sql(),
        pred = pred.render(0),
    );
    // Against a parent much larger than the chunk: probe its key index per row
    // instead of hashing the whole parent for every chunk.
    let joins_off: &[&str] = if rel.probe_parent_index {
        &["enable_hashjoin", "enable_mergejoin"]
    } else {
        &[]
    };
    let what = || format!("looking for orphans of {} ({})", plan.table, rel.name);
    let nkey = plan.key.len();
    stream_rows(client, joins_off, &sql, &pred.params(), what, |r| {
        let key = key_of_row(r, nkey, &what)?;
        let fk: Vec<Option<String>> = (0..rel.columns.len()).map(|i| r.get(nkey + i)).collect();
        out.push(Suspect {
            rule: 0,
            key,
            facts: Facts::Values(fk),
        })
    })
    .await
}

/// Duplicates of a unique key over the whole table; `pred` picks which of them
/// to report.
async fn unique(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    u: &UniqueKey,
    pred: &Pred,
    out: &mut Collect,
) -> Result<()> {
    let mut filter: Vec<String> = if u.nulls_not_distinct {
        Vec::new()
    } else {
        u.keys
            .iter()
            .map(|k| format!("({k}) IS NOT NULL"))
            .collect()
    };
    if let Some(p) = &u.predicate {
        filter.push(format!("({p})"));
    }
    if filter.is_empty() {
        filter.push("true".into());
    }
    let values: Vec<String> = u
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("({k})::text AS sanare_v{i}"))
        .collect();
    let outer: Vec<String> = (0..u.keys.len())
        .map(|i| format!("t.sanare_v{i}"))
        .collect();
    // No join: the planner would trust a unique index to stop at the first match
    // ("inner unique"), hiding exactly the duplicates looked for.
    let sql = format!(
        "SELECT {keys}, {outer} FROM (
             SELECT t.*, t.ctid AS ctid, {values},
                    count(*) OVER (PARTITION BY {partition}) AS sanare_n
               FROM {from} t WHERE {filter}) t
          WHERE t.sanare_n > 1 AND ({pred})",
        keys = plan.key_select(),
        outer = outer.join(", "),
        values = values.join(", "),
        partition = u.keys.join(", "),
        from = plan.rows_sql(),
        filter = filter.join(" AND "),
        pred = pred.render(0),
    );
    let what = || format!("looking for duplicates of {} on {}", u.name, plan.table);
    let nkey = plan.key.len();
    // The index backing the key is what may be damaged: do not trust it.
    let off = [
        "enable_indexscan",
        "enable_indexonlyscan",
        "enable_bitmapscan",
    ];
    stream_rows(client, &off, &sql, &pred.params(), what, |r| {
        let key = key_of_row(r, nkey, &what)?;
        let values: Vec<Option<String>> = (0..u.columns.len()).map(|i| r.get(nkey + i)).collect();
        out.push(Suspect {
            rule: 0,
            key,
            facts: Facts::Values(values),
        })
    })
    .await
}

/// A business-rule query: the keys it returns, within `pred`.
async fn query_rule(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    rule: &str,
    sql: &str,
    params: &[String],
    pred: &Pred,
    out: &mut Collect,
) -> Result<()> {
    let keys: Vec<String> = plan
        .key
        .iter()
        .map(|k| format!("q.{}::text", quote_ident(&k.name)))
        .collect();
    // `pred` is written over alias `t`; the query's rows are aliased `t` too. Its
    // parameters follow the rule's own.
    let full = format!(
        "SELECT {keys} FROM (SELECT * FROM ({sql}) q0) q, LATERAL (SELECT {tk}) t WHERE {pred}",
        keys = keys.join(", "),
        tk = plan
            .key
            .iter()
            .map(|k| format!("q.{} AS {}", quote_ident(&k.name), quote_ident(&k.name)))
            .collect::<Vec<_>>()
            .join(", "),
        pred = pred.render(params.len()),
    );
    let mut p: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    p.extend(pred.params());
    let what = || format!("running business rule `{rule}` on {}", plan.table);
    let nkey = plan.key.len();
    stream_rows(client, &[], &full, &p, what, |r| {
        out.push(Suspect {
            rule: 0,
            key: key_of_row(r, nkey, &what)?,
            facts: Facts::None,
        })
    })
    .await
}

/// Stored against recomputed row checksums. Text `COPY` (which takes no bind
/// parameters: `pred`'s values are inlined as escaped literals): most values arrive
/// in their output form (under the canonical settings of the transaction), which
/// is their `::text`; `character(n)` is trimmed here and the few types whose cast
/// prints differently are cast in SQL (see `TextForm`). Casting every column in
/// SQL instead costs the server several times more per row.
async fn checksum(
    client: &tokio_postgres::Client,
    plan: &TablePlan,
    probe: &Probe,
    pred: &Pred,
    out: &mut Collect,
) -> Result<u64> {
    let Probe::Checksum {
        column,
        columns,
        forms,
        checksummer,
        ..
    } = probe
    else {
        return Err(Error::invalid_input("not a checksum probe"));
    };
    let cols: Vec<String> = columns
        .iter()
        .zip(forms)
        .map(|(c, f)| match f {
            TextForm::Cast => format!("t.{}::text", quote_ident(c)),
            TextForm::Raw | TextForm::TrimBlanks => format!("t.{}", quote_ident(c)),
        })
        .collect();
    // Where every key column is also a checksummed column, its field there is
    // already the key's `::text` (trimmed for `character(n)`): the key is not sent
    // twice (about a fifth of the server's work per row).
    let key_at: Option<Vec<usize>> = if plan.by_ctid() {
        None
    } else {
        plan.key
            .iter()
            .map(|k| columns.iter().position(|c| *c == k.name))
            .collect()
    };
    let key_fields = if key_at.is_some() { 0 } else { plan.key.len() };
    let sql = format!(
        "COPY (SELECT {keys}t.{stored}{sep}{cols} FROM {from} t WHERE {pred}) TO STDOUT",
        keys = if key_at.is_some() {
            String::new()
        } else {
            format!("{}, ", plan.key_select())
        },
        stored = quote_ident(column),
        sep = if cols.is_empty() { "" } else { ", " },
        cols = cols.join(", "),
        from = plan.rows_sql(),
        pred = pred.inline(),
    );
    let name = plan.table.to_string();
    let stream = client
        .copy_out(&sql)
        .await
        .with_context(|| format!("reading rows of {name} for checksum verification"))?;
    pin_mut!(stream);
    // Decoding and hashing run on a blocking thread fed with batches of the stream,
    // so the chunks of a run (polled together on one task) are verified in parallel
    // and the task only moves bytes.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<bytes::Bytes>>(4);
    let verifier = Verifier {
        column: column.clone(),
        forms: forms.clone(),
        checksummer: checksummer.clone(),
        key_at,
        key_fields,
        out: std::mem::take(out),
    };
    let verify = tokio::task::spawn_blocking(move || {
        let mut v = verifier;
        let r = v.run(&mut rx);
        (r, v.out)
    });
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
            // A closed channel means the verifier stopped on an error: its result
            // below says which.
            if tx.send(std::mem::take(&mut batch)).await.is_err() {
                break;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(batch).await;
    }
    drop(tx);
    let (verified, back) = verify
        .await
        .map_err(|e| Error::other("the checksum verifier thread failed", e))?;
    *out = back;
    streamed?;
    verified
}

/// Decodes a text `COPY` stream and compares each row's stored checksum with the
/// one computed over its fields.
struct Verifier {
    column: String,
    forms: Vec<TextForm>,
    checksummer: crate::checksum::Checksummer,
    key_at: Option<Vec<usize>>,
    key_fields: usize,
    out: Collect,
}

impl Verifier {
    fn run(&mut self, rx: &mut tokio::sync::mpsc::Receiver<Vec<bytes::Bytes>>) -> Result<u64> {
        let mut lines = TextCopyRows::default();
        let mut rows = 0u64;
        let ncols = u32::try_from(self.forms.len()).unwrap_or(u32::MAX);
        let nfields = self.key_fields + 1 + self.forms.len();
        let mut hasher = self.checksummer.row(ncols);
        let (forms, key_at, key_fields) = (&self.forms, &self.key_at, self.key_fields);
        let (out, column) = (&mut self.out, &self.column);
        let mut on_row = |fields: &[Option<&[u8]>]| -> Result<()> {
            rows += 1;
            if fields.len() != nfields {
                return Err(Error::corrupt(
                    "COPY row",
                    format!("expected {nfields} fields, got {}", fields.len()),
                ));
            }
            hasher.restart(ncols);
            for (f, form) in fields[key_fields + 1..].iter().zip(forms) {
                hasher.field(if *form == TextForm::TrimBlanks {
                    f.map(trim_blanks)
                } else {
                    *f
                });
            }
            let computed = hasher.digest();
            if fields[key_fields].is_some_and(|h| bytea_hex_eq(h, &computed)) {
                return Ok(());
            }
            let stored = fields[key_fields].and_then(decode_bytea_hex);
            let text = |f: Option<&[u8]>| f.map(|b| String::from_utf8_lossy(b).into_owned());
            let key: Option<Vec<String>> = match key_at {
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
            let key = key.ok_or_else(|| {
                Error::invalid_input(format!(
                    "a row's key is null in the checksum check of {column}"
                ))
            })?;
            out.push(Suspect {
                rule: 0,
                key,
                facts: Facts::Checksum {
                    stored: stored.as_deref().map(hex),
                    computed: hex(&computed),
                },
            })
        };
        while let Some(batch) = rx.blocking_recv() {
            for chunk in &batch {
                lines.feed(chunk, &mut on_row)?;
            }
        }
        lines.finish()?;
        Ok(rows)
    }
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

    #[test]
    fn a_snapshot_id_is_checked_before_it_reaches_sql() {
        assert!(begin_in_snapshot("00000003-0000001B-1", "").is_ok());
        assert!(begin_in_snapshot("1'; DROP TABLE x; --", "").is_err());
        assert!(begin_in_snapshot("", "").is_err());
    }
}
