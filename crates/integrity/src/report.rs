//! Reports: the headline record, the on-disk violation stream, JSON and CSV export.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use sanare_core::{CheckFamily, CheckId, Error, Result, Severity, Violation};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CheckStatus {
    /// Still running (or the process died while it ran).
    Running,
    /// Finished.
    Completed,
    /// Cancelled through its `Control`.
    Cancelled,
    /// Failed; see `error`.
    Failed,
}

impl CheckStatus {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Running => "running",
            CheckStatus::Completed => "completed",
            CheckStatus::Cancelled => "cancelled",
            CheckStatus::Failed => "failed",
        }
    }
}

/// The results of one check family in a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FamilyResult {
    /// Probes run (one per rule group, table and chunk).
    pub probes_run: u64,
    /// Suspects found in the scan snapshot.
    pub suspects: u64,
    /// Suspects dismissed because a fresh snapshot no longer showed them.
    pub dismissed: u64,
    /// Violations reported.
    pub violations: u64,
}

impl FamilyResult {
    pub(crate) fn add(&mut self, other: &FamilyResult) {
        self.probes_run += other.probes_run;
        self.suspects += other.suspects;
        self.dismissed += other.dismissed;
        self.violations += other.violations;
    }
}

/// One validation run, as persisted to `integrity_checks` and exported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct IntegrityReport {
    /// The run id.
    pub id: CheckId,
    /// When it started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// How long it took.
    pub duration: Duration,
    /// How it ended.
    pub status: CheckStatus,
    /// The error, when it failed.
    pub error: Option<String>,
    /// Tables checked.
    pub tables_checked: u64,
    /// Rows read (the largest per-table count over the chunked families).
    pub rows_checked: u64,
    /// Results per family.
    pub families: BTreeMap<CheckFamily, FamilyResult>,
    /// Violations by severity.
    pub violations_by_severity: BTreeMap<Severity, u64>,
    /// What to do about the findings as a whole.
    pub recommended_action: String,
    /// The JSON-lines file holding every violation of the run, one per line.
    pub violations_file: Option<PathBuf>,
}

impl IntegrityReport {
    /// All violations.
    pub fn total_violations(&self) -> u64 {
        self.violations_by_severity.values().sum()
    }

    /// The summary the [`sanare_core::IntegrityService`] trait returns.
    pub fn summary(&self) -> sanare_core::ValidationSummary {
        let mut s = sanare_core::ValidationSummary::new(self.id, self.started_at);
        s.duration = self.duration;
        s.tables_checked = self.tables_checked;
        s.rows_checked = self.rows_checked;
        s.violations_by_severity = self.violations_by_severity.clone();
        s
    }

    pub(crate) fn recommend(&mut self) {
        let worst = self
            .violations_by_severity
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(s, _)| *s)
            .max();
        self.recommended_action = match worst {
            None => "nothing to do: no violation found".into(),
            Some(Severity::Critical | Severity::High) => {
                "repair now: plan repairs for the high and critical violations (dry-run first) and re-validate".into()
            }
            Some(_) => "schedule repairs for the listed rows and fix the writers that produced them".into(),
        };
    }
}

/// A whole exported report: what [`write_json`] writes and [`read_json`] reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReportDocument {
    /// The headline.
    pub report: IntegrityReport,
    /// Every violation.
    pub violations: Vec<Violation>,
}

/// Writes `report` and the violations as one JSON document
/// (`{"report": …, "violations": [ … ]}`), streaming the violations.
pub fn write_json<W: Write>(
    report: &IntegrityReport,
    violations: impl IntoIterator<Item = Result<Violation>>,
    out: &mut W,
) -> Result<()> {
    let mut doc = JsonWriter::start(report, out)?;
    for v in violations {
        doc.violation(&v?)?;
    }
    doc.finish()
}

/// A [`write_json`] document written incrementally: the report first, then each
/// violation as it comes, then the end. Nothing but the current violation is held.
pub struct JsonWriter<'a, W: Write> {
    out: &'a mut W,
    first: bool,
}

impl<'a, W: Write> JsonWriter<'a, W> {
    /// Starts the document with its report.
    pub fn start(report: &IntegrityReport, out: &'a mut W) -> Result<Self> {
        out.write_all(b"{\"report\":").map_err(json_io)?;
        serde_json::to_writer(&mut *out, report)
            .map_err(|e| Error::other("writing the JSON report", e))?;
        out.write_all(b",\"violations\":[").map_err(json_io)?;
        Ok(Self { out, first: true })
    }

    /// Appends one violation.
    pub fn violation(&mut self, v: &Violation) -> Result<()> {
        if !self.first {
            self.out.write_all(b",").map_err(json_io)?;
        }
        self.first = false;
        serde_json::to_writer(&mut *self.out, v)
            .map_err(|e| Error::other("writing the JSON report", e))
    }

    /// Appends one violation as stored by a run (the JSON it serialized).
    pub(crate) fn stored_violation(&mut self, json: &str) -> Result<()> {
        if !self.first {
            self.out.write_all(b",").map_err(json_io)?;
        }
        self.first = false;
        self.out.write_all(json.as_bytes()).map_err(json_io)
    }

    /// Ends the document.
    pub fn finish(self) -> Result<()> {
        self.out.write_all(b"]}\n").map_err(json_io)?;
        self.out.flush().map_err(json_io)
    }
}

fn json_io(e: std::io::Error) -> Error {
    Error::io("writing the JSON report", e)
}

/// Reads a document written by [`write_json`] (whole, into memory: for tools and
/// tests; stream the violations of a large run with
/// [`crate::Integrity::violations_matching`] instead).
pub fn read_json(input: impl std::io::Read) -> Result<ReportDocument> {
    serde_json::from_reader(input)
        .map_err(|e| Error::corrupt("JSON integrity report", e.to_string()))
}

/// The CSV header of [`write_csv`].
pub const CSV_HEADER: &str = "violation_id,check_id,table,row_key,violation_type,severity,description,recommended_action,detected_at,details";

/// Writes one CSV row per affected record (RFC 4180 quoting), after the header.
pub fn write_csv<W: Write>(
    check: CheckId,
    violations: impl IntoIterator<Item = Result<Violation>>,
    out: &mut W,
) -> Result<()> {
    write_csv_header(out)?;
    for v in violations {
        write_csv_row(check, &v?, out)?;
    }
    Ok(())
}

/// Writes [`CSV_HEADER`] and a line end.
pub fn write_csv_header<W: Write>(out: &mut W) -> Result<()> {
    writeln!(out, "{CSV_HEADER}").map_err(|e| Error::io("writing the CSV report", e))
}

/// Writes the CSV row of one violation of run `check`.
pub fn write_csv_row<W: Write>(check: CheckId, v: &Violation, out: &mut W) -> Result<()> {
    let json = serde_json::to_string(v).map_err(|e| Error::other("encoding a violation", e))?;
    write_stored_csv_row(check, &json, out)
}

/// The fields of a stored violation that its CSV row shows, borrowed from its
/// JSON (no `Violation` is built: an export of millions of rows parses each once,
/// and only as far as it needs).
#[derive(Deserialize)]
struct CsvView<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    kind: KindView<'a>,
    #[serde(borrow)]
    severity: Cow<'a, str>,
    #[serde(borrow)]
    table: TableView<'a>,
    #[serde(borrow)]
    row: Option<RowView<'a>>,
    #[serde(borrow)]
    description: Cow<'a, str>,
    #[serde(borrow)]
    detected_at: Cow<'a, str>,
    #[serde(borrow)]
    recommended_action: Cow<'a, str>,
    #[serde(borrow)]
    details: &'a serde_json::value::RawValue,
}

#[derive(Deserialize)]
struct KindView<'a> {
    #[serde(borrow, rename = "type")]
    code: Cow<'a, str>,
}

#[derive(Deserialize)]
struct TableView<'a> {
    #[serde(borrow)]
    schema: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
}

#[derive(Deserialize)]
struct RowView<'a> {
    #[serde(borrow)]
    key: Vec<KeyView<'a>>,
}

#[derive(Deserialize)]
struct KeyView<'a> {
    #[serde(borrow)]
    column: Cow<'a, str>,
    #[serde(borrow)]
    value: Option<Cow<'a, str>>,
}

/// Writes the CSV row of one violation as a run stored it (its JSON).
pub(crate) fn write_stored_csv_row<W: Write>(
    check: CheckId,
    json: &str,
    out: &mut W,
) -> Result<()> {
    let v: CsvView<'_> = serde_json::from_str(json)
        .map_err(|e| Error::corrupt("stored violation", e.to_string()))?;
    let key = v
        .row
        .map(|r| {
            r.key
                .iter()
                .map(|c| format!("{}={}", c.column, c.value.as_deref().unwrap_or("NULL")))
                .collect::<Vec<_>>()
                .join(";")
        })
        .unwrap_or_default();
    let fields: [&str; 10] = [
        &v.id,
        &check.to_string(),
        &format!("{}.{}", v.table.schema, v.table.name),
        &key,
        &v.kind.code,
        &v.severity,
        &v.description,
        &v.recommended_action,
        &v.detected_at,
        v.details.get(),
    ];
    let line: Vec<Cow<'_, str>> = fields.iter().map(|f| csv_field(f)).collect();
    writeln!(out, "{}", line.join(",")).map_err(|e| Error::io("writing the CSV report", e))
}

fn csv_field(s: &str) -> Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        Cow::Owned(format!("\"{}\"", s.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_violation_gives_the_csv_row_of_the_violation() {
        use sanare_core::{ColumnValue, RowRef, Severity, TableRef, ViolationKind};
        let table = TableRef::new("s", "t,1");
        let v = Violation::new(
            ViolationKind::Consistency { rule: "r".into() },
            Severity::High,
            table.clone(),
            Some(RowRef::new(
                table,
                vec![
                    ColumnValue::new("a", "text", Some("x\"y")),
                    ColumnValue::new("b", "int", None::<String>),
                ],
            )),
            "said \"no\", twice\n",
        )
        .with_details(serde_json::json!({"k": [1, "é"]}));
        let check = CheckId::new();
        let mut from_stored = Vec::new();
        write_stored_csv_row(check, &serde_json::to_string(&v).unwrap(), &mut from_stored).unwrap();
        let line = String::from_utf8(from_stored).unwrap();
        let detected = v
            .detected_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        assert_eq!(
            line,
            format!(
                "{},{check},\"s.t,1\",\"a=x\"\"y;b=NULL\",consistency,high,\"said \"\"no\"\", twice\n\",,{detected},\"{{\"\"k\"\":[1,\"\"é\"\"]}}\"\n",
                v.id
            )
        );
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
