//! Turns the catalog and the declared rules into probes: SQL that finds suspect rows
//! of one table, over a work unit's rows (a key range, a block range, a list of keys
//! or the whole table).
//!
//! Every table is read with `FROM ONLY`: an inheritance parent's check (a `NO INHERIT`
//! one included) judges the parent's own rows, and its children are tables of their
//! own, so no row is read twice. A partitioned table holds no rows: its leaves are
//! planned as tables (with the rules declared on any table above them), and the
//! partitioned table itself only carries the whole-table rules declared on it.

use sanare_core::{CheckFamily, Error, Result, Severity, TableRef, ViolationKind};
use sanare_pg::{quote_ident, quote_literal};
use tokio_postgres::GenericClient;

pub(crate) use sanare_pg::catalog::TextForm;

use crate::catalog::{self, MatchType, RelKind, Relation};
use crate::checksum::Checksummer;
use crate::rules::Rules;

/// A column of the row key (`ctid` for tables without a primary key).
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// The column a repair may recompute by the rule's name (consistency rules
    /// that declare one).
    pub(crate) recompute: Option<String>,
}

/// A relationship to check for orphans.
#[derive(Clone, Debug)]
pub(crate) struct Relationship {
    pub(crate) name: String,
    pub(crate) columns: Vec<String>,
    pub(crate) parent: TableRef,
    /// Read the parent with `FROM ONLY` (an ordinary table, as PostgreSQL's own
    /// foreign-key checks do), or with `FROM` (a partitioned one).
    pub(crate) parent_only: bool,
    pub(crate) parent_columns: Vec<String>,
    pub(crate) severity: Severity,
    pub(crate) validated: Option<bool>,
    pub(crate) deferrable: Option<bool>,
    /// MATCH FULL: a row with some but not all columns null is a violation.
    pub(crate) match_full: bool,
    /// Look each child row's parent up through the parent's key index (a nested
    /// loop) instead of letting the planner hash the whole parent table: set for
    /// foreign keys (whose parent columns always have a unique index) when the
    /// parent holds many more rows than a chunk, or has no statistics, where hashing
    /// it again for every chunk would dominate the check.
    pub(crate) probe_parent_index: bool,
}

/// A set of key expressions that must be unique (a unique index PostgreSQL does
/// not enforce, or a declared unique rule).
#[derive(Clone, Debug)]
pub(crate) struct UniqueKey {
    /// The constraint, index or rule name.
    pub(crate) name: String,
    /// SQL over the table row: quoted columns or index expressions.
    pub(crate) keys: Vec<String>,
    /// The names reported in the violation: the columns, or the expressions.
    pub(crate) columns: Vec<String>,
    /// A partial index's predicate.
    pub(crate) predicate: Option<String>,
    pub(crate) nulls_not_distinct: bool,
    pub(crate) severity: Severity,
    /// Declared by the host (else read from the catalog).
    pub(crate) declared: bool,
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
    /// Duplicates of a unique key (whole table).
    Unique(UniqueKey),
    /// A business-rule query (whole table).
    Query {
        rule: String,
        sql: String,
        params: Vec<String>,
        severity: Severity,
        action: String,
        recompute: Option<String>,
    },
}

impl Probe {
    pub(crate) fn family(&self) -> CheckFamily {
        match self {
            Probe::Fused(rules) => rules.first().map_or(CheckFamily::Schema, |r| r.family),
            Probe::Orphans(_) => CheckFamily::Referential,
            Probe::Checksum { .. } => CheckFamily::Checksum,
            Probe::Unique(_) => CheckFamily::Schema,
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

    /// The stable name of a whole-table probe, stored with its work unit so that a
    /// resumed run can tell whether the unit still means the same probe.
    pub(crate) fn id(&self) -> String {
        match self {
            Probe::Unique(u) if u.declared => format!("declared_unique:{}", u.name),
            Probe::Unique(u) => format!("unique:{}", u.name),
            Probe::Query { rule, .. } => format!("query:{rule}"),
            Probe::Fused(_) => "fused".into(),
            Probe::Orphans(r) => format!("orphans:{}", r.name),
            Probe::Checksum { column, .. } => format!("checksum:{column}"),
        }
    }

    /// Whether this probe can report a violation of `kind`.
    pub(crate) fn can_find(&self, kind: &ViolationKind) -> bool {
        match (self, kind) {
            (Probe::Fused(rules), _) => rules.iter().any(|r| r.kind == *kind),
            (Probe::Orphans(r), ViolationKind::Referential { constraint, .. }) => {
                r.name == *constraint
            }
            (Probe::Checksum { column, .. }, ViolationKind::ChecksumMismatch { column: c }) => {
                column == c
            }
            (Probe::Unique(u), ViolationKind::UniqueConstraint { constraint, .. }) => {
                u.name == *constraint
            }
            (Probe::Query { rule, .. }, ViolationKind::Consistency { rule: r }) => rule == r,
            _ => false,
        }
    }
}

/// Everything to check on one table.
#[derive(Clone, Debug)]
pub(crate) struct TablePlan {
    pub(crate) table: TableRef,
    pub(crate) kind: RelKind,
    pub(crate) key: Vec<KeyCol>,
    /// The partitioned tables above this one, nearest first.
    pub(crate) ancestors: Vec<TableRef>,
    pub(crate) reltuples: f64,
    pub(crate) relpages: i64,
    pub(crate) probes: Vec<Probe>,
}

impl TablePlan {
    pub(crate) fn by_ctid(&self) -> bool {
        self.key.len() == 1 && self.key[0].name == "ctid"
    }

    /// The FROM item of the table's rows: `ONLY "s"."t"` for a table (its
    /// inheritance children are validated as tables of their own), `"s"."t"` for a
    /// partitioned one (its rows are its partitions').
    pub(crate) fn rows_sql(&self) -> String {
        match self.kind {
            RelKind::Table => format!("ONLY {}", self.table.quoted()),
            RelKind::Partitioned => self.table.quoted(),
        }
    }

    /// `t."k1"` / `t.ctid`
    pub(crate) fn key_expr(&self, k: &KeyCol) -> String {
        if self.by_ctid() {
            "t.ctid".to_owned()
        } else {
            format!("t.{}", quote_ident(&k.name))
        }
    }

    /// `t.k1::text, t.k2::text`
    pub(crate) fn key_select(&self) -> String {
        self.key
            .iter()
            .map(|k| format!("{}::text", self.key_expr(k)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `(t.k1, t.k2)`
    pub(crate) fn key_tuple(&self) -> String {
        let cols: Vec<String> = self.key.iter().map(|k| self.key_expr(k)).collect();
        format!("({})", cols.join(", "))
    }
}

/// Which families run.
pub(crate) fn wants(families: &[CheckFamily], f: CheckFamily) -> bool {
    families.is_empty() || families.contains(&f)
}

/// What a plan is built from besides the catalog.
pub(crate) struct PlanInputs<'a> {
    pub(crate) rules: &'a Rules,
    pub(crate) families: &'a [CheckFamily],
    pub(crate) checksum_key: Option<[u8; 32]>,
    pub(crate) chunk_rows: u64,
}

/// Builds the plan of `rel` from the catalog and the declared rules. `client` must
/// be inside a transaction with the probes' session settings (`session_setup`).
pub(crate) async fn plan_table(
    client: &impl GenericClient,
    rel: &Relation,
    inputs: &PlanInputs<'_>,
) -> Result<TablePlan> {
    let info = sanare_pg::catalog::describe(client, &rel.table).await?;
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
    let mut plan = TablePlan {
        table: rel.table.clone(),
        kind: rel.kind,
        key,
        ancestors: rel.ancestors.clone(),
        reltuples: rel.reltuples,
        relpages: rel.relpages,
        probes: Vec::new(),
    };
    let scope = RuleScope {
        plan: &plan,
        info: &info,
    };
    let families = inputs.families;
    let mut fused: Vec<RowRule> = Vec::new();
    let mut probes = Vec::new();
    if rel.kind == RelKind::Table {
        if wants(families, CheckFamily::Schema) {
            catalog_row_rules(client, &info, &mut fused).await?;
            declared_row_rules(&scope, inputs.rules, &mut fused)?;
            for index in catalog::unenforced_unique_indexes(client, info.oid, &info.table).await? {
                probes.push(Probe::Unique(UniqueKey {
                    columns: index.keys.iter().map(|k| unquote(k)).collect(),
                    name: index.name,
                    keys: index.keys,
                    predicate: index.predicate,
                    nulls_not_distinct: index.nulls_not_distinct,
                    severity: Severity::High,
                    declared: false,
                }));
            }
        }
        if wants(families, CheckFamily::Consistency) {
            consistency_predicates(&scope, inputs.rules, &mut fused)?;
        }
        if wants(families, CheckFamily::Referential) {
            relationships(client, &scope, inputs, &mut probes).await?;
        }
        if wants(families, CheckFamily::Checksum) {
            checksums(client, &scope, inputs, &mut probes).await?;
        }
    }
    whole_table_rules(&scope, inputs, &mut probes)?;
    // Schema and consistency predicates are fused into one pass, but a plan that
    // wants only one of the families gets only its rules.
    if !fused.is_empty() {
        probes.insert(0, Probe::Fused(fused));
    }
    if rel.kind == RelKind::Partitioned
        && plan.by_ctid()
        && let Some(p) = probes.first()
    {
        return Err(Error::config(
            "integrity rules",
            format!(
                "{} is partitioned and has no primary key, so `{}` cannot name the rows it finds; declare the rule on each partition instead",
                rel.table,
                p.id()
            ),
        ));
    }
    plan.probes = probes;
    Ok(plan)
}

/// The table a rule applies to, and what it reads.
struct RuleScope<'a> {
    plan: &'a TablePlan,
    info: &'a sanare_pg::catalog::TableInfo,
}

impl RuleScope<'_> {
    /// Row rules (and relationships, checksums) declared on this table or on a
    /// partitioned table above it.
    fn row_rule_applies(&self, table: &str) -> bool {
        TableRef::parse(table)
            .is_ok_and(|t| t == self.plan.table || self.plan.ancestors.contains(&t))
    }

    /// Whole-table rules run on the table they name.
    fn whole_rule_applies(&self, table: &str) -> bool {
        TableRef::parse(table).is_ok_and(|t| t == self.plan.table)
    }

    fn require_column(&self, column: &str) -> Result<()> {
        if self.info.column(column).is_none() {
            return Err(Error::config(
                "integrity rules",
                format!(
                    "a rule names column `{column}`, which {} does not have",
                    self.plan.table
                ),
            ));
        }
        Ok(())
    }
}

fn declared_row_rules(scope: &RuleScope<'_>, rules: &Rules, out: &mut Vec<RowRule>) -> Result<()> {
    let name = scope.plan.table.to_string();
    for r in rules
        .not_null
        .iter()
        .filter(|r| scope.row_rule_applies(&r.table))
    {
        scope.require_column(&r.column)?;
        out.push(RowRule {
            kind: ViolationKind::NullConstraint {
                column: r.column.clone(),
            },
            severity: r.severity.unwrap_or(Severity::Medium),
            family: CheckFamily::Schema,
            violated: format!("t.{} IS NULL", quote_ident(&r.column)),
            description: format!("{name}.{} is null (declared not null)", r.column),
            action: "set the column from the journal or a snapshot, or fix the writer".into(),
            recompute: None,
        });
    }
    for r in rules
        .range
        .iter()
        .filter(|r| scope.row_rule_applies(&r.table))
    {
        scope.require_column(&r.column)?;
        out.push(declared_check(
            &name,
            &format!("range_{}", r.column),
            &r.column,
            Rules::range_violation(r),
            r.severity,
            "value out of the declared range",
        ));
    }
    for r in rules
        .regex
        .iter()
        .filter(|r| scope.row_rule_applies(&r.table))
    {
        scope.require_column(&r.column)?;
        out.push(declared_check(
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
    for r in rules
        .allowed_values
        .iter()
        .filter(|r| scope.row_rule_applies(&r.table))
    {
        scope.require_column(&r.column)?;
        let list: Vec<String> = r.values.iter().map(|v| quote_literal(v)).collect();
        out.push(declared_check(
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
    Ok(())
}

fn consistency_predicates(
    scope: &RuleScope<'_>,
    rules: &Rules,
    out: &mut Vec<RowRule>,
) -> Result<()> {
    let name = scope.plan.table.to_string();
    for r in rules
        .consistency
        .iter()
        .filter(|r| scope.row_rule_applies(&r.table))
    {
        let Some(p) = &r.predicate else { continue };
        if let Some(c) = &r.recompute {
            scope.require_column(c)?;
        }
        out.push(RowRule {
            kind: ViolationKind::Consistency {
                rule: r.name.clone(),
            },
            severity: r.severity.unwrap_or(Severity::Medium),
            family: CheckFamily::Consistency,
            violated: format!("coalesce(NOT ({p}), false)"),
            description: format!("{name}: business rule `{}` fails", r.name),
            action: consistency_action(r),
            recompute: r.recompute.clone(),
        });
    }
    Ok(())
}

fn consistency_action(r: &crate::rules::ConsistencyRule) -> String {
    r.recommended_action
        .clone()
        .unwrap_or_else(|| format!("correct the row so that business rule `{}` holds", r.name))
}

/// Declared unique keys and business-rule queries: one whole-table pass each, on
/// the table the rule names.
fn whole_table_rules(
    scope: &RuleScope<'_>,
    inputs: &PlanInputs<'_>,
    out: &mut Vec<Probe>,
) -> Result<()> {
    let rules = inputs.rules;
    if wants(inputs.families, CheckFamily::Schema) {
        for r in rules
            .unique
            .iter()
            .filter(|r| scope.whole_rule_applies(&r.table))
        {
            for c in &r.columns {
                scope.require_column(c)?;
            }
            out.push(Probe::Unique(UniqueKey {
                name: r.name.clone(),
                keys: r.columns.iter().map(|c| quote_ident(c)).collect(),
                columns: r.columns.clone(),
                predicate: None,
                nulls_not_distinct: false,
                severity: r.severity.unwrap_or(Severity::High),
                declared: true,
            }));
        }
    }
    if wants(inputs.families, CheckFamily::Consistency) {
        for r in rules
            .consistency
            .iter()
            .filter(|r| scope.whole_rule_applies(&r.table))
        {
            let Some(q) = &r.query else { continue };
            if let Some(c) = &r.recompute {
                scope.require_column(c)?;
            }
            out.push(Probe::Query {
                rule: r.name.clone(),
                sql: q.clone(),
                params: r.params.clone(),
                severity: r.severity.unwrap_or(Severity::Medium),
                action: consistency_action(r),
                recompute: r.recompute.clone(),
            });
        }
    }
    Ok(())
}

async fn relationships(
    client: &impl GenericClient,
    scope: &RuleScope<'_>,
    inputs: &PlanInputs<'_>,
    out: &mut Vec<Probe>,
) -> Result<()> {
    let big = |rows: Option<f64>| {
        // No statistics: probing the parent's index is right at any size.
        rows.is_none_or(|n| n > inputs.chunk_rows.saturating_mul(4) as f64)
    };
    for fk in catalog::foreign_keys(client, scope.info.oid, &scope.info.table).await? {
        out.push(Probe::Orphans(Relationship {
            name: fk.name,
            columns: fk.columns,
            parent: fk.parent,
            parent_only: !fk.parent_partitioned,
            parent_columns: fk.parent_columns,
            severity: Severity::High,
            validated: Some(fk.validated),
            deferrable: Some(fk.deferrable),
            match_full: fk.match_type == MatchType::Full,
            probe_parent_index: big(fk.parent_rows),
        }));
    }
    for r in inputs
        .rules
        .relationship
        .iter()
        .filter(|r| scope.row_rule_applies(&r.table))
    {
        for c in &r.columns {
            scope.require_column(c)?;
        }
        let parent = TableRef::parse(&r.parent)?;
        out.push(Probe::Orphans(Relationship {
            name: r.name.clone(),
            columns: r.columns.clone(),
            parent_only: !catalog::is_partitioned(client, &parent).await?,
            parent,
            parent_columns: r.parent_columns.clone(),
            severity: r.severity.unwrap_or(Severity::High),
            validated: None,
            deferrable: None,
            match_full: false,
            // A declared relationship's parent columns may have no index.
            probe_parent_index: false,
        }));
    }
    Ok(())
}

async fn checksums(
    client: &impl GenericClient,
    scope: &RuleScope<'_>,
    inputs: &PlanInputs<'_>,
    out: &mut Vec<Probe>,
) -> Result<()> {
    for r in inputs
        .rules
        .checksum
        .iter()
        .filter(|r| scope.row_rule_applies(&r.table))
    {
        scope.require_column(&r.column)?;
        let columns: Vec<String> = scope
            .info
            .columns
            .iter()
            .filter(|c| c.name != r.column && !c.generated)
            .map(|c| c.name.clone())
            .collect();
        let forms = text_forms(client, scope.info.oid, &columns).await?;
        out.push(Probe::Checksum {
            column: r.column.clone(),
            columns,
            forms,
            checksummer: Checksummer::for_algorithm(r.algorithm, inputs.checksum_key)?,
            severity: r.severity.unwrap_or(Severity::High),
        });
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
        recompute: None,
    }
}

/// NOT NULL, CHECK (valid or NOT VALID), enum labels, domain constraints, lengths
/// and precision.
async fn catalog_row_rules(
    client: &impl GenericClient,
    info: &sanare_pg::catalog::TableInfo,
    out: &mut Vec<RowRule>,
) -> Result<()> {
    let name = info.table.to_string();
    for c in info.columns.iter().filter(|c| c.not_null) {
        out.push(RowRule {
            kind: ViolationKind::NullConstraint {
                column: c.name.clone(),
            },
            severity: Severity::High,
            family: CheckFamily::Schema,
            violated: format!("t.{} IS NULL", quote_ident(&c.name)),
            description: format!("{name}.{} is null despite NOT NULL", c.name),
            action: "restore the value from the journal or a snapshot".into(),
            recompute: None,
        });
    }
    for c in catalog::column_limits(client, info.oid, &info.table).await? {
        let col = format!("t.{}", quote_ident(&c.column));
        if let Some(n) = c.length {
            out.push(type_rule(
                &name,
                &c.column,
                &c.type_name,
                format!("coalesce(char_length({col}) > {n}, false)"),
            ));
        }
        if let Some((p, s)) = c.numeric {
            // NaN fits any numeric(p, s); infinities fit none.
            out.push(type_rule(
                &name,
                &c.column,
                &c.type_name,
                format!(
                    "coalesce({col} <> 'NaN' AND ({col} <> round({col}, {s}) OR abs({col}) >= 1e{}), false)",
                    p - s
                ),
            ));
        }
    }
    for c in catalog::check_constraints(client, info.oid, &info.table).await? {
        out.push(RowRule {
            kind: ViolationKind::CheckConstraint {
                constraint: c.name.clone(),
                columns: c.columns,
            },
            severity: Severity::High,
            family: CheckFamily::Schema,
            violated: format!("coalesce(NOT ({}), false)", c.expression),
            description: format!("{name}: CHECK constraint {} fails", c.name),
            action: "correct the row from the journal or a snapshot".into(),
            recompute: None,
        });
    }
    // Enum columns: a value whose label is gone from pg_enum (a damaged or edited
    // catalog) compares unequal to every current label. The labels are inlined as a
    // constant array so the catalog is read once per query, not per row; `=` on
    // enums compares OIDs and never fails on an unknown one.
    for e in catalog::enum_columns(client, info.oid, &info.table).await? {
        let col = format!("t.{}", quote_ident(&e.column));
        let violated = if e.labels.is_empty() {
            format!("{col} IS NOT NULL")
        } else {
            let list: Vec<String> = e
                .labels
                .iter()
                .map(|l| format!("{}::{}", quote_literal(l), e.type_name))
                .collect();
            format!("coalesce({col} <> ALL (ARRAY[{}]), false)", list.join(", "))
        };
        out.push(type_rule(&name, &e.column, &e.type_name, violated));
    }
    // Domain constraints: the catalog's expression reads the value as `VALUE`,
    // which a sub-select binds to the column (the innermost scope wins).
    for d in catalog::domain_constraints(client, info.oid, &info.table).await? {
        let col = format!("t.{}", quote_ident(&d.column));
        let violated = match &d.expression {
            None => format!("{col} IS NULL"),
            Some(expr) => format!(
                "coalesce((SELECT NOT ({expr}) FROM (SELECT {col} AS value) sanare_domain), false)"
            ),
        };
        let mut rule = type_rule(&name, &d.column, &d.type_name, violated);
        rule.description = format!(
            "{name}.{} fails constraint {} of domain {}",
            d.column, d.name, d.domain
        );
        out.push(rule);
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
        recompute: None,
    }
}

/// A key as `pg_get_indexdef` prints it, for reports: a quoted column loses its
/// quotes (`"Email"` → `Email`); an expression stays as is.
fn unquote(key: &str) -> String {
    match key.strip_prefix('"').and_then(|k| k.strip_suffix('"')) {
        Some(inner) if !inner.replace("\"\"", "").contains('"') => inner.replace("\"\"", "\""),
        _ => key.to_owned(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_keys_are_reported_without_their_quotes() {
        assert_eq!(unquote("email"), "email");
        assert_eq!(unquote("\"Display Name\""), "Display Name");
        assert_eq!(unquote("\"say \"\"hi\"\"\""), "say \"hi\"");
        assert_eq!(unquote("lower(email)"), "lower(email)");
        assert_eq!(unquote("lower(\"Email\")"), "lower(\"Email\")");
    }
}
