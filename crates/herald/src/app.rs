//! `AppState`, built once at start, and `router`, the one place that lists every route
//! and global layer (read it next to docs/protocol.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::Router;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{ApiKeys, Authenticator};
use crate::broker::{Broker, BrokerError, Published};
use crate::channel::{Channel, Draft};
use crate::close::CloseCode;
use crate::config::{Config, Secret};
use crate::hub::Hub;
use crate::membership::Membership;
use crate::store::Store;
use crate::ws::Endpoint;

/// Everything request handlers and sessions share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub auth: Authenticator,
    pub api_keys: ApiKeys,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub store: Store,
    pub membership: Arc<Membership>,
    pub stats: Arc<Stats>,
    /// Cancelled when the node starts shutting down; sessions then close with 1001.
    pub shutdown: CancellationToken,
    /// Every spawned session and background task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Identifies this process in stats and (later) in Redis.
    pub node_id: Arc<str>,
}

/// The secrets a node runs with, after dev-mode generation.
pub struct Secrets {
    /// The HS256 secret when no other key source is configured.
    pub dev_jwt_secret: Option<Secret>,
    pub api_keys: Vec<Secret>,
}

impl AppState {
    /// Publishes through the broker and counts it. Every publish path (HTTP API, LLM
    /// workers, bridges) goes through here.
    pub async fn publish(&self, channel: &Channel, draft: &Draft) -> Result<Published, BrokerError> {
        let published = self.broker.publish(channel, draft).await?;
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(published)
    }
}

pub fn router(state: AppState) -> Router {
    use tower_http::catch_panic::CatchPanicLayer;
    Router::new()
        .merge(crate::ws::router())
        .merge(crate::http::router())
        .layer(CatchPanicLayer::new())
        .with_state(state)
}

/// Counters for `GET /api/v1/stats`.
#[derive(Default)]
pub struct Stats {
    open: [AtomicU64; 3],
    opened_total: AtomicU64,
    published: AtomicU64,
    rejected: AtomicU64,
    auth_failures: AtomicU64,
    origin_rejected: AtomicU64,
}

fn endpoint_idx(endpoint: Endpoint) -> usize {
    match endpoint {
        Endpoint::Notifications => 0,
        Endpoint::Events => 1,
        Endpoint::FrameStream => 2,
    }
}

impl Stats {
    pub fn opened(&self, endpoint: Endpoint) {
        self.open[endpoint_idx(endpoint)].fetch_add(1, Ordering::Relaxed);
        self.opened_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self, endpoint: Endpoint) {
        self.open[endpoint_idx(endpoint)].fetch_sub(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, _code: CloseCode) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn auth_failed(&self, _reason: &'static str) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected_origin(&self) {
        self.origin_rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Open sockets on this node.
    pub fn open_connections(&self) -> u64 {
        self.open.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    pub fn snapshot(&self, state: &AppState) -> serde_json::Value {
        let open = |e: Endpoint| self.open[endpoint_idx(e)].load(Ordering::Relaxed);
        let delivery = state.hub.counters();
        json!({
            "node_id": &*state.node_id,
            "connections": {
                "open": self.open_connections(),
                "notifications": open(Endpoint::Notifications),
                "events": open(Endpoint::Events),
                "frame_stream": open(Endpoint::FrameStream),
                "opened_total": self.opened_total.load(Ordering::Relaxed),
                "rejected_total": self.rejected.load(Ordering::Relaxed),
                "origin_rejected_total": self.origin_rejected.load(Ordering::Relaxed),
                "auth_failures_total": self.auth_failures.load(Ordering::Relaxed),
            },
            "messages": {
                "published": self.published.load(Ordering::Relaxed),
                "delivered": delivery.delivered,
                "slow_consumer_disconnects": delivery.slow,
            },
            "subscriptions": state.hub.subscription_count(),
            "history": state.broker.memory_stats().map(|m| json!({
                "channels": m.channels,
                "bytes": m.history_bytes,
                "max_bytes": m.history_max_bytes,
                "evicted_histories": m.history_evictions,
                "evicted_idle_channels": m.idle_evictions,
            })),
        })
    }
}
