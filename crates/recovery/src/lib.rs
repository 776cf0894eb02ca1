//! Crash detection and recovery orchestration for sanare (spec §3.1, §4.1, §6, §8.1).
//!
//! # Detection
//!
//! Nothing is installed unless the host asks. Start-up runs, in order:
//!
//! 1. [`CrashDetector::builder`]`…build()`: takes the exclusive [`DataDirLock`] of
//!    the data directory before anything in it is read. A second process on the
//!    same directory gets [`Error::Conflict`](sanare_core::Error::Conflict) and
//!    changes nothing (it would otherwise read the live first one's marker as a
//!    crash and clear its spool);
//! 2. [`CrashDetector::detect_previous_run`]: reads the shutdown marker (with the
//!    run id and the last heartbeat), the crash spool, the boot id and the cgroup
//!    OOM-kill count, and classifies how the previous run ended ([`PreviousRun`],
//!    with a [`CrashRecord`] when it crashed; the rules are below);
//! 3. [`CrashStore::record_run`]: persists the crash into `<schema>.crash_records`
//!    and every spool record of the run into `<schema>.crash_incidents` — the
//!    panics a clean run caught are kept too. The crash id is the run id, so a start
//!    that dies half-way and starts again records the same crash once;
//! 4. [`CrashDetector::mark_running`]: clears the spool, writes a `running` marker
//!    with a new run id, the boot id and the OOM-kill count;
//!    [`CrashDetector::start_heartbeat`] rewrites it every few seconds with the time,
//!    so the next start knows when this run was last alive;
//! 5. [`CrashDetector::install_handlers`]: a chained panic hook and a fatal-signal
//!    handler writing to the spool; optionally [`SanareAllocator`] as the binary's
//!    global allocator; [`spawn_supervised`] / [`record_task_panic`] for tokio tasks;
//! 6. at clean exit, [`CrashDetector::mark_clean_shutdown`].
//!
//! Classification: the record of an event the run did not outlive is the cause
//! (a heartbeat written after a record proves the run went on: the heartbeat keeps
//! quiet for a second after every incident, so a caught panic or a handled
//! `try_reserve` failure never hides a later kill or power loss). Among those,
//! first match wins: an allocation failure → `OutOfMemory`; a SIGSEGV/SIGBUS whose
//! fault address lies next to the stack pointer → `StackOverflow`; a panic →
//! `ApplicationCrash` (type `panic`); any other fatal signal → `ApplicationCrash`
//! (type = the signal). With no such record: the boot id changed → `PowerFailure`;
//! same boot and the cgroup `oom_kill` count rose → a kernel OOM kill
//! (`OutOfMemory`); same boot otherwise → `ApplicationCrash` (killed by SIGKILL or
//! an exit without clean shutdown); boot ids not comparable or the marker damaged
//! → `Unknown`. `SystemCrash` is never inferred from local evidence alone: a kernel
//! crash and a power loss look the same from the next boot. `crashed_at` is the
//! fatal record's time, else the run's last sign of life.
//!
//! # Recovery
//!
//! [`Recovery`] plans and runs the recovery through the `sanare-core` service
//! traits only, each optional. **Do no harm:** PostgreSQL's own crash recovery is
//! the authority on committed data. A crash kind is a hint for how deep to look,
//! never a reason to overwrite data. After any crash the automatic plan
//! ([`RecoveryOption::Auto`]) replays the journal entries not yet applied,
//! validates and scans for corruption (pages and indexes too when the host itself
//! went down) within the recovery time target, repairs only what those checks
//! found through [`RepairService::repair_all`](sanare_core::RepairService::repair_all),
//! and checks readiness. A whole table is restored only when the operator chooses
//! it ([`RecoveryOption::RestoreLatestSnapshot`]) or when the scan finds the table
//! damaged beyond row repair — and then only those tables, after a backup snapshot
//! of their current state named in the recovery's record, so
//! [`Recovery::undo`] (`sanare recover --undo <id>`) returns to before. Every run
//! is kept in `<schema>.recoveries`.
//!
//! # Architecture invariant
//!
//! Crash paths never allocate, lock, or do async work: the spool descriptor and the
//! record buffer are prepared at install time, the signal handler formats into the
//! static buffer and calls only `write`, `fsync`, `clock_gettime`; PostgreSQL is
//! touched only at the next start. The heartbeat is a plain thread outside every
//! crash path. This crate reaches the other components only through `sanare-core`
//! traits, and installs no global state unless asked.
//!
//! # Dependencies
//!
//! `crash-handler` (Embark Studios) attaches the fatal-signal handlers on an
//! alternate stack, hooks thread creation so every thread has one, and restores the
//! previous dispositions and re-raises after our callback: subtle, well-tested code
//! we would otherwise hand-write. `crc32c` checksums spool records. `rustix` takes
//! the data directory's `flock` without `unsafe`.

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod capture;
mod classify;
mod detect;
mod heartbeat;
mod lock;
mod marker;
mod plan;
mod recovery;
pub mod spool;
mod steps;
mod store;
mod types;
mod undo;

pub use capture::{SanareAllocator, allocation_failed, record_task_panic, spawn_supervised};
pub use detect::{CrashDetector, CrashDetectorBuilder};
pub use lock::DataDirLock;
pub use marker::{
    MARKER_MAGIC_LINE, Marker, MarkerState, own_cgroup_root, read_boot_id, read_oom_kill_count,
};
pub use plan::{
    Readiness, RecoveryOption, RecoveryOptions, RecoveryPlan, RecoveryResult, RecoveryStep,
    StepOutcome,
};
pub use recovery::{ReadinessCheck, Recovery, RecoveryBuilder};
pub use store::{CrashStore, MIGRATIONS, StoredCrash, StoredIncident, StoredRecovery, migrate};
pub use types::{CrashRecord, HandlerOptions, PreviousOutcome, PreviousRun, SystemState};
