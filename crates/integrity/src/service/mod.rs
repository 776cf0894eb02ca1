//! The service: [`Integrity`], its runs ([`run`](self::run)), work units
//! ([`unit`](self::unit)), persistence ([`store`](self::store)) and readers
//! ([`readers`](self::readers)).

use std::sync::Arc;

use async_trait::async_trait;
use sanare_core::{
    BoxStream, CheckFamily, CheckId, Control, Error, EventBus, IntegrityService, Result, RowRef,
    ValidationScope, ValidationSummary, Violation,
};
use sanare_pg::{Pool, SchemaName, TxGuard, get_conn};

use crate::catalog;
use crate::config::{IntegrityBuilder, IntegrityConfig};
use crate::plan::{PlanInputs, TablePlan, plan_table};
use crate::probe::{begin_fresh, run_probe, session_setup};
use crate::rules::Rules;
use crate::spill::Collect;
use crate::units::Pred;

mod readers;
mod run;
mod snapshot;
mod store;
mod unit;

pub use readers::ViolationQuery;

/// Integrity validation over one database: build with [`Integrity::builder`].
#[derive(Clone, Debug)]
pub struct Integrity {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) schema: SchemaName,
    pub(crate) rules: Rules,
    pub(crate) events: Option<EventBus>,
    pub(crate) config: IntegrityConfig,
    pub(crate) checksum_key: Option<[u8; 32]>,
}

fn ms(d: std::time::Duration) -> u128 {
    d.as_millis().max(1)
}

impl Integrity {
    /// A builder.
    pub fn builder() -> IntegrityBuilder {
        IntegrityBuilder::default()
    }

    /// The declared rules.
    pub fn rules(&self) -> &Rules {
        &self.inner.rules
    }

    /// The tuning this service runs with.
    pub fn config(&self) -> &IntegrityConfig {
        &self.inner.config
    }

    /// Applies [`crate::MIGRATIONS`] in the configured schema.
    pub async fn migrate(&self) -> Result<sanare_pg::MigrationReport> {
        let mut conn = get_conn(&self.inner.pool).await?;
        let client: &mut tokio_postgres::Client = &mut conn;
        crate::migrate(client, &self.inner.schema).await
    }

    pub(crate) fn s(&self) -> String {
        self.inner.schema.quoted()
    }

    /// The session setup of a transaction whose statements may take `timeout`.
    pub(crate) fn setup(&self, timeout: std::time::Duration) -> String {
        session_setup(ms(timeout), ms(self.inner.config.lock_timeout))
    }

    /// The families a run of `scope` checks: those it names (all when none) that
    /// the configuration leaves on.
    pub(crate) fn families_of(&self, scope: &ValidationScope) -> Result<Vec<CheckFamily>> {
        let on = &self.inner.config.families;
        if scope.families.is_empty() {
            return Ok(on.clone());
        }
        let wanted: Vec<CheckFamily> = scope
            .families
            .iter()
            .copied()
            .filter(|f| on.contains(f))
            .collect();
        if wanted.is_empty() {
            let names: Vec<String> = scope
                .families
                .iter()
                .map(|f| format!("{f:?}").to_lowercase())
                .collect();
            return Err(Error::config(
                format!("validation.{}", names.join(", validation.")),
                "the scope asks only for check families this service's configuration turns off",
            ));
        }
        Ok(wanted)
    }

    /// The plans of `relations`, read from the catalog in one transaction under
    /// the probes' session settings.
    pub(crate) async fn plans(
        &self,
        relations: &[catalog::Relation],
        families: &[CheckFamily],
    ) -> Result<Vec<TablePlan>> {
        let tx = TxGuard::begin(
            &self.inner.pool,
            &begin_fresh(&self.setup(self.inner.config.table_timeout)),
        )
        .await?;
        let inputs = PlanInputs {
            rules: &self.inner.rules,
            families,
            checksum_key: self.inner.checksum_key,
            chunk_rows: self.inner.config.chunk_rows,
        };
        let mut plans = Vec::with_capacity(relations.len());
        for rel in relations {
            plans.push(plan_table(&***tx, rel, &inputs).await?);
        }
        tx.commit().await?;
        Ok(plans)
    }

    /// The key of `row` in `plan`'s key column order.
    pub(crate) fn key_of(plan: &TablePlan, r: &RowRef) -> Result<Vec<String>> {
        plan.key
            .iter()
            .map(|k| {
                r.key
                    .iter()
                    .find(|c| c.column == k.name)
                    .and_then(|c| c.value.clone())
                    .ok_or_else(|| {
                        Error::invalid_input(format!(
                            "row {r} lacks key column `{}` of {}",
                            k.name, plan.table
                        ))
                    })
            })
            .collect()
    }
}

#[async_trait]
impl IntegrityService for Integrity {
    async fn validate(
        &self,
        scope: ValidationScope,
        control: &Control,
    ) -> Result<ValidationSummary> {
        Ok(self.run(scope, control).await?.summary())
    }

    fn violations(&self, check: CheckId) -> BoxStream<'_, Result<Violation>> {
        Box::pin(readers::pages(
            self.clone(),
            ViolationQuery::new().check(check),
        ))
    }

    async fn recheck(&self, violation: &Violation) -> Result<bool> {
        let Some(row) = &violation.row else {
            return Err(Error::invalid_input(
                "only violations that name a row can be re-checked; re-run validation for the table",
            ));
        };
        let relations = {
            let client = get_conn(&self.inner.pool).await?;
            catalog::relation_tree(&**client, &violation.table).await?
        };
        let Some(rel) = relations.into_iter().find(|r| r.table == violation.table) else {
            return Err(Error::not_found(format!("table {}", violation.table)));
        };
        let plan = self
            .plans(std::slice::from_ref(&rel), &CheckFamily::ALL)
            .await?
            .pop()
            .ok_or_else(|| Error::not_found(format!("table {}", violation.table)))?;
        let key = Self::key_of(&plan, row)?;
        let pred = Pred::keys(&plan, std::slice::from_ref(&key));
        let setup = self.setup(self.inner.config.table_timeout);
        for probe in plan.probes.iter().filter(|p| p.can_find(&violation.kind)) {
            let tx = TxGuard::begin(&self.inner.pool, &begin_fresh(&setup)).await?;
            let mut found = Collect::default();
            run_probe(&tx, &plan, probe, &pred, &mut found).await?;
            tx.commit().await?;
            let Collect::Identities(ids) = found else {
                continue;
            };
            let rule = match probe {
                crate::plan::Probe::Fused(rules) => rules
                    .iter()
                    .position(|r| r.kind == violation.kind)
                    .and_then(|i| u32::try_from(i).ok()),
                _ => Some(0),
            };
            if rule.is_some_and(|rule| ids.contains(&(key.clone(), rule))) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
