//! Incremental snapshots of changes spread over a table, against a real server:
//! changed blocks are stored as deltas against the previous snapshot's, every
//! snapshot restores row for row, and the bases a snapshot needs outlive the
//! snapshots that first stored them.

use std::time::Duration;

use sanare_core::{Control, RestoreRequest, SnapshotService};

mod fixtures;
use fixtures::env;

const TABLES: &str = "
    CREATE SCHEMA z;
    CREATE TABLE z.event (id bigint PRIMARY KEY, at timestamptz, kind text, body text, amount numeric(12, 2));
    INSERT INTO z.event
    SELECT g, timestamptz '2025-01-01 00:00+00' + g * interval '17 seconds',
           (ARRAY['login', 'purchase', 'refund', 'logout', 'search'])[1 + g % 5],
           md5(g::text) || ' ' || repeat(chr(97 + g % 26), 5 + g % 40) || ' ' || md5((g * 7)::text),
           (g * 37 % 100000) / 100.0
      FROM generate_series(1, 30000) g;
    CREATE TABLE z.tag (event_id bigint, tag text);
    INSERT INTO z.tag SELECT g, 'tag ' || (g % 97) FROM generate_series(1, 20000) g;";

/// Updates about 1 % of the rows of both tables, spread over them.
const SPREAD: &str = "
    UPDATE z.event SET amount = amount + 1, kind = 'changed' WHERE id % 100 = {n};
    UPDATE z.tag SET tag = tag || ' changed' WHERE event_id % 100 = {n};";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_changes_are_stored_as_small_deltas_and_every_snapshot_restores() {
    let e = env(TABLES).await;
    let v1 = e.rows("z").await;
    let full = e.capture(&["z"]).await;
    e.exec(&SPREAD.replace("{n}", "7")).await;
    let v2 = e.rows("z").await;
    let second = e.capture(&["z"]).await;
    e.exec(&SPREAD.replace("{n}", "42")).await;
    let v3 = e.rows("z").await;
    let third = e.capture(&["z"]).await;
    // Nearly every block changed (a block holds about 150 rows), yet each
    // incremental stores a few percent of the full snapshot.
    for inc in [&second, &third] {
        let pct = 100.0 * inc.stored_bytes as f64 / full.stored_bytes as f64;
        assert!(pct < 8.0, "{pct:.1} % of the full snapshot stored");
    }
    // Blocks stored as deltas reference their bases.
    let ids = e.snaps.block_ids(third.id).await.unwrap();
    let first_ids = e.snaps.block_ids(full.id).await.unwrap();
    assert!(
        ids.intersection(&first_ids).count() > 10,
        "bases of the first snapshot"
    );

    for (snap, want) in [(&third, &v3), (&full, &v1), (&second, &v2)] {
        e.restore(RestoreRequest::new(snap.id)).await.unwrap();
        assert_eq!(&e.rows("z").await, want);
    }

    // The first snapshot goes; its blocks the others use as bases stay.
    e.snaps.delete(full.id).await.unwrap();
    e.snaps.delete(second.id).await.unwrap();
    let gc = e
        .snaps
        .gc(Duration::ZERO, &Control::detached())
        .await
        .unwrap();
    assert!(gc.blocks_deleted > 0, "{gc:?}");
    // The third snapshot's small pack of deltas is merged like any other, its
    // deltas checked against their bases (not taken for damage).
    assert_eq!(gc.packs_kept_damaged, 0, "{gc:?}");
    let report = e
        .snaps
        .verify(third.id, &Control::detached())
        .await
        .unwrap();
    assert!(report.is_ok(), "{report:?}");
    e.restore(RestoreRequest::new(third.id)).await.unwrap();
    assert_eq!(e.rows("z").await, v3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_base_fails_the_restore_of_its_deltas_and_changes_nothing() {
    let e = env(TABLES).await;
    let full = e.capture(&["z"]).await;
    e.exec(&SPREAD.replace("{n}", "3")).await;
    let inc = e.capture(&["z"]).await;
    // A base: a block of the first snapshot the second references.
    let first = e.snaps.block_ids(full.id).await.unwrap();
    let second = e.snaps.block_ids(inc.id).await.unwrap();
    let only_second: Vec<_> = second.difference(&first).copied().collect();
    let store = e.snaps.store().clone();
    let mut base = None;
    for id in &only_second {
        let loc = e.snaps.locate(*id).await.unwrap().unwrap();
        let object = store
            .get_range(&loc.key, loc.offset..loc.offset + loc.len)
            .await
            .unwrap()
            .unwrap();
        if let Some(b) = sanare_snapshot::format::delta_base(&object) {
            base = Some(b);
            break;
        }
    }
    let base = base.expect("a changed block stored as a delta");
    let loc = e.snaps.locate(base).await.unwrap().unwrap();
    let dir = store.list("packs/").await.unwrap();
    assert!(dir.iter().any(|o| o.key == loc.key));
    let bytes = store.get(&loc.key).await.unwrap().unwrap();
    let mut bytes = bytes.to_vec();
    bytes[(loc.offset + loc.len - 3) as usize] ^= 0x10;
    store.put(&loc.key, bytes.into()).await.unwrap();

    e.exec("DELETE FROM z.tag WHERE event_id < 100").await;
    let before = e.rows("z").await;
    let err = e.restore(RestoreRequest::new(inc.id)).await.unwrap_err();
    assert!(err.to_string().contains(&base.to_string()), "{err}");
    assert_eq!(e.rows("z").await, before);
    // GC leaves the pack holding the damaged base as it is, and says so.
    e.snaps.delete(full.id).await.unwrap();
    let gc = e
        .snaps
        .gc(Duration::ZERO, &Control::detached())
        .await
        .unwrap();
    assert!(gc.packs_kept_damaged >= 1, "{gc:?}");
}
