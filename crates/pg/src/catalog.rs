//! Introspection of host tables from `pg_catalog`: columns, primary keys, foreign keys
//! and a foreign-key order for loading.

use std::collections::{BTreeMap, BTreeSet};

use sanare_core::{Result, TableRef};
use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

use crate::PgResultExt;

/// One column of a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// Its type as `format_type()` prints it.
    pub type_name: String,
    /// Its type's oid.
    pub type_oid: u32,
    /// Whether it is NOT NULL.
    pub not_null: bool,
    /// Its default expression, if any.
    pub default: Option<String>,
    /// Whether it is generated (stored generated or identity `ALWAYS`).
    pub generated: bool,
}

/// A foreign key (or a relationship declared by the host with the same shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForeignKey {
    /// The constraint name.
    pub name: String,
    /// The referencing table.
    pub table: TableRef,
    /// The referencing columns.
    pub columns: Vec<String>,
    /// The referenced table.
    pub parent: TableRef,
    /// The referenced columns.
    pub parent_columns: Vec<String>,
    /// Whether the constraint is validated (false for `NOT VALID`).
    pub validated: bool,
    /// The planner's row estimate of the referenced table (0 when never analysed).
    pub parent_estimated_rows: i64,
}

/// What sanare knows of a table's shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableInfo {
    /// The table.
    pub table: TableRef,
    /// Its oid.
    pub oid: u32,
    /// Its columns, in order (dropped columns omitted).
    pub columns: Vec<Column>,
    /// Its primary-key columns, in key order (empty when it has none).
    pub primary_key: Vec<String>,
    /// Its foreign keys.
    pub foreign_keys: Vec<ForeignKey>,
    /// The planner's row estimate.
    pub estimated_rows: i64,
}

impl TableInfo {
    /// The column named `name`.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// The ordinary and partitioned tables of `schemas` (every non-system schema when
/// empty), never those of `exclude_schema` (sanare's own).
pub async fn list_tables(
    client: &impl GenericClient,
    schemas: &[String],
    exclude_schema: &str,
) -> Result<Vec<TableRef>> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                AND n.nspname <> $2
                AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                AND n.nspname NOT LIKE 'pg\\_%'
                AND (cardinality($1::text[]) = 0 OR n.nspname = ANY($1))
              ORDER BY 1, 2",
            &[&schemas, &exclude_schema],
        )
        .await
        .context("listing tables")?;
    Ok(rows
        .iter()
        .map(|r| TableRef::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// The shape of `table`.
pub async fn describe(client: &impl GenericClient, table: &TableRef) -> Result<TableInfo> {
    let ctx = || format!("reading the catalog entry of {table}");
    let row = client
        .query_opt(
            "SELECT c.oid, c.reltuples::bigint
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .with_context(ctx)?
        .ok_or_else(|| sanare_core::Error::not_found(format!("table {table}")))?;
    let oid: u32 = row.get(0);
    let estimated_rows: i64 = row.get(1);
    let columns = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid,
                    a.attnotnull, pg_get_expr(d.adbin, d.adrelid),
                    (a.attgenerated <> '' OR a.attidentity = 'a')
               FROM pg_attribute a
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .with_context(ctx)?
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_name: r.get(1),
            type_oid: r.get(2),
            not_null: r.get(3),
            default: r.get(4),
            generated: r.get(5),
        })
        .collect();
    let primary_key = client
        .query(
            "SELECT a.attname::text
               FROM pg_index i
               CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = $1 AND i.indisprimary
              ORDER BY k.ord",
            &[&oid],
        )
        .await
        .with_context(ctx)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let foreign_keys = foreign_keys_where(client, "con.conrelid = $1", &oid).await?;
    Ok(TableInfo {
        table: table.clone(),
        oid,
        columns,
        primary_key,
        foreign_keys,
        estimated_rows,
    })
}

/// Foreign keys whose parent is `table` (the children that reference it).
pub async fn referencing(client: &impl GenericClient, table: &TableRef) -> Result<Vec<ForeignKey>> {
    let info = describe(client, table).await?;
    foreign_keys_where(client, "con.confrelid = $1", &info.oid).await
}

async fn foreign_keys_where(
    client: &impl GenericClient,
    predicate: &str,
    oid: &u32,
) -> Result<Vec<ForeignKey>> {
    let sql = format!(
        "SELECT con.conname::text,
                cn.nspname::text, cc.relname::text,
                pn.nspname::text, pc.relname::text,
                ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
                        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
                       ORDER BY k.o),
                ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, o)
                        JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n
                       ORDER BY k.o),
                con.convalidated, greatest(pc.reltuples, 0)::bigint
           FROM pg_constraint con
           JOIN pg_class cc ON cc.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
           JOIN pg_class pc ON pc.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
          WHERE con.contype = 'f' AND {predicate}
          ORDER BY con.conname"
    );
    let rows = client
        .query(&sql, &[oid])
        .await
        .context("reading foreign keys")?;
    Ok(rows
        .iter()
        .map(|r| ForeignKey {
            name: r.get(0),
            table: TableRef::new(r.get::<_, String>(1), r.get::<_, String>(2)),
            parent: TableRef::new(r.get::<_, String>(3), r.get::<_, String>(4)),
            columns: r.get(5),
            parent_columns: r.get(6),
            validated: r.get(7),
            parent_estimated_rows: r.get(8),
        })
        .collect())
}

/// Orders `tables` so that every parent comes before its children (foreign keys
/// among `tables` only; self-references and cycles are tolerated: members of a
/// cycle keep their input order). Load in this order; delete in reverse.
pub fn fk_order(tables: &[TableInfo]) -> Vec<TableRef> {
    let names: BTreeSet<&TableRef> = tables.iter().map(|t| &t.table).collect();
    let mut parents: BTreeMap<&TableRef, BTreeSet<&TableRef>> = BTreeMap::new();
    for t in tables {
        let entry = parents.entry(&t.table).or_default();
        for fk in &t.foreign_keys {
            if fk.parent != t.table && names.contains(&fk.parent) {
                entry.insert(&fk.parent);
            }
        }
    }
    let mut done: BTreeSet<&TableRef> = BTreeSet::new();
    let mut order = Vec::with_capacity(tables.len());
    while order.len() < tables.len() {
        let before = order.len();
        for t in tables {
            if !done.contains(&t.table) && parents[&t.table].iter().all(|p| done.contains(p)) {
                done.insert(&t.table);
                order.push(t.table.clone());
            }
        }
        if order.len() == before {
            // A cycle: take the first remaining table and carry on.
            if let Some(t) = tables.iter().find(|t| !done.contains(&t.table)) {
                done.insert(&t.table);
                order.push(t.table.clone());
            }
        }
    }
    order
}

/// How a column's canonical text form (its `::text`) is read from a text `COPY`.
///
/// Row checksums hash each value's `::text`; a text `COPY` prints each value with the
/// type's output function. The two differ only for some types, so readers cast in
/// SQL only where they must.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextForm {
    /// The type's output is its `::text` (I/O or binary-coercible cast, or none):
    /// read as is, no work for the server.
    Raw,
    /// `character(n)`: `::text` is the output without its trailing blanks, trimmed by
    /// the reader (the SQL cast costs the server more than the rest of the row).
    TrimBlanks,
    /// A cast function prints differently from the output (`boolean` gives `true`,
    /// not `t`; `inet` adds the mask length; domains, to be safe): cast in SQL.
    Cast,
}

/// The [`TextForm`] of every column of table `oid`, by column name, from `pg_cast`.
pub async fn text_forms(
    client: &impl GenericClient,
    oid: u32,
) -> Result<std::collections::HashMap<String, TextForm>> {
    let rows = client
        .query(
            "SELECT a.attname::text, ty.typtype::text, a.atttypid = 'bpchar'::regtype,
                    (SELECT c.castmethod::text FROM pg_cast c
                      WHERE c.castsource = a.atttypid AND c.casttarget = 'text'::regtype)
               FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid],
        )
        .await
        .context("reading how columns print as text")?;
    Ok(rows
        .iter()
        .map(|r| {
            let typtype: String = r.get(1);
            let bpchar: bool = r.get(2);
            let method: Option<String> = r.get(3);
            let form = if bpchar {
                TextForm::TrimBlanks
            } else if typtype == "d" || method.as_deref() == Some("f") {
                TextForm::Cast
            } else {
                TextForm::Raw
            };
            (r.get::<_, String>(0), form)
        })
        .collect())
}
