//! herald: a real-time gateway that holds authenticated WebSocket connections and pushes
//! notifications, organization events and LLM response streams to them.
//!
//! # Layout
//!
//! Imports only point down, in the layers ARCHITECTURE.md lists (checked by
//! `tests/it/tidy/layers.rs`); this file is near the top: it builds the state and
//! assembles the [`router`].
//!
//! - [`config`]: the typed configuration, loaded from defaults < TOML < environment.
//! - [`cli`]: `herald serve | worker | token | listen`; thin, calls [`serve`] or [`work`].
//! - [`app`]: `AppState`, what every handler and session shares.
//! - [`redis`]: every Redis client (reconnects, timeouts, the wait at start).
//! - [`sync`]: the poison-ignoring lock helper.
//! - [`ws`]: the WebSocket endpoints (three single-channel ones and `/ws/`);
//!   [`ws::session`] runs one socket.
//! - [`http`]: the service API (publish, members, stats) and operations endpoints.
//! - [`auth`]: user tokens (HS256, JWKS, OIDC discovery) and service API keys.
//! - [`membership`]: who may join an org channel (database, claims or webhook).
//! - [`broker`]: sequencing (offsets, epochs), history, and distribution to nodes.
//! - [`hub`]: this node's fan-out from a channel to its sockets' outboxes.
//! - [`limits`]: connections per user, handshakes per IP, client messages per socket.
//! - [`metrics`]: every Prometheus metric, with typed record functions.
//! - [`llm`]: LLM providers (OpenAI-compatible, `echo`) streaming a reply as deltas, and
//!   the user-safe [`llm::LlmError`].
//! - [`channel`], [`ids`], [`close`]: the vocabulary: channels, messages, identifiers,
//!   close codes.
//! - [`store`]: SQLite/PostgreSQL access and migrations.
//! - [`tasks`]: LLM generation tasks: the in-process queue or the shared one on Redis
//!   Streams, and the worker that streams an answer to the user's frame stream.
//! - [`compose`]: the message each kind of publish produces, shared by the HTTP API and
//!   the bridge, and the typed `llm_*` messages of a frame stream.
//! - [`bridge`]: the Django Channels bridge: channels_redis `group_send` calls published
//!   to herald channels.
//! - [`idempotency`]: `Idempotency-Key` records, so a repeated publish publishes once.
//! - [`follow`]: one LLM task's messages for an HTTP stream (SSE, the AI SDK's UI
//!   message stream), on the sockets' channel, offsets and history.
//! - [`control`]: actions every node must apply (member removal, webhook-cache forget).

pub mod app;
pub mod auth;
pub mod bridge;
pub mod broker;
pub mod channel;
pub mod cli;
pub mod close;
pub mod compose;
pub mod config;
pub mod control;
pub mod dev;
pub mod follow;
pub mod http;
pub mod hub;
pub mod idempotency;
pub mod ids;
pub mod limits;
pub mod llm;
pub mod membership;
pub mod metrics;
pub mod presence;
pub mod redis;
pub mod store;
pub mod sync;
pub mod tasks;
pub mod telemetry;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::AppState;
use crate::auth::{ApiKeys, Authenticator};
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
pub use crate::config::redact_url;
use crate::config::{Config, Secrets};
use crate::hub::Hub;
use crate::membership::Membership;
use crate::store::Store;

/// LLM tasks run at once by `herald serve` when `HERALD_WORKERS` is not set.
pub const DEFAULT_SERVE_WORKERS: usize = 64;

/// LLM tasks run at once by `herald worker` when `HERALD_WORKERS` is not set.
pub const DEFAULT_WORKER_WORKERS: usize = 256;

/// How often idle channels are swept from the memory broker.
const EVICT_INTERVAL: Duration = Duration::from_secs(60);

/// Builds the shared state: database (migrated), broker, hub, authenticator.
pub async fn build_state(
    config: Config,
    secrets: Secrets,
    shutdown: CancellationToken,
) -> anyhow::Result<(AppState, Option<Arc<MemoryBroker>>)> {
    let store = open_store(&config).await?;
    build_state_with(config, secrets, store, shutdown).await
}

/// Opens (and migrates) the database of `HERALD_DATABASE_URL`.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    Store::connect(&config.database_url).await.map_err(|err| {
        anyhow::anyhow!(
            "cannot open the database {}: {err}",
            redact_url(&config.database_url)
        )
    })
}

/// [`build_state`] with the database already open: `herald serve` opens it before it
/// says it listens, and connects to Redis after (a node whose Redis is away starts
/// not ready and keeps trying).
pub async fn build_state_with(
    config: Config,
    secrets: Secrets,
    store: Store,
    shutdown: CancellationToken,
) -> anyhow::Result<(AppState, Option<Arc<MemoryBroker>>)> {
    let auth = Authenticator::new(&config, secrets.dev_jwt_secret.as_ref())?;
    let membership = Membership::new(&config.membership, store.clone())?;
    let hub = Arc::new(Hub::default());
    // Redis connections outlive the drain: publishes and task ends still need them.
    let stopped = CancellationToken::new();
    let (broker, memory) = connect_broker(&config, hub.clone(), &stopped).await?;
    let metrics = metrics::Metrics::new();
    let publisher = broker::Publisher::new(broker.clone(), metrics.clone());
    let tracker = TaskTracker::new();
    let broker: Arc<dyn broker::Broker> = match &config.django_bridge {
        Some(url) => {
            let bridge = bridge::Bridge::start(
                url,
                config.django.clone(),
                config.history_ttl,
                config.redis_url.is_some(),
                hub.clone(),
                publisher.clone(),
                metrics.clone(),
                &tracker,
                &shutdown,
            )
            .await
            .map_err(|err| anyhow::anyhow!("cannot start the Django bridge ({}): {err}", redact_url(url)))?;
            Arc::new(bridge::BridgedBroker::new(broker, bridge))
        }
        None => broker,
    };
    let provider = llm::from_config(&config)?;
    let node_id = channel::new_id();
    let parts = tasks::Parts {
        provider,
        publisher: publisher.clone(),
        broker: broker.clone(),
        store: store.clone(),
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
    };
    let workers = config.workers.unwrap_or(DEFAULT_SERVE_WORKERS);
    let tasks = match &config.redis_url {
        Some(url) => tasks::Tasks::redis(url, &config, workers, &parts, &node_id, &stopped)
            .await
            .map_err(|err| anyhow::anyhow!("cannot use Redis at {}: {err}", redact_url(url)))?,
        None => tasks::Tasks::local(&config, workers, &parts),
    };
    let connection_limits = match &config.redis_url {
        Some(url) => {
            let shared = limits::shared::SharedCounts::start(url, &node_id, config.node_ttl, &stopped)
                .await
                .map_err(|err| anyhow::anyhow!("cannot use Redis at {}: {err}", redact_url(url)))?;
            limits::ConnectionLimits::shared(config.max_connections_per_user, shared)
        }
        None => limits::ConnectionLimits::new(config.max_connections_per_user),
    };
    let membership = Arc::new(membership);
    let node_id: Arc<str> = Arc::from(node_id);
    let (idempotency, control) = match &config.redis_url {
        Some(url) => {
            let redis =
                |err: broker::BrokerError| anyhow::anyhow!("cannot use Redis at {}: {err}", redact_url(url));
            let commands = control::command_client(url, &stopped).await.map_err(redis)?;
            let control = control::Control::redis(
                url,
                commands.clone(),
                hub.clone(),
                membership.clone(),
                store.clone(),
                node_id.clone(),
                &stopped,
            )
            .await
            .map_err(redis)?;
            (
                idempotency::Idempotency::redis(
                    commands.clone(),
                    broker::redis::shards_for(url, &commands).map_err(redis)?,
                    config.history_ttl,
                ),
                control,
            )
        }
        None => (
            idempotency::Idempotency::memory(config.history_ttl),
            control::Control::local(hub.clone(), membership.clone(), store.clone(), node_id.clone()),
        ),
    };
    let presence = match &config.redis_url {
        Some(url) => presence::Presence::redis(url, &node_id, config.node_ttl, &stopped)
            .await
            .map_err(|err| anyhow::anyhow!("cannot use Redis at {}: {err}", redact_url(url)))?,
        None => presence::Presence::local(),
    };
    let state = AppState::new(app::AppParts {
        auth,
        api_keys: ApiKeys::new(&secrets.api_keys),
        hub,
        broker,
        store,
        membership,
        idempotency: Arc::new(idempotency),
        control,
        presence,
        publisher,
        tasks,
        metrics,
        connection_limits,
        handshake_limiter: Arc::new(limits::HandshakeLimiter::new(
            config.handshakes_per_ip_per_second,
            config.handshakes_per_ip_per_second.saturating_mul(4),
        )),
        shutdown,
        tracker,
        stopped,
        node_id,
        dev_jwt_secret: secrets.dev_jwt_secret,
        config: Arc::new(config),
    });
    Ok((state, memory))
}

/// The broker `config` asks for: Redis when `HERALD_REDIS_URL` is set (its connections
/// close on `stopped`), else memory (returned twice: as the broker and for its sweeps).
async fn connect_broker(
    config: &Config,
    hub: Arc<Hub>,
    stopped: &CancellationToken,
) -> anyhow::Result<(Arc<dyn broker::Broker>, Option<Arc<MemoryBroker>>)> {
    Ok(match &config.redis_url {
        Some(url) => {
            let redis = RedisBroker::connect(url, hub, config.history_size, config.history_ttl, stopped)
                .await
                .map_err(|err| anyhow::anyhow!("cannot use Redis at {}: {err}", redact_url(url)))?;
            (Arc::new(redis), None)
        }
        None => {
            let memory = Arc::new(MemoryBroker::new(
                hub,
                config.history_size,
                config.history_ttl,
                config.history_max_bytes,
            ));
            (memory.clone(), Some(memory))
        }
    })
}

/// `herald worker`: runs LLM tasks from the shared queue in Redis until `shutdown`,
/// then gives running tasks the drain window and hands back the rest.
pub async fn work(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(url) = config.redis_url.clone() else {
        anyhow::bail!(
            "herald worker takes tasks from the shared queue in Redis: set HERALD_REDIS_URL to the Redis your herald serve nodes use"
        );
    };
    let workers = config.workers.unwrap_or(DEFAULT_WORKER_WORKERS);
    if workers == 0 {
        anyhow::bail!("HERALD_WORKERS=0 leaves herald worker nothing to do; set it to 1 or more");
    }
    let store = open_store(&config).await?;
    let stopped = CancellationToken::new();
    // A worker holds no sockets: its hub stays empty and it subscribes to nothing.
    let (broker, _) = connect_broker(&config, Arc::new(Hub::default()), &stopped).await?;
    let metrics = metrics::Metrics::new();
    let tracker = TaskTracker::new();
    let parts = tasks::Parts {
        provider: llm::from_config(&config)?,
        publisher: broker::Publisher::new(broker.clone(), metrics),
        broker,
        store,
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
    };
    let tasks = tasks::Tasks::redis(&url, &config, workers, &parts, &channel::new_id(), &stopped)
        .await
        .map_err(|err| anyhow::anyhow!("cannot use Redis at {}: {err}", redact_url(&url)))?;
    tracing::info!(
        redis = redact_url(&url),
        workers,
        provider = tasks.provider_name(),
        "herald worker taking LLM tasks"
    );
    shutdown.cancelled().await;
    tracker.close();
    tracker.wait().await;
    stopped.cancel();
    Ok(())
}

/// Runs the gateway on `listener` until `shutdown` is cancelled, then closes every
/// socket (1001, spread over `HERALD_SHUTDOWN_DRAIN`) and returns as soon as none is
/// left open (at the end of the window at the latest).
pub async fn serve(
    config: Config,
    secrets: Secrets,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let built = build_state(config, secrets, shutdown).await?;
    serve_state(built, listener).await
}

/// [`serve`] with the state already built (by [`build_state`]): `herald serve` opens the
/// database before it prints that it listens.
pub async fn serve_state(
    (state, memory): (AppState, Option<Arc<MemoryBroker>>),
    listener: TcpListener,
) -> anyhow::Result<()> {
    let shutdown = state.shutdown.clone();
    let tracker = state.tracker.clone();
    let stopped = state.stopped.clone();
    let handshake_limiter = state.handshake_limiter.clone();
    let drain = state.config.shutdown_drain;
    limits::calibrate_clock();
    tracker.spawn({
        let shutdown = shutdown.clone();
        async move {
            let mut tick = tokio::time::interval(EVICT_INTERVAL);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        handshake_limiter.forget_idle();
                        // Redis expires idle channels itself.
                        let evicted = memory.as_ref().map_or(0, |memory| memory.evict_idle());
                        if evicted > 0 {
                            tracing::debug!(evicted, "idle channels evicted");
                        }
                    }
                }
            }
        }
    });
    let limits = http::server::ServerLimits::from_config(&state.config);
    let load = Arc::new(http::server::Load::new(
        limits.max_connections,
        limits.max_pending_per_ip,
    ));
    let metrics = state.metrics.clone();
    let app = router(state);
    // During the drain window HTTP keeps serving: /readyz answers 503 so load balancers
    // stop sending traffic, publishes still reach the sockets not closed yet, and new
    // socket handshakes are refused with 503. The listener closes when the window ends.
    http::server::run(listener, app, limits, load, metrics.clone(), {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            // The window ends early once every socket has closed: a node with no
            // sockets stops at once.
            let window = tokio::time::sleep(drain);
            tokio::pin!(window);
            let mut poll = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    () = &mut window => break,
                    _ = poll.tick() => {
                        if metrics::Endpoint::ALL.iter().all(|endpoint| metrics.open_connections(*endpoint) <= 0) {
                            break;
                        }
                    }
                }
            }
        }
    })
    .await;
    tracker.close();
    tracker.wait().await;
    stopped.cancel();
    Ok(())
}

/// The router: every route and global layer in one place (read it next to
/// docs/protocol.md).
///
/// The global layers wrap the finished router as tower services rather than through
/// `Router::layer`, which would box each layer's future on every request (two boxes a
/// request: issue 19's unicast path).
pub fn router(state: AppState) -> http::App {
    use tower::Layer;
    use tower_http::catch_panic::CatchPanicLayer;
    let dev = if state.dev_jwt_secret.is_some() {
        crate::http::demo::dev_router()
    } else {
        axum::Router::new()
    };
    let routes = axum::Router::new()
        .merge(crate::ws::router())
        .merge(crate::http::router(&state.config.allowed_origins))
        .merge(dev)
        .with_state(state);
    crate::http::GuardLayer.layer(CatchPanicLayer::new().layer(routes))
}
