//! The foreign keys a restore into live tables drops and re-adds (and so re-checks)
//! before it commits, and those it keeps: keys of tables outside the restore that
//! reference a restored table.

use sanare_core::Result;
use sanare_pg::PgResultExt;

/// A foreign key from or to a restored relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ForeignKey {
    /// The referencing table, as `regclass` prints it.
    pub(crate) table: String,
    /// The constraint's quoted name.
    pub(crate) name: String,
    /// `pg_get_constraintdef`: recreates it exactly (`NOT VALID`, `DEFERRABLE`, …).
    pub(crate) def: String,
    /// Whether the check may be forced to a merge anti-join of two index-only scans
    /// (see [`foreign_keys`]).
    pub(crate) merge_check: bool,
    /// Whether the referencing table is restored too (else the key is kept, and the
    /// referenced table is restored in place: see `restore::plan`).
    pub(crate) inside: bool,
    /// The referenced relation.
    pub(crate) parent: u32,
    /// The referenced relation, as `regclass` prints it.
    pub(crate) parent_name: String,
    /// The referencing columns, in key order.
    pub(crate) columns: Vec<String>,
    /// The referenced columns, in key order.
    pub(crate) parent_columns: Vec<String>,
    /// Whether the referencing table is a plain table (`ONLY` applies to it).
    pub(crate) child_plain: bool,
    /// Its comment, put back when it is re-added.
    pub(crate) comment: Option<String>,
}

/// The foreign keys from or to the relations `tree` (the restored relations and
/// their partitions), in creation order, and the transaction's `enable_hashjoin`
/// (to put back after a merge-planned check). Keys PostgreSQL cloned onto
/// partitions are left out: they follow the key they were cloned from.
///
/// When PostgreSQL adds a foreign key it checks every row with one anti-join
/// (`RI_Initial_Check`) that it plans like any query: on freshly loaded tables the
/// planner picks a hash anti-join over two sequential heap scans. Tables of `frozen`
/// were just loaded with `COPY … FREEZE`, which (PostgreSQL 14 and later) marks every
/// page all-visible; when both tables of a key are such and both have a B-tree index
/// leading with the key's columns (the parent's key, the child's own key or foreign
/// key index), a merge anti-join over two index-only scans reads the two (smaller,
/// already ordered) indexes instead of the heaps; measured on the order-service
/// fixture it takes about half the time (see `docs/PERFORMANCE.md`). `merge_check`
/// is set only when all of that holds; otherwise the planner chooses as usual. The
/// plan changes only the speed of the check, never its outcome.
pub(crate) async fn foreign_keys(
    tx: &impl tokio_postgres::GenericClient,
    tree: &[u32],
    frozen: &[u32],
) -> Result<(Vec<ForeignKey>, String)> {
    let rows = tx
        .query(
            &format!(
                "WITH tree AS (SELECT unnest($1::oid[]) AS oid),
                  frozen AS (SELECT unnest($2::oid[]) AS oid)
             SELECT c.conrelid::regclass::text, quote_ident(c.conname), pg_get_constraintdef(c.oid),
                    current_setting('server_version_num')::int >= 140000
                    AND c.conrelid IN (SELECT oid FROM frozen)
                    AND c.confrelid IN (SELECT oid FROM frozen)
                    AND {child_index}
                    AND {parent_index},
                    current_setting('enable_hashjoin'),
                    c.conrelid IN (SELECT oid FROM tree),
                    c.confrelid,
                    ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
                            JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n
                           ORDER BY k.o),
                    ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
                            JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n
                           ORDER BY k.o),
                    (SELECT relkind = 'r' FROM pg_class WHERE oid = c.conrelid),
                    obj_description(c.oid, 'pg_constraint'),
                    c.confrelid::regclass::text
               FROM pg_constraint c
              WHERE c.contype = 'f' AND c.conparentid = 0
                AND (c.conrelid IN (SELECT oid FROM tree) OR c.confrelid IN (SELECT oid FROM tree))
              ORDER BY c.oid",
                child_index = leading_btree_index("c.conrelid", "c.conkey"),
                parent_index = leading_btree_index("c.confrelid", "c.confkey"),
            ),
            &[&tree, &frozen],
        )
        .await
        .context("reading the foreign keys of the restored tables")?;
    let hashjoin = rows
        .first()
        .map_or_else(|| "on".to_owned(), |r| r.get::<_, String>(4));
    let keys = rows
        .iter()
        .map(|r| ForeignKey {
            table: r.get(0),
            name: r.get(1),
            def: r.get(2),
            merge_check: r.get(3),
            inside: r.get(5),
            parent: r.get(6),
            columns: r.get(7),
            parent_columns: r.get(8),
            child_plain: r.get(9),
            comment: r.get(10),
            parent_name: r.get(11),
        })
        .collect();
    Ok((keys, hashjoin))
}

/// SQL that is true when table `rel` has a valid, non-partial B-tree index whose
/// leading columns are the attribute numbers `key` (an `int2[]`), in that order.
fn leading_btree_index(rel: &str, key: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM pg_index i
                   JOIN pg_class ic ON ic.oid = i.indexrelid
                   JOIN pg_am am ON am.oid = ic.relam AND am.amname = 'btree'
                  WHERE i.indrelid = {rel} AND i.indisvalid AND i.indpred IS NULL
                    AND (SELECT array_agg(k ORDER BY o)
                           FROM unnest(i.indkey::int2[]) WITH ORDINALITY u(k, o)
                          WHERE o <= cardinality({key})) = {key})"
    )
}

impl ForeignKey {
    /// The statement that drops it.
    pub(crate) fn drop_sql(&self) -> String {
        format!(
            "ALTER TABLE {} DROP CONSTRAINT {};\n",
            self.table, self.name
        )
    }

    /// The statements that re-add it; `hashjoin` is the transaction's
    /// `enable_hashjoin`, put back after a merge-planned check.
    pub(crate) fn rebuild_sql(&self, hashjoin: &str) -> String {
        let add = format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {}",
            self.table, self.name, self.def
        );
        let add = if self.merge_check {
            format!(
                "SET LOCAL enable_hashjoin = off; {add}; SET LOCAL enable_hashjoin = {}",
                sanare_pg::quote_literal(hashjoin)
            )
        } else {
            add
        };
        match &self.comment {
            Some(c) => format!(
                "{add}; COMMENT ON CONSTRAINT {} ON {} IS {}",
                self.name,
                self.table,
                sanare_pg::quote_literal(c)
            ),
            None => add,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(merge_check: bool) -> ForeignKey {
        ForeignKey {
            table: "shop.order_lines".to_owned(),
            name: "order_lines_order_id_fkey".to_owned(),
            def: "FOREIGN KEY (order_id) REFERENCES shop.orders(id)".to_owned(),
            merge_check,
            inside: true,
            parent: 0,
            parent_name: "shop.orders".to_owned(),
            columns: vec!["order_id".to_owned()],
            parent_columns: vec!["id".to_owned()],
            child_plain: true,
            comment: None,
        }
    }

    #[test]
    fn a_merge_checked_key_turns_hash_joins_off_for_its_check_only() {
        assert_eq!(
            key(true).rebuild_sql("on"),
            "SET LOCAL enable_hashjoin = off; ALTER TABLE shop.order_lines ADD CONSTRAINT \
             order_lines_order_id_fkey FOREIGN KEY (order_id) REFERENCES shop.orders(id); \
             SET LOCAL enable_hashjoin = 'on'"
        );
        assert_eq!(
            key(false).rebuild_sql("on"),
            "ALTER TABLE shop.order_lines ADD CONSTRAINT order_lines_order_id_fkey \
             FOREIGN KEY (order_id) REFERENCES shop.orders(id)"
        );
        assert_eq!(
            key(true).drop_sql(),
            "ALTER TABLE shop.order_lines DROP CONSTRAINT order_lines_order_id_fkey;\n"
        );
        let mut commented = key(false);
        commented.comment = Some("lines of an order's".to_owned());
        assert_eq!(
            commented.rebuild_sql("on"),
            "ALTER TABLE shop.order_lines ADD CONSTRAINT order_lines_order_id_fkey \
             FOREIGN KEY (order_id) REFERENCES shop.orders(id); COMMENT ON CONSTRAINT \
             order_lines_order_id_fkey ON shop.order_lines IS 'lines of an order''s'"
        );
    }

    /// Which keys get the merge-planned check, against a real server: only those
    /// with both tables restored and plain and an index leading with the key's
    /// columns, in order, on each side.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_keys_with_ordered_indexes_on_both_restored_sides_get_a_merge_check() {
        let db = sanare_testing::test_db().await;
        let mut client = db.connect().await;
        client
            .batch_execute(
                "CREATE SCHEMA r;
                 CREATE TABLE r.parent (a int, b int, PRIMARY KEY (a, b));
                 CREATE TABLE r.other (id int PRIMARY KEY);
                 -- (a, b) leads its primary key: merge.
                 CREATE TABLE r.led (a int, b int, n int, PRIMARY KEY (a, b, n),
                     FOREIGN KEY (a, b) REFERENCES r.parent);
                 -- Its only index on the key columns is in the other order: no merge.
                 CREATE TABLE r.swapped (a int, b int, FOREIGN KEY (a, b) REFERENCES r.parent);
                 CREATE INDEX ON r.swapped (b, a);
                 -- No index on the key column: no merge.
                 CREATE TABLE r.bare (o int REFERENCES r.other);
                 -- A partial index does not count: no merge.
                 CREATE TABLE r.partial (o int REFERENCES r.other);
                 CREATE INDEX ON r.partial (o) WHERE o > 0;
                 -- An index on the key column: merge (when the parent is restored).
                 CREATE TABLE r.indexed (o int REFERENCES r.other);
                 CREATE INDEX ON r.indexed (o);",
            )
            .await
            .unwrap();
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .unwrap()
            .get(0);
        let oid = |t: &str| {
            let client = &client;
            let t = format!("r.{t}");
            async move {
                client
                    .query_one("SELECT $1::text::regclass::oid", &[&t])
                    .await
                    .unwrap()
                    .get::<_, u32>(0)
            }
        };
        let mut all = Vec::new();
        for t in [
            "parent", "other", "led", "swapped", "bare", "partial", "indexed",
        ] {
            all.push(oid(t).await);
        }
        let tx = client.transaction().await.unwrap();
        let (keys, hashjoin) = foreign_keys(&tx, &all, &all).await.unwrap();
        assert_eq!(hashjoin, "on");
        let merged: Vec<(&str, bool)> = keys
            .iter()
            .map(|k| (k.table.as_str(), k.merge_check))
            .collect();
        let v14 = version >= 140000;
        assert_eq!(
            merged,
            [
                ("r.led", v14),
                ("r.swapped", false),
                ("r.bare", false),
                ("r.partial", false),
                ("r.indexed", v14),
            ]
        );
        assert!(keys.iter().all(|k| k.inside));
        assert_eq!(keys[0].columns, ["a", "b"]);
        assert_eq!(keys[0].parent_columns, ["a", "b"]);
        // With the parents outside the restore, their pages are not known
        // all-visible, and the keys that reference them are still read.
        let children: Vec<u32> = all[2..].to_vec();
        let (keys, _) = foreign_keys(&tx, &children, &children).await.unwrap();
        assert_eq!(keys.len(), 5);
        assert!(keys.iter().all(|k| !k.merge_check), "{keys:?}");
        // With only the parents restored, every key is outside the restore.
        let (keys, _) = foreign_keys(&tx, &all[..2], &all[..2]).await.unwrap();
        assert_eq!(keys.len(), 5);
        assert!(keys.iter().all(|k| !k.inside && !k.merge_check), "{keys:?}");
        assert!(keys.iter().all(|k| all[..2].contains(&k.parent)));
        // The transaction's own setting is what comes back after the check.
        tx.batch_execute("SET LOCAL enable_hashjoin = off")
            .await
            .unwrap();
        let (_, hashjoin) = foreign_keys(&tx, &all, &all).await.unwrap();
        assert_eq!(hashjoin, "off");
        tx.rollback().await.unwrap();
    }
}
