//! The operator's workflows, through the real binary against a real database:
//! snapshots, journal, repairs, crashes and the recovery wizard.

use std::path::Path;
use std::process::{Command, Output};

use sanare::Sanare;
use sanare::journal::NewEntry;
use sanare_testing::TestDb;
use sanare_testing::fixtures::order_service;
use serde_json::Value;

struct Env {
    db: TestDb,
    dir: tempfile::TempDir,
}

impl Env {
    async fn new(orders: u64) -> Self {
        let db = sanare_testing::test_db().await;
        let client = db.client().await;
        order_service::install(&**client, "shop").await.unwrap();
        order_service::generate(&**client, "shop", orders)
            .await
            .unwrap();
        Self {
            db,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_sanare"))
            .args(args)
            .arg("--data-dir")
            .arg(self.dir.path())
            .env("DATABASE_URL", self.db.url())
            .env_remove("SANARE_CONFIG")
            .output()
            .expect("run the sanare binary")
    }

    /// Runs with `--json`, checks the exit code, parses stdout.
    fn json(&self, args: &[&str], code: i32) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(&all);
        assert_eq!(
            out.status.code(),
            Some(code),
            "`sanare {}`\nstdout: {}\nstderr: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&out.stdout));
        })
    }

    /// Runs without `--json`, checks the exit code, and returns what a person
    /// reads (stdout and stderr) after checking it speaks to them: no Rust
    /// `Debug` text, and times in RFC 3339.
    fn human(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(code),
            "`sanare {}`\n{text}",
            args.join(" ")
        );
        assert_speaks_to_people(&text, args);
        text
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db
            .client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }

    async fn service(&self, auto_recovery: bool) -> Sanare {
        let mut config = sanare::SanareConfig::default();
        config.auto_recovery = auto_recovery;
        Sanare::builder()
            .config(config)
            .pool(self.db.pool().clone())
            .data_dir(self.dir.path())
            .background(false)
            .build()
            .await
            .unwrap()
    }
}

/// No `Debug` output (`Available { version: "1.3" }`, `Some(…)`, `a::b` paths), and
/// no time in `time`'s default form (`2026-12-07 12:08:36.787818 +00:00:00`).
fn assert_speaks_to_people(text: &str, args: &[&str]) {
    for debug in ["{ ", " }", "Some(", "None", "::"] {
        assert!(
            !text.contains(debug),
            "`sanare {}` printed Debug text `{debug}`:\n{text}",
            args.join(" ")
        );
    }
    let bytes = text.as_bytes();
    for (i, w) in bytes.windows(10).enumerate() {
        // ` +HH:MM:SS` is the default form's offset.
        let default_offset = (w[0] == b' ' && (w[1] == b'+' || w[1] == b'-'))
            && [2, 3, 5, 6, 8, 9].iter().all(|&j| w[j].is_ascii_digit())
            && w[4] == b':'
            && w[7] == b':';
        assert!(
            !default_offset,
            "`sanare {}` printed a time in the default form at byte {i}:\n{text}",
            args.join(" ")
        );
    }
}

/// Whether `text` holds an RFC 3339 time to the second in UTC
/// (`2026-12-07T12:08:36Z`).
fn has_rfc3339(text: &str) -> bool {
    text.as_bytes().windows(20).any(|w| {
        let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
        digits.iter().all(|&j| w[j].is_ascii_digit())
            && (w[4], w[7], w[10], w[13], w[16], w[19]) == (b'-', b'-', b'T', b':', b':', b'Z')
    })
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_lifecycle_create_list_verify_restore_delete_prune() {
    let env = Env::new(300).await;
    let lines = env.count("SELECT count(*) FROM shop.order_lines").await;
    let created = env.json(
        &[
            "snapshot",
            "create",
            "--of-schema",
            "shop",
            "--label",
            "first",
        ],
        0,
    );
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["label"], "first");
    assert_eq!(created["tables"].as_array().unwrap().len(), 5);

    let list = env.json(&["snapshot", "list"], 0);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1);
    assert!(list["storage"]["blocks"].as_u64().unwrap() > 0);
    let text = env.human(&["snapshot", "list"], 0);
    assert!(text.contains(&id) && text.contains("first"), "{text}");
    assert!(has_rfc3339(&text), "{text}");

    let verified = env.json(&["snapshot", "verify", "latest"], 0);
    assert_eq!(verified["blocks_corrupt"], 0);
    assert!(
        env.human(&["snapshot", "verify", "latest"], 0)
            .contains("intact")
    );

    // Damage the live data, then restore: refused without --yes, beside into a
    // scratch schema, then into the live tables.
    env.db
        .client()
        .await
        .batch_execute("DELETE FROM shop.order_lines WHERE order_id % 3 = 0")
        .await
        .unwrap();
    let refused = env.run(&["snapshot", "restore", &id]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    env.json(
        &[
            "snapshot",
            "restore",
            &id,
            "--table",
            "shop.order_lines",
            "--into",
            "scratch",
        ],
        0,
    );
    assert_eq!(
        env.count("SELECT count(*) FROM scratch.order_lines").await,
        lines
    );
    let restored = env.json(&["snapshot", "restore", &id, "--yes"], 0);
    assert_eq!(restored["tables"].as_array().unwrap().len(), 5);
    assert_eq!(
        env.count("SELECT count(*) FROM shop.order_lines").await,
        lines
    );

    // A flipped bit in the middle of a pack (inside one of its blocks): verify
    // exits 3 and names the damage.
    let packs = files_under(&env.dir.path().join("snapshots").join("packs"));
    let victim = packs.last().expect("packs on disk");
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(victim, &bytes).unwrap();
    let damaged = env.json(&["snapshot", "verify", &id], 3);
    // The damaged block may hold table data or part of the index (index groups are
    // blocks too); either way verify names it.
    let named = damaged["blocks_corrupt"].as_u64().unwrap() >= 1
        || damaged["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap_or_default().contains("corrupt block"));
    assert!(named, "{damaged}");
    let refused = env.run(&["snapshot", "restore", &id, "--yes"]);
    assert_eq!(refused.status.code(), Some(1));

    // Delete, then prune frees its blocks.
    let deleted = env.json(&["snapshot", "delete", &id], 0);
    assert_eq!(deleted["status"], "deleted");
    let pruned = env.json(&["snapshot", "prune", "--grace", "0s"], 0);
    assert!(
        pruned["gc"]["blocks_deleted"].as_u64().unwrap() > 0,
        "{pruned}"
    );
    let missing = env.run(&["snapshot", "verify", "not-an-id"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not a snapshot id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_stats_query_archive_verify_and_a_damaged_record() {
    let env = Env::new(10).await;
    let service = env.service(false).await;
    for i in 0..20u32 {
        let op = if i % 2 == 0 {
            "order.placed"
        } else {
            "order.paid"
        };
        service
            .journal()
            .record(
                NewEntry::new(op, &i)
                    .unwrap()
                    .idempotency_key(format!("k{i}")),
            )
            .await
            .unwrap();
    }
    service.shutdown().await.unwrap();
    drop(service); // the journal is released with the last handle

    let stats = env.json(&["journal", "stats"], 0);
    assert_eq!(stats["stats"]["entries"], 20);
    let placed = env.json(&["journal", "query", "--op", "order.placed"], 0);
    assert_eq!(placed.as_array().unwrap().len(), 10);
    let tail = env.json(&["journal", "query", "--after", "15"], 0);
    assert_eq!(tail.as_array().unwrap().len(), 5);
    let text = env.human(&["journal", "stats"], 0);
    assert!(text.contains("20 entries"), "{text}");
    let text = env.human(&["journal", "query", "--after", "15"], 0);
    assert!(
        text.contains("order.placed") && text.contains("recorded"),
        "{text}"
    );
    assert!(has_rfc3339(&text), "{text}");
    let verified = env.json(&["journal", "verify"], 0);
    assert_eq!(verified["entries"], 20);
    // Compaction of the sealed segments (none yet: one active segment) reports what
    // it did and never grows anything.
    let compacted = env.json(&["journal", "compact"], 0);
    let (before, after) = (
        compacted["bytes_before"].as_u64().unwrap(),
        compacted["bytes_after"].as_u64().unwrap(),
    );
    assert!(after <= before, "{compacted}");
    // Compacted segments still read back whole.
    assert_eq!(env.json(&["journal", "verify"], 0)["entries"], 20);

    let archive = env.dir.path().join("paid.archive");
    let archive_s = archive.to_str().unwrap();
    let written = env.json(
        &[
            "journal",
            "archive",
            "--op",
            "order.paid",
            "--out",
            archive_s,
        ],
        0,
    );
    assert_eq!(written["entries"], 10);
    let read = env.json(&["journal", "archive", "--read", archive_s], 0);
    assert_eq!(read.as_array().unwrap().len(), 10);

    // The CLI has no handlers: a dry run reports every entry, applying none.
    let replay = env.json(&["journal", "replay", "--dry-run"], 3);
    assert_eq!(replay["entries_seen"], 20);
    assert_eq!(replay["dry_run"], true);

    // A damaged archive is refused with its name.
    let mut bytes = std::fs::read(&archive).unwrap();
    let at = bytes.len() - 8;
    bytes[at] ^= 0x01;
    std::fs::write(&archive, &bytes).unwrap();
    let bad = env.run(&["journal", "archive", "--read", archive_s]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("paid.archive"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_plan_approve_apply_rollback_and_history() {
    let env = Env::new(200).await;
    // Orphans: a product deleted behind the foreign key's back.
    env.db
        .client()
        .await
        .batch_execute(
            "SET session_replication_role = replica;
             DELETE FROM shop.products WHERE id = (SELECT min(product_id) FROM shop.order_lines);
             SET session_replication_role = origin;",
        )
        .await
        .unwrap();
    let nothing = env.json(&["repair", "plan"], 0);
    assert_eq!(nothing.as_array().unwrap().len(), 0, "no check has run yet");
    // One document: the report and every violation.
    let validated = env.json(&["validate"], 3);
    assert!(
        !validated["report"]["violations_by_severity"]
            .as_object()
            .unwrap()
            .is_empty(),
        "{validated}"
    );
    assert!(!validated["violations"].as_array().unwrap().is_empty());

    let out = env.run(&["repair", "plan", "--json"]);
    let plans: Value = serde_json::from_slice(&out.stdout).unwrap();
    let plans = plans.as_array().unwrap().clone();
    assert!(!plans.is_empty());
    let needs_approval = plans.iter().any(|p| p["requires_approval"] == true);
    assert_eq!(
        out.status.code(),
        Some(if needs_approval { 4 } else { 0 }),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for plan in &plans {
        let id = plan["id"].as_str().unwrap();
        // A dry run changes nothing, so it needs no approval.
        let dry = env.json(&["repair", "dry-run", id], 0);
        assert_eq!(dry["dry_run"], true);
        if plan["requires_approval"] == true {
            let apply = env.run(&["repair", "apply", id]);
            assert_eq!(apply.status.code(), Some(4), "unapproved repairs wait");
            assert!(String::from_utf8_lossy(&apply.stderr).contains("approve"));
            env.json(&["repair", "approve", id, "--by", "alice"], 0);
        }
        let applied = env.json(&["repair", "apply", id, "--by", "alice"], 0);
        assert_eq!(applied["dry_run"], false);
        assert_eq!(applied["status"], "completed", "{applied}");
    }
    env.json(&["validate"], 0);

    // Every row a repair covers, with what the run did with it.
    let first = plans[0]["id"].as_str().unwrap();
    let rows = env.json(&["repair", "rows", first], 0);
    let rows = rows.as_array().unwrap();
    assert!(!rows.is_empty());
    assert!(rows.iter().all(|r| r["outcome"] == "repaired"), "{rows:?}");

    // Removed rows are in the quarantine, whole; one comes back by id.
    let quarantined = env.json(&["repair", "quarantine", "list"], 0);
    let quarantined = quarantined.as_array().unwrap();
    assert!(!quarantined.is_empty());
    let qid = quarantined[0]["id"].as_i64().unwrap().to_string();
    let back = env.json(
        &["repair", "quarantine", "restore", &qid, "--by", "alice"],
        0,
    );
    assert_eq!(back["restored_by"], "alice");
    let again = env.run(&["repair", "quarantine", "restore", &qid, "--by", "alice"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already"));

    // Roll every repair back: the violations are back.
    for plan in plans.iter().rev() {
        env.json(&["repair", "rollback", plan["id"].as_str().unwrap()], 0);
    }
    env.json(&["validate"], 3);

    // A repair that cannot run safely fails with exit 1 and says why: deleting
    // orphaned orders would cascade to their lines, which no undo log covers.
    env.db
        .client()
        .await
        .batch_execute(
            "SET session_replication_role = replica;
             DELETE FROM shop.customers WHERE id = (SELECT min(customer_id) FROM shop.orders);
             SET session_replication_role = origin;",
        )
        .await
        .unwrap();
    env.json(&["validate", "--table", "shop.orders"], 3);
    let out = env.run(&["repair", "plan", "--json"]);
    let cascading: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cascading = cascading
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["table"]["name"] == "orders")
        .expect("a plan for the orphaned orders")
        .clone();
    let id = cascading["id"].as_str().unwrap();
    env.json(&["repair", "approve", id, "--by", "alice"], 0);
    let failed = env.run(&["repair", "apply", id]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("cascade"),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );

    let history = env.json(&["repair", "history"], 0);
    assert!(history.as_array().unwrap().len() > plans.len());
    let first = plans[0]["id"].as_str().unwrap();
    let one = env.json(&["repair", "history", "--id", first], 0);
    assert!(one["rolled_back_at"].is_string(), "{one}");
    let text = env.human(&["repair", "history", "--id", first], 0);
    assert!(text.contains("rolled_back") && has_rfc3339(&text), "{text}");
    let text = env.human(&["repair", "history"], 0);
    assert!(
        text.contains("rolled_back") && text.contains("failed") && has_rfc3339(&text),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_show_and_the_recovery_wizard_without_a_terminal() {
    let env = Env::new(50).await;
    let first = env.service(false).await;
    // The process "dies": no clean shutdown.
    drop(first);
    let second = env.service(false).await;
    let crash = second.startup_report().crash().expect("detected").id;
    second.shutdown().await.unwrap();

    let list = env.json(&["crashes", "list"], 0);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let shown = env.json(&["crashes", "show", &crash.to_string()], 0);
    assert_eq!(shown["crash"]["kind"], "application_crash");
    assert!(shown["recovery_successful"].is_null());
    let text = env.human(&["crashes", "list"], 0);
    assert!(
        text.contains("application_crash") && has_rfc3339(&text),
        "{text}"
    );
    let text = env.human(&["crashes", "show", &crash.to_string()], 0);
    assert!(has_rfc3339(&text), "{text}");

    // Not on a terminal and no --yes: the plan is printed, nothing runs, exit 4.
    let stderr = env.human(&["recover", "--option", "repair-only"], 4);
    assert!(
        stderr.contains("validate") && stderr.contains("--yes") && has_rfc3339(&stderr),
        "{stderr}"
    );
    // With --json, the plan that was not run is the one document on stdout, and
    // nothing ran.
    let plan = env.json(&["recover", "--option", "repair-only"], 4);
    assert_eq!(plan["steps"][0]["step"], "validate");
    assert!(env.json(&["crashes", "show", &crash.to_string()], 0)["recovery_successful"].is_null());

    let result = env.json(&["recover", "--option", "repair-only", "--yes"], 0);
    assert_eq!(result["success"], true);
    assert_eq!(result["crash"], crash.to_string());
    let after = env.json(&["crashes", "show", &crash.to_string()], 0);
    assert_eq!(after["recovery_successful"], true);

    // A manual plan only prints.
    let manual = env.run(&["recover", "--option", "manual"]);
    assert_eq!(manual.status.code(), Some(0));
    let bad = env.run(&["recover", "--option", "sideways"]);
    assert_eq!(bad.status.code(), Some(2));
    // That recovery restored nothing: there is nothing to undo.
    let id = result["id"].as_str().unwrap();
    let nothing = env.run(&["recover", "--undo", id, "--yes"]);
    assert_eq!(nothing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&nothing.stderr).contains("nothing to undo"),
        "{}",
        String::from_utf8_lossy(&nothing.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_snapshot_restore_is_undone_by_recovery_id() {
    let env = Env::new(50).await;
    env.json(&["snapshot", "create", "--of-schema", "shop"], 0);
    // Committed after the snapshot, by a client that is not sanare.
    let customer = "SELECT count(*) FROM shop.customers WHERE email = 'late@example.com'";
    env.db
        .client()
        .await
        .batch_execute(
            "INSERT INTO shop.customers (id, email, full_name, country) VALUES (100001, 'late@example.com', 'Late', 'DE')",
        )
        .await
        .unwrap();
    let restored = env.json(
        &["recover", "--option", "restore-latest-snapshot", "--yes"],
        0,
    );
    assert!(restored["backup_snapshot"].is_string(), "{restored}");
    assert!(
        restored["tables_restored"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "customers")
    );
    assert_eq!(
        env.count(customer).await,
        0,
        "the operator chose to go back"
    );
    let id = restored["id"].as_str().unwrap();

    // Without --yes nothing is undone: a person reads what would be, a script
    // gets the record as one JSON document.
    let text = env.human(&["recover", "--undo", id], 4);
    assert!(
        text.contains("undo recovery") && has_rfc3339(&text),
        "{text}"
    );
    assert_eq!(env.json(&["recover", "--undo", id], 4)["result"]["id"], id);
    assert_eq!(env.count(customer).await, 0);
    let undone = env.json(&["recover", "--undo", id, "--yes"], 0);
    assert_eq!(undone["undoes"], id);
    assert_eq!(env.count(customer).await, 1, "the committed row is back");
    let again = env.run(&["recover", "--undo", id, "--yes"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("undone already"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_reports_tables_without_checksums_and_physical_checks() {
    let env = Env::new(50).await;
    let report = env.json(&["scan", "--table", "shop.orders", "--physical"], 0);
    assert_eq!(
        report["scan"]["tables_skipped"].as_array().unwrap().len(),
        1
    );
    let text = env.human(&["scan"], 0);
    assert!(text.contains("skipped shop."), "{text}");
    let text = env.human(&["scan", "--table", "shop.orders", "--physical"], 0);
    assert!(
        text.contains("amcheck available (")
            || text.contains("amcheck unavailable: ")
            || text.contains("amcheck disabled"),
        "{text}"
    );
}
