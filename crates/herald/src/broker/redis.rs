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
//! Each node holds two connections: one for commands and one, owned by the subscriber
//! task ([`Subscriber`]), that subscribes once per channel with a socket on this node.
//! Both reconnect with backoff; after the subscriber reconnects it subscribes again to
//! every channel the node still has. Messages published while a node was cut off are
//! not replayed by the node: its clients fill the gap from history (on the next live
//! message, or when they reconnect with `since`).
//!
//! On one Redis (`redis://`) messages go through plain pub/sub (PUBLISH, SUBSCRIBE),
//! which any Redis version has. On a Redis Cluster (`redis-cluster://`) they go through
//! sharded pub/sub (SPUBLISH, SSUBSCRIBE; Redis 7.0 or later): a message is only sent
//! to the primary that owns its channel's slot, instead of to every node of the
//! cluster. The pub/sub channel carries the channel's hash tag, so the publish script
//! and the shard channel are in one slot, and each SSUBSCRIBE goes to the primary
//! holding that slot. Redis drops shard subscriptions when their slot moves to another
//! primary (resharding, failover) without a message the client library passes on, so on
//! a Cluster the subscriber also refreshes the slot map every [`SLOT_CHECK_INTERVAL`]
//! and subscribes again to every channel whose slot changed owner; clients fill what
//! was missed meanwhile from history.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::{ClientLike, ClusterInterface, Config, EventInterface, PubsubInterface, Value};
use fred::types::cluster::ClusterRouting;
use fred::types::config::Server;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

mod shards;

pub use shards::Shards;

use crate::broker::{Broker, BrokerError, History, Position, Published};
use crate::channel::{new_id, now_rfc3339, Channel, Draft, Message};
use crate::close::{Close, CloseCode};
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
/// publish command (`PUBLISH` or `SPUBLISH`), channel name. Returns `{offset, epoch}`. The sealed
/// bytes are built exactly as [`Draft::seal`].
///
/// The pub/sub channel is not a key, but it is declared in KEYS so that every name the
/// script touches is declared, and on a Cluster SPUBLISH needs it in the script's slot
/// (it shares the channel's hash tag).
pub const PUBLISH_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
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
return {offset, epoch}
"#;

/// Starts a new epoch when the channel still has the epoch a node found inconsistent
/// (its offsets went back: a failover lost acknowledged writes). KEYS = meta, history;
/// ARGV = the inconsistent epoch, the new epoch, meta TTL (ms). Returns `{epoch,
/// offset}`: the new epoch at offset 0, or whatever the channel has if another node
/// already moved it on.
pub const RESET_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if (not epoch) or epoch == ARGV[1] then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('DEL', KEYS[2])
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

/// The subscriber connection, the channels this node listens to, and the hub it
/// delivers to. Run by one task ([`Subscriber::run`]).
pub struct Subscriber {
    client: fred::prelude::Client,
    hub: Arc<Hub>,
    fanout: Fanout,
    /// Channels with a socket on this node. Changes to the set are made under
    /// `changing`, so a subscribe and an unsubscribe of one channel reach Redis in the
    /// order decided.
    channels: Mutex<HashMap<String, Listening>>,
    /// The command connection, to check epochs after a reconnect.
    commands: fred::prelude::Client,
    shards: Option<Arc<Shards>>,
    read_script: Script,
    meta_ttl_ms: u64,
    changing: tokio::sync::Mutex<()>,
    /// Held by the slot check that is running, so checks never pile up.
    checking: tokio::sync::Mutex<()>,
    /// Reconnections of the subscriber connection (to any server, on a Cluster), for
    /// `herald_broker_reconnects_total`; a server's first connection is not one.
    reconnects: std::sync::atomic::AtomicU64,
}

/// What the subscriber knows of one channel it listens to.
#[derive(Clone, Debug, Default)]
struct Listening {
    /// The newest epoch this node knows for the channel, and the highest offset it has
    /// seen in it from any source (its own publishes and reads, pub/sub). Redis never
    /// moves an offset back within an epoch, so finding Redis below it later means Redis
    /// lost acknowledged writes (a failover).
    seen: Option<(Arc<str>, u64)>,
    /// The epoch and offset of the last message received on the pub/sub connection.
    /// Within one epoch these only grow: a message at or below it reuses an offset.
    stream: Option<(Arc<str>, u64)>,
    /// Epochs this channel has left, newest last (a few): their late messages are
    /// dropped instead of being taken for a new epoch.
    retired: Vec<Arc<str>>,
    /// A reset of the epoch is under way (one at a time per channel).
    resetting: bool,
    /// On a Cluster, the primary that owned the channel's slot when this node last
    /// subscribed to it; `None` until a subscription succeeded.
    shard: Option<Server>,
}

/// What catching up does with one channel.
enum CatchUp {
    /// Deliver history after this offset, in this epoch.
    Deliver(Arc<str>, u64),
    /// Redis is below the highest offset seen in this epoch: replace it.
    Reset(Arc<str>, u64),
}

/// How many left epochs a channel remembers.
const RETIRED_EPOCHS: usize = 4;

/// What the subscriber does with one pub/sub message.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Deliver,
    /// A late message of an epoch the channel has left.
    Stale,
    /// An offset at or below one already received in the same epoch: Redis lost
    /// writes and handed the offset out again. The epoch must be replaced.
    Reused,
}

impl Listening {
    fn retire(&mut self, epoch: &Arc<str>) {
        if !self.retired.iter().any(|e| e == epoch) {
            if self.retired.len() == RETIRED_EPOCHS {
                self.retired.remove(0);
            }
            self.retired.push(epoch.clone());
        }
    }

    /// Records `offset` in `epoch` as seen by this node; a different epoch replaces the
    /// old one, which is retired. Returns the interned epoch.
    fn note(&mut self, epoch: &str, offset: u64) -> Arc<str> {
        match &mut self.seen {
            Some((known, max)) if **known == *epoch => {
                *max = (*max).max(offset);
                known.clone()
            }
            _ => {
                let epoch: Arc<str> = Arc::from(epoch);
                if let Some((old, _)) = self.seen.take() {
                    self.retire(&old);
                }
                self.seen = Some((epoch.clone(), offset));
                epoch
            }
        }
    }

    /// Judges a pub/sub message, and records it when it is delivered.
    fn judge(&mut self, epoch: &str, offset: u64) -> (Verdict, Arc<str>) {
        if let Some(retired) = self.retired.iter().find(|e| ***e == *epoch) {
            return (Verdict::Stale, retired.clone());
        }
        if let Some((known, max)) = &self.stream {
            if **known == *epoch && offset <= *max {
                // Nothing more of this epoch can be trusted: its later messages may
                // follow reused ones. They are dropped until the new epoch is told.
                let known = known.clone();
                self.retire(&known);
                return (Verdict::Reused, known);
            }
        }
        let interned = self.note(epoch, offset);
        self.stream = Some((interned.clone(), offset));
        (Verdict::Deliver, interned)
    }
}

/// Why the subscriber subscribes again.
#[derive(Debug)]
enum Resync {
    /// The connection to this server was made again (or for the first time).
    Reconnected(Server),
    /// Reconnect events were missed: which servers came back is not known.
    Lost,
    /// The periodic slot check on a Cluster.
    SlotCheck,
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
        let subscriber_client = build_client(url)?;
        let fanout = Fanout::of(&client);
        let shards = shards_for(url, &client)?;
        client.connect();
        subscriber_client.connect();
        let subscriber = Arc::new(Subscriber {
            client: subscriber_client,
            hub,
            fanout,
            channels: Mutex::new(HashMap::new()),
            changing: tokio::sync::Mutex::new(()),
            checking: tokio::sync::Mutex::new(()),
            commands: client.clone(),
            shards: shards.clone(),
            read_script: Script::from_lua(READ_SCRIPT),
            meta_ttl_ms: meta_ttl_ms(history_ttl),
            reconnects: std::sync::atomic::AtomicU64::new(0),
        });
        let stop = shutdown.child_token();
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
        for connection in [&client, &subscriber.client] {
            if tokio::time::timeout(FIRST_CONNECT_WAIT, connection.wait_for_connect())
                .await
                .is_err()
            {
                tracing::warn!("Redis is not reachable yet: starting not-ready, retrying");
                break;
            }
        }
        check_deployment(&client, fanout).await?;
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
                ],
            )
            .await
            .map_err(|err| err.for_message(&id))?;
        let malformed = || BrokerError::Unavailable("unexpected reply from Redis".into());
        let Value::Array(parts) = reply else {
            return Err(malformed());
        };
        let offset = parts.first().and_then(value_u64).ok_or_else(malformed)?;
        let epoch = parts.get(1).and_then(value_string).ok_or_else(malformed)?;
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

    async fn ready(&self) -> bool {
        self.client.is_connected() && self.subscriber.client.is_connected()
    }

    fn reconnects(&self) -> u64 {
        self.subscriber
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The primary that owns `channel`'s slot in `routing`.
fn shard_in(routing: &ClusterRouting, channel: &str) -> Option<Server> {
    let slot = fred::util::redis_keyslot(pubsub_channel(channel).as_bytes());
    routing.get_server(slot).cloned()
}

impl Subscriber {
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let _changing = self.changing.lock().await;
        lock(&self.channels).entry(channel.to_owned()).or_default();
        if !may_send(&self.client) {
            // Subscribed again by the task when the connection comes back.
            return Err(BrokerError::Unavailable("not connected to Redis".into()));
        }
        self.listen(channel).await
    }

    /// Sends the SUBSCRIBE (SSUBSCRIBE on a Cluster) for `channel`, and on a Cluster
    /// records which primary took it, or that none did, so the slot check tries again.
    /// Called under `changing`.
    async fn listen(&self, channel: &str) -> Result<(), BrokerError> {
        let name = pubsub_channel(channel);
        let subscribed = match self.fanout {
            Fanout::Plain => tokio::time::timeout(COMMAND_TIMEOUT, self.client.subscribe(name)).await,
            // One channel per SSUBSCRIBE: the client follows a MOVED reply for a single
            // channel, and channels of different slots may not share one.
            Fanout::Sharded => tokio::time::timeout(COMMAND_TIMEOUT, self.client.ssubscribe(name)).await,
        };
        let subscribed = match subscribed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(unavailable(err)),
            Err(_) => Err(BrokerError::Unavailable("Redis did not answer in time".into())),
        };
        if self.fanout == Fanout::Sharded {
            let shard = match (&subscribed, self.client.cached_cluster_state()) {
                (Ok(()), Some(routing)) => shard_in(&routing, channel),
                _ => None,
            };
            if let Some(listening) = lock(&self.channels).get_mut(channel) {
                listening.shard = shard;
            }
        }
        subscribed
    }

    async fn unsubscribe(&self, channel: &str) {
        let _changing = self.changing.lock().await;
        // A socket may have joined since the hub reported this channel empty.
        if self.hub.has_subscribers(channel) {
            return;
        }
        lock(&self.channels).remove(channel);
        if may_send(&self.client) {
            let name = pubsub_channel(channel);
            let unsubscribed = match self.fanout {
                Fanout::Plain => tokio::time::timeout(COMMAND_TIMEOUT, self.client.unsubscribe(name)).await,
                Fanout::Sharded => {
                    tokio::time::timeout(COMMAND_TIMEOUT, self.client.sunsubscribe(name)).await
                }
            };
            if !matches!(unsubscribed, Ok(Ok(()))) {
                tracing::debug!(channel, "Redis unsubscribe failed");
            }
        }
    }

    /// Records a position this node read or published in `channel`, if it listens to
    /// it.
    fn note(&self, channel: &str, epoch: &str, offset: u64) {
        if let Some(listening) = lock(&self.channels).get_mut(channel) {
            listening.note(epoch, offset);
        }
    }

    /// Subscribes again to the channels that need it: after a reconnect, every channel
    /// (on a Cluster, those held by the primary that came back); on a Cluster's slot
    /// check, those whose slot changed owner or whose subscription failed. Then checks
    /// their epochs.
    async fn resync(self: &Arc<Self>, why: Resync) {
        let _changing = self.changing.lock().await;
        let channels: Vec<(String, Listening)> = lock(&self.channels)
            .iter()
            .map(|(channel, listening)| (channel.clone(), listening.clone()))
            .collect();
        if channels.is_empty() {
            return;
        }
        let again = match self.fanout {
            Fanout::Plain => {
                if matches!(why, Resync::SlotCheck) {
                    return;
                }
                let names: Vec<String> = channels
                    .iter()
                    .map(|(channel, _)| pubsub_channel(channel))
                    .collect();
                match self.client.subscribe(names).await {
                    Ok(()) => tracing::info!(channels = channels.len(), "resubscribed to Redis"),
                    Err(err) => tracing::warn!(error = %err, "Redis resubscribe failed"),
                }
                channels
            }
            Fanout::Sharded => {
                let Some(routing) = self.client.cached_cluster_state() else {
                    return;
                };
                let mut again = Vec::new();
                let mut failed = 0_usize;
                for (channel, listening) in channels {
                    let owner = shard_in(&routing, &channel);
                    let needed = listening.shard.is_none()
                        || listening.shard != owner
                        || match &why {
                            Resync::Reconnected(server) => owner.as_ref() == Some(server),
                            Resync::Lost => true,
                            Resync::SlotCheck => false,
                        };
                    if !needed {
                        continue;
                    }
                    if !may_send(&self.client) {
                        // The reconnect that follows resyncs again.
                        break;
                    }
                    match self.listen(&channel).await {
                        Ok(()) => again.push((channel, listening)),
                        Err(err) => {
                            failed += 1;
                            tracing::debug!(channel, error = %err, "Redis Cluster resubscribe failed");
                        }
                    }
                }
                if !again.is_empty() || failed > 0 {
                    tracing::info!(channels = again.len(), failed, reason = ?why, "resubscribed to Redis Cluster shards");
                }
                again
            }
        };
        self.catch_up(again.into_iter().map(|(channel, _)| channel).collect())
            .await;
    }

    /// Runs a script on the command connection (on a Cluster, its slot's primary).
    async fn script(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, BrokerError> {
        run_script(&self.commands, self.shards.as_deref(), script, keys, args).await
    }

    /// Brings this node's sockets of `channels` up to date with Redis after the node
    /// may have missed messages (a reconnect, a resubscribe, a lagging receiver).
    /// Messages published meanwhile are delivered from history (sessions skip what they
    /// have); a new epoch is announced with an epoch marker after its messages; an
    /// epoch whose offset went back (lost writes) is replaced. A channel whose state
    /// cannot be read is closed with 1001: its clients resume and are told what they
    /// missed, never left waiting for a message that will not come.
    async fn catch_up(self: &Arc<Self>, channels: Vec<String>) {
        if channels.is_empty() {
            return;
        }
        let _ = tokio::time::timeout(FIRST_CONNECT_WAIT, self.commands.wait_for_connect()).await;
        let results: Vec<(String, Result<(), BrokerError>)> = futures_util::stream::iter(channels)
            .map(|channel| async move {
                let result = self.catch_up_one(&channel).await;
                (channel, result)
            })
            .buffer_unordered(CATCH_UP_CONCURRENCY)
            .collect()
            .await;
        let lost = Close::new(CloseCode::GoingAway, "lost position; resume with since");
        for (channel, result) in results {
            if let Err(err) = result {
                let closed = self.hub.disconnect_channel(&channel, &lost);
                tracing::warn!(channel, closed, error = %err, "could not catch up with Redis: closing the channel's sockets (1001)");
            }
        }
    }

    async fn catch_up_one(self: &Arc<Self>, channel: &str) -> Result<(), BrokerError> {
        let (position, _) = self.read_channel(channel, false).await?;
        let decision = {
            let mut channels = lock(&self.channels);
            let Some(listening) = channels.get_mut(channel) else {
                return Ok(());
            };
            match &listening.seen {
                Some((known, max)) if **known == *position.epoch && position.offset < *max => {
                    CatchUp::Reset(known.clone(), *max)
                }
                _ => {
                    let from = match &listening.stream {
                        Some((known, max)) if **known == *position.epoch => *max,
                        _ => 0,
                    };
                    CatchUp::Deliver(listening.note(&position.epoch, position.offset), from)
                }
            }
        };
        let (epoch, from) = match decision {
            CatchUp::Deliver(epoch, from) => (epoch, from),
            CatchUp::Reset(known, max) => {
                tracing::warn!(
                    channel,
                    seen = max,
                    now = position.offset,
                    "channel offset went back in Redis (lost writes): starting a new epoch"
                );
                self.reset(channel, known).await;
                return Ok(());
            }
        };
        // History is read only when something was missed (most channels after a short
        // blip have nothing to send), and only kept if the epoch did not move meanwhile.
        let entries = if position.offset > from {
            let (again, entries) = self.read_channel(channel, true).await?;
            if again.epoch == position.epoch {
                entries
            } else {
                Vec::new()
            }
        } else {
            Vec::new()
        };
        let now = Instant::now();
        for entry in &entries {
            let Some((offset, rest)) = value_bytes(entry).and_then(split_number) else {
                continue;
            };
            let Some((_, bytes)) = split_number(rest) else {
                continue;
            };
            if offset > from && offset <= position.offset {
                self.hub.deliver(
                    channel,
                    &Message {
                        offset,
                        epoch: epoch.clone(),
                        bytes: Bytes::copy_from_slice(bytes),
                        published_at: now,
                    },
                );
            }
        }
        self.hub
            .deliver(channel, &Message::epoch_marker(epoch, position.offset));
        Ok(())
    }

    /// The channel's position, with its history entries when `with_history`.
    async fn read_channel(
        &self,
        channel: &str,
        with_history: bool,
    ) -> Result<(Position, Vec<Value>), BrokerError> {
        let reply = self
            .script(
                &self.read_script,
                vec![meta_key(channel), history_key(channel)],
                vec![
                    Value::from(new_id()),
                    Value::from(self.meta_ttl_ms.to_string()),
                    Value::from(if with_history { "1" } else { "0" }),
                ],
            )
            .await?;
        parse_read(reply)
    }

    /// Replaces `channel`'s epoch `stale`, whose offsets Redis handed out again, and
    /// tells the channel's sessions (an epoch marker).
    async fn reset(self: &Arc<Self>, channel: &str, stale: Arc<str>) {
        {
            let mut channels = lock(&self.channels);
            let Some(listening) = channels.get_mut(channel) else {
                return;
            };
            if listening.resetting {
                return;
            }
            listening.resetting = true;
        }
        let result = self
            .script(
                &Script::from_lua(RESET_SCRIPT),
                vec![meta_key(channel), history_key(channel)],
                vec![
                    Value::from(stale.to_string()),
                    Value::from(new_id()),
                    Value::from(self.meta_ttl_ms.to_string()),
                ],
            )
            .await
            .and_then(parse_position);
        let marker = {
            let mut channels = lock(&self.channels);
            let Some(listening) = channels.get_mut(channel) else {
                return;
            };
            listening.resetting = false;
            match result {
                Ok(position) => {
                    listening.retire(&stale);
                    let epoch = listening.note(&position.epoch, position.offset);
                    Some(Message::epoch_marker(epoch, position.offset))
                }
                Err(_) => None,
            }
        };
        match marker {
            Some(marker) => {
                tracing::warn!(
                    channel,
                    epoch = &*marker.epoch,
                    "channel moved to a new epoch after lost writes"
                );
                self.hub.deliver(channel, &marker);
            }
            None => {
                let lost = Close::new(CloseCode::GoingAway, "lost position; resume with since");
                let closed = self.hub.disconnect_channel(channel, &lost);
                tracing::warn!(
                    channel,
                    closed,
                    "could not start a new epoch: closing the channel's sockets (1001)"
                );
            }
        }
    }

    /// On a Cluster: refreshes the slot map, then subscribes again where it changed.
    async fn check_slots(self: &Arc<Self>) {
        // A check still running (Redis slow, many channels) makes this one redundant.
        let Ok(_checking) = self.checking.try_lock() else {
            return;
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, self.client.sync_cluster()).await {
            Ok(Ok(())) => self.resync(Resync::SlotCheck).await,
            Ok(Err(err)) => tracing::debug!(error = %err, "reading the Redis Cluster slot map failed"),
            Err(_) => tracing::debug!("reading the Redis Cluster slot map timed out"),
        }
    }

    fn deliver(self: &Arc<Self>, message: &fred::types::Message) {
        let Some(channel) = channel_of_pubsub(&message.channel) else {
            return;
        };
        let parsed = message
            .value
            .as_bytes()
            .and_then(split_number)
            .and_then(|(offset, rest)| {
                let space = rest.iter().position(|&b| b == b' ')?;
                let epoch = std::str::from_utf8(&rest[..space]).ok()?;
                Some((offset, epoch, &rest[space + 1..]))
            });
        let Some((offset, epoch, bytes)) = parsed else {
            tracing::warn!(channel, "malformed message from Redis");
            return;
        };
        let (verdict, epoch) = match lock(&self.channels).get_mut(channel) {
            Some(listening) => listening.judge(epoch, offset),
            None => (Verdict::Deliver, Arc::from(epoch)),
        };
        match verdict {
            Verdict::Deliver => {
                self.hub.deliver(
                    channel,
                    &Message {
                        offset,
                        epoch,
                        bytes: Bytes::copy_from_slice(bytes),
                        published_at: Instant::now(),
                    },
                );
            }
            Verdict::Stale => tracing::debug!(channel, "late message of a left epoch dropped"),
            Verdict::Reused => {
                tracing::warn!(
                    channel,
                    offset,
                    "Redis handed out an offset again (lost writes): starting a new epoch"
                );
                let this = self.clone();
                let channel = channel.to_owned();
                tokio::spawn(async move { this.reset(&channel, epoch).await });
            }
        }
    }

    /// Delivers messages to the hub, resubscribes after each reconnect and, on a
    /// Cluster, checks the slot map every [`SLOT_CHECK_INTERVAL`], until `stop` is
    /// cancelled.
    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut messages = self.client.message_rx();
        let mut reconnects = self.client.reconnect_rx();
        let mut slot_check = tokio::time::interval(SLOT_CHECK_INTERVAL);
        slot_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sharded = self.fanout == Fanout::Sharded;
        // Servers connected to at least once: a later connection to one is a reconnect.
        let mut connected_before = std::collections::HashSet::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                message = messages.recv() => match message {
                    Ok(message) => self.deliver(&message),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        // Which channels lost messages is not known: catch every one up
                        // from history, so a channel's last message is not left unsent.
                        tracing::warn!(missed, "Redis messages dropped by a lagging receiver: catching up from history");
                        let channels: Vec<String> = lock(&self.channels).keys().cloned().collect();
                        let this = self.clone();
                        tokio::spawn(async move { this.catch_up(channels).await });
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                reconnect = reconnects.recv() => {
                    let (why, again) = match reconnect {
                        Ok(server) => {
                            let again = !connected_before.insert(server.clone());
                            (Resync::Reconnected(server), again)
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => (Resync::Lost, true),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    };
                    if again {
                        self.reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    // Also on a first connection: a socket may have arrived before it.
                    let this = self.clone();
                    // Off the receive loop, which must keep draining messages meanwhile.
                    tokio::spawn(async move { this.resync(why).await });
                }
                _ = slot_check.tick(), if sharded => {
                    let this = self.clone();
                    tokio::spawn(async move { this.check_slots().await });
                }
            }
        }
        let _ = self.client.quit().await;
    }
}

#[cfg(test)]
mod tests;
