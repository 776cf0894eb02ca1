//! `validation.schema`, `validation.referential`, `validation.checksum` and
//! `validation.consistency`: each turns its family of checks off for the service's
//! validations.

use std::collections::BTreeSet;

use sanare::core::{CheckFamily, Control, IntegrityService, ValidationScope, Violation};
use sanare::integrity::ViolationQuery;
use sanare::{Sanare, SanareConfig};
use sanare_testing::fixtures::order_service;

/// The families of the findings of one validation of `shop`.
async fn families_found(sanare: &Sanare) -> BTreeSet<&'static str> {
    let mut scope = ValidationScope::all();
    scope.schemas = vec!["shop".into()];
    let summary = sanare
        .integrity()
        .validate(scope, &Control::detached())
        .await
        .unwrap();
    let vs: Vec<Violation> = sanare
        .integrity()
        .query_violations(&ViolationQuery::new().check(summary.check).limit(10_000))
        .await
        .unwrap();
    assert_eq!(vs.len() as u64, summary.total_violations());
    vs.iter()
        .map(|v| match v.kind.code() {
            "referential" => "referential",
            "checksum_mismatch" => "checksum",
            "consistency" => "consistency",
            _ => "schema",
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_family_key_turns_its_checks_off() {
    let db = sanare_testing::test_db().await;
    let c = db.client().await;
    order_service::install(&**c, "shop").await.unwrap();
    order_service::generate(&**c, "shop", 40).await.unwrap();
    // One finding of each family: a NOT VALID check, an orphan, a checksum column
    // nobody fills, a business rule that fails.
    c.batch_execute(
        "ALTER TABLE shop.products ADD CONSTRAINT price_below_500 CHECK (price_cents < 500) NOT VALID;
         ALTER TABLE shop.products ADD COLUMN row_checksum bytea;
         SET session_replication_role = replica;
         INSERT INTO shop.order_lines VALUES (900001, 1, 1, 1, 10, 10);
         SET session_replication_role = origin;",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        r#"
[[checksum]]
table = "shop.products"
column = "row_checksum"

[[consistency]]
name = "no_customer_three"
table = "shop.orders"
predicate = "customer_id <> 3"
"#,
    )
    .unwrap();
    for off in [
        None,
        Some("schema"),
        Some("referential"),
        Some("checksum"),
        Some("consistency"),
    ] {
        let mut text = format!(
            "[validation]\nrules_file = {:?}\n",
            rules.display().to_string()
        );
        if let Some(key) = off {
            text.push_str(&format!("{key} = false\n"));
        }
        let config = SanareConfig::from_toml_str(&text, "test").unwrap();
        let sanare = Sanare::builder()
            .pool(db.pool().clone())
            .data_dir(dir.path())
            .config(config)
            .operator()
            .build()
            .await
            .unwrap();
        let found = families_found(&sanare).await;
        let all = BTreeSet::from(["schema", "referential", "checksum", "consistency"]);
        let mut want = all.clone();
        if let Some(key) = off {
            want.remove(key);
        }
        assert_eq!(found, want, "validation.{off:?} = false");
        // A scope asking only for a family turned off is refused by the key's name.
        if let Some(key) = off {
            let family = match key {
                "schema" => CheckFamily::Schema,
                "referential" => CheckFamily::Referential,
                "checksum" => CheckFamily::Checksum,
                _ => CheckFamily::Consistency,
            };
            let err = sanare
                .integrity()
                .validate(
                    ValidationScope::all().families([family]),
                    &Control::detached(),
                )
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains(&format!("validation.{key}")),
                "{err}"
            );
        }
    }
}
