//! Real crashes of child processes, classified at the next start.
//!
//! The test binary re-executes itself (`current_exe`) running only
//! `crash_child_entry`, with `SANARE_CRASH_MODE` naming how the child dies.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sanare_core::{CrashKind, Event, EventBus};
use sanare_recovery::{
    CrashDetector, CrashStore, HandlerOptions, PreviousOutcome, SanareAllocator, spawn_supervised,
};

#[global_allocator]
static GLOBAL: SanareAllocator = SanareAllocator::system();

const MODE: &str = "SANARE_CRASH_MODE";
const DIR: &str = "SANARE_CRASH_DIR";
const BOOT: &str = "SANARE_CRASH_BOOT";

fn detector(dir: &Path, boot: &Path) -> CrashDetector {
    CrashDetector::builder()
        .data_dir(dir)
        .boot_id_path(boot)
        .version("test")
        .build()
        .unwrap()
}

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let buf = [depth as u8; 1024];
    std::hint::black_box(&buf);
    if depth == u64::MAX {
        return 0;
    }
    recurse(depth + 1) + u64::from(std::hint::black_box(buf[7]))
}

fn run_child(mode: &str) {
    let dir = PathBuf::from(std::env::var_os(DIR).unwrap());
    let boot = PathBuf::from(std::env::var_os(BOOT).unwrap());
    let d = detector(&dir, &boot);
    d.mark_running().unwrap();
    d.install_handlers(HandlerOptions::default()).unwrap();
    match mode {
        "clean" => {
            d.mark_clean_shutdown().unwrap();
            std::process::exit(0);
        }
        "panic_main" => panic!("child panics on its main thread"),
        "panic_thread" => {
            let r = std::thread::Builder::new()
                .name("worker-7".into())
                .spawn(|| panic!("child panics on a worker thread"))
                .unwrap()
                .join();
            assert!(r.is_err());
            std::process::exit(3);
        }
        "task_panic" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let r = rt.block_on(async {
                spawn_supervised("billing", async { panic!("task panics") })
                    .await
                    .unwrap()
            });
            let _: () = r.unwrap_err().try_into_panic().map(|_| ()).unwrap();
            std::process::exit(4);
        }
        "abort" => std::process::abort(),
        "segv" => {
            // A real fault: a write into a PROT_NONE page.
            // SAFETY: mapping an inaccessible page and touching it is the point.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                std::ptr::write_volatile(p.cast::<u8>(), 1);
            }
            unreachable!("the write faults");
        }
        "stack_overflow" => {
            let t = std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(|| recurse(0))
                .unwrap();
            let _ = t.join();
            unreachable!("the thread overflows its stack");
        }
        "alloc" => {
            // SAFETY: lowering our own address-space limit.
            unsafe {
                let lim = libc::rlimit {
                    rlim_cur: 4 << 30,
                    rlim_max: libc::RLIM_INFINITY,
                };
                assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &lim), 0);
            }
            let v: Vec<u8> = vec![0u8; 8 << 30];
            std::hint::black_box(&v);
            unreachable!("the allocation fails");
        }
        "workload" => {
            workload_child(&std::env::var("SANARE_WORKLOAD_URL").unwrap());
            unreachable!("the workload kills itself");
        }
        "caught_then_power" => {
            // A panic the run catches, a heartbeat after it (the run went on), then
            // the host loses power (SIGKILL here, a new boot id in the parent).
            d.start_heartbeat(Duration::from_millis(20)).unwrap();
            let r = std::panic::catch_unwind(|| panic!("a caught panic"));
            assert!(r.is_err());
            wait_for_heartbeat_after(&d, now_ms());
            // SAFETY: killing ourselves.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            unreachable!("SIGKILL ends the process");
        }
        "try_reserve_then_kill" => {
            // An allocation failure the run handles, a heartbeat, then kill -9.
            d.start_heartbeat(Duration::from_millis(20)).unwrap();
            let mut v: Vec<u8> = Vec::new();
            assert!(v.try_reserve(1 << 46).is_err(), "64 TiB is refused");
            assert!(sanare_recovery::allocation_failed());
            wait_for_heartbeat_after(&d, now_ms());
            // SAFETY: killing ourselves.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            unreachable!("SIGKILL ends the process");
        }
        "clean_after_caught_panic" => {
            let r = std::panic::catch_unwind(|| panic!("a panic the clean run caught"));
            assert!(r.is_err());
            d.mark_clean_shutdown().unwrap();
            std::process::exit(0);
        }
        "sigkill" | "power" => {
            // SAFETY: killing ourselves.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            std::thread::sleep(Duration::from_secs(10));
            unreachable!("SIGKILL ends the process");
        }
        other => panic!("unknown crash mode {other}"),
    }
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Waits (up to 20 s) until the heartbeat thread has written a heartbeat later
/// than `after`: the incident's grace period has passed and the run is alive.
fn wait_for_heartbeat_after(d: &CrashDetector, after: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(d.marker_path()).unwrap();
        let beat = sanare_recovery::Marker::decode(&text)
            .unwrap()
            .heartbeat_unix_ms;
        if beat.is_some_and(|b| b > after) {
            return;
        }
        assert!(Instant::now() < deadline, "no heartbeat after {after}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// In a child: dies as `SANARE_CRASH_MODE` says. Run normally: a clean run is seen as clean.
#[test]
fn crash_child_entry() {
    if let Ok(mode) = std::env::var(MODE) {
        run_child(&mode);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("boot_id");
    std::fs::write(&boot, "boot-a\n").unwrap();
    let d = detector(&dir.path().join("data"), &boot);
    assert_eq!(
        d.detect_previous_run().unwrap().outcome,
        PreviousOutcome::FirstRun
    );
    d.mark_running().unwrap();
    d.mark_clean_shutdown().unwrap();
    assert_eq!(
        d.detect_previous_run().unwrap().outcome,
        PreviousOutcome::Clean
    );
}

struct Child {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    boot: PathBuf,
    status: std::process::ExitStatus,
}

fn crash_child(mode: &str) -> Child {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let boot = tmp.path().join("boot_id");
    std::fs::write(&boot, "11111111-1111-1111-1111-111111111111\n").unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MODE, mode)
        .env(DIR, &data)
        .env(BOOT, &boot)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    if mode.ends_with("power") {
        std::fs::write(&boot, "22222222-2222-2222-2222-222222222222\n").unwrap();
    }
    Child {
        _tmp: tmp,
        data,
        boot,
        status: out.status,
    }
}

fn expected(mode: &str) -> Option<CrashKind> {
    Some(match mode {
        "clean" => return None,
        "stack_overflow" => CrashKind::StackOverflow,
        "alloc" => CrashKind::OutOfMemory,
        "power" => CrashKind::PowerFailure,
        _ => CrashKind::ApplicationCrash,
    })
}

#[test]
fn crash_matrix_classifies_every_child() {
    use std::os::unix::process::ExitStatusExt;
    let modes = [
        "clean",
        "panic_main",
        "panic_thread",
        "task_panic",
        "abort",
        "segv",
        "stack_overflow",
        "alloc",
        "sigkill",
        "power",
    ];
    let mut right = 0;
    let mut total = 0;
    let mut wrong = Vec::new();
    let mut slowest = Duration::ZERO;
    for mode in modes {
        for _ in 0..5 {
            let child = crash_child(mode);
            let d = detector(&child.data, &child.boot);
            let t = Instant::now();
            let run = d.detect_previous_run().unwrap();
            slowest = slowest.max(t.elapsed());
            let got = run.crash.as_ref().map(|c| c.kind);
            total += 1;
            let ok =
                got == expected(mode) && (mode != "clean" || run.outcome == PreviousOutcome::Clean);
            if ok {
                right += 1;
            } else {
                wrong.push(format!(
                    "{mode}: got {got:?} (status {:?}, signal {:?}) {:?}",
                    child.status.code(),
                    child.status.signal(),
                    run
                ));
            }
            // Mode-specific evidence.
            if let Some(c) = &run.crash {
                match mode {
                    "panic_main" => {
                        assert_eq!(c.exception_type.as_deref(), Some("panic"));
                        assert_eq!(
                            c.message.as_deref(),
                            Some("child panics on its main thread")
                        );
                        assert!(c.location.as_deref().unwrap().contains("crash_matrix.rs"));
                        assert!(c.backtrace.is_some());
                    }
                    "panic_thread" => assert_eq!(c.thread.as_deref(), Some("worker-7")),
                    "task_panic" => assert_eq!(c.affected_components, vec!["billing"]),
                    "abort" => assert_eq!(c.signal, Some(libc::SIGABRT)),
                    "segv" => {
                        assert_eq!(c.signal, Some(libc::SIGSEGV));
                        assert!(c.fault_address.is_some());
                    }
                    "alloc" => assert!(c.message.as_deref().unwrap().contains("8589934592")),
                    "sigkill" => assert_eq!(c.exception_type.as_deref(), Some("killed")),
                    _ => {}
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{right}/{total} right; wrong: {wrong:#?}");
    assert!(
        slowest < Duration::from_secs(2),
        "detection took {slowest:?}"
    );
}

#[test]
fn an_incident_the_run_outlived_does_not_hide_how_it_ended() {
    use sanare_recovery::spool::RecordSource;
    let child = crash_child("caught_then_power");
    let run = detector(&child.data, &child.boot)
        .detect_previous_run()
        .unwrap();
    let crash = run.crash.as_ref().expect("a crash");
    assert_eq!(crash.kind, CrashKind::PowerFailure, "{run:#?}");
    assert_eq!(run.fatal_record, None);
    assert_eq!(run.records.len(), 1);
    assert_eq!(run.records[0].source, RecordSource::Panic);
    assert!(
        crash
            .evidence
            .iter()
            .any(|e| e.contains("1 earlier incident")),
        "{:?}",
        crash.evidence
    );
    // The crash time is the last heartbeat, after the panic.
    let panic_at = time::OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(run.records[0].unix_ms) * 1_000_000,
    )
    .unwrap();
    assert!(crash.crashed_at > panic_at, "{crash:?}");
    assert_eq!(
        Some(crash.crashed_at),
        crash.system_state.previous_heartbeat_at
    );

    let child = crash_child("try_reserve_then_kill");
    let run = detector(&child.data, &child.boot)
        .detect_previous_run()
        .unwrap();
    let crash = run.crash.as_ref().expect("a crash");
    assert_eq!(crash.kind, CrashKind::ApplicationCrash, "{run:#?}");
    assert_eq!(crash.exception_type.as_deref(), Some("killed"));
    assert_eq!(run.records[0].source, RecordSource::AllocFailure);
    assert_eq!(run.fatal_record, None);
}

#[test]
fn a_torn_or_garbage_spool_is_reported_not_fatal() {
    let child = crash_child("panic_main");
    let spool = child.data.join("sanare-crash.spool");
    let mut bytes = std::fs::read(&spool).unwrap();
    let whole = bytes.clone();
    bytes.extend_from_slice(b"\x00\x01garbage from a torn write");
    bytes.extend_from_slice(&whole[16..whole.len() - 5]); // a torn copy of the record
    std::fs::write(&spool, &bytes).unwrap();
    let run = detector(&child.data, &child.boot)
        .detect_previous_run()
        .unwrap();
    let crash = run.crash.unwrap();
    assert_eq!(crash.kind, CrashKind::ApplicationCrash);
    assert_eq!(crash.exception_type.as_deref(), Some("panic"));
    assert!(!run.spool_problems.is_empty());
    assert!(crash.evidence.iter().any(|e| e.contains("damaged spool")));

    // A spool of pure garbage and a damaged marker still give an answer.
    std::fs::write(&spool, b"garbage").unwrap();
    std::fs::write(
        child.data.join("sanare-shutdown.marker"),
        b"SANARE-MARKER 1\nstate=",
    )
    .unwrap();
    let run = detector(&child.data, &child.boot)
        .detect_previous_run()
        .unwrap();
    assert_eq!(run.crash.unwrap().kind, CrashKind::Unknown);
}

#[tokio::test]
async fn crashes_persist_with_history_by_date_and_recovery_outcome() {
    let db = sanare_testing::test_db().await;
    let schema = sanare_pg::SchemaName::default_schema();
    let mut client = db.connect().await;
    sanare_recovery::migrate(&mut client, &schema)
        .await
        .unwrap();
    let store = CrashStore::new(db.pool().clone(), schema);

    let bus = EventBus::default();
    let mut sub = bus.subscribe();
    let before = sanare_core::now() - time::Duration::seconds(1);
    let child = crash_child("segv");
    let d = CrashDetector::builder()
        .data_dir(&child.data)
        .boot_id_path(&child.boot)
        .events(bus.clone())
        .build()
        .unwrap();
    let run = d.detect_previous_run().unwrap();
    let crash = run.crash.clone().unwrap();
    match sub.try_recv().map(|r| r.event) {
        Some(Event::CrashDetected {
            crash: id, kind, ..
        }) => {
            assert_eq!(id, crash.id);
            assert_eq!(kind, CrashKind::ApplicationCrash);
        }
        other => panic!("expected CrashDetected, got {other:?}"),
    }
    store.record(&crash).await.unwrap();
    store.record(&crash).await.unwrap(); // idempotent
    d.mark_running().unwrap();

    let stored = store.get(crash.id).await.unwrap();
    assert_eq!(stored.crash.kind, CrashKind::ApplicationCrash);
    assert_eq!(stored.crash.signal, Some(libc::SIGSEGV));
    assert_eq!(stored.crash.fault_address, crash.fault_address);
    assert_eq!(stored.crash.evidence, crash.evidence);
    assert_eq!(stored.crash.system_state, crash.system_state);
    assert_eq!(stored.recovery_successful, None);

    let after = sanare_core::now() + time::Duration::seconds(1);
    assert_eq!(
        store
            .history(Some(before), Some(after))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.history(None, Some(before)).await.unwrap().len(), 0);
    assert_eq!(store.history(Some(after), None).await.unwrap().len(), 0);

    let t0 = sanare_core::now();
    store
        .record_recovery(crash.id, t0, t0, true, "replayed 3 entries")
        .await
        .unwrap();
    let stored = store.get(crash.id).await.unwrap();
    assert_eq!(stored.recovery_successful, Some(true));
    assert!(
        store
            .record_recovery(sanare_core::CrashId::new(), t0, t0, true, "")
            .await
            .is_err()
    );

    // After mark_running the spool is empty: a clean shutdown is now seen as clean.
    d.mark_clean_shutdown().unwrap();
    let again = d.detect_previous_run().unwrap();
    assert_eq!(again.outcome, PreviousOutcome::Clean);
    assert!(again.records.is_empty());

    // A dropped database is an error with context, not a panic.
    let url = db.url().to_owned();
    drop(client);
    db.close().await.unwrap();
    let pool = sanare_pg::connect_pool(&url, 1).unwrap();
    let gone = CrashStore::new(pool, sanare_pg::SchemaName::default_schema());
    assert!(gone.history(None, None).await.is_err());
}

#[tokio::test]
async fn a_start_that_dies_half_way_records_one_crash_and_clean_runs_keep_their_incidents() {
    use sanare_recovery::spool::RecordSource;
    let db = sanare_testing::test_db().await;
    let schema = sanare_pg::SchemaName::default_schema();
    sanare_recovery::migrate(&mut db.connect().await, &schema)
        .await
        .unwrap();
    let store = CrashStore::new(db.pool().clone(), schema);
    let rows = |table: &'static str| {
        let db = &db;
        async move {
            let n: i64 = db
                .client()
                .await
                .query_one(&format!("SELECT count(*) FROM sanare.{table}"), &[])
                .await
                .unwrap()
                .get(0);
            n
        }
    };

    // A crash detected and recorded, then the start dies before `mark_running`:
    // the next start finds the same crash, under the same id, and adds nothing.
    let child = crash_child("panic_main");
    let first = detector(&child.data, &child.boot)
        .detect_previous_run()
        .unwrap();
    store.record_run(&first).await.unwrap();
    let second = detector(&child.data, &child.boot)
        .detect_previous_run()
        .unwrap();
    assert_eq!(
        first.crash.as_ref().unwrap().id,
        second.crash.as_ref().unwrap().id
    );
    store.record_run(&second).await.unwrap();
    assert_eq!(rows("crash_records").await, 1);
    assert_eq!(rows("crash_incidents").await, 1);
    // The same with a damaged marker (no run id): the id is a digest of the evidence.
    std::fs::write(
        child.data.join("sanare-shutdown.marker"),
        b"SANARE-MARKER 1\nstate=",
    )
    .unwrap();
    let a = detector(&child.data, &child.boot)
        .detect_previous_run()
        .unwrap();
    let b = detector(&child.data, &child.boot)
        .detect_previous_run()
        .unwrap();
    assert_eq!(a.crash.as_ref().unwrap().id, b.crash.as_ref().unwrap().id);
    store.record_run(&a).await.unwrap();
    store.record_run(&b).await.unwrap();
    assert_eq!(rows("crash_records").await, 2);

    // A clean run that caught a panic: no crash, and the panic is kept.
    let clean = crash_child("clean_after_caught_panic");
    let run = detector(&clean.data, &clean.boot)
        .detect_previous_run()
        .unwrap();
    assert_eq!(run.outcome, PreviousOutcome::Clean);
    store.record_run(&run).await.unwrap();
    let incidents = store.incidents(None, None).await.unwrap();
    let kept = incidents
        .iter()
        .find(|i| Some(i.run_id) == run.run_id)
        .expect("the clean run's panic is kept");
    assert_eq!(kept.source, RecordSource::Panic);
    assert_eq!(
        kept.message.as_deref(),
        Some("a panic the clean run caught")
    );
    assert!(!kept.fatal && kept.crash.is_none());
    let fatal = incidents
        .iter()
        .find(|i| i.crash == first.crash.as_ref().map(|c| c.id))
        .unwrap();
    assert!(
        fatal.fatal,
        "the panic the crashed run died of is marked fatal"
    );

    // History older than the cutoff goes; younger stays.
    assert_eq!(
        store
            .purge_before(sanare_core::now() - time::Duration::days(1))
            .await
            .unwrap(),
        0
    );
    assert!(
        store
            .purge_before(sanare_core::now() + time::Duration::seconds(1))
            .await
            .unwrap()
            >= 4
    );
    assert_eq!(rows("crash_records").await, 0);
    assert_eq!(rows("crash_incidents").await, 0);
}

/// The journal of the mid-workload test: entries are written ahead in their own
/// transaction; the effect and the applied mark commit together.
struct PgJournal(tokio_postgres::Client);

#[async_trait::async_trait]
impl sanare_core::JournalService for PgJournal {
    async fn head(&self) -> sanare_core::Result<sanare_core::JournalPosition> {
        let n: i64 = self
            .0
            .query_one("SELECT coalesce(max(pos), 0) FROM journal", &[])
            .await
            .map_err(|e| sanare_core::Error::database("head", e, true))?
            .get(0);
        Ok(sanare_core::JournalPosition(n as u64))
    }
    async fn cut(&self, _: Option<&str>) -> sanare_core::Result<sanare_core::JournalCut> {
        Ok(sanare_core::JournalCut::default())
    }
    async fn replay(
        &self,
        _: sanare_core::ReplayRequest,
        control: &sanare_core::Control,
    ) -> sanare_core::Result<sanare_core::ReplaySummary> {
        control.checkpoint()?;
        let db = |e| sanare_core::Error::database("replaying", e, false);
        let mut s = sanare_core::ReplaySummary::default();
        let rows = self
            .0
            .query("SELECT pos, applied FROM journal ORDER BY pos", &[])
            .await
            .map_err(db)?;
        for row in rows {
            let (pos, applied): (i64, bool) = (row.get(0), row.get(1));
            s.entries_seen += 1;
            if applied {
                s.already_applied += 1;
                continue;
            }
            self.0
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO orders SELECT id, amount FROM journal WHERE pos = {pos};
                     UPDATE journal SET applied = true WHERE pos = {pos};
                     UPDATE replays SET n = n + 1;
                     COMMIT"
                ))
                .await
                .map_err(db)?;
            s.applied += 1;
        }
        Ok(s)
    }
}

const WORKLOAD_SQL: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, amount bigint NOT NULL);
     CREATE TABLE journal (pos bigint PRIMARY KEY, id bigint NOT NULL, amount bigint NOT NULL,
         applied boolean NOT NULL DEFAULT false);
     CREATE TABLE replays (n bigint NOT NULL); INSERT INTO replays VALUES (0);";

/// In a child: journal and apply 40 orders, then journal the 41st and die by
/// SIGKILL before applying it.
fn workload_child(url: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        for i in 1..=41i64 {
            client
                .execute(
                    "INSERT INTO journal (pos, id, amount) VALUES ($1, $1, $1 * 10::bigint)",
                    &[&i],
                )
                .await
                .unwrap();
            if i == 41 {
                // SAFETY: killing ourselves mid-workload.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
            client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO orders VALUES ({i}, {i} * 10);
                     UPDATE journal SET applied = true WHERE pos = {i}; COMMIT"
                ))
                .await
                .unwrap();
        }
    });
}

#[tokio::test]
async fn a_child_killed_mid_workload_recovers_to_all_committed_work_replayed_once() {
    use std::sync::Arc;
    let db = sanare_testing::test_db().await;
    let client = db.connect().await;
    client.batch_execute(WORKLOAD_SQL).await.unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let boot = tmp.path().join("boot_id");
    std::fs::write(&boot, "boot-a").unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child_entry", "--nocapture"])
        .env(MODE, "workload")
        .env(DIR, &data)
        .env(BOOT, &boot)
        .env("SANARE_WORKLOAD_URL", db.url())
        .status()
        .unwrap();
    assert!(!status.success());

    let d = detector(&data, &boot);
    let crash = d.detect_previous_run().unwrap().crash.unwrap();
    assert_eq!(crash.kind, CrashKind::ApplicationCrash);
    assert_eq!(crash.exception_type.as_deref(), Some("killed"));
    drop(d);

    let recovery = sanare_recovery::Recovery::builder()
        .journal(Arc::new(PgJournal(db.connect().await)))
        .build();
    let plan = recovery.plan(Some(&crash), sanare_recovery::RecoveryOptions::default());
    let r = recovery
        .recover(&plan, &sanare_core::Control::detached())
        .await
        .unwrap();
    assert!(r.success, "{r:#?}");
    assert_eq!(r.entries_replayed, 1);
    // A second recovery applies nothing.
    let again = recovery
        .recover(&plan, &sanare_core::Control::detached())
        .await
        .unwrap();
    assert_eq!(again.entries_replayed, 0);

    // The database equals all committed (journaled) work.
    let hash = |sql: &'static str| {
        let client = &client;
        async move {
            let h: String = client.query_one(sql, &[]).await.unwrap().get(0);
            h
        }
    };
    let orders =
        hash("SELECT md5(string_agg(id || ':' || amount, ',' ORDER BY id)) FROM orders").await;
    let journaled =
        hash("SELECT md5(string_agg(id || ':' || amount, ',' ORDER BY id)) FROM journal").await;
    assert_eq!(orders, journaled);
    let n: i64 = client
        .query_one("SELECT n FROM replays", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the journal entry was replayed exactly once");
}
