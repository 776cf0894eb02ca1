//! The physical layer against real damage in a throwaway cluster, and its graceful
//! degradation for a role without amcheck.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};

use common::*;
use sanare_core::{Control, CorruptionKind};
use sanare_corruption::{AmcheckStatus, Layer};
use sanare_testing::cluster::{Cluster, ClusterOptions};
use sanare_testing::test_db;

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

fn flip(path: &std::path::Path, offset: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut b = [0u8; 16];
    f.read_exact(&mut b).unwrap();
    for x in &mut b {
        *x ^= 0xff;
    }
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_heap_and_index_pages_are_found_through_amcheck() {
    let mut cluster = tokio::task::block_in_place(|| {
        Cluster::start_with(ClusterOptions::default().data_checksums(true))
    })
    .unwrap();
    let admin = connect(&cluster.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE damage").await.unwrap();
    let url = cluster.url("damage");
    let (heap, index) = {
        let c = connect(&url).await;
        install(&c, 400).await;
        c.batch_execute("CHECKPOINT").await.unwrap();
        let heap: String = c
            .query_one("SELECT pg_relation_filepath('accounts')", &[])
            .await
            .unwrap()
            .get(0);
        let index: String = c
            .query_one("SELECT pg_relation_filepath('accounts_email')", &[])
            .await
            .unwrap()
            .get(0);
        (heap, index)
    };
    tokio::task::block_in_place(|| cluster.stop());
    // Heap block 1 (past the page header), index block 1 (a leaf; block 0 is the meta page).
    flip(&cluster.data_dir().join(&heap), 8192 + 4000);
    flip(&cluster.data_dir().join(&index), 8192 + 4000);
    tokio::task::block_in_place(|| cluster.restart()).unwrap();

    let pool = sanare_pg::connect_pool(&url, 4).unwrap();
    let det = detector(&pool, None);
    det.migrate().await.unwrap();
    let report = det
        .check_physical(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert!(
        matches!(report.amcheck, AmcheckStatus::Available { .. }),
        "{:?}",
        report.amcheck
    );
    let heap_issue = report
        .issues
        .iter()
        .find(|i| i.kind == CorruptionKind::Metadata)
        .unwrap_or_else(|| panic!("no heap issue: {:?}", report.issues));
    assert_eq!(heap_issue.layer, Layer::Physical);
    assert!(
        heap_issue.description.contains("block"),
        "{}",
        heap_issue.description
    );
    let idx = report
        .issues
        .iter()
        .find(|i| i.kind == CorruptionKind::Index)
        .unwrap_or_else(|| panic!("no index issue: {:?}", report.issues));
    assert_eq!(idx.index.as_deref(), Some("accounts_email"));
    assert!(
        report
            .indexes_checked
            .contains(&"public.accounts_pkey".to_owned())
    );

    // The server counted the checksum failures.
    let failures = det
        .check_checksum_failures()
        .await
        .unwrap()
        .expect("checksum failures");
    assert_eq!(failures.kind, CorruptionKind::Metadata);
    assert!(failures.affected["checksum_failures"].as_i64().unwrap() >= 1);

    // A periodic checksum scan does not abort on the damaged block: it reports it.
    let scan = det
        .scan_table(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert!(
        scan.issues.iter().any(|i| i.layer == Layer::Physical),
        "{:?}",
        scan.issues
    );
    drop(pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_role_degrades_gracefully_and_says_why() {
    let db = test_db().await;
    let c = db.client().await;
    install(&**c, 20).await;
    let role = format!("corr_{}", &db.name()[db.name().len() - 8..]);
    c.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN; GRANT SELECT ON accounts TO {role}; GRANT USAGE, CREATE ON SCHEMA public TO {role};"
    ))
    .await
    .unwrap();
    let mut cfg: tokio_postgres::Config = db.url().parse().unwrap();
    cfg.user(&role);
    let mgr = deadpool_postgres::Manager::new(cfg, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(mgr)
        .max_size(2)
        .build()
        .unwrap();
    let det = detector(&pool, None);

    // Not installed, and this role cannot install it.
    let status = det.amcheck_status().await.unwrap();
    let AmcheckStatus::Unavailable { reason } = status else {
        panic!("{status:?}")
    };
    assert!(reason.contains("CREATE EXTENSION amcheck"), "{reason}");

    // Installed, but not granted.
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        .await
        .unwrap();
    let AmcheckStatus::Unavailable { reason } = det.amcheck_status().await.unwrap() else {
        panic!()
    };
    assert!(reason.contains("GRANT EXECUTE"), "{reason}");
    // A physical check still returns a report, with nothing checked.
    // Migrations run as the owner; the detector's role only uses the tables.
    detector(db.pool(), None).migrate().await.unwrap();
    c.batch_execute(&format!(
        "GRANT USAGE ON SCHEMA sanare TO {role}; GRANT ALL ON ALL TABLES IN SCHEMA sanare TO {role}"
    ))
    .await
    .unwrap();
    let r = det
        .check_physical(&accounts(), &Control::detached())
        .await
        .unwrap();
    assert_eq!(r.heap_blocks_checked, 0);
    assert!(r.issues.is_empty());
    drop(pool);
    c.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}
