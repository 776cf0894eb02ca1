//! Stored work is data: a resumed run checks its stored units against the live
//! catalog and refuses a tampered one before anything runs; runs stored as SQL text
//! by an earlier version are never resumed; business-rule findings name a recompute
//! rule, never an expression.

use std::collections::BTreeSet;

use futures_util::StreamExt;
use sanare_core::{CheckId, Control, IntegrityService, TableRef, ValidationScope, Violation};
use sanare_integrity::{CheckStatus, ConsistencyRule, Integrity, IntegrityConfig, Rules};
use sanare_pg::{Migrations, SchemaName};
use sanare_testing::cluster::{Cluster, ClusterOptions};
use sanare_testing::fixtures::order_service;

mod common;
use common::order_total;

fn t(name: &str) -> TableRef {
    TableRef::new("shop", name)
}

fn scope() -> ValidationScope {
    let mut s = ValidationScope::all();
    s.schemas = vec!["shop".into()];
    s
}

fn rules() -> Rules {
    Rules::builder()
        .consistency(order_total().with_recompute("total_cents"))
        .unique("product_name", &t("products"), &["name"])
        .build()
        .unwrap()
}

fn integrity(pool: sanare_pg::Pool, dir: &std::path::Path, rules: Rules) -> Integrity {
    let mut cfg = IntegrityConfig::default();
    cfg.chunk_rows = 97;
    cfg.parallelism = 2;
    cfg.batch_size = 4;
    cfg.report_dir = dir.to_owned();
    Integrity::builder()
        .pool(pool)
        .rules(rules)
        .config(cfg)
        .build()
        .unwrap()
}

async fn violations(i: &Integrity, check: CheckId) -> Vec<Violation> {
    i.violations(check).map(|v| v.unwrap()).collect().await
}

fn identities(vs: &[Violation]) -> BTreeSet<String> {
    vs.iter()
        .map(|v| format!("{} {:?} {}", v.table, v.kind, v.row.as_ref().unwrap()))
        .collect()
}

/// Ways to tamper with one stored unit of `shop.orders`: (what, SQL over the row
/// `WHERE check_id = $1 AND table_name = 'orders' AND unit = <u>`).
const TAMPERS: &[(&str, &str)] = &[
    (
        "a bound value",
        "UPDATE sanare.integrity_chunks SET work = jsonb_set(work, '{rows,from,0}', to_jsonb('1) OR (SELECT pg_sleep(0)) IS NULL OR (true'::text))",
    ),
    (
        "a bound value of the right type",
        "UPDATE sanare.integrity_chunks SET work = jsonb_set(work, '{rows,from,0}', to_jsonb('3'::text))",
    ),
    (
        "a key column",
        "UPDATE sanare.integrity_chunks SET work = jsonb_set(work, '{key,0,name}', to_jsonb('id\"; DROP TABLE shop.canary; --'::text))",
    ),
    (
        "a key type",
        "UPDATE sanare.integrity_chunks SET work = jsonb_set(work, '{key,0,type_name}', to_jsonb('bigint; DROP TABLE shop.canary; --'::text))",
    ),
    (
        "the table",
        "UPDATE sanare.integrity_chunks SET table_name = 'orders; DROP TABLE shop.canary; --'",
    ),
    (
        "an extra field",
        "UPDATE sanare.integrity_chunks SET work = work || jsonb_build_object('predicate', 'true; DROP TABLE shop.canary')",
    ),
    (
        "the kind of rows",
        "UPDATE sanare.integrity_chunks SET work = jsonb_set(work, '{rows}', '{\"kind\": \"sql\", \"sql\": \"DROP TABLE shop.canary\"}')",
    ),
    (
        "the probe",
        "UPDATE sanare.integrity_chunks SET work = jsonb_set(work, '{probe}', to_jsonb('query:x''); DROP TABLE shop.canary; --'::text))",
    ),
];

/// A database `work` with the order fixture, a canary table and four planted
/// findings, on a cluster of its own that logs every statement and counts them
/// with pg_stat_statements; returns the cluster, a client and the URL.
async fn logged_work_database() -> (Cluster, tokio_postgres::Client, String) {
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start_with(ClusterOptions::default().logging_every_statement())
    })
    .await
    .unwrap()
    .unwrap();
    let (admin, conn) = tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin.batch_execute("CREATE DATABASE work").await.unwrap();
    let url = cluster.url("work");
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    order_service::install(&c, "shop").await.unwrap();
    order_service::generate(&c, "shop", 400).await.unwrap();
    c.batch_execute(
        "CREATE EXTENSION pg_stat_statements;
         CREATE TABLE shop.canary (x int); INSERT INTO shop.canary VALUES (1);
         UPDATE shop.orders SET total_cents = total_cents + 1 WHERE id IN (5, 300);
         UPDATE shop.products SET name = (SELECT name FROM shop.products WHERE id = 1) WHERE id = 2;",
    )
    .await
    .unwrap();
    let (mut m, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    sanare_integrity::migrate(&mut m, &SchemaName::default_schema())
        .await
        .unwrap();
    (cluster, c, url)
}

/// Counts the done units of a check.
const DONE: &str =
    "SELECT count(*) FROM sanare.integrity_chunks WHERE check_id = $1 AND done_at IS NOT NULL";

/// Tampers with one stored unit of `check` as `tamper` says, resumes the run,
/// sees it refused with nothing run and nothing marked, and puts the unit back.
async fn tamper_and_resume(
    (cluster, c, i): (&Cluster, &tokio_postgres::Client, &Integrity),
    check: uuid::Uuid,
    done_before: i64,
    (what, tamper): (&str, &str),
) {
    // A chunk unit, or for the probe a whole-table unit.
    let which = if what.contains("probe") {
        "work->>'probe' IS NOT NULL"
    } else {
        "unit = 1"
    };
    let target = format!("WHERE check_id = $1 AND table_name = 'orders' AND {which}");
    let original: (i32, serde_json::Value) = {
        let r = c
            .query_one(
                &format!("SELECT unit, work FROM sanare.integrity_chunks {target}"),
                &[&check],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        c.execute(&format!("{tamper} {target}"), &[&check])
            .await
            .unwrap(),
        1,
        "{what}"
    );
    c.batch_execute("SELECT pg_stat_statements_reset()")
        .await
        .unwrap();
    let log_at = cluster.log().len();

    let err = i
        .resume(sanare_core::CheckId::from_uuid(check), &Control::detached())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("stored integrity work unit"), "{what}: {err}");
    assert!(err.contains("orders"), "{what}: {err}");
    let logged = cluster.statements_logged_since(log_at);

    // Nothing ran: no statement read a host table, none carried the payload.
    let ran =
        sanare_testing::statements_counted(c, "query LIKE '%\"shop\"%' OR query LIKE '%shop.%'")
            .await;
    assert!(ran.is_empty(), "{what}: {ran:#?}");
    assert!(!logged.is_empty(), "the server logs statements");
    for word in ["pg_sleep", "canary", "\"shop\"", "DROP"] {
        assert!(!logged.contains(word), "{what}: `{word}` in\n{logged}");
    }
    let canary: i64 = c
        .query_one("SELECT count(*) FROM shop.canary", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(canary, 1, "{what}");
    // The same filter sees a statement over a host table once one has run.
    assert!(
        !sanare_testing::statements_counted(c, "query LIKE '%shop.%'")
            .await
            .is_empty()
    );
    let done_now: i64 = c.query_one(DONE, &[&check]).await.unwrap().get(0);
    assert_eq!(done_now, done_before, "{what}");
    let status: String = c
        .query_one(
            "SELECT status FROM sanare.integrity_checks WHERE id = $1",
            &[&check],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "failed", "{what}");

    c.execute(
        "UPDATE sanare.integrity_chunks SET table_name = 'orders', work = $3
          WHERE check_id = $1 AND unit = $2 AND table_schema = 'shop'
            AND table_name IN ('orders', 'orders; DROP TABLE shop.canary; --')",
        &[&check, &original.0, &original.1],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_tampered_work_unit_is_refused_and_nothing_runs_then_the_run_resumes() {
    let (cluster, c, url) = logged_work_database().await;
    let dir = tempfile::tempdir().unwrap();
    let pool = sanare_pg::connect_pool(&url, 8).unwrap();
    let i = integrity(pool, dir.path(), rules());

    let full = i.run(scope(), &Control::detached()).await.unwrap();
    let full_vs = violations(&i, full.id).await;
    assert!(full.total_violations() >= 4, "{full:?}");
    // A run that died half way: every other unit not done (the violations they
    // wrote remain, as a unit that died between its batches leaves them).
    let run = i.run(scope(), &Control::detached()).await.unwrap();
    let check = run.id.as_uuid();
    c.execute(
        "UPDATE sanare.integrity_checks SET status = 'failed' WHERE id = $1",
        &[&check],
    )
    .await
    .unwrap();
    let undone = c
        .execute(
            "UPDATE sanare.integrity_chunks SET done_at = NULL WHERE check_id = $1 AND unit % 2 = 1",
            &[&check],
        )
        .await
        .unwrap();
    assert!(undone > 3);
    let done_before: i64 = c.query_one(DONE, &[&check]).await.unwrap().get(0);

    for &tamper in TAMPERS {
        tamper_and_resume((&cluster, &c, &i), check, done_before, tamper).await;
    }

    // Untampered, the run resumes and ends with the full run's report.
    let resumed = i
        .resume(sanare_core::CheckId::from_uuid(check), &Control::detached())
        .await
        .unwrap();
    assert_eq!(resumed.status, CheckStatus::Completed);
    assert_eq!(resumed.rows_checked, full.rows_checked);
    assert_eq!(resumed.violations_by_severity, full.violations_by_severity);
    assert_eq!(resumed.families, full.families);
    let resumed_vs = violations(&i, resumed.id).await;
    assert_eq!(resumed_vs.len(), full_vs.len());
    assert_eq!(identities(&resumed_vs), identities(&full_vs));
}

#[tokio::test]
async fn runs_stored_as_sql_text_by_an_earlier_version_are_never_resumed() {
    let db = sanare_testing::test_db().await;
    let c = db.connect().await;
    order_service::install(&c, "shop").await.unwrap();
    order_service::generate(&c, "shop", 50).await.unwrap();
    c.batch_execute("CREATE TABLE shop.canary (x int); INSERT INTO shop.canary VALUES (1);")
        .await
        .unwrap();
    // The schema as the previous version left it, with a run of it in flight.
    let previous = Migrations::new("integrity", &sanare_integrity::MIGRATIONS.migrations()[..2]);
    let schema = SchemaName::default_schema();
    previous
        .run(&mut db.connect().await, &schema)
        .await
        .unwrap();
    let check = uuid::Uuid::now_v7();
    c.execute(
        "INSERT INTO sanare.integrity_checks (id, started_at, status, scope)
         VALUES ($1, now(), 'failed', '{\"tables\": [], \"schemas\": [\"shop\"], \"families\": [], \"rows\": []}')",
        &[&check],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO sanare.integrity_chunks (check_id, table_schema, table_name, unit, predicate, done_at)
         VALUES ($1, 'shop', 'orders', 0, 't.id < 5', now()),
                ($1, 'shop', 'orders', 1, 'true) OR (SELECT count(*) FROM shop.canary) > 0 OR (true', NULL)",
        &[&check],
    )
    .await
    .unwrap();

    sanare_integrity::migrate(&mut db.connect().await, &schema)
        .await
        .unwrap();
    let marked: Vec<bool> = c
        .query(
            "SELECT replan_needed FROM sanare.integrity_chunks WHERE check_id = $1",
            &[&check],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(marked, vec![true, true]);
    let predicate: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.columns
              WHERE table_schema = 'sanare' AND table_name = 'integrity_chunks' AND column_name = 'predicate'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(predicate, 0, "no SQL text is kept");

    let dir = tempfile::tempdir().unwrap();
    let i = integrity(db.pool().clone(), dir.path(), Rules::default());
    let err = i
        .resume(CheckId::from_uuid(check), &Control::detached())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("earlier version"), "{err}");
    let (status, error): (String, Option<String>) = {
        let r = c
            .query_one(
                "SELECT status, error FROM sanare.integrity_checks WHERE id = $1",
                &[&check],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("earlier version"));
    // A new run works.
    let run = i.run(scope(), &Control::detached()).await.unwrap();
    assert!(run.total_violations() == 0, "{run:?}");
}

#[tokio::test]
async fn business_rule_findings_name_a_recompute_rule_never_an_expression() {
    let db = sanare_testing::test_db().await;
    let c = db.connect().await;
    order_service::install(&c, "shop").await.unwrap();
    order_service::generate(&c, "shop", 60).await.unwrap();
    c.batch_execute(
        "UPDATE shop.orders SET total_cents = total_cents + 1 WHERE id IN (5, 8);
         UPDATE shop.orders SET note = 'x' WHERE id = 9;",
    )
    .await
    .unwrap();
    sanare_integrity::migrate(&mut db.connect().await, &SchemaName::default_schema())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = rules();
    let mut with_predicate = rules.clone();
    with_predicate.extend(
        Rules::builder()
            .consistency(
                ConsistencyRule::predicate("note_is_not_x", &t("orders"), "note <> 'x'")
                    .with_recompute("note"),
            )
            .build()
            .unwrap(),
    );
    let i = integrity(db.pool().clone(), dir.path(), with_predicate);
    let run = i
        .run(
            ValidationScope::all().tables([t("orders"), t("order_lines")]),
            &Control::detached(),
        )
        .await
        .unwrap();
    let vs = violations(&i, run.id).await;
    let recompute: BTreeSet<String> = vs
        .iter()
        .filter_map(|v| v.details.get("recompute").map(ToString::to_string))
        .collect();
    assert_eq!(
        recompute,
        BTreeSet::from([
            r#"{"column":"total_cents","rule":"order_total"}"#.to_owned(),
            r#"{"column":"note","rule":"note_is_not_x"}"#.to_owned(),
        ])
    );
    assert_eq!(
        vs.iter()
            .filter(|v| v.details.get("recompute").is_some())
            .count(),
        3
    );
    for v in &vs {
        assert!(!v.details.to_string().contains("expression"), "{v:?}");
    }
    // A recompute column the table does not have is refused by name.
    let bad = Rules::builder()
        .consistency(
            ConsistencyRule::predicate("r", &t("orders"), "true").with_recompute("no_such_column"),
        )
        .build()
        .unwrap();
    let err = integrity(db.pool().clone(), dir.path(), bad)
        .run(
            ValidationScope::all().tables([t("orders")]),
            &Control::detached(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no_such_column"), "{err}");
}
