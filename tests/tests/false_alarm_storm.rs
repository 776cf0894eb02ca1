//! A false-alarm storm changes nothing (issue 17): a wrongly configured checksum
//! flags every one of 1,000 rows while the service runs with `auto_repair` on.
//! No row changes without an approval; what an operator approves and then rolls
//! back leaves the table byte-identical.

use std::time::{Duration, Instant};

use sanare::core::{ExecuteOptions, RepairService, RepairStatus, SnapshotRequest, SnapshotService};
use sanare::corruption::IssueQuery;
use sanare::integrity::{ChecksumAlgorithm, Rules};
use sanare::{Control, Sanare, SanareConfig, Severity};
use sanare_core::TableRef;
use sanare_testing::TestDb;

const ROWS: i64 = 1_000;

fn accounts() -> TableRef {
    TableRef::new("bank", "accounts")
}

/// Every byte of every row (checksums included), in key order.
async fn digest(db: &TestDb) -> String {
    db.client()
        .await
        .query_one(
            "SELECT md5(string_agg(a::text, '|' ORDER BY id)) FROM bank.accounts a",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// The host's table, its checksums kept by sanare's SQL trigger (SHA-256).
async fn bank(db: &TestDb, dir: &tempfile::TempDir) {
    let operator = Sanare::builder()
        .pool(db.pool().clone())
        .data_dir(dir.path())
        .operator()
        .build()
        .await
        .unwrap();
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE SCHEMA bank;
         CREATE TABLE bank.accounts (id bigint PRIMARY KEY, owner text NOT NULL,
             balance numeric(12, 2) NOT NULL, opened timestamptz NOT NULL, row_checksum bytea);
         INSERT INTO bank.accounts (id, owner, balance, opened)
         SELECT g, 'owner ' || g, g * 1.25, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 day'
           FROM generate_series(1, {ROWS}) g;"
    ))
    .await
    .unwrap();
    sanare::integrity::install_checksum_trigger(
        &**c,
        operator.schema(),
        &accounts(),
        "row_checksum",
        true,
    )
    .await
    .unwrap();
    operator.shutdown().await.unwrap();
}

/// The service with scheduled scans and validations every second, auto-repair on,
/// and scans expecting BLAKE3 checksums where the trigger writes SHA-256.
async fn service(
    db: &TestDb,
    dir: &tempfile::TempDir,
    approval_threshold: Severity,
    rules: Rules,
) -> Sanare {
    let mut config = SanareConfig::default();
    config.snapshots.schemas = vec!["bank".into()];
    config.snapshots.interval = None;
    config.journal.compaction_interval = None;
    config.validation.interval = Some(Duration::from_secs(1));
    config.corruption.scan_interval = Some(Duration::from_secs(1));
    config.corruption.checksum_algorithm = ChecksumAlgorithm::Blake3;
    config.repair.auto_repair = true;
    config.repair.approval_threshold = approval_threshold;
    let sanare = Sanare::builder()
        .config(config)
        .rules(rules)
        .pool(sanare_pg::connect_pool(db.url(), 8).unwrap())
        .data_dir(dir.path())
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    // A snapshot every row could be "restored" from; then the host changes rows
    // legitimately (through its trigger), which a restore would revert.
    sanare
        .snapshots()
        .create(SnapshotRequest::new(), &Control::detached())
        .await
        .unwrap();
    db.client()
        .await
        .batch_execute("UPDATE bank.accounts SET balance = balance + 100 WHERE id <= 10")
        .await
        .unwrap();
    sanare
}

/// Waits for two scheduled scans and two validations (with their auto-repair)
/// to finish, none failed.
async fn two_rounds(db: &TestDb) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let scans = count(
            db,
            "SELECT count(*) FROM sanare.jobs WHERE kind = 'corruption.table' AND status IN ('done', 'failed')",
        )
        .await;
        let validations = count(
            db,
            "SELECT count(*) FROM sanare.jobs WHERE kind = 'integrity.table' AND status IN ('done', 'failed')",
        )
        .await;
        if scans >= 2 && validations >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{scans} scans and {validations} validations in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed = count(
        db,
        "SELECT count(*) FROM sanare.jobs WHERE status = 'failed'",
    )
    .await;
    assert_eq!(failed, 0);
}

/// The scan's verdict: one open issue, no row, "probably configuration"; and an
/// operator's `repair plan` over it plans nothing.
async fn one_table_wide_issue_and_nothing_to_plan(sanare: &Sanare) {
    let issues = sanare
        .corruption()
        .issues(&IssueQuery::new().unresolved())
        .await
        .unwrap();
    assert_eq!(issues.len(), 1, "{issues:#?}");
    assert!(issues[0].row.is_none());
    assert!(
        issues[0]
            .description
            .contains("probably configuration, not corruption"),
        "{}",
        issues[0].description
    );
    let from_issues: Vec<_> = issues.iter().map(|i| i.to_violation()).collect();
    let plans = sanare.repair().plan(&from_issues).await.unwrap();
    assert!(plans.is_empty(), "{plans:#?}");
}

/// Scans flag every row, with approvals as permissive as an operator may make
/// them (only critical repairs wait): nothing is repaired, nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_scan_checksum_flags_every_row_and_changes_none() {
    let db = sanare_testing::test_db().await;
    let dir = tempfile::tempdir().unwrap();
    bank(&db, &dir).await;
    let sanare = service(&db, &dir, Severity::Critical, Rules::default()).await;
    let before = digest(&db).await;
    two_rounds(&db).await;
    one_table_wide_issue_and_nothing_to_plan(&sanare).await;
    assert_eq!(digest(&db).await, before, "rows changed");
    let repairs = count(&db, "SELECT count(*) FROM sanare.repair_operations").await;
    assert_eq!(repairs, 0, "no repair was even planned");
    sanare.shutdown().await.unwrap();
}

/// The integrity rule is wrong too, so validation flags every row and auto-repair
/// plans restores: with the default approvals they wait, nothing changes; an
/// operator who approves and runs them, then rolls them back, gets every byte back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_validation_rule_wrong_too_repairs_wait_and_roll_back_byte_exact() {
    let db = sanare_testing::test_db().await;
    let dir = tempfile::tempdir().unwrap();
    bank(&db, &dir).await;
    let rules = Rules::builder()
        .checksum(&accounts(), "row_checksum", ChecksumAlgorithm::Blake3)
        .build()
        .unwrap();
    let sanare = service(
        &db,
        &dir,
        SanareConfig::default().repair.approval_threshold,
        rules,
    )
    .await;
    let before = digest(&db).await;
    two_rounds(&db).await;
    one_table_wide_issue_and_nothing_to_plan(&sanare).await;
    let flagged = count(
        &db,
        "SELECT count(DISTINCT row_key::text) FROM sanare.integrity_violations",
    )
    .await;
    assert_eq!(flagged, ROWS, "validation flags every row");
    assert_eq!(digest(&db).await, before, "auto-repair changed rows");
    let completed = count(
        &db,
        "SELECT count(*) FROM sanare.repair_operations WHERE status = 'completed'",
    )
    .await;
    assert_eq!(completed, 0, "no repair ran without an approval");

    // Approved and run, then rolled back: byte-identical.
    let waiting: Vec<String> = db
        .client()
        .await
        .query(
            "SELECT id::text FROM sanare.repair_operations WHERE status = 'awaiting_approval' \
             ORDER BY created_at LIMIT 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !waiting.is_empty(),
        "auto-repair left plans for an operator"
    );
    let control = Control::detached();
    let mut done = Vec::new();
    for id in &waiting {
        let id = id.parse().unwrap();
        sanare.repair().approve(id, "storm test").await.unwrap();
        let outcome = sanare
            .repair()
            .execute(id, ExecuteOptions::new(), &control)
            .await
            .unwrap();
        if outcome.status == RepairStatus::Completed {
            done.push(id);
        }
    }
    assert!(!done.is_empty(), "an approved repair runs");
    assert_ne!(
        digest(&db).await,
        before,
        "the approved restores reverted the host's update"
    );
    for id in done.iter().rev() {
        sanare.repair().rollback(*id, &control).await.unwrap();
    }
    assert_eq!(digest(&db).await, before, "rollback restored every byte");
    sanare.shutdown().await.unwrap();
}
