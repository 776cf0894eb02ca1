//! The canonical session settings: the settings under which a value's text form
//! (`value::text`, or a text `COPY`) is the same on every server, database and role.
//!
//! Row checksums hash text forms, and PostgreSQL prints dates, times, intervals,
//! `bytea`, floats and `money` according to session settings that a database or a
//! role may change (`ALTER DATABASE … SET DateStyle = 'SQL, DMY'`). Every reader
//! and writer of a checksum — the SQL trigger, the integrity runner, the corruption
//! scan, its re-read of suspects, the real-time monitor — applies these settings,
//! so they agree with each other whatever the server's defaults.
//!
//! `lc_numeric` changes no text form (only `to_char`); `lc_monetary` changes how
//! `money` prints, and is pinned to `C`.

use crate::quote_ident;

/// The canonical settings, as `(name, value)`; `docs/formats.md` ("Row checksum
/// encoding") specifies them.
pub const CANONICAL_SETTINGS: &[(&str, &str)] = &[
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
];

/// `SET` statements applying [`CANONICAL_SETTINGS`] to a session (for a connection
/// of sanare's own).
pub fn canonical_settings_sql() -> String {
    statements("SET")
}

/// `SET LOCAL` statements applying [`CANONICAL_SETTINGS`] until the end of the
/// current transaction: what a reader on a pooled connection runs right after
/// `BEGIN`, so that the connection goes back to the pool with the host's settings.
pub fn canonical_settings_local_sql() -> String {
    statements("SET LOCAL")
}

/// The `SET name = 'value'` clauses of a `CREATE FUNCTION` that runs under
/// [`CANONICAL_SETTINGS`] (the row checksum trigger function), each preceded by a
/// space.
pub fn canonical_function_settings() -> String {
    CANONICAL_SETTINGS
        .iter()
        .map(|(k, v)| format!(" SET {} = '{v}'", quote_ident(k)))
        .collect()
}

fn statements(verb: &str) -> String {
    CANONICAL_SETTINGS
        .iter()
        .map(|(k, v)| format!("{verb} {} = '{v}';", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_and_clauses_name_every_setting() {
        let set = canonical_settings_sql();
        let local = canonical_settings_local_sql();
        let func = canonical_function_settings();
        for (k, v) in CANONICAL_SETTINGS {
            assert!(set.contains(&format!("SET \"{k}\" = '{v}';")), "{set}");
            assert!(
                local.contains(&format!("SET LOCAL \"{k}\" = '{v}';")),
                "{local}"
            );
            assert!(func.contains(&format!(" SET \"{k}\" = '{v}'")), "{func}");
        }
        assert!(!set.contains("LOCAL"));
    }
}
