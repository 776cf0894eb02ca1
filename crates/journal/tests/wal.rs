//! The segment-file WAL backend: conformance suite, crash, torn tail, bit flip,
//! rotation, compaction, retention, archive.

mod common;

use std::path::Path;

use common::{Counting, entry};
use sanare_core::{Control, JournalPosition, JournalService, ReplayRange, ReplayRequest};
use sanare_journal::{Journal, Query};

async fn open(dir: &Path) -> Journal {
    Journal::wal(dir).build().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_ordering_idempotency_queries() {
    let dir = tempfile::tempdir().unwrap();
    let journal = open(dir.path()).await;
    common::ordering_idempotency_queries(&journal).await;
    // Idempotency keys survive a reopen.
    drop(journal);
    let journal = open(dir.path()).await;
    let again = journal
        .record(entry("pay", "third").idempotency_key("pay-1"))
        .await
        .unwrap();
    assert!(again.duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_replay_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    common::replay_exactly_once(async |h: Counting| {
        Journal::wal(&path).handler("op", h).build().await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_parallel_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    common::parallel_replay_applies_everything(async |h: Counting| {
        Journal::wal(&path).handler("op", h).build().await.unwrap()
    })
    .await;
}

fn segment(dir: &Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_truncated_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let journal = open(dir.path()).await;
    for i in 0..3 {
        journal.record(entry("op", &format!("e{i}"))).await.unwrap();
    }
    drop(journal);
    let seg = segment(dir.path());
    let (good_len, file_len) = common::tear_after_the_data(&seg);

    let journal = open(dir.path()).await;
    let report = journal.open_report().unwrap().clone();
    let (name, offset, removed) = report.truncated_tail.expect("torn tail reported");
    assert!(seg.ends_with(&name));
    assert_eq!(offset, good_len);
    assert_eq!(removed, file_len - good_len);
    assert!(report.corrupt.is_empty());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), good_len);
    assert_eq!(journal.head().await.unwrap(), JournalPosition(3));
    let next = journal.record(entry("op", "e3")).await.unwrap();
    assert_eq!(next.position, JournalPosition(4));
    assert!(
        journal
            .validate(&Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flip_in_the_middle_is_isolated_and_never_applied() {
    let dir = tempfile::tempdir().unwrap();
    let journal = open(dir.path()).await;
    for i in 0..3 {
        journal
            .record(entry("op", &format!("payload-number-{i}")))
            .await
            .unwrap();
    }
    drop(journal);
    let seg = segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes
        .windows(16)
        .position(|w| w == b"payload-number-1")
        .unwrap();
    bytes[at + 3] ^= 0x04;
    std::fs::write(&seg, &bytes).unwrap();

    let counting = Counting::default();
    let journal = Journal::wal(dir.path())
        .handler("op", counting.clone())
        .build()
        .await
        .unwrap();
    let report = journal.open_report().unwrap().clone();
    assert_eq!(
        report.truncated_tail, None,
        "damage in the middle is not a torn tail"
    );
    assert_eq!(report.corrupt.len(), 1);
    assert!(report.corrupt[0].reason.contains("checksum"));
    assert!(report.corrupt[0].offset < at as u64);
    let entries = journal.query(&Query::all()).await.unwrap();
    let positions: Vec<u64> = entries.iter().map(|e| e.position.0).collect();
    assert_eq!(
        positions,
        vec![1, 3],
        "the records around the damage stay readable"
    );
    let v = journal.validate(&Control::detached()).await.unwrap();
    assert_eq!(v.problems.len(), 1);

    let s = journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    assert_eq!(s.applied, 2);
    assert_eq!(s.failures.len(), 1);
    assert!(s.failures[0].reason.contains("corrupt"));
    assert_eq!(counting.positions(), vec![1, 3]);
    // New records still append after the highest position.
    assert_eq!(
        journal.record(entry("op", "x")).await.unwrap().position,
        JournalPosition(4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_compaction_retention_and_archive() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::wal(dir.path())
        .segment_size(8 * 1024)
        .build()
        .await
        .unwrap();
    let order = r#"{"order_id":1234,"customer":{"id":77,"email":"c77@example.com"},"status":"paid","lines":[{"product":"widget","qty":2,"price_cents":1999}]}"#;
    for i in 0..300 {
        journal
            .record(entry(
                if i % 3 == 0 { "a" } else { "b" },
                &format!("{order}{i}"),
            ))
            .await
            .unwrap();
    }
    let before = journal.query(&Query::all()).await.unwrap();
    let stats = journal.stats().await.unwrap();
    assert!(stats.segments > 3, "{stats:?}");
    assert_eq!(stats.entries, 300);

    let report = journal.compact(&Control::detached()).await.unwrap();
    assert_eq!(report.segments, stats.segments - 1);
    assert!(report.bytes_after * 3 < report.bytes_before, "{report:?}");
    assert_eq!(journal.query(&Query::all()).await.unwrap(), before);
    let only_a = journal
        .query(&Query::all().operation_types(["a"]))
        .await
        .unwrap();
    assert_eq!(only_a.len(), 100);

    // Reopen reads sealed segments.
    drop(journal);
    let journal = open(dir.path()).await;
    assert_eq!(journal.query(&Query::all()).await.unwrap(), before);

    // Archive a range and read it back; damage is detected.
    let archive = dir.path().join("range.archive");
    let n = journal
        .archive(
            &Query::all()
                .after(JournalPosition(100))
                .to(JournalPosition(200)),
            &archive,
        )
        .await
        .unwrap();
    assert_eq!(n, 100);
    let back = Journal::read_archive(&archive).unwrap();
    assert_eq!(back, before[100..200].to_vec());
    let mut bytes = std::fs::read(&archive).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&archive, &bytes).unwrap();
    assert!(matches!(
        Journal::read_archive(&archive),
        Err(sanare_core::Error::Corrupt { .. })
    ));

    // Retention: whole segments before the retained position go.
    let removed = journal.purge(JournalPosition(150)).await.unwrap();
    assert!(removed > 0);
    let left = journal.query(&Query::all()).await.unwrap();
    assert!(left.first().unwrap().position.0 <= 151);
    assert_eq!(left.last().unwrap().position.0, 300);
    assert!(left.iter().all(|e| e.position.0 > 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_cut_leaves_out_what_was_recorded_within_the_write_ahead_window() {
    let dir = tempfile::tempdir().unwrap();
    // A host that applies changes only by replay: the cut is the durable head.
    let journal = Journal::wal(dir.path())
        .write_ahead_window(std::time::Duration::ZERO)
        .build()
        .await
        .unwrap();
    journal.record(entry("op", "a")).await.unwrap();
    let cut = journal.cut(Some("1:1:")).await.unwrap();
    assert_eq!(cut.position, JournalPosition(1));
    assert_eq!(cut.db_snapshot, None);
    let tx_err = journal
        .record(sanare_journal::NewEntry::from_bytes("", vec![]))
        .await;
    assert!(matches!(tx_err, Err(sanare_core::Error::InvalidInput(_))));
    drop(journal);
    // The default window (60 s): an entry recorded a moment ago may belong to a
    // host transaction that has not committed, so the cut stays before it, also
    // after a reopen.
    let journal = open(dir.path()).await;
    assert_eq!(
        journal.cut(None).await.unwrap().position,
        JournalPosition(0)
    );
    journal.record(entry("op", "b")).await.unwrap();
    assert_eq!(
        journal.cut(None).await.unwrap().position,
        JournalPosition(0)
    );
}

fn drain(sub: &mut sanare_core::EventSubscription) -> Vec<sanare_core::Event> {
    std::iter::from_fn(|| sub.try_recv().map(|r| r.event)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_batches_compaction_and_replay_publish_events() {
    use sanare_core::{Event, EventBus};
    let dir = tempfile::tempdir().unwrap();
    let bus = EventBus::default();
    let mut sub = bus.subscribe();
    let journal = Journal::wal(dir.path())
        .events(bus.clone())
        .handler("op", sanare_journal::NoopHandler)
        .build()
        .await
        .unwrap();
    for i in 0..5 {
        journal.record(entry("op", &format!("e{i}"))).await.unwrap();
    }
    // An idempotent repeat records nothing and publishes nothing.
    journal
        .record(entry("op", "k").idempotency_key("k"))
        .await
        .unwrap();
    journal
        .record(entry("op", "k").idempotency_key("k"))
        .await
        .unwrap();
    let recorded: Vec<(u64, Option<JournalPosition>, Option<JournalPosition>)> = drain(&mut sub)
        .into_iter()
        .map(|e| match e {
            Event::JournalRecorded {
                entries,
                first_position,
                last_position,
            } => (entries, first_position, last_position),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(recorded.iter().map(|r| r.0).sum::<u64>(), 6);
    assert_eq!(recorded[0].1, Some(JournalPosition(1)));
    assert_eq!(recorded.last().unwrap().2, Some(JournalPosition(6)));

    journal.rotate().await.unwrap();
    let report = journal.compact(&Control::detached()).await.unwrap();
    assert!(drain(&mut sub).contains(&Event::JournalCompacted {
        segments: report.segments,
        bytes_before: report.bytes_before,
        bytes_after: report.bytes_after,
    }));
    assert_eq!(report.segments, 1);

    journal
        .replay(
            sanare_core::ReplayRequest::new(sanare_core::ReplayRange::All),
            &Control::detached(),
        )
        .await
        .unwrap();
    assert!(drain(&mut sub).iter().any(|e| matches!(
        e,
        Event::JournalReplayed {
            applied: 6,
            dry_run: false,
            ..
        }
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_segments_have_index_files_rebuilt_when_missing_or_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let build = || Journal::wal(dir.path()).segment_size(4096).build();
    let journal = build().await.unwrap();
    let mut paid = Vec::new();
    for i in 0..120 {
        let op = if i % 3 == 0 {
            "order.paid"
        } else {
            "order.placed"
        };
        let r = journal.record(entry(op, &format!("o{i}"))).await.unwrap();
        if op == "order.paid" {
            paid.push(r.position);
        }
    }
    journal.rotate().await.unwrap();
    journal.compact(&Control::detached()).await.unwrap();
    drop(journal);
    // Sealing writes each segment's index (reopening too, for one not there yet).
    let journal = build().await.unwrap();
    let mut idx: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "idx"))
        .collect();
    idx.sort();
    assert!(idx.len() >= 3, "{idx:?}");
    let originals: Vec<Vec<u8>> = idx.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let by_type = |j: &Journal| {
        let j = j.clone();
        async move {
            j.query(&Query::all().operation_types(["order.paid"]))
                .await
                .unwrap()
                .iter()
                .map(|e| e.position)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(by_type(&journal).await, paid);
    drop(journal);

    // One index damaged, one missing, one of another segment: all rebuilt as before.
    let mut damaged = originals[0].clone();
    damaged[40] ^= 0x10;
    std::fs::write(&idx[0], &damaged).unwrap();
    std::fs::remove_file(&idx[1]).unwrap();
    std::fs::write(&idx[2], &originals[0]).unwrap();
    // The first query that needs them rebuilds them.
    let journal = build().await.unwrap();
    assert_eq!(by_type(&journal).await, paid);
    for (p, original) in idx.iter().zip(&originals) {
        assert_eq!(&std::fs::read(p).unwrap(), original, "{}", p.display());
    }
    assert_eq!(by_type(&journal).await, paid);
    let in_time = journal
        .query(&Query::all().time(Some(time::OffsetDateTime::now_utc()), None))
        .await
        .unwrap();
    assert!(in_time.is_empty());
}
