//! `status` and `crashes`: what sanare holds and what happened.

use clap::Subcommand;
use sanare::core::CrashId;
use sanare_pg::PgResultExt;

use crate::Context;

#[derive(Debug, Subcommand)]
pub(crate) enum CrashesCommand {
    /// Recorded crashes, newest first.
    List {
        /// Only crashes detected since (RFC 3339 time, or a duration ago: `7d`).
        #[arg(long, value_parser = crate::parse_time)]
        since: Option<time::OffsetDateTime>,
    },
    /// One crash in full: message, location, backtrace, evidence, system state,
    /// and its recovery.
    Show {
        /// The crash id (from `crashes list`).
        id: CrashId,
    },
}

pub(crate) async fn crashes(ctx: &Context, command: CrashesCommand) -> anyhow::Result<u8> {
    let sanare = ctx.sanare().await?;
    match command {
        CrashesCommand::List { since } => {
            let crashes = sanare.crashes().history(since, None).await?;
            ctx.out.show(&crashes, |out| {
                if crashes.is_empty() {
                    out.line("no crashes recorded");
                    return;
                }
                out.table(
                    &["id", "detected", "kind", "severity", "recovered", "message"],
                    crashes.iter().map(|c| {
                        vec![
                            c.crash.id.to_string(),
                            crate::output::time(c.crash.detected_at),
                            c.crash.kind.as_str().to_owned(),
                            c.crash.severity.to_string(),
                            match c.recovery_successful {
                                Some(true) => "yes".into(),
                                Some(false) => "failed".into(),
                                None => "no".into(),
                            },
                            c.crash.message.clone().unwrap_or_default(),
                        ]
                    }),
                );
            })?;
        }
        CrashesCommand::Show { id } => {
            let c = sanare.crashes().get(id).await?;
            ctx.out.show(&c, |out| {
                let r = &c.crash;
                out.table(
                    &["field", "value"],
                    [
                        ("id", r.id.to_string()),
                        ("kind", r.kind.as_str().to_owned()),
                        ("severity", r.severity.to_string()),
                        ("crashed at", crate::output::time(r.crashed_at)),
                        ("detected at", crate::output::time(r.detected_at)),
                        ("type", r.exception_type.clone().unwrap_or_default()),
                        ("message", r.message.clone().unwrap_or_default()),
                        ("location", r.location.clone().unwrap_or_default()),
                        ("thread", r.thread.clone().unwrap_or_default()),
                        (
                            "signal",
                            r.signal.map(|s| s.to_string()).unwrap_or_default(),
                        ),
                        ("components", r.affected_components.join(", ")),
                        ("evidence", r.evidence.join("\n")),
                        (
                            "recovery",
                            match (c.recovery_successful, &c.recovery_notes) {
                                (None, _) => "not recovered".to_owned(),
                                (Some(ok), notes) => format!(
                                    "{}{}",
                                    if ok { "succeeded" } else { "failed" },
                                    notes
                                        .as_deref()
                                        .map(|n| format!(": {n}"))
                                        .unwrap_or_default()
                                ),
                            },
                        ),
                    ]
                    .into_iter()
                    .map(|(k, v)| vec![k.to_owned(), v]),
                );
                if let Some(bt) = &r.backtrace {
                    out.line("backtrace:");
                    out.line(bt);
                }
            })?;
        }
    }
    Ok(0)
}

/// Tables sanare's components own, by component, in display order.
const KNOWN_TABLES: [(&str, &str); 8] = [
    ("recovery", "crash_records"),
    ("integrity", "integrity_checks"),
    ("integrity", "integrity_violations"),
    ("repair", "repair_operations"),
    ("snapshot", "snapshots"),
    ("journal", "transaction_journal"),
    ("corruption", "corruption_issues"),
    ("sanare", "jobs"),
];

pub(crate) async fn status(ctx: &Context) -> anyhow::Result<u8> {
    let client = ctx.client().await?;
    let schema = ctx.schema.as_str();
    let histories = client
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relkind = 'r' AND c.relname LIKE '%\\_schema\\_history'
              ORDER BY 1",
            &[&schema],
        )
        .await
        .context("listing component migrations")?;
    let mut components = Vec::new();
    for row in histories {
        let table: String = row.get(0);
        let component = table.trim_end_matches("_schema_history").to_owned();
        let version: Option<i32> = client
            .query_one(
                &format!("SELECT max(version) FROM {}", ctx.schema.table(&table)),
                &[],
            )
            .await
            .with_context(|| format!("reading {table}"))?
            .get(0);
        components.push(serde_json::json!({ "component": component, "schema_version": version }));
    }
    let mut tables = Vec::new();
    for (component, table) in KNOWN_TABLES {
        let exists: bool = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&format!("{}.{}", ctx.schema.quoted(), table)],
            )
            .await
            .context("checking sanare tables")?
            .get(0);
        if exists {
            let rows: i64 = client
                .query_one(
                    &format!("SELECT count(*) FROM {}", ctx.schema.table(table)),
                    &[],
                )
                .await
                .with_context(|| format!("counting {table}"))?
                .get(0);
            tables
                .push(serde_json::json!({ "component": component, "table": table, "rows": rows }));
        }
    }
    let report = serde_json::json!({
        "schema": schema,
        "data_dir": ctx.config.data_dir,
        "components": components,
        "tables": tables,
    });
    ctx.out.print(&report, |out| {
        out.line(format!("schema `{schema}`"));
        if components.is_empty() {
            out.line("no sanare migrations applied yet (start the service once, or run a command that migrates)");
        } else {
            out.table(
                &["component", "schema version"],
                components.iter().map(|c| {
                    vec![
                        c["component"].as_str().unwrap_or_default().to_owned(),
                        c["schema_version"].to_string(),
                    ]
                }),
            );
        }
        if !tables.is_empty() {
            out.table(
                &["component", "table", "rows"],
                tables.iter().map(|t| {
                    vec![
                        t["component"].as_str().unwrap_or_default().to_owned(),
                        t["table"].as_str().unwrap_or_default().to_owned(),
                        t["rows"].to_string(),
                    ]
                }),
            );
        }
    });
    Ok(0)
}
