//! The relations a physical check covers: every leaf partition of a table (or the
//! table), its TOAST table, and the valid B-tree indexes of both.

use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

use sanare_core::{Result, TableRef};
use sanare_pg::PgResultExt;

/// What a relation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RelationKind {
    /// A table's heap (a partition's, for a partitioned table).
    Heap,
    /// A table's TOAST table (its out-of-line values).
    Toast,
    /// A B-tree index (of a heap or of a TOAST table).
    Index,
}

/// One relation to check.
#[derive(Clone, Debug)]
pub(crate) struct Relation {
    pub(crate) oid: u32,
    /// `schema.name`, unquoted (as messages print it).
    pub(crate) name: String,
    pub(crate) kind: RelationKind,
    /// The table it belongs to: the leaf partition, or the table itself.
    pub(crate) table: TableRef,
    /// Index of the logical table (as the caller listed it) in the check.
    pub(crate) owner: usize,
    /// For an index: the oid of the heap or TOAST table it indexes.
    pub(crate) indexed: Option<u32>,
    pub(crate) blocks: i64,
    /// Its file path relative to the data directory (as the server's "invalid page
    /// in block N of relation PATH" names it).
    pub(crate) path: Option<String>,
}

/// The relations of the table with oid `table_oid` (the caller's `owner`-th table).
pub(crate) async fn relations_of(
    client: &impl GenericClient,
    table_oid: u32,
    owner: usize,
) -> Result<Vec<Relation>> {
    let rows = client
        .query(
            "WITH leaves AS (
                SELECT c.oid
                  FROM (SELECT relid FROM pg_partition_tree($1::oid::regclass) WHERE isleaf
                        UNION SELECT $1::oid) p
                  JOIN pg_class c ON c.oid = p.relid
                 WHERE c.relkind IN ('r', 'm')),
             heaps AS (
                SELECT l.oid, l.oid AS leaf, 'heap' AS kind FROM leaves l
                UNION ALL
                SELECT c.reltoastrelid, l.oid, 'toast' FROM leaves l
                  JOIN pg_class c ON c.oid = l.oid WHERE c.reltoastrelid <> 0),
             indexes AS (
                SELECT i.indexrelid AS oid, h.leaf, 'index' AS kind, h.oid AS indexed
                  FROM heaps h JOIN pg_index i ON i.indrelid = h.oid
                  JOIN pg_class ic ON ic.oid = i.indexrelid
                  JOIN pg_am a ON a.oid = ic.relam
                 WHERE a.amname = 'btree' AND i.indisvalid AND i.indisready)
             SELECT r.oid, n.nspname || '.' || c.relname, r.kind, ln.nspname::text,
                    lc.relname::text, r.indexed,
                    pg_relation_size(r.oid) / current_setting('block_size')::bigint,
                    pg_relation_filepath(r.oid)
               FROM (SELECT oid, leaf, kind, NULL::oid AS indexed FROM heaps
                     UNION ALL SELECT * FROM indexes) r
               JOIN pg_class c ON c.oid = r.oid JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_class lc ON lc.oid = r.leaf JOIN pg_namespace ln ON ln.oid = lc.relnamespace
              ORDER BY r.kind = 'index', 2",
            &[&table_oid],
        )
        .await
        .context("listing the relations of a table")?;
    Ok(rows
        .iter()
        .map(|r| {
            let kind: &str = r.get(2);
            Relation {
                oid: r.get(0),
                name: r.get(1),
                kind: match kind {
                    "heap" => RelationKind::Heap,
                    "toast" => RelationKind::Toast,
                    _ => RelationKind::Index,
                },
                table: TableRef::new(r.get::<_, String>(3), r.get::<_, String>(4)),
                owner,
                indexed: r.get(5),
                blocks: r.get(6),
                path: r.get(7),
            }
        })
        .collect())
}

/// The block and relation path named by PostgreSQL's "invalid page in block N of
/// relation PATH" (and "could not read block N in file "PATH"…").
pub(crate) fn block_and_path(message: &str) -> Option<(i64, Option<String>)> {
    let rest = &message[message.find("block ")? + "block ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let block = digits.parse().ok()?;
    let path = ["of relation ", "in file \""]
        .iter()
        .find_map(|marker| {
            let at = rest.find(marker)? + marker.len();
            Some(
                rest[at..]
                    .split(['"', ' ', ':'])
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .filter(|p| !p.is_empty());
    Some((block, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_and_file_of_a_page_error_are_read_from_its_message() {
        assert_eq!(
            block_and_path("invalid page in block 3 of relation base/16384/16385"),
            Some((3, Some("base/16384/16385".into())))
        );
        assert_eq!(
            block_and_path(
                "could not read block 12 in file \"base/1/2\": read only 0 of 8192 bytes"
            ),
            Some((12, Some("base/1/2".into())))
        );
        assert_eq!(
            block_and_path("index \"x\" contains unexpected zero page at block 7"),
            Some((7, None))
        );
        assert_eq!(block_and_path("no block here"), None);
    }
}
