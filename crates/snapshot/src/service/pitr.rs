//! Point-in-time restore: the latest good snapshot before T, then the journal
//! replayed from its cut up to T.

use super::*;

impl Snapshots {
    /// Restores the state at `at`: the newest good snapshot taken at or before
    /// `at` in this repository, then the journal's entries after the cut it
    /// recorded, up to those recorded at `at` (none after). A snapshot that turns
    /// out damaged while it is restored (its restore rolls back, and a verify
    /// marks it) is skipped for the one before it.
    pub async fn restore_to(&self, at: OffsetDateTime, control: &Control) -> Result<PitrOutcome> {
        let mut skipped: Vec<(SnapshotId, String)> = Vec::new();
        let restore = loop {
            let candidate = self
                .list()
                .await?
                .into_iter()
                .filter(|s| s.status == SnapshotStatus::Ready && s.created_at <= at)
                .find(|s| !skipped.iter().any(|(id, _)| *id == s.id));
            let Some(snap) = candidate else {
                return Err(Error::not_found(format!(
                    "a good snapshot taken at or before {}{}",
                    at.format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_else(|_| at.to_string()),
                    if skipped.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " ({} damaged: {})",
                            skipped.len(),
                            skipped
                                .iter()
                                .map(|(id, why)| format!("{id}: {why}"))
                                .collect::<Vec<_>>()
                                .join("; ")
                        )
                    }
                )));
            };
            match self.restore(RestoreRequest::new(snap.id), control).await {
                Ok(outcome) => break outcome,
                Err(e @ Error::Corrupt { .. }) => {
                    tracing::warn!(snapshot = %snap.id, error = %e, "point-in-time restore skips a damaged snapshot");
                    skipped.push((snap.id, e.to_string()));
                }
                Err(e) => return Err(e),
            }
        };
        let replay = match &self.inner.journal {
            Some(j) => {
                let cut = restore.journal_cut.clone().unwrap_or(JournalCut {
                    position: JournalPosition::START,
                    db_snapshot: None,
                });
                Some(
                    j.replay(
                        ReplayRequest::new(ReplayRange::After(cut)).until(at),
                        control,
                    )
                    .await?,
                )
            }
            None => None,
        };
        Ok(PitrOutcome {
            restore,
            replay,
            skipped,
        })
    }
}
