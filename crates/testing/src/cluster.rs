//! A throwaway PostgreSQL cluster started from the binaries on this machine.
//!
//! Synchronous and dependency-light (std, libc, tempfile) so that `xtask` can use it
//! without an async runtime.
//!
//! - Binaries are looked for in `$SANARE_PG_BINDIR`, `PATH`, `pg_config --bindir`,
//!   `/usr/lib/postgresql/*/bin` (newest first), `/usr/pgsql-*/bin`,
//!   `/usr/local/pgsql/bin` and Homebrew's prefixes.
//! - When the process runs as root, the server runs as the `postgres` user (or
//!   `nobody`), since PostgreSQL refuses to run as root.
//! - The cluster lives in a fresh temporary directory, listens on 127.0.0.1 on a free
//!   port and on a Unix socket in that directory, and is stopped and removed when the
//!   [`Cluster`] is dropped. The server gets `SIGQUIT` if the process dies without
//!   dropping it (`PR_SET_PDEATHSIG`), and directories left by killed processes are
//!   removed by the next start.

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, Read as _};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Why a cluster could not be started.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClusterError {
    /// No PostgreSQL server binaries were found.
    NoBinaries {
        /// Where we looked.
        searched: Vec<PathBuf>,
    },
    /// Running as root and no unprivileged user to run the server as.
    NoUnprivilegedUser,
    /// A step failed; `log` holds the server's or tool's output.
    Failed {
        /// What was being done.
        step: String,
        /// Output of the failing program, if any.
        log: String,
    },
    /// An I/O error.
    Io {
        /// What was being done.
        step: String,
        /// The error.
        source: io::Error,
    },
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::NoBinaries { searched } => {
                write!(
                    f,
                    "PostgreSQL server binaries (`initdb` and `postgres`) were not found; \
                     searched: {}. Install PostgreSQL (Debian/Ubuntu: `apt-get install \
                     postgresql`; Fedora/RHEL: `dnf install postgresql-server`; macOS: \
                     `brew install postgresql@16`), or set SANARE_PG_BINDIR to the folder \
                     holding `initdb`, or set DATABASE_URL to an existing server",
                    searched
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            ClusterError::NoUnprivilegedUser => f.write_str(
                "running as root, and PostgreSQL refuses to run as root, but neither a \
                 `postgres` nor a `nobody` user exists to run it as: create one \
                 (`useradd --system postgres`) or set DATABASE_URL",
            ),
            ClusterError::Failed { step, log } => {
                write!(f, "{step} failed")?;
                if !log.trim().is_empty() {
                    write!(f, "; output:\n{}", log.trim_end())?;
                }
                Ok(())
            }
            ClusterError::Io { step, source } => write!(f, "{step}: {source}"),
        }
    }
}

impl std::error::Error for ClusterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClusterError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(step: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let step = step.into();
    move |source| ClusterError::Io { step, source }
}

/// How to start a cluster.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ClusterOptions {
    /// Keep PostgreSQL's durability settings (fsync, full-page writes). Off by
    /// default: tests do not need them and run much faster without; benchmarks that
    /// compare against durable baselines turn them on.
    pub durable: bool,
    /// Initialise the cluster with data-page checksums (`initdb --data-checksums`).
    pub data_checksums: bool,
    /// Extra `name=value` server settings.
    pub settings: Vec<(String, String)>,
    /// Use this folder of binaries instead of searching.
    pub bin_dir: Option<PathBuf>,
}

impl ClusterOptions {
    /// Durable settings.
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Data-page checksums.
    pub fn data_checksums(mut self, on: bool) -> Self {
        self.data_checksums = on;
        self
    }

    /// A server that logs every statement (`log_statement = all`, read back with
    /// [`Cluster::statements_logged_since`]) and can count them with
    /// `pg_stat_statements` (preloaded; `CREATE EXTENSION pg_stat_statements` in
    /// the database to read it): for tests that must show a statement never ran.
    pub fn logging_every_statement(self) -> Self {
        self.setting("shared_preload_libraries", "pg_stat_statements")
            .setting("log_statement", "all")
    }

    /// An extra server setting.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }
}

/// A running throwaway PostgreSQL cluster. Stopped and deleted on drop.
///
/// Its superuser is `postgres`, authentication is `trust` on 127.0.0.1 and the socket.
#[derive(Debug)]
pub struct Cluster {
    bin_dir: PathBuf,
    // Held for its Drop, which removes the directory.
    root: Option<tempfile::TempDir>,
    data_dir: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    options: ClusterOptions,
    child: Option<Child>,
}

impl Cluster {
    /// Starts a cluster with default options.
    pub fn start() -> Result<Self, ClusterError> {
        Self::start_with(ClusterOptions::default())
    }

    /// Starts a cluster.
    pub fn start_with(options: ClusterOptions) -> Result<Self, ClusterError> {
        let bin_dir = match &options.bin_dir {
            Some(dir) => dir.clone(),
            None => find_bin_dir()?,
        };
        let run_as = unprivileged_user()?;
        remove_stale_dirs();
        let root = tempfile::Builder::new()
            .prefix("sanare-pg-")
            .tempdir()
            .map_err(io_err("creating a temporary directory for PostgreSQL"))?;
        fs::write(
            root.path().join("owner.pid"),
            std::process::id().to_string(),
        )
        .map_err(io_err("writing owner.pid"))?;
        let data_dir = root.path().join("data");
        if let Some((uid, gid)) = run_as {
            chown(root.path(), uid, gid)?;
            // The owner.pid file stays root's; the server only needs the directory.
        }
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755))
            .map_err(io_err("setting permissions of the cluster directory"))?;

        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("--pgdata")
            .arg(&data_dir)
            .args(["--username=postgres", "--auth=trust", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync", "--no-instructions"]);
        if options.data_checksums {
            initdb.arg("--data-checksums");
        }
        run_as_user(&mut initdb, run_as, false);
        let out = initdb
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!(
                "running {}",
                bin_dir.join("initdb").display()
            )))?;
        if !out.status.success() {
            return Err(ClusterError::Failed {
                step: "initdb".into(),
                log: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }

        let mut cluster = Cluster {
            bin_dir,
            root: Some(root),
            data_dir,
            port: 0,
            run_as,
            options,
            child: None,
        };
        cluster.launch()?;
        Ok(cluster)
    }

    /// Starts the server on a free port, retrying when the port is taken meanwhile.
    fn launch(&mut self) -> Result<(), ClusterError> {
        let mut last = None;
        let mut busy = None;
        for _ in 0..8 {
            let port = if self.port != 0 && last.is_none() {
                self.port
            } else {
                free_port()?
            };
            match self.launch_on(port) {
                Ok(()) => return Ok(()),
                Err(LaunchError::PortTaken(log)) => last = Some(log),
                Err(LaunchError::ShmBusy(log)) => {
                    busy = Some(log);
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(LaunchError::Other(e)) => return Err(e),
            }
        }
        Err(match busy {
            Some(log) => ClusterError::Failed {
                step:
                    "starting postgres (a killed server's processes still hold its shared memory)"
                        .into(),
                log,
            },
            None => ClusterError::Failed {
                step: "starting postgres (no free port after 8 tries)".into(),
                log: last.unwrap_or_default(),
            },
        })
    }

    fn launch_on(&mut self, port: u16) -> Result<(), LaunchError> {
        let root = self.root_path().to_path_buf();
        let log_path = root.join("postgres.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| LaunchError::Other(io_err("creating the server log")(e)))?;
        if let Some((uid, gid)) = self.run_as {
            chown(&log_path, uid, gid).map_err(LaunchError::Other)?;
        }
        let log_err = log
            .try_clone()
            .map_err(|e| LaunchError::Other(io_err("opening the server log")(e)))?;
        let mut cmd = Command::new(self.bin_dir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(port.to_string())
            .arg("-c")
            .arg("listen_addresses=127.0.0.1")
            .arg("-c")
            .arg(format!("unix_socket_directories={}", root.display()))
            .args(["-c", "max_connections=300", "-c", "shared_buffers=128MB"])
            .args([
                "-c",
                "max_locks_per_transaction=256",
                "-c",
                "log_min_messages=warning",
            ])
            .args(["-c", "max_wal_size=2GB"]);
        if !self.options.durable {
            cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off"]);
        }
        for (name, value) in &self.options.settings {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        // Its own process group, so that `kill` can take down every server process at
        // once, as a power loss would.
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        run_as_user(&mut cmd, self.run_as, true);
        let mut child = spawn_from_keeper(cmd).map_err(|e| {
            LaunchError::Other(io_err(format!(
                "starting {}",
                self.bin_dir.join("postgres").display()
            ))(e))
        })?;

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                let log = read_to_string_lossy(&log_path);
                if log.contains("pre-existing shared memory block") {
                    return Err(LaunchError::ShmBusy(log));
                }
                if log.contains("could not bind") || log.contains("already in use") {
                    return Err(LaunchError::PortTaken(log));
                }
                return Err(LaunchError::Other(ClusterError::Failed {
                    step: "starting postgres".into(),
                    log,
                }));
            }
            if postmaster_ready(&self.data_dir, child.id()) {
                self.port = port;
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LaunchError::Other(ClusterError::Failed {
                    step: "waiting 60 s for postgres to accept connections".into(),
                    log: read_to_string_lossy(&log_path),
                }));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn root_path(&self) -> &Path {
        self.data_dir.parent().unwrap_or(&self.data_dir)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (for tests that damage files on purpose; stop the cluster
    /// first).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The folder of binaries in use (`pg_dump`, `pgbench`, … live there too).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A `postgres://` URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        read_to_string_lossy(&self.root_path().join("postgres.log"))
    }

    /// The statements the server logged from byte `offset` of [`log`](Self::log) on
    /// (`statement:` and `execute` lines and their continuations; not the `DETAIL`
    /// lines that show bound values), with `log_statement = all`.
    pub fn statements_logged_since(&self, offset: usize) -> String {
        let log = self.log();
        let mut out = String::new();
        let mut in_statement = false;
        for line in log.get(offset..).unwrap_or_default().lines() {
            if line.contains("LOG:  statement:") || line.contains("LOG:  execute") {
                in_statement = true;
            } else if line.contains(" LOG:  ")
                || line.contains("DETAIL:  ")
                || line.contains("ERROR:  ")
            {
                in_statement = false;
            }
            if in_statement {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops the server (fast shutdown), keeping the data directory.
    pub fn stop(&mut self) {
        self.stop_with(libc::SIGINT);
    }

    /// Kills every server process with `SIGKILL`, as a power loss would (the next
    /// start runs crash recovery).
    pub fn kill(&mut self) {
        self.stop_with(libc::SIGKILL);
    }

    fn stop_with(&mut self, signal: libc::c_int) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Safety: plain kill(2) on our own child's pid.
        let Ok(pid) = libc::pid_t::try_from(child.id()) else {
            return;
        };
        // SIGKILL goes to the whole process group: the postmaster's children would
        // otherwise linger and hold its shared memory.
        let target = if signal == libc::SIGKILL { -pid } else { pid };
        unsafe { libc::kill(target, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
        }
        if signal == libc::SIGKILL {
            // The backends die with the postmaster but not at the same instant; one
            // still attached to the old shared memory makes the next start refuse
            // ("pre-existing shared memory block is still in use"). Wait until the
            // group is gone (a zombie nobody reaps still counts: bounded wait).
            let deadline = Instant::now() + Duration::from_secs(5);
            // Safety: kill(2) with signal 0 only checks that the group exists.
            while Instant::now() < deadline && unsafe { libc::kill(-pid, 0) } == 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Starts a stopped server again, on the same port when it is still free.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.stop();
        self.launch()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        if let Some(root) = self.root.take() {
            let _ = root.close();
        }
    }
}

enum LaunchError {
    PortTaken(String),
    /// A killed server's process still holds the old shared memory: retry shortly.
    ShmBusy(String),
    Other(ClusterError),
}

/// Whether `postmaster.pid` says that the server `pid` accepts connections (the
/// first line is the postmaster's pid, the eighth its status, `ready` once startup
/// is over). Checking the pid ignores a stale file left by a killed server.
fn postmaster_ready(data_dir: &Path, pid: u32) -> bool {
    fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .is_some_and(|s| {
            let mut lines = s.lines();
            lines.next().map(str::trim) == Some(pid.to_string().as_str())
                && lines.nth(6).map(str::trim) == Some("ready")
        })
}

fn read_to_string_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn free_port() -> Result<u16, ClusterError> {
    let listener =
        TcpListener::bind(("127.0.0.1", 0)).map_err(io_err("finding a free TCP port"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("finding a free TCP port"))?
        .port();
    Ok(port)
}

/// The folder holding `initdb` and `postgres`.
pub fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    find_bin_dir_in(&candidate_dirs())
}

fn find_bin_dir_in(candidates: &[PathBuf]) -> Result<PathBuf, ClusterError> {
    for dir in candidates {
        let initdb = dir.join("initdb");
        if initdb.is_file() {
            // Resolve symlinks (/usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb)
            // so that `postgres` and friends are taken from the same installation.
            let real = fs::canonicalize(&initdb).unwrap_or(initdb);
            if let Some(real_dir) = real.parent()
                && real_dir.join("postgres").is_file()
            {
                return Ok(real_dir.to_path_buf());
            }
            if dir.join("postgres").is_file() {
                return Ok(dir.clone());
            }
        }
    }
    Err(ClusterError::NoBinaries {
        searched: candidates.to_vec(),
    })
}

fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("SANARE_PG_BINDIR") {
        dirs.push(PathBuf::from(dir));
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !dir.is_empty() {
            dirs.push(PathBuf::from(dir));
        }
    }
    for pattern_root in ["/usr/lib/postgresql", "/usr/local/opt", "/opt/homebrew/opt"] {
        let mut versions: Vec<PathBuf> = fs::read_dir(pattern_root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                pattern_root == "/usr/lib/postgresql"
                    || p.file_name()
                        .and_then(OsStr::to_str)
                        .is_some_and(|n| n.starts_with("postgresql"))
            })
            .collect();
        versions.sort_by_key(|p| std::cmp::Reverse(version_of(p)));
        dirs.extend(versions.into_iter().map(|p| p.join("bin")));
    }
    let mut pgsql: Vec<PathBuf> = fs::read_dir("/usr")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("pgsql-"))
        })
        .collect();
    pgsql.sort_by_key(|p| std::cmp::Reverse(version_of(p)));
    dirs.extend(pgsql.into_iter().map(|p| p.join("bin")));
    dirs.push(PathBuf::from("/usr/local/pgsql/bin"));
    dirs
}

/// The number in a folder name like `15`, `pgsql-16` or `postgresql@17`.
fn version_of(path: &Path) -> u32 {
    path.file_name()
        .and_then(OsStr::to_str)
        .map(|n| {
            n.chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// Whether this process runs as root (effective uid 0).
pub fn running_as_root() -> bool {
    // Safety: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `Some((uid, gid))` of the user to run the server as, when running as root.
fn unprivileged_user() -> Result<Option<(u32, u32)>, ClusterError> {
    if !running_as_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Some(ids) = lookup_user(name) {
            return Ok(Some(ids));
        }
    }
    Err(ClusterError::NoUnprivilegedUser)
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // Safety: all pointers are valid for the duration of the call and `buf` is as
    // long as we say.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), ClusterError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(io_err(format!("handing {} to uid {uid}", path.display())))
}

/// Makes `cmd` run as `run_as` (when set), and die with its parent when `pdeathsig`.
fn run_as_user(cmd: &mut Command, run_as: Option<(u32, u32)>, pdeathsig: bool) {
    if run_as.is_some() {
        // Root's HOME would be unreadable to the server user.
        cmd.env("HOME", "/tmp");
    }
    // Safety: the closure only calls async-signal-safe functions (setgroups, setgid,
    // setuid, prctl, getppid, _exit-free error returns) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = run_as
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            #[cfg(target_os = "linux")]
            if pdeathsig {
                // Set after setuid: a credential change clears the parent-death signal.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl.
                if libc::getppid() == 1 {
                    return Err(io::Error::other("parent exited during spawn"));
                }
            }
            #[cfg(not(target_os = "linux"))]
            let _ = pdeathsig;
            Ok(())
        });
    }
}

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits; test
/// threads come and go, so every server is forked by this one keeper thread and dies
/// with the process, not with the test that started it.
fn spawn_from_keeper(cmd: Command) -> io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("sanare-pg-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static, so this loop never ends; park just in case.
                loop {
                    std::thread::park();
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| eprintln!("sanare-testing: cannot start keeper thread: {e}"));
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    keeper
        .lock()
        .map_err(|_| io::Error::other("keeper lock poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("keeper thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("keeper thread is gone"))?
}

/// Removes `sanare-pg-*` directories left in the temp folder by processes that no
/// longer exist (killed before they could clean up).
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name: OsString = entry.file_name();
        if !name.to_string_lossy().starts_with("sanare-pg-") {
            continue;
        }
        let path = entry.path();
        let Some(pid) = fs::read_to_string(path.join("owner.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // Safety: kill with signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive && !postmaster_alive(&path.join("data")) {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

fn postmaster_alive(data_dir: &Path) -> bool {
    fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.trim().parse::<libc::pid_t>().ok())
        })
        // Safety: signal 0 only checks existence.
        .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0)
}

/// The process-wide server: `DATABASE_URL` when set, otherwise one throwaway cluster
/// started on first use and stopped when the process exits. Returns a URL of a
/// database the caller may connect to as a superuser (to create databases).
pub fn shared_admin_url() -> Result<String, String> {
    static SHARED: OnceLock<Result<String, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            if let Ok(url) = std::env::var("DATABASE_URL")
                && !url.trim().is_empty()
            {
                return Ok(url);
            }
            let cluster = Cluster::start().map_err(|e| e.to_string())?;
            let url = cluster.url("postgres");
            *SHARED_CLUSTER.lock().unwrap_or_else(|p| p.into_inner()) = Some(cluster);
            // Safety: registering a plain `extern "C" fn` with atexit.
            unsafe { libc::atexit(stop_shared_cluster) };
            Ok(url)
        })
        .clone()
}

static SHARED_CLUSTER: Mutex<Option<Cluster>> = Mutex::new(None);

extern "C" fn stop_shared_cluster() {
    if let Ok(mut guard) = SHARED_CLUSTER.lock() {
        drop(guard.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_say_what_to_install() {
        let err = find_bin_dir_in(&[PathBuf::from("/nonexistent/bin")]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/bin"), "{msg}");
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("DATABASE_URL"), "{msg}");
    }

    #[test]
    fn versions_sort_newest_first() {
        assert_eq!(version_of(Path::new("/usr/lib/postgresql/15")), 15);
        assert_eq!(version_of(Path::new("/usr/pgsql-16")), 16);
        assert_eq!(version_of(Path::new("/opt/homebrew/opt/postgresql@17")), 17);
        assert_eq!(version_of(Path::new("/x/none")), 0);
    }

    #[test]
    fn a_cluster_starts_serves_and_is_removed_on_drop() {
        let mut cluster = Cluster::start().expect("start a cluster");
        let data = cluster.data_dir().to_path_buf();
        assert!(cluster.is_running());
        assert!(cluster.port() > 0);
        assert!(data.join("PG_VERSION").is_file());
        cluster.restart().expect("restart");
        assert!(cluster.is_running());
        drop(cluster);
        assert!(!data.exists(), "cluster directory removed on drop");
    }
}
