//! The publisher: one task per channel publishes org events at a steady rate through a
//! random node (`POST /api/v1/orgs/{org}/events`), one at a time per channel, so a
//! channel's messages are published in order. Each event's `data` carries the
//! publisher's content id (`cid`, also sent as the `Idempotency-Key`) and the channel's
//! sequence number (`seq`), and every attempt is recorded: status, receipt, time.
//!
//! A request that could not reach a node (connection refused: nothing was sent) is
//! retried at once on another node. Whether a `503` or a timeout is retried (with the
//! same key) is the scenario's choice.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::procs::API_KEY;

/// One logical message and what became of it.
#[derive(Debug, Clone)]
pub struct Publish {
    pub channel: String,
    pub cid: String,
    pub seq: u64,
    pub first_sent: Instant,
    /// When a 202 came back.
    pub acked_at: Option<Instant>,
    /// The receipt's id and offset.
    pub id: Option<String>,
    pub offset: Option<u64>,
    /// One entry per attempt: `202`, `503 unknown: <message>`, `timeout`, `unreachable`, …
    pub attempts: Vec<String>,
    /// A 503 whose body said `"outcome":"unknown"`.
    pub outcome_unknown: u32,
    /// A 202 with `Idempotent-Replayed: true`.
    pub replayed: bool,
}

#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub nodes: Vec<String>,
    /// Org ids; the channel is `org:{id}`.
    pub orgs: Vec<String>,
    /// Publishes per second over all channels.
    pub rate: f64,
    /// Retry a 503 or a timeout with the same key until a 202 (at most 20 attempts).
    pub retry: bool,
}

pub struct Publisher {
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<Vec<Publish>>>,
}

impl Publisher {
    pub fn start(options: &PublishOptions) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(4)
            .build()
            .unwrap_or_default();
        let nodes = Arc::new(options.nodes.clone());
        let interval = Duration::from_secs_f64(options.orgs.len().max(1) as f64 / options.rate.max(0.1));
        let handles = options
            .orgs
            .iter()
            .enumerate()
            .map(|(n, org)| {
                let task = ChannelPublisher {
                    client: client.clone(),
                    nodes: Arc::clone(&nodes),
                    org: org.clone(),
                    retry: options.retry,
                };
                // Channels start spread over one interval.
                let start = Instant::now() + interval.mul_f64(n as f64 / options.orgs.len().max(1) as f64);
                tokio::spawn(task.run(start, interval, stop_rx.clone()))
            })
            .collect();
        Self { stop, handles }
    }

    /// Stops publishing (a publish in flight finishes) and returns every record.
    pub async fn finish(self) -> Vec<Publish> {
        let _ = self.stop.send(true);
        let mut all = Vec::new();
        for handle in self.handles {
            if let Ok(records) = handle.await {
                all.extend(records);
            }
        }
        all
    }
}

struct ChannelPublisher {
    client: reqwest::Client,
    nodes: Arc<Vec<String>>,
    org: String,
    retry: bool,
}

impl ChannelPublisher {
    async fn run(self, start: Instant, every: Duration, mut stop: watch::Receiver<bool>) -> Vec<Publish> {
        let mut records = Vec::new();
        let mut ticks = tokio::time::interval_at(start, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            seq += 1;
            records.push(self.publish(seq, &stop).await);
        }
        records
    }

    async fn publish(&self, seq: u64, stop: &watch::Receiver<bool>) -> Publish {
        let channel = format!("org:{}", self.org);
        let cid = format!("{}-{seq}", self.org);
        let mut record = Publish {
            channel,
            cid: cid.clone(),
            seq,
            first_sent: Instant::now(),
            acked_at: None,
            id: None,
            offset: None,
            attempts: Vec::new(),
            outcome_unknown: 0,
            replayed: false,
        };
        let body = json!({"event_type": "chaos", "data": {"cid": cid, "seq": seq}});
        let mut unreachable_in_a_row = 0;
        while record.attempts.len() < 20 {
            let node = {
                let mut rng = rand::rng();
                self.nodes[rng.random_range(0..self.nodes.len())].clone()
            };
            let url = format!("http://{node}/api/v1/orgs/{}/events", self.org);
            let response = self
                .client
                .post(&url)
                .bearer_auth(API_KEY)
                .header("Idempotency-Key", &record.cid)
                .json(&body)
                .send()
                .await;
            match response {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let replayed = response
                        .headers()
                        .get("idempotent-replayed")
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
                    let answer: Value = response.json().await.unwrap_or(Value::Null);
                    record.attempts.push(describe(status, &answer));
                    if status == 202 {
                        record.acked_at = Some(Instant::now());
                        record.id = answer.get("id").and_then(Value::as_str).map(str::to_owned);
                        record.offset = answer.get("offset").and_then(Value::as_u64);
                        record.replayed = replayed;
                        return record;
                    }
                    if answer.get("outcome").and_then(Value::as_str) == Some("unknown") {
                        record.outcome_unknown += 1;
                    }
                    if !self.retry || status != 503 {
                        return record;
                    }
                    unreachable_in_a_row = 0;
                }
                Err(err) if err.is_connect() => {
                    record.attempts.push("unreachable".to_owned());
                    unreachable_in_a_row += 1;
                    if unreachable_in_a_row >= 3 && !self.retry {
                        return record;
                    }
                    continue;
                }
                Err(err) => {
                    record
                        .attempts
                        .push(if err.is_timeout() { "timeout" } else { "error" }.to_owned());
                    if !self.retry {
                        return record;
                    }
                }
            }
            if *stop.borrow() && record.attempts.len() > 10 {
                return record;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        record
    }
}

/// An answer in a few words: the status, the 503's outcome and the start of its message.
fn describe(status: u16, answer: &Value) -> String {
    if status == 202 {
        return "202".to_owned();
    }
    let outcome = answer.get("outcome").and_then(Value::as_str).unwrap_or("-");
    let message: String = answer
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .chars()
        .take(60)
        .collect();
    format!("{status} {outcome}: {message}")
}
