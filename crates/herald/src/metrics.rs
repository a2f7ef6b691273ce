//! Every Prometheus metric herald exports, in one place, with typed record functions.
//!
//! Names start with `herald_` and carry their unit; labels take values from small fixed
//! sets (endpoint, channel kind, message type, reason, close code, outcome), never a
//! user id, channel name or token. Every family and every label value is created at
//! start, so `/metrics` shows each series at zero before anything has happened.
//!
//! The registry belongs to one `AppState`, not to the process: two herald instances in
//! one process (as in tests) keep separate counts.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

mod striped;

use crate::auth::AuthFailure;
use crate::channel::ChannelKind;
use crate::close::CloseCode;
use striped::{StripedCounter, StripedHistogram};

/// Client message types, as labelled (see `ws::protocol::ClientMessage::label`).
pub const CLIENT_MESSAGE_LABELS: [&str; 8] = [
    "subscribe",
    "unsubscribe",
    "read",
    "ping",
    "heartbeat",
    "refresh",
    "unsupported",
    "invalid_json",
];

/// Auth failures on the service API, besides the user-token reasons of `AuthFailure`.
pub const API_KEY_FAILURES: [&str; 2] = ["missing_api_key", "bad_api_key"];

/// What a rate or connection limit refused.
pub const LIMITS: [&str; 3] = ["connections_per_user", "client_messages", "handshakes_per_ip"];

/// How an LLM task ended.
pub const TASK_OUTCOMES: [&str; 3] = ["completed", "failed", "cancelled"];

/// The channels_redis layer a Django bridge message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeLayer {
    Core,
    PubSub,
}

impl BridgeLayer {
    pub const ALL: [BridgeLayer; 2] = [Self::Core, Self::PubSub];

    pub fn label(self) -> &'static str {
        match self {
            Self::Core => "core",
            Self::PubSub => "pubsub",
        }
    }
}

/// What the Django bridge did with a message: published it, or dropped it because it
/// could not be read (`undecodable`), did not map to a herald message (`unmappable`), or
/// could not be published (`failed`, pub/sub layer only; the core layer retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeOutcome {
    Published,
    Unmappable,
    Undecodable,
    Failed,
}

impl BridgeOutcome {
    pub const ALL: [BridgeOutcome; 4] = [Self::Published, Self::Unmappable, Self::Undecodable, Self::Failed];

    pub fn label(self) -> &'static str {
        match self {
            Self::Published => "published",
            Self::Unmappable => "unmappable",
            Self::Undecodable => "undecodable",
            Self::Failed => "failed",
        }
    }
}

/// The WebSocket endpoint a socket connected to; a bounded label for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Notifications,
    Events,
    FrameStream,
    /// `/ws/`: any number of channels, subscribed by messages.
    Multiplexed,
}

impl Endpoint {
    pub const ALL: [Endpoint; 4] = [
        Self::Notifications,
        Self::Events,
        Self::FrameStream,
        Self::Multiplexed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Notifications => "notifications",
            Self::Events => "events",
            Self::FrameStream => "frame_stream",
            Self::Multiplexed => "ws",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    /// The close code's number, straight from `CloseCode::code`.
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BridgeLabel {
    layer: &'static str,
    outcome: &'static str,
}

/// The metrics of one herald instance. Cheap to clone (everything is shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    connections_open: Family<EndpointLabel, Gauge>,
    connections_per_user: Histogram,
    connection_duration: Histogram,
    // The per-message metrics are striped (`striped.rs`): counted on the hottest paths
    // from both runtime threads.
    messages_published: Family<KindLabel, StripedCounter>,
    messages_delivered: Family<KindLabel, StripedCounter>,
    /// The families' counters per channel kind ([`kind_idx`]), so the per-message
    /// paths skip the family's lock and label hash.
    published_by_kind: [StripedCounter; 3],
    delivered_by_kind: [StripedCounter; 3],
    publish_to_send: StripedHistogram,
    client_messages: Family<TypeLabel, Counter>,
    auth_failures: Family<ReasonLabel, Counter>,
    close_codes: Family<CodeLabel, Counter>,
    slow_consumer_disconnects: Counter,
    rate_limited: Family<LimitLabel, Counter>,
    origin_rejected: Counter,
    broker_reconnects: Counter,
    history_evictions: Counter,
    task_queue_depth: Gauge,
    task_outcomes: Family<OutcomeLabel, Counter>,
    llm_time_to_first_token: Histogram,
    llm_tokens_per_second: Histogram,
    bridge_messages: Family<BridgeLabel, Counter>,
    bridge_groups: Gauge,
    bridge_reading: Gauge,
}

/// The position of `kind` in [`ChannelKind::ALL`].
fn kind_idx(kind: ChannelKind) -> usize {
    match kind {
        ChannelKind::Notifications => 0,
        ChannelKind::Org => 1,
        ChannelKind::Frames => 2,
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let mut this = Self {
            registry: Arc::new(Registry::default()),
            connections_open: Family::default(),
            connections_per_user: Histogram::new([1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 50.0]),
            connection_duration: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            messages_published: Family::default(),
            messages_delivered: Family::default(),
            published_by_kind: Default::default(),
            delivered_by_kind: Default::default(),
            publish_to_send: StripedHistogram::new(exponential_buckets(0.0005, 2.0, 16)),
            client_messages: Family::default(),
            auth_failures: Family::default(),
            close_codes: Family::default(),
            slow_consumer_disconnects: Counter::default(),
            rate_limited: Family::default(),
            origin_rejected: Counter::default(),
            broker_reconnects: Counter::default(),
            history_evictions: Counter::default(),
            task_queue_depth: Gauge::default(),
            task_outcomes: Family::default(),
            llm_time_to_first_token: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            llm_tokens_per_second: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            bridge_messages: Family::default(),
            bridge_groups: Gauge::default(),
            bridge_reading: Gauge::default(),
        };

        for endpoint in Endpoint::ALL {
            let _ = this.connections_open.get_or_create(&EndpointLabel {
                endpoint: endpoint.label(),
            });
        }
        for kind in ChannelKind::ALL {
            this.published_by_kind[kind_idx(kind)] = this
                .messages_published
                .get_or_create(&KindLabel { kind: kind.label() })
                .clone();
            this.delivered_by_kind[kind_idx(kind)] = this
                .messages_delivered
                .get_or_create(&KindLabel { kind: kind.label() })
                .clone();
        }
        for r#type in CLIENT_MESSAGE_LABELS {
            let _ = this.client_messages.get_or_create(&TypeLabel { r#type });
        }
        for failure in AuthFailure::ALL {
            let _ = this.auth_failures.get_or_create(&ReasonLabel {
                reason: failure.reason(),
            });
        }
        for reason in API_KEY_FAILURES {
            let _ = this.auth_failures.get_or_create(&ReasonLabel { reason });
        }
        for code in CloseCode::ALL {
            let _ = this.close_codes.get_or_create(&CodeLabel { code: code.code() });
        }
        for limit in LIMITS {
            let _ = this.rate_limited.get_or_create(&LimitLabel { limit });
        }
        for outcome in TASK_OUTCOMES {
            let _ = this.task_outcomes.get_or_create(&OutcomeLabel { outcome });
        }
        for layer in BridgeLayer::ALL {
            for outcome in BridgeOutcome::ALL {
                let _ = this.bridge_messages.get_or_create(&BridgeLabel {
                    layer: layer.label(),
                    outcome: outcome.label(),
                });
            }
        }

        registry.register(
            "herald_connections_open",
            "Open WebSocket connections by endpoint",
            this.connections_open.clone(),
        );
        registry.register(
            "herald_connections_per_user",
            "A user's open connections (all endpoints), observed at each connect",
            this.connections_per_user.clone(),
        );
        registry.register_with_unit(
            "herald_connection_duration",
            "How long WebSocket connections lasted",
            Unit::Seconds,
            this.connection_duration.clone(),
        );
        registry.register(
            "herald_messages_published",
            "Messages published, by channel kind",
            this.messages_published.clone(),
        );
        registry.register(
            "herald_messages_delivered",
            "Messages written to sockets, by channel kind",
            this.messages_delivered.clone(),
        );
        registry.register_with_unit(
            "herald_publish_to_send",
            "Time from publish to the socket write of a live message (the oldest of each written batch)",
            Unit::Seconds,
            this.publish_to_send.clone(),
        );
        registry.register(
            "herald_client_messages",
            "Client messages by type",
            this.client_messages.clone(),
        );
        registry.register(
            "herald_auth_failures",
            "Refused tokens and API keys, by reason",
            this.auth_failures.clone(),
        );
        registry.register(
            "herald_close_codes",
            "Close frames sent, by code",
            this.close_codes.clone(),
        );
        registry.register(
            "herald_slow_consumer_disconnects",
            "Sockets closed with 1008 because their outbox overflowed",
            this.slow_consumer_disconnects.clone(),
        );
        registry.register(
            "herald_rate_limited",
            "Requests refused by a limit",
            this.rate_limited.clone(),
        );
        registry.register(
            "herald_origin_rejected",
            "Handshakes refused for their Origin",
            this.origin_rejected.clone(),
        );
        registry.register(
            "herald_broker_reconnects",
            "Reconnections to the broker",
            this.broker_reconnects.clone(),
        );
        registry.register(
            "herald_history_evictions",
            "Channel histories dropped to keep history memory under its bound",
            this.history_evictions.clone(),
        );
        registry.register(
            "herald_task_queue_depth",
            "LLM tasks waiting to run",
            this.task_queue_depth.clone(),
        );
        registry.register(
            "herald_task_outcomes",
            "LLM tasks ended, by outcome",
            this.task_outcomes.clone(),
        );
        registry.register_with_unit(
            "herald_llm_time_to_first_token",
            "Time from a task's start to its first token",
            Unit::Seconds,
            this.llm_time_to_first_token.clone(),
        );
        registry.register(
            "herald_llm_tokens_per_second",
            "Streaming rate of each finished LLM answer",
            this.llm_tokens_per_second.clone(),
        );
        registry.register(
            "herald_django_bridge_messages",
            "Messages read from Django Channels groups, by layer and outcome",
            this.bridge_messages.clone(),
        );
        registry.register(
            "herald_django_bridge_groups",
            "Django groups this node has joined (core layer)",
            this.bridge_groups.clone(),
        );
        registry.register(
            "herald_django_bridge_reading",
            "1 while this node reads the Django bridge's queue and pub/sub groups (with a shared broker, one node at a time)",
            this.bridge_reading.clone(),
        );
        Self {
            registry: Arc::new(registry),
            ..this
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    // === connections ===

    /// A socket was admitted; `user_connections` is the user's count including it.
    pub fn connection_opened(&self, endpoint: Endpoint, user_connections: u32) {
        self.connections_open
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.label(),
            })
            .inc();
        self.connections_per_user.observe(f64::from(user_connections));
    }

    pub fn connection_closed(&self, endpoint: Endpoint, lasted: Duration) {
        self.connections_open
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.label(),
            })
            .dec();
        self.connection_duration.observe(lasted.as_secs_f64());
    }

    pub fn open_connections(&self, endpoint: Endpoint) -> i64 {
        self.connections_open
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.label(),
            })
            .get()
    }

    pub fn close_sent(&self, code: CloseCode) {
        self.close_codes
            .get_or_create(&CodeLabel { code: code.code() })
            .inc();
    }

    pub fn closes_sent(&self, code: CloseCode) -> u64 {
        self.close_codes
            .get_or_create(&CodeLabel { code: code.code() })
            .get()
    }

    // === messages ===

    pub fn published(&self, kind: ChannelKind) {
        self.published_by_kind[kind_idx(kind)].inc();
    }

    pub fn published_total(&self) -> u64 {
        ChannelKind::ALL
            .iter()
            .map(|kind| {
                self.messages_published
                    .get_or_create(&KindLabel { kind: kind.label() })
                    .get()
            })
            .sum()
    }

    /// `n` messages were written to one socket; `oldest_latency` is the publish-to-send
    /// time of the oldest live one among them.
    pub fn delivered(&self, kind: ChannelKind, n: u64, oldest_latency: Option<Duration>) {
        if n > 0 {
            self.delivered_by_kind[kind_idx(kind)].inc_by(n);
        }
        if let Some(latency) = oldest_latency {
            self.publish_to_send.observe(latency.as_secs_f64());
        }
    }

    pub fn delivered_total(&self) -> u64 {
        ChannelKind::ALL
            .iter()
            .map(|kind| {
                self.messages_delivered
                    .get_or_create(&KindLabel { kind: kind.label() })
                    .get()
            })
            .sum()
    }

    pub fn client_message(&self, label: &'static str) {
        self.client_messages
            .get_or_create(&TypeLabel { r#type: label })
            .inc();
    }

    // === security and limits ===

    pub fn auth_failed(&self, reason: &'static str) {
        self.auth_failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn auth_failures_total(&self) -> u64 {
        AuthFailure::ALL
            .iter()
            .map(|f| f.reason())
            .chain(API_KEY_FAILURES)
            .map(|reason| self.auth_failures.get_or_create(&ReasonLabel { reason }).get())
            .sum()
    }

    pub fn origin_rejected(&self) {
        self.origin_rejected.inc();
    }

    pub fn rate_limited(&self, limit: &'static str) {
        self.rate_limited.get_or_create(&LimitLabel { limit }).inc();
    }

    pub fn slow_consumers(&self, n: u64) {
        self.slow_consumer_disconnects.inc_by(n);
    }

    pub fn slow_consumers_total(&self) -> u64 {
        self.slow_consumer_disconnects.get()
    }

    /// Sets the broker-reconnect counter to the broker's running total.
    pub fn sync_broker_reconnects(&self, total: u64) {
        let seen = self.broker_reconnects.get();
        if total > seen {
            self.broker_reconnects.inc_by(total - seen);
        }
    }

    /// Sets the history-eviction counter to the broker's running total.
    pub fn sync_history_evictions(&self, total: u64) {
        let seen = self.history_evictions.get();
        if total > seen {
            self.history_evictions.inc_by(total - seen);
        }
    }

    // === tasks ===

    pub fn set_task_queue_depth(&self, depth: i64) {
        self.task_queue_depth.set(depth);
    }

    pub fn task_ended(&self, outcome: &'static str) {
        self.task_outcomes.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn llm_first_token(&self, after: Duration) {
        self.llm_time_to_first_token.observe(after.as_secs_f64());
    }

    pub fn llm_tokens_per_second(&self, rate: f64) {
        self.llm_tokens_per_second.observe(rate);
    }

    // === Django bridge ===

    pub fn bridge_message(&self, layer: BridgeLayer, outcome: BridgeOutcome) {
        self.bridge_messages
            .get_or_create(&BridgeLabel {
                layer: layer.label(),
                outcome: outcome.label(),
            })
            .inc();
    }

    pub fn bridge_messages(&self, layer: BridgeLayer, outcome: BridgeOutcome) -> u64 {
        self.bridge_messages
            .get_or_create(&BridgeLabel {
                layer: layer.label(),
                outcome: outcome.label(),
            })
            .get()
    }

    pub fn set_bridge_groups(&self, groups: i64) {
        self.bridge_groups.set(groups);
    }

    pub fn set_bridge_reading(&self, reading: bool) {
        self.bridge_reading.set(i64::from(reading));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_rendered_at_zero() {
        let text = Metrics::new().render();
        for name in [
            "herald_connections_open{endpoint=\"notifications\"} 0",
            "herald_connections_open{endpoint=\"frame_stream\"} 0",
            "herald_connections_open{endpoint=\"ws\"} 0",
            "herald_client_messages_total{type=\"subscribe\"} 0",
            "herald_connections_per_user_count 0",
            "herald_connection_duration_seconds_count 0",
            "herald_messages_published_total{kind=\"org\"} 0",
            "herald_messages_delivered_total{kind=\"frames\"} 0",
            "herald_publish_to_send_seconds_count 0",
            "herald_client_messages_total{type=\"invalid_json\"} 0",
            "herald_auth_failures_total{reason=\"expired\"} 0",
            "herald_close_codes_total{code=\"4429\"} 0",
            "herald_slow_consumer_disconnects_total 0",
            "herald_rate_limited_total{limit=\"client_messages\"} 0",
            "herald_broker_reconnects_total 0",
            "herald_history_evictions_total 0",
            "herald_task_queue_depth 0",
            "herald_task_outcomes_total{outcome=\"cancelled\"} 0",
            "herald_llm_time_to_first_token_seconds_count 0",
            "herald_llm_tokens_per_second_count 0",
            "herald_django_bridge_messages_total{layer=\"pubsub\",outcome=\"unmappable\"} 0",
            "herald_django_bridge_groups 0",
            "herald_django_bridge_reading 0",
        ] {
            assert!(text.contains(name), "missing `{name}` in:\n{text}");
        }
    }
}
