//! Planning: from violations (streamed in bounded batches) to recorded plans.
//!
//! Violations that get the same repair (table, strategy, operation) become one plan
//! whatever batch they arrive in: its row keys go to `repair_targets` batch by batch,
//! and only the count and a sample of violation ids stay in memory. The row counts
//! that approval thresholds compare are counted by the database.

use std::collections::{HashMap, HashSet};

use futures_util::StreamExt as _;
use sanare_core::{
    BoxStream, Control, Error, PLAN_VIOLATION_SAMPLE, RepairId, RepairPlan, RepairStatus,
    RepairStrategyKind, Result, RowRef, Severity, SnapshotId, TableRef, Violation, ViolationId,
    ViolationKind,
};
use sanare_pg::{PgResultExt, get_conn};
use tokio_postgres::GenericClient;

use crate::action::{
    ACTION_VERSION, Action, Assign, BindContext, Bound, Check, Op, Resolved, bind, custom_message,
};
use crate::catalog::Meta;
use crate::decide::{
    Decision, RowAction, TableFacts, decide, idempotency_keys, recompute, target_table,
};
use crate::engine::{RepairEngine, strategy_code};
use crate::record::status_code;
use crate::targets::{self, NewTarget};
use tracing::Instrument as _;

/// How many violations are analysed at once.
const BATCH: usize = PLAN_VIOLATION_SAMPLE;
/// How many whole violations a plan keeps for its audit trail.
const AUDIT_SAMPLE: usize = 20;

/// One violation's repair, before grouping.
struct Draft {
    strategy: RepairStrategyKind,
    rule: String,
    action: Action,
    target: Option<NewTarget>,
    custom_approval: bool,
    /// A unique violation that names no row: its duplicates are found when planned.
    find_duplicates: bool,
}

/// A plan being built.
struct Group {
    id: RepairId,
    strategy: RepairStrategyKind,
    rule: String,
    action: Action,
    severity: Severity,
    kind: &'static str,
    count: u64,
    sample: Vec<ViolationId>,
    audit: Vec<Violation>,
    custom_approval: bool,
    find_duplicates: bool,
}

/// What the planner knows of the catalog and the snapshot, kept across batches
/// (bounded by the number of tables).
#[derive(Default)]
struct Knowledge {
    metas: HashMap<TableRef, Option<Meta>>,
    checks: HashMap<TableRef, HashSet<String>>,
    snapshot: Option<Option<SnapshotId>>,
}

pub(crate) struct Planner<'e> {
    engine: &'e RepairEngine,
    known: Knowledge,
    groups: Vec<Group>,
    index: HashMap<String, usize>,
}

/// Plans every violation of `violations`, a batch at a time.
pub(crate) async fn plan_stream(
    engine: &RepairEngine,
    mut violations: BoxStream<'_, Result<Violation>>,
    control: &Control,
) -> Result<Vec<RepairPlan>> {
    let span = tracing::info_span!("repair.plan");
    async move {
        let mut planner = Planner::new(engine);
        let mut batch = Vec::with_capacity(BATCH);
        let result: Result<()> = async {
            loop {
                batch.clear();
                while batch.len() < BATCH {
                    match violations.next().await {
                        Some(v) => batch.push(v?),
                        None => break,
                    }
                }
                if batch.is_empty() {
                    return Ok(());
                }
                control.checkpoint()?;
                planner.add(&batch).await?;
            }
        }
        .await;
        match result {
            Ok(()) => planner.finish().await,
            Err(e) => {
                planner.abandon().await;
                Err(e)
            }
        }
    }
    .instrument(span)
    .await
}

impl<'e> Planner<'e> {
    pub(crate) fn new(engine: &'e RepairEngine) -> Self {
        Self {
            engine,
            known: Knowledge::default(),
            groups: Vec::new(),
            index: HashMap::new(),
        }
    }

    async fn learn(&mut self, client: &impl GenericClient, violations: &[Violation]) -> Result<()> {
        for v in violations {
            let mut tables = vec![v.table.clone()];
            if let ViolationKind::Referential { parent_table, .. } = &v.kind {
                tables.push(parent_table.clone());
            }
            for t in tables {
                if self.known.metas.contains_key(&t) {
                    continue;
                }
                let meta = match Meta::load(client, &t).await {
                    Ok(m) => Some(m),
                    Err(Error::NotFound { .. }) => None,
                    Err(e) => return Err(e),
                };
                let checks = match &meta {
                    Some(m) => client
                        .query(
                            "SELECT conname::text FROM pg_constraint WHERE conrelid = $1 AND contype = 'c'",
                            &[&m.oid],
                        )
                        .await
                        .with_context(|| format!("reading the CHECK constraints of {t}"))?
                        .iter()
                        .map(|r| r.get(0))
                        .collect(),
                    None => HashSet::new(),
                };
                self.known.checks.insert(t.clone(), checks);
                self.known.metas.insert(t, meta);
            }
        }
        if self.known.snapshot.is_none() {
            let latest = match &self.engine.inner.snapshots {
                Some(s) => s.latest_good(None).await?.map(|i| i.id),
                None => None,
            };
            self.known.snapshot = Some(latest);
        }
        Ok(())
    }

    fn meta(&self, table: &TableRef) -> Option<&Meta> {
        self.known.metas.get(table).and_then(Option::as_ref)
    }

    /// The facts about each violation and the decision for it.
    pub(crate) async fn analyze(
        &mut self,
        violations: &[Violation],
    ) -> Result<Vec<(Decision, TableFacts)>> {
        let conn = get_conn(self.engine.pool()).await?;
        self.learn(&**conn, violations).await?;
        let snapshot = self.known.snapshot.flatten();
        let present = self.in_snapshot(violations, snapshot).await?;
        let mut out = Vec::with_capacity(violations.len());
        for v in violations {
            let facts = self.facts(v, snapshot, &present);
            let decision = if self.meta(&v.table).is_none() {
                Decision::Manual {
                    reason: format!("table {} does not exist", v.table),
                }
            } else if let Some(s) = self
                .engine
                .inner
                .strategies
                .iter()
                .find(|s| s.matches(v, &facts))
            {
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

    /// Which of the violations' rows and missing parents the snapshot holds, in one
    /// fetch per batch.
    async fn in_snapshot(
        &self,
        violations: &[Violation],
        snapshot: Option<SnapshotId>,
    ) -> Result<HashSet<(TableRef, Vec<Option<String>>)>> {
        let mut present = HashSet::new();
        let (Some(snap), Some(service)) = (snapshot, &self.engine.inner.snapshots) else {
            return Ok(present);
        };
        let mut wanted: Vec<RowRef> = Vec::new();
        for v in violations {
            if let Some(r) = &v.row {
                wanted.push(r.clone());
            }
            if let Some(p) = parent_ref(v, &self.known.metas) {
                wanted.push(p);
            }
        }
        if wanted.is_empty() {
            return Ok(present);
        }
        for image in service.fetch_rows(snap, &wanted).await? {
            if let Some(meta) = self.meta(&image.table) {
                let key = meta
                    .pk
                    .iter()
                    .map(|k| image.get(k).flatten().map(str::to_owned))
                    .collect();
                present.insert((image.table.clone(), key));
            }
        }
        Ok(present)
    }

    fn facts(
        &self,
        v: &Violation,
        snapshot: Option<SnapshotId>,
        present: &HashSet<(TableRef, Vec<Option<String>>)>,
    ) -> TableFacts {
        let mut facts = TableFacts {
            snapshot,
            journal_entries: self.engine.inner.journal.is_some() && !idempotency_keys(v).is_empty(),
            ..TableFacts::default()
        };
        let Some(meta) = self.meta(&v.table) else {
            return facts;
        };
        facts.primary_key = meta.pk.clone();
        let has_default = |c: &str| meta.col(c).is_ok_and(|c| c.default.is_some());
        match &v.kind {
            ViolationKind::Referential { columns, .. } => {
                facts.fk_nullable = columns
                    .iter()
                    .all(|c| meta.col(c).is_ok_and(|c| !c.not_null));
            }
            ViolationKind::NullConstraint { column }
            | ViolationKind::TypeMismatch { column, .. } => {
                facts.column_has_default = has_default(column);
            }
            ViolationKind::CheckConstraint {
                constraint,
                columns,
            } => {
                facts.catalog_check = self
                    .known
                    .checks
                    .get(&v.table)
                    .is_some_and(|c| c.contains(constraint));
                facts.column_has_default = columns.len() == 1 && has_default(&columns[0]);
            }
            _ => {}
        }
        if let Some((rule, column)) = recompute(v) {
            facts.recompute_rule = self
                .engine
                .inner
                .rules
                .get(&rule)
                .is_some_and(|r| r.table == v.table && r.column == column);
        }
        if let Some(r) = &v.row {
            facts.row_in_snapshot = present.contains(&(
                r.table.clone(),
                r.key.iter().map(|c| c.value.clone()).collect(),
            ));
        }
        if let Some(p) = parent_ref(v, &self.known.metas) {
            facts.parent_in_snapshot = present.contains(&(
                p.table.clone(),
                p.key.iter().map(|c| c.value.clone()).collect(),
            ));
        }
        facts
    }

    /// Analyses a batch, groups its repairs into plans and records their rows.
    pub(crate) async fn add(&mut self, violations: &[Violation]) -> Result<()> {
        let analysis = self.analyze(violations).await?;
        let mut conn = get_conn(self.engine.pool()).await?;
        let tx = crate::apply::transaction(&mut conn, "starting a planning transaction").await?;
        let mut batch_targets: HashMap<usize, Vec<NewTarget>> = HashMap::new();
        for (v, (decision, facts)) in violations.iter().zip(&analysis) {
            let Decision::Strategy { strategy, rule } = decision else {
                if let Decision::Manual { reason } = decision {
                    tracing::info!(violation = %v.id, %reason, "no automatic repair");
                }
                continue;
            };
            let draft = match self.draft(v, strategy, rule, facts) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(violation = %v.id, error = %e, "violation cannot be repaired automatically");
                    continue;
                }
            };
            let g = self.group(&tx, v, &draft).await?;
            if let Some(t) = draft.target {
                batch_targets.entry(g).or_default().push(t);
            }
        }
        let table = self.engine.t("repair_targets");
        for (g, list) in batch_targets {
            let group = &self.groups[g];
            let meta = self
                .meta(&group.action.table)
                .ok_or_else(|| Error::not_found(format!("table {}", group.action.table)))?;
            targets::insert(&tx, &table, group.id, meta, &list).await?;
        }
        tx.commit().await.context("recording repair plans")?;
        Ok(())
    }

    /// The plan `draft` belongs to, created (status `planning`) on first sight.
    async fn group(
        &mut self,
        client: &impl GenericClient,
        v: &Violation,
        draft: &Draft,
    ) -> Result<usize> {
        let key = serde_json::json!([strategy_code(&draft.strategy), draft.rule, draft.action])
            .to_string();
        let g = match self.index.get(&key) {
            Some(&g) => g,
            None => {
                let id = RepairId::new();
                let mut action = draft.action.clone();
                if let Op::Custom {
                    strategy,
                    predicate,
                    set,
                    mac,
                } = &mut action.op
                {
                    let signer = self.engine.inner.action_key.as_ref().ok_or_else(|| {
                        Error::config("repair.action_key", "host strategies need an action key")
                    })?;
                    *mac =
                        signer.sign(&custom_message(id, &action.table, strategy, predicate, set));
                }
                self.insert_planning(client, id, &draft.strategy, &draft.rule, &action, v)
                    .await?;
                self.groups.push(Group {
                    id,
                    strategy: draft.strategy.clone(),
                    rule: draft.rule.clone(),
                    action,
                    severity: v.severity,
                    kind: v.kind.code(),
                    count: 0,
                    sample: Vec::new(),
                    audit: Vec::new(),
                    custom_approval: draft.custom_approval,
                    find_duplicates: draft.find_duplicates,
                });
                self.index.insert(key, self.groups.len() - 1);
                self.groups.len() - 1
            }
        };
        let group = &mut self.groups[g];
        group.count += 1;
        group.severity = group.severity.max(v.severity);
        group.find_duplicates |= draft.find_duplicates;
        if group.sample.len() < PLAN_VIOLATION_SAMPLE {
            group.sample.push(v.id);
        }
        if group.audit.len() < AUDIT_SAMPLE {
            group.audit.push(v.clone());
        }
        Ok(g)
    }

    async fn insert_planning(
        &self,
        client: &impl GenericClient,
        id: RepairId,
        strategy: &RepairStrategyKind,
        rule: &str,
        action: &Action,
        v: &Violation,
    ) -> Result<()> {
        let plan = RepairPlan::new(
            id,
            Vec::new(),
            action.table.clone(),
            strategy.clone(),
            v.severity,
        );
        let empty: Vec<uuid::Uuid> = Vec::new();
        client
            .execute(
                &format!(
                    "INSERT INTO {} (id, violation_ids, violation_type, table_schema, table_name, strategy,
                                      rule, severity, status, requires_approval, estimated_rows, plan, action, violations)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'planning', false, 0, $9, $10, '[]')",
                    self.engine.t("repair_operations")
                ),
                &[
                    &id.as_uuid(),
                    &empty,
                    &v.kind.code(),
                    &action.table.schema,
                    &action.table.name,
                    &strategy_code(strategy),
                    &rule,
                    &v.severity.as_str(),
                    &to_json(&plan)?,
                    &to_json(action)?,
                ],
            )
            .await
            .context("recording a repair plan")?;
        Ok(())
    }

    /// Completes every plan: finds duplicates, counts the rows, sets the approval
    /// requirement and the texts, and makes it `pending` or `awaiting_approval`.
    pub(crate) async fn finish(self) -> Result<Vec<RepairPlan>> {
        let mut conn = get_conn(self.engine.pool()).await?;
        let mut plans = Vec::with_capacity(self.groups.len());
        for group in &self.groups {
            let done = async {
                let tx =
                    crate::apply::transaction(&mut conn, "starting a planning transaction").await?;
                let plan = self.finish_one(&tx, group).await?;
                tx.commit().await.context("recording a repair plan")?;
                Ok::<_, Error>(plan)
            };
            match done.await {
                Ok(plan) => plans.push(plan),
                Err(e) => {
                    self.abandon().await;
                    return Err(e);
                }
            }
        }
        Ok(plans)
    }

    async fn finish_one(&self, client: &impl GenericClient, group: &Group) -> Result<RepairPlan> {
        let engine = self.engine;
        let ctx = BindContext {
            repair: group.id,
            plan_table: &group.action.table,
            own_schema: engine.inner.schema.as_str(),
            rules: &engine.inner.rules,
            key: engine.inner.action_key.as_ref(),
        };
        let bound = bind(client, group.action.clone(), &ctx).await?;
        let targets_table = engine.t("repair_targets");
        if group.find_duplicates
            && let Some(check) = &bound.check
        {
            record_duplicates(client, &targets_table, &bound, check).await?;
        }
        let estimated = estimate(client, &targets_table, &bound).await?;
        let c = &engine.inner.config;
        let mut plan = RepairPlan::new(
            group.id,
            group.sample.clone(),
            group.action.table.clone(),
            group.strategy.clone(),
            group.severity,
        );
        plan.violation_count = group.count;
        plan.estimated_rows = estimated;
        plan.requires_approval = c.approval_severity.is_some_and(|s| group.severity >= s)
            || estimated > c.approval_max_rows
            || group.custom_approval
            || (c.removals_need_approval && group.action.op.removes_rows())
            || matches!(group.action.op, Op::Replay { .. } | Op::Reload { .. });
        plan.status = if plan.requires_approval {
            RepairStatus::AwaitingApproval
        } else {
            RepairStatus::Pending
        };
        let d = crate::describe::describe(&group.strategy, &group.action, &group.rule, group.count);
        plan.preconditions = d.0;
        plan.postconditions = d.1;
        plan.rollback_plan = d.2;
        plan.description = d.3;
        let ids: Vec<uuid::Uuid> = plan.violations.iter().map(ViolationId::as_uuid).collect();
        client
            .execute(
                &format!(
                    "UPDATE {} SET status = $2, severity = $3, requires_approval = $4, estimated_rows = $5,
                            plan = $6, violation_ids = $7, violation_count = $8, violations = $9, violation_type = $10
                      WHERE id = $1 AND status = 'planning'",
                    engine.t("repair_operations")
                ),
                &[
                    &plan.id.as_uuid(),
                    &status_code(plan.status),
                    &plan.severity.as_str(),
                    &plan.requires_approval,
                    &i64::try_from(estimated).unwrap_or(i64::MAX),
                    &to_json(&plan)?,
                    &ids,
                    &i64::try_from(group.count).unwrap_or(i64::MAX),
                    &to_json(&group.audit)?,
                    &group.kind,
                ],
            )
            .await
            .context("recording a repair plan")?;
        metrics::counter!("sanare_repair_planned_total", "strategy" => strategy_code(&plan.strategy))
            .increment(1);
        Ok(plan)
    }

    /// Deletes the plans left half-recorded by a failed or cancelled planning run
    /// (best effort: a `planning` row never runs anyway).
    async fn abandon(&self) {
        if self.groups.is_empty() {
            return;
        }
        let ids: Vec<uuid::Uuid> = self.groups.iter().map(|g| g.id.as_uuid()).collect();
        let Ok(conn) = get_conn(self.engine.pool()).await else {
            return;
        };
        if let Err(e) = conn
            .execute(
                &format!(
                    "DELETE FROM {} WHERE id = ANY($1) AND status = 'planning'",
                    self.engine.t("repair_operations")
                ),
                &[&ids],
            )
            .await
        {
            tracing::warn!(error = %e, "could not delete abandoned repair plans (they never run)");
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| Error::other("encoding a repair plan", e))
}

/// Rows a plan is expected to change, counted by the database.
async fn estimate(client: &impl GenericClient, targets_table: &str, bound: &Bound) -> Result<u64> {
    let meta = &bound.meta;
    let uid = bound.repair.as_uuid();
    let n: i64 = match (&bound.action.op, &bound.check) {
        (Op::Reindex { .. }, _) => 0,
        (Op::Quarantine { .. } | Op::Update { .. } | Op::Replay { .. }, Some(check)) => client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {targets_table} g JOIN {} t ON {}
                      WHERE g.repair_id = $1 AND md5({}) IS NOT DISTINCT FROM g.digest AND {}",
                    meta.quoted,
                    meta.key_match("t", "g.key")?,
                    Meta::row_text("t"),
                    check.sql(meta, "t", "g")
                ),
                &[&uid],
            )
            .await
            .with_context(|| format!("counting the rows a repair of {} changes", meta.table))?
            .get(0),
        (Op::Restore { .. } | Op::RestoreParent { .. }, _) => client
            .query_one(
                &format!("SELECT count(*) FROM {targets_table} WHERE repair_id = $1"),
                &[&uid],
            )
            .await
            .context("counting a repair's rows")?
            .get(0),
        (Op::Custom { predicate, .. }, _) => client
            .query_one(
                &format!("SELECT count(*) FROM {} t WHERE {predicate}", meta.quoted),
                &[],
            )
            .await
            .with_context(|| format!("counting the rows a repair of {} changes", meta.table))?
            .get(0),
        (Op::Reload { .. }, _) => client
            .query_one(&format!("SELECT count(*) FROM {}", meta.quoted), &[])
            .await
            .with_context(|| format!("counting the rows of {}", meta.table))?
            .get(0),
        (Op::Quarantine { .. } | Op::Update { .. } | Op::Replay { .. }, None) => {
            return Err(Error::invalid_input("a repair of rows without a check"));
        }
    };
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Records the duplicates of a unique violation that named no row: every row that
/// has a twin with a lower primary key (the lowest of each group is kept).
async fn record_duplicates(
    client: &impl GenericClient,
    targets_table: &str,
    bound: &Bound,
    check: &Resolved,
) -> Result<()> {
    let meta = &bound.meta;
    client
        .execute(
            &format!(
                "INSERT INTO {targets_table} (repair_id, key, digest)
                 SELECT $1, {}, md5({}) FROM {} t WHERE {}
                 ORDER BY {} ON CONFLICT (repair_id, key) DO NOTHING",
                meta.key_array("t"),
                Meta::row_text("t"),
                meta.quoted,
                check.sql(meta, "t", "g"),
                Meta::list("t", &meta.pk)
            ),
            &[&bound.repair.as_uuid()],
        )
        .await
        .with_context(|| format!("recording the duplicates of {}", meta.table))?;
    Ok(())
}

/// The key of the violation's row in primary-key order, when the row reference names
/// exactly the primary key and every value.
fn row_key(meta: &Meta, v: &Violation) -> Result<Vec<String>> {
    let row = v
        .row
        .as_ref()
        .ok_or_else(|| Error::invalid_input("the violation names no row"))?;
    if !meta.names_pk(row) {
        return Err(Error::invalid_input(format!(
            "the violation's row is not named by the primary key of {}",
            meta.table
        )));
    }
    row.key
        .iter()
        .map(|c| c.value.clone())
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::invalid_input("the violation's row key holds a null"))
}

/// The damaged columns of a violation, which a restore puts back (all when none).
fn damaged_columns(v: &Violation) -> Option<Vec<String>> {
    match &v.kind {
        ViolationKind::Corruption {
            column: Some(c), ..
        } => Some(vec![c.clone()]),
        ViolationKind::CheckConstraint { columns, .. } if !columns.is_empty() => {
            Some(columns.clone())
        }
        ViolationKind::NullConstraint { column } | ViolationKind::TypeMismatch { column, .. } => {
            Some(vec![column.clone()])
        }
        _ => None,
    }
}

impl Planner<'_> {
    fn draft(
        &self,
        v: &Violation,
        strategy: &RepairStrategyKind,
        rule: &str,
        facts: &TableFacts,
    ) -> Result<Draft> {
        let table = target_table(v, strategy);
        let meta = self
            .meta(&table)
            .ok_or_else(|| Error::not_found(format!("table {table}")))?;
        let mut draft = Draft {
            strategy: strategy.clone(),
            rule: rule.to_owned(),
            action: Action {
                version: ACTION_VERSION,
                table: table.clone(),
                key_columns: meta.pk.clone(),
                op: Op::Reindex {
                    index: String::new(),
                },
            },
            target: None,
            custom_approval: false,
            find_duplicates: false,
        };
        let own = |columns: Option<Vec<String>>| -> Result<NewTarget> {
            Ok(NewTarget {
                key: row_key(meta, v)?,
                violation: v.id,
                columns,
            })
        };
        let snapshot = || {
            facts
                .snapshot
                .ok_or_else(|| Error::unavailable("no snapshot"))
        };
        draft.action.op = match (strategy, &v.kind) {
            (RepairStrategyKind::Custom(name), _) => self.custom_op(v, name, &mut draft)?,
            (
                RepairStrategyKind::RestoreFromSnapshot,
                ViolationKind::Referential {
                    columns,
                    parent_columns,
                    ..
                },
            ) => {
                let (target, op) =
                    self.restore_parent(v, meta, columns, parent_columns, snapshot()?)?;
                draft.target = Some(target);
                op
            }
            (RepairStrategyKind::RestoreFromSnapshot, _) => {
                draft.target = Some(own(damaged_columns(v))?);
                Op::Restore {
                    snapshot: snapshot()?,
                }
            }
            (RepairStrategyKind::ReplayTransaction, kind) => {
                draft.target = v.row.is_some().then(|| own(None)).transpose()?;
                Op::Replay {
                    idempotency_keys: idempotency_keys(v),
                    check: match kind {
                        ViolationKind::Referential { .. } => orphan_check(v)?,
                        _ => Check::Unchanged,
                    },
                }
            }
            (
                RepairStrategyKind::RemoveOrphanedRecord,
                ViolationKind::Referential { columns, .. },
            ) => {
                draft.target = Some(own(None)?);
                if facts.fk_nullable {
                    Op::Update {
                        set: columns
                            .iter()
                            .map(|c| Assign::Null { column: c.clone() })
                            .collect(),
                        check: orphan_check(v)?,
                    }
                } else {
                    Op::Quarantine {
                        check: orphan_check(v)?,
                    }
                }
            }
            (RepairStrategyKind::UpdateInvalidData, kind) => {
                draft.target = Some(own(None)?);
                update_op(v, kind, facts)?
            }
            (
                RepairStrategyKind::FixConstraintViolation,
                ViolationKind::UniqueConstraint { columns, .. },
            ) => {
                if v.row.is_some() {
                    draft.target = Some(own(None)?);
                } else {
                    draft.find_duplicates = true;
                }
                Op::Quarantine {
                    check: Check::Duplicate {
                        columns: columns.clone(),
                    },
                }
            }
            (RepairStrategyKind::DeleteInvalidRecord, kind) => {
                draft.target = Some(own(None)?);
                Op::Quarantine {
                    check: match kind {
                        ViolationKind::NullConstraint { column } => Check::Null {
                            column: column.clone(),
                        },
                        ViolationKind::CheckConstraint { constraint, .. }
                            if facts.catalog_check =>
                        {
                            Check::Constraint {
                                name: constraint.clone(),
                            }
                        }
                        _ => Check::Unchanged,
                    },
                }
            }
            (
                RepairStrategyKind::RebuildIndex,
                ViolationKind::Corruption {
                    index: Some(index), ..
                },
            ) => Op::Reindex {
                index: index.clone(),
            },
            (RepairStrategyKind::TruncateAndReload, _) => Op::Reload {
                snapshot: snapshot()?,
            },
            (other, _) => {
                return Err(Error::invalid_input(format!(
                    "strategy {} does not apply to a {} violation",
                    strategy_code(other),
                    v.kind.code()
                )));
            }
        };
        if !draft.action.op.uses_targets() {
            draft.action.key_columns.clear();
        }
        Ok(draft)
    }
}

impl Planner<'_> {
    /// A host strategy's operation: its SQL, signed when the plan is recorded.
    fn custom_op(&self, v: &Violation, name: &str, draft: &mut Draft) -> Result<Op> {
        let s = self
            .engine
            .inner
            .strategies
            .iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| Error::not_found(format!("repair strategy `{name}`")))?;
        draft.custom_approval = s.requires_approval();
        let (predicate, set) = match s.action(v)? {
            RowAction::Delete { predicate } => (predicate, None),
            RowAction::Update {
                assignments,
                predicate,
            } => (predicate, Some(assignments)),
        };
        Ok(Op::Custom {
            strategy: name.to_owned(),
            predicate,
            set,
            mac: String::new(),
        })
    }

    /// R1: the missing parent row (the target, in the parent table) and the
    /// operation that re-inserts it.
    fn restore_parent(
        &self,
        v: &Violation,
        parent_meta: &Meta,
        columns: &[String],
        parent_columns: &[String],
        snapshot: SnapshotId,
    ) -> Result<(NewTarget, Op)> {
        let parent = parent_ref(v, &self.known.metas).ok_or_else(|| {
            Error::invalid_input(
                "referential violation without a usable details.missing_parent_key",
            )
        })?;
        let mut sorted_pk = parent_meta.pk.clone();
        sorted_pk.sort();
        let mut sorted_pc = parent_columns.to_vec();
        sorted_pc.sort();
        if sorted_pk != sorted_pc {
            return Err(Error::invalid_input(
                "the foreign key does not reference the parent's primary key",
            ));
        }
        let target = NewTarget {
            key: parent.key.into_iter().filter_map(|c| c.value).collect(),
            violation: v.id,
            columns: None,
        };
        let op = Op::RestoreParent {
            snapshot,
            child: v.table.clone(),
            columns: columns.to_vec(),
            parent_columns: parent_columns.to_vec(),
        };
        Ok((target, op))
    }
}

/// The update of an UpdateInvalidData repair (R7, R8).
fn update_op(v: &Violation, kind: &ViolationKind, facts: &TableFacts) -> Result<Op> {
    if facts.recompute_rule
        && let Some((rule, column)) = recompute(v)
    {
        return Ok(Op::Update {
            set: vec![Assign::Recompute {
                rule: rule.clone(),
                column: column.clone(),
            }],
            check: Check::Recompute { rule, column },
        });
    }
    Ok(match kind {
        ViolationKind::NullConstraint { column } => Op::Update {
            set: vec![Assign::Default {
                column: column.clone(),
            }],
            check: Check::Null {
                column: column.clone(),
            },
        },
        ViolationKind::TypeMismatch { column, .. } => Op::Update {
            set: vec![Assign::Default {
                column: column.clone(),
            }],
            check: Check::Unchanged,
        },
        ViolationKind::CheckConstraint {
            constraint,
            columns,
        } if columns.len() == 1 && facts.catalog_check => Op::Update {
            set: vec![Assign::Default {
                column: columns[0].clone(),
            }],
            check: Check::Constraint {
                name: constraint.clone(),
            },
        },
        _ => {
            return Err(Error::invalid_input(format!(
                "no column fix for a {} violation",
                v.kind.code()
            )));
        }
    })
}

fn orphan_check(v: &Violation) -> Result<Check> {
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
    Ok(Check::Orphan {
        columns: columns.clone(),
        parent: parent_table.clone(),
        parent_columns: parent_columns.clone(),
    })
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
            let text = match parent.get(k)? {
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
