//! `AppState`, built once at start, and `router`, the one place that lists every route
//! and global layer (read it next to docs/protocol.md).

use std::sync::Arc;

use axum::Router;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{ApiKeys, Authenticator};
use crate::broker::{Broker, BrokerError, Published};
use crate::channel::{Channel, Draft};
use crate::config::{Config, Secret};
use crate::hub::Hub;
use crate::limits::{ConnectionLimits, HandshakeLimiter};
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::tasks::Tasks;

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
    /// `Idempotency-Key` records of publish calls (in process, or shared in Redis).
    pub idempotency: Arc<crate::idempotency::Idempotency>,
    /// Member removals and webhook-cache forgets, applied on every node.
    pub control: Arc<crate::control::Control>,
    pub publisher: Publisher,
    pub tasks: Tasks,
    pub metrics: Metrics,
    pub connection_limits: Arc<ConnectionLimits>,
    pub handshake_limiter: Arc<HandshakeLimiter>,
    /// Cancelled when the node starts shutting down; sessions then close with 1001.
    pub shutdown: CancellationToken,
    /// Every spawned session and background task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled once the drain is over and every session and task has ended: closes
    /// the Redis connections, which publishes during the drain still need.
    pub stopped: CancellationToken,
    /// Identifies this process in stats and (later) in Redis.
    pub node_id: Arc<str>,
    /// The generated HS256 secret, only in dev mode: it turns on the demo page's
    /// `/dev/…` endpoints (`http::demo`).
    pub dev_jwt_secret: Option<Secret>,
}

/// The secrets a node runs with, after dev-mode generation.
pub struct Secrets {
    /// The HS256 secret when no other key source is configured.
    pub dev_jwt_secret: Option<Secret>,
    pub api_keys: Vec<Secret>,
}

impl AppState {
    /// Publishes through the broker and counts it.
    pub async fn publish(&self, channel: &Channel, draft: &Draft) -> Result<Published, BrokerError> {
        self.publisher.publish(channel, draft).await
    }
}

/// The one publish path (HTTP API, LLM workers, bridges): the broker, counted.
#[derive(Clone)]
pub struct Publisher {
    broker: Arc<dyn Broker>,
    metrics: Metrics,
}

impl Publisher {
    pub fn new(broker: Arc<dyn Broker>, metrics: Metrics) -> Self {
        Self { broker, metrics }
    }

    pub async fn publish(&self, channel: &Channel, draft: &Draft) -> Result<Published, BrokerError> {
        let published = self.broker.publish(channel, draft).await?;
        self.metrics.published(channel.kind());
        Ok(published)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

pub fn router(state: AppState) -> Router {
    use tower_http::catch_panic::CatchPanicLayer;
    let dev = if state.dev_jwt_secret.is_some() {
        crate::http::demo::dev_router()
    } else {
        Router::new()
    };
    Router::new()
        .merge(crate::ws::router(&state))
        .merge(crate::http::router(&state.config.allowed_origins))
        .merge(dev)
        .layer(axum::middleware::from_fn(crate::http::limit_request_size))
        .layer(CatchPanicLayer::new())
        .layer(axum::middleware::from_fn(crate::http::json_errors))
        .with_state(state)
}
