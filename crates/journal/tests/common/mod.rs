//! The conformance suite every journal backend passes.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sanare_core::{Control, JournalPosition, JournalService, ReplayRange, ReplayRequest, Result};
use sanare_journal::{Handler, Journal, JournalEntry, NewEntry, Query};

/// Counts applications per entry id; can cancel a control after N applications.
#[derive(Clone, Default)]
pub struct Counting {
    pub seen: Arc<Mutex<Vec<(u64, String)>>>,
    pub cancel_after: Option<(usize, Control)>,
}

impl Counting {
    pub fn positions(&self) -> Vec<u64> {
        self.seen.lock().unwrap().iter().map(|(p, _)| *p).collect()
    }
    pub fn counts(&self) -> HashMap<u64, usize> {
        let mut m = HashMap::new();
        for p in self.positions() {
            *m.entry(p).or_default() += 1;
        }
        m
    }
}

#[async_trait]
impl Handler for Counting {
    async fn apply(&self, entry: &JournalEntry) -> Result<()> {
        let n = {
            let mut s = self.seen.lock().unwrap();
            s.push((entry.position.0, entry.payload_as::<String>()?));
            s.len()
        };
        if let Some((after, control)) = &self.cancel_after
            && n >= *after
        {
            control.cancel_token().cancel();
        }
        Ok(())
    }
}

/// Writes half a record (a header claiming 100 bytes, then 10 bytes) where the
/// next group of the active segment `seg` would have gone, as a torn write
/// leaves it. Returns (where the data ended, the file's length before).
pub fn tear_after_the_data(seg: &std::path::Path) -> (u64, u64) {
    // The active segment is preallocated: the data ends at the last non-zero byte
    // (a group trailer's end marker), zeros follow.
    let bytes = std::fs::read(seg).unwrap();
    let good_len = bytes.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    assert!(bytes.len() as u64 > good_len, "preallocated");
    let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &f,
        b"SJ\x01\x01\x64\x00\x00\x00\x00\x00\x00\x00abcdefghij",
        good_len,
    )
    .unwrap();
    (good_len, bytes.len() as u64)
}

pub fn entry(op: &str, payload: &str) -> NewEntry {
    NewEntry::new(op, payload).unwrap()
}

/// Ordering, idempotency keys and queries.
pub async fn ordering_idempotency_queries(journal: &Journal) {
    let start = journal.head().await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let j = journal.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..25 {
                let op = if i % 2 == 0 { "even" } else { "odd" };
                out.push(j.record(entry(op, &format!("w{w}-{i}"))).await.unwrap());
            }
            out
        }));
    }
    let mut positions = Vec::new();
    for t in tasks {
        let recs = t.await.unwrap();
        // One writer's entries are in its order.
        assert!(recs.windows(2).all(|w| w[0].position < w[1].position));
        positions.extend(recs.iter().map(|r| r.position.0));
    }
    positions.sort_unstable();
    positions.dedup();
    assert_eq!(positions.len(), 200, "every entry got its own position");
    let head = journal.head().await.unwrap();
    assert_eq!(head.0, start.0 + 200);

    let all = journal.query(&Query::all().after(start)).await.unwrap();
    assert_eq!(all.len(), 200);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    assert!(all.iter().all(JournalEntry::payload_intact));
    let odd = journal
        .query(&Query::all().after(start).operation_types(["odd"]))
        .await
        .unwrap();
    assert_eq!(odd.len(), 8 * 12);
    assert!(odd.iter().all(|e| e.operation_type == "odd"));
    let limited = journal
        .query(&Query::all().after(start).limit(7))
        .await
        .unwrap();
    assert_eq!(limited.len(), 7);
    let future = journal
        .query(&Query::all().time(Some(sanare_core::now() + time::Duration::hours(1)), None))
        .await
        .unwrap();
    assert!(future.is_empty());
    let past = journal
        .query(
            &Query::all()
                .after(start)
                .time(None, Some(sanare_core::now())),
        )
        .await
        .unwrap();
    assert_eq!(past.len(), 200);

    // Idempotency keys: the second recording returns the first entry.
    let a = journal
        .record(entry("pay", "first").idempotency_key("pay-1"))
        .await
        .unwrap();
    let b = journal
        .record(entry("pay", "second").idempotency_key("pay-1"))
        .await
        .unwrap();
    assert!(!a.duplicate);
    assert!(b.duplicate);
    assert_eq!((a.position, a.id), (b.position, b.id));
    // Concurrent duplicates resolve to one entry.
    let recs = futures_util::future::join_all(
        (0..10).map(|i| journal.record(entry("pay", &format!("c{i}")).idempotency_key("pay-2"))),
    )
    .await;
    let firsts: Vec<_> = recs.iter().map(|r| r.as_ref().unwrap().position).collect();
    assert!(firsts.iter().all(|p| *p == firsts[0]));
    assert_eq!(
        recs.iter()
            .filter(|r| !r.as_ref().unwrap().duplicate)
            .count(),
        1
    );
    let pay = journal
        .query(&Query::all().operation_types(["pay"]))
        .await
        .unwrap();
    assert_eq!(pay.len(), 2);
    assert_eq!(pay[0].payload_as::<String>().unwrap(), "first");
}

/// Replay with a plain handler is exactly-once across an interrupted replay.
pub async fn replay_exactly_once(make: impl AsyncFn(Counting) -> Journal) {
    let counting = Counting::default();
    let journal = make(counting.clone()).await;
    let start = journal.head().await.unwrap();
    for i in 0..50 {
        journal.record(entry("op", &format!("e{i}"))).await.unwrap();
    }
    journal.record(entry("other", "x")).await.unwrap();
    let range = ReplayRange::Positions {
        from: JournalPosition(start.0 + 1),
        to: None,
    };

    // Dry run: reports, applies nothing.
    let dry = journal
        .replay(
            ReplayRequest::new(range.clone())
                .operation_types(["op"])
                .dry_run(true),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(dry.applied, 50);
    assert!(dry.dry_run);
    assert!(counting.positions().is_empty());

    // Interrupted replay: cancelled after 20 applications.
    let (control, progress) = Control::new();
    let interrupted = Counting {
        seen: counting.seen.clone(),
        cancel_after: Some((20, control.clone())),
    };
    drop(journal);
    let journal = make(interrupted).await;
    let err = journal
        .replay(
            ReplayRequest::new(range.clone()).operation_types(["op"]),
            &control,
        )
        .await
        .unwrap_err();
    assert!(err.is_cancelled(), "{err}");
    assert!(progress.get().finished);
    let first_run = counting.positions().len();
    assert!((20..50).contains(&first_run), "{first_run}");

    // A second replay applies only the rest.
    drop(journal);
    let journal = make(counting.clone()).await;
    let summary = journal
        .replay(
            ReplayRequest::new(range.clone()).operation_types(["op"]),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(summary.applied as usize, 50 - first_run);
    assert_eq!(summary.already_applied as usize, first_run);
    assert!(summary.failures.is_empty(), "{:?}", summary.failures);
    let counts = counting.counts();
    assert_eq!(counts.len(), 50);
    assert!(
        counts.values().all(|&n| n == 1),
        "applied exactly once: {counts:?}"
    );
    // In order.
    let ps = counting.positions();
    let mut sorted = ps.clone();
    sorted.sort_unstable();
    assert_eq!(ps, sorted);

    // No handler for `other`: reported, not applied.
    let s = journal
        .replay(ReplayRequest::new(range.clone()), &Control::detached())
        .await
        .unwrap();
    assert_eq!(s.already_applied, 50);
    assert_eq!(s.failures.len(), 1);
    assert!(s.failures[0].reason.contains("no handler"));
    assert_eq!(s.last_position, Some(JournalPosition(start.0 + 51)));
}

/// A parallel replay applies every entry once.
pub async fn parallel_replay_applies_everything(make: impl AsyncFn(Counting) -> Journal) {
    let counting = Counting::default();
    let journal = make(counting.clone()).await;
    let start = journal.head().await.unwrap();
    for i in 0..60 {
        journal
            .record(entry("op", &format!("k{}-{i}", i % 3)).idempotency_key(format!("key-{i}")))
            .await
            .unwrap();
    }
    let s = journal
        .replay(
            ReplayRequest::new(ReplayRange::After(sanare_core::JournalCut {
                position: start,
                db_snapshot: None,
            }))
            .parallel(true),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(s.applied, 60);
    assert_eq!(counting.counts().len(), 60);
}

/// A replay `until` a time applies the entries recorded at or before it, and no
/// later one, whatever the range.
pub async fn point_in_time_replay_stops_at_its_time(journal: &Journal, counting: &Counting) {
    let early: Vec<u64> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(
                journal
                    .record(entry("op", &format!("early {i}")))
                    .await
                    .unwrap()
                    .position
                    .0,
            );
        }
        v
    };
    let entries = journal.query(&Query::all()).await.unwrap();
    let at = entries.last().unwrap().recorded_at;
    // Later entries are recorded strictly after `at`.
    while sanare_core::now() <= at {
        tokio::task::yield_now().await;
    }
    for i in 0..3 {
        journal
            .record(entry("op", &format!("late {i}")))
            .await
            .unwrap();
    }
    let s = journal
        .replay(
            ReplayRequest::new(ReplayRange::All).until(at),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(s.applied, 3, "{s:?}");
    assert_eq!(counting.positions(), early);
}
