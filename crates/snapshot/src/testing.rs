//! The conformance suite every [`BlockStore`] must pass (feature `testing`).
//!
//! ```ignore
//! sanare_snapshot::testing::conformance(&my_store).await;
//! ```

use bytes::Bytes;

use crate::BlockStore;

/// Runs every conformance check against `store`, which must be empty.
///
/// # Panics
/// On the first check that fails, saying which.
pub async fn conformance(store: &dyn BlockStore) {
    missing_objects(store).await;
    let big = round_trip(store).await;
    ranges(store, &big).await;
    idempotent_put(store).await;
    listing(store).await;
    bad_keys(store).await;
    concurrent_puts(store).await;
    put_new(store).await;
    deletes(store).await;
}

/// Missing objects are None, not errors.
#[allow(clippy::unwrap_used, clippy::expect_used)]
async fn missing_objects(store: &dyn BlockStore) {
    assert!(store.get("blocks/00/missing").await.unwrap().is_none());
    assert!(!store.contains("blocks/00/missing").await.unwrap());
    store
        .delete("blocks/00/missing")
        .await
        .expect("deleting a missing key is not an error");
}

/// Round trip, including empty and large objects; returns the large one.
#[allow(clippy::unwrap_used)]
async fn round_trip(store: &dyn BlockStore) -> Vec<u8> {
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    store
        .put("blocks/ab/one", Bytes::from_static(b"one"))
        .await
        .unwrap();
    store.put("blocks/ab/empty", Bytes::new()).await.unwrap();
    store
        .put("blocks/cd/big", Bytes::from(big.clone()))
        .await
        .unwrap();
    store
        .put("manifests/m1", Bytes::from_static(b"m"))
        .await
        .unwrap();
    assert_eq!(
        store.get("blocks/ab/one").await.unwrap().unwrap(),
        &b"one"[..]
    );
    assert_eq!(
        store.get("blocks/ab/empty").await.unwrap().unwrap().len(),
        0
    );
    assert_eq!(store.get("blocks/cd/big").await.unwrap().unwrap(), big);
    assert!(store.contains("blocks/ab/one").await.unwrap());
    big
}

/// Parts of objects: any range inside, empty ranges, not past the end.
#[allow(clippy::unwrap_used)]
async fn ranges(store: &dyn BlockStore, big: &[u8]) {
    assert_eq!(
        store
            .get_range("blocks/cd/big", 1_000_000..1_000_300)
            .await
            .unwrap()
            .unwrap(),
        big[1_000_000..1_000_300]
    );
    assert_eq!(
        store
            .get_range("blocks/cd/big", 2_999_990..3_000_000)
            .await
            .unwrap()
            .unwrap(),
        big[2_999_990..]
    );
    assert_eq!(
        store
            .get_range("blocks/ab/one", 1..3)
            .await
            .unwrap()
            .unwrap(),
        &b"ne"[..]
    );
    assert!(
        store
            .get_range("blocks/ab/one", 3..3)
            .await
            .unwrap()
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .get_range("blocks/00/missing", 0..1)
            .await
            .unwrap()
            .is_none()
    );
    let past_end = store.get_range("blocks/ab/one", 2..5).await;
    assert!(
        matches!(past_end, Err(sanare_core::Error::Corrupt { .. })),
        "a range past the end is Corrupt: {past_end:?}"
    );
}

/// Putting the same key again is idempotent.
#[allow(clippy::unwrap_used)]
async fn idempotent_put(store: &dyn BlockStore) {
    store
        .put("blocks/ab/one", Bytes::from_static(b"one"))
        .await
        .unwrap();
    assert_eq!(
        store.get("blocks/ab/one").await.unwrap().unwrap(),
        &b"one"[..]
    );
}

/// Listing by prefix, sorted, with sizes.
#[allow(clippy::unwrap_used)]
async fn listing(store: &dyn BlockStore) {
    let keys =
        |v: Vec<crate::ObjectMeta>| v.into_iter().map(|m| (m.key, m.size)).collect::<Vec<_>>();
    assert_eq!(
        keys(store.list("blocks/").await.unwrap()),
        vec![
            ("blocks/ab/empty".to_owned(), 0),
            ("blocks/ab/one".to_owned(), 3),
            ("blocks/cd/big".to_owned(), 3_000_000)
        ]
    );
    assert_eq!(keys(store.list("manifests/").await.unwrap()).len(), 1);
    assert_eq!(keys(store.list("blocks/ab/").await.unwrap()).len(), 2);
    assert!(store.list("nothing/").await.unwrap().is_empty());
    let meta = store.list("blocks/ab/one").await.unwrap();
    let age = time::OffsetDateTime::now_utc() - meta[0].modified;
    assert!(
        age.whole_minutes().abs() < 10,
        "modified time is now-ish: {age}"
    );
}

/// Bad keys are refused, not mapped somewhere surprising.
async fn bad_keys(store: &dyn BlockStore) {
    for bad in ["", "../escape", "blocks//x", "blocks/./x", "a b"] {
        assert!(
            store.put(bad, Bytes::from_static(b"x")).await.is_err(),
            "key {bad:?} accepted"
        );
    }
}

/// Concurrent puts of the same and different keys.
#[allow(clippy::unwrap_used)]
async fn concurrent_puts(store: &dyn BlockStore) {
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let data = Bytes::from(vec![(i % 4) as u8; 10_000]);
        tasks.push(async move { store.put(&format!("blocks/ee/k{}", i % 4), data).await });
    }
    for r in futures_util::future::join_all(tasks).await {
        r.unwrap();
    }
    for i in 0..4u8 {
        let got = store
            .get(&format!("blocks/ee/k{i}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, vec![i; 10_000]);
    }
}

/// Creating only what is not there: the first wins, the second changes nothing.
#[allow(clippy::unwrap_used)]
async fn put_new(store: &dyn BlockStore) {
    assert!(
        store
            .put_new("locks/first", Bytes::from_static(b"a"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .put_new("locks/first", Bytes::from_static(b"b"))
            .await
            .unwrap()
    );
    assert_eq!(store.get("locks/first").await.unwrap().unwrap(), &b"a"[..]);
    store.delete("locks/first").await.unwrap();
    assert!(!store.location().is_empty());
}

/// Delete.
#[allow(clippy::unwrap_used)]
async fn deletes(store: &dyn BlockStore) {
    store.delete("blocks/ab/one").await.unwrap();
    assert!(store.get("blocks/ab/one").await.unwrap().is_none());
    assert!(!store.contains("blocks/ab/one").await.unwrap());
}
