//! The publisher: benchmark messages through a server's publish API, one request at a
//! time on one keep-alive connection (so a channel's messages are published in order),
//! each due at a fixed rate. A message carries the time it was *due*, so a server that
//! is slow to accept publishes shows it in the latency (no coordinated omission).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use crate::token::now_us;

/// A fixed body so every message has a realistic size (about 250 bytes on the wire).
const BODY: &str = "Your export of 1,204 rows is ready to download from the reports page.";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishReport {
    pub sent: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    /// From the first message's due time to the last answer.
    pub seconds: f64,
    /// How far behind its schedule the publisher fell at worst, in milliseconds.
    pub late_max_ms: f64,
}

/// What one round publishes.
#[derive(Debug, Clone)]
pub enum Target {
    /// Every message to `org`.
    Org(String),
    /// Each message to one of users `u0`…`u{users-1}`, picked pseudo-randomly.
    Users(usize),
}

pub struct Publisher {
    client: reqwest::Client,
    http: String,
}

impl Publisher {
    pub fn new(http: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            client,
            http: http.to_owned(),
        })
    }

    /// Publishes `events` messages of round `round` at `rate` a second.
    pub async fn run(&self, target: &Target, round: u32, events: u64, rate: f64) -> PublishReport {
        let mut report = PublishReport::default();
        let interval_us = 1e6 / rate.max(0.001);
        let start = Instant::now();
        let start_us = now_us();
        // xorshift64: a fixed, reproducible sequence of target users.
        let mut random: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(round);
        for seq in 0..events {
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let offset_us = (seq as f64 * interval_us) as u64;
            let due = start + Duration::from_micros(offset_us);
            tokio::time::sleep_until(due).await;
            #[allow(clippy::cast_precision_loss)]
            let late = due.elapsed().as_secs_f64() * 1000.0;
            report.late_max_ms = report.late_max_ms.max(late);
            let mark = json!({"r": round, "s": seq, "t": start_us + offset_us, "body": BODY});
            let request = match target {
                Target::Org(org) => self
                    .client
                    .post(format!("{}/api/v1/orgs/{org}/events", self.http))
                    .json(&json!({"event_type": "bench.tick", "data": mark})),
                Target::Users(users) => {
                    random ^= random << 13;
                    random ^= random >> 7;
                    random ^= random << 17;
                    let user = random % u64::try_from(*users).unwrap_or(1).max(1);
                    let mut notification = mark;
                    notification["title"] = json!("Bench");
                    self.client
                        .post(format!("{}/api/v1/notifications/u{user}", self.http))
                        .json(&notification)
                }
            };
            match request.bearer_auth(crate::servers::API_KEY).send().await {
                Ok(response) if response.status().as_u16() == 202 => {
                    // Read the body so the connection is reused.
                    let _ = response.bytes().await;
                    report.sent += 1;
                }
                Ok(response) => {
                    report.failed += 1;
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    report.first_error.get_or_insert_with(|| {
                        format!(
                            "publish answered {status}: {}",
                            body.chars().take(200).collect::<String>()
                        )
                    });
                }
                Err(err) => {
                    report.failed += 1;
                    report
                        .first_error
                        .get_or_insert_with(|| format!("publish failed: {err}"));
                }
            }
        }
        report.seconds = start.elapsed().as_secs_f64();
        report
    }
}
