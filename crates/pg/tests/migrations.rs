//! Migrations: idempotent, safe under concurrent starts, per-component history,
//! configurable schema, refusing edited history.

use sanare_pg::{Migration, Migrations, SchemaName};

const V1: Migration = Migration::new(
    1,
    "create_items",
    "CREATE TABLE {schema}.items (id bigint PRIMARY KEY, name text NOT NULL)",
);
const V2: Migration = Migration::new(
    2,
    "add_items_note",
    "ALTER TABLE {schema}.items ADD COLUMN note text; CREATE INDEX ON {schema}.items (name)",
);
const ITEMS: Migrations = Migrations::new("items", &[V1, V2]);
const OTHER: Migrations = Migrations::new(
    "other",
    &[Migration::new(
        1,
        "create_other",
        "CREATE TABLE {schema}.other (id int)",
    )],
);

async fn connect(db: &sanare_testing::TestDb) -> tokio_postgres::Client {
    db.connect().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_apply_each_migration_exactly_once() {
    let db = sanare_testing::test_db().await;
    let schema = SchemaName::default();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut client = connect(&db).await;
        let schema = schema.clone();
        tasks.push(tokio::spawn(async move {
            ITEMS.run(&mut client, &schema).await
        }));
    }
    let mut applied_total = 0;
    for t in tasks {
        let report = t.await.unwrap().expect("every concurrent start succeeds");
        applied_total += report.applied.len();
    }
    assert_eq!(
        applied_total, 2,
        "each migration applied by exactly one process"
    );

    let client = db.client().await;
    let history: Vec<i32> = client
        .query(
            "SELECT version FROM sanare.items_schema_history ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(history, vec![1, 2]);
    // The lock was released: nobody holds an advisory lock any more.
    let held: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
              WHERE l.locktype = 'advisory' AND d.datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0);
}

#[tokio::test]
async fn reruns_are_no_ops_and_components_keep_separate_histories() {
    let db = sanare_testing::test_db().await;
    let mut client = connect(&db).await;
    let schema = SchemaName::new("custom_sanare").unwrap();
    assert_eq!(
        ITEMS.run(&mut client, &schema).await.unwrap().applied.len(),
        2
    );
    assert!(
        ITEMS
            .run(&mut client, &schema)
            .await
            .unwrap()
            .applied
            .is_empty()
    );
    assert_eq!(
        OTHER.run(&mut client, &schema).await.unwrap().applied.len(),
        1
    );
    client
        .execute(
            "INSERT INTO custom_sanare.items (id, name, note) VALUES (1, 'a', 'b')",
            &[],
        )
        .await
        .unwrap();
    let sanare_exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'sanare')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!sanare_exists, "only the configured schema is used");
}

#[tokio::test]
async fn a_new_version_applies_on_top_and_a_failing_one_changes_nothing() {
    let db = sanare_testing::test_db().await;
    let mut client = connect(&db).await;
    let schema = SchemaName::default();
    const FIRST: Migrations = Migrations::new("items", &[V1]);
    assert_eq!(
        FIRST.run(&mut client, &schema).await.unwrap().applied.len(),
        1
    );
    const BROKEN: Migrations = Migrations::new(
        "items",
        &[
            V1,
            V2,
            Migration::new(3, "broken", "ALTER TABLE {schema}.nope ADD COLUMN x int"),
        ],
    );
    let err = BROKEN.run(&mut client, &schema).await.unwrap_err();
    assert!(err.to_string().contains("items migrations"), "{err}");
    // All pending migrations apply in one transaction: V2 was not left behind.
    let has_note: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = 'sanare' AND table_name = 'items' AND column_name = 'note')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!has_note);
    assert_eq!(
        ITEMS.run(&mut client, &schema).await.unwrap().applied.len(),
        1
    );
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let db = sanare_testing::test_db().await;
    let mut client = connect(&db).await;
    let schema = SchemaName::default();
    ITEMS.run(&mut client, &schema).await.unwrap();
    const EDITED: Migrations = Migrations::new(
        "items",
        &[Migration::new(
            1,
            "create_items",
            "CREATE TABLE {schema}.items (id int)",
        )],
    );
    let err = EDITED.run(&mut client, &schema).await.unwrap_err();
    assert!(
        err.to_string().contains("changed after it was applied"),
        "{err}"
    );
}
