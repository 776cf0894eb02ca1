//! The canonical, versioned row encoding and the row checksums computed over it.
//!
//! The encoding (version 1, specified in `docs/formats.md`, section "Row checksum
//! encoding") is built from PostgreSQL's text form of each value, so the SQL trigger
//! installed by [`install_checksum_trigger`] and the Rust [`Checksummer`] produce the
//! same bytes:
//!
//! ```text
//! message := "SNRW" | version:u16be (= 1) | ncols:u32be | field*
//! field   := 0x00                          -- SQL NULL
//!          | 0x01 | len:u32be | utf8 bytes -- the value's text form
//! ```
//!
//! Text forms are those printed under the canonical session settings
//! [`CANONICAL_SETTINGS`] (UTC, ISO dates, hex bytea, shortest exact floats, `C`
//! money).
//! Integers are big-endian here because that is what PostgreSQL's `int4send` produces,
//! which keeps the SQL side a plain expression.

use std::fmt;

use sanare_core::{ColumnValue, Error, Result, RowChecksum, TableRef};
use sanare_pg::{PgResultExt, SchemaName, quote_ident};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio_postgres::GenericClient;

/// The magic that starts every encoded row.
pub const ROW_MAGIC: [u8; 4] = *b"SNRW";

/// The version of the canonical row encoding this crate writes and reads.
pub const ENCODING_VERSION: u16 = 1;

/// The session settings under which values are printed for the encoding. Every reader
/// (the runner, the trigger function, the corruption detector) applies these; they
/// live in `sanare-pg` ([`sanare_pg::canonical`]) so that both crates share them.
pub use sanare_pg::canonical::{CANONICAL_SETTINGS, canonical_settings_sql};

/// Which hash a checksum column holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ChecksumAlgorithm {
    /// BLAKE3 of the encoded row (the default; computed by the host or by sanare).
    #[default]
    Blake3,
    /// BLAKE3 in keyed mode: without the key an intruder cannot forge a checksum.
    /// The key never goes into the database.
    Blake3Keyed,
    /// SHA-256 of the encoded row: the algorithm PostgreSQL computes with built-in
    /// SQL (`sha256()`), used by the trigger of [`install_checksum_trigger`].
    Sha256,
}

impl ChecksumAlgorithm {
    /// The stable name (`"blake3"`, `"blake3_keyed"`, `"sha256"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Blake3 => "blake3",
            ChecksumAlgorithm::Blake3Keyed => "blake3_keyed",
            ChecksumAlgorithm::Sha256 => "sha256",
        }
    }
}

/// Computes row checksums: [`RowChecksum`] for the corruption detector, and the
/// incremental form the runner feeds raw column bytes into.
#[derive(Clone)]
pub struct Checksummer {
    algorithm: ChecksumAlgorithm,
    key: Option<[u8; 32]>,
}

impl fmt::Debug for Checksummer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Checksummer")
            .field("algorithm", &self.algorithm)
            .field("keyed", &self.key.is_some())
            .finish()
    }
}

impl Default for Checksummer {
    fn default() -> Self {
        Self::blake3()
    }
}

impl Checksummer {
    /// Unkeyed BLAKE3.
    pub fn blake3() -> Self {
        Self {
            algorithm: ChecksumAlgorithm::Blake3,
            key: None,
        }
    }

    /// Keyed BLAKE3 with a 32-byte secret key.
    pub fn blake3_keyed(key: [u8; 32]) -> Self {
        Self {
            algorithm: ChecksumAlgorithm::Blake3Keyed,
            key: Some(key),
        }
    }

    /// SHA-256, as computed by the SQL trigger.
    pub fn sha256() -> Self {
        Self {
            algorithm: ChecksumAlgorithm::Sha256,
            key: None,
        }
    }

    /// The checksummer for `algorithm`; `key` is required for (only)
    /// [`ChecksumAlgorithm::Blake3Keyed`].
    pub fn for_algorithm(algorithm: ChecksumAlgorithm, key: Option<[u8; 32]>) -> Result<Self> {
        match (algorithm, key) {
            (ChecksumAlgorithm::Blake3Keyed, Some(key)) => Ok(Self::blake3_keyed(key)),
            (ChecksumAlgorithm::Blake3Keyed, None) => Err(Error::config(
                "checksum_key",
                "a blake3_keyed checksum rule needs a key: pass one with IntegrityBuilder::checksum_key",
            )),
            (ChecksumAlgorithm::Blake3, _) => Ok(Self::blake3()),
            (ChecksumAlgorithm::Sha256, _) => Ok(Self::sha256()),
        }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> ChecksumAlgorithm {
        self.algorithm
    }

    /// A fresh incremental hasher for a row of `ncols` columns.
    pub fn row(&self, ncols: u32) -> RowHasher {
        let mut h = RowHasher {
            algorithm: self.algorithm,
            key: self.key,
            buf: Vec::with_capacity(128),
        };
        h.restart(ncols);
        h
    }

    /// The canonical encoding of a row (what is hashed), for tests and tools.
    pub fn encode(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut out = Vec::with_capacity(10 + values.len() * 16);
        out.extend_from_slice(&ROW_MAGIC);
        out.extend_from_slice(&ENCODING_VERSION.to_be_bytes());
        out.extend_from_slice(&len_u32(values.len()).to_be_bytes());
        for v in values {
            match v {
                None => out.push(0),
                Some(b) => {
                    out.push(1);
                    out.extend_from_slice(&len_u32(b.len()).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
        out
    }
}

fn len_u32(n: usize) -> u32 {
    // PostgreSQL values are at most 1 GiB, so this never saturates in practice.
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl RowChecksum for Checksummer {
    fn encoding_version(&self) -> u16 {
        ENCODING_VERSION
    }

    fn checksum(&self, values: &[ColumnValue]) -> [u8; 32] {
        let mut h = self.row(len_u32(values.len()));
        for v in values {
            h.field(v.value.as_deref().map(str::as_bytes));
        }
        h.finish()
    }

    fn checksum_text(&self, _columns: &[ColumnValue], values: &[Option<&str>]) -> [u8; 32] {
        // Called once per row of a scan: the encoding buffer is reused per thread.
        thread_local! {
            static HASHER: std::cell::RefCell<Option<RowHasher>> = const { std::cell::RefCell::new(None) };
        }
        HASHER.with_borrow_mut(|slot| {
            let h = slot.get_or_insert_with(|| self.row(0));
            h.algorithm = self.algorithm;
            h.key = self.key;
            h.restart(len_u32(values.len()));
            for v in values {
                h.field(v.map(str::as_bytes));
            }
            h.digest()
        })
    }
}

/// An incremental row hash: feed each column with [`RowHasher::field`], then
/// [`RowHasher::finish`].
pub struct RowHasher {
    algorithm: ChecksumAlgorithm,
    key: Option<[u8; 32]>,
    /// The row's canonical encoding so far, hashed in one call by `finish`: a
    /// hasher fed field by field pays its per-call cost several times per column.
    buf: Vec<u8>,
}

impl fmt::Debug for RowHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RowHasher")
    }
}

impl RowHasher {
    /// Adds one column: `None` for NULL, else the UTF-8 bytes of its text form.
    pub fn field(&mut self, value: Option<&[u8]>) {
        match value {
            None => self.buf.push(0),
            Some(b) => {
                self.buf.push(1);
                self.buf.extend_from_slice(&len_u32(b.len()).to_be_bytes());
                self.buf.extend_from_slice(b);
            }
        }
    }

    /// Starts over for another row of `ncols` columns, keeping the buffer: a caller
    /// hashing many rows uses one hasher ([`RowHasher::digest`] after each row).
    pub fn restart(&mut self, ncols: u32) {
        self.buf.clear();
        self.buf.extend_from_slice(&ROW_MAGIC);
        self.buf.extend_from_slice(&ENCODING_VERSION.to_be_bytes());
        self.buf.extend_from_slice(&ncols.to_be_bytes());
    }

    /// The 32-byte checksum.
    pub fn finish(self) -> [u8; 32] {
        self.digest()
    }

    /// The 32-byte checksum of the row fed since the last restart.
    pub fn digest(&self) -> [u8; 32] {
        match (self.algorithm, &self.key) {
            (ChecksumAlgorithm::Blake3Keyed, Some(key)) => {
                *blake3::keyed_hash(key, &self.buf).as_bytes()
            }
            (ChecksumAlgorithm::Sha256, _) => sha2::Sha256::digest(&self.buf).into(),
            _ => *blake3::hash(&self.buf).as_bytes(),
        }
    }
}

/// The SQL expression (over `NEW`, or a table alias) that computes a version-1 SHA-256
/// row checksum in PostgreSQL, given the columns to encode in order.
pub fn sql_checksum_expr(schema: &SchemaName, row_alias: &str, columns: &[String]) -> String {
    let mut expr = format!(
        "sha256('\\x{}'::bytea || int4send({})",
        hex_of(&[&ROW_MAGIC[..], &ENCODING_VERSION.to_be_bytes()].concat()),
        columns.len()
    );
    for c in columns {
        expr.push_str(&format!(
            " || {}.row_checksum_field(({row_alias}.{})::text)",
            schema.quoted(),
            quote_ident(c)
        ));
    }
    expr.push(')');
    expr
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The columns a checksum of `table` covers: every column in table order except the
/// checksum column and generated columns (which a BEFORE trigger cannot see).
pub async fn checksum_columns(
    client: &impl GenericClient,
    table: &TableRef,
    checksum_column: &str,
) -> Result<Vec<String>> {
    let info = sanare_pg::catalog::describe(client, table).await?;
    if info.column(checksum_column).is_none() {
        return Err(Error::config(
            "checksum column",
            format!("{table} has no column `{checksum_column}` to hold a row checksum"),
        ));
    }
    Ok(info
        .columns
        .iter()
        .filter(|c| c.name != checksum_column && !c.generated)
        .map(|c| c.name.clone())
        .collect())
}

/// Installs a `BEFORE INSERT OR UPDATE` trigger on `table` that keeps `column` (a
/// `bytea`) equal to the SHA-256 version-1 row checksum ([`Checksummer::sha256`]),
/// using only built-in SQL. With `backfill`, existing rows get their checksum too
/// (an `UPDATE` of every row: run it in a quiet period on large tables).
///
/// The trigger function lives in sanare's schema (which [`crate::migrate`] must have
/// created) and applies [`CANONICAL_SETTINGS`] while it runs. Re-run after adding or
/// dropping columns of `table`, since the function names its columns.
pub async fn install_checksum_trigger(
    client: &impl GenericClient,
    schema: &SchemaName,
    table: &TableRef,
    column: &str,
    backfill: bool,
) -> Result<()> {
    let columns = checksum_columns(client, table, column).await?;
    let info = sanare_pg::catalog::describe(client, table).await?;
    let func = format!(
        "{}.{}",
        schema.quoted(),
        quote_ident(&format!("row_checksum_{}", info.oid))
    );
    let settings = sanare_pg::canonical_function_settings();
    let expr = sql_checksum_expr(schema, "NEW", &columns);
    let sql = format!(
        "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql{settings} AS $sanare$
         BEGIN NEW.{col} := {expr}; RETURN NEW; END $sanare$;
         DROP TRIGGER IF EXISTS sanare_row_checksum ON {t};
         CREATE TRIGGER sanare_row_checksum BEFORE INSERT OR UPDATE ON {t}
           FOR EACH ROW EXECUTE FUNCTION {func}();",
        col = quote_ident(column),
        t = table.quoted(),
    );
    client
        .batch_execute(&sql)
        .await
        .with_context(|| format!("installing the row checksum trigger on {table}"))?;
    if backfill {
        client
            .execute(
                &format!(
                    "UPDATE {} SET {c} = {c}",
                    table.quoted(),
                    c = quote_ident(column)
                ),
                &[],
            )
            .await
            .with_context(|| format!("backfilling row checksums of {table}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        hex_of(b)
    }

    /// Golden vectors: these bytes and digests are frozen by `docs/formats.md`.
    #[test]
    fn golden_vectors_of_encoding_version_1() {
        let row = [Some(&b"42"[..]), None, Some(&b"h\xc3\xa9"[..])];
        let enc = Checksummer::encode(&row);
        assert_eq!(
            hex(&enc),
            "534e52570001000000030100000002343200010000000368c3a9"
        );
        let values = vec![
            ColumnValue::new("id", "bigint", Some("42")),
            ColumnValue::new("note", "text", None::<String>),
            ColumnValue::new("name", "text", Some("hé")),
        ];
        assert_eq!(
            hex(&Checksummer::blake3().checksum(&values)),
            hex(blake3::hash(&enc).as_bytes())
        );
        assert_eq!(hex(&Checksummer::blake3().checksum(&values)), GOLDEN_BLAKE3);
        assert_eq!(hex(&Checksummer::sha256().checksum(&values)), GOLDEN_SHA256);
        assert_eq!(
            hex(&Checksummer::blake3_keyed([7; 32]).checksum(&values)),
            GOLDEN_BLAKE3_KEYED
        );
        let empty = Checksummer::encode(&[]);
        assert_eq!(hex(&empty), "534e5257000100000000");
        assert_eq!(Checksummer::blake3().encoding_version(), 1);
    }

    const GOLDEN_BLAKE3: &str = "7d970e6e104f8119a56982e9aad43df428e5f70abfe71a944a0b5a943ea37cf1";
    const GOLDEN_SHA256: &str = "2781738fa6a458f52d7b5a5bccd3867a8484608fd62601952856928382e2debc";
    const GOLDEN_BLAKE3_KEYED: &str =
        "1c005fd56a12d9db5213a3a417bb284da1ba798cf190697563e4663870a27fe2";

    #[test]
    fn keys_change_the_checksum_and_are_not_printed() {
        let v = vec![ColumnValue::new("a", "text", Some("x"))];
        let a = Checksummer::blake3_keyed([1; 32]);
        let b = Checksummer::blake3_keyed([2; 32]);
        assert_ne!(a.checksum(&v), b.checksum(&v));
        assert_ne!(a.checksum(&v), Checksummer::blake3().checksum(&v));
        assert!(!format!("{a:?}").contains("1, 1"));
        assert!(Checksummer::for_algorithm(ChecksumAlgorithm::Blake3Keyed, None).is_err());
    }

    #[test]
    fn null_and_empty_string_differ_and_fields_do_not_run_together() {
        let c = Checksummer::blake3();
        let null = vec![ColumnValue::new("a", "text", None::<String>)];
        let empty = vec![ColumnValue::new("a", "text", Some(""))];
        assert_ne!(c.checksum(&null), c.checksum(&empty));
        let ab = vec![
            ColumnValue::new("a", "text", Some("ab")),
            ColumnValue::new("b", "text", Some("")),
        ];
        let a_b = vec![
            ColumnValue::new("a", "text", Some("a")),
            ColumnValue::new("b", "text", Some("b")),
        ];
        assert_ne!(c.checksum(&ab), c.checksum(&a_b));
    }
}
