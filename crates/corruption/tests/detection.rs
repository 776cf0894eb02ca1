//! Detection against a real PostgreSQL: each kind of damage is planted, found and
//! classified; a clean database under write load yields nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sanare_core::{Control, CorruptionKind, Event, Severity, ViolationKind};
use sanare_corruption::{IssueQuery, Layer};
use sanare_testing::test_db;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_planted_kind_is_found_and_classified() {
    let db = test_db().await;
    let c = db.client().await;
    install(&**c, 200).await;
    let snaps = Arc::new(FakeSnapshots::default());
    snaps.capture(&**c, &accounts()).await;
    let det = detector(db.pool(), Some(snaps.clone()));
    det.migrate().await.unwrap();
    let mut events = det.events().subscribe();

    // A clean table first: nothing.
    let clean = det
        .scan_table(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(clean.rows_scanned, 200);
    assert!(clean.issues.is_empty(), "{:?}", clean.issues);

    // Damage outside the application (checksums not updated).
    // 'e' (0x65) -> 'd' (0x64): one bit.
    c.batch_execute(
        "UPDATE accounts SET email = 'user7@exampld.com' WHERE id = 7;
         UPDATE accounts SET full_name = 'Us' WHERE id = 9;
         INSERT INTO accounts VALUES (5000, 'intruder@example.com', 'Mallory', 1.00, '\\x00');
         DELETE FROM accounts WHERE id = 12;
         UPDATE accounts SET balance = 99999.99 WHERE id = 20;",
    )
    .await
    .unwrap();

    let report = det
        .scan_table(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(report.rows_scanned, 200);
    assert_eq!(report.suspects, 4);
    let by_id = |id: &str| {
        report
            .issues
            .iter()
            .find(|i| i.row.as_ref().unwrap().key[0].value.as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no issue for row {id}: {:?}", report.issues))
    };
    let flip = by_id("7");
    assert_eq!(flip.kind, CorruptionKind::BitFlip);
    assert_eq!(flip.column.as_deref(), Some("email"));
    assert_eq!(flip.layer, Layer::Pattern);
    assert_eq!(flip.affected["last_known_good"], "user7@example.com");
    assert_eq!(flip.affected["current"], "user7@exampld.com");
    let trunc = by_id("9");
    assert_eq!(trunc.kind, CorruptionKind::Truncation);
    assert_eq!(trunc.column.as_deref(), Some("full_name"));
    let inj = by_id("5000");
    assert_eq!(inj.kind, CorruptionKind::Injection);
    let other = by_id("20");
    assert_eq!(other.kind, CorruptionKind::Unknown);
    assert_eq!(other.column.as_deref(), Some("balance"));

    let deleted = det
        .check_deletions(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(deleted[0].kind, CorruptionKind::Deletion);
    assert_eq!(
        deleted[0].row.as_ref().unwrap().key[0].value.as_deref(),
        Some("12")
    );
    assert_eq!(
        deleted[0].affected["last_known_good"]["email"],
        "user12@example.com"
    );

    // Stored once each, events published, convertible to violations.
    let stored = det.issues(&IssueQuery::new()).await.unwrap();
    assert_eq!(stored.len(), 5);
    let mut kinds = Vec::new();
    while let Some(e) = events.try_recv() {
        if let Event::CorruptionDetected { kind, table, .. } = e.event {
            assert_eq!(table, accounts());
            kinds.push(kind);
        }
    }
    assert_eq!(kinds.len(), 5);
    let v = flip.to_violation();
    assert!(matches!(
        v.kind,
        ViolationKind::Corruption {
            kind: CorruptionKind::BitFlip,
            ..
        }
    ));
    assert_eq!(v.row, flip.row);

    // A second scan finds the same damage but stores nothing new.
    let again = det
        .scan_table(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(again.issues.len(), 4);
    assert_eq!(det.issues(&IssueQuery::new()).await.unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_checksum_alone_is_a_bit_flip_of_the_checksum_column() {
    let db = test_db().await;
    let c = db.client().await;
    install(&**c, 10).await;
    let snaps = Arc::new(FakeSnapshots::default());
    snaps.capture(&**c, &accounts()).await;
    let det = detector(db.pool(), Some(snaps));
    det.migrate().await.unwrap();
    // Flip the lowest bit of the first checksum byte.
    c.batch_execute(
        "UPDATE accounts SET row_checksum = set_byte(row_checksum, 0, get_byte(row_checksum, 0) # 1) WHERE id = 3",
    )
    .await
    .unwrap();
    let r = det
        .scan_table(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(r.issues.len(), 1);
    assert_eq!(r.issues[0].kind, CorruptionKind::BitFlip);
    assert_eq!(r.issues[0].layer, Layer::Checksum);
    assert_eq!(r.issues[0].column.as_deref(), Some("row_checksum"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_snapshot_damage_is_reported_unclassified() {
    let db = test_db().await;
    let c = db.client().await;
    install(&**c, 10).await;
    let det = detector(db.pool(), None);
    det.migrate().await.unwrap();
    c.batch_execute("UPDATE accounts SET email = 'x' WHERE id = 2")
        .await
        .unwrap();
    let r = det.scan_all(&Control::detached()).await.unwrap();
    assert_eq!(r.issues.len(), 1);
    assert_eq!(r.issues[0].kind, CorruptionKind::Unknown);
    assert_eq!(r.issues[0].severity, Severity::Medium);
    assert!(
        det.check_deletions(&accounts(), &Control::detached())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_are_chunked_parallel_report_progress_and_cancel() {
    let db = test_db().await;
    let c = db.client().await;
    c.batch_execute(DDL).await.unwrap();
    // ~3000 rows over many blocks, checksums computed by the application.
    for i in 1..=3000 {
        upsert(&**c, i, &format!("user{i}@example.com"), None, &balance(i)).await;
    }
    let det = sanare_corruption::CorruptionDetector::builder()
        .pool(db.pool().clone())
        .checksum(Arc::new(Blake3Rows))
        .config({
            let mut cfg = sanare_corruption::DetectorConfig::default();
            cfg.chunk_blocks = 4;
            cfg.parallelism = 3;
            cfg
        })
        .build()
        .unwrap();
    det.migrate().await.unwrap();
    let (control, progress) = Control::new();
    let r = det.scan_table(&accounts(), &control).await.unwrap();
    assert_eq!(r.rows_scanned, 3000);
    assert!(r.chunks > 3, "{}", r.chunks);
    let p = progress.get();
    assert!(p.finished);
    assert_eq!(Some(p.done), p.total);

    let (control, _) = Control::new();
    control.cancel_token().cancel();
    let err = det.scan_table(&accounts(), &control).await.unwrap_err();
    assert!(err.is_cancelled(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_without_a_checksum_column_are_skipped_and_said_so() {
    let db = test_db().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE plain (id int PRIMARY KEY, v text); INSERT INTO plain VALUES (1, 'a')",
    )
    .await
    .unwrap();
    let det = detector(db.pool(), None);
    det.migrate().await.unwrap();
    let r = det.scan_all(&Control::detached()).await.unwrap();
    assert_eq!(r.rows_scanned, 0);
    assert_eq!(r.tables_skipped.len(), 1);
    assert!(r.tables_skipped[0].1.contains("row_checksum"));
}

/// The scan hashes each value's `::text` form, the one the integrity crate and a
/// host hash: blank-padded char(n), boolean, inet and a domain print differently
/// from their COPY output, and still verify.
#[tokio::test]
async fn checksums_written_over_text_forms_verify_on_every_column_type() {
    let db = test_db().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE DOMAIN small_int AS integer CHECK (VALUE < 1000);
         CREATE TABLE odd (id bigint PRIMARY KEY, c char(6), b boolean, ip inet, d small_int,
                           f float8, arr text[], note text, row_checksum bytea);
         INSERT INTO odd VALUES
           (1, 'ab', true, '10.0.0.1', 7, 0.1, '{a,\"b c\",NULL}', 'tab\there', NULL),
           (2, NULL, false, '10.1.0.0/16', NULL, 'NaN', '{}', NULL, NULL),
           (3, '   ', NULL, '::1', 999, -1.5e300, NULL, 'back\\slash', NULL);",
    )
    .await
    .unwrap();
    let cols = ["id", "c", "b", "ip", "d", "f", "arr", "note"];
    let select: Vec<String> = cols.iter().map(|c| format!("{c}::text")).collect();
    c.batch_execute(&sanare_integrity::checksum::canonical_settings_sql())
        .await
        .unwrap();
    for r in c
        .query(&format!("SELECT id, {} FROM odd", select.join(", ")), &[])
        .await
        .unwrap()
    {
        let id: i64 = r.get(0);
        let values: Vec<sanare_core::ColumnValue> = cols
            .iter()
            .enumerate()
            .map(|(i, n)| {
                sanare_core::ColumnValue::new(*n, "text", r.get::<_, Option<String>>(i + 1))
            })
            .collect();
        let sum = sanare_core::RowChecksum::checksum(&Blake3Rows, &values).to_vec();
        c.execute(
            "UPDATE odd SET row_checksum = $1 WHERE id = $2",
            &[&sum, &id],
        )
        .await
        .unwrap();
    }
    let det = detector(db.pool(), None);
    det.migrate().await.unwrap();
    let odd = sanare_core::TableRef::new("public", "odd");
    let r = det.scan_table(&odd, &Control::detached()).await.unwrap();
    assert_eq!(r.rows_scanned, 3);
    assert!(r.issues.is_empty(), "{:?}", r.issues);
    // A boolean flipped outside the application is found; re-padding char(6) is not
    // a change of value.
    c.batch_execute("UPDATE odd SET b = NOT b WHERE id = 2; UPDATE odd SET c = 'ab ' WHERE id = 1")
        .await
        .unwrap();
    let r = det.scan_table(&odd, &Control::detached()).await.unwrap();
    assert_eq!(r.issues.len(), 1, "{:?}", r.issues);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_finds_a_row_damaged_outside_the_application() {
    let db = test_db().await;
    let c = db.client().await;
    install(&**c, 50).await;
    let snaps = Arc::new(FakeSnapshots::default());
    snaps.capture(&**c, &accounts()).await;
    let det = sanare_corruption::CorruptionDetector::builder()
        .pool(db.pool().clone())
        .checksum(Arc::new(Blake3Rows))
        .snapshots(snaps)
        .config({
            let mut cfg = sanare_corruption::DetectorConfig::default();
            cfg.monitor_interval = Duration::from_millis(100);
            cfg
        })
        .build()
        .unwrap();
    det.migrate().await.unwrap();
    let mut events = det.events().subscribe();
    // The first poll (plans and horizon) is done when start_monitor returns: the
    // writes right after it are covered.
    let monitor = det.start_monitor(vec![]).await.unwrap();

    // Application writes (valid checksums) are not issues.
    for i in 1..=20 {
        upsert(&**c, i, &format!("new{i}@example.com"), Some("N"), "1.00").await;
    }
    wait_for(|| monitor.stats().rows_checked >= 20).await;
    assert_eq!(monitor.stats().issues, 0);

    // Kill the monitor's connections: it keeps going.
    c.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .await
    .ok();

    // Damage outside the application: a truncated name on a row the app did not touch.
    c.batch_execute("UPDATE accounts SET full_name = 'Use' WHERE id = 33")
        .await
        .unwrap();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.recv().await {
                Ok(Some(r)) => {
                    if let Event::CorruptionDetected { kind, .. } = r.event {
                        return kind;
                    }
                }
                Ok(None) => panic!("event bus closed"),
                Err(_) => continue,
            }
        }
    })
    .await
    .expect("the monitor did not report the damage within 20 s");
    assert_eq!(found, CorruptionKind::Truncation);
    let stats = monitor.stop().await;
    assert_eq!(stats.issues, 1);
    let issues = det.issues(&IssueQuery::new()).await.unwrap();
    assert_eq!(issues.len(), 1);
    assert_eq!(
        issues[0].row.as_ref().unwrap().key[0].value.as_deref(),
        Some("33")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_database_under_concurrent_writes_yields_no_issues() {
    let db = test_db().await;
    let c = db.client().await;
    install(&**c, 300).await;
    let snaps = Arc::new(FakeSnapshots::default());
    snaps.capture(&**c, &accounts()).await;
    let det = sanare_corruption::CorruptionDetector::builder()
        .pool(db.pool().clone())
        .checksum(Arc::new(Blake3Rows))
        .snapshots(snaps)
        .config({
            let mut cfg = sanare_corruption::DetectorConfig::default();
            cfg.monitor_interval = Duration::from_millis(50);
            cfg.chunk_blocks = 2;
            cfg
        })
        .build()
        .unwrap();
    det.migrate().await.unwrap();
    let monitor = det.start_monitor(vec![]).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut writers = Vec::new();
    for w in 0..2i64 {
        let pool = db.pool().clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let c = pool.get().await.unwrap();
            let mut n = 0u64;
            let mut i = 0i64;
            while !stop.is_cancelled() {
                i += 1;
                let id = 1 + (i * 7 + w) % 400; // updates and inserts
                upsert(
                    &**c,
                    id,
                    &format!("w{w}-{i}@example.com"),
                    Some(&format!("W {i}")),
                    &balance(i),
                )
                .await;
                if i % 10 == 0 {
                    c.execute(
                        "DELETE FROM accounts WHERE id = $1",
                        &[&(1 + (i * 13) % 400)],
                    )
                    .await
                    .unwrap();
                }
                n += 1;
            }
            n
        }));
    }
    let mut rows = 0;
    for _ in 0..5 {
        let r = det
            .scan_table(&accounts(), &Control::detached())
            .await
            .unwrap();
        rows += r.rows_scanned;
        assert!(r.issues.is_empty(), "false positive: {:?}", r.issues);
    }
    wait_for(|| monitor.stats().rows_checked > 200).await;
    stop.cancel();
    let mut writes = 0;
    for w in writers {
        writes += w.await.unwrap();
    }
    let stats = monitor.stop().await;
    assert!(writes > 100, "{writes}");
    assert!(rows > 1000);
    assert_eq!(stats.issues, 0);
    assert!(det.issues(&IssueQuery::new()).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_drift_and_a_row_count_drop_are_flagged() {
    let db = test_db().await;
    let c = db.client().await;
    install(&**c, 100).await;
    let det = detector(db.pool(), None);
    det.migrate().await.unwrap();
    let base = det.capture_baseline(&accounts()).await.unwrap();
    assert_eq!(base.row_count, 100);
    assert!(det.check_statistics(&accounts()).await.unwrap().is_empty());
    c.batch_execute(
        "DELETE FROM accounts WHERE id > 60; UPDATE accounts SET full_name = NULL WHERE id <= 30",
    )
    .await
    .unwrap();
    let issues = det.check_statistics(&accounts()).await.unwrap();
    let t = issues
        .iter()
        .find(|i| i.kind == CorruptionKind::Truncation)
        .expect("row-count drop");
    assert_eq!(t.layer, Layer::Statistics);
    assert_eq!(t.affected["rows"], 60);
    let drift = issues
        .iter()
        .find(|i| i.column.as_deref() == Some("full_name"))
        .expect("null fraction drift");
    assert!(
        drift.description.contains("null fraction"),
        "{}",
        drift.description
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_query_by_date_resolve_trends_and_recovery_analysis() {
    let db = test_db().await;
    let c = db.client().await;
    install(&**c, 20).await;
    let det = detector(db.pool(), None);
    det.migrate().await.unwrap();
    let before = sanare_core::now() - time::Duration::seconds(1);
    c.batch_execute("UPDATE accounts SET email = 'a' WHERE id IN (1, 2)")
        .await
        .unwrap();
    let r = det
        .scan_table(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(r.issues.len(), 2);
    let after = sanare_core::now() + time::Duration::seconds(1);
    let all = det
        .issues(&IssueQuery::new().between(before, after))
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    let none = det
        .issues(&IssueQuery::new().between(before - time::Duration::days(2), before))
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(
        det.resolve(all[0].id, "restored from snapshot")
            .await
            .unwrap()
    );
    assert!(!det.resolve(all[0].id, "again").await.unwrap());
    let open = det.issues(&IssueQuery::new().unresolved()).await.unwrap();
    assert_eq!(open.len(), 1);
    let resolved = det.issues(&IssueQuery::new()).await.unwrap();
    assert!(
        resolved
            .iter()
            .any(|i| i.resolution.as_deref() == Some("restored from snapshot"))
    );

    // Backdate one issue to the first half of a two-day window: the table worsens.
    let t = det.issues(&IssueQuery::new()).await.unwrap();
    c.execute(
        "UPDATE sanare.corruption_issues SET detected_at = now() - interval '36 hours' WHERE id = $1",
        &[&t[0].id.as_uuid()],
    )
    .await
    .unwrap();
    c.batch_execute("UPDATE accounts SET email = 'b' WHERE id IN (3, 4, 5)")
        .await
        .unwrap();
    // Rows 3-5 are new; the resolved row is still damaged, so it is found again.
    let r = det
        .scan_table(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(r.issues.len(), 5);
    let tr = det
        .trends(
            sanare_core::now() - time::Duration::days(2),
            after + time::Duration::seconds(5),
        )
        .await
        .unwrap();
    assert_eq!(tr.by_table[0].key, "public.accounts");
    assert_eq!(tr.by_table[0].count, 6);
    assert_eq!(tr.by_type[0].key, "unknown");
    assert_eq!(tr.by_day.iter().map(|d| d.count).sum::<i64>(), 6);
    assert_eq!(tr.direction, sanare_corruption::Direction::Worsening);
    assert_eq!(tr.worsening_tables, vec![accounts()]);

    // Post-recovery: the recovery repaired row 3 (caught) and row 17 (missed).
    let row = |id: &str| {
        sanare_core::RowRef::new(
            accounts(),
            vec![sanare_core::ColumnValue::new("id", "bigint", Some(id))],
        )
    };
    let found = vec![
        sanare_core::Violation::new(
            ViolationKind::ChecksumMismatch {
                column: "row_checksum".into(),
            },
            Severity::High,
            accounts(),
            Some(row("3")),
            "checksum",
        ),
        sanare_core::Violation::new(
            ViolationKind::ChecksumMismatch {
                column: "row_checksum".into(),
            },
            Severity::High,
            accounts(),
            Some(row("17")),
            "checksum",
        ),
    ];
    let a = det
        .analyze_recovery(before - time::Duration::days(3), &found)
        .await
        .unwrap();
    assert_eq!(a.caught, 1);
    assert_eq!(a.missed.len(), 1);
    assert_eq!(a.missed[0].row, Some(row("17")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_an_issue() {
    let db = test_db().await;
    let c = db.client().await;
    install(&**c, 5).await;
    let snaps = Arc::new(FakeSnapshots::default());
    let det = detector(db.pool(), Some(snaps.clone()));
    det.migrate().await.unwrap();
    assert!(
        det.verify_latest_snapshot(&Control::detached())
            .await
            .unwrap()
            .is_none()
    );
    snaps.capture(&**c, &accounts()).await;
    let ok = det
        .verify_latest_snapshot(&Control::detached())
        .await
        .unwrap()
        .unwrap();
    assert!(ok.is_ok());
    snaps
        .damage
        .lock()
        .unwrap()
        .push("block 3f2a… hash mismatch".into());
    let bad = det
        .verify_latest_snapshot(&Control::detached())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bad.blocks_corrupt, 1);
    let issues = det.issues(&IssueQuery::new()).await.unwrap();
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0].kind, CorruptionKind::Metadata);
    assert_eq!(
        issues[0].affected["problems"][0],
        "block 3f2a… hash mismatch"
    );
}
