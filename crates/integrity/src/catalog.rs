//! What validation reads from `pg_catalog`: which relations a scope covers
//! (partitions expanded, inheritance children as tables of their own), and each
//! relation's constraints as the catalog stores them.
//!
//! Constraint semantics come from the catalog's parsed forms, never from editing a
//! constraint's definition text: a CHECK's expression is `pg_get_expr(conbin)` (so
//! `NOT VALID`, `NO INHERIT` and whatever else `pg_get_constraintdef` prints around it
//! never reach a query), lengths and precisions come from `atttypmod`, a unique
//! index's columns and expressions from `pg_get_indexdef(index, column)`, its
//! predicate from `pg_get_expr(indpred)`. Every reader runs under the same session
//! settings as the probes (see `session_setup`), so a constant deparsed here parses
//! back to the same value there.

use sanare_core::{Error, Result, TableRef};
use sanare_pg::PgResultExt;
use tokio_postgres::GenericClient;

/// What kind of relation a table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RelKind {
    /// An ordinary table (a leaf partition, an inheritance parent or child, or a
    /// plain table): it holds rows and is read with `FROM ONLY`.
    Table,
    /// A partitioned table: it holds no rows; its leaves are checked as tables.
    Partitioned,
}

/// A relation in a validation's scope.
#[derive(Clone, Debug)]
pub(crate) struct Relation {
    pub(crate) table: TableRef,
    pub(crate) kind: RelKind,
    /// `pg_class.reltuples` (-1 when never analysed).
    pub(crate) reltuples: f64,
    /// `pg_class.relpages` (0 when never analysed or vacuumed).
    pub(crate) relpages: i64,
    /// The partitioned tables this one is a partition of, nearest first.
    pub(crate) ancestors: Vec<TableRef>,
}

const RELATION_COLUMNS: &str = "n.nspname::text, c.relname::text, c.oid, c.relkind::text, \
     c.reltuples::float8, c.relpages::bigint, \
     ARRAY(SELECT an.nspname::text FROM pg_partition_ancestors(c.oid) WITH ORDINALITY a(relid, o)
             JOIN pg_class ac ON ac.oid = a.relid JOIN pg_namespace an ON an.oid = ac.relnamespace
            WHERE a.relid <> c.oid ORDER BY a.o), \
     ARRAY(SELECT ac.relname::text FROM pg_partition_ancestors(c.oid) WITH ORDINALITY a(relid, o)
             JOIN pg_class ac ON ac.oid = a.relid
            WHERE a.relid <> c.oid ORDER BY a.o)";

fn relation(r: &tokio_postgres::Row) -> Relation {
    let kind: String = r.get(3);
    let schemas: Vec<String> = r.get(6);
    let names: Vec<String> = r.get(7);
    Relation {
        table: TableRef::new(r.get::<_, String>(0), r.get::<_, String>(1)),
        kind: if kind == "p" {
            RelKind::Partitioned
        } else {
            RelKind::Table
        },
        reltuples: r.get(4),
        relpages: r.get(5),
        ancestors: schemas
            .into_iter()
            .zip(names)
            .map(|(s, n)| TableRef::new(s, n))
            .collect(),
    }
}

/// The tables and partitioned tables of `schemas` (every host schema when empty),
/// partitions included, never those of `exclude_schema` (sanare's own).
pub(crate) async fn relations_of_schemas(
    client: &impl GenericClient,
    schemas: &[String],
    exclude_schema: &str,
) -> Result<Vec<Relation>> {
    let rows = client
        .query(
            &format!(
                "SELECT {RELATION_COLUMNS}
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p')
                    AND n.nspname <> $2
                    AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                    AND n.nspname NOT LIKE 'pg\\_%'
                    AND (cardinality($1::text[]) = 0 OR n.nspname = ANY($1))
                  ORDER BY 1, 2"
            ),
            &[&schemas, &exclude_schema],
        )
        .await
        .context("listing the tables to validate")?;
    Ok(rows.iter().map(relation).collect())
}

/// `table` and, when it is partitioned, every partition below it (ordinary tables
/// only: foreign partitions are not read).
pub(crate) async fn relation_tree(
    client: &impl GenericClient,
    table: &TableRef,
) -> Result<Vec<Relation>> {
    let rows = client
        .query(
            &format!(
                "SELECT {RELATION_COLUMNS}
                   FROM pg_class top JOIN pg_namespace tn ON tn.oid = top.relnamespace
                   CROSS JOIN LATERAL (SELECT top.oid AS relid
                                       UNION ALL
                                       SELECT t.relid FROM pg_partition_tree(top.oid) t
                                        WHERE t.relid <> top.oid) tree
                   JOIN pg_class c ON c.oid = tree.relid AND c.relkind IN ('r', 'p')
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE tn.nspname = $1 AND top.relname = $2 AND top.relkind IN ('r', 'p')
                  ORDER BY 1, 2"
            ),
            &[&table.schema, &table.name],
        )
        .await
        .with_context(|| format!("reading the catalog entry of {table}"))?;
    if rows.is_empty() {
        return Err(Error::not_found(format!(
            "table {table} (no table or partitioned table of that name)"
        )));
    }
    Ok(rows.iter().map(relation).collect())
}

/// A column's declared length or precision, from `atttypmod`.
#[derive(Clone, Debug)]
pub(crate) struct ColumnLimits {
    pub(crate) column: String,
    pub(crate) type_name: String,
    /// `character varying(n)` / `character(n)`: n.
    pub(crate) length: Option<i32>,
    /// `numeric(p, s)`: (p, s); s may be negative or above p (PostgreSQL 15).
    pub(crate) numeric: Option<(i32, i32)>,
}

/// Length and precision limits of the columns of `oid`.
pub(crate) async fn column_limits(
    client: &impl GenericClient,
    oid: u32,
    table: &TableRef,
) -> Result<Vec<ColumnLimits>> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypmod,
                    a.atttypid IN ('varchar'::regtype, 'bpchar'::regtype),
                    a.atttypid = 'numeric'::regtype
               FROM pg_attribute a
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypmod >= 4
              ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .with_context(|| format!("reading column lengths and precisions of {table}"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let typmod: i32 = r.get(2);
            let m = typmod - 4;
            ColumnLimits {
                column: r.get(0),
                type_name: r.get(1),
                length: r.get::<_, bool>(3).then_some(m),
                numeric: r.get::<_, bool>(4).then(|| numeric_typmod(m)),
            }
        })
        .collect())
}

/// `(precision, scale)` of a numeric typmod (minus the 4-byte header): precision in
/// the high 16 bits, scale in the low 11 bits, sign-extended (PostgreSQL 15 allows a
/// negative scale).
fn numeric_typmod(m: i32) -> (i32, i32) {
    let precision = (m >> 16) & 0xffff;
    let scale = ((m & 0x7ff) ^ 0x400) - 0x400;
    (precision, scale)
}

/// A CHECK constraint of a table, as the catalog holds it.
#[derive(Clone, Debug)]
pub(crate) struct CheckConstraint {
    pub(crate) name: String,
    /// `pg_get_expr(conbin, conrelid)`: the expression alone.
    pub(crate) expression: String,
    pub(crate) columns: Vec<String>,
}

/// The CHECK constraints of `oid` (valid or `NOT VALID`, inherited or local,
/// `NO INHERIT` or not: each applies to the rows of `oid` itself).
pub(crate) async fn check_constraints(
    client: &impl GenericClient,
    oid: u32,
    table: &TableRef,
) -> Result<Vec<CheckConstraint>> {
    let rows = client
        .query(
            "SELECT con.conname::text, pg_get_expr(con.conbin, con.conrelid),
                    ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
                           JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
                          ORDER BY k.o)
               FROM pg_constraint con
              WHERE con.conrelid = $1 AND con.contype = 'c' AND con.conbin IS NOT NULL
              ORDER BY con.conname",
            &[&oid],
        )
        .await
        .with_context(|| format!("reading CHECK constraints of {table}"))?;
    Ok(rows
        .iter()
        .map(|r| CheckConstraint {
            name: r.get(0),
            expression: r.get(1),
            columns: r.get(2),
        })
        .collect())
}

/// A constraint of a domain that a column's type is (or is built on).
#[derive(Clone, Debug)]
pub(crate) struct DomainConstraint {
    pub(crate) column: String,
    /// The column's type.
    pub(crate) type_name: String,
    /// The domain the constraint belongs to.
    pub(crate) domain: String,
    /// `pg_get_expr(conbin, 0)`, which prints the domain's value as `VALUE`; `None`
    /// for the domain's NOT NULL.
    pub(crate) expression: Option<String>,
    pub(crate) name: String,
}

/// The CHECK constraints (valid or `NOT VALID`) and NOT NULLs of every domain the
/// columns of `oid` are typed with, domains over domains included.
pub(crate) async fn domain_constraints(
    client: &impl GenericClient,
    oid: u32,
    table: &TableRef,
) -> Result<Vec<DomainConstraint>> {
    let rows = client
        .query(
            "WITH RECURSIVE chain(attnum, attname, coltype, domain) AS (
                 SELECT a.attnum, a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid
                   FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid AND ty.typtype = 'd'
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                 UNION ALL
                 SELECT c.attnum, c.attname, c.coltype, ty.typbasetype
                   FROM chain c JOIN pg_type ty ON ty.oid = c.domain
                   JOIN pg_type base ON base.oid = ty.typbasetype AND base.typtype = 'd')
             SELECT c.attname, c.coltype, format_type(c.domain, NULL), con.conname::text,
                    pg_get_expr(con.conbin, 0)
               FROM chain c JOIN pg_constraint con ON con.contypid = c.domain AND con.contype = 'c'
             UNION ALL
             SELECT c.attname, c.coltype, format_type(c.domain, NULL), 'not_null', NULL
               FROM chain c JOIN pg_type ty ON ty.oid = c.domain AND ty.typnotnull
             ORDER BY 1, 3, 4",
            &[&oid],
        )
        .await
        .with_context(|| format!("reading domain constraints of {table}"))?;
    Ok(rows
        .iter()
        .map(|r| DomainConstraint {
            column: r.get(0),
            type_name: r.get(1),
            domain: r.get(2),
            name: r.get(3),
            expression: r.get(4),
        })
        .collect())
}

/// An enum column and its type's current labels.
#[derive(Clone, Debug)]
pub(crate) struct EnumColumn {
    pub(crate) column: String,
    pub(crate) type_name: String,
    pub(crate) labels: Vec<String>,
}

/// The enum-typed columns of `oid`.
pub(crate) async fn enum_columns(
    client: &impl GenericClient,
    oid: u32,
    table: &TableRef,
) -> Result<Vec<EnumColumn>> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = ty.oid
                           ORDER BY e.enumsortorder)
               FROM pg_attribute a
               JOIN pg_type ty ON ty.oid = a.atttypid AND ty.typtype = 'e'
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .with_context(|| format!("reading enum columns of {table}"))?;
    Ok(rows
        .iter()
        .map(|r| EnumColumn {
            column: r.get(0),
            type_name: r.get(1),
            labels: r.get(2),
        })
        .collect())
}

/// A unique index that PostgreSQL does not currently enforce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UniqueIndex {
    /// The constraint's name when the index backs a primary key or unique
    /// constraint, else the index's.
    pub(crate) name: String,
    /// Each key column of the index as SQL over the table: a quoted column name or
    /// an expression, as `pg_get_indexdef(index, n)` prints it.
    pub(crate) keys: Vec<String>,
    /// The partial index's predicate (`pg_get_expr(indpred)`).
    pub(crate) predicate: Option<String>,
    /// `NULLS NOT DISTINCT`: rows with nulls in the key are duplicates too.
    pub(crate) nulls_not_distinct: bool,
}

/// The unique indexes of `oid` that no valid, ready, live index enforces: invalid
/// ones (a failed `CREATE UNIQUE INDEX CONCURRENTLY`, a damaged catalog), partial and
/// expression ones included, and those of constraints whose index is missing.
/// Indexes with the same keys and predicate are listed once.
pub(crate) async fn unenforced_unique_indexes(
    client: &impl GenericClient,
    oid: u32,
    table: &TableRef,
) -> Result<Vec<UniqueIndex>> {
    let rows = client
        .query(
            "SELECT coalesce(con.conname, ic.relname)::text,
                    ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true)
                            FROM generate_series(1, i.indnkeyatts) k ORDER BY k),
                    pg_get_expr(i.indpred, i.indrelid, true),
                    i.indnullsnotdistinct
               FROM pg_index i
               JOIN pg_class ic ON ic.oid = i.indexrelid
               LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid
                    AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u')
              WHERE i.indrelid = $1 AND i.indisunique
                AND NOT (i.indisvalid AND i.indisready AND i.indislive)
             UNION ALL
             SELECT con.conname::text,
                    ARRAY(SELECT quote_ident(a.attname) FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
                           JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
                          ORDER BY k.o),
                    NULL, false
               FROM pg_constraint con
              WHERE con.conrelid = $1 AND con.contype IN ('p', 'u')
                AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indexrelid = con.conindid)
              ORDER BY 1",
            &[&oid],
        )
        .await
        .with_context(|| format!("reading unique indexes of {table}"))?;
    let mut out: Vec<UniqueIndex> = Vec::new();
    for r in rows {
        let index = UniqueIndex {
            name: r.get(0),
            keys: r.get(1),
            predicate: r.get(2),
            nulls_not_distinct: r.get(3),
        };
        if !out.iter().any(|o| {
            o.keys == index.keys
                && o.predicate == index.predicate
                && o.nulls_not_distinct == index.nulls_not_distinct
        }) {
            out.push(index);
        }
    }
    Ok(out)
}

/// How a foreign key treats nulls among its columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MatchType {
    /// MATCH SIMPLE (the default): a row with a null in any column is not checked.
    Simple,
    /// MATCH FULL: all columns null is not checked; some but not all null is a
    /// violation.
    Full,
}

/// A foreign key of a table, as the catalog holds it.
#[derive(Clone, Debug)]
pub(crate) struct ForeignKey {
    pub(crate) name: String,
    pub(crate) columns: Vec<String>,
    pub(crate) parent: TableRef,
    /// Whether the parent is partitioned (read with `FROM`, else `FROM ONLY`, as
    /// PostgreSQL's own checks do).
    pub(crate) parent_partitioned: bool,
    pub(crate) parent_columns: Vec<String>,
    pub(crate) validated: bool,
    pub(crate) deferrable: bool,
    pub(crate) match_type: MatchType,
    /// The parent's rows as the planner knows them (leaves summed for a
    /// partitioned parent); `None` when it has no statistics.
    pub(crate) parent_rows: Option<f64>,
}

/// The foreign keys of `oid`, each once: the per-partition copies PostgreSQL keeps
/// of a key that references a partitioned table are left out.
pub(crate) async fn foreign_keys(
    client: &impl GenericClient,
    oid: u32,
    table: &TableRef,
) -> Result<Vec<ForeignKey>> {
    let rows = client
        .query(
            "SELECT con.conname::text, pn.nspname::text, pc.relname::text, pc.relkind = 'p',
                    ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
                            JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
                           ORDER BY k.o),
                    ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, o)
                            JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n
                           ORDER BY k.o),
                    con.convalidated, con.condeferrable, con.confmatchtype::text,
                    CASE WHEN pc.relkind = 'p'
                         THEN (SELECT sum(lc.reltuples)::float8 FROM pg_partition_tree(pc.oid) t
                                 JOIN pg_class lc ON lc.oid = t.relid
                                WHERE t.isleaf
                               HAVING bool_and(lc.reltuples >= 0))
                         WHEN pc.reltuples >= 0 THEN pc.reltuples::float8 END
               FROM pg_constraint con
               JOIN pg_class pc ON pc.oid = con.confrelid
               JOIN pg_namespace pn ON pn.oid = pc.relnamespace
              WHERE con.contype = 'f' AND con.conrelid = $1
                AND NOT (con.conparentid <> 0 AND EXISTS (
                         SELECT 1 FROM pg_constraint up
                          WHERE up.oid = con.conparentid AND up.conrelid = con.conrelid))
              ORDER BY con.conname",
            &[&oid],
        )
        .await
        .with_context(|| format!("reading foreign keys of {table}"))?;
    Ok(rows
        .iter()
        .map(|r| ForeignKey {
            name: r.get(0),
            parent: TableRef::new(r.get::<_, String>(1), r.get::<_, String>(2)),
            parent_partitioned: r.get(3),
            columns: r.get(4),
            parent_columns: r.get(5),
            validated: r.get(6),
            deferrable: r.get(7),
            match_type: if r.get::<_, String>(8) == "f" {
                MatchType::Full
            } else {
                MatchType::Simple
            },
            parent_rows: r.get(9),
        })
        .collect())
}

/// Whether `table` is a partitioned table (for a declared relationship's parent).
pub(crate) async fn is_partitioned(client: &impl GenericClient, table: &TableRef) -> Result<bool> {
    let row = client
        .query_opt(
            "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .with_context(|| format!("reading the catalog entry of {table}"))?
        .ok_or_else(|| Error::not_found(format!("table {table}")))?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_typmods_decode_with_a_signed_scale() {
        // numeric(12, 2), numeric(5, -3), numeric(3, 5): typmod minus the header.
        assert_eq!(numeric_typmod((12 << 16) | 2), (12, 2));
        assert_eq!(numeric_typmod((5 << 16) | (-3i32 & 0x7ff)), (5, -3));
        assert_eq!(numeric_typmod((3 << 16) | 5), (3, 5));
    }
}
