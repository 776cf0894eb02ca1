//! # sanare
//!
//! Embeddable crash recovery and data healing for Rust services on PostgreSQL.
//!
//! This facade re-exports the shared vocabulary ([`core`]) and wires the components
//! together: configuration ([`SanareConfig`], from TOML and `SANARE__…` variables),
//! migrations at start-up, leader election for scheduled work ([`LeaderLease`]) and
//! chunk jobs any instance can claim ([`JobQueue`]).
//!
//! # Architecture invariant
//!
//! The facade holds no component logic: it builds, wires and schedules. Every
//! behaviour lives in a component crate and reaches other components only through
//! the traits of `sanare-core`.

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod background;
mod builder;
pub mod config;
mod handle;
mod jobs;
mod leader;
mod scheduler;
mod supervise;
mod wire;
mod worker;

/// `#[async_trait]`, to implement the plug-in traits a host gives the builder
/// ([`journal::PgHandler`], [`recovery::ReadinessCheck`], …) without depending on
/// `async-trait` itself.
pub use async_trait::async_trait;
pub use background::{JOB_SCAN_TABLE, JOB_VALIDATE_TABLE, task};
pub use builder::SanareBuilder;
pub use config::SanareConfig;
/// The `deadpool-postgres` whose `Pool` [`SanareBuilder::pool`] takes (its
/// `tokio_postgres` is the one [`journal::PgHandler`] is handed).
pub use deadpool_postgres;
pub use handle::{Sanare, StartupReport};
pub use jobs::{BatchStatus, Job, JobQueue};
pub use leader::LeaderLease;
pub use sanare_core as core;
pub use sanare_core::{Control, Error, Event, EventBus, Result, Severity};
pub use sanare_corruption as corruption;
pub use sanare_integrity as integrity;
pub use sanare_journal as journal;
pub use sanare_recovery as recovery;
pub use sanare_repair as repair;
pub use sanare_snapshot as snapshot;
pub use scheduler::Scheduler;
pub use supervise::BackgroundTaskStatus;
pub use worker::JobWorker;

use sanare_pg::{Migration, Migrations};

/// The facade's own migrations: the job queue and the scheduler's bookkeeping.
pub const MIGRATIONS: Migrations = Migrations::new(
    "sanare",
    &[
        Migration::new(
            1,
            "jobs_and_schedules",
            include_str!("../migrations/V1__jobs_and_schedules.sql"),
        ),
        Migration::new(
            2,
            "supervised_runs",
            include_str!("../migrations/V2__supervised_runs.sql"),
        ),
    ],
);
