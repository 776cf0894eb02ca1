//! Helpers of the restore into live tables: which foreign keys the restore drops
//! and how each is re-added (and so re-checked) before the commit.

use sanare_core::Result;
use sanare_pg::PgResultExt;

/// A foreign key dropped for a restore and re-added (checked in one pass over the
/// loaded rows) before it commits.
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
}

/// The foreign keys from or to `tables`, in creation order, and the transaction's
/// `enable_hashjoin` (to put back after a merge-planned check).
///
/// When PostgreSQL adds a foreign key it checks every row with one anti-join
/// (`RI_Initial_Check`) that it plans like any query: on freshly loaded tables the
/// planner picks a hash anti-join over two sequential heap scans. Both tables were
/// just loaded with `COPY … FREEZE`, which (PostgreSQL 14 and later) marks every page
/// all-visible, and both have a B-tree index leading with the key's columns (the
/// parent's key, the child's own key or foreign key index), so a merge anti-join
/// over two index-only scans reads the two (smaller, already ordered) indexes instead
/// of the heaps; measured on the order-service fixture it takes about half the time
/// (see `docs/PERFORMANCE.md`). `merge_check` is set only when all of that holds:
/// server 14 or later, both tables restored here and plain (so loaded with FREEZE),
/// and such an index on each side; otherwise the planner chooses as usual. The plan
/// changes only the speed of the check, never its outcome.
pub(crate) async fn foreign_keys(
    tx: &tokio_postgres::Transaction<'_>,
    tables: &[String],
) -> Result<(Vec<ForeignKey>, String)> {
    let rows = tx
        .query(
            &format!(
            "WITH restored AS (SELECT unnest($1::text[]::regclass[])::oid AS oid)
             SELECT c.conrelid::regclass::text, quote_ident(c.conname), pg_get_constraintdef(c.oid),
                    current_setting('server_version_num')::int >= 140000
                    AND c.conrelid IN (SELECT oid FROM restored)
                    AND c.confrelid IN (SELECT oid FROM restored)
                    AND (SELECT relkind FROM pg_class WHERE oid = c.conrelid) = 'r'
                    AND (SELECT relkind FROM pg_class WHERE oid = c.confrelid) = 'r'
                    AND {child_index}
                    AND {parent_index},
                    current_setting('enable_hashjoin')
               FROM pg_constraint c
              WHERE c.contype = 'f'
                AND (c.conrelid IN (SELECT oid FROM restored) OR c.confrelid IN (SELECT oid FROM restored))
              ORDER BY c.oid",
            child_index = leading_btree_index("c.conrelid", "c.conkey"),
            parent_index = leading_btree_index("c.confrelid", "c.confkey"),
            ),
            &[&tables],
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
        if self.merge_check {
            format!(
                "SET LOCAL enable_hashjoin = off; {add}; SET LOCAL enable_hashjoin = {}",
                sanare_pg::quote_literal(hashjoin)
            )
        } else {
            add
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
        let tx = client.transaction().await.unwrap();
        let all: Vec<String> = [
            "parent", "other", "led", "swapped", "bare", "partial", "indexed",
        ]
        .iter()
        .map(|t| format!("r.{t}"))
        .collect();
        let (keys, hashjoin) = foreign_keys(&tx, &all).await.unwrap();
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
        // With the parent outside the restore, its pages are not known all-visible.
        let children: Vec<String> = all[2..].to_vec();
        let (keys, _) = foreign_keys(&tx, &children).await.unwrap();
        assert_eq!(keys.len(), 5);
        assert!(keys.iter().all(|k| !k.merge_check), "{keys:?}");
        // The transaction's own setting is what comes back after the check.
        tx.batch_execute("SET LOCAL enable_hashjoin = off")
            .await
            .unwrap();
        let (_, hashjoin) = foreign_keys(&tx, &all).await.unwrap();
        assert_eq!(hashjoin, "off");
        tx.rollback().await.unwrap();
    }
}
