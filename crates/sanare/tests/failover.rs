//! Two real service processes share one database; the leader is killed (SIGKILL)
//! in the middle of a scheduled snapshot, the other instance takes over and
//! resumes that run, and the snapshot is finished exactly once.
//!
//! The test binary re-executes itself running only `service_child_entry`, with
//! `SANARE_FAILOVER_INSTANCE` naming the instance.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use sanare::config::StorageConfig;
use sanare::{Sanare, SanareConfig};
use sanare_pg::SchemaName;
use sanare_testing::TestDb;

mod common;

const INSTANCE: &str = "SANARE_FAILOVER_INSTANCE";
const DIR: &str = "SANARE_FAILOVER_DIR";
const READY: &str = "failover-child-ready";

fn config() -> SanareConfig {
    let mut config = SanareConfig::default();
    config.snapshots.schemas = vec!["shop".into()];
    config.snapshots.storage = StorageConfig::Postgres;
    config.snapshots.interval = Some(Duration::from_secs(3600));
    // Validation every second is the test's clock: rounds after the snapshot
    // must not run it again.
    config.validation.interval = Some(Duration::from_secs(1));
    config.journal.compaction_interval = None;
    config.corruption.scan_interval = None;
    config.background.lease = Duration::from_secs(1);
    config.background.heartbeat = Duration::from_millis(100);
    config
}

/// In a child: one instance of the service, running until its stdin closes.
#[test]
#[ignore = "the child process of this file's tests: they run it, it is not a test of its own"]
fn service_child_entry() {
    let instance = std::env::var(INSTANCE)
        .expect("a child entry: run by this file's tests (with --ignored), not on its own");
    let dir = std::env::var(DIR).unwrap();
    let url = std::env::var("DATABASE_URL").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let sanare = Sanare::builder()
            .config(config())
            .database_url(url)
            .data_dir(dir)
            .instance_name(instance)
            .poll_interval(Duration::from_millis(50))
            .build()
            .await
            .expect("the service starts");
        println!("{READY}");
        // Until the test closes stdin (or kills this process).
        tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new()))
            .await
            .unwrap()
            .unwrap();
        sanare.shutdown().await.unwrap();
    });
}

struct Instance {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Instance {
    /// Starts instance `name` and waits until its service is built.
    fn start(name: &str, url: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "service_child_entry",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(INSTANCE, name)
            .env(DIR, dir.path())
            .env("DATABASE_URL", url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                // libtest prints `test service_child_entry ... ` on the same line.
                Some(Ok(line)) if line.trim_end().ends_with(READY) => break,
                Some(Ok(_)) => {}
                other => panic!("instance {name} ended before it was ready: {other:?}"),
            }
        }
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, _dir: dir }
    }

    /// SIGKILL: the process dies mid-work.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Closes its stdin: a clean shutdown.
    fn stop(&mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

impl Drop for Instance {
    /// A failing test leaves no process behind.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn query_i64(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// Polls `sql` (one bigint) until it is at least `at_least`, failing after 60 s.
async fn wait_for(db: &TestDb, what: &str, sql: &str, at_least: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = query_i64(db, sql).await;
        if n >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} ({n})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_mid_snapshot_is_succeeded_and_the_snapshot_finishes_exactly_once() {
    let db = sanare_testing::test_db().await;
    common::shop_items(&db, 500).await;
    let client = db.connect().await;
    // The scheduled snapshot is due as soon as a leader looks.
    let mut migrate = db.connect().await;
    sanare::MIGRATIONS
        .run(&mut migrate, &SchemaName::default())
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO sanare.scheduled_tasks (name, last_started_at)
             VALUES ('snapshots.create', now() - interval '1 day')",
            &[],
        )
        .await
        .unwrap();
    // Hold the snapshot up mid-way: it blocks reading the table.
    let mut blocker = db.connect().await;
    let hold = blocker.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE shop.items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let mut a = Instance::start("a", db.url());
    let blocked = "SELECT count(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND wait_event_type = 'Lock'";
    wait_for(&db, "a's snapshot to reach the table", blocked, 1).await;
    let task = |predicate: &str| {
        format!(
            "SELECT count(*) FROM sanare.scheduled_tasks WHERE name = 'snapshots.create' AND {predicate}"
        )
    };
    assert_eq!(
        query_i64(&db, &task("leader = 'a' AND run_id IS NOT NULL")).await,
        1,
        "a leads and holds the run: {:?}",
        client
            .simple_query("SELECT leader, run_id, attempts FROM sanare.scheduled_tasks")
            .await
            .unwrap()
    );
    let mut b = Instance::start("b", db.url());
    a.kill();

    // b leads, waits for a's claim to expire, and resumes that same run: it too
    // blocks on the table, as attempt 2.
    wait_for(
        &db,
        "b to resume the run",
        &task("leader = 'b' AND attempts = 2 AND run_id IS NOT NULL"),
        1,
    )
    .await;
    hold.commit().await.unwrap();
    wait_for(
        &db,
        "the resumed run to finish",
        &task("last_outcome = 'ok'"),
        1,
    )
    .await;
    // Two more rounds of b's schedule (two scheduled validations) go by.
    wait_for(
        &db,
        "two scheduled validations",
        "SELECT count(DISTINCT batch_id) FROM sanare.jobs WHERE kind = 'integrity.table'",
        2,
    )
    .await;
    b.stop();

    let snapshots = client
        .query(
            "SELECT status, count(*) FROM sanare.snapshots GROUP BY status ORDER BY status",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect::<Vec<_>>();
    assert!(
        snapshots.contains(&("ready".to_owned(), 1)),
        "exactly one finished snapshot: {snapshots:?}"
    );
    let row = client
        .query_one(
            "SELECT leader, attempts, last_outcome, run_id IS NULL, panics
               FROM sanare.scheduled_tasks WHERE name = 'snapshots.create'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "b");
    assert_eq!(row.get::<_, i32>(1), 2, "a's attempt and b's");
    assert_eq!(row.get::<_, String>(2), "ok");
    assert!(row.get::<_, bool>(3), "no run is claimed any more");
    assert_eq!(row.get::<_, i64>(4), 0);
}
