//! Work units as data: which rows of a table a unit covers (a key range, a block
//! range, a list of keys, or the whole table), stored in `integrity_chunks.work` and
//! turned into SQL only when the unit runs.
//!
//! A stored unit holds values, never SQL. At run time the identifiers come from the
//! live catalog (the plan of the table), the values go to the server as bind
//! parameters, and a stored unit whose shape does not match the live plan (other key
//! columns or types, a probe the plan does not have, a bound of the wrong length) is
//! refused before anything runs. The format is specified in `docs/formats.md`
//! ("Integrity work unit").

use sanare_core::{Error, Result, TableRef};
use serde::{Deserialize, Serialize};
use tokio_postgres::types::ToSql;

use crate::plan::TablePlan;

/// The `format` field of every stored unit.
pub(crate) const UNIT_FORMAT: &str = "sanare-integrity-unit";
/// The version of the stored unit this crate writes and reads.
pub(crate) const UNIT_VERSION: u16 = 1;

/// A key column as the catalog named and typed it when the unit was planned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredKeyCol {
    pub(crate) name: String,
    pub(crate) type_name: String,
}

/// Which rows of the table a unit covers. Values are text forms printed under the
/// probes' session settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Rows {
    /// Every row.
    All,
    /// Keys in `[from, to)`; an absent bound is open.
    Range {
        from: Option<Vec<String>>,
        to: Option<Vec<String>>,
    },
    /// Heap blocks in `[from, to)` (tables without a primary key); an absent bound
    /// is open.
    Blocks { from: Option<u32>, to: Option<u32> },
    /// Exactly these keys.
    Keys { keys: Vec<Vec<String>> },
}

/// One stored work unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredUnit {
    pub(crate) format: String,
    pub(crate) version: u16,
    /// `None`: every chunked probe of the table; `Some(id)`: the whole-table probe
    /// with that id.
    pub(crate) probe: Option<String>,
    pub(crate) key: Vec<StoredKeyCol>,
    pub(crate) rows: Rows,
}

impl StoredUnit {
    /// A unit of `plan` over `rows`.
    pub(crate) fn new(plan: &TablePlan, probe: Option<String>, rows: Rows) -> Self {
        Self {
            format: UNIT_FORMAT.into(),
            version: UNIT_VERSION,
            probe,
            key: plan
                .key
                .iter()
                .map(|k| StoredKeyCol {
                    name: k.name.clone(),
                    type_name: k.type_name.clone(),
                })
                .collect(),
            rows,
        }
    }

    /// Decodes a stored unit.
    pub(crate) fn decode(table: &TableRef, unit: i32, json: serde_json::Value) -> Result<Self> {
        let u: StoredUnit = serde_json::from_value(json).map_err(|e| refused(table, unit, e))?;
        if u.format != UNIT_FORMAT || u.version != UNIT_VERSION {
            return Err(refused(
                table,
                unit,
                format!(
                    "format `{}` version {} (this version reads `{UNIT_FORMAT}` version {UNIT_VERSION})",
                    u.format, u.version
                ),
            ));
        }
        Ok(u)
    }

    /// Checks this unit against the live plan of its table: the same key columns
    /// and types, a probe the plan has, bounds of the key's length.
    pub(crate) fn check(&self, plan: &TablePlan, unit: i32) -> Result<()> {
        let bad = |why: String| Err(refused(&plan.table, unit, why));
        let live: Vec<StoredKeyCol> = plan
            .key
            .iter()
            .map(|k| StoredKeyCol {
                name: k.name.clone(),
                type_name: k.type_name.clone(),
            })
            .collect();
        if self.key != live {
            return bad(format!(
                "its key {} is not the table's key {} in the catalog",
                describe_key(&self.key),
                describe_key(&live)
            ));
        }
        match &self.probe {
            None if !plan.probes.iter().any(|p| p.chunked()) => {
                return bad("the table has no chunked check any more".into());
            }
            Some(id) if !plan.probes.iter().any(|p| !p.chunked() && p.id() == *id) => {
                return bad(format!("the table has no check `{id}` any more"));
            }
            _ => {}
        }
        let n = plan.key.len();
        match &self.rows {
            Rows::All => Ok(()),
            Rows::Range { .. } | Rows::Keys { .. } if plan.by_ctid() => {
                bad("a key range on a table read by heap block".into())
            }
            Rows::Blocks { .. } if !plan.by_ctid() => {
                bad("a block range on a table with a primary key".into())
            }
            Rows::Blocks { .. } => Ok(()),
            Rows::Range { from, to } => {
                for b in [from, to].into_iter().flatten() {
                    if b.len() != n {
                        return bad(format!("a bound of {} values for a key of {n}", b.len()));
                    }
                }
                Ok(())
            }
            Rows::Keys { keys } => {
                if let Some(k) = keys.iter().find(|k| k.len() != n) {
                    return bad(format!("a key of {} values for a key of {n}", k.len()));
                }
                Ok(())
            }
        }
    }

    /// Every value of the unit, by key column, for a check that each parses as its
    /// column's type.
    pub(crate) fn values_by_column(&self, out: &mut [Vec<String>]) {
        let mut add = |vals: &[String]| {
            for (slot, v) in out.iter_mut().zip(vals) {
                slot.push(v.clone());
            }
        };
        match &self.rows {
            Rows::Range { from, to } => {
                for b in [from, to].into_iter().flatten() {
                    add(b);
                }
            }
            Rows::Keys { keys } => keys.iter().for_each(|k| add(k)),
            Rows::All | Rows::Blocks { .. } => {}
        }
    }
}

/// Checks that the stored units of one table are the units a run of the live plan
/// would have: every whole-table probe once, over all rows (or the scope's keys),
/// and chunks that tile the table (the first open below, each starting where the
/// previous ended, the last open above), so that no row is skipped or read twice.
/// `units` are in unit order; `scoped` are the keys of a scope limited to rows.
pub(crate) fn check_tiling(
    plan: &TablePlan,
    units: &[(i32, &StoredUnit)],
    scoped: Option<&[Vec<String>]>,
) -> Result<()> {
    let first = units.first().map_or(0, |u| u.0);
    let bad = |unit: i32, why: &str| Err(refused(&plan.table, unit, why));
    let mut live: Vec<String> = plan
        .probes
        .iter()
        .filter(|p| !p.chunked())
        .map(crate::plan::Probe::id)
        .collect();
    let mut stored: Vec<String> = units.iter().filter_map(|u| u.1.probe.clone()).collect();
    live.sort();
    stored.sort();
    if live != stored {
        return bad(
            first,
            "the table's whole-table checks are not the ones stored",
        );
    }
    let whole_rows = match scoped {
        Some(keys) => Rows::Keys {
            keys: keys.to_vec(),
        },
        None => Rows::All,
    };
    if let Some((unit, _)) = units
        .iter()
        .find(|u| u.1.probe.is_some() && u.1.rows != whole_rows)
    {
        return bad(*unit, "a whole-table check does not cover the run's rows");
    }
    let chunks: Vec<&(i32, &StoredUnit)> = units.iter().filter(|u| u.1.probe.is_none()).collect();
    let chunked = plan.probes.iter().any(|p| p.chunked());
    if chunks.is_empty() == chunked {
        return bad(first, "the chunks do not match the table's chunked checks");
    }
    if let Some(keys) = scoped {
        return match chunks.as_slice() {
            [] => Ok(()),
            [(_, u)]
                if u.rows
                    == (Rows::Keys {
                        keys: keys.to_vec(),
                    }) =>
            {
                Ok(())
            }
            _ => bad(first, "the chunks are not the run's rows"),
        };
    }
    let mut prev_end: Option<Option<Vec<String>>> = None;
    for (unit, u) in chunks {
        let (from, to) = match &u.rows {
            Rows::Range { from, to } => (from.clone(), to.clone()),
            Rows::Blocks { from, to } => (
                from.map(|b| vec![b.to_string()]),
                to.map(|b| vec![b.to_string()]),
            ),
            Rows::All | Rows::Keys { .. } => return bad(*unit, "a chunk that is not a range"),
        };
        let expected_from = prev_end.clone().unwrap_or(None);
        if from != expected_from || (prev_end.is_some() && from.is_none()) {
            return bad(
                *unit,
                "the chunks do not tile the table (a chunk does not start where the previous one ended)",
            );
        }
        prev_end = Some(to);
    }
    if prev_end.is_some_and(|end| end.is_some()) {
        return bad(first, "the last chunk does not reach the end of the table");
    }
    Ok(())
}

fn describe_key(key: &[StoredKeyCol]) -> String {
    let cols: Vec<String> = key
        .iter()
        .map(|k| format!("{} {}", k.name, k.type_name))
        .collect();
    format!("({})", cols.join(", "))
}

/// The error of a stored unit that cannot run.
pub(crate) fn refused(table: &TableRef, unit: i32, why: impl std::fmt::Display) -> Error {
    Error::corrupt(
        format!("stored integrity work unit {unit} of {table}"),
        format!(
            "{why}; it was not run (the table changed, or the row was altered): start a new validation run"
        ),
    )
}

/// A bind parameter of a [`Pred`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Param {
    Text(String),
    TextArray(Vec<String>),
}

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Sql(String),
    Param(usize),
}

/// An SQL boolean over the table's row (alias `t`) whose values are bind
/// parameters, numbered when rendered after the query's own.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Pred {
    parts: Vec<Part>,
    params: Vec<Param>,
}

impl Pred {
    /// Every row.
    pub(crate) fn all() -> Self {
        let mut p = Self::empty();
        p.sql("true");
        p
    }

    fn empty() -> Self {
        Self {
            parts: Vec::new(),
            params: Vec::new(),
        }
    }

    fn sql(&mut self, s: impl Into<String>) -> &mut Self {
        self.parts.push(Part::Sql(s.into()));
        self
    }

    fn param(&mut self, p: Param) -> usize {
        self.params.push(p);
        let i = self.params.len() - 1;
        self.parts.push(Part::Param(i));
        i
    }

    fn again(&mut self, i: usize) -> &mut Self {
        self.parts.push(Part::Param(i));
        self
    }

    /// The SQL, its parameters numbered from `$(base + 1)`.
    pub(crate) fn render(&self, base: usize) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Sql(s) => s.clone(),
                Part::Param(i) => format!("${}", base + i + 1),
            })
            .collect()
    }

    /// The SQL with its values inlined as escaped string literals, for the one
    /// statement that takes no parameters (`COPY (…) TO STDOUT`). Every value is
    /// cast from text by the SQL around it; a value cannot end its literal.
    pub(crate) fn inline(&self) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Sql(s) => s.clone(),
                Part::Param(i) => match &self.params[*i] {
                    Param::Text(v) => literal(v),
                    Param::TextArray(vs) => {
                        let items: Vec<String> = vs.iter().map(|v| literal(v)).collect();
                        format!("ARRAY[{}]::text[]", items.join(", "))
                    }
                },
            })
            .collect()
    }

    /// The parameter values, for `query`/`query_raw`.
    pub(crate) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| match p {
                Param::Text(v) => v as &(dyn ToSql + Sync),
                Param::TextArray(v) => v as &(dyn ToSql + Sync),
            })
            .collect()
    }

    /// The rows of `rows` in `plan`'s table. Identifiers and types come from the
    /// plan (the live catalog), values are parameters.
    pub(crate) fn of_rows(plan: &TablePlan, rows: &Rows) -> Self {
        match rows {
            Rows::All => Self::all(),
            Rows::Range { from, to } => Self::range(plan, from.as_deref(), to.as_deref()),
            Rows::Blocks { from, to } => {
                let mut p = Self::empty();
                p.sql("true");
                if let Some(b) = from {
                    p.sql(" AND t.ctid >= ");
                    p.param(Param::Text(format!("({b},0)")));
                    p.sql("::text::tid");
                }
                if let Some(b) = to {
                    p.sql(" AND t.ctid < ");
                    p.param(Param::Text(format!("({b},0)")));
                    p.sql("::text::tid");
                }
                p
            }
            Rows::Keys { keys } => Self::keys(plan, keys),
        }
    }

    /// Keys in `[from, to)`. For a composite key, each bound also bounds the first
    /// column alone: the planner estimates a row comparison `(k1, k2) >= (…)` with a
    /// fixed selectivity (a third of the table per side) and would scan the whole
    /// table for every chunk; a redundant range on the first column is estimated
    /// from its statistics and lets it use the key's index.
    fn range(plan: &TablePlan, from: Option<&[String]>, to: Option<&[String]>) -> Self {
        let mut p = Self::empty();
        p.sql("true");
        for (bound, op, lead_op) in [(from, ">=", ">="), (to, "<", "<=")] {
            let Some(values) = bound else { continue };
            p.sql(format!(" AND {} {op} (", plan.key_tuple()));
            let mut first = None;
            for (i, (k, v)) in plan.key.iter().zip(values).enumerate() {
                if i > 0 {
                    p.sql(", ");
                }
                let at = p.param(Param::Text(v.clone()));
                first.get_or_insert(at);
                p.sql(format!("::text::{}", k.type_name));
            }
            p.sql(")");
            if plan.key.len() > 1
                && let (Some(at), Some(k)) = (first, plan.key.first())
            {
                p.sql(format!(" AND {} {lead_op} ", plan.key_expr(k)));
                p.again(at);
                p.sql(format!("::text::{}", k.type_name));
            }
        }
        p
    }

    /// Exactly `keys` (each a value per key column).
    pub(crate) fn keys(plan: &TablePlan, keys: &[Vec<String>]) -> Self {
        let mut p = Self::empty();
        if keys.is_empty() {
            p.sql("false");
            return p;
        }
        if plan.by_ctid() {
            p.sql("t.ctid = ANY(");
            p.param(Param::TextArray(
                keys.iter().filter_map(|k| k.first().cloned()).collect(),
            ));
            p.sql("::text[]::tid[])");
            return p;
        }
        if let [k] = plan.key.as_slice() {
            // One column: `= ANY(array)` is an index scan over the listed keys.
            p.sql(format!(
                "{} = ANY(ARRAY(SELECT u::{} FROM unnest(",
                plan.key_expr(k),
                k.type_name
            ));
            p.param(Param::TextArray(
                keys.iter().filter_map(|k| k.first().cloned()).collect(),
            ));
            p.sql("::text[]) u))");
            return p;
        }
        p.sql(format!("{} IN (SELECT ", plan.key_tuple()));
        let casts: Vec<String> = plan
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| format!("u.c{i}::{}", k.type_name))
            .collect();
        p.sql(casts.join(", "));
        p.sql(" FROM unnest(");
        for i in 0..plan.key.len() {
            if i > 0 {
                p.sql(", ");
            }
            p.param(Param::TextArray(
                keys.iter()
                    .map(|k| k.get(i).cloned().unwrap_or_default())
                    .collect(),
            ));
            p.sql("::text[]");
        }
        let names: Vec<String> = (0..plan.key.len()).map(|i| format!("c{i}")).collect();
        p.sql(format!(") AS u({}))", names.join(", ")));
        p
    }
}

/// An escaped string literal (`E'…'`: correct whatever
/// `standard_conforming_strings` says).
fn literal(v: &str) -> String {
    format!("E'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::RelKind;
    use crate::plan::KeyCol;

    fn plan(key: &[(&str, &str)]) -> TablePlan {
        TablePlan {
            table: TableRef::new("s", "t"),
            kind: RelKind::Table,
            key: key
                .iter()
                .map(|(n, t)| KeyCol {
                    name: (*n).into(),
                    type_name: (*t).into(),
                })
                .collect(),
            ancestors: Vec::new(),
            reltuples: 0.0,
            relpages: 0,
            probes: Vec::new(),
        }
    }

    #[test]
    fn ranges_bind_their_values_and_quote_identifiers_from_the_plan() {
        let p = plan(&[("a", "bigint"), ("B c", "timestamp with time zone")]);
        let pred = Pred::of_rows(
            &p,
            &Rows::Range {
                from: Some(vec!["1".into(), "x') OR true --".into()]),
                to: None,
            },
        );
        assert_eq!(
            pred.render(2),
            "true AND (t.\"a\", t.\"B c\") >= ($3::text::bigint, $4::text::timestamp with time zone) AND t.\"a\" >= $3::text::bigint"
        );
        assert_eq!(pred.params().len(), 2);
        // Inlined (COPY only), a value cannot leave its literal.
        assert!(pred.inline().contains("E'x'') OR true --'"));
        assert_eq!(literal("a\\'b"), "E'a\\\\''b'");
    }

    /// The stored form of version 1 (`docs/formats.md`, "Integrity work unit").
    #[test]
    fn golden_units_of_version_1() {
        let p = plan(&[("order_id", "bigint"), ("line_no", "integer")]);
        let golden = [
            (
                StoredUnit::new(
                    &p,
                    None,
                    Rows::Range {
                        from: Some(vec!["42".into(), "3".into()]),
                        to: None,
                    },
                ),
                r#"{"format":"sanare-integrity-unit","version":1,"probe":null,"key":[{"name":"order_id","type_name":"bigint"},{"name":"line_no","type_name":"integer"}],"rows":{"kind":"range","from":["42","3"],"to":null}}"#,
            ),
            (
                StoredUnit::new(&p, Some("query:order_total".into()), Rows::All),
                r#"{"format":"sanare-integrity-unit","version":1,"probe":"query:order_total","key":[{"name":"order_id","type_name":"bigint"},{"name":"line_no","type_name":"integer"}],"rows":{"kind":"all"}}"#,
            ),
            (
                StoredUnit::new(
                    &p,
                    Some("unique:lines_key".into()),
                    Rows::Keys {
                        keys: vec![vec!["5".into(), "1".into()]],
                    },
                ),
                r#"{"format":"sanare-integrity-unit","version":1,"probe":"unique:lines_key","key":[{"name":"order_id","type_name":"bigint"},{"name":"line_no","type_name":"integer"}],"rows":{"kind":"keys","keys":[["5","1"]]}}"#,
            ),
        ];
        for (unit, json) in golden {
            assert_eq!(serde_json::to_string(&unit).unwrap(), json);
            let back =
                StoredUnit::decode(&p.table, 0, serde_json::from_str(json).unwrap()).unwrap();
            assert_eq!(back, unit);
        }
        let blocks = r#"{"format":"sanare-integrity-unit","version":1,"probe":null,"key":[{"name":"ctid","type_name":"tid"}],"rows":{"kind":"blocks","from":12,"to":null}}"#;
        let u = StoredUnit::decode(&p.table, 0, serde_json::from_str(blocks).unwrap()).unwrap();
        assert_eq!(
            u.rows,
            Rows::Blocks {
                from: Some(12),
                to: None
            }
        );
    }

    #[test]
    fn stored_units_that_do_not_match_the_live_plan_are_refused() {
        let p = plan(&[("id", "integer")]);
        let ok = StoredUnit::new(
            &p,
            None,
            Rows::Range {
                from: Some(vec!["5".into()]),
                to: None,
            },
        );
        // No chunked probe in this plan: refused, like a changed table.
        assert!(ok.check(&p, 0).is_err());
        let mut other_key = ok.clone();
        other_key.key[0].type_name = "text".into();
        let err = other_key.check(&p, 3).unwrap_err().to_string();
        assert!(
            err.contains("unit 3 of \"s\".\"t\"") || err.contains("unit 3"),
            "{err}"
        );
        assert!(err.contains("not the table's key"), "{err}");
        let json = serde_json::json!({"format": UNIT_FORMAT, "version": 1, "probe": null,
            "key": [], "rows": {"kind": "all"}, "predicate": "true"});
        assert!(StoredUnit::decode(&p.table, 1, json).is_err());
        let json = serde_json::json!({"format": UNIT_FORMAT, "version": 2, "probe": null,
            "key": [], "rows": {"kind": "all"}});
        assert!(StoredUnit::decode(&p.table, 1, json).is_err());
    }
}
