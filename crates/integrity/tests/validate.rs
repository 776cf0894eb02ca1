//! Validation against a real PostgreSQL with the order-service fixture: planted
//! violations are found exactly, no more and no fewer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt;
use sanare_core::{
    CheckFamily, ColumnValue, Control, Event, EventBus, IntegrityService, RowChecksum, RowRef,
    Severity, TableRef, ValidationScope, Violation,
};
use sanare_integrity::report::{CSV_HEADER, read_json};
use sanare_integrity::rules::Bound;
use sanare_integrity::{
    CheckStatus, ChecksumAlgorithm, Checksummer, ConsistencyRule, Integrity, IntegrityConfig,
    Rules, ViolationQuery, install_checksum_trigger,
};
use sanare_pg::SchemaName;
use sanare_testing::{TestDb, fixtures::order_service, test_db};

mod common;
use common::{gate, kind_name, order_total, row_key, wait_at_gate};

const S: &str = "shop";

fn t(name: &str) -> TableRef {
    TableRef::new(S, name)
}

struct Setup {
    db: TestDb,
    report_dir: tempfile::TempDir,
}

async fn setup(orders: u64) -> Setup {
    let db = test_db().await;
    let client = db.connect().await;
    order_service::install(&client, S).await.unwrap();
    order_service::generate(&client, S, orders).await.unwrap();
    let mut c = db.connect().await;
    sanare_integrity::migrate(&mut c, &SchemaName::default_schema())
        .await
        .unwrap();
    Setup {
        db,
        report_dir: tempfile::tempdir().unwrap(),
    }
}

fn config(s: &Setup) -> IntegrityConfig {
    let mut c = IntegrityConfig::default();
    c.chunk_rows = 97;
    c.parallelism = 3;
    c.report_dir = s.report_dir.path().to_owned();
    c
}

fn integrity(s: &Setup, rules: Rules) -> Integrity {
    Integrity::builder()
        .pool(s.db.pool().clone())
        .rules(rules)
        .config(config(s))
        .build()
        .unwrap()
}

fn scope() -> ValidationScope {
    let mut s = ValidationScope::all();
    s.schemas = vec![S.to_owned()];
    s
}

/// The first key value of every violation whose kind code is `code` and whose
/// debug form contains `name`.
fn keys(vs: &[Violation], code: &str, name: &str) -> BTreeSet<String> {
    vs.iter()
        .filter(|v| v.kind.code() == code && format!("{:?}", v.kind).contains(name))
        .map(|v| {
            let r = v.row.as_ref().unwrap();
            r.key
                .iter()
                .map(|c| c.value.clone().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect()
}

/// Every violation's key, by kind code and the name the kind is about (constraint,
/// rule or column).
fn grouped(vs: &[Violation]) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for v in vs {
        out.entry((v.kind.code().to_owned(), kind_name(&v.kind)))
            .or_default()
            .insert(row_key(v));
    }
    out
}

async fn expected(db: &TestDb, sql: &str) -> BTreeSet<String> {
    let c = db.connect().await;
    c.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

async fn all_violations(i: &Integrity, check: sanare_core::CheckId) -> Vec<Violation> {
    i.violations(check).map(|v| v.unwrap()).collect().await
}

#[tokio::test]
async fn a_clean_database_has_no_violations_and_the_run_is_recorded() {
    let s = setup(300).await;
    let i = integrity(&s, Rules::default());
    let (control, progress) = Control::new();
    let summary = i.validate(scope(), &control).await.unwrap();
    assert!(summary.is_clean(), "{summary:?}");
    assert_eq!(summary.tables_checked, 5);
    // Every row of every table was read by the fused pass.
    let counts: i64 = s
        .db
        .client()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM shop.customers) + (SELECT count(*) FROM shop.products)
                  + (SELECT count(*) FROM shop.orders) + (SELECT count(*) FROM shop.order_lines)
                  + (SELECT count(*) FROM shop.payments)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(summary.rows_checked, counts as u64);
    assert!(progress.get().finished);
    let report = i.report(summary.check).await.unwrap();
    assert_eq!(report.status, CheckStatus::Completed);
    assert!(report.families[&CheckFamily::Referential].probes_run > 5);
}

/// Plants one or more violations of every kind behind PostgreSQL's back; returns
/// the ids of the payments whose enum label was removed.
async fn plant_rule_violations(c: &tokio_postgres::Client) -> BTreeSet<String> {
    // Enum: a label added, used, then removed from pg_enum behind PostgreSQL's back
    // (ADD VALUE must commit before the value can be used).
    c.batch_execute("ALTER TYPE shop.payment_method ADD VALUE 'cash'")
        .await
        .unwrap();
    let enum_ids: BTreeSet<String> = c
        .query(
            "UPDATE shop.payments SET method = 'cash' WHERE id IN (SELECT id FROM shop.payments ORDER BY id LIMIT 2) RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(enum_ids.len(), 2);
    c.batch_execute(
        "DELETE FROM pg_enum WHERE enumtypid = 'shop.payment_method'::regtype AND enumlabel = 'cash';
         -- Domain: a CHECK added NOT VALID to the domain of a column.
         CREATE DOMAIN shop.line_quantity AS integer;
         ALTER TABLE shop.order_lines ALTER COLUMN quantity TYPE shop.line_quantity;
         ALTER DOMAIN shop.line_quantity ADD CONSTRAINT quantity_not_two CHECK (VALUE <> 2) NOT VALID;
         -- A unique key the host declares (no index): two products share a name.
         UPDATE shop.products SET name = (SELECT name FROM shop.products WHERE id = 1) WHERE id = 2;",
    )
    .await
    .unwrap();
    // NOT NULL: flip attnotnull off, plant nulls, flip it back.
    c.batch_execute(
        "UPDATE pg_attribute SET attnotnull = false WHERE attrelid = 'shop.customers'::regclass AND attname = 'full_name';
         UPDATE shop.customers SET full_name = NULL WHERE id IN (3, 17);
         UPDATE pg_attribute SET attnotnull = true WHERE attrelid = 'shop.customers'::regclass AND attname = 'full_name';
         -- CHECK added NOT VALID: existing rows may break it.
         ALTER TABLE shop.products ADD CONSTRAINT price_below_500 CHECK (price_cents < 500) NOT VALID;
         -- Foreign keys with their triggers disabled.
         SET session_replication_role = replica;
         INSERT INTO shop.order_lines VALUES (900001, 1, 1, 1, 10, 10), (900002, 1, 1, 1, 10, 10);
         DELETE FROM shop.products WHERE id = 7;
         SET session_replication_role = origin;
         -- varchar length and numeric precision: shrink the declared type in the catalog.
         UPDATE pg_attribute SET atttypmod = 21 + 4 WHERE attrelid = 'shop.customers'::regclass AND attname = 'email';
         UPDATE pg_attribute SET atttypmod = (4 << 16) + 4 WHERE attrelid = 'shop.payments'::regclass AND attname = 'amount_cents';
         -- UNIQUE: keep the index from seeing a duplicate, and leave it invalid (as a
         -- failed CREATE UNIQUE INDEX CONCURRENTLY does). A valid index enforces its
         -- constraint and is not scanned for.
         UPDATE pg_index SET indisready = false, indisvalid = false WHERE indexrelid = 'shop.customers_email_key'::regclass;
         INSERT INTO shop.customers (id, email, full_name, country) VALUES (100000, 'customer1@example.com', 'Dup', 'DE');
         UPDATE pg_index SET indisready = true WHERE indexrelid = 'shop.customers_email_key'::regclass;
         -- Business rules.
         UPDATE shop.orders SET total_cents = total_cents + 1 WHERE id IN (5, 8);
         UPDATE shop.orders SET shipped_at = placed_at + interval '1 day' WHERE id = 4;",
    )
    .await
    .unwrap();
    enum_ids
}

/// Declared rules of every kind, each broken by a planted violation or by the
/// fixture's own data.
fn planted_rules() -> Rules {
    Rules::builder()
        .not_null(&t("orders"), "note")
        .range(
            &t("order_lines"),
            "quantity",
            Some(Bound::Int(1)),
            Some(Bound::Int(3)),
        )
        .regex(&t("products"), "sku", "^SKU-0000000[0-9]$")
        .unique("product_name", &t("products"), &["name"])
        .allowed_values(&t("customers"), "country", ["DE", "FR", "US", "JP", "BR"])
        .relationship(
            "payment_customer",
            &t("payments"),
            &["id"],
            &t("customers"),
            &["id"],
        )
        .consistency(order_total())
        .consistency(
            ConsistencyRule::predicate(
                "cancelled_not_shipped",
                &t("orders"),
                "status <> 'cancelled' OR shipped_at IS NULL",
            )
            .with_severity(Severity::Low),
        )
        .build()
        .unwrap()
}

/// The findings a run over the planted database must report, by kind code and
/// name: the rows each check's own query finds (the planted kinds must find
/// some), and the planted rows named outright.
async fn expected_findings(
    db: &TestDb,
    enum_ids: &BTreeSet<String>,
) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut want: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (code, name, sql, planted) in [
        (
            "type_mismatch",
            "quantity",
            "SELECT order_id || '/' || line_no FROM shop.order_lines WHERE quantity = 2",
            true,
        ),
        (
            "null_constraint",
            "full_name",
            "SELECT id::text FROM shop.customers WHERE full_name IS NULL",
            true,
        ),
        (
            "check_constraint",
            "price_below_500",
            "SELECT id::text FROM shop.products WHERE price_cents >= 500",
            true,
        ),
        (
            "referential",
            "order_lines_product_id_fkey",
            "SELECT order_id || '/' || line_no FROM shop.order_lines WHERE product_id = 7",
            false,
        ),
        (
            "type_mismatch",
            "email",
            "SELECT id::text FROM shop.customers WHERE char_length(email) > 21",
            true,
        ),
        (
            "type_mismatch",
            "amount_cents",
            "SELECT id::text FROM shop.payments WHERE amount_cents >= 10000",
            false,
        ),
        (
            "null_constraint",
            "note",
            "SELECT id::text FROM shop.orders WHERE note IS NULL",
            false,
        ),
        (
            "check_constraint",
            "range_quantity",
            "SELECT order_id || '/' || line_no FROM shop.order_lines WHERE quantity > 3",
            false,
        ),
        (
            "check_constraint",
            "regex_sku",
            "SELECT id::text FROM shop.products WHERE sku !~ '^SKU-0000000[0-9]$'",
            false,
        ),
        (
            "check_constraint",
            "allowed_country",
            "SELECT id::text FROM shop.customers WHERE country = 'IN'",
            false,
        ),
        (
            "referential",
            "payment_customer",
            "SELECT id::text FROM shop.payments p WHERE NOT EXISTS (SELECT 1 FROM shop.customers c WHERE c.id = p.id)",
            false,
        ),
    ] {
        let keys = expected(db, sql).await;
        assert!(!planted || !keys.is_empty(), "nothing planted for {name}");
        if !keys.is_empty() {
            want.insert((code.into(), name.into()), keys);
        }
    }
    assert_eq!(
        want[&("null_constraint".into(), "full_name".into())].len(),
        2
    );
    let set = |keys: &[&str]| {
        keys.iter()
            .map(|k| (*k).to_owned())
            .collect::<BTreeSet<_>>()
    };
    for (code, name, keys) in [
        ("type_mismatch", "method", enum_ids.clone()),
        ("unique_constraint", "product_name", set(&["1", "2"])),
        (
            "unique_constraint",
            "customers_email_key",
            set(&["1", "100000"]),
        ),
        (
            "referential",
            "order_lines_order_id_fkey",
            set(&["900001/1", "900002/1"]),
        ),
        ("consistency", "order_total", set(&["5", "8"])),
        ("consistency", "cancelled_not_shipped", set(&["4"])),
    ] {
        want.insert((code.into(), name.into()), keys);
    }
    want
}

/// The check's JSON document, CSV and JSON-lines file hold exactly `vs`.
async fn assert_reports_hold(i: &Integrity, check: sanare_core::CheckId, vs: &[Violation]) {
    let mut json = Vec::new();
    i.export_json(check, &mut json).await.unwrap();
    let doc = read_json(&json[..]).unwrap();
    assert_eq!(doc.report.id, check);
    let mut a = doc.violations.clone();
    let mut b = vs.to_vec();
    a.sort_by_key(|v| v.id);
    b.sort_by_key(|v| v.id);
    assert_eq!(a, b);
    let mut csv = Vec::new();
    i.export_csv(check, &mut csv).await.unwrap();
    let csv = String::from_utf8(csv).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some(CSV_HEADER));
    assert_eq!(lines.count(), vs.len());
    // The JSON-lines file on disk holds the same violations.
    let file = std::fs::read_to_string(doc.report.violations_file.as_ref().unwrap()).unwrap();
    assert_eq!(file.lines().count(), vs.len());
}

#[tokio::test]
async fn every_planted_rule_violation_is_found_exactly() {
    let s = setup(400).await;
    let c = s.db.connect().await;
    let enum_ids = plant_rule_violations(&c).await;
    let bus = EventBus::new(100_000);
    let mut sub = bus.subscribe();
    let i = Integrity::builder()
        .pool(s.db.pool().clone())
        .rules(planted_rules())
        .events(bus.clone())
        .config(config(&s))
        .build()
        .unwrap();
    // A concurrent write load that keeps every rule: new orders with their lines.
    let stop = tokio_util_token();
    let writer = clean_writer(&s, stop.clone());
    let summary = i.validate(scope(), &Control::detached()).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writer.await.unwrap() > 0);
    let vs = all_violations(&i, summary.check).await;
    assert_eq!(vs.len() as u64, summary.total_violations());

    // Exactly the planted findings, one violation per row and rule.
    let want = expected_findings(&s.db, &enum_ids).await;
    assert_eq!(grouped(&vs), want);
    assert_eq!(vs.len(), want.values().map(BTreeSet::len).sum::<usize>());
    let orphan = vs
        .iter()
        .find(|v| format!("{:?}", v.kind).contains("order_lines_order_id_fkey"))
        .unwrap();
    assert!(
        orphan.details["missing_parent_key"]["id"] == "900001"
            || orphan.details["missing_parent_key"]["id"] == "900002"
    );

    // Every violation was published.
    let mut events = 0;
    while let Some(rec) = sub.try_recv() {
        if let Event::ViolationDetected { check, .. } = rec.event {
            assert_eq!(check, Some(summary.check));
            events += 1;
        }
    }
    assert_eq!(events, vs.len());

    // Queries by table and type.
    let q = i
        .query_violations(
            &ViolationQuery::new()
                .table(t("order_lines"))
                .violation_type("referential"),
        )
        .await
        .unwrap();
    assert_eq!(q.len(), keys(&vs, "referential", "order_lines_").len());
    assert!(q.iter().all(|v| v.table == t("order_lines")));

    assert_reports_hold(&i, summary.check, &vs).await;

    // Re-check: a live violation holds; once repaired it does not.
    let v = vs
        .iter()
        .find(|v| format!("{:?}", v.kind).contains("cancelled_not_shipped"))
        .unwrap();
    assert!(i.recheck(v).await.unwrap());
    c.execute("UPDATE shop.orders SET shipped_at = NULL WHERE id = 4", &[])
        .await
        .unwrap();
    assert!(!i.recheck(v).await.unwrap());
}

#[tokio::test]
async fn the_sql_trigger_and_rust_compute_the_same_checksum_on_every_column_type() {
    let s = setup(120).await;
    let c = s.db.connect().await;
    let schema = SchemaName::default_schema();
    // Types whose output and `::text` differ: blank-padded char(n), boolean, inet;
    // a domain; floats, arrays, timestamps.
    c.batch_execute(
        "CREATE DOMAIN shop.small_int AS integer CHECK (VALUE < 1000);
         CREATE TABLE shop.odd (id bigint PRIMARY KEY, c char(6), b boolean, ip inet, d shop.small_int,
                                f float8, ts timestamptz, arr text[], flag \"char\");
         INSERT INTO shop.odd VALUES
           (1, 'ab', true, '10.0.0.1', 7, 0.1, '2025-01-02 03:04:05.678+02', '{a,\"b c\",NULL}', 'x'),
           (2, NULL, false, '10.1.0.0/16', NULL, 'NaN', NULL, '{}', NULL),
           (3, '   ', NULL, '::1', 999, -1.5e300, 'infinity', NULL, 'y'),
           (4, 'tab	x', true, NULL, 0, 3, '1999-12-31 23:59:59+00', '{\"q\\\\\"}', 'z');",
    )
    .await
    .unwrap();
    for table in [
        "customers",
        "orders",
        "payments",
        "order_lines",
        "products",
        "odd",
    ] {
        c.batch_execute(&format!(
            "ALTER TABLE shop.{table} ADD COLUMN row_checksum bytea"
        ))
        .await
        .unwrap();
        install_checksum_trigger(&c, &schema, &t(table), "row_checksum", true)
            .await
            .unwrap();
    }
    // Odd values: NULLs, unicode, JSON with nesting, fractional numeric.
    c.batch_execute(
        "UPDATE shop.orders SET note = 'é ☃ \"quoted\"\n tab\t' WHERE id = 3;
         UPDATE shop.customers SET profile = '{\"a\": [1, 2.50, null, {\"z\": \"ü\"}]}' WHERE id = 2;
         ALTER TABLE shop.payments ALTER COLUMN amount_cents TYPE numeric(14, 2);
         UPDATE shop.payments SET amount_cents = amount_cents + 0.25 WHERE id IN (SELECT min(id) FROM shop.payments);",
    )
    .await
    .unwrap();
    // ALTER TYPE rewrote payments with the trigger firing? No: refresh them.
    c.batch_execute("UPDATE shop.payments SET row_checksum = NULL")
        .await
        .unwrap();
    // Rust over text forms read under the canonical settings equals the stored value.
    c.batch_execute(&sanare_integrity::checksum::canonical_settings_sql())
        .await
        .unwrap();
    let sha = Checksummer::sha256();
    let mut compared = 0;
    for table in [
        "customers",
        "orders",
        "payments",
        "order_lines",
        "products",
        "odd",
    ] {
        let cols = sanare_integrity::checksum::checksum_columns(&c, &t(table), "row_checksum")
            .await
            .unwrap();
        let select: Vec<String> = cols.iter().map(|c| format!("{c}::text")).collect();
        let rows = c
            .query(
                &format!(
                    "SELECT row_checksum, {} FROM shop.{table}",
                    select.join(", ")
                ),
                &[],
            )
            .await
            .unwrap();
        assert!(!rows.is_empty());
        for r in rows {
            let stored: Vec<u8> = r.get(0);
            let values: Vec<ColumnValue> = cols
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    ColumnValue::new(name.clone(), "text", r.get::<_, Option<String>>(i + 1))
                })
                .collect();
            assert_eq!(
                stored,
                sha.checksum(&values).to_vec(),
                "{table}: {values:?}"
            );
            compared += 1;
        }
    }
    assert!(compared > 500);
    // The checksum family agrees: clean, then exactly the tampered rows.
    let rules = Rules::builder()
        .checksum(&t("customers"), "row_checksum", ChecksumAlgorithm::Sha256)
        .checksum(&t("orders"), "row_checksum", ChecksumAlgorithm::Sha256)
        .checksum(&t("payments"), "row_checksum", ChecksumAlgorithm::Sha256)
        .checksum(&t("odd"), "row_checksum", ChecksumAlgorithm::Sha256)
        .build()
        .unwrap();
    let i = integrity(&s, rules);
    let only_checksums = scope().families([CheckFamily::Checksum]);
    let clean = i
        .validate(only_checksums.clone(), &Control::detached())
        .await
        .unwrap();
    assert!(clean.is_clean(), "{clean:?}");
    c.batch_execute(
        "SET session_replication_role = replica;
         UPDATE shop.customers SET full_name = 'Mallory' WHERE id = 5;
         UPDATE shop.orders SET status = 'delivered', shipped_at = NULL WHERE id = 9;
         UPDATE shop.odd SET c = 'ab ' WHERE id = 1;
         UPDATE shop.odd SET b = true WHERE id = 2;
         SET session_replication_role = origin;",
    )
    .await
    .unwrap();
    let run = i
        .validate(only_checksums, &Control::detached())
        .await
        .unwrap();
    let vs = all_violations(&i, run.check).await;
    assert_eq!(
        keys(&vs, "checksum_mismatch", ""),
        BTreeSet::from(["5".to_owned(), "9".to_owned(), "2".to_owned()])
    );
    // char(6) 'ab ' is the same value as 'ab': not a mismatch.
    assert_eq!(vs.len(), 3);
    assert_eq!(vs[0].details["algorithm"], "sha256");
}

#[tokio::test]
async fn keyed_checksums_written_by_the_host_detect_tampering() {
    let s = setup(50).await;
    let c = s.db.connect().await;
    c.batch_execute(&format!(
        "ALTER TABLE shop.products ADD COLUMN sig bytea; {}",
        sanare_integrity::checksum::canonical_settings_sql()
    ))
    .await
    .unwrap();
    let key = [42u8; 32];
    let keyed = Checksummer::blake3_keyed(key);
    let cols = sanare_integrity::checksum::checksum_columns(&c, &t("products"), "sig")
        .await
        .unwrap();
    let select: Vec<String> = cols.iter().map(|c| format!("{c}::text")).collect();
    for r in c
        .query(
            &format!("SELECT id, {} FROM shop.products", select.join(", ")),
            &[],
        )
        .await
        .unwrap()
    {
        let id: i64 = r.get(0);
        let values: Vec<ColumnValue> = cols
            .iter()
            .enumerate()
            .map(|(i, n)| ColumnValue::new(n.clone(), "text", r.get::<_, Option<String>>(i + 1)))
            .collect();
        let sum = keyed.checksum(&values).to_vec();
        c.execute(
            "UPDATE shop.products SET sig = $1 WHERE id = $2",
            &[&sum, &id],
        )
        .await
        .unwrap();
    }
    // An intruder recomputes an unkeyed checksum after changing a row: still caught.
    c.execute("UPDATE shop.products SET price_cents = 1 WHERE id = 3", &[])
        .await
        .unwrap();
    let rules = Rules::builder()
        .checksum(&t("products"), "sig", ChecksumAlgorithm::Blake3Keyed)
        .build()
        .unwrap();
    let no_key = Integrity::builder()
        .pool(s.db.pool().clone())
        .rules(rules.clone())
        .config(config(&s))
        .build()
        .unwrap();
    let err = no_key
        .validate(
            scope().families([CheckFamily::Checksum]),
            &Control::detached(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("key"), "{err}");
    let i = Integrity::builder()
        .pool(s.db.pool().clone())
        .rules(rules)
        .checksum_key(key)
        .config(config(&s))
        .build()
        .unwrap();
    let run = i
        .validate(
            scope().families([CheckFamily::Checksum]),
            &Control::detached(),
        )
        .await
        .unwrap();
    let vs = all_violations(&i, run.check).await;
    assert_eq!(
        keys(&vs, "checksum_mismatch", ""),
        BTreeSet::from(["3".to_owned()])
    );
}

#[tokio::test]
async fn concurrent_writes_produce_no_false_positives() {
    let s = setup(600).await;
    let c = s.db.connect().await;
    c.batch_execute(
        "SET session_replication_role = replica;
         INSERT INTO shop.order_lines VALUES (777777, 1, 1, 1, 10, 10);
         SET session_replication_role = origin;",
    )
    .await
    .unwrap();
    // A writer that keeps every rule true at each commit but writes each order in
    // two transactions (the order with a zero total and no line, then its line and
    // its total) and deletes old orders in two (their payments, lines and total,
    // then the order), while the run's snapshot rotates every millisecond: chunks
    // read the states between the halves, and every violation but the planted
    // orphan would be a false one. (A suspect the re-read dismisses is made by
    // `a_suspect_fixed_before_its_re_read_is_dismissed`.)
    let writer_db = s.db.pool().clone();
    let stop = tokio_util_token();
    let stop2 = stop.clone();
    let writer = tokio::spawn(async move {
        let w = writer_db.get().await.unwrap();
        let mut n = 0i64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let id = 1_000_000 + n;
            w.batch_execute(&format!(
                "BEGIN; INSERT INTO shop.orders (id, customer_id, status, total_cents) VALUES ({id}, 1, 'pending', 0); COMMIT;
                 BEGIN; INSERT INTO shop.order_lines VALUES ({id}, 1, 1, 2, 10, 20);
                        UPDATE shop.orders SET total_cents = 20 WHERE id = {id}; COMMIT;
                 BEGIN; DELETE FROM shop.payments WHERE order_id = {old}; DELETE FROM shop.order_lines WHERE order_id = {old};
                        UPDATE shop.orders SET total_cents = 0 WHERE id = {old}; COMMIT;
                 BEGIN; DELETE FROM shop.orders WHERE id = {old}; COMMIT;",
                old = 1 + n % 500
            ))
            .await
            .unwrap();
            n += 1;
        }
        n
    });
    let rules = Rules::builder().consistency(order_total()).build().unwrap();
    let mut cfg = config(&s);
    // Rotate the snapshot constantly so chunks see different states.
    cfg.snapshot_max_age = Duration::from_millis(1);
    let i = Integrity::builder()
        .pool(s.db.pool().clone())
        .rules(rules)
        .config(cfg)
        .build()
        .unwrap();
    let mut runs = 0;
    while runs < 3 {
        let run = i.validate(scope(), &Control::detached()).await.unwrap();
        let vs = all_violations(&i, run.check).await;
        assert_eq!(
            keys(&vs, "referential", ""),
            BTreeSet::from(["777777/1".to_owned()]),
            "{vs:#?}"
        );
        assert_eq!(vs.len(), 1, "{vs:#?}");
        runs += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 0);
}

#[tokio::test]
async fn a_suspect_fixed_before_its_re_read_is_dismissed() {
    let s = setup(200).await;
    let c = s.db.connect().await;
    c.batch_execute(
        "UPDATE shop.orders SET status = 'cancelled', shipped_at = placed_at + interval '1 day' WHERE id = 4",
    )
    .await
    .unwrap();
    // A gate in the fused pass: every row waits for a shared advisory lock that the
    // test holds, so the scan, its snapshot already taken, waits until released.
    let rules = Rules::builder()
        .consistency(ConsistencyRule::predicate(
            "cancelled_not_shipped",
            &t("orders"),
            "status <> 'cancelled' OR shipped_at IS NULL",
        ))
        .consistency(gate(4242))
        .build()
        .unwrap();
    let mut cfg = config(&s);
    cfg.snapshot_max_age = Duration::from_secs(3600);
    let i = Integrity::builder()
        .pool(s.db.pool().clone())
        .rules(rules)
        .config(cfg)
        .build()
        .unwrap();
    let gate = s.db.connect().await;
    gate.execute("SELECT pg_advisory_lock(4242)", &[])
        .await
        .unwrap();
    let run = tokio::spawn({
        let i = i.clone();
        async move {
            let scope = ValidationScope::all()
                .tables([t("orders")])
                .families([CheckFamily::Consistency]);
            i.run(scope, &Control::detached()).await
        }
    });
    // A chunk waits at the gate: the run's exported snapshot exists, with order 4
    // broken in it, and every chunk reads that snapshot.
    wait_at_gate(&c, 4242).await;
    c.execute("UPDATE shop.orders SET shipped_at = NULL WHERE id = 4", &[])
        .await
        .unwrap();
    gate.execute("SELECT pg_advisory_unlock(4242)", &[])
        .await
        .unwrap();
    let report = run.await.unwrap().unwrap();
    let f = &report.families[&CheckFamily::Consistency];
    // Found in the scan's snapshot, gone in the re-read's: not reported.
    assert_eq!(
        (f.suspects, f.dismissed, f.violations),
        (1, 1, 0),
        "{report:?}"
    );
    assert_eq!(report.total_violations(), 0);
    assert_eq!(all_violations(&i, report.id).await.len(), 0);
}

/// A writer that inserts orders (with a note, a consistent total and one line) until
/// `stop`, returning how many it wrote.
fn clean_writer(
    s: &Setup,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<i64> {
    let pool = s.db.pool().clone();
    tokio::spawn(async move {
        let w = pool.get().await.unwrap();
        let mut n = 0i64;
        while n < 5 || !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let id = 2_000_000 + n;
            w.batch_execute(&format!(
                "BEGIN; INSERT INTO shop.orders (id, customer_id, status, total_cents, note) VALUES ({id}, 1, 'pending', 10, 'w');
                 INSERT INTO shop.order_lines VALUES ({id}, 1, 1, 1, 10, 10); COMMIT;"
            ))
            .await
            .unwrap();
            n += 1;
        }
        n
    })
}

fn tokio_util_token() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

#[tokio::test]
async fn cancellation_and_a_dropped_connection_are_recorded() {
    let s = setup(100).await;
    let i = integrity(&s, Rules::default());
    let (control, _) = Control::new();
    control.cancel_token().cancel();
    let err = i.validate(scope(), &control).await.unwrap_err();
    assert!(err.is_cancelled(), "{err}");
    let c = s.db.connect().await;
    let status: String = c
        .query_one(
            "SELECT status FROM sanare.integrity_checks ORDER BY started_at DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "cancelled");

    // A business rule whose query kills its own connection mid-run.
    let rules = Rules::builder()
        .consistency(ConsistencyRule::query(
            "kills_connection",
            &t("orders"),
            "SELECT id FROM shop.orders WHERE pg_terminate_backend(pg_backend_pid())",
        ))
        .build()
        .unwrap();
    let i = integrity(&s, rules);
    let err = i.validate(scope(), &Control::detached()).await.unwrap_err();
    assert!(err.to_string().contains("kills_connection"), "{err}");
    let (status, error): (String, Option<String>) = {
        let r = c
            .query_one("SELECT status, error FROM sanare.integrity_checks ORDER BY started_at DESC LIMIT 1", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("kills_connection"));
}

#[tokio::test]
async fn rows_scope_tables_without_keys_and_timeouts() {
    let s = setup(60).await;
    let c = s.db.connect().await;
    c.batch_execute(
        "CREATE TABLE shop.audit (at timestamptz NOT NULL, who text NOT NULL, amount int CHECK (amount > 0));
         INSERT INTO shop.audit SELECT now(), 'u' || g, g FROM generate_series(1, 500) g;
         ALTER TABLE shop.audit ADD CONSTRAINT small CHECK (amount < 450) NOT VALID;",
    )
    .await
    .unwrap();
    let i = integrity(&s, Rules::default());
    let run = i
        .validate(
            ValidationScope::all().tables([t("audit")]),
            &Control::detached(),
        )
        .await
        .unwrap();
    let vs = all_violations(&i, run.check).await;
    assert_eq!(vs.len(), 51);
    assert!(
        vs.iter()
            .all(|v| v.row.as_ref().unwrap().key[0].column == "ctid")
    );
    assert_eq!(run.rows_checked, 500);

    // Only given rows.
    let row = RowRef::new(
        t("audit"),
        vec![ColumnValue::new("ctid", "tid", Some("(0,1)"))],
    );
    let only = i
        .validate(ValidationScope::all().rows([row]), &Control::detached())
        .await
        .unwrap();
    assert!(only.is_clean());
    assert_eq!(only.rows_checked, 1);

    // A chunk that exceeds its statement_timeout fails the run with context.
    let mut cfg = config(&s);
    cfg.chunk_timeout = Duration::from_millis(1);
    let rules = Rules::builder()
        .consistency(ConsistencyRule::predicate(
            "slow",
            &t("audit"),
            "pg_sleep(0.01) IS NOT NULL",
        ))
        .build()
        .unwrap();
    let slow = Integrity::builder()
        .pool(s.db.pool().clone())
        .rules(rules)
        .config(cfg)
        .build()
        .unwrap();
    let err = slow
        .validate(
            ValidationScope::all().tables([t("audit")]),
            &Control::detached(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fused"), "{err}");
}

#[tokio::test]
async fn rules_load_from_toml_and_bad_rules_are_refused() {
    let s = setup(30).await;
    let rules = Rules::from_toml(
        r#"
[[allowed_values]]
table = "shop.customers"
column = "country"
values = ["DE"]
severity = "low"
"#,
    )
    .unwrap();
    let i = integrity(&s, rules);
    let run = i
        .validate(
            scope().families([CheckFamily::Schema]),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(
        run.violations_by_severity.get(&Severity::Low).copied(),
        Some(
            s.db.connect()
                .await
                .query_one(
                    "SELECT count(*) FROM shop.customers WHERE country <> 'DE'",
                    &[]
                )
                .await
                .unwrap()
                .get::<_, i64>(0) as u64
        )
    );
    let bad = Rules::builder()
        .not_null(&t("customers"), "no_such_column")
        .build()
        .unwrap();
    let i = integrity(&s, bad);
    let err = i.validate(scope(), &Control::detached()).await.unwrap_err();
    assert!(err.to_string().contains("no_such_column"), "{err}");
    assert!(Integrity::builder().build().is_err());
}

/// The identity of a violation across runs: table, kind and row key.
fn identities(vs: &[Violation]) -> BTreeSet<String> {
    vs.iter()
        .map(|v| {
            format!(
                "{} {:?} {}",
                v.table,
                v.kind,
                v.row.as_ref().map(ToString::to_string).unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test]
async fn a_cancelled_run_resumes_skipping_done_chunks_and_ends_with_the_same_report() {
    let s = setup(500).await;
    let c = s.db.connect().await;
    c.batch_execute(
        "ALTER TABLE shop.products ADD CONSTRAINT price_below_500 CHECK (price_cents < 500) NOT VALID;
         ALTER TABLE shop.order_lines ADD CONSTRAINT qty_below_3 CHECK (quantity < 3) NOT VALID;
         SET session_replication_role = replica;
         INSERT INTO shop.order_lines VALUES (900001, 1, 1, 1, 10, 10);
         SET session_replication_role = origin;
         UPDATE shop.orders SET total_cents = total_cents + 1 WHERE id IN (5, 8, 450);",
    )
    .await
    .unwrap();
    let rules = Rules::builder().consistency(order_total()).build().unwrap();
    let i = integrity(&s, rules);

    // The reference: one uninterrupted run.
    let full = i.run(scope(), &Control::detached()).await.unwrap();
    let full_vs = all_violations(&i, full.id).await;
    assert!(full.total_violations() > 5, "{full:?}");

    // The same run, cancelled once a third of the rows are checked.
    let (control, mut progress) = Control::new();
    let token = control.cancel_token().clone();
    let third = full.rows_checked / 3;
    let watcher = tokio::spawn(async move {
        while let Some(p) = progress.changed().await {
            if p.done >= third {
                token.cancel();
                break;
            }
        }
    });
    let err = i.run(scope(), &control).await.unwrap_err();
    assert!(err.is_cancelled(), "{err}");
    watcher.await.unwrap();
    let check: uuid::Uuid = c
        .query_one(
            "SELECT id FROM sanare.integrity_checks WHERE status = 'cancelled'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (done, all): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE done_at IS NOT NULL), count(*) FROM sanare.integrity_chunks WHERE check_id = $1",
                &[&check],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(done > 0 && done < all, "done {done} of {all}");
    let check = sanare_core::CheckId::from_uuid(check);

    // Resume: the done units are not run again, and the report is the full run's.
    let (control, _) = Control::new();
    let resumed = i.resume(check, &control).await.unwrap();
    assert_eq!(resumed.id, check);
    assert_eq!(resumed.status, CheckStatus::Completed);
    assert_eq!(resumed.rows_checked, full.rows_checked);
    assert_eq!(resumed.tables_checked, full.tables_checked);
    assert_eq!(resumed.violations_by_severity, full.violations_by_severity);
    assert_eq!(resumed.families, full.families);
    let resumed_vs = all_violations(&i, check).await;
    assert_eq!(resumed_vs.len(), full_vs.len());
    assert_eq!(identities(&resumed_vs), identities(&full_vs));
    // The file on disk holds every violation once.
    let file = std::fs::read_to_string(resumed.violations_file.as_ref().unwrap()).unwrap();
    assert_eq!(file.lines().count(), full_vs.len());
    // Each unit ran exactly once: every unit is done, and the stored per-unit probe
    // counts add up to the full run's.
    let undone: i64 = c
        .query_one(
            "SELECT count(*) FROM sanare.integrity_chunks WHERE check_id = $1 AND done_at IS NULL",
            &[&check.as_uuid()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(undone, 0);

    // A completed run cannot be resumed; an unknown one is not found.
    let err = i.resume(check, &Control::detached()).await.unwrap_err();
    assert!(err.to_string().contains("already completed"), "{err}");
    assert!(
        i.resume(sanare_core::CheckId::new(), &Control::detached())
            .await
            .is_err()
    );
}
