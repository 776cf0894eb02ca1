//! Alerts: routing, batching, rate limits and retries ([`AlertDispatcher`]) in front
//! of the sinks (generic webhook signed per Standard Webhooks, Slack, PagerDuty
//! Events API v2, email over SMTP).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use sanare_core::{Alert, AlertSink, Error, Result, Severity};

// ---------------------------------------------------------------- dispatcher

/// Counters of an [`AlertDispatcher`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DispatchStats {
    /// Deliveries that succeeded (a batch counts once).
    pub delivered: u64,
    /// Deliveries that failed after every retry.
    pub failed: u64,
    /// Retries made.
    pub retried: u64,
    /// Alerts dropped because a route's queue was full.
    pub dropped: u64,
    /// Alerts suppressed by a rate limit.
    pub rate_limited: u64,
}

#[derive(Default, Debug)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dropped: AtomicU64,
    rate_limited: AtomicU64,
}

/// One destination of an [`AlertDispatcher`] and its policy.
#[derive(Clone)]
#[non_exhaustive]
pub struct Route {
    /// The sink.
    pub sink: Arc<dyn AlertSink>,
    /// Alerts below this severity are not sent here.
    pub min_severity: Severity,
    /// Merge unresolved alerts arriving within the batch window into one alert.
    /// Off for PagerDuty, whose incidents are keyed by each alert's dedup key.
    pub batch: bool,
    /// At most this many deliveries per minute (token bucket); `0` is unlimited.
    pub per_minute: u32,
}

impl Route {
    /// A route for `sink` receiving every severity, batched, at most 30 per minute.
    pub fn new(sink: Arc<dyn AlertSink>) -> Self {
        Self {
            sink,
            min_severity: Severity::Low,
            batch: true,
            per_minute: 30,
        }
    }

    /// Only alerts at or above `severity`.
    pub fn min_severity(mut self, severity: Severity) -> Self {
        self.min_severity = severity;
        self
    }

    /// Whether to batch.
    pub fn batch(mut self, batch: bool) -> Self {
        self.batch = batch;
        self
    }

    /// Deliveries per minute (`0`: unlimited).
    pub fn per_minute(mut self, per_minute: u32) -> Self {
        self.per_minute = per_minute;
        self
    }
}

/// Builds an [`AlertDispatcher`].
#[must_use]
pub struct AlertDispatcherBuilder {
    routes: Vec<Route>,
    queue: usize,
    batch_window: Duration,
    max_batch: usize,
    attempts: u32,
    backoff: Duration,
    max_backoff: Duration,
}

impl Default for AlertDispatcherBuilder {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            queue: 1024,
            batch_window: Duration::from_secs(2),
            max_batch: 50,
            attempts: 5,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl AlertDispatcherBuilder {
    /// Adds a route.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// Alerts queued per route before new ones are dropped (default 1024).
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue = n.max(1);
        self
    }

    /// How long a route waits for more alerts to batch (default 2 s).
    pub fn batch_window(mut self, window: Duration) -> Self {
        self.batch_window = window;
        self
    }

    /// Delivery attempts per alert (default 5) and the first backoff (default
    /// 500 ms, doubling up to 60 s).
    pub fn retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.backoff = backoff;
        self
    }

    /// Starts one worker task per route on the current tokio runtime.
    pub fn build(self) -> AlertDispatcher {
        let counters = Arc::new(Counters::default());
        let mut routes = Vec::new();
        for route in self.routes {
            let (tx, rx) = mpsc::channel(self.queue);
            let policy = Policy {
                batch_window: self.batch_window,
                max_batch: self.max_batch,
                attempts: self.attempts,
                backoff: self.backoff,
                max_backoff: self.max_backoff,
            };
            tokio::spawn(route_worker(
                route.clone(),
                policy,
                rx,
                Arc::clone(&counters),
            ));
            routes.push((route.min_severity, route.sink.name().to_owned(), tx));
        }
        AlertDispatcher { routes, counters }
    }
}

#[derive(Clone, Copy)]
struct Policy {
    batch_window: Duration,
    max_batch: usize,
    attempts: u32,
    backoff: Duration,
    max_backoff: Duration,
}

/// Routes alerts to sinks by severity, batching, rate-limiting and retrying with
/// exponential backoff in background tasks. Itself an [`AlertSink`] whose `send`
/// only enqueues: it never waits for a network, so detection is never blocked.
pub struct AlertDispatcher {
    routes: Vec<(Severity, String, mpsc::Sender<Alert>)>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for AlertDispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertDispatcher")
            .field(
                "routes",
                &self.routes.iter().map(|r| &r.1).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl AlertDispatcher {
    /// A builder.
    pub fn builder() -> AlertDispatcherBuilder {
        AlertDispatcherBuilder::default()
    }

    /// Counters so far.
    pub fn stats(&self) -> DispatchStats {
        DispatchStats {
            delivered: self.counters.delivered.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            retried: self.counters.retried.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            rate_limited: self.counters.rate_limited.load(Ordering::Relaxed),
        }
    }
}

#[async_trait]
impl AlertSink for AlertDispatcher {
    fn name(&self) -> &str {
        "dispatcher"
    }

    /// Enqueues `alert` on every route whose minimum severity it meets. Resolving
    /// alerts go to every route. Fails only when a route's queue is full (the alert
    /// is dropped there and counted).
    async fn send(&self, alert: &Alert) -> Result<()> {
        let mut full = Vec::new();
        for (min, name, tx) in &self.routes {
            if alert.severity < *min && !alert.resolved {
                continue;
            }
            if tx.try_send(alert.clone()).is_err() {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("sanare_alerts_dropped_total", "sink" => name.clone())
                    .increment(1);
                full.push(name.clone());
            }
        }
        if full.is_empty() {
            Ok(())
        } else {
            Err(Error::unavailable(format!(
                "alert queue full for {}; alert dropped (the sink is slow or down)",
                full.join(", ")
            )))
        }
    }
}

async fn route_worker(
    route: Route,
    policy: Policy,
    mut rx: mpsc::Receiver<Alert>,
    c: Arc<Counters>,
) {
    let mut bucket = Bucket::new(route.per_minute);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        if route.batch && !policy.batch_window.is_zero() {
            let deadline = tokio::time::Instant::now() + policy.batch_window;
            while batch.len() < policy.max_batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(a)) => batch.push(a),
                    _ => break,
                }
            }
        }
        let (resolved, open): (Vec<Alert>, Vec<Alert>) =
            batch.into_iter().partition(|a| a.resolved);
        let mut deliveries = resolved;
        if route.batch && open.len() > 1 {
            deliveries.push(merge(open));
        } else {
            deliveries.extend(open);
        }
        for alert in deliveries {
            if !bucket.take() {
                c.rate_limited.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sink = route.sink.name(), title = %alert.title, "alert rate-limited");
                continue;
            }
            deliver(&*route.sink, &alert, policy, &c).await;
        }
    }
}

async fn deliver(sink: &dyn AlertSink, alert: &Alert, p: Policy, c: &Counters) {
    let mut backoff = p.backoff;
    for attempt in 1..=p.attempts {
        match sink.send(alert).await {
            Ok(()) => {
                c.delivered.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("sanare_alerts_delivered_total", "sink" => sink.name().to_owned()).increment(1);
                return;
            }
            Err(e) if attempt < p.attempts => {
                c.retried.fetch_add(1, Ordering::Relaxed);
                tracing::info!(sink = sink.name(), attempt, error = %e, "alert delivery failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(p.max_backoff);
            }
            Err(e) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sink = sink.name(), error = %e, "alert delivery failed; giving up");
            }
        }
    }
}

/// Several alerts as one: the highest severity, a summary listing each.
fn merge(alerts: Vec<Alert>) -> Alert {
    let severity = alerts
        .iter()
        .map(|a| a.severity)
        .max()
        .unwrap_or(Severity::Low);
    let summary = alerts
        .iter()
        .map(|a| format!("- [{}] {}", a.severity, a.title))
        .collect::<Vec<_>>()
        .join("\n");
    let mut merged = Alert::new(
        severity,
        alerts.first().map_or("corruption", |a| a.source.as_str()),
        format!(
            "batch:{}",
            alerts
                .iter()
                .map(|a| a.dedup_key.as_str())
                .collect::<Vec<_>>()
                .join("|")
        ),
        format!("{} corruption alerts", alerts.len()),
        summary,
    );
    merged.details = serde_json::json!({ "alerts": alerts });
    merged
}

struct Bucket {
    per_minute: u32,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            tokens: f64::from(per_minute),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let now = Instant::now();
        let rate = f64::from(self.per_minute) / 60.0;
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate)
            .min(f64::from(self.per_minute));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

// ---------------------------------------------------------------- HTTP sinks

fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| Error::other("building the HTTP client for alerts", e))
}

async fn post(client: &reqwest::Client, req: reqwest::RequestBuilder, what: &str) -> Result<()> {
    let _ = client;
    let resp = req
        .send()
        .await
        .map_err(|e| Error::unavailable(format!("{what}: {e}")))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body = resp.text().await.unwrap_or_default();
    Err(Error::unavailable(format!(
        "{what}: HTTP {status}: {}",
        body.chars().take(200).collect::<String>()
    )))
}

/// The Standard Webhooks signature of a message: `v1,` + base64 of
/// HMAC-SHA256(`secret`, `"{id}.{timestamp}.{body}"`).
pub fn standard_webhooks_signature(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The webhook body of an alert: `{"schema": "sanare.alert/v1", "type":
/// "corruption.detected" | "corruption.resolved", "timestamp": RFC 3339, "data":
/// <the alert>}` (see `docs/formats.md`).
pub fn webhook_payload(alert: &Alert) -> serde_json::Value {
    serde_json::json!({
        "schema": WEBHOOK_SCHEMA,
        "type": if alert.resolved { "corruption.resolved" } else { "corruption.detected" },
        "timestamp": alert.occurred_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "data": alert,
    })
}

/// The magic and version of the webhook body.
pub const WEBHOOK_SCHEMA: &str = "sanare.alert/v1";

/// A generic webhook: POSTs `{"type", "timestamp", "data": <alert>}` signed per
/// Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
#[derive(Debug)]
pub struct WebhookSink {
    url: String,
    secret: Vec<u8>,
    client: reqwest::Client,
}

impl WebhookSink {
    /// A webhook to `url` signed with `secret` (`whsec_` + base64, as Standard
    /// Webhooks issues them; raw bytes of the text otherwise).
    pub fn new(url: impl Into<String>, secret: &str) -> Result<Self> {
        let secret = match secret.strip_prefix("whsec_") {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| {
                    Error::config(
                        "alerts.webhook.secret",
                        format!("not valid base64 after `whsec_`: {e}"),
                    )
                })?,
            None => secret.as_bytes().to_vec(),
        };
        if secret.is_empty() {
            return Err(Error::config("alerts.webhook.secret", "must not be empty"));
        }
        Ok(Self {
            url: url.into(),
            secret,
            client: http_client(Duration::from_secs(10))?,
        })
    }
}

#[async_trait]
impl AlertSink for WebhookSink {
    fn name(&self) -> &str {
        "webhook"
    }

    async fn send(&self, alert: &Alert) -> Result<()> {
        let body = serde_json::to_vec(&webhook_payload(alert))
            .map_err(|e| Error::other("encoding a webhook payload", e))?;
        let id = format!("msg_{}", alert.id.as_uuid().simple());
        let ts = sanare_core::now().unix_timestamp();
        let sig = standard_webhooks_signature(&self.secret, &id, ts, &body);
        let req = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(body);
        post(&self.client, req, "sending a webhook alert").await
    }
}

/// A Slack incoming webhook.
#[derive(Debug)]
pub struct SlackSink {
    url: String,
    client: reqwest::Client,
}

impl SlackSink {
    /// Posts to the incoming-webhook `url`.
    pub fn new(url: impl Into<String>) -> Result<Self> {
        Ok(Self {
            url: url.into(),
            client: http_client(Duration::from_secs(10))?,
        })
    }
}

/// The Slack message of an alert.
pub fn slack_payload(alert: &Alert) -> serde_json::Value {
    let icon = match (alert.resolved, alert.severity) {
        (true, _) => ":white_check_mark:",
        (_, Severity::Critical) => ":rotating_light:",
        (_, Severity::High) => ":red_circle:",
        (_, Severity::Medium) => ":large_orange_circle:",
        (_, Severity::Low) => ":large_blue_circle:",
    };
    let text = format!("{icon} [{}] {}", alert.severity, alert.title);
    serde_json::json!({
        "text": text,
        "blocks": [
            { "type": "section", "text": { "type": "mrkdwn", "text": format!("*{text}*\n{}", alert.summary) } },
            { "type": "context", "elements": [ { "type": "mrkdwn", "text": format!(
                "source: {} · table: {} · key: `{}`",
                alert.source,
                alert.table.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string),
                alert.dedup_key
            ) } ] }
        ]
    })
}

#[async_trait]
impl AlertSink for SlackSink {
    fn name(&self) -> &str {
        "slack"
    }

    async fn send(&self, alert: &Alert) -> Result<()> {
        let req = self.client.post(&self.url).json(&slack_payload(alert));
        post(&self.client, req, "sending a Slack alert").await
    }
}

/// PagerDuty Events API v2: triggers an incident per dedup key, resolves it when a
/// resolving alert with the same key arrives.
#[derive(Debug)]
pub struct PagerDutySink {
    routing_key: String,
    endpoint: String,
    client: reqwest::Client,
}

impl PagerDutySink {
    /// The public endpoint.
    pub const DEFAULT_ENDPOINT: &'static str = "https://events.pagerduty.com/v2/enqueue";

    /// Sends to the service with integration (routing) key `routing_key`.
    pub fn new(routing_key: impl Into<String>) -> Result<Self> {
        Ok(Self {
            routing_key: routing_key.into(),
            endpoint: Self::DEFAULT_ENDPOINT.into(),
            client: http_client(Duration::from_secs(10))?,
        })
    }

    /// Sends to `endpoint` instead (a proxy, a test receiver).
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into();
        self
    }
}

/// The PagerDuty Events v2 body of an alert (the dedup key is the alert's, so a
/// resolve closes the trigger).
pub fn pagerduty_payload(routing_key: &str, alert: &Alert) -> serde_json::Value {
    if alert.resolved {
        return serde_json::json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": alert.dedup_key,
        });
    }
    let severity = match alert.severity {
        Severity::Critical => "critical",
        Severity::High => "error",
        Severity::Medium => "warning",
        Severity::Low => "info",
    };
    let mut title: String = alert.title.chars().take(1024).collect();
    if title.is_empty() {
        title = "corruption".into();
    }
    serde_json::json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": alert.dedup_key,
        "payload": {
            "summary": title,
            "source": alert.source,
            "severity": severity,
            "timestamp": alert.occurred_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "component": alert.table.as_ref().map(ToString::to_string),
            "class": alert.details.get("kind"),
            "custom_details": { "summary": alert.summary, "details": alert.details },
        }
    })
}

#[async_trait]
impl AlertSink for PagerDutySink {
    fn name(&self) -> &str {
        "pagerduty"
    }

    async fn send(&self, alert: &Alert) -> Result<()> {
        let req = self
            .client
            .post(&self.endpoint)
            .json(&pagerduty_payload(&self.routing_key, alert));
        post(&self.client, req, "sending a PagerDuty event").await
    }
}

// ---------------------------------------------------------------- email

/// Email over SMTP (lettre), plain SMTP to a relay (a local MTA or a relay on a
/// private network); credentials are optional.
pub struct EmailSink {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    from: lettre::message::Mailbox,
    to: Vec<lettre::message::Mailbox>,
}

impl std::fmt::Debug for EmailSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailSink")
            .field("from", &self.from)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

impl EmailSink {
    /// Mail from `from` to every address of `to` through the SMTP relay at
    /// `host:port`.
    pub fn new(host: &str, port: u16, from: &str, to: &[&str]) -> Result<Self> {
        let parse = |a: &str| {
            a.parse::<lettre::message::Mailbox>().map_err(|e| {
                Error::config(
                    "alerts.email",
                    format!("`{a}` is not an email address: {e}"),
                )
            })
        };
        if to.is_empty() {
            return Err(Error::config(
                "alerts.email.to",
                "at least one recipient is required",
            ));
        }
        Ok(Self {
            transport: lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(
                host,
            )
            .port(port)
            .timeout(Some(Duration::from_secs(10)))
            .build(),
            from: parse(from)?,
            to: to.iter().map(|a| parse(a)).collect::<Result<_>>()?,
        })
    }

    /// With SMTP credentials.
    pub fn credentials(mut self, host: &str, port: u16, user: &str, password: &str) -> Self {
        self.transport =
            lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(host)
                .port(port)
                .timeout(Some(Duration::from_secs(10)))
                .credentials(lettre::transport::smtp::authentication::Credentials::new(
                    user.to_owned(),
                    password.to_owned(),
                ))
                .build();
        self
    }
}

#[async_trait]
impl AlertSink for EmailSink {
    fn name(&self) -> &str {
        "email"
    }

    async fn send(&self, alert: &Alert) -> Result<()> {
        use lettre::AsyncTransport;
        let mut b = lettre::Message::builder()
            .from(self.from.clone())
            .subject(format!("[sanare {}] {}", alert.severity, alert.title));
        for to in &self.to {
            b = b.to(to.clone());
        }
        let details = serde_json::to_string_pretty(&alert.details).unwrap_or_default();
        let msg = b
            .header(lettre::message::header::ContentType::TEXT_PLAIN)
            .body(format!(
                "{}\n\nsource: {}\ndedup key: {}\noccurred at: {}\nresolved: {}\n\n{details}\n",
                alert.summary, alert.source, alert.dedup_key, alert.occurred_at, alert.resolved
            ))
            .map_err(|e| Error::other("building an alert email", e))?;
        self.transport
            .send(msg)
            .await
            .map_err(|e| Error::unavailable(format!("sending an alert email: {e}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_signature_matches_the_published_vector() {
        // The example of the Standard Webhooks specification.
        let secret = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let sig = standard_webhooks_signature(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    /// HTTPS is built in: an `https://` endpoint gets a TLS handshake (a ClientHello
    /// record: content type 22, protocol major version 3), not a refusal of the
    /// scheme.
    #[tokio::test]
    async fn https_endpoints_get_a_tls_handshake() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 3];
            sock.read_exact(&mut head).await.unwrap();
            head
        });
        let client = http_client(Duration::from_secs(5)).unwrap();
        let sent = client
            .post(format!("https://127.0.0.1:{port}/"))
            .send()
            .await;
        let head = server.await.unwrap();
        assert_eq!(&head[..2], &[0x16, 0x03], "not a TLS record: {head:?}");
        // The server hung up without answering: the request fails.
        assert!(sent.is_err());
    }

    #[test]
    fn a_rate_limit_bucket_refuses_beyond_its_burst() {
        let mut b = Bucket::new(2);
        assert!(b.take());
        assert!(b.take());
        assert!(!b.take());
        let mut unlimited = Bucket::new(0);
        assert!((0..1000).all(|_| unlimited.take()));
    }

    #[test]
    fn pagerduty_trigger_and_resolve_share_the_dedup_key() {
        let mut a = Alert::new(Severity::High, "corruption", "k1", "t", "s");
        let t = pagerduty_payload("rk", &a);
        assert_eq!(t["event_action"], "trigger");
        assert_eq!(t["payload"]["severity"], "error");
        a.resolved = true;
        let r = pagerduty_payload("rk", &a);
        assert_eq!(r["event_action"], "resolve");
        assert_eq!(r["dedup_key"], t["dedup_key"]);
    }
}
