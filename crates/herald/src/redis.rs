//! Connections to Redis: the one client factory (reconnect policy, timeouts), the waits
//! at start, and closing on `stopped`.
//!
//! Every Redis user (broker, connection counts, task queue, control, idempotency, the
//! Django bridge) builds its clients here, so they all reconnect, time out and give up
//! a command the same way. What each one does over its connections stays with it.

use std::time::Duration;

use fred::prelude::{Builder, ClientLike, Config, ReconnectPolicy};
use tokio_util::sync::CancellationToken;

/// The longest a command may take before its caller reports Redis unavailable (or, for a
/// command already sent, its outcome unknown).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the broker waits for its first connection at start before starting
/// not-ready (and the Django bridge for its own).
pub const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(5);

/// How long each of a node's other Redis connections (task queue, connection counts,
/// control, idempotency) waits for its first connection at start. The broker's wait
/// ([`FIRST_CONNECT_WAIT`]) already tells whether Redis is there; with Redis down, a
/// longer wait each would only hold back the start (they add up), and every one of
/// them keeps connecting in the background.
pub const SECONDARY_CONNECT_WAIT: Duration = Duration::from_secs(1);

/// Pub/sub messages buffered between the connection and the task that reads them.
pub const MESSAGE_BUFFER: usize = 16_384;

/// Reconnect backoff: from 100 ms, doubling, up to 2 s, forever.
const RECONNECT_MIN_MS: u32 = 100;
const RECONNECT_MAX_MS: u32 = 2_000;

/// A Redis URL or client configuration fred refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(pub String);

/// A client for `url` with herald's reconnect policy and timeouts (not connected yet).
pub fn build_client(url: &str) -> Result<fred::prelude::Client, ClientError> {
    build_client_from(Config::from_url(url).map_err(|err| ClientError(err.to_string()))?)
}

/// A client for `config` with herald's reconnect policy and timeouts (not connected yet).
pub fn build_client_from(mut config: Config) -> Result<fred::prelude::Client, ClientError> {
    // Retry the first connection too: a node started before Redis waits, not-ready.
    config.fail_fast = false;
    Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_exponential(
            0,
            RECONNECT_MIN_MS,
            RECONNECT_MAX_MS,
            2,
        ))
        .with_connection_config(|connection| {
            connection.connection_timeout = COMMAND_TIMEOUT;
            connection.internal_command_timeout = COMMAND_TIMEOUT;
            // A command cut off with its connection is not sent again after the
            // reconnect: it may already have run, and a publish that runs twice is a
            // duplicate no client can detect. The caller learns the outcome is unknown
            // and retries with its Idempotency-Key.
            connection.max_command_attempts = 1;
        })
        .with_performance_config(|performance| {
            // Pub/sub messages wait here for the subscriber task; fred's default of 32
            // would drop messages (clients then refill from history) on short bursts.
            performance.broadcast_channel_capacity = MESSAGE_BUFFER;
        })
        .build()
        .map_err(|err| ClientError(err.to_string()))
}

/// Whether `client` is connected within `wait` (it keeps connecting in the background
/// either way). Does not start the connection: call `connect` first.
pub async fn wait_connected(client: &fred::prelude::Client, wait: Duration) -> bool {
    matches!(
        tokio::time::timeout(wait, client.wait_for_connect()).await,
        Ok(Ok(()))
    )
}

/// Starts connecting `client` and waits up to `wait` for it; says `not_yet` in a warning
/// when Redis is not there yet (the client keeps connecting in the background).
pub async fn connect_and_wait(client: &fred::prelude::Client, wait: Duration, not_yet: &str) {
    client.connect();
    if !wait_connected(client, wait).await {
        tracing::warn!("{not_yet}");
    }
}

/// Closes `clients` when `stopped` is cancelled (after the drain: publishes and task ends
/// during it still need them).
pub fn quit_on(stopped: &CancellationToken, clients: Vec<fred::prelude::Client>) {
    let stopped = stopped.clone();
    tokio::spawn(async move {
        stopped.cancelled().await;
        for client in clients {
            let _ = client.quit().await;
        }
    });
}
