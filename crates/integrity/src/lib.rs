//! Integrity validation for sanare: four check families over live PostgreSQL.
//!
//! - **schema**: NOT NULL, CHECK (also `NOT VALID` and `NO INHERIT` ones), domain
//!   constraints (also over other domains), enum labels, varchar lengths, numeric
//!   precision, unique keys that no valid index enforces (invalid, partial and
//!   expression unique indexes, constraints without an index), plus declared
//!   not-null, range, regex, allowed-values and unique rules; all row rules of a table
//!   fused into one pass per chunk;
//! - **referential**: orphans of every foreign key (also `NOT VALID`, deferrable and
//!   `MATCH FULL` ones, and ones whose triggers are disabled) and of declared
//!   relationships, by chunked anti-join;
//! - **checksum**: stored row checksums against ones recomputed over the canonical
//!   row encoding ([`checksum`]), rows streamed by text COPY and hashed here;
//! - **consistency**: business rules as row predicates (fused) or queries
//!   ([`ConsistencyRule`] has helpers for aggregate equality, date order and status
//!   transitions). A rule may name a column a repair recomputes
//!   ([`ConsistencyRule::recompute`]): its findings carry
//!   `details.recompute = {"rule": <name>, "column": <column>}`, never an expression.
//!
//! Entry point: [`Integrity::builder`], which implements
//! [`sanare_core::IntegrityService`]; [`Checksummer`] implements
//! [`sanare_core::RowChecksum`]. Tables: [`MIGRATIONS`] (`integrity_checks`,
//! `integrity_violations`, `integrity_chunks` — the work units of a run and which of
//! them are done, so [`Integrity::resume`] skips them — and the SQL helper of the
//! checksum trigger).
//!
//! # What a run covers
//!
//! Constraint semantics come from the catalog's parsed forms (`pg_get_expr` of a
//! CHECK, `atttypmod`, `pg_get_indexdef` of each index column), never from editing a
//! definition's text. Every table is read with `FROM ONLY`: an inheritance parent's
//! checks judge its own rows and its children are tables of their own, so no row is
//! read twice. A partitioned table in the scope is checked through its partitions;
//! rules declared on it apply to them (row rules, relationships, checksums) or run on
//! it whole (unique keys, queries). Foreign keys are read once (not once more per
//! partition of a partitioned parent), their parent with `ONLY` unless partitioned,
//! as PostgreSQL's own checks do.
//!
//! # How a run reads
//!
//! A coordinator connection opens a `REPEATABLE READ READ ONLY` transaction and
//! exports its snapshot (`pg_export_snapshot`); workers (`parallelism` of them) each
//! run one unit per transaction that imports it (`SET TRANSACTION SNAPSHOT`), so all
//! units see one consistent state. Chunks are primary-key ranges (block ranges of
//! `ctid` for tables without a key), planned from statistics when the table has them
//! and by walking the key otherwise; each sets `statement_timeout` and
//! `lock_timeout`. Every transaction (catalog reads, planning, probes) runs under the
//! canonical output settings, so a key or a constant printed in one parses back to
//! the same value in another whatever the server's, database's or role's settings.
//! After `snapshot_max_age` the coordinator commits and exports a fresh snapshot, so
//! a long scan never pins one xmin for its whole duration. Every transaction is a
//! [`sanare_pg::TxGuard`]: no pooled connection goes back to the pool inside one, on
//! error, cancellation or panic.
//!
//! # Findings stream
//!
//! A probe streams its rows; its suspects go to a spill that keeps one batch
//! ([`IntegrityConfig::batch_size`]) in memory and the rest in an anonymous
//! temporary file. After the scan, the suspects are re-read a batch at a time in a
//! fresh snapshot and reported only if they still fail there (concurrent writes never
//! produce a false positive); each batch's violations go to `integrity_violations`
//! in one statement, to the run's JSON-lines file and to the event bus. What a run
//! holds in memory is bounded by the batch size, not by what it finds. Readers page:
//! [`Integrity::query_violations`] (one page after a given id),
//! [`Integrity::violations_matching`], and the exports
//! ([`Integrity::export_json`], [`Integrity::export_csv`]) write as they read.
//!
//! # Stored work is data
//!
//! A run is a list of work units per table (its chunks, then one unit per whole-table
//! probe), stored in `integrity_chunks` before they run as typed data (format
//! `sanare-integrity-unit`, `docs/formats.md`): key ranges, block ranges, key lists,
//! never SQL. A unit is marked done after its last batch; [`Integrity::resume`] of a
//! cancelled, failed or interrupted run checks every stored unit against the live
//! catalog before anything runs (refusing a mismatch), deletes what unfinished units
//! wrote, runs them again and ends with the report an uninterrupted run gives. The
//! SQL of a unit is built when it runs: identifiers from the live catalog, values as
//! bind parameters.
//!
//! # Architecture invariant
//!
//! Validation only reads host tables, with plain `SELECT`/`COPY … TO`, so it takes no
//! lock stronger than AccessShareLock; it writes only to sanare's own schema. This
//! crate depends on `sanare-core` and `sanare-pg`, never on another component.
//!
//! # Dependencies
//!
//! `blake3` (the default checksum, fast and keyable), `sha2` (the checksum PostgreSQL
//! computes with built-in `sha256()`, so a trigger can maintain it), `toml` (rule
//! files), `tempfile` (the anonymous spill files of units with many suspects, removed
//! by the system even when the process dies).

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod catalog;
pub mod checksum;
mod chunking;
mod config;
mod finding;
mod plan;
mod probe;
pub mod report;
pub mod rules;
mod service;
mod spill;
mod units;

pub use checksum::{
    CANONICAL_SETTINGS, ChecksumAlgorithm, Checksummer, ENCODING_VERSION, RowHasher,
    install_checksum_trigger,
};
pub use config::{IntegrityBuilder, IntegrityConfig};
pub use report::{CheckStatus, FamilyResult, IntegrityReport, JsonWriter, ReportDocument};
pub use rules::{Bound, ConsistencyRule, Rules, RulesBuilder};
pub use service::{Integrity, ViolationQuery};

use sanare_pg::{Migration, Migrations, SchemaName};

/// The integrity component's migrations (component name `integrity`).
pub const MIGRATIONS: Migrations = Migrations::new(
    "integrity",
    &[
        Migration::new(
            1,
            "create_integrity_tables",
            r"CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE {schema}.integrity_checks (
    id                     uuid PRIMARY KEY,
    started_at             timestamptz NOT NULL,
    finished_at            timestamptz,
    status                 text NOT NULL CHECK (status IN ('running', 'completed', 'cancelled', 'failed')),
    scope                  jsonb NOT NULL,
    tables_checked         bigint NOT NULL DEFAULT 0,
    rows_checked           bigint NOT NULL DEFAULT 0,
    violations_total       bigint NOT NULL DEFAULT 0,
    violations_by_severity jsonb NOT NULL DEFAULT '{}',
    report                 jsonb,
    error                  text
);
CREATE INDEX integrity_checks_started_idx ON {schema}.integrity_checks (started_at DESC);
CREATE TABLE {schema}.integrity_violations (
    id                 uuid PRIMARY KEY,
    check_id           uuid NOT NULL REFERENCES {schema}.integrity_checks (id) ON DELETE CASCADE,
    table_schema       text NOT NULL,
    table_name         text NOT NULL,
    violation_type     text NOT NULL,
    severity           text NOT NULL,
    row_key            jsonb,
    description        text NOT NULL,
    recommended_action text NOT NULL,
    detected_at        timestamptz NOT NULL,
    violation          jsonb NOT NULL,
    resolved_at        timestamptz
);
CREATE INDEX integrity_violations_check_idx ON {schema}.integrity_violations (check_id, id);
CREATE INDEX integrity_violations_table_idx ON {schema}.integrity_violations (table_schema, table_name, violation_type);
CREATE FUNCTION {schema}.row_checksum_field(v text) RETURNS bytea
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN v IS NULL THEN '\x00'::bytea
                ELSE '\x01'::bytea || int4send(octet_length(convert_to(v, 'UTF8'))) || convert_to(v, 'UTF8') END;",
        ),
        Migration::new(
            2,
            "create_integrity_chunks",
            r"CREATE TABLE {schema}.integrity_chunks (
    check_id     uuid NOT NULL REFERENCES {schema}.integrity_checks (id) ON DELETE CASCADE,
    table_schema text NOT NULL,
    table_name   text NOT NULL,
    unit         integer NOT NULL,
    predicate    text NOT NULL,
    done_at      timestamptz,
    rows_checked bigint NOT NULL DEFAULT 0,
    families     jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (check_id, table_schema, table_name, unit)
);",
        ),
        Migration::new(
            3,
            "integrity_units_as_data",
            r"ALTER TABLE {schema}.integrity_chunks ADD COLUMN work jsonb;
ALTER TABLE {schema}.integrity_chunks ADD COLUMN replan_needed boolean NOT NULL DEFAULT false;
UPDATE {schema}.integrity_chunks SET replan_needed = true;
ALTER TABLE {schema}.integrity_chunks DROP COLUMN predicate;
ALTER TABLE {schema}.integrity_chunks ADD CONSTRAINT integrity_chunks_work_or_replan
    CHECK (replan_needed OR work IS NOT NULL);
ALTER TABLE {schema}.integrity_violations ADD COLUMN unit integer;
ALTER TABLE {schema}.integrity_violations ALTER COLUMN violation TYPE json USING violation::json;
ALTER TABLE {schema}.integrity_violations DROP CONSTRAINT integrity_violations_pkey;
ALTER TABLE {schema}.integrity_violations ADD PRIMARY KEY (check_id, id);
DROP INDEX {schema}.integrity_violations_check_idx;",
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
