//! The filesystem block store and the snapshot repository on a simulated disk
//! whose power is cut (`sanare_fs::sim::SimDisk`): every write not yet fsynced is
//! kept, dropped or torn by 512-byte sector, and every directory entry (create,
//! rename, link, remove) not yet synced in its directory is kept or dropped, at
//! random from a seed.
//!
//! A bounded number of seeds run by default; `SANARE_POWER_CUT_ITERATIONS=n` runs
//! `n`. A failure names its seed: `SANARE_POWER_CUT_FIRST_SEED=s
//! SANARE_POWER_CUT_ITERATIONS=1` replays it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sanare_core::{
    Control, RestoreRequest, RestoreTarget, SnapshotId, SnapshotRequest, SnapshotService,
    SnapshotStatus,
};
use sanare_fs::sim::SimDisk;
use sanare_pg::SchemaName;
use sanare_snapshot::{BlockStore, FsStore, RepositoryKey, SnapshotConfig, Snapshots};
use sanare_testing::TestDb;
use sanare_testing::fixtures::order_service;

mod common;
#[path = "common/power.rs"]
mod power;

use power::{Switched, seeds, temp_files};

const ROOT: &str = "/var/lib/app/snapshots";

/// The one content an object key ever has (0 to 3 KiB, so writes span sectors
/// and can be torn).
fn data_of(key: &str) -> Bytes {
    let hash = blake3::hash(key.as_bytes());
    let h = hash.as_bytes();
    let len = usize::from(u16::from_le_bytes([h[0], h[1]])) % 3072;
    Bytes::from(h.iter().copied().cycle().take(len).collect::<Vec<u8>>())
}

/// What a key must hold after the cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Its put (or `put_new`) returned: the whole object.
    Present,
    /// Its delete returned: nothing.
    Absent,
    /// Its last operation failed with the power: nothing or the whole object.
    Either,
}

/// One writer: puts, exclusive puts and deletes of its own keys, until the first
/// error (the power went). Returns what each key it touched must hold.
async fn writer(store: Arc<FsStore>, seed: u64, task: u64) -> HashMap<String, Expect> {
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(31).wrapping_add(task));
    let mut out: HashMap<String, Expect> = HashMap::new();
    for i in 0..12 {
        let present: Vec<String> = out
            .iter()
            .filter(|(_, e)| **e == Expect::Present)
            .map(|(k, _)| k.clone())
            .collect();
        let (key, result, after) = match rng.u8(0..5) {
            4 if !present.is_empty() => {
                let key = present[rng.usize(..present.len())].clone();
                let r = store.delete(&key).await;
                (key, r, Expect::Absent)
            }
            3 => {
                let key = format!("locks/w{task}-{i}");
                let r = store.put_new(&key, data_of(&key)).await.map(|created| {
                    assert!(created, "a new key is created");
                });
                (key, r, Expect::Present)
            }
            2 => {
                let key = format!("packs/w{task}-{i}");
                let r = store.put(&key, data_of(&key)).await;
                (key, r, Expect::Present)
            }
            _ => {
                let key = format!("blocks/{:02x}/w{task}-{i}", rng.u8(..4));
                let r = store.put(&key, data_of(&key)).await;
                (key, r, Expect::Present)
            }
        };
        if result.is_err() {
            out.insert(key, Expect::Either);
            break;
        }
        out.insert(key, after);
    }
    out
}

#[derive(Debug, Default)]
struct Tally {
    cut_during_the_work: u64,
    lost_something: u64,
    left_temporaries: u64,
}

/// Four writers put and delete objects concurrently; the power goes at a random
/// change (or after the last). After the reboot: every acknowledged put is there
/// whole, every acknowledged delete holds, an interrupted put left nothing or the
/// whole object, listings show only whole objects and no temporary file, the
/// leftovers of the cut are removed, and the store takes new objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_objects_survive_a_power_cut_and_none_is_torn() {
    let mut tally = Tally::default();
    let runs = seeds(24);
    let n = runs.end - runs.start;
    for seed in runs {
        let mut rng = fastrand::Rng::with_seed(seed);
        let disk = SimDisk::new();
        let switch = Switched::new(disk.clone(), seed);
        let store = Arc::new(FsStore::with_storage(Arc::new(switch.clone()), ROOT).unwrap());
        switch.arm(rng.u64(0..330));
        let tasks: Vec<_> = (0..4)
            .map(|t| tokio::spawn(writer(store.clone(), seed, t)))
            .collect();
        let mut expect = HashMap::new();
        for t in tasks {
            expect.extend(t.await.unwrap());
        }
        let (report, during) = switch.cut_now();
        tally.cut_during_the_work += u64::from(during);
        tally.lost_something += u64::from(report.lost_anything());
        drop(store);

        let store = FsStore::with_storage(Arc::new(disk.clone()), ROOT)
            .unwrap_or_else(|e| panic!("seed {seed}: the store does not open after the cut: {e}"));
        for (key, exp) in &expect {
            let got = store.get(key).await.unwrap();
            let whole = got.as_ref() == Some(&data_of(key));
            let ok = match exp {
                Expect::Present => whole,
                Expect::Absent => got.is_none(),
                Expect::Either => got.is_none() || whole,
            };
            assert!(
                ok,
                "seed {seed}: {key} should be {exp:?}, holds {:?} bytes ({report:?})",
                got.map(|g| g.len())
            );
            if *exp == Expect::Present && !data_of(key).is_empty() {
                let len = data_of(key).len() as u64;
                let tail = store.get_range(key, len - 1..len).await.unwrap().unwrap();
                assert_eq!(tail[..], data_of(key)[data_of(key).len() - 1..]);
            }
        }
        let listed = store.list("").await.unwrap();
        for o in &listed {
            assert!(
                expect.contains_key(&o.key) && o.size == data_of(&o.key).len() as u64,
                "seed {seed}: listed {} of {} bytes, which no writer put whole",
                o.key,
                o.size
            );
        }
        for (key, exp) in &expect {
            if *exp == Expect::Present {
                assert!(
                    listed.iter().any(|o| &o.key == key),
                    "seed {seed}: {key} is not listed"
                );
            }
        }
        // A cut may leave temporary files: listings skip them, and remove them once
        // they are old enough (here: at once).
        if !temp_files(&disk, Path::new(ROOT)).is_empty() {
            tally.left_temporaries += 1;
            let again = store.clone().temp_max_age(Duration::ZERO);
            assert_eq!(again.list("").await.unwrap(), listed);
            assert_eq!(temp_files(&disk, Path::new(ROOT)), Vec::<String>::new());
        }
        store
            .put("packs/after", data_of("packs/after"))
            .await
            .unwrap();
        assert_eq!(
            store.get("packs/after").await.unwrap(),
            Some(data_of("packs/after"))
        );
    }
    // The seeds did what the test is about (a fixed seed list, so not by chance).
    if n >= 16 {
        assert!(tally.cut_during_the_work >= n / 2, "{tally:?}");
        assert!(tally.lost_something > 0, "{tally:?}");
        assert!(tally.left_temporaries > 0, "{tally:?}");
    }
}

/// What a put or delete returned is durable at that moment: no directory change
/// of it is pending (only the removal of a `put_new`'s temporary name, which a
/// listing cleans up), and the durable bytes are the object. Without the fsync of
/// the directory after the rename (or after a delete) this fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_or_delete_is_durable_when_it_returns() {
    let disk = SimDisk::new();
    let store = FsStore::with_storage(Arc::new(disk.clone()), ROOT).unwrap();
    let keys = ["blocks/ab/x", "blocks/cd/y", "packs/p1", "manifests/m1"];
    for key in keys {
        store.put(key, data_of(key)).await.unwrap();
    }
    assert!(store.put_new("config", data_of("config")).await.unwrap());
    assert!(
        !store
            .put_new("config", Bytes::from_static(b"other"))
            .await
            .unwrap()
    );
    store.delete("packs/p1").await.unwrap();
    let pending: Vec<_> = disk
        .unsynced_entries()
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".tmp-"))
        })
        .collect();
    assert!(pending.is_empty(), "not durable: {pending:?}");
    let root = Path::new(ROOT);
    for key in ["blocks/ab/x", "blocks/cd/y", "manifests/m1", "config"] {
        assert_eq!(
            disk.durable_contents(&root.join(key)).as_deref(),
            Some(&data_of(key)[..]),
            "{key}"
        );
    }
    assert_eq!(disk.durable_contents(&root.join("packs/p1")), None);
    // And a cut now, whatever it does with the rest, keeps every one of them.
    disk.cut_power(7);
    let store = FsStore::with_storage(Arc::new(disk.clone()), ROOT).unwrap();
    for key in ["blocks/ab/x", "blocks/cd/y", "manifests/m1", "config"] {
        assert_eq!(store.get(key).await.unwrap(), Some(data_of(key)), "{key}");
    }
    assert_eq!(store.get("packs/p1").await.unwrap(), None);
}

#[test]
fn a_key_naming_a_temporary_file_is_refused() {
    let store = FsStore::with_storage(Arc::new(SimDisk::new()), ROOT).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(store.put("blocks/.tmp-1-2", Bytes::from_static(b"x")))
        .unwrap_err();
    assert!(err.to_string().contains(".tmp-"), "{err}");
}

// ---- Snapshots ----

fn service(db: &TestDb, store: &Arc<dyn BlockStore>, key: &RepositoryKey) -> Snapshots {
    let mut config = SnapshotConfig::default();
    // Small packs: a capture writes several, so the cut can fall between them.
    config.pack_size = 64 * 1024;
    // A lock left by a bug would fail the test, not hang it.
    config.lock_wait = Duration::from_secs(30);
    Snapshots::builder()
        .store(store.clone())
        .pool(db.pool().clone())
        .schema(SchemaName::default_schema())
        .key(key.clone())
        .config(config)
        .build()
        .unwrap()
}

async fn fingerprints(db: &TestDb, schema: &str) -> Vec<(String, i64, String)> {
    order_service::content_hashes(&**db.client().await, schema)
        .await
        .unwrap()
}

fn shop() -> SnapshotRequest {
    SnapshotRequest::new().schemas(["shop"])
}

/// Checks that snapshot `id` verifies and restores (into a scratch schema) to
/// exactly `rows`.
async fn intact(
    snaps: &Snapshots,
    db: &TestDb,
    id: SnapshotId,
    rows: &[(String, i64, String)],
    scratch: &str,
    seed: u64,
) {
    let ctl = Control::detached();
    let report = snaps.verify(id, &ctl).await.unwrap();
    assert!(report.is_ok(), "seed {seed}: {report:?}");
    snaps
        .restore(
            RestoreRequest::new(id).target(RestoreTarget::Scratch {
                schema: scratch.into(),
            }),
            &ctl,
        )
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: restoring {id}: {e}"));
    assert_eq!(fingerprints(db, scratch).await, rows, "seed {seed}: {id}");
}

/// Snapshot A is taken; rows change; the power is cut at a random point of
/// snapshot B's capture, or of the delete of A and the garbage collection after
/// it. After the reboot, in a fresh process over the same disk:
/// - the store opens;
/// - every snapshot whose `create` returned (and was not deleted) verifies and
///   restores row for row;
/// - every manifest the store holds verifies from the store alone, so a capture
///   cut mid-way left none pointing at missing blocks, and every snapshot the
///   catalog calls ready verifies;
/// - GC, then a new capture, work and keep all that.
///
/// Capture runs against PostgreSQL (`sanare_testing::test_db`), which the cut does
/// not touch: only the store's disk loses power.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_during_capture_or_gc_loses_no_acknowledged_snapshot() {
    let mut phases: std::collections::BTreeMap<&str, u64> = Default::default();
    for seed in seeds(4) {
        *phases.entry(capture_cut(seed).await).or_default() += 1;
    }
    println!("where the cuts fell: {phases:?}");
}

/// One run of the test above; returns where the cut fell (`capture`, `delete`,
/// `gc`, or `none`: after the work).
async fn capture_cut(seed: u64) -> &'static str {
    let ctl = Control::detached();
    let mut rng = fastrand::Rng::with_seed(seed);
    let db = common::shop_db(300).await;
    let key = RepositoryKey::generate().unwrap();
    let disk = SimDisk::new();
    let switch = Switched::new(disk.clone(), seed);
    let store: Arc<dyn BlockStore> =
        Arc::new(FsStore::with_storage(Arc::new(switch.clone()), ROOT).unwrap());
    let snaps = service(&db, &store, &key);

    let start = switch.ops();
    let a = snaps.create(shop(), &ctl).await.unwrap();
    let a_ops = switch.ops() - start;
    let mut acked = vec![(a.id, fingerprints(&db, "shop").await)];
    let mut deleting = None;
    common::change_spread_rows(&db).await;
    // B takes about as many changes as A did; the delete and GC a few more.
    switch.arm(rng.u64(0..a_ops * 3 / 2 + 8));
    let mut phase = "capture";
    if let Ok(b) = snaps.create(shop(), &ctl).await {
        acked.push((b.id, fingerprints(&db, "shop").await));
        phase = "delete";
        match snaps.delete(a.id).await {
            Ok(_) => {
                acked.retain(|(id, _)| *id != a.id);
                phase = "gc";
                if snaps.gc(Duration::ZERO, &ctl).await.is_ok() {
                    phase = "none";
                }
            }
            // A delete cut short may or may not have happened.
            Err(_) => deleting = Some(a.id),
        }
    }
    let (cut, cut_during) = switch.cut_now();
    if !cut_during {
        phase = "none";
    }
    drop(snaps);
    drop(store);

    // The reboot.
    let store: Arc<dyn BlockStore> = Arc::new(
        FsStore::with_storage(Arc::new(disk.clone()), ROOT)
            .unwrap_or_else(|e| panic!("seed {seed}: the store does not open: {e}")),
    );
    // The lock objects of the process that lost its power name this test's pid,
    // which still runs: remove them as the dead process's would be judged stale.
    for lock in store.list("locks/").await.unwrap() {
        store.delete(&lock.key).await.unwrap();
    }
    let snaps = service(&db, &store, &key);
    if let Some(id) = deleting
        && snaps.get(id).await.unwrap().status == SnapshotStatus::Deleted
    {
        acked.retain(|(a, _)| *a != id);
    }
    for (i, (id, rows)) in acked.iter().enumerate() {
        intact(&snaps, &db, *id, rows, &format!("scratch_{i}"), seed).await;
    }
    let alone = Snapshots::builder()
        .store(store.clone())
        .key(key.clone())
        .without_catalog()
        .build()
        .unwrap();
    for s in alone.list_all().await.unwrap().snapshots {
        let report = alone.verify(s.info.id, &ctl).await.unwrap();
        assert!(
            report.is_ok(),
            "seed {seed}: a manifest in the store is damaged: {report:?} (the cut: {cut:?})"
        );
    }
    for info in snaps.list().await.unwrap() {
        if info.status == SnapshotStatus::Ready {
            let report = snaps.verify(info.id, &ctl).await.unwrap();
            assert!(report.is_ok(), "seed {seed}: {report:?}");
        }
    }
    // The repository goes on: a GC cleans up after the cut, takes nothing an
    // acknowledged snapshot needs, and a new capture is whole.
    snaps.gc(Duration::ZERO, &ctl).await.unwrap();
    let now = fingerprints(&db, "shop").await;
    let c = snaps.create(shop(), &ctl).await.unwrap();
    intact(&snaps, &db, c.id, &now, "scratch_after", seed).await;
    for (id, _) in &acked {
        let report = snaps.verify(*id, &ctl).await.unwrap();
        assert!(report.is_ok(), "seed {seed}: after GC: {report:?}");
    }
    phase
}
