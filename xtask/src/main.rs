//! `cargo xtask <task>`: the project's development tasks.
//!
//! - `test`: format check, the MSRV check ([`msrv`]), no new oversized file or
//!   function ([`rooms`]), clippy with `-D warnings`, docs
//!   with `-D warnings`, `cargo package --workspace`, the host crate built from the
//!   getting-started guide ([`guide`]), and every test of the workspace, against one
//!   throwaway PostgreSQL for the whole run (or `DATABASE_URL` when set);
//! - `msrv`: the declared `rust-version` against the dependency graph ([`msrv`]);
//! - `demo`: the quickstart example on embedded defaults with a throwaway PostgreSQL;
//! - `bench <area>`: one area's criterion benchmarks; figures land in
//!   `target/bench/<area>.json`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use sanare_testing::cluster::{Cluster, ClusterError, ClusterOptions};
use serde_json::Value;

mod guide;
mod msrv;
mod rooms;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  test            fmt check, MSRV check, clippy -D warnings, docs, cargo package, the
                  getting-started host crate, every test (throwaway PostgreSQL unless
                  DATABASE_URL is set)
  msrv            check that no dependency of a published crate needs a newer Rust
                  than the declared rust-version
  rooms           list source files over 1,200 lines and functions over 150 lines
                  (`test` fails on any)
  demo            run the quickstart example against a throwaway PostgreSQL
  pg [--durable]  start a throwaway PostgreSQL, print its DATABASE_URL, keep it
                  running until this process is interrupted (for quick test loops;
                  fsync off unless --durable, which benchmark figures need)
  bench <area>    run one area's benchmarks (journal, snapshot, integrity, repair,
                  recovery, corruption); figures go to target/bench/<area>.json";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("msrv") => check_msrv(),
        Some("rooms") => check_rooms(),
        Some("demo") => demo(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("pg") => pg(&args[1..]),
        Some("-h" | "--help" | "help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown task `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root. `cargo run` (which `cargo xtask` is) sets
/// `CARGO_MANIFEST_DIR` at run time; that wins over the path baked in at build
/// time, so a binary built from another checkout sharing the target directory
/// still works on this one.
fn root() -> PathBuf {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(step: &str, cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: == {step}");
    let started = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| format!("{step}: could not run {cmd:?}: {e}"))?;
    eprintln!(
        "xtask: == {step}: {} in {:.1}s",
        if status.success() { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    if status.success() {
        Ok(())
    } else {
        Err(format!("{step} failed ({status})"))
    }
}

fn has_command(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `DATABASE_URL` when set; otherwise a throwaway cluster (installing PostgreSQL
/// with apt first when there are no binaries, we are root and apt exists).
fn database(options: ClusterOptions) -> Result<(String, Option<Cluster>), String> {
    if let Ok(url) = env::var("DATABASE_URL")
        && !url.trim().is_empty()
    {
        eprintln!("xtask: using DATABASE_URL");
        return Ok((url, None));
    }
    let cluster = match Cluster::start_with(options.clone()) {
        Ok(c) => c,
        Err(ClusterError::NoBinaries { .. }) if can_apt_install() => {
            eprintln!("xtask: no PostgreSQL binaries; installing `postgresql` with apt-get");
            run(
                "apt-get update",
                Command::new("apt-get").args(["update", "-qq"]),
            )?;
            run(
                "apt-get install postgresql",
                Command::new("apt-get")
                    .args([
                        "install",
                        "-y",
                        "-qq",
                        "--no-install-recommends",
                        "postgresql",
                        "postgresql-contrib",
                    ])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            Cluster::start_with(options).map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    let url = cluster.url("postgres");
    eprintln!(
        "xtask: started a throwaway PostgreSQL ({}) on port {}",
        cluster.bin_dir().display(),
        cluster.port()
    );
    Ok((url, Some(cluster)))
}

fn can_apt_install() -> bool {
    sanare_testing::cluster::running_as_root() && has_command("apt-get", "--version")
}

/// The host crate built from the getting-started guide: outside the workspace,
/// with its own `Cargo.lock`.
const HOST: &str = "examples/host-axum";

fn test(args: &[String]) -> Result<(), String> {
    let started = Instant::now();
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--check"]),
    )?;
    run(
        "cargo fmt --check (host crate)",
        cargo().args([
            "fmt",
            "--check",
            "--manifest-path",
            &format!("{HOST}/Cargo.toml"),
        ]),
    )?;
    let metadata = metadata()?;
    step("msrv", || msrv_report(&metadata))?;
    step("getting-started and the host crate agree", check_guide)?;
    step(
        "rooms: no file over 1,200 lines or function over 150",
        || {
            let offenders = rooms::check(&root())?;
            if offenders.is_empty() {
                Ok(())
            } else {
                Err(offenders
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"))
            }
        },
    )?;
    run(
        "cargo clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run(
        "cargo doc",
        cargo()
            .args(["doc", "--workspace", "--no-deps", "--all-features"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    // Every publishable crate packaged (manifest, files, versions of its path
    // dependencies, a lock file resolved against crates.io plus the crates packaged
    // before it), then the upload skipped. Not `cargo package --workspace`: it also
    // packages the `publish = false` crates but, by design, does not offer them to
    // each other, so `examples` and `xtask`, which need the unpublished
    // `sanare-testing`, can never resolve.
    //
    // Without verification: a verifying build compiles each crate again from its
    // packaged files, whose manifests carry none of the workspace's `[profile]`, so
    // nothing already built is reused. Measured for `sanare-core` alone, the
    // smallest: 36 crates recompiled, 2m22s on 2 busy cores; for all ten it is the
    // whole dependency graph again. The doc tests and the host crate, which builds
    // `sanare` from its manifest outside the workspace, cover most of what it would.
    run(
        "cargo package (cargo publish --workspace --dry-run)",
        cargo().args([
            "publish",
            "--workspace",
            "--dry-run",
            "--no-verify",
            "--allow-dirty",
        ]),
    )?;
    let target_dir = metadata["target_directory"]
        .as_str()
        .ok_or("cargo metadata: no `target_directory`")?;
    run(
        "host crate (examples/host-axum)",
        cargo()
            .args([
                "build",
                "--locked",
                "--manifest-path",
                &format!("{HOST}/Cargo.toml"),
            ])
            .env("CARGO_TARGET_DIR", target_dir),
    )
    .map_err(|e| {
        format!(
            "{e}\n(if cargo said the lock file needs updating: a sanare crate's dependencies \
             changed; run `cargo fetch` in {HOST} and commit its Cargo.lock)"
        )
    })?;
    let (url, cluster) = database(ClusterOptions::default())?;
    let mut tests = if has_command("cargo-nextest", "--version")
        || cargo()
            .args(["nextest", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    {
        let mut cmd = cargo();
        cmd.args([
            "nextest",
            "run",
            "--workspace",
            "--all-features",
            "--no-fail-fast",
        ]);
        cmd
    } else {
        let mut cmd = cargo();
        cmd.args(["test", "--workspace", "--all-features", "--no-fail-fast"]);
        cmd
    };
    tests.args(args).env("DATABASE_URL", &url);
    let result = run("tests", &mut tests).and_then(|()| {
        run(
            "doc tests",
            cargo()
                .args(["test", "--workspace", "--all-features", "--doc"])
                .env("DATABASE_URL", &url),
        )
    });
    drop(cluster);
    result?;
    eprintln!(
        "xtask: all checks passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn step(name: &str, check: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    eprintln!("xtask: == {name}");
    let started = Instant::now();
    let result = check();
    eprintln!(
        "xtask: == {name}: {} in {:.1}s",
        if result.is_ok() { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    result.map_err(|e| format!("{name} failed:\n{e}"))
}

/// `cargo metadata` of the workspace, every feature on, every platform.
fn metadata() -> Result<Value, String> {
    let output = cargo()
        .args(["metadata", "--format-version", "1", "--all-features"])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("could not run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(format!("cargo metadata failed ({})", output.status));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("cargo metadata: {e}"))
}

fn check_rooms() -> Result<(), String> {
    let offenders = rooms::check(&root())?;
    for offender in &offenders {
        println!("{offender}");
    }
    if offenders.is_empty() {
        eprintln!(
            "xtask: no file over {} lines, no function over {} lines",
            rooms::MAX_FILE_LINES,
            rooms::MAX_FN_LINES
        );
        Ok(())
    } else {
        Err(format!(
            "{} rooms too big (carve them by concept)",
            offenders.len()
        ))
    }
}

fn check_msrv() -> Result<(), String> {
    let metadata = metadata()?;
    step("msrv", || msrv_report(&metadata))
}

fn msrv_report(metadata: &Value) -> Result<(), String> {
    let report = msrv::check(metadata)?;
    let mut declared: Vec<String> = report.checked.iter().map(|(_, v)| v.to_string()).collect();
    declared.sort();
    declared.dedup();
    eprintln!(
        "xtask: {} published crates declare rust-version {}; the highest a dependency declares is {}",
        report.checked.len(),
        declared.join(", "),
        report
            .highest
            .map_or_else(|| "none".to_owned(), |(v, who)| format!("{v} ({who})"))
    );
    if !report.violations.is_empty() {
        let list: Vec<String> = report.violations.iter().map(|v| format!("  {v}")).collect();
        return Err(format!(
            "{}\nraise `rust-version` in [workspace.package] of Cargo.toml to what the \
             dependencies need, or hold those dependencies back",
            list.join("\n")
        ));
    }
    if let [version] = declared.as_slice() {
        for (path, wording) in [
            ("README.md", format!("Minimum supported Rust: {version}")),
            (
                "docs/getting-started.md",
                format!("Rust {version} or newer"),
            ),
        ] {
            let text = std::fs::read_to_string(root().join(path))
                .map_err(|e| format!("reading {path}: {e}"))?;
            if !text.contains(&wording) {
                return Err(format!("{path} does not say \"{wording}\": update it"));
            }
        }
    }
    Ok(())
}

fn check_guide() -> Result<(), String> {
    let read = |path: &str| {
        std::fs::read_to_string(root().join(path)).map_err(|e| format!("reading {path}: {e}"))
    };
    let guide = read("docs/getting-started.md")?;
    guide::check_program(&guide, &read(&format!("{HOST}/src/main.rs"))?)?;
    guide::check_dependencies(
        &guide,
        &read(&format!("{HOST}/Cargo.toml"))?,
        &read("Cargo.toml")?,
    )
}

fn demo(args: &[String]) -> Result<(), String> {
    let (url, cluster) = database(ClusterOptions::default())?;
    let result = run(
        "quickstart",
        cargo()
            .args([
                "run",
                "--quiet",
                "-p",
                "sanare-examples",
                "--bin",
                "quickstart",
                "--",
            ])
            .args(args)
            .env("DATABASE_URL", &url),
    );
    drop(cluster);
    result
}

fn pg(args: &[String]) -> Result<(), String> {
    let durable = match args {
        [] => false,
        [flag] if flag == "--durable" => true,
        _ => return Err(format!("pg takes only --durable, got {args:?}\n\n{USAGE}")),
    };
    let cluster = Cluster::start_with(ClusterOptions::default().durable(durable))
        .map_err(|e| e.to_string())?;
    println!("DATABASE_URL={}", cluster.url("postgres"));
    eprintln!(
        "xtask: PostgreSQL running ({}); interrupt (Ctrl-C) or kill this process to stop it",
        if durable {
            "durable: fsync on, as `cargo xtask bench` runs it"
        } else {
            "fsync off: fast for tests, not for benchmark figures (use --durable)"
        }
    );
    // The server dies with this process (parent-death signal); park until then.
    loop {
        std::thread::park();
    }
}

const AREAS: [&str; 6] = [
    "journal",
    "snapshot",
    "integrity",
    "repair",
    "recovery",
    "corruption",
];

fn bench(args: &[String]) -> Result<(), String> {
    let Some(area) = args.first() else {
        return Err(format!("bench needs an area: one of {}", AREAS.join(", ")));
    };
    if !AREAS.contains(&area.as_str()) {
        return Err(format!(
            "unknown bench area `{area}`: expected one of {}",
            AREAS.join(", ")
        ));
    }
    if !root()
        .join("benches/benches")
        .join(format!("{area}.rs"))
        .is_file()
    {
        return Err(format!(
            "no benchmark for `{area}` yet (benches/benches/{area}.rs does not exist)"
        ));
    }
    // Benchmarks compare against durable baselines, so the server keeps fsync on.
    let (url, cluster) = database(ClusterOptions::default().durable(true))?;
    let out_dir = root().join("target/bench");
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("creating {}: {e}", out_dir.display()))?;
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "sanare-benches", "--bench", area, "--"])
        .args(&args[1..])
        .env("DATABASE_URL", &url)
        .env("SANARE_BENCH_OUT", out_dir.join(format!("{area}.json")));
    if let Some(c) = &cluster {
        cmd.env("SANARE_PG_BINDIR", c.bin_dir());
    }
    let result = run(&format!("bench {area}"), &mut cmd);
    drop(cluster);
    result?;
    eprintln!("xtask: figures written to target/bench/{area}.json");
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The repository's own guide and host crate, as `cargo xtask test` checks them.
    #[test]
    fn the_guide_and_the_host_crate_agree() {
        super::check_guide().unwrap();
    }
}
