//! Entries acknowledged before a SIGKILL survive it.
//!
//! A test binary without the libtest harness, so that its child half is not a
//! test of its own: run with `SANARE_JOURNAL_CRASH_DIR` set, it is the child that
//! records forever and prints each durable position; run plainly, it is the
//! parent (one test, through `libtest-mimic`) that starts the child, kills it
//! mid-write and checks the journal.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use sanare_core::{Control, JournalService};
use sanare_journal::{Journal, NewEntry, Query};

fn main() -> std::process::ExitCode {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime")
    };
    if let Ok(dir) = std::env::var("SANARE_JOURNAL_CRASH_DIR") {
        runtime().block_on(child(Path::new(&dir)));
        return std::process::ExitCode::SUCCESS;
    }
    // The parent speaks the test harness's protocol (`--list`, filters, `--exact`),
    // so cargo test and cargo nextest list and run it like any other test.
    let args = libtest_mimic::Arguments::from_args();
    let tests = vec![libtest_mimic::Trial::test(
        "entries_acknowledged_before_a_sigkill_survive",
        move || {
            runtime().block_on(entries_acknowledged_before_a_sigkill_survive());
            Ok(())
        },
    )];
    libtest_mimic::run(&args, tests).exit_code()
}

/// Records forever, printing each durable position.
async fn child(dir: &Path) {
    let journal = Journal::wal(dir).build().await.expect("open the journal");
    let mut out = std::io::stdout();
    for i in 0u64.. {
        let r = journal
            .record(NewEntry::new("op", &format!("c{i}")).expect("an entry"))
            .await
            .expect("record");
        writeln!(out, "durable {}", r.position.0).expect("stdout");
        out.flush().expect("stdout");
    }
}

async fn entries_acknowledged_before_a_sigkill_survive() {
    let dir = tempfile::tempdir().expect("a directory");
    let mut child = Command::new(std::env::current_exe().expect("this binary"))
        .env("SANARE_JOURNAL_CRASH_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the child");
    let mut lines = BufReader::new(child.stdout.take().expect("its stdout")).lines();
    let mut acked = 0u64;
    while acked < 300 {
        let line = lines
            .next()
            .expect("the child prints until it is killed")
            .expect("a line");
        if let Some(p) = line.strip_prefix("durable ") {
            acked = p.parse().expect("a position");
        }
    }
    child.kill().expect("SIGKILL, mid-write");
    child.wait().expect("the child ends");

    let journal = Journal::wal(dir.path()).build().await.expect("reopen");
    let report = journal.open_report().expect("a WAL report");
    assert!(report.corrupt.is_empty(), "{report:?}");
    let head = journal.head().await.expect("the head");
    assert!(head.0 >= acked, "acknowledged {acked}, recovered {head}");
    let all = journal.query(&Query::all()).await.expect("a query");
    assert_eq!(all.len() as u64, head.0);
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, e)| e.position.0 == i as u64 + 1)
    );
    let v = journal
        .validate(&Control::detached())
        .await
        .expect("validate");
    assert!(v.is_ok(), "{v:?}");
}
