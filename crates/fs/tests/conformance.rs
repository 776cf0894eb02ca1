//! Every storage implementation passes the conformance checks.

use sanare_fs::sim::SimDisk;
use sanare_fs::{OsStorage, Storage, conformance};

#[test]
fn the_os_storage_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance::run(&OsStorage, dir.path());
}

#[test]
fn the_simulated_disk_conforms() {
    let disk = SimDisk::new();
    let dir = std::path::Path::new("/sim/root");
    disk.create_dir_all(dir).unwrap();
    conformance::run(&disk, dir);
}
