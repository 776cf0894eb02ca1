//! The physical check against `pg_amcheck` on the same damaged cluster, with data
//! checksums on and off: pages are damaged with file writes while the server is
//! down, and both must name the same damaged blocks of the same relations.

mod common;

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use common::*;
use sanare_core::{Control, CorruptionKind};
use sanare_corruption::PhysicalReport;
use sanare_testing::cluster::{Cluster, ClusterOptions};

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Overwrites `len` bytes at `offset` of `path` with `byte`.
fn smash(path: &Path, offset: u64, len: usize, byte: u8) {
    smash_with(path, offset, &vec![byte; len]);
}

/// Overwrites the bytes at `offset` of `path` with `bytes`.
fn smash_with(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

const PAGE: u64 = 8192;

/// `(relation, block)` pairs: `block` is `None` for a relation reported damaged
/// without one.
type Blocks = BTreeSet<(String, Option<i64>)>;

/// One finding of pg_amcheck: a relation, a block, and whether it was an error
/// that stopped the relation's check (an unreadable page).
struct Theirs {
    relation: String,
    block: Option<i64>,
    offset: Option<i64>,
    message: String,
    fatal: bool,
}

/// `(relation, block, offset, message)`: what was said about each tuple or page.
type Messages = BTreeSet<(String, Option<i64>, Option<i64>, String)>;

/// The first block number in `text` ("… in block 3 of relation …", "… at block 2
/// in index …").
fn block_in(text: &str) -> Option<i64> {
    let at = text.find("block ")?;
    text[at + "block ".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|b| b.parse().ok())
}

/// Runs pg_amcheck on `db` with `args` and reads its findings: a header line per
/// finding (`heap table "db.public.accounts", block 1, offset 3:` or
/// `btree index "db.public.accounts_email":`), then the message, indented
/// (`    ERROR:  invalid page in block 2 of relation base/…` when the server gave
/// up on the relation).
fn run_pg_amcheck(cluster: &Cluster, db: &str, args: &[&str]) -> (Vec<Theirs>, String) {
    let out = std::process::Command::new(cluster.bin_dir().join("pg_amcheck"))
        .args(["-h", "127.0.0.1", "-p", &cluster.port().to_string()])
        .args(["-U", "postgres", "-d", db])
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut found = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line
            .strip_prefix("heap table \"")
            .or_else(|| line.strip_prefix("btree index \""))
        else {
            continue;
        };
        let Some((qualified, after)) = rest.split_once('"') else {
            continue;
        };
        // "db.schema.name" → "schema.name"
        let relation = qualified
            .split_once('.')
            .map_or(qualified, |(_, r)| r)
            .to_owned();
        let mut block = after.strip_prefix(", ").and_then(block_in);
        let offset = after.find("offset ").and_then(|at| {
            after[at + "offset ".len()..]
                .trim_end_matches(':')
                .parse()
                .ok()
        });
        let mut fatal = false;
        let mut message = String::new();
        while let Some(next) = lines.peek() {
            if !next.starts_with(' ') {
                break;
            }
            let said = next.trim_start();
            match said.strip_prefix("ERROR:") {
                Some(error) => {
                    fatal = true;
                    block = block.or_else(|| block_in(error));
                    message = error.trim_start().to_owned();
                }
                None if message.is_empty() => message = said.to_owned(),
                None => {}
            }
            lines.next();
        }
        found.push(Theirs {
            relation,
            block,
            offset,
            message,
            fatal,
        });
    }
    (found, text)
}

/// Every damaged block pg_amcheck finds in `public.accounts` and its indexes.
///
/// An unreadable page makes the server abandon pg_amcheck's check of a heap, and
/// with it what that check had found in earlier blocks; so the heap is checked by
/// block ranges (`--startblock`, `--endblock`), each range that hit an unreadable
/// block again on both sides of it, until no range is abandoned.
fn pg_amcheck(cluster: &Cluster, db: &str) -> (Messages, String) {
    let (first, mut text) = run_pg_amcheck(cluster, db, &["--table", "public.accounts"]);
    let mut found = Messages::new();
    for t in first
        .into_iter()
        .filter(|t| t.relation != "public.accounts")
    {
        found.insert((t.relation, t.block, t.offset, t.message));
    }
    let mut ranges: Vec<(i64, Option<i64>)> = vec![(0, None)];
    while let Some((start, end)) = ranges.pop() {
        let mut args = vec![
            "--table".to_owned(),
            "public.accounts".into(),
            "--no-dependent-indexes".into(),
            "--startblock".into(),
            start.to_string(),
        ];
        if let Some(end) = end {
            args.extend(["--endblock".into(), end.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (more, more_text) = run_pg_amcheck(cluster, db, &args);
        text.push_str(&format!("--- blocks {start}..{end:?}:\n{more_text}"));
        for t in more {
            if t.fatal
                && t.relation == "public.accounts"
                && let Some(b) = t.block
            {
                if b > start {
                    ranges.push((start, Some(b - 1)));
                }
                if end.is_none_or(|e| b < e) {
                    ranges.push((b + 1, end));
                }
            }
            found.insert((t.relation, t.block, t.offset, t.message));
        }
    }
    (found, text)
}

/// What our report says, in the same shape.
fn ours(report: &PhysicalReport) -> Messages {
    let mut found = Messages::new();
    for i in &report.issues {
        let relation = i.affected["relation"].as_str().unwrap().to_owned();
        for m in i.affected["messages"].as_array().unwrap() {
            found.insert((
                relation.clone(),
                i.affected["block"].as_i64(),
                m["offset"].as_i64(),
                m["message"].as_str().unwrap().to_owned(),
            ));
        }
    }
    found
}

fn blocks(m: &Messages) -> Blocks {
    m.iter().map(|(r, b, _, _)| (r.clone(), *b)).collect()
}

async fn damaged_cluster_agrees_with_pg_amcheck(checksums: bool) {
    let mut cluster = tokio::task::block_in_place(|| {
        Cluster::start_with(ClusterOptions::default().data_checksums(checksums))
    })
    .unwrap();
    let admin = connect(&cluster.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE damage").await.unwrap();
    let url = cluster.url("damage");
    let (heap, index) = {
        let c = connect(&url).await;
        install(&c, 2_000).await;
        c.batch_execute("CREATE EXTENSION amcheck; CHECKPOINT")
            .await
            .unwrap();
        let path = |rel: &'static str| {
            let c = &c;
            async move {
                let p: String = c
                    .query_one("SELECT pg_relation_filepath($1::text::regclass)", &[&rel])
                    .await
                    .unwrap()
                    .get(0);
                p
            }
        };
        (path("accounts").await, path("accounts_email").await)
    };
    tokio::task::block_in_place(|| cluster.stop());
    let data = cluster.data_dir().to_owned();
    // Heap block 3: its line pointers (from offset 24) point past the page.
    smash_with(
        &data.join(&heap),
        3 * PAGE + 24,
        &[0xff, 0xff, 0x00, 0x00].repeat(8),
    );
    // Heap block 9: a page header that makes no sense.
    smash(&data.join(&heap), 9 * PAGE + 12, 4, 0x7f);
    // Index block 2 (a leaf): its special space (sibling links, level, flags).
    smash(&data.join(&index), 3 * PAGE - 16, 16, 0xee);
    tokio::task::block_in_place(|| cluster.restart()).unwrap();

    let (theirs, text) = tokio::task::block_in_place(|| pg_amcheck(&cluster, "damage"));
    let pool = sanare_pg::connect_pool(&url, 4).unwrap();
    let det = detector(&pool, None);
    det.migrate().await.unwrap();
    let report = det
        .check_physical(&accounts(), &Control::detached())
        .await
        .unwrap();
    let mine = ours(&report);
    let expected: Blocks = [
        ("public.accounts".to_owned(), Some(3)),
        ("public.accounts".to_owned(), Some(9)),
        ("public.accounts_email".to_owned(), Some(2)),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        blocks(&theirs),
        expected,
        "checksums {checksums}: pg_amcheck said:\n{text}"
    );
    assert_eq!(
        blocks(&mine),
        expected,
        "checksums {checksums}: {:#?}",
        report.issues
    );
    // Block for block, offset for offset, in PostgreSQL's words.
    assert_eq!(
        mine, theirs,
        "checksums {checksums}\npg_amcheck said:\n{text}"
    );
    // The sound index is not blamed; the damaged one is an index finding, the
    // heap's blocks are heap findings.
    for i in &report.issues {
        let index = i.affected["relation"] == "public.accounts_email";
        assert_eq!(
            i.kind,
            if index {
                CorruptionKind::Index
            } else {
                CorruptionKind::Metadata
            }
        );
        assert!(!i.description.contains("db error"), "{}", i.description);
    }
    assert!(
        report
            .indexes_checked
            .contains(&"public.accounts_pkey".to_owned())
    );
    let heap = report
        .relations
        .iter()
        .find(|r| r.relation == "public.accounts")
        .unwrap();
    assert_eq!(heap.damaged_blocks, 2);
    assert_eq!(report.heap_blocks_checked, heap.blocks);

    // A checksum scan does not abort on an unreadable chunk: it reports it, with
    // the server's words, and points to the physical check.
    let scan = det
        .scan_table(&accounts(), &Control::detached())
        .await
        .unwrap();
    let chunk = scan
        .issues
        .iter()
        .find(|i| i.layer == sanare_corruption::Layer::Physical)
        .unwrap_or_else(|| panic!("{:#?}", scan.issues));
    assert!(
        chunk.description.contains("invalid page in block"),
        "{}",
        chunk.description
    );
    assert_eq!(chunk.affected["server"]["code"], "XX001");
    if checksums {
        // The server counted its checksum failures.
        let failures = det
            .check_checksum_failures()
            .await
            .unwrap()
            .expect("checksum failures");
        assert_eq!(failures.kind, CorruptionKind::Metadata);
        assert!(failures.affected["checksum_failures"].as_i64().unwrap() >= 1);
    }
    drop(pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_data_checksums_the_damaged_blocks_are_pg_amchecks() {
    damaged_cluster_agrees_with_pg_amcheck(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_data_checksums_the_damaged_blocks_are_pg_amchecks() {
    damaged_cluster_agrees_with_pg_amcheck(false).await;
}
