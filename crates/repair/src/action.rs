//! What a repair does, stored as typed data (`repair_operations.action`), and its
//! binding to the live catalog before anything runs.
//!
//! A stored action names tables, columns, rules and snapshots; it never holds SQL.
//! [`bind`] matches every name against the catalog (and the rule registry) and
//! refuses the action when anything does not match; the SQL fragments are then built
//! from the catalog's names, quoted, with values as bind parameters. The one
//! exception is a host strategy's SQL ([`Op::Custom`]), which is code: it carries a
//! keyed hash and is refused unless the hash verifies.

use std::collections::HashMap;

use sanare_core::{Error, RepairId, Result, SnapshotId, TableRef};
use sanare_pg::{PgResultExt, quote_ident};
use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

use crate::catalog::Meta;
use crate::config::{ActionKey, RecomputeRule};

/// The version of the stored action encoding. Version 1 (SQL text) is never run: the
/// `V2` migration marks its pending repairs `replan_needed`.
pub(crate) const ACTION_VERSION: u32 = 2;

/// A repair's stored action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Action {
    pub(crate) version: u32,
    /// The table the repair changes.
    pub(crate) table: TableRef,
    /// Its primary-key columns when planned: the order of every stored target key.
    pub(crate) key_columns: Vec<String>,
    pub(crate) op: Op,
}

/// What the repair does to its table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Op {
    /// Move the target rows that still violate `check` to the quarantine.
    Quarantine { check: Check },
    /// Set columns of the target rows that still violate `check`.
    Update { set: Vec<Assign>, check: Check },
    /// Put back each target row's damaged columns (all when the target names none)
    /// from the snapshot; re-insert target rows that are gone.
    Restore { snapshot: SnapshotId },
    /// Re-insert the missing parent rows (the targets) of orphans of `child`.
    RestoreParent {
        snapshot: SnapshotId,
        child: TableRef,
        columns: Vec<String>,
        parent_columns: Vec<String>,
    },
    /// Make the whole table equal to its snapshot image.
    Reload { snapshot: SnapshotId },
    /// Replay journal entries by idempotency key.
    Replay {
        idempotency_keys: Vec<String>,
        check: Check,
    },
    /// `REINDEX INDEX CONCURRENTLY` of an index of the table.
    Reindex { index: String },
    /// A host strategy's SQL, authenticated by `mac`.
    Custom {
        strategy: String,
        predicate: String,
        set: Option<Vec<(String, String)>>,
        mac: String,
    },
}

/// What "still violates" means for a target row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "check", rename_all = "snake_case")]
pub(crate) enum Check {
    /// The row references a parent row that does not exist.
    Orphan {
        columns: Vec<String>,
        parent: TableRef,
        parent_columns: Vec<String>,
    },
    /// The column is null.
    Null { column: String },
    /// Another row with a lower primary key has the same values of `columns`.
    Duplicate { columns: Vec<String> },
    /// The column differs from its recompute rule's value.
    Recompute { rule: String, column: String },
    /// The row fails the table's CHECK constraint `name`.
    Constraint { name: String },
    /// The row is exactly as it was when the repair was planned (used where the
    /// engine cannot evaluate the broken rule itself).
    Unchanged,
}

/// One column assignment of an update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "set", rename_all = "snake_case")]
pub(crate) enum Assign {
    Null { column: String },
    Default { column: String },
    Recompute { rule: String, column: String },
}

impl Op {
    /// A short name, for logs.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::Quarantine { .. } => "quarantine",
            Op::Update { .. } => "update",
            Op::Restore { .. } => "restore",
            Op::RestoreParent { .. } => "restore parent",
            Op::Reload { .. } => "reload",
            Op::Replay { .. } => "replay",
            Op::Reindex { .. } => "reindex",
            Op::Custom { .. } => "custom",
        }
    }

    /// Whether the repair works on the rows recorded in `repair_targets`.
    pub(crate) fn uses_targets(&self) -> bool {
        matches!(
            self,
            Op::Quarantine { .. }
                | Op::Update { .. }
                | Op::Restore { .. }
                | Op::RestoreParent { .. }
                | Op::Replay { .. }
        )
    }

    /// Whether the repair removes rows (which always go to the quarantine).
    pub(crate) fn removes_rows(&self) -> bool {
        matches!(
            self,
            Op::Quarantine { .. } | Op::Reload { .. } | Op::Custom { set: None, .. }
        )
    }

    /// Whether the undo log and the quarantine can undo it.
    pub(crate) fn undoable(&self) -> bool {
        !matches!(self, Op::Replay { .. } | Op::Reindex { .. })
    }
}

/// A stored action as read back: the current encoding, or an older one that is never
/// run.
pub(crate) enum Stored {
    Current(Box<Action>),
    /// Written by an older version (SQL text), kept for the audit trail only.
    Legacy,
}

impl Stored {
    /// Decodes `repair_operations.action`. Anything but the exact canonical encoding
    /// of an [`Action`] (unknown fields, another version, SQL text) is refused.
    pub(crate) fn parse(repair: RepairId, value: &serde_json::Value) -> Result<Stored> {
        if value.get("legacy").is_some() {
            return Ok(Stored::Legacy);
        }
        let bad = |why: String| {
            Error::corrupt(
                format!("repair_operations.action of repair {repair}"),
                format!("{why}; nothing was run (plan the repair again)"),
            )
        };
        let action: Action = serde_json::from_value(value.clone())
            .map_err(|e| bad(format!("not a repair action: {e}")))?;
        if action.version != ACTION_VERSION {
            return Err(bad(format!(
                "action version {} is not {ACTION_VERSION}",
                action.version
            )));
        }
        let canonical = serde_json::to_value(&action)
            .map_err(|e| Error::other("re-encoding a repair action", e))?;
        if canonical != *value {
            return Err(bad(
                "it holds fields a repair action does not have (it was altered after planning)"
                    .into(),
            ));
        }
        Ok(Stored::Current(Box::new(action)))
    }
}

/// The message a custom action's keyed hash covers: the repair, its table, the
/// strategy and its SQL.
pub(crate) fn custom_message(
    repair: RepairId,
    table: &TableRef,
    strategy: &str,
    predicate: &str,
    set: &Option<Vec<(String, String)>>,
) -> Vec<u8> {
    serde_json::json!([
        "sanare-repair-custom-v1",
        repair,
        table,
        strategy,
        predicate,
        set
    ])
    .to_string()
    .into_bytes()
}

/// What binding needs besides the catalog.
pub(crate) struct BindContext<'a> {
    pub(crate) repair: RepairId,
    /// The table recorded with the plan: the action may change no other.
    pub(crate) plan_table: &'a TableRef,
    pub(crate) own_schema: &'a str,
    pub(crate) rules: &'a HashMap<String, RecomputeRule>,
    pub(crate) key: Option<&'a ActionKey>,
}

/// A check resolved against the catalog: every name is the catalog's, every
/// expression comes from the catalog or the rule registry.
#[derive(Clone, Debug)]
pub(crate) enum Resolved {
    Orphan {
        columns: Vec<String>,
        parent: Meta,
        parent_columns: Vec<String>,
    },
    Null(String),
    Duplicate(Vec<String>),
    Expr {
        column: String,
        expression: String,
    },
    Constraint(String),
    Unchanged,
}

/// An action matched against the live catalog, ready to become SQL.
#[derive(Clone, Debug)]
pub(crate) struct Bound {
    pub(crate) repair: RepairId,
    pub(crate) action: Action,
    pub(crate) meta: Meta,
    pub(crate) check: Option<Resolved>,
    /// `SET` list of an update (catalog names, registry expressions, or the
    /// authenticated SQL of a custom strategy).
    pub(crate) set: Option<String>,
    /// For a restored parent: the child table and, per child column, the position
    /// of its parent column in the parent's primary key.
    pub(crate) child: Option<(Meta, Vec<(String, usize)>)>,
    /// The index to rebuild, quoted from the catalog.
    pub(crate) index: Option<String>,
}

fn refuse(repair: RepairId, why: impl std::fmt::Display) -> Error {
    Error::invalid_input(format!(
        "repair {repair} refused, nothing was run: {why} (plan the repair again)"
    ))
}

/// Matches `action` against the live catalog and the configuration.
pub(crate) async fn bind(
    client: &impl GenericClient,
    action: Action,
    ctx: &BindContext<'_>,
) -> Result<Bound> {
    let repair = ctx.repair;
    if action.table != *ctx.plan_table {
        return Err(refuse(
            repair,
            format!(
                "its action changes {}, which is not the plan's table {}",
                action.table, ctx.plan_table
            ),
        ));
    }
    Meta::check_scope(&action.table, ctx.own_schema).map_err(|e| refuse(repair, e))?;
    let meta = load(client, &action.table, repair).await?;
    if action.op.uses_targets() || matches!(action.op, Op::Reload { .. } | Op::Custom { .. }) {
        meta.require_pk().map_err(|e| refuse(repair, e))?;
    }
    if action.op.uses_targets() && action.key_columns != meta.pk {
        return Err(refuse(
            repair,
            format!(
                "its rows are keyed by ({}) but the primary key of {} is ({})",
                action.key_columns.join(", "),
                meta.table,
                meta.pk.join(", ")
            ),
        ));
    }
    let mut bound = Bound {
        repair,
        meta,
        check: None,
        set: None,
        child: None,
        index: None,
        action: action.clone(),
    };
    match &action.op {
        Op::Quarantine { check } => {
            bound.check = Some(resolve(client, &bound.meta, check, ctx).await?);
        }
        Op::Update { set, check } => {
            bound.check = Some(resolve(client, &bound.meta, check, ctx).await?);
            bound.set = Some(assignments(&bound.meta, set, ctx)?);
        }
        Op::Replay {
            idempotency_keys,
            check,
        } => {
            if idempotency_keys.is_empty() {
                return Err(refuse(repair, "it names no journal entries"));
            }
            bound.check = Some(resolve(client, &bound.meta, check, ctx).await?);
        }
        Op::RestoreParent {
            child,
            columns,
            parent_columns,
            ..
        } => {
            Meta::check_scope(child, ctx.own_schema).map_err(|e| refuse(repair, e))?;
            let child_meta = load(client, child, repair).await?;
            let mut pairs = Vec::new();
            if columns.len() != parent_columns.len() || columns.len() != bound.meta.pk.len() {
                return Err(refuse(
                    repair,
                    "its foreign key does not name the parent's primary key",
                ));
            }
            for (c, p) in columns.iter().zip(parent_columns) {
                let c = col_name(&child_meta, c, repair)?;
                let pos = bound.meta.pk.iter().position(|k| k == p).ok_or_else(|| {
                    refuse(
                        repair,
                        format!("`{p}` is not in the primary key of {}", bound.meta.table),
                    )
                })?;
                pairs.push((c, pos));
            }
            bound.child = Some((child_meta, pairs));
        }
        Op::Reindex { index } => {
            let row = client
                .query_opt(
                    "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
                       FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                       JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE i.indrelid = $1 AND c.relname = $2",
                    &[&bound.meta.oid, index],
                )
                .await
                .context("looking up the index to rebuild")?
                .ok_or_else(|| {
                    refuse(
                        repair,
                        format!("{} has no index `{index}`", bound.meta.table),
                    )
                })?;
            bound.index = Some(row.get(0));
        }
        Op::Custom {
            strategy,
            predicate,
            set,
            mac,
        } => {
            let key = ctx.key.ok_or_else(|| {
                refuse(
                    repair,
                    format!("host strategy `{strategy}` stores SQL, and this engine has no action key to authenticate it"),
                )
            })?;
            let message = custom_message(repair, &action.table, strategy, predicate, set);
            if !key.verify(&message, mac) {
                return Err(refuse(
                    repair,
                    format!(
                        "the SQL of host strategy `{strategy}` does not match its keyed hash (it was altered, or signed with another key)"
                    ),
                ));
            }
            if let Some(set) = set {
                let mut parts = Vec::new();
                for (c, expr) in set {
                    let c = col_name(&bound.meta, c, repair)?;
                    parts.push(format!("{} = {expr}", quote_ident(&c)));
                }
                bound.set = Some(parts.join(", "));
            }
        }
        Op::Restore { .. } | Op::Reload { .. } => {}
    }
    Ok(bound)
}

async fn load(client: &impl GenericClient, table: &TableRef, repair: RepairId) -> Result<Meta> {
    match Meta::load(client, table).await {
        Err(Error::NotFound { .. }) => Err(refuse(repair, format!("table {table} does not exist"))),
        other => other,
    }
}

/// The catalog's name of column `name` of `meta`, or a refusal.
fn col_name(meta: &Meta, name: &str, repair: RepairId) -> Result<String> {
    meta.col(name)
        .map(|c| c.name.clone())
        .map_err(|e| refuse(repair, e))
}

fn rule<'a>(
    ctx: &'a BindContext<'_>,
    meta: &Meta,
    name: &str,
    column: &str,
) -> Result<&'a RecomputeRule> {
    let r = ctx.rules.get(name).ok_or_else(|| {
        refuse(
            ctx.repair,
            format!("recompute rule `{name}` is not in this engine's configuration"),
        )
    })?;
    if r.table != meta.table || r.column != column {
        return Err(refuse(
            ctx.repair,
            format!(
                "recompute rule `{name}` recomputes {}.{}, not {}.{column}",
                r.table, r.column, meta.table
            ),
        ));
    }
    Ok(r)
}

async fn resolve(
    client: &impl GenericClient,
    meta: &Meta,
    check: &Check,
    ctx: &BindContext<'_>,
) -> Result<Resolved> {
    let repair = ctx.repair;
    Ok(match check {
        Check::Orphan {
            columns,
            parent,
            parent_columns,
        } => {
            if columns.is_empty() || columns.len() != parent_columns.len() {
                return Err(refuse(
                    repair,
                    "its foreign key names no or unequal columns",
                ));
            }
            Meta::check_scope(parent, ctx.own_schema).map_err(|e| refuse(repair, e))?;
            let parent = load(client, parent, repair).await?;
            let mut cs = Vec::new();
            let mut ps = Vec::new();
            for (c, p) in columns.iter().zip(parent_columns) {
                let child_col = meta.col(c).map_err(|e| refuse(repair, e))?;
                let parent_col = parent.col(p).map_err(|e| refuse(repair, e))?;
                if child_col.type_name != parent_col.type_name {
                    return Err(refuse(
                        repair,
                        format!(
                            "{}.{} is {} but {}.{} is {}",
                            meta.table,
                            child_col.name,
                            child_col.type_name,
                            parent.table,
                            parent_col.name,
                            parent_col.type_name
                        ),
                    ));
                }
                cs.push(child_col.name.clone());
                ps.push(parent_col.name.clone());
            }
            Resolved::Orphan {
                columns: cs,
                parent,
                parent_columns: ps,
            }
        }
        Check::Null { column } => Resolved::Null(col_name(meta, column, repair)?),
        Check::Duplicate { columns } => {
            if columns.is_empty() {
                return Err(refuse(repair, "its unique check names no column"));
            }
            Resolved::Duplicate(
                columns
                    .iter()
                    .map(|c| col_name(meta, c, repair))
                    .collect::<Result<_>>()?,
            )
        }
        Check::Recompute { rule: name, column } => {
            let column = col_name(meta, column, repair)?;
            let r = rule(ctx, meta, name, &column)?;
            Resolved::Expr {
                column,
                expression: r.expression.clone(),
            }
        }
        Check::Constraint { name } => {
            let expr: Option<String> = client
                .query_opt(
                    "SELECT pg_get_expr(conbin, conrelid) FROM pg_constraint
                      WHERE conrelid = $1 AND conname = $2 AND contype = 'c'",
                    &[&meta.oid, name],
                )
                .await
                .context("reading a CHECK constraint")?
                .map(|r| r.get(0));
            Resolved::Constraint(expr.ok_or_else(|| {
                refuse(
                    repair,
                    format!("{} has no CHECK constraint `{name}`", meta.table),
                )
            })?)
        }
        Check::Unchanged => Resolved::Unchanged,
    })
}

fn assignments(meta: &Meta, set: &[Assign], ctx: &BindContext<'_>) -> Result<String> {
    if set.is_empty() {
        return Err(refuse(ctx.repair, "its update sets no column"));
    }
    let writable = meta.update_cols();
    let mut parts = Vec::new();
    for a in set {
        let (column, value) = match a {
            Assign::Null { column } => (column, "NULL".to_owned()),
            Assign::Default { column } => (column, "DEFAULT".to_owned()),
            Assign::Recompute { rule: name, column } => {
                let r = rule(ctx, meta, name, column)?;
                (column, format!("({})", r.expression))
            }
        };
        let name = col_name(meta, column, ctx.repair)?;
        if !writable.contains(&name) {
            return Err(refuse(
                ctx.repair,
                format!(
                    "column `{name}` of {} is generated and cannot be set",
                    meta.table
                ),
            ));
        }
        parts.push(format!("{} = {value}", quote_ident(&name)));
    }
    Ok(parts.join(", "))
}

impl Resolved {
    /// Whether the live row `t` (with its target row `g`) violates, as SQL. Never
    /// null.
    pub(crate) fn sql(&self, meta: &Meta, t: &str, g: &str) -> String {
        match self {
            Resolved::Orphan {
                columns,
                parent,
                parent_columns,
            } => {
                let not_null = columns
                    .iter()
                    .map(|c| format!("{t}.{} IS NOT NULL", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let join = columns
                    .iter()
                    .zip(parent_columns)
                    .map(|(c, p)| format!("sanare_p.{} = {t}.{}", quote_ident(p), quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                format!(
                    "({not_null} AND NOT EXISTS (SELECT 1 FROM {} sanare_p WHERE {join}))",
                    parent.quoted
                )
            }
            Resolved::Null(c) => format!("({t}.{} IS NULL)", quote_ident(c)),
            Resolved::Duplicate(columns) => {
                let same = columns
                    .iter()
                    .map(|c| format!("sanare_o.{0} = {t}.{0}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                format!(
                    "EXISTS (SELECT 1 FROM {} sanare_o WHERE {same} AND ({}) < ({}))",
                    meta.quoted,
                    Meta::list("sanare_o", &meta.pk),
                    Meta::list(t, &meta.pk)
                )
            }
            // Rule expressions are written over the row aliased `t`.
            Resolved::Expr { column, expression } => format!(
                "coalesce({t}.{} IS DISTINCT FROM ({expression}), false)",
                quote_ident(column)
            ),
            // A constraint's expression names columns unqualified: evaluate it over
            // the one row alone so that no other relation's columns are in scope.
            Resolved::Constraint(expression) => {
                format!("NOT coalesce((SELECT ({expression}) FROM (SELECT {t}.*) sanare_c), true)")
            }
            Resolved::Unchanged => format!(
                "(md5({}) IS NOT DISTINCT FROM {g}.digest)",
                Meta::row_text(t)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repair() -> RepairId {
        RepairId::from_uuid(uuid::Uuid::from_u128(
            0x0192_0000_0000_7000_8000_0000_0000_0001,
        ))
    }

    /// Golden vector of the stored action encoding (version 2): a change to the
    /// encoding breaks stored plans and must come with a migration.
    #[test]
    fn the_stored_action_encoding_is_stable_and_only_its_canonical_form_is_accepted() {
        let action = Action {
            version: ACTION_VERSION,
            table: TableRef::new("shop", "order_lines"),
            key_columns: vec!["order_id".into(), "line_no".into()],
            op: Op::Update {
                set: vec![Assign::Null {
                    column: "order_id".into(),
                }],
                check: Check::Orphan {
                    columns: vec!["order_id".into()],
                    parent: TableRef::new("shop", "orders"),
                    parent_columns: vec!["id".into()],
                },
            },
        };
        let golden = r#"{"key_columns":["order_id","line_no"],"op":{"check":{"check":"orphan","columns":["order_id"],"parent":{"name":"orders","schema":"shop"},"parent_columns":["id"]},"op":"update","set":[{"column":"order_id","set":"null"}]},"table":{"name":"order_lines","schema":"shop"},"version":2}"#;
        let value = serde_json::to_value(&action).unwrap();
        assert_eq!(value.to_string(), golden);
        let parsed = Stored::parse(repair(), &serde_json::from_str(golden).unwrap()).unwrap();
        assert!(matches!(parsed, Stored::Current(a) if *a == action));
        let mut extra = value.clone();
        extra["op"]["cond"] = "true".into();
        assert!(Stored::parse(repair(), &extra).is_err());
        let mut old = value;
        old["version"] = 1.into();
        assert!(Stored::parse(repair(), &old).is_err());
        assert!(matches!(
            Stored::parse(repair(), &serde_json::json!({"legacy": {"op": "delete"}})).unwrap(),
            Stored::Legacy
        ));
    }

    /// Golden vector of a host strategy's keyed hash.
    #[test]
    fn the_keyed_hash_of_a_host_strategy_is_stable() {
        let key = ActionKey::from_bytes([7; 32]);
        let set = Some(vec![("quantity".to_owned(), "t.quantity + 1".to_owned())]);
        let message = custom_message(
            repair(),
            &TableRef::new("shop", "order_lines"),
            "fix",
            "t.quantity < 0",
            &set,
        );
        assert_eq!(
            String::from_utf8(message.clone()).unwrap(),
            r#"["sanare-repair-custom-v1","01920000-0000-7000-8000-000000000001",{"name":"order_lines","schema":"shop"},"fix","t.quantity < 0",[["quantity","t.quantity + 1"]]]"#
        );
        assert_eq!(
            key.sign(&message),
            "29fd29f13bbb1473fa49c4abccd7c300f88523c7dbf8078bb3570f5ee16895b0"
        );
    }
}
