//! The words of a plan: preconditions, postconditions, rollback plan, description.

use sanare_core::RepairStrategyKind;

use crate::action::{Action, Assign, Check, Op};
use crate::engine::strategy_code;

fn check_words(check: &Check) -> String {
    match check {
        Check::Orphan { parent, .. } => format!("it references a missing {parent} row"),
        Check::Null { column } => format!("{column} is null"),
        Check::Duplicate { columns } => format!(
            "a row with a lower primary key has the same ({})",
            columns.join(", ")
        ),
        Check::Recompute { rule, column } => {
            format!("{column} differs from recompute rule `{rule}`")
        }
        Check::Constraint { name } => format!("it fails CHECK constraint {name}"),
        Check::Unchanged => "it is exactly as it was when the repair was planned".into(),
    }
}

/// `(preconditions, postconditions, rollback plan, description)` of a plan.
pub(crate) fn describe(
    strategy: &RepairStrategyKind,
    action: &Action,
    rule: &str,
    violations: u64,
) -> (Vec<String>, Vec<String>, String, String) {
    let t = &action.table;
    let scope = format!("the rows of {t} named by {violations} violation(s)");
    let recheck = "at execute time, each row is re-checked: rows changed since planning or no longer violating are skipped and reported";
    let undo = "re-apply the before-images saved in the undo log (repair_undo) and put quarantined rows back, in one transaction".to_owned();
    let (pre, post, rollback, what) = match &action.op {
        Op::Quarantine { check } => (
            vec![
                format!("{t} has a primary key"),
                "no cascading foreign key reaches the removed rows".into(),
                format!("a row is removed only while {}", check_words(check)),
                recheck.into(),
            ],
            vec![format!("no row of the repair remains where {}", check_words(check))],
            undo,
            format!("move {scope} to the quarantine (restorable by id)"),
        ),
        Op::Update { set, check } => (
            vec![
                format!("{t} has a primary key"),
                format!("a row is changed only while {}", check_words(check)),
                recheck.into(),
            ],
            vec![format!("no row of the repair remains where {}", check_words(check))],
            undo,
            format!(
                "set {} on {scope}",
                set.iter()
                    .map(|a| match a {
                        Assign::Null { column } => format!("{column} = NULL"),
                        Assign::Default { column } => format!("{column} = its default"),
                        Assign::Recompute { rule, column } => {
                            format!("{column} = recompute rule `{rule}`")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Op::Restore { snapshot } => (
            vec![
                format!("{t} has a primary key"),
                format!("snapshot {snapshot} holds every row"),
                recheck.into(),
            ],
            vec!["each row's damaged columns equal its snapshot image".into()],
            undo,
            format!(
                "put back the damaged columns of {scope} from snapshot {snapshot} (other columns and rows untouched)"
            ),
        ),
        Op::RestoreParent {
            snapshot, child, ..
        } => (
            vec![
                format!("{t} has a primary key"),
                format!("snapshot {snapshot} holds every missing row"),
                "a row is re-inserted only while it is still missing".into(),
            ],
            vec![format!("no row of {child} is orphaned from the re-inserted rows")],
            undo,
            format!("re-insert the missing {t} rows of orphaned {child} rows from snapshot {snapshot}"),
        ),
        Op::Reload { snapshot } => (
            vec![format!("{t} has a primary key"), format!("snapshot {snapshot} holds {t}")],
            vec![format!("{t} equals its snapshot image row for row")],
            undo,
            format!("reload {t} from snapshot {snapshot} (extra rows to the quarantine, restore changed, re-insert missing rows)"),
        ),
        Op::Replay { idempotency_keys, check } => (
            vec!["a journal is attached".into(), "the entries are in the journal".into()],
            vec![format!("no row of the repair remains where {}", check_words(check))],
            "none from the undo log: journal replay is exactly-once and re-applies the journaled truth; restore a snapshot to undo".into(),
            format!("replay {} journal entr(ies) by idempotency key", idempotency_keys.len()),
        ),
        Op::Reindex { index } => (
            vec![format!("index {index} of {t} exists")],
            vec![format!("index {index} is valid")],
            "none needed: an index is derived data".into(),
            format!("REINDEX INDEX CONCURRENTLY {index}"),
        ),
        Op::Custom { strategy, set, .. } => (
            vec![
                format!("{t} has a primary key"),
                "the strategy's SQL matches its keyed hash".into(),
            ],
            vec!["no row matches the strategy's predicate".into()],
            undo,
            format!(
                "host strategy `{strategy}`: {} the rows of {t} its predicate selects",
                if set.is_some() { "update" } else { "quarantine" }
            ),
        ),
    };
    (
        pre,
        post,
        rollback,
        format!("{} ({rule}): {what}", strategy_code(strategy)),
    )
}
