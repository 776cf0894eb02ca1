//! The WAL's pipelined group commit under concurrent writers: durability and order
//! of every acknowledged entry after a reopen, idempotency keys across groups in
//! flight, a failed `fdatasync` or `pwrite` (injected through the `testing` hook),
//! and segment rotation under load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use sanare_core::{Control, Event, EventBus, JournalPosition, JournalService};
use sanare_journal::testing::WalFault;
use sanare_journal::{Journal, NewEntry, Query};

const WRITERS: usize = 32;

fn entry(payload: &str) -> NewEntry {
    NewEntry::new("op", payload).unwrap()
}

/// Every entry in the journal at `dir`, by position, as its payload string.
async fn contents(dir: &Path) -> BTreeMap<u64, String> {
    let journal = Journal::wal(dir).build().await.unwrap();
    let report = journal.open_report().unwrap();
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert!(
        journal
            .validate(&Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
    journal
        .query(&Query::all())
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.position.0, e.payload_as::<String>().unwrap()))
        .collect()
}

/// `WRITERS` tasks each record `per_writer` entries `w{w}-{i}` one after another;
/// returns each writer's acknowledged positions.
async fn record_concurrently(journal: &Journal, per_writer: usize) -> Vec<Vec<u64>> {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let j = journal.clone();
        tasks.push(tokio::spawn(async move {
            let mut positions = Vec::with_capacity(per_writer);
            for i in 0..per_writer {
                let r = j.record(entry(&format!("w{w}-{i}"))).await.unwrap();
                assert!(!r.duplicate);
                positions.push(r.position.0);
            }
            positions
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_find_their_entries_durable_and_in_order_after_reopen() {
    for depth in [1, 2, 4] {
        let dir = tempfile::tempdir().unwrap();
        let bus = EventBus::new(100_000);
        let mut sub = bus.subscribe();
        let journal = Journal::wal(dir.path())
            .sync_pipeline_depth(depth)
            .events(bus.clone())
            .build()
            .await
            .unwrap();
        let per_writer = 60;
        let positions = record_concurrently(&journal, per_writer).await;
        let total = (WRITERS * per_writer) as u64;
        assert_eq!(journal.head().await.unwrap(), JournalPosition(total));

        // Durable batches were published in position order, each starting where
        // the last one ended.
        let mut next = 1;
        while let Some(record) = sub.try_recv() {
            if let Event::JournalRecorded {
                entries,
                first_position,
                last_position,
            } = record.event
            {
                assert_eq!(first_position, Some(JournalPosition(next)), "depth {depth}");
                next += entries;
                assert_eq!(last_position, Some(JournalPosition(next - 1)));
            }
        }
        assert_eq!(next, total + 1, "depth {depth}: every entry published once");
        drop(journal);

        let found = contents(dir.path()).await;
        assert_eq!(
            found.keys().copied().collect::<Vec<_>>(),
            (1..=total).collect::<Vec<_>>(),
            "depth {depth}: positions 1..={total}, no gap"
        );
        for (w, mine) in positions.iter().enumerate() {
            assert!(mine.windows(2).all(|p| p[0] < p[1]), "writer {w} in order");
            for (i, p) in mine.iter().enumerate() {
                assert_eq!(found[p], format!("w{w}-{i}"), "depth {depth}, position {p}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_deduplicated_within_and_across_groups_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::wal(dir.path()).build().await.unwrap();
    let keys = 20;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let j = journal.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for k in 0..keys {
                let r = j
                    .record(entry(&format!("k{k}-w{w}")).idempotency_key(format!("k{k}")))
                    .await
                    .unwrap();
                out.push((k, r));
            }
            out
        }));
    }
    let mut by_key: HashMap<usize, Vec<sanare_journal::Recorded>> = HashMap::new();
    for t in tasks {
        for (k, r) in t.await.unwrap() {
            by_key.entry(k).or_default().push(r);
        }
    }
    for (k, rs) in &by_key {
        assert_eq!(rs.len(), WRITERS);
        assert_eq!(
            rs.iter().filter(|r| !r.duplicate).count(),
            1,
            "key k{k} recorded once"
        );
        assert!(
            rs.iter()
                .all(|r| r.position == rs[0].position && r.id == rs[0].id),
            "key k{k}: every caller got the first entry"
        );
    }
    drop(journal);
    let found = contents(dir.path()).await;
    assert_eq!(found.len(), keys);
    for (k, rs) in &by_key {
        assert!(found[&rs[0].position.0].starts_with(&format!("k{k}-")));
    }
}

/// The outcome of writers that record until the journal refuses.
struct UntilFailure {
    /// (writer, i) of every acknowledged entry, by position.
    acknowledged: BTreeMap<u64, String>,
    /// Payloads whose `record` failed.
    failed: HashSet<String>,
    /// How many of those failures were I/O errors (the write or sync of their own
    /// group failed) rather than the refusal of a poisoned journal.
    io_errors: usize,
}

async fn record_until_failure(journal: &Journal, writers: usize) -> UntilFailure {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let j = journal.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            for i in 0..100_000 {
                let payload = format!("w{w}-{i}");
                match j.record(entry(&payload)).await {
                    Ok(r) => ok.push((r.position.0, payload)),
                    Err(e) => return (ok, payload, e),
                }
            }
            panic!("writer {w} never saw the injected failure");
        }));
    }
    let mut out = UntilFailure {
        acknowledged: BTreeMap::new(),
        failed: HashSet::new(),
        io_errors: 0,
    };
    for t in tasks {
        let (ok, payload, e) = t.await.unwrap();
        out.acknowledged.extend(ok);
        out.failed.insert(payload);
        match e {
            sanare_core::Error::Io { .. } => out.io_errors += 1,
            sanare_core::Error::Unavailable(_) => {}
            other => panic!("unexpected error {other:?}"),
        }
    }
    out
}

fn injected_eio() -> std::io::Error {
    std::io::Error::other("injected: input/output error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_fails_every_caller_in_flight_and_poisons() {
    const K: u64 = 5;
    let dir = tempfile::tempdir().unwrap();
    // Sync K is held until sync K + 1 has started, so two groups are in flight;
    // from K on the device fails every flush.
    let (k_started, k_started_rx) = mpsc::channel::<()>();
    let (next_started, next_started_rx) = mpsc::channel::<()>();
    let next_started_rx = Mutex::new(next_started_rx);
    let journal = Journal::wal(dir.path())
        .sync_pipeline_depth(2)
        .inject_wal_faults(move |at| match at {
            WalFault::Sync { sync } if sync == K => {
                let _ = k_started.send(());
                // (A timeout leaves one group in flight: the assertions on
                // the number of I/O errors below then fail.)
                let _ = next_started_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(20));
                Err(injected_eio())
            }
            WalFault::Sync { sync } if sync > K => {
                let _ = next_started.send(());
                Err(injected_eio())
            }
            _ => Ok(()),
        })
        .build()
        .await
        .unwrap();
    // One more caller once sync K runs, so a group K + 1 forms even if all the
    // writers sit in group K.
    let extra = {
        let j = journal.clone();
        tokio::spawn(async move {
            tokio::task::spawn_blocking(move || k_started_rx.recv_timeout(Duration::from_secs(20)))
                .await
                .unwrap()
                .unwrap();
            j.record(entry("extra")).await
        })
    };
    let mut outcome = record_until_failure(&journal, WRITERS).await;
    // The extra caller joined a group after K: it failed too.
    match extra.await.unwrap() {
        Ok(r) => panic!("acknowledged after the failure: {r:?}"),
        Err(sanare_core::Error::Io { .. }) => outcome.io_errors += 1,
        Err(sanare_core::Error::Unavailable(_)) => {}
        Err(e) => panic!("unexpected error {e:?}"),
    }
    outcome.failed.insert("extra".to_owned());
    // The callers of groups K and K + 1 (at least one each) got the I/O error...
    assert!(outcome.io_errors >= 2, "{} I/O errors", outcome.io_errors);
    // ...and everything acknowledged is the durable prefix before group K.
    let acked: Vec<u64> = outcome.acknowledged.keys().copied().collect();
    let m = acked.len() as u64;
    assert_eq!(acked, (1..=m).collect::<Vec<_>>());
    // Poisoned: later callers are refused without writing anything.
    let refused = journal.record(entry("late")).await.unwrap_err();
    assert!(
        matches!(refused, sanare_core::Error::Unavailable(_)),
        "{refused:?}"
    );
    assert!(journal.head().await.unwrap().0 == m);
    drop(journal);

    let found = contents(dir.path()).await;
    for (p, payload) in &outcome.acknowledged {
        assert_eq!(
            found.get(p),
            Some(payload),
            "acknowledged position {p} lost"
        );
    }
    // Anything after the acknowledged prefix is a "maybe durable" entry of a
    // caller that got an error (written, its flush failed).
    for (p, payload) in found.range(m + 1..) {
        assert!(outcome.failed.contains(payload), "{p}: {payload}");
    }
    assert!(!found.values().any(|p| p == "late"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_fails_its_group_and_poisons() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::wal(dir.path())
        .inject_wal_faults(|at| match at {
            WalFault::Write { group: 4 } => Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "injected: no space left on device",
            )),
            _ => Ok(()),
        })
        .build()
        .await
        .unwrap();
    let outcome = record_until_failure(&journal, 8).await;
    assert!(outcome.io_errors >= 1);
    let acked: Vec<u64> = outcome.acknowledged.keys().copied().collect();
    let m = acked.len() as u64;
    assert!(m >= 3, "three groups were written before the failure");
    assert_eq!(acked, (1..=m).collect::<Vec<_>>());
    let refused = journal.record(entry("late")).await.unwrap_err();
    assert!(
        matches!(refused, sanare_core::Error::Unavailable(_)),
        "{refused:?}"
    );
    drop(journal);

    // Nothing of the failed group was written; the groups before it are durable.
    let found = contents(dir.path()).await;
    assert_eq!(found, outcome.acknowledged);
    // Reopened, the journal records again after the durable head.
    let journal = Journal::wal(dir.path()).build().await.unwrap();
    let r = journal.record(entry("again")).await.unwrap();
    assert_eq!(r.position, JournalPosition(m + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_concurrent_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::wal(dir.path())
        .segment_size(4096)
        .build()
        .await
        .unwrap();
    let rotations = {
        let j = journal.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                j.rotate().await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let per_writer = 40;
    let positions = Arc::new(record_concurrently(&journal, per_writer).await);
    rotations.await.unwrap();
    let total = (WRITERS * per_writer) as u64;
    assert_eq!(journal.head().await.unwrap(), JournalPosition(total));
    // Queries on the live journal see every entry across the segments.
    assert_eq!(
        journal.query(&Query::all()).await.unwrap().len() as u64,
        total
    );
    drop(journal);

    let segments = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "wal")
        })
        .count();
    assert!(segments > 10, "{segments} segments");
    let found = contents(dir.path()).await;
    assert_eq!(
        found.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    for (w, mine) in positions.iter().enumerate() {
        for (i, p) in mine.iter().enumerate() {
            assert_eq!(found[p], format!("w{w}-{i}"));
        }
    }
}

/// Callers are answered from a task of the multi-threaded runtime the journal was
/// opened on; once that runtime is gone, from the sync thread, so a journal that
/// outlives its first runtime keeps answering (and every entry is there).
#[test]
fn a_journal_outliving_the_runtime_it_was_opened_on_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let journal = first.block_on(Journal::wal(dir.path()).build()).unwrap();
    first.block_on(journal.record(entry("0"))).unwrap();
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        for i in 1..20 {
            tokio::time::timeout(
                Duration::from_secs(10),
                journal.record(entry(&i.to_string())),
            )
            .await
            .expect("answered within 10 s")
            .unwrap();
        }
    });
    drop(journal);
    let all = second.block_on(contents(dir.path()));
    assert_eq!(all.len(), 20, "{all:?}");
}
