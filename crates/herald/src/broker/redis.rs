//! The multi-node broker: offsets, epochs and history live in Redis, and every publish
//! reaches every node through Redis pub/sub.
//!
//! Keys, for a channel `c` (the braces keep a channel's keys in one Cluster slot):
//! - `herald:{c}:meta`: a hash with the channel's `epoch` and last `offset`. It expires
//!   [`META_GRACE`] after the history TTL, counted from the last publish or position
//!   query, so a channel that is still in use keeps its epoch after its history aged out.
//! - `herald:{c}:history`: a list of `"{offset} {unix_ms} {sealed JSON}"`, oldest
//!   first, trimmed to `HERALD_HISTORY_SIZE` and expiring `HERALD_HISTORY_TTL` after the
//!   last publish. Entries older than the TTL are skipped when read, as the memory broker
//!   prunes them.
//! - `herald:{c}:messages`: the pub/sub channel; each payload is
//!   `"{offset} {epoch} {sealed JSON}"`.
//!
//! (The per-user connection counts of `limits::shared` are `herald:{conns}:…`.)
//!
//! A publish is one Lua script ([`PUBLISH_SCRIPT`]): it creates the epoch if the channel
//! has none, increments the offset, seals the message with the same bytes as
//! [`Draft::seal`], appends it to history and publishes it. Redis runs a script as one
//! step, so offsets grow by exactly 1, a message is in history before any node receives
//! it, and every node receives a channel's messages in offset order.
//!
//! Each node holds a connection for commands and the subscriber's pub/sub connection
//! ([`Subscriber`], in `subscriber.rs`), which subscribes once per channel with a socket
//! on this node. Both reconnect with backoff; after the subscriber reconnects it
//! subscribes again to every channel the node still has and catches each one up from
//! history, so nothing published while it was cut off is left unsent.
//!
//! On one Redis (`redis://`) messages go through plain pub/sub (PUBLISH, SUBSCRIBE),
//! which any Redis version has. On a Redis Cluster (`redis-cluster://`) they go through
//! sharded pub/sub (SPUBLISH, SSUBSCRIBE; Redis 7.0 or later): a message is only sent
//! to the primary that owns its channel's slot, instead of to every node of the
//! cluster. The pub/sub channel carries the channel's hash tag, so the publish script
//! and the shard channel are in one slot. On a Cluster, scripts ([`Shards`]) and shard
//! subscriptions (the subscriber) each use one connection per primary, so a failing
//! primary stops only its own channels; the subscriber checks the slot map and each
//! primary's count of its subscriptions every [`SLOT_CHECK_INTERVAL`] (Redis drops a
//! slot's subscriptions when the slot leaves a primary, without a message the client
//! library passes on).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::{ClientLike, Config, Value};
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

mod shards;
mod subscriber;

pub use shards::Shards;
use subscriber::{Parts, Subscriber};

use crate::broker::{Broker, BrokerError, History, Position, Published};
use crate::channel::{new_id, now_rfc3339, Channel, Draft, Message};
use crate::hub::Hub;
use crate::redis::{build_client, COMMAND_TIMEOUT, FIRST_CONNECT_WAIT};
use crate::sync::lock;

/// How long after its history the epoch and offset of an idle channel are kept.
pub const META_GRACE: Duration = Duration::from_secs(24 * 60 * 60);

/// Channels read at once when catching up after a reconnect.
const CATCH_UP_CONCURRENCY: usize = 16;

/// On a Cluster, how often the subscriber refreshes the slot map to find channels whose
/// slot moved to another primary (and so lost their shard subscription). This bounds
/// how long a node misses live messages of such a channel.
pub const SLOT_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// How messages travel between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fanout {
    /// PUBLISH and SUBSCRIBE: one Redis (any version).
    Plain,
    /// SPUBLISH and SSUBSCRIBE: a Redis Cluster (Redis 7.0 or later).
    Sharded,
}

impl Fanout {
    fn of(client: &fred::prelude::Client) -> Self {
        if client.is_clustered() {
            Fanout::Sharded
        } else {
            Fanout::Plain
        }
    }

    /// The command [`PUBLISH_SCRIPT`] publishes with.
    fn publish_command(self) -> &'static str {
        match self {
            Fanout::Plain => "PUBLISH",
            Fanout::Sharded => "SPUBLISH",
        }
    }
}

/// Creates the channel's epoch from ARGV[1] if it has none (dropping any history left
/// from an older epoch), refreshes the meta key's TTL (ARGV[2], ms) and returns
/// `{epoch, offset, history entries}`; the entries only when ARGV[3] is `1`.
pub const READ_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local offset = redis.call('HGET', KEYS[1], 'offset')
local entries = {}
if ARGV[3] == '1' then
  entries = redis.call('LRANGE', KEYS[2], 0, -1)
end
return {epoch, offset, entries}
"#;

/// The publish: KEYS = meta, history, pub/sub channel; ARGV = draft body, id,
/// timestamp, new epoch, history size, history TTL (ms), meta TTL (ms), now (unix ms),
/// publish command (`PUBLISH` or `SPUBLISH`), channel name, and the epoch and highest
/// offset the node was given in the channel before (empty and 0 when it knows none).
/// Returns `{offset, epoch, reset}`. The sealed bytes are built exactly as
/// [`Draft::seal`].
///
/// An offset below the one the node knows, in the same epoch, means Redis lost writes
/// it had acknowledged (a failover, a restart from an older copy): the script starts
/// the new epoch (ARGV\[4\]) instead of handing those offsets out again, and `reset`
/// is 1. The comparison is with Redis's state, not with the order replies arrive in,
/// so concurrent publishes cannot make it fire wrongly.
///
/// The pub/sub channel is not a key, but it is declared in KEYS so that every name the
/// script touches is declared, and on a Cluster SPUBLISH needs it in the script's slot
/// (it shares the channel's hash tag).
pub const PUBLISH_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local reset = 0
if epoch and epoch == ARGV[11] and (tonumber(redis.call('HGET', KEYS[1], 'offset')) or 0) < tonumber(ARGV[12]) then
  epoch = false
  reset = 1
end
if not epoch then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('DEL', KEYS[2])
end
local offset = string.format('%d', redis.call('HINCRBY', KEYS[1], 'offset', 1))
local body = ARGV[1]
local sealed = string.sub(body, 1, -2)
if #body > 2 then
  sealed = sealed .. ','
end
sealed = sealed .. '"channel":"' .. ARGV[10] .. '","id":"' .. ARGV[2] .. '","offset":' .. offset .. ',"epoch":"' .. epoch
  .. '","timestamp":"' .. ARGV[3] .. '"}'
local size = tonumber(ARGV[5])
if size > 0 then
  redis.call('RPUSH', KEYS[2], offset .. ' ' .. ARGV[8] .. ' ' .. sealed)
  redis.call('LTRIM', KEYS[2], -size, -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call(ARGV[9], KEYS[3], offset .. ' ' .. epoch .. ' ' .. sealed)
return {offset, epoch, reset}
"#;

/// Starts a new epoch when the channel still has the epoch a node found inconsistent
/// (its offsets went back: a failover lost acknowledged writes), and tells every node
/// with an epoch marker on pub/sub (`"0 {epoch} "`: no message bytes). KEYS = meta,
/// history, pub/sub channel; ARGV = the inconsistent epoch, the new epoch, meta TTL
/// (ms), publish command. Returns `{epoch, offset}`: the new epoch at offset 0, or
/// whatever the channel has if another node already moved it on.
pub const RESET_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if (not epoch) or epoch == ARGV[1] then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('DEL', KEYS[2])
  redis.call(ARGV[4], KEYS[3], '0 ' .. epoch .. ' ')
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {epoch, redis.call('HGET', KEYS[1], 'offset')}
"#;

fn meta_key(channel: &str) -> String {
    format!("herald:{{{channel}}}:meta")
}

fn history_key(channel: &str) -> String {
    format!("herald:{{{channel}}}:history")
}

fn pubsub_channel(channel: &str) -> String {
    format!("herald:{{{channel}}}:messages")
}

/// The herald channel name inside a pub/sub channel name.
fn channel_of_pubsub(name: &str) -> Option<&str> {
    name.strip_prefix("herald:{")?.strip_suffix("}:messages")
}

/// Whether to send a command now: not while disconnected, so the caller fails at once.
///
/// On a Cluster this means *every* primary is connected, and fred's one router task
/// stalls every command while it reconnects to any primary (fred issue 363); so the
/// scripts whose callers need a partial outage to stay partial go through [`Shards`]
/// instead, one connection per primary.
pub(crate) fn may_send(client: &fred::prelude::Client) -> bool {
    client.is_connected()
}

/// Runs `script` within [`COMMAND_TIMEOUT`]: on a Cluster through `shards` (its slot's
/// primary), else on `client`, failing at once while `client` is disconnected. A
/// timeout after sending is [`BrokerError::OutcomeUnknown`].
async fn run_script(
    client: &fred::prelude::Client,
    shards: Option<&Shards>,
    script: &Script,
    keys: Vec<String>,
    args: Vec<Value>,
) -> Result<Value, BrokerError> {
    if let Some(shards) = shards {
        return shards.eval(script, keys, args, COMMAND_TIMEOUT).await;
    }
    if !may_send(client) {
        return Err(BrokerError::Unavailable("not connected to Redis".into()));
    }
    tokio::time::timeout(
        COMMAND_TIMEOUT,
        script.evalsha_with_reload::<Value, _, _>(client, keys, args),
    )
    .await
    .map_err(|_| BrokerError::OutcomeUnknown {
        reason: "Redis did not answer in time".into(),
        id: None,
    })?
    .map_err(sent_but_failed)
}

fn unavailable(err: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(err.to_string())
}

/// A command that failed after it was handed to the connection: lost in transit or
/// unanswered (it may have run), or refused by Redis (it did not).
fn sent_but_failed(err: fred::error::Error) -> BrokerError {
    use fred::error::ErrorKind;
    match err.kind() {
        ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Timeout | ErrorKind::Protocol => {
            BrokerError::OutcomeUnknown {
                reason: err.to_string(),
                id: None,
            }
        }
        _ => unavailable(err),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// Splits `"{number} {rest}"`.
fn split_number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let space = bytes.iter().position(|&b| b == b' ')?;
    let number = std::str::from_utf8(&bytes[..space]).ok()?.parse().ok()?;
    Some((number, &bytes[space + 1..]))
}

fn value_bytes(value: &Value) -> Option<&[u8]> {
    value.as_bytes()
}

fn value_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Integer(n) => u64::try_from(*n).ok(),
        other => std::str::from_utf8(other.as_bytes()?).ok()?.parse().ok(),
    }
}

fn value_string(value: &Value) -> Option<String> {
    std::str::from_utf8(value.as_bytes()?).ok().map(str::to_owned)
}

fn history_ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn meta_ttl_ms(history_ttl: Duration) -> u64 {
    history_ttl_ms(history_ttl).saturating_add(u64::try_from(META_GRACE.as_millis()).unwrap_or(u64::MAX))
}

/// `{epoch, offset, entries}` from a [`READ_SCRIPT`] reply.
fn parse_read(reply: Value) -> Result<(Position, Vec<Value>), BrokerError> {
    let malformed = || BrokerError::Unavailable("unexpected reply from Redis".into());
    let Value::Array(mut parts) = reply else {
        return Err(malformed());
    };
    if parts.len() != 3 {
        return Err(malformed());
    }
    let entries = match parts.pop() {
        Some(Value::Array(entries)) => entries,
        _ => Vec::new(),
    };
    let offset = parts.get(1).and_then(value_u64).ok_or_else(malformed)?;
    let epoch = parts.first().and_then(value_string).ok_or_else(malformed)?;
    Ok((Position { epoch, offset }, entries))
}

/// `{epoch, offset}` from a [`RESET_SCRIPT`] reply.
fn parse_position(reply: Value) -> Result<Position, BrokerError> {
    let malformed = || BrokerError::Unavailable("unexpected reply from Redis".into());
    let Value::Array(parts) = reply else {
        return Err(malformed());
    };
    let epoch = parts.first().and_then(value_string).ok_or_else(malformed)?;
    let offset = parts.get(1).and_then(value_u64).ok_or_else(malformed)?;
    Ok(Position { epoch, offset })
}

/// The node's half of a Redis-backed broker: the command connection and the handle of
/// the subscriber task, which stops when this is dropped.
pub struct RedisBroker {
    client: fred::prelude::Client,
    /// On a Cluster, scripts go to their slot's primary over its own connection.
    shards: Option<Arc<Shards>>,
    subscriber: Arc<Subscriber>,
    publish_script: Script,
    read_script: Script,
    fanout: Fanout,
    history_size: usize,
    history_ttl: Duration,
    _stop: DropGuard,
}

/// Refuses a URL that does not match the Redis it names: `redis://` given a Cluster
/// node (every other slot would answer MOVED), or `redis-cluster://` given a cluster
/// older than Redis 7.0 (no sharded pub/sub). Checks nothing while Redis is unreachable.
async fn check_deployment(client: &fred::prelude::Client, fanout: Fanout) -> Result<(), BrokerError> {
    if !client.is_connected() {
        return Ok(());
    }
    match fanout {
        Fanout::Sharded => {
            if let Some(version) = client.server_version().filter(|version| version.major < 7) {
                return Err(BrokerError::Unavailable(format!(
                    "herald needs Redis 7.0 or later on a Redis Cluster (for sharded pub/sub), \
                     and this cluster runs Redis {version}: upgrade it, or use one Redis with redis://"
                )));
            }
        }
        Fanout::Plain => {
            let info = tokio::time::timeout(
                COMMAND_TIMEOUT,
                client.custom::<String, _>(
                    CustomCommand::new_static("INFO", ClusterHash::Random, false),
                    vec!["cluster"],
                ),
            )
            .await;
            if let Ok(Ok(info)) = info {
                if info.lines().any(|line| line.trim() == "cluster_enabled:1") {
                    return Err(BrokerError::Unavailable(
                        "this Redis is a Redis Cluster node: name the cluster with \
                         redis-cluster://host:port (other nodes may follow as ?node=host:port&node=…)"
                            .into(),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The Cluster's per-primary command connections, when `client` is a Cluster client.
pub(crate) fn shards_for(
    url: &str,
    client: &fred::prelude::Client,
) -> Result<Option<Arc<Shards>>, BrokerError> {
    if !client.is_clustered() {
        return Ok(None);
    }
    let config = Config::from_url(url).map_err(unavailable)?;
    Ok(Some(Arc::new(Shards::new(client.clone(), config))))
}

impl RedisBroker {
    /// Connects to `url` and starts the subscriber task, which stops on `shutdown` or
    /// when the broker is dropped. Waits a few seconds for Redis; if it is not there
    /// yet, the broker starts not-ready and keeps trying.
    pub async fn connect(
        url: &str,
        hub: Arc<Hub>,
        history_size: usize,
        history_ttl: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Self, BrokerError> {
        let client = build_client(url)?;
        let fanout = Fanout::of(&client);
        let shards = shards_for(url, &client)?;
        client.connect();
        let stop = shutdown.child_token();
        let subscriber = Arc::new(Subscriber::new(Parts {
            hub,
            fanout,
            commands: client.clone(),
            shards: shards.clone(),
            url: url.to_owned(),
            meta_ttl_ms: meta_ttl_ms(history_ttl),
            stop: stop.clone(),
        })?);
        tokio::spawn(subscriber.clone().run(stop.clone()));
        tokio::spawn({
            let client = client.clone();
            let stop = stop.clone();
            let shards = shards.clone();
            async move {
                stop.cancelled().await;
                if let Some(shards) = shards {
                    shards.quit().await;
                }
                let _ = client.quit().await;
            }
        });
        let connected = tokio::time::timeout(FIRST_CONNECT_WAIT, client.wait_for_connect())
            .await
            .is_ok_and(|connected| connected.is_ok());
        if !connected || !subscriber.wait_for_connect(FIRST_CONNECT_WAIT).await {
            tracing::warn!("Redis is not reachable yet: starting not-ready, retrying");
        }
        check_deployment(&client, fanout).await?;
        if let Some(shards) = &shards {
            // Makes the connections to the primaries now, so readiness is known.
            shards.any_up();
        }
        Ok(Self {
            client,
            shards,
            subscriber,
            publish_script: Script::from_lua(PUBLISH_SCRIPT),
            read_script: Script::from_lua(READ_SCRIPT),
            fanout,
            history_size,
            history_ttl,
            _stop: stop.drop_guard(),
        })
    }

    fn history_ttl_ms(&self) -> u64 {
        history_ttl_ms(self.history_ttl)
    }

    fn meta_ttl_ms(&self) -> u64 {
        meta_ttl_ms(self.history_ttl)
    }

    /// Runs `script`, failing at once while disconnected (one Redis) and after
    /// [`COMMAND_TIMEOUT`].
    async fn eval(&self, script: &Script, keys: Vec<String>, args: Vec<Value>) -> Result<Value, BrokerError> {
        run_script(&self.client, self.shards.as_deref(), script, keys, args).await
    }

    /// `{epoch, offset, entries}` from [`READ_SCRIPT`].
    async fn read(
        &self,
        channel: &Channel,
        with_history: bool,
    ) -> Result<(Position, Vec<Value>), BrokerError> {
        let name = channel.name();
        let reply = self
            .eval(
                &self.read_script,
                vec![meta_key(name), history_key(name)],
                vec![
                    Value::from(new_id()),
                    Value::from(self.meta_ttl_ms().to_string()),
                    Value::from(if with_history { "1" } else { "0" }),
                ],
            )
            .await?;
        let (position, entries) = parse_read(reply)?;
        self.subscriber.note(name, &position.epoch, position.offset);
        Ok((position, entries))
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, channel: &Channel, draft: &Draft) -> Result<Published, BrokerError> {
        let name = channel.name();
        let id = new_id();
        let (known_epoch, known_offset) = self
            .subscriber
            .known(name)
            .map_or((String::new(), 0), |(epoch, offset)| {
                (String::from(&*epoch), offset)
            });
        let reply = self
            .eval(
                &self.publish_script,
                vec![meta_key(name), history_key(name), pubsub_channel(name)],
                vec![
                    Value::from(Bytes::copy_from_slice(draft.as_bytes())),
                    Value::from(id.clone()),
                    Value::from(now_rfc3339()),
                    Value::from(new_id()),
                    Value::from(self.history_size.to_string()),
                    Value::from(self.history_ttl_ms().to_string()),
                    Value::from(self.meta_ttl_ms().to_string()),
                    Value::from(unix_ms().to_string()),
                    Value::from(self.fanout.publish_command()),
                    Value::from(name),
                    Value::from(known_epoch),
                    Value::from(known_offset.to_string()),
                ],
            )
            .await
            .map_err(|err| {
                // On a Cluster, the primary may be failing over.
                self.subscriber.publish_failed(name);
                err.for_message(&id)
            })?;
        let malformed = || BrokerError::Unavailable("unexpected reply from Redis".into());
        let Value::Array(parts) = reply else {
            return Err(malformed());
        };
        let offset = parts.first().and_then(value_u64).ok_or_else(malformed)?;
        let epoch = parts.get(1).and_then(value_string).ok_or_else(malformed)?;
        if parts.get(2).and_then(value_u64) == Some(1) {
            tracing::warn!(
                channel = name,
                epoch,
                "channel offset went back in Redis (lost writes): this publish started a new epoch"
            );
        }
        self.subscriber.note(name, &epoch, offset);
        Ok(Published { id, offset, epoch })
    }

    async fn history(&self, channel: &Channel, since: u64, limit: usize) -> Result<History, BrokerError> {
        let (position, entries) = self.read(channel, self.history_size > 0).await?;
        let now_ms = unix_ms();
        let ttl_ms = self.history_ttl_ms();
        let now = Instant::now();
        let kept: Vec<(u64, u64, &[u8])> = entries
            .iter()
            .filter_map(|entry| {
                let (offset, rest) = split_number(value_bytes(entry)?)?;
                let (at_ms, bytes) = split_number(rest)?;
                Some((offset, at_ms, bytes))
            })
            .filter(|(_, at_ms, _)| now_ms.saturating_sub(*at_ms) < ttl_ms)
            .collect();
        let oldest_kept = kept.first().map_or(position.offset + 1, |(offset, _, _)| *offset);
        let epoch: Arc<str> = Arc::from(position.epoch.as_str());
        let complete = since <= position.offset && since + 1 >= oldest_kept;
        let messages = kept
            .iter()
            .filter(|(offset, _, _)| *offset > since)
            .take(limit)
            .map(|(offset, at_ms, bytes)| Message {
                offset: *offset,
                epoch: epoch.clone(),
                bytes: Bytes::copy_from_slice(bytes),
                published_at: now
                    .checked_sub(Duration::from_millis(now_ms.saturating_sub(*at_ms)))
                    .unwrap_or(now),
            })
            .collect();
        Ok(History {
            position,
            messages,
            complete,
        })
    }

    async fn position(&self, channel: &Channel) -> Result<Position, BrokerError> {
        Ok(self.read(channel, false).await?.0)
    }

    async fn subscribe(&self, channel: &Channel) -> Result<(), BrokerError> {
        self.subscriber.subscribe(channel.name()).await
    }

    async fn unsubscribe(&self, channel: &Channel) {
        self.subscriber.unsubscribe(channel.name()).await;
    }

    /// One Redis: both connections are up. A Cluster: some primary answers, because
    /// the cluster client calls itself disconnected while any one primary is (and a
    /// load balancer taking every node out during one shard's failover would turn a
    /// partial outage into a full one).
    async fn ready(&self) -> bool {
        match &self.shards {
            Some(shards) => shards.any_up() && self.subscriber.connected(),
            None => self.client.is_connected() && self.subscriber.connected(),
        }
    }

    fn reconnects(&self) -> u64 {
        self.subscriber.reconnects()
    }
}
