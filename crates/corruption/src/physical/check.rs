//! The physical checks themselves: heap block ranges through `verify_heapam`,
//! bisected down to the block when the server cannot read a page, and B-tree
//! indexes through `bt_index_check`, run by parallel workers.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinSet;

use sanare_core::{Control, Error, Result, ServerError};
use sanare_pg::{PgResultExt, Pool, TxGuard};

use super::relations::{Relation, RelationKind, block_and_path};
use crate::session;

/// One unit of physical checking, small enough for one statement.
#[derive(Clone, Debug)]
pub(crate) enum Job {
    /// `verify_heapam` over blocks `start..=end` of a heap or TOAST table.
    Heap { rel: usize, start: i64, end: i64 },
    /// `bt_index_check` without `heapallindexed`: the index's own pages only.
    IndexStructure { rel: usize },
    /// `bt_index_check` with `heapallindexed`: every heap tuple has its entry.
    /// Only run when the heap checked clean (its damage is not the index's).
    IndexHeapAll { rel: usize },
}

/// One thing the server said is wrong with a page or tuple.
#[derive(Clone, Debug)]
pub(crate) struct Message {
    pub(crate) offset: Option<i32>,
    pub(crate) attnum: Option<i32>,
    pub(crate) text: String,
    /// The whole error when the server refused to read the page.
    pub(crate) server: Option<ServerError>,
}

/// What is wrong with one block (or, when unknown, one relation).
#[derive(Clone, Debug)]
pub(crate) struct Finding {
    pub(crate) rel: usize,
    pub(crate) block: Option<i64>,
    pub(crate) messages: Vec<Message>,
}

/// What one job found.
#[derive(Debug, Default)]
pub(crate) struct JobOut {
    pub(crate) blocks: Vec<(usize, u64)>,
    pub(crate) findings: Vec<Finding>,
    /// Index structure checks that passed.
    pub(crate) sound_indexes: Vec<usize>,
    /// Indexes cross-checked against their heap.
    pub(crate) heap_checked_indexes: Vec<usize>,
}

impl JobOut {
    /// Adds what another job (or run) found.
    pub(crate) fn merge(&mut self, other: JobOut) {
        self.blocks.extend(other.blocks);
        self.findings.extend(other.findings);
        self.sound_indexes.extend(other.sound_indexes);
        self.heap_checked_indexes.extend(other.heap_checked_indexes);
    }
}

/// What every worker shares.
pub(crate) struct Checker {
    pub(crate) pool: Pool,
    pub(crate) relations: Vec<Relation>,
    pub(crate) timeout: std::time::Duration,
}

impl Checker {
    /// Runs `jobs` on `workers` parallel workers (one connection each).
    pub(crate) async fn run(
        self: &Arc<Self>,
        jobs: Vec<Job>,
        workers: usize,
        control: &Control,
    ) -> Result<JobOut> {
        let queue = Arc::new(std::sync::Mutex::new(jobs.into_iter()));
        let mut set = JoinSet::new();
        for _ in 0..workers {
            let me = Arc::clone(self);
            let queue = Arc::clone(&queue);
            let control = control.clone();
            set.spawn(async move {
                let mut out = JobOut::default();
                loop {
                    control.checkpoint()?;
                    let job = match queue.lock() {
                        Ok(mut q) => q.next(),
                        Err(_) => {
                            return Err(Error::conflict("the physical check queue was poisoned"));
                        }
                    };
                    let Some(job) = job else { break };
                    out.merge(me.run_job(&job, &control).await?);
                }
                Ok(out)
            });
        }
        let mut total = JobOut::default();
        while let Some(res) = set.join_next().await {
            match res {
                Ok(Ok(out)) => total.merge(out),
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(Error::other("a physical check worker panicked", e)),
            }
        }
        Ok(total)
    }

    async fn run_job(&self, job: &Job, control: &Control) -> Result<JobOut> {
        let tx = session::bounded(&self.pool, self.timeout).await?;
        let out = match job {
            Job::Heap { rel, start, end } => self.heap(&tx, *rel, *start, *end, control).await?,
            Job::IndexStructure { rel } => self.index(&tx, *rel, false).await?,
            Job::IndexHeapAll { rel } => self.index(&tx, *rel, true).await?,
        };
        tx.commit().await?;
        if let Job::Heap { start, end, .. } = job {
            control
                .progress()
                .advance(u64::try_from(end - start + 1).unwrap_or(0));
        }
        Ok(out)
    }

    /// Verifies heap blocks `start..=end`. When the server cannot read a page (an
    /// invalid page header, a failed data checksum, a short read), the range is
    /// halved until the unreadable block is found, and the rest is still checked.
    async fn heap(
        &self,
        tx: &TxGuard,
        rel: usize,
        start: i64,
        end: i64,
        control: &Control,
    ) -> Result<JobOut> {
        let relation = &self.relations[rel];
        let check_toast = relation.kind == RelationKind::Heap;
        let mut out = JobOut::default();
        out.blocks
            .push((rel, u64::try_from(end - start + 1).unwrap_or(0)));
        let mut by_block: BTreeMap<(usize, i64), Vec<Message>> = BTreeMap::new();
        let mut ranges = vec![(start, end)];
        while let Some((s, e)) = ranges.pop() {
            control.checkpoint()?;
            let res = in_savepoint(
                tx,
                tx.query(
                    "SELECT blkno, offnum, attnum, msg FROM verify_heapam($1::oid::regclass, \
                     on_error_stop => false, check_toast => $2, skip => 'none', \
                     startblock => $3, endblock => $4)",
                    &[&relation.oid, &check_toast, &s, &e],
                ),
                || format!("verifying blocks {s}..={e} of {}", relation.name),
            )
            .await?;
            match res {
                Ok(rows) => {
                    for r in rows {
                        by_block.entry((rel, r.get(0))).or_default().push(Message {
                            offset: r.get(1),
                            attnum: r.get(2),
                            text: r.get(3),
                            server: None,
                        });
                    }
                }
                Err(_) if s < e => {
                    let mid = s + (e - s) / 2;
                    ranges.push((mid + 1, e));
                    ranges.push((s, mid));
                }
                Err(server) => {
                    let (at, block) = self.locate(rel, s, &server);
                    by_block.entry((at, block)).or_default().push(Message {
                        offset: None,
                        attnum: None,
                        text: server.message.clone(),
                        server: Some(server),
                    });
                }
            }
        }
        out.findings = by_block
            .into_iter()
            .map(|((rel, block), messages)| Finding {
                rel,
                block: Some(block),
                messages,
            })
            .collect();
        Ok(out)
    }

    /// Checks an index: its own pages, or (`heapallindexed`) that every tuple of
    /// its heap has an entry. A page the server cannot read is blamed on the
    /// relation the server names, which for `heapallindexed` may be the heap.
    async fn index(&self, tx: &TxGuard, rel: usize, heapallindexed: bool) -> Result<JobOut> {
        let relation = &self.relations[rel];
        let mut out = JobOut::default();
        let res = in_savepoint(
            tx,
            tx.query(
                "SELECT bt_index_check($1::oid::regclass, $2)",
                &[&relation.oid, &heapallindexed],
            ),
            || format!("verifying index {}", relation.name),
        )
        .await?;
        match res {
            Ok(_) if heapallindexed => out.heap_checked_indexes.push(rel),
            Ok(_) => out.sound_indexes.push(rel),
            Err(server) => {
                let (at, block) = match block_and_path(&server.message) {
                    Some((block, path)) => (
                        path.and_then(|p| self.by_path(&p)).unwrap_or(rel),
                        Some(block),
                    ),
                    None => (rel, None),
                };
                out.findings.push(Finding {
                    rel: at,
                    block,
                    messages: vec![Message {
                        offset: None,
                        attnum: None,
                        text: server.message.clone(),
                        server: Some(server),
                    }],
                });
            }
        }
        Ok(out)
    }

    /// Where an unreadable single block `block` of relation `rel` really is: the
    /// relation and block the server's message names (a TOAST page read through
    /// its table), else `rel` itself.
    fn locate(&self, rel: usize, block: i64, server: &ServerError) -> (usize, i64) {
        match block_and_path(&server.message) {
            Some((b, Some(path))) => match self.by_path(&path) {
                Some(other) => (other, b),
                None => (rel, block),
            },
            _ => (rel, block),
        }
    }

    fn by_path(&self, path: &str) -> Option<usize> {
        self.relations
            .iter()
            .position(|r| r.path.as_deref() == Some(path))
    }
}

/// Runs `query` in a savepoint: `Ok(Ok(rows))`, or `Ok(Err(server error))` when
/// the server says a page is damaged (rolled back to the savepoint so that the
/// transaction goes on), or `Err` for any other failure.
async fn in_savepoint<T>(
    tx: &TxGuard,
    query: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    what: impl FnOnce() -> String,
) -> Result<Result<T, ServerError>> {
    tx.batch_execute("SAVEPOINT physical")
        .await
        .context("starting a physical check")?;
    match query.await.with_context(what) {
        Ok(v) => {
            tx.batch_execute("RELEASE SAVEPOINT physical")
                .await
                .context("ending a physical check")?;
            Ok(Ok(v))
        }
        Err(e) => match e.server().filter(|s| is_damage(s)).cloned() {
            Some(server) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT physical")
                    .await
                    .context("recovering from a damaged page")?;
                Ok(Err(server))
            }
            None => Err(e),
        },
    }
}

/// Whether the server's error says that stored data is damaged: the data
/// corruption class (`XX001` data_corrupted: an invalid page, a failed data
/// checksum, a short read; `XX002` index_corrupted) or an I/O error reading a
/// file (`58030`).
fn is_damage(server: &ServerError) -> bool {
    server.is_data_corrupted() || server.code == "58030"
}
