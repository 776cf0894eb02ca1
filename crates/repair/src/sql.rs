//! SQL building blocks: table metadata, literals, key predicates, record literals.

use sanare_core::{Error, Result, RowImage, TableRef};
use sanare_pg::{PgResultExt, quote_ident, quote_literal};
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

impl Meta {
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
            table: table.clone(),
            quoted: table.quoted(),
            oid: info.oid,
            columns,
            pk: info.primary_key,
        })
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

    /// `ARRAY[alias."pk1"::text, …]`.
    pub(crate) fn key_array(&self, alias: &str) -> String {
        let parts = self
            .pk
            .iter()
            .map(|k| format!("{alias}.{}::text", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ");
        format!("ARRAY[{parts}]")
    }

    /// `(a."pk1", …) = (b."pk1", …)` (rows compared by primary key).
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

    /// `(t."pk1", …) IN ((lit, …), …)` for key values in primary-key order.
    pub(crate) fn keys_in(&self, alias: &str, keys: &[Vec<Option<String>>]) -> Result<String> {
        if keys.is_empty() {
            return Ok("false".into());
        }
        let types = self
            .pk
            .iter()
            .map(|k| self.col(k).map(|c| c.type_name.clone()))
            .collect::<Result<Vec<_>>>()?;
        let tuples = keys
            .iter()
            .map(|key| {
                let vals = key
                    .iter()
                    .zip(&types)
                    .map(|(v, ty)| lit(v.as_deref(), ty))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("({vals})")
            })
            .collect::<Vec<_>>()
            .join(", ");
        Ok(format!("({}) IN ({tuples})", Meta::list(alias, &self.pk)))
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

/// `'value'::type`, or `NULL::type`.
pub(crate) fn lit(value: Option<&str>, type_name: &str) -> String {
    match value {
        Some(v) => format!("{}::{type_name}", quote_literal(v)),
        None => format!("NULL::{type_name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sanare_core::ColumnValue;

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
    fn key_predicates_cast_literals_to_the_column_type() {
        let m = meta();
        assert_eq!(
            m.keys_in("t", &[vec![Some("4".into())], vec![Some("it's".into())]])
                .unwrap(),
            "(t.\"id\") IN (('4'::bigint), ('it''s'::bigint))"
        );
        assert_eq!(m.keys_in("t", &[]).unwrap(), "false");
    }
}
