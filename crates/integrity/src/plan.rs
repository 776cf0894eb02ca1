//! Turns the catalog and the declared rules into probes: SQL that finds suspect rows
//! of one table, either over a key range (chunked) or over a list of keys (re-check).

pub(crate) use sanare_pg::catalog::TextForm;
use std::collections::BTreeSet;

use sanare_core::{CheckFamily, Error, Result, Severity, TableRef, ViolationKind};
use sanare_pg::catalog::TableInfo;
use sanare_pg::{PgResultExt, quote_ident, quote_literal};
use tokio_postgres::GenericClient;

use crate::checksum::Checksummer;
use crate::rules::Rules;

/// A column of the row key (`ctid` for tables without a primary key).
#[derive(Clone, Debug)]
pub(crate) struct KeyCol {
    pub(crate) name: String,
    pub(crate) type_name: String,
}

/// One row-local rule of the fused pass: `violated` is TRUE for an offending row.
#[derive(Clone, Debug)]
pub(crate) struct RowRule {
    pub(crate) kind: ViolationKind,
    pub(crate) severity: Severity,
    pub(crate) family: CheckFamily,
    pub(crate) violated: String,
    pub(crate) description: String,
    pub(crate) action: String,
}

/// A relationship to check for orphans.
#[derive(Clone, Debug)]
pub(crate) struct Relationship {
    pub(crate) name: String,
    pub(crate) columns: Vec<String>,
    pub(crate) parent: TableRef,
    pub(crate) parent_columns: Vec<String>,
    pub(crate) severity: Severity,
    pub(crate) validated: Option<bool>,
    /// Look each child row's parent up through the parent's key index (a nested
    /// loop) instead of letting the planner hash the whole parent table: set for
    /// foreign keys (whose parent columns always have a unique index) when the
    /// parent holds many more rows than a chunk, where hashing it again for every
    /// chunk would dominate the check.
    pub(crate) probe_parent_index: bool,
}

/// SQL that finds suspects.
#[derive(Clone, Debug)]
pub(crate) enum Probe {
    /// Every row rule in one pass (schema and consistency predicates).
    Fused(Vec<RowRule>),
    /// Orphans of one relationship.
    Orphans(Relationship),
    /// Stored against recomputed checksums.
    Checksum {
        column: String,
        columns: Vec<String>,
        /// Per column: how its canonical text form (`::text`) is read.
        forms: Vec<TextForm>,
        checksummer: Checksummer,
        severity: Severity,
    },
    /// Duplicates of a unique constraint (whole table).
    Unique {
        constraint: String,
        columns: Vec<String>,
        severity: Severity,
    },
    /// A business-rule query (whole table).
    Query {
        rule: String,
        sql: String,
        params: Vec<String>,
        severity: Severity,
        action: String,
    },
}

impl Probe {
    pub(crate) fn family(&self) -> CheckFamily {
        match self {
            Probe::Fused(rules) => rules.first().map_or(CheckFamily::Schema, |r| r.family),
            Probe::Orphans(_) => CheckFamily::Referential,
            Probe::Checksum { .. } => CheckFamily::Checksum,
            Probe::Unique { .. } => CheckFamily::Schema,
            Probe::Query { .. } => CheckFamily::Consistency,
        }
    }

    /// Whether this probe runs per chunk (else once per table).
    pub(crate) fn chunked(&self) -> bool {
        matches!(
            self,
            Probe::Fused(_) | Probe::Orphans(_) | Probe::Checksum { .. }
        )
    }
}

/// Everything to check on one table.
#[derive(Clone, Debug)]
pub(crate) struct TablePlan {
    pub(crate) table: TableRef,
    pub(crate) key: Vec<KeyCol>,
    pub(crate) estimated_rows: i64,
    pub(crate) probes: Vec<Probe>,
}

impl TablePlan {
    pub(crate) fn by_ctid(&self) -> bool {
        self.key.len() == 1 && self.key[0].name == "ctid"
    }

    /// `t.k1::text, t.k2::text`
    pub(crate) fn key_select(&self) -> String {
        self.key
            .iter()
            .map(|k| format!("t.{}::text", self.key_ident(k)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn key_ident(&self, k: &KeyCol) -> String {
        if self.by_ctid() {
            "ctid".to_owned()
        } else {
            quote_ident(&k.name)
        }
    }

    /// `(t.k1, t.k2)`
    pub(crate) fn key_tuple(&self) -> String {
        let cols: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("t.{}", self.key_ident(k)))
            .collect();
        format!("({})", cols.join(", "))
    }

    /// `('v1'::type1, 'v2'::type2)`
    pub(crate) fn key_literal(&self, values: &[Option<String>]) -> String {
        let lits: Vec<String> = self
            .key
            .iter()
            .zip(values)
            .map(|(k, v)| match v {
                Some(v) => format!("{}::{}", quote_literal(v), k.type_name),
                None => format!("NULL::{}", k.type_name),
            })
            .collect();
        format!("({})", lits.join(", "))
    }

    /// `'v1'::type1`: the first key column's value of `values`.
    pub(crate) fn first_key_literal(&self, values: &[Option<String>]) -> String {
        match (self.key.first(), values.first()) {
            (Some(k), Some(Some(v))) => format!("{}::{}", quote_literal(v), k.type_name),
            (Some(k), _) => format!("NULL::{}", k.type_name),
            (None, _) => "NULL".to_owned(),
        }
    }

    /// A predicate selecting exactly `keys` (for re-checks).
    pub(crate) fn keys_predicate(&self, keys: &[Vec<Option<String>>]) -> String {
        if keys.is_empty() {
            return "false".to_owned();
        }
        let list: Vec<String> = keys.iter().map(|k| self.key_literal(k)).collect();
        format!("{} IN ({})", self.key_tuple(), list.join(", "))
    }
}

/// Which families run.
pub(crate) fn wants(families: &[CheckFamily], f: CheckFamily) -> bool {
    families.is_empty() || families.contains(&f)
}

/// Builds the plan of `table` from the catalog and the declared rules.
pub(crate) async fn plan_table(
    client: &impl GenericClient,
    table: &TableRef,
    rules: &Rules,
    families: &[CheckFamily],
    checksum_key: Option<[u8; 32]>,
    chunk_rows: u64,
) -> Result<TablePlan> {
    let info = sanare_pg::catalog::describe(client, table).await?;
    let key = if info.primary_key.is_empty() {
        vec![KeyCol {
            name: "ctid".into(),
            type_name: "tid".into(),
        }]
    } else {
        info.primary_key
            .iter()
            .map(|k| KeyCol {
                name: k.clone(),
                type_name: info
                    .column(k)
                    .map_or_else(|| "text".to_owned(), |c| c.type_name.clone()),
            })
            .collect()
    };
    let name = table.to_string();
    let mine = |t: &str| TableRef::parse(t).map(|t| t == *table).unwrap_or(false);
    let mut fused: Vec<RowRule> = Vec::new();
    let mut probes = Vec::new();

    if wants(families, CheckFamily::Schema) {
        catalog_row_rules(client, &info, &mut fused).await?;
        for r in rules.not_null.iter().filter(|r| mine(&r.table)) {
            require_column(&info, &r.column)?;
            fused.push(RowRule {
                kind: ViolationKind::NullConstraint {
                    column: r.column.clone(),
                },
                severity: r.severity.unwrap_or(Severity::Medium),
                family: CheckFamily::Schema,
                violated: format!("t.{} IS NULL", quote_ident(&r.column)),
                description: format!("{name}.{} is null (declared not null)", r.column),
                action: "set the column from the journal or a snapshot, or fix the writer".into(),
            });
        }
        for r in rules.range.iter().filter(|r| mine(&r.table)) {
            require_column(&info, &r.column)?;
            fused.push(declared_check(
                &name,
                &format!("range_{}", r.column),
                &r.column,
                Rules::range_violation(r),
                r.severity,
                "value out of the declared range",
            ));
        }
        for r in rules.regex.iter().filter(|r| mine(&r.table)) {
            require_column(&info, &r.column)?;
            fused.push(declared_check(
                &name,
                &format!("regex_{}", r.column),
                &r.column,
                format!(
                    "coalesce(t.{}::text !~ {}, false)",
                    quote_ident(&r.column),
                    quote_literal(&r.pattern)
                ),
                r.severity,
                "value does not match the declared pattern",
            ));
        }
        for r in rules.allowed_values.iter().filter(|r| mine(&r.table)) {
            require_column(&info, &r.column)?;
            let list: Vec<String> = r.values.iter().map(|v| quote_literal(v)).collect();
            fused.push(declared_check(
                &name,
                &format!("allowed_{}", r.column),
                &r.column,
                format!(
                    "coalesce(t.{}::text <> ALL (ARRAY[{}]::text[]), false)",
                    quote_ident(&r.column),
                    list.join(", ")
                ),
                r.severity,
                "value is not one of the declared allowed values",
            ));
        }
        // A unique / primary-key constraint whose index is valid is enforced by
        // PostgreSQL on every write: no whole-table pass for it. Only constraints
        // whose index is missing, invalid or not ready (a failed concurrent build, a
        // damaged catalog) and keys declared by the host are checked.
        for (constraint, columns) in unenforced_unique_constraints(client, info.oid).await? {
            probes.push(Probe::Unique {
                constraint,
                columns,
                severity: Severity::High,
            });
        }
        for r in rules.unique.iter().filter(|r| mine(&r.table)) {
            for c in &r.columns {
                require_column(&info, c)?;
            }
            probes.push(Probe::Unique {
                constraint: r.name.clone(),
                columns: r.columns.clone(),
                severity: r.severity.unwrap_or(Severity::High),
            });
        }
    }
    if wants(families, CheckFamily::Consistency) {
        for r in rules.consistency.iter().filter(|r| mine(&r.table)) {
            let severity = r.severity.unwrap_or(Severity::Medium);
            let action = r.recommended_action.clone().unwrap_or_else(|| {
                format!("correct the row so that business rule `{}` holds", r.name)
            });
            if let Some(p) = &r.predicate {
                fused.push(RowRule {
                    kind: ViolationKind::Consistency {
                        rule: r.name.clone(),
                    },
                    severity,
                    family: CheckFamily::Consistency,
                    violated: format!("coalesce(NOT ({p}), false)"),
                    description: format!("{name}: business rule `{}` fails", r.name),
                    action,
                });
            } else if let Some(q) = &r.query {
                probes.push(Probe::Query {
                    rule: r.name.clone(),
                    sql: q.clone(),
                    params: r.params.clone(),
                    severity,
                    action,
                });
            }
        }
    }
    // Schema and consistency predicates are fused into one pass, but a plan that
    // wants only one of the families gets only its rules.
    if !fused.is_empty() {
        probes.insert(0, Probe::Fused(fused));
    }
    if wants(families, CheckFamily::Referential) {
        for fk in &info.foreign_keys {
            probes.push(Probe::Orphans(Relationship {
                name: fk.name.clone(),
                columns: fk.columns.clone(),
                parent: fk.parent.clone(),
                parent_columns: fk.parent_columns.clone(),
                severity: Severity::High,
                validated: Some(fk.validated),
                probe_parent_index: u64::try_from(fk.parent_estimated_rows)
                    .is_ok_and(|n| n > chunk_rows.saturating_mul(4)),
            }));
        }
        for r in rules.relationship.iter().filter(|r| mine(&r.table)) {
            for c in &r.columns {
                require_column(&info, c)?;
            }
            probes.push(Probe::Orphans(Relationship {
                name: r.name.clone(),
                columns: r.columns.clone(),
                parent: TableRef::parse(&r.parent)?,
                parent_columns: r.parent_columns.clone(),
                severity: r.severity.unwrap_or(Severity::High),
                validated: None,
                // A declared relationship's parent columns may have no index.
                probe_parent_index: false,
            }));
        }
    }
    if wants(families, CheckFamily::Checksum) {
        for r in rules.checksum.iter().filter(|r| mine(&r.table)) {
            require_column(&info, &r.column)?;
            let columns: Vec<String> = info
                .columns
                .iter()
                .filter(|c| c.name != r.column && !c.generated)
                .map(|c| c.name.clone())
                .collect();
            let forms = text_forms(client, info.oid, &columns).await?;
            probes.push(Probe::Checksum {
                column: r.column.clone(),
                columns,
                forms,
                checksummer: Checksummer::for_algorithm(r.algorithm, checksum_key)?,
                severity: r.severity.unwrap_or(Severity::High),
            });
        }
    }
    Ok(TablePlan {
        table: table.clone(),
        key,
        estimated_rows: info.estimated_rows,
        probes,
    })
}

fn require_column(info: &TableInfo, column: &str) -> Result<()> {
    if info.column(column).is_none() {
        return Err(Error::config(
            "integrity rules",
            format!(
                "a rule names column `{column}`, which {} does not have",
                info.table
            ),
        ));
    }
    Ok(())
}

fn declared_check(
    table: &str,
    constraint: &str,
    column: &str,
    violated: String,
    severity: Option<Severity>,
    what: &str,
) -> RowRule {
    RowRule {
        kind: ViolationKind::CheckConstraint {
            constraint: constraint.to_owned(),
            columns: vec![column.to_owned()],
        },
        severity: severity.unwrap_or(Severity::Medium),
        family: CheckFamily::Schema,
        violated,
        description: format!("{table}.{column}: {what}"),
        action: "correct the value from the journal or a snapshot, or fix the writer".into(),
    }
}

/// NOT NULL, CHECK (valid or NOT VALID), domain constraints, lengths and precision.
async fn catalog_row_rules(
    client: &impl GenericClient,
    info: &TableInfo,
    out: &mut Vec<RowRule>,
) -> Result<()> {
    let name = info.table.to_string();
    for c in &info.columns {
        let col = format!("t.{}", quote_ident(&c.name));
        if c.not_null {
            out.push(RowRule {
                kind: ViolationKind::NullConstraint {
                    column: c.name.clone(),
                },
                severity: Severity::High,
                family: CheckFamily::Schema,
                violated: format!("{col} IS NULL"),
                description: format!("{name}.{} is null despite NOT NULL", c.name),
                action: "restore the value from the journal or a snapshot".into(),
            });
        }
        if let Some(n) = length_limit(&c.type_name) {
            out.push(type_rule(
                &name,
                &c.name,
                &c.type_name,
                format!("coalesce(char_length({col}) > {n}, false)"),
            ));
        }
        if let Some((p, s)) = numeric_limits(&c.type_name) {
            out.push(type_rule(
                &name,
                &c.name,
                &c.type_name,
                format!(
                    "coalesce({col} <> 'NaN' AND ({col} <> round({col}, {s}) OR abs({col}) >= 1e{}), false)",
                    p - s
                ),
            ));
        }
    }
    let rows = client
        .query(
            "SELECT con.conname::text, pg_get_constraintdef(con.oid),
                    ARRAY(SELECT a.attname::text FROM unnest(con.conkey) k(n)
                           JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n)
               FROM pg_constraint con
              WHERE con.conrelid = $1 AND con.contype = 'c'
              ORDER BY con.conname",
            &[&info.oid],
        )
        .await
        .with_context(|| format!("reading CHECK constraints of {name}"))?;
    for r in rows {
        let constraint: String = r.get(0);
        let def: String = r.get(1);
        let columns: Vec<String> = r.get(2);
        let expr = check_expression(&def);
        out.push(RowRule {
            kind: ViolationKind::CheckConstraint {
                constraint: constraint.clone(),
                columns,
            },
            severity: Severity::High,
            family: CheckFamily::Schema,
            violated: format!("coalesce(NOT ({expr}), false)"),
            description: format!("{name}: CHECK constraint {constraint} fails"),
            action: "correct the row from the journal or a snapshot".into(),
        });
    }
    // Enum columns: a value whose label is gone from pg_enum (a damaged or edited
    // catalog) compares unequal to every current label. The labels are inlined as a
    // constant array so the catalog is read once per query, not per row; `=` on
    // enums compares OIDs and never fails on an unknown one.
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = ty.oid
                           ORDER BY e.enumsortorder)
               FROM pg_attribute a
               JOIN pg_type ty ON ty.oid = a.atttypid AND ty.typtype = 'e'
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&info.oid],
        )
        .await
        .with_context(|| format!("reading enum columns of {name}"))?;
    for r in rows {
        let column: String = r.get(0);
        let type_name: String = r.get(1);
        let labels: Vec<String> = r.get(2);
        let col = format!("t.{}", quote_ident(&column));
        let violated = if labels.is_empty() {
            format!("{col} IS NOT NULL")
        } else {
            let list: Vec<String> = labels
                .iter()
                .map(|l| format!("{}::{type_name}", quote_literal(l)))
                .collect();
            format!("coalesce({col} <> ALL (ARRAY[{}]), false)", list.join(", "))
        };
        out.push(type_rule(&name, &column, &type_name, violated));
    }
    // Domain constraints of the columns' types.
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), con.conname::text,
                    pg_get_constraintdef(con.oid)
               FROM pg_attribute a
               JOIN pg_type ty ON ty.oid = a.atttypid AND ty.typtype = 'd'
               JOIN pg_constraint con ON con.contypid = ty.oid AND con.contype = 'c'
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum, con.conname",
            &[&info.oid],
        )
        .await
        .with_context(|| format!("reading domain constraints of {name}"))?;
    for r in rows {
        let column: String = r.get(0);
        let type_name: String = r.get(1);
        let def: String = r.get(3);
        let expr = replace_value_keyword(
            &check_expression(&def),
            &format!("t.{}", quote_ident(&column)),
        );
        out.push(type_rule(
            &name,
            &column,
            &type_name,
            format!("coalesce(NOT ({expr}), false)"),
        ));
    }
    Ok(())
}

fn type_rule(table: &str, column: &str, type_name: &str, violated: String) -> RowRule {
    RowRule {
        kind: ViolationKind::TypeMismatch {
            column: column.to_owned(),
            expected: type_name.to_owned(),
        },
        severity: Severity::High,
        family: CheckFamily::Schema,
        violated,
        description: format!("{table}.{column} does not fit its type {type_name}"),
        action: "correct the value from the journal or a snapshot".into(),
    }
}

/// `CHECK ((x > 0)) NOT VALID` → `(x > 0)`.
fn check_expression(def: &str) -> String {
    let s = def.trim();
    let s = s.strip_suffix("NOT VALID").unwrap_or(s).trim();
    let s = s.strip_prefix("CHECK").unwrap_or(s).trim();
    s.to_owned()
}

/// Replaces the keyword `VALUE` (outside string literals) with `replacement`.
fn replace_value_keyword(expr: &str, replacement: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let bytes = expr.as_bytes();
    let mut i = 0;
    let mut in_str = false;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'\'' {
            in_str = !in_str;
        }
        let word_start = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b'"');
        if !in_str && word_start && expr[i..].starts_with("VALUE") {
            let end = i + 5;
            let word_end =
                end >= bytes.len() || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_');
            if word_end {
                out.push_str(replacement);
                i = end;
                continue;
            }
        }
        // Push the whole UTF-8 character.
        let ch_len = expr[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&expr[i..i + ch_len]);
        i += ch_len;
    }
    out
}

/// The [`TextForm`] of each of `columns` of table `oid`.
async fn text_forms(
    client: &impl GenericClient,
    oid: u32,
    columns: &[String],
) -> Result<Vec<TextForm>> {
    let forms = sanare_pg::catalog::text_forms(client, oid).await?;
    columns
        .iter()
        .map(|c| {
            forms
                .get(c)
                .copied()
                .ok_or_else(|| Error::not_found(format!("column `{c}` in the catalog")))
        })
        .collect()
}

/// `character varying(120)` / `character(2)` → 120 / 2.
fn length_limit(type_name: &str) -> Option<u32> {
    let rest = type_name
        .strip_prefix("character varying(")
        .or_else(|| type_name.strip_prefix("character("))?;
    rest.strip_suffix(')')?.parse().ok()
}

/// `numeric(12,2)` → (12, 2).
fn numeric_limits(type_name: &str) -> Option<(u32, u32)> {
    let rest = type_name.strip_prefix("numeric(")?.strip_suffix(')')?;
    let (p, s) = rest.split_once(',')?;
    let (p, s): (u32, u32) = (p.trim().parse().ok()?, s.trim().parse().ok()?);
    (s <= p).then_some((p, s))
}

/// Primary-key and unique constraints that no valid, ready, live index enforces:
/// (name, columns).
async fn unenforced_unique_constraints(
    client: &impl GenericClient,
    oid: u32,
) -> Result<Vec<(String, Vec<String>)>> {
    let rows = client
        .query(
            "SELECT con.conname::text,
                    ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
                           JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
                          ORDER BY k.o)
               FROM pg_constraint con
               LEFT JOIN pg_index i ON i.indexrelid = con.conindid
              WHERE con.conrelid = $1 AND con.contype IN ('p', 'u')
                AND NOT coalesce(i.indisunique AND i.indisvalid AND i.indisready AND i.indislive, false)
              ORDER BY con.conname",
            &[&oid],
        )
        .await
        .context("reading unique constraints")?;
    let mut seen = BTreeSet::new();
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<String>>(1)))
        .filter(|(_, cols)| seen.insert(cols.clone()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_definitions_become_expressions() {
        assert_eq!(check_expression("CHECK ((x > 0)) NOT VALID"), "((x > 0))");
        assert_eq!(length_limit("character varying(120)"), Some(120));
        assert_eq!(length_limit("character(2)"), Some(2));
        assert_eq!(length_limit("text"), None);
        assert_eq!(numeric_limits("numeric(12,0)"), Some((12, 0)));
        assert_eq!(numeric_limits("numeric"), None);
        assert_eq!(
            replace_value_keyword("((VALUE > 0) AND (VALUE_X <> 'VALUE'))", "t.\"c\""),
            "((t.\"c\" > 0) AND (VALUE_X <> 'VALUE'))"
        );
    }
}
