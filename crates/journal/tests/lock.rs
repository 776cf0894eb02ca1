//! One writer per WAL directory; readers beside it change nothing.

mod common;

use std::io::Write as _;

use common::entry;
use sanare_core::{Control, Error, JournalPosition, JournalService, ReplayRange, ReplayRequest};
use sanare_journal::{Journal, Query};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_is_refused_and_the_lock_goes_with_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let first = Journal::wal(dir.path()).build().await.unwrap();
    first.record(entry("op", "a")).await.unwrap();
    let started = std::time::Instant::now();
    let err = Journal::wal(dir.path())
        .lock_wait(std::time::Duration::from_millis(300))
        .build()
        .await
        .unwrap_err();
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("open for writing by another process")
            && msg.contains(&std::process::id().to_string()),
        "{msg}"
    );
    // A restart racing the old writer's exit waits for it.
    let waiting = tokio::spawn({
        let dir = dir.path().to_owned();
        async move { Journal::wal(&dir).build().await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    drop(first);
    let again = waiting.await.unwrap().unwrap();
    assert_eq!(again.stats().await.unwrap().entries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_journal_reads_beside_the_writer_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let writer = Journal::wal(dir.path()).build().await.unwrap();
    for i in 0..10 {
        writer
            .record(entry("op", &format!("e{i}")).idempotency_key(format!("k{i}")))
            .await
            .unwrap();
    }
    // An in-flight group: bytes of a record the writer has not finished.
    let active = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .max()
        .unwrap();
    let len_before = std::fs::metadata(&active).unwrap().len();
    let data_end = {
        let bytes = std::fs::read(&active).unwrap();
        bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)
    };
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&active)
            .unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(data_end as u64)).unwrap();
        f.write_all(&[0x53, 0x4a, 0x52, 0x01, 0x00, 0x00, 0x01])
            .unwrap();
    }

    let reader = Journal::wal(dir.path())
        .read_only(true)
        .build()
        .await
        .unwrap();
    assert_eq!(reader.stats().await.unwrap().entries, 10);
    assert_eq!(reader.query(&Query::all()).await.unwrap().len(), 10);
    let v = reader.validate(&Control::detached()).await.unwrap();
    assert!(v.is_ok(), "{v:?}");
    let report = reader.open_report().unwrap();
    assert!(report.truncated_tail.is_none(), "{report:?}");
    assert_eq!(
        std::fs::metadata(&active).unwrap().len(),
        len_before,
        "the read-only open cut nothing"
    );
    // Dry runs work; changes are refused with a reason.
    let dry = reader
        .replay(
            {
                let mut r = ReplayRequest::new(ReplayRange::Positions {
                    from: JournalPosition(1),
                    to: None,
                });
                r.dry_run = true;
                r
            },
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(dry.entries_seen, 10);
    for err in [
        reader.record(entry("op", "x")).await.unwrap_err(),
        reader.compact(&Control::detached()).await.unwrap_err(),
        reader.purge(JournalPosition(5)).await.unwrap_err(),
    ] {
        assert!(err.to_string().contains("read-only"), "{err}");
    }
    drop(reader);
    // The writer never noticed.
    let more = writer.record(entry("op", "after")).await.unwrap();
    assert_eq!(more.position, JournalPosition(11));
}

#[tokio::test]
async fn a_read_only_open_of_a_missing_journal_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = Journal::wal(&missing)
        .read_only(true)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(!missing.exists());
}
