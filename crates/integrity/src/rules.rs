//! Rules the host declares: in code with [`Rules::builder`], or in a TOML file with
//! [`Rules::from_toml`].
//!
//! ```toml
//! [[not_null]]
//! table = "public.orders"
//! column = "note"
//!
//! [[range]]
//! table = "public.products"
//! column = "price_cents"
//! min = 0
//! max = 1000000
//!
//! [[regex]]
//! table = "public.customers"
//! column = "email"
//! pattern = '^[^@]+@[^@]+$'
//!
//! [[allowed_values]]
//! table = "public.customers"
//! column = "country"
//! values = ["DE", "FR"]
//!
//! [[relationship]]
//! name = "payments_order"
//! table = "public.payments"
//! columns = ["order_id"]
//! parent = "public.orders"
//! parent_columns = ["id"]
//!
//! [[checksum]]
//! table = "public.customers"
//! column = "row_checksum"
//! algorithm = "sha256"
//!
//! [[consistency]]
//! name = "shipped_after_placed"
//! table = "public.orders"
//! predicate = "shipped_at IS NULL OR shipped_at >= placed_at"
//!
//! [[consistency]]
//! name = "order_total"
//! table = "public.orders"
//! query = "SELECT o.id FROM public.orders o WHERE o.total_cents <> (SELECT coalesce(sum(l.amount_cents), 0) FROM public.order_lines l WHERE l.order_id = o.id)"
//! recompute = "total_cents"
//! recompute_expression = "(SELECT coalesce(sum(l.amount_cents), 0) FROM public.order_lines l WHERE l.order_id = t.id)"
//! ```
//!
//! Rules on a partitioned table apply to its partitions (row rules, relationships,
//! checksums) or run on it whole (unique keys, queries); rules on an inheritance
//! parent judge the parent's own rows, like its constraints.

use sanare_core::{Error, Result, Severity, TableRef};
use sanare_pg::{quote_ident, quote_literal};
use serde::{Deserialize, Serialize};

use crate::checksum::ChecksumAlgorithm;

/// A table name in a rule file: `schema.table` or `table` (schema `public`).
fn parse_table(s: &str) -> Result<TableRef> {
    TableRef::parse(s)
}

/// A bound of a range rule: a number or a string literal of the column's type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Bound {
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// Any literal the column's type accepts (`"2025-01-01"`).
    Text(String),
}

impl Bound {
    fn literal(&self) -> String {
        match self {
            Bound::Int(i) => quote_literal(&i.to_string()),
            Bound::Float(f) => quote_literal(&f.to_string()),
            Bound::Text(s) => quote_literal(s),
        }
    }
}

/// A column that must not be null although the database allows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NotNullRule {
    /// `schema.table`.
    pub table: String,
    /// The column.
    pub column: String,
    /// How bad a violation is (default medium).
    #[serde(default)]
    pub severity: Option<Severity>,
}

/// A column whose values must lie in `[min, max]` (either bound optional).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RangeRule {
    /// `schema.table`.
    pub table: String,
    /// The column.
    pub column: String,
    /// The smallest allowed value.
    #[serde(default)]
    pub min: Option<Bound>,
    /// The largest allowed value.
    #[serde(default)]
    pub max: Option<Bound>,
    /// How bad a violation is (default medium).
    #[serde(default)]
    pub severity: Option<Severity>,
}

/// A column whose text must match a POSIX regular expression (PostgreSQL's `~`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RegexRule {
    /// `schema.table`.
    pub table: String,
    /// The column.
    pub column: String,
    /// The pattern.
    pub pattern: String,
    /// How bad a violation is (default medium).
    #[serde(default)]
    pub severity: Option<Severity>,
}

/// A column whose text must be one of `values`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AllowedValuesRule {
    /// `schema.table`.
    pub table: String,
    /// The column.
    pub column: String,
    /// The allowed values, in text form.
    pub values: Vec<String>,
    /// How bad a violation is (default medium).
    #[serde(default)]
    pub severity: Option<Severity>,
}

/// A relationship the database does not declare (composite keys allowed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RelationshipRule {
    /// A name for reports.
    pub name: String,
    /// The child table.
    pub table: String,
    /// The child's referencing columns.
    pub columns: Vec<String>,
    /// The parent table.
    pub parent: String,
    /// The parent's referenced columns, in the same order.
    pub parent_columns: Vec<String>,
    /// How bad an orphan is (default high).
    #[serde(default)]
    pub severity: Option<Severity>,
}

/// A set of columns whose values must be unique across the table although no valid
/// unique index enforces it (composite keys allowed; rows with a NULL in any of the
/// columns are exempt, as in SQL).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UniqueRule {
    /// A name for reports.
    pub name: String,
    /// `schema.table`.
    pub table: String,
    /// The columns.
    pub columns: Vec<String>,
    /// How bad a duplicate is (default high).
    #[serde(default)]
    pub severity: Option<Severity>,
}

/// The checksum column of a table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChecksumRule {
    /// `schema.table`.
    pub table: String,
    /// The `bytea` column holding the checksum.
    pub column: String,
    /// The algorithm (default blake3).
    #[serde(default)]
    pub algorithm: ChecksumAlgorithm,
    /// How bad a mismatch is (default high).
    #[serde(default)]
    pub severity: Option<Severity>,
}

/// A business rule, either a row predicate (checked in the fused pass, chunked) or
/// a query returning the primary-key columns of every offending row of `table`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConsistencyRule {
    /// The rule name.
    pub name: String,
    /// The table whose rows the rule judges.
    pub table: String,
    /// An SQL boolean over one row of `table` that must hold (NULL counts as holding,
    /// like CHECK).
    #[serde(default)]
    pub predicate: Option<String>,
    /// An SQL query whose result columns are `table`'s primary-key columns (by name)
    /// of the offending rows. `$1`… are bound to `params` as text.
    #[serde(default)]
    pub query: Option<String>,
    /// Parameters of `query`, as text.
    #[serde(default)]
    pub params: Vec<String>,
    /// How bad a violation is (default medium).
    #[serde(default)]
    pub severity: Option<Severity>,
    /// What an operator should do.
    #[serde(default)]
    pub recommended_action: Option<String>,
    /// The column of `table` a repair may recompute to make the rule hold. A
    /// violation then carries `details.recompute = {"rule": <name>, "column":
    /// <column>}`, never an expression: the repair engine looks the rule up by name
    /// in its own (trusted) configuration.
    #[serde(default)]
    pub recompute: Option<String>,
    /// The SQL expression, over the offending row aliased `t`, of the right value of
    /// the [`recompute`](Self::recompute) column (for an order total:
    /// `(SELECT coalesce(sum(l.amount_cents), 0) FROM public.order_lines l WHERE
    /// l.order_id = t.id)`). It comes from this trusted configuration, never from a
    /// finding: `sanare` registers the rule with the repair engine under its name,
    /// and a repair sets the column to it after re-checking that the row still
    /// violates. Without it a finding names the rule and column, and the repair is
    /// an operator's.
    #[serde(default)]
    pub recompute_expression: Option<String>,
}

impl ConsistencyRule {
    /// A rule that `predicate` holds for every row of `table`.
    pub fn predicate(name: &str, table: &TableRef, predicate: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            table: table.to_string(),
            predicate: Some(predicate.into()),
            query: None,
            params: Vec::new(),
            severity: None,
            recommended_action: None,
            recompute: None,
            recompute_expression: None,
        }
    }

    /// A rule that `query` (returning the primary keys of offending rows) returns nothing.
    pub fn query(name: &str, table: &TableRef, query: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            table: table.to_string(),
            predicate: None,
            query: Some(query.into()),
            params: Vec::new(),
            severity: None,
            recommended_action: None,
            recompute: None,
            recompute_expression: None,
        }
    }

    /// `parent.value = sum(child.value)` over the children of each parent (no
    /// children count as 0), e.g. `orders.total_cents = sum(order_lines.amount_cents)`.
    /// `parent_key` must be `parent`'s (single-column) primary key.
    #[allow(clippy::too_many_arguments)]
    pub fn aggregate_equals(
        name: &str,
        parent: &TableRef,
        parent_key: &str,
        parent_value: &str,
        child: &TableRef,
        child_fk: &str,
        child_value: &str,
    ) -> Self {
        let (pk, pv, fk, cv) = (
            quote_ident(parent_key),
            quote_ident(parent_value),
            quote_ident(child_fk),
            quote_ident(child_value),
        );
        let q = format!(
            "SELECT p.{pk} FROM {p} p LEFT JOIN (SELECT {fk} AS k, sum({cv}) AS s FROM {c} GROUP BY {fk}) c
               ON c.k = p.{pk} WHERE p.{pv} IS DISTINCT FROM coalesce(c.s, 0)",
            p = parent.quoted(),
            c = child.quoted(),
        );
        let mut r = Self::query(name, parent, q);
        r.recommended_action = Some(format!(
            "recompute {parent}.{parent_value} from {child}.{child_value}, or restore the rows from a snapshot"
        ));
        r
    }

    /// `earlier <= later` whenever both are set.
    pub fn date_order(name: &str, table: &TableRef, earlier: &str, later: &str) -> Self {
        Self::predicate(
            name,
            table,
            format!("{} <= {}", quote_ident(earlier), quote_ident(later)),
        )
    }

    /// Every row of a transitions table (`from_column` → `to_column`) is one of
    /// `allowed` (pairs of text forms).
    pub fn status_transitions(
        name: &str,
        table: &TableRef,
        from_column: &str,
        to_column: &str,
        allowed: &[(&str, &str)],
    ) -> Self {
        let pairs: Vec<String> = allowed
            .iter()
            .map(|(a, b)| format!("({}, {})", quote_literal(a), quote_literal(b)))
            .collect();
        let list = if pairs.is_empty() {
            "(NULL::text, NULL::text)".to_owned()
        } else {
            pairs.join(", ")
        };
        Self::predicate(
            name,
            table,
            format!(
                "({}::text, {}::text) IN ({list})",
                quote_ident(from_column),
                quote_ident(to_column)
            ),
        )
    }

    /// Sets the severity.
    pub fn with_severity(mut self, severity: Severity) -> Self {
        self.severity = Some(severity);
        self
    }

    /// Names the column a repair may recompute by this rule's name (see
    /// [`recompute`](Self::recompute)).
    pub fn with_recompute(mut self, column: &str) -> Self {
        self.recompute = Some(column.to_owned());
        self
    }

    /// Names the column a repair recomputes, and the SQL expression (over the row
    /// aliased `t`) of its right value (see
    /// [`recompute_expression`](Self::recompute_expression)).
    pub fn with_recompute_as(mut self, column: &str, expression: impl Into<String>) -> Self {
        self.recompute = Some(column.to_owned());
        self.recompute_expression = Some(expression.into());
        self
    }

    /// The table the rule judges.
    pub fn table_ref(&self) -> Result<TableRef> {
        parse_table(&self.table)
    }
}

/// Every declared rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Rules {
    /// Columns that must not be null.
    #[serde(default)]
    pub not_null: Vec<NotNullRule>,
    /// Value ranges.
    #[serde(default)]
    pub range: Vec<RangeRule>,
    /// Patterns.
    #[serde(default)]
    pub regex: Vec<RegexRule>,
    /// Allowed values.
    #[serde(default)]
    pub allowed_values: Vec<AllowedValuesRule>,
    /// Undeclared relationships.
    #[serde(default)]
    pub relationship: Vec<RelationshipRule>,
    /// Undeclared unique keys.
    #[serde(default)]
    pub unique: Vec<UniqueRule>,
    /// Checksum columns.
    #[serde(default)]
    pub checksum: Vec<ChecksumRule>,
    /// Business rules.
    #[serde(default)]
    pub consistency: Vec<ConsistencyRule>,
}

impl Rules {
    /// A builder.
    pub fn builder() -> RulesBuilder {
        RulesBuilder::default()
    }

    /// Parses a TOML rule file (see the module docs) and checks it.
    pub fn from_toml(text: &str) -> Result<Self> {
        let rules: Rules = toml::from_str(text).map_err(|e| {
            Error::config("integrity rules", format!("invalid TOML rule file: {e}"))
        })?;
        rules.validate()?;
        Ok(rules)
    }

    /// Reads and parses a TOML rule file.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading the rule file {}", path.display()), e))?;
        Self::from_toml(&text)
    }

    /// The rules as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::other("writing rules as TOML", e))
    }

    /// Merges `other` into these rules.
    pub fn extend(&mut self, other: Rules) {
        self.not_null.extend(other.not_null);
        self.range.extend(other.range);
        self.regex.extend(other.regex);
        self.allowed_values.extend(other.allowed_values);
        self.relationship.extend(other.relationship);
        self.unique.extend(other.unique);
        self.checksum.extend(other.checksum);
        self.consistency.extend(other.consistency);
    }

    /// Checks table names and rule shapes.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::config("integrity rules", what));
        for t in self
            .not_null
            .iter()
            .map(|r| &r.table)
            .chain(self.range.iter().map(|r| &r.table))
            .chain(self.regex.iter().map(|r| &r.table))
            .chain(self.allowed_values.iter().map(|r| &r.table))
            .chain(self.relationship.iter().map(|r| &r.table))
            .chain(self.relationship.iter().map(|r| &r.parent))
            .chain(self.unique.iter().map(|r| &r.table))
            .chain(self.checksum.iter().map(|r| &r.table))
            .chain(self.consistency.iter().map(|r| &r.table))
        {
            parse_table(t)?;
        }
        for r in &self.relationship {
            if r.columns.is_empty() || r.columns.len() != r.parent_columns.len() {
                return bad(format!(
                    "relationship `{}` needs as many parent columns as columns (got {} and {})",
                    r.name,
                    r.columns.len(),
                    r.parent_columns.len()
                ));
            }
        }
        for r in &self.unique {
            if r.columns.is_empty() {
                return bad(format!("unique rule `{}` names no columns", r.name));
            }
        }
        for r in &self.range {
            if r.min.is_none() && r.max.is_none() {
                return bad(format!(
                    "range rule on {}.{} has neither min nor max",
                    r.table, r.column
                ));
            }
        }
        for r in &self.consistency {
            if r.recompute.as_deref().is_some_and(|c| c.trim().is_empty()) {
                return bad(format!(
                    "consistency rule `{}` names an empty recompute column",
                    r.name
                ));
            }
            match (&r.recompute, &r.recompute_expression) {
                (None, Some(_)) => {
                    return bad(format!(
                        "consistency rule `{}` has a recompute_expression but no recompute column",
                        r.name
                    ));
                }
                (Some(_), Some(e)) if e.trim().is_empty() => {
                    return bad(format!(
                        "consistency rule `{}` has an empty recompute_expression",
                        r.name
                    ));
                }
                _ => {}
            }
            if r.predicate.is_some() == r.query.is_some() {
                return bad(format!(
                    "consistency rule `{}` needs exactly one of `predicate` and `query`",
                    r.name
                ));
            }
        }
        Ok(())
    }

    /// The SQL condition that is TRUE when a row of the rule's column violates a
    /// range/regex/allowed-values rule.
    pub(crate) fn range_violation(r: &RangeRule) -> String {
        let c = quote_ident(&r.column);
        let mut parts = Vec::new();
        if let Some(min) = &r.min {
            parts.push(format!("{c} < {}", min.literal()));
        }
        if let Some(max) = &r.max {
            parts.push(format!("{c} > {}", max.literal()));
        }
        format!("coalesce({}, false)", parts.join(" OR "))
    }
}

/// Builds [`Rules`] in code.
#[derive(Debug, Default)]
pub struct RulesBuilder {
    rules: Rules,
}

impl RulesBuilder {
    /// `table.column` must not be null.
    pub fn not_null(mut self, table: &TableRef, column: &str) -> Self {
        self.rules.not_null.push(NotNullRule {
            table: table.to_string(),
            column: column.into(),
            severity: None,
        });
        self
    }

    /// `table.column` must lie in `[min, max]`.
    pub fn range(
        mut self,
        table: &TableRef,
        column: &str,
        min: Option<Bound>,
        max: Option<Bound>,
    ) -> Self {
        self.rules.range.push(RangeRule {
            table: table.to_string(),
            column: column.into(),
            min,
            max,
            severity: None,
        });
        self
    }

    /// `table.column` must match `pattern`.
    pub fn regex(mut self, table: &TableRef, column: &str, pattern: &str) -> Self {
        self.rules.regex.push(RegexRule {
            table: table.to_string(),
            column: column.into(),
            pattern: pattern.into(),
            severity: None,
        });
        self
    }

    /// `table.column` must be one of `values`.
    pub fn allowed_values(
        mut self,
        table: &TableRef,
        column: &str,
        values: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.rules.allowed_values.push(AllowedValuesRule {
            table: table.to_string(),
            column: column.into(),
            values: values.into_iter().map(Into::into).collect(),
            severity: None,
        });
        self
    }

    /// `table(columns)` references `parent(parent_columns)`.
    pub fn relationship(
        mut self,
        name: &str,
        table: &TableRef,
        columns: &[&str],
        parent: &TableRef,
        parent_columns: &[&str],
    ) -> Self {
        self.rules.relationship.push(RelationshipRule {
            name: name.into(),
            table: table.to_string(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            parent: parent.to_string(),
            parent_columns: parent_columns.iter().map(|c| (*c).to_owned()).collect(),
            severity: None,
        });
        self
    }

    /// The values of `table(columns)` must be unique (checked by a whole-table pass:
    /// declare only keys that no valid unique index enforces).
    pub fn unique(mut self, name: &str, table: &TableRef, columns: &[&str]) -> Self {
        self.rules.unique.push(UniqueRule {
            name: name.into(),
            table: table.to_string(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            severity: None,
        });
        self
    }

    /// `table.column` holds the row checksum, computed with `algorithm`.
    pub fn checksum(
        mut self,
        table: &TableRef,
        column: &str,
        algorithm: ChecksumAlgorithm,
    ) -> Self {
        self.rules.checksum.push(ChecksumRule {
            table: table.to_string(),
            column: column.into(),
            algorithm,
            severity: None,
        });
        self
    }

    /// A business rule.
    pub fn consistency(mut self, rule: ConsistencyRule) -> Self {
        self.rules.consistency.push(rule);
        self
    }

    /// The rules, checked.
    pub fn build(self) -> Result<Rules> {
        self.rules.validate()?;
        Ok(self.rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_rules_parse_round_trip_and_are_checked() {
        let text = r#"
[[not_null]]
table = "public.orders"
column = "note"

[[range]]
table = "products"
column = "price_cents"
min = 0
max = 1000000

[[regex]]
table = "public.customers"
column = "email"
pattern = '^[^@]+@[^@]+$'
severity = "low"

[[allowed_values]]
table = "public.customers"
column = "country"
values = ["DE", "FR"]

[[relationship]]
name = "pay_order"
table = "public.payments"
columns = ["order_id"]
parent = "public.orders"
parent_columns = ["id"]

[[checksum]]
table = "public.customers"
column = "row_checksum"
algorithm = "sha256"

[[consistency]]
name = "shipped_after_placed"
table = "public.orders"
predicate = "shipped_at >= placed_at"
"#;
        let rules = Rules::from_toml(text).unwrap();
        assert_eq!(rules.range[0].min, Some(Bound::Int(0)));
        assert_eq!(rules.regex[0].severity, Some(Severity::Low));
        assert_eq!(rules.checksum[0].algorithm, ChecksumAlgorithm::Sha256);
        let again = Rules::from_toml(&rules.to_toml().unwrap()).unwrap();
        assert_eq!(again, rules);

        let err = Rules::from_toml("[[relationship]]\nname='x'\ntable='a'\ncolumns=['a','b']\nparent='p'\nparent_columns=['id']\n")
            .unwrap_err();
        assert!(err.to_string().contains("parent columns"), "{err}");
        assert!(Rules::from_toml("[[bogus]]\nx=1\n").is_err());
        assert!(Rules::from_toml("[[not_null]]\ntable='a.b.c'\ncolumn='x'\n").is_err());
    }

    #[test]
    fn builder_helpers_produce_sql() {
        let orders = TableRef::new("shop", "orders");
        let lines = TableRef::new("shop", "order_lines");
        let r = ConsistencyRule::aggregate_equals(
            "total",
            &orders,
            "id",
            "total_cents",
            &lines,
            "order_id",
            "amount_cents",
        );
        assert!(
            r.query
                .as_deref()
                .unwrap()
                .contains("sum(\"amount_cents\")")
        );
        let t = ConsistencyRule::status_transitions("tr", &orders, "from_s", "to_s", &[("a", "b")]);
        assert!(t.predicate.as_deref().unwrap().contains("IN (('a', 'b'))"));
        let rules = Rules::builder()
            .range(&orders, "total_cents", Some(Bound::Int(0)), None)
            .consistency(r)
            .build()
            .unwrap();
        assert_eq!(
            Rules::range_violation(&rules.range[0]),
            "coalesce(\"total_cents\" < '0', false)"
        );
        assert!(
            Rules::builder()
                .range(&orders, "x", None, None)
                .build()
                .is_err()
        );
    }

    #[test]
    fn a_recompute_expression_needs_its_column_and_reads_from_toml() {
        let toml = r#"
            [[consistency]]
            name = "order_total"
            table = "shop.orders"
            query = "SELECT id FROM shop.orders"
            recompute = "total_cents"
            recompute_expression = "(SELECT 1)"
        "#;
        let rules = Rules::from_toml(toml).unwrap();
        let r = &rules.consistency[0];
        assert_eq!(r.recompute_expression.as_deref(), Some("(SELECT 1)"));
        assert_eq!(r.table_ref().unwrap(), TableRef::new("shop", "orders"));
        let orders = TableRef::new("shop", "orders");
        let mut lone = ConsistencyRule::predicate("p", &orders, "true");
        lone.recompute_expression = Some("(SELECT 1)".into());
        let err = Rules::builder().consistency(lone).build().unwrap_err();
        assert!(err.to_string().contains("no recompute column"), "{err}");
        let empty = ConsistencyRule::predicate("p", &orders, "true").with_recompute_as("x", " ");
        let err = Rules::builder().consistency(empty).build().unwrap_err();
        assert!(
            err.to_string().contains("empty recompute_expression"),
            "{err}"
        );
    }
}
