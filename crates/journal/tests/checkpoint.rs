//! Checkpoints of the active segment: opening decodes only what follows one, and
//! finds exactly what decoding the whole segment finds (entries, idempotency keys,
//! torn tails, damage); a checkpoint that does not fit the segment is ignored.

mod common;

use std::path::Path;

use common::entry;
use sanare_core::{Control, JournalPosition, JournalService};
use sanare_journal::{Journal, OpenReport, Query};

async fn open(dir: &Path) -> Journal {
    Journal::wal(dir).build().await.unwrap()
}

/// A journal of 50 keyed entries, checkpointed, then 5 more.
async fn checkpointed(dir: &Path) {
    let journal = open(dir).await;
    for i in 0..50 {
        journal
            .record(entry("op", &format!("before-{i}")).idempotency_key(format!("k-{i}")))
            .await
            .unwrap();
    }
    journal.checkpoint().await.unwrap();
    for i in 50..55 {
        journal
            .record(entry("op", &format!("after-{i}")).idempotency_key(format!("k-{i}")))
            .await
            .unwrap();
    }
}

fn file_with_ext(dir: &Path, ext: &str) -> std::path::PathBuf {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| panic!("no .{ext} file"))
}

/// A copy of `src` in `dst`, without checkpoints when `checkpoints` is false.
fn copy_dir(src: &Path, dst: &Path, checkpoints: bool) {
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if !checkpoints && p.extension().is_some_and(|e| e == "ckpt") {
            continue;
        }
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
}

/// What an open found, and every entry (position, payload).
async fn outcome(dir: &Path) -> (OpenReport, JournalPosition, Vec<(u64, Vec<u8>)>) {
    let journal = open(dir).await;
    let report = journal.open_report().unwrap().clone();
    let entries = journal
        .query(&Query::all())
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.position.0, e.payload))
        .collect();
    (report, journal.head().await.unwrap(), entries)
}

/// Opens copies of `dir` with and without its checkpoint: both find the same.
/// Returns the report of the open that used the checkpoint.
async fn same_as_a_whole_decode(dir: &Path) -> OpenReport {
    let (with, without) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    copy_dir(dir, with.path(), true);
    copy_dir(dir, without.path(), false);
    let (mut a, head_a, entries_a) = outcome(with.path()).await;
    let (b, head_b, entries_b) = outcome(without.path()).await;
    assert!(a.resumed_at.is_some(), "the checkpoint was used: {a:?}");
    assert_eq!(b.resumed_at, None);
    let resumed = a.clone();
    a.resumed_at = None;
    assert_eq!(a, b);
    assert_eq!((head_a, entries_a), (head_b, entries_b));
    resumed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_decodes_only_what_follows_the_checkpoint_and_remembers_every_key() {
    let dir = tempfile::tempdir().unwrap();
    checkpointed(dir.path()).await;
    let report = same_as_a_whole_decode(dir.path()).await;
    assert_eq!(report.entries, 55);

    let journal = open(dir.path()).await;
    let report = journal.open_report().unwrap().clone();
    let seg_len = std::fs::metadata(file_with_ext(dir.path(), "wal"))
        .unwrap()
        .len();
    let at = report.resumed_at.expect("resumed from the checkpoint");
    assert!(at > 24 && at < seg_len, "{at} within the segment");
    assert_eq!(journal.head().await.unwrap(), JournalPosition(55));
    // Keys of the checkpointed prefix (read by the key loader from the segment)
    // and of the tail (decoded on open) are both remembered.
    for (key, position) in [("k-3", 4), ("k-49", 50), ("k-52", 53)] {
        let again = journal
            .record(entry("op", "again").idempotency_key(key))
            .await
            .unwrap();
        assert!(again.duplicate, "{key}");
        assert_eq!(again.position, JournalPosition(position), "{key}");
    }
    let next = journal.record(entry("op", "new")).await.unwrap();
    assert_eq!(next.position, JournalPosition(56));
    assert!(
        journal
            .validate(&Control::detached())
            .await
            .unwrap()
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_and_damage_after_the_checkpoint_are_found_as_without_it() {
    // A torn group after the data: cut off as a tail.
    let dir = tempfile::tempdir().unwrap();
    checkpointed(dir.path()).await;
    let (good_len, _) = common::tear_after_the_data(&file_with_ext(dir.path(), "wal"));
    let report = same_as_a_whole_decode(dir.path()).await;
    let (_, offset, _) = report.truncated_tail.expect("torn tail reported");
    assert_eq!(offset, good_len);
    assert_eq!(report.entries, 55);

    // A flipped bit in a durable group after the checkpoint: isolated, reported.
    let dir = tempfile::tempdir().unwrap();
    checkpointed(dir.path()).await;
    let seg = file_with_ext(dir.path(), "wal");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes
        .windows(8)
        .rposition(|w| w == b"after-52")
        .expect("entry 53's payload");
    bytes[at] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    let report = same_as_a_whole_decode(dir.path()).await;
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    assert_eq!(report.entries, 54);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_foreign_checkpoint_is_ignored() {
    // Damaged: fails its checksum.
    let dir = tempfile::tempdir().unwrap();
    checkpointed(dir.path()).await;
    let ckpt = file_with_ext(dir.path(), "ckpt");
    let mut bytes = std::fs::read(&ckpt).unwrap();
    bytes[50] ^= 1;
    std::fs::write(&ckpt, &bytes).unwrap();
    let (report, head, entries) = outcome(dir.path()).await;
    assert_eq!(report.resumed_at, None);
    assert_eq!((report.entries, head), (55, JournalPosition(55)));
    assert_eq!(entries.len(), 55);

    // Foreign: a valid checkpoint of another journal's segment of the same base,
    // whose offset is not the end of a group here (other payload lengths).
    let other = tempfile::tempdir().unwrap();
    let journal = open(other.path()).await;
    for i in 0..7 {
        journal
            .record(entry(
                "op",
                &format!("a longer payload than the others {i}"),
            ))
            .await
            .unwrap();
    }
    journal.checkpoint().await.unwrap();
    drop(journal);
    let dir = tempfile::tempdir().unwrap();
    checkpointed(dir.path()).await;
    std::fs::copy(
        file_with_ext(other.path(), "ckpt"),
        file_with_ext(dir.path(), "ckpt"),
    )
    .unwrap();
    let (report, head, entries) = outcome(dir.path()).await;
    assert_eq!(report.resumed_at, None);
    assert_eq!((report.entries, head), (55, JournalPosition(55)));
    assert_eq!(entries.len(), 55);
}
