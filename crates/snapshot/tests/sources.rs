//! Host byte streams (`StateSource`) captured with the tables and restored.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sanare_core::{Control, Error, SnapshotRequest, SnapshotService, SnapshotStatus};
use sanare_pg::SchemaName;
use sanare_snapshot::{FsStore, Snapshots, StateSource};
use sanare_testing::test_db;
use tokio::io::AsyncRead;

mod common;

/// State held in memory that the test edits between snapshots.
#[derive(Debug)]
struct Memory {
    name: String,
    data: Mutex<Vec<u8>>,
    fail: Mutex<bool>,
}

#[async_trait]
impl StateSource for Memory {
    fn name(&self) -> &str {
        &self.name
    }
    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("format".to_owned(), "v3".to_owned())])
    }
    async fn open(&self) -> sanare_core::Result<Box<dyn AsyncRead + Send + Unpin>> {
        if *self.fail.lock().unwrap() {
            return Err(Error::unavailable("the cache file is locked"));
        }
        let data = self.data.lock().unwrap().clone();
        Ok(Box::new(std::io::Cursor::new(data)))
    }
}

fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Compressible but not trivially: a few symbols.
            b"abcdefgh"[(x % 8) as usize]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_sources_round_trip_with_dedup_and_refuse_damage() {
    let db = common::shop_db(200).await;
    let schema = SchemaName::default_schema();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FsStore::new(dir.path()).unwrap());
    let cache = Arc::new(Memory {
        name: "cache.db".into(),
        data: Mutex::new(pseudo_random(2_000_000)),
        fail: Mutex::new(false),
    });
    let empty = Arc::new(Memory {
        name: "empty".into(),
        data: Mutex::new(Vec::new()),
        fail: Mutex::new(false),
    });
    let snaps = Snapshots::builder()
        .store(store.clone())
        .pool(db.pool().clone())
        .schema(schema)
        .source(cache.clone())
        .source(empty)
        .build()
        .unwrap();
    let request = || SnapshotRequest::new().schemas(["shop"]);

    let v1 = cache.data.lock().unwrap().clone();
    let first = snaps.create(request(), &Control::detached()).await.unwrap();
    let blocks_after_first = snaps.stats().await.unwrap().blocks;

    // Edit the middle and append: only the blocks around the edits are new.
    {
        let mut d = cache.data.lock().unwrap();
        d[1_000_000..1_000_010].copy_from_slice(b"EDITEDEDIT");
        d.extend_from_slice(b"appended tail");
    }
    let v2 = cache.data.lock().unwrap().clone();
    let second = snaps.create(request(), &Control::detached()).await.unwrap();
    let new_blocks = snaps.stats().await.unwrap().blocks - blocks_after_first;
    let stream_blocks = snaps.sources(second.id).await.unwrap()[0].blocks;
    assert!(stream_blocks > 50, "{stream_blocks} blocks");
    assert!(
        new_blocks <= 4,
        "{new_blocks} new blocks of {stream_blocks}: the unchanged ones were deduplicated"
    );
    assert!(second.stored_bytes * 10 < first.stored_bytes);

    let listed = snaps.sources(first.id).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].name, "cache.db");
    assert_eq!(listed[0].len, 2_000_000);
    assert_eq!(
        listed[0].metadata.get("format").map(String::as_str),
        Some("v3")
    );
    assert_eq!(listed[1].len, 0);

    // Both versions come back byte for byte; the empty stream comes back empty.
    for (id, want) in [(first.id, &v1), (second.id, &v2)] {
        let mut out: Vec<u8> = Vec::new();
        let n = snaps
            .restore_source(id, "cache.db", &mut out, &Control::detached())
            .await
            .unwrap();
        assert_eq!(n, want.len() as u64);
        assert!(out == *want, "restored stream differs");
    }
    let mut out: Vec<u8> = Vec::new();
    assert_eq!(
        snaps
            .restore_source(first.id, "empty", &mut out, &Control::detached())
            .await
            .unwrap(),
        0
    );
    let err = snaps
        .restore_source(first.id, "nope", &mut out, &Control::detached())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");

    // A source that cannot be read fails the capture: no ready snapshot.
    *cache.fail.lock().unwrap() = true;
    let err = snaps
        .create(request(), &Control::detached())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("locked"), "{err}");
    let ready = snaps
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.status == SnapshotStatus::Ready)
        .count();
    assert_eq!(ready, 2);

    // A flipped bit in a block only the second snapshot's stream has: the restore
    // refuses, names the block, and verify finds it.
    let first_blocks = snaps.block_ids(first.id).await.unwrap();
    let mut only_second = Vec::new();
    for id in snaps.block_ids(second.id).await.unwrap() {
        if !first_blocks.contains(&id) {
            only_second.push((id, snaps.locate(id).await.unwrap().unwrap()));
        }
    }
    let (newest, loc) = only_second.into_iter().max_by_key(|b| b.1.len).unwrap();
    let newest = newest.to_string();
    let path = dir.path().join(&loc.key);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = (loc.offset + loc.len - 3) as usize;
    bytes[at] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let mut out: Vec<u8> = Vec::new();
    let err = snaps
        .restore_source(second.id, "cache.db", &mut out, &Control::detached())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(
        err.to_string().contains(newest.rsplit('/').next().unwrap()),
        "{err}"
    );
    let report = snaps.verify(first.id, &Control::detached()).await.unwrap();
    assert!(
        report.is_ok(),
        "the first snapshot does not use it: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_source_names_are_checked() {
    let db = test_db().await;
    let dup = || {
        Arc::new(Memory {
            name: "same".into(),
            data: Mutex::new(Vec::new()),
            fail: Mutex::new(false),
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let builder = || {
        Snapshots::builder()
            .store(Arc::new(FsStore::new(dir.path()).unwrap()))
            .pool(db.pool().clone())
    };
    let err = builder().source(dup()).source(dup()).build().unwrap_err();
    assert!(err.to_string().contains("same"), "{err}");
    let bad = Arc::new(Memory {
        name: "../etc".into(),
        data: Mutex::new(Vec::new()),
        fail: Mutex::new(false),
    });
    assert!(builder().source(bad).build().is_err());
}
