//! The engine's configuration: thresholds and limits, the recompute rules it may run,
//! and the key that authenticates the host strategies' stored SQL.

use std::time::Duration;

use sanare_core::{Severity, TableRef};
use serde::{Deserialize, Serialize};

/// Thresholds and limits of the repair engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepairConfig {
    /// Repairs of violations at or above this severity wait for an approval
    /// (default [`Severity::High`]); `None` disables the severity gate.
    pub approval_severity: Option<Severity>,
    /// Repairs expected to change more rows than this wait for an approval
    /// (default 1,000).
    pub approval_max_rows: u64,
    /// Repairs that remove rows (to the quarantine) wait for an approval whatever
    /// their severity and size (default true).
    pub removals_need_approval: bool,
    /// Take a snapshot of the affected table before a repair of a critical violation,
    /// when a snapshot service is attached (default true).
    pub snapshot_before_critical: bool,
    /// `lock_timeout` of the repair transaction: a concurrent writer holding the rows
    /// longer than this fails the repair instead of stalling it (default 5 s).
    pub lock_timeout: Duration,
    /// `statement_timeout` of each statement of the repair transaction (default 5 min).
    pub statement_timeout: Duration,
    /// Rows handled per statement inside a repair's one transaction (default 10,000):
    /// bounds the engine's memory and each statement's work, whatever the repair's size.
    pub batch_rows: usize,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            approval_severity: Some(Severity::High),
            approval_max_rows: 1_000,
            removals_need_approval: true,
            snapshot_before_critical: true,
            lock_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(300),
            batch_rows: 10_000,
        }
    }
}

impl RepairConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the severity gate.
    pub fn approval_severity(mut self, severity: Option<Severity>) -> Self {
        self.approval_severity = severity;
        self
    }

    /// Sets the row-count gate.
    pub fn approval_max_rows(mut self, rows: u64) -> Self {
        self.approval_max_rows = rows;
        self
    }

    /// Sets whether removals always wait for an approval.
    pub fn removals_need_approval(mut self, yes: bool) -> Self {
        self.removals_need_approval = yes;
        self
    }

    /// Sets the lock timeout.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Sets the rows handled per statement (at least 1).
    pub fn batch_rows(mut self, rows: usize) -> Self {
        self.batch_rows = rows.max(1);
        self
    }
}

/// A named recompute rule: how the value of `column` of `table` is derived from other
/// data, as an SQL expression over the row aliased `t`
/// (`(SELECT coalesce(sum(l.amount_cents), 0) FROM shop.order_lines l WHERE l.order_id = t.id)`).
///
/// Rules come from trusted configuration through
/// [`RepairEngineBuilder::recompute_rule`](crate::RepairEngineBuilder::recompute_rule),
/// never from stored data: a violation names a rule (`details.recompute =
/// {"rule": …, "column": …}`), a plan stores the name, and the expression is looked up
/// here when the repair runs. A name the engine does not know is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecomputeRule {
    /// The rule's name, as violations name it.
    pub name: String,
    /// The table whose column it recomputes.
    pub table: TableRef,
    /// The recomputed column.
    pub column: String,
    /// The SQL expression of the column's right value, over the row aliased `t`.
    pub expression: String,
}

impl RecomputeRule {
    /// A rule.
    pub fn new(
        name: impl Into<String>,
        table: TableRef,
        column: impl Into<String>,
        expression: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            table,
            column: column.into(),
            expression: expression.into(),
        }
    }
}

/// The secret that authenticates what must stay code in a stored repair: the SQL
/// of a [`CustomStrategy`](crate::CustomStrategy)'s action. Keep it outside the
/// database (a file readable only by the service and its operators, a secret store):
/// whoever can write sanare's tables must not be able to forge a plan.
///
/// The stored SQL carries `blake3::keyed_hash(key, plan)`; the engine refuses to run
/// a custom repair whose hash does not match, or when it has no key.
#[derive(Clone, PartialEq, Eq)]
pub struct ActionKey([u8; 32]);

impl ActionKey {
    /// A key from 32 secret bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The keyed hash of `message`, hex.
    pub(crate) fn sign(&self, message: &[u8]) -> String {
        blake3::keyed_hash(&self.0, message).to_hex().to_string()
    }

    /// Whether `mac` is the keyed hash of `message` (constant time).
    pub(crate) fn verify(&self, message: &[u8], mac: &str) -> bool {
        blake3::Hash::from_hex(mac).is_ok_and(|m| m == blake3::keyed_hash(&self.0, message))
    }
}

impl std::fmt::Debug for ActionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ActionKey(…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyed_hash_verifies_only_its_message_under_its_key() {
        let key = ActionKey::from_bytes([7; 32]);
        let mac = key.sign(b"delete where x");
        assert!(key.verify(b"delete where x", &mac));
        assert!(!key.verify(b"delete where y", &mac));
        assert!(!ActionKey::from_bytes([8; 32]).verify(b"delete where x", &mac));
        assert!(!key.verify(b"delete where x", "not hex"));
        assert_eq!(format!("{key:?}"), "ActionKey(…)");
    }
}
