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
//! phases).

use std::process::Command;
use std::time::{Duration, Instant};

use sanare_benches::{Figures, checkpoint};
use sanare_core::{CheckFamily, Control, IntegrityService, TableRef, ValidationScope};
use sanare_integrity::{ChecksumAlgorithm, ConsistencyRule, Integrity, IntegrityConfig, Rules};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pgbench() -> std::path::PathBuf {
    std::env::var_os("SANARE_PG_BINDIR")
        .map(|d| std::path::PathBuf::from(d).join("pgbench"))
        .unwrap_or_else(|| "pgbench".into())
}

/// Runs a pgbench write load for `secs` and returns its transactions per second.
async fn write_load(url: &str, secs: u64) -> f64 {
    let url = url.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(pgbench())
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
    let scale = env_u64("SANARE_BENCH_INTEGRITY_SCALE", 100);
    let load_secs = env_u64("SANARE_BENCH_INTEGRITY_LOAD_SECS", 10);
    let db = sanare_testing::test_db().await;
    let url = db.url().to_owned();
    let mut figures = Figures::new();
    figures.note(
        "integrity_machine",
        "2 cores, 24 GiB, shared with other engineers' builds",
    );

    let t = Instant::now();
    let out = Command::new(pgbench())
        .args(["-i", "-q", "-s", &scale.to_string(), &url])
        .output()
        .expect("pgbench -i runs");
    assert!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let rows: i64 = c
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .expect("count")
        .get(0);
    let rows = rows as f64;

    // Baseline: count(*) on the same table.
    let t = Instant::now();
    c.query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .expect("count");
    let count_rps = rows / t.elapsed().as_secs_f64();
    figures.set("count_rows_per_s", count_rps);

    let accounts = TableRef::new("public", "pgbench_accounts");
    let mut cfg = IntegrityConfig::default();
    cfg.chunk_rows = 250_000;
    cfg.parallelism = 2;
    cfg.publish_violations = false;
    let dir = tempfile::tempdir().expect("tempdir");
    cfg.report_dir = dir.path().to_owned();

    // Fused schema checks on the 10M-row table.
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

    // Checksums: 1M accounts with a BLAKE3 v1 checksum computed here by the
    // canonical encoding (as a host writing its own checksums does).
    let c2 = db.connect().await;
    build_checksum_table(&c, &c2, 1_000_000).await;
    checkpoint(&c, "integrity").await;
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
    if std::env::var("SANARE_BENCH_INTEGRITY_ONLY").as_deref() == Ok("checksum") {
        // Quick iterations on the checksum figure (with a small scale): skip the rest.
        eprintln!("integrity bench: checksum only: {figures:?}");
        return;
    }

    // All four families over everything.
    let mut all_rules = declared;
    all_rules.extend(rules);
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

    // Write load with and without validation running, alternating (without, with,
    // without, with) so a change in the shared machine's load hits both sides. The
    // validation alongside the load runs with one worker at a 10 % duty cycle:
    // the setting for a host whose writes matter more than the validation's speed,
    // on 2 cores, where a CPU-bound pgbench (two clients on a quiet disk) has no
    // core to spare.
    let mut bg_cfg = cfg.clone();
    bg_cfg.parallelism = 1;
    bg_cfg.duty_cycle = 0.1;
    let bg_cfg_duty = bg_cfg.duty_cycle;
    let background = Integrity::builder()
        .pool(db.pool().clone())
        .rules(all.rules().clone())
        .config(bg_cfg)
        .build()
        .expect("integrity");
    let (mut base_tps, mut loaded_tps) = (0.0, 0.0);
    let mut phases = Vec::new();
    for _ in 0..2 {
        checkpoint(&c, "integrity").await;
        let tps = write_load(&url, load_secs).await;
        phases.push(format!("without {tps:.0}"));
        base_tps += tps / 2.0;
        checkpoint(&c, "integrity").await;
        let run = {
            let background = background.clone();
            let scope = ValidationScope::all()
                .tables([accounts.clone()])
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
        let tps = write_load(&url, load_secs).await;
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

    let path = Figures::path_for("integrity");
    figures.write(&path).expect("writing figures");
    eprintln!("integrity bench: figures in {}", path.display());
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

fn sanare_pg_schema() -> sanare_pg::SchemaName {
    sanare_pg::SchemaName::default_schema()
}
