//! `journal stats|query|replay|compact|archive|verify`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use sanare::core::{JournalPosition, JournalService, ReplayRange, ReplayRequest};
use sanare::journal::{Journal, Query};
use time::OffsetDateTime;

use crate::output::with_progress;
use crate::{Context, EXIT_FINDINGS};

#[derive(Debug, Subcommand)]
pub(crate) enum JournalCommand {
    /// Head position, entries, segments, and what opening the journal found.
    Stats,
    /// Entries matching a filter, oldest first.
    Query {
        #[command(flatten)]
        filter: Filter,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Replay entries through the handlers registered in this process. The CLI
    /// registers none, so a real replay belongs in the service (its recovery);
    /// here `--dry-run` shows what would be applied and what already was.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Report what would be applied, applying nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Compress sealed segments.
    Compact,
    /// Export matching entries to a compressed, checksummed archive file, or read
    /// one back with `--read`.
    Archive {
        #[command(flatten)]
        filter: Filter,
        /// The archive file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Verify and list an archive instead of writing one.
        #[arg(long, conflicts_with = "out")]
        read: Option<PathBuf>,
    },
    /// Check every record (frames, payload hashes, order); exits 3 on damage.
    Verify,
}

/// Which entries.
#[derive(Debug, Args)]
pub(crate) struct Filter {
    /// Entries after this position.
    #[arg(long)]
    after: Option<u64>,
    /// Entries at or before this position.
    #[arg(long)]
    to: Option<u64>,
    /// Recorded at or after (RFC 3339, or a duration ago: `2h`).
    #[arg(long, value_parser = crate::parse_time)]
    since: Option<OffsetDateTime>,
    /// Recorded before (RFC 3339, or a duration ago).
    #[arg(long, value_parser = crate::parse_time)]
    until: Option<OffsetDateTime>,
    /// Only these operation types, repeatable.
    #[arg(long = "op")]
    operation_types: Vec<String>,
}

impl Filter {
    fn query(&self) -> Query {
        let mut q = Query::all()
            .after(JournalPosition(self.after.unwrap_or(0)))
            .time(self.since, self.until)
            .operation_types(self.operation_types.clone());
        if let Some(to) = self.to {
            q = q.to(JournalPosition(to));
        }
        q
    }

    fn range(&self) -> ReplayRange {
        if self.since.is_some() || self.until.is_some() {
            ReplayRange::Time {
                from: self.since,
                to: self.until,
            }
        } else {
            ReplayRange::Positions {
                from: JournalPosition(self.after.map_or(0, |a| a + 1)),
                to: self.to.map(JournalPosition),
            }
        }
    }
}

/// What opening the journal found, in words.
fn open_report_text(r: &sanare::journal::OpenReport) -> String {
    let mut text = format!(
        "opening the journal found {} entries in {} segments",
        r.entries, r.segments
    );
    if let Some((segment, offset, bytes)) = &r.truncated_tail {
        text.push_str(&format!(
            "; a torn tail of {bytes} bytes was cut off segment {segment} at offset {offset}"
        ));
    }
    if !r.corrupt.is_empty() {
        text.push_str(&format!(
            "; {} damaged regions isolated (`sanare journal verify` lists them)",
            r.corrupt.len()
        ));
    }
    text
}

pub(crate) async fn run(ctx: &Context, command: JournalCommand) -> anyhow::Result<u8> {
    if let JournalCommand::Archive {
        read: Some(path), ..
    } = &command
    {
        let entries = Journal::read_archive(path)?;
        print_entries(ctx, &entries)?;
        return Ok(0);
    }
    let sanare = ctx.sanare().await?;
    let journal = sanare.journal();
    match command {
        JournalCommand::Stats => {
            let stats = journal.stats().await?;
            let opened = journal.open_report().cloned();
            let value = serde_json::json!({ "stats": stats, "open_report": opened });
            ctx.out.print(&value, |out| {
                out.table(
                    &["head", "entries", "segments"],
                    [vec![
                        stats.head.to_string(),
                        stats.entries.to_string(),
                        stats.segments.to_string(),
                    ]],
                );
                if let Some(r) = &opened {
                    out.line(open_report_text(r));
                }
            });
            Ok(0)
        }
        JournalCommand::Query { filter, limit } => {
            let entries = journal.query(&filter.query().limit(limit)).await?;
            print_entries(ctx, &entries)?;
            Ok(0)
        }
        JournalCommand::Replay { filter, dry_run } => {
            let mut request = ReplayRequest::new(filter.range());
            request.operation_types = filter.operation_types.clone();
            request.dry_run = dry_run;
            let summary = with_progress(&ctx.out, "replay", |control| async move {
                journal.replay(request, &control).await
            })
            .await?;
            let failed = !summary.failures.is_empty();
            ctx.out.show(&summary, |out| {
                out.line(format!(
                    "{}{} entries: {} applied, {} already applied, {} failed",
                    if summary.dry_run { "dry run — " } else { "" },
                    summary.entries_seen,
                    summary.applied,
                    summary.already_applied,
                    summary.failures.len()
                ));
                if failed {
                    out.table(
                        &["position", "operation", "why"],
                        summary.failures.iter().take(50).map(|f| {
                            vec![
                                f.position.to_string(),
                                f.operation_type.clone().unwrap_or_default(),
                                f.reason.clone(),
                            ]
                        }),
                    );
                    out.line("entries without a handler here are replayed by the service itself (its start-up recovery, or `Sanare::recovery()`)");
                }
            })?;
            Ok(if failed { EXIT_FINDINGS } else { 0 })
        }
        JournalCommand::Compact => {
            let report = with_progress(&ctx.out, "compact", |control| async move {
                journal.compact(&control).await
            })
            .await?;
            ctx.out.show(&report, |out| {
                out.line(format!(
                    "{} segments compacted: {} → {} bytes",
                    report.segments, report.bytes_before, report.bytes_after
                ));
            })?;
            Ok(0)
        }
        JournalCommand::Archive { filter, out, .. } => {
            let path = out.ok_or_else(|| {
                anyhow::anyhow!("pass --out <file> to write an archive, or --read <file>")
            })?;
            let n = journal.archive(&filter.query(), &path).await?;
            let value = serde_json::json!({ "entries": n, "file": path });
            ctx.out.print(&value, |o| {
                o.line(format!("{n} entries archived to {}", path.display()));
            });
            Ok(0)
        }
        JournalCommand::Verify => {
            let report = with_progress(&ctx.out, "verify", |control| async move {
                journal.validate(&control).await
            })
            .await?;
            let ok = report.is_ok();
            ctx.out.show(&report, |out| {
                out.line(format!(
                    "{} entries in {} segments checked — {}",
                    report.entries,
                    report.segments,
                    if ok { "intact" } else { "DAMAGED" }
                ));
                if !ok {
                    out.table(
                        &["segment", "offset", "length", "why"],
                        report.problems.iter().map(|p| {
                            vec![
                                p.segment.clone(),
                                p.offset.to_string(),
                                p.len.to_string(),
                                p.reason.clone(),
                            ]
                        }),
                    );
                }
            })?;
            Ok(if ok { 0 } else { EXIT_FINDINGS })
        }
    }
}

fn print_entries(ctx: &Context, entries: &[sanare::journal::JournalEntry]) -> anyhow::Result<()> {
    ctx.out.show(&entries, |out| {
        if entries.is_empty() {
            out.line("no entries");
            return;
        }
        out.table(
            &[
                "position",
                "recorded",
                "operation",
                "key",
                "status",
                "bytes",
                "intact",
            ],
            entries.iter().map(|e| {
                vec![
                    e.position.to_string(),
                    crate::output::time(e.recorded_at),
                    e.operation_type.clone(),
                    e.idempotency_key.clone().unwrap_or_default(),
                    e.status.as_str().to_owned(),
                    e.payload.len().to_string(),
                    if e.payload_intact() { "yes" } else { "NO" }.into(),
                ]
            }),
        );
    })
}
