//! `AppState`, built once at start (`crate::build_state`) and shared by every request
//! handler and socket session.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{ApiKeys, Authenticator};
use crate::broker::{Broker, BrokerError, Published, Publisher};
use crate::channel::{Channel, Draft};
use crate::config::{Config, Secret};
use crate::control::Control;
use crate::hub::Hub;
use crate::idempotency::Idempotency;
use crate::limits::{ConnectionLimits, HandshakeLimiter};
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::store::Store;
use crate::tasks::Tasks;

/// Everything request handlers and sessions share: one pointer, so a clone is one
/// reference-count increment. axum clones the state into every request's handler
/// service, and a clone of the parts themselves (their `Arc`s and the metrics' families)
/// cost about 6,000 instructions a request (callgrind, the unicast benchmark).
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct AppParts {
    pub config: Arc<Config>,
    pub auth: Authenticator,
    pub api_keys: ApiKeys,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub store: Store,
    pub membership: Arc<Membership>,
    /// `Idempotency-Key` records of publish calls (in process, or shared in Redis).
    pub idempotency: Arc<Idempotency>,
    /// Member removals and webhook-cache forgets, applied on every node.
    pub control: Arc<Control>,
    /// Who is present in each org, on this node or across nodes.
    pub presence: Arc<Presence>,
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

impl AppParts {
    /// Publishes through the broker and counts it.
    pub async fn publish(&self, channel: &Channel, draft: &Draft) -> Result<Published, BrokerError> {
        self.publisher.publish(channel, draft).await
    }
}
