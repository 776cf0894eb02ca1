//! What the engine reads from the live catalog to build SQL: a table's columns and
//! primary key, and the SQL fragments over them.
//!
//! Every identifier that reaches SQL is a name read here from `pg_catalog`, quoted;
//! every type name is `format_type()`'s output. Nothing stored by a plan is spliced
//! into SQL without first being matched against this.

use sanare_core::{ColumnValue, Error, Result, RowImage, RowRef, TableRef};
use sanare_pg::{PgResultExt, quote_ident};
use tokio_postgres::GenericClient;

/// One column of a repaired table.
#[derive(Clone, Debug)]
pub(crate) struct Col {
    pub(crate) name: String,
    pub(crate) type_name: String,
    pub(crate) not_null: bool,
    pub(crate) default: Option<String>,
    /// `GENERATED ALWAYS AS (…) STORED`: never written.
    pub(crate) generated: bool,
    /// `GENERATED ALWAYS AS IDENTITY`: written on insert with OVERRIDING SYSTEM VALUE.
    pub(crate) identity_always: bool,
}

/// What the engine needs to know about a table to repair it.
#[derive(Clone, Debug)]
pub(crate) struct Meta {
    pub(crate) table: TableRef,
    pub(crate) quoted: String,
    pub(crate) oid: u32,
    pub(crate) columns: Vec<Col>,
    pub(crate) pk: Vec<String>,
}

/// Session settings of every transaction that reads or writes row text (digests,
/// before-images, quarantined rows): the same as the integrity crate's canonical
/// settings, so a row prints the same whatever the pooled session's own `DateStyle`
/// or `TimeZone`, and text written under them is read back under them.
pub(crate) const CANONICAL: &str = "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; \
     SET LOCAL IntervalStyle = 'postgres'; SET LOCAL extra_float_digits = 1; SET LOCAL bytea_output = 'hex'";

/// Schemas sanare never repairs: the system's.
const SYSTEM_SCHEMAS: [&str; 3] = ["pg_catalog", "information_schema", "pg_toast"];

impl Meta {
    /// Reads `table` from the catalog; [`Error::NotFound`] when it does not exist.
    pub(crate) async fn load(client: &impl GenericClient, table: &TableRef) -> Result<Meta> {
        let info = sanare_pg::catalog::describe(client, table).await?;
        let rows = client
            .query(
                "SELECT attname::text, attgenerated <> '', attidentity = 'a'
                   FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
                  ORDER BY attnum",
                &[&info.oid],
            )
            .await
            .with_context(|| format!("reading the columns of {table}"))?;
        let columns = info
            .columns
            .iter()
            .map(|c| {
                let r = rows.iter().find(|r| r.get::<_, String>(0) == c.name);
                Col {
                    name: c.name.clone(),
                    type_name: c.type_name.clone(),
                    not_null: c.not_null,
                    default: c.default.clone(),
                    generated: r.is_some_and(|r| r.get(1)),
                    identity_always: r.is_some_and(|r| r.get(2)),
                }
            })
            .collect();
        Ok(Meta {
            table: info.table.clone(),
            quoted: info.table.quoted(),
            oid: info.oid,
            columns,
            pk: info.primary_key,
        })
    }

    /// Refuses a table sanare must never change: the system's, or sanare's own.
    pub(crate) fn check_scope(table: &TableRef, own_schema: &str) -> Result<()> {
        let s = table.schema.as_str();
        if SYSTEM_SCHEMAS.contains(&s) || s.starts_with("pg_temp") || s == own_schema {
            return Err(Error::invalid_input(format!(
                "{table} is outside what sanare repairs (a system table or one of sanare's own)"
            )));
        }
        Ok(())
    }

    pub(crate) fn require_pk(&self) -> Result<()> {
        if self.pk.is_empty() {
            return Err(Error::invalid_input(format!(
                "{} has no primary key: sanare repairs rows by primary key (add one, or repair \
                 the table by hand)",
                self.table
            )));
        }
        Ok(())
    }

    pub(crate) fn col(&self, name: &str) -> Result<&Col> {
        self.columns
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| Error::invalid_input(format!("{} has no column `{name}`", self.table)))
    }

    /// `alias."c1", alias."c2"` over `names`.
    pub(crate) fn list(alias: &str, names: &[String]) -> String {
        names
            .iter()
            .map(|n| format!("{alias}.{}", quote_ident(n)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Columns written on insert (everything but stored generated columns).
    pub(crate) fn insert_cols(&self) -> Vec<String> {
        self.columns
            .iter()
            .filter(|c| !c.generated)
            .map(|c| c.name.clone())
            .collect()
    }

    /// Columns written on update (no generated, no identity-always columns).
    pub(crate) fn update_cols(&self) -> Vec<String> {
        self.columns
            .iter()
            .filter(|c| !c.generated && !c.identity_always)
            .map(|c| c.name.clone())
            .collect()
    }

    /// The types of the primary-key columns, in key order.
    pub(crate) fn key_types(&self) -> Result<Vec<&str>> {
        self.pk
            .iter()
            .map(|k| self.col(k).map(|c| c.type_name.as_str()))
            .collect()
    }

    /// `ARRAY[alias."pk1"::text, …]`: a row's key as stored.
    pub(crate) fn key_array(&self, alias: &str) -> String {
        let parts = self
            .pk
            .iter()
            .map(|k| format!("{alias}.{}::text", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ");
        format!("ARRAY[{parts}]")
    }

    /// `alias."pk1" = (key)[1]::type1 AND …`: the row of `alias` whose key is the
    /// stored `text[]` expression `key`, each element cast to its live column type.
    pub(crate) fn key_match(&self, alias: &str, key: &str) -> Result<String> {
        let types = self.key_types()?;
        Ok(self
            .pk
            .iter()
            .zip(types)
            .enumerate()
            .map(|(i, (k, ty))| format!("{alias}.{} = ({key})[{}]::{ty}", quote_ident(k), i + 1))
            .collect::<Vec<_>>()
            .join(" AND "))
    }

    /// `a."pk1" = b."pk1" AND …` (rows compared by primary key).
    pub(crate) fn pk_eq(&self, a: &str, b: &str) -> String {
        self.pk
            .iter()
            .map(|k| {
                let k = quote_ident(k);
                format!("{a}.{k} = {b}.{k}")
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `ROW(alias.*)::text`: a row's lossless record text (the undo log's encoding).
    pub(crate) fn row_text(alias: &str) -> String {
        format!("ROW({alias}.*)::text")
    }

    /// `(img)::"schema"."table"`: a record text cast back to a row of this table.
    pub(crate) fn cast_row(&self, img: &str) -> String {
        format!("(({img})::{})", self.quoted)
    }

    /// A [`RowRef`] of this table from stored key text.
    pub(crate) fn row_ref(&self, key: Vec<Option<String>>) -> RowRef {
        let cols = self
            .pk
            .iter()
            .zip(key)
            .map(|(c, v)| {
                let ty = self.col(c).map(|c| c.type_name.clone()).unwrap_or_default();
                ColumnValue::new(c.clone(), ty, v)
            })
            .collect();
        RowRef::new(self.table.clone(), cols)
    }

    /// Whether a row reference names exactly this table's primary key, in order.
    pub(crate) fn names_pk(&self, row: &RowRef) -> bool {
        row.key.len() == self.pk.len() && row.key.iter().zip(&self.pk).all(|(c, k)| c.column == *k)
    }

    /// The record literal of `image` for this table (columns matched by name, in table
    /// order), castable with `::{quoted}`.
    pub(crate) fn record_literal(&self, image: &RowImage) -> Result<String> {
        let mut out = String::from("(");
        for (i, c) in self.columns.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let value = image.get(&c.name).ok_or_else(|| {
                Error::corrupt(
                    format!("snapshot row image of {}", self.table),
                    format!(
                        "column `{}` is missing from the image (the table changed shape since \
                         the snapshot; restore it by hand)",
                        c.name
                    ),
                )
            })?;
            if let Some(v) = value {
                out.push('"');
                for ch in v.chars() {
                    if ch == '"' || ch == '\\' {
                        out.push(ch);
                    }
                    out.push(ch);
                }
                out.push('"');
            }
        }
        out.push(')');
        Ok(out)
    }
}

/// `'value'::type`, or `NULL::type` (for the test fakes).
#[cfg(feature = "testing")]
pub(crate) fn lit(value: Option<&str>, type_name: &str) -> String {
    match value {
        Some(v) => format!("{}::{type_name}", sanare_pg::quote_literal(v)),
        None => format!("NULL::{type_name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        let col = |name: &str, ty: &str| Col {
            name: name.into(),
            type_name: ty.into(),
            not_null: true,
            default: None,
            generated: false,
            identity_always: false,
        };
        Meta {
            table: TableRef::new("public", "t"),
            quoted: "\"public\".\"t\"".into(),
            oid: 0,
            columns: vec![col("id", "bigint"), col("s", "text")],
            pk: vec!["id".into()],
        }
    }

    #[test]
    fn record_literals_quote_every_value_and_leave_null_empty() {
        let m = meta();
        let img = |s: Option<&str>| RowImage {
            table: m.table.clone(),
            values: vec![
                ColumnValue::new("s", "text", s),
                ColumnValue::new("id", "bigint", Some("1")),
            ],
        };
        assert_eq!(
            m.record_literal(&img(Some(r#"a"b\c,"#))).unwrap(),
            r#"("1","a""b\\c,")"#
        );
        assert_eq!(m.record_literal(&img(None)).unwrap(), r#"("1",)"#);
        assert_eq!(m.record_literal(&img(Some(""))).unwrap(), r#"("1","")"#);
    }

    #[test]
    fn stored_keys_are_cast_to_the_live_column_types() {
        let m = meta();
        assert_eq!(
            m.key_match("t", "g.key").unwrap(),
            "t.\"id\" = (g.key)[1]::bigint"
        );
    }

    #[test]
    fn system_and_own_tables_are_out_of_scope() {
        for schema in ["pg_catalog", "information_schema", "pg_temp_3", "sanare"] {
            assert!(Meta::check_scope(&TableRef::new(schema, "x"), "sanare").is_err());
        }
        assert!(Meta::check_scope(&TableRef::new("shop", "x"), "sanare").is_ok());
    }
}
