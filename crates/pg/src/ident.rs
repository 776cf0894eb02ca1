use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Quotes an SQL identifier (the one implementation, from `sanare-core`).
pub use sanare_core::quote_ident;

/// Quotes an SQL string literal (standard-conforming strings): wraps it in single
/// quotes and doubles embedded quotes. Prefer bind parameters; use this only where
/// SQL takes no parameters (DDL, `SET`).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The name of the schema holding sanare's own tables (default `sanare`).
///
/// Restricted to lowercase ASCII letters, digits and `_`, starting with a letter or
/// `_`, at most 63 bytes: a name that needs no quoting anywhere, including in the
/// advisory-lock key and in log lines.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SchemaName(String);

impl SchemaName {
    /// The default, `sanare`.
    pub fn default_schema() -> Self {
        Self("sanare".to_owned())
    }

    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> sanare_core::Result<Self> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !name.starts_with("pg_");
        if valid {
            Ok(Self(name))
        } else {
            Err(sanare_core::Error::config(
                "schema",
                format!(
                    "`{name}` is not a usable schema name: use 1-63 lowercase letters, digits \
                     and `_`, starting with a letter or `_`, not starting with `pg_`"
                ),
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name quoted for SQL.
    pub fn quoted(&self) -> String {
        quote_ident(&self.0)
    }

    /// `schema.table`, quoted for SQL.
    pub fn table(&self, table: &str) -> String {
        format!("{}.{}", self.quoted(), quote_ident(table))
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        Self::default_schema()
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SchemaName {
    type Err = sanare_core::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for SchemaName {
    type Error = sanare_core::Error;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<SchemaName> for String {
    fn from(s: SchemaName) -> String {
        s.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_validated() {
        assert_eq!(SchemaName::default().as_str(), "sanare");
        assert!(SchemaName::new("tenant_7").is_ok());
        for bad in ["", "Sanare", "7x", "a-b", "pg_x", "a\"b", &"x".repeat(64)] {
            let err = SchemaName::new(bad).unwrap_err();
            assert!(err.to_string().contains("schema"), "{err}");
        }
        assert_eq!(
            SchemaName::default().table("crash_records"),
            r#""sanare"."crash_records""#
        );
    }

    #[test]
    fn quoting_escapes() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
