//! Integrity validation benchmarks: the figures, each against a baseline
//! measured in the same run, on `pgbench -i` data (10M accounts at scale 100) plus the
//! order-service fixture.
//!
//! Big workloads are measured once with `Instant` (a criterion loop over a minute-long
//! scan would not fit the time budget). Environment:
//! `SANARE_BENCH_INTEGRITY_SCALE` (pgbench scale, default 100 = 10M rows),
//! `SANARE_BENCH_INTEGRITY_ONLY=checksum` (stop after the checksum figure, which
//! is printed and not written: for quick iterations),
//! `SANARE_BENCH_INTEGRITY_LOAD_SECS` (seconds per write-load phase, default 10; four
//! phases), `SANARE_BENCH_INTEGRITY_ONLY=orphans` (only the million-orphans figures).
//!
//! The million-orphans figures (`violations_1m_*`) run last, on the same pgbench
//! tables with their foreign keys added and a tenth of the branches deleted behind
//! the database's back ([`sanare_benches::pgbench::orphan_branches`]): a child
//! process (this binary again, `SANARE_BENCH_INTEGRITY_CHILD`) builds the service as
//! the CLI does, validates the pgbench tables, writes the CSV and JSON reports, and
//! reports its peak memory; a baseline child validates only `pgbench_branches`.

use std::process::Command;
use std::time::{Duration, Instant};

use sanare_benches::{Figures, checkpoint, pgbench};
use sanare_core::{CheckFamily, Control, IntegrityService, TableRef, ValidationScope};
use sanare_integrity::{ChecksumAlgorithm, ConsistencyRule, Integrity, IntegrityConfig, Rules};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs a pgbench write load for `secs` and returns its transactions per second.
async fn write_load(url: &str, secs: u64) -> f64 {
    let url = url.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(pgbench::binary())
            .args([
                "-N",
                "-c",
                "2",
                "-j",
                "1",
                "-T",
                &secs.to_string(),
                "-n",
                &url,
            ])
            .output()
            .expect("pgbench runs")
    })
    .await
    .expect("pgbench task");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| {
            panic!(
                "no tps in pgbench output: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Ok(what) = std::env::var(CHILD) {
        child(&what).await;
        return;
    }
    let scale = env_u64("SANARE_BENCH_INTEGRITY_SCALE", 100);
    let only = std::env::var("SANARE_BENCH_INTEGRITY_ONLY").unwrap_or_default();
    let load_secs = env_u64("SANARE_BENCH_INTEGRITY_LOAD_SECS", 10);
    let db = sanare_testing::test_db().await;
    let url = db.url().to_owned();
    let mut figures = Figures::new();
    figures.note(
        "integrity_machine",
        "2 cores, 24 GiB, shared with other engineers' builds",
    );
    let c = prepare(&db, scale).await;
    if only == "orphans" {
        million_orphans(&url, &c, scale, &mut figures).await;
        let path = Figures::path_for("integrity");
        figures.write(&path).expect("writing figures");
        return;
    }

    let mut cfg = IntegrityConfig::default();
    cfg.chunk_rows = 250_000;
    cfg.parallelism = 2;
    cfg.publish_violations = false;
    let dir = tempfile::tempdir().expect("tempdir");
    cfg.report_dir = dir.path().to_owned();
    let declared = fused_schema_figures(&db, &c, &cfg, &mut figures).await;
    let checksums = checksum_figure(&db, &c, &cfg, &mut figures).await;
    if only == "checksum" {
        // Quick iterations on the checksum figure (with a small scale): skip the rest.
        eprintln!("integrity bench: checksum only: {figures:?}");
        return;
    }
    let all = all_checks_figures(&db, &cfg, declared, checksums, &mut figures).await;
    write_load_figures(&db, &c, &cfg, all.rules(), load_secs, &mut figures).await;
    million_orphans(&url, &c, scale, &mut figures).await;

    let path = Figures::path_for("integrity");
    figures.write(&path).expect("writing figures");
    eprintln!("integrity bench: figures in {}", path.display());
}

/// `pgbench -i -s <scale>` plus the order-service fixture (100k orders) and
/// sanare's tables, vacuumed and checkpointed; returns a connection.
async fn prepare(db: &sanare_testing::TestDb, scale: u64) -> tokio_postgres::Client {
    let t = Instant::now();
    {
        let url = db.url().to_owned();
        tokio::task::spawn_blocking(move || pgbench::init(&url, scale, false))
            .await
            .expect("pgbench -i");
    }
    eprintln!(
        "integrity bench: pgbench -i -s {scale} in {:.1?}",
        t.elapsed()
    );
    let c = db.connect().await;
    sanare_testing::fixtures::order_service::install(&c, "shop")
        .await
        .expect("fixture");
    sanare_testing::fixtures::order_service::generate(&c, "shop", 100_000)
        .await
        .expect("fixture data");
    let mut mc = db.connect().await;
    sanare_integrity::migrate(&mut mc, &sanare_pg_schema())
        .await
        .expect("migrate");
    c.batch_execute("VACUUM ANALYZE pgbench_accounts")
        .await
        .expect("vacuum");
    // Every measurement starts from a checkpoint, so none of them pays for
    // flushing the fixture's (or an earlier phase's) dirty buffers, 1.3 GB after
    // `pgbench -i -s 100`.
    checkpoint(&c, "integrity").await;
    c
}

fn accounts() -> TableRef {
    TableRef::new("public", "pgbench_accounts")
}

/// `fused_rows_per_s` (the schema family over `pgbench_accounts`) against
/// `count_rows_per_s` (`count(*)` of the same table); returns the declared rules.
async fn fused_schema_figures(
    db: &sanare_testing::TestDb,
    c: &tokio_postgres::Client,
    cfg: &IntegrityConfig,
    figures: &mut Figures,
) -> Rules {
    let rows: i64 = c
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .expect("count")
        .get(0);
    // Baseline: count(*) on the same table.
    let t = Instant::now();
    c.query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .expect("count");
    let count_rps = rows as f64 / t.elapsed().as_secs_f64();
    figures.set("count_rows_per_s", count_rps);

    // Fused schema checks on the 10M-row table.
    let accounts = accounts();
    let declared = Rules::builder()
        .range(
            &accounts,
            "abalance",
            Some(sanare_integrity::Bound::Int(-100_000_000)),
            Some(sanare_integrity::Bound::Int(100_000_000)),
        )
        .not_null(&accounts, "filler")
        .build()
        .expect("rules");
    let schema_only = Integrity::builder()
        .pool(db.pool().clone())
        .rules(declared.clone())
        .config(cfg.clone())
        .build()
        .expect("integrity");
    let t = Instant::now();
    let s = schema_only
        .validate(
            ValidationScope::all()
                .tables([accounts.clone()])
                .families([CheckFamily::Schema]),
            &Control::detached(),
        )
        .await
        .expect("schema run");
    // The unique (primary key) check is a whole-table sort and part of the schema
    // family; the fused figure is measured without it below via rows/time of the run.
    let fused_s = t.elapsed().as_secs_f64();
    figures.set("schema_family_10m_s", fused_s);
    let fused_rps = s.rows_checked as f64 / fused_s;
    figures.set("fused_rows_per_s", fused_rps);
    figures.set("fused_vs_count_ratio", fused_rps / count_rps);
    declared
}

/// `checksum_rows_per_s`: 1M accounts with a BLAKE3 v1 checksum computed here by
/// the canonical encoding (as a host writing its own checksums does), verified;
/// returns the checksum rule.
async fn checksum_figure(
    db: &sanare_testing::TestDb,
    c: &tokio_postgres::Client,
    cfg: &IntegrityConfig,
    figures: &mut Figures,
) -> Rules {
    let c2 = db.connect().await;
    build_checksum_table(c, &c2, 1_000_000).await;
    checkpoint(c, "integrity").await;
    let cks = TableRef::new("public", "cks");
    let rules = Rules::builder()
        .checksum(&cks, "row_checksum", ChecksumAlgorithm::Blake3)
        .build()
        .expect("rules");
    let checksum_only = Integrity::builder()
        .pool(db.pool().clone())
        .rules(rules.clone())
        .config(cfg.clone())
        .build()
        .expect("integrity");
    let t = Instant::now();
    let s = checksum_only
        .validate(
            ValidationScope::all()
                .tables([cks.clone()])
                .families([CheckFamily::Checksum]),
            &Control::detached(),
        )
        .await
        .expect("checksum run");
    assert!(s.is_clean(), "checksums must verify: {s:?}");
    figures.set(
        "checksum_rows_per_s",
        s.rows_checked as f64 / t.elapsed().as_secs_f64(),
    );
    rules
}

/// `all_checks_10m_rows_s`: all four families over everything; returns the
/// service with every rule.
async fn all_checks_figures(
    db: &sanare_testing::TestDb,
    cfg: &IntegrityConfig,
    declared: Rules,
    checksums: Rules,
    figures: &mut Figures,
) -> Integrity {
    let mut all_rules = declared;
    all_rules.extend(checksums);
    let shop = |n: &str| TableRef::new("shop", n);
    all_rules.extend(
        Rules::builder()
            .consistency(ConsistencyRule::aggregate_equals(
                "order_total",
                &shop("orders"),
                "id",
                "total_cents",
                &shop("order_lines"),
                "order_id",
                "amount_cents",
            ))
            .build()
            .expect("rules"),
    );
    let all = Integrity::builder()
        .pool(db.pool().clone())
        .rules(all_rules)
        .config(cfg.clone())
        .build()
        .expect("integrity");
    let mut scope = ValidationScope::all();
    scope.schemas = vec!["public".into(), "shop".into()];
    let t = Instant::now();
    let s = all
        .validate(scope.clone(), &Control::detached())
        .await
        .expect("all checks");
    let all_s = t.elapsed().as_secs_f64();
    figures.set("all_checks_10m_rows_s", all_s);
    figures.set("all_checks_rows", s.rows_checked as f64);
    figures.set("all_checks_violations", s.total_violations() as f64);
    all
}

/// `write_load_retained_pct`: the write load with and without validation
/// running, alternating (without, with, without, with) so a change in the shared
/// machine's load hits both sides. The validation alongside the load runs with
/// one worker at a 10 % duty cycle: the setting for a host whose writes matter
/// more than the validation's speed, on 2 cores, where a CPU-bound pgbench (two
/// clients on a quiet disk) has no core to spare.
async fn write_load_figures(
    db: &sanare_testing::TestDb,
    c: &tokio_postgres::Client,
    cfg: &IntegrityConfig,
    rules: &Rules,
    load_secs: u64,
    figures: &mut Figures,
) {
    let url = db.url();
    let mut bg_cfg = cfg.clone();
    bg_cfg.parallelism = 1;
    bg_cfg.duty_cycle = 0.1;
    let bg_cfg_duty = bg_cfg.duty_cycle;
    let background = Integrity::builder()
        .pool(db.pool().clone())
        .rules(rules.clone())
        .config(bg_cfg)
        .build()
        .expect("integrity");
    let (mut base_tps, mut loaded_tps) = (0.0, 0.0);
    let mut phases = Vec::new();
    for _ in 0..2 {
        checkpoint(c, "integrity").await;
        let tps = write_load(url, load_secs).await;
        phases.push(format!("without {tps:.0}"));
        base_tps += tps / 2.0;
        checkpoint(c, "integrity").await;
        let run = {
            let background = background.clone();
            let scope = ValidationScope::all()
                .tables([accounts()])
                .families([CheckFamily::Schema, CheckFamily::Referential]);
            tokio::spawn(async move {
                let (control, _) = Control::new();
                let token = control.cancel_token().clone();
                let stop = tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(load_secs + 1)).await;
                    token.cancel();
                });
                let r = background.validate(scope, &control).await;
                stop.abort();
                r.map(|_| ())
                    .or_else(|e| if e.is_cancelled() { Ok(()) } else { Err(e) })
            })
        };
        let tps = write_load(url, load_secs).await;
        phases.push(format!("with {tps:.0}"));
        loaded_tps += tps / 2.0;
        run.await
            .expect("validation task")
            .expect("validation under load");
    }
    figures.set("write_tps_baseline", base_tps);
    figures.set("write_tps_during_validation", loaded_tps);
    figures.set("write_load_retained_pct", 100.0 * loaded_tps / base_tps);
    figures.note("write_tps_phases", phases.join(", "));
    figures.set("write_load_validation_workers", 1.0);
    figures.set("write_load_validation_duty_cycle", bg_cfg_duty);
}

/// `cks`: the first `n` accounts plus `row_checksum`, BLAKE3 over the canonical
/// encoding of (aid, bid, abalance, filler) in their `::text` forms.
/// `c2` is a second connection: one connection cannot stream a COPY out and a COPY
/// in at once.
async fn build_checksum_table(c: &tokio_postgres::Client, c2: &tokio_postgres::Client, n: i64) {
    use futures_util::{SinkExt, StreamExt};
    c.batch_execute(
        "CREATE TABLE cks (LIKE pgbench_accounts); ALTER TABLE cks ADD COLUMN row_checksum bytea",
    )
    .await
    .expect("checksum table");
    c.batch_execute(&sanare_integrity::checksum::canonical_settings_sql())
        .await
        .expect("canonical settings");
    let out = c
        .copy_out(&format!(
            "COPY (SELECT aid::text, bid::text, abalance::text, filler::text FROM pgbench_accounts WHERE aid <= {n}) TO STDOUT"
        ))
        .await
        .expect("copy out");
    let sink = c2.copy_in("COPY cks FROM STDIN").await.expect("copy in");
    let mut out = std::pin::pin!(out);
    let mut sink = std::pin::pin!(sink);
    let sum = sanare_integrity::Checksummer::blake3();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = out.next().await {
        pending.extend_from_slice(&chunk.expect("copy out chunk"));
        let mut start = 0;
        while let Some(p) = pending[start..].iter().position(|&b| b == b'\n') {
            let line = &pending[start..start + p];
            // Digits and blanks only: no COPY escapes to decode.
            let mut h = sum.row(4);
            for f in line.split(|&b| b == b'\t') {
                h.field(Some(f));
            }
            buf.extend_from_slice(line);
            buf.extend_from_slice(b"\t\\\\x");
            for b in h.finish() {
                buf.extend_from_slice(format!("{b:02x}").as_bytes());
            }
            buf.push(b'\n');
            start += p + 1;
        }
        pending.drain(..start);
        if buf.len() > 1 << 20 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut buf)))
                .await
                .expect("copy in chunk");
        }
    }
    sink.send(bytes::Bytes::from(buf))
        .await
        .expect("copy in chunk");
    sink.as_mut().finish().await.expect("copy in end");
    c.batch_execute("RESET ALL; ALTER TABLE cks ADD PRIMARY KEY (aid)")
        .await
        .expect("checksum table key");
    c.batch_execute("VACUUM ANALYZE cks")
        .await
        .expect("vacuum checksum table");
}

/// The environment variable that makes this binary a child measuring one
/// validation: `orphans` (the pgbench tables) or `baseline` (`pgbench_branches`).
const CHILD: &str = "SANARE_BENCH_INTEGRITY_CHILD";

/// The million-orphans figures: peak memory and time of a validation of the pgbench
/// tables with a tenth of their branches deleted, CSV and JSON reports written,
/// measured in a child process, against a child validating one small table.
async fn million_orphans(url: &str, c: &tokio_postgres::Client, scale: u64, figures: &mut Figures) {
    let t = Instant::now();
    pgbench::add_foreign_keys(c)
        .await
        .expect("pgbench foreign keys");
    let branches = i32::try_from((scale / 10).max(1)).expect("branches");
    let orphans = pgbench::orphan_branches(c, branches)
        .await
        .expect("orphans");
    eprintln!(
        "integrity bench: {} orphans planted in {:.1?}",
        orphans.total(),
        t.elapsed()
    );
    checkpoint(c, "integrity").await;
    let base = run_child(url, "baseline");
    let run = run_child(url, "orphans");
    let found = run["violations"].as_f64().expect("violations");
    assert_eq!(found as i64, orphans.total(), "every orphan found: {run}");
    figures.set("violations_1m_count", found);
    figures.set("violations_1m_s", run["seconds"].as_f64().expect("seconds"));
    figures.set(
        "violations_1m_validate_s",
        run["validate_s"].as_f64().expect("validate_s"),
    );
    figures.set(
        "violations_1m_peak_rss_mb",
        run["peak_rss_mb"].as_f64().expect("rss"),
    );
    figures.set(
        "violations_1m_baseline_peak_rss_mb",
        base["peak_rss_mb"].as_f64().expect("rss"),
    );
    figures.note(
        "violations_1m_reports_mb",
        format!(
            "csv {:.0}, json {:.0}, jsonl {:.0}",
            run["csv_mb"].as_f64().unwrap_or(0.0),
            run["json_mb"].as_f64().unwrap_or(0.0),
            run["jsonl_mb"].as_f64().unwrap_or(0.0)
        ),
    );
    eprintln!("integrity bench: million orphans {run}, baseline {base}");
}

/// Runs this binary as a child measuring `what`, and returns its one-line report.
fn run_child(url: &str, what: &str) -> serde_json::Value {
    let exe = std::env::current_exe().expect("the bench binary");
    let out = Command::new(exe)
        .env(CHILD, what)
        .env("SANARE_BENCH_INTEGRITY_URL", url)
        .output()
        .expect("the child runs");
    assert!(
        out.status.success(),
        "child {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().expect("the child's report");
    serde_json::from_str(line).expect("the child's report is JSON")
}

/// The child: the service as the CLI builds it, one validation, both reports.
async fn child(what: &str) {
    let url = std::env::var("SANARE_BENCH_INTEGRITY_URL").expect("the database URL");
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = sanare_pg::connect_pool(&url, 8).expect("pool");
    let sanare = sanare::Sanare::builder()
        .pool(pool)
        .data_dir(dir.path())
        .operator()
        .build()
        .await
        .expect("sanare");
    let tables: Vec<TableRef> = match what {
        "baseline" => vec![TableRef::new("public", "pgbench_branches")],
        _ => [
            "pgbench_accounts",
            "pgbench_tellers",
            "pgbench_branches",
            "pgbench_history",
        ]
        .into_iter()
        .map(|t| TableRef::new("public", t))
        .collect(),
    };
    let t = Instant::now();
    let integrity = sanare.integrity();
    let report = integrity
        .run(ValidationScope::all().tables(tables), &Control::detached())
        .await
        .expect("validation");
    let validate_s = t.elapsed().as_secs_f64();
    let validate_cpu_s = cpu_seconds();
    let csv = dir.path().join("violations.csv");
    let json = dir.path().join("report.json");
    let file = |p: &std::path::Path| {
        std::io::BufWriter::new(std::fs::File::create(p).expect("report file"))
    };
    // Both reports at once, each by its own task, as `sanare validate --csv F
    // --report F` writes them.
    let (mut csv_out, mut json_out) = (file(&csv), file(&json));
    let (i1, i2, id) = (integrity.clone(), integrity.clone(), report.id);
    let csv_task = tokio::spawn(async move { i1.export_csv(id, &mut csv_out).await });
    let json_task = tokio::spawn(async move { i2.export_json(id, &mut json_out).await });
    csv_task.await.expect("csv task").expect("csv");
    json_task.await.expect("json task").expect("json");
    let seconds = t.elapsed().as_secs_f64();
    let cpu_s = cpu_seconds();
    let mb = |p: &std::path::Path| std::fs::metadata(p).map_or(0.0, |m| m.len() as f64 / 1048576.0);
    let jsonl = report.violations_file.clone().unwrap_or_default();
    println!(
        "{}",
        serde_json::json!({
            "violations": report.total_violations(),
            "rows": report.rows_checked,
            "validate_s": validate_s,
            "seconds": seconds,
            "cpu_s": cpu_s,
            "validate_cpu_s": validate_cpu_s,
            "peak_rss_mb": sanare_benches::peak_rss_mb(),
            "csv_mb": mb(&csv),
            "json_mb": mb(&json),
            "jsonl_mb": mb(&jsonl),
        })
    );
}

/// CPU seconds (user and system) this process used so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn sanare_pg_schema() -> sanare_pg::SchemaName {
    sanare_pg::SchemaName::default_schema()
}
