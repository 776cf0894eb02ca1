//! `validate` and `scan`: find what is wrong.

use std::path::PathBuf;

use clap::Args;
use sanare::core::ValidationScope;
use sanare::corruption::CorruptionIssue;

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
                let all = report
                    .tables_scanned
                    .iter()
                    .chain(report.tables_skipped.iter().map(|(t, _)| t));
                for table in all {
                    physical_reports.push(detector.check_physical(table, &control).await?);
                }
                failures = detector.check_checksum_failures().await?;
            }
            anyhow::Ok((report, physical_reports, failures))
        })
        .await?;
    let mut issues: Vec<&CorruptionIssue> = report.issues.iter().collect();
    issues.extend(physical_reports.iter().flat_map(|p| p.issues.iter()));
    issues.extend(failures.iter());
    let value = serde_json::json!({
        "scan": report,
        "physical": physical_reports,
        "checksum_failures": failures,
    });
    ctx.out.print(&value, |out| {
        out.line(format!(
            "scanned {} rows of {} tables in {:.1}s — {} issues",
            report.rows_scanned,
            report.tables_scanned.len(),
            report.duration.as_secs_f64(),
            issues.len()
        ));
        for (table, why) in &report.tables_skipped {
            out.line(format!("skipped {table}: {why}"));
        }
        for p in &physical_reports {
            out.line(format!(
                "physical {}: amcheck {:?}, {} heap blocks, {} indexes",
                p.table,
                p.amcheck,
                p.heap_blocks_checked,
                p.indexes_checked.len()
            ));
        }
        if !issues.is_empty() {
            out.table(
                &["kind", "severity", "table", "row", "what", "do"],
                issues.iter().map(|i| {
                    vec![
                        format!("{:?}", i.kind),
                        i.severity.to_string(),
                        i.table.to_string(),
                        i.row.as_ref().map(ToString::to_string).unwrap_or_default(),
                        i.description.clone(),
                        i.recommended_action.clone(),
                    ]
                }),
            );
        }
    });
    Ok(if issues.is_empty() { 0 } else { EXIT_FINDINGS })
}
