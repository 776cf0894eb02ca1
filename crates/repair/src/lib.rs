//! The automatic repair engine of sanare: safe, reversible, audited.
//!
//! It turns [`Violation`](sanare_core::Violation)s found by integrity validation or
//! corruption detection into [`RepairPlan`](sanare_core::RepairPlan)s, gates the risky
//! ones behind an approval, runs each in one PostgreSQL transaction that first saves
//! the before-image of every row it touches, re-validates before commit, and can undo
//! a completed repair exactly. Every step is recorded in `repair_operations`.
//!
//! ```no_run
//! # async fn demo(pool: sanare_pg::Pool, violations: Vec<sanare_core::Violation>) -> sanare_core::Result<()> {
//! use sanare_core::{Control, ExecuteOptions, RepairService};
//! use sanare_repair::RepairEngine;
//!
//! let engine = RepairEngine::builder().pool(pool).build()?;
//! engine.migrate().await?;
//! for plan in engine.plan(&violations).await? {
//!     if plan.requires_approval {
//!         engine.approve(plan.id, "alice").await?;
//!     }
//!     let preview = engine.execute(plan.id, ExecuteOptions::dry_run(), &Control::detached()).await?;
//!     println!("would change {} row(s)", preview.rows_affected);
//!     engine.execute(plan.id, ExecuteOptions::new(), &Control::detached()).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Decision table
//!
//! [`RepairService::plan`](sanare_core::RepairService::plan) (on [`RepairEngine`]) gathers facts ([`TableFacts`]) and runs [`decide`]; host
//! strategies registered with [`RepairEngineBuilder::strategy`] are consulted first.
//! The first matching row wins:
//!
//! | row | violation | condition | strategy |
//! |---|---|---|---|
//! | R1 | referential | the missing parent (`details.missing_parent_key`) is in the latest good snapshot | RestoreFromSnapshot of the parent row |
//! | R2 | referential | a journal is attached and `details.idempotency_keys` is non-empty | ReplayTransaction |
//! | R3 | referential | every referencing column is nullable | RemoveOrphanedRecord: set the reference to NULL |
//! | R4 | referential | otherwise | RemoveOrphanedRecord: delete the child row |
//! | R9 | unique | always | FixConstraintViolation: keep the lowest primary key of each duplicate group, delete the others |
//! | R8 | consistency | `details.recompute` is given | UpdateInvalidData: recompute the column |
//! | R12 | corruption `index` | an index is named | RebuildIndex (`REINDEX INDEX CONCURRENTLY`) |
//! | R11 | corruption `injection` | a row is named and it is not in the snapshot | DeleteInvalidRecord |
//! | R13 | corruption `metadata` / `truncation` | no row is named, a snapshot exists | TruncateAndReload |
//! | — | schema | always | manual |
//! | R5 | any other kind | a row is named and it is in the latest good snapshot | RestoreFromSnapshot of that row |
//! | R6 | checksum mismatch, corruption | a row is named, journal entries are named | ReplayTransaction |
//! | R7 | null, type mismatch | a row is named and the column has a default | UpdateInvalidData: set the default |
//! | R10 | null, type mismatch, check | a row is named | DeleteInvalidRecord |
//! | — | anything else | | manual (no plan) |
//!
//! Details read from [`Violation::details`](sanare_core::Violation::details):
//! - `missing_parent_key`: an object from each referenced parent column to its value
//!   (`{"id": "9"}`, strings or JSON numbers), used when the referenced columns are the
//!   parent's primary key;
//! - `idempotency_keys`: an array of journal idempotency keys whose replay repairs the
//!   violation;
//! - `recompute`: `{"column": "total_cents", "expression": "<SQL over the row aliased t>"}`
//!   for consistency rules. The expression is SQL from a trusted component, never from
//!   an end user.
//!
//! Every plan states its preconditions, postconditions, estimated rows (an exact
//! count at plan time), rollback plan and whether it needs approval. A plan needs
//! approval when its severity is at or above [`RepairConfig::approval_severity`]
//! (default High), when it is expected to change more than
//! [`RepairConfig::approval_max_rows`] rows (default 1,000), for ReplayTransaction and
//! TruncateAndReload (which cannot be undone from the undo log, or touch a whole
//! table), and when a host strategy says so. Violations with the same table,
//! strategy and operation are grouped into one plan.
//!
//! # Execution
//!
//! Row strategies run in one transaction with `lock_timeout` and `statement_timeout`
//! set: the rows are locked and their before-images (`row::text`, PostgreSQL's
//! lossless record text) written to `repair_undo` in that transaction, the change is
//! applied, the violation's predicate is re-counted (a repair that leaves a matching
//! row rolls back and is recorded `failed`), and the status becomes `completed` in the
//! same commit. A dry run runs the very same code and rolls back, reporting the exact
//! rows. A delete that an `ON DELETE CASCADE / SET NULL / SET DEFAULT` foreign key would
//! extend to rows the undo log does not capture is refused. Re-running a completed
//! repair is a no-op returning its recorded outcome. A critical repair first takes a
//! snapshot of its table through [`SnapshotService::create`](sanare_core::SnapshotService::create).
//!
//! RebuildIndex runs `REINDEX … CONCURRENTLY`, which PostgreSQL cannot run inside a
//! transaction, and ReplayTransaction goes through the journal's own exactly-once
//! transactions: neither has an undo log (an index is derived data; the journal is the
//! source of truth), and [`RepairService::rollback`](sanare_core::RepairService::rollback)
//! refuses them.
//!
//! Rollback re-applies the before-images in one transaction, after checking that no
//! row changed since the repair (it refuses rather than overwrite newer writes), with
//! `session_replication_role = replica` when the role may set it so rows that broke a
//! foreign key (deleted orphans) come back exactly; it verifies every restored row
//! equals its before-image text and records `rolled_back` with a rollback log.
//!
//! # Architecture invariant
//!
//! This crate depends on `sanare-core` and `sanare-pg` only. Snapshots and the journal
//! are reached through [`SnapshotService`](sanare_core::SnapshotService) and
//! [`JournalService`](sanare_core::JournalService), both optional. Host tables are
//! written only inside a repair or rollback transaction that holds the undo record of
//! every row it changes.

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod decide;
mod engine;
mod run;
mod sql;
#[cfg(feature = "testing")]
pub mod testing;

pub use decide::{CustomStrategy, Decision, RowAction, TableFacts, decide};
pub use engine::{
    RepairConfig, RepairEngine, RepairEngineBuilder, RepairRecord, ValidationReport, strategy_code,
};
pub use run::{REPAIR_BATCH, repair_all};

use sanare_pg::{Migration, Migrations, SchemaName};

/// The repair engine's tables (`repair_operations`, `repair_undo`), component `repair`.
pub const MIGRATIONS: Migrations = Migrations::new(
    "repair",
    &[Migration::new(
        1,
        "repair_operations",
        include_str!("../sql/V1__repair_operations.sql"),
    )],
);

/// Applies [`MIGRATIONS`] in `schema`.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &SchemaName,
) -> sanare_core::Result<sanare_pg::MigrationReport> {
    MIGRATIONS.run(client, schema).await
}
