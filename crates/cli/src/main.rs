//! `sanare`: the operator's command line.
//!
//! Every command prints a human table by default and JSON with `--json`. Exit codes
//! scripts can rely on:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success, nothing found |
//! | 1 | the command failed (connection, bad input); the message says why |
//! | 2 | usage error (unknown command or flag) |
//! | 3 | success, and findings exist (violations, corruption, a crash to recover) |

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sanare::SanareConfig;
use sanare_pg::{PgResultExt, SchemaName};

mod output;

use output::Output;

#[derive(Debug, Parser)]
#[command(
    name = "sanare",
    version,
    about = "Operate sanare: crashes, integrity, snapshots, journal, repairs"
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
    Validate {
        /// Only these tables (`schema.table`), repeatable.
        #[arg(long)]
        table: Vec<String>,
        /// Write every violation as CSV to this file.
        #[arg(long)]
        csv: Option<PathBuf>,
    },
    /// Crash records.
    Crashes {
        #[command(subcommand)]
        command: CrashesCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CrashesCommand {
    /// Every recorded crash, newest first.
    List,
}

/// Exit code: success, and findings exist.
const EXIT_FINDINGS: u8 = 3;

struct Context {
    config: SanareConfig,
    schema: SchemaName,
    url: String,
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
        let schema = config.schema_name()?;
        let url = cli
            .database_url
            .clone()
            .or_else(|| config.database_url.clone())
            .ok_or_else(|| {
                anyhow::anyhow!("no database: pass --database-url or set DATABASE_URL")
            })?;
        Ok(Self {
            config,
            schema,
            url,
            out: Output::new(cli.json),
        })
    }

    async fn client(&self) -> anyhow::Result<tokio_postgres_client::Client> {
        tokio_postgres_client::connect(&self.url).await
    }
}

/// A plain connection for one-shot commands.
mod tokio_postgres_client {
    pub(crate) use sanare_pg::tokio_postgres::Client;

    pub(crate) async fn connect(url: &str) -> anyhow::Result<Client> {
        let (client, conn) =
            sanare_pg::tokio_postgres::connect(url, sanare_pg::tokio_postgres::NoTls)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot connect to {}: {e}", sanare_pg::redact(url))
                })?;
        tokio::spawn(conn);
        Ok(client)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("sanare: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let ctx = Context::new(&cli)?;
    match cli.command {
        Command::Status => status(&ctx).await,
        Command::Validate { table, csv } => validate(&ctx, &table, csv.as_deref()).await,
        Command::Crashes {
            command: CrashesCommand::List,
        } => crashes_list(&ctx).await,
    }
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

async fn status(ctx: &Context) -> anyhow::Result<u8> {
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

async fn migrate(ctx: &Context, pool: &sanare_pg::Pool) -> anyhow::Result<()> {
    let mut client = sanare_pg::get_conn(pool).await?;
    for m in [sanare::integrity::MIGRATIONS, sanare::recovery::MIGRATIONS] {
        m.run(&mut client, &ctx.schema).await?;
    }
    Ok(())
}

async fn validate(
    ctx: &Context,
    tables: &[String],
    csv: Option<&std::path::Path>,
) -> anyhow::Result<u8> {
    use sanare::core::{Control, TableRef, ValidationScope};
    let pool = sanare_pg::connect_pool(&ctx.url, 8)?;
    migrate(ctx, &pool).await?;
    let tables = tables
        .iter()
        .map(|t| TableRef::parse(t))
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = sanare::integrity::IntegrityConfig::default();
    config.parallelism = usize::from(ctx.config.validation.parallelism);
    config.chunk_rows = u64::from(ctx.config.validation.chunk_size);
    config.report_dir = std::env::temp_dir().join("sanare-reports");
    let rules = match &ctx.config.validation.rules_file {
        Some(path) => sanare::integrity::Rules::from_toml_file(path)?,
        None => sanare::integrity::Rules::default(),
    };
    let integrity = sanare::integrity::Integrity::builder()
        .pool(pool)
        .schema(ctx.schema.clone())
        .rules(rules)
        .config(config)
        .build()?;
    let report = integrity
        .run(ValidationScope::all().tables(tables), &Control::detached())
        .await?;
    if let Some(path) = csv {
        let mut file = std::fs::File::create(path)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
        integrity.export_csv(report.id, &mut file).await?;
    }
    let total: u64 = report.violations_by_severity.values().sum();
    ctx.out.print(&serde_json::to_value(&report)?, |out| {
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
        }
    });
    Ok(if total > 0 { EXIT_FINDINGS } else { 0 })
}

async fn crashes_list(ctx: &Context) -> anyhow::Result<u8> {
    let pool = sanare_pg::connect_pool(&ctx.url, 2)?;
    migrate(ctx, &pool).await?;
    let store = sanare::recovery::CrashStore::new(pool, ctx.schema.clone());
    let crashes = store.history(None, None).await?;
    ctx.out.print(&serde_json::to_value(&crashes)?, |out| {
        if crashes.is_empty() {
            out.line("no crashes recorded");
        }
        out.table(
            &["detected", "kind", "severity", "message"],
            crashes.iter().map(|c| {
                vec![
                    c.crash.detected_at.to_string(),
                    c.crash.kind.as_str().to_owned(),
                    c.crash.severity.to_string(),
                    c.crash.message.clone().unwrap_or_default(),
                ]
            }),
        );
    });
    Ok(0)
}
