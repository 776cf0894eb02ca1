//! Alerts and where they go.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{AlertId, Result, Severity, TableRef};

/// A notification for a human: what happened, how bad, where.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Alert {
    /// Unique id of this alert.
    pub id: AlertId,
    /// How bad.
    pub severity: Severity,
    /// A one-line title.
    pub title: String,
    /// A few lines of what happened and what to do.
    pub summary: String,
    /// What raised it (`"corruption"`, `"recovery"`).
    pub source: String,
    /// A stable key: alerts with the same key are about the same problem (PagerDuty
    /// dedup key), so a resolve closes the trigger.
    pub dedup_key: String,
    /// The table concerned, if one is.
    pub table: Option<TableRef>,
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    /// Whether this alert resolves an earlier one with the same `dedup_key`.
    pub resolved: bool,
    /// Structured facts.
    pub details: serde_json::Value,
}

impl Alert {
    /// A new, unresolved alert occurring now.
    pub fn new(
        severity: Severity,
        source: impl Into<String>,
        dedup_key: impl Into<String>,
        title: impl Into<String>,
        summary: impl Into<String>,
    ) -> Self {
        Self {
            id: AlertId::new(),
            severity,
            title: title.into(),
            summary: summary.into(),
            source: source.into(),
            dedup_key: dedup_key.into(),
            table: None,
            occurred_at: crate::now(),
            resolved: false,
            details: serde_json::Value::Null,
        }
    }
}

/// A destination for alerts (webhook, Slack, PagerDuty, email, the host's own).
///
/// # Contract
/// `send` delivers one alert or returns an error saying why; it may take as long as
/// one network round trip with its own timeout, and must not retry internally (the
/// caller owns batching, rate limits and retries with backoff, so detection is never
/// blocked by a slow sink).
#[async_trait]
pub trait AlertSink: Send + Sync {
    /// A short name for logs (`"slack"`).
    fn name(&self) -> &str;

    /// Delivers one alert.
    async fn send(&self, alert: &Alert) -> Result<()>;
}
