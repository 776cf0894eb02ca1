//! The statements of an in-place restore (see [`super::plan`]): the snapshot's rows
//! go to a temporary table; rows whose key the snapshot no longer has are deleted,
//! the others inserted, or updated where they differ, by key. Unchanged rows are
//! not written, the table is never emptied, and its indexes keep their state.
//!
//! Before anything is deleted, each foreign key of a table outside the restore that
//! references the table is checked for a row that would lose what it references
//! (a key deleted, or a referenced column changed): the restore then fails, naming
//! the table, the key and the row, and changes nothing. Those tables are locked
//! against writes (`SHARE`) first, so no row can start referencing a key between
//! the check and the delete; readers are not blocked.

use sanare_pg::quote_ident;

use super::keys::ForeignKey;
use super::plan::Relation;

/// The statements restoring `rel` in place.
#[derive(Debug)]
pub(crate) struct InPlace<'a> {
    rel: &'a Relation,
    /// The captured columns, quoted, in COPY order.
    columns: Vec<String>,
    temp: String,
}

impl<'a> InPlace<'a> {
    /// For relation `rel` with the captured `columns`; `n` makes the temporary
    /// table's name unique in the transaction.
    pub(crate) fn new(rel: &'a Relation, columns: &[String], n: usize) -> Self {
        Self {
            rel,
            columns: columns.iter().map(|c| quote_ident(c)).collect(),
            temp: format!("sanare_restore_{n}"),
        }
    }

    fn cols(&self) -> String {
        self.columns.join(", ")
    }

    fn target(&self) -> String {
        format!("{}{}", self.rel.only(), self.rel.name)
    }

    /// Locks the relation against writes for the rest of the transaction.
    pub(crate) fn lock(&self) -> String {
        format!("LOCK TABLE {} IN EXCLUSIVE MODE", self.target())
    }

    /// Locks the referencing table of `fk` against writes.
    pub(crate) fn lock_referencing(fk: &ForeignKey) -> String {
        let only = if fk.child_plain { "ONLY " } else { "" };
        format!("LOCK TABLE {only}{} IN SHARE MODE", fk.table)
    }

    /// Creates the temporary table, with the live table's column types.
    pub(crate) fn create_temp(&self) -> String {
        format!(
            "CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA",
            self.temp,
            self.cols(),
            self.target()
        )
    }

    /// The binary `COPY` into the temporary table.
    pub(crate) fn copy_to_temp(&self) -> String {
        format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            self.temp,
            self.cols()
        )
    }

    /// The binary `COPY` straight into the relation (after [`InPlace::delete_all`]).
    pub(crate) fn copy_to_table(&self) -> String {
        format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            self.rel.name,
            self.cols()
        )
    }

    /// Deletes every row (a restore in place without a key).
    pub(crate) fn delete_all(&self) -> String {
        format!("DELETE FROM {}", self.target())
    }

    /// A query returning, for the first row of `fk`'s table that references a key
    /// the restore would delete or change, the referenced and referencing values as
    /// text; no row when there is none.
    pub(crate) fn lost_reference(&self, fk: &ForeignKey) -> String {
        let only = if fk.child_plain { "ONLY " } else { "" };
        let child: Vec<String> = fk.columns.iter().map(|c| quote_ident(c)).collect();
        let parent: Vec<String> = fk.parent_columns.iter().map(|c| quote_ident(c)).collect();
        let list = |alias: &str, cols: &[String]| {
            cols.iter()
                .map(|c| format!("{alias}.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let text = |alias: &str, cols: &[String]| {
            cols.iter()
                .map(|c| format!("{alias}.{c}::text"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "SELECT concat_ws(', ', {child_text}) FROM {only}{table} c
              WHERE ({child_list}) IN (SELECT {t_list} FROM {target} t
                                        EXCEPT SELECT {s_list} FROM {temp} s)
              LIMIT 1",
            child_text = text("c", &child),
            table = fk.table,
            child_list = list("c", &child),
            t_list = list("t", &parent),
            s_list = list("s", &parent),
            target = self.target(),
            temp = self.temp,
        )
    }

    /// Deletes the rows whose `key` the snapshot does not have.
    pub(crate) fn delete_gone(&self, key: &[String]) -> String {
        let on = key
            .iter()
            .map(|k| {
                let k = quote_ident(k);
                format!("s.{k} = t.{k}")
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        format!(
            "DELETE FROM {} t WHERE NOT EXISTS (SELECT 1 FROM {} s WHERE {on})",
            self.target(),
            self.temp
        )
    }

    /// Inserts the snapshot's rows, updating by `key` those that exist and differ
    /// (compared by their text forms, which every type has).
    pub(crate) fn upsert(&self, key: &[String]) -> String {
        let key_q: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
        let rest: Vec<&String> = self.columns.iter().filter(|c| !key_q.contains(c)).collect();
        let action = if rest.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            let set = rest
                .iter()
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect::<Vec<_>>()
                .join(", ");
            let old = rest
                .iter()
                .map(|c| format!("t.{c}::text"))
                .collect::<Vec<_>>()
                .join(", ");
            let new = rest
                .iter()
                .map(|c| format!("EXCLUDED.{c}::text"))
                .collect::<Vec<_>>()
                .join(", ");
            format!("DO UPDATE SET {set} WHERE ROW({old}) IS DISTINCT FROM ROW({new})")
        };
        format!(
            "INSERT INTO {} AS t ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM {}
             ON CONFLICT ({}) {action}",
            self.rel.name,
            self.temp,
            key_q.join(", "),
            cols = self.cols(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::plan::Method;
    use super::*;

    fn rel(plain: bool) -> Relation {
        Relation {
            oid: 1,
            name: "shop.customers".into(),
            plain,
            method: Method::Reload,
        }
    }

    #[test]
    fn statements_quote_columns_and_respect_inheritance() {
        let r = rel(true);
        let m = InPlace::new(&r, &["id".into(), "full name".into()], 3);
        assert_eq!(
            m.create_temp(),
            "CREATE TEMP TABLE sanare_restore_3 ON COMMIT DROP AS SELECT \"id\", \"full name\" \
             FROM ONLY shop.customers WITH NO DATA"
        );
        assert_eq!(
            m.delete_gone(&["id".into()]),
            "DELETE FROM ONLY shop.customers t WHERE NOT EXISTS (SELECT 1 FROM sanare_restore_3 s \
             WHERE s.\"id\" = t.\"id\")"
        );
        let up = m.upsert(&["id".into()]);
        assert!(
            up.contains(
                "ON CONFLICT (\"id\") DO UPDATE SET \"full name\" = EXCLUDED.\"full name\""
            ),
            "{up}"
        );
        assert!(up.contains("IS DISTINCT FROM"), "{up}");
        // Every column in the key: nothing to update.
        let m = InPlace::new(&r, &["id".into()], 3);
        assert!(m.upsert(&["id".into()]).ends_with("DO NOTHING"));
        // A partitioned table is its partitions.
        let p = rel(false);
        assert_eq!(
            InPlace::new(&p, &["id".into()], 1).delete_all(),
            "DELETE FROM shop.customers"
        );
    }
}
