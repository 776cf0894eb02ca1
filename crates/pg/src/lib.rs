//! PostgreSQL plumbing shared by sanare's component crates.
//!
//! - [`SchemaName`]: the validated name of the schema sanare's own tables live in
//!   (default `sanare`);
//! - [`Migrations`]: each component's versioned, embedded migrations, applied
//!   idempotently under an advisory lock so that concurrent starts are safe;
//! - [`canonical`]: the session settings under which every reader and writer of a
//!   row checksum prints values the same way;
//! - [`catalog`]: introspection of host tables (columns, keys, foreign keys, order);
//! - [`copy_text`]: decoding a text `COPY … TO STDOUT` stream on the client;
//! - [`PgResultExt`]: mapping driver errors into [`sanare_core::Error`] with context;
//! - [`TxGuard`]: a transaction on a pooled connection that never goes back to the
//!   pool still open, on error, cancellation or panic;
//! - [`quote_ident`] and [`connect_pool`].
//!
//! # Architecture invariant
//!
//! This crate is infrastructure, not a component: it knows PostgreSQL but nothing of
//! journals, snapshots or repairs. Component crates depend on it and on
//! `sanare-core`, never on each other.

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod canonical;
pub mod catalog;
pub mod copy_text;
mod error;
mod ident;
mod migrate;
mod tx;

pub use canonical::{
    CANONICAL_SETTINGS, canonical_function_settings, canonical_settings_local_sql,
    canonical_settings_sql,
};
pub use error::{PgResultExt, describe_pg_error, map_pg_error, server_error};
pub use ident::{SchemaName, quote_ident, quote_literal};
pub use migrate::{Migration, MigrationReport, Migrations, advisory_key};
pub use tx::TxGuard;

pub use deadpool_postgres::Pool;
pub use tokio_postgres;

/// A connection pool for `url` (a `postgres://` URL or a key=value connection string),
/// without TLS, holding up to `max_size` connections.
///
/// The pool connects lazily; call `pool.get().await` to check that the server is
/// reachable.
pub fn connect_pool(url: &str, max_size: usize) -> sanare_core::Result<Pool> {
    let config: tokio_postgres::Config = url.parse().map_err(|e| {
        sanare_core::Error::config(
            "database_url",
            format!("`{}` is not a valid connection string: {e}", redact(url)),
        )
    })?;
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size.max(1))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| sanare_core::Error::other("building the connection pool", e))
}

/// Gets a connection from `pool`, mapping failure to a retryable database error.
pub async fn get_conn(pool: &Pool) -> sanare_core::Result<deadpool_postgres::Object> {
    pool.get()
        .await
        .map_err(|e| sanare_core::Error::database("getting a connection from the pool", e, true))
}

/// `url` with any password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact("host=h password=secret user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn a_bad_url_is_a_config_error() {
        let err = connect_pool("postgres://h:notaport/db", 2).unwrap_err();
        assert!(err.to_string().contains("database_url"), "{err}");
    }
}
