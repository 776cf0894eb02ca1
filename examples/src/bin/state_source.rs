//! State that lives outside the database, snapshotted with the tables: a host's
//! on-disk price cache as a `StateSource`.
//!
//! Run with `DATABASE_URL` set (`cargo xtask pg` starts a throwaway server):
//! `cargo run -p sanare-examples --bin state_source`. The service registers its cache
//! file as a byte stream; every snapshot cuts it into content-defined blocks
//! deduplicated with everything else (a small change to the file costs a few blocks,
//! not a copy). The cache is then damaged and restored from the snapshot, byte for
//! byte.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use async_trait::async_trait;
use sanare::core::{Control, SnapshotRequest, SnapshotService};
use sanare::snapshot::StateSource;
use sanare::{Sanare, SanareConfig};

/// The host's cache file, read whole at each snapshot.
#[derive(Debug)]
struct CacheFile {
    path: PathBuf,
}

#[async_trait]
impl StateSource for CacheFile {
    fn name(&self) -> &str {
        "price-cache"
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(
            "format".to_owned(),
            "price-cache v1 (one `sku,cents` per line)".to_owned(),
        )])
    }

    async fn open(&self) -> sanare::Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>> {
        // A consistent view: the host writes the cache by rename, so an open file
        // never changes under the reader.
        let file = tokio::fs::File::open(&self.path).await.map_err(|e| {
            sanare::Error::io(format!("opening the cache {}", self.path.display()), e)
        })?;
        Ok(Box::new(file))
    }
}

fn cache_contents(version: u32) -> String {
    (0..200_000u32)
        .map(|sku| {
            // Version 2 reprices one range of 200 products.
            let bump = if version > 1 && (50_000..50_200).contains(&sku) {
                5
            } else {
                0
            };
            format!("sku-{sku:06},{}\n", 100 + (sku * 7) % 10_000 + bump)
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")
        .context("set DATABASE_URL (cargo xtask pg starts a server)")?;
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("prices.cache");
    std::fs::write(&cache, cache_contents(1))?;

    let mut config = SanareConfig::default();
    config.snapshots.schemas = vec!["public".into()];
    let sanare = Sanare::builder()
        .config(config)
        .database_url(&url)
        .data_dir(dir.path().join("sanare"))
        .background(false)
        .state_source(Arc::new(CacheFile {
            path: cache.clone(),
        }))
        .build()
        .await?;
    let control = Control::detached();

    let first = sanare
        .snapshots()
        .create(SnapshotRequest::new().label("cache v1"), &control)
        .await?;
    // A small change: 200 of 200,000 prices move (one range of products).
    std::fs::write(&cache, cache_contents(2))?;
    let second = sanare
        .snapshots()
        .create(SnapshotRequest::new().label("cache v2"), &control)
        .await?;
    let len = std::fs::metadata(&cache)?.len();
    println!(
        "cache of {len} bytes: first snapshot stored {} bytes, the second (200 prices changed) {} more",
        first.stored_bytes, second.stored_bytes
    );

    // Damage: the cache is truncated by a full disk.
    let good = std::fs::read(&cache)?;
    std::fs::write(&cache, &good[..good.len() / 3])?;
    println!(
        "cache damaged: {} bytes left",
        std::fs::metadata(&cache)?.len()
    );

    // Restore into a temporary file, then rename over the cache.
    let restoring = dir.path().join("prices.cache.restoring");
    let mut out = tokio::fs::File::create(&restoring).await?;
    let restored = sanare
        .snapshots()
        .restore_source(second.id, "price-cache", &mut out, &control)
        .await?;
    out.sync_all().await?;
    drop(out);
    std::fs::rename(&restoring, &cache)?;
    let back = std::fs::read(&cache)?;
    println!("restored {restored} bytes from snapshot {}", second.id);
    if back != good {
        bail!("the restored cache differs from the one captured");
    }
    println!("the cache is byte-for-byte what the snapshot captured");
    sanare.shutdown().await?;
    Ok(())
}
