//! Replay: entries handed to their handlers, exactly once in effect.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use futures_util::StreamExt;

use sanare_core::{
    Control, Error, Event, JournalEntryId, JournalPosition, ReplayFailure, ReplayRange,
    ReplayRequest, ReplaySummary, Result,
};

use crate::entry::{EntryStatus, JournalEntry};
use crate::handler::PgHandler;
use crate::query::ScanPlan;
use crate::{AnyHandler, Backend, Journal, lock, pg};

impl Journal {
    async fn resolve(&self, range: &ReplayRange) -> Result<ScanPlan> {
        let upper = match &self.inner.backend {
            Backend::Wal(w) => w.head(),
            Backend::Pg(p) => p.stable_head().await?,
        };
        let mut plan = ScanPlan {
            to: Some(upper.0),
            ..ScanPlan::default()
        };
        match range {
            ReplayRange::All => {}
            ReplayRange::After(cut) => {
                plan.after = cut.position.0;
                if matches!(self.inner.backend, Backend::Pg(_)) {
                    plan.snapshot = cut.db_snapshot.clone();
                }
            }
            ReplayRange::Positions { from, to } => {
                plan.after = from.0.saturating_sub(1);
                if let Some(to) = to {
                    plan.to = Some(to.0.min(upper.0));
                }
            }
            ReplayRange::Time { from, to } => {
                plan.time_from = *from;
                plan.time_to = *to;
            }
            _ => return Err(Error::invalid_input("unsupported replay range")),
        }
        Ok(plan)
    }

    pub(crate) async fn replay_inner(
        &self,
        request: ReplayRequest,
        control: &Control,
    ) -> Result<ReplaySummary> {
        let plan = self.replay_plan(&request).await?;
        control
            .progress()
            .phase("replaying journal", "entries", None);
        let mut initial = ReplaySummary::default();
        initial.dry_run = request.dry_run;
        let state = Mutex::new(initial);
        let result = self.replay_batches(&plan, &request, &state, control).await;
        let summary = state
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        metrics::counter!("sanare_journal_replayed_total").increment(summary.applied);
        metrics::counter!("sanare_journal_replay_failures_total")
            .increment(summary.failures.len() as u64);
        if let Some(bus) = &self.inner.events {
            bus.publish(Event::JournalReplayed {
                applied: summary.applied,
                skipped: summary.already_applied + summary.failures.len() as u64,
                last_position: summary.last_position,
                dry_run: summary.dry_run,
            });
        }
        control.progress().finish();
        result?;
        Ok(summary)
    }

    /// What a replay request scans: its range, its time bound and its filters.
    async fn replay_plan(&self, request: &ReplayRequest) -> Result<ScanPlan> {
        let mut plan = self.resolve(&request.range).await?;
        if let Some(until) = request.until {
            // `time_to` is exclusive; entries recorded exactly at `until` are in.
            // PostgreSQL keeps microseconds (an entry's time is stored truncated),
            // so there the bound is the next microsecond after `until`'s own.
            let bound = match &self.inner.backend {
                Backend::Wal(_) => until + time::Duration::nanoseconds(1),
                Backend::Pg(_) => {
                    let sub_micro = i64::from(until.nanosecond() % 1_000);
                    until - time::Duration::nanoseconds(sub_micro) + time::Duration::microseconds(1)
                }
            };
            plan.time_to = Some(plan.time_to.map_or(bound, |t| t.min(bound)));
        }
        plan.operation_types = request.operation_types.clone();
        plan.idempotency_keys = request.idempotency_keys.clone();
        Ok(plan)
    }

    /// Replays `plan` batch by batch (`replay_batch` entries each), marking each
    /// batch's plain-handler entries before the next; outcomes go to `state`.
    async fn replay_batches(
        &self,
        plan: &ScanPlan,
        request: &ReplayRequest,
        state: &Mutex<ReplaySummary>,
        control: &Control,
    ) -> Result<()> {
        let mut seen_damage: HashSet<(String, u64)> = HashSet::new();
        let mut after = plan.after;
        loop {
            control.checkpoint()?;
            let (batch, damage) = self.scan(plan, after, self.inner.replay_batch).await?;
            for d in damage {
                if seen_damage.insert((d.segment.clone(), d.offset)) {
                    lock(state).failures.push(ReplayFailure {
                        position: JournalPosition(after),
                        entry: None,
                        operation_type: None,
                        reason: format!(
                            "corrupt journal data in {} at offset {} ({}): skipped",
                            d.segment, d.offset, d.reason
                        ),
                    });
                }
            }
            let Some(last) = batch.last() else { break };
            after = last.position.0;
            let pg_marked = self.pg_marked(&batch).await?;
            let pending = Mutex::new(Vec::new());
            let pass = Pass {
                dry_run: request.dry_run,
                pg_marked: &pg_marked,
                state,
                pending: &pending,
            };
            let outcome = if request.parallel {
                self.apply_parallel(&batch, &pass, control).await
            } else {
                self.apply_in_order(&batch, &pass, control).await
            };
            let marks = std::mem::take(&mut *lock(&pending));
            self.mark_plain(&marks).await?;
            {
                let mut s = lock(state);
                s.last_position = Some(last.position);
                control
                    .progress()
                    .set_done(s.applied + s.already_applied + s.failures.len() as u64);
            }
            outcome?;
        }
        Ok(())
    }

    /// Applies a batch with up to `replay_concurrency` entries at once; entries
    /// sharing an idempotency key stay in order, one after the other.
    async fn apply_parallel(
        &self,
        batch: &[JournalEntry],
        pass: &Pass<'_>,
        control: &Control,
    ) -> Result<()> {
        let mut groups: Vec<Vec<&JournalEntry>> = Vec::new();
        let mut by_key: HashMap<&str, usize> = HashMap::new();
        for e in batch {
            match e.idempotency_key.as_deref() {
                Some(k) => {
                    let i = *by_key.entry(k).or_insert_with(|| {
                        groups.push(Vec::new());
                        groups.len() - 1
                    });
                    groups[i].push(e);
                }
                None => groups.push(vec![e]),
            }
        }
        let cancelled = std::sync::atomic::AtomicBool::new(false);
        futures_util::stream::iter(groups)
            .for_each_concurrent(self.inner.replay_concurrency, |group| {
                let cancelled = &cancelled;
                async move {
                    for e in group {
                        if control.is_cancelled() {
                            cancelled.store(true, std::sync::atomic::Ordering::Relaxed);
                            return;
                        }
                        self.apply_one(e, pass).await;
                    }
                }
            })
            .await;
        if cancelled.load(std::sync::atomic::Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Applies a batch in position order. A run of entries for PostgreSQL
    /// handlers commits in one transaction with their marks; on any failure the
    /// run is rolled back and retried entry by entry.
    async fn apply_in_order(
        &self,
        batch: &[JournalEntry],
        pass: &Pass<'_>,
        control: &Control,
    ) -> Result<()> {
        let mut i = 0;
        while i < batch.len() {
            control.checkpoint()?;
            let run = if pass.dry_run {
                0
            } else {
                batch[i..]
                    .iter()
                    .take_while(|e| {
                        matches!(
                            self.inner.handlers.get(&e.operation_type),
                            Some(AnyHandler::Pg(_))
                        ) && e.payload_intact()
                    })
                    .count()
            };
            if run > 1 {
                let chunk: Vec<&JournalEntry> = batch[i..i + run].iter().collect();
                match self.apply_pg_chunk(&chunk).await {
                    Ok(applied) => {
                        let mut s = lock(pass.state);
                        for fresh in applied {
                            s.entries_seen += 1;
                            if fresh {
                                s.applied += 1;
                            } else {
                                s.already_applied += 1;
                            }
                        }
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "replay chunk failed; applying one by one");
                        for e in chunk {
                            self.apply_one(e, pass).await;
                        }
                    }
                }
                i += run;
                continue;
            }
            self.apply_one(&batch[i], pass).await;
            i += 1;
        }
        Ok(())
    }

    async fn pg_marked(&self, batch: &[JournalEntry]) -> Result<HashSet<uuid::Uuid>> {
        let Some((pool, sql)) = &self.inner.handler_db else {
            return Ok(HashSet::new());
        };
        if let Backend::Pg(_) = &self.inner.backend {
            return Ok(batch
                .iter()
                .filter(|e| e.status == EntryStatus::Replayed)
                .map(|e| e.id.as_uuid())
                .collect());
        }
        let any_pg = batch.iter().any(|e| {
            matches!(
                self.inner.handlers.get(&e.operation_type),
                Some(AnyHandler::Pg(_))
            )
        });
        if !any_pg {
            return Ok(HashSet::new());
        }
        let ids: Vec<uuid::Uuid> = batch.iter().map(|e| e.id.as_uuid()).collect();
        pg::marked(pool, sql, &ids).await
    }

    pub(crate) async fn mark_plain(
        &self,
        marks: &[(JournalPosition, JournalEntryId)],
    ) -> Result<()> {
        match &self.inner.backend {
            Backend::Wal(_) => {
                let marks = marks.to_vec();
                self.on_wal(move |w| w.mark(&marks)).await
            }
            Backend::Pg(p) => pg::mark_many(&p.pool, &p.sql, marks).await,
        }
    }

    async fn apply_one(&self, e: &JournalEntry, pass: &Pass<'_>) {
        let Pass {
            dry_run,
            pg_marked,
            state,
            pending,
        } = *pass;
        enum Outcome {
            Applied,
            Already,
            Failed(String),
        }
        let fail = |reason: String| Outcome::Failed(reason);
        let outcome = if !e.payload_intact() {
            fail("payload does not match its recorded blake3 hash; not applied".into())
        } else {
            match self.inner.handlers.get(&e.operation_type) {
                None => fail(format!("no handler registered for `{}`", e.operation_type)),
                Some(AnyHandler::Plain(h)) => {
                    let marked = match &self.inner.backend {
                        Backend::Wal(_) => e.status == EntryStatus::Replayed,
                        Backend::Pg(_) => e.status == EntryStatus::Replayed,
                    };
                    if marked {
                        Outcome::Already
                    } else {
                        match h.is_applied(e).await {
                            Ok(true) => {
                                if !dry_run {
                                    lock(pending).push((e.position, e.id));
                                }
                                Outcome::Already
                            }
                            Ok(false) if dry_run => Outcome::Applied,
                            Ok(false) => match h.apply(e).await {
                                Ok(()) => {
                                    lock(pending).push((e.position, e.id));
                                    Outcome::Applied
                                }
                                Err(err) => fail(format!("handler failed: {err}")),
                            },
                            Err(err) => fail(format!("handler's applied check failed: {err}")),
                        }
                    }
                }
                Some(AnyHandler::Pg(h)) => {
                    if pg_marked.contains(&e.id.as_uuid()) {
                        Outcome::Already
                    } else if dry_run {
                        Outcome::Applied
                    } else {
                        match self.apply_pg(h.as_ref(), e).await {
                            Ok(true) => Outcome::Applied,
                            Ok(false) => Outcome::Already,
                            Err(err) => fail(format!("handler failed: {err}")),
                        }
                    }
                }
            }
        };
        let mut s = lock(state);
        s.entries_seen += 1;
        match outcome {
            Outcome::Applied => s.applied += 1,
            Outcome::Already => s.already_applied += 1,
            Outcome::Failed(reason) => {
                tracing::warn!(position = %e.position, %reason, "journal entry not applied");
                s.failures.push(ReplayFailure {
                    position: e.position,
                    entry: Some(e.id),
                    operation_type: Some(e.operation_type.clone()),
                    reason,
                });
            }
        }
    }

    /// Applies a run of entries for PostgreSQL handlers in one transaction with
    /// their applied marks. Returns, per entry, whether it was newly applied.
    async fn apply_pg_chunk(&self, run: &[&JournalEntry]) -> Result<Vec<bool>> {
        let Some((pool, sql)) = &self.inner.handler_db else {
            return Err(Error::config(
                "journal.handler_database",
                "no database for PostgreSQL handlers",
            ));
        };
        let mut client = sanare_pg::get_conn(pool).await?;
        let tx = client
            .transaction()
            .await
            .map_err(|err| sanare_pg::map_pg_error("starting a replay transaction", err))?;
        let ids: Vec<uuid::Uuid> = run.iter().map(|e| e.id.as_uuid()).collect();
        let seqs: Vec<i64> = run
            .iter()
            .map(|e| i64::try_from(e.position.0).unwrap_or(i64::MAX))
            .collect();
        let stmt = tx
            .prepare_cached(&sql.mark_many_returning)
            .await
            .map_err(|err| sanare_pg::map_pg_error("preparing the applied-mark insert", err))?;
        let fresh: HashSet<uuid::Uuid> = tx
            .query(&stmt, &[&ids, &seqs])
            .await
            .map_err(|err| sanare_pg::map_pg_error("writing journal applied marks", err))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let out: Vec<bool> = run
            .iter()
            .map(|e| fresh.contains(&e.id.as_uuid()))
            .collect();
        // Consecutive fresh entries of one operation type go to their handler in one
        // call, so effects keep position order across operation types.
        let todo: Vec<&JournalEntry> = run
            .iter()
            .zip(&out)
            .filter(|(_, fresh)| **fresh)
            .map(|(e, _)| *e)
            .collect();
        for group in todo.chunk_by(|a, b| a.operation_type == b.operation_type) {
            if let Some(AnyHandler::Pg(h)) = self.inner.handlers.get(&group[0].operation_type) {
                h.apply_batch(&tx, group).await?;
            }
        }
        tx.commit()
            .await
            .map_err(|err| sanare_pg::map_pg_error("committing replayed journal entries", err))?;
        Ok(out)
    }

    /// Runs a PostgreSQL handler with the applied mark in the same transaction.
    /// Returns false when the mark already existed.
    async fn apply_pg(&self, h: &dyn PgHandler, e: &JournalEntry) -> Result<bool> {
        let Some((pool, sql)) = &self.inner.handler_db else {
            return Err(Error::config(
                "journal.handler_database",
                "no database for PostgreSQL handlers",
            ));
        };
        let mut client = sanare_pg::get_conn(pool).await?;
        let tx = client
            .transaction()
            .await
            .map_err(|err| sanare_pg::map_pg_error("starting a replay transaction", err))?;
        let seq = i64::try_from(e.position.0).unwrap_or(i64::MAX);
        let n = tx
            .execute(&sql.mark_one, &[&e.id.as_uuid(), &seq])
            .await
            .map_err(|err| sanare_pg::map_pg_error("writing a journal applied mark", err))?;
        if n == 0 {
            return Ok(false);
        }
        h.apply(&tx, e).await?;
        tx.commit()
            .await
            .map_err(|err| sanare_pg::map_pg_error("committing a replayed journal entry", err))?;
        Ok(true)
    }
}

/// What the entries of one replayed batch share.
struct Pass<'a> {
    dry_run: bool,
    /// Entries whose PostgreSQL handler's mark is already there.
    pg_marked: &'a HashSet<uuid::Uuid>,
    state: &'a Mutex<ReplaySummary>,
    /// Applied plain-handler entries, marked once the batch is done.
    pending: &'a Mutex<Vec<(JournalPosition, JournalEntryId)>>,
}
