//! Operator workflows end to end through the facade, against a real PostgreSQL:
//! two instances sharing the database, journal replay interrupted and resumed,
//! the snapshot lifecycle, and validation → repair → rollback.

use std::time::{Duration, Instant};

use sanare::core::{
    Control, ExecuteOptions, IntegrityService, JournalPosition, JournalService, RepairPolicy,
    RepairService, ReplayRange, ReplayRequest, SnapshotRequest, SnapshotService, SnapshotStatus,
    TableRef, ValidationScope, Violation,
};
use sanare::integrity::{ConsistencyRule, Rules};
use sanare::journal::{JournalBuilder, NewEntry};
use sanare::snapshot::RetentionPolicy;
use sanare::{Sanare, SanareConfig};
use sanare_examples::orders::{self, PlaceOrder};
use sanare_testing::TestDb;
use sanare_testing::fixtures::order_service;

async fn shop(orders: u64) -> TestDb {
    let db = sanare_testing::test_db().await;
    let client = db.client().await;
    order_service::install(&**client, "shop").await.unwrap();
    order_service::generate(&**client, "shop", orders)
        .await
        .unwrap();
    db
}

fn config() -> SanareConfig {
    let mut config = SanareConfig::default();
    config.snapshots.schemas = vec!["shop".into()];
    config
}

/// The service on `db` with its data in `dir`, without background work.
async fn start(
    db: &TestDb,
    dir: &tempfile::TempDir,
    journal: impl FnOnce(JournalBuilder) -> JournalBuilder + Send + 'static,
) -> Sanare {
    Sanare::builder()
        .config(config())
        .pool(db.pool().clone())
        .data_dir(dir.path())
        .background(false)
        .journal(journal)
        .build()
        .await
        .unwrap()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// Two instances of one service share a database: one leads the schedule, and
/// the validation it schedules is split into table jobs that both instances run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_one_leader_and_scan_jobs_split_between_them() {
    let db = shop(2_000).await;
    let mut config = config();
    config.validation.interval = Some(Duration::from_secs(1));
    config.snapshots.interval = None;
    config.journal.compaction_interval = None;
    config.corruption.scan_interval = None;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut instances = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        instances.push(
            Sanare::builder()
                .config(config.clone())
                .pool(sanare_pg::connect_pool(db.url(), 8).unwrap())
                .data_dir(dir.path())
                .instance_name(format!("instance-{i}"))
                .poll_interval(Duration::from_millis(50))
                .build()
                .await
                .unwrap(),
        );
    }
    // Watch six scheduled validations go by, noting which instance started each
    // run, and wait for their table jobs (5 tables each) to finish.
    let mut runs = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let row = db
            .client()
            .await
            .query_opt(
                "SELECT last_started_at, leader FROM sanare.scheduled_tasks
                  WHERE name = 'integrity.validate'",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            let started: time::OffsetDateTime = row.get(0);
            runs.insert(started, row.get::<_, Option<String>>(1));
        }
        let done = count(
            &db,
            "SELECT count(*) FROM sanare.jobs WHERE kind = 'integrity.table' AND status = 'done'",
        )
        .await;
        if runs.len() >= 6 && done >= 30 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} runs seen and {done} table jobs done in 90 s",
            runs.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One leader started every run: with two leaders, whichever polled first would
    // start each run, and both would appear.
    let leaders: std::collections::BTreeSet<&Option<String>> = runs.values().collect();
    assert_eq!(leaders.len(), 1, "runs started by {runs:?}");
    // And the runs kept their interval: two leaders claiming on their own would
    // start a run each within one interval.
    let starts: Vec<time::OffsetDateTime> = db
        .client()
        .await
        .query(
            "SELECT min(created_at) FROM sanare.jobs WHERE kind = 'integrity.table'
              GROUP BY batch_id ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for pair in starts.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= time::Duration::milliseconds(500),
            "two validation runs {gap} apart (interval 1 s): {starts:?}"
        );
    }
    let workers = count(
        &db,
        "SELECT count(DISTINCT claimed_by) FROM sanare.jobs WHERE status = 'done'",
    )
    .await;
    assert_eq!(workers, 2, "both instances ran table jobs");
    let failed = count(
        &db,
        "SELECT count(*) FROM sanare.jobs WHERE status = 'failed'",
    )
    .await;
    assert_eq!(failed, 0);
    // Each table job wrote a real validation report.
    let checks = count(
        &db,
        "SELECT count(*) FROM sanare.integrity_checks WHERE status = 'completed'",
    )
    .await;
    assert!(checks >= 30, "{checks} reports");
    for sanare in instances {
        sanare.shutdown().await.unwrap();
    }
}

/// Entries journaled but never applied (the service died right after recording
/// them) are replayed; a replay cancelled half-way and run again applies each
/// entry exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replay_resumes_and_applies_each_entry_once() {
    let db = shop(200).await;
    let dir = tempfile::tempdir().unwrap();
    // Small segments and replay batches, so the cancel lands between two.
    let sanare = start(&db, &dir, |j| {
        orders::register(j).replay_batch(25).segment_size(8 * 1024)
    })
    .await;
    for n in 1..=400 {
        let order = PlaceOrder::nth(200, n, 20, 4);
        sanare
            .journal()
            .record(NewEntry::new(orders::PLACE_ORDER, &order).unwrap())
            .await
            .unwrap();
    }
    let request = || {
        ReplayRequest::new(ReplayRange::Positions {
            from: JournalPosition(1),
            to: None,
        })
    };
    // Cancel the first replay once it has made progress.
    let (control, progress) = Control::new();
    let cancel = control.cancel_token().clone();
    let watcher = tokio::spawn(async move {
        let mut rx = progress.into_receiver();
        while rx.changed().await.is_ok() {
            if rx.borrow().done >= 50 {
                cancel.cancel();
                break;
            }
        }
    });
    let first = sanare.journal().replay(request(), &control).await;
    watcher.abort();
    let applied_first = count(&db, "SELECT count(*) FROM shop.orders WHERE id > 200").await;
    match &first {
        Err(e) => assert!(e.is_cancelled(), "{e}"),
        Ok(summary) => assert!(summary.applied < 400, "{summary:?}"),
    }
    assert!(applied_first > 0 && applied_first < 400, "{applied_first}");

    let second = sanare
        .journal()
        .replay(request(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(second.entries_seen, 400);
    assert_eq!(
        second.already_applied,
        u64::try_from(applied_first).unwrap(),
        "{second:?}"
    );
    assert_eq!(second.applied + second.already_applied, 400);
    assert_eq!(
        count(&db, "SELECT count(*) FROM shop.orders WHERE id > 200").await,
        400
    );
    let third = sanare
        .journal()
        .replay(request(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(third.applied, 0);
    assert_eq!(third.already_applied, 400);
    sanare.shutdown().await.unwrap();
}

/// Snapshots over time: a full one, a second after changes, both verified; the
/// newest damaged on disk is detected, marked and skipped; point-in-time restore
/// lands on the older one plus the journal; retention keeps the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_lifecycle_with_damage_pitr_and_retention() {
    let db = shop(500).await;
    let dir = tempfile::tempdir().unwrap();
    let sanare = start(&db, &dir, orders::register).await;
    let snaps = sanare.snapshots();
    let control = Control::detached();
    let first = snaps
        .create(SnapshotRequest::new(), &control)
        .await
        .unwrap();
    // Journaled orders after the first snapshot.
    for n in 1..=30 {
        orders::place_order(&sanare, &PlaceOrder::nth(500, n, 50, 10))
            .await
            .unwrap();
    }
    let after_orders = time::OffsetDateTime::now_utc();
    let blocks_before: std::collections::BTreeSet<_> = files(&dir.path().join("snapshots"));
    let second = snaps
        .create(SnapshotRequest::new(), &control)
        .await
        .unwrap();
    assert!(
        second.stored_bytes < first.stored_bytes,
        "dedup: {second:?}"
    );
    assert!(snaps.verify(first.id, &control).await.unwrap().is_ok());
    assert!(snaps.verify(second.id, &control).await.unwrap().is_ok());

    // Damage the end of a pack only the second snapshot wrote: its table of
    // contents no longer opens, so every block in it is lost.
    let new_blocks: Vec<_> = files(&dir.path().join("snapshots"))
        .difference(&blocks_before)
        .filter(|p| p.to_string_lossy().contains("packs"))
        .cloned()
        .collect();
    let victim = new_blocks
        .first()
        .expect("the second snapshot added blocks");
    let mut bytes = std::fs::read(victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    std::fs::write(victim, bytes).unwrap();
    let report = snaps.verify(second.id, &control).await.unwrap();
    assert!(!report.is_ok());
    assert_eq!(
        snaps.get(second.id).await.unwrap().status,
        SnapshotStatus::Corrupted
    );
    let good = snaps.latest_good(None).await.unwrap().unwrap();
    assert_eq!(good.id, first.id, "the damaged snapshot is skipped");

    // Point in time: everything is lost; the state when the 30 orders were placed
    // comes back from the latest good snapshot before then and the journal
    // replayed up to that time.
    db.client()
        .await
        .batch_execute("TRUNCATE shop.payments, shop.order_lines, shop.orders CASCADE")
        .await
        .unwrap();
    let pitr = snaps.restore_to(after_orders, &control).await.unwrap();
    assert_eq!(pitr.restore.snapshot, first.id);
    assert_eq!(
        count(&db, "SELECT count(*) FROM shop.orders").await,
        530,
        "500 from the snapshot + 30 replayed"
    );
    assert_eq!(pitr.replay.unwrap().applied, 30);

    let retired = snaps
        .apply_retention(&RetentionPolicy::new(1, Duration::ZERO))
        .await
        .unwrap();
    assert!(retired >= 1);
    let listed = snaps.list().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|s| s.id == first.id && s.status == SnapshotStatus::Ready),
        "the last good snapshot is kept: {listed:?}"
    );
    sanare.shutdown().await.unwrap();
}

/// The order tables row for row, except when an order was placed (`now()` when
/// it is applied, so a replay gives it a new time).
async fn order_state(db: &TestDb) -> Vec<String> {
    let client = db.client().await;
    let mut out = Vec::new();
    for q in [
        "SELECT count(*)::text || ' ' || md5(string_agg((id, customer_id, status, total_cents, shipped_at, note)::text, '|' ORDER BY id)) FROM shop.orders",
        "SELECT count(*)::text || ' ' || md5(string_agg(x::text, '|' ORDER BY x::text)) FROM shop.order_lines x",
        "SELECT count(*)::text || ' ' || md5(string_agg(x::text, '|' ORDER BY x::text)) FROM shop.payments x",
        "SELECT count(*)::text || ' ' || md5(string_agg(x::text, '|' ORDER BY x::text)) FROM shop.customers x",
    ] {
        out.push(client.query_one(q, &[]).await.unwrap().get(0));
    }
    out
}

/// Point in time between two journaled orders: the snapshot before them, then
/// the journal replayed up to that time and not a moment further.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_restore_gives_exactly_the_state_between_two_entries() {
    let db = shop(300).await;
    let dir = tempfile::tempdir().unwrap();
    let sanare = start(&db, &dir, orders::register).await;
    let snaps = sanare.snapshots();
    let control = Control::detached();
    let snapshot = snaps
        .create(SnapshotRequest::new(), &control)
        .await
        .unwrap();
    orders::place_order(&sanare, &PlaceOrder::nth(300, 1, 30, 6))
        .await
        .unwrap();
    let between = time::OffsetDateTime::now_utc();
    let expected = order_state(&db).await;
    // The next order is recorded strictly after `between`.
    while time::OffsetDateTime::now_utc() <= between {
        tokio::task::yield_now().await;
    }
    orders::place_order(&sanare, &PlaceOrder::nth(300, 2, 30, 6))
        .await
        .unwrap();
    assert_ne!(order_state(&db).await, expected);
    db.client()
        .await
        .batch_execute("TRUNCATE shop.payments, shop.order_lines, shop.orders CASCADE")
        .await
        .unwrap();
    let pitr = snaps.restore_to(between, &control).await.unwrap();
    assert_eq!(pitr.restore.snapshot, snapshot.id);
    let replay = pitr.replay.unwrap();
    assert_eq!(
        (replay.applied, replay.failures.len()),
        (1, 0),
        "{replay:?}"
    );
    assert_eq!(
        order_state(&db).await,
        expected,
        "exactly the state at that time"
    );
    sanare.shutdown().await.unwrap();
}

/// Validation finds planted damage of several kinds; repairs fix it, each in its
/// own transaction; rolling them back returns the database to exactly the
/// damaged state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_repair_and_roll_back_to_the_exact_prior_state() {
    let db = shop(300).await;
    let dir = tempfile::tempdir().unwrap();
    let sanare = start(&db, &dir, |j| j).await;
    let control = Control::detached();
    sanare
        .snapshots()
        .create(SnapshotRequest::new(), &control)
        .await
        .unwrap();
    let client = db.client().await;
    client
        .batch_execute(
            "SET session_replication_role = replica;
             DELETE FROM shop.products WHERE id = 3;
             DELETE FROM shop.customers WHERE id = 5;
             SET session_replication_role = origin;",
        )
        .await
        .unwrap();
    let damaged = orders::tables_hash(&**client).await.unwrap();
    let summary = sanare
        .integrity()
        .validate(ValidationScope::all(), &control)
        .await
        .unwrap();
    assert!(summary.total_violations() > 0);
    let violations: Vec<Violation> = collect_ok(sanare.integrity().violations(summary.check)).await;
    assert_eq!(violations.len() as u64, summary.total_violations());
    let plans = sanare.repair().plan(&violations).await.unwrap();
    let mut done = Vec::new();
    for plan in &plans {
        if plan.requires_approval {
            sanare.repair().approve(plan.id, "e2e").await.unwrap();
        }
        let outcome = sanare
            .repair()
            .execute(plan.id, ExecuteOptions::new(), &control)
            .await
            .unwrap();
        if outcome.status == sanare::core::RepairStatus::Completed {
            done.push(plan.id);
        }
    }
    assert!(!done.is_empty());
    let after = sanare
        .integrity()
        .validate(ValidationScope::all(), &control)
        .await
        .unwrap();
    assert_eq!(after.total_violations(), 0, "{after:?}");
    for id in done.iter().rev() {
        sanare.repair().rollback(*id, &control).await.unwrap();
    }
    assert_eq!(orders::tables_hash(&**client).await.unwrap(), damaged);
    sanare.shutdown().await.unwrap();
}

fn files(dir: &std::path::Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p);
            }
        }
    }
    out
}

/// Collects a stream of results, failing the test on the first error.
async fn collect_ok<T>(stream: futures_util::stream::BoxStream<'_, sanare::Result<T>>) -> Vec<T> {
    use futures_util::StreamExt as _;
    stream.map(|r| r.unwrap()).collect().await
}

/// A restore undoes what replay had applied after the snapshot's cut, so those
/// entries are replayed again: the orders come back, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_reopens_the_entries_after_its_cut_for_the_next_replay() {
    let db = shop(300).await;
    let dir = tempfile::tempdir().unwrap();
    let sanare = start(&db, &dir, orders::register).await;
    let snaps = sanare.snapshots();
    let control = Control::detached();
    let snapshot = snaps
        .create(SnapshotRequest::new(), &control)
        .await
        .unwrap();
    let cut = snapshot
        .journal_cut
        .clone()
        .expect("a journaled snapshot has a cut");
    for n in 1..=5 {
        orders::place_order(&sanare, &PlaceOrder::nth(300, n, 30, 6))
            .await
            .unwrap();
    }
    // A replay after the cut marks the five entries applied (their orders are
    // there already: applying them again changes nothing).
    let first = sanare
        .journal()
        .replay(
            ReplayRequest::new(ReplayRange::After(cut.clone())),
            &control,
        )
        .await
        .unwrap();
    assert_eq!(first.failures.len(), 0, "{first:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM shop.orders").await, 305);

    // The restore takes the tables back to the snapshot: the five orders are gone.
    let restored = snaps
        .restore(sanare::core::RestoreRequest::new(snapshot.id), &control)
        .await
        .unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM shop.orders").await, 300);
    assert!(
        restored
            .notes
            .iter()
            .any(|n| n.contains("5 journal entries")),
        "{:?}",
        restored.notes
    );
    // The next replay after the cut applies them again, exactly once.
    let again = sanare
        .journal()
        .replay(
            ReplayRequest::new(ReplayRange::After(cut.clone())),
            &control,
        )
        .await
        .unwrap();
    assert_eq!((again.applied, again.failures.len()), (5, 0), "{again:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM shop.orders").await, 305);
    let third = sanare
        .journal()
        .replay(ReplayRequest::new(ReplayRange::After(cut)), &control)
        .await
        .unwrap();
    assert_eq!(third.applied, 0, "applied once: {third:?}");
    sanare.shutdown().await.unwrap();
}

/// `shop.orders.total_cents` is the sum of its lines, as a rule that may recompute
/// the total (`expression`: by it; `None`: the finding names the column only).
fn order_total_rule(expression: Option<&str>) -> Rules {
    let rule = ConsistencyRule::aggregate_equals(
        "order_total",
        &TableRef::new("shop", "orders"),
        "id",
        "total_cents",
        &TableRef::new("shop", "order_lines"),
        "order_id",
        "amount_cents",
    );
    let rule = match expression {
        Some(e) => rule.with_recompute_as("total_cents", e),
        None => rule.with_recompute("total_cents"),
    };
    Rules::builder().consistency(rule).build().unwrap()
}

/// Totals of every order, by id.
async fn totals(db: &TestDb) -> Vec<(i64, i64)> {
    db.client()
        .await
        .query("SELECT id, total_cents FROM shop.orders ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// A business rule declared with a recompute expression is a repair rule too: the
/// two damaged totals are recomputed, every other row is left as it was. Declared
/// without one, the same findings change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_rules_with_a_recompute_expression_repair_by_it_and_only_then() {
    let expression =
        "(SELECT coalesce(sum(l.amount_cents), 0) FROM shop.order_lines l WHERE l.order_id = t.id)";
    for declared in [Some(expression), None] {
        let db = shop(200).await;
        let dir = tempfile::tempdir().unwrap();
        let sanare = Sanare::builder()
            .config(config())
            .pool(db.pool().clone())
            .data_dir(dir.path())
            .background(false)
            .rules(order_total_rule(declared))
            .build()
            .await
            .unwrap();
        let control = Control::detached();
        let good = totals(&db).await;
        db.client()
            .await
            .batch_execute(
                "UPDATE shop.orders SET total_cents = total_cents + 7 WHERE id IN (7, 9)",
            )
            .await
            .unwrap();
        let damaged = totals(&db).await;
        let summary = sanare
            .integrity()
            .validate(ValidationScope::all(), &control)
            .await
            .unwrap();
        assert_eq!(summary.total_violations(), 2, "{summary:?}");
        let run = sanare
            .repair()
            .repair_all(
                sanare.integrity().violations(summary.check),
                &RepairPolicy::new("e2e").auto_approve(true),
                &control,
            )
            .await
            .unwrap();
        if declared.is_some() {
            assert_eq!(totals(&db).await, good, "recomputed: {run:?}");
            assert_eq!(run.rows_changed, 2, "{run:?}");
        } else {
            assert_eq!(
                totals(&db).await,
                damaged,
                "nothing to recompute by: {run:?}"
            );
        }
        sanare.shutdown().await.unwrap();
    }
}
