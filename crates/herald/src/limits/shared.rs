//! The per-user connection count across nodes, in Redis.
//!
//! Keys, all with the hash tag `{conns}` so that on a Redis Cluster they share one slot
//! and one script may read and write several of them:
//! - `herald:{conns}:user:{user_id}`: a hash of node id → open sockets of the user on
//!   that node.
//! - `herald:{conns}:nodes`: a hash of node id → the time (Redis's clock, unix ms) until
//!   which the node counts as alive. Each node pushes its own entry the node TTL ahead
//!   (`node_ttl_ms`, default [`NODE_TTL`]) every third of it, and on every slot it takes.
//!   Presence (`crate::presence`) reads the same hash to tell which nodes' users count.
//!
//! Counting skips (and deletes) the entries of nodes that are not alive, so a node that
//! dies without releasing its slots frees them within the node TTL. Every key a script
//! touches is declared in its KEYS. The cost of the one slot: on a Cluster, every
//! handshake and close of every user goes to the primary holding it (one short script
//! each). While that primary is down, handshakes on a Cluster are counted on each node
//! alone (`ConnectionLimits::acquire`), so they fail only with their channel's shard.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Client, ClientLike, Value};
use fred::types::scripts::Script;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::redis::{may_send, shards_for, Shards};
use crate::broker::BrokerError;
use crate::redis::{build_client, SECONDARY_CONNECT_WAIT};

/// A node whose heartbeat is older than this no longer counts (`node_ttl_ms`).
pub const NODE_TTL: Duration = crate::config::DEFAULT_NODE_TTL;

/// How often a node refreshes its heartbeat: a third of its TTL.
pub fn heartbeat_interval(node_ttl: Duration) -> Duration {
    (node_ttl / 3).max(Duration::from_millis(100))
}

/// How long a count change may take before the handshake gives up.
const TIMEOUT: Duration = Duration::from_secs(3);

/// On a Cluster, how long a handshake waits for the count before counting on this node
/// alone: a primary that just died holds commands until the client notices.
const CLUSTER_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a failed release is retried (while Redis is down), at most.
const RELEASE_RETRIES: u32 = 120;

/// KEYS = the user's hash, the nodes hash; ARGV = node id, max, node TTL (ms). Marks
/// this node alive, then returns the user's count including the new socket, or -1 when
/// the user is at the limit.
const ACQUIRE: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HSET', KEYS[2], ARGV[1], now + tonumber(ARGV[3]))
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #fields, 2 do
  local node = fields[i]
  local alive_until = tonumber(redis.call('HGET', KEYS[2], node) or '0')
  if alive_until > now then
    total = total + tonumber(fields[i + 1])
  else
    redis.call('HDEL', KEYS[1], node)
  end
end
if total >= tonumber(ARGV[2]) then
  return -1
end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return total + 1
"#;

/// KEYS = the nodes hash; ARGV = node id, node TTL (ms). Marks this node alive and
/// forgets the nodes that are not.
const HEARTBEAT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if tonumber(fields[i + 1]) <= now then
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
return 1
"#;

/// KEYS = the user's hash; ARGV = node id.
const RELEASE: &str = r#"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return n
"#;

fn user_key(user_id: &str) -> String {
    format!("herald:{{conns}}:user:{user_id}")
}

/// The hash of live nodes.
pub const NODES_KEY: &str = "herald:{conns}:nodes";

/// This node's handle on the shared counts.
pub struct SharedCounts {
    client: Client,
    /// On a Cluster, the connection to the primary of `{conns}` alone, so a failover
    /// elsewhere does not stop handshakes.
    shards: Option<Arc<Shards>>,
    node_id: String,
    /// The node TTL in milliseconds, as the scripts take it.
    node_ttl_ms: String,
    acquire: Script,
    /// Releases are queued to a task, because a slot is released from `Drop`.
    releases: mpsc::UnboundedSender<String>,
    /// When the fallback to local counts was last logged.
    degraded_logged: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// How often the fallback to local counts is logged, at most.
const DEGRADED_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl SharedCounts {
    /// Connects to `url` and starts the heartbeat and release tasks, which stop on
    /// `shutdown` (the heartbeat) and when this is dropped (releases).
    pub async fn start(
        url: &str,
        node_id: &str,
        node_ttl: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Self, BrokerError> {
        let node_ttl_ms = node_ttl.as_millis().to_string();
        let client = build_client(url)?;
        let shards = shards_for(url, &client)?;
        client.connect();
        crate::redis::wait_connected(&client, SECONDARY_CONNECT_WAIT).await;
        tokio::spawn({
            let client = client.clone();
            let stop = shutdown.clone();
            let node_id = node_id.to_owned();
            let node_ttl_ms = node_ttl_ms.clone();
            let script = Script::from_lua(HEARTBEAT);
            async move {
                let mut tick = tokio::time::interval(heartbeat_interval(node_ttl));
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = tick.tick() => {
                            let beat = tokio::time::timeout(
                                TIMEOUT,
                                script.evalsha_with_reload::<Value, _, _>(
                                    &client,
                                    vec![NODES_KEY],
                                    vec![node_id.clone(), node_ttl_ms.clone()],
                                ),
                            )
                            .await;
                            match beat {
                                Ok(Ok(_)) => {}
                                Ok(Err(err)) => tracing::warn!(error = %err, "node heartbeat failed"),
                                Err(_) => tracing::warn!("node heartbeat failed: Redis did not answer in time"),
                            }
                        }
                    }
                }
            }
        });
        let (releases, mut queue) = mpsc::unbounded_channel::<String>();
        tokio::spawn({
            let client = client.clone();
            let node_id = node_id.to_owned();
            let script = Script::from_lua(RELEASE);
            async move {
                while let Some(user_id) = queue.recv().await {
                    for attempt in 0..RELEASE_RETRIES {
                        let done = tokio::time::timeout(
                            TIMEOUT,
                            script.evalsha_with_reload::<Value, _, _>(
                                &client,
                                vec![user_key(&user_id)],
                                vec![node_id.clone()],
                            ),
                        )
                        .await;
                        if matches!(done, Ok(Ok(_))) {
                            break;
                        }
                        if attempt == 0 {
                            tracing::warn!(user_id, "releasing a connection slot failed; retrying");
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(Self {
            client,
            shards,
            node_id: node_id.to_owned(),
            node_ttl_ms,
            acquire: Script::from_lua(ACQUIRE),
            releases,
            degraded_logged: std::sync::Mutex::new(None),
        })
    }

    /// Whether the counts can be read (the connection to Redis is up); on a Cluster
    /// always, as handshakes fall back to counting on this node while the primary of
    /// `{conns}` is down.
    pub fn ready(&self) -> bool {
        self.shards.is_some() || self.client.is_connected()
    }

    /// Whether the counts are on a Redis Cluster.
    pub fn on_cluster(&self) -> bool {
        self.shards.is_some()
    }

    /// Logs (at most once per [`DEGRADED_LOG_INTERVAL`]) that sockets are being counted
    /// on this node alone.
    pub fn note_degraded(&self, reason: &str) {
        let mut last = crate::sync::lock(&self.degraded_logged);
        if last.is_none_or(|at| at.elapsed() >= DEGRADED_LOG_INTERVAL) {
            *last = Some(tokio::time::Instant::now());
            tracing::warn!(
                reason,
                "the shared per-user connection count is unreachable: counting this node's sockets alone until its Redis Cluster primary is back"
            );
        }
    }

    /// Takes a slot: `Ok(Some(count))` with the user's count including it, `Ok(None)`
    /// when the user is at `max` across all nodes.
    pub async fn acquire(&self, user_id: &str, max: u32) -> Result<Option<u32>, BrokerError> {
        let keys = vec![user_key(user_id), NODES_KEY.to_owned()];
        let args = vec![
            Value::from(self.node_id.clone()),
            Value::from(max.to_string()),
            Value::from(self.node_ttl_ms.clone()),
        ];
        if let Some(shards) = &self.shards {
            let reply = shards
                .eval(&self.acquire, keys, args, CLUSTER_ACQUIRE_TIMEOUT)
                .await?;
            return Ok(reply.as_i64().and_then(|n| u32::try_from(n).ok()));
        }
        if !may_send(&self.client) {
            return Err(BrokerError::Unavailable("not connected to Redis".into()));
        }
        let reply = tokio::time::timeout(
            TIMEOUT,
            self.acquire
                .evalsha_with_reload::<i64, _, _>(&self.client, keys, args),
        )
        .await
        .map_err(|_| BrokerError::Unavailable("Redis did not answer in time".into()))?
        .map_err(|err| BrokerError::Unavailable(err.to_string()))?;
        Ok(u32::try_from(reply).ok())
    }

    /// Gives a slot back (asynchronously).
    pub fn release(&self, user_id: &str) {
        let _ = self.releases.send(user_id.to_owned());
    }
}
