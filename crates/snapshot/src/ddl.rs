//! The DDL of captured tables: read from PostgreSQL's catalog at capture, stored
//! in the repository with each snapshot (a block its manifest names), and run by a
//! restore to recreate the tables the database lacks — a lost database is
//! restored from the store alone (see `docs/formats.md`).
//!
//! Statements are built at capture from PostgreSQL's own printers
//! (`format_type`, `pg_get_expr`, `pg_get_constraintdef`, `pg_get_indexdef`,
//! `pg_get_partkeydef`) with `search_path` set to `pg_catalog`, so every name in
//! them is schema-qualified, and every identifier and literal is quoted. They are
//! run only after the manifest naming them has been authenticated.
//!
//! What is recreated: schemas, extensions that own a column's type, enum, domain
//! (with its constraints), composite and range types, sequences (options, owner),
//! tables (columns, types, collations, defaults, `NOT NULL`, identity and stored
//! generated columns, `UNLOGGED`, storage parameters, inheritance, partitioning
//! with every partition), primary/unique/exclusion/check constraints (`NOT VALID`
//! and `DEFERRABLE` as they were), indexes, foreign keys and comments. What is not:
//! owners and grants (roles may not exist), row-level security policies, triggers
//! and the functions they call, and indexes that were invalid at capture.

use std::collections::{BTreeSet, HashSet};

use sanare_core::{Error, Result, TableRef};
use sanare_pg::{PgResultExt, quote_ident, quote_literal};
use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

/// Magic at the start of a DDL block's content.
pub const DDL_MAGIC: [u8; 4] = *b"SNDL";
/// The version of the DDL content written by this crate.
pub const DDL_VERSION: u16 = 1;

/// What a statement creates, in the order statements run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DdlKind {
    /// `CREATE SCHEMA IF NOT EXISTS`.
    Schema,
    /// `CREATE EXTENSION IF NOT EXISTS` (an extension owning a column's type).
    Extension,
    /// `CREATE TYPE` / `CREATE DOMAIN`.
    Type,
    /// `CREATE SEQUENCE IF NOT EXISTS`.
    Sequence,
    /// `CREATE TABLE` (with its partitions).
    Table,
    /// `ALTER SEQUENCE … OWNED BY`.
    SequenceOwner,
    /// `ALTER TABLE … ADD CONSTRAINT` (primary, unique, exclusion, check).
    Constraint,
    /// `CREATE INDEX`.
    Index,
    /// `ALTER TABLE … ADD CONSTRAINT … FOREIGN KEY`.
    ForeignKey,
    /// `COMMENT ON`.
    Comment,
}

impl DdlKind {
    /// What it creates, in words (`sequence owner`, `foreign key`).
    pub const fn as_str(self) -> &'static str {
        match self {
            DdlKind::Schema => "schema",
            DdlKind::Extension => "extension",
            DdlKind::Type => "type",
            DdlKind::Sequence => "sequence",
            DdlKind::Table => "table",
            DdlKind::SequenceOwner => "sequence owner",
            DdlKind::Constraint => "constraint",
            DdlKind::Index => "index",
            DdlKind::ForeignKey => "foreign key",
            DdlKind::Comment => "comment",
        }
    }
}

impl std::fmt::Display for DdlKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One statement of a snapshot's DDL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlStatement {
    /// What it creates.
    pub kind: DdlKind,
    /// The schema of what it creates (unquoted).
    pub schema: String,
    /// The name of what it creates (unquoted).
    pub name: String,
    /// The captured table it belongs to: it runs when that table is recreated.
    /// `None` for what tables share (schemas, extensions, types, sequences not
    /// owned by a table): those run when a table in `needed_by` is recreated and
    /// the object does not exist.
    pub table: Option<(String, String)>,
    /// The captured tables that need this shared object.
    pub needed_by: Vec<(String, String)>,
    /// Another table this statement needs: the referenced table of a foreign key
    /// (the key is skipped when that table neither exists nor is recreated) or
    /// the parent of an inheritance child (the restore fails without it).
    pub refers_to: Option<(String, String)>,
    /// The SQL.
    pub sql: String,
}

/// The DDL of a snapshot's tables, in the order it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaDdl {
    /// The statements.
    pub statements: Vec<DdlStatement>,
}

impl SchemaDdl {
    /// The content of a DDL block: `SNDL`, the version (u16 LE), then postcard.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = DDL_MAGIC.to_vec();
        out.extend_from_slice(&DDL_VERSION.to_le_bytes());
        postcard::to_io(self, &mut out)
            .map_err(|e| Error::other("encoding a snapshot's DDL", e))?;
        Ok(out)
    }

    /// Decodes a DDL block's content.
    pub fn decode(content: &[u8]) -> Result<Self> {
        let what = "snapshot DDL";
        let body = content
            .strip_prefix(&DDL_MAGIC[..])
            .ok_or_else(|| Error::corrupt(what, "bad magic (not a snapshot's DDL)"))?;
        let (version, body) = body
            .split_first_chunk::<2>()
            .ok_or_else(|| Error::corrupt(what, "truncated"))?;
        if u16::from_le_bytes(*version) != DDL_VERSION {
            return Err(Error::corrupt(
                what,
                format!("unsupported version {}", u16::from_le_bytes(*version)),
            ));
        }
        postcard::from_bytes(body)
            .map_err(|e| Error::corrupt(what, format!("does not decode: {e}")))
    }
}

fn pair(t: &TableRef) -> (String, String) {
    (t.schema.clone(), t.name.clone())
}

/// Sets `search_path` to `pg_catalog` in the transaction of `client`, so
/// PostgreSQL prints every name schema-qualified; returns the setting to put back
/// with [`reset_path`].
async fn catalog_path<C: GenericClient + Sync>(client: &C) -> Result<String> {
    Ok(client
        .query_one(
            "SELECT current_setting('search_path'), set_config('search_path', 'pg_catalog', true)",
            &[],
        )
        .await
        .context("setting search_path for the DDL")?
        .get(0))
}

async fn reset_path<C: GenericClient + Sync>(client: &C, saved: &str) -> Result<()> {
    client
        .execute("SELECT set_config('search_path', $1, true)", &[&saved])
        .await
        .context("restoring search_path after the DDL")?;
    Ok(())
}

/// Reads the DDL of `tables` (captured tables, in any order) from the catalog.
pub(crate) async fn capture<C: GenericClient + Sync>(
    client: &C,
    tables: &[TableRef],
) -> Result<SchemaDdl> {
    let saved = catalog_path(client).await?;
    let mut b = Builder::default();
    let built = async {
        for table in order_by_inheritance(client, tables).await? {
            b.table(client, &table).await?;
        }
        Ok::<_, Error>(())
    }
    .await;
    // A failure has aborted the transaction: nothing to put back.
    built?;
    reset_path(client, &saved).await?;
    Ok(b.finish())
}

/// Tables in an order where inheritance parents come before their children.
async fn order_by_inheritance<C: GenericClient + Sync>(
    client: &C,
    tables: &[TableRef],
) -> Result<Vec<TableRef>> {
    let mut depth = Vec::with_capacity(tables.len());
    for t in tables {
        let d: i32 = client
            .query_one(
                "WITH RECURSIVE up(oid, d) AS (
                     SELECT (quote_ident($1) || '.' || quote_ident($2))::regclass::oid, 0
                     UNION ALL
                     SELECT i.inhparent, up.d + 1 FROM pg_inherits i JOIN up ON i.inhrelid = up.oid
                 ) SELECT max(d) FROM up",
                &[&t.schema, &t.name],
            )
            .await
            .with_context(|| format!("reading the parents of {t}"))?
            .get(0);
        depth.push((d, t.clone()));
    }
    depth.sort();
    Ok(depth.into_iter().map(|(_, t)| t).collect())
}

#[derive(Default)]
struct Builder {
    statements: Vec<DdlStatement>,
    /// Shared objects already emitted, by (kind, schema, name): index in statements.
    shared: std::collections::HashMap<(DdlKind, String, String), usize>,
    types_seen: HashSet<(u32, (String, String))>,
}

impl Builder {
    fn finish(mut self) -> SchemaDdl {
        // Stable: tables stay parents first, types stay dependencies first.
        self.statements.sort_by_key(|s| s.kind);
        SchemaDdl {
            statements: self.statements,
        }
    }

    fn push(&mut self, kind: DdlKind, schema: &str, name: &str, table: &TableRef, sql: String) {
        self.statements.push(DdlStatement {
            kind,
            schema: schema.to_owned(),
            name: name.to_owned(),
            table: Some(pair(table)),
            needed_by: Vec::new(),
            refers_to: None,
            sql,
        });
    }

    /// A shared object needed by `table`: emitted once, its users collected.
    fn shared(
        &mut self,
        kind: DdlKind,
        schema: &str,
        name: &str,
        table: &TableRef,
        sql: impl FnOnce() -> String,
    ) {
        let key = (kind, schema.to_owned(), name.to_owned());
        let at = match self.shared.get(&key) {
            Some(&at) => at,
            None => {
                self.statements.push(DdlStatement {
                    kind,
                    schema: schema.to_owned(),
                    name: name.to_owned(),
                    table: None,
                    needed_by: Vec::new(),
                    refers_to: None,
                    sql: sql(),
                });
                self.shared.insert(key, self.statements.len() - 1);
                self.statements.len() - 1
            }
        };
        let user = pair(table);
        if !self.statements[at].needed_by.contains(&user) {
            self.statements[at].needed_by.push(user);
        }
    }

    async fn table<C: GenericClient + Sync>(&mut self, c: &C, table: &TableRef) -> Result<()> {
        let oid: u32 = c
            .query_one(
                "SELECT (quote_ident($1) || '.' || quote_ident($2))::regclass::oid",
                &[&table.schema, &table.name],
            )
            .await
            .with_context(|| format!("looking up {table} for its DDL"))?
            .get(0);
        self.shared(DdlKind::Schema, &table.schema, &table.schema, table, || {
            format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(&table.schema))
        });
        self.relation(c, table, oid, None).await
    }

    /// The statements of relation `oid`: the captured table itself, or (with
    /// `parent`) one of its partitions.
    async fn relation<C: GenericClient + Sync>(
        &mut self,
        c: &C,
        table: &TableRef,
        oid: u32,
        parent: Option<&str>,
    ) -> Result<()> {
        let ctx = || format!("reading the DDL of {table}");
        let r = c
            .query_one(
                "SELECT c.oid::regclass::text, n.nspname::text, c.relname::text, c.relkind::text,
                        c.relpersistence::text,
                        CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
                        CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END,
                        array_to_string(c.reloptions, ', '),
                        obj_description(c.oid, 'pg_class'),
                        (SELECT array_agg(pn.nspname::text ORDER BY i.inhseqno)
                           FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
                           JOIN pg_namespace pn ON pn.oid = p.relnamespace
                          WHERE i.inhrelid = c.oid AND NOT c.relispartition),
                        (SELECT array_agg(p.relname::text ORDER BY i.inhseqno)
                           FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
                          WHERE i.inhrelid = c.oid AND NOT c.relispartition)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
                &[&oid],
            )
            .await
            .with_context(ctx)?;
        let (qname, schema, name): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let kind: String = r.get(3);
        let unlogged = if r.get::<_, String>(4) == "u" {
            "UNLOGGED "
        } else {
            ""
        };
        let partition_by: Option<String> = r.get(5);
        let bound: Option<String> = r.get(6);
        let options: Option<String> = r.get(7);
        let comment: Option<String> = r.get(8);
        let parents: Vec<(String, String)> = r
            .get::<_, Option<Vec<String>>>(9)
            .unwrap_or_default()
            .into_iter()
            .zip(r.get::<_, Option<Vec<String>>>(10).unwrap_or_default())
            .collect();
        let mut sql = format!("CREATE {unlogged}TABLE {qname}");
        match (parent, &bound) {
            (Some(parent), Some(bound)) => sql.push_str(&format!(" PARTITION OF {parent} {bound}")),
            _ => {
                let columns = self.columns(c, table, oid).await?;
                sql.push_str(&format!(" ({})", columns.join(", ")));
            }
        }
        let mut refers_to = None;
        if !parents.is_empty() {
            let names: Vec<String> = parents
                .iter()
                .map(|(s, n)| format!("{}.{}", quote_ident(s), quote_ident(n)))
                .collect();
            sql.push_str(&format!(" INHERITS ({})", names.join(", ")));
            refers_to = parents.first().cloned();
        }
        if let Some(key) = &partition_by {
            sql.push_str(&format!(" PARTITION BY {key}"));
        }
        if let Some(options) = options.filter(|o| !o.is_empty()) {
            sql.push_str(&format!(" WITH ({options})"));
        }
        self.push(DdlKind::Table, &schema, &name, table, sql);
        if let Some(last) = self.statements.last_mut() {
            last.refers_to = refers_to;
        }
        if let Some(comment) = comment {
            self.push(
                DdlKind::Comment,
                &schema,
                &name,
                table,
                format!("COMMENT ON TABLE {qname} IS {}", quote_literal(&comment)),
            );
        }
        if parent.is_none() {
            self.sequences(c, table, oid).await?;
        }
        self.constraints(c, table, oid, &qname).await?;
        self.indexes(c, table, oid).await?;
        if kind == "p" {
            let parts = c
                .query(
                    "SELECT i.inhrelid FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                      WHERE i.inhparent = $1 AND c.relispartition ORDER BY c.relname",
                    &[&oid],
                )
                .await
                .with_context(ctx)?;
            for p in parts {
                Box::pin(self.relation(c, table, p.get(0), Some(&qname))).await?;
            }
        }
        Ok(())
    }

    /// The column definitions of `oid` (its own columns: inherited ones come with
    /// `INHERITS`), emitting the types they use.
    async fn columns<C: GenericClient + Sync>(
        &mut self,
        c: &C,
        table: &TableRef,
        oid: u32,
    ) -> Result<Vec<String>> {
        let rows = c
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                        a.attidentity::text, a.attgenerated::text, pg_get_expr(d.adbin, d.adrelid),
                        CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
                             THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END,
                        a.attislocal, col_description(a.attrelid, a.attnum), a.atttypid,
                        CASE WHEN a.attidentity <> ''
                             THEN pg_get_serial_sequence(a.attrelid::regclass::text, a.attname) END
                   FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                   LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                   LEFT JOIN pg_collation co ON co.oid = a.attcollation
                   LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                &[&oid],
            )
            .await
            .with_context(|| format!("reading the columns of {table} for its DDL"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let name: String = r.get(0);
            let type_oid: u32 = r.get(9);
            self.type_of(c, table, type_oid).await?;
            if let Some(comment) = r.get::<_, Option<String>>(8) {
                self.push(
                    DdlKind::Comment,
                    &table.schema,
                    &table.name,
                    table,
                    format!(
                        "COMMENT ON COLUMN {}.{} IS {}",
                        table.quoted(),
                        quote_ident(&name),
                        quote_literal(&comment)
                    ),
                );
            }
            if !r.get::<_, bool>(7) {
                continue; // inherited: comes with INHERITS
            }
            let mut def = format!("{} {}", quote_ident(&name), r.get::<_, String>(1));
            if let Some(collation) = r.get::<_, Option<String>>(6) {
                def.push_str(&format!(" COLLATE {collation}"));
            }
            let identity: String = r.get(3);
            let generated: String = r.get(4);
            let default: Option<String> = r.get(5);
            if generated == "s" {
                def.push_str(&format!(
                    " GENERATED ALWAYS AS ({}) STORED",
                    default.unwrap_or_default()
                ));
            } else if !identity.is_empty() {
                let seq: Option<String> = r.get(10);
                def.push_str(&identity_clause(c, &identity, seq.as_deref()).await?);
            } else if let Some(default) = default {
                def.push_str(&format!(" DEFAULT {default}"));
            }
            if r.get::<_, bool>(2) {
                def.push_str(" NOT NULL");
            }
            out.push(def);
        }
        Ok(out)
    }

    /// Emits the user-defined type `oid` (and what it is built on) for `table`,
    /// or records `table` as one more user of it.
    async fn type_of<C: GenericClient + Sync>(
        &mut self,
        c: &C,
        table: &TableRef,
        oid: u32,
    ) -> Result<()> {
        // Built-in types (and their arrays) have oids below PostgreSQL's
        // FirstNormalObjectId: nothing to recreate, no query needed.
        if oid < 16_384 || !self.types_seen.insert((oid, pair(table))) {
            return Ok(());
        }
        let ctx = || format!("reading a column type of {table} for its DDL");
        let r = c
            .query_one(
                "SELECT t.typtype::text, n.nspname::text, t.typname::text, t.typelem, t.typbasetype,
                        t.typrelid, t.typcategory::text, format_type(t.oid, NULL),
                        (SELECT e.extname::text || ' ' || quote_ident(en.nspname)
                           FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
                           JOIN pg_namespace en ON en.oid = e.extnamespace
                          WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'),
                        obj_description(t.oid, 'pg_type')
                   FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1",
                &[&oid],
            )
            .await
            .with_context(ctx)?;
        let (typtype, schema, name): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let (elem, base, relid): (u32, u32, u32) = (r.get(3), r.get(4), r.get(5));
        let category: String = r.get(6);
        let qname: String = r.get(7);
        if let Some(ext) = r.get::<_, Option<String>>(8) {
            let (ext, ext_schema) = ext.split_once(' ').unwrap_or((&ext, "public"));
            let ext = ext.to_owned();
            self.shared(DdlKind::Extension, "", &ext, table, || {
                format!(
                    "CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {ext_schema}",
                    quote_ident(&ext)
                )
            });
            return Ok(());
        }
        if category == "A" && elem != 0 {
            return Box::pin(self.type_of(c, table, elem)).await;
        }
        if schema == "pg_catalog" || schema == "information_schema" {
            return Ok(());
        }
        let sql = match typtype.as_str() {
            "e" => {
                let labels: Vec<String> = c
                    .query("SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder", &[&oid])
                    .await
                    .with_context(ctx)?
                    .iter()
                    .map(|l| quote_literal(&l.get::<_, String>(0)))
                    .collect();
                format!("CREATE TYPE {qname} AS ENUM ({})", labels.join(", "))
            }
            "d" => {
                Box::pin(self.type_of(c, table, base)).await?;
                domain_sql(c, oid, &qname).await.with_context(ctx)?
            }
            "c" => {
                let attrs = c
                    .query(
                        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid
                           FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                          ORDER BY a.attnum",
                        &[&relid],
                    )
                    .await
                    .with_context(ctx)?;
                let mut fields = Vec::new();
                for a in attrs {
                    Box::pin(self.type_of(c, table, a.get(2))).await?;
                    fields.push(format!(
                        "{} {}",
                        quote_ident(&a.get::<_, String>(0)),
                        a.get::<_, String>(1)
                    ));
                }
                format!("CREATE TYPE {qname} AS ({})", fields.join(", "))
            }
            "r" => {
                let sub: (String, u32) = c
                    .query_one("SELECT format_type(rngsubtype, NULL), rngsubtype FROM pg_range WHERE rngtypid = $1", &[&oid])
                    .await
                    .with_context(ctx)
                    .map(|r| (r.get(0), r.get(1)))?;
                Box::pin(self.type_of(c, table, sub.1)).await?;
                format!("CREATE TYPE {qname} AS RANGE (SUBTYPE = {})", sub.0)
            }
            // A base type written in C, or a pseudo-type: nothing to recreate.
            _ => return Ok(()),
        };
        self.shared(DdlKind::Type, &schema, &name, table, || sql);
        if let Some(comment) = r.get::<_, Option<String>>(9) {
            let kind = if typtype == "d" { "DOMAIN" } else { "TYPE" };
            self.shared(DdlKind::Comment, &schema, &name, table, || {
                format!("COMMENT ON {kind} {qname} IS {}", quote_literal(&comment))
            });
        }
        Ok(())
    }

    /// Sequences `table`'s defaults use and sequences it owns (serial); identity
    /// sequences come with their column.
    async fn sequences<C: GenericClient + Sync>(
        &mut self,
        c: &C,
        table: &TableRef,
        oid: u32,
    ) -> Result<()> {
        let rows = c
            .query(
                "SELECT s.oid::regclass::text, n.nspname::text, s.relname::text,
                        format_type(q.seqtypid, NULL), q.seqstart, q.seqincrement, q.seqmin, q.seqmax,
                        q.seqcache, q.seqcycle,
                        (SELECT a.attname::text FROM pg_depend o JOIN pg_attribute a
                              ON a.attrelid = o.refobjid AND a.attnum = o.refobjsubid
                          WHERE o.classid = 'pg_class'::regclass AND o.objid = s.oid
                            AND o.refobjid = $1 AND o.deptype = 'a')
                   FROM pg_class s JOIN pg_namespace n ON n.oid = s.relnamespace
                   JOIN pg_sequence q ON q.seqrelid = s.oid
                  WHERE s.relkind = 'S' AND (
                        s.oid IN (SELECT d.refobjid FROM pg_depend d JOIN pg_attrdef ad
                                      ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                                   WHERE ad.adrelid = $1 AND d.refclassid = 'pg_class'::regclass)
                     OR s.oid IN (SELECT o.objid FROM pg_depend o
                                   WHERE o.classid = 'pg_class'::regclass AND o.refobjid = $1 AND o.deptype = 'a'))
                  ORDER BY 1",
                &[&oid],
            )
            .await
            .with_context(|| format!("reading the sequences of {table} for its DDL"))?;
        for r in rows {
            let (qname, schema, name): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let type_name: String = r.get(3);
            let options = sequence_options(
                Some(&type_name),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
                r.get(8),
                r.get(9),
            );
            let create = format!("CREATE SEQUENCE IF NOT EXISTS {qname} {options}");
            match r.get::<_, Option<String>>(10) {
                Some(column) => {
                    self.push(DdlKind::Sequence, &schema, &name, table, create);
                    self.push(
                        DdlKind::SequenceOwner,
                        &schema,
                        &name,
                        table,
                        format!(
                            "ALTER SEQUENCE {qname} OWNED BY {}.{}",
                            table.quoted(),
                            quote_ident(&column)
                        ),
                    );
                }
                None => self.shared(DdlKind::Sequence, &schema, &name, table, || create),
            }
        }
        Ok(())
    }

    async fn constraints<C: GenericClient + Sync>(
        &mut self,
        c: &C,
        table: &TableRef,
        oid: u32,
        qname: &str,
    ) -> Result<()> {
        let rows = c
            .query(
                "SELECT c.conname::text, c.contype::text, pg_get_constraintdef(c.oid),
                        obj_description(c.oid, 'pg_constraint'), rn.nspname::text, r.relname::text
                   FROM pg_constraint c
                   LEFT JOIN pg_class r ON r.oid = c.confrelid
                   LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace
                  WHERE c.conrelid = $1 AND c.contype IN ('p', 'u', 'x', 'c', 'f') AND c.conislocal
                  ORDER BY c.oid",
                &[&oid],
            )
            .await
            .with_context(|| format!("reading the constraints of {table} for its DDL"))?;
        for r in rows {
            let (name, kind, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let sql = format!(
                "ALTER TABLE {qname} ADD CONSTRAINT {} {def}",
                quote_ident(&name)
            );
            if kind == "f" {
                self.push(DdlKind::ForeignKey, &table.schema, &name, table, sql);
                if let Some(last) = self.statements.last_mut() {
                    last.refers_to = Some((r.get(4), r.get(5)));
                }
            } else {
                self.push(DdlKind::Constraint, &table.schema, &name, table, sql);
            }
            if let Some(comment) = r.get::<_, Option<String>>(3) {
                self.push(
                    DdlKind::Comment,
                    &table.schema,
                    &name,
                    table,
                    format!(
                        "COMMENT ON CONSTRAINT {} ON {qname} IS {}",
                        quote_ident(&name),
                        quote_literal(&comment)
                    ),
                );
            }
        }
        Ok(())
    }

    /// Indexes not backing a constraint, not attached to a parent's index, and
    /// valid (an invalid index, left by a failed concurrent build, is not made).
    async fn indexes<C: GenericClient + Sync>(
        &mut self,
        c: &C,
        table: &TableRef,
        oid: u32,
    ) -> Result<()> {
        let rows = c
            .query(
                "SELECT n.nspname::text, ic.relname::text, pg_get_indexdef(i.indexrelid),
                        obj_description(i.indexrelid, 'pg_class'), i.indexrelid::regclass::text
                   FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                   JOIN pg_namespace n ON n.oid = ic.relnamespace
                  WHERE i.indrelid = $1 AND i.indisvalid
                    AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                                     WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u', 'x'))
                    AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
                  ORDER BY i.indexrelid",
                &[&oid],
            )
            .await
            .with_context(|| format!("reading the indexes of {table} for its DDL"))?;
        for r in rows {
            let (schema, name, def): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            // A partitioned table's index is printed `ON ONLY`; made plainly, it
            // is made on every partition too.
            let def = def.replacen(" ON ONLY ", " ON ", 1);
            self.push(DdlKind::Index, &schema, &name, table, def);
            if let Some(comment) = r.get::<_, Option<String>>(3) {
                let qname: String = r.get(4);
                self.push(
                    DdlKind::Comment,
                    &schema,
                    &name,
                    table,
                    format!("COMMENT ON INDEX {qname} IS {}", quote_literal(&comment)),
                );
            }
        }
        Ok(())
    }
}

/// `GENERATED … AS IDENTITY (…)` for an identity column whose sequence is `seq`.
async fn identity_clause<C: GenericClient + Sync>(
    c: &C,
    identity: &str,
    seq: Option<&str>,
) -> Result<String> {
    let when = if identity == "a" {
        "ALWAYS"
    } else {
        "BY DEFAULT"
    };
    let Some(seq) = seq else {
        return Ok(format!(" GENERATED {when} AS IDENTITY"));
    };
    let r = c
        .query_one(
            "SELECT NULL, seqstart, seqincrement, seqmin, seqmax, seqcache, seqcycle
               FROM pg_sequence WHERE seqrelid = $1::text::regclass",
            &[&seq],
        )
        .await
        .with_context(|| format!("reading identity sequence {seq}"))?;
    // The sequence's type follows the column's: no `AS` here.
    let options = sequence_options(
        None,
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get(6),
    );
    Ok(format!(
        " GENERATED {when} AS IDENTITY (SEQUENCE NAME {seq} {options})"
    ))
}

/// `[AS type] INCREMENT BY … MINVALUE … MAXVALUE … START WITH … CACHE … [NO] CYCLE`.
fn sequence_options(
    type_name: Option<&str>,
    start: i64,
    increment: i64,
    min: i64,
    max: i64,
    cache: i64,
    cycle: bool,
) -> String {
    format!(
        "{}INCREMENT BY {increment} MINVALUE {min} MAXVALUE {max} START WITH {start} CACHE {cache} {}CYCLE",
        type_name.map(|t| format!("AS {t} ")).unwrap_or_default(),
        if cycle { "" } else { "NO " }
    )
}

async fn domain_sql<C: GenericClient + Sync>(
    c: &C,
    oid: u32,
    qname: &str,
) -> std::result::Result<String, tokio_postgres::Error> {
    let d = c
        .query_one(
            "SELECT format_type(t.typbasetype, t.typtypmod), t.typdefault, t.typnotnull,
                    CASE WHEN t.typcollation <> 0 AND t.typcollation <> b.typcollation
                         THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END
               FROM pg_type t JOIN pg_type b ON b.oid = t.typbasetype
               LEFT JOIN pg_collation co ON co.oid = t.typcollation
               LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
              WHERE t.oid = $1",
            &[&oid],
        )
        .await?;
    let mut sql = format!("CREATE DOMAIN {qname} AS {}", d.get::<_, String>(0));
    if let Some(collation) = d.get::<_, Option<String>>(3) {
        sql.push_str(&format!(" COLLATE {collation}"));
    }
    if let Some(default) = d.get::<_, Option<String>>(1) {
        sql.push_str(&format!(" DEFAULT {default}"));
    }
    if d.get::<_, bool>(2) {
        sql.push_str(" NOT NULL");
    }
    let checks = c
        .query(
            "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
              WHERE contypid = $1 AND contype = 'c' ORDER BY oid",
            &[&oid],
        )
        .await?;
    for k in checks {
        sql.push_str(&format!(
            "; ALTER DOMAIN {qname} ADD CONSTRAINT {} {}",
            quote_ident(&k.get::<_, String>(0)),
            k.get::<_, String>(1)
        ));
    }
    Ok(sql)
}

/// What [`recreate`] did.
#[derive(Debug, Default)]
pub(crate) struct Recreated {
    /// The tables created.
    pub(crate) tables: Vec<TableRef>,
    /// Foreign keys left out because the table they reference is neither in the
    /// database nor restored, in words.
    pub(crate) skipped: Vec<String>,
}

/// Those of `wanted` the database lacks.
pub(crate) async fn missing(
    tx: &tokio_postgres::Transaction<'_>,
    wanted: &[TableRef],
) -> Result<BTreeSet<(String, String)>> {
    let mut missing = BTreeSet::new();
    for t in wanted {
        if !relation_exists(tx, &t.schema, &t.name).await? {
            missing.insert(pair(t));
        }
    }
    Ok(missing)
}

/// Creates, in `tx`, the `missing` tables (captured tables the database lacks,
/// from [`missing`]) from `ddl`, with the shared objects they need that it lacks
/// too.
pub(crate) async fn recreate(
    tx: &tokio_postgres::Transaction<'_>,
    ddl: &SchemaDdl,
    missing: BTreeSet<(String, String)>,
) -> Result<Recreated> {
    let mut out = Recreated::default();
    if missing.is_empty() {
        return Ok(out);
    }
    for s in &ddl.statements {
        if s.kind == DdlKind::Table
            && s.table.as_ref().is_some_and(|t| missing.contains(t))
            && let Some(parent) = &s.refers_to
            && !missing.contains(parent)
            && !relation_exists(tx, &parent.0, &parent.1).await?
        {
            return Err(Error::conflict(format!(
                "table {}.{} inherits from {}.{}, which the database lacks and this restore does not recreate; restore the parent too",
                s.schema, s.name, parent.0, parent.1
            )));
        }
    }
    if let Some(t) = missing.iter().find(|t| {
        !ddl.statements
            .iter()
            .any(|s| s.kind == DdlKind::Table && s.table.as_ref() == Some(t))
    }) {
        return Err(Error::not_found(format!(
            "table {}.{} in the database, and the snapshot holds no DDL to recreate it (create it, then restore)",
            t.0, t.1
        )));
    }
    let saved = catalog_path(tx).await?;
    let c = tx;
    let ran = async {
        for s in &ddl.statements {
            let run = match &s.table {
                Some(t) if missing.contains(t) => match (&s.kind, &s.refers_to) {
                    (DdlKind::ForeignKey, Some(r)) if !missing.contains(r) && !relation_exists(c, &r.0, &r.1).await? => {
                        out.skipped.push(format!(
                            "foreign key {} of {}.{} (it references {}.{}, which the database lacks)",
                            s.name, t.0, t.1, r.0, r.1
                        ));
                        false
                    }
                    _ => true,
                },
                Some(_) => false,
                None => s.needed_by.iter().any(|t| missing.contains(t)) && !shared_exists(c, s).await?,
            };
            if run {
                c.batch_execute(&s.sql)
                    .await
                    .with_context(|| format!("recreating {} {}.{} from the snapshot's DDL", s.kind, s.schema, s.name))?;
            }
        }
        Ok::<_, Error>(())
    }
    .await;
    // A failure has aborted the transaction: nothing to put back.
    ran?;
    reset_path(tx, &saved).await?;
    out.tables = missing
        .into_iter()
        .map(|(s, n)| TableRef::new(s, n))
        .collect();
    Ok(out)
}

async fn relation_exists<C: GenericClient + Sync>(c: &C, schema: &str, name: &str) -> Result<bool> {
    Ok(c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = $1 AND c.relname = $2)",
        &[&schema, &name],
    )
    .await
    .with_context(|| format!("looking up {schema}.{name}"))?
    .get(0))
}

/// Whether the shared object `s` creates is already there.
async fn shared_exists<C: GenericClient + Sync>(c: &C, s: &DdlStatement) -> Result<bool> {
    let sql = match s.kind {
        DdlKind::Schema => {
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $2 AND $1 = $1)"
        }
        DdlKind::Extension => {
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = $2 AND $1 = $1)"
        }
        DdlKind::Type => {
            "SELECT EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                             WHERE n.nspname = $1 AND t.typname = $2)"
        }
        DdlKind::Sequence => return relation_exists(c, &s.schema, &s.name).await,
        // A comment on a shared type: made with the type.
        DdlKind::Comment => return Ok(false),
        _ => return Ok(false),
    };
    Ok(c.query_one(sql, &[&s.schema, &s.name])
        .await
        .with_context(|| format!("looking up {}.{}", s.schema, s.name))?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_golden_vector() {
        let ddl = SchemaDdl {
            statements: vec![DdlStatement {
                kind: DdlKind::Table,
                schema: "s".into(),
                name: "t".into(),
                table: Some(("s".into(), "t".into())),
                needed_by: Vec::new(),
                refers_to: None,
                sql: "CREATE TABLE s.t (id bigint)".into(),
            }],
        };
        let bytes = ddl.encode().unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "534e444c0100",                                               // SNDL, version 1
                "01",                                                         // one statement
                "04",                                                         // kind: table
                "0173",                                                       // schema "s"
                "0174",                                                       // name "t"
                "0101730174", // table: Some(("s", "t"))
                "00",         // needed_by: none
                "00",         // refers_to: none
                "1c435245415445205441424c4520732e742028696420626967696e7429", // sql
            )
        );
        assert_eq!(SchemaDdl::decode(&bytes).unwrap(), ddl);
        assert!(SchemaDdl::decode(&bytes[1..]).is_err());
        let mut v2 = bytes.clone();
        v2[4] = 2;
        assert!(
            SchemaDdl::decode(&v2)
                .unwrap_err()
                .to_string()
                .contains("version 2")
        );
    }
}
