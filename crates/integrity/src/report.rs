//! Reports: the headline record, the on-disk violation stream, JSON and CSV export.

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
    let key = v.row.as_ref().map(|r| {
        r.key
            .iter()
            .map(|c| format!("{}={}", c.column, c.value.as_deref().unwrap_or("NULL")))
            .collect::<Vec<_>>()
            .join(";")
    });
    let detected = v
        .detected_at
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::other("formatting a timestamp", e))?;
    let fields = [
        v.id.to_string(),
        check.to_string(),
        v.table.to_string(),
        key.unwrap_or_default(),
        v.kind.code().to_owned(),
        v.severity.as_str().to_owned(),
        v.description.clone(),
        v.recommended_action.clone(),
        detected,
        v.details.to_string(),
    ];
    let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    writeln!(out, "{}", line.join(",")).map_err(|e| Error::io("writing the CSV report", e))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_quoting() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
