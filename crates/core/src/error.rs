//! The one error type shared by every sanare crate.

use std::borrow::Cow;

/// A boxed error source that can cross threads.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with sanare's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a sanare operation.
///
/// Every variant says what failed; variants with a `context` also say what sanare was
/// doing, and keep the underlying cause as their [`source`](std::error::Error::source).
/// Match on the variant to decide what to do: [`Error::is_retryable`] tells transient
/// failures (a dropped connection, an unavailable store) from permanent ones.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operation was cancelled through its [`CancellationToken`](crate::CancellationToken).
    /// Nothing was committed past the last completed unit of work.
    #[error("operation cancelled")]
    Cancelled,

    /// A requested object does not exist.
    #[error("{what} not found")]
    NotFound {
        /// What was looked up, with its identifier (`"snapshot 0193…"`).
        what: Cow<'static, str>,
    },

    /// An argument or input value is invalid; the message says which and why.
    #[error("invalid input: {0}")]
    InvalidInput(Cow<'static, str>),

    /// A configuration key or value is invalid.
    #[error("invalid configuration `{key}`: {message}")]
    Config {
        /// The configuration key, as the user wrote it (`"snapshot.interval"`).
        key: Cow<'static, str>,
        /// What is wrong with it and what is expected.
        message: Cow<'static, str>,
    },

    /// Stored data failed verification (bad checksum, bad magic, truncated record).
    /// The damaged object is named; undamaged data stays readable.
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// The damaged object (`"journal segment 00000003 at offset 4096"`).
        what: Cow<'static, str>,
        /// What check failed.
        detail: Cow<'static, str>,
    },

    /// The operation needs an explicit approval first (see `RepairService::approve`).
    #[error("approval required: {0}")]
    ApprovalRequired(Cow<'static, str>),

    /// The operation conflicts with the current state (already running, wrong status).
    #[error("conflict: {0}")]
    Conflict(Cow<'static, str>),

    /// A required service, extension or permission is not available.
    #[error("unavailable: {0}")]
    Unavailable(Cow<'static, str>),

    /// A local file operation failed (includes a full disk).
    #[error("{context}: {source}")]
    Io {
        /// What sanare was doing (`"appending to journal segment …"`).
        context: Cow<'static, str>,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A database operation failed.
    #[error("database error while {context}: {source}")]
    Database {
        /// What sanare was doing.
        context: Cow<'static, str>,
        /// The driver's error.
        #[source]
        source: BoxError,
        /// Whether retrying may succeed (connection lost, serialization failure).
        retryable: bool,
    },

    /// A block store or object store operation failed.
    #[error("storage error while {context}: {source}")]
    Storage {
        /// What sanare was doing.
        context: Cow<'static, str>,
        /// The store's error.
        #[source]
        source: BoxError,
    },

    /// Any other failure, with context.
    #[error("{context}: {source}")]
    Other {
        /// What sanare was doing.
        context: Cow<'static, str>,
        /// The cause.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// An [`Error::InvalidInput`].
    pub fn invalid_input(message: impl Into<Cow<'static, str>>) -> Self {
        Error::InvalidInput(message.into())
    }

    /// An [`Error::NotFound`].
    pub fn not_found(what: impl Into<Cow<'static, str>>) -> Self {
        Error::NotFound { what: what.into() }
    }

    /// An [`Error::Config`].
    pub fn config(
        key: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Error::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    /// An [`Error::Corrupt`].
    pub fn corrupt(
        what: impl Into<Cow<'static, str>>,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        Error::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// An [`Error::Conflict`].
    pub fn conflict(message: impl Into<Cow<'static, str>>) -> Self {
        Error::Conflict(message.into())
    }

    /// An [`Error::Unavailable`].
    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        Error::Unavailable(message.into())
    }

    /// An [`Error::Io`] with what sanare was doing.
    pub fn io(context: impl Into<Cow<'static, str>>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// An [`Error::Database`] with what sanare was doing; `retryable` says whether a
    /// retry may succeed.
    pub fn database(
        context: impl Into<Cow<'static, str>>,
        source: impl Into<BoxError>,
        retryable: bool,
    ) -> Self {
        Error::Database {
            context: context.into(),
            source: source.into(),
            retryable,
        }
    }

    /// An [`Error::Storage`] with what sanare was doing.
    pub fn storage(context: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Error::Storage {
            context: context.into(),
            source: source.into(),
        }
    }

    /// An [`Error::Other`] with what sanare was doing.
    pub fn other(context: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Error::Other {
            context: context.into(),
            source: source.into(),
        }
    }

    /// Whether retrying the same operation may succeed: a lost connection, a
    /// serialization failure, an unavailable store, an interrupted I/O call.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database { retryable, .. } => *retryable,
            Error::Storage { .. } | Error::Unavailable(_) => true,
            Error::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    /// Whether this is [`Error::Cancelled`].
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Error::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_failed_and_keep_the_source() {
        let err = Error::io(
            "appending to journal segment 3",
            std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"),
        );
        assert_eq!(
            err.to_string(),
            "appending to journal segment 3: no space left on device"
        );
        assert!(std::error::Error::source(&err).is_some());
        assert!(!err.is_retryable());

        let err = Error::config("snapshot.interval", "expected a duration such as `15m`");
        assert!(err.to_string().contains("snapshot.interval"));
        assert!(Error::database("connecting", "reset", true).is_retryable());
        assert!(Error::Cancelled.is_cancelled());
    }
}
