//! Integrity violations and corruption kinds.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{RowRef, Severity, TableRef, ViolationId};

/// What kind of damage a corruption finding is (spec §4.6, plus deletion).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CorruptionKind {
    /// A value differs from its last known good version in exactly one bit.
    BitFlip,
    /// A value is a prefix of its last known good version, or a table lost rows.
    Truncation,
    /// A row exists that neither the latest snapshot nor the journal explains.
    Injection,
    /// A row known to the snapshot or journal is gone without a journaled delete.
    Deletion,
    /// Catalog or page-header damage reported by the physical layer.
    Metadata,
    /// An index disagrees with its table or is structurally damaged.
    Index,
    /// Stored data violates a constraint the database should have enforced.
    Constraint,
    /// Damage whose shape matches none of the above.
    Unknown,
}

impl CorruptionKind {
    /// The stable snake_case name, as stored.
    pub const fn as_str(self) -> &'static str {
        match self {
            CorruptionKind::BitFlip => "bit_flip",
            CorruptionKind::Truncation => "truncation",
            CorruptionKind::Injection => "injection",
            CorruptionKind::Deletion => "deletion",
            CorruptionKind::Metadata => "metadata",
            CorruptionKind::Index => "index",
            CorruptionKind::Constraint => "constraint",
            CorruptionKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for CorruptionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What rule a [`Violation`] breaks (spec §4.2's violation types, with the facts a
/// repair strategy needs to act on them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ViolationKind {
    /// A column that must not be null is null.
    NullConstraint {
        /// The column.
        column: String,
    },
    /// Two or more rows share a value that must be unique.
    UniqueConstraint {
        /// The constraint or index name.
        constraint: String,
        /// The columns that must be unique together.
        columns: Vec<String>,
    },
    /// A row fails a CHECK constraint or a declared range / pattern / allowed-values rule.
    CheckConstraint {
        /// The constraint or rule name.
        constraint: String,
        /// The columns the rule reads, when known.
        columns: Vec<String>,
    },
    /// A value does not fit its declared type (enum label, length, precision, domain).
    TypeMismatch {
        /// The column.
        column: String,
        /// The expected type, as SQL prints it.
        expected: String,
    },
    /// The table's structure differs from what is expected (missing column, wrong type).
    Schema {
        /// What differs.
        detail: String,
    },
    /// A child row references a parent row that does not exist.
    Referential {
        /// The foreign-key constraint (or declared relationship) name.
        constraint: String,
        /// The referencing columns of the child table.
        columns: Vec<String>,
        /// The referenced table.
        parent_table: TableRef,
        /// The referenced columns, in the same order as `columns`.
        parent_columns: Vec<String>,
    },
    /// A row's stored checksum differs from the one recomputed over its values.
    ChecksumMismatch {
        /// The checksum column.
        column: String,
    },
    /// A business rule (aggregate equality, date order, status transition) fails.
    Consistency {
        /// The rule name.
        rule: String,
    },
    /// Damage found by corruption detection.
    Corruption {
        /// The shape of the damage.
        kind: CorruptionKind,
        /// The damaged column, when one is known.
        column: Option<String>,
        /// The damaged index, for [`CorruptionKind::Index`].
        index: Option<String>,
    },
}

impl ViolationKind {
    /// A stable snake_case code for the kind, as stored in the `violation_type` columns
    /// and accepted by queries (`"referential"`, `"checksum_mismatch"`, …).
    pub const fn code(&self) -> &'static str {
        match self {
            ViolationKind::NullConstraint { .. } => "null_constraint",
            ViolationKind::UniqueConstraint { .. } => "unique_constraint",
            ViolationKind::CheckConstraint { .. } => "check_constraint",
            ViolationKind::TypeMismatch { .. } => "type_mismatch",
            ViolationKind::Schema { .. } => "schema",
            ViolationKind::Referential { .. } => "referential",
            ViolationKind::ChecksumMismatch { .. } => "checksum_mismatch",
            ViolationKind::Consistency { .. } => "consistency",
            ViolationKind::Corruption { .. } => "corruption",
        }
    }
}

/// One broken rule on one row (or one table, when no single row is at fault).
///
/// Produced by integrity validation and corruption detection, consumed by the repair
/// engine. `details` carries finding-specific facts as JSON (for a referential
/// violation the missing parent key; for a checksum mismatch the stored and computed
/// checksums), so the shape of this struct stays stable as checks grow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Violation {
    /// Unique id of this finding.
    pub id: ViolationId,
    /// What rule is broken.
    pub kind: ViolationKind,
    /// How bad it is.
    pub severity: Severity,
    /// The table at fault.
    pub table: TableRef,
    /// The row at fault, if one is.
    pub row: Option<RowRef>,
    /// A one-line human description.
    pub description: String,
    /// When it was found.
    #[serde(with = "time::serde::rfc3339")]
    pub detected_at: OffsetDateTime,
    /// What an operator should do about it.
    pub recommended_action: String,
    /// Finding-specific facts.
    pub details: serde_json::Value,
}

impl Violation {
    /// A new finding, detected now, with empty details and recommended action.
    pub fn new(
        kind: ViolationKind,
        severity: Severity,
        table: TableRef,
        row: Option<RowRef>,
        description: impl Into<String>,
    ) -> Self {
        Self {
            id: ViolationId::new(),
            kind,
            severity,
            table,
            row,
            description: description.into(),
            detected_at: crate::now(),
            recommended_action: String::new(),
            details: serde_json::Value::Null,
        }
    }

    /// Sets the recommended action.
    pub fn with_recommended_action(mut self, action: impl Into<String>) -> Self {
        self.recommended_action = action.into();
        self
    }

    /// Sets the finding-specific details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ColumnValue;

    #[test]
    fn violations_round_trip_through_json_with_a_tagged_kind() {
        let orders = TableRef::new("public", "orders");
        let v = Violation::new(
            ViolationKind::Referential {
                constraint: "orders_customer_id_fkey".into(),
                columns: vec!["customer_id".into()],
                parent_table: TableRef::new("public", "customers"),
                parent_columns: vec!["id".into()],
            },
            Severity::High,
            orders.clone(),
            Some(RowRef::new(
                orders,
                vec![ColumnValue::new("id", "bigint", Some("42"))],
            )),
            "order 42 references missing customer 9",
        )
        .with_details(serde_json::json!({"missing_parent_key": {"id": "9"}}))
        .with_recommended_action("restore customer 9 from the latest snapshot");
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["kind"]["type"], "referential");
        assert_eq!(json["severity"], "high");
        let back: Violation = serde_json::from_value(json).unwrap();
        assert_eq!(back, v);
        assert_eq!(back.kind.code(), "referential");
    }

    #[test]
    fn corruption_kinds_have_stable_names() {
        let k = ViolationKind::Corruption {
            kind: CorruptionKind::BitFlip,
            column: Some("email".into()),
            index: None,
        };
        assert_eq!(k.code(), "corruption");
        assert_eq!(CorruptionKind::BitFlip.as_str(), "bit_flip");
        assert_eq!(
            serde_json::to_string(&CorruptionKind::Truncation).unwrap(),
            "\"truncation\""
        );
    }
}
