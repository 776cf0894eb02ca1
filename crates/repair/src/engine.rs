//! The engine: its builder, its shared state, and the [`RepairService`] it implements.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use sanare_core::{
    BoxStream, Control, Error, Event, EventBus, ExecuteOptions, JournalService, RepairId,
    RepairOutcome, RepairPlan, RepairPolicy, RepairRunSummary, RepairService, RepairStrategyKind,
    Result, SnapshotService, TableRef, Violation,
};
use sanare_pg::{PgResultExt, Pool, SchemaName, get_conn};
use time::OffsetDateTime;

use crate::config::{ActionKey, RecomputeRule, RepairConfig};
use crate::decide::CustomStrategy;
use crate::record::{RepairRecord, status_code};

/// Builds a [`RepairEngine`].
#[derive(Default)]
#[must_use]
pub struct RepairEngineBuilder {
    pool: Option<Pool>,
    schema: Option<SchemaName>,
    snapshots: Option<Arc<dyn SnapshotService>>,
    journal: Option<Arc<dyn JournalService>>,
    events: Option<EventBus>,
    config: RepairConfig,
    strategies: Vec<Arc<dyn CustomStrategy>>,
    rules: Vec<RecomputeRule>,
    action_key: Option<ActionKey>,
}

impl RepairEngineBuilder {
    /// The connection pool of the host database (required).
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The schema of sanare's tables (default `sanare`).
    pub fn schema(mut self, schema: SchemaName) -> Self {
        self.schema = Some(schema);
        self
    }

    /// The snapshot service, for RestoreFromSnapshot, TruncateAndReload and the
    /// pre-repair snapshot of critical repairs.
    pub fn snapshots(mut self, snapshots: Arc<dyn SnapshotService>) -> Self {
        self.snapshots = Some(snapshots);
        self
    }

    /// The journal, for ReplayTransaction.
    pub fn journal(mut self, journal: Arc<dyn JournalService>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Where `RepairCompleted` events go (default: a private bus).
    pub fn events(mut self, events: EventBus) -> Self {
        self.events = Some(events);
        self
    }

    /// Thresholds and limits.
    pub fn config(mut self, config: RepairConfig) -> Self {
        self.config = config;
        self
    }

    /// Registers a host strategy, consulted before the built-in decision table. Its
    /// plans store SQL, so they need an [`action_key`](Self::action_key).
    pub fn strategy(mut self, strategy: Arc<dyn CustomStrategy>) -> Self {
        self.strategies.push(strategy);
        self
    }

    /// Registers a recompute rule (from trusted configuration): a consistency
    /// violation whose `details.recompute` names it is repaired by setting the
    /// column to the rule's expression (decision row R8).
    pub fn recompute_rule(
        mut self,
        name: impl Into<String>,
        table: TableRef,
        column: impl Into<String>,
        expression: impl Into<String>,
    ) -> Self {
        self.rules
            .push(RecomputeRule::new(name, table, column, expression));
        self
    }

    /// The key that authenticates the SQL host strategies store with their plans.
    pub fn action_key(mut self, key: ActionKey) -> Self {
        self.action_key = Some(key);
        self
    }

    /// Builds the engine. Fails without a pool, with duplicate strategy or rule names,
    /// or with host strategies and no action key.
    pub fn build(self) -> Result<RepairEngine> {
        let pool = self
            .pool
            .ok_or_else(|| Error::config("repair.pool", "a connection pool is required"))?;
        let mut names = HashSet::new();
        for s in &self.strategies {
            if !names.insert(s.name().to_owned()) {
                return Err(Error::config(
                    "repair.strategies",
                    format!("strategy `{}` is registered twice", s.name()),
                ));
            }
        }
        if !self.strategies.is_empty() && self.action_key.is_none() {
            return Err(Error::config(
                "repair.action_key",
                "host strategies store SQL with their plans, which must be authenticated: \
                 give the engine an action key (kept outside the database)",
            ));
        }
        let mut rules = HashMap::new();
        for r in self.rules {
            if r.name.trim().is_empty() || r.expression.trim().is_empty() {
                return Err(Error::config(
                    "repair.recompute_rules",
                    "a recompute rule needs a name and an expression",
                ));
            }
            let name = r.name.clone();
            if rules.insert(name.clone(), r).is_some() {
                return Err(Error::config(
                    "repair.recompute_rules",
                    format!("recompute rule `{name}` is registered twice"),
                ));
            }
        }
        Ok(RepairEngine {
            inner: Arc::new(Inner {
                pool,
                schema: self.schema.unwrap_or_else(SchemaName::default_schema),
                snapshots: self.snapshots,
                journal: self.journal,
                events: self.events.unwrap_or_default(),
                config: self.config,
                strategies: self.strategies,
                rules,
                action_key: self.action_key,
            }),
        })
    }
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) schema: SchemaName,
    pub(crate) snapshots: Option<Arc<dyn SnapshotService>>,
    pub(crate) journal: Option<Arc<dyn JournalService>>,
    pub(crate) events: EventBus,
    pub(crate) config: RepairConfig,
    pub(crate) strategies: Vec<Arc<dyn CustomStrategy>>,
    pub(crate) rules: HashMap<String, RecomputeRule>,
    pub(crate) action_key: Option<ActionKey>,
}

/// The automatic repair engine. Cheap to clone; implements [`RepairService`].
#[derive(Clone)]
pub struct RepairEngine {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for RepairEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepairEngine")
            .field("schema", &self.inner.schema)
            .field("config", &self.inner.config)
            .field("snapshots", &self.inner.snapshots.is_some())
            .field("journal", &self.inner.journal.is_some())
            .field("recompute_rules", &self.inner.rules.len())
            .finish_non_exhaustive()
    }
}

/// A stable text code of a strategy, as stored in `repair_operations.strategy`.
pub fn strategy_code(kind: &RepairStrategyKind) -> String {
    match kind {
        RepairStrategyKind::Custom(name) => format!("custom:{name}"),
        other => serde_json::to_value(other)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{other:?}")),
    }
}

/// The key of a repair's transaction-scoped advisory lock.
pub(crate) fn advisory_key(id: RepairId) -> i64 {
    let b = id.as_uuid().as_u128();
    (b as i64) ^ ((b >> 64) as i64)
}

impl RepairEngine {
    /// Starts a builder.
    pub fn builder() -> RepairEngineBuilder {
        RepairEngineBuilder::default()
    }

    /// Applies this crate's [`MIGRATIONS`](crate::MIGRATIONS) in the configured schema.
    pub async fn migrate(&self) -> Result<sanare_pg::MigrationReport> {
        let mut conn = get_conn(&self.inner.pool).await?;
        crate::MIGRATIONS.run(&mut conn, &self.inner.schema).await
    }

    /// The configuration.
    pub fn config(&self) -> &RepairConfig {
        &self.inner.config
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// A table of sanare's schema, quoted.
    pub(crate) fn t(&self, table: &str) -> String {
        self.inner.schema.table(table)
    }

    /// One repair's record.
    pub async fn get(&self, repair: RepairId) -> Result<RepairRecord> {
        Ok(self.load(repair).await?.record)
    }

    /// Repairs planned in `from..to`, oldest first, read from the database a page at
    /// a time.
    pub fn history(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> BoxStream<'static, Result<RepairRecord>> {
        crate::record::history(self.inner.pool.clone(), self.inner.schema.clone(), from, to)
    }

    /// Records metrics and publishes `RepairCompleted` (not for dry runs).
    pub(crate) fn finish(&self, plan: &RepairPlan, outcome: &RepairOutcome, what: &'static str) {
        let strategy = strategy_code(&plan.strategy);
        metrics::counter!("sanare_repair_total", "strategy" => strategy.clone(), "status" => status_code(outcome.status), "op" => what)
            .increment(1);
        metrics::counter!("sanare_repair_rows_total", "strategy" => strategy.clone(), "op" => what)
            .increment(outcome.rows_affected);
        metrics::histogram!("sanare_repair_duration_seconds", "strategy" => strategy, "op" => what)
            .record(outcome.duration.as_secs_f64());
        if !outcome.dry_run {
            self.inner.events.publish(Event::RepairCompleted {
                repair: outcome.repair,
                status: outcome.status,
                rows_affected: outcome.rows_affected,
            });
        }
    }
}

#[async_trait]
impl RepairService for RepairEngine {
    async fn plan(&self, violations: &[Violation]) -> Result<Vec<RepairPlan>> {
        let stream = futures_util::stream::iter(violations.iter().cloned().map(Ok));
        self.plan_stream(Box::pin(stream), &Control::detached())
            .await
    }

    async fn plan_stream(
        &self,
        violations: BoxStream<'_, Result<Violation>>,
        control: &Control,
    ) -> Result<Vec<RepairPlan>> {
        crate::plan::plan_stream(self, violations, control).await
    }

    async fn approve(&self, repair: RepairId, approver: &str) -> Result<RepairPlan> {
        if approver.trim().is_empty() {
            return Err(Error::invalid_input(
                "an approval needs the approver's name",
            ));
        }
        let conn = get_conn(&self.inner.pool).await?;
        let n = conn
            .execute(
                &format!(
                    "UPDATE {} SET approved_by = $2, approved_at = now(),
                            status = CASE WHEN status = 'awaiting_approval' THEN 'pending' ELSE status END
                      WHERE id = $1 AND status IN ('pending', 'awaiting_approval', 'failed')",
                    self.t("repair_operations")
                ),
                &[&repair.as_uuid(), &approver],
            )
            .await
            .with_context(|| format!("approving repair {repair}"))?;
        let record = self.get(repair).await?;
        if n == 0 {
            return Err(Error::conflict(format!(
                "repair {repair} is {} and can no longer be approved",
                status_code(record.plan.status)
            )));
        }
        tracing::info!(%repair, approver, "repair approved");
        Ok(record.plan)
    }

    async fn execute(
        &self,
        repair: RepairId,
        options: ExecuteOptions,
        control: &Control,
    ) -> Result<RepairOutcome> {
        crate::execute::execute(self, repair, options, control).await
    }

    async fn rollback(&self, repair: RepairId, control: &Control) -> Result<RepairOutcome> {
        crate::rollback::rollback(self, repair, control).await
    }

    async fn repair_all(
        &self,
        violations: BoxStream<'_, Result<Violation>>,
        policy: &RepairPolicy,
        control: &Control,
    ) -> Result<RepairRunSummary> {
        crate::run::repair_all(self, violations, policy, control).await
    }
}
