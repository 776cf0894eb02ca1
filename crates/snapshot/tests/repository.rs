//! Repositories (issue #23, #19): a snapshot belongs to one repository and is
//! never condemned by a process that opens another; a lost database is restored
//! from the store alone; manifests are authenticated before SQL is built.

use std::sync::Arc;

use sanare_snapshot::{BlockStore, FsStore};

mod common;
#[path = "common/scenarios.rs"]
mod scenarios;

fn fs_store(dir: &tempfile::TempDir) -> Arc<dyn BlockStore> {
    Arc::new(FsStore::new(dir.path().join("snapshots")).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_filesystem_stores_never_condemn_each_others_snapshots() {
    let db = common::shop_db(300).await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    scenarios::a_wrong_store_condemns_nothing(&db, fs_store(&a), fs_store(&b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_is_restored_from_a_filesystem_store_alone() {
    let dir = tempfile::tempdir().unwrap();
    scenarios::a_lost_database_is_restored_from_the_store_alone(fs_store(&dir)).await;
}

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sanare_core::{
    Control, Error, RestoreRequest, SnapshotRequest, SnapshotService, SnapshotStatus,
};
use sanare_snapshot::ddl::{DdlKind, DdlStatement, SchemaDdl};
use sanare_snapshot::format::{Manifest, encode_block};
use sanare_snapshot::{
    Availability, BlockId, Codec, ObjectMeta, PgStore, RepositoryKey, SnapshotConfig, Snapshots,
};

fn shop() -> SnapshotRequest {
    SnapshotRequest::new().schemas(["shop"])
}

async fn query_one<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    db: &sanare_testing::TestDb,
    sql: &str,
    id: sanare_core::SnapshotId,
) -> T {
    db.client()
        .await
        .query_one(sql, &[&id.as_uuid()])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_an_older_version_marked_corrupted_is_ready_again_once_verify_finds_it_intact() {
    let db = common::shop_db(300).await;
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(&dir);
    let key = RepositoryKey::generate().unwrap();
    let snap = scenarios::service(&db, &store, &key)
        .create(shop(), &Control::detached())
        .await
        .unwrap();
    let before = scenarios::fingerprints(&db, "shop").await;

    // What an older version left: a store without a repository id, a version 1
    // manifest, and a catalog row without a repository, marked corrupted by a
    // process that could not see the store (no record of who).
    store.delete("config").await.unwrap();
    let key_of = format!("manifests/{}", snap.id);
    let manifest = Manifest::decode(&store.get(&key_of).await.unwrap().unwrap()).unwrap();
    let v1 = manifest.encode_v1().unwrap();
    store.put(&key_of, Bytes::from(v1.clone())).await.unwrap();
    db.client()
        .await
        .execute(
            "UPDATE sanare.snapshots
                SET status = 'corrupted', repository = NULL, database_id = NULL,
                    status_by = NULL, status_at = NULL, manifest_hash = $2,
                    error = 'corrupt snapshot: its manifest is missing'
              WHERE id = $1",
            &[&snap.id.as_uuid(), &blake3::hash(&v1).as_bytes().to_vec()],
        )
        .await
        .unwrap();

    // A process of this version opens the store: it gets an id, the snapshot is
    // adopted, still corrupted: nothing has shown otherwise yet.
    let snaps = scenarios::service(&db, &store, &key);
    assert_eq!(
        snaps.get(snap.id).await.unwrap().status,
        SnapshotStatus::Corrupted
    );
    assert!(snaps.latest_good(None).await.unwrap().is_none());
    let repo = snaps.repository_config().await.unwrap().unwrap();
    assert_eq!(snaps.get(snap.id).await.unwrap().repository, Some(repo.id));

    // Verify finds it intact: ready again, with who had marked it and when.
    let report = snaps.verify(snap.id, &Control::detached()).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("ready") && n.contains("older version")),
        "{report:?}"
    );
    assert_eq!(
        snaps.get(snap.id).await.unwrap().status,
        SnapshotStatus::Ready
    );
    assert_eq!(snaps.latest_good(None).await.unwrap().unwrap().id, snap.id);
    let logged: String = query_one(
        &db,
        "SELECT from_status || '>' || to_status || ': ' || reason FROM sanare.snapshot_status_log
          WHERE snapshot_id = $1 ORDER BY id DESC LIMIT 1",
        snap.id,
    )
    .await;
    assert!(
        logged.starts_with("corrupted>ready: ") && logged.contains("manifest is missing"),
        "{logged}"
    );
    let evidence: serde_json::Value = query_one(
        &db,
        "SELECT status_evidence FROM sanare.snapshots WHERE id = $1",
        snap.id,
    )
    .await;
    assert_eq!(evidence["repository"], repo.id.to_string());
    db.client()
        .await
        .batch_execute("DELETE FROM shop.payments")
        .await
        .unwrap();
    snaps
        .restore(RestoreRequest::new(snap.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(scenarios::fingerprints(&db, "shop").await, before);

    // A mark needs the evidence of a verify: damage found is recorded with it.
    for pack in store.list("packs/").await.unwrap() {
        store.delete(&pack.key).await.unwrap();
    }
    let report = snaps.verify(snap.id, &Control::detached()).await.unwrap();
    assert!(!report.is_ok());
    let evidence: serde_json::Value = query_one(
        &db,
        "SELECT status_evidence FROM sanare.snapshots WHERE id = $1",
        snap.id,
    )
    .await;
    assert_eq!(
        evidence["report"]["problems"],
        serde_json::json!(report.problems)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_manifest_is_refused_before_any_sql_is_built() {
    let db = common::shop_db(200).await;
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(&dir);
    let key = RepositoryKey::generate().unwrap();
    let snaps = scenarios::service(&db, &store, &key);
    let snap = snaps.create(shop(), &Control::detached()).await.unwrap();

    // Whoever can write to the store, but has no key, plants DDL that drops a
    // table and a manifest naming it (intact as an envelope, signed with
    // another key).
    let evil = SchemaDdl {
        statements: vec![DdlStatement {
            kind: DdlKind::Table,
            schema: "shop".into(),
            name: "customers".into(),
            table: Some(("shop".into(), "customers".into())),
            needed_by: Vec::new(),
            refers_to: None,
            sql: "DROP TABLE public.canary".into(),
        }],
    }
    .encode()
    .unwrap();
    let evil_id = BlockId::of(&evil);
    store
        .put(
            &evil_id.key(),
            Bytes::from(encode_block(&evil, Codec::None).unwrap()),
        )
        .await
        .unwrap();
    let key_of = format!("manifests/{}", snap.id);
    let mut forged = Manifest::decode(&store.get(&key_of).await.unwrap().unwrap()).unwrap();
    forged.ddl = Some(evil_id);
    let other = RepositoryKey::generate().unwrap();
    store
        .put(&key_of, Bytes::from(forged.encode(Some(&other)).unwrap()))
        .await
        .unwrap();

    // The catalog's own database: refused, nothing changed.
    let before = scenarios::fingerprints(&db, "shop").await;
    let err = snaps
        .restore(RestoreRequest::new(snap.id), &Control::detached())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("not signed with this service's key"),
        "{err}"
    );
    assert_eq!(scenarios::fingerprints(&db, "shop").await, before);
    // A service without a key, which trusts only the catalog's hash, finds the
    // manifest is not the one recorded.
    let keyless = Snapshots::builder()
        .store(store.clone())
        .pool(db.pool().clone())
        .build()
        .unwrap();
    let report = keyless.verify(snap.id, &Control::detached()).await.unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("not the one the catalog recorded")),
        "{report:?}"
    );

    // A lost database restored from the store: the forged DDL never runs.
    let fresh = sanare_testing::test_db().await;
    sanare_snapshot::migrate(
        &mut fresh.connect().await,
        &sanare_pg::SchemaName::default_schema(),
    )
    .await
    .unwrap();
    fresh
        .client()
        .await
        .batch_execute("CREATE TABLE public.canary (x int)")
        .await
        .unwrap();
    let rescue = scenarios::service(&fresh, &store, &key);
    assert!(
        rescue.latest_in_store(None).await.unwrap().is_none(),
        "nothing authentic"
    );
    let err = rescue
        .restore(RestoreRequest::new(snap.id), &Control::detached())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot be authenticated"), "{err}");
    let canary: bool = fresh
        .client()
        .await
        .query_one("SELECT to_regclass('public.canary') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(canary, "the forged DDL ran");
    let imported: i64 = fresh
        .client()
        .await
        .query_one("SELECT count(*) FROM sanare.snapshots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(imported, 0);

    // Verify in the repository finds the manifest forged and marks it so.
    let report = snaps.verify(snap.id, &Control::detached()).await.unwrap();
    assert!(!report.is_ok());
    assert_eq!(
        snaps.get(snap.id).await.unwrap().status,
        SnapshotStatus::Corrupted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_databases_sharing_a_store_never_collect_each_others_blocks() {
    let (db1, db2) = (common::shop_db(200).await, common::shop_db(250).await);
    db2.client()
        .await
        .batch_execute("UPDATE shop.orders SET note = 'second database'")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(&dir);
    let (key1, key2) = (
        RepositoryKey::generate().unwrap(),
        RepositoryKey::generate().unwrap(),
    );
    let one = scenarios::service(&db1, &store, &key1);
    let two = scenarios::service(&db2, &store, &key2);
    let snap1 = one.create(shop(), &Control::detached()).await.unwrap();
    let snap2 = two.create(shop(), &Control::detached()).await.unwrap();
    let state2 = scenarios::fingerprints(&db2, "shop").await;
    assert_eq!(
        one.repository_config().await.unwrap(),
        two.repository_config().await.unwrap(),
        "one repository"
    );

    // Each lists the other's snapshot as in the store only, never as its own.
    assert_eq!(
        one.list()
            .await
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect::<Vec<_>>(),
        vec![snap1.id]
    );
    let theirs = one.list_all().await.unwrap();
    let seen = theirs
        .snapshots
        .iter()
        .find(|s| s.info.id == snap2.id)
        .unwrap();
    assert!(matches!(
        seen.availability,
        Availability::StoreOnly {
            authenticated: false,
            ..
        }
    ));

    // The first database deletes everything it has and collects: the second's
    // blocks stay.
    one.delete(snap1.id).await.unwrap();
    let gc = one.gc(Duration::ZERO, &Control::detached()).await.unwrap();
    assert!(gc.blocks_deleted > 0, "{gc:?}");
    assert_eq!(gc.snapshots_in_store, 1, "{gc:?}");
    assert!(one.latest_good(None).await.unwrap().is_none());
    let report = two.verify(snap2.id, &Control::detached()).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    db2.client()
        .await
        .batch_execute("DELETE FROM shop.payments; UPDATE shop.orders SET note = NULL")
        .await
        .unwrap();
    two.restore(RestoreRequest::new(snap2.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(scenarios::fingerprints(&db2, "shop").await, state2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_that_never_finished_are_cleaned_up() {
    let db = common::shop_db(200).await;
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(&dir);
    let key = RepositoryKey::generate().unwrap();
    let snaps = scenarios::service(&db, &store, &key);
    let good = snaps.create(shop(), &Control::detached()).await.unwrap();
    // One capture cancelled in this process, one whose process died after its
    // index was written.
    let (control, _p) = Control::new();
    control.cancel_token().cancel();
    assert!(snaps.create(shop(), &control).await.is_err());
    let crashed = sanare_core::SnapshotId::new();
    let repo = snaps.repository_config().await.unwrap().unwrap();
    db.client()
        .await
        .execute(
            "INSERT INTO sanare.snapshots (id, status, created_at, repository)
             VALUES ($1, 'creating', now(), $2)",
            &[&crashed.as_uuid(), &repo.id.as_uuid()],
        )
        .await
        .unwrap();
    let index = format!("indexes/{crashed}");
    store
        .put(&index, Bytes::from_static(b"partial"))
        .await
        .unwrap();

    let gc = snaps
        .gc(Duration::ZERO, &Control::detached())
        .await
        .unwrap();
    assert_eq!(gc.crashed_captures, 2, "{gc:?}");
    let left: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM sanare.snapshots WHERE status = 'creating'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let why: String = query_one(
        &db,
        "SELECT error FROM sanare.snapshots WHERE id = $1",
        crashed,
    )
    .await;
    assert!(why.contains("never finished"), "{why}");
    assert!(store.get(&index).await.unwrap().is_none());
    assert_eq!(
        snaps.get(good.id).await.unwrap().status,
        SnapshotStatus::Ready
    );
    assert!(
        snaps
            .verify(good.id, &Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
}

/// A filesystem store that, at its `trigger`-th read of the end of a pack (where
/// a pack's table of contents is), moves that pack to another key first, as a
/// GC that ignores the repository's lock would; and that can hold its first
/// read of a pack's blocks until released.
#[derive(Debug)]
struct Meddling {
    inner: FsStore,
    tail_reads: AtomicUsize,
    trigger: usize,
    hold: Option<(tokio::sync::Semaphore, tokio::sync::Notify)>,
}

#[async_trait]
impl BlockStore for Meddling {
    async fn put(&self, key: &str, data: Bytes) -> sanare_core::Result<()> {
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> sanare_core::Result<Option<Bytes>> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> sanare_core::Result<Option<Bytes>> {
        if key.starts_with("packs/") {
            let size = self.inner.list(key).await?.first().map(|m| m.size);
            if size == Some(range.end) {
                let n = self.tail_reads.fetch_add(1, Ordering::SeqCst) + 1;
                if n == self.trigger {
                    let bytes = self.inner.get(key).await?.unwrap();
                    let hex = key.rsplit('/').next().unwrap();
                    self.inner
                        .put(&format!("packs/zz/{hex}moved"), bytes)
                        .await?;
                    self.inner.delete(key).await?;
                    return Ok(None);
                }
            } else if let Some((gate, entered)) = &self.hold {
                entered.notify_one();
                drop(gate.acquire().await.unwrap());
            }
        }
        self.inner.get_range(key, range).await
    }
    async fn contains(&self, key: &str) -> sanare_core::Result<bool> {
        self.inner.contains(key).await
    }
    async fn delete(&self, key: &str) -> sanare_core::Result<()> {
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> sanare_core::Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pack_moved_between_verifys_passes_does_not_condemn_the_snapshot() {
    let db = common::shop_db(300).await;
    let dir = tempfile::tempdir().unwrap();
    let key = RepositoryKey::generate().unwrap();
    let snap = scenarios::service(&db, &fs_store(&dir), &key)
        .create(shop(), &Control::detached())
        .await
        .unwrap();
    let packs = FsStore::new(dir.path().join("snapshots"))
        .unwrap()
        .list("packs/")
        .await
        .unwrap()
        .len();
    // A fresh reader reads every pack's end once to map the blocks; the read
    // after those is verify's check of the first pack's table of contents.
    let store: Arc<dyn BlockStore> = Arc::new(Meddling {
        inner: FsStore::new(dir.path().join("snapshots")).unwrap(),
        tail_reads: AtomicUsize::new(0),
        trigger: packs + 1,
        hold: None,
    });
    let snaps = scenarios::service(&db, &store, &key);
    let report = snaps.verify(snap.id, &Control::detached()).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert!(
        store.list("packs/zz/").await.unwrap().len() == 1,
        "the pack was moved"
    );
    assert_eq!(
        snaps.get(snap.id).await.unwrap().status,
        SnapshotStatus::Ready
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_waits_for_a_running_verify() {
    let db = common::shop_db(300).await;
    let dir = tempfile::tempdir().unwrap();
    let key = RepositoryKey::generate().unwrap();
    let writer = scenarios::service(&db, &fs_store(&dir), &key);
    let snap = writer.create(shop(), &Control::detached()).await.unwrap();
    // A second snapshot whose blocks replace some of the first's, then the first
    // deleted: GC has packs to rewrite under the verify of the second.
    db.client()
        .await
        .batch_execute("UPDATE shop.order_lines SET quantity = quantity + 1, amount_cents = (quantity + 1) * unit_price_cents")
        .await
        .unwrap();
    let second = writer.create(shop(), &Control::detached()).await.unwrap();
    writer.delete(snap.id).await.unwrap();
    let store = Arc::new(Meddling {
        inner: FsStore::new(dir.path().join("snapshots")).unwrap(),
        tail_reads: AtomicUsize::new(0),
        trigger: usize::MAX,
        hold: Some((tokio::sync::Semaphore::new(0), tokio::sync::Notify::new())),
    });
    let shared: Arc<dyn BlockStore> = store.clone();
    let verifier = scenarios::service(&db, &shared, &key);
    let verifying =
        tokio::spawn(async move { verifier.verify(second.id, &Control::detached()).await });
    store.hold.as_ref().unwrap().1.notified().await;
    // The verify is between its reads: GC cannot start.
    let mut config = SnapshotConfig::default();
    config.lock_wait = Duration::from_millis(300);
    let collector = Snapshots::builder()
        .store(fs_store(&dir))
        .pool(db.pool().clone())
        .key(key.clone())
        .config(config)
        .build()
        .unwrap();
    let err = collector
        .gc(Duration::ZERO, &Control::detached())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("locked") && err.to_string().contains("verify"),
        "{err}"
    );
    store.hold.as_ref().unwrap().0.add_permits(1_000);
    let report = verifying.await.unwrap().unwrap();
    assert!(report.is_ok(), "{report:?}");
    let gc = collector
        .gc(Duration::ZERO, &Control::detached())
        .await
        .unwrap();
    assert!(gc.blocks_deleted > 0, "{gc:?}");
    assert!(
        writer
            .verify(second.id, &Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_inside_the_protected_database_says_so() {
    let db = common::shop_db(50).await;
    let store: Arc<dyn BlockStore> = Arc::new(PgStore::new(
        db.pool().clone(),
        &sanare_pg::SchemaName::default_schema(),
    ));
    let key = RepositoryKey::generate().unwrap();
    let snaps = scenarios::service(&db, &store, &key);
    snaps.create(shop(), &Control::detached()).await.unwrap();
    let listing = snaps.list_all().await.unwrap();
    assert!(listing.inside_protected_database);
    assert!(
        listing.location.contains("inside the protected database"),
        "{}",
        listing.location
    );
    assert!(
        !scenarios::service(&db, &fs_store(&tempfile::tempdir().unwrap()), &key)
            .list_all()
            .await
            .unwrap()
            .inside_protected_database
    );
}
