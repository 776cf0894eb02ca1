//! The physical layer's graceful degradation for a role without amcheck (real
//! damage: `amcheck.rs`).

mod common;

use common::*;
use sanare_core::Control;
use sanare_corruption::AmcheckStatus;
use sanare_testing::test_db;

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
