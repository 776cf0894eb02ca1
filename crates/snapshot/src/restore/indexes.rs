//! The keys and indexes of replaced tables, dropped for the load and rebuilt after
//! it: building an index once over loaded rows is several times faster than
//! maintaining it row by row (see `docs/PERFORMANCE.md`).
//!
//! Only valid indexes are here (a table with an invalid one is restored in place,
//! see [`super::plan`]), and only keys no view depends on (a view grouping by a
//! primary key needs it to exist: such a key stays during the load). What an index
//! or key carries beyond its definition is put back with it: its comment, its
//! tablespace, the table's replica identity and cluster mark, the statistics
//! targets of its expression columns.

use sanare_core::Result;
use sanare_pg::{PgResultExt, quote_literal};
use tokio_postgres::Transaction;

use super::plan::{Plan, Step, comment_sql};

/// Adds to `plan` the drops (before the load) and rebuilds (after it) of the keys
/// and secondary indexes of the plain tables `tables` (oids).
pub(crate) async fn defer(tx: &Transaction<'_>, tables: &[u32], plan: &mut Plan) -> Result<()> {
    if tables.is_empty() {
        return Ok(());
    }
    let ctx = "reading the indexes and keys of the restored tables";
    let default_ts: String = tx
        .query_one("SELECT current_setting('default_tablespace')", &[])
        .await
        .context(ctx)?
        .get(0);
    // Keys: (table, name, definition, comment of the constraint, index facts).
    let keys = tx
        .query(
            &format!(
                "SELECT c.conrelid::regclass::text, quote_ident(c.conname),
                        pg_get_constraintdef(c.oid), obj_description(c.oid, 'pg_constraint'),
                        {facts}
                   FROM pg_constraint c
                   JOIN pg_index i ON i.indexrelid = c.conindid
                   JOIN pg_class ic ON ic.oid = i.indexrelid
                  WHERE c.contype IN ('p', 'u', 'x') AND c.conrelid = ANY($1::oid[])
                    AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                     WHERE d.refclassid = 'pg_constraint'::regclass
                                       AND d.refobjid = c.oid
                                       AND d.classid = 'pg_rewrite'::regclass)
                  ORDER BY c.oid",
                facts = INDEX_FACTS
            ),
            &[&tables],
        )
        .await
        .context(ctx)?;
    let indexes = tx
        .query(
            &format!(
                "SELECT i.indrelid::regclass::text, pg_get_indexdef(i.indexrelid), {facts}
                   FROM pg_index i
                   JOIN pg_class ic ON ic.oid = i.indexrelid
                  WHERE i.indrelid = ANY($1::oid[])
                    AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid
                                       AND c.contype IN ('p', 'u', 'x'))
                  ORDER BY i.indexrelid",
                facts = INDEX_FACTS
            ),
            &[&tables],
        )
        .await
        .context(ctx)?;
    // Rebuilt in order: keys first (indexes may not need them, foreign keys do).
    for r in &keys {
        let (table, name, def, comment): (String, String, String, Option<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let facts = IndexFacts::read(r, 4);
        plan.before.push(Step {
            what: format!("dropping constraint {name} of {table} for the load"),
            table: table.clone(),
            sql: format!("ALTER TABLE {table} DROP CONSTRAINT {name}"),
        });
        let create = format!("ALTER TABLE {table} ADD CONSTRAINT {name} {def}");
        let sql = format!(
            "{}{}{}",
            facts.in_tablespace(&create, &default_ts),
            comment_sql("CONSTRAINT", &format!("{name} ON {table}"), comment),
            facts.extras(&table)
        );
        plan.after.push(Step {
            what: format!("rebuilding constraint {name} of {table}"),
            table,
            sql,
        });
    }
    for r in &indexes {
        let (table, def): (String, String) = (r.get(0), r.get(1));
        let facts = IndexFacts::read(r, 2);
        plan.before.push(Step {
            what: format!("dropping index {} for the load", facts.index),
            table: table.clone(),
            sql: format!("DROP INDEX {}", facts.index),
        });
        let sql = format!(
            "{}{}",
            facts.in_tablespace(&def, &default_ts),
            facts.extras(&table)
        );
        plan.after.push(Step {
            what: format!("rebuilding index {}", facts.index),
            table,
            sql,
        });
    }
    Ok(())
}

/// The columns [`IndexFacts::read`] reads, of index `i` (pg_index) and `ic` (its
/// pg_class row).
const INDEX_FACTS: &str = "i.indexrelid::regclass::text, quote_ident(ic.relname),
    obj_description(i.indexrelid, 'pg_class'),
    (SELECT spcname FROM pg_tablespace WHERE oid = ic.reltablespace),
    i.indisreplident, i.indisclustered,
    ARRAY(SELECT format('%s %s', a.attnum, a.attstattarget) FROM pg_attribute a
           WHERE a.attrelid = i.indexrelid AND a.attstattarget >= 0 ORDER BY a.attnum)";

/// What an index carries beyond its definition.
struct IndexFacts {
    /// As `regclass` prints it.
    index: String,
    /// Its bare quoted name (for `USING INDEX`, `CLUSTER ON`).
    bare: String,
    comment: Option<String>,
    tablespace: Option<String>,
    replica_identity: bool,
    clustered: bool,
    /// `attnum target` of columns with a statistics target.
    statistics: Vec<String>,
}

impl IndexFacts {
    fn read(r: &tokio_postgres::Row, at: usize) -> Self {
        Self {
            index: r.get(at),
            bare: r.get(at + 1),
            comment: r.get(at + 2),
            tablespace: r.get(at + 3),
            replica_identity: r.get(at + 4),
            clustered: r.get(at + 5),
            statistics: r.get(at + 6),
        }
    }

    /// `create` run with `default_tablespace` set to the index's tablespace, if it
    /// has its own, and put back to `default` after.
    fn in_tablespace(&self, create: &str, default: &str) -> String {
        match &self.tablespace {
            Some(ts) => format!(
                "SET LOCAL default_tablespace = {}; {create}; SET LOCAL default_tablespace = {}",
                quote_literal(ts),
                quote_literal(default)
            ),
            None => create.to_owned(),
        }
    }

    /// The statements after the creation that put back the rest.
    fn extras(&self, table: &str) -> String {
        let mut out = comment_sql("INDEX", &self.index, self.comment.clone());
        for s in &self.statistics {
            if let Some((col, target)) = s.split_once(' ') {
                out.push_str(&format!(
                    "; ALTER INDEX {} ALTER COLUMN {col} SET STATISTICS {target}",
                    self.index
                ));
            }
        }
        if self.replica_identity {
            out.push_str(&format!(
                "; ALTER TABLE {table} REPLICA IDENTITY USING INDEX {}",
                self.bare
            ));
        }
        if self.clustered {
            out.push_str(&format!("; ALTER TABLE {table} CLUSTER ON {}", self.bare));
        }
        out
    }
}
