//! Invariants of the WAL that hold through rotation, purge, compaction, restart and
//! restore, and the async hygiene of its blocking work.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Counting, entry};
use sanare_core::{
    Control, JournalCut, JournalPosition, JournalService, ReplayRange, ReplayRequest,
};
use sanare_fs::{File, LockGuard, OpenMode, OsStorage, Storage};
use sanare_journal::{Journal, Query};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_strictly_increase_across_rotation_purge_compaction_archive_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let build = || Journal::wal(dir.path()).segment_size(4096).build();
    let journal = build().await.unwrap();
    let last = AtomicU64::new(0);
    let record = async |j: &Journal, n: usize| {
        for i in 0..n {
            let p = j
                .record(entry("op", &format!("e{i}")))
                .await
                .unwrap()
                .position
                .0;
            let before = last.swap(p, Ordering::SeqCst);
            assert!(p > before, "{p} after {before}");
        }
        last.load(Ordering::SeqCst)
    };
    let last = record(&journal, 60).await;
    journal.rotate().await.unwrap();
    journal.compact(&Control::detached()).await.unwrap();
    journal
        .archive(&Query::all(), &dir.path().join("all.archive"))
        .await
        .unwrap();
    // Every sealed segment goes; only the empty active one is left.
    journal.purge(JournalPosition(last)).await.unwrap();
    assert!(journal.query(&Query::all()).await.unwrap().is_empty());
    drop(journal);
    let journal = build().await.unwrap();
    assert_eq!(journal.head().await.unwrap(), JournalPosition(last));
    let last = record(&journal, 5).await;
    // Again with entries in the active segment purged by rotation first.
    journal.rotate().await.unwrap();
    journal.purge(JournalPosition(last)).await.unwrap();
    drop(journal);
    let journal = build().await.unwrap();
    assert_eq!(record(&journal, 1).await, last + 1);
    assert_eq!(last, 65);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_reopens_exactly_the_entries_after_its_cut() {
    let dir = tempfile::tempdir().unwrap();
    let counting = Counting::default();
    let build = || {
        Journal::wal(dir.path())
            .handler("op", counting.clone())
            .build()
    };
    let journal = build().await.unwrap();
    for i in 1..=10 {
        journal.record(entry("op", &format!("e{i}"))).await.unwrap();
    }
    let cut = |p| JournalCut {
        position: JournalPosition(p),
        db_snapshot: None,
    };
    let replay = async |j: &Journal, c: JournalCut| {
        j.replay(
            ReplayRequest::new(ReplayRange::After(c)),
            &Control::detached(),
        )
        .await
        .unwrap()
    };
    // Restore + replay from the cut at 4: 5..=10 applied and marked.
    let s = replay(&journal, cut(4)).await;
    assert_eq!(s.applied, 6);
    // A second restore to the same snapshot undoes them again: they reopen.
    counting.seen.lock().unwrap().clear();
    assert_eq!(journal.reopen_after(&cut(4)).await.unwrap(), 6);
    let s = replay(&journal, cut(4)).await;
    assert_eq!((s.applied, s.already_applied), (6, 0));
    assert_eq!(counting.positions(), (5..=10).collect::<Vec<_>>());
    // Exactly once: a replay after a crash in between applies nothing twice.
    let s = replay(&journal, cut(4)).await;
    assert_eq!((s.applied, s.already_applied), (0, 6));
    // A restore of an older snapshot, then a restart before its replay: the
    // reopened entries stay reopened, the ones before the cut stay applied.
    counting.seen.lock().unwrap().clear();
    journal.reopen_after(&cut(2)).await.unwrap();
    drop(journal);
    let journal = build().await.unwrap();
    let s = journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    // 1 and 2 were never applied by a replay (the host applied them): they are
    // applied now, once; 3..=10 reopened.
    assert_eq!((s.applied, s.already_applied), (10, 0));
    let s = journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    assert_eq!((s.applied, s.already_applied), (0, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_of_purged_entries_are_pruned_and_the_rest_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let counting = Counting::default();
    let build = || {
        Journal::wal(dir.path())
            .segment_size(4096)
            .handler("op", counting.clone())
            .build()
    };
    let journal = build().await.unwrap();
    for i in 0..200 {
        journal.record(entry("op", &format!("e{i}"))).await.unwrap();
    }
    journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    let marks = dir.path().join("applied.marks");
    let before = std::fs::metadata(&marks).unwrap().len();
    journal.purge(JournalPosition(150)).await.unwrap();
    let after = std::fs::metadata(&marks).unwrap().len();
    assert!(after < 100 && after < before, "{before} -> {after} bytes");
    drop(journal);
    let journal = build().await.unwrap();
    let s = journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    assert_eq!(s.applied, 0, "the marks of the entries left are kept");
    assert!(s.already_applied > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_purge_never_fail_a_concurrent_reader() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::wal(dir.path())
        .segment_size(4096)
        .replay_batch(7)
        .handler("op", sanare_journal::NoopHandler)
        .build()
        .await
        .unwrap();
    for i in 0..600 {
        journal
            .record(entry("op", &format!("entry {i}")))
            .await
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..3 {
        let (journal, stop) = (journal.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut rounds = 0u64;
            while !stop.load(Ordering::SeqCst) || rounds == 0 {
                let found = if r == 0 {
                    journal.query(&Query::all()).await.unwrap()
                } else {
                    let req = ReplayRequest::new(ReplayRange::All).dry_run(true);
                    journal.replay(req, &Control::detached()).await.unwrap();
                    journal
                        .query(&Query::all().operation_types(["op"]))
                        .await
                        .unwrap()
                };
                assert!(found.windows(2).all(|w| w[0].position < w[1].position));
                rounds += 1;
            }
            rounds
        }));
    }
    for step in 0..20u64 {
        for i in 0..20 {
            journal
                .record(entry("op", &format!("more {step}-{i}")))
                .await
                .unwrap();
        }
        journal.rotate().await.unwrap();
        journal.compact(&Control::detached()).await.unwrap();
        journal.purge(JournalPosition(step * 30)).await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        assert!(r.await.unwrap() > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_compacted_segment_loses_the_damaged_records_not_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    // Sealed segments of about 300 KiB: several compressed blocks each.
    let build = || Journal::wal(dir.path()).segment_size(300 << 10).build();
    let journal = build().await.unwrap();
    let total = 3000u64;
    for i in 0..total {
        let payload = format!("entry {i:06} {}", "order line, ".repeat(10));
        journal.record(entry("op", &payload)).await.unwrap();
    }
    journal.rotate().await.unwrap();
    journal.compact(&Control::detached()).await.unwrap();
    drop(journal);
    let mut sealed: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "walz"))
        .collect();
    sealed.sort();
    assert!(sealed.len() >= 2, "{sealed:?}");
    let victim = &sealed[0];
    let mut bytes = std::fs::read(victim).unwrap();
    // Damage the middle of the middle block's compressed bytes (docs/formats.md:
    // a 32-byte header with the block count at 24, then per block a 28-byte header
    // with the compressed length at 16). A flip near the end of a block's stream
    // can leave every record of it intact (the decoder has produced them all when
    // it fails), which this test is not about: here records must be lost.
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let mut payloads = Vec::new();
    let mut at = 32;
    for _ in 0..le32(&bytes, 24) {
        let len = le32(&bytes, at + 16) as usize;
        payloads.push((at + 28, len));
        at += 28 + len;
    }
    let (start, len) = payloads[payloads.len() / 2];
    assert!(len >= 64, "{payloads:?}");
    for b in &mut bytes[start + len / 2..start + len / 2 + 8] {
        *b ^= 0xFF;
    }
    std::fs::write(victim, &bytes).unwrap();

    // Opening reads summaries, not sealed segments: validation finds the damage.
    let journal = build().await.unwrap();
    let victim_name = victim.file_name().unwrap().to_string_lossy().into_owned();
    let v = journal.validate(&Control::detached()).await.unwrap();
    assert!(!v.problems.is_empty(), "{v:?}");
    assert!(v.problems.iter().all(|c| c.segment == victim_name), "{v:?}");
    let base = |p: &std::path::PathBuf| -> u64 {
        p.file_stem().unwrap().to_string_lossy().parse().unwrap()
    };
    let (from, to) = (base(victim), base(&sealed[1]));
    let left = journal.query(&Query::all()).await.unwrap();
    let kept: std::collections::BTreeSet<u64> = left.iter().map(|e| e.position.0).collect();
    let lost: Vec<u64> = (1..=total).filter(|p| !kept.contains(p)).collect();
    assert!(!lost.is_empty());
    // Only records of the damaged block are lost: the segment's other blocks,
    // and every other segment, read back whole.
    assert!(
        lost.iter().all(|p| (from..to).contains(p)),
        "lost {lost:?}, the damaged segment held {from}..{to}"
    );
    let victim_entries = to - from;
    assert!(
        (lost.len() as u64) * 2 < victim_entries,
        "lost {} of the segment's {victim_entries} entries",
        lost.len()
    );
    assert_eq!(
        journal.record(entry("op", "next")).await.unwrap().position,
        JournalPosition(total + 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_in_time_replay_stops_at_its_time_on_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let counting = Counting::default();
    let journal = Journal::wal(dir.path())
        .handler("op", counting.clone())
        .build()
        .await
        .unwrap();
    common::point_in_time_replay_stops_at_its_time(&journal, &counting).await;
}

/// Once armed, makes a file open wait until the runtime's timer has fired a few
/// more times: an open on the runtime's own thread waits in vain and fails.
struct NeedsTheTimer {
    ticks: Arc<AtomicU64>,
    armed: Arc<AtomicBool>,
}

impl NeedsTheTimer {
    fn wait_for_ticks(&self) -> std::io::Result<()> {
        if !self.armed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let start = self.ticks.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.ticks.load(Ordering::SeqCst) < start + 3 {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(
                    "the runtime's timer stopped: journal I/O ran on the runtime thread",
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

/// The OS storage, with every `open` going through a hook first (to delay or
/// count reads).
struct Hooked<F>(F);

impl<F> std::fmt::Debug for Hooked<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooked")
    }
}

impl<F> Storage for Hooked<F>
where
    F: Fn(&Path, Arc<dyn File>) -> std::io::Result<Arc<dyn File>> + Send + Sync,
{
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Arc<dyn File>> {
        (self.0)(path, OsStorage.open(path, mode)?)
    }
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        OsStorage.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        OsStorage.list(dir)
    }
    fn exists(&self, path: &Path) -> std::io::Result<bool> {
        OsStorage.exists(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        OsStorage.sync_dir(dir)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        OsStorage.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        OsStorage.remove_file(path)
    }
    fn try_lock(&self, path: &Path) -> std::io::Result<Option<LockGuard>> {
        OsStorage.try_lock(path)
    }
}

#[tokio::test(flavor = "current_thread")]
async fn journal_scans_stay_off_a_current_thread_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let ticks = Arc::new(AtomicU64::new(0));
    let armed = Arc::new(AtomicBool::new(false));
    let gate = NeedsTheTimer {
        ticks: ticks.clone(),
        armed: armed.clone(),
    };
    let storage = Hooked(move |_: &Path, f: Arc<dyn File>| {
        gate.wait_for_ticks()?;
        Ok(f)
    });
    let journal = Journal::wal(dir.path())
        .storage(Arc::new(storage))
        .segment_size(4096)
        .handler("op", sanare_journal::NoopHandler)
        .build()
        .await
        .unwrap();
    for i in 0..100 {
        journal.record(entry("op", &format!("e{i}"))).await.unwrap();
    }
    journal.rotate().await.unwrap();
    let ticker = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(1));
        loop {
            every.tick().await;
            ticks.fetch_add(1, Ordering::SeqCst);
        }
    });
    armed.store(true, Ordering::SeqCst);
    assert_eq!(journal.query(&Query::all()).await.unwrap().len(), 100);
    assert_eq!(journal.stats().await.unwrap().entries, 100);
    assert!(
        journal
            .validate(&Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
    journal.compact(&Control::detached()).await.unwrap();
    let s = journal
        .replay(ReplayRequest::new(ReplayRange::All), &Control::detached())
        .await
        .unwrap();
    assert_eq!(s.applied, 100);
    ticker.abort();
}

/// Counts reads of sealed segment files (`.wal` other than the newest, `.walz`).
#[derive(Debug, Default)]
struct CountingReads {
    sealed_reads: AtomicU64,
    newest: std::sync::Mutex<Option<std::path::PathBuf>>,
}

/// A file whose reads are counted.
#[derive(Debug)]
struct Counted(Arc<dyn File>, Arc<CountingReads>);

impl File for Counted {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.1.sealed_reads.fetch_add(1, Ordering::SeqCst);
        self.0.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&self) -> std::io::Result<()> {
        self.0.sync_all()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_reads_summaries_not_sealed_segments_and_keeps_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let build = |storage: Arc<dyn Storage>| {
        Journal::wal(dir.path())
            .segment_size(4096)
            .storage(storage)
            .build()
    };
    let journal = build(sanare_fs::os()).await.unwrap();
    for i in 0..300 {
        journal
            .record(entry("op", &format!("entry {i}")).idempotency_key(format!("key-{i}")))
            .await
            .unwrap();
    }
    journal.rotate().await.unwrap();
    journal.compact(&Control::detached()).await.unwrap();
    drop(journal);
    // Once more, so that the summaries written in the background are there.
    let journal = build(sanare_fs::os()).await.unwrap();
    let all = journal.query(&Query::all()).await.unwrap();
    drop(journal);

    let counting = Arc::new(CountingReads::default());
    let newest = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .max()
        .unwrap();
    *counting.newest.lock().unwrap() = Some(newest);
    let count = counting.clone();
    let storage = Hooked(move |path: &Path, f: Arc<dyn File>| {
        let is_segment = path.extension().is_some_and(|e| e == "wal" || e == "walz");
        if is_segment && count.newest.lock().unwrap().as_deref() != Some(path) {
            return Ok(Arc::new(Counted(f, count.clone())) as Arc<dyn File>);
        }
        Ok(f)
    });
    let journal = build(Arc::new(storage)).await.unwrap();
    assert_eq!(
        counting.sealed_reads.load(Ordering::SeqCst),
        0,
        "opening decoded sealed segments"
    );
    assert_eq!(journal.open_report().unwrap().entries, 300);
    assert_eq!(journal.head().await.unwrap(), JournalPosition(300));
    // Keys of sealed segments are still known.
    let again = journal
        .record(entry("op", "again").idempotency_key("key-3"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.position, JournalPosition(4));
    assert_eq!(journal.query(&Query::all()).await.unwrap(), all);
}
