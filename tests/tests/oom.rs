//! A service that runs out of memory is classified as such at its next start.
//!
//! This binary wraps the global allocator with sanare's, which flags an allocation
//! failure before the runtime aborts; the test re-executes itself as the service.

use std::path::PathBuf;
use std::process::Command;

use sanare::Sanare;
use sanare::core::CrashKind;
use sanare::recovery::SanareAllocator;

#[global_allocator]
static GLOBAL: SanareAllocator = SanareAllocator::system();

const DIR: &str = "SANARE_E2E_OOM_DIR";
const BOOT: &str = "SANARE_E2E_OOM_BOOT";

async fn service(url: &str, dir: &std::path::Path, boot: &std::path::Path) -> Sanare {
    Sanare::builder()
        .database_url(url)
        .data_dir(dir)
        .boot_id_path(boot)
        .background(false)
        .install_crash_handlers()
        .build()
        .await
        .expect("the service starts")
}

/// In a child: starts the service under a 4 GiB address-space limit, then asks
/// for 8 GiB. Ignored in a normal run (it is not a test of its own).
#[test]
#[ignore = "the child process of this file's tests: they run it, it is not a test of its own"]
fn oom_child_entry() {
    let dir = std::env::var(DIR)
        .expect("a child entry: run by this file's tests (with --ignored), not on its own");
    let boot = PathBuf::from(std::env::var(BOOT).unwrap());
    let url = std::env::var("DATABASE_URL").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _sanare = service(&url, std::path::Path::new(&dir), &boot).await;
        // SAFETY: lowering this process's own address-space limit.
        unsafe {
            let lim = libc::rlimit {
                rlim_cur: 4 << 30,
                rlim_max: libc::RLIM_INFINITY,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &lim), 0);
        }
        let v: Vec<u8> = vec![0u8; 8 << 30];
        std::hint::black_box(&v);
        unreachable!("the allocation fails");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_memory_is_classified_at_the_next_start() {
    let db = sanare_testing::test_db().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let boot = tmp.path().join("boot_id");
    std::fs::write(&boot, "cccccccc-3333-3333-3333-333333333333\n").unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "oom_child_entry",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR, &dir)
        .env(BOOT, &boot)
        .env("DATABASE_URL", db.url())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the service died");

    let sanare = service(db.url(), &dir, &boot).await;
    let crash = sanare
        .startup_report()
        .crash()
        .expect("the crash is detected");
    assert_eq!(crash.kind, CrashKind::OutOfMemory, "{crash:?}");
    let stored = sanare.crashes().get(crash.id).await.unwrap();
    assert_eq!(stored.crash.kind, CrashKind::OutOfMemory);
    sanare.shutdown().await.unwrap();
}
