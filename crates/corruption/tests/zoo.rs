//! Every scan over the schema zoo (partitions, inheritance, composite and sparse
//! keys, every kind of value), with row checksums kept by the SQL trigger: clean
//! under every session setting a database or a role may impose, and planted damage
//! found exactly.

mod common;

use std::sync::Arc;

use common::FakeSnapshots;
use sanare_core::{Control, CorruptionKind, TableRef};
use sanare_corruption::{CorruptionDetector, DetectorConfig, IssueQuery};
use sanare_pg::SchemaName;
use sanare_testing::{TestDb, test_db, zoo};

/// The zoo tables that get a checksum column: those with a primary key, as the
/// application sees them (partitioned tables, not their partitions; an inheritance
/// child on its own).
fn checksummed() -> Vec<TableRef> {
    [
        ("zoo", "events"),
        ("zoo", "regions"),
        ("zoo", "vehicles"),
        ("zoo", "cars"),
        ("zoo", "typed"),
        ("zoo", "accounts"),
        ("zoo", "orders"),
        ("zoo", "order_items"),
        ("zoo", "bookings"),
        ("zoo", "never_analyzed"),
        ("zoo", "ledger"),
        ("Zoo Schema", "MixedCase Table"),
        ("Zoo Schema", "child Rows"),
    ]
    .iter()
    .map(|(s, n)| TableRef::new(*s, *n))
    .collect()
}

/// The zoo, plus a table of this crate's own (`money`, which `lc_monetary` prints,
/// and a composite integer key), every table above with a `row_checksum` kept by
/// the SQL trigger and backfilled; installed under PostgreSQL's default settings.
async fn checksummed_zoo(db: &TestDb) {
    let mut c = db.connect().await;
    zoo::install(&c).await.expect("install the zoo");
    c.batch_execute(
        "CREATE TABLE zoo.ledger (book int, line int, amount money, note text,
                                  PRIMARY KEY (book, line));
         INSERT INTO zoo.ledger SELECT b, l, (b * 1000 + l) / 7.0, 'line ' || l
           FROM generate_series(1, 5) b, generate_series(1, 20) l;",
    )
    .await
    .unwrap();
    let schema = SchemaName::default();
    sanare_integrity::migrate(&mut c, &schema).await.unwrap();
    for t in checksummed() {
        if t.name != "cars" {
            // Added to a parent, the column reaches its partitions and children.
            c.batch_execute(&format!(
                "ALTER TABLE {} ADD COLUMN row_checksum bytea",
                t.quoted()
            ))
            .await
            .unwrap();
        }
    }
    for t in checksummed() {
        sanare_integrity::install_checksum_trigger(&c, &schema, &t, "row_checksum", true)
            .await
            .unwrap_or_else(|e| panic!("{t}: {e}"));
    }
    c.batch_execute("ANALYZE zoo.ledger").await.unwrap();
}

fn detector(pool: &sanare_pg::Pool, config: DetectorConfig) -> CorruptionDetector {
    CorruptionDetector::builder()
        .pool(pool.clone())
        .checksum(Arc::new(sanare_integrity::Checksummer::sha256()))
        .config(config)
        .build()
        .unwrap()
}

fn pool_as(url: &str, max: usize) -> sanare_pg::Pool {
    sanare_pg::connect_pool(url, max).unwrap()
}

/// Rows of the checksummed tables, counted by SQL alone.
async fn expected_rows(c: &tokio_postgres::Client) -> u64 {
    let mut n = 0;
    for t in checksummed() {
        let only = if t.name == "vehicles" { "ONLY " } else { "" };
        let rows: i64 = c
            .query_one(&format!("SELECT count(*) FROM {only}{}", t.quoted()), &[])
            .await
            .unwrap()
            .get(0);
        n += u64::try_from(rows).unwrap();
    }
    n
}

/// The settings to run under: the zoo's, a non-C `lc_numeric` and `lc_monetary`
/// when the server has such a locale, and all of them at once.
async fn settings(c: &tokio_postgres::Client) -> Vec<Vec<(String, String)>> {
    let mut one: Vec<(String, String)> = zoo::SESSION_SETTINGS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    if let Some(locale) = zoo::lc_numeric(c).await {
        one.push(("lc_numeric".into(), format!("'{locale}'")));
        one.push(("lc_monetary".into(), format!("'{locale}'")));
    }
    let mut all: Vec<Vec<(String, String)>> = one.iter().map(|s| vec![s.clone()]).collect();
    all.push(one);
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_zoo_scans_clean_under_every_database_and_role_setting() {
    let db = test_db().await;
    checksummed_zoo(&db).await;
    let admin = db.connect().await;
    let role = format!("zoo_{}", &db.name()[db.name().len() - 8..]);
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN SUPERUSER"))
        .await
        .unwrap();
    let mut cfg = DetectorConfig::default();
    cfg.chunk_blocks = 2; // several chunks per table and per partition
    let det = detector(db.pool(), cfg.clone());
    det.migrate().await.unwrap();
    for t in checksummed() {
        det.capture_baseline(&t).await.unwrap();
    }
    let role_url = format!("postgres://{role}@{}", db.url().split('@').nth(1).unwrap());

    for set in settings(&admin).await {
        for (target, url) in [
            (format!("DATABASE \"{}\"", db.name()), db.url().to_owned()),
            (format!("ROLE {role}"), role_url.clone()),
        ] {
            for (k, v) in &set {
                admin
                    .batch_execute(&format!("ALTER {target} SET {k} = {v}"))
                    .await
                    .unwrap();
            }
            let what = format!("{target} with {set:?}");
            let pool = pool_as(&url, 4);
            // The setting reaches every new session of that pool.
            let (k, v) = &set[0];
            let seen: String = pool
                .get()
                .await
                .unwrap()
                .query_one(&format!("SELECT current_setting('{k}')"), &[])
                .await
                .unwrap()
                .get(0);
            assert!(
                seen.eq_ignore_ascii_case(v.trim_matches('\'')),
                "{what}: {seen}"
            );
            // The application writes under it: the trigger recomputes checksums of
            // timestamps, intervals, bytea, floats and money in a session that
            // prints them differently (the trigger prints canonically).
            pool.get()
                .await
                .unwrap()
                .batch_execute(
                    "UPDATE zoo.typed SET label = label WHERE id % 3 = 0;
                     UPDATE zoo.events SET kind = kind WHERE id % 5 = 0;
                     UPDATE zoo.ledger SET amount = amount WHERE line % 2 = 0;
                     INSERT INTO zoo.bookings (id, during)
                       SELECT max(id) + 1, tstzrange(timestamptz '2030-01-01 00:00:00+00' + max(id) * interval '2 hours',
                                                     timestamptz '2030-01-01 01:00:00+00' + max(id) * interval '2 hours')
                         FROM zoo.bookings;",
                )
                .await
                .unwrap();
            let expected = expected_rows(&admin).await;
            let det = detector(&pool, cfg.clone());
            let report = det.scan_all(&Control::detached()).await.unwrap();
            assert!(report.issues.is_empty(), "{what}: {:#?}", report.issues);
            assert!(
                report.table_wide.is_empty(),
                "{what}: {:?}",
                report.table_wide
            );
            assert_eq!(report.suspects, 0, "{what}");
            assert_eq!(report.rows_scanned, expected, "{what}");
            assert_eq!(report.tables_scanned.len(), checksummed().len(), "{what}");
            // Statistics captured under the defaults do not drift under it.
            if set.len() > 1 {
                for t in checksummed() {
                    let drift = det.check_statistics(&t).await.unwrap();
                    assert!(drift.is_empty(), "{what}: {drift:#?}");
                }
            }
            drop(det);
            drop(pool);
            admin
                .batch_execute(&format!("ALTER {target} RESET ALL"))
                .await
                .unwrap();
        }
    }
    assert!(det.issues(&IssueQuery::new()).await.unwrap().is_empty());
    admin
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_partitions_children_and_quoted_tables_is_found_exactly() {
    let db = test_db().await;
    checksummed_zoo(&db).await;
    let c = db.connect().await;
    c.batch_execute(&format!(
        "ALTER DATABASE \"{}\" SET DateStyle = 'SQL, DMY'",
        db.name()
    ))
    .await
    .unwrap();
    // Behind the trigger's back: a sub-partition's row, an inheritance child's
    // row, a quoted table's row.
    c.batch_execute(
        "SET session_replication_role = replica;
         UPDATE zoo.events SET kind = 'tampered' WHERE id = 333;
         UPDATE zoo.cars SET doors = 9 WHERE id = 1005;
         UPDATE \"Zoo Schema\".\"MixedCase Table\" SET \"Display Name\" = 'x' WHERE \"Id\" = 7;
         RESET session_replication_role;",
    )
    .await
    .unwrap();
    let mut cfg = DetectorConfig::default();
    cfg.chunk_blocks = 1;
    let det = detector(db.pool(), cfg);
    det.migrate().await.unwrap();
    let report = det.scan_all(&Control::detached()).await.unwrap();
    let mut found: Vec<(String, String)> = report
        .issues
        .iter()
        .map(|i| {
            (
                i.table.to_string(),
                i.row.as_ref().unwrap().key[0].value.clone().unwrap(),
            )
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("Zoo Schema.MixedCase Table".to_owned(), "7".to_owned()),
            ("zoo.cars".into(), "1005".into()),
            ("zoo.events".into(), "333".into()),
        ]
    );
    // The partitioned table's row is named by its key, created_at included,
    // printed canonically whatever the session's DateStyle.
    let ev = report
        .issues
        .iter()
        .find(|i| i.table.name == "events")
        .unwrap();
    let key = &ev.row.as_ref().unwrap().key;
    assert_eq!(key[1].column, "created_at");
    assert!(
        key[1].value.as_deref().unwrap().starts_with("2025-"),
        "{key:?}"
    );
    assert_eq!(report.suspects, 3);
    // Chunks: several per partition, the sub-partitions each read.
    assert!(report.chunks > 20, "{}", report.chunks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_work_on_every_zoo_table_and_type() {
    let db = test_db().await;
    let c = db.connect().await;
    zoo::install(&c).await.unwrap();
    let det = detector(db.pool(), DetectorConfig::default());
    det.migrate().await.unwrap();
    for t in zoo::TABLES {
        let table = TableRef::new(t.schema, t.name);
        let stats = det
            .capture_baseline(&table)
            .await
            .unwrap_or_else(|e| panic!("{table}: {e}"));
        // An inheritance parent's statistics are of its own rows (its children
        // are tables of their own).
        let rows = if t.name == "vehicles" { 40 } else { t.rows };
        assert_eq!(stats.row_count, rows, "{table}");
        assert!(det.check_statistics(&table).await.unwrap().is_empty());
    }
    let typed = det
        .table_stats(&TableRef::new("zoo", "typed"))
        .await
        .unwrap();
    // Numbers have a range; an integer array, json, xml and point do not, and
    // their distinct values are still counted.
    assert_eq!(typed.columns["small"].min, Some(0.0));
    assert_eq!(typed.columns["small"].max, Some(6.0));
    assert_eq!(
        typed.columns["positive"].max,
        Some(119.0),
        "a domain over integer"
    );
    for col in ["scores", "doc", "legacy_doc", "markup", "spot"] {
        assert_eq!(typed.columns[col].min, None, "{col}");
        assert_eq!(typed.columns[col].distinct, 120, "{col}");
    }
    assert_eq!(typed.columns["mood"].distinct, 4);
    // An inheritance parent without its children; a partitioned table with its
    // partitions.
    let vehicles = det
        .table_stats(&TableRef::new("zoo", "vehicles"))
        .await
        .unwrap();
    assert_eq!(vehicles.row_count, 40);
    let events = det
        .table_stats(&TableRef::new("zoo", "events"))
        .await
        .unwrap();
    assert_eq!(events.row_count, 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_are_found_on_sparse_and_composite_keys_and_refused_clearly_otherwise() {
    let db = test_db().await;
    let c = db.connect().await;
    zoo::install(&c).await.unwrap();
    c.batch_execute(
        "CREATE TABLE zoo.ledger (book int, line int, note text, PRIMARY KEY (book, line));
         INSERT INTO zoo.ledger SELECT b, l, 'line ' || l FROM generate_series(1, 5) b, generate_series(1, 20) l;
         CREATE TABLE zoo.huge_keys (id bigint PRIMARY KEY, v text);
         INSERT INTO zoo.huge_keys VALUES (1, 'a'), (4000000000000000000, 'b'), (9000000000000000000, 'c');",
    )
    .await
    .unwrap();
    let snaps = Arc::new(FakeSnapshots::default());
    let tables = [
        ("zoo", "never_analyzed"),
        ("zoo", "ledger"),
        ("zoo", "events"),
        ("zoo", "huge_keys"),
        ("zoo", "typed"),
    ];
    for (s, n) in tables {
        snaps.capture_table(&c, &TableRef::new(s, n)).await;
    }
    let mut cfg = DetectorConfig::default();
    cfg.deletion_probe_limit = 2_000;
    let det = CorruptionDetector::builder()
        .pool(db.pool().clone())
        .checksum(Arc::new(sanare_integrity::Checksummer::sha256()))
        .snapshots(snaps)
        .config(cfg)
        .build()
        .unwrap();
    det.migrate().await.unwrap();
    c.batch_execute(
        "SET session_replication_role = replica;
         DELETE FROM zoo.never_analyzed WHERE id IN (5000, 173000, 400000);
         DELETE FROM zoo.ledger WHERE (book, line) IN ((2, 7), (4, 20));
         DELETE FROM zoo.typed WHERE id = 64;
         DELETE FROM zoo.huge_keys WHERE id = 4000000000000000000;
         RESET session_replication_role;",
    )
    .await
    .unwrap();
    let keys = |issues: &[sanare_corruption::CorruptionIssue]| -> Vec<String> {
        let mut k: Vec<String> = issues
            .iter()
            .map(|i| {
                assert_eq!(i.kind, CorruptionKind::Deletion);
                i.row.as_ref().unwrap().to_string()
            })
            .collect();
        k.sort();
        k
    };
    // Keys spaced by 1,000, never analysed: probed at multiples of 1,000; the last
    // one found past the largest key.
    let found = det
        .check_deletions(
            &TableRef::new("zoo", "never_analyzed"),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 3, "{:?}", keys(&found));
    // A composite key: gaps within each book.
    let found = det
        .check_deletions(&TableRef::new("zoo", "ledger"), &Control::detached())
        .await
        .unwrap();
    let k = keys(&found);
    assert_eq!(k.len(), 2, "{k:?}");
    assert!(k[0].contains("book=2") && k[0].contains("line=7"), "{k:?}");
    assert!(k[1].contains("book=4") && k[1].contains("line=20"), "{k:?}");
    let found = det
        .check_deletions(&TableRef::new("zoo", "typed"), &Control::detached())
        .await
        .unwrap();
    assert_eq!(keys(&found).len(), 1);
    // Keys trillions apart: the probe stays within its limit and returns.
    let started = std::time::Instant::now();
    det.check_deletions(&TableRef::new("zoo", "huge_keys"), &Control::detached())
        .await
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // A partitioned table with a composite key runs (its rows' other key values are
    // gone with them, so there is nothing to enumerate, and nothing is invented).
    let found = det
        .check_deletions(&TableRef::new("zoo", "events"), &Control::detached())
        .await
        .unwrap();
    assert!(found.is_empty(), "{found:?}");
    // Text keys cannot be enumerated; no key at all cannot be looked up.
    let err = det
        .check_deletions(&TableRef::new("zoo", "regions"), &Control::detached())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("integer key column"), "{err}");
    let err = det
        .check_deletions(&TableRef::new("zoo", "no_pk_log"), &Control::detached())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has none"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_physical_check_covers_partitions_toast_and_indexes_of_the_zoo() {
    let db = test_db().await;
    let c = db.connect().await;
    zoo::install(&c).await.unwrap();
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        .await
        .unwrap();
    let mut cfg = DetectorConfig::default();
    cfg.physical_jobs = 3;
    cfg.chunk_blocks = 2;
    let det = detector(db.pool(), cfg);
    det.migrate().await.unwrap();
    let tables: Vec<TableRef> = zoo::TABLES
        .iter()
        .map(|t| TableRef::new(t.schema, t.name))
        .collect();
    let reports = det
        .check_physical_tables(&tables, &Control::detached())
        .await
        .unwrap();
    assert_eq!(reports.len(), tables.len());
    for r in &reports {
        assert!(r.issues.is_empty(), "{}: {:#?}", r.table, r.issues);
    }
    let events = &reports[0];
    assert_eq!(events.table, TableRef::new("zoo", "events"));
    assert!(
        events.heap_blocks_checked > 0,
        "a partitioned table's partitions"
    );
    let parts: Vec<&str> = events
        .relations
        .iter()
        .filter(|r| r.kind == sanare_corruption::RelationKind::Heap)
        .map(|r| r.relation.as_str())
        .collect();
    assert_eq!(
        parts,
        [
            "zoo.events_2025h1",
            "zoo.events_2025h2_p0",
            "zoo.events_2025h2_p1",
            "zoo.events_default"
        ]
    );
    let typed = reports.iter().find(|r| r.table.name == "typed").unwrap();
    let toast = typed
        .relations
        .iter()
        .find(|r| r.kind == sanare_corruption::RelationKind::Toast)
        .expect("a TOAST table");
    assert!(toast.blocks > 0, "TOAST-sized values live there");
    // The invalid index is not checked; the TOAST table's index is.
    assert!(
        !typed
            .indexes_checked
            .iter()
            .any(|i| i.ends_with(zoo::INVALID_INDEX))
    );
    assert!(
        typed
            .indexes_checked
            .iter()
            .any(|i| i.starts_with("pg_toast."))
    );
    assert!(typed.indexes_checked.contains(&"zoo.typed_pkey".to_owned()));
}
