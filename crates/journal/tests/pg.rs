//! The PostgreSQL backend: conformance suite, record_in atomicity, the sequence-gap
//! race, exactly-once PostgreSQL handlers, bad payload hashes, dropped connections.

mod common;

use std::time::Duration;

use async_trait::async_trait;
use common::{Counting, entry};
use sanare_core::{
    Control, JournalCut, JournalPosition, JournalService, ReplayRange, ReplayRequest, Result,
};
use sanare_journal::{Journal, JournalEntry, PgHandler, Query};
use sanare_pg::SchemaName;
use sanare_testing::{TestDb, test_db};

fn schema() -> SchemaName {
    SchemaName::default()
}

/// A PostgreSQL journal whose host applies changes only by replay (so a cut
/// need not leave recent `record()` entries out).
async fn open(db: &TestDb) -> Journal {
    Journal::postgres(db.pool().clone(), schema())
        .write_ahead_window(std::time::Duration::ZERO)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_ordering_idempotency_queries() {
    let db = test_db().await;
    let journal = open(&db).await;
    common::ordering_idempotency_queries(&journal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_replay_exactly_once() {
    let db = test_db().await;
    let pool = db.pool().clone();
    common::replay_exactly_once(async |h: Counting| {
        Journal::postgres(pool.clone(), schema())
            .handler("op", h)
            .build()
            .await
            .unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_parallel_replay() {
    let db = test_db().await;
    let pool = db.pool().clone();
    common::parallel_replay_applies_everything(async |h: Counting| {
        Journal::postgres(pool.clone(), schema())
            .handler("op", h)
            .build()
            .await
            .unwrap()
    })
    .await;
}

/// A journal table created by migrations 1–3, with entries and marks, upgrades to
/// the current schema with its entries, their marks and its idempotency keys intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_from_migration_3_upgrades_with_its_entries() {
    let db = test_db().await;
    let mut client = db.connect().await;
    static FIRST_THREE: std::sync::OnceLock<Vec<sanare_pg::Migration>> = std::sync::OnceLock::new();
    let first_three =
        FIRST_THREE.get_or_init(|| sanare_journal::MIGRATIONS.migrations()[..3].to_vec());
    sanare_pg::Migrations::new("journal", first_three)
        .run(&mut client, &schema())
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO sanare.transaction_journal (entry_id, transaction_id, operation_type, \
               entry_timestamp, idempotency_key, payload, payload_hash, entry_status) \
             VALUES (gen_random_uuid(), 't', 'op', now(), 'k-old', '\\x00', '\\x00', 'replayed')",
        )
        .await
        .unwrap();
    let journal = open(&db).await;
    let columns: Vec<String> = client
        .query(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = 'sanare' AND table_name = 'transaction_journal'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!columns.iter().any(|c| c == "entry_status"), "{columns:?}");
    let old = journal.query(&Query::all()).await.unwrap();
    assert_eq!(old.len(), 1);
    let again = journal
        .record(entry("op", "new").idempotency_key("k-old"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.position, old[0].position);
    let fresh = journal.record(entry("op", "fresh")).await.unwrap();
    assert!(fresh.position > old[0].position);
}

/// A pooled connection's transaction: the entry's insert is prepared once in the
/// connection's statement cache and reused; the call pipelines with a host
/// statement; a failing host statement in the same pipeline records nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_in_on_a_pooled_transaction_uses_its_statement_cache_and_pipelines() {
    let db = test_db().await;
    let journal = open(&db).await;
    let pool = sanare_pg::connect_pool(db.url(), 1).unwrap();
    let mut conn = sanare_pg::get_conn(&pool).await.unwrap();
    conn.batch_execute("CREATE TABLE orders (id int PRIMARY KEY)")
        .await
        .unwrap();
    let prepared_inserts = async |c: &deadpool_postgres::Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pg_prepared_statements \
             WHERE statement LIKE 'INSERT INTO%transaction_journal%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    assert_eq!(prepared_inserts(&conn).await, 0);

    let mut positions = Vec::new();
    for id in 1..=3 {
        let tx = conn.transaction().await.unwrap();
        // Both requests are in flight together.
        let (n, r) = futures_util::future::try_join(
            async {
                tx.execute("INSERT INTO orders VALUES ($1)", &[&id])
                    .await
                    .map_err(|e| sanare_core::Error::database("host", e, false))
            },
            journal.record_in(&tx, entry("order", &id.to_string())),
        )
        .await
        .unwrap();
        assert_eq!(n, 1);
        positions.push(r.position);
        tx.commit().await.unwrap();
    }
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    // One prepared insert for three entries: the statement cache's.
    assert_eq!(prepared_inserts(&conn).await, 1);

    // The host's statement fails in the same pipeline: nothing commits.
    let tx = conn.transaction().await.unwrap();
    let failed = futures_util::future::try_join(
        async {
            tx.execute("INSERT INTO orders VALUES (1)", &[])
                .await
                .map_err(|e| sanare_core::Error::database("host", e, false))
        },
        journal.record_in(&tx, entry("order", "lost")),
    )
    .await;
    assert!(failed.is_err());
    tx.rollback().await.unwrap();
    let payloads: Vec<String> = journal
        .query(&Query::all())
        .await
        .unwrap()
        .iter()
        .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
        .collect();
    assert_eq!(payloads.len(), 3, "{payloads:?}");
    assert!(!payloads.iter().any(|p| p.contains("lost")), "{payloads:?}");

    // A keyed duplicate on the pooled path finds the first entry.
    let tx = conn.transaction().await.unwrap();
    let first = journal
        .record_in(&tx, entry("order", "k").idempotency_key("k1"))
        .await
        .unwrap();
    let again = journal
        .record_in(&tx, entry("order", "k again").idempotency_key("k1"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(!first.duplicate && again.duplicate);
    assert_eq!((again.position, again.id), (first.position, first.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_in_commits_and_rolls_back_with_the_host_transaction() {
    let db = test_db().await;
    let journal = open(&db).await;
    let mut client = db.connect().await;
    client
        .batch_execute("CREATE TABLE orders (id int PRIMARY KEY)")
        .await
        .unwrap();

    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO orders VALUES (1)", &[])
        .await
        .unwrap();
    journal.record_in(&tx, entry("order", "1")).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(journal.query(&Query::all()).await.unwrap().is_empty());

    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO orders VALUES (2)", &[])
        .await
        .unwrap();
    let r = journal
        .record_in(&tx, entry("order", "2").idempotency_key("o2"))
        .await
        .unwrap();
    let dup = journal
        .record_in(&tx, entry("order", "2 again").idempotency_key("o2"))
        .await
        .unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.position, r.position);
    tx.commit().await.unwrap();
    let all = journal.query(&Query::all()).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].payload_as::<String>().unwrap(), "2");
    assert_eq!(journal.head().await.unwrap(), r.position);
}

/// The sequence-gap race: a writer holding a lower sequence number commits after a
/// higher one. An open-range replay must wait for it rather than pass over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_sequence_committed_late_is_never_missed_by_replay() {
    let db = test_db().await;
    let counting = Counting::default();
    let journal = Journal::postgres(db.pool().clone(), schema())
        .handler("op", counting.clone())
        .build()
        .await
        .unwrap();
    let mut slow = db.connect().await;
    let slow_tx = slow.transaction().await.unwrap();
    let low = journal
        .record_in(&slow_tx, entry("op", "low"))
        .await
        .unwrap();
    let high = journal.record(entry("op", "high")).await.unwrap();
    assert!(low.position < high.position);

    // The replay cannot finish while the lower number is in flight.
    let replay = {
        let journal = journal.clone();
        tokio::spawn(async move {
            journal
                .replay(
                    ReplayRequest::new(ReplayRange::Positions {
                        from: JournalPosition(1),
                        to: None,
                    }),
                    &Control::detached(),
                )
                .await
        })
    };
    let mut replay = std::pin::pin!(replay);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut replay)
            .await
            .is_err(),
        "replay must wait for the in-flight writer"
    );
    assert!(counting.positions().is_empty());
    slow_tx.commit().await.unwrap();
    let summary = replay.await.unwrap().unwrap();
    assert_eq!(summary.applied, 2);
    assert_eq!(summary.last_position, Some(high.position));
    assert_eq!(counting.positions(), vec![low.position.0, high.position.0]);
}

/// A cut taken in a snapshot that misses a late, lower-numbered writer, and whose
/// writers commit out of xid order: restore + replay(After(cut)) applies exactly the
/// entries the snapshot does not contain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_are_exact_with_out_of_order_commits() {
    let db = test_db().await;
    let counting = Counting::default();
    let journal = Journal::postgres(db.pool().clone(), schema())
        .handler("op", counting.clone())
        .write_ahead_window(std::time::Duration::ZERO)
        .build()
        .await
        .unwrap();
    let before = journal.record(entry("op", "before")).await.unwrap();

    // T0 takes its xid first, T1 second; T1 draws the lower sequence number.
    let mut c0 = db.connect().await;
    let mut c1 = db.connect().await;
    let t0 = c0.transaction().await.unwrap();
    let t1 = c1.transaction().await.unwrap();
    t0.query_one("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();
    t1.query_one("SELECT pg_current_xact_id()", &[])
        .await
        .unwrap();
    let low = journal.record_in(&t1, entry("op", "t1-low")).await.unwrap();
    let mid = journal.record_in(&t0, entry("op", "t0-mid")).await.unwrap();
    assert!(low.position < mid.position);
    t0.commit().await.unwrap();

    // The snapshot: sees `before` and T0, not T1 (still running).
    let mut snap_client = db.connect().await;
    let snap_tx = snap_client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    let snapshot: String = snap_tx
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .unwrap()
        .get(0);
    let cut_task = {
        let journal = journal.clone();
        let snapshot = snapshot.clone();
        tokio::spawn(async move { journal.cut(Some(&snapshot)).await })
    };
    t1.commit().await.unwrap();
    let cut: JournalCut = cut_task.await.unwrap().unwrap();
    snap_tx.commit().await.unwrap();
    assert_eq!(cut.db_snapshot.as_deref(), Some(snapshot.as_str()));
    // Everything at or before the position is in the snapshot: T1's entry is not.
    assert!(cut.position < low.position, "{cut:?} vs {low:?}");
    assert!(cut.position >= before.position);
    let after = journal.record(entry("op", "after")).await.unwrap();

    let s = journal
        .replay(
            ReplayRequest::new(ReplayRange::After(cut)),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(
        counting.positions(),
        vec![low.position.0, after.position.0],
        "exactly the entries missing from the snapshot, in order"
    );
    assert_eq!(s.applied, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_without_a_snapshot_takes_one() {
    let db = test_db().await;
    let journal = open(&db).await;
    let r = journal.record(entry("op", "a")).await.unwrap();
    let cut = journal.cut(None).await.unwrap();
    assert_eq!(cut.position, r.position);
    assert!(cut.db_snapshot.is_some());
}

/// Inserts the entry's payload into `applied_rows` in the replay transaction.
struct InsertRow {
    fail_on: Option<String>,
}

#[async_trait]
impl PgHandler for InsertRow {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entry: &JournalEntry,
    ) -> Result<()> {
        let value: String = entry.payload_as()?;
        tx.execute(
            "INSERT INTO applied_rows (position, value) VALUES ($1, $2)",
            &[&(entry.position.0 as i64), &value],
        )
        .await
        .map_err(|e| sanare_pg::map_pg_error("inserting a replayed row", e))?;
        if self.fail_on.as_deref() == Some(value.as_str()) {
            return Err(sanare_core::Error::invalid_input("refusing this entry"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_handlers_commit_effect_and_mark_together() {
    let db = test_db().await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE applied_rows (position bigint, value text)")
        .await
        .unwrap();
    // The effect of e7 fails: its row and its mark roll back together.
    let journal = Journal::postgres(db.pool().clone(), schema())
        .pg_handler(
            "op",
            InsertRow {
                fail_on: Some("e7".into()),
            },
        )
        .build()
        .await
        .unwrap();
    for i in 0..20 {
        journal.record(entry("op", &format!("e{i}"))).await.unwrap();
    }
    let first = journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    assert_eq!(first.applied, 19);
    assert_eq!(first.failures.len(), 1);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM applied_rows", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 19);

    // A second replay (the handler fixed) applies only the failed one.
    let journal = Journal::postgres(db.pool().clone(), schema())
        .pg_handler("op", InsertRow { fail_on: None })
        .build()
        .await
        .unwrap();
    let second = journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    assert_eq!((second.applied, second.already_applied), (1, 19));
    let rows = applied_counts(&client).await;
    assert_eq!(rows.len(), 20);
    assert!(rows.iter().all(|(_, n)| *n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_journal_with_pg_handlers_is_exactly_once() {
    let db = test_db().await;
    let dir = tempfile::tempdir().unwrap();
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE applied_rows (position bigint, value text)")
        .await
        .unwrap();
    let build = || {
        Journal::wal(dir.path())
            .pg_handler("op", InsertRow { fail_on: None })
            .handler_database(db.pool().clone(), schema())
            .build()
    };
    let journal = build().await.unwrap();
    for i in 0..10 {
        journal.record(entry("op", &format!("e{i}"))).await.unwrap();
    }
    let s = journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    assert_eq!(s.applied, 10);
    drop(journal);
    let journal = build().await.unwrap();
    let s = journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    assert_eq!((s.applied, s.already_applied), (0, 10));
    let rows: i64 = client
        .query_one("SELECT count(*) FROM applied_rows", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 10);

    // Without a handler database, a PostgreSQL handler is a configuration error.
    let err = Journal::wal(dir.path())
        .pg_handler("op", InsertRow { fail_on: None })
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, sanare_core::Error::Config { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_with_a_bad_hash_are_reported_and_never_applied() {
    let db = test_db().await;
    let counting = Counting::default();
    let journal = Journal::postgres(db.pool().clone(), schema())
        .handler("op", counting.clone())
        .build()
        .await
        .unwrap();
    for i in 0..3 {
        journal.record(entry("op", &format!("e{i}"))).await.unwrap();
    }
    let client = db.client().await;
    client
        .execute(
            "UPDATE sanare.transaction_journal SET payload = payload || '\\x00'::bytea \
             WHERE sequence_number = 2",
            &[],
        )
        .await
        .unwrap();
    let v = journal.validate(&Control::detached()).await.unwrap();
    assert_eq!(v.entries, 3);
    assert_eq!(v.problems.len(), 1);
    let s = journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    assert_eq!(s.applied, 2);
    assert_eq!(s.failures.len(), 1);
    assert_eq!(s.failures[0].position, JournalPosition(2));
    assert!(s.failures[0].reason.contains("hash"));
    assert_eq!(counting.positions(), vec![1, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_fails_record_in_cleanly() {
    let db = test_db().await;
    let journal = open(&db).await;
    let mut victim = db.connect().await;
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let tx = victim.transaction().await.unwrap();
    db.client()
        .await
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = journal
        .record_in(&tx, entry("op", "lost"))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    drop(tx);
    assert!(journal.query(&Query::all()).await.unwrap().is_empty());
    // The journal itself keeps working.
    assert!(journal.record(entry("op", "ok")).await.unwrap().position.0 >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_and_purge_on_postgres() {
    let db = test_db().await;
    let journal = open(&db).await;
    for i in 0..30 {
        journal.record(entry("op", &format!("e{i}"))).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pg.archive");
    assert_eq!(
        journal
            .archive(&Query::all().to(JournalPosition(10)), &path)
            .await
            .unwrap(),
        10
    );
    let back = Journal::read_archive(&path).unwrap();
    assert_eq!(back.len(), 10);
    assert!(back.iter().all(JournalEntry::payload_intact));
    assert_eq!(journal.purge(JournalPosition(10)).await.unwrap(), 10);
    let left = journal.query(&Query::all()).await.unwrap();
    assert_eq!(left.len(), 20);
    assert_eq!(journal.stats().await.unwrap().entries, 20);
}

/// A batch PostgreSQL handler: one multi-row insert per run, counting its calls;
/// cancels the replay after `cancel_after_batches` batches, and fails (rolls back)
/// any batch holding the entry `poison`.
struct BatchInsert {
    batches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    cancel_after_batches: Option<(usize, Control)>,
    poison: Option<String>,
}

#[async_trait]
impl PgHandler for BatchInsert {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entry: &JournalEntry,
    ) -> Result<()> {
        self.apply_batch(tx, &[entry]).await
    }

    async fn apply_batch(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entries: &[&JournalEntry],
    ) -> Result<()> {
        let positions: Vec<i64> = entries.iter().map(|e| e.position.0 as i64).collect();
        let values: Vec<String> = entries
            .iter()
            .map(|e| e.payload_as::<String>())
            .collect::<Result<_>>()?;
        tx.execute(
            "INSERT INTO applied_rows (position, value) SELECT * FROM unnest($1::bigint[], $2::text[])",
            &[&positions, &values],
        )
        .await
        .map_err(|e| sanare_pg::map_pg_error("inserting replayed rows", e))?;
        if let Some(p) = &self.poison
            && values.contains(p)
        {
            return Err(sanare_core::Error::invalid_input("refusing this entry"));
        }
        let n = self
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        if let Some((after, control)) = &self.cancel_after_batches
            && n >= *after
        {
            control.cancel_token().cancel();
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_pg_handlers_are_exactly_once_across_an_interrupted_replay() {
    let db = test_db().await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE applied_rows (position bigint, value text)")
        .await
        .unwrap();
    let batches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let build = |handler: BatchInsert| {
        Journal::postgres(db.pool().clone(), schema())
            .pg_handler("op", handler)
            .replay_batch(10)
            .build()
    };
    let journal = build(BatchInsert {
        batches: batches.clone(),
        cancel_after_batches: None,
        poison: None,
    })
    .await
    .unwrap();
    for i in 0..95 {
        journal.record(entry("op", &format!("e{i}"))).await.unwrap();
    }
    drop(journal);

    // Interrupted after 3 batches of 10; e47 poisons its batch, which then falls
    // back to one entry at a time (only e47 fails).
    let (control, _progress) = Control::new();
    let journal = build(BatchInsert {
        batches: batches.clone(),
        cancel_after_batches: Some((3, control.clone())),
        poison: None,
    })
    .await
    .unwrap();
    let err = journal
        .replay(ReplayRequest::new(ReplayRange::All), &control)
        .await
        .unwrap_err();
    assert!(err.is_cancelled(), "{err}");
    assert_eq!(batches.load(std::sync::atomic::Ordering::SeqCst), 3);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM applied_rows", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 30, "three whole batches committed with their marks");

    let journal = build(BatchInsert {
        batches: batches.clone(),
        cancel_after_batches: None,
        poison: Some("e47".into()),
    })
    .await
    .unwrap();
    let second = journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    assert_eq!((second.applied, second.already_applied), (64, 30));
    assert_eq!(second.failures.len(), 1, "{:?}", second.failures);
    assert_eq!(second.failures[0].position.0, 48);

    // Fixed handler: only e47 is left.
    let journal = build(BatchInsert {
        batches,
        cancel_after_batches: None,
        poison: None,
    })
    .await
    .unwrap();
    let third = journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    assert_eq!((third.applied, third.already_applied), (1, 94));
    let rows = applied_counts(&client).await;
    assert_eq!(rows.len(), 95);
    assert!(rows.iter().all(|(_, n)| *n == 1), "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_records_publish_one_event_per_batch() {
    use sanare_core::{Event, EventBus};
    let db = test_db().await;
    let bus = EventBus::default();
    let mut sub = bus.subscribe();
    let journal = Journal::postgres(db.pool().clone(), schema())
        .events(bus.clone())
        .build()
        .await
        .unwrap();
    let writers: Vec<_> = (0..16)
        .map(|i| {
            let j = journal.clone();
            tokio::spawn(async move { j.record(entry("op", &format!("e{i}"))).await })
        })
        .collect();
    let mut positions = Vec::new();
    for w in writers {
        positions.push(w.await.unwrap().unwrap().position);
    }
    let events: Vec<Event> = std::iter::from_fn(|| sub.try_recv().map(|r| r.event)).collect();
    let mut total = 0;
    for e in &events {
        let Event::JournalRecorded {
            entries,
            first_position: Some(first),
            last_position: Some(last),
        } = e
        else {
            panic!("unexpected {e:?}");
        };
        assert!(first <= last);
        total += entries;
    }
    assert_eq!(total, 16);
    assert!(events.len() <= 16);
    assert_eq!(
        positions.iter().max().copied(),
        events
            .iter()
            .filter_map(|e| match e {
                Event::JournalRecorded { last_position, .. } => *last_position,
                _ => None,
            })
            .max()
    );
}

/// Writers that are not in the snapshot: one draws the lower number and is still
/// open when the cut is asked for, another draws the higher one and commits first.
/// The cut must not move past the uncommitted lower number (a query cannot see
/// it), or a replay after the cut would miss it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_ignores_writers_that_started_after_its_snapshot() {
    let db = test_db().await;
    let counting = Counting::default();
    let journal = Journal::postgres(db.pool().clone(), schema())
        .handler("op", counting.clone())
        .write_ahead_window(std::time::Duration::ZERO)
        .build()
        .await
        .unwrap();
    let before = journal.record(entry("op", "before")).await.unwrap();
    let snapshot: String = db
        .client()
        .await
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .unwrap()
        .get(0);

    // After the snapshot: a writer draws the lower number and stays open, another
    // draws the higher one and commits.
    let mut c3 = db.connect().await;
    let t3 = c3.transaction().await.unwrap();
    let low = journal
        .record_in(&t3, entry("op", "late-low"))
        .await
        .unwrap();
    let high = journal.record(entry("op", "late-high")).await.unwrap();
    assert!(low.position < high.position);

    // The cut waits for the open writer (it took its xid before the cut's horizon).
    let cut_task = {
        let journal = journal.clone();
        let snapshot = snapshot.clone();
        tokio::spawn(async move { journal.cut(Some(&snapshot)).await })
    };
    t3.commit().await.unwrap();
    let cut = cut_task.await.unwrap().unwrap();
    assert_eq!(cut.position, before.position, "{cut:?}");

    let s = journal
        .replay(
            ReplayRequest::new(ReplayRange::After(cut)),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(
        counting.positions(),
        vec![low.position.0, high.position.0],
        "both late entries, in order"
    );
    assert_eq!(s.applied, 2);
}

/// How many times each position's effect landed in `applied_rows`.
async fn applied_counts(client: &tokio_postgres::Client) -> Vec<(i64, i64)> {
    client
        .query(
            "SELECT position, count(*) FROM applied_rows GROUP BY position ORDER BY position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}
