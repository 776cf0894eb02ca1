//! The S3 block store against a real S3-compatible server (s3s-fs over a temporary
//! directory) that the test starts on 127.0.0.1:0.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use object_store::aws::AmazonS3Builder;
use sanare_core::{Control, RestoreRequest, SnapshotRequest, SnapshotService, SnapshotStatus};
use sanare_pg::SchemaName;
use sanare_snapshot::{BlockStore, S3Store, Snapshots};
use sanare_testing::fixtures::order_service;
use sanare_testing::test_db;
use tokio::net::TcpListener;

mod common;
#[path = "common/scenarios.rs"]
mod scenarios;

const ACCESS_KEY: &str = "sanare-test";
const SECRET_KEY: &str = "sanare-test-secret";
const BUCKET: &str = "snapshots";

/// A running S3 server; dropped with the test.
struct S3Server {
    addr: SocketAddr,
    _root: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn s3_server() -> S3Server {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join(BUCKET)).unwrap();
    let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = builder.build();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        while let Ok((socket, _)) = listener.accept().await {
            let conn = http
                .serve_connection(TokioIo::new(socket), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    S3Server {
        addr,
        _root: root,
        task,
    }
}

fn client(addr: SocketAddr, secret: &str) -> AmazonS3Builder {
    AmazonS3Builder::new()
        .with_endpoint(format!("http://{addr}"))
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name(BUCKET)
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_passes_conformance() {
    let server = s3_server().await;
    let store = S3Store::new(client(server.addr, SECRET_KEY)).unwrap();
    sanare_snapshot::testing::conformance(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_under_a_prefix_passes_conformance_and_stays_inside_it() {
    let server = s3_server().await;
    let outside = S3Store::new(client(server.addr, SECRET_KEY)).unwrap();
    outside
        .put("blocks/ab/neighbour", bytes::Bytes::from_static(b"n"))
        .await
        .unwrap();
    let store = S3Store::new(client(server.addr, SECRET_KEY))
        .unwrap()
        .with_prefix("service-a")
        .unwrap();
    sanare_snapshot::testing::conformance(&store).await;
    // The neighbour outside the prefix was neither listed nor touched.
    let keys: Vec<String> = outside
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert!(keys.contains(&"blocks/ab/neighbour".to_owned()), "{keys:?}");
    assert!(
        keys.iter()
            .all(|k| k.starts_with("service-a/") || k == "blocks/ab/neighbour")
    );
    assert!(
        S3Store::new(client(server.addr, SECRET_KEY))
            .unwrap()
            .with_prefix("../up")
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_reports_bad_credentials_and_a_dead_endpoint() {
    let server = s3_server().await;
    let wrong = S3Store::new(client(server.addr, "not-the-secret")).unwrap();
    let err = wrong
        .put("blocks/aa/x", bytes::Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("S3 block store"), "{err}");
    let addr = server.addr;
    drop(server);
    // Nothing listens any more: an error, not a hang or a panic.
    let gone = S3Store::new(
        client(addr, SECRET_KEY).with_retry(object_store::RetryConfig {
            max_retries: 0,
            ..Default::default()
        }),
    )
    .unwrap();
    assert!(gone.get("blocks/aa/x").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_on_s3_round_trip_and_verify() {
    let server = s3_server().await;
    let db = test_db().await;
    let client_db = db.client().await;
    order_service::install(&**client_db, "shop").await.unwrap();
    order_service::generate(&**client_db, "shop", 500)
        .await
        .unwrap();
    let schema = SchemaName::default_schema();
    let mut c = db.connect().await;
    sanare_snapshot::migrate(&mut c, &schema).await.unwrap();
    let store = Arc::new(S3Store::new(client(server.addr, SECRET_KEY)).unwrap());
    let snaps = Snapshots::builder()
        .store(store.clone())
        .pool(db.pool().clone())
        .schema(schema)
        .build()
        .unwrap();
    let hash = || async {
        order_service::content_hashes(&**db.client().await, "shop")
            .await
            .unwrap()
    };
    let before = hash().await;
    let info = snaps
        .create(
            SnapshotRequest::new().schemas(["shop"]),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(info.status, SnapshotStatus::Ready);
    assert!(!store.list("manifests/").await.unwrap().is_empty());
    client_db
        .batch_execute("DELETE FROM shop.payments; UPDATE shop.orders SET note = 'x'")
        .await
        .unwrap();
    snaps
        .restore(RestoreRequest::new(info.id), &Control::detached())
        .await
        .unwrap();
    assert_eq!(hash().await, before);
    let report = snaps.verify(info.id, &Control::detached()).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filesystem_and_an_s3_store_never_condemn_each_others_snapshots() {
    let server = s3_server().await;
    // The service moved from the filesystem to S3, then (in another database)
    // the other way round: the snapshots of the old store are never condemned by
    // the new one.
    for (prefix, s3_first) in [("moved-here", false), ("first-here", true)] {
        let db = common::shop_db(300).await;
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn BlockStore> = Arc::new(sanare_snapshot::FsStore::new(dir.path()).unwrap());
        let s3: Arc<dyn BlockStore> = Arc::new(
            S3Store::new(client(server.addr, SECRET_KEY))
                .unwrap()
                .with_prefix(prefix)
                .unwrap(),
        );
        let (old, new) = if s3_first { (s3, fs) } else { (fs, s3) };
        scenarios::a_wrong_store_condemns_nothing(&db, old, new).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_is_restored_from_an_s3_store_alone() {
    let server = s3_server().await;
    let s3: Arc<dyn BlockStore> = Arc::new(S3Store::new(client(server.addr, SECRET_KEY)).unwrap());
    scenarios::a_lost_database_is_restored_from_the_store_alone(s3).await;
}
