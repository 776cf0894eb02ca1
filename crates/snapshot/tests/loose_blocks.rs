//! Repositories written before packs kept every block as its own object
//! (`blocks/<h2>/<hex>`); such blocks are still found, verified, restored and
//! collected.

use std::sync::Arc;
use std::time::Duration;

use sanare_core::{Control, RestoreRequest, SnapshotRequest, SnapshotService};
use sanare_snapshot::{BlockStore, FsStore, Snapshots};
use sanare_testing::fixtures::order_service;

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loose_block_objects_are_read_verified_restored_and_collected() {
    let db = common::shop_db(300).await;
    let client = db.client().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FsStore::new(dir.path()).unwrap());
    let service = || {
        Snapshots::builder()
            .store(store.clone())
            .pool(db.pool().clone())
            .build()
            .unwrap()
    };
    let request = || SnapshotRequest::new().schemas(["shop"]);
    let writer = service();
    let old = writer
        .create(request(), &Control::detached())
        .await
        .unwrap();

    // Rewrite the repository in the old layout: every block its own object.
    let ids = writer.block_ids(old.id).await.unwrap();
    for id in &ids {
        let loc = writer.locate(*id).await.unwrap().unwrap();
        let object = store
            .get_range(&loc.key, loc.offset..loc.offset + loc.len)
            .await
            .unwrap()
            .unwrap();
        store.put(&id.key(), object).await.unwrap();
    }
    for pack in store.list("packs/").await.unwrap() {
        store.delete(&pack.key).await.unwrap();
    }

    let reader = service();
    let some = *ids.first().unwrap();
    let loc = reader.locate(some).await.unwrap().unwrap();
    assert_eq!(loc.key, some.key());
    assert_eq!(loc.offset, 0);
    let report = reader.verify(old.id, &Control::detached()).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.blocks_checked, ids.len() as u64);
    let stats = reader.stats().await.unwrap();
    assert_eq!((stats.packs, stats.blocks), (0, ids.len() as u64));

    // A new snapshot of changed rows goes into packs next to the loose blocks.
    client
        .batch_execute(
            "UPDATE shop.orders SET note = 'new' WHERE id BETWEEN 200 AND 220;
             DELETE FROM shop.payments WHERE order_id <= 150;
             DELETE FROM shop.order_lines WHERE order_id <= 150;
             DELETE FROM shop.orders WHERE id <= 150;",
        )
        .await
        .unwrap();
    let new = reader
        .create(request(), &Control::detached())
        .await
        .unwrap();
    assert!(reader.stats().await.unwrap().packs > 0);
    let new_hashes = order_service::content_hashes(&**client, "shop")
        .await
        .unwrap();
    reader
        .restore(RestoreRequest::new(old.id), &Control::detached())
        .await
        .unwrap();
    reader
        .restore(RestoreRequest::new(new.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(
        order_service::content_hashes(&**client, "shop")
            .await
            .unwrap(),
        new_hashes
    );

    // Once the old snapshot is gone, its loose blocks nobody else uses are freed;
    // those the new one uses (some as the bases of its blocks stored as deltas)
    // stay.
    let used = reader.block_ids(new.id).await.unwrap();
    let unused = ids.difference(&used).count() as u64;
    assert!(unused > 0, "the deleted rows' blocks are used by nothing");
    reader.delete(old.id).await.unwrap();
    let gc = reader
        .gc(Duration::ZERO, &Control::detached())
        .await
        .unwrap();
    assert!(gc.blocks_deleted >= unused, "{gc:?}");
    let left = store.list("blocks/").await.unwrap().len() as u64;
    assert_eq!(left, ids.intersection(&used).count() as u64);
    let report = reader.verify(new.id, &Control::detached()).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
}
