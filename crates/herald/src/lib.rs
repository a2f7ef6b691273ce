//! herald: a real-time gateway that holds authenticated WebSocket connections and pushes
//! notifications, organization events and LLM response streams to them.
//!
//! # Layout
//!
//! - [`config`]: the typed configuration, loaded from defaults < TOML < environment.
//! - [`cli`]: `herald serve | token | listen`; thin, calls [`serve`].
//! - [`app`]: `AppState` and the router listing every route.
//! - [`ws`]: the three WebSocket endpoints; [`ws::session`] runs one socket.
//! - [`http`]: the service API (publish, members, stats) and operations endpoints.
//! - [`auth`]: user tokens (HS256, JWKS, OIDC discovery) and service API keys.
//! - [`membership`]: who may join an org channel (database, claims or webhook).
//! - [`broker`]: sequencing (offsets, epochs), history, and distribution to nodes.
//! - [`hub`]: this node's fan-out from a channel to its sockets' outboxes.
//! - [`llm`]: LLM providers (OpenAI-compatible, `echo`) streaming a reply as deltas, and
//!   the user-safe [`llm::LlmError`].
//! - [`channel`], [`ids`], [`close`]: the vocabulary: channels, messages, identifiers,
//!   close codes.
//! - [`store`]: SQLite/PostgreSQL access and migrations.

pub mod app;
pub mod auth;
pub mod broker;
pub mod channel;
pub mod cli;
pub mod close;
pub mod config;
pub mod dev;
pub mod http;
pub mod hub;
pub mod ids;
pub mod llm;
pub mod membership;
pub mod store;
pub mod telemetry;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{AppState, Secrets, Stats};
use crate::auth::{ApiKeys, Authenticator};
use crate::broker::memory::MemoryBroker;
use crate::config::Config;
use crate::hub::Hub;
use crate::membership::Membership;
use crate::store::Store;

/// How often idle channels are swept from the memory broker.
const EVICT_INTERVAL: Duration = Duration::from_secs(60);

/// Builds the shared state: database (migrated), broker, hub, authenticator.
pub async fn build_state(
    config: Config,
    secrets: Secrets,
    shutdown: CancellationToken,
) -> anyhow::Result<(AppState, Arc<MemoryBroker>)> {
    let store = Store::connect(&config.database_url).await.map_err(|err| {
        anyhow::anyhow!(
            "cannot open the database {}: {err}",
            redact_url(&config.database_url)
        )
    })?;
    let auth = Authenticator::new(&config, secrets.dev_jwt_secret.as_ref())?;
    let membership = Membership::new(&config.membership, store.clone())?;
    let hub = Arc::new(Hub::default());
    let memory = Arc::new(MemoryBroker::new(
        hub.clone(),
        config.history_size,
        config.history_ttl,
    ));
    let state = AppState {
        auth,
        api_keys: ApiKeys::new(&secrets.api_keys),
        hub,
        broker: memory.clone(),
        store,
        membership: Arc::new(membership),
        stats: Arc::new(Stats::default()),
        shutdown,
        tracker: TaskTracker::new(),
        node_id: Arc::from(channel::new_id()),
        config: Arc::new(config),
    };
    Ok((state, memory))
}

/// Runs the gateway on `listener` until `shutdown` is cancelled, then closes every
/// socket (1001, spread over `HERALD_SHUTDOWN_DRAIN`) and returns.
pub async fn serve(
    config: Config,
    secrets: Secrets,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (state, memory) = build_state(config, secrets, shutdown.clone()).await?;
    let tracker = state.tracker.clone();
    tracker.spawn({
        let shutdown = shutdown.clone();
        async move {
            let mut tick = tokio::time::interval(EVICT_INTERVAL);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        let evicted = memory.evict_idle();
                        if evicted > 0 {
                            tracing::debug!(evicted, "idle channels evicted");
                        }
                    }
                }
            }
        }
    });
    let app = app::router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(|err| anyhow::anyhow!("the HTTP server failed: {err}"))?;
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// A database URL with any password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}
