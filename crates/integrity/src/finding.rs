//! From a confirmed suspect to the violation it reports.

use sanare_core::{CheckFamily, ColumnValue, RowRef, Severity, Violation, ViolationKind};
use serde_json::{Map, Value, json};

use crate::plan::{Probe, TablePlan};
use crate::spill::{Facts, Suspect};

/// The violation a confirmed suspect of `probe` reports.
pub(crate) fn to_violation(plan: &TablePlan, probe: &Probe, s: Suspect) -> Violation {
    let Finding {
        kind,
        severity,
        description,
        action,
        mut details,
        recompute,
    } = finding(plan, probe, &s);
    if let Some((rule, column)) = recompute {
        // A repair recomputes the column by the rule's name, from its own trusted
        // configuration: no expression is ever carried in a finding.
        details = json!({ "recompute": { "rule": rule, "column": column } });
    }
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
    let description = format!("{description} at {row}");
    Violation::new(kind, severity, plan.table.clone(), Some(row), description)
        .with_recommended_action(action)
        .with_details(details)
}

/// What a suspect of a probe means.
struct Finding {
    kind: ViolationKind,
    severity: Severity,
    description: String,
    action: String,
    details: Value,
    /// `(rule, column)` of a business rule a repair may recompute.
    recompute: Option<(String, String)>,
}

fn finding(plan: &TablePlan, probe: &Probe, s: &Suspect) -> Finding {
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
    match probe {
        Probe::Fused(rules) => {
            let i = usize::try_from(s.rule)
                .unwrap_or(usize::MAX)
                .min(rules.len().saturating_sub(1));
            let r = &rules[i];
            Finding {
                kind: r.kind.clone(),
                severity: r.severity,
                description: r.description.clone(),
                action: r.action.clone(),
                details: Value::Null,
                recompute: match (&r.kind, &r.recompute) {
                    (ViolationKind::Consistency { rule }, Some(c)) => {
                        Some((rule.clone(), c.clone()))
                    }
                    _ => None,
                },
            }
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
            Finding {
                kind: ViolationKind::Referential {
                    constraint: rel.name.clone(),
                    columns: rel.columns.clone(),
                    parent_table: rel.parent.clone(),
                    parent_columns: rel.parent_columns.clone(),
                },
                severity: rel.severity,
                description: if partial {
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
                action: format!(
                    "restore the missing {} row from a snapshot, or delete / re-point the orphan",
                    rel.parent
                ),
                details,
                recompute: None,
            }
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
            Finding {
                kind: ViolationKind::ChecksumMismatch {
                    column: column.clone(),
                },
                severity: *severity,
                description: format!("{name}.{column} does not match the row's values"),
                action: "compare with the latest snapshot and the journal; restore the row if it was tampered with".into(),
                details: json!({
                    "stored": stored,
                    "computed": computed,
                    "algorithm": checksummer.algorithm().as_str(),
                    "encoding_version": crate::checksum::ENCODING_VERSION,
                }),
                recompute: None,
            }
        }
        Probe::Unique(u) => {
            let mut details = json!({ "duplicate_value": by(&u.columns) });
            if let Some(p) = &u.predicate {
                details["index_predicate"] = Value::String(p.clone());
            }
            Finding {
                kind: ViolationKind::UniqueConstraint {
                    constraint: u.name.clone(),
                    columns: u.columns.clone(),
                },
                severity: u.severity,
                description: format!("{name}: rows share a value of unique {}", u.name),
                action: "keep one of the duplicates (compare with the journal), delete or change the others, then REINDEX".into(),
                details,
                recompute: None,
            }
        }
        Probe::Query {
            rule,
            severity,
            action,
            recompute,
            ..
        } => Finding {
            kind: ViolationKind::Consistency { rule: rule.clone() },
            severity: *severity,
            description: format!("{name}: business rule `{rule}` fails"),
            action: action.clone(),
            details: Value::Null,
            recompute: recompute.as_ref().map(|c| (rule.clone(), c.clone())),
        },
    }
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
