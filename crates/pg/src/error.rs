//! Driver errors as [`sanare_core::Error`]: one shape that keeps PostgreSQL's own
//! words (severity, message, detail, hint, SQLSTATE, position, context) for the CLI,
//! `--json` and logs.

use std::borrow::Cow;

use sanare_core::{Error, ServerError};
use tokio_postgres::error::{DbError, ErrorPosition};

/// Maps a driver error to [`Error::Database`] with what sanare was doing, marking
/// connection loss, serialization failures, deadlocks and server shutdowns retryable.
/// When the server refused the statement, its words are kept whole
/// ([`Error::server`]).
pub fn map_pg_error(context: impl Into<Cow<'static, str>>, err: tokio_postgres::Error) -> Error {
    let retryable = err.is_closed()
        || err.code().is_some_and(|code| {
            let c = code.code();
            c == "40001" // serialization_failure
                || c == "40P01" // deadlock_detected
                || c == "55P03" // lock_not_available
                || c.starts_with("08") // connection exceptions
                || c == "57P01" // admin_shutdown
                || c == "57P02" // crash_shutdown
                || c == "57P03" // cannot_connect_now
        })
        || err.as_db_error().is_none() && is_transport(&err);
    match err.as_db_error().map(server_error) {
        Some(server) => Error::database_server(context, server, err, retryable),
        None => Error::database(context, err, retryable),
    }
}

/// Whether a driver error that is not the server's is about reaching the server
/// (connecting, a broken socket, a timeout): an I/O error in its chain, or the
/// driver's words for those.
fn is_transport(err: &tokio_postgres::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if e.is::<std::io::Error>() {
            return true;
        }
        next = e.source();
    }
    let text = err.to_string();
    ["connect", "communicating with the server", "timeout"]
        .iter()
        .any(|w| text.contains(w))
}

/// The server's words in a [`DbError`], as plain data.
pub fn server_error(db: &DbError) -> ServerError {
    let mut s = ServerError::new(db.severity(), db.code().code(), db.message());
    s.detail = db.detail().map(str::to_owned);
    s.hint = db.hint().map(str::to_owned);
    s.position = match db.position() {
        Some(ErrorPosition::Original(p)) => Some(*p),
        // A position inside a query the server generated (a function body): the
        // CONTEXT line says which.
        Some(ErrorPosition::Internal { .. }) | None => None,
    };
    s.context = db.where_().map(str::to_owned);
    s.schema = db.schema().map(str::to_owned);
    s.table = db.table().map(str::to_owned);
    s.column = db.column().map(str::to_owned);
    s.constraint = db.constraint().map(str::to_owned);
    s
}

/// The whole message of a driver error, for places that print one without mapping
/// it (a failed connect): the server's words when it answered, else every message
/// of the error's chain, each once ("error connecting to server: Connection refused
/// (os error 111)", never "db error" alone).
pub fn describe_pg_error(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => server_error(db).to_string(),
        None => sanare_core::error_chain_message(err),
    }
}

/// Adds context to driver results: `client.query(..).await.context("reading crash records")?`.
pub trait PgResultExt<T> {
    /// Maps the error with [`map_pg_error`].
    fn context(self, context: impl Into<Cow<'static, str>>) -> Result<T, Error>;

    /// Maps the error with [`map_pg_error`], building the context only on failure.
    fn with_context<C: Into<Cow<'static, str>>>(self, f: impl FnOnce() -> C) -> Result<T, Error>;
}

impl<T> PgResultExt<T> for Result<T, tokio_postgres::Error> {
    fn context(self, context: impl Into<Cow<'static, str>>) -> Result<T, Error> {
        self.map_err(|e| map_pg_error(context, e))
    }

    fn with_context<C: Into<Cow<'static, str>>>(self, f: impl FnOnce() -> C) -> Result<T, Error> {
        self.map_err(|e| map_pg_error(f(), e))
    }
}
