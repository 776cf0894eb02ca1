//! Versioned, embedded migrations per component, applied under an advisory lock.
//!
//! Each component crate declares its migrations as a `const`:
//!
//! ```
//! use sanare_pg::{Migration, Migrations};
//!
//! pub const MIGRATIONS: Migrations = Migrations::new(
//!     "journal",
//!     &[Migration::new(1, "create_journal", "CREATE TABLE {schema}.journal_example (id bigint)")],
//! );
//! ```
//!
//! `{schema}` in the SQL is replaced by the quoted schema name. Applied versions are
//! recorded per component in `<schema>.<component>_schema_history` (refinery's format,
//! with a checksum of each migration's SQL): a migration already applied is skipped,
//! one whose SQL changed after it was applied is refused. All pending migrations of a
//! component apply in one transaction, so a failed upgrade leaves the previous schema
//! intact. The whole run holds a session advisory lock keyed on the schema, so any
//! number of processes may start at once.
//!
//! refinery-core provides the history table, checksums and ordering; this module adds
//! the schema placeholder, the per-component history tables and the lock, which
//! refinery does not do.

use refinery_core::Runner;
use sanare_core::{Error, Result};
use tokio_postgres::Client;

use crate::{PgResultExt, SchemaName};

/// One versioned migration.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Its version; versions of a component apply in increasing order.
    pub version: u32,
    /// A short name of letters, digits and `_`.
    pub name: &'static str,
    /// The SQL, with `{schema}` where the quoted schema name goes.
    pub sql: &'static str,
}

impl Migration {
    /// A migration.
    pub const fn new(version: u32, name: &'static str, sql: &'static str) -> Self {
        Self { version, name, sql }
    }
}

/// A component's migrations.
#[derive(Clone, Copy, Debug)]
pub struct Migrations {
    component: &'static str,
    migrations: &'static [Migration],
}

/// What a migration run applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// The component.
    pub component: String,
    /// The versions and names applied by this run (empty when already up to date).
    pub applied: Vec<(u32, String)>,
}

impl Migrations {
    /// The migrations of `component` (lowercase letters, digits and `_`; names the
    /// history table).
    pub const fn new(component: &'static str, migrations: &'static [Migration]) -> Self {
        Self {
            component,
            migrations,
        }
    }

    /// The component name.
    pub fn component(&self) -> &'static str {
        self.component
    }

    /// The migrations.
    pub fn migrations(&self) -> &'static [Migration] {
        self.migrations
    }

    /// Applies every pending migration in `schema` (created if missing).
    ///
    /// Safe to call from many processes at once: runs are serialized by a session
    /// advisory lock on the schema, released before returning (also on error).
    pub async fn run(&self, client: &mut Client, schema: &SchemaName) -> Result<MigrationReport> {
        let lock_key = advisory_key(&format!("sanare:migrations:{schema}"));
        client
            .execute("SELECT pg_advisory_lock($1)", &[&lock_key])
            .await
            .with_context(|| format!("waiting for the migration lock of schema {schema}"))?;
        let result = self.run_locked(client, schema).await;
        let unlock = client
            .execute("SELECT pg_advisory_unlock($1)", &[&lock_key])
            .await
            .with_context(|| format!("releasing the migration lock of schema {schema}"));
        let report = result?;
        unlock?;
        Ok(report)
    }

    async fn run_locked(
        &self,
        client: &mut Client,
        schema: &SchemaName,
    ) -> Result<MigrationReport> {
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", schema.quoted()))
            .await
            .with_context(|| format!("creating schema {schema}"))?;
        let quoted = schema.quoted();
        let migrations = self
            .migrations
            .iter()
            .map(|m| {
                refinery_core::Migration::unapplied(
                    &format!("V{}__{}", m.version, m.name),
                    &m.sql.replace("{schema}", &quoted),
                )
                .map_err(|e| {
                    Error::invalid_input(format!(
                        "migration {} of {} is malformed: {e}",
                        m.version, self.component
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut runner = Runner::new(&migrations)
            .set_grouped(true)
            .set_abort_divergent(true)
            // A newer release may already have migrated this schema during a rolling
            // upgrade; its extra versions are not an error for this one.
            .set_abort_missing(false);
        runner.set_migration_table_name(format!(
            "{quoted}.{}",
            crate::quote_ident(&format!("{}_schema_history", self.component))
        ));
        let report = runner.run_async(client).await.map_err(|e| {
            Error::other(
                format!(
                    "applying the {} migrations in schema {schema} (a migration whose SQL \
                     changed after it was applied is refused: ship a new version instead)",
                    self.component
                ),
                e,
            )
        })?;
        let applied = report
            .applied_migrations()
            .iter()
            .map(|m| (m.version() as u32, m.name().to_owned()))
            .collect::<Vec<_>>();
        if !applied.is_empty() {
            tracing::info!(component = self.component, %schema, ?applied, "applied migrations");
        }
        Ok(MigrationReport {
            component: self.component.to_owned(),
            applied,
        })
    }
}

/// A stable 64-bit advisory-lock key for `name` (FNV-1a), the same in every process
/// and release.
pub fn advisory_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisory_keys_are_stable() {
        assert_eq!(advisory_key(""), 0xcbf2_9ce4_8422_2325_u64 as i64);
        assert_ne!(advisory_key("a"), advisory_key("b"));
    }
}
