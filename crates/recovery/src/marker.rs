//! The shutdown marker and the host facts saved in it (boot id, cgroup OOM-kill
//! count). Format: `docs/formats.md`, "Shutdown marker".

use std::io::Write;
use std::path::Path;

use sanare_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// The first line of a marker file: magic and version.
pub const MARKER_MAGIC_LINE: &str = "SANARE-MARKER 1";

/// Whether the run that wrote the marker was running or ended cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkerState {
    /// Written at start: the run has not ended cleanly (yet).
    Running,
    /// Written at clean shutdown.
    Clean,
}

/// The decoded shutdown marker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Marker {
    /// Running or clean.
    pub state: MarkerState,
    /// The process that wrote it.
    pub pid: u32,
    /// The boot id at the time (empty when unknown).
    pub boot_id: String,
    /// When the run started, in ms since the Unix epoch.
    pub started_unix_ms: i64,
    /// The cgroup `oom_kill` count at start, when readable.
    pub oom_kill: Option<u64>,
    /// The host's version string.
    pub version: String,
    /// The run's identity (a UUID written at start; absent in markers of older
    /// releases). A crash of this run is recorded under this id, so detecting the
    /// same crash twice records it once.
    pub run_id: Option<uuid::Uuid>,
    /// The run's last sign of life, in ms since the Unix epoch: rewritten every few
    /// seconds while it runs (absent until the first heartbeat).
    pub heartbeat_unix_ms: Option<i64>,
}

impl Marker {
    /// Encodes the marker as text.
    pub fn encode(&self) -> String {
        let state = match self.state {
            MarkerState::Running => "running",
            MarkerState::Clean => "clean",
        };
        let mut s = format!(
            "{MARKER_MAGIC_LINE}\nstate={state}\npid={}\nboot_id={}\nstarted_unix_ms={}\n",
            self.pid,
            one_line(&self.boot_id),
            self.started_unix_ms
        );
        if let Some(n) = self.oom_kill {
            s.push_str(&format!("oom_kill={n}\n"));
        }
        s.push_str(&format!("version={}\n", one_line(&self.version)));
        if let Some(id) = self.run_id {
            s.push_str(&format!("run_id={id}\n"));
        }
        if let Some(ms) = self.heartbeat_unix_ms {
            s.push_str(&format!("heartbeat_unix_ms={ms}\n"));
        }
        s
    }

    /// The run's last sign of life: its latest heartbeat, else its start.
    pub fn last_sign_of_life_ms(&self) -> i64 {
        self.heartbeat_unix_ms
            .map_or(self.started_unix_ms, |h| h.max(self.started_unix_ms))
    }

    /// Decodes a marker; a wrong magic, version or a missing key is an error.
    pub fn decode(text: &str) -> Result<Marker> {
        let corrupt = |d: String| Error::corrupt("shutdown marker", d);
        let mut lines = text.lines();
        match lines.next() {
            Some(MARKER_MAGIC_LINE) => {}
            Some(l) if l.starts_with("SANARE-MARKER ") => {
                return Err(corrupt(format!("unsupported marker version line `{l}`")));
            }
            _ => return Err(corrupt("missing `SANARE-MARKER 1` line".into())),
        }
        let (mut state, mut pid, mut boot, mut started, mut oom, mut version) =
            (None, None, None, None, None, String::new());
        let (mut run_id, mut heartbeat) = (None, None);
        for line in lines {
            let Some((k, v)) = line.split_once('=') else {
                return Err(corrupt(format!("line `{line}` is not key=value")));
            };
            match k {
                "state" => {
                    state = Some(match v {
                        "running" => MarkerState::Running,
                        "clean" => MarkerState::Clean,
                        _ => return Err(corrupt(format!("unknown state `{v}`"))),
                    })
                }
                "pid" => pid = v.parse().ok(),
                "boot_id" => boot = Some(v.to_owned()),
                "started_unix_ms" => started = v.parse().ok(),
                "oom_kill" => oom = v.parse().ok(),
                "version" => version = v.to_owned(),
                "run_id" => {
                    run_id = Some(
                        v.parse()
                            .map_err(|_| corrupt(format!("run_id `{v}` is not a UUID")))?,
                    )
                }
                "heartbeat_unix_ms" => {
                    heartbeat =
                        Some(v.parse().map_err(|_| {
                            corrupt(format!("heartbeat_unix_ms `{v}` is not a number"))
                        })?)
                }
                _ => {} // unknown keys from newer writers are ignored
            }
        }
        Ok(Marker {
            state: state.ok_or_else(|| corrupt("no state".into()))?,
            pid: pid.ok_or_else(|| corrupt("no valid pid".into()))?,
            boot_id: boot.ok_or_else(|| corrupt("no boot_id".into()))?,
            started_unix_ms: started.ok_or_else(|| corrupt("no valid started_unix_ms".into()))?,
            oom_kill: oom,
            version,
            run_id,
            heartbeat_unix_ms: heartbeat,
        })
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Writes `contents` to `path` atomically and durably: a temporary file is written,
/// fsynced, renamed over `path`, and the directory fsynced.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::invalid_input(format!("{} has no parent folder", path.display())))?;
    let tmp = path.with_extension("tmp");
    let ctx = |what: &str| {
        format!(
            "{what} {} (check the data folder is writable)",
            tmp.display()
        )
    };
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(ctx("creating"), e))?;
    f.write_all(contents)
        .map_err(|e| Error::io(ctx("writing"), e))?;
    f.sync_all().map_err(|e| Error::io(ctx("syncing"), e))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::io(format!("renaming {} into place", tmp.display()), e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all()
            .map_err(|e| Error::io(format!("syncing folder {}", dir.display()), e))?;
    }
    Ok(())
}

/// Reads the boot id (a UUID line) from `path`; `None` when unreadable.
pub fn read_boot_id(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// The kernel OOM-kill count of the memory cgroup rooted at `root`: the v2
/// `memory.events` `oom_kill` line if present, else the v1
/// `memory/memory.oom_control` `oom_kill` line; `None` when neither is readable.
pub fn read_oom_kill_count(root: &Path) -> Option<u64> {
    let candidates = [
        root.join("memory.events"),
        root.join("memory/memory.oom_control"),
        root.join("memory.oom_control"),
    ];
    candidates.iter().find_map(|p| {
        let text = std::fs::read_to_string(p).ok()?;
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == "oom_kill").then(|| v.trim().parse().ok())?
        })
    })
}

/// Where this process's memory cgroup is: for v2 the unified path from
/// `/proc/self/cgroup` (`0::/path`) under `/sys/fs/cgroup`; for v1 the `memory`
/// controller's path under `/sys/fs/cgroup/memory`. Falls back to `/sys/fs/cgroup`.
pub fn own_cgroup_root() -> std::path::PathBuf {
    let base = Path::new("/sys/fs/cgroup");
    if let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") {
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
            let path = path.unwrap_or("/").trim_start_matches('/');
            match controllers {
                Some("") => {
                    let p = base.join(path);
                    if p.join("memory.events").exists() {
                        return p;
                    }
                }
                Some(c) if c.split(',').any(|c| c == "memory") => {
                    let p = base.join("memory").join(path);
                    if p.join("memory.oom_control").exists() {
                        // `read_oom_kill_count` looks for `memory.oom_control` directly.
                        return p;
                    }
                }
                _ => {}
            }
        }
    }
    base.to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_marker_round_trips() {
        let m = Marker {
            state: MarkerState::Running,
            pid: 4242,
            boot_id: "c75cab50-0aae-495b-b187-c55bf8261015".into(),
            started_unix_ms: 1_700_000_000_000,
            oom_kill: Some(3),
            version: "1.2.3".into(),
            run_id: None,
            heartbeat_unix_ms: None,
        };
        // A marker of the first release (no run id, no heartbeat) still reads.
        let golden = "SANARE-MARKER 1\nstate=running\npid=4242\nboot_id=c75cab50-0aae-495b-b187-c55bf8261015\nstarted_unix_ms=1700000000000\noom_kill=3\nversion=1.2.3\n";
        assert_eq!(m.encode(), golden);
        assert_eq!(Marker::decode(golden).unwrap(), m);
        assert_eq!(m.last_sign_of_life_ms(), 1_700_000_000_000);
        // With a run id and a heartbeat (golden vector of docs/formats.md).
        let mut beating = m.clone();
        beating.run_id = Some("01890a5d-ac96-774b-bcce-b302099a8057".parse().unwrap());
        beating.heartbeat_unix_ms = Some(1_700_000_065_000);
        let golden2 = format!(
            "{golden}run_id=01890a5d-ac96-774b-bcce-b302099a8057\nheartbeat_unix_ms=1700000065000\n"
        );
        assert_eq!(beating.encode(), golden2);
        assert_eq!(Marker::decode(&golden2).unwrap(), beating);
        assert_eq!(beating.last_sign_of_life_ms(), 1_700_000_065_000);
        assert!(Marker::decode(&format!("{golden}run_id=nope\n")).is_err());
        assert!(Marker::decode(&format!("{golden}heartbeat_unix_ms=soon\n")).is_err());
        assert!(Marker::decode("SANARE-MARKER 2\nstate=clean\n").is_err());
        assert!(Marker::decode("garbage").is_err());
        assert!(Marker::decode("SANARE-MARKER 1\nstate=running\n").is_err());
        let future = format!("{golden}new_key=1\n");
        assert_eq!(Marker::decode(&future).unwrap(), m);
    }

    #[test]
    fn oom_counts_from_cgroup_v1_v2_or_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_oom_kill_count(dir.path()), None);
        std::fs::create_dir(dir.path().join("memory")).unwrap();
        std::fs::write(
            dir.path().join("memory/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n",
        )
        .unwrap();
        assert_eq!(read_oom_kill_count(dir.path()), Some(7));
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 2\noom 1\noom_kill 9\noom_group_kill 0\n",
        )
        .unwrap();
        assert_eq!(read_oom_kill_count(dir.path()), Some(9));
        std::fs::write(dir.path().join("memory.events"), "oom_kill many\n").unwrap();
        assert_eq!(
            read_oom_kill_count(dir.path()),
            Some(7),
            "a v2 file without a readable count falls back to v1"
        );
        std::fs::remove_file(dir.path().join("memory/memory.oom_control")).unwrap();
        assert_eq!(
            read_oom_kill_count(dir.path()),
            None,
            "a bad count is no count"
        );
    }

    #[test]
    fn own_cgroup_root_names_the_folder_holding_this_process_oom_counter() {
        let root = own_cgroup_root();
        assert!(root.starts_with("/sys/fs/cgroup"), "{}", root.display());
        // Work out independently where this process's counter is (v2 unified
        // path, else the v1 memory controller's) and expect the same folder.
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let base = Path::new("/sys/fs/cgroup");
        let expected = text.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let path = path.trim_start_matches('/');
            let (dir, file) = if controllers.is_empty() {
                (base.join(path), "memory.events")
            } else if controllers.split(',').any(|c| c == "memory") {
                (base.join("memory").join(path), "memory.oom_control")
            } else {
                return None;
            };
            dir.join(file).exists().then_some(dir)
        });
        match expected {
            Some(dir) => {
                assert_eq!(root, dir);
                assert!(read_oom_kill_count(&root).is_some(), "{}", root.display());
            }
            None => assert_eq!(root, base),
        }
    }
}
