//! `sanare`: the operator's command line.
//!
//! Every command prints a human table by default and JSON with `--json`; long work
//! shows a progress bar on a terminal and stops cleanly on Ctrl-C. Exit codes
//! scripts can rely on:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success, nothing found |
//! | 1 | the command failed (connection, bad input, refused); the message says why |
//! | 2 | usage error (unknown command or flag) |
//! | 3 | success, and findings exist (violations, corruption, damage, a crash to recover) |
//! | 4 | a repair or recovery needs an operator's approval before it can run |
//!
//! A failed command prints `sanare: ` and the whole error on stderr — when the
//! server refused a statement, PostgreSQL's own words (message, SQLSTATE, position,
//! `DETAIL`, `HINT`, `CONTEXT`). With `--json` it also prints
//! `{"error": {"kind", "message", "retryable", "server": {"code", "message",
//! "detail", "hint", "position", …}}}` on stdout.
//!
//! The CLI builds the same [`sanare::Sanare`] a service does, as an *operator*
//! handle: it never touches the service's shutdown marker or crash spool and runs
//! no background work.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sanare::{Sanare, SanareConfig};
use sanare_pg::SchemaName;

mod checks;
mod inspect;
mod journal;
mod output;
mod recover;
mod repair;
mod snapshot;

use output::Output;

#[derive(Debug, Parser)]
#[command(
    name = "sanare",
    version,
    about = "Operate sanare: crashes, integrity, snapshots, journal, repairs, recovery"
)]
struct Cli {
    /// PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// A sanare TOML configuration file (SANARE__… variables override it).
    #[arg(long, env = "SANARE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// The schema of sanare's tables (overrides the configuration).
    #[arg(long, global = true)]
    schema: Option<String>,
    /// The service's data directory (journal segments, snapshot blocks, crash
    /// spool); overrides the configuration.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Schema versions of each component and what sanare's tables hold.
    Status,
    /// Validate integrity (every host table unless `--table` is given); exits 3 when
    /// violations are found.
    Validate(checks::ValidateArgs),
    /// Scan for corruption (checksums, statistics, physical checks); exits 3 when
    /// issues are found.
    Scan(checks::ScanArgs),
    /// Snapshots: create, list, verify, restore, delete, prune.
    Snapshot {
        #[command(subcommand)]
        command: snapshot::SnapshotCommand,
    },
    /// The transaction journal: stats, query, replay, compact, archive, verify.
    Journal {
        #[command(subcommand)]
        command: journal::JournalCommand,
    },
    /// Repairs: plan, dry-run, approve, apply, rollback, history.
    Repair {
        #[command(subcommand)]
        command: repair::RepairCommand,
    },
    /// Crash records.
    Crashes {
        #[command(subcommand)]
        command: inspect::CrashesCommand,
    },
    /// Recover from a crash: shows the crash and the plan, asks which recovery to
    /// run (or takes `--option` and `--yes` to run without asking).
    Recover(recover::RecoverArgs),
}

/// Exit code: success, and findings exist.
pub(crate) const EXIT_FINDINGS: u8 = 3;
/// Exit code: the work waits for an approval.
pub(crate) const EXIT_NEEDS_APPROVAL: u8 = 4;

/// What every command gets: the configuration, where to connect, how to print.
pub(crate) struct Context {
    config: SanareConfig,
    schema: SchemaName,
    url: Option<String>,
    out: Output,
}

impl Context {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        let base = match &cli.config {
            Some(path) => SanareConfig::from_file(path)?,
            None => SanareConfig::default(),
        };
        let mut config = base.with_env(std::env::vars())?;
        if let Some(schema) = &cli.schema {
            config.schema = schema.clone();
        }
        if let Some(dir) = &cli.data_dir {
            config.data_dir = dir.clone();
        }
        let schema = config.schema_name()?;
        let url = cli
            .database_url
            .clone()
            .or_else(|| config.database_url.clone())
            .filter(|u| !u.trim().is_empty());
        Ok(Self {
            config,
            schema,
            url,
            out: Output::new(cli.json),
        })
    }

    /// The connection string (every command but a few snapshot ones needs one).
    fn url(&self) -> anyhow::Result<&str> {
        self.url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("no database: pass --database-url or set DATABASE_URL"))
    }

    /// A plain connection for read-only one-shot commands (no migrations).
    async fn client(&self) -> anyhow::Result<sanare_pg::tokio_postgres::Client> {
        let url = self.url()?;
        let (client, conn) =
            sanare_pg::tokio_postgres::connect(url, sanare_pg::tokio_postgres::NoTls)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot connect to {}: {}",
                        sanare_pg::redact(url),
                        sanare_pg::describe_pg_error(&e)
                    )
                })?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Every component, as an operator handle (migrations run; the service's
    /// marker, spool and background work untouched).
    async fn sanare(&self) -> anyhow::Result<Sanare> {
        self.sanare_with(self.config.clone()).await
    }

    /// [`Context::sanare`] with a changed configuration.
    async fn sanare_with(&self, config: SanareConfig) -> anyhow::Result<Sanare> {
        // Fail on a wrong URL with the connection's own message, not a pool timeout.
        drop(self.client().await?);
        let pool = sanare_pg::connect_pool(self.url()?, 8)?;
        Ok(Sanare::builder()
            .config(config)
            .pool(pool)
            .operator()
            .build()
            .await?)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            output::print_error(&e, json);
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let ctx = Context::new(&cli)?;
    match cli.command {
        Command::Status => inspect::status(&ctx).await,
        Command::Validate(args) => checks::validate(&ctx, args).await,
        Command::Scan(args) => checks::scan(&ctx, args).await,
        Command::Snapshot { command } => snapshot::run(&ctx, command).await,
        Command::Journal { command } => journal::run(&ctx, command).await,
        Command::Repair { command } => repair::run(&ctx, command).await,
        Command::Crashes { command } => inspect::crashes(&ctx, command).await,
        Command::Recover(args) => recover::run(&ctx, args).await,
    }
}

/// Parses `schema.table` arguments.
pub(crate) fn tables(args: &[String]) -> anyhow::Result<Vec<sanare::core::TableRef>> {
    Ok(args
        .iter()
        .map(|t| sanare::core::TableRef::parse(t))
        .collect::<Result<Vec<_>, _>>()?)
}

/// Parses an RFC 3339 time (`2026-11-23T10:00:00Z`) or a duration ago (`2h`, `3d`).
pub(crate) fn parse_time(s: &str) -> anyhow::Result<time::OffsetDateTime> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(s).map_err(|_| {
        anyhow::anyhow!("`{s}` is neither an RFC 3339 time nor a duration ago such as `2h`")
    })?;
    Ok(time::OffsetDateTime::now_utc() - ago)
}
