//! One running service per data directory. A second process started on the same
//! directory gets a clear error and changes nothing: the first one's marker and
//! spool stay as they were, and no crash is recorded for the live first process.
//!
//! The test binary re-executes itself as the first service (`holder_child_entry`),
//! which says "ready" on stdout and runs until its stdin closes.

mod support;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sanare::recovery::PreviousOutcome;
use sanare::recovery::spool::RecordSource;
use support::{connect, start};

const DIR: &str = "SANARE_HOLDER_DIR";
const BOOT: &str = "SANARE_HOLDER_BOOT";
const URL: &str = "SANARE_HOLDER_URL";
/// What the first service prints once it runs (after libtest's own words on the
/// same line).
const READY: &str = "sanare-holder-ready";

fn config() -> sanare::SanareConfig {
    let mut config = support::config();
    // No heartbeat during the test: the marker's bytes must not change on their own.
    config.crash_detection.heartbeat_interval = Duration::from_secs(3600);
    config
}

/// In a child: the first service. It catches a panic (so its spool holds a
/// record), says it is ready, and shuts down cleanly when its stdin closes.
/// Ignored in a normal run (it is not a test of its own).
#[test]
#[ignore = "the child process of this file's tests: they run it, it is not a test of its own"]
fn holder_child_entry() {
    let dir = std::env::var(DIR)
        .expect("a child entry: run by this file's tests (with --ignored), not on its own");
    let boot = PathBuf::from(std::env::var(BOOT).unwrap());
    let url = std::env::var(URL).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let sanare = start(&url, Path::new(&dir), &boot, config(), true)
            .await
            .unwrap();
        let caught = std::panic::catch_unwind(|| panic!("a panic the first service caught"));
        assert!(caught.is_err());
        #[allow(clippy::print_stdout)]
        {
            println!("{READY}");
        }
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).unwrap() > 0 {}
        sanare.shutdown().await.unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_data_directory_is_refused_and_changes_nothing() {
    let db = sanare_testing::test_db().await;
    db.client()
        .await
        .batch_execute(support::APP_SQL)
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let boot = tmp.path().join("boot_id");
    std::fs::write(&boot, "eeeeeeee-5555-5555-5555-555555555555\n").unwrap();
    let mut first = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "holder_child_entry",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR, &dir)
        .env(BOOT, &boot)
        .env(URL, db.url())
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read its stdout to the end (it must not write into a closed pipe), and
    // say when it is ready.
    let stdout = first.stdout.take().unwrap();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut ready_tx = Some(ready_tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(READY)
                && let Some(tx) = ready_tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    ready.await.expect("the first service did not start");

    let marker = dir.join("recovery/sanare-shutdown.marker");
    let spool = dir.join("recovery/sanare-crash.spool");
    let marker_before = std::fs::read(&marker).unwrap();
    let spool_before = std::fs::read(&spool).unwrap();
    assert!(
        spool_before.len() > 16,
        "the first service's spool holds its panic"
    );

    // This process is the second one.
    let err = start(db.url(), &dir, &boot, config(), true)
        .await
        .expect_err("a second service on the same data directory");
    let message = err.to_string();
    assert!(matches!(err, sanare::Error::Conflict(_)), "{err:?}");
    assert!(
        message.contains("in use by another running sanare process")
            && message.contains(&format!("pid {}", first.id()))
            && message.contains(&dir.display().to_string()),
        "{message}"
    );
    assert_eq!(
        std::fs::read(&marker).unwrap(),
        marker_before,
        "marker intact"
    );
    assert_eq!(std::fs::read(&spool).unwrap(), spool_before, "spool intact");
    let client = connect(db.url()).await;
    let crashes: i64 = client
        .query_one("SELECT count(*) FROM sanare.crash_records", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        crashes, 0,
        "the live first service is not recorded as a crash"
    );

    // The first one goes on and ends cleanly; then this process may start.
    drop(first.stdin.take());
    let status = tokio::task::spawn_blocking(move || first.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let next = start(db.url(), &dir, &boot, config(), false).await.unwrap();
    assert_eq!(
        next.startup_report().previous_run.outcome,
        PreviousOutcome::Clean
    );
    // The panic the clean first run caught is kept.
    let incidents = next.crashes().incidents(None, None).await.unwrap();
    assert!(
        incidents.iter().any(|i| i.source == RecordSource::Panic
            && i.message.as_deref() == Some("a panic the first service caught")),
        "{incidents:?}"
    );
    next.shutdown().await.unwrap();
}
