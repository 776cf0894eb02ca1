//! Snapshots against a real PostgreSQL: round trips, rows by key, faults, PITR.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sanare_core::{
    ColumnValue, Control, Error, Event, EventBus, JournalCut, JournalPosition, JournalService,
    ReplayRange, ReplayRequest, ReplaySummary, RestoreRequest, RestoreTarget, RowRef,
    SnapshotRequest, SnapshotService, SnapshotStatus, TableRef,
};
use sanare_pg::SchemaName;
use sanare_snapshot::{BlockStore, FsStore, PgStore, RetentionPolicy, Snapshots};
use sanare_testing::fixtures::order_service;
use sanare_testing::test_db;

mod common;

/// A journal that records what it was asked.
#[derive(Default)]
struct FakeJournal {
    cuts: Mutex<Vec<Option<String>>>,
    replays: Mutex<Vec<ReplayRange>>,
    untils: Mutex<Vec<Option<time::OffsetDateTime>>>,
    /// Every call, in order: `reopen <position>` or `replay`.
    calls: Mutex<Vec<String>>,
    head: Mutex<u64>,
}

#[async_trait]
impl JournalService for FakeJournal {
    async fn head(&self) -> sanare_core::Result<JournalPosition> {
        Ok(JournalPosition(*self.head.lock().unwrap()))
    }
    async fn cut(&self, db_snapshot: Option<&str>) -> sanare_core::Result<JournalCut> {
        self.cuts
            .lock()
            .unwrap()
            .push(db_snapshot.map(str::to_owned));
        Ok(JournalCut {
            position: JournalPosition(*self.head.lock().unwrap()),
            db_snapshot: db_snapshot.map(str::to_owned),
        })
    }
    async fn replay(
        &self,
        request: ReplayRequest,
        _control: &Control,
    ) -> sanare_core::Result<ReplaySummary> {
        self.untils.lock().unwrap().push(request.until);
        self.replays.lock().unwrap().push(request.range);
        self.calls.lock().unwrap().push("replay".into());
        Ok(ReplaySummary::default())
    }
    async fn reopen_after(&self, cut: &JournalCut) -> sanare_core::Result<u64> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("reopen {}", cut.position.0));
        Ok(1)
    }
}

struct Env {
    db: sanare_testing::TestDb,
    snaps: Snapshots,
    store_dir: tempfile::TempDir,
    journal: Arc<FakeJournal>,
    events: EventBus,
}

async fn env(orders: u64) -> Env {
    let db = common::shop_db(orders).await;
    let schema = SchemaName::default_schema();
    let store_dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(FakeJournal::default());
    let events = EventBus::default();
    let snaps = Snapshots::builder()
        .store(Arc::new(FsStore::new(store_dir.path()).unwrap()))
        .pool(db.pool().clone())
        .schema(schema)
        .journal(journal.clone())
        .events(events.clone())
        .build()
        .unwrap();
    Env {
        db,
        snaps,
        store_dir,
        journal,
        events,
    }
}

/// A row-for-row hash of every fixture table.
async fn table_hashes(db: &sanare_testing::TestDb, schema: &str) -> Vec<(String, i64, String)> {
    order_service::content_hashes(&**db.client().await, schema)
        .await
        .unwrap()
}

fn shop() -> SnapshotRequest {
    SnapshotRequest::new().schemas(["shop"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_restores_every_table_row_for_row() {
    let e = env(2_000).await;
    let before = table_hashes(&e.db, "shop").await;
    let mut sub = e.events.subscribe();
    let info = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    assert_eq!(info.status, SnapshotStatus::Ready);
    assert_eq!(info.tables.len(), 5);
    assert!(info.size_bytes > 100_000);
    assert!(info.stored_bytes < info.size_bytes, "lz4 made it smaller");
    // The journal was asked for a cut in the snapshot's transaction.
    let cuts = e.journal.cuts.lock().unwrap().clone();
    assert_eq!(cuts.len(), 1);
    assert!(cuts[0].as_deref().unwrap().contains(':'), "{cuts:?}");
    assert_eq!(info.journal_cut.as_ref().unwrap().db_snapshot, cuts[0]);
    let ev = sub.recv().await.unwrap().unwrap();
    assert!(matches!(ev.event, Event::SnapshotCreated { snapshot, .. } if snapshot == info.id));

    // Damage the live data every way, then restore.
    let client = e.db.client().await;
    client
        .batch_execute(
            "DELETE FROM shop.payments WHERE id % 3 = 0;
             UPDATE shop.orders SET note = 'tampered' WHERE id % 7 = 0;
             DELETE FROM shop.order_lines WHERE order_id % 11 = 0;
             INSERT INTO shop.customers (id, email, full_name, country) VALUES (999999, 'x@y', 'X', 'DE');",
        )
        .await
        .unwrap();
    assert_ne!(table_hashes(&e.db, "shop").await, before);
    let out = e
        .snaps
        .restore(RestoreRequest::new(info.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(out.tables.len(), 5);
    assert_eq!(out.journal_cut, info.journal_cut);
    assert_eq!(table_hashes(&e.db, "shop").await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_snapshot_deduplicates_and_both_restore() {
    let e = env(3_000).await;
    let first = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    let v1 = table_hashes(&e.db, "shop").await;
    let client = e.db.client().await;
    client
        .batch_execute("UPDATE shop.orders SET note = 'late' WHERE id BETWEEN 2900 AND 2930")
        .await
        .unwrap();
    let v2 = table_hashes(&e.db, "shop").await;
    let second = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    assert_eq!(second.base, Some(first.id));
    assert!(
        second.stored_bytes * 10 < first.stored_bytes,
        "incremental stored {} vs full {}",
        second.stored_bytes,
        first.stored_bytes
    );
    // Scratch restore of the first, live restore of each in turn.
    let out = e
        .snaps
        .restore(
            RestoreRequest::new(first.id).target(RestoreTarget::Scratch {
                schema: "scratch".into(),
            }),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(out.tables[0].table.schema, "scratch");
    assert_eq!(table_hashes(&e.db, "scratch").await, v1);
    assert!(
        e.journal.calls.lock().unwrap().is_empty(),
        "a scratch restore leaves the live tables, and so the journal's marks, alone"
    );
    let out = e
        .snaps
        .restore(RestoreRequest::new(first.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(table_hashes(&e.db, "shop").await, v1);
    assert_eq!(
        e.journal.calls.lock().unwrap().clone(),
        vec![format!(
            "reopen {}",
            first.journal_cut.as_ref().unwrap().position.0
        )]
    );
    assert!(
        out.notes
            .iter()
            .any(|n| n.contains("next replay applies them again")),
        "{:?}",
        out.notes
    );
    e.snaps
        .restore(RestoreRequest::new(second.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(table_hashes(&e.db, "shop").await, v2);
    let stats = e.snaps.stats().await.unwrap();
    assert_eq!(stats.snapshots.get("ready"), Some(&2));
    assert!(stats.block_bytes < stats.logical_bytes / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_by_primary_key_come_back_in_text_form() {
    let e = env(2_000).await;
    let info = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    let client = e.db.client().await;
    let expected = client
        .query_one(
            "SELECT id::text, status::text, total_cents::text, placed_at::text FROM shop.orders WHERE id = 1234",
            &[],
        )
        .await
        .unwrap();
    client
        .batch_execute("DELETE FROM shop.payments WHERE order_id = 1234; DELETE FROM shop.order_lines WHERE order_id = 1234; DELETE FROM shop.orders WHERE id = 1234")
        .await
        .unwrap();
    let key = |id: &str| {
        RowRef::new(
            TableRef::new("shop", "orders"),
            vec![ColumnValue::new("id", "bigint", Some(id))],
        )
    };
    let line = RowRef::new(
        TableRef::new("shop", "order_lines"),
        vec![
            ColumnValue::new("order_id", "bigint", Some("1234")),
            ColumnValue::new("line_no", "integer", Some("1")),
        ],
    );
    let rows = e
        .snaps
        .fetch_rows(
            info.id,
            &[key("1234"), key("99999999"), line.clone(), key("7")],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "the absent key is absent");
    assert_eq!(rows[0].get("id"), Some(Some("1234")));
    assert_eq!(
        rows[0].get("status"),
        Some(Some(expected.get::<_, &str>(1)))
    );
    assert_eq!(
        rows[0].get("total_cents"),
        Some(Some(expected.get::<_, &str>(2)))
    );
    assert_eq!(
        rows[0].get("placed_at"),
        Some(Some(expected.get::<_, &str>(3)))
    );
    assert_eq!(rows[1].table.name, "order_lines");
    assert_eq!(rows[1].row_ref(&["order_id", "line_no"]).unwrap(), line);
    assert_eq!(rows[2].get("id"), Some(Some("7")));
    // The fetched row can be put back as is.
    let cols: Vec<String> = rows[0].values.iter().map(|c| c.column.clone()).collect();
    let vals: Vec<String> = rows[0]
        .values
        .iter()
        .map(|c| match &c.value {
            Some(v) => format!("{}::{}", sanare_pg::quote_literal(v), c.type_name),
            None => "NULL".into(),
        })
        .collect();
    client
        .execute(
            &format!(
                "INSERT INTO shop.orders ({}) VALUES ({})",
                cols.join(","),
                vals.join(",")
            ),
            &[],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bit_and_missing_block_are_found_marked_and_skipped() {
    let e = env(1_000).await;
    let good = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    let client = e.db.client().await;
    client
        .batch_execute("UPDATE shop.customers SET full_name = full_name || '!' WHERE id < 5")
        .await
        .unwrap();
    let bad = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    assert!(
        e.snaps
            .verify(bad.id, &Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
    // Flip a bit in the data block only the second snapshot has (the other new
    // block is the group of block references that lists it; both are stored as
    // deltas against the first snapshot's).
    let good_blocks = e.snaps.block_ids(good.id).await.unwrap();
    let bad_blocks = e.snaps.block_ids(bad.id).await.unwrap();
    let mut new_blocks = Vec::new();
    for id in bad_blocks.difference(&good_blocks) {
        new_blocks.push((*id, e.snaps.locate(*id).await.unwrap().unwrap()));
    }
    assert_eq!(new_blocks.len(), 2, "{new_blocks:?}");
    assert!(new_blocks.iter().all(|b| b.1.key.starts_with("packs/")));
    // Tell them apart by their content (a group's starts with its magic).
    let store = e.snaps.store().clone();
    let read = |id: sanare_snapshot::BlockId| {
        let (snaps, store) = (&e.snaps, &store);
        async move {
            let loc = snaps.locate(id).await.unwrap().unwrap();
            store
                .get_range(&loc.key, loc.offset..loc.offset + loc.len)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let mut data = None;
    for (id, _) in &new_blocks {
        let object = read(*id).await;
        let base = match sanare_snapshot::format::delta_base(&object) {
            Some(b) => Some(sanare_snapshot::format::decode_block(&b, &read(b).await).unwrap()),
            None => None,
        };
        let content =
            sanare_snapshot::format::decode_block_with(id, &object, base.as_deref()).unwrap();
        if !content.starts_with(b"SNG") {
            data = Some(*id);
        }
    }
    let data = data.expect("one of them holds rows");
    let newest = data.to_string();
    let loc = &new_blocks.iter().find(|b| b.0 == data).unwrap().1;
    let path = e.store_dir.path().join(&loc.key);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = (loc.offset + loc.len - 2) as usize;
    bytes[at] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();

    // Restore refuses, names the damage, leaves the live tables as they were.
    let live = table_hashes(&e.db, "shop").await;
    let err = e
        .snaps
        .restore(RestoreRequest::new(bad.id), &Control::detached())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(&newest), "{err}");
    assert_eq!(table_hashes(&e.db, "shop").await, live);

    let report = e.snaps.verify(bad.id, &Control::detached()).await.unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.blocks_corrupt, 1, "{report:?}");
    let latest = e.snaps.latest_good(None).await.unwrap().unwrap();
    assert_eq!(latest.id, good.id, "the corrupted one is skipped");

    // Missing blocks: the pack holding most of the first snapshot's data blocks is
    // gone (not the one of its index groups, without which nothing can be counted).
    let mut by_pack: std::collections::BTreeMap<String, u64> = Default::default();
    for id in e.snaps.block_ids(good.id).await.unwrap() {
        let key = e.snaps.locate(id).await.unwrap().unwrap().key;
        *by_pack.entry(key).or_default() += 1;
    }
    let (gone, in_gone) = by_pack.into_iter().max_by_key(|p| p.1).unwrap();
    store.delete(&gone).await.unwrap();
    let report = e.snaps.verify(good.id, &Control::detached()).await.unwrap();
    assert_eq!(report.blocks_missing, in_gone, "{report:?}");
    assert_eq!(report.blocks_corrupt, 0, "{report:?}");
    assert!(e.snaps.latest_good(None).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_capture_leaves_no_ready_snapshot() {
    let e = env(1_000).await;
    let first = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    let (control, _progress) = Control::new();
    control.cancel_token().cancel();
    let err = e.snaps.create(shop(), &control).await.unwrap_err();
    assert!(err.is_cancelled(), "{err}");
    let all = e.snaps.list().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        all.iter()
            .filter(|s| s.status == SnapshotStatus::Ready)
            .count(),
        1
    );
    assert_eq!(
        e.snaps.latest_good(None).await.unwrap().unwrap().id,
        first.id
    );
    assert!(
        e.snaps
            .verify(first.id, &Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_restore_rolls_back_completely() {
    let e = env(1_000).await;
    let info = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    e.db.client()
        .await
        .batch_execute("DELETE FROM shop.payments")
        .await
        .unwrap();
    let live = table_hashes(&e.db, "shop").await;
    let (control, _p) = Control::new();
    control.cancel_token().cancel();
    let err = e
        .snaps
        .restore(RestoreRequest::new(info.id), &control)
        .await
        .unwrap_err();
    assert!(err.is_cancelled());
    assert_eq!(table_hashes(&e.db, "shop").await, live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_restores_then_replays_after_the_cut() {
    let e = env(500).await;
    *e.journal.head.lock().unwrap() = 41;
    let s1 = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    let t1 = time::OffsetDateTime::now_utc();
    *e.journal.head.lock().unwrap() = 90;
    let _s2 = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    let out = e.snaps.restore_to(t1, &Control::detached()).await.unwrap();
    assert_eq!(out.restore.snapshot, s1.id);
    assert!(out.replay.is_some());
    assert_eq!(
        e.journal.calls.lock().unwrap().clone(),
        vec!["reopen 41".to_owned(), "replay".to_owned()],
        "the entries after the cut are reopened once the restore commits, before the replay"
    );
    let replays = e.journal.replays.lock().unwrap().clone();
    assert_eq!(replays.len(), 1);
    match &replays[0] {
        ReplayRange::After(cut) => {
            assert_eq!(cut.position, JournalPosition(41));
            assert!(cut.db_snapshot.is_some());
        }
        other => panic!("unexpected range {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_stops_at_t_and_falls_back_past_a_damaged_snapshot() {
    let e = env(500).await;
    *e.journal.head.lock().unwrap() = 10;
    let s1 = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    e.db.client()
        .await
        .batch_execute("UPDATE shop.customers SET full_name = full_name || '!' WHERE id < 5")
        .await
        .unwrap();
    *e.journal.head.lock().unwrap() = 20;
    let s2 = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    let at = time::OffsetDateTime::now_utc();
    // A block only the second snapshot has is damaged; it is still `ready`.
    let s1_blocks = e.snaps.block_ids(s1.id).await.unwrap();
    let mut only_s2 = Vec::new();
    for id in e
        .snaps
        .block_ids(s2.id)
        .await
        .unwrap()
        .difference(&s1_blocks)
    {
        only_s2.push(e.snaps.locate(*id).await.unwrap().unwrap());
    }
    let loc = only_s2.iter().max_by_key(|l| l.len).unwrap();
    let path = e.store_dir.path().join(&loc.key);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(loc.offset + loc.len / 2) as usize] ^= 0x08;
    std::fs::write(&path, &bytes).unwrap();

    let out = e.snaps.restore_to(at, &Control::detached()).await.unwrap();
    assert_eq!(out.restore.snapshot, s1.id, "fell back to the one before");
    assert_eq!(out.skipped.len(), 1);
    assert_eq!(out.skipped[0].0, s2.id);
    let replays = e.journal.replays.lock().unwrap().clone();
    match &replays[..] {
        [ReplayRange::After(cut)] => assert_eq!(cut.position, JournalPosition(10)),
        other => panic!("unexpected replays {other:?}"),
    }
    assert_eq!(
        e.journal.untils.lock().unwrap().clone(),
        vec![Some(at)],
        "the replay stops at T"
    );
    // Nothing older than the first snapshot: refused, saying why.
    let err = e
        .snaps
        .restore_to(
            s1.created_at - time::Duration::seconds(1),
            &Control::detached(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_and_identity_columns_are_restored() {
    let e = env(100).await;
    let client = e.db.client().await;
    client
        .batch_execute(
            "CREATE TABLE shop.notes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, n serial, body text,
                                      len int GENERATED ALWAYS AS (length(body)) STORED);
             INSERT INTO shop.notes (body) SELECT 'note ' || g FROM generate_series(1, 50) g;",
        )
        .await
        .unwrap();
    let info = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    client
        .batch_execute("INSERT INTO shop.notes (body) SELECT 'more' FROM generate_series(1, 10)")
        .await
        .unwrap();
    e.snaps
        .restore(
            RestoreRequest::new(info.id).tables([TableRef::new("shop", "notes")]),
            &Control::detached(),
        )
        .await
        .unwrap();
    let r = client
        .query_one(
            "INSERT INTO shop.notes (body) VALUES ('next') RETURNING id, n, len",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 51);
    assert_eq!(r.get::<_, i32>(1), 51);
    assert_eq!(r.get::<_, i32>(2), 4);
    let count: i64 = client
        .query_one("SELECT count(*) FROM shop.notes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_and_gc_free_only_unreferenced_blocks() {
    let e = env(500).await;
    let client = e.db.client().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        client
            .batch_execute(&format!("UPDATE shop.products SET name = name || '{i}'"))
            .await
            .unwrap();
        ids.push(
            e.snaps
                .create(shop(), &Control::detached())
                .await
                .unwrap()
                .id,
        );
    }
    let deleted = e
        .snaps
        .apply_retention(&RetentionPolicy::new(1, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    // Another service on the same store (another process) knows where every block
    // was before GC rewrites the packs under it.
    let other = Snapshots::builder()
        .store(Arc::new(FsStore::new(e.store_dir.path()).unwrap()))
        .pool(e.db.pool().clone())
        .build()
        .unwrap();
    assert!(
        other
            .verify(ids[2], &Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
    let before = e.snaps.stats().await.unwrap();
    let gc = e
        .snaps
        .gc(Duration::ZERO, &Control::detached())
        .await
        .unwrap();
    assert!(gc.blocks_deleted > 0, "{gc:?}");
    // Small packs are merged and packs with dead blocks rewritten.
    assert!(gc.packs_rewritten + gc.packs_deleted > 0, "{gc:?}");
    let after = e.snaps.stats().await.unwrap();
    assert!(after.packs < before.packs, "{before:?} -> {after:?}");
    assert_eq!(after.blocks + gc.blocks_deleted, before.blocks, "{gc:?}");
    assert!(after.block_bytes < before.block_bytes);
    let kept = e.snaps.verify(ids[2], &Control::detached()).await.unwrap();
    assert!(kept.is_ok(), "{kept:?}");
    // The other service finds the blocks where GC moved them.
    let hashes = table_hashes(&e.db, "shop").await;
    other
        .restore(RestoreRequest::new(ids[2]), &Control::detached())
        .await
        .unwrap();
    assert_eq!(table_hashes(&e.db, "shop").await, hashes);
    // A grace period keeps fresh unreferenced blocks.
    let again = e
        .snaps
        .gc(Duration::from_secs(3600), &Control::detached())
        .await
        .unwrap();
    assert_eq!(again.blocks_deleted, 0);
    e.snaps
        .restore(RestoreRequest::new(ids[2]), &Control::detached())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_schema_is_never_captured() {
    let e = env(100).await;
    let err = e
        .snaps
        .create(
            SnapshotRequest::new().tables([TableRef::new("sanare", "snapshots")]),
            &Control::detached(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("never snapshotted"), "{err}");
    let info = e
        .snaps
        .create(SnapshotRequest::new(), &Control::detached())
        .await
        .unwrap();
    assert!(info.tables.iter().all(|t| t.table.schema != "sanare"));
    assert_eq!(info.tables.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_store_passes_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::new(dir.path()).unwrap();
    sanare_snapshot::testing::conformance(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_store_passes_conformance_and_backs_snapshots() {
    let db = test_db().await;
    let schema = SchemaName::new("snapmeta").unwrap();
    let mut c = db.connect().await;
    sanare_snapshot::migrate(&mut c, &schema).await.unwrap();
    let store = PgStore::new(db.pool().clone(), &schema);
    sanare_snapshot::testing::conformance(&store).await;
    for o in store.list("").await.unwrap() {
        store.delete(&o.key).await.unwrap();
    }
    let client = db.client().await;
    order_service::install(&**client, "shop").await.unwrap();
    order_service::generate(&**client, "shop", 300)
        .await
        .unwrap();
    let snaps = Snapshots::builder()
        .store(Arc::new(store))
        .pool(db.pool().clone())
        .schema(schema)
        .build()
        .unwrap();
    let before = table_hashes(&db, "shop").await;
    let info = snaps.create(shop(), &Control::detached()).await.unwrap();
    assert!(info.journal_cut.is_none(), "no journal attached");
    client
        .batch_execute("DELETE FROM shop.payments")
        .await
        .unwrap();
    snaps
        .restore(RestoreRequest::new(info.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(table_hashes(&db, "shop").await, before);
}

/// The child half of the crash test: captures until killed.
async fn crash_child(url: &str, store: &str) {
    let pool = sanare_pg::connect_pool(url, 4).unwrap();
    let snaps = Snapshots::builder()
        .store(Arc::new(FsStore::new(store).unwrap()))
        .pool(pool)
        .build()
        .unwrap();
    loop {
        snaps.create(shop(), &Control::detached()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_capture_leaves_no_ready_snapshot_and_no_harm() {
    if let Ok(arg) = std::env::var("SANARE_SNAPSHOT_CRASH_CHILD") {
        let (url, store) = arg.split_once('\n').unwrap();
        crash_child(url, store).await;
        return;
    }
    let e = env(20_000).await;
    let good = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    let before = table_hashes(&e.db, "shop").await;
    let packs_before = e.snaps.store().list("packs/").await.unwrap().len();
    // Change every row so the child writes new blocks.
    e.db.client()
        .await
        .batch_execute("UPDATE shop.order_lines SET quantity = quantity + 1, amount_cents = (quantity + 1) * unit_price_cents")
        .await
        .unwrap();
    let after_change = table_hashes(&e.db, "shop").await;
    let spawn_child = || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "sigkill_during_capture_leaves_no_ready_snapshot_and_no_harm",
                "--exact",
                "--nocapture",
            ])
            .env(
                "SANARE_SNAPSHOT_CRASH_CHILD",
                format!("{}\n{}", e.db.url(), e.store_dir.path().display()),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let client = e.db.client().await;
    let any_creating = async || {
        e.snaps
            .list()
            .await
            .unwrap()
            .iter()
            .any(|s| s.status == SnapshotStatus::Creating)
    };
    // The child captures in a loop; a SIGKILL can land between two captures (one
    // ready, the next not begun). Then the kill proved nothing: start another child
    // and kill it again, until one is killed mid-capture.
    let mut killed_mid_capture = false;
    for attempt in 0..5 {
        let mut child = spawn_child();
        // Wait until the child is mid-capture: a `creating` row and (the first
        // time, when the changed rows are not stored yet) new blocks on disk.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let creating: i64 = client
                .query_one(
                    "SELECT count(*) FROM sanare.snapshots WHERE status = 'creating'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            let packs = e.snaps.store().list("packs/").await.unwrap().len();
            if creating > 0 && (attempt > 0 || packs > packs_before) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the child never started capturing"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "the child exited early"
            );
            tokio::task::yield_now().await;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if any_creating().await {
            killed_mid_capture = true;
            break;
        }
    }
    assert!(
        killed_mid_capture,
        "in five tries, no SIGKILL landed while a capture was being written"
    );

    let ready: Vec<_> = e
        .snaps
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.status == SnapshotStatus::Ready)
        .collect();
    // The child may have finished whole snapshots before the kill; every ready one
    // must verify, and the one being written when killed is not ready.
    assert!(ready.iter().any(|s| s.id == good.id));
    for s in &ready {
        let r = e.snaps.verify(s.id, &Control::detached()).await.unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
    e.snaps
        .restore(RestoreRequest::new(good.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(table_hashes(&e.db, "shop").await, before);
    if let Some(newer) = ready.iter().find(|s| s.id != good.id) {
        e.snaps
            .restore(RestoreRequest::new(newer.id), &Control::detached())
            .await
            .unwrap();
        assert_eq!(table_hashes(&e.db, "shop").await, after_change);
    }
}

/// Every index and constraint of the fixture schema, as PostgreSQL prints them.
async fn schema_objects(db: &sanare_testing::TestDb) -> Vec<String> {
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT 'index ' || indexname || ': ' || indexdef FROM pg_indexes WHERE schemaname = 'shop'
             UNION ALL
             SELECT 'constraint ' || conname || ' on ' || conrelid::regclass::text || ': '
                    || pg_get_constraintdef(oid) || ' validated=' || convalidated
               FROM pg_constraint WHERE connamespace = 'shop'::regnamespace
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_restore_rebuilds_every_index_and_key_and_rolls_back_on_a_violation() {
    let e = env(1_500).await;
    let client = e.db.client().await;
    // A deferrable key and a NOT VALID one come back as they were.
    client
        .batch_execute(
            "ALTER TABLE shop.payments ADD CONSTRAINT payments_order_again
                 FOREIGN KEY (order_id) REFERENCES shop.orders (id) DEFERRABLE INITIALLY DEFERRED;
             ALTER TABLE shop.order_lines ADD CONSTRAINT order_lines_product_again
                 FOREIGN KEY (product_id) REFERENCES shop.products (id) NOT VALID;
             CREATE INDEX orders_note_partial_idx ON shop.orders (placed_at) WHERE note IS NOT NULL;",
        )
        .await
        .unwrap();
    let objects = schema_objects(&e.db).await;
    assert!(objects.len() > 15, "{objects:#?}");
    let info = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    let before = table_hashes(&e.db, "shop").await;
    client
        .batch_execute("DELETE FROM shop.payments WHERE id % 2 = 0")
        .await
        .unwrap();
    e.snaps
        .restore(RestoreRequest::new(info.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(table_hashes(&e.db, "shop").await, before);
    assert_eq!(schema_objects(&e.db).await, objects);
    // The rebuilt keys are enforced.
    let dup = client
        .batch_execute("INSERT INTO shop.customers (id, email, full_name, country) SELECT id, 'x' || id, 'X', 'DE' FROM shop.customers LIMIT 1")
        .await;
    assert!(dup.is_err(), "the primary key is back");

    // Restoring the orders and their children while a customer they reference is
    // gone: the foreign key check at the end fails and nothing changes.
    client
        .batch_execute(
            "CREATE TABLE shop.keep AS SELECT id FROM shop.orders WHERE customer_id = (SELECT min(customer_id) FROM shop.orders);
             DELETE FROM shop.payments WHERE order_id IN (SELECT id FROM shop.keep);
             DELETE FROM shop.order_lines WHERE order_id IN (SELECT id FROM shop.keep);
             DELETE FROM shop.orders WHERE id IN (SELECT id FROM shop.keep);
             DELETE FROM shop.customers WHERE id NOT IN (SELECT customer_id FROM shop.orders);
             DROP TABLE shop.keep;",
        )
        .await
        .unwrap();
    let live = table_hashes(&e.db, "shop").await;
    let err = e
        .snaps
        .restore(
            RestoreRequest::new(info.id).tables([
                TableRef::new("shop", "orders"),
                TableRef::new("shop", "order_lines"),
                TableRef::new("shop", "payments"),
            ]),
            &Control::detached(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("foreign key"), "{err}");
    assert_eq!(table_hashes(&e.db, "shop").await, live);
    assert_eq!(schema_objects(&e.db).await, objects);
}

/// A snapshot taken while a foreign key was absent, restored after the key came
/// back: both ends are restored (the check is planned as a merge of two index-only
/// scans), the check still finds the orphan and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_after_the_capture_is_checked_when_both_ends_are_restored() {
    let e = env(500).await;
    let client = e.db.client().await;
    client
        .batch_execute(
            "ALTER TABLE shop.order_lines DROP CONSTRAINT order_lines_product_id_fkey;
             INSERT INTO shop.order_lines (order_id, line_no, product_id, quantity, unit_price_cents, amount_cents)
             VALUES (1, 99, 1000000, 1, 5, 5);",
        )
        .await
        .unwrap();
    let info = e.snaps.create(shop(), &Control::detached()).await.unwrap();
    client
        .batch_execute(
            "DELETE FROM shop.order_lines WHERE line_no = 99;
             ALTER TABLE shop.order_lines ADD CONSTRAINT order_lines_product_id_fkey
                 FOREIGN KEY (product_id) REFERENCES shop.products (id);
             DELETE FROM shop.payments WHERE id % 3 = 0;",
        )
        .await
        .unwrap();
    let objects = schema_objects(&e.db).await;
    let live = table_hashes(&e.db, "shop").await;
    let err = e
        .snaps
        .restore(RestoreRequest::new(info.id), &Control::detached())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("order_lines_product_id_fkey"),
        "{err}"
    );
    assert_eq!(table_hashes(&e.db, "shop").await, live);
    assert_eq!(schema_objects(&e.db).await, objects);
    // The connection the restore used is back in the pool with its settings intact.
    for _ in 0..4 {
        let c = e.db.pool().get().await.unwrap();
        let on: String = c
            .query_one("SHOW enable_hashjoin", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(on, "on");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_on_a_one_connection_pool_does_not_wait_for_a_second() {
    let e = env(300).await;
    let pool = sanare_pg::connect_pool(e.db.url(), 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snaps = Snapshots::builder()
        .store(Arc::new(FsStore::new(dir.path()).unwrap()))
        .pool(pool)
        .build()
        .unwrap();
    let before = table_hashes(&e.db, "shop").await;
    let info = tokio::time::timeout(
        Duration::from_secs(60),
        snaps.create(shop(), &Control::detached()),
    )
    .await
    .expect("capture finished")
    .unwrap();
    assert_eq!(info.tables.len(), 5);
    e.db.client()
        .await
        .batch_execute("DELETE FROM shop.payments")
        .await
        .unwrap();
    snaps
        .restore(RestoreRequest::new(info.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(table_hashes(&e.db, "shop").await, before);
}
