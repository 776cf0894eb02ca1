//! A false-alarm storm: when a table's checksums fail on (nearly) every row, the
//! cause is the configuration, not corruption. The scan and the monitor report one
//! table-wide mismatch, keep no more suspects than their limit, and record nothing
//! a repair could be planned from — while real damage elsewhere is still found row
//! by row.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sanare_core::{Control, CorruptionKind, TableRef};
use sanare_corruption::{CorruptionDetector, DetectorConfig, IssueQuery, Layer};
use sanare_pg::SchemaName;
use sanare_testing::test_db;

/// `name` with `n` rows whose checksums the SQL trigger keeps (SHA-256), where the
/// detectors here check BLAKE3 (right for `accounts`, whose application writes
/// BLAKE3): a wrong algorithm.
async fn trigger_table(c: &mut tokio_postgres::Client, name: &str, n: i64) -> TableRef {
    let schema = SchemaName::default();
    sanare_integrity::migrate(c, &schema).await.unwrap();
    c.batch_execute(&format!(
        "CREATE TABLE {name} (id bigint PRIMARY KEY, v text, row_checksum bytea)"
    ))
    .await
    .unwrap();
    let table = TableRef::new("public", name);
    sanare_integrity::install_checksum_trigger(&*c, &schema, &table, "row_checksum", false)
        .await
        .unwrap();
    c.batch_execute(&format!(
        "INSERT INTO {name} SELECT g, 'value ' || g FROM generate_series(1, {n}) g"
    ))
    .await
    .unwrap();
    table
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_algorithm_is_one_table_wide_finding_and_real_damage_is_still_found() {
    let db = test_db().await;
    let mut c = db.connect().await;
    install(&c, 100).await;
    let big = trigger_table(&mut c, "big", 1_200).await;
    let tiny = trigger_table(&mut c, "tiny", 5).await;
    c.batch_execute(
        "UPDATE accounts SET email = 'x' WHERE id = 7; UPDATE accounts SET full_name = 'y' WHERE id = 8",
    )
    .await
    .unwrap();
    let det = detector_with(db.pool(), DetectorConfig::default());
    det.migrate().await.unwrap();
    let report = det
        .scan_tables(
            &[accounts(), big.clone(), tiny.clone()],
            &Control::detached(),
        )
        .await
        .unwrap();
    assert_eq!(report.rows_scanned, 1_305);
    assert_eq!(report.suspects, 1_207, "every mismatch is counted");
    let wide: Vec<&TableRef> = report.table_wide.iter().map(|w| &w.table).collect();
    assert_eq!(wide, [&big, &tiny]);
    assert!(
        report.table_wide[0]
            .reason
            .contains("table-wide mismatch: probably configuration, not corruption"),
        "{}",
        report.table_wide[0].reason
    );
    assert_eq!(report.table_wide[0].mismatches, 1_200);

    // Recorded: one row-less finding per storm table, the two real ones row by row.
    let stored = det.issues(&IssueQuery::new()).await.unwrap();
    assert_eq!(stored.len(), 4, "{stored:#?}");
    for t in [&big, &tiny] {
        let mine: Vec<_> = stored.iter().filter(|i| &i.table == t).collect();
        assert_eq!(mine.len(), 1);
        let i = mine[0];
        assert!(i.row.is_none());
        assert_eq!(i.kind, CorruptionKind::Unknown);
        assert_eq!(i.layer, Layer::Checksum);
        assert_eq!(i.affected["table_wide_mismatch"], true);
        assert!(i.recommended_action.contains("no row is repaired"));
        // What the repair engine gets: no row, a kind it plans nothing for.
        assert!(i.to_violation().row.is_none());
    }
    let mut damaged: Vec<String> = stored
        .iter()
        .filter(|i| i.table == accounts())
        .map(|i| i.row.as_ref().unwrap().key[0].value.clone().unwrap())
        .collect();
    damaged.sort();
    assert_eq!(damaged, ["7", "8"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suspect_limit_is_configurable_and_without_a_storm_small_damage_is_rows() {
    let db = test_db().await;
    let c = db.client().await;
    install(&**c, 100).await;
    c.batch_execute("UPDATE accounts SET email = 'x' WHERE id BETWEEN 1 AND 5")
        .await
        .unwrap();
    let mut cfg = DetectorConfig::default();
    cfg.max_suspects_per_table = 3;
    let det = detector_with(db.pool(), cfg);
    det.migrate().await.unwrap();
    let report = det
        .scan_table(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(report.table_wide.len(), 1);
    assert!(
        report.table_wide[0]
            .reason
            .contains("more than the 3 suspects"),
        "{}",
        report.table_wide[0].reason
    );
    assert_eq!(report.issues.len(), 1);
    assert!(report.issues[0].row.is_none());

    // The same damage under the default limit: five row findings.
    let det = detector_with(db.pool(), DetectorConfig::default());
    let report = det
        .scan_table(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert!(report.table_wide.is_empty());
    assert_eq!(report.issues.len(), 5);
    assert!(report.issues.iter().all(|i| i.row.is_some()));

    let mut bad = DetectorConfig::default();
    bad.max_suspects_per_table = 0;
    let err = CorruptionDetector::builder()
        .pool(db.pool().clone())
        .checksum(Arc::new(Blake3Rows))
        .config(bad)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("max_suspects_per_table"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_reports_a_storm_of_changed_rows_once() {
    let db = test_db().await;
    let mut c = db.connect().await;
    let hot = trigger_table(&mut c, "hot", 200).await;
    let mut cfg = DetectorConfig::default();
    cfg.monitor_interval = Duration::from_millis(50);
    let det = detector_with(db.pool(), cfg);
    det.migrate().await.unwrap();
    let monitor = det.start_monitor(vec![hot.clone()]).await.unwrap();
    c.batch_execute("UPDATE hot SET v = v || '!' WHERE id <= 150")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while monitor.stats().rows_checked < 150 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the monitor reads the changed rows");
    let stats = monitor.stop().await;
    let stored = det.issues(&IssueQuery::new()).await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:#?}");
    assert!(stored[0].row.is_none());
    assert_eq!(stored[0].affected["table_wide_mismatch"], true);
    assert_eq!(stats.issues, 1);
}
