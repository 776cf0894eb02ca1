//! Restore of whatever PostgreSQL holds, against a real server: each test captures a
//! schema, damages its rows, restores, and compares row fingerprints (and the state
//! of the schema's indexes, constraints and triggers) with the original.

use sanare_core::{Error, RestoreRequest};

mod fixtures;
use fixtures::{env, table};

/// Foreign keys, bytea, bpchar and composite keys, a table without a primary key,
/// identity columns, arrays and jsonb; index and constraint comments, a replica
/// identity index, a clustered index, a fill factor and an expression statistics
/// target, all of which the restore drops and rebuilds.
const ZOO: &str = "
    CREATE SCHEMA z;
    CREATE TABLE z.country (code char(2) PRIMARY KEY, name text NOT NULL);
    CREATE TABLE z.person (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        country char(2) REFERENCES z.country,
        email text NOT NULL UNIQUE,
        photo bytea,
        born date,
        score numeric(10, 3),
        tags text[],
        meta jsonb);
    COMMENT ON INDEX z.person_email_key IS 'one address per person';
    COMMENT ON CONSTRAINT person_country_fkey ON z.person IS 'where they live';
    ALTER TABLE z.person REPLICA IDENTITY USING INDEX person_email_key;
    CREATE INDEX person_born_idx ON z.person (born) WITH (fillfactor = 70);
    ALTER TABLE z.person CLUSTER ON person_born_idx;
    CREATE INDEX person_lower_email ON z.person (lower(email));
    ALTER INDEX z.person_lower_email ALTER COLUMN 1 SET STATISTICS 500;
    CREATE TABLE z.membership (
        person_id bigint REFERENCES z.person ON DELETE CASCADE,
        club char(4),
        since timestamptz,
        PRIMARY KEY (person_id, club));
    CREATE TABLE z.log (at timestamptz, line text);
    INSERT INTO z.country SELECT chr(65 + g / 26) || chr(65 + g % 26), 'country ' || g
      FROM generate_series(0, 99) g;
    INSERT INTO z.person (country, email, photo, born, score, tags, meta)
    SELECT chr(65 + (g % 100) / 26) || chr(65 + (g % 100) % 26), 'p' || g || '@example.org',
           decode(md5(g::text), 'hex'), date '1950-01-01' + g * 7, g * 1.125,
           ARRAY['t' || g % 3, 'u' || g % 5], jsonb_build_object('n', g, 'odd', g % 2 = 1)
      FROM generate_series(1, 3000) g;
    INSERT INTO z.membership SELECT p, c, timestamptz '2020-01-01 00:00+00' + p * interval '1 hour'
      FROM generate_series(1, 3000) p, (VALUES ('golf'), ('chss'), ('swim')) v(c) WHERE p % 3 <> 0;
    INSERT INTO z.log SELECT timestamptz '2024-01-01 00:00+00' + g * interval '1 min', 'line ' || g % 17
      FROM generate_series(1, 2000) g;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_of_many_kinds_comes_back_row_for_row_with_its_indexes() {
    let e = env(ZOO).await;
    let rows = e.rows("z").await;
    let objects = e.objects("z").await;
    let snap = e.capture(&["z"]).await;
    e.exec(
        "DELETE FROM z.membership WHERE person_id % 7 = 0;
         UPDATE z.person SET score = -1, tags = '{}' WHERE id % 5 = 0;
         DELETE FROM z.person WHERE id % 11 = 0;
         UPDATE z.country SET name = 'renamed' WHERE code < 'B';
         INSERT INTO z.log VALUES (now(), 'after the capture'), (now(), 'after the capture');
         DELETE FROM z.log WHERE line = 'line 3';",
    )
    .await;
    assert_ne!(e.rows("z").await, rows);
    let out = e.restore(RestoreRequest::new(snap.id)).await.unwrap();
    assert_eq!(out.tables.len(), 4);
    assert!(out.notes.is_empty(), "{:?}", out.notes);
    assert_eq!(e.rows("z").await, rows);
    assert_eq!(e.objects("z").await, objects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_valid_constraints_stay_not_valid_and_their_rows_come_back() {
    let e = env("
        CREATE SCHEMA z;
        CREATE DOMAIN z.small AS int;
        CREATE TABLE z.parent (id int PRIMARY KEY);
        CREATE TABLE z.item (id int PRIMARY KEY, qty int, parent_id int, size z.small);
        INSERT INTO z.parent SELECT generate_series(1, 10);
        INSERT INTO z.item SELECT g, g - 5, CASE WHEN g % 10 = 0 THEN 999 ELSE 1 + g % 10 END, g
          FROM generate_series(1, 50) g;
        ALTER TABLE z.item ADD CONSTRAINT item_qty_positive CHECK (qty > 0) NOT VALID;
        ALTER TABLE z.item ADD CONSTRAINT item_parent_fkey FOREIGN KEY (parent_id)
            REFERENCES z.parent NOT VALID;
        ALTER DOMAIN z.small ADD CONSTRAINT small_max CHECK (VALUE < 40) NOT VALID;
        COMMENT ON CONSTRAINT item_qty_positive ON z.item IS 'migration 42, step 1';")
    .await;
    let rows = e.rows("z").await;
    let objects = e.objects("z").await;
    assert!(
        objects
            .iter()
            .any(|o| o.contains("item_qty_positive") && o.contains("validated=f "))
    );
    let snap = e.capture(&["z"]).await;
    // The rows that break the NOT VALID constraints go; new rows must obey them.
    e.exec(
        "DELETE FROM z.item WHERE qty <= 0 OR parent_id = 999 OR size >= 40;
            UPDATE z.item SET qty = qty + 100 WHERE id % 3 = 0;",
    )
    .await;
    assert_ne!(e.rows("z").await, rows);
    e.restore(RestoreRequest::new(snap.id)).await.unwrap();
    assert_eq!(e.rows("z").await, rows);
    assert_eq!(e.objects("z").await, objects);
    // Still enforced for new rows.
    let err =
        e.db.client()
            .await
            .batch_execute("INSERT INTO z.item VALUES (100, -1, 1, 1)")
            .await;
    assert!(err.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_indexes_stay_as_they_were() {
    let e = env("
        CREATE SCHEMA z;
        CREATE TABLE z.t (id int PRIMARY KEY, x int, y int);
        CREATE INDEX t_y ON z.t (y);
        INSERT INTO z.t SELECT g, g % 10, g FROM generate_series(1, 200) g;
        CREATE TABLE z.nokey (a int, b text);
        INSERT INTO z.nokey SELECT g % 7, 'b' || g FROM generate_series(1, 100) g;
        CREATE TABLE z.child (id int PRIMARY KEY, t_id int REFERENCES z.t);
        INSERT INTO z.child SELECT g, g FROM generate_series(1, 50) g;")
    .await;
    // Left by failed concurrent builds: a unique one (duplicates), a non-unique
    // one (the expression fails on a row), one on a table without a key.
    for sql in [
        "CREATE UNIQUE INDEX CONCURRENTLY t_x_uniq ON z.t (x)",
        "CREATE INDEX CONCURRENTLY t_expr ON z.t ((100 / (y - 50)))",
        "CREATE UNIQUE INDEX CONCURRENTLY nokey_a ON z.nokey (a)",
    ] {
        assert!(
            e.db.client().await.batch_execute(sql).await.is_err(),
            "{sql}"
        );
    }
    let rows = e.rows("z").await;
    let objects = e.objects("z").await;
    assert_eq!(
        objects.iter().filter(|o| o.contains("valid=f ")).count(),
        3,
        "{objects:#?}"
    );
    let snap = e.capture(&["z"]).await;
    e.exec(
        "UPDATE z.t SET x = -x WHERE id % 4 = 0; DELETE FROM z.child WHERE id > 40;
            DELETE FROM z.t WHERE id > 150; INSERT INTO z.t VALUES (1000, 1, 1);
            DELETE FROM z.nokey WHERE a = 3; INSERT INTO z.nokey VALUES (42, 'new');",
    )
    .await;
    assert_ne!(e.rows("z").await, rows);
    let out = e.restore(RestoreRequest::new(snap.id)).await.unwrap();
    assert_eq!(e.rows("z").await, rows);
    assert_eq!(e.objects("z").await, objects);
    assert!(
        out.notes
            .iter()
            .any(|n| n.contains("z.t") && n.contains("invalid")),
        "{:?}",
        out.notes
    );
    assert!(
        out.notes.iter().any(|n| n.contains("z.nokey")),
        "{:?}",
        out.notes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferrable_constraints_come_back_as_they_were() {
    let e = env("
        CREATE SCHEMA z;
        CREATE TABLE z.slot (id int PRIMARY KEY, during tsrange, code text,
            CONSTRAINT slot_code_key UNIQUE (code) DEFERRABLE INITIALLY DEFERRED,
            CONSTRAINT slot_no_overlap EXCLUDE USING gist (during WITH &&) DEFERRABLE);
        CREATE TABLE z.booking (id int PRIMARY KEY,
            slot_id int REFERENCES z.slot DEFERRABLE INITIALLY DEFERRED,
            prev_id int REFERENCES z.booking DEFERRABLE);
        INSERT INTO z.slot SELECT g, tsrange(timestamp '2025-01-01' + g * interval '1 hour',
                                             timestamp '2025-01-01' + (g + 1) * interval '1 hour'), 'c' || g
          FROM generate_series(1, 300) g;
        INSERT INTO z.booking SELECT g, 1 + g % 300, NULLIF(g - 1, 0) FROM generate_series(1, 600) g;")
    .await;
    let rows = e.rows("z").await;
    let objects = e.objects("z").await;
    let snap = e.capture(&["z"]).await;
    e.exec("BEGIN; UPDATE z.slot SET code = 'c' || (301 - id);
            DELETE FROM z.booking WHERE id > 500; UPDATE z.booking SET slot_id = 1 WHERE id < 10; COMMIT;")
        .await;
    assert_ne!(e.rows("z").await, rows);
    e.restore(RestoreRequest::new(snap.id)).await.unwrap();
    assert_eq!(e.rows("z").await, rows);
    assert_eq!(e.objects("z").await, objects);
}

const TRIGGERS: &str = "
    CREATE SCHEMA z;
    CREATE SCHEMA side;
    CREATE TABLE side.audit (n serial PRIMARY KEY, what text);
    CREATE TABLE z.acct (id int PRIMARY KEY, balance numeric, touched text);
    CREATE FUNCTION z.stamp() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN NEW.touched := 'by trigger'; RETURN NEW; END $$;
    CREATE FUNCTION z.log() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN INSERT INTO side.audit (what) VALUES (TG_NAME || ' ' || TG_OP); RETURN NULL; END $$;
    INSERT INTO z.acct SELECT g, g * 10.5, 'original ' || g FROM generate_series(1, 300) g;
    CREATE TRIGGER acct_stamp BEFORE INSERT OR UPDATE ON z.acct FOR EACH ROW EXECUTE FUNCTION z.stamp();
    CREATE TRIGGER acct_log AFTER INSERT OR DELETE ON z.acct FOR EACH ROW EXECUTE FUNCTION z.log();
    CREATE TRIGGER acct_truncate AFTER TRUNCATE ON z.acct FOR EACH STATEMENT EXECUTE FUNCTION z.log();
    CREATE TRIGGER acct_replica AFTER INSERT ON z.acct FOR EACH ROW EXECUTE FUNCTION z.log();
    ALTER TABLE z.acct ENABLE REPLICA TRIGGER acct_replica;
    CREATE TRIGGER acct_always AFTER INSERT ON z.acct FOR EACH ROW EXECUTE FUNCTION z.log();
    ALTER TABLE z.acct ENABLE ALWAYS TRIGGER acct_always;
    CREATE TRIGGER acct_off AFTER INSERT ON z.acct FOR EACH ROW EXECUTE FUNCTION z.log();
    ALTER TABLE z.acct DISABLE TRIGGER acct_off;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_do_not_fire_unless_asked_and_keep_their_state() {
    let e = env(TRIGGERS).await;
    let rows = e.rows("z").await;
    let objects = e.objects("z").await;
    let snap = e.capture(&["z"]).await;
    e.exec("DELETE FROM z.acct WHERE id % 2 = 0; UPDATE z.acct SET balance = 0 WHERE id % 3 = 0;")
        .await;
    let audit = e.rows("side").await;
    assert_ne!(e.rows("z").await, rows);
    e.restore(RestoreRequest::new(snap.id)).await.unwrap();
    assert_eq!(
        e.rows("z").await,
        rows,
        "rows as captured, not as the triggers write them"
    );
    assert_eq!(
        e.rows("side").await,
        audit,
        "no trigger wrote to the audit table"
    );
    assert_eq!(
        e.objects("z").await,
        objects,
        "every trigger in the state it was"
    );

    // Asked for: they fire, the TRUNCATE trigger too (the table has no references).
    e.restore(RestoreRequest::new(snap.id).fire_triggers(true))
        .await
        .unwrap();
    let client = e.db.client().await;
    let fired: Vec<(String, i64)> = client
        .query(
            "SELECT what, count(*) FROM side.audit WHERE n > $1 GROUP BY 1 ORDER BY 1",
            &[&(audit[0].1 as i32)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        fired,
        [
            ("acct_always INSERT".to_owned(), 300),
            ("acct_log INSERT".to_owned(), 300),
            ("acct_truncate TRUNCATE".to_owned(), 1)
        ]
    );
    let stamped: i64 = client
        .query_one(
            "SELECT count(*) FROM z.acct WHERE touched = 'by trigger'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stamped, 300);
    assert_eq!(e.objects("z").await, objects);
}

const PARTITIONS: &str = "
    CREATE SCHEMA z;
    CREATE TABLE z.m (id int, at date, region text, v numeric, PRIMARY KEY (id, at, region))
        PARTITION BY RANGE (at);
    CREATE TABLE z.m_2024 PARTITION OF z.m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')
        PARTITION BY LIST (region);
    CREATE TABLE z.m_2024_eu PARTITION OF z.m_2024 FOR VALUES IN ('eu');
    CREATE TABLE z.m_2024_other PARTITION OF z.m_2024 DEFAULT;
    CREATE TABLE z.m_2025 PARTITION OF z.m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
    CREATE TABLE z.m_default PARTITION OF z.m DEFAULT;
    CREATE INDEX m_v ON z.m (v);
    INSERT INTO z.m SELECT g, date '2023-10-01' + (g * 3) % 900,
                           (ARRAY['eu', 'us', 'ap'])[1 + g % 3], g % 50 - 5
      FROM generate_series(1, 3000) g;
    ALTER TABLE z.m ADD CONSTRAINT m_v_positive CHECK (v >= 0) NOT VALID;
    CREATE TABLE z.h (id int PRIMARY KEY, name text) PARTITION BY HASH (id);
    CREATE TABLE z.h0 PARTITION OF z.h FOR VALUES WITH (MODULUS 3, REMAINDER 0);
    CREATE TABLE z.h1 PARTITION OF z.h FOR VALUES WITH (MODULUS 3, REMAINDER 1);
    CREATE TABLE z.h2 PARTITION OF z.h FOR VALUES WITH (MODULUS 3, REMAINDER 2);
    INSERT INTO z.h SELECT g, 'h' || g FROM generate_series(1, 900) g;
    CREATE TABLE z.ref_h (id int PRIMARY KEY, h_id int REFERENCES z.h);
    INSERT INTO z.ref_h SELECT g, 1 + g % 900 FROM generate_series(1, 400) g;
    CREATE TABLE z.animal (id int PRIMARY KEY, name text);
    CREATE TABLE z.dog (breed text) INHERITS (z.animal);
    CREATE TABLE z.cat (indoor bool, PRIMARY KEY (id)) INHERITS (z.animal);
    INSERT INTO z.animal SELECT g, 'animal ' || g FROM generate_series(1, 100) g;
    INSERT INTO z.dog SELECT g, 'dog ' || g, 'breed ' || g % 4 FROM generate_series(101, 160) g;
    INSERT INTO z.cat SELECT g, 'cat ' || g, g % 2 = 0 FROM generate_series(161, 200) g;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_and_inherited_tables_come_back_row_for_row_in_their_partitions() {
    let e = env(PARTITIONS).await;
    let rows = e.rows("z").await;
    let objects = e.objects("z").await;
    let snap = e.capture(&["z"]).await;
    let mut captured: Vec<String> = snap.tables.iter().map(|t| t.table.to_string()).collect();
    captured.sort();
    assert_eq!(
        captured,
        ["z.animal", "z.cat", "z.dog", "z.h", "z.m", "z.ref_h"],
        "partitions are captured with their partitioned table"
    );
    let animals = snap
        .tables
        .iter()
        .find(|t| t.table.name == "animal")
        .unwrap();
    assert_eq!(
        animals.rows, 100,
        "a parent's own rows only, not its children's"
    );
    e.exec(
        "DELETE FROM z.m WHERE id % 4 = 0; UPDATE z.m SET v = 1000 WHERE id % 5 = 0;
            UPDATE z.m SET region = 'eu' WHERE id % 7 = 0 AND region <> 'eu' AND v >= 0;
            DELETE FROM z.ref_h WHERE id > 300; DELETE FROM z.h WHERE id > 800;
            UPDATE z.animal SET name = 'renamed';
            DELETE FROM z.dog WHERE id % 2 = 0; INSERT INTO z.cat VALUES (500, 'new cat', true);",
    )
    .await;
    assert_ne!(e.rows("z").await, rows);
    e.restore(RestoreRequest::new(snap.id)).await.unwrap();
    assert_eq!(e.rows("z").await, rows);
    assert_eq!(e.objects("z").await, objects);

    // An inheritance parent alone: its children keep their rows.
    e.exec("UPDATE z.animal SET name = 'again'; DELETE FROM z.dog WHERE id % 3 = 0;")
        .await;
    let changed = e.rows("z").await;
    e.restore(RestoreRequest::new(snap.id).tables([table("z.animal")]))
        .await
        .unwrap();
    let after = e.rows("z").await;
    for (t, before) in rows.iter().zip(&changed) {
        let now = after.iter().find(|a| a.0 == t.0).unwrap();
        if t.0 == "z.animal" {
            assert_eq!(now, t);
        } else {
            assert_eq!(now, before, "{} changed", t.0);
        }
    }
}

const SHOP: &str = "
    CREATE SCHEMA z;
    CREATE TABLE z.customer (id int PRIMARY KEY, name text, email text UNIQUE NOT NULL);
    CREATE TABLE z.orders (id int PRIMARY KEY,
        customer_id int NOT NULL REFERENCES z.customer ON DELETE CASCADE,
        customer_email text REFERENCES z.customer (email) ON UPDATE CASCADE,
        total numeric);
    INSERT INTO z.customer SELECT g, 'customer ' || g, 'c' || g || '@example.org'
      FROM generate_series(1, 500) g;
    INSERT INTO z.orders SELECT g, 1 + g % 400, 'c' || (1 + g % 400) || '@example.org', g * 1.5
      FROM generate_series(1, 2000) g;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_restored_alone_keeps_its_childrens_references() {
    let e = env(SHOP).await;
    let rows = e.rows("z").await;
    let objects = e.objects("z").await;
    let snap = e.capture(&["z"]).await;
    // Customers without orders (401..500) may go; others change; a new one comes.
    e.exec(
        "UPDATE z.customer SET name = 'changed' WHERE id % 3 = 0;
            DELETE FROM z.customer WHERE id > 450;
            INSERT INTO z.customer VALUES (9000, 'new', 'new@example.org');
            UPDATE z.orders SET total = 0 WHERE id % 10 = 0;",
    )
    .await;
    let orders_before = e
        .rows("z")
        .await
        .into_iter()
        .find(|r| r.0 == "z.orders")
        .unwrap();
    let out = e
        .restore(RestoreRequest::new(snap.id).tables([table("z.customer")]))
        .await
        .unwrap();
    assert!(
        out.notes
            .iter()
            .any(|n| n.contains("z.customer") && n.contains("z.orders")),
        "{:?}",
        out.notes
    );
    let after = e.rows("z").await;
    assert_eq!(after[0], rows[0], "customers as captured");
    assert_eq!(after[1], orders_before, "orders untouched");
    assert_eq!(e.objects("z").await, objects);

    // A customer an order references that the snapshot lacks: refused, nothing changed.
    e.exec(
        "INSERT INTO z.customer VALUES (9001, 'late', 'late@example.org');
            INSERT INTO z.orders VALUES (9001, 9001, NULL, 1);
            UPDATE z.customer SET name = 'changed again' WHERE id = 5;",
    )
    .await;
    let before = e.rows("z").await;
    let err = e
        .restore(RestoreRequest::new(snap.id).tables([table("z.customer")]))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    for part in [
        "z.customer",
        "z.orders",
        "orders_customer_id_fkey",
        "9001",
        "changed nothing",
    ] {
        assert!(text.contains(part), "{part} missing from: {text}");
    }
    assert_eq!(e.rows("z").await, before);
    assert_eq!(e.objects("z").await, objects);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_break_the_live_schema_are_named_and_change_nothing() {
    let e = env("
        CREATE SCHEMA z;
        CREATE TABLE z.t (id int PRIMARY KEY, n int, code text);
        INSERT INTO z.t SELECT g, g, 'k' || g % 20 FROM generate_series(1, 300) g;")
    .await;
    let snap = e.capture(&["z"]).await;
    // Each change of the live schema since the capture, made to fit the live rows.
    let cases = [
        (
            "DELETE FROM z.t WHERE n >= 250; ALTER TABLE z.t ADD CONSTRAINT t_n_small CHECK (n < 250)",
            vec!["z.t", "t_n_small", "(250, 250, k10)"],
        ),
        (
            "DELETE FROM z.t WHERE id > 20; ALTER TABLE z.t ADD CONSTRAINT t_code_key UNIQUE (code)",
            vec!["z.t", "t_code_key", "(code)=(k1", "duplicated"],
        ),
        (
            "DELETE FROM z.t WHERE id = 7; CREATE TABLE z.seven (id int PRIMARY KEY);
             INSERT INTO z.seven SELECT id FROM z.t;
             ALTER TABLE z.t ADD CONSTRAINT t_seven_fkey FOREIGN KEY (id) REFERENCES z.seven",
            vec!["z.t", "t_seven_fkey", "(id)=(7)"],
        ),
    ];
    for (change, parts) in cases {
        e.exec(change).await;
        let before = e.rows("z").await;
        let objects = e.objects("z").await;
        let err = e
            .restore(RestoreRequest::new(snap.id).tables([table("z.t")]))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Conflict(_)), "{err:?}");
        for part in parts.iter().chain(&["changed nothing"]) {
            assert!(text.contains(part), "{part} missing from: {text}");
        }
        assert_eq!(e.rows("z").await, before, "{change}");
        assert_eq!(e.objects("z").await, objects, "{change}");
        e.exec("ALTER TABLE z.t DROP CONSTRAINT IF EXISTS t_n_small, DROP CONSTRAINT IF EXISTS t_code_key,
                DROP CONSTRAINT IF EXISTS t_seven_fkey; DROP TABLE IF EXISTS z.seven")
            .await;
    }
    e.restore(RestoreRequest::new(snap.id)).await.unwrap();
}
