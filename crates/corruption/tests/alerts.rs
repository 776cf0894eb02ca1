//! Alert sinks against real local HTTP and SMTP receivers started by the tests.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sanare_core::{Alert, AlertSink, Severity, TableRef};
use sanare_corruption::{
    AlertDispatcher, EmailSink, PagerDutySink, Route, SlackSink, WebhookSink,
    standard_webhooks_signature,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

#[derive(Debug)]
struct Received {
    path: String,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// An HTTP receiver on 127.0.0.1:0 answering with the queued statuses (then 200).
async fn receiver(statuses: Vec<u16>) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let statuses = Arc::new(Mutex::new(VecDeque::from(statuses)));
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            let statuses = statuses.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    let statuses = statuses.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let headers = req.headers().clone();
                        let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                        let status = statuses.lock().unwrap().pop_front().unwrap_or(200);
                        let _ = tx.send(Received {
                            path,
                            headers,
                            body,
                        });
                        Ok::<_, hyper::Error>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"ok")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("nothing received within 15 s")
        .expect("receiver closed")
}

fn alert(sev: Severity, key: &str) -> Alert {
    let mut a = Alert::new(
        sev,
        "corruption",
        key,
        format!("bit_flip corruption in public.accounts ({key})"),
        "email of row 7 is damaged",
    );
    a.table = Some(TableRef::new("public", "accounts"));
    a.details = serde_json::json!({ "kind": "bit_flip", "column": "email" });
    a
}

#[tokio::test]
async fn webhooks_are_signed_per_standard_webhooks() {
    let (addr, mut rx) = receiver(vec![]).await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let sink = WebhookSink::new(format!("http://{addr}/hook"), secret).unwrap();
    let a = alert(Severity::High, "k1");
    sink.send(&a).await.unwrap();
    let got = next(&mut rx).await;
    assert_eq!(got.path, "/hook");
    let id = got.headers["webhook-id"].to_str().unwrap().to_owned();
    let ts: i64 = got.headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let sig = got.headers["webhook-signature"].to_str().unwrap();
    assert_eq!(id, format!("msg_{}", a.id.as_uuid().simple()));
    assert!((sanare_core::now().unix_timestamp() - ts).abs() < 60);
    let key = base64::engine::general_purpose::STANDARD
        .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .unwrap();
    assert_eq!(sig, standard_webhooks_signature(&key, &id, ts, &got.body));
    // And a tampered body would not verify.
    assert_ne!(sig, standard_webhooks_signature(&key, &id, ts, b"{}"));
    let body = got.json();
    assert_eq!(body["schema"], "sanare.alert/v1");
    assert_eq!(body["type"], "corruption.detected");
    assert_eq!(body["data"]["severity"], "high");
    assert_eq!(body["data"]["dedup_key"], "k1");
    assert_eq!(body["data"]["table"]["name"], "accounts");
    assert_eq!(body["data"]["details"]["column"], "email");
    assert_eq!(got.headers["content-type"], "application/json");
}

#[tokio::test]
async fn slack_gets_an_incoming_webhook_message() {
    let (addr, mut rx) = receiver(vec![]).await;
    let sink = SlackSink::new(format!("http://{addr}/services/T/B/X")).unwrap();
    sink.send(&alert(Severity::Critical, "k2")).await.unwrap();
    let body = next(&mut rx).await.json();
    assert_eq!(
        body["text"],
        ":rotating_light: [critical] bit_flip corruption in public.accounts (k2)"
    );
    assert_eq!(body["blocks"][0]["type"], "section");
    assert!(
        body["blocks"][0]["text"]["text"]
            .as_str()
            .unwrap()
            .contains("email of row 7 is damaged")
    );
    assert!(
        body["blocks"][1]["elements"][0]["text"]
            .as_str()
            .unwrap()
            .contains("table: public.accounts")
    );
}

#[tokio::test]
async fn pagerduty_triggers_and_resolves_with_one_dedup_key() {
    let (addr, mut rx) = receiver(vec![]).await;
    let sink = PagerDutySink::new("R0UT1NGKEY")
        .unwrap()
        .endpoint(format!("http://{addr}/v2/enqueue"));
    let mut a = alert(
        Severity::Critical,
        "corruption:bit_flip:public.accounts:id=7:email:",
    );
    sink.send(&a).await.unwrap();
    a.resolved = true;
    sink.send(&a).await.unwrap();
    let t = next(&mut rx).await;
    assert_eq!(t.path, "/v2/enqueue");
    let t = t.json();
    assert_eq!(t["routing_key"], "R0UT1NGKEY");
    assert_eq!(t["event_action"], "trigger");
    assert_eq!(t["payload"]["severity"], "critical");
    assert_eq!(t["payload"]["source"], "corruption");
    assert_eq!(t["payload"]["component"], "public.accounts");
    assert_eq!(t["payload"]["class"], "bit_flip");
    assert!(
        t["payload"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("bit_flip corruption")
    );
    let r = next(&mut rx).await.json();
    assert_eq!(r["event_action"], "resolve");
    assert_eq!(r["dedup_key"], t["dedup_key"]);
    assert_eq!(
        r["dedup_key"],
        "corruption:bit_flip:public.accounts:id=7:email:"
    );
}

#[tokio::test]
async fn a_failing_endpoint_is_an_error_with_its_status() {
    let (addr, _rx) = receiver(vec![503]).await;
    let sink = SlackSink::new(format!("http://{addr}/x")).unwrap();
    let err = sink.send(&alert(Severity::High, "k")).await.unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    // Nothing listening at all.
    let sink = SlackSink::new("http://127.0.0.1:1/x").unwrap();
    assert!(sink.send(&alert(Severity::High, "k")).await.is_err());
}

#[tokio::test]
async fn the_dispatcher_routes_by_severity_batches_retries_and_rate_limits() {
    let (pd_addr, mut pd) = receiver(vec![500, 500]).await; // two failures, then OK
    let (slack_addr, mut slack) = receiver(vec![]).await;
    let dispatcher = AlertDispatcher::builder()
        .route(
            Route::new(Arc::new(
                PagerDutySink::new("rk")
                    .unwrap()
                    .endpoint(format!("http://{pd_addr}/")),
            ))
            .min_severity(Severity::Critical)
            .batch(false),
        )
        .route(
            Route::new(Arc::new(
                SlackSink::new(format!("http://{slack_addr}/")).unwrap(),
            ))
            .per_minute(1),
        )
        .batch_window(Duration::from_millis(300))
        .retries(4, Duration::from_millis(20))
        .build();
    // Enqueueing never waits for the network.
    let started = std::time::Instant::now();
    dispatcher.send(&alert(Severity::High, "a")).await.unwrap();
    dispatcher
        .send(&alert(Severity::Critical, "b"))
        .await
        .unwrap();
    dispatcher
        .send(&alert(Severity::Medium, "c"))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));

    // PagerDuty: only the critical one, delivered on the third attempt.
    for _ in 0..3 {
        let got = next(&mut pd).await.json();
        assert_eq!(got["dedup_key"], "b");
    }
    // Slack: one batched message of all three.
    let batch = next(&mut slack).await.json();
    assert!(
        batch["text"]
            .as_str()
            .unwrap()
            .contains("3 corruption alerts"),
        "{batch}"
    );
    let text = batch["blocks"][0]["text"]["text"].as_str().unwrap();
    assert!(
        text.contains("(a)") && text.contains("(b)") && text.contains("(c)"),
        "{text}"
    );

    // The Slack route allows one delivery a minute: the next is suppressed.
    dispatcher.send(&alert(Severity::High, "d")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while dispatcher.stats().rate_limited == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let s = dispatcher.stats();
    assert_eq!(s.delivered, 2);
    assert_eq!(s.retried, 2);
    assert_eq!(s.rate_limited, 1);
    assert!(slack.try_recv().is_err());
}

#[tokio::test]
async fn a_full_queue_drops_instead_of_blocking() {
    // An endpoint that never answers: the worker is stuck on its first delivery.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            conns.push(s);
        }
    });
    let dispatcher = AlertDispatcher::builder()
        .route(
            Route::new(Arc::new(SlackSink::new(format!("http://{addr}/")).unwrap())).batch(false),
        )
        .queue_capacity(2)
        .build();
    let started = std::time::Instant::now();
    let mut errors = 0;
    for i in 0..10 {
        if dispatcher
            .send(&alert(Severity::High, &i.to_string()))
            .await
            .is_err()
        {
            errors += 1;
        }
    }
    assert!(started.elapsed() < Duration::from_millis(200));
    assert!(errors >= 7, "{errors}");
    assert_eq!(dispatcher.stats().dropped, errors);
}

/// A minimal SMTP receiver: accepts one session and returns the DATA it got.
async fn smtp_receiver() -> (u16, tokio::sync::oneshot::Receiver<(Vec<String>, String)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"220 localhost test SMTP\r\n").await.unwrap();
        let mut rcpts = Vec::new();
        let mut data = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            let cmd = line.trim_end().to_ascii_uppercase();
            if cmd.starts_with("EHLO") || cmd.starts_with("HELO") {
                w.write_all(b"250-localhost\r\n250 8BITMIME\r\n")
                    .await
                    .unwrap();
            } else if cmd.starts_with("MAIL FROM") {
                w.write_all(b"250 OK\r\n").await.unwrap();
            } else if cmd.starts_with("RCPT TO") {
                rcpts.push(line.trim_end()[8..].to_owned());
                w.write_all(b"250 OK\r\n").await.unwrap();
            } else if cmd == "DATA" {
                w.write_all(b"354 go ahead\r\n").await.unwrap();
                loop {
                    line.clear();
                    r.read_line(&mut line).await.unwrap();
                    if line == ".\r\n" {
                        break;
                    }
                    data.push_str(&line);
                }
                w.write_all(b"250 queued\r\n").await.unwrap();
            } else if cmd == "QUIT" {
                w.write_all(b"221 bye\r\n").await.unwrap();
                break;
            } else {
                w.write_all(b"250 OK\r\n").await.unwrap();
            }
        }
        let _ = tx.send((rcpts, data));
    });
    (port, rx)
}

#[tokio::test]
async fn email_goes_through_a_real_smtp_session() {
    let (port, rx) = smtp_receiver().await;
    let sink = EmailSink::new(
        "127.0.0.1",
        port,
        "sanare <sanare@example.com>",
        &["ops@example.com", "dba@example.com"],
    )
    .unwrap();
    sink.send(&alert(Severity::Critical, "mail-key"))
        .await
        .unwrap();
    drop(sink);
    let (rcpts, data) = tokio::time::timeout(Duration::from_secs(15), rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rcpts, vec!["<ops@example.com>", "<dba@example.com>"]);
    assert!(
        data.contains(
            "Subject: [sanare critical] bit_flip corruption in public.accounts (mail-key)"
        ),
        "{data}"
    );
    assert!(data.contains("From: sanare <sanare@example.com>"), "{data}");
    assert!(data.contains("email of row 7 is damaged"), "{data}");
    assert!(data.contains("dedup key: mail-key"), "{data}");
    assert!(EmailSink::new("127.0.0.1", port, "not an address", &["a@b.c"]).is_err());
}
