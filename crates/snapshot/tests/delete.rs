//! Deleting one snapshot by id.

use std::sync::Arc;
use std::time::Duration;

use sanare_core::{
    Control, Error, RestoreRequest, SnapshotRequest, SnapshotService, SnapshotStatus,
};
use sanare_pg::SchemaName;
use sanare_snapshot::{FsStore, Snapshots};

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_snapshot_is_gone_and_its_blocks_are_freed_when_unshared() {
    let db = common::shop_db(200).await;
    let client = db.client().await;
    let schema = SchemaName::default_schema();
    let dir = tempfile::tempdir().unwrap();
    let snaps = Snapshots::builder()
        .store(Arc::new(FsStore::new(dir.path()).unwrap()))
        .pool(db.pool().clone())
        .schema(schema)
        .build()
        .unwrap();
    let request = || SnapshotRequest::new().schemas(["shop"]);
    let first = snaps.create(request(), &Control::detached()).await.unwrap();
    client
        .batch_execute("UPDATE shop.products SET name = name || ' v2'")
        .await
        .unwrap();
    let second = snaps.create(request(), &Control::detached()).await.unwrap();

    let deleted = snaps.delete(first.id).await.unwrap();
    assert_eq!(deleted.status, SnapshotStatus::Deleted);
    // Deleting again is a no-op, not an error.
    assert_eq!(
        snaps.delete(first.id).await.unwrap().status,
        SnapshotStatus::Deleted
    );
    let err = snaps
        .restore(RestoreRequest::new(first.id), &Control::detached())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("deleted"), "{err}");
    let latest = snaps.latest_good(None).await.unwrap().unwrap();
    assert_eq!(latest.id, second.id);

    // The blocks only the deleted snapshot used are freed; the other still verifies.
    let gc = snaps
        .gc(Duration::ZERO, &Control::detached())
        .await
        .unwrap();
    assert!(gc.blocks_deleted > 0, "{gc:?}");
    assert!(
        snaps
            .verify(second.id, &Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
    let unknown = snaps
        .delete(sanare_core::SnapshotId::new())
        .await
        .unwrap_err();
    assert!(matches!(unknown, Error::NotFound { .. }), "{unknown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_never_reuses_blocks_another_process_collected() {
    let db = common::shop_db(200).await;
    let client = db.client().await;
    let dir = tempfile::tempdir().unwrap();
    let service = || {
        Snapshots::builder()
            .store(Arc::new(FsStore::new(dir.path()).unwrap()))
            .pool(db.pool().clone())
            .build()
            .unwrap()
    };
    let (ours, theirs) = (service(), service());
    let request = || SnapshotRequest::new().schemas(["shop"]);
    let first = ours.create(request(), &Control::detached()).await.unwrap();
    // Another process deletes it and collects every block ours knows about.
    theirs.delete(first.id).await.unwrap();
    let gc = theirs
        .gc(Duration::ZERO, &Control::detached())
        .await
        .unwrap();
    assert_eq!(gc.blocks_live, 0, "{gc:?}");
    assert!(gc.packs_deleted > 0, "{gc:?}");
    // The same rows again: every block must be stored anew, not taken from a map
    // loaded before that GC.
    let second = ours.create(request(), &Control::detached()).await.unwrap();
    assert!(second.stored_bytes * 2 > first.stored_bytes, "{second:?}");
    let report = ours.verify(second.id, &Control::detached()).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    let before = client
        .query_one("SELECT count(*) FROM shop.order_lines", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    client
        .batch_execute("DELETE FROM shop.payments; DELETE FROM shop.order_lines")
        .await
        .unwrap();
    ours.restore(RestoreRequest::new(second.id), &Control::detached())
        .await
        .unwrap();
    let after: i64 = client
        .query_one("SELECT count(*) FROM shop.order_lines", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, before);
}

/// A GC that copies a pack whose blocks are all live, with nothing else to put in
/// the new pack, writes a pack identical to the old one, under the same key (pack
/// keys are content hashes). It must not then delete that key as "the old pack".
/// Here: the first GC collects a deleted snapshot's blocks into one small pack;
/// the next GC (a later process) finds that pack small and copies it unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gc_that_copies_a_pack_unchanged_keeps_it() {
    let db = common::shop_db(300).await;
    let dir = tempfile::tempdir().unwrap();
    let key = sanare_snapshot::RepositoryKey::generate().unwrap();
    let service = || {
        let mut config = sanare_snapshot::SnapshotConfig::default();
        config.pack_size = 64 * 1024;
        Snapshots::builder()
            .store(Arc::new(FsStore::new(dir.path()).unwrap()))
            .pool(db.pool().clone())
            .key(key.clone())
            .config(config)
            .build()
            .unwrap()
    };
    let ctl = Control::detached();
    let request = || SnapshotRequest::new().schemas(["shop"]);
    let snaps = service();
    let first = snaps.create(request(), &ctl).await.unwrap();
    common::change_spread_rows(&db).await;
    let second = snaps.create(request(), &ctl).await.unwrap();
    snaps.delete(first.id).await.unwrap();
    snaps.gc(Duration::ZERO, &ctl).await.unwrap();
    assert!(snaps.verify(second.id, &ctl).await.unwrap().is_ok());
    let later = service();
    let gc = later.gc(Duration::ZERO, &ctl).await.unwrap();
    let report = later.verify(second.id, &ctl).await.unwrap();
    assert!(report.is_ok(), "after {gc:?}: {report:?}");
}
