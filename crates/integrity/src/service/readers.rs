//! Reading a run back: its report, its violations page by page (never all at
//! once), and the JSON and CSV exports streamed from those pages.

use futures_util::{Stream, StreamExt, TryStreamExt};
use sanare_core::{BoxStream, CheckId, Error, Result, TableRef, Violation, ViolationId};
use sanare_pg::{PgResultExt, get_conn};

use super::Integrity;
use crate::report::IntegrityReport;

/// A query over persisted violations, oldest id first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ViolationQuery {
    /// Of this run only.
    pub check: Option<CheckId>,
    /// Of this table only.
    pub table: Option<TableRef>,
    /// Of this type only ([`sanare_core::ViolationKind::code`], `"referential"`).
    pub violation_type: Option<String>,
    /// After this violation (in id order): the last one of the previous page.
    pub after: Option<ViolationId>,
    /// At most this many (default 1000): the page size.
    pub limit: Option<i64>,
}

impl ViolationQuery {
    /// Every violation (up to the limit).
    pub fn new() -> Self {
        Self::default()
    }
    /// Of this run.
    pub fn check(mut self, check: CheckId) -> Self {
        self.check = Some(check);
        self
    }
    /// Of this table.
    pub fn table(mut self, table: TableRef) -> Self {
        self.table = Some(table);
        self
    }
    /// Of this type.
    pub fn violation_type(mut self, code: &str) -> Self {
        self.violation_type = Some(code.to_owned());
        self
    }
    /// After `id`: the next page.
    pub fn after(mut self, id: ViolationId) -> Self {
        self.after = Some(id);
        self
    }
    /// At most `n`.
    pub fn limit(mut self, n: i64) -> Self {
        self.limit = Some(n);
        self
    }
}

/// Every violation matching `query` as its stored JSON text, read a page at a time
/// (`query.limit`, else the configured batch size).
fn raw_pages(
    this: Integrity,
    query: ViolationQuery,
) -> impl Stream<Item = Result<(ViolationId, String)>> + Send {
    let page = query
        .limit
        .unwrap_or_else(|| i64::try_from(this.inner.config.batch_size).unwrap_or(1000))
        .max(1);
    futures_util::stream::try_unfold(
        (this, query, false),
        move |(this, mut query, ended)| async move {
            if ended {
                return Ok(None);
            }
            query.limit = Some(page);
            let rows = this.raw_page(&query).await?;
            let ended = i64::try_from(rows.len()).unwrap_or(i64::MAX) < page;
            query.after = rows.last().map(|v| v.0);
            let items = futures_util::stream::iter(rows.into_iter().map(Ok));
            Ok::<_, Error>(Some((items, (this, query, ended))))
        },
    )
    .try_flatten()
}

/// Every violation matching `query`, read a page at a time.
pub(super) fn pages(
    this: Integrity,
    query: ViolationQuery,
) -> impl Stream<Item = Result<Violation>> + Send {
    raw_pages(this, query).map(|r| r.and_then(|(_, json)| parse(&json)))
}

fn parse(json: &str) -> Result<Violation> {
    serde_json::from_str(json).map_err(|e| Error::corrupt("stored violation", e.to_string()))
}

impl Integrity {
    /// The persisted report of a run.
    pub async fn report(&self, check: CheckId) -> Result<IntegrityReport> {
        let client = get_conn(&self.inner.pool).await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT report FROM {}.integrity_checks WHERE id = $1",
                    self.s()
                ),
                &[&check.as_uuid()],
            )
            .await
            .context("reading an integrity report")?
            .ok_or_else(|| Error::not_found(format!("integrity check {check}")))?;
        let report: Option<serde_json::Value> = row.get(0);
        let report = report
            .ok_or_else(|| Error::conflict(format!("integrity check {check} has not finished")))?;
        serde_json::from_value(report)
            .map_err(|e| Error::corrupt("stored integrity report", e.to_string()))
    }

    /// One page of persisted violations matching `query`, oldest id first: at most
    /// `query.limit` (default 1000), after `query.after`. Pass the last id of a page
    /// as the next page's `after`, or use [`Integrity::violations_matching`].
    pub async fn query_violations(&self, query: &ViolationQuery) -> Result<Vec<Violation>> {
        self.raw_page(query)
            .await?
            .iter()
            .map(|(_, json)| parse(json))
            .collect()
    }

    /// One page of stored violations: id and JSON text.
    async fn raw_page(&self, query: &ViolationQuery) -> Result<Vec<(ViolationId, String)>> {
        let client = get_conn(&self.inner.pool).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT id, violation::text FROM {}.integrity_violations
                      WHERE ($1::uuid IS NULL OR check_id = $1)
                        AND ($2::text IS NULL OR (table_schema = $2 AND table_name = $3))
                        AND ($4::text IS NULL OR violation_type = $4)
                        AND ($5::uuid IS NULL OR id > $5)
                      ORDER BY id LIMIT $6",
                    self.s()
                ),
                &[
                    &query.check.map(|c| c.as_uuid()),
                    &query.table.as_ref().map(|t| t.schema.clone()),
                    &query.table.as_ref().map(|t| t.name.clone()),
                    &query.violation_type,
                    &query.after.map(|v| v.as_uuid()),
                    &query.limit.unwrap_or(1000),
                ],
            )
            .await
            .context("querying violations")?;
        Ok(rows
            .iter()
            .map(|r| (ViolationId::from_uuid(r.get(0)), r.get(1)))
            .collect())
    }

    /// Every persisted violation matching `query` (its `limit` is the page size),
    /// streamed page by page.
    pub fn violations_matching(&self, query: ViolationQuery) -> BoxStream<'_, Result<Violation>> {
        Box::pin(pages(self.clone(), query))
    }

    /// Exports a run as one JSON document (see [`crate::report::write_json`]),
    /// written as its violations are read, a page at a time.
    pub async fn export_json(&self, check: CheckId, out: &mut impl std::io::Write) -> Result<()> {
        let report = self.report(check).await?;
        let mut doc = crate::report::JsonWriter::start(&report, out)?;
        // Each violation as stored: the JSON the run wrote, not parsed again.
        let mut stream =
            std::pin::pin!(raw_pages(self.clone(), ViolationQuery::new().check(check)));
        while let Some(v) = stream.next().await {
            doc.stored_violation(&v?.1)?;
        }
        doc.finish()
    }

    /// Exports a run's violations as CSV, one row per affected record, written as
    /// they are read, a page at a time.
    pub async fn export_csv(&self, check: CheckId, out: &mut impl std::io::Write) -> Result<()> {
        crate::report::write_csv_header(out)?;
        let mut stream =
            std::pin::pin!(raw_pages(self.clone(), ViolationQuery::new().check(check)));
        while let Some(v) = stream.next().await {
            crate::report::write_stored_csv_row(check, &v?.1, out)?;
        }
        out.flush()
            .map_err(|e| Error::io("writing the CSV report", e))
    }
}
