//! Validation over the schema zoo of `sanare-testing`: a clean zoo gives nothing,
//! each planted kind of damage is found exactly (no more, no fewer, on the right
//! table), and the findings are the same under every session setting a server,
//! database or role may impose.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use sanare_core::{Control, IntegrityService, TableRef, ValidationScope, Violation};
use sanare_integrity::{ConsistencyRule, Integrity, IntegrityConfig, Rules};
use sanare_pg::SchemaName;
use sanare_testing::{TestDb, test_db, zoo};

mod common;
use common::{kind_name, row_key};

struct Zoo {
    db: TestDb,
    dir: tempfile::TempDir,
}

async fn zoo_db() -> Zoo {
    let db = test_db().await;
    let c = db.connect().await;
    zoo::install(&c).await.unwrap();
    let mut c = db.connect().await;
    sanare_integrity::migrate(&mut c, &SchemaName::default_schema())
        .await
        .unwrap();
    Zoo {
        db,
        dir: tempfile::tempdir().unwrap(),
    }
}

fn integrity(z: &Zoo, pool: sanare_pg::Pool, rules: Rules) -> Integrity {
    // Many chunks per table, and more suspects per unit than one batch: the spill's
    // file and the batched writes run too.
    integrity_with(z, pool, rules, 37, 5)
}

fn integrity_with(
    z: &Zoo,
    pool: sanare_pg::Pool,
    rules: Rules,
    chunk_rows: u64,
    batch_size: usize,
) -> Integrity {
    let mut cfg = IntegrityConfig::default();
    cfg.chunk_rows = chunk_rows;
    cfg.parallelism = 3;
    cfg.batch_size = batch_size;
    cfg.report_dir = z.dir.path().to_owned();
    Integrity::builder()
        .pool(pool)
        .rules(rules)
        .config(cfg)
        .build()
        .unwrap()
}

fn scope() -> ValidationScope {
    let mut s = ValidationScope::all();
    s.schemas = vec!["zoo".into(), "Zoo Schema".into()];
    s
}

/// `table|code|name|key` of every violation, counted.
fn found(vs: &[Violation]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for v in vs {
        *out.entry(format!(
            "{}|{}|{}|{}",
            v.table,
            v.kind.code(),
            kind_name(&v.kind),
            row_key(v)
        ))
        .or_default() += 1;
    }
    out
}

async fn run(i: &Integrity) -> (sanare_integrity::IntegrityReport, Vec<Violation>) {
    let report = i.run(scope(), &Control::detached()).await.unwrap();
    let vs: Vec<Violation> = i.violations(report.id).map(|v| v.unwrap()).collect().await;
    assert_eq!(vs.len() as u64, report.total_violations());
    (report, vs)
}

/// Rules declared on the partitioned `zoo.events`: a row rule its partitions apply,
/// and a unique key checked over the whole partitioned table.
fn rules() -> Rules {
    let events = TableRef::new("zoo", "events");
    Rules::builder()
        .not_null(&events, "payload")
        .unique("event_id_unique", &events, &["id"])
        .consistency(ConsistencyRule::predicate(
            "vehicle_named",
            &TableRef::new("zoo", "vehicles"),
            "name <> ''",
        ))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_clean_zoo_has_no_violation_and_every_row_is_read_once() {
    let z = zoo_db().await;
    let i = integrity(&z, z.db.pool().clone(), rules());
    let (report, vs) = run(&i).await;
    assert!(vs.is_empty(), "{:#?}", found(&vs));
    let c = z.db.connect().await;
    // Every row of every table that holds rows, once: inheritance children are not
    // read again through their parent, partitions not again through theirs.
    let mut rows = 0u64;
    let mut tables = 0u64;
    for t in zoo::TABLES.iter().filter(|t| !t.partitioned) {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM ONLY {}", t.quoted()), &[])
            .await
            .unwrap()
            .get(0);
        rows += n as u64;
        tables += 1;
    }
    assert_eq!(report.rows_checked, rows);
    // The leaves, plus zoo.events, which carries a declared unique key.
    assert_eq!(report.tables_checked, tables + 1);
    // The never-analysed table was split into chunks all the same.
    let units: i64 = c
        .query_one(
            "SELECT count(*) FROM sanare.integrity_chunks
              WHERE check_id = $1 AND table_name = 'never_analyzed' AND work->'probe' = 'null'",
            &[&report.id.as_uuid()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(units >= 400 / 37, "{units} units");
}

/// Damage of every kind the zoo can hold, planted behind PostgreSQL's back.
const PLANT: &str = r#"
SET session_replication_role = replica;
-- Orphans under a deferrable and a NOT VALID foreign key (orders -> accounts).
DELETE FROM zoo.accounts WHERE id = 5;
-- MATCH FULL: a partly null key, and a missing parent.
INSERT INTO zoo.order_items (id, order_id, region, quantity) VALUES (1001, 5, NULL, 1), (1002, 9999, 'eu', 1);
-- Quoted mixed-case names.
DELETE FROM "Zoo Schema"."MixedCase Table" WHERE "Id" = 7;
-- A foreign key from a partitioned table without a key (rows named by ctid).
DELETE FROM zoo.sensors WHERE id = 4;
-- A foreign key to a partitioned table (one finding, not one per partition).
DELETE FROM zoo.events WHERE id = 5;
SET session_replication_role = origin;
-- Duplicates behind the partial and the expression unique index: the failed
-- concurrent builds leave both invalid.
DROP INDEX zoo.accounts_active_email_key;
DROP INDEX zoo.accounts_lower_email_key;
INSERT INTO zoo.accounts (id, email, active, balance) VALUES
    (1001, 'user1@example.com', true, 0), (1002, 'USER2@example.com', true, 0);
-- A primary key whose index stopped being maintained.
UPDATE pg_index SET indisready = false, indisvalid = false WHERE indexrelid = 'zoo.never_analyzed_pkey'::regclass;
INSERT INTO zoo.never_analyzed (id, note) VALUES (1000, 'duplicate');
UPDATE pg_index SET indisready = true WHERE indexrelid = 'zoo.never_analyzed_pkey'::regclass;
-- A CHECK NO INHERIT NOT VALID on the inheritance parent: its child's ids (over
-- 1000) do not count.
ALTER TABLE zoo.vehicles DROP CONSTRAINT vehicles_id_small;
INSERT INTO zoo.vehicles (id, name) VALUES (5000, 'too big');
ALTER TABLE zoo.vehicles ADD CONSTRAINT vehicles_id_small CHECK (id < 1000) NO INHERIT NOT VALID;
-- A NOT VALID check on the partitioned table (found in each partition), and one on
-- a plain table.
ALTER TABLE zoo.events ADD CONSTRAINT events_no_refund CHECK (kind <> 'refund') NOT VALID;
ALTER TABLE zoo.order_items ADD CONSTRAINT order_items_small CHECK (quantity < 9) NOT VALID;
-- A NOT VALID domain constraint.
ALTER DOMAIN zoo.positive_int ADD CONSTRAINT positive_small CHECK (VALUE < 100) NOT VALID;
-- NOT NULL on one partition, behind the catalog's back.
UPDATE pg_attribute SET attnotnull = false WHERE attrelid = 'zoo.events_2025h1'::regclass AND attname = 'kind';
UPDATE zoo.events_2025h1 SET kind = NULL WHERE id IN (3, 17);
UPDATE pg_attribute SET attnotnull = true WHERE attrelid = 'zoo.events_2025h1'::regclass AND attname = 'kind';
-- The declared rules on zoo.events: a second event 6 (unique over the whole
-- partitioned table), with no payload (declared not null, in its partition).
INSERT INTO zoo.events (id, created_at, kind, payload) VALUES (6, '2026-03-01 00:00:00+00', 'login', NULL);
"#;

/// Builds the failed unique indexes (a plain client: `CONCURRENTLY` runs outside a
/// transaction).
async fn plant(c: &tokio_postgres::Client) {
    c.batch_execute(PLANT).await.unwrap();
    for sql in [
        "CREATE UNIQUE INDEX CONCURRENTLY accounts_active_email_key ON zoo.accounts (email) WHERE active",
        "CREATE UNIQUE INDEX CONCURRENTLY accounts_lower_email_key ON zoo.accounts (lower(email)) WHERE active",
        "CREATE UNIQUE INDEX CONCURRENTLY no_pk_log_at_key ON zoo.no_pk_log (at)",
    ] {
        assert!(c.batch_execute(sql).await.is_err(), "{sql} must fail");
    }
}

/// What must be found: `(table, code, name, SQL returning schema, table and key)`.
const EXPECTED: &[(&str, &str, &str)] = &[
    (
        "referential",
        "orders_account_id_fkey",
        "SELECT 'zoo', 'orders', id::text FROM zoo.orders o WHERE NOT EXISTS (SELECT 1 FROM zoo.accounts a WHERE a.id = o.account_id)",
    ),
    (
        "referential",
        "orders_referrer_fkey",
        "SELECT 'zoo', 'orders', id::text FROM zoo.orders o WHERE referrer IS NOT NULL AND NOT EXISTS (SELECT 1 FROM zoo.accounts a WHERE a.id = o.referrer)",
    ),
    (
        "referential",
        "order_items_order_id_region_fkey",
        "SELECT 'zoo', 'order_items', id::text FROM zoo.order_items WHERE id IN (1001, 1002)",
    ),
    (
        "referential",
        "child Rows_Parent_fkey",
        "SELECT 'Zoo Schema', 'child Rows', \"Id\"::text FROM \"Zoo Schema\".\"child Rows\" WHERE \"Parent\" = 7",
    ),
    (
        "referential",
        "readings_sensor_fkey",
        "SELECT n.nspname::text, c.relname::text, r.ctid::text FROM zoo.readings r
           JOIN pg_class c ON c.oid = r.tableoid JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE r.sensor_id = 4",
    ),
    (
        "referential",
        "event_notes_event_fkey",
        "SELECT 'zoo', 'event_notes', id::text FROM zoo.event_notes WHERE event_id = 5",
    ),
    (
        "unique_constraint",
        "accounts_active_email_key",
        "SELECT 'zoo', 'accounts', id::text FROM zoo.accounts WHERE active AND email IN
           (SELECT email FROM zoo.accounts WHERE active GROUP BY email HAVING count(*) > 1)",
    ),
    (
        "unique_constraint",
        "accounts_lower_email_key",
        "SELECT 'zoo', 'accounts', id::text FROM zoo.accounts WHERE active AND lower(email) IN
           (SELECT lower(email) FROM zoo.accounts WHERE active GROUP BY 1 HAVING count(*) > 1)",
    ),
    (
        "unique_constraint",
        "never_analyzed_pkey",
        "SELECT 'zoo', 'never_analyzed', id::text FROM zoo.never_analyzed WHERE id = 1000",
    ),
    (
        "unique_constraint",
        "no_pk_log_at_key",
        "SELECT 'zoo', 'no_pk_log', ctid::text FROM zoo.no_pk_log WHERE at IN
           (SELECT at FROM zoo.no_pk_log GROUP BY at HAVING count(*) > 1)",
    ),
    (
        "unique_constraint",
        "event_id_unique",
        "SELECT 'zoo', 'events', id || '/' || created_at FROM zoo.events WHERE id = 6",
    ),
    (
        "check_constraint",
        "vehicles_id_small",
        "SELECT 'zoo', 'vehicles', id::text FROM ONLY zoo.vehicles WHERE id >= 1000",
    ),
    (
        "check_constraint",
        "events_no_refund",
        "SELECT n.nspname::text, c.relname::text, e.id || '/' || e.created_at FROM zoo.events e
           JOIN pg_class c ON c.oid = e.tableoid JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE e.kind = 'refund'",
    ),
    (
        "check_constraint",
        "order_items_small",
        "SELECT 'zoo', 'order_items', id::text FROM zoo.order_items WHERE quantity >= 9",
    ),
    (
        "type_mismatch",
        "positive",
        "SELECT 'zoo', 'typed', id::text FROM zoo.typed WHERE positive >= 100",
    ),
    (
        "null_constraint",
        "kind",
        "SELECT 'zoo', 'events_2025h1', id || '/' || created_at FROM zoo.events_2025h1 WHERE kind IS NULL",
    ),
    (
        "null_constraint",
        "payload",
        "SELECT n.nspname::text, c.relname::text, e.id || '/' || e.created_at FROM zoo.events e
           JOIN pg_class c ON c.oid = e.tableoid JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE e.payload IS NULL",
    ),
];

/// The planted findings, counted, read with the canonical settings (keys print as
/// the runner prints them).
async fn expected(c: &tokio_postgres::Client) -> BTreeMap<String, usize> {
    c.batch_execute(&sanare_integrity::checksum::canonical_settings_sql())
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for (code, name, sql) in EXPECTED {
        let rows = c.query(*sql, &[]).await.unwrap();
        assert!(!rows.is_empty(), "nothing planted for {name}");
        for r in rows {
            let table = TableRef::new(r.get::<_, String>(0), r.get::<_, String>(1));
            *out.entry(format!("{table}|{code}|{name}|{}", r.get::<_, String>(2)))
                .or_default() += 1;
        }
    }
    c.batch_execute("RESET ALL").await.unwrap();
    out
}

#[tokio::test]
async fn every_planted_kind_is_found_exactly_on_its_table() {
    let z = zoo_db().await;
    let c = z.db.connect().await;
    plant(&c).await;
    let want = expected(&c).await;
    // Two rows share key 1000 behind the unmaintained primary key.
    assert_eq!(
        want.get("zoo.never_analyzed|unique_constraint|never_analyzed_pkey|1000"),
        Some(&2)
    );
    let i = integrity(&z, z.db.pool().clone(), rules());
    let (report, vs) = run(&i).await;
    assert_eq!(found(&vs), want);
    // More suspects than one batch in a unit: they went through the spill file and
    // several writes, and every one was re-read.
    let schema = &report.families[&sanare_core::CheckFamily::Schema];
    assert_eq!(schema.suspects, schema.violations + schema.dismissed);
    assert_eq!(schema.dismissed, 0);
}

/// Runs the planted zoo with `setting` applied by `ALTER DATABASE` and then by
/// `ALTER ROLE … IN DATABASE` (new sessions only: a fresh pool each time).
async fn under_setting(
    z: &Zoo,
    admin: &tokio_postgres::Client,
    name: &str,
    value: &str,
    want: &BTreeMap<String, usize>,
) {
    let db = sanare_pg::quote_ident(z.db.name());
    for (set, reset) in [
        (
            format!("ALTER DATABASE {db} SET {name} = {value}"),
            format!("ALTER DATABASE {db} RESET {name}"),
        ),
        (
            format!("ALTER ROLE CURRENT_USER IN DATABASE {db} SET {name} = {value}"),
            format!("ALTER ROLE CURRENT_USER IN DATABASE {db} RESET {name}"),
        ),
    ] {
        admin.batch_execute(&set).await.unwrap();
        let pool = sanare_pg::connect_pool(z.db.url(), 6).unwrap();
        // The setting is in force for the service's sessions.
        let shown: String = pool
            .get()
            .await
            .unwrap()
            .query_one(&format!("SELECT current_setting('{name}')"), &[])
            .await
            .unwrap()
            .get(0);
        // Fewer, larger chunks than the other tests (sixteen runs): keys still cross
        // chunk bounds in every table of more than 150 rows.
        let i = integrity_with(z, pool, rules(), 150, 100);
        let (_, vs) = run(&i).await;
        assert_eq!(found(&vs), *want, "under `{set}` ({name} = {shown})");
        admin.batch_execute(&reset).await.unwrap();
    }
}

#[tokio::test]
async fn every_session_setting_gives_the_same_findings() {
    let z = zoo_db().await;
    let c = z.db.connect().await;
    plant(&c).await;
    let want = expected(&c).await;
    let mut settings: Vec<(String, String)> = zoo::SESSION_SETTINGS
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    if let Some(locale) = zoo::lc_numeric(&c).await {
        settings.push(("lc_numeric".into(), sanare_pg::quote_literal(&locale)));
    }
    // standard_conforming_strings off changes what a literal with a backslash means.
    settings.push(("standard_conforming_strings".into(), "off".into()));
    for (name, value) in &settings {
        under_setting(&z, &c, name, value, &want).await;
    }
}
