//! Crash detection and recovery orchestration for sanare (spec §3.1, §4.1, §6, §8.1).
//!
//! # Detection
//!
//! Nothing is installed unless the host asks. Start-up runs, in order:
//!
//! 1. [`CrashDetector::detect_previous_run`]: reads the shutdown marker, the crash
//!    spool, the boot id and the cgroup OOM-kill count, and classifies how the
//!    previous run ended ([`PreviousRun`], with a [`CrashRecord`] when it crashed);
//! 2. [`CrashStore::record`]: persists the crash into `<schema>.crash_records`;
//! 3. [`CrashDetector::mark_running`]: clears the spool, writes a `running` marker
//!    with the boot id and the OOM-kill count;
//! 4. [`CrashDetector::install_handlers`]: a chained panic hook and a fatal-signal
//!    handler writing to the spool; optionally [`SanareAllocator`] as the binary's
//!    global allocator; [`spawn_supervised`] / [`record_task_panic`] for tokio tasks;
//! 5. at clean exit, [`CrashDetector::mark_clean_shutdown`].
//!
//! Classification, first match wins: an allocation-failure record → `OutOfMemory`;
//! a SIGSEGV/SIGBUS whose fault address lies next to the stack pointer →
//! `StackOverflow`; a panic record → `ApplicationCrash` (type `panic`); any other
//! fatal-signal record → `ApplicationCrash` (type = the signal); a supervised-task
//! panic in a run that then died → `ApplicationCrash`; no record but the boot id
//! changed → `PowerFailure`; same boot and the cgroup `oom_kill` count rose → a
//! kernel OOM kill (`OutOfMemory`); same boot otherwise → `ApplicationCrash` (killed
//! by SIGKILL or an exit without clean shutdown); boot ids not comparable or the
//! marker damaged → `Unknown`. `SystemCrash` is never inferred from local evidence
//! alone: a kernel crash and a power loss look the same from the next boot.
//!
//! # Recovery
//!
//! [`Recovery`] plans and runs the spec §6 steps (backup snapshot, restore the latest
//! good snapshot, replay the journal from its cut, validate, repair, readiness check)
//! through the `sanare-core` service traits only, each optional.
//!
//! # Architecture invariant
//!
//! Crash paths never allocate, lock, or do async work: the spool descriptor and the
//! record buffer are prepared at install time, the signal handler formats into the
//! static buffer and calls only `write`, `fsync`, `clock_gettime`; PostgreSQL is
//! touched only at the next start. This crate reaches the other components only
//! through `sanare-core` traits, and installs no global state unless asked.
//!
//! # Dependencies
//!
//! `crash-handler` (Embark Studios) attaches the fatal-signal handlers on an
//! alternate stack, hooks thread creation so every thread has one, and restores the
//! previous dispositions and re-raises after our callback: subtle, well-tested code
//! we would otherwise hand-write. `crc32c` checksums spool records.

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod capture;
mod detect;
mod marker;
mod recovery;
pub mod spool;
mod store;

pub use capture::{SanareAllocator, allocation_failed, record_task_panic, spawn_supervised};
pub use detect::{
    CrashDetector, CrashDetectorBuilder, CrashRecord, HandlerOptions, PreviousOutcome, PreviousRun,
    SystemState,
};
pub use marker::{
    MARKER_MAGIC_LINE, Marker, MarkerState, own_cgroup_root, read_boot_id, read_oom_kill_count,
};
pub use recovery::{
    Readiness, ReadinessCheck, Recovery, RecoveryBuilder, RecoveryOption, RecoveryOptions,
    RecoveryPlan, RecoveryResult, RecoveryStep, StepOutcome,
};
pub use store::{CrashStore, MIGRATIONS, StoredCrash, migrate};
