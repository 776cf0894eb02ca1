//! A restore's database errors, told in terms of what conflicts with what.
//!
//! When the snapshot's rows do not fit the live schema (a constraint added since the
//! capture, a column made NOT NULL, a key the rows now duplicate), PostgreSQL rejects
//! a statement of the restore and the whole transaction rolls back. The error then
//! says which table, which constraint and which row, and that nothing changed.

use sanare_core::Error;

/// The SQLSTATE classes of a row that does not fit the schema: integrity constraint
/// violations (`23…`: not null, foreign key, unique, check, exclusion) and data
/// exceptions (`22…`: an expression index or a check dividing by zero, a value out
/// of a domain's range).
fn is_data_conflict(code: &str) -> bool {
    code.starts_with("23") || code.starts_with("22")
}

/// Maps an error of a restore statement on `table` (done while `doing`): a data
/// conflict becomes [`Error::Conflict`] naming the table, the constraint and the row;
/// anything else keeps the driver's error with `doing` as its context.
pub(crate) fn explain(table: &str, doing: &str, err: tokio_postgres::Error) -> Error {
    let Some(db) = err.as_db_error() else {
        return sanare_pg::map_pg_error(format!("{doing} ({table})"), err);
    };
    if !is_data_conflict(db.code().code()) {
        return sanare_pg::map_pg_error(format!("{doing} ({table})"), err);
    }
    // A parallel restore's shadow tables stand for the live ones.
    let named = qualified(db.schema(), db.table()).filter(|t| !t.contains("sanare_shadow_"));
    let mut msg = format!(
        "the snapshot's rows conflict with the live schema of {}: {}",
        named.unwrap_or_else(|| table.to_owned()),
        db.message()
    );
    if let Some(c) = db.constraint() {
        msg.push_str(&format!(" (constraint {c})"));
    } else if let Some(c) = db.column() {
        msg.push_str(&format!(" (column {c})"));
    }
    if let Some(detail) = db.detail() {
        msg.push_str(&format!("; row: {}", detail.trim_end_matches('.')));
    }
    msg.push_str(&format!(
        "; while {doing}. The restore was rolled back and changed nothing: change the \
         schema or the rows so they fit, or restore into a scratch schema (`--into`)"
    ));
    Error::conflict(msg)
}

fn qualified(schema: Option<&str>, table: Option<&str>) -> Option<String> {
    match (schema, table) {
        (Some(s), Some(t)) => Some(format!("{s}.{t}")),
        (None, Some(t)) => Some(t.to_owned()),
        _ => None,
    }
}

/// `explain` as a closure for `map_err`.
pub(crate) fn on<'a>(
    table: &'a str,
    doing: &'a str,
) -> impl FnOnce(tokio_postgres::Error) -> Error + 'a {
    move |e| explain(table, doing, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a real server: a CHECK the rows break names the table, the
    /// constraint and the row; a syntax error stays a database error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_conflicts_name_the_table_the_constraint_and_the_row() {
        let db = sanare_testing::test_db().await;
        let client = db.connect().await;
        client
            .batch_execute(
                "CREATE TABLE t (id int PRIMARY KEY, n int CONSTRAINT n_positive CHECK (n > 0))",
            )
            .await
            .unwrap();
        let e = client
            .batch_execute("INSERT INTO t VALUES (7, -1)")
            .await
            .unwrap_err();
        let err = explain("public.t", "loading public.t", e);
        let text = err.to_string();
        assert!(matches!(err, Error::Conflict(_)), "{err:?}");
        for part in ["public.t", "n_positive", "(7, -1)", "changed nothing"] {
            assert!(text.contains(part), "{part} missing from: {text}");
        }
        let e = client.batch_execute("SELEC 1").await.unwrap_err();
        let err = explain("public.t", "loading public.t", e);
        assert!(matches!(err, Error::Database { .. }), "{err:?}");
    }
}
