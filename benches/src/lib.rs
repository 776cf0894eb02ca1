//! Shared helpers of sanare's benchmarks.
//!
//! Every bench target measures its figures against a baseline measured in the same
//! run and writes them with [`Figures`] as a flat JSON object to the file named by
//! `SANARE_BENCH_OUT` (set by `cargo xtask bench <area>` to
//! `target/bench/<area>.json`).
//!
//! [`pgbench`] holds the pgbench fixtures, among them
//! [`pgbench::million_orphans`], the database of the integrity and repair
//! benchmarks' one-million-violations figures; [`peak_rss_mb`] measures a process's
//! peak memory.

#![deny(missing_docs)]

pub mod pgbench;
pub mod shop;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A flat set of named figures, written as one JSON object.
#[derive(Debug, Default)]
pub struct Figures {
    values: BTreeMap<String, serde_json::Value>,
}

impl Figures {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a number.
    pub fn set(&mut self, name: &str, value: f64) -> &mut Self {
        let value = serde_json::Number::from_f64(value)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null);
        self.values.insert(name.to_owned(), value);
        self
    }

    /// Records a string (the machine, the workload).
    pub fn note(&mut self, name: &str, value: impl Into<String>) -> &mut Self {
        self.values
            .insert(name.to_owned(), serde_json::Value::String(value.into()));
        self
    }

    /// A recorded number.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).and_then(serde_json::Value::as_f64)
    }

    /// Where figures for `area` go: `$SANARE_BENCH_OUT`, else
    /// `target/bench/<area>.json` under the workspace.
    pub fn path_for(area: &str) -> PathBuf {
        std::env::var_os("SANARE_BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../target/bench")
                    .join(format!("{area}.json"))
            })
    }

    /// Writes the figures as pretty JSON to `path` (folders created), merging into
    /// the figures already there so that partial runs (`-- <filter>`) keep the rest.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut merged: BTreeMap<String, serde_json::Value> = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        merged.extend(self.values.clone());
        let json = serde_json::to_vec_pretty(&merged).map_err(std::io::Error::other)?;
        std::fs::write(path, json)
    }
}

/// Runs `CHECKPOINT` on `client`, so the timed step that follows does not pay for
/// writing out what the fixture or an earlier step left dirty. Best effort: it needs
/// superuser or `pg_checkpoint` (the throwaway cluster has them); a refusal is
/// printed, naming `bench`, and the step goes on.
pub async fn checkpoint(client: &tokio_postgres::Client, bench: &str) {
    if let Err(e) = client.batch_execute("CHECKPOINT").await {
        eprintln!("{bench} bench: CHECKPOINT refused ({e}); the next measurement may include one");
    }
}

/// CPU seconds (user and system) used so far by this process (`RUSAGE_SELF`) or by
/// its waited-for children (`RUSAGE_CHILDREN`, with `children`).
pub fn cpu_seconds(children: bool) -> f64 {
    let who = if children {
        libc::RUSAGE_CHILDREN
    } else {
        libc::RUSAGE_SELF
    };
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    unsafe { libc::getrusage(who, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// This process's peak resident set size in MiB (`VmHWM` of `/proc/self/status`),
/// or `None` where the kernel does not report it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_a_flat_json_object_merged_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("area.json");
        let mut a = Figures::new();
        a.set("x_per_s", 10.5).note("machine", "test");
        a.write(&path).unwrap();
        let mut b = Figures::new();
        b.set("y_ratio", 2.0);
        b.write(&path).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["x_per_s"], 10.5);
        assert_eq!(v["y_ratio"], 2.0);
        assert_eq!(v["machine"], "test");
        assert_eq!(b.get("y_ratio"), Some(2.0));
    }

    #[test]
    fn peak_memory_grows_with_what_was_touched() {
        let before = peak_rss_mb().unwrap();
        let big = std::hint::black_box(vec![1u8; 64 << 20]);
        let after = peak_rss_mb().unwrap();
        assert!(after >= before + 60.0, "{before} -> {after}");
        drop(big);
    }
}
