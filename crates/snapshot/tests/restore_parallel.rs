//! Parallel restore (shadow tables loaded on several connections, swapped in with
//! one transaction) against a real server: the same rows and schema objects as the
//! one-transaction restore, refusals that change nothing, no shadow left behind.

use sanare_core::{Error, RestoreMode, RestoreRequest};

mod fixtures;
use fixtures::{Env, env, table};

const SCHEMA: &str = "
    CREATE SCHEMA z;
    DO $$ BEGIN CREATE ROLE sanare_reader_role; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
    CREATE TABLE z.country (code char(2) PRIMARY KEY, name text NOT NULL CHECK (name <> ''));
    CREATE TABLE z.person (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        country char(2) REFERENCES z.country,
        email text NOT NULL UNIQUE,
        photo bytea,
        score numeric(10, 3) DEFAULT 0,
        upper_email text GENERATED ALWAYS AS (upper(email)) STORED,
        meta jsonb) WITH (fillfactor = 80);
    COMMENT ON TABLE z.person IS 'people';
    COMMENT ON COLUMN z.person.email IS 'where to write';
    COMMENT ON INDEX z.person_email_key IS 'one address per person';
    ALTER TABLE z.person REPLICA IDENTITY USING INDEX person_email_key;
    CREATE INDEX person_score_idx ON z.person (score DESC);
    CREATE INDEX person_positive_idx ON z.person (score) WHERE score > 0;
    ALTER TABLE z.person CLUSTER ON person_score_idx;
    ALTER TABLE z.person ALTER COLUMN meta SET STATISTICS 50;
    CREATE STATISTICS z.person_stats (dependencies) ON country, score FROM z.person;
    GRANT SELECT ON z.person TO sanare_reader_role;
    CREATE TABLE z.note (n serial PRIMARY KEY, person_id bigint REFERENCES z.person ON DELETE CASCADE,
                         body text, prev int REFERENCES z.note DEFERRABLE);
    CREATE FUNCTION z.touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.body := 'touched'; RETURN NEW; END $$;
    CREATE TRIGGER note_touch BEFORE INSERT ON z.note FOR EACH ROW EXECUTE FUNCTION z.touch();
    CREATE TRIGGER note_off BEFORE UPDATE ON z.note FOR EACH ROW EXECUTE FUNCTION z.touch();
    ALTER TABLE z.note DISABLE TRIGGER note_off;
    CREATE VIEW z.busy AS SELECT p.email, count(*) AS notes FROM z.person p JOIN z.note n ON n.person_id = p.id GROUP BY p.email;
    CREATE VIEW z.busiest AS SELECT * FROM z.busy WHERE notes > 2;
    INSERT INTO z.country SELECT chr(65 + g / 26) || chr(65 + g % 26), 'country ' || g FROM generate_series(0, 99) g;
    INSERT INTO z.person (country, email, photo, score, meta)
    SELECT chr(65 + (g % 100) / 26) || chr(65 + (g % 100) % 26), 'p' || g || '@example.org',
           decode(md5(g::text), 'hex'), g % 50 - 10, jsonb_build_object('n', g)
      FROM generate_series(1, 2000) g;
    ALTER TABLE z.note DISABLE TRIGGER note_touch;
    INSERT INTO z.note (person_id, body, prev) SELECT 1 + g % 2000, 'a rather long body number ' || g,
           NULLIF(g - 1, 0) FROM generate_series(1, 3000) g;
    ALTER TABLE z.note ADD CONSTRAINT note_body_short CHECK (length(body) < 20) NOT VALID;
    ALTER TABLE z.note ADD CONSTRAINT note_body_shorter CHECK (length(body) < 40);
    ALTER TABLE z.note ENABLE TRIGGER note_touch;";

fn parallel(id: sanare_core::SnapshotId) -> RestoreRequest {
    RestoreRequest::new(id).mode(RestoreMode::Parallel { connections: 2 })
}

async fn acls(e: &Env) -> Vec<(String, Option<String>)> {
    e.db.client()
        .await
        .query(
            "SELECT c.oid::regclass::text, c.relacl::text FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'z' AND c.relkind IN ('r', 'v') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn shadows_left(e: &Env) -> i64 {
    e.db.client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'sanare\\_shadow\\_%' OR relname LIKE 'sanare\\_old\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn view_rows(e: &Env) -> Vec<(String, i64)> {
    e.db.client()
        .await
        .query("SELECT email, notes FROM z.busiest ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_restore_swaps_in_the_same_rows_and_schema_objects() {
    let e = env(SCHEMA).await;
    let rows = e.rows("z").await;
    let objects = e.objects("z").await;
    let grants = acls(&e).await;
    let busiest = view_rows(&e).await;
    let snap = e.capture(&["z"]).await;
    e.exec("DELETE FROM z.note WHERE n > 2500; UPDATE z.person SET score = 99 WHERE id % 4 = 0;
            UPDATE z.person SET meta = '{}' WHERE id > 1900; UPDATE z.country SET name = 'x' WHERE code > 'C';
            INSERT INTO z.note (person_id, body) VALUES (1, 'late');")
        .await;
    assert_ne!(e.rows("z").await, rows);
    // As a crashed parallel restore leaves it (created after the fingerprints).
    e.exec("CREATE TABLE z.sanare_shadow_dead0000_0 (id int)")
        .await;
    let out = e.restore(parallel(snap.id)).await.unwrap();
    assert_eq!(out.tables.len(), 3);
    assert!(
        out.notes.iter().any(|n| n.contains("swapped in")),
        "{:?}",
        out.notes
    );
    assert!(
        out.notes
            .iter()
            .any(|n| n.contains("z.sanare_shadow_dead0000_0")),
        "{:?}",
        out.notes
    );
    assert_eq!(e.rows("z").await, rows);
    assert_eq!(e.objects("z").await, objects);
    assert_eq!(acls(&e).await, grants);
    assert_eq!(
        view_rows(&e).await,
        busiest,
        "the views read the new tables"
    );
    assert_eq!(shadows_left(&e).await, 0);
    // Sequences continue where the snapshot left them, and the tables work.
    let client = e.db.client().await;
    let next: i64 = client
        .query_one(
            "INSERT INTO z.person (country, email) VALUES ('AA', 'new@example.org') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(next, 2001);
    let n: i32 = client
        .query_one(
            "INSERT INTO z.note (person_id, body) VALUES (1, 'x') RETURNING n",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3001);
    let stats: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_statistic_ext WHERE stxname = 'person_stats'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stats, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_swap_cannot_carry_is_refused_before_anything_changes() {
    let e = env("
        CREATE SCHEMA z;
        CREATE TABLE z.m (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
        CREATE TABLE z.m1 PARTITION OF z.m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        CREATE TABLE z.t (id int PRIMARY KEY, v int);
        CREATE MATERIALIZED VIEW z.mv AS SELECT sum(v) FROM z.t;
        CREATE TABLE z.outside (id int PRIMARY KEY, t_id int REFERENCES z.t);
        INSERT INTO z.m SELECT g, date '2024-01-01' + g FROM generate_series(1, 100) g;
        INSERT INTO z.t SELECT g, g FROM generate_series(1, 100) g;
        INSERT INTO z.outside SELECT g, g FROM generate_series(1, 10) g;")
    .await;
    let snap = e.capture(&["z"]).await;
    e.exec("DELETE FROM z.t WHERE id > 50; DELETE FROM z.m WHERE id > 50;")
        .await;
    let before = e.rows("z").await;
    let err = e
        .restore(parallel(snap.id).tables([table("z.m"), table("z.t")]))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    for part in [
        "z.m is partitioned",
        "materialized view z.mv",
        "z.outside",
        "one transaction",
    ] {
        assert!(text.contains(part), "{part} missing from: {text}");
    }
    assert_eq!(e.rows("z").await, before);
    assert_eq!(shadows_left(&e).await, 0);
    // Triggers cannot fire in shadows.
    let err = e
        .restore(parallel(snap.id).tables([table("z.m")]).fire_triggers(true))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_restore_that_fails_leaves_the_live_tables_and_no_shadow() {
    let e = env("
        CREATE SCHEMA z;
        CREATE TABLE z.a (id int PRIMARY KEY, n int);
        CREATE TABLE z.b (id int PRIMARY KEY, a_id int REFERENCES z.a);
        INSERT INTO z.a SELECT g, g FROM generate_series(1, 500) g;
        INSERT INTO z.b SELECT g, g FROM generate_series(1, 500) g;")
    .await;
    let snap = e.capture(&["z"]).await;
    // A check the snapshot's rows break: found when the shadow's checks are added.
    e.exec(
        "DELETE FROM z.b WHERE id > 400; DELETE FROM z.a WHERE n > 400;
            ALTER TABLE z.a ADD CONSTRAINT a_n_small CHECK (n <= 400);",
    )
    .await;
    let before = e.rows("z").await;
    let objects = e.objects("z").await;
    let err = e.restore(parallel(snap.id)).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    for part in ["z.a", "a_n_small", "changed nothing"] {
        assert!(text.contains(part), "{part} missing from: {text}");
    }
    assert_eq!(e.rows("z").await, before);
    assert_eq!(e.objects("z").await, objects);
    assert_eq!(shadows_left(&e).await, 0);

    // Found later, once every shadow is loaded: a foreign key to a table outside
    // the restore that lacks rows the snapshot references.
    e.exec(
        "ALTER TABLE z.a DROP CONSTRAINT a_n_small;
            CREATE TABLE z.c (id int PRIMARY KEY); INSERT INTO z.c SELECT generate_series(1, 400);
            ALTER TABLE z.b ADD CONSTRAINT b_c_fkey FOREIGN KEY (id) REFERENCES z.c;",
    )
    .await;
    let before = e.rows("z").await;
    let objects = e.objects("z").await;
    let err = e
        .restore(parallel(snap.id).tables([table("z.a"), table("z.b")]))
        .await
        .unwrap_err();
    let text = err.to_string();
    for part in ["b_c_fkey", "(id)=(401)", "changed nothing"] {
        assert!(text.contains(part), "{part} missing from: {text}");
    }
    assert_eq!(e.rows("z").await, before);
    assert_eq!(e.objects("z").await, objects);
    assert_eq!(shadows_left(&e).await, 0, "the loaded shadows are dropped");
}
