//! Integrity validation for sanare: four check families over live PostgreSQL.
//!
//! - **schema**: NOT NULL, CHECK (also `NOT VALID` ones), domain constraints, varchar
//!   lengths, numeric precision, UNIQUE / primary keys, plus declared not-null, range,
//!   regex and allowed-values rules, all row rules of a table fused into one pass per
//!   chunk;
//! - **referential**: orphans of every foreign key (also `NOT VALID` ones and ones
//!   whose triggers are disabled) and of declared relationships, by chunked anti-join;
//! - **checksum**: stored row checksums against ones recomputed over the canonical
//!   row encoding ([`checksum`]), rows streamed by binary COPY and hashed here;
//! - **consistency**: business rules as row predicates (fused) or queries
//!   ([`ConsistencyRule`] has helpers for aggregate equality, date order and status
//!   transitions).
//!
//! Entry point: [`Integrity::builder`], which implements
//! [`sanare_core::IntegrityService`]; [`Checksummer`] implements
//! [`sanare_core::RowChecksum`]. Tables: [`MIGRATIONS`] (`integrity_checks`,
//! `integrity_violations`, `integrity_chunks` — the work units of a run and which of
//! them are done, so [`Integrity::resume`] skips them — and the SQL helper of the
//! checksum trigger).
//!
//! # How a run reads
//!
//! A coordinator connection opens a `REPEATABLE READ READ ONLY` transaction and
//! exports its snapshot (`pg_export_snapshot`); workers (`parallelism` of them) each
//! run one chunk per transaction that imports it (`SET TRANSACTION SNAPSHOT`), so all
//! chunks see one consistent state. Chunks are primary-key ranges (block ranges of
//! `ctid` for tables without a key); each sets `statement_timeout` and `lock_timeout`.
//! After `snapshot_max_age` the coordinator commits and exports a fresh snapshot, so a
//! long scan never pins one xmin for its whole duration. Every suspect a chunk finds is
//! re-read in a fresh snapshot and reported only if it still fails there: concurrent
//! writes never produce a false positive. Violations go to a JSON-lines file and to
//! `integrity_violations` as each chunk ends, never accumulating in memory.
//!
//! A run is a list of work units per table (its chunks, then one unit per whole-table
//! probe), stored in `integrity_chunks` before they run. A unit's violations and its
//! completion are recorded in one statement, so [`Integrity::resume`] of a cancelled,
//! failed or interrupted run skips exactly the done units, reuses the chunk bounds of
//! the first attempt, and ends with the report an uninterrupted run gives. On cancel,
//! no new unit starts and the units in flight finish.
//!
//! Unique and primary-key constraints backed by a valid, ready unique index are
//! enforced by PostgreSQL on every write and are not scanned for; those whose index is
//! missing or invalid, and unique keys the host declares ([`Rules`]), are checked by
//! one whole-table pass each. Enum columns are checked against the labels in
//! `pg_enum`, domain columns against their domain's CHECKs (NOT VALID ones included).
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
//! files).

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod catalog;
pub mod checksum;
mod chunking;
mod config;
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
ALTER TABLE {schema}.integrity_violations ADD COLUMN unit integer;",
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
