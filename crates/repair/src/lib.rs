//! The automatic repair engine of sanare: safe, reversible, audited.
//!
//! It turns [`Violation`](sanare_core::Violation)s found by integrity validation or
//! corruption detection into [`RepairPlan`](sanare_core::RepairPlan)s, gates the risky
//! ones behind an approval, runs each in one PostgreSQL transaction that re-checks
//! every row, saves the before-image of every row it changes and moves every row it
//! removes to a quarantine, re-validates before commit, and can undo a completed
//! repair exactly. Every step is recorded in `repair_operations`.
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
//! [`RepairService::plan`](sanare_core::RepairService::plan) (on [`RepairEngine`])
//! gathers facts ([`TableFacts`]) and runs [`decide`]; host strategies registered with
//! [`RepairEngineBuilder::strategy`] are consulted first. The first matching row wins:
//!
//! | row | violation | condition | strategy |
//! |---|---|---|---|
//! | R1 | referential | the missing parent (`details.missing_parent_key`, the parent's primary key) is in the latest good snapshot | RestoreFromSnapshot: re-insert the parent row |
//! | R2 | referential | a journal is attached and `details.idempotency_keys` is non-empty | ReplayTransaction |
//! | R3 | referential | every referencing column is nullable | RemoveOrphanedRecord: set the reference to NULL |
//! | R4 | referential | otherwise | RemoveOrphanedRecord: move the child row to the quarantine |
//! | R9 | unique | always | FixConstraintViolation: keep the lowest primary key of each duplicate group, quarantine the others |
//! | R8 | consistency, check, null, type mismatch | a row is named and `details.recompute` names a configured recompute rule of its column | UpdateInvalidData: recompute the column |
//! | R12 | corruption `index` | an index is named | RebuildIndex (`REINDEX INDEX CONCURRENTLY`) |
//! | R11 | corruption `injection` | a row is named and it is not in the snapshot | DeleteInvalidRecord: quarantine the row |
//! | R13 | corruption `metadata` / `truncation` | no row is named, a snapshot exists | TruncateAndReload |
//! | — | schema | always | manual |
//! | R5 | any other kind | a row is named and it is in the latest good snapshot | RestoreFromSnapshot of the row's damaged columns |
//! | R6 | checksum mismatch, corruption | a row is named, journal entries are named | ReplayTransaction |
//! | R7 | null, type mismatch | a row is named and the column has a default | UpdateInvalidData: set the default |
//! | R7 | check | a row is named, the violation names one column that has a default and a CHECK constraint of the catalog | UpdateInvalidData: set the default |
//! | R10 | null, type mismatch, check | a row is named (and no column fix above applies) | DeleteInvalidRecord: quarantine the row |
//! | — | anything else | | manual (no plan) |
//!
//! Details read from [`Violation::details`](sanare_core::Violation::details):
//! - `missing_parent_key`: an object from each referenced parent column to its value
//!   (`{"id": "9"}`, strings or JSON numbers), used when the referenced columns are the
//!   parent's primary key;
//! - `idempotency_keys`: an array of journal idempotency keys whose replay repairs the
//!   violation;
//! - `recompute`: `{"rule": "<rule name>", "column": "<column>"}`. The rule's SQL
//!   expression comes from the engine's configuration
//!   ([`RepairEngineBuilder::recompute_rule`]), never from the finding; an unknown
//!   name, or a rule of another table or column, gets no automatic repair.
//!
//! Every plan states its preconditions, postconditions, estimated rows (counted by
//! the database), rollback plan and whether it needs approval. A plan needs approval
//! when its severity is at or above [`RepairConfig::approval_severity`] (default
//! High), when it is expected to change more than [`RepairConfig::approval_max_rows`]
//! rows (default 1,000), when it removes rows and
//! [`RepairConfig::removals_need_approval`] (default true), for ReplayTransaction and
//! TruncateAndReload, and when a host strategy says so. Violations with the same
//! table, strategy and operation are one plan, however many batches they arrive in.
//!
//! # Stored work is data
//!
//! A plan is stored as typed data (`repair_operations.action`): the table, its key
//! columns, the operation and what it checks (foreign-key columns, a column, a
//! recompute rule's name, a CHECK constraint's name, a snapshot id, journal
//! idempotency keys, an index name); the rows it covers are keys in
//! `repair_targets`. No SQL text is stored, except a host strategy's, which carries a
//! keyed hash ([`ActionKey`], kept outside the database). When a repair runs, its
//! action is matched against the live catalog and the configuration before anything
//! else runs: a table that is not the plan's or is sanare's own or the system's, a
//! column or constraint that does not exist, a key of the wrong arity or type, an
//! unknown recompute rule or a hash that does not verify is refused with a clear
//! error. SQL is then built from the catalog's names, quoted, with values as bind
//! parameters. Repairs recorded as SQL text by earlier versions are marked
//! `replan_needed` by the migrations and never run.
//!
//! # Execution
//!
//! Row repairs run in one transaction with `lock_timeout` and `statement_timeout`
//! set, a batch of [`RepairConfig::batch_rows`] rows per statement: each batch's rows
//! are locked and re-checked — a row that changed since it was planned (its record
//! text's md5 differs) or no longer violates is skipped and reported, never
//! overwritten — then changed, with before-images written to `repair_undo` and
//! removed rows written whole to `repair_quarantine` by the same statement. After the
//! last batch the violation itself is re-checked over every row of the repair (is
//! the row still orphaned, still null, still a duplicate, still different from its
//! recompute rule or snapshot image, still failing its CHECK constraint, still
//! unchanged); a repair that leaves a row violating rolls back and is recorded
//! `failed`. A restore puts back only the columns the violation names (all columns
//! for a checksum mismatch), of only the rows it names. A dry run runs the very same
//! code and rolls back. A removal that an `ON DELETE CASCADE / SET NULL / SET
//! DEFAULT` foreign key would extend to rows the quarantine does not capture is
//! refused. Re-running a completed repair is a no-op returning its recorded outcome.
//! A critical repair first takes a snapshot of its table through
//! [`SnapshotService::create`](sanare_core::SnapshotService::create).
//!
//! RebuildIndex runs `REINDEX … CONCURRENTLY`, which PostgreSQL cannot run inside a
//! transaction, and ReplayTransaction goes through the journal's own exactly-once
//! transactions (and is then re-checked): neither has an undo log (an index is
//! derived data; the journal is the source of truth), and
//! [`RepairService::rollback`](sanare_core::RepairService::rollback) refuses them.
//!
//! Rollback puts back the before-images and the quarantined rows in one
//! transaction, after checking that no row changed since the repair (it refuses
//! rather than overwrite newer writes). Putting back a row that breaks a foreign key
//! (an orphan) disables that foreign key's triggers on the table for the transaction,
//! and no other trigger; it then verifies every row equals its before-image text and
//! records `rolled_back`. One quarantined row is put back with
//! [`RepairEngine::restore_quarantined`].
//!
//! # Memory
//!
//! Violations are read in batches of [`REPAIR_BATCH`]; a plan holds its count and
//! a sample of its violation ids, never its row keys; row counts for approval are
//! counted by the database; a repair reads its rows a batch at a time; outcomes and
//! records list a bounded sample of rows, and [`RepairEngine::targets`],
//! [`RepairEngine::quarantine`] and [`RepairEngine::history`] page through the rest.
//!
//! # Architecture invariant
//!
//! This crate depends on `sanare-core` and `sanare-pg` only. Snapshots and the journal
//! are reached through [`SnapshotService`](sanare_core::SnapshotService) and
//! [`JournalService`](sanare_core::JournalService), both optional. Host tables are
//! written only inside a repair or rollback transaction that holds the undo record or
//! quarantine row of every row it changes. `blake3` (already the workspace's hash)
//! provides the keyed hash of [`ActionKey`].

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod action;
mod apply;
mod catalog;
mod config;
mod decide;
mod describe;
mod engine;
mod execute;
mod page;
mod plan;
mod quarantine;
mod record;
mod rollback;
mod run;
mod targets;
#[cfg(feature = "testing")]
pub mod testing;
mod whole;

pub use config::{ActionKey, RecomputeRule, RepairConfig};
pub use decide::{CustomStrategy, Decision, RowAction, TableFacts, decide};
pub use engine::{RepairEngine, RepairEngineBuilder, strategy_code};
pub use execute::ValidationReport;
pub use quarantine::QuarantinedRow;
pub use record::RepairRecord;
pub use run::{REPAIR_BATCH, repair_all};
pub use targets::RepairTarget;

use sanare_pg::{Migration, Migrations, SchemaName};

/// The repair engine's tables (`repair_operations`, `repair_undo`, `repair_targets`,
/// `repair_quarantine`), component `repair`.
pub const MIGRATIONS: Migrations = Migrations::new(
    "repair",
    &[
        Migration::new(
            1,
            "repair_operations",
            include_str!("../sql/V1__repair_operations.sql"),
        ),
        Migration::new(
            2,
            "typed_actions_targets_quarantine",
            include_str!("../sql/V2__typed_actions_targets_quarantine.sql"),
        ),
    ],
);

/// Applies [`MIGRATIONS`] in `schema`.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &SchemaName,
) -> sanare_core::Result<sanare_pg::MigrationReport> {
    MIGRATIONS.run(client, schema).await
}

impl RepairEngine {
    /// Gathers the facts about each violation and runs the decision table (host
    /// strategies first), without recording anything.
    pub async fn analyze(
        &self,
        violations: &[sanare_core::Violation],
    ) -> sanare_core::Result<Vec<(Decision, TableFacts)>> {
        plan::Planner::new(self).analyze(violations).await
    }
}
