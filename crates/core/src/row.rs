//! Tables, rows and row keys, described without any database dependency.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A table, by schema and name (unquoted, exactly as in the catalog).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TableRef {
    /// The schema (`"public"`).
    pub schema: String,
    /// The table name (`"orders"`).
    pub name: String,
}

impl TableRef {
    /// A table in `schema`.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Parses `schema.table` or a bare `table` (schema `public`). Quoting is not
    /// interpreted: names with dots must be built with [`TableRef::new`].
    pub fn parse(s: &str) -> crate::Result<Self> {
        let s = s.trim();
        let (schema, name) = match s.split_once('.') {
            Some((schema, name)) => (schema, name),
            None => ("public", s),
        };
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return Err(crate::Error::invalid_input(format!(
                "`{s}` is not a table name (expected `schema.table` or `table`)"
            )));
        }
        Ok(Self::new(schema, name))
    }

    /// The name quoted for SQL (`"public"."orders"`), safe for any identifier.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an SQL identifier: wraps it in double quotes and doubles embedded quotes,
/// so any name is safe to splice into SQL (`we"ird` → `"we""ird"`).
pub fn quote_ident(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// One column's value in PostgreSQL's text form, which is lossless for every type.
///
/// `value` is `None` for SQL `NULL`. `type_name` is the column's type as
/// `format_type()` prints it (`"bigint"`, `"character varying(40)"`), so a consumer can
/// cast the text back (`$1::bigint`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ColumnValue {
    /// The column name.
    pub column: String,
    /// The column's SQL type.
    pub type_name: String,
    /// The value in text form, `None` for `NULL`.
    pub value: Option<String>,
}

impl ColumnValue {
    /// A column value.
    pub fn new(
        column: impl Into<String>,
        type_name: impl Into<String>,
        value: Option<impl Into<String>>,
    ) -> Self {
        Self {
            column: column.into(),
            type_name: type_name.into(),
            value: value.map(Into::into),
        }
    }
}

/// A row, named by its table and its primary-key values (in key column order).
///
/// Tables without a primary key are named by `ctid` (`column = "ctid"`, type `tid`);
/// such a reference is only valid until the row is next updated or the table vacuumed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowRef {
    /// The row's table.
    pub table: TableRef,
    /// The primary-key columns and their values.
    pub key: Vec<ColumnValue>,
}

impl RowRef {
    /// A row reference.
    pub fn new(table: TableRef, key: Vec<ColumnValue>) -> Self {
        Self { table, key }
    }
}

impl fmt::Display for RowRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.table)?;
        for (i, c) in self.key.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match &c.value {
                Some(v) => write!(f, "{}={v}", c.column)?,
                None => write!(f, "{}=NULL", c.column)?,
            }
        }
        f.write_str(")")
    }
}

/// A whole row: every column of a table with its value, in table column order.
///
/// What a snapshot returns for "rows by primary key", what a repair saves as a
/// before-image, and what the checksum of a row is computed over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowImage {
    /// The row's table.
    pub table: TableRef,
    /// Every column, in table order.
    pub values: Vec<ColumnValue>,
}

impl RowImage {
    /// The value of `column`, if the row has that column (`Some(None)` for `NULL`).
    pub fn get(&self, column: &str) -> Option<Option<&str>> {
        self.values
            .iter()
            .find(|c| c.column == column)
            .map(|c| c.value.as_deref())
    }

    /// The [`RowRef`] of this row, given the names of its key columns.
    /// Returns `None` if a key column is missing from the image.
    pub fn row_ref(&self, key_columns: &[impl AsRef<str>]) -> Option<RowRef> {
        let key = key_columns
            .iter()
            .map(|k| self.values.iter().find(|c| c.column == k.as_ref()).cloned())
            .collect::<Option<Vec<_>>>()?;
        Some(RowRef::new(self.table.clone(), key))
    }
}

/// Computes the checksum of a row over sanare's canonical, versioned row encoding.
///
/// Implemented by the integrity crate (which owns the encoding) and consumed by the
/// corruption detector, so both always agree. Implementations are pure and cheap to
/// call from many threads.
pub trait RowChecksum: Send + Sync {
    /// The version of the canonical encoding; stored next to every checksum so an old
    /// checksum is never compared against a newer encoding.
    fn encoding_version(&self) -> u16;

    /// The checksum of `values` (every column except the checksum column itself, in
    /// table order).
    fn checksum(&self, values: &[ColumnValue]) -> [u8; 32];

    /// The checksum of a row whose values are given as their text forms (`None`
    /// for NULL), in the order of `columns` (every column except the checksum
    /// column, in table order; their `value`s are ignored): the scan path, which
    /// need not build a [`ColumnValue`] per value of every row.
    ///
    /// The default fills copies of `columns` with `values` and calls
    /// [`checksum`](Self::checksum); implementations whose encoding only needs the
    /// values should override it.
    fn checksum_text(&self, columns: &[ColumnValue], values: &[Option<&str>]) -> [u8; 32] {
        let filled: Vec<ColumnValue> = columns
            .iter()
            .zip(values)
            .map(|(c, v)| {
                ColumnValue::new(c.column.clone(), c.type_name.clone(), v.map(str::to_owned))
            })
            .collect();
        self.checksum(&filled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_parse_quote_and_display() {
        let t = TableRef::parse("shop.orders").unwrap();
        assert_eq!(t, TableRef::new("shop", "orders"));
        assert_eq!(TableRef::parse("orders").unwrap().schema, "public");
        assert!(TableRef::parse("a.b.c").is_err());
        assert!(TableRef::parse("").is_err());
        assert_eq!(TableRef::new("a", "we\"ird").quoted(), r#""a"."we""ird""#);
    }

    #[test]
    fn rows_name_their_keys() {
        let row = RowImage {
            table: TableRef::new("public", "orders"),
            values: vec![
                ColumnValue::new("id", "bigint", Some("7")),
                ColumnValue::new("note", "text", None::<String>),
            ],
        };
        assert_eq!(row.get("note"), Some(None));
        assert_eq!(row.get("id"), Some(Some("7")));
        assert_eq!(row.get("missing"), None);
        let r = row.row_ref(&["id"]).unwrap();
        assert_eq!(r.to_string(), "public.orders(id=7)");
        assert!(row.row_ref(&["nope"]).is_none());
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<RowRef>(&json).unwrap(), r);
    }
}
