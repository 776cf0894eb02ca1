//! `validate` and `scan`: find what is wrong.

use std::path::PathBuf;

use clap::Args;
use sanare::core::TableRef;
use sanare::core::ValidationScope;
use sanare::corruption::{CorruptionIssue, PhysicalReport, ScanReport};

use crate::output::with_progress;
use crate::{Context, EXIT_FINDINGS};

#[derive(Debug, Args)]
pub(crate) struct ValidateArgs {
    /// Only these tables (`schema.table`), repeatable.
    #[arg(long)]
    table: Vec<String>,
    /// Write every violation as CSV to this file.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write the full report (every violation) as JSON to this file (the document
    /// `--json` prints).
    #[arg(long)]
    report: Option<PathBuf>,
}

pub(crate) async fn validate(ctx: &Context, args: ValidateArgs) -> anyhow::Result<u8> {
    let tables = crate::tables(&args.table)?;
    let sanare = ctx.sanare().await?;
    let integrity = sanare.integrity();
    let report = with_progress(&ctx.out, "validate", |control| async move {
        integrity
            .run(ValidationScope::all().tables(tables), &control)
            .await
    })
    .await?;
    // The files are written at once, each by its own task: a run with millions of
    // violations is read back once per file, page by page.
    let mut files = Vec::new();
    for (path, json) in [(&args.csv, false), (&args.report, true)] {
        let Some(path) = path else { continue };
        let mut out = std::fs::File::create(path)
            .map(std::io::BufWriter::new)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
        let integrity = integrity.clone();
        let id = report.id;
        files.push(tokio::spawn(async move {
            if json {
                integrity.export_json(id, &mut out).await
            } else {
                integrity.export_csv(id, &mut out).await
            }
        }));
    }
    for file in files {
        file.await??;
    }
    let total = report.total_violations();
    if ctx.out.json() {
        // One document, `{"report": …, "violations": […]}`, written as the
        // violations are read a page at a time: never the whole run in memory.
        let mut out = std::io::BufWriter::new(std::io::stdout());
        integrity.export_json(report.id, &mut out).await?;
        return Ok(if total > 0 { EXIT_FINDINGS } else { 0 });
    }
    let out = &mut crate::output::Human;
    out.line(format!(
        "check {}: {} tables, {} rows in {:.1}s — {} violations",
        report.id,
        report.tables_checked,
        report.rows_checked,
        report.duration.as_secs_f64(),
        total
    ));
    if total > 0 {
        out.table(
            &["severity", "violations"],
            report
                .violations_by_severity
                .iter()
                .map(|(s, n)| vec![s.to_string(), n.to_string()]),
        );
        out.line(&report.recommended_action);
        out.line(format!(
            "next: `sanare repair plan --check {}` proposes repairs",
            report.id
        ));
    }
    Ok(if total > 0 { EXIT_FINDINGS } else { 0 })
}

#[derive(Debug, Args)]
pub(crate) struct ScanArgs {
    /// Only these tables (`schema.table`), repeatable; every host table otherwise.
    #[arg(long)]
    table: Vec<String>,
    /// Also run physical checks (amcheck heap and B-tree verification, checksum
    /// failures counted by PostgreSQL).
    #[arg(long)]
    physical: bool,
}

pub(crate) async fn scan(ctx: &Context, args: ScanArgs) -> anyhow::Result<u8> {
    let tables = crate::tables(&args.table)?;
    let sanare = ctx.sanare().await?;
    let detector = sanare.corruption();
    let physical = args.physical;
    let (report, physical_reports, failures) =
        with_progress(&ctx.out, "scan", |control| async move {
            let report = if tables.is_empty() {
                detector.scan_all(&control).await?
            } else {
                detector.scan_tables(&tables, &control).await?
            };
            let mut physical_reports = Vec::new();
            let mut failures = None;
            if physical {
                let all: Vec<_> = report
                    .tables_scanned
                    .iter()
                    .chain(report.tables_skipped.iter().map(|(t, _)| t))
                    .cloned()
                    .collect();
                physical_reports = detector.check_physical_tables(&all, &control).await?;
                failures = detector.check_checksum_failures().await?;
            }
            anyhow::Ok((report, physical_reports, failures))
        })
        .await?;
    let issues = || {
        report
            .issues
            .iter()
            .chain(physical_reports.iter().flat_map(|p| p.issues.iter()))
            .chain(failures.iter())
    };
    let found = issues().count();
    if ctx.out.json() {
        write_scan_json(&report, &physical_reports, failures.as_ref(), issues())?;
    } else {
        print_scan(&report, &physical_reports, found, issues());
    }
    Ok(if found == 0 { 0 } else { EXIT_FINDINGS })
}

/// Rows of the human issue table; the rest are counted (all are in `--json` and in
/// the store: `sanare` keeps every finding in `corruption_issues`).
const HUMAN_ISSUES: usize = 100;

fn print_scan<'a>(
    report: &ScanReport,
    physical: &[PhysicalReport],
    found: usize,
    issues: impl Iterator<Item = &'a CorruptionIssue>,
) {
    let mut out = crate::output::Human;
    out.line(format!(
        "scanned {} rows of {} tables in {:.1}s — {found} issues",
        report.rows_scanned,
        report.tables_scanned.len(),
        report.duration.as_secs_f64(),
    ));
    for (table, why) in &report.tables_skipped {
        out.line(format!("skipped {table}: {why}"));
    }
    for w in &report.table_wide {
        out.line(format!("{}: nothing of it will be repaired", w.reason));
    }
    for p in physical {
        out.line(format!(
            "physical {}: amcheck {}, {} heap blocks, {} indexes, {} relations",
            p.table,
            p.amcheck,
            p.heap_blocks_checked,
            p.indexes_checked.len(),
            p.relations.len()
        ));
    }
    if found > 0 {
        out.table(
            &["kind", "severity", "table", "row", "what", "do"],
            issues.take(HUMAN_ISSUES).map(|i| {
                vec![
                    i.kind.to_string(),
                    i.severity.to_string(),
                    i.table.to_string(),
                    i.row.as_ref().map(ToString::to_string).unwrap_or_default(),
                    i.description.clone(),
                    i.recommended_action.clone(),
                ]
            }),
        );
        if found > HUMAN_ISSUES {
            out.line(format!(
                "… and {} more (`sanare scan --json` prints every one)",
                found - HUMAN_ISSUES
            ));
        }
    }
}

/// The scan as one JSON document, written as it goes: the report's figures, the
/// physical reports' figures, then the issues one by one (never one value of
/// everything in memory).
///
/// `{"scan": {…}, "physical": [{…}], "checksum_failures": {…}|null, "issues": [{…}, …]}`
fn write_scan_json<'a>(
    report: &ScanReport,
    physical: &[PhysicalReport],
    failures: Option<&CorruptionIssue>,
    issues: impl Iterator<Item = &'a CorruptionIssue>,
) -> anyhow::Result<()> {
    use std::io::Write;

    #[derive(serde::Serialize)]
    struct ScanFigures<'r> {
        tables_scanned: &'r [TableRef],
        tables_skipped: &'r [(TableRef, String)],
        rows_scanned: u64,
        chunks: u64,
        suspects: u64,
        table_wide: &'r [sanare::corruption::TableWideMismatch],
        issues: usize,
        duration: std::time::Duration,
    }
    #[derive(serde::Serialize)]
    struct PhysicalFigures<'r> {
        table: &'r TableRef,
        amcheck: &'r sanare::corruption::AmcheckStatus,
        heap_blocks_checked: u64,
        indexes_checked: &'r [String],
        relations: &'r [sanare::corruption::RelationReport],
        issues: usize,
    }
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    w.write_all(b"{\"scan\":")?;
    serde_json::to_writer(
        &mut w,
        &ScanFigures {
            tables_scanned: &report.tables_scanned,
            tables_skipped: &report.tables_skipped,
            rows_scanned: report.rows_scanned,
            chunks: report.chunks,
            suspects: report.suspects,
            table_wide: &report.table_wide,
            issues: report.issues.len(),
            duration: report.duration,
        },
    )?;
    w.write_all(b",\"physical\":[")?;
    for (i, p) in physical.iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        serde_json::to_writer(
            &mut w,
            &PhysicalFigures {
                table: &p.table,
                amcheck: &p.amcheck,
                heap_blocks_checked: p.heap_blocks_checked,
                indexes_checked: &p.indexes_checked,
                relations: &p.relations,
                issues: p.issues.len(),
            },
        )?;
    }
    w.write_all(b"],\"checksum_failures\":")?;
    serde_json::to_writer(&mut w, &failures)?;
    w.write_all(b",\"issues\":[")?;
    for (i, issue) in issues.enumerate() {
        w.write_all(if i == 0 { b"\n" } else { b",\n" })?;
        serde_json::to_writer(&mut w, issue)?;
    }
    w.write_all(b"]}\n")?;
    w.flush()?;
    Ok(())
}
