//! What a physical check found, as issues (one per damaged block, one per damaged
//! index) and per-table reports.

use serde::{Deserialize, Serialize};

use sanare_core::{CorruptionKind, TableRef};

use super::PhysicalReport;
use super::check::{Finding, JobOut};
use super::relations::{Relation, RelationKind};
use crate::issue::{CorruptionIssue, Layer};

/// One relation a physical check covered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RelationReport {
    /// `schema.name`.
    pub relation: String,
    /// Heap, TOAST table or index.
    pub kind: RelationKind,
    /// The table it belongs to (a partition, for a partitioned table).
    pub table: TableRef,
    /// Its size in blocks when the check started.
    pub blocks: u64,
    /// Damaged blocks found in it (an index with damage but no block number counts
    /// once).
    pub damaged_blocks: u64,
}

/// The issues of `findings`: a heap or TOAST finding is one damaged block
/// ([`CorruptionKind::Metadata`]), an index finding a damaged index
/// ([`CorruptionKind::Index`]), each with PostgreSQL's messages.
pub(crate) fn issues(relations: &[Relation], findings: &[Finding]) -> Vec<CorruptionIssue> {
    findings
        .iter()
        .map(|f| {
            let r = &relations[f.rel];
            let messages: Vec<serde_json::Value> = f
                .messages
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "offset": m.offset, "attnum": m.attnum, "message": m.text,
                        "server": m.server,
                    })
                })
                .collect();
            let first = f.messages.first().map_or("", |m| m.text.as_str());
            let more = match f.messages.len() {
                0 | 1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            };
            let block = f.block.map_or_else(String::new, |b| format!(" block {b}"));
            let affected = serde_json::json!({
                "relation": r.name,
                "relation_kind": r.kind,
                "block": f.block,
                "messages": messages,
            });
            match r.kind {
                RelationKind::Index => {
                    let name = r.name.rsplit_once('.').map_or(r.name.as_str(), |(_, n)| n);
                    CorruptionIssue::new(
                        r.table.clone(),
                        CorruptionKind::Index,
                        Layer::Physical,
                        format!(
                            "index {}{block} of {} is damaged: {first}{more}",
                            r.name, r.table
                        ),
                    )
                    .with_index(name.to_owned())
                    .with_affected(affected)
                }
                RelationKind::Heap | RelationKind::Toast => {
                    let what = if r.kind == RelationKind::Toast {
                        format!("TOAST table {} of {}", r.name, r.table)
                    } else {
                        format!("heap of {}", r.table)
                    };
                    CorruptionIssue::new(
                        r.table.clone(),
                        CorruptionKind::Metadata,
                        Layer::Physical,
                        format!("{what}{block} is damaged: {first}{more}"),
                    )
                    .with_affected(affected)
                }
            }
        })
        .collect()
}

/// Fills the per-table reports (in the caller's order) from what the run found.
pub(crate) fn fill(
    reports: &mut [PhysicalReport],
    relations: &[Relation],
    out: JobOut,
    issues: Vec<CorruptionIssue>,
) {
    let mut blocks = vec![0u64; relations.len()];
    for (rel, n) in &out.blocks {
        blocks[*rel] += n;
    }
    let mut damaged = vec![0u64; relations.len()];
    for f in &out.findings {
        damaged[f.rel] += 1;
    }
    for (i, r) in relations.iter().enumerate() {
        let report = &mut reports[r.owner];
        if r.kind == RelationKind::Index {
            if out.sound_indexes.contains(&i) || damaged[i] > 0 {
                report.indexes_checked.push(r.name.clone());
            }
        } else {
            report.heap_blocks_checked += blocks[i];
        }
        report.relations.push(RelationReport {
            relation: r.name.clone(),
            kind: r.kind,
            table: r.table.clone(),
            blocks: u64::try_from(r.blocks).unwrap_or(0),
            damaged_blocks: damaged[i],
        });
    }
    for (f, issue) in out.findings.iter().zip(issues) {
        reports[relations[f.rel].owner].issues.push(issue);
    }
}
