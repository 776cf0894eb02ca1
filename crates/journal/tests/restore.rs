//! Snapshot cuts and restores against a real PostgreSQL, on both backends: a cut
//! never claims an entry whose change the snapshot lacks (writers record, then
//! commit their change, while snapshots are taken), a restore reopens exactly the
//! entries after its cut, and restore + replay reaches every entry exactly once.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use common::{Counting, entry};
use sanare_core::{
    Control, JournalCut, JournalPosition, JournalService, ReplayRange, ReplayRequest, Result,
};
use sanare_journal::{Journal, JournalBuilder, JournalEntry, PgHandler};
use sanare_pg::SchemaName;
use sanare_testing::{TestDb, test_db};

/// The host's change for an entry: a row keyed by the entry's position, as the
/// replay handler writes it too (idempotent).
struct InsertOrder;

#[async_trait]
impl PgHandler for InsertOrder {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        entry: &JournalEntry,
    ) -> Result<()> {
        tx.execute(
            "INSERT INTO orders (position) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&(entry.position.0 as i64)],
        )
        .await
        .map_err(|e| sanare_pg::map_pg_error("applying an order", e))?;
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Wal,
    Postgres,
}

fn builder(db: &TestDb, backend: Backend, dir: &std::path::Path) -> JournalBuilder {
    let b = match backend {
        Backend::Wal => {
            Journal::wal(dir).handler_database(db.pool().clone(), SchemaName::default())
        }
        Backend::Postgres => Journal::postgres(db.pool().clone(), SchemaName::default()),
    };
    b.pg_handler("order", InsertOrder)
}

async fn orders(client: &tokio_postgres::Client) -> BTreeSet<i64> {
    client
        .query("SELECT position FROM orders", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Writers record an entry, then commit its change a moment later; snapshots
/// are taken meanwhile. Every entry at or before a cut has its change in the
/// snapshot. Then the last snapshot is "restored" (the table set back to what it
/// saw), the entries after its cut reopened and replayed: every entry's change is
/// there exactly once.
async fn cuts_hold_while_writers_record_then_commit(backend: Backend) {
    let db = test_db().await;
    let dir = tempfile::tempdir().unwrap();
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE orders (position bigint PRIMARY KEY)")
        .await
        .unwrap();
    // Hosts here commit within 40 ms of recording (plus what a loaded machine
    // adds: a pooled connection, the insert); the window says 1 s. Each writer
    // paces itself, so the run lasts well past the window and cuts move.
    let journal = builder(&db, backend, dir.path())
        .write_ahead_window(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..6u64 {
        let (journal, pool) = (journal.clone(), db.pool().clone());
        writers.spawn(async move {
            for i in 0..40u64 {
                let r = journal
                    .record(entry("order", &format!("w{w}-{i}")))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis((w * 7 + i * 13) % 40)).await;
                let client = pool.get().await.unwrap();
                client
                    .execute(
                        "INSERT INTO orders (position) VALUES ($1)",
                        &[&(r.position.0 as i64)],
                    )
                    .await
                    .unwrap();
                drop(client);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        });
    }
    let mut last: Option<(JournalCut, BTreeSet<i64>)> = None;
    let mut advanced = false;
    let mut captures = 0;
    while !writers.is_empty() {
        let mut c = db.connect().await;
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .unwrap();
        let snapshot: String = tx
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .unwrap()
            .get(0);
        let cut = journal.cut(Some(&snapshot)).await.unwrap();
        let seen: BTreeSet<i64> = tx
            .query("SELECT position FROM orders", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.commit().await.unwrap();
        let missing: Vec<u64> = (1..=cut.position.0)
            .filter(|p| !seen.contains(&(*p as i64)))
            .collect();
        assert!(
            missing.is_empty(),
            "{backend:?}: the cut {} claims entries whose change the snapshot lacks: {missing:?}",
            cut.position
        );
        advanced |= cut.position.0 > 0;
        captures += 1;
        last = Some((cut, seen));
        tokio::time::sleep(Duration::from_millis(60)).await;
        while let Some(r) = writers.try_join_next() {
            r.unwrap();
        }
    }
    assert!(
        advanced,
        "{backend:?}: no cut ever moved in {captures} captures"
    );
    let head = journal.head().await.unwrap().0;
    assert_eq!(head, 240);
    assert_eq!(orders(&client).await.len(), 240);

    // Restore the last snapshot: the table as it saw it.
    let (cut, seen) = last.unwrap();
    let seen: Vec<i64> = seen.into_iter().collect();
    client
        .execute("DELETE FROM orders WHERE NOT position = ANY($1)", &[&seen])
        .await
        .unwrap();
    journal.reopen_after(&cut).await.unwrap();
    let s = journal
        .replay(
            ReplayRequest::new(ReplayRange::After(cut)),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert!(s.failures.is_empty(), "{s:?}");
    assert_eq!(
        orders(&client).await,
        (1..=240).collect::<BTreeSet<i64>>(),
        "{backend:?}: restore + replay reaches every entry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_hold_while_writers_record_then_commit_on_the_wal() {
    cuts_hold_while_writers_record_then_commit(Backend::Wal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_hold_while_writers_record_then_commit_on_postgres() {
    cuts_hold_while_writers_record_then_commit(Backend::Postgres).await;
}

/// Replays from a cut, "restores" the snapshot again (the rows after the cut
/// go), reopens and replays: the entries after the cut are applied again, once.
async fn a_second_restore_reapplies_exactly_once(backend: Backend) {
    let db = test_db().await;
    let dir = tempfile::tempdir().unwrap();
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE orders (position bigint PRIMARY KEY)")
        .await
        .unwrap();
    let journal = builder(&db, backend, dir.path())
        .write_ahead_window(Duration::ZERO)
        .build()
        .await
        .unwrap();
    for i in 0..10 {
        journal
            .record(entry("order", &format!("o{i}")))
            .await
            .unwrap();
    }
    let cut = JournalCut {
        position: JournalPosition(4),
        db_snapshot: None,
    };
    let replay = async || {
        journal
            .replay(
                ReplayRequest::new(ReplayRange::After(cut.clone())),
                &Control::detached(),
            )
            .await
            .unwrap()
    };
    assert_eq!(replay().await.applied, 6);
    for round in 0..2 {
        client
            .execute("DELETE FROM orders WHERE position > 4", &[])
            .await
            .unwrap();
        assert_eq!(
            journal.reopen_after(&cut).await.unwrap(),
            6,
            "{backend:?} {round}"
        );
        let s = replay().await;
        assert_eq!(
            (s.applied, s.already_applied),
            (6, 0),
            "{backend:?} {round}"
        );
        assert_eq!(orders(&client).await, (5..=10).collect(), "{backend:?}");
        let s = replay().await;
        assert_eq!(
            (s.applied, s.already_applied),
            (0, 6),
            "{backend:?}: exactly once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_restore_reapplies_exactly_once_on_the_wal() {
    a_second_restore_reapplies_exactly_once(Backend::Wal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_restore_reapplies_exactly_once_on_postgres() {
    a_second_restore_reapplies_exactly_once(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_in_time_replay_stops_at_its_time_on_postgres() {
    let db = test_db().await;
    let counting = Counting::default();
    let journal = Journal::postgres(db.pool().clone(), SchemaName::default())
        .handler("op", counting.clone())
        .build()
        .await
        .unwrap();
    common::point_in_time_replay_stops_at_its_time(&journal, &counting).await;
}
