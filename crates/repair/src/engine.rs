//! The repair engine: planning, approval, execution with an undo log, rollback, audit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sanare_core::{
    BoxStream, Control, Error, Event, EventBus, ExecuteOptions, JournalService, RepairId,
    RepairOutcome, RepairPlan, RepairPolicy, RepairRunSummary, RepairService, RepairStatus,
    RepairStrategyKind, ReplayRange, ReplayRequest, Result, RowRef, Severity, SnapshotId,
    SnapshotRequest, SnapshotService, TableRef, Violation, ViolationId, ViolationKind,
};
use sanare_pg::{PgResultExt, Pool, SchemaName, get_conn, quote_ident};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_postgres::GenericClient;
use tracing::Instrument;

use crate::decide::{
    CustomStrategy, Decision, RowAction, TableFacts, decide, idempotency_keys, recompute,
    target_table,
};
use crate::sql::Meta;

/// Thresholds and limits of the repair engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepairConfig {
    /// Repairs of violations at or above this severity wait for an approval
    /// (default [`Severity::High`]); `None` disables the severity gate.
    pub approval_severity: Option<Severity>,
    /// Repairs expected to change more rows than this wait for an approval
    /// (default 1,000).
    pub approval_max_rows: u64,
    /// Take a snapshot of the affected table before a repair of a critical violation,
    /// when a snapshot service is attached (default true).
    pub snapshot_before_critical: bool,
    /// `lock_timeout` of the repair transaction: a concurrent writer holding the rows
    /// longer than this fails the repair instead of stalling it (default 5 s).
    pub lock_timeout: Duration,
    /// `statement_timeout` of the repair transaction (default 5 min).
    pub statement_timeout: Duration,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            approval_severity: Some(Severity::High),
            approval_max_rows: 1_000,
            snapshot_before_critical: true,
            lock_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(300),
        }
    }
}

impl RepairConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the severity gate.
    pub fn approval_severity(mut self, severity: Option<Severity>) -> Self {
        self.approval_severity = severity;
        self
    }

    /// Sets the row-count gate.
    pub fn approval_max_rows(mut self, rows: u64) -> Self {
        self.approval_max_rows = rows;
        self
    }

    /// Sets the lock timeout.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }
}

/// One `repair_operations` row: a plan and its audit trail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RepairRecord {
    /// The plan, with its current status and approver.
    pub plan: RepairPlan,
    /// The decision-table row that chose the strategy.
    pub rule: String,
    /// When it was planned.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was approved.
    #[serde(with = "time::serde::rfc3339::option")]
    pub approved_at: Option<OffsetDateTime>,
    /// When it last started.
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    /// When it completed or failed.
    #[serde(with = "time::serde::rfc3339::option")]
    pub completed_at: Option<OffsetDateTime>,
    /// When it was rolled back.
    #[serde(with = "time::serde::rfc3339::option")]
    pub rolled_back_at: Option<OffsetDateTime>,
    /// Who ran it.
    pub executed_by: Option<String>,
    /// Rows it changed.
    pub rows_affected: Option<u64>,
    /// The rows it changed, by primary key.
    pub affected_rows: Vec<RowRef>,
    /// The snapshot taken before it ran (critical repairs).
    pub pre_repair_snapshot: Option<SnapshotId>,
    /// What happened while it ran, one line per step.
    pub execution_log: Vec<String>,
    /// What happened while it was rolled back.
    pub rollback_log: Vec<String>,
    /// Why it last failed.
    pub error_message: Option<String>,
}

/// What [`RepairEngine::validate`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ValidationReport {
    /// The repair.
    pub repair: Option<RepairId>,
    /// Preconditions that do not hold; empty when the repair may run.
    pub problems: Vec<String>,
}

impl ValidationReport {
    /// Whether every precondition holds.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What a repair does, resolved when it is planned and stored with the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Op {
    Delete {
        cond: String,
    },
    Update {
        assignments: Vec<(String, String)>,
        cond: String,
    },
    Restore {
        snapshot: SnapshotId,
    },
    Reload {
        snapshot: SnapshotId,
    },
    Replay {
        idempotency_keys: Vec<String>,
        cond: String,
    },
    Reindex {
        index: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Action {
    table: TableRef,
    op: Op,
    /// Primary-key values of the rows concerned; `None` = every row matching `cond`.
    keys: Option<Vec<Vec<Option<String>>>>,
}

impl Action {
    fn predicate(&self, meta: &Meta) -> Result<String> {
        let cond = match &self.op {
            Op::Delete { cond } | Op::Update { cond, .. } | Op::Replay { cond, .. } => cond.clone(),
            _ => "true".into(),
        };
        match &self.keys {
            Some(keys) => Ok(format!("({cond}) AND {}", meta.keys_in("t", keys)?)),
            None => Ok(format!("({cond})")),
        }
    }
}

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

    /// Registers a host strategy, consulted before the built-in decision table.
    pub fn strategy(mut self, strategy: Arc<dyn CustomStrategy>) -> Self {
        self.strategies.push(strategy);
        self
    }

    /// Builds the engine. Fails without a pool or with duplicate strategy names.
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
        Ok(RepairEngine {
            inner: Arc::new(Inner {
                pool,
                schema: self.schema.unwrap_or_else(SchemaName::default_schema),
                snapshots: self.snapshots,
                journal: self.journal,
                events: self.events.unwrap_or_default(),
                config: self.config,
                strategies: self.strategies,
            }),
        })
    }
}

struct Inner {
    pool: Pool,
    schema: SchemaName,
    snapshots: Option<Arc<dyn SnapshotService>>,
    journal: Option<Arc<dyn JournalService>>,
    events: EventBus,
    config: RepairConfig,
    strategies: Vec<Arc<dyn CustomStrategy>>,
}

/// The automatic repair engine. Cheap to clone; implements [`RepairService`].
#[derive(Clone)]
pub struct RepairEngine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RepairEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepairEngine")
            .field("schema", &self.inner.schema)
            .field("config", &self.inner.config)
            .field("snapshots", &self.inner.snapshots.is_some())
            .field("journal", &self.inner.journal.is_some())
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

fn status_code(s: RepairStatus) -> &'static str {
    match s {
        RepairStatus::Pending => "pending",
        RepairStatus::AwaitingApproval => "awaiting_approval",
        RepairStatus::InProgress => "in_progress",
        RepairStatus::Completed => "completed",
        RepairStatus::Failed => "failed",
        RepairStatus::RolledBack => "rolled_back",
        _ => "unknown",
    }
}

fn parse_status(s: &str) -> Result<RepairStatus> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|e| Error::corrupt("repair_operations.status", format!("`{s}`: {e}")))
}

fn scratch_schema(id: RepairId) -> String {
    format!("sanare_repair_{}", id.as_uuid().simple())
}

fn advisory_key(id: RepairId) -> i64 {
    let b = id.as_uuid().as_u128();
    (b as i64) ^ ((b >> 64) as i64)
}

struct Draft {
    strategy: RepairStrategyKind,
    rule: String,
    action: Action,
    violations: Vec<Violation>,
    custom_approval: bool,
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

    fn t(&self, table: &str) -> String {
        self.inner.schema.table(table)
    }

    /// Gathers the facts about each violation and runs the decision table (host
    /// strategies first), without recording anything.
    pub async fn analyze(&self, violations: &[Violation]) -> Result<Vec<(Decision, TableFacts)>> {
        let conn = get_conn(&self.inner.pool).await?;
        let client: &tokio_postgres::Client = &conn;
        let mut metas: HashMap<TableRef, Option<Meta>> = HashMap::new();
        for v in violations {
            let mut tables = vec![v.table.clone()];
            if let ViolationKind::Referential { parent_table, .. } = &v.kind {
                tables.push(parent_table.clone());
            }
            for t in tables {
                if let std::collections::hash_map::Entry::Vacant(slot) = metas.entry(t.clone()) {
                    let meta = match Meta::load(client, &t).await {
                        Ok(m) => Some(m),
                        Err(Error::NotFound { .. }) => None,
                        Err(e) => return Err(e),
                    };
                    slot.insert(meta);
                }
            }
        }
        let snapshot = match &self.inner.snapshots {
            Some(s) => s.latest_good(None).await?.map(|i| i.id),
            None => None,
        };
        // Which rows (own rows and missing parents) the snapshot holds, in one fetch.
        let mut wanted: Vec<RowRef> = Vec::new();
        for v in violations {
            if let Some(r) = &v.row {
                wanted.push(r.clone());
            }
            if let Some(p) = parent_ref(v, &metas) {
                wanted.push(p);
            }
        }
        let mut present: HashSet<(TableRef, Vec<Option<String>>)> = HashSet::new();
        if let (Some(snap), Some(service)) = (snapshot, &self.inner.snapshots)
            && !wanted.is_empty()
        {
            for image in service.fetch_rows(snap, &wanted).await? {
                if let Some(Some(meta)) = metas.get(&image.table) {
                    let key = meta
                        .pk
                        .iter()
                        .map(|k| image.get(k).flatten().map(str::to_owned))
                        .collect();
                    present.insert((image.table.clone(), key));
                }
            }
        }
        let mut out = Vec::with_capacity(violations.len());
        for v in violations {
            let meta = metas.get(&v.table).and_then(Option::as_ref);
            let mut facts = TableFacts {
                snapshot,
                journal_entries: self.inner.journal.is_some() && !idempotency_keys(v).is_empty(),
                ..TableFacts::default()
            };
            if let Some(meta) = meta {
                facts.primary_key = meta.pk.clone();
                match &v.kind {
                    ViolationKind::Referential { columns, .. } => {
                        facts.fk_nullable = columns
                            .iter()
                            .all(|c| meta.col(c).is_ok_and(|c| !c.not_null));
                    }
                    ViolationKind::NullConstraint { column }
                    | ViolationKind::TypeMismatch { column, .. } => {
                        facts.column_has_default =
                            meta.col(column).is_ok_and(|c| c.default.is_some());
                    }
                    _ => {}
                }
            }
            if let Some(r) = &v.row {
                facts.row_in_snapshot = present.contains(&(
                    r.table.clone(),
                    r.key.iter().map(|c| c.value.clone()).collect(),
                ));
            }
            if let Some(p) = parent_ref(v, &metas) {
                facts.parent_in_snapshot = present.contains(&(
                    p.table.clone(),
                    p.key.iter().map(|c| c.value.clone()).collect(),
                ));
            }
            let decision = if meta.is_none() {
                Decision::Manual {
                    reason: format!("table {} does not exist", v.table),
                }
            } else if let Some(s) = self.inner.strategies.iter().find(|s| s.matches(v, &facts)) {
                Decision::Strategy {
                    strategy: RepairStrategyKind::Custom(s.name().to_owned()),
                    rule: "custom".into(),
                }
            } else {
                decide(v, &facts)
            };
            out.push((decision, facts));
        }
        Ok(out)
    }

    fn draft(
        &self,
        v: &Violation,
        decision: &Decision,
        facts: &TableFacts,
        metas: &HashMap<TableRef, Option<Meta>>,
    ) -> Result<Option<Draft>> {
        let meta = metas
            .get(&v.table)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::not_found(format!("table {}", v.table)))?;
        let Decision::Strategy { strategy, rule } = decision else {
            return Ok(None);
        };
        let row_key = v
            .row
            .as_ref()
            .map(|r| r.key.iter().map(|c| c.value.clone()).collect::<Vec<_>>());
        let keys = row_key.clone().map(|k| vec![k]);
        let table = target_table(v, strategy);
        let mut custom_approval = false;
        let (op, keys) = match (strategy, &v.kind) {
            (RepairStrategyKind::Custom(name), _) => {
                let s = self
                    .inner
                    .strategies
                    .iter()
                    .find(|s| s.name() == name)
                    .ok_or_else(|| Error::not_found(format!("repair strategy `{name}`")))?;
                custom_approval = s.requires_approval();
                match s.action(v)? {
                    RowAction::Delete { predicate } => (Op::Delete { cond: predicate }, None),
                    RowAction::Update {
                        assignments,
                        predicate,
                    } => (
                        Op::Update {
                            assignments,
                            cond: predicate,
                        },
                        None,
                    ),
                }
            }
            (RepairStrategyKind::RestoreFromSnapshot, ViolationKind::Referential { .. }) => {
                let snapshot = facts
                    .snapshot
                    .ok_or_else(|| Error::unavailable("no snapshot"))?;
                let parent = parent_ref(v, metas).ok_or_else(|| {
                    Error::invalid_input(
                        "referential violation without a usable details.missing_parent_key",
                    )
                })?;
                let key = parent.key.into_iter().map(|c| c.value).collect();
                (Op::Restore { snapshot }, Some(vec![key]))
            }
            (RepairStrategyKind::RestoreFromSnapshot, _) => {
                let snapshot = facts
                    .snapshot
                    .ok_or_else(|| Error::unavailable("no snapshot"))?;
                (Op::Restore { snapshot }, keys)
            }
            (RepairStrategyKind::ReplayTransaction, kind) => (
                Op::Replay {
                    idempotency_keys: idempotency_keys(v),
                    cond: match kind {
                        ViolationKind::Referential { .. } => orphan_cond(v)?,
                        _ => "false".into(),
                    },
                },
                keys,
            ),
            (
                RepairStrategyKind::RemoveOrphanedRecord,
                ViolationKind::Referential { columns, .. },
            ) => {
                let cond = orphan_cond(v)?;
                if facts.fk_nullable {
                    (
                        Op::Update {
                            assignments: columns
                                .iter()
                                .map(|c| (c.clone(), "NULL".to_owned()))
                                .collect(),
                            cond,
                        },
                        keys,
                    )
                } else {
                    (Op::Delete { cond }, keys)
                }
            }
            (RepairStrategyKind::UpdateInvalidData, ViolationKind::Consistency { .. }) => {
                let (column, expr) = recompute(v).ok_or_else(|| {
                    Error::invalid_input("consistency violation without details.recompute")
                })?;
                (
                    Op::Update {
                        cond: format!("t.{} IS DISTINCT FROM ({expr})", quote_ident(&column)),
                        assignments: vec![(column, expr)],
                    },
                    keys,
                )
            }
            (
                RepairStrategyKind::UpdateInvalidData,
                ViolationKind::NullConstraint { column }
                | ViolationKind::TypeMismatch { column, .. },
            ) => {
                let col = meta.col(column)?;
                let default = col.default.clone().unwrap_or_else(|| "NULL".into());
                let cond = if matches!(v.kind, ViolationKind::NullConstraint { .. }) {
                    format!("t.{} IS NULL", quote_ident(column))
                } else {
                    format!("t.{} IS DISTINCT FROM ({default})", quote_ident(column))
                };
                (
                    Op::Update {
                        assignments: vec![(column.clone(), "DEFAULT".into())],
                        cond,
                    },
                    keys,
                )
            }
            (
                RepairStrategyKind::FixConstraintViolation,
                ViolationKind::UniqueConstraint { columns, .. },
            ) => {
                meta.require_pk()?;
                let same = columns
                    .iter()
                    .map(|c| format!("o.{0} = t.{0}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                let cond = format!(
                    "EXISTS (SELECT 1 FROM {} o WHERE {same} AND ({}) < ({}))",
                    meta.quoted,
                    Meta::list("o", &meta.pk),
                    Meta::list("t", &meta.pk)
                );
                (Op::Delete { cond }, None)
            }
            (RepairStrategyKind::DeleteInvalidRecord, kind) => {
                let cond = match kind {
                    ViolationKind::NullConstraint { column } => {
                        format!("t.{} IS NULL", quote_ident(column))
                    }
                    _ => "true".into(),
                };
                (Op::Delete { cond }, keys)
            }
            (
                RepairStrategyKind::RebuildIndex,
                ViolationKind::Corruption {
                    index: Some(index), ..
                },
            ) => (
                Op::Reindex {
                    index: format!("{}.{}", quote_ident(&v.table.schema), quote_ident(index)),
                },
                None,
            ),
            (RepairStrategyKind::TruncateAndReload, _) => {
                let snapshot = facts
                    .snapshot
                    .ok_or_else(|| Error::unavailable("no snapshot"))?;
                (Op::Reload { snapshot }, None)
            }
            (other, _) => {
                return Err(Error::invalid_input(format!(
                    "strategy {} does not apply to a {} violation",
                    strategy_code(other),
                    v.kind.code()
                )));
            }
        };
        if keys.is_some() || matches!(op, Op::Restore { .. }) {
            meta.require_pk()?;
        }
        Ok(Some(Draft {
            strategy: strategy.clone(),
            rule: rule.clone(),
            action: Action { table, op, keys },
            violations: vec![v.clone()],
            custom_approval,
        }))
    }

    async fn estimate(&self, client: &impl GenericClient, action: &Action) -> Result<u64> {
        let n: i64 = match &action.op {
            Op::Reindex { .. } => 0,
            Op::Restore { .. } => action.keys.as_ref().map_or(0, Vec::len) as i64,
            Op::Reload { .. } => client
                .query_one(
                    &format!("SELECT count(*) FROM {}", action.table.quoted()),
                    &[],
                )
                .await
                .with_context(|| format!("counting the rows of {}", action.table))?
                .get(0),
            _ => {
                let meta = Meta::load(client, &action.table).await?;
                client
                    .query_one(
                        &format!(
                            "SELECT count(*) FROM {} t WHERE {}",
                            meta.quoted,
                            action.predicate(&meta)?
                        ),
                        &[],
                    )
                    .await
                    .with_context(|| {
                        format!("estimating the rows a repair of {} changes", action.table)
                    })?
                    .get(0)
            }
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Checks that a planned repair may run now: its table and snapshot or journal are
    /// there, it is approved if it must be, and it has not already been rolled back.
    pub async fn validate(&self, repair: RepairId) -> Result<ValidationReport> {
        let (record, action) = self.load(repair).await?;
        let mut problems = Vec::new();
        let plan = &record.plan;
        if plan.requires_approval && plan.approved_by.is_none() {
            problems.push("the repair needs an approval and has none".to_owned());
        }
        if plan.status == RepairStatus::RolledBack {
            problems.push("the repair was rolled back; plan it again".to_owned());
        }
        let conn = get_conn(&self.inner.pool).await?;
        match Meta::load(&**conn, &action.table).await {
            Ok(meta) => {
                if !matches!(action.op, Op::Reindex { .. } | Op::Replay { .. })
                    && meta.pk.is_empty()
                {
                    problems.push(format!("{} has no primary key", action.table));
                }
            }
            Err(e) => problems.push(format!("table {}: {e}", action.table)),
        }
        match &action.op {
            Op::Restore { .. } | Op::Reload { .. } if self.inner.snapshots.is_none() => {
                problems.push("no snapshot service is attached".into());
            }
            Op::Replay { .. } if self.inner.journal.is_none() => {
                problems.push("no journal is attached".into());
            }
            Op::Replay {
                idempotency_keys, ..
            } if idempotency_keys.is_empty() => {
                problems.push("no journal entries to replay".into());
            }
            _ => {}
        }
        Ok(ValidationReport {
            repair: Some(repair),
            problems,
        })
    }

    /// One repair's record.
    pub async fn get(&self, repair: RepairId) -> Result<RepairRecord> {
        Ok(self.load(repair).await?.0)
    }

    /// Repairs planned in `from..to`, oldest first.
    pub async fn history(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<RepairRecord>> {
        let conn = get_conn(&self.inner.pool).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM {} WHERE created_at >= $1 AND created_at < $2 ORDER BY created_at, id",
                    self.t("repair_operations")
                ),
                &[&from, &to],
            )
            .await
            .context("reading the repair history")?;
        rows.iter()
            .map(|r| record_from_row(r).map(|(rec, _)| rec))
            .collect()
    }

    async fn load(&self, repair: RepairId) -> Result<(RepairRecord, Action)> {
        let conn = get_conn(&self.inner.pool).await?;
        let row = conn
            .query_opt(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM {} WHERE id = $1",
                    self.t("repair_operations")
                ),
                &[&repair.as_uuid()],
            )
            .await
            .with_context(|| format!("reading repair {repair}"))?
            .ok_or_else(|| Error::not_found(format!("repair {repair}")))?;
        record_from_row(&row)
    }

    async fn log(&self, repair: RepairId, column: &str, line: String) -> Result<()> {
        let conn = get_conn(&self.inner.pool).await?;
        conn.execute(
            &format!(
                "UPDATE {} SET {column} = {column} || jsonb_build_array($2::text) WHERE id = $1",
                self.t("repair_operations")
            ),
            &[&repair.as_uuid(), &line],
        )
        .await
        .with_context(|| format!("appending to the log of repair {repair}"))?;
        Ok(())
    }

    async fn set_status(
        &self,
        repair: RepairId,
        status: RepairStatus,
        extra: &str,
        error: Option<&str>,
    ) -> Result<()> {
        // A connection killed during the repair may come back from the pool once
        // before the pool notices: retry once on a retryable error.
        match self.set_status_once(repair, status, extra, error).await {
            Err(e) if e.is_retryable() => self.set_status_once(repair, status, extra, error).await,
            other => other,
        }
    }

    async fn set_status_once(
        &self,
        repair: RepairId,
        status: RepairStatus,
        extra: &str,
        error: Option<&str>,
    ) -> Result<()> {
        let conn = get_conn(&self.inner.pool).await?;
        conn.execute(
            &format!(
                "UPDATE {} SET status = $2, error_message = coalesce($3, error_message) {extra} WHERE id = $1",
                self.t("repair_operations")
            ),
            &[&repair.as_uuid(), &status_code(status), &error],
        )
        .await
        .with_context(|| format!("recording status {} of repair {repair}", status_code(status)))?;
        Ok(())
    }

    fn finish(&self, plan: &RepairPlan, outcome: &RepairOutcome, what: &'static str) {
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

    async fn run(
        &self,
        record: &RepairRecord,
        action: &Action,
        dry_run: bool,
        control: &Control,
    ) -> Result<(Vec<RowRef>, Vec<String>)> {
        let id = record.plan.id;
        let mut log = Vec::new();
        match &action.op {
            Op::Reindex { index } => {
                control.progress().phase("reindex", "indexes", Some(1));
                if dry_run {
                    log.push(format!(
                        "dry run: would run REINDEX INDEX CONCURRENTLY {index}"
                    ));
                    return Ok((Vec::new(), log));
                }
                let conn = get_conn(&self.inner.pool).await?;
                conn.batch_execute(&format!("REINDEX INDEX CONCURRENTLY {index}"))
                    .await
                    .with_context(|| format!("rebuilding index {index}"))?;
                let valid: bool = conn
                    .query_one(
                        "SELECT indisvalid FROM pg_index WHERE indexrelid = $1::text::regclass",
                        &[index],
                    )
                    .await
                    .with_context(|| format!("checking index {index}"))?
                    .get(0);
                if !valid {
                    return Err(Error::conflict(format!(
                        "index {index} is still invalid after REINDEX"
                    )));
                }
                control.progress().advance(1);
                log.push(format!("rebuilt index {index}"));
                Ok((Vec::new(), log))
            }
            Op::Replay {
                idempotency_keys, ..
            } => {
                let journal = self
                    .inner
                    .journal
                    .as_ref()
                    .ok_or_else(|| Error::unavailable("no journal is attached"))?;
                let summary = journal
                    .replay(
                        ReplayRequest::new(ReplayRange::All)
                            .idempotency_keys(idempotency_keys.clone())
                            .dry_run(dry_run),
                        control,
                    )
                    .await?;
                log.push(format!(
                    "journal replay: {} applied, {} already applied, {} failed",
                    summary.applied,
                    summary.already_applied,
                    summary.failures.len()
                ));
                if let Some(f) = summary.failures.first() {
                    return Err(Error::conflict(format!(
                        "journal replay failed at {}: {}",
                        f.position, f.reason
                    )));
                }
                if !dry_run {
                    let conn = get_conn(&self.inner.pool).await?;
                    let meta = Meta::load(&**conn, &action.table).await?;
                    let left = count(&**conn, &meta, &action.predicate(&meta)?).await?;
                    if left > 0 {
                        return Err(Error::conflict(format!(
                            "{left} row(s) still violate after the journal replay"
                        )));
                    }
                }
                Ok((Vec::new(), log))
            }
            _ => {
                self.run_in_transaction(id, action, dry_run, control, log)
                    .await
            }
        }
    }

    async fn run_in_transaction(
        &self,
        id: RepairId,
        action: &Action,
        dry_run: bool,
        control: &Control,
        mut log: Vec<String>,
    ) -> Result<(Vec<RowRef>, Vec<String>)> {
        let mut conn = get_conn(&self.inner.pool).await?;
        let tx = conn
            .transaction()
            .await
            .context("starting the repair transaction")?;
        let c = &self.inner.config;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
            c.lock_timeout.as_millis(),
            c.statement_timeout.as_millis()
        ))
        .await
        .context("setting the repair transaction's timeouts")?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&advisory_key(id)])
            .await
            .context("taking the repair's advisory lock")?
            .get(0);
        if !locked {
            return Err(Error::conflict(format!(
                "repair {id} is being run or rolled back by another session"
            )));
        }
        if !dry_run {
            let status: String = tx
                .query_one(
                    &format!(
                        "SELECT status FROM {} WHERE id = $1",
                        self.t("repair_operations")
                    ),
                    &[&id.as_uuid()],
                )
                .await
                .context("re-reading the repair status")?
                .get(0);
            if status == "completed" || status == "rolled_back" {
                return Err(Error::conflict(format!("repair {id} is already {status}")));
            }
        }
        let meta = Meta::load(&*tx, &action.table).await?;
        meta.require_pk()?;
        let undo = self.t("repair_undo");
        let uid = id.as_uuid();
        let ts = &action.table.schema;
        let tn = &action.table.name;
        let q = &meta.quoted;
        control.progress().phase("repair", "rows", None);
        control.checkpoint()?;
        let mut changed: u64 = 0;
        match &action.op {
            Op::Delete { .. } => {
                let pred = action.predicate(&meta)?;
                self.check_cascade(&tx, &meta, &pred).await?;
                changed += tx
                    .execute(
                        &format!(
                            "WITH d AS (DELETE FROM {q} t WHERE {pred} RETURNING t.*)
                             INSERT INTO {undo} (repair_id, table_schema, table_name, action, key, before_row)
                             SELECT $1, $2, $3, 'deleted', {}, d::text FROM d",
                            meta.key_array("d")
                        ),
                        &[&uid, ts, tn],
                    )
                    .await
                    .with_context(|| format!("deleting rows of {}", action.table))?;
                log.push(format!("deleted {changed} row(s) of {}", action.table));
            }
            Op::Update { assignments, .. } => {
                let pred = action.predicate(&meta)?;
                let n = self.capture_updates(&tx, &meta, &pred, id).await?;
                let set = assignments
                    .iter()
                    .map(|(c, e)| format!("{} = {e}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let updated = tx
                    .execute(
                        &format!(
                            "WITH u2 AS (UPDATE {q} t SET {set} WHERE {pred} RETURNING t.*)
                             UPDATE {undo} u SET after_row = u2::text FROM u2
                              WHERE u.repair_id = $1 AND u.table_schema = $2 AND u.table_name = $3
                                AND u.action = 'updated' AND u.key = {}",
                            meta.key_array("u2")
                        ),
                        &[&uid, ts, tn],
                    )
                    .await
                    .with_context(|| format!("updating rows of {}", action.table))?;
                if updated != n {
                    return Err(Error::conflict(format!(
                        "{n} row(s) of {} were captured but {updated} updated",
                        action.table
                    )));
                }
                changed += n;
                log.push(format!("updated {n} row(s) of {}", action.table));
            }
            Op::Restore { snapshot } | Op::Reload { snapshot } => {
                let snapshots = self
                    .inner
                    .snapshots
                    .as_ref()
                    .ok_or_else(|| Error::unavailable("no snapshot service is attached"))?;
                tx.batch_execute(&format!(
                    "CREATE TEMP TABLE _sanare_src (LIKE {q}) ON COMMIT DROP"
                ))
                .await
                .context("creating the restore staging table")?;
                let cols = meta
                    .columns
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>();
                let all = Meta::list("s", &cols);
                let reload = matches!(action.op, Op::Reload { .. });
                if reload {
                    let scratch = scratch_schema(id);
                    snapshots
                        .restore(
                            sanare_core::RestoreRequest::new(*snapshot)
                                .tables([action.table.clone()])
                                .target(sanare_core::RestoreTarget::Scratch {
                                    schema: scratch.clone(),
                                }),
                            control,
                        )
                        .await?;
                    let src = TableRef::new(scratch.clone(), action.table.name.clone());
                    let copy = tx
                        .execute(
                            &format!(
                                "INSERT INTO _sanare_src SELECT {all} FROM {} s",
                                src.quoted()
                            ),
                            &[],
                        )
                        .await
                        .with_context(|| format!("staging snapshot rows of {}", action.table));
                    copy?;
                } else {
                    let keys = action.keys.clone().unwrap_or_default();
                    let refs = keys
                        .iter()
                        .map(|k| {
                            let key = meta
                                .pk
                                .iter()
                                .zip(k)
                                .map(|(c, v)| {
                                    let ty = meta
                                        .col(c)
                                        .map(|c| c.type_name.clone())
                                        .unwrap_or_default();
                                    sanare_core::ColumnValue::new(c.clone(), ty, v.clone())
                                })
                                .collect();
                            RowRef::new(action.table.clone(), key)
                        })
                        .collect::<Vec<_>>();
                    let images = snapshots.fetch_rows(*snapshot, &refs).await?;
                    if images.len() != refs.len() {
                        return Err(Error::not_found(format!(
                            "{} of {} row(s) of {} in snapshot {snapshot}",
                            refs.len() - images.len(),
                            refs.len(),
                            action.table
                        )));
                    }
                    let literals = images
                        .iter()
                        .map(|i| meta.record_literal(i))
                        .collect::<Result<Vec<_>>>()?;
                    tx.execute(
                        &format!(
                            "INSERT INTO _sanare_src SELECT (x::{q}).* FROM unnest($1::text[]) x"
                        ),
                        &[&literals],
                    )
                    .await
                    .with_context(|| format!("staging snapshot rows of {}", action.table))?;
                }
                control.checkpoint()?;
                if reload {
                    let pred = format!(
                        "NOT EXISTS (SELECT 1 FROM _sanare_src s WHERE {})",
                        meta.pk_eq("s", "t")
                    );
                    self.check_cascade(&tx, &meta, &pred).await?;
                    let n = tx
                        .execute(
                            &format!(
                                "WITH d AS (DELETE FROM {q} t WHERE {pred} RETURNING t.*)
                                 INSERT INTO {undo} (repair_id, table_schema, table_name, action, key, before_row)
                                 SELECT $1, $2, $3, 'deleted', {}, d::text FROM d",
                                meta.key_array("d")
                            ),
                            &[&uid, ts, tn],
                        )
                        .await
                        .with_context(|| format!("deleting rows of {} absent from the snapshot", action.table))?;
                    changed += n;
                    log.push(format!(
                        "deleted {n} row(s) absent from snapshot {snapshot}"
                    ));
                }
                // Rows that differ: before-images, then update.
                let differ = format!(
                    "EXISTS (SELECT 1 FROM _sanare_src s WHERE {} AND s::text <> t::text)",
                    meta.pk_eq("s", "t")
                );
                let n = self.capture_updates(&tx, &meta, &differ, id).await?;
                let upd = meta.update_cols();
                let set = upd
                    .iter()
                    .map(|c| format!("{0} = s.{0}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(", ");
                if n > 0 {
                    tx.execute(
                        &format!(
                            "WITH u2 AS (UPDATE {q} t SET {set} FROM _sanare_src s WHERE {} AND s::text <> t::text RETURNING t.*)
                             UPDATE {undo} u SET after_row = u2::text FROM u2
                              WHERE u.repair_id = $1 AND u.table_schema = $2 AND u.table_name = $3
                                AND u.action = 'updated' AND u.key = {}",
                            meta.pk_eq("s", "t"),
                            meta.key_array("u2")
                        ),
                        &[&uid, ts, tn],
                    )
                    .await
                    .with_context(|| format!("restoring changed rows of {}", action.table))?;
                }
                changed += n;
                log.push(format!(
                    "restored {n} changed row(s) of {} from snapshot {snapshot}",
                    action.table
                ));
                let ins = meta.insert_cols();
                let n = tx
                    .execute(
                        &format!(
                            "WITH i AS (INSERT INTO {q} AS t ({}) OVERRIDING SYSTEM VALUE
                                         SELECT {} FROM _sanare_src s
                                          WHERE NOT EXISTS (SELECT 1 FROM {q} t WHERE {}) RETURNING t.*)
                             INSERT INTO {undo} (repair_id, table_schema, table_name, action, key, after_row)
                             SELECT $1, $2, $3, 'inserted', {}, i::text FROM i",
                            ins.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", "),
                            Meta::list("s", &ins),
                            meta.pk_eq("s", "t"),
                            meta.key_array("i")
                        ),
                        &[&uid, ts, tn],
                    )
                    .await
                    .with_context(|| format!("re-inserting missing rows of {}", action.table))?;
                changed += n;
                log.push(format!(
                    "re-inserted {n} missing row(s) of {} from snapshot {snapshot}",
                    action.table
                ));
            }
            Op::Reindex { .. } | Op::Replay { .. } => {
                return Err(Error::invalid_input("not a transactional repair"));
            }
        }
        control.progress().set_done(changed);
        control.checkpoint()?;
        // Re-validation, inside the transaction, before commit.
        let left = match &action.op {
            Op::Restore { .. } | Op::Reload { .. } => {
                let n: i64 = tx
                    .query_one(
                        &format!(
                            "SELECT count(*) FROM _sanare_src s WHERE NOT EXISTS (SELECT 1 FROM {q} t WHERE {} AND t::text = s::text)",
                            meta.pk_eq("s", "t")
                        ),
                        &[],
                    )
                    .await
                    .context("re-validating the restored rows")?
                    .get(0);
                n
            }
            _ => count(&*tx, &meta, &action.predicate(&meta)?).await?,
        };
        if left > 0 {
            return Err(Error::conflict(format!(
                "re-validation failed: {left} row(s) of {} still violate after the repair; rolled back",
                action.table
            )));
        }
        log.push("re-validation clean".into());
        let keys: Vec<Vec<String>> = tx
            .query(
                &format!("SELECT key FROM {undo} WHERE repair_id = $1 ORDER BY seq"),
                &[&uid],
            )
            .await
            .context("listing the repaired rows")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let rows = keys
            .into_iter()
            .map(|k| {
                let key = meta
                    .pk
                    .iter()
                    .zip(k)
                    .map(|(c, v)| {
                        let ty = meta.col(c).map(|c| c.type_name.clone()).unwrap_or_default();
                        sanare_core::ColumnValue::new(c.clone(), ty, Some(v))
                    })
                    .collect();
                RowRef::new(action.table.clone(), key)
            })
            .collect::<Vec<_>>();
        if dry_run {
            tx.rollback().await.context("rolling back the dry run")?;
            return Ok((rows, log));
        }
        let rows_json = serde_json::to_value(&rows)
            .map_err(|e| Error::other("encoding the repaired rows", e))?;
        tx.execute(
            &format!(
                "UPDATE {} SET status = 'completed', completed_at = now(), rows_affected = $2,
                        affected_rows = $3, error_message = NULL,
                        execution_log = execution_log || $4::jsonb WHERE id = $1",
                self.t("repair_operations")
            ),
            &[
                &uid,
                &(rows.len() as i64),
                &rows_json,
                &serde_json::json!(log),
            ],
        )
        .await
        .context("recording the completed repair")?;
        tx.commit().await.context("committing the repair")?;
        Ok((rows, log))
    }

    /// Locks the rows matching `pred` and saves their before-images as `updated`.
    async fn capture_updates(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        meta: &Meta,
        pred: &str,
        id: RepairId,
    ) -> Result<u64> {
        tx.execute(
            &format!(
                "INSERT INTO {} (repair_id, table_schema, table_name, action, key, before_row)
                 SELECT $1, $2, $3, 'updated', k, r FROM (
                   SELECT {} AS k, t::text AS r FROM {} t WHERE {pred} ORDER BY {} FOR UPDATE OF t) x",
                self.t("repair_undo"),
                meta.key_array("t"),
                meta.quoted,
                Meta::list("t", &meta.pk)
            ),
            &[&id.as_uuid(), &meta.table.schema, &meta.table.name],
        )
        .await
        .with_context(|| format!("saving before-images of {}", meta.table))
    }

    /// Refuses a delete that a cascading foreign key would extend to rows the undo
    /// log does not capture.
    async fn check_cascade(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        meta: &Meta,
        pred: &str,
    ) -> Result<()> {
        let fks = tx
            .query(
                "SELECT con.conname::text, cn.nspname::text, cc.relname::text,
                        ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
                                JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o),
                        ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, o)
                                JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.o)
                   FROM pg_constraint con
                   JOIN pg_class cc ON cc.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
                  WHERE con.contype = 'f' AND con.confrelid = $1 AND con.confdeltype NOT IN ('a', 'r')",
                &[&meta.oid],
            )
            .await
            .with_context(|| format!("reading cascading foreign keys to {}", meta.table))?;
        for fk in fks {
            let child = TableRef::new(fk.get::<_, String>(1), fk.get::<_, String>(2));
            let cols: Vec<String> = fk.get(3);
            let pcols: Vec<String> = fk.get(4);
            let n: i64 = tx
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {} c WHERE ({}) IN (SELECT {} FROM {} t WHERE {pred})",
                        child.quoted(),
                        Meta::list("c", &cols),
                        Meta::list("t", &pcols),
                        meta.quoted
                    ),
                    &[],
                )
                .await
                .with_context(|| format!("counting rows of {child} a delete would cascade to"))?
                .get(0);
            if n > 0 {
                return Err(Error::conflict(format!(
                    "deleting these rows of {} would cascade to {n} row(s) of {child} through {} \
                     (not captured by the undo log): repair {child} first",
                    meta.table,
                    fk.get::<_, String>(0)
                )));
            }
        }
        Ok(())
    }
}

/// An error with its sources, for the audit trail.
fn error_chain(e: &Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

async fn count(client: &impl GenericClient, meta: &Meta, pred: &str) -> Result<i64> {
    Ok(client
        .query_one(
            &format!("SELECT count(*) FROM {} t WHERE {pred}", meta.quoted),
            &[],
        )
        .await
        .with_context(|| format!("re-validating {}", meta.table))?
        .get(0))
}

/// The orphan condition of a referential violation over alias `t`.
fn orphan_cond(v: &Violation) -> Result<String> {
    let ViolationKind::Referential {
        columns,
        parent_table,
        parent_columns,
        ..
    } = &v.kind
    else {
        return Err(Error::invalid_input("not a referential violation"));
    };
    if columns.is_empty() || columns.len() != parent_columns.len() {
        return Err(Error::invalid_input(format!(
            "referential violation on {} names {} column(s) and {} parent column(s)",
            v.table,
            columns.len(),
            parent_columns.len()
        )));
    }
    let not_null = columns
        .iter()
        .map(|c| format!("t.{} IS NOT NULL", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let join = columns
        .iter()
        .zip(parent_columns)
        .map(|(c, p)| format!("p.{} = t.{}", quote_ident(p), quote_ident(c)))
        .collect::<Vec<_>>()
        .join(" AND ");
    Ok(format!(
        "{not_null} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {join})",
        parent_table.quoted()
    ))
}

/// The missing parent of a referential violation as a row of the parent table, when
/// `details.missing_parent_key` names every primary-key column of the parent.
fn parent_ref(v: &Violation, metas: &HashMap<TableRef, Option<Meta>>) -> Option<RowRef> {
    let ViolationKind::Referential { parent_table, .. } = &v.kind else {
        return None;
    };
    let parent = v.details.get("missing_parent_key")?.as_object()?;
    let meta = metas.get(parent_table)?.as_ref()?;
    if meta.pk.is_empty() {
        return None;
    }
    let key = meta
        .pk
        .iter()
        .map(|k| {
            let value = parent.get(k)?;
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => return None,
                other => other.to_string(),
            };
            let ty = meta.col(k).ok()?.type_name.clone();
            Some(sanare_core::ColumnValue::new(k.clone(), ty, Some(text)))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(RowRef::new(parent_table.clone(), key))
}

const RECORD_COLUMNS: &str =
    "plan, rule, action, status, approved_by, created_at, approved_at, started_at, completed_at,
    rolled_back_at, executed_by, rows_affected, affected_rows, pre_repair_snapshot, execution_log,
    rollback_log, error_message";

fn record_from_row(r: &tokio_postgres::Row) -> Result<(RepairRecord, Action)> {
    let corrupt = |what: &'static str, e: serde_json::Error| Error::corrupt(what, e.to_string());
    let mut plan: RepairPlan =
        serde_json::from_value(r.get("plan")).map_err(|e| corrupt("repair_operations.plan", e))?;
    let action: Action = serde_json::from_value(r.get("action"))
        .map_err(|e| corrupt("repair_operations.action", e))?;
    plan.status = parse_status(r.get("status"))?;
    plan.approved_by = r.get("approved_by");
    let strings = |v: serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let affected: Option<serde_json::Value> = r.get("affected_rows");
    Ok((
        RepairRecord {
            plan,
            rule: r.get("rule"),
            created_at: r.get("created_at"),
            approved_at: r.get("approved_at"),
            started_at: r.get("started_at"),
            completed_at: r.get("completed_at"),
            rolled_back_at: r.get("rolled_back_at"),
            executed_by: r.get("executed_by"),
            rows_affected: r
                .get::<_, Option<i64>>("rows_affected")
                .map(|n| u64::try_from(n).unwrap_or(0)),
            affected_rows: affected
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| corrupt("repair_operations.affected_rows", e))?
                .unwrap_or_default(),
            pre_repair_snapshot: r
                .get::<_, Option<uuid::Uuid>>("pre_repair_snapshot")
                .map(SnapshotId::from_uuid),
            execution_log: strings(r.get("execution_log")),
            rollback_log: strings(r.get("rollback_log")),
            error_message: r.get("error_message"),
        },
        action,
    ))
}

fn describe(
    strategy: &RepairStrategyKind,
    action: &Action,
    rule: &str,
) -> (Vec<String>, Vec<String>, String, String) {
    let t = &action.table;
    let scope = match &action.keys {
        Some(k) => format!("{} row(s) of {t}", k.len()),
        None => format!("every matching row of {t}"),
    };
    let undo = "re-apply the before-images saved in the undo log (repair_undo), in one transaction"
        .to_owned();
    let (pre, post, rollback, what) = match &action.op {
        Op::Delete { .. } => (
            vec![format!("{t} has a primary key"), "no cascading foreign key reaches the deleted rows".into()],
            vec!["no row matches the violation predicate".into()],
            undo,
            format!("delete {scope} that match the violation"),
        ),
        Op::Update { assignments, .. } => (
            vec![format!("{t} has a primary key")],
            vec!["no row matches the violation predicate".into()],
            undo,
            format!(
                "set {} on {scope}",
                assignments.iter().map(|(c, e)| format!("{c} = {e}")).collect::<Vec<_>>().join(", ")
            ),
        ),
        Op::Restore { snapshot } => (
            vec![format!("{t} has a primary key"), format!("snapshot {snapshot} holds every row")],
            vec!["each row equals its snapshot image".into()],
            undo,
            format!("restore {scope} from snapshot {snapshot} by primary key"),
        ),
        Op::Reload { snapshot } => (
            vec![format!("{t} has a primary key"), format!("snapshot {snapshot} holds {t}")],
            vec![format!("{t} equals its snapshot image row for row")],
            undo,
            format!("reload {t} from snapshot {snapshot} (delete extra, restore changed, re-insert missing rows)"),
        ),
        Op::Replay { idempotency_keys, .. } => (
            vec!["a journal is attached".into(), "the entries are in the journal".into()],
            vec!["no row matches the violation predicate".into()],
            "none from the undo log: journal replay is exactly-once and re-applies the journaled truth; restore a snapshot to undo".into(),
            format!("replay {} journal entr(ies) by idempotency key", idempotency_keys.len()),
        ),
        Op::Reindex { index } => (
            vec![format!("index {index} exists")],
            vec![format!("index {index} is valid")],
            "none needed: an index is derived data".into(),
            format!("REINDEX INDEX CONCURRENTLY {index}"),
        ),
    };
    (
        pre,
        post,
        rollback,
        format!("{} ({rule}): {what}", strategy_code(strategy)),
    )
}

#[async_trait]
impl RepairService for RepairEngine {
    async fn plan(&self, violations: &[Violation]) -> Result<Vec<RepairPlan>> {
        let span = tracing::info_span!("repair.plan", violations = violations.len());
        async move {
            let analysis = self.analyze(violations).await?;
            let conn = get_conn(&self.inner.pool).await?;
            let mut metas: HashMap<TableRef, Option<Meta>> = HashMap::new();
            // Group drafts with the same table, strategy and operation.
            let mut groups: BTreeMap<String, Draft> = BTreeMap::new();
            for (v, (decision, facts)) in violations.iter().zip(&analysis) {
                if let Decision::Manual { reason } = decision {
                    tracing::info!(violation = %v.id, %reason, "no automatic repair");
                    continue;
                }
                let mut tables = vec![v.table.clone()];
                if let ViolationKind::Referential { parent_table, .. } = &v.kind {
                    tables.push(parent_table.clone());
                }
                for t in tables {
                    if let std::collections::hash_map::Entry::Vacant(slot) = metas.entry(t.clone()) {
                        let meta = match Meta::load(&**conn, &t).await {
                            Ok(m) => Some(m),
                            Err(Error::NotFound { .. }) => None,
                            Err(e) => return Err(e),
                        };
                        slot.insert(meta);
                    }
                }
                let Some(draft) = (match self.draft(v, decision, facts, &metas) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(violation = %v.id, error = %e, "violation cannot be repaired automatically");
                        continue;
                    }
                }) else {
                    continue;
                };
                let group = serde_json::json!([strategy_code(&draft.strategy), draft.rule, draft.action.table, draft.action.op, draft.action.keys.is_some()]).to_string();
                match groups.get_mut(&group) {
                    Some(g) => {
                        if let (Some(a), Some(b)) = (&mut g.action.keys, draft.action.keys) {
                            for k in b {
                                if !a.contains(&k) {
                                    a.push(k);
                                }
                            }
                        }
                        g.violations.extend(draft.violations);
                    }
                    None => {
                        groups.insert(group, draft);
                    }
                }
            }
            let mut plans = Vec::with_capacity(groups.len());
            for draft in groups.into_values() {
                let estimated = self.estimate(&**conn, &draft.action).await?;
                let severity = draft.violations.iter().map(|v| v.severity).max().unwrap_or(Severity::Low);
                let mut plan = RepairPlan::new(
                    RepairId::new(),
                    draft.violations.iter().map(|v| v.id).collect(),
                    draft.action.table.clone(),
                    draft.strategy.clone(),
                    severity,
                );
                let c = &self.inner.config;
                plan.estimated_rows = estimated;
                plan.requires_approval = c.approval_severity.is_some_and(|s| severity >= s)
                    || estimated > c.approval_max_rows
                    || draft.custom_approval
                    || matches!(draft.action.op, Op::Replay { .. } | Op::Reload { .. });
                plan.status = if plan.requires_approval { RepairStatus::AwaitingApproval } else { RepairStatus::Pending };
                let (pre, post, rollback, description) = describe(&draft.strategy, &draft.action, &draft.rule);
                plan.preconditions = pre;
                plan.postconditions = post;
                plan.rollback_plan = rollback;
                plan.description = description;
                let ids: Vec<uuid::Uuid> = plan.violations.iter().map(ViolationId::as_uuid).collect();
                let kind = draft.violations.first().map_or("", |v| v.kind.code());
                conn.execute(
                    &format!(
                        "INSERT INTO {} (id, violation_ids, violation_type, table_schema, table_name, strategy,
                                          rule, severity, status, requires_approval, estimated_rows, plan, action, violations)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                        self.t("repair_operations")
                    ),
                    &[
                        &plan.id.as_uuid(),
                        &ids,
                        &kind,
                        &plan.table.schema,
                        &plan.table.name,
                        &strategy_code(&plan.strategy),
                        &draft.rule,
                        &plan.severity.as_str(),
                        &status_code(plan.status),
                        &plan.requires_approval,
                        &(i64::try_from(estimated).unwrap_or(i64::MAX)),
                        &serde_json::to_value(&plan).map_err(|e| Error::other("encoding a repair plan", e))?,
                        &serde_json::to_value(&draft.action).map_err(|e| Error::other("encoding a repair action", e))?,
                        &serde_json::to_value(&draft.violations).map_err(|e| Error::other("encoding violations", e))?,
                    ],
                )
                .await
                .context("recording a repair plan")?;
                metrics::counter!("sanare_repair_planned_total", "strategy" => strategy_code(&plan.strategy)).increment(1);
                plans.push(plan);
            }
            Ok(plans)
        }
        .instrument(span)
        .await
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
        let (record, _) = self.load(repair).await?;
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
        let span = tracing::info_span!("repair.execute", %repair, dry_run = options.dry_run);
        async move {
            let started = Instant::now();
            let (record, action) = self.load(repair).await?;
            let plan = &record.plan;
            if !options.dry_run {
                match plan.status {
                    RepairStatus::Completed => {
                        let mut out = RepairOutcome::new(repair, RepairStatus::Completed, false);
                        out.rows_affected = record.rows_affected.unwrap_or(0);
                        out.rows = record.affected_rows.clone();
                        out.message = Some("already completed: nothing to do".into());
                        return Ok(out);
                    }
                    RepairStatus::RolledBack => {
                        return Err(Error::conflict(format!("repair {repair} was rolled back; plan it again")));
                    }
                    _ => {}
                }
                if plan.requires_approval && plan.approved_by.is_none() {
                    metrics::counter!("sanare_repair_refused_total", "reason" => "approval").increment(1);
                    return Err(Error::ApprovalRequired(
                        format!(
                            "repair {repair} ({}, severity {}, about {} row(s)) waits for approve(repair, approver)",
                            strategy_code(&plan.strategy),
                            plan.severity.as_str(),
                            plan.estimated_rows
                        )
                        .into(),
                    ));
                }
            }
            let report = self.validate(repair).await?;
            let problems: Vec<_> = report
                .problems
                .into_iter()
                .filter(|p| !(options.dry_run && p.contains("approval")))
                .collect();
            if !problems.is_empty() {
                return Err(Error::invalid_input(format!("repair {repair} cannot run: {}", problems.join("; "))));
            }
            if !options.dry_run {
                self.set_status(repair, RepairStatus::InProgress, ", started_at = now()", None)
                    .await?;
                let conn = get_conn(&self.inner.pool).await?;
                conn.execute(
                    &format!("UPDATE {} SET executed_by = $2 WHERE id = $1", self.t("repair_operations")),
                    &[&repair.as_uuid(), &options.executed_by],
                )
                .await
                .context("recording who runs the repair")?;
                if plan.severity == Severity::Critical
                    && self.inner.config.snapshot_before_critical
                    && let Some(snapshots) = &self.inner.snapshots
                {
                    {
                        let info = snapshots
                            .create(
                                SnapshotRequest::new().tables([action.table.clone()]).label(format!("before repair {repair}")),
                                control,
                            )
                            .await?;
                        conn.execute(
                            &format!("UPDATE {} SET pre_repair_snapshot = $2 WHERE id = $1", self.t("repair_operations")),
                            &[&repair.as_uuid(), &info.id.as_uuid()],
                        )
                        .await
                        .context("recording the pre-repair snapshot")?;
                        self.log(repair, "execution_log", format!("snapshot {} taken before the repair", info.id)).await?;
                    }
                }
            }
            let result = self.run(&record, &action, options.dry_run, control).await;
            let mut out = RepairOutcome::new(repair, RepairStatus::Completed, options.dry_run);
            out.duration = started.elapsed();
            match result {
                Ok((rows, log)) => {
                    out.rows_affected = rows.len() as u64;
                    out.rows = rows;
                    if options.dry_run {
                        out.status = plan.status;
                        out.message = Some(format!("dry run, rolled back: {}", log.join("; ")));
                    } else {
                        if matches!(action.op, Op::Reindex { .. } | Op::Replay { .. }) {
                            let conn = get_conn(&self.inner.pool).await?;
                            conn.execute(
                                &format!(
                                    "UPDATE {} SET status = 'completed', completed_at = now(), rows_affected = 0,
                                            affected_rows = '[]', execution_log = execution_log || $2::jsonb WHERE id = $1",
                                    self.t("repair_operations")
                                ),
                                &[&repair.as_uuid(), &serde_json::json!(log)],
                            )
                            .await
                            .context("recording the completed repair")?;
                        }
                        out.message = Some(log.join("; "));
                    }
                    control.progress().finish();
                    self.finish(plan, &out, "execute");
                    Ok(out)
                }
                Err(e) => {
                    let message = error_chain(&e);
                    tracing::warn!(%repair, error = %message, "repair failed; its transaction rolled back");
                    if !options.dry_run {
                        self.set_status(repair, RepairStatus::Failed, ", completed_at = now()", Some(&message)).await?;
                        self.log(repair, "execution_log", format!("failed: {message}")).await?;
                    }
                    out.status = RepairStatus::Failed;
                    out.message = Some(message);
                    self.finish(plan, &out, "execute");
                    if e.is_cancelled() { Err(e) } else { Ok(out) }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn rollback(&self, repair: RepairId, control: &Control) -> Result<RepairOutcome> {
        let span = tracing::info_span!("repair.rollback", %repair);
        async move {
            let started = Instant::now();
            let (record, action) = self.load(repair).await?;
            let mut out = RepairOutcome::new(repair, RepairStatus::RolledBack, false);
            match record.plan.status {
                RepairStatus::RolledBack => {
                    out.rows_affected = record.rows_affected.unwrap_or(0);
                    out.rows = record.affected_rows.clone();
                    out.message = Some("already rolled back: nothing to do".into());
                    return Ok(out);
                }
                RepairStatus::Completed => {}
                other => {
                    return Err(Error::conflict(format!(
                        "repair {repair} is {} and only a completed repair can be rolled back",
                        status_code(other)
                    )));
                }
            }
            if matches!(action.op, Op::Reindex { .. } | Op::Replay { .. }) {
                return Err(Error::invalid_input(format!(
                    "repair {repair} ({}) has no undo log: {}",
                    strategy_code(&record.plan.strategy),
                    record.plan.rollback_plan
                )));
            }
            match self.rollback_tx(repair, control).await {
                Ok((n, log)) => {
                    out.rows_affected = n;
                    out.rows = record.affected_rows.clone();
                    out.duration = started.elapsed();
                    out.message = Some(log.join("; "));
                    control.progress().finish();
                    self.finish(&record.plan, &out, "rollback");
                    Ok(out)
                }
                Err(e) => {
                    self.log(
                        repair,
                        "rollback_log",
                        format!("rollback failed, nothing changed: {e}"),
                    )
                    .await?;
                    metrics::counter!("sanare_repair_rollback_failed_total").increment(1);
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
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

impl RepairEngine {
    async fn rollback_tx(&self, repair: RepairId, control: &Control) -> Result<(u64, Vec<String>)> {
        let mut conn = get_conn(&self.inner.pool).await?;
        let mut tx = conn
            .transaction()
            .await
            .context("starting the rollback transaction")?;
        let locked: bool = tx
            .query_one(
                "SELECT pg_try_advisory_xact_lock($1)",
                &[&advisory_key(repair)],
            )
            .await
            .context("taking the repair's advisory lock")?
            .get(0);
        if !locked {
            return Err(Error::conflict(format!(
                "repair {repair} is being run or rolled back by another session"
            )));
        }
        let status: String = tx
            .query_one(
                &format!(
                    "SELECT status FROM {} WHERE id = $1 FOR UPDATE",
                    self.t("repair_operations")
                ),
                &[&repair.as_uuid()],
            )
            .await
            .context("re-reading the repair status")?
            .get(0);
        if status != "completed" {
            return Err(Error::conflict(format!(
                "repair {repair} is {status}, not completed"
            )));
        }
        let mut log = Vec::new();
        // Restoring exactly means restoring rows that broke constraints (the orphans a
        // repair deleted): foreign-key triggers are disabled for this transaction when
        // the role may do so.
        {
            let sp = tx
                .savepoint("replica")
                .await
                .context("creating a savepoint")?;
            match sp
                .batch_execute("SET LOCAL session_replication_role = replica")
                .await
            {
                Ok(()) => {
                    sp.commit().await.context("releasing a savepoint")?;
                    log.push(
                        "foreign-key triggers disabled for the rollback transaction".to_owned(),
                    );
                }
                Err(e) => {
                    sp.rollback().await.context("rolling back a savepoint")?;
                    log.push(format!("foreign-key triggers stay enabled ({e})"));
                }
            }
        }
        let undo = self.t("repair_undo");
        let uid = repair.as_uuid();
        let tables = tx
            .query(
                &format!(
                    "SELECT table_schema, table_name, max(seq) FROM {undo} WHERE repair_id = $1
                      GROUP BY 1, 2 ORDER BY 3 DESC"
                ),
                &[&uid],
            )
            .await
            .context("reading the undo log")?;
        control
            .progress()
            .phase("rollback", "tables", Some(tables.len() as u64));
        let mut total = 0u64;
        for t in &tables {
            control.checkpoint()?;
            let table = TableRef::new(t.get::<_, String>(0), t.get::<_, String>(1));
            let meta = Meta::load(&*tx, &table).await?;
            meta.require_pk()?;
            let q = &meta.quoted;
            let mine = "u.repair_id = $1 AND u.table_schema = $2 AND u.table_name = $3";
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&uid, &table.schema, &table.name];
            // Refuse to overwrite writes made after the repair.
            let conflicts: i64 = tx
                .query_one(
                    &format!(
                        "SELECT (SELECT count(*) FROM {undo} u WHERE {mine} AND u.action IN ('updated', 'inserted')
                                   AND NOT EXISTS (SELECT 1 FROM {q} t, LATERAL (SELECT (u.after_row::{q}).*) a
                                                    WHERE {} AND t::text = u.after_row))
                              + (SELECT count(*) FROM {undo} u WHERE {mine} AND u.action = 'deleted'
                                   AND EXISTS (SELECT 1 FROM {q} t, LATERAL (SELECT (u.before_row::{q}).*) b WHERE {}))",
                        meta.pk_eq("t", "a"),
                        meta.pk_eq("t", "b")
                    ),
                    &params,
                )
                .await
                .with_context(|| format!("checking {table} for writes made after the repair"))?
                .get(0);
            if conflicts > 0 {
                return Err(Error::conflict(format!(
                    "{conflicts} row(s) of {table} changed after the repair; rollback refused so newer writes are not \
                     overwritten (reconcile them by hand, then retry)"
                )));
            }
            let removed = tx
                .execute(
                    &format!(
                        "DELETE FROM {q} t USING {undo} u, LATERAL (SELECT (u.after_row::{q}).*) a
                          WHERE {mine} AND u.action = 'inserted' AND {}",
                        meta.pk_eq("t", "a")
                    ),
                    &params,
                )
                .await
                .with_context(|| format!("removing rows a repair inserted into {table}"))?;
            let upd = meta.update_cols();
            let set = upd
                .iter()
                .map(|c| format!("{0} = b.{0}", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ");
            let restored = tx
                .execute(
                    &format!(
                        "UPDATE {q} t SET {set} FROM (SELECT (u.before_row::{q}).* FROM {undo} u WHERE {mine} AND u.action = 'updated') b
                          WHERE {}",
                        meta.pk_eq("t", "b")
                    ),
                    &params,
                )
                .await
                .with_context(|| format!("restoring updated rows of {table}"))?;
            let ins = meta.insert_cols();
            let reinserted = tx
                .execute(
                    &format!(
                        "INSERT INTO {q} ({}) OVERRIDING SYSTEM VALUE
                         SELECT {} FROM (SELECT (u.before_row::{q}).* FROM {undo} u WHERE {mine} AND u.action = 'deleted') b",
                        ins.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", "),
                        Meta::list("b", &ins)
                    ),
                    &params,
                )
                .await
                .with_context(|| format!("re-inserting deleted rows of {table}"))?;
            // Verify: every before-image is back, byte for byte.
            let wrong: i64 = tx
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {undo} u WHERE {mine} AND u.action IN ('updated', 'deleted')
                           AND NOT EXISTS (SELECT 1 FROM {q} t WHERE t::text = u.before_row
                                             AND {} )",
                        meta.pk_eq("t", &format!("(u.before_row::{q})"))
                    ),
                    &params,
                )
                .await
                .with_context(|| format!("verifying the rollback of {table}"))?
                .get(0);
            if wrong > 0 {
                return Err(Error::conflict(format!(
                    "{wrong} row(s) of {table} differ from their before-image after rollback"
                )));
            }
            total += removed + restored + reinserted;
            log.push(format!(
                "{table}: removed {removed} inserted, restored {restored} updated, re-inserted {reinserted} deleted row(s)"
            ));
            control.progress().advance(1);
        }
        tx.execute(
            &format!(
                "UPDATE {} SET status = 'rolled_back', rolled_back_at = now(), rollback_log = rollback_log || $2::jsonb
                  WHERE id = $1",
                self.t("repair_operations")
            ),
            &[&uid, &serde_json::json!(log)],
        )
        .await
        .context("recording the rollback")?;
        tx.commit().await.context("committing the rollback")?;
        Ok((total, log))
    }
}
