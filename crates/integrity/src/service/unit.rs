//! One work unit: its probes over its rows in the run's shared snapshot, then the
//! re-read of its suspects in fresh snapshots, batch by batch, each batch's
//! confirmed violations written as soon as it is re-read.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sanare_core::{CheckFamily, CheckId, Control, Error, Result, Violation};
use sanare_pg::TxGuard;

use super::Integrity;
use super::snapshot::SnapshotHolder;
use super::store::{RunStats, Sink, UnitRef};
use crate::finding::{family_of, to_violation};
use crate::plan::{Probe, TablePlan};
use crate::probe::{begin_fresh, begin_in_snapshot, run_probe};
use crate::report::FamilyResult;
use crate::spill::{Collect, Spill, Suspect};
use crate::units::Pred;

/// What one unit runs.
pub(super) struct UnitWork<'a> {
    pub(super) plan: &'a TablePlan,
    pub(super) probes: Vec<&'a Probe>,
    pub(super) unit: i32,
    pub(super) pred: Pred,
    pub(super) timeout: Duration,
}

/// What every unit of a run shares.
pub(super) struct RunCtx<'a> {
    pub(super) check: CheckId,
    pub(super) control: &'a Control,
    pub(super) sink: &'a Sink,
    pub(super) stats: &'a RunStats,
    pub(super) holder: &'a SnapshotHolder,
}

impl Integrity {
    /// Runs one unit and records it.
    pub(super) async fn run_unit(&self, work: &UnitWork<'_>, ctx: &RunCtx<'_>) -> Result<()> {
        let t0 = Instant::now();
        let plan = work.plan;
        let setup = self.setup(work.timeout);
        let mut fam: BTreeMap<CheckFamily, FamilyResult> = BTreeMap::new();
        let (rows_seen, spill) = self.scan_unit(work, &setup, ctx.holder, &mut fam).await?;
        let at = UnitRef {
            check: ctx.check,
            table: &plan.table,
            unit: work.unit,
        };
        let mut batches = spill.batches()?;
        while let Some((probe, suspects)) = batches.next_batch()? {
            ctx.control.checkpoint()?;
            let probe = work
                .probes
                .get(usize::try_from(probe).unwrap_or(usize::MAX))
                .ok_or_else(|| Error::corrupt("suspects file", "a suspect names no probe"))?;
            let confirmed = self.reread(plan, probe, suspects, &setup, &mut fam).await?;
            self.write_batch(at, &confirmed, ctx.sink, ctx.stats)
                .await?;
        }
        self.finish_unit(at, rows_seen, &fam).await?;
        {
            let mut f = ctx.stats.families.lock().await;
            for (k, v) in fam {
                f.entry(k).or_default().add(&v);
            }
        }
        if rows_seen > 0 {
            *ctx.stats
                .rows_by_table
                .lock()
                .await
                .entry(plan.table.clone())
                .or_default() += rows_seen;
            ctx.control.progress().advance(rows_seen);
            metrics::counter!("sanare_integrity_rows_checked_total").increment(rows_seen);
        }
        metrics::counter!("sanare_integrity_chunks_total").increment(1);
        metrics::histogram!("sanare_integrity_chunk_seconds").record(t0.elapsed().as_secs_f64());
        Ok(())
    }

    /// The unit's probes in the shared snapshot; their suspects, spilled.
    async fn scan_unit(
        &self,
        work: &UnitWork<'_>,
        setup: &str,
        holder: &SnapshotHolder,
        fam: &mut BTreeMap<CheckFamily, FamilyResult>,
    ) -> Result<(u64, Spill)> {
        let pool = &self.inner.pool;
        let tx = holder
            .with_snapshot(async |snap| {
                TxGuard::begin(pool, &begin_in_snapshot(snap, setup)?).await
            })
            .await?;
        let spill = Spill::new(self.inner.config.batch_size, &self.inner.config.report_dir);
        let mut found = Collect::Spill { spill, probe: 0 };
        let mut rows_seen = 0u64;
        for (i, p) in work.probes.iter().enumerate() {
            if let Collect::Spill { probe, .. } = &mut found {
                *probe = u32::try_from(i).unwrap_or(u32::MAX);
            }
            if let Some(n) = run_probe(&tx, work.plan, p, &work.pred, &mut found).await? {
                rows_seen = rows_seen.max(n);
            }
            fam.entry(p.family()).or_default().probes_run += 1;
        }
        tx.commit().await?;
        match found {
            Collect::Spill { spill, .. } => Ok((rows_seen, spill)),
            Collect::Identities(_) => Err(Error::invalid_input(
                "a probe replaced the unit's suspects (a bug in sanare-integrity)",
            )),
        }
    }

    /// Re-reads one batch of suspects of `probe` in a fresh snapshot and returns
    /// the violations of those that still fail.
    async fn reread(
        &self,
        plan: &TablePlan,
        probe: &Probe,
        suspects: Vec<Suspect>,
        setup: &str,
        fam: &mut BTreeMap<CheckFamily, FamilyResult>,
    ) -> Result<Vec<Violation>> {
        let keys: Vec<Vec<String>> = suspects
            .iter()
            .map(|s| s.key.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let tx = TxGuard::begin(&self.inner.pool, &begin_fresh(setup)).await?;
        let mut again = Collect::default();
        run_probe(&tx, plan, probe, &Pred::keys(plan, &keys), &mut again).await?;
        tx.commit().await?;
        let Collect::Identities(again) = again else {
            return Err(Error::invalid_input(
                "a re-read spilled its suspects (a bug in sanare-integrity)",
            ));
        };
        let mut confirmed = Vec::new();
        for s in suspects {
            let f = fam.entry(family_of(probe, &s)).or_default();
            f.suspects += 1;
            if again.contains(&s.identity()) {
                f.violations += 1;
                confirmed.push(to_violation(plan, probe, s));
            } else {
                f.dismissed += 1;
                metrics::counter!("sanare_integrity_suspects_dismissed_total").increment(1);
            }
        }
        Ok(confirmed)
    }
}
