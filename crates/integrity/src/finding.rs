//! From a confirmed suspect to the violation it reports.

use sanare_core::{CheckFamily, ColumnValue, RowRef, Violation, ViolationKind};
use serde_json::{Map, Value, json};

use crate::plan::{Probe, TablePlan};
use crate::spill::{Facts, Suspect};

/// The violation a confirmed suspect of `probe` reports.
pub(crate) fn to_violation(plan: &TablePlan, probe: &Probe, s: Suspect) -> Violation {
    let row = RowRef::new(
        plan.table.clone(),
        plan.key
            .iter()
            .zip(s.key)
            .map(|(k, v)| ColumnValue {
                column: k.name.clone(),
                type_name: k.type_name.clone(),
                value: Some(v),
            })
            .collect(),
    );
    let name = &plan.table;
    let values = match &s.facts {
        Facts::Values(v) => v.as_slice(),
        _ => &[],
    };
    let by = |names: &[String]| -> Value {
        Value::Object(
            names
                .iter()
                .zip(values)
                .map(|(c, v)| (c.clone(), json!(v)))
                .collect::<Map<_, _>>(),
        )
    };
    let (kind, severity, description, action, mut details, recompute) = match probe {
        Probe::Fused(rules) => {
            let i = usize::try_from(s.rule)
                .unwrap_or(usize::MAX)
                .min(rules.len().saturating_sub(1));
            let r = &rules[i];
            let recompute = match (&r.kind, &r.recompute) {
                (ViolationKind::Consistency { rule }, Some(c)) => Some((rule.clone(), c.clone())),
                _ => None,
            };
            (
                r.kind.clone(),
                r.severity,
                r.description.clone(),
                r.action.clone(),
                Value::Null,
                recompute,
            )
        }
        Probe::Orphans(rel) => {
            let partial = rel.match_full && values.iter().any(Option::is_none);
            let mut details = json!({
                "child_key": by(&rel.columns),
                "missing_parent_key": by(&rel.parent_columns),
                "constraint_validated": rel.validated,
                "constraint_deferrable": rel.deferrable,
            });
            if partial {
                details["match_full_partial_key"] = Value::Bool(true);
            }
            (
                ViolationKind::Referential {
                    constraint: rel.name.clone(),
                    columns: rel.columns.clone(),
                    parent_table: rel.parent.clone(),
                    parent_columns: rel.parent_columns.clone(),
                },
                rel.severity,
                if partial {
                    format!(
                        "{name} row has some but not all columns of MATCH FULL foreign key {} null",
                        rel.name
                    )
                } else {
                    format!(
                        "{name} row references a missing {} row ({})",
                        rel.parent, rel.name
                    )
                },
                format!(
                    "restore the missing {} row from a snapshot, or delete / re-point the orphan",
                    rel.parent
                ),
                details,
                None,
            )
        }
        Probe::Checksum {
            column,
            severity,
            checksummer,
            ..
        } => {
            let (stored, computed) = match &s.facts {
                Facts::Checksum { stored, computed } => (stored.clone(), Some(computed.clone())),
                _ => (None, None),
            };
            (
                ViolationKind::ChecksumMismatch {
                    column: column.clone(),
                },
                *severity,
                format!("{name}.{column} does not match the row's values"),
                "compare with the latest snapshot and the journal; restore the row if it was tampered with".into(),
                json!({
                    "stored": stored,
                    "computed": computed,
                    "algorithm": checksummer.algorithm().as_str(),
                    "encoding_version": crate::checksum::ENCODING_VERSION,
                }),
                None,
            )
        }
        Probe::Unique(u) => {
            let mut details = json!({ "duplicate_value": by(&u.columns) });
            if let Some(p) = &u.predicate {
                details["index_predicate"] = Value::String(p.clone());
            }
            (
                ViolationKind::UniqueConstraint {
                    constraint: u.name.clone(),
                    columns: u.columns.clone(),
                },
                u.severity,
                format!("{name}: rows share a value of unique {}", u.name),
                "keep one of the duplicates (compare with the journal), delete or change the others, then REINDEX".into(),
                details,
                None,
            )
        }
        Probe::Query {
            rule,
            severity,
            action,
            recompute,
            ..
        } => (
            ViolationKind::Consistency { rule: rule.clone() },
            *severity,
            format!("{name}: business rule `{rule}` fails"),
            action.clone(),
            Value::Null,
            recompute.as_ref().map(|c| (rule.clone(), c.clone())),
        ),
    };
    if let Some((rule, column)) = recompute {
        // A repair recomputes the column by the rule's name, from its own trusted
        // configuration: no expression is ever carried in a finding.
        details = json!({ "recompute": { "rule": rule, "column": column } });
    }
    let description = format!("{description} at {row}");
    Violation::new(kind, severity, plan.table.clone(), Some(row), description)
        .with_recommended_action(action)
        .with_details(details)
}

/// The family a probe's finding belongs to.
pub(crate) fn family_of(probe: &Probe, s: &Suspect) -> CheckFamily {
    match probe {
        Probe::Fused(rules) => usize::try_from(s.rule)
            .ok()
            .and_then(|i| rules.get(i))
            .map_or(CheckFamily::Schema, |r| r.family),
        other => other.family(),
    }
}
