//! The one error type shared by every sanare crate.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

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
    ///
    /// The message is whole: when the server answered with an error, it carries the
    /// server's own words ([`ServerError`]: severity, message, detail, hint, SQLSTATE,
    /// position); otherwise every message of the driver's error chain, each once.
    /// Because the message already holds them, [`source`](std::error::Error::source)
    /// is `None` for this variant (a chain printer would print them twice); the
    /// driver's error stays reachable through [`Error::database_cause`].
    #[error("database error while {context}: {}", describe_database(&**cause, server.as_deref()))]
    Database {
        /// What sanare was doing.
        context: Cow<'static, str>,
        /// The driver's error.
        cause: BoxError,
        /// What the server said, when it answered with an error.
        server: Option<Box<ServerError>>,
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
            cause: source.into(),
            server: None,
            retryable,
        }
    }

    /// An [`Error::Database`] for a statement the server answered with an error:
    /// `server` holds its words, `source` is the driver's error.
    pub fn database_server(
        context: impl Into<Cow<'static, str>>,
        server: ServerError,
        source: impl Into<BoxError>,
        retryable: bool,
    ) -> Self {
        Error::Database {
            context: context.into(),
            cause: source.into(),
            server: Some(Box::new(server)),
            retryable,
        }
    }

    /// What the server said, when this is a database error the server answered
    /// (the SQLSTATE is in [`ServerError::code`]).
    pub fn server(&self) -> Option<&ServerError> {
        match self {
            Error::Database { server, .. } => server.as_deref(),
            _ => None,
        }
    }

    /// The driver's error behind an [`Error::Database`] (for downcasting).
    pub fn database_cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            Error::Database { cause, .. } => Some(&**cause),
            _ => None,
        }
    }

    /// The stable snake_case name of the variant (`"database"`, `"not_found"`, …),
    /// as [`ErrorReport::kind`] carries it.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Error::Cancelled => "cancelled",
            Error::NotFound { .. } => "not_found",
            Error::InvalidInput(_) => "invalid_input",
            Error::Config { .. } => "config",
            Error::Corrupt { .. } => "corrupt",
            Error::ApprovalRequired(_) => "approval_required",
            Error::Conflict(_) => "conflict",
            Error::Unavailable(_) => "unavailable",
            Error::Io { .. } => "io",
            Error::Database { .. } => "database",
            Error::Storage { .. } => "storage",
            Error::Other { .. } => "other",
        }
    }

    /// The error as plain data, for JSON output and structured logs: the whole
    /// message, the variant, retryability and the server's words.
    pub fn report(&self) -> ErrorReport {
        ErrorReport {
            kind: self.kind_name().into(),
            message: self.to_string(),
            retryable: self.is_retryable(),
            server: self.server().cloned(),
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

/// What PostgreSQL said about a statement it refused: its own words, kept whole.
///
/// Plain data (serde) so that the CLI's `--json`, logs and reports carry the same
/// fields. `Display` prints it the way `psql` does, SQLSTATE included:
///
/// ```text
/// ERROR: duplicate key value violates unique constraint "t_pkey" (SQLSTATE 23505)
/// DETAIL: Key (id)=(1) already exists.
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ServerError {
    /// `ERROR`, `FATAL` or `PANIC` (localized by the server's `lc_messages`).
    pub severity: String,
    /// The SQLSTATE (`23505`, `XX001`).
    pub code: String,
    /// The primary message.
    pub message: String,
    /// The optional detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The optional hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The 1-based character position of the error in the statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
    /// Where in a function or internal query it happened (the server's `CONTEXT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// The schema of the object involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// The table involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// The column involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// The constraint involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<String>,
}

impl ServerError {
    /// A server error with its severity, SQLSTATE and message (the optional fields
    /// are public).
    pub fn new(
        severity: impl Into<String>,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            severity: severity.into(),
            code: code.into(),
            message: message.into(),
            ..Self::default()
        }
    }

    /// Whether the SQLSTATE is in PostgreSQL's "internal error" data-corruption
    /// class: `XX001` (data_corrupted, which an invalid page or a failed data
    /// checksum raises) or `XX002` (index_corrupted).
    pub fn is_data_corrupted(&self) -> bool {
        self.code == "XX001" || self.code == "XX002"
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {}",
            self.severity, self.message, self.code
        )?;
        if let Some(p) = self.position {
            write!(f, ", at character {p}")?;
        }
        f.write_str(")")?;
        if let Some(d) = &self.detail {
            write!(f, "\nDETAIL: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "\nHINT: {h}")?;
        }
        if let Some(c) = &self.context {
            write!(f, "\nCONTEXT: {c}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// An [`Error`] as plain data: what `--json` prints and structured logs record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ErrorReport {
    /// The variant ([`Error::kind_name`]).
    pub kind: String,
    /// The whole message, as `Display` prints it.
    pub message: String,
    /// Whether retrying may succeed.
    pub retryable: bool,
    /// The server's words, when the server refused a statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerError>,
}

/// The message of a database error: the server's words when it answered, else
/// every message of the driver's error chain, each once (a wrapper that repeats its
/// cause's text is not printed twice).
fn describe_database(
    cause: &(dyn std::error::Error + Send + Sync + 'static),
    server: Option<&ServerError>,
) -> String {
    match server {
        Some(server) => server.to_string(),
        None => error_chain_message(cause),
    }
}

/// Every message of `err`'s chain (`err`, its source, the source's source…) joined
/// by `": "`, each once: a wrapper whose text already holds its cause's is not
/// followed by that text again. For printing a foreign error whole on one line.
pub fn error_chain_message(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = e.source();
    }
    out
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

    #[derive(Debug)]
    struct Chain(&'static str, Option<Box<Chain>>);
    impl std::fmt::Display for Chain {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Chain {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as _)
        }
    }

    #[test]
    fn a_server_error_keeps_every_word_once_and_no_chain_repeats_it() {
        let mut server = ServerError::new(
            "ERROR",
            "23505",
            "duplicate key value violates unique constraint \"t_pkey\"",
        );
        server.detail = Some("Key (id)=(1) already exists.".into());
        server.hint = Some("use another id".into());
        server.position = Some(15);
        let driver = Chain(
            "db error",
            Some(Box::new(Chain("ERROR: duplicate key value", None))),
        );
        let err = Error::database_server("inserting a row", server.clone(), driver, false);
        assert_eq!(
            err.to_string(),
            "database error while inserting a row: ERROR: duplicate key value violates unique \
             constraint \"t_pkey\" (SQLSTATE 23505, at character 15)\n\
             DETAIL: Key (id)=(1) already exists.\nHINT: use another id"
        );
        // Nothing for a chain printer (anyhow's `{:#}`) to print a second time.
        assert!(std::error::Error::source(&err).is_none());
        assert_eq!(err.server(), Some(&server));
        assert!(err.database_cause().is_some());
        let report = err.report();
        assert_eq!(report.kind, "database");
        assert_eq!(
            report.server.as_ref().map(|s| s.code.as_str()),
            Some("23505")
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["server"]["detail"], "Key (id)=(1) already exists.");
        assert_eq!(json["server"]["position"], 15);
        assert!(json["server"].get("constraint").is_none());
    }

    #[test]
    fn a_driver_error_chain_is_printed_whole_with_no_repeats() {
        let driver = Chain(
            "error connecting to server",
            Some(Box::new(Chain(
                "error connecting to server",
                Some(Box::new(Chain("Connection refused (os error 111)", None))),
            ))),
        );
        let err = Error::database("getting a connection from the pool", driver, true);
        assert_eq!(
            err.to_string(),
            "database error while getting a connection from the pool: error connecting to \
             server: Connection refused (os error 111)"
        );
        assert!(err.server().is_none());
        assert_eq!(err.report().kind, "database");
        assert!(err.report().retryable);
    }
}
