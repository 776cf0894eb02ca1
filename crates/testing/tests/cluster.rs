//! A private cluster, as corruption and crash tests use one.

use sanare_testing::cluster::{Cluster, ClusterOptions};

#[test]
fn a_private_cluster_survives_a_kill_and_restarts() {
    let mut cluster = Cluster::start_with(ClusterOptions::default().data_checksums(true))
        .expect("start a cluster");
    assert!(
        cluster
            .url("postgres")
            .contains(&cluster.port().to_string())
    );
    cluster.kill();
    assert!(!cluster.is_running());
    cluster
        .restart()
        .expect("restart after a kill runs crash recovery");
    assert!(cluster.is_running());
    let log = cluster.log();
    assert!(
        log.contains("not properly shut down") || log.contains("automatic recovery"),
        "crash recovery should show in the log:\n{log}"
    );
}
