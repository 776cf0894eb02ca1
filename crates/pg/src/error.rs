use std::borrow::Cow;

use sanare_core::Error;

/// Maps a driver error to [`Error::Database`] with what sanare was doing, marking
/// connection loss, serialization failures, deadlocks and server shutdowns retryable.
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
        || err.as_db_error().is_none() && err.to_string().contains("connection");
    Error::database(context, err, retryable)
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
