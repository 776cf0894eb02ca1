//! `snapshot create|list|verify|restore|delete|prune`.

use std::time::Duration;

use clap::Subcommand;
use sanare::Sanare;
use sanare::core::{
    RestoreMode, RestoreRequest, RestoreTarget, SnapshotId, SnapshotRequest, SnapshotService,
};
use sanare::snapshot::{Availability, ListedSnapshot, RetentionPolicy, Snapshots};

use crate::output::with_progress;
use crate::{Context, EXIT_FINDINGS};

#[derive(Debug, Subcommand)]
pub(crate) enum SnapshotCommand {
    /// Take a snapshot (the configured schemas, or `--table`/`--schema-name`).
    Create {
        /// Only these tables (`schema.table`), repeatable.
        #[arg(long)]
        table: Vec<String>,
        /// Every table of these schemas, repeatable.
        #[arg(long = "of-schema")]
        of_schema: Vec<String>,
        /// A label.
        #[arg(long)]
        label: Option<String>,
        /// Start a new repository in this store even though the database's
        /// catalog expects its snapshots in another one.
        #[arg(long)]
        new_repository: bool,
    },
    /// Every snapshot the catalog or the store knows, newest first, with where
    /// each is and storage statistics. Without a database, lists the store alone.
    List,
    /// Check every block of a snapshot (hash and availability) in its own
    /// repository: a damaged one is marked corrupted, an intact one marked
    /// corrupted before is ready again. Exits 3 when damage is found. Without a
    /// database, checks the store alone (nothing is marked).
    Verify {
        /// The snapshot (`latest` for the newest good one).
        id: String,
    },
    /// Restore a snapshot into the live tables (one transaction, foreign-key
    /// order; tables the database lacks are recreated from the DDL stored with
    /// the snapshot), or into a scratch schema with `--into`. `latest` into a
    /// database whose catalog is empty takes the newest snapshot in the store.
    Restore {
        /// The snapshot (`latest` for the newest good one).
        id: String,
        /// Only these tables (`schema.table`), repeatable.
        #[arg(long)]
        table: Vec<String>,
        /// Restore into tables of the same names in this schema instead of the
        /// live ones.
        #[arg(long)]
        into: Option<String>,
        /// Confirm replacing live data (required without `--into`).
        #[arg(long)]
        yes: bool,
        /// Load shadow tables on this many connections, then swap them in with one
        /// short transaction: faster, but needs twice the disk space while it runs
        /// and gives the tables new OIDs (the default is one transaction).
        #[arg(long, value_name = "CONNECTIONS")]
        parallel: Option<u16>,
        /// Fire the tables' own triggers for the restored rows (off by default).
        #[arg(long)]
        fire_triggers: bool,
    },
    /// Delete a snapshot (its blocks are freed by `prune` once unshared).
    Delete {
        /// The snapshot.
        id: SnapshotId,
    },
    /// Apply retention (keep the newest N and everything younger than D days,
    /// never the last good one) and free unreferenced blocks.
    Prune {
        /// Keep at least this many (default: the configuration's `keep_last`).
        #[arg(long)]
        keep_last: Option<u32>,
        /// Keep everything younger than this many days (default: `keep_days`).
        #[arg(long)]
        keep_days: Option<u32>,
        /// Keep unreferenced blocks younger than this, for captures in progress.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        grace: Duration,
    },
}

/// What a snapshot command works through: every component, or the store alone
/// (no database given: `list` and `verify` only).
enum Handle {
    Full(Box<Sanare>),
    StoreOnly(Snapshots),
}

impl Handle {
    fn snapshots(&self) -> &Snapshots {
        match self {
            Handle::Full(s) => s.snapshots(),
            Handle::StoreOnly(s) => s,
        }
    }
}

async fn open(ctx: &Context, command: &SnapshotCommand) -> anyhow::Result<Handle> {
    let store_only = matches!(
        command,
        SnapshotCommand::List | SnapshotCommand::Verify { .. }
    );
    if ctx.url.is_some() || !store_only {
        let mut config = ctx.config.clone();
        if let SnapshotCommand::Create {
            new_repository: true,
            ..
        } = command
        {
            config.snapshots.new_repository = true;
        }
        return Ok(Handle::Full(Box::new(ctx.sanare_with(config).await?)));
    }
    let data_dir = &ctx.config.data_dir;
    let mut builder = Snapshots::builder()
        .store(ctx.config.snapshot_store(data_dir, None)?)
        .schema(ctx.schema.clone())
        .without_catalog();
    if let Some(key) = ctx.config.snapshot_key(data_dir, false)? {
        builder = builder.key(key);
    }
    Ok(Handle::StoreOnly(builder.build()?))
}

pub(crate) async fn run(ctx: &Context, command: SnapshotCommand) -> anyhow::Result<u8> {
    let handle = open(ctx, &command).await?;
    let snapshots = handle.snapshots();
    match command {
        SnapshotCommand::Create {
            table,
            of_schema,
            label,
            new_repository: _,
        } => {
            let mut request = SnapshotRequest::new()
                .tables(crate::tables(&table)?)
                .schemas(of_schema);
            request.label = label;
            let info = with_progress(&ctx.out, "snapshot", |control| async move {
                snapshots.create(request, &control).await
            })
            .await?;
            ctx.out.show(&info, |out| {
                out.line(format!(
                    "snapshot {} ready: {} tables, {} rows, {} bytes stored of {} captured",
                    info.id,
                    info.tables.len(),
                    info.tables.iter().map(|t| t.rows).sum::<u64>(),
                    info.stored_bytes,
                    info.size_bytes
                ));
            })?;
            Ok(0)
        }
        SnapshotCommand::List => list(ctx, snapshots).await,
        SnapshotCommand::Verify { id } => verify(ctx, snapshots, &id).await,
        SnapshotCommand::Restore {
            id,
            table,
            into,
            yes,
            parallel,
            fire_triggers,
        } => {
            let id = resolve_for_restore(snapshots, &id).await?;
            let target = match into {
                Some(schema) => RestoreTarget::Scratch { schema },
                None if yes => RestoreTarget::Live,
                None => anyhow::bail!(
                    "restoring into the live tables replaces their contents: pass --yes to confirm, or --into <schema> to restore beside them"
                ),
            };
            let mode = match parallel {
                Some(connections) => RestoreMode::Parallel { connections },
                None => RestoreMode::Transaction,
            };
            let request = RestoreRequest::new(id)
                .tables(crate::tables(&table)?)
                .target(target)
                .mode(mode)
                .fire_triggers(fire_triggers);
            let outcome = with_progress(&ctx.out, "restore", |control| async move {
                snapshots.restore(request, &control).await
            })
            .await?;
            ctx.out.show(&outcome, |out| {
                out.line(format!("restored snapshot {}", outcome.snapshot));
                if !outcome.recreated.is_empty() {
                    out.line(format!(
                        "recreated from the snapshot's DDL: {}",
                        outcome
                            .recreated
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                for note in &outcome.notes {
                    out.line(format!("  {note}"));
                }
                out.table(
                    &["table", "rows"],
                    outcome
                        .tables
                        .iter()
                        .map(|t| vec![t.table.to_string(), t.rows.to_string()]),
                );
                if let Some(cut) = &outcome.journal_cut {
                    out.line(format!(
                        "consistent with journal position {}: replay from there with `sanare journal replay --after {}`",
                        cut.position, cut.position.0
                    ));
                }
            })?;
            Ok(0)
        }
        SnapshotCommand::Delete { id } => {
            let info = snapshots.delete(id).await?;
            ctx.out.show(&info, |out| {
                out.line(format!(
                    "snapshot {} deleted; `sanare snapshot prune` frees its blocks",
                    info.id
                ));
            })?;
            Ok(0)
        }
        SnapshotCommand::Prune {
            keep_last,
            keep_days,
            grace,
        } => {
            let cfg = &ctx.config.snapshots;
            let policy = RetentionPolicy::new(
                usize::try_from(keep_last.unwrap_or(cfg.keep_last)).unwrap_or(usize::MAX),
                Duration::from_secs(u64::from(keep_days.unwrap_or(cfg.keep_days)) * 86_400),
            );
            let retired = snapshots.apply_retention(&policy).await?;
            let gc = with_progress(&ctx.out, "prune", |control| async move {
                snapshots.gc(grace, &control).await
            })
            .await?;
            let value = serde_json::json!({ "snapshots_deleted": retired, "gc": gc });
            ctx.out.print(&value, |out| {
                out.line(format!(
                    "{retired} snapshots deleted; {} blocks freed ({} bytes; {} packs deleted, {} rewritten), {} kept in the grace period, {} live",
                    gc.blocks_deleted,
                    gc.bytes_freed,
                    gc.packs_deleted,
                    gc.packs_rewritten,
                    gc.blocks_in_grace,
                    gc.blocks_live
                ));
                if gc.packs_kept_damaged > 0 {
                    out.line(format!(
                        "{} packs kept as they were: a block they hold does not decode; run `sanare snapshot verify` on the snapshots",
                        gc.packs_kept_damaged
                    ));
                }
            });
            Ok(0)
        }
    }
}

/// `snapshot verify`: every block of one snapshot read back and checked.
async fn verify(ctx: &Context, snapshots: &Snapshots, id: &str) -> anyhow::Result<u8> {
    let id = resolve(snapshots, id).await?;
    let report = with_progress(&ctx.out, "verify", |control| async move {
        snapshots.verify(id, &control).await
    })
    .await?;
    let ok = report.is_ok();
    ctx.out.show(&report, |out| {
        out.line(format!(
            "snapshot {}: {} blocks checked, {} missing, {} corrupt — {}",
            report.snapshot,
            report.blocks_checked,
            report.blocks_missing,
            report.blocks_corrupt,
            match (ok, ctx.url.is_some()) {
                (true, _) => "intact",
                (false, true) => "DAMAGED (marked corrupted)",
                (false, false) => "DAMAGED (not marked: no database)",
            }
        ));
        for p in &report.problems {
            out.line(format!("  {p}"));
        }
        for n in &report.notes {
            out.line(format!("  note: {n}"));
        }
    })?;
    Ok(if ok { 0 } else { EXIT_FINDINGS })
}

/// `snapshot list`: the repository opened, then every snapshot with where it is.
async fn list(ctx: &Context, snapshots: &Snapshots) -> anyhow::Result<u8> {
    let listing = snapshots.list_all().await?;
    let stats = snapshots.stats().await?;
    let value = serde_json::json!({
        "repository": &listing.repository,
        "location": &listing.location,
        "inside_protected_database": listing.inside_protected_database,
        "catalog": listing.catalog,
        "snapshots": &listing.snapshots,
        "storage": stats,
    });
    ctx.out.print(&value, |out| {
        match &listing.repository {
            Some(r) => out.line(format!("repository {} at {}", r.id, listing.location)),
            None => out.line(format!(
                "no repository at {} yet (the first snapshot taken there creates one)",
                listing.location
            )),
        }
        if listing.inside_protected_database {
            out.line(
                "warning: this store keeps its blocks inside the protected database; losing the database loses these snapshots too",
            );
        }
        if !listing.catalog {
            out.line("no database given: the store alone is listed");
        }
        if listing.snapshots.is_empty() {
            out.line("no snapshots");
            return;
        }
        out.table(
            &[
                "id", "created", "status", "label", "tables", "rows", "bytes", "stored", "journal",
            ],
            listing.snapshots.iter().map(row),
        );
        out.line(format!(
            "storage: {} blocks in {} packs, {} bytes stored for {} bytes of data",
            stats.blocks, stats.packs, stats.block_bytes, stats.logical_bytes
        ));
    });
    Ok(0)
}

fn row(s: &ListedSnapshot) -> Vec<String> {
    let i = &s.info;
    let status = match &s.availability {
        Availability::OtherRepository {
            repository: Some(r),
            ..
        } => format!("in repository {r} (not opened here)"),
        Availability::OtherRepository { .. } => {
            "in a store not opened here (taken before repository ids)".to_owned()
        }
        Availability::StoreOnly {
            authenticated: true,
            ..
        } => "in the store only".to_owned(),
        Availability::StoreOnly { .. } => "in the store only (not authenticated)".to_owned(),
        _ => i.status.to_string(),
    };
    vec![
        i.id.to_string(),
        crate::output::time(i.created_at),
        status,
        i.label.clone().unwrap_or_default(),
        i.tables.len().to_string(),
        i.tables.iter().map(|t| t.rows).sum::<u64>().to_string(),
        i.size_bytes.to_string(),
        i.stored_bytes.to_string(),
        i.journal_cut
            .as_ref()
            .map(|c| c.position.to_string())
            .unwrap_or_default(),
    ]
}

/// [`resolve`] for a restore: `latest` into a database whose catalog knows no
/// good snapshot is the newest one in the store (a database restored from the
/// store alone).
async fn resolve_for_restore(snapshots: &Snapshots, id: &str) -> anyhow::Result<SnapshotId> {
    if id == "latest"
        && snapshots.latest_good(None).await?.is_none()
        && let Some(found) = snapshots.latest_in_store(None).await?
    {
        return Ok(found.id);
    }
    resolve(snapshots, id).await
}

/// A snapshot id, or `latest` for the newest good snapshot.
async fn resolve(snapshots: &Snapshots, id: &str) -> anyhow::Result<SnapshotId> {
    if id == "latest" {
        return snapshots
            .latest_good(None)
            .await?
            .map(|s| s.id)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "there is no good snapshot yet; take one with `sanare snapshot create`"
                )
            });
    }
    id.parse()
        .map_err(|e| anyhow::anyhow!("`{id}` is not a snapshot id: {e}"))
}
