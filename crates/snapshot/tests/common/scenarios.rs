//! Scenarios run against more than one kind of store (filesystem, S3).

use std::sync::Arc;
use std::time::Duration;

use sanare_core::{
    ColumnValue, Control, Error, RestoreRequest, RowRef, SnapshotRequest, SnapshotService,
    SnapshotStatus, TableRef,
};
use sanare_pg::SchemaName;
use sanare_snapshot::{Availability, BlockStore, RepositoryKey, Snapshots};
use sanare_testing::TestDb;
use sanare_testing::fixtures::order_service;

/// Row-for-row fingerprints of the order-service tables in `schema`.
pub(crate) async fn fingerprints(db: &TestDb, schema: &str) -> Vec<(String, i64, String)> {
    order_service::content_hashes(&**db.client().await, schema)
        .await
        .unwrap()
}

/// A service over `store` for `db`.
pub(crate) fn service(db: &TestDb, store: &Arc<dyn BlockStore>, key: &RepositoryKey) -> Snapshots {
    Snapshots::builder()
        .store(store.clone())
        .pool(db.pool().clone())
        .schema(SchemaName::default_schema())
        .key(key.clone())
        .build()
        .unwrap()
}

async fn status(db: &TestDb, id: sanare_core::SnapshotId) -> String {
    db.client()
        .await
        .query_one(
            "SELECT status FROM sanare.snapshots WHERE id = $1",
            &[&id.as_uuid()],
        )
        .await
        .unwrap()
        .get(0)
}

/// Issue #23: snapshot A lives in `store_a`; a process that opens `store_b` (a
/// wrong data directory, or the store the service moved to) captures, verifies,
/// lists, collects, reads rows and looks for the latest good snapshot. A stays
/// `ready` throughout and restorable from its own store.
pub(crate) async fn a_wrong_store_condemns_nothing(
    db: &TestDb,
    store_a: Arc<dyn BlockStore>,
    store_b: Arc<dyn BlockStore>,
) {
    let key = RepositoryKey::generate().unwrap();
    let a = service(db, &store_a, &key);
    let shop = || SnapshotRequest::new().schemas(["shop"]);
    let snap_a = a.create(shop(), &Control::detached()).await.unwrap();
    let repo_a = a.repository_config().await.unwrap().unwrap();
    let before = fingerprints(db, "shop").await;

    // The wrong store holds no repository: listing, verifying, collecting and the
    // latest-good search see nothing there and touch nothing.
    let b = service(db, &store_b, &key);
    assert!(b.repository_config().await.unwrap().is_none());
    assert!(b.list().await.unwrap().is_empty());
    assert!(b.latest_good(None).await.unwrap().is_none());
    b.gc(Duration::ZERO, &Control::detached()).await.unwrap();
    let err = b.verify(snap_a.id, &Control::detached()).await.unwrap_err();
    assert!(
        matches!(err, Error::Conflict(_)) && err.to_string().contains("not opened here"),
        "{err}"
    );
    let listed = b.list_all().await.unwrap();
    let seen = listed
        .snapshots
        .iter()
        .find(|s| s.info.id == snap_a.id)
        .unwrap();
    assert_eq!(
        seen.availability,
        Availability::OtherRepository {
            repository: Some(repo_a.id),
            location: Some(store_a.location()),
        }
    );

    // A capture into the wrong store is refused, naming the repository expected.
    let err = b.create(shop(), &Control::detached()).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&repo_a.id.to_string()) && msg.contains(&store_a.location()),
        "{msg}"
    );
    assert!(
        b.repository_config().await.unwrap().is_none(),
        "nothing created"
    );
    assert_eq!(status(db, snap_a.id).await, "ready");

    // On purpose, a new repository: its captures, verifies, GC, row reads and
    // restores never touch A.
    let b = Snapshots::builder()
        .store(store_b.clone())
        .pool(db.pool().clone())
        .key(key.clone())
        .new_repository(true)
        .build()
        .unwrap();
    let snap_b = b.create(shop(), &Control::detached()).await.unwrap();
    assert_ne!(b.repository_config().await.unwrap().unwrap().id, repo_a.id);
    assert_eq!(b.latest_good(None).await.unwrap().unwrap().id, snap_b.id);
    assert_eq!(
        b.list()
            .await
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect::<Vec<_>>(),
        vec![snap_b.id]
    );
    assert!(
        b.verify(snap_b.id, &Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
    assert!(b.verify(snap_a.id, &Control::detached()).await.is_err());
    let err = b
        .restore(RestoreRequest::new(snap_a.id), &Control::detached())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not opened here"), "{err}");
    let key_row = RowRef::new(
        TableRef::new("shop", "orders"),
        vec![ColumnValue::new("id", "bigint", Some("1"))],
    );
    assert!(
        b.fetch_rows(snap_a.id, std::slice::from_ref(&key_row))
            .await
            .is_err()
    );
    b.gc(Duration::ZERO, &Control::detached()).await.unwrap();
    b.apply_retention(&sanare_snapshot::RetentionPolicy::new(1, Duration::ZERO))
        .await
        .unwrap();
    assert!(b.delete(snap_a.id).await.is_err());
    assert_eq!(status(db, snap_a.id).await, "ready");

    // From its own store, A is listed, verifies, gives rows and restores.
    let a = service(db, &store_a, &key);
    assert_eq!(
        a.list()
            .await
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect::<Vec<_>>(),
        vec![snap_a.id]
    );
    assert!(
        a.verify(snap_a.id, &Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
    assert_eq!(a.fetch_rows(snap_a.id, &[key_row]).await.unwrap().len(), 1);
    db.client()
        .await
        .batch_execute("DELETE FROM shop.payments")
        .await
        .unwrap();
    a.restore(RestoreRequest::new(snap_a.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(fingerprints(db, "shop").await, before);

    // Missing blocks of a snapshot in the opened repository are still damage.
    for pack in store_a.list("packs/").await.unwrap() {
        store_a.delete(&pack.key).await.unwrap();
    }
    let report = a.verify(snap_a.id, &Control::detached()).await.unwrap();
    assert!(
        !report.is_ok() && report.problems.iter().any(|p| p.contains("missing")),
        "{report:?}"
    );
    assert_eq!(
        a.get(snap_a.id).await.unwrap().status,
        SnapshotStatus::Corrupted
    );
    assert_eq!(status(db, snap_b.id).await, "ready");
}

/// A schema with what a restore from the store alone must recreate: enum,
/// domain, composite type, identity and serial columns, a shared sequence,
/// collations, stored generated columns, defaults, `NOT VALID` and deferrable
/// constraints, partial and expression indexes, partitions, inheritance, an
/// unlogged table, storage parameters and comments.
pub(crate) const LAB_DDL: &str = r#"
CREATE SCHEMA lab;
CREATE TYPE lab.mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN lab.positive AS integer DEFAULT 1 CONSTRAINT positive_check CHECK (VALUE > 0);
CREATE TYPE lab.point2 AS (x double precision, y double precision);
COMMENT ON TYPE lab.mood IS 'how it went';
CREATE SEQUENCE lab.shared_seq START 100 INCREMENT 5;
CREATE TABLE lab.people (
    id        bigint GENERATED ALWAYS AS IDENTITY (START WITH 10 INCREMENT BY 2) PRIMARY KEY,
    code      serial UNIQUE,
    name      text COLLATE "C" NOT NULL,
    mood      lab.mood NOT NULL DEFAULT 'ok',
    moods     lab.mood[] DEFAULT '{}',
    score     lab.positive,
    at        lab.point2,
    ticket    int DEFAULT nextval('lab.shared_seq'),
    name_len  int GENERATED ALWAYS AS (length(name)) STORED,
    price     numeric(10, 2) CHECK (price >= 0),
    tag       char(3),
    born      timestamptz DEFAULT now()
) WITH (fillfactor = 80);
ALTER TABLE lab.people ADD CONSTRAINT name_not_blank CHECK (name <> '') NOT VALID;
COMMENT ON TABLE lab.people IS 'who is who';
COMMENT ON COLUMN lab.people.name IS 'full name';
COMMENT ON CONSTRAINT name_not_blank ON lab.people IS 'added during a migration';
CREATE INDEX people_lower_name ON lab.people (lower(name)) WHERE mood <> 'sad';
COMMENT ON INDEX lab.people_lower_name IS 'for search';
CREATE TABLE lab.tags (
    person bigint REFERENCES lab.people (id) DEFERRABLE INITIALLY DEFERRED,
    label  text
);
CREATE TABLE lab.visits (
    person bigint NOT NULL,
    day    date NOT NULL,
    note   text,
    PRIMARY KEY (person, day)
) PARTITION BY RANGE (day);
CREATE TABLE lab.visits_2024 PARTITION OF lab.visits FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE lab.visits_rest PARTITION OF lab.visits DEFAULT;
CREATE UNLOGGED TABLE lab.scratch (k text PRIMARY KEY, v jsonb);
CREATE TABLE lab.base (id int, kind text);
CREATE TABLE lab.derived (extra text NOT NULL DEFAULT 'x') INHERITS (lab.base);
INSERT INTO lab.people (name, mood, moods, score, at, price, tag, born)
SELECT 'person ' || g || repeat(' é', g % 4),
       (ARRAY['sad', 'ok', 'happy']::lab.mood[])[1 + g % 3],
       ARRAY['ok', 'happy']::lab.mood[],
       1 + g % 50,
       ROW(g * 1.5, -g)::lab.point2,
       (g * 3.25)::numeric(10, 2),
       CASE WHEN g % 7 = 0 THEN NULL ELSE 'T' || (g % 10) END,
       timestamptz '2024-03-01 10:00:00+00' + g * interval '37 minutes'
  FROM generate_series(1, 240) g;
INSERT INTO lab.visits (person, day, note)
SELECT p.id, date '2024-01-01' + ((p.id * 7 + v) % 600)::int, CASE WHEN v % 2 = 0 THEN 'visit ' || v END
  FROM lab.people p CROSS JOIN generate_series(1, 2) v;
INSERT INTO lab.tags SELECT id, 'tag ' || (id % 5) FROM lab.people WHERE id % 3 = 0;
INSERT INTO lab.scratch SELECT 'k' || g, jsonb_build_object('n', g, 'odd', g % 2 = 1) FROM generate_series(1, 50) g;
SELECT nextval('lab.shared_seq');
"#;

/// Every object of schema `lab`, printed as PostgreSQL prints it, oid-free.
pub(crate) async fn lab_schema(db: &TestDb) -> Vec<String> {
    let client = db.client().await;
    client
        .batch_execute("SET search_path = pg_catalog")
        .await
        .unwrap();
    let queries = [
        // Relations: kind, persistence, options, partitioning, inheritance, comment
        // (of tables and sequences; an index's is left out, as above).
        "SELECT c.relname || ' ' || c.relkind::text || c.relpersistence::text || ' ' || coalesce(array_to_string(c.reloptions, ','), '')
                || ' ' || coalesce(pg_get_partkeydef(c.oid), '') || ' ' || coalesce(pg_get_expr(c.relpartbound, c.oid), '')
                || ' ' || coalesce((SELECT string_agg(i.inhparent::regclass::text, ',') FROM pg_inherits i WHERE i.inhrelid = c.oid), '')
                || ' ' || CASE WHEN c.relkind IN ('i', 'I') THEN '' ELSE coalesce(obj_description(c.oid, 'pg_class'), '') END
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'lab'",
        // Columns.
        "SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull
                || ' ' || a.attidentity::text || a.attgenerated::text || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
                || ' ' || coalesce(co.collname, '') || ' ' || a.attislocal || ' ' || coalesce(col_description(c.oid, a.attnum), '')
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
           LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 100
          WHERE n.nspname = 'lab' AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'c')",
        // Constraints, with validity and deferrability.
        "SELECT coalesce(c.relname, t.typname) || ' ' || k.conname || ' ' || pg_get_constraintdef(k.oid) || ' ' || k.convalidated
                || ' ' || k.condeferrable::text || k.condeferred::text || ' ' || coalesce(obj_description(k.oid, 'pg_constraint'), '')
           FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace
           LEFT JOIN pg_class c ON c.oid = k.conrelid LEFT JOIN pg_type t ON t.oid = k.contypid
          WHERE n.nspname = 'lab'",
        // Indexes. (Not their comments: a live restore drops and rebuilds every
        // index of the tables it loads, and the rebuild does not bring comments
        // back; that is the restore's, not the DDL's.)
        "SELECT pg_get_indexdef(i.indexrelid) || ' ' || i.indisvalid
           FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'lab'",
        // Types: enums, domains, composites.
        "SELECT t.typname || ' ' || t.typtype::text || ' ' || coalesce(format_type(t.typbasetype, t.typtypmod), '') || ' ' || coalesce(t.typdefault, '')
                || ' ' || coalesce((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid), '')
                || ' ' || coalesce(obj_description(t.oid, 'pg_type'), '')
           FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
          WHERE n.nspname = 'lab' AND t.typtype IN ('e', 'd', 'c') AND t.typrelid NOT IN (SELECT oid FROM pg_class WHERE relkind <> 'c')",
        // Sequences: options and, for those a table owns, where they stand.
        "SELECT s.sequencename || ' ' || s.data_type || ' ' || s.start_value || ' ' || s.increment_by || ' ' || s.max_value
                || ' ' || s.cycle || ' ' || CASE WHEN s.sequencename = 'shared_seq' THEN '' ELSE coalesce(s.last_value::text, '') END
           FROM pg_sequences s WHERE s.schemaname = 'lab'",
    ];
    let mut out = Vec::new();
    for q in queries {
        for r in client.query(q, &[]).await.unwrap() {
            out.push(r.get::<_, String>(0));
        }
    }
    out.sort();
    out
}

/// Row-for-row fingerprints of every table of schema `lab`.
pub(crate) async fn lab_fingerprints(db: &TestDb) -> Vec<(String, i64, String)> {
    let client = db.client().await;
    let mut out = Vec::new();
    for t in [
        "people",
        "tags",
        "visits",
        "visits_2024",
        "visits_rest",
        "scratch",
        "base",
        "derived",
    ] {
        let r = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '') FROM ONLY lab.{t} x"
                ),
                &[],
            )
            .await
            .unwrap();
        out.push((t.to_owned(), r.get(0), r.get(1)));
    }
    out
}

/// Issue #19: the database is lost; a new, empty one and the store are all
/// there is. The newest snapshot in the store recreates the schema and the rows.
pub(crate) async fn a_lost_database_is_restored_from_the_store_alone(store: Arc<dyn BlockStore>) {
    let key = RepositoryKey::generate().unwrap();
    let original = crate::common::shop_db(300).await;
    original
        .client()
        .await
        .batch_execute(LAB_DDL)
        .await
        .unwrap();
    let snaps = service(&original, &store, &key);
    let request = || SnapshotRequest::new().schemas(["shop", "lab"]);
    snaps.create(request(), &Control::detached()).await.unwrap();
    original
        .client()
        .await
        .batch_execute("UPDATE shop.orders SET note = 'second' WHERE id % 9 = 0")
        .await
        .unwrap();
    let taken = snaps.create(request(), &Control::detached()).await.unwrap();
    let shop = fingerprints(&original, "shop").await;
    let lab = lab_fingerprints(&original).await;
    let schema = lab_schema(&original).await;
    assert!(schema.iter().any(|s| s.contains("NOT VALID")), "{schema:?}");

    // A new database: the snapshot catalog's tables and nothing else.
    let fresh = sanare_testing::test_db().await;
    sanare_snapshot::migrate(&mut fresh.connect().await, &SchemaName::default_schema())
        .await
        .unwrap();
    let rescue = service(&fresh, &store, &key);
    assert!(
        rescue.latest_good(None).await.unwrap().is_none(),
        "an empty catalog"
    );
    let listed = rescue.list_all().await.unwrap();
    assert_eq!(listed.snapshots.len(), 2, "{listed:?}");
    assert!(listed.snapshots.iter().all(|s| matches!(
        s.availability,
        Availability::StoreOnly {
            authenticated: true,
            ..
        }
    )));
    let latest = rescue.latest_in_store(None).await.unwrap().unwrap();
    assert_eq!(latest.id, taken.id);
    let out = rescue
        .restore(RestoreRequest::new(latest.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(out.recreated.len(), 11, "{:?}", out.recreated);
    assert_eq!(fingerprints(&fresh, "shop").await, shop);
    assert_eq!(lab_fingerprints(&fresh).await, lab);
    assert_eq!(lab_schema(&fresh).await, schema);

    // The new database continues the lost one's history: both snapshots are
    // its own now, the restored one ready, and it verifies.
    let mine = rescue.list().await.unwrap();
    assert_eq!(mine.len(), 2);
    assert_eq!(
        rescue.latest_good(None).await.unwrap().unwrap().id,
        taken.id
    );
    assert!(
        rescue
            .verify(taken.id, &Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
}
