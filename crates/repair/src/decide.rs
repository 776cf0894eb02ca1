//! The decision table: from a violation and the facts about its table to a strategy.

use sanare_core::{
    CorruptionKind, RepairStrategyKind, SnapshotId, TableRef, Violation, ViolationKind,
};
use serde::{Deserialize, Serialize};

/// What the engine learned about a violation's table and row before choosing a
/// strategy. Filled by [`RepairEngine::plan`](crate::RepairEngine) from the catalog,
/// the latest good snapshot and the violation's details; passed to
/// [`decide`] and to host [`CustomStrategy`] matchers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TableFacts {
    /// The table's primary-key columns (empty when it has none).
    pub primary_key: Vec<String>,
    /// For a referential violation: every referencing column is nullable.
    pub fk_nullable: bool,
    /// For a column-level violation: the column has a default expression.
    pub column_has_default: bool,
    /// The violation's row is present in the latest good snapshot.
    pub row_in_snapshot: bool,
    /// For a referential violation: the missing parent row
    /// (`details.missing_parent_key`) is present in the latest good snapshot.
    pub parent_in_snapshot: bool,
    /// A journal is attached and the violation names journal entries
    /// (`details.idempotency_keys`).
    pub journal_entries: bool,
    /// The latest good snapshot, when a snapshot service is attached and has one.
    pub snapshot: Option<SnapshotId>,
    /// `details.recompute` names a recompute rule the engine's configuration holds
    /// for the violation's table and column.
    pub recompute_rule: bool,
    /// For a check violation: it names a CHECK constraint of the table's catalog
    /// (which the engine can evaluate to prove a repair fixed it).
    pub catalog_check: bool,
}

/// What [`decide`] chose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Decision {
    /// Repair with this strategy; `rule` is the decision-table row that chose it.
    Strategy {
        /// The strategy.
        strategy: RepairStrategyKind,
        /// The decision-table row (`"R1"` …, or `"custom"`).
        rule: String,
    },
    /// No automatic repair: an operator must act.
    Manual {
        /// Why.
        reason: String,
    },
}

impl Decision {
    fn rule(rule: &str, strategy: RepairStrategyKind) -> Self {
        Decision::Strategy {
            strategy,
            rule: rule.to_owned(),
        }
    }

    /// The chosen strategy, if any.
    pub fn strategy(&self) -> Option<&RepairStrategyKind> {
        match self {
            Decision::Strategy { strategy, .. } => Some(strategy),
            Decision::Manual { .. } => None,
        }
    }
}

/// The built-in decision table (documented row by row in the crate docs). Pure: the
/// same violation and facts always give the same decision.
pub fn decide(v: &Violation, facts: &TableFacts) -> Decision {
    use RepairStrategyKind as S;
    let has_row = v.row.is_some();
    let has_snapshot = facts.snapshot.is_some();
    match &v.kind {
        ViolationKind::Referential { .. } => {
            if facts.parent_in_snapshot {
                Decision::rule("R1", S::RestoreFromSnapshot)
            } else if facts.journal_entries {
                Decision::rule("R2", S::ReplayTransaction)
            } else if facts.fk_nullable {
                Decision::rule("R3", S::RemoveOrphanedRecord)
            } else {
                Decision::rule("R4", S::RemoveOrphanedRecord)
            }
        }
        ViolationKind::UniqueConstraint { .. } => Decision::rule("R9", S::FixConstraintViolation),
        ViolationKind::Consistency { .. }
        | ViolationKind::CheckConstraint { .. }
        | ViolationKind::NullConstraint { .. }
        | ViolationKind::TypeMismatch { .. }
            if has_row && facts.recompute_rule =>
        {
            Decision::rule("R8", S::UpdateInvalidData)
        }
        ViolationKind::Corruption {
            kind: CorruptionKind::Index,
            index: Some(_),
            ..
        } => Decision::rule("R12", S::RebuildIndex),
        ViolationKind::Corruption {
            kind: CorruptionKind::Injection,
            ..
        } if has_row && !facts.row_in_snapshot => Decision::rule("R11", S::DeleteInvalidRecord),
        ViolationKind::Corruption { kind, .. }
            if !has_row
                && has_snapshot
                && matches!(kind, CorruptionKind::Metadata | CorruptionKind::Truncation) =>
        {
            Decision::rule("R13", S::TruncateAndReload)
        }
        ViolationKind::Schema { .. } => Decision::Manual {
            reason: "schema differences are not repaired automatically: migrate the table".into(),
        },
        _ if has_row && facts.row_in_snapshot => Decision::rule("R5", S::RestoreFromSnapshot),
        ViolationKind::ChecksumMismatch { .. } | ViolationKind::Corruption { .. }
            if has_row && facts.journal_entries =>
        {
            Decision::rule("R6", S::ReplayTransaction)
        }
        ViolationKind::NullConstraint { .. } | ViolationKind::TypeMismatch { .. }
            if has_row && facts.column_has_default =>
        {
            Decision::rule("R7", S::UpdateInvalidData)
        }
        ViolationKind::CheckConstraint { columns, .. }
            if has_row && columns.len() == 1 && facts.catalog_check && facts.column_has_default =>
        {
            Decision::rule("R7", S::UpdateInvalidData)
        }
        ViolationKind::NullConstraint { .. }
        | ViolationKind::TypeMismatch { .. }
        | ViolationKind::CheckConstraint { .. }
            if has_row =>
        {
            Decision::rule("R10", S::DeleteInvalidRecord)
        }
        _ => Decision::Manual {
            reason: format!(
                "no automatic strategy for a {} violation{} without a snapshot copy or journal entries",
                v.kind.code(),
                if has_row { "" } else { " not tied to a row" }
            ),
        },
    }
}

/// `details.recompute` of a violation: `{"rule": "<rule name>", "column": "<column>"}`,
/// as `(rule, column)`. Anything else there (an SQL expression) is ignored: the
/// expression of a rule comes from the engine's configuration, never from a finding.
pub(crate) fn recompute(v: &Violation) -> Option<(String, String)> {
    let r = v.details.get("recompute")?.as_object()?;
    if r.len() != 2 {
        return None;
    }
    Some((
        r.get("rule")?.as_str()?.to_owned(),
        r.get("column")?.as_str()?.to_owned(),
    ))
}

/// `details.idempotency_keys`: journal entries whose replay repairs the violation.
pub(crate) fn idempotency_keys(v: &Violation) -> Vec<String> {
    v.details
        .get("idempotency_keys")
        .and_then(|k| k.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What a host strategy does to the rows it matched, run through the same undo-log
/// and quarantine machinery as the built-in strategies (a delete moves the rows to
/// the quarantine).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RowAction {
    /// Delete the rows of the violation's table matching `predicate`.
    Delete {
        /// An SQL boolean expression over the table aliased `t`.
        predicate: String,
    },
    /// Update the rows matching `predicate`.
    Update {
        /// `(column, SQL expression over t)` pairs.
        assignments: Vec<(String, String)>,
        /// An SQL boolean expression over the table aliased `t`.
        predicate: String,
    },
}

/// A host-registered strategy. Custom strategies are consulted before the built-in
/// decision table, in registration order; the first whose [`matches`] returns true
/// wins.
///
/// # Contract
/// The predicate of the returned [`RowAction`] selects exactly the broken rows: the
/// engine quarantines or updates them inside the repair transaction, records their
/// before-images, and re-counts the predicate before commit, rolling back unless it
/// matches no row. SQL text comes from the host's code and is stored with the plan
/// under a keyed hash ([`ActionKey`](crate::ActionKey)): a plan whose SQL was altered
/// in the database is refused. Never build the SQL from a violation's fields without
/// quoting them: violations are data read back from the database.
///
/// [`matches`]: CustomStrategy::matches
pub trait CustomStrategy: Send + Sync {
    /// A unique name; the plan's strategy is `RepairStrategyKind::Custom(name)`.
    fn name(&self) -> &str;
    /// Whether this strategy repairs `violation`.
    fn matches(&self, violation: &Violation, facts: &TableFacts) -> bool;
    /// What to do.
    fn action(&self, violation: &Violation) -> sanare_core::Result<RowAction>;
    /// Whether it always waits for an approval (in addition to the configured threshold).
    fn requires_approval(&self) -> bool {
        false
    }
}

/// The table a violation's repair changes: the parent table for a restored parent,
/// the violation's table otherwise.
pub(crate) fn target_table(v: &Violation, strategy: &RepairStrategyKind) -> TableRef {
    match (&v.kind, strategy) {
        (
            ViolationKind::Referential { parent_table, .. },
            RepairStrategyKind::RestoreFromSnapshot,
        ) => parent_table.clone(),
        _ => v.table.clone(),
    }
}
