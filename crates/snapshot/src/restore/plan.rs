//! How a restore into the live tables loads each table, and what it sets aside
//! around the load and puts back before it commits, read from the live catalog
//! inside the restore's transaction.
//!
//! Each restored relation is loaded one of two ways:
//! - **Replace**: emptied with `TRUNCATE` and loaded with binary `COPY` (with
//!   `FREEZE` when it is a plain table, so its pages are written all-visible). A plain
//!   table that is not a partition has its primary/unique/exclusion keys and
//!   secondary indexes dropped for the load and rebuilt after it, each in one pass.
//! - **In place**: when `TRUNCATE` would be wrong or refused: a table outside the
//!   restore references it (`TRUNCATE` is refused, and the references must stay
//!   valid), or it (or one of its partitions) has an invalid index (`TRUNCATE`
//!   rebuilds every index and would make a non-unique invalid index valid). The
//!   rows go to a temporary table first; rows whose key is gone from the snapshot
//!   are deleted, the others inserted or updated by key ([`crate::restore::merge`]),
//!   so unchanged rows are not written and the indexes keep their state. Without a
//!   usable key (a primary key or a NOT NULL unique index), every row is deleted and
//!   the snapshot's rows loaded.
//!
//! Around the load, in the same transaction:
//! - the relations' own triggers are disabled (unless the request fires them) and
//!   re-enabled in the state each was in (`ENABLE`, `ENABLE REPLICA`,
//!   `ENABLE ALWAYS`);
//! - every foreign key from or to a restored relation, except those of tables
//!   outside the restore, is dropped and re-added, which makes PostgreSQL check it
//!   over every row (`NOT VALID` keys are re-added `NOT VALID`: not checked);
//! - `NOT VALID` check constraints of the relations (and of the domains of their
//!   columns) are dropped and re-added `NOT VALID`: PostgreSQL checks them for every
//!   inserted row, and the snapshot may hold rows from before they were added;
//! - the comments, tablespaces, replica identities, cluster marks and statistics
//!   targets of what is dropped are put back with it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sanare_core::{Error, Result, TableRef};
use sanare_pg::{PgResultExt, quote_literal};
use tokio_postgres::Transaction;

use super::keys::{ForeignKey, foreign_keys};

/// How one restored relation is loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    /// `TRUNCATE`, then `COPY` (`FREEZE` when `freeze`).
    Replace {
        /// Whether the relation is a plain table (so `COPY … FREEZE` applies).
        freeze: bool,
    },
    /// Rows into a temporary table, then delete what is gone and upsert the rest
    /// by `key` (see [`crate::restore::merge`]).
    Merge {
        /// The key's columns.
        key: Vec<String>,
        /// Keys of tables outside the restore that reference this relation.
        outside: Vec<ForeignKey>,
    },
    /// Delete every row, then `COPY`.
    Reload,
}

/// A restored relation as the live catalog has it.
#[derive(Clone, Debug)]
pub(crate) struct Relation {
    /// Its oid.
    pub(crate) oid: u32,
    /// Its name as `regclass` prints it (quoted, schema-qualified off the search path).
    pub(crate) name: String,
    /// Whether it is a plain table (`relkind` `r`), else partitioned (`p`).
    pub(crate) plain: bool,
    /// How it is loaded.
    pub(crate) method: Method,
}

impl Relation {
    /// `ONLY ` for a plain table (its inheritance children are not part of it), the
    /// empty string for a partitioned table (its partitions are).
    pub(crate) fn only(&self) -> &'static str {
        if self.plain { "ONLY " } else { "" }
    }
}

/// A statement of the restore around the load, with what it does in words (for
/// errors) and the relation it touches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    /// What it does (`rebuilding index shop.orders_pkey`).
    pub(crate) what: String,
    /// The relation, for errors.
    pub(crate) table: String,
    /// The SQL.
    pub(crate) sql: String,
}

impl Step {
    fn new(what: impl Into<String>, table: impl Into<String>, sql: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            table: table.into(),
            sql: sql.into(),
        }
    }
}

/// What a restore into the live tables does, in order: `before` (triggers off,
/// keys, checks and indexes dropped), the `TRUNCATE` of the replaced relations,
/// the loads, then `after` (everything put back, foreign keys checked).
#[derive(Clone, Debug, Default)]
pub(crate) struct Plan {
    /// The restored relations, in the order of the tables asked for.
    pub(crate) relations: Vec<Relation>,
    /// Statements before the load.
    pub(crate) before: Vec<Step>,
    /// The `TRUNCATE` of the replaced relations (empty when none).
    pub(crate) truncate: Option<String>,
    /// Statements after the load.
    pub(crate) after: Vec<Step>,
    /// What the restore does beyond loading rows, in words.
    pub(crate) notes: Vec<String>,
}

/// Reads the live catalog for `tables` (the snapshot's tables, in the order they
/// are loaded, each with its captured columns) and plans their restore.
pub(crate) async fn plan(
    tx: &Transaction<'_>,
    tables: &[(TableRef, Vec<String>)],
    fire_triggers: bool,
) -> Result<Plan> {
    let found = resolve(tx, tables).await?;
    let roots: Vec<u32> = found.iter().map(|f| f.oid).collect();
    let tree = tree(tx, &roots).await?;
    let tree_oids: Vec<u32> = tree.keys().copied().collect();
    let invalid = invalid_indexes(tx, &tree).await?;
    // Which keys are outside the restore decides which relations are in place,
    // which decides which are frozen: read the keys once, decide, then ask which
    // keys may be merge-checked.
    let (keys, _) = foreign_keys(tx, &tree_oids, &[]).await?;
    let mut outside: HashMap<u32, Vec<ForeignKey>> = HashMap::new();
    for k in keys.iter().filter(|k| !k.inside) {
        if let Some(root) = tree.get(&k.parent) {
            outside.entry(*root).or_default().push(k.clone());
        }
    }
    let mut out = Plan::default();
    for (f, (table, columns)) in found.iter().zip(tables) {
        let mut why = Vec::new();
        if let Some(keys) = outside.get(&f.oid) {
            let by: BTreeSet<String> = keys
                .iter()
                .map(|k| format!("{} ({})", k.table, k.name))
                .collect();
            why.push(format!(
                "tables outside the restore reference it: {}",
                by.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        if let Some(idx) = invalid.get(&f.oid) {
            why.push(format!(
                "it has invalid indexes, left as they are: {}",
                idx.join(", ")
            ));
        }
        let method = if why.is_empty() {
            Method::Replace { freeze: f.plain }
        } else {
            let key = merge_key(tx, f.oid)
                .await?
                .filter(|k| k.iter().all(|c| columns.contains(c)));
            let outside = outside.remove(&f.oid).unwrap_or_default();
            match key {
                Some(key) => {
                    out.notes.push(format!(
                        "{table} restored in place by its key ({}): {}",
                        key.join(", "),
                        why.join("; ")
                    ));
                    Method::Merge { key, outside }
                }
                None if outside.is_empty() => {
                    out.notes.push(format!(
                        "{table} restored in place (every row deleted, then loaded): {}",
                        why.join("; ")
                    ));
                    Method::Reload
                }
                None => {
                    return Err(Error::conflict(format!(
                        "{table} cannot be restored alone: {}, and it has no primary key or \
                         NOT NULL unique index to restore it by, key by key; restore those \
                         tables with it",
                        why.join("; ")
                    )));
                }
            }
        };
        out.relations.push(Relation {
            oid: f.oid,
            name: f.name.clone(),
            plain: f.plain,
            method,
        });
    }
    // Plain replaced tables are loaded with FREEZE; their keys may be merge-checked.
    let frozen: Vec<u32> = out
        .relations
        .iter()
        .filter(|r| r.method == Method::Replace { freeze: true })
        .map(|r| r.oid)
        .collect();
    let (keys, hashjoin) = foreign_keys(tx, &tree_oids, &frozen).await?;
    let keys: Vec<ForeignKey> = keys.into_iter().filter(|k| k.inside).collect();
    if !fire_triggers {
        triggers(tx, &tree_oids, &mut out).await?;
    }
    for k in &keys {
        out.before.push(Step::new(
            format!("dropping foreign key {} of {}", k.name, k.table),
            &k.table,
            k.drop_sql(),
        ));
    }
    not_valid_checks(tx, &tree_oids, &mut out).await?;
    // Keys and indexes of plain, unpartitioned replaced tables are rebuilt in one
    // pass each after the load; partitions' follow their parent's, so stay.
    let defer: Vec<u32> = frozen
        .iter()
        .copied()
        .filter(|oid| found.iter().any(|f| f.oid == *oid && !f.partition))
        .collect();
    super::indexes::defer(tx, &defer, &mut out).await?;
    for k in &keys {
        out.after.push(Step::new(
            format!("checking foreign key {} of {}", k.name, k.table),
            &k.table,
            k.rebuild_sql(&hashjoin),
        ));
    }
    // Triggers back on last.
    let (enable, rest): (Vec<Step>, Vec<Step>) = std::mem::take(&mut out.after)
        .into_iter()
        .partition(|s| s.what.starts_with("enabling trigger"));
    out.after = rest;
    out.after.extend(enable);
    let replaced: Vec<String> = out
        .relations
        .iter()
        .filter(|r| matches!(r.method, Method::Replace { .. }))
        .map(|r| format!("{}{}", r.only(), r.name))
        .collect();
    if !replaced.is_empty() {
        out.truncate = Some(format!("TRUNCATE {}", replaced.join(", ")));
    }
    Ok(out)
}

struct Found {
    oid: u32,
    name: String,
    plain: bool,
    partition: bool,
}

/// The live relation of each table, in order; an error names a missing one.
async fn resolve(tx: &Transaction<'_>, tables: &[(TableRef, Vec<String>)]) -> Result<Vec<Found>> {
    let schemas: Vec<&str> = tables.iter().map(|(t, _)| t.schema.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|(t, _)| t.name.as_str()).collect();
    let rows = tx
        .query(
            "SELECT c.oid, c.relkind = 'r', c.relispartition, c.oid::regclass::text
               FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(s, n, ord)
               LEFT JOIN pg_namespace ns ON ns.nspname = t.s
               LEFT JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = t.n
                                   AND c.relkind IN ('r', 'p')
              ORDER BY t.ord",
            &[&schemas, &names],
        )
        .await
        .context("looking up the restored tables")?;
    let mut out = Vec::with_capacity(rows.len());
    for (r, (table, _)) in rows.iter().zip(tables) {
        let Some(oid) = r.get::<_, Option<u32>>(0) else {
            return Err(Error::not_found(format!(
                "table {table} in the live database (restore it into a scratch schema with \
                 `--into`, or create it first)"
            )));
        };
        out.push(Found {
            oid,
            plain: r.get(1),
            partition: r.get(2),
            name: r.get(3),
        });
    }
    Ok(out)
}

/// Every restored relation and, for partitioned ones, every partition below it,
/// each with the restored relation it belongs to. Refuses two restored relations
/// of which one is a partition of the other (their rows would be loaded twice).
async fn tree(tx: &Transaction<'_>, roots: &[u32]) -> Result<BTreeMap<u32, u32>> {
    let rows = tx
        .query(
            "WITH RECURSIVE tree(oid, root) AS (
                 SELECT r, r FROM unnest($1::oid[]) r
               UNION ALL
                 SELECT i.inhrelid, t.root FROM tree t
                   JOIN pg_inherits i ON i.inhparent = t.oid
                   JOIN pg_class c ON c.oid = i.inhrelid AND c.relispartition)
             SELECT oid, root, oid::regclass::text, root::regclass::text FROM tree",
            &[&roots],
        )
        .await
        .context("reading the partitions of the restored tables")?;
    let mut out = BTreeMap::new();
    for r in &rows {
        let (oid, root): (u32, u32) = (r.get(0), r.get(1));
        if let Some(prev) = out.insert(oid, root)
            && prev != root
        {
            return Err(Error::invalid_input(format!(
                "{} is a partition of {}, and both are restored: restore one of them",
                r.get::<_, String>(2),
                r.get::<_, String>(3)
            )));
        }
    }
    Ok(out)
}

/// The invalid indexes of each restored relation (its partitions' included).
async fn invalid_indexes(
    tx: &Transaction<'_>,
    tree: &BTreeMap<u32, u32>,
) -> Result<HashMap<u32, Vec<String>>> {
    let oids: Vec<u32> = tree.keys().copied().collect();
    let rows = tx
        .query(
            "SELECT i.indrelid, i.indexrelid::regclass::text FROM pg_index i
              WHERE i.indrelid = ANY($1::oid[])
                AND NOT (i.indisvalid AND i.indisready AND i.indislive)
              ORDER BY 2",
            &[&oids],
        )
        .await
        .context("looking for invalid indexes on the restored tables")?;
    let mut by_rel: HashMap<u32, Vec<String>> = HashMap::new();
    for r in &rows {
        if let Some(root) = tree.get(&r.get::<_, u32>(0)) {
            by_rel.entry(*root).or_default().push(r.get(1));
        }
    }
    Ok(by_rel)
}

/// The key a relation is restored in place by: its primary key, else the
/// narrowest valid, immediate, non-partial unique index on plain NOT NULL columns.
async fn merge_key(tx: &Transaction<'_>, oid: u32) -> Result<Option<Vec<String>>> {
    let row = tx
        .query_opt(
            "SELECT ARRAY(SELECT a.attname::text
                            FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o)
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                           WHERE k.o <= i.indnkeyatts ORDER BY k.o)
               FROM pg_index i
              WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indimmediate
                AND i.indpred IS NULL AND i.indexprs IS NULL
                AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o)
                                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                                 WHERE k.o <= i.indnkeyatts AND NOT a.attnotnull)
              ORDER BY i.indisprimary DESC, i.indnkeyatts, i.indexrelid
              LIMIT 1",
            &[&oid],
        )
        .await
        .context("reading the keys of a table restored in place")?;
    Ok(row.map(|r| r.get(0)))
}

/// Disables the enabled user triggers of `tree` before the load and re-enables
/// each as it was after it.
async fn triggers(tx: &Transaction<'_>, tree: &[u32], plan: &mut Plan) -> Result<()> {
    let rows = tx
        .query(
            "SELECT t.tgrelid::regclass::text, quote_ident(t.tgname), t.tgenabled::text
               FROM pg_trigger t
              WHERE t.tgrelid = ANY($1::oid[]) AND NOT t.tgisinternal AND t.tgenabled <> 'D'
              ORDER BY t.tgrelid, t.tgname",
            &[&tree],
        )
        .await
        .context("reading the triggers of the restored tables")?;
    for r in &rows {
        let (table, name, state): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let enable = match state.as_str() {
            "R" => "ENABLE REPLICA",
            "A" => "ENABLE ALWAYS",
            _ => "ENABLE",
        };
        plan.before.push(Step::new(
            format!("disabling trigger {name} of {table}"),
            &table,
            format!("ALTER TABLE ONLY {table} DISABLE TRIGGER {name}"),
        ));
        plan.after.push(Step::new(
            format!("enabling trigger {name} of {table}"),
            &table,
            format!("ALTER TABLE ONLY {table} {enable} TRIGGER {name}"),
        ));
    }
    Ok(())
}

/// Drops the `NOT VALID` check constraints that apply to rows of `tree` (where
/// they are defined: an inherited one on the ancestor that declares it) and those
/// of the domains of its columns, to re-add them `NOT VALID` after the load.
async fn not_valid_checks(tx: &Transaction<'_>, tree: &[u32], plan: &mut Plan) -> Result<()> {
    let rows = tx
        .query(
            "WITH RECURSIVE up(rel, name, inh) AS (
                 SELECT c.conrelid, c.conname, c.coninhcount FROM pg_constraint c
                  WHERE c.contype = 'c' AND NOT c.convalidated AND c.conrelid = ANY($1::oid[])
               UNION
                 SELECT p.conrelid, p.conname, p.coninhcount FROM up
                   JOIN pg_inherits i ON i.inhrelid = up.rel
                   JOIN pg_constraint p ON p.conrelid = i.inhparent AND p.conname = up.name
                                       AND p.contype = 'c'
                  WHERE up.inh > 0)
             SELECT c.conrelid::regclass::text, quote_ident(c.conname),
                    pg_get_constraintdef(c.oid), obj_description(c.oid, 'pg_constraint')
               FROM pg_constraint c
              WHERE c.contype = 'c' AND c.coninhcount = 0
                AND (c.conrelid, c.conname) IN (SELECT rel, name FROM up)
              ORDER BY c.oid",
            &[&tree],
        )
        .await
        .context("reading the NOT VALID check constraints of the restored tables")?;
    for r in &rows {
        let (table, name, def, comment): (String, String, String, Option<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        plan.before.push(Step::new(
            format!("setting aside NOT VALID check {name} of {table}"),
            &table,
            format!("ALTER TABLE {table} DROP CONSTRAINT {name}"),
        ));
        plan.after.push(Step::new(
            format!("re-adding NOT VALID check {name} of {table}"),
            &table,
            format!(
                "ALTER TABLE {table} ADD CONSTRAINT {name} {def}{}",
                comment_sql("CONSTRAINT", &format!("{name} ON {table}"), comment)
            ),
        ));
    }
    // Domains (and the domains they are based on) of the restored columns.
    let rows = tx
        .query(
            "WITH RECURSIVE doms(typ) AS (
                 SELECT DISTINCT a.atttypid FROM pg_attribute a
                  WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
               UNION
                 SELECT t.typbasetype FROM doms JOIN pg_type t ON t.oid = doms.typ
                  WHERE t.typtype = 'd')
             SELECT c.contypid::regtype::text, quote_ident(c.conname),
                    pg_get_constraintdef(c.oid), obj_description(c.oid, 'pg_constraint')
               FROM pg_constraint c
              WHERE c.contypid IN (SELECT typ FROM doms) AND c.contype = 'c' AND NOT c.convalidated
              ORDER BY c.oid",
            &[&tree],
        )
        .await
        .context("reading the NOT VALID constraints of the restored columns' domains")?;
    for r in &rows {
        let (domain, name, def, comment): (String, String, String, Option<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        plan.before.push(Step::new(
            format!("setting aside NOT VALID check {name} of domain {domain}"),
            &domain,
            format!("ALTER DOMAIN {domain} DROP CONSTRAINT {name}"),
        ));
        plan.after.push(Step::new(
            format!("re-adding NOT VALID check {name} of domain {domain}"),
            &domain,
            format!(
                "ALTER DOMAIN {domain} ADD CONSTRAINT {name} {def}{}",
                comment_sql("CONSTRAINT", &format!("{name} ON DOMAIN {domain}"), comment)
            ),
        ));
    }
    Ok(())
}

/// `; COMMENT ON {kind} {what} IS '…'` when there is a comment, else nothing.
pub(crate) fn comment_sql(kind: &str, what: &str, comment: Option<String>) -> String {
    comment
        .map(|c| format!("; COMMENT ON {kind} {what} IS {}", quote_literal(&c)))
        .unwrap_or_default()
}
