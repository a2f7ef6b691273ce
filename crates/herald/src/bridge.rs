//! The Django Channels bridge (`HERALD_DJANGO_BRIDGE`): existing
//! `channel_layer.group_send(…)` calls reach herald sockets unchanged, on both
//! channels_redis layers, through the normal publish path (offsets, history, recovery).
//!
//! **Core layer** (`RedisChannelLayer`). A Django group is a sorted set
//! `{prefix}:group:{group}` of channel names; `group_send` puts one message per distinct
//! queue key (`prefix` + the channel name up to its `!`) with `__asgi_channel__` listing
//! the receiving names. herald behaves as one more Django process: while a channel has
//! sockets on this node, the node keeps the member `{channel}!{node}.{group}` in each
//! group that maps to it (re-added well before `group_expiry`, removed
//! `leave_after_ms`, by default `HERALD_HISTORY_TTL`, after the last socket left, so a
//! `group_send` made while the user was away is in history when they come back), and
//! the queue `{prefix}{channel}!` is
//! read with a batch `ZPOPMIN` or a blocking `BZPOPMIN`, each popped message kept in
//! `…!$inflight` until it is published, as channels_redis's own receiver does.
//!
//! **Pub/sub layer** (`RedisPubSubChannelLayer`). `group_send` PUBLISHes to
//! `{prefix}__group__{group}` with no random prefix. herald PSUBSCRIBEs to the patterns
//! of its mapping rules (`asgi__group__user_*`, …), so every mapped group reaches its
//! channel whether or not a socket is open (like a publish over HTTP).
//!
//! **Many nodes, one publish.** With `HERALD_REDIS_URL`, nodes share their channels, so
//! a message must be published once, not once per node: every node's members have the
//! same name before `!`, so `group_send` writes one message to one shared queue however
//! many nodes are in the group; and one node at a time (the holder of a lease,
//! `{queue}$reader`) reads that queue and the pub/sub patterns, which also keeps a
//! group's messages in order. Without a shared broker each node reads a queue of its
//! own (`{channel}.{node}!`) and needs no lease.
//!
//! A message that cannot be decoded or mapped is counted in
//! `herald_django_bridge_messages_total` and logged once per group; it never stops the
//! bridge. Redis connections reconnect with backoff; after a reconnect the node joins
//! its groups again (Redis may have lost them) and PSUBSCRIBEs again.

pub mod fernet;
pub mod mapping;
pub mod options;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use fred::prelude::{ClientLike, EventInterface, PubsubInterface, Value};
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Publisher;
use crate::broker::{Broker, BrokerError, History, Position, Published};
use crate::channel::{Channel, Draft};
use crate::hub::Hub;
use crate::metrics::Metrics;
pub use options::BridgeOptions;
use wire::{Decoder, Undecodable};

/// How long start-up waits for the bridge's Redis before going on without it.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(5);

/// The longest a Redis command may take before it counts as failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one `BZPOPMIN` blocks (channels_redis uses 5 s); short so that losing the
/// lease or shutting down is noticed quickly.
const BLOCK_SECS: f64 = 1.0;

/// Messages popped per `ZPOPMIN` when the queue has a backlog.
const POP_BATCH: usize = 64;

/// The reader lease: held this long without renewal, renewed this often.
const LEASE_TTL: Duration = Duration::from_secs(10);
const LEASE_RENEW: Duration = Duration::from_secs(2);

/// Re-adding members to their groups happens at least this often (and 4 times per
/// `group_expiry`), so herald stays in a group even if Django's `group_expiry` is
/// shorter than herald was told.
const MAX_REFRESH: Duration = Duration::from_secs(600);

/// How often the maintenance task runs (lease, leaving idle channels, refresh).
const TICK: Duration = Duration::from_millis(500);

/// Backoff after a failure: from 100 ms, doubling, up to 2 s.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Groups whose unmappable messages have been logged; past this many, further groups
/// are only counted.
const MAX_WARNED_GROUPS: usize = 10_000;

/// Groups joined per script call when refreshing.
const JOIN_BATCH: usize = 500;

/// KEYS = group keys; ARGV = now (seconds, float), group expiry (s), then one member per
/// key. Adds each member with the current time as its score, as `group_add` does, and
/// extends (never shortens) the group's expiry.
const JOIN_SCRIPT: &str = r#"
local expiry = tonumber(ARGV[2])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[1], ARGV[i + 2])
  if redis.call('TTL', KEYS[i]) < expiry then
    redis.call('EXPIRE', KEYS[i], expiry)
  end
end
return #KEYS
"#;

/// KEYS = group keys; ARGV = one member per key.
const LEAVE_SCRIPT: &str = r#"
for i = 1, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[i])
end
return #KEYS
"#;

/// KEYS = queue, in-flight backup; ARGV = most to pop. Moves up to that many of the
/// oldest messages into the backup (with their scores) and returns them as
/// `member, score, …`, like `ZPOPMIN`.
const POP_SCRIPT: &str = r#"
local popped = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
for i = 1, #popped, 2 do
  redis.call('ZADD', KEYS[2], popped[i + 1], popped[i])
end
if #popped > 0 then
  redis.call('EXPIRE', KEYS[2], 86400)
end
return popped
"#;

/// KEYS = queue, in-flight backup. channels_redis's cleanup script: puts every message
/// still in the backup back into the queue (with its original score) and deletes the
/// backup. Returns how many.
const RESTORE_SCRIPT: &str = r#"
local backed_up = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = #backed_up, 1, -2 do
  redis.call('ZADD', KEYS[1], backed_up[i], backed_up[i - 1])
end
redis.call('DEL', KEYS[2])
return #backed_up / 2
"#;

/// KEYS = lease; ARGV = node, TTL (ms). Takes the lease if free, renews it if held;
/// returns 1 when this node holds it.
const LEASE_SCRIPT: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// KEYS = lease; ARGV = node. Gives the lease up if this node holds it.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot set up the Redis client: {0}")]
    Client(String),
}

/// The channels_redis layer a message came from, as labelled in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Core,
    PubSub,
}

impl Layer {
    fn label(self) -> &'static str {
        match self {
            Self::Core => "core",
            Self::PubSub => "pubsub",
        }
    }
}

/// What happened to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    /// Published, or dropped for good (counted): take it off the queue.
    Done,
    /// herald's broker could not take it: keep it and try again.
    Retry,
}

/// The Redis names this node uses.
#[derive(Debug, Clone)]
struct Names {
    /// channels_redis's `prefix`.
    prefix: String,
    /// This node's member names start with this (`herald!` or `herald.{node}!`).
    non_local: String,
    /// Short random id of this process.
    node: String,
    queue: String,
    inflight: String,
    lease: String,
}

impl Names {
    fn new(options: &BridgeOptions, shared: bool) -> Self {
        let node: String = crate::channel::new_id().chars().take(8).collect();
        let non_local = if shared {
            format!("{}!", options.channel)
        } else {
            format!("{}.{node}!", options.channel)
        };
        let queue = wire::queue_key(&options.prefix, &non_local);
        Self {
            prefix: options.prefix.clone(),
            inflight: wire::inflight_key(&queue),
            lease: format!("{queue}$reader"),
            queue,
            non_local,
            node,
        }
    }

    /// This node's channel name in `group`.
    fn member(&self, group: &str) -> String {
        format!("{}{}.{group}", self.non_local, self.node)
    }

    /// The group named in one of our channel names (any node's).
    fn group_of<'m>(&self, member: &'m str) -> Option<&'m str> {
        let local = member.strip_prefix(&self.non_local)?;
        let (_node, group) = local.split_once('.')?;
        (!group.is_empty()).then_some(group)
    }
}

/// A channel with sockets on this node (or that had them less than `leave_after` ago).
struct Joined {
    groups: Vec<String>,
    /// When the last socket left; `None` while sockets are open.
    idle_since: Option<Instant>,
}

/// The running bridge of one node.
pub struct Bridge {
    options: BridgeOptions,
    /// `options.leave_after`, or the history TTL when it is not set.
    leave_after: Duration,
    names: Names,
    /// Whether nodes share a broker (and so the queue, behind a lease).
    shared: bool,
    commands: fred::prelude::Client,
    reader: fred::prelude::Client,
    subscriber: fred::prelude::Client,
    hub: Arc<Hub>,
    publisher: Publisher,
    metrics: Metrics,
    core_decoder: Decoder,
    pubsub_decoder: Decoder,
    joined: Mutex<HashMap<Channel, Joined>>,
    warned: Mutex<HashSet<String>>,
    leader: watch::Sender<bool>,
    /// Set when joining failed (Redis unreachable): `maintain` joins every group again
    /// at its next tick instead of waiting for the periodic refresh.
    rejoin: AtomicBool,
    scripts: Scripts,
}

struct Scripts {
    join: Script,
    leave: Script,
    pop: Script,
    restore: Script,
    lease: Script,
    release: Script,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(BACKOFF_MIN, BACKOFF_MAX)
}

async fn timed<T>(
    what: &'static str,
    future: impl std::future::Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(format!("{what}: {err}")),
        Err(_) => Err(format!("{what}: Redis did not answer in time")),
    }
}

/// `member, score, member, score, …` (or `key, member, score` from `BZPOPMIN`) → pairs.
fn pairs(values: &[Value]) -> Vec<(Vec<u8>, String)> {
    values
        .chunks_exact(2)
        .filter_map(|pair| {
            let member = pair[0].as_bytes()?.to_vec();
            let score = pair[1].as_string()?;
            Some((member, score))
        })
        .collect()
}

impl Bridge {
    /// Connects to the channels_redis Redis at `url` and starts the bridge's tasks on
    /// `tracker`; they stop on `shutdown`, after leaving this node's groups. `shared`
    /// says whether nodes share a broker. `history_ttl` is how long the node stays in a
    /// channel's groups after its last socket left, unless `leave_after_ms` says
    /// otherwise. Waits a few seconds for Redis; if it is not there yet, the bridge
    /// keeps trying in the background.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        url: &str,
        options: BridgeOptions,
        history_ttl: Duration,
        shared: bool,
        hub: Arc<Hub>,
        publisher: Publisher,
        metrics: Metrics,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<Arc<Self>, BridgeError> {
        let build =
            || crate::broker::redis::build_client(url).map_err(|err| BridgeError::Client(err.to_string()));
        let commands = build()?;
        let reader = build()?;
        let subscriber = build()?;
        for client in [&commands, &reader, &subscriber] {
            client.connect();
        }
        let crypter = (!options.symmetric_encryption_keys.is_empty())
            .then(|| fernet::Fernet::from_secrets(&options.symmetric_encryption_keys));
        let names = Names::new(&options, shared);
        let (leader, _) = watch::channel(false);
        let bridge = Arc::new(Self {
            core_decoder: Decoder {
                random_prefix_length: options.random_prefix_length,
                crypter: crypter.clone(),
                ttl: Some(options.expiry.as_secs().saturating_add(10)),
            },
            pubsub_decoder: Decoder {
                random_prefix_length: 0,
                crypter,
                ttl: None,
            },
            leave_after: options.leave_after.unwrap_or(history_ttl),
            options,
            names,
            shared,
            commands,
            reader,
            subscriber,
            hub,
            publisher,
            metrics,
            joined: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashSet::new()),
            leader,
            rejoin: AtomicBool::new(false),
            scripts: Scripts {
                join: Script::from_lua(JOIN_SCRIPT),
                leave: Script::from_lua(LEAVE_SCRIPT),
                pop: Script::from_lua(POP_SCRIPT),
                restore: Script::from_lua(RESTORE_SCRIPT),
                lease: Script::from_lua(LEASE_SCRIPT),
                release: Script::from_lua(RELEASE_SCRIPT),
            },
        });
        let connected = async {
            for client in [&bridge.commands, &bridge.reader, &bridge.subscriber] {
                client.wait_for_connect().await?;
            }
            Ok::<(), fred::error::Error>(())
        };
        if !matches!(
            tokio::time::timeout(FIRST_CONNECT_WAIT, connected).await,
            Ok(Ok(()))
        ) {
            tracing::warn!(
                url = %crate::redact_url(url),
                "the Django bridge's Redis is not reachable yet: retrying in the background"
            );
        }
        // Take the lease and subscribe before the first socket can arrive, so that a
        // group_send right after a client's welcome is not missed.
        bridge.renew_lease().await;
        let mut subscribed = false;
        if *bridge.leader.borrow() && bridge.options.layers.pubsub() {
            subscribed = bridge.psubscribe().await;
        }
        tracing::info!(
            url = %crate::redact_url(url),
            layers = ?bridge.options.layers,
            queue = %bridge.names.queue,
            shared,
            "django bridge started"
        );
        let stop = shutdown.clone();
        tracker.spawn(bridge.clone().maintain(stop.clone()));
        if bridge.options.layers.core() {
            tracker.spawn(bridge.clone().read_queue(stop.clone()));
        }
        if bridge.options.layers.pubsub() {
            tracker.spawn(bridge.clone().listen(stop, subscribed));
        }
        Ok(bridge)
    }

    // === group membership (core layer) ===

    /// A channel got its first socket on this node: join its groups now.
    async fn activate(&self, channel: &Channel) {
        if !self.options.layers.core() {
            return;
        }
        let groups = {
            let mut joined = lock(&self.joined);
            match joined.get_mut(channel) {
                Some(entry) => {
                    // Still in its groups from before (within leave_after).
                    entry.idle_since = None;
                    return;
                }
                None => {
                    let groups = self.options.rules.groups_for(channel);
                    joined.insert(
                        channel.clone(),
                        Joined {
                            groups: groups.clone(),
                            idle_since: None,
                        },
                    );
                    groups
                }
            }
        };
        self.update_groups_gauge();
        if let Err(err) = self.join(&groups).await {
            self.rejoin.store(true, Ordering::Relaxed);
            tracing::warn!(%channel, error = %err, "django bridge: joining groups failed; retrying");
        }
    }

    /// The last socket of a channel left this node: leave its groups after
    /// `leave_after`, unless a socket comes back first.
    fn deactivate(&self, channel: &Channel) {
        if let Some(entry) = lock(&self.joined).get_mut(channel) {
            entry.idle_since = Some(Instant::now());
        }
    }

    fn update_groups_gauge(&self) {
        let groups: usize = lock(&self.joined).values().map(|entry| entry.groups.len()).sum();
        self.metrics
            .set_bridge_groups(i64::try_from(groups).unwrap_or(i64::MAX));
    }

    async fn join(&self, groups: &[String]) -> Result<(), String> {
        self.set_membership(groups, true).await
    }

    async fn leave(&self, groups: &[String]) -> Result<(), String> {
        self.set_membership(groups, false).await
    }

    /// Adds (`join`) or removes this node's member in each of `groups`, in batches.
    async fn set_membership(&self, groups: &[String], join: bool) -> Result<(), String> {
        for batch in groups.chunks(JOIN_BATCH) {
            let keys: Vec<String> = batch
                .iter()
                .map(|g| wire::group_key(&self.names.prefix, g))
                .collect();
            let members = batch.iter().map(|g| Value::from(self.names.member(g)));
            let (script, args, what) = if join {
                let mut args: Vec<Value> = vec![
                    Value::from(format!("{:.6}", unix_now().as_secs_f64())),
                    Value::from(self.options.group_expiry.as_secs().to_string()),
                ];
                args.extend(members);
                (&self.scripts.join, args, "joining groups")
            } else {
                (&self.scripts.leave, members.collect(), "leaving groups")
            };
            self.eval(script, keys, args, what).await?;
        }
        Ok(())
    }

    async fn eval(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
        what: &'static str,
    ) -> Result<Value, String> {
        if !self.commands.is_connected() {
            return Err(format!("{what}: not connected to Redis"));
        }
        timed(
            what,
            script.evalsha_with_reload::<Value, _, _>(&self.commands, keys, args),
        )
        .await
    }

    /// Every group of every channel this node is in.
    fn all_groups(&self) -> Vec<String> {
        lock(&self.joined)
            .values()
            .flat_map(|entry| entry.groups.iter().cloned())
            .collect()
    }

    /// Leaves the groups of channels idle for `leave_after` with no socket back.
    async fn leave_idle(&self) {
        let now = Instant::now();
        let leaving: Vec<(Channel, Vec<String>)> = {
            let mut joined = lock(&self.joined);
            let idle: Vec<Channel> = joined
                .iter()
                .filter(|(channel, entry)| {
                    entry
                        .idle_since
                        .is_some_and(|since| now.duration_since(since) >= self.leave_after)
                        && !self.hub.has_subscribers(channel.name())
                })
                .map(|(channel, _)| channel.clone())
                .collect();
            idle.into_iter()
                .filter_map(|channel| joined.remove(&channel).map(|entry| (channel, entry.groups)))
                .collect()
        };
        if leaving.is_empty() {
            return;
        }
        self.update_groups_gauge();
        let groups: Vec<String> = leaving.into_iter().flat_map(|(_, groups)| groups).collect();
        if let Err(err) = self.leave(&groups).await {
            // Our stale members only make Django list one more name in the messages it
            // still sends to the shared queue, until group_expiry drops them.
            tracing::debug!(error = %err, "django bridge: leaving groups failed");
        }
    }

    // === the reader lease ===

    /// Takes or renews the lease (always held without a shared broker). Returns whether
    /// this node reads.
    async fn renew_lease(&self) -> bool {
        if !self.shared {
            self.set_leader(true);
            return true;
        }
        let held = self
            .eval(
                &self.scripts.lease,
                vec![self.names.lease.clone()],
                vec![
                    Value::from(self.names.node.clone()),
                    Value::from(LEASE_TTL.as_millis().to_string()),
                ],
                "taking the reader lease",
            )
            .await;
        match held {
            Ok(value) => {
                let leader = value.as_i64() == Some(1);
                self.set_leader(leader);
                leader
            }
            Err(err) => {
                tracing::debug!(error = %err, "django bridge: lease renewal failed");
                false
            }
        }
    }

    fn set_leader(&self, leader: bool) {
        let changed = self.leader.send_if_modified(|current| {
            let changed = *current != leader;
            *current = leader;
            changed
        });
        if changed {
            self.metrics.set_bridge_reading(leader);
            tracing::info!(node = %self.names.node, reading = leader, "django bridge reader changed");
        }
    }

    /// Periodic work: the lease, leaving idle channels, re-adding members before the
    /// group expiry and after a reconnect. On shutdown, leaves every group and gives the
    /// lease up.
    async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let refresh = (self.options.group_expiry / 4).clamp(Duration::from_secs(1), MAX_REFRESH);
        let mut reconnects = self.commands.reconnect_rx();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh = Instant::now();
        let mut last_lease = Instant::now();
        let mut last_held = Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                reconnect = reconnects.recv() => match reconnect {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        tracing::info!("django bridge reconnected to Redis");
                        self.rejoin.store(true, Ordering::Relaxed);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick() => {}
            }
            if self.shared && last_lease.elapsed() >= LEASE_RENEW {
                last_lease = Instant::now();
                if self.renew_lease().await {
                    last_held = Instant::now();
                } else if last_held.elapsed() >= LEASE_TTL.saturating_sub(LEASE_RENEW) {
                    // Unrenewed, the lease is about to pass to another node.
                    self.set_leader(false);
                }
            }
            self.leave_idle().await;
            if self.rejoin.swap(false, Ordering::Relaxed) || last_refresh.elapsed() >= refresh {
                match self.join(&self.all_groups()).await {
                    Ok(()) => last_refresh = Instant::now(),
                    Err(err) => {
                        self.rejoin.store(true, Ordering::Relaxed);
                        tracing::debug!(error = %err, "django bridge: refreshing groups failed");
                    }
                }
            }
        }
        let groups = self.all_groups();
        if let Err(err) = self.leave(&groups).await {
            tracing::debug!(error = %err, "django bridge: leaving groups at shutdown failed");
        }
        if self.shared && *self.leader.borrow() {
            let _ = self
                .eval(
                    &self.scripts.release,
                    vec![self.names.lease.clone()],
                    vec![Value::from(self.names.node.clone())],
                    "giving the lease up",
                )
                .await;
        }
        self.set_leader(false);
        for client in [&self.commands, &self.reader, &self.subscriber] {
            let _ = tokio::time::timeout(COMMAND_TIMEOUT, client.quit()).await;
        }
    }

    // === the core layer's queue ===

    /// Reads the queue while this node holds the lease: restores what a previous reader
    /// left in flight, then pops, publishes and acknowledges, in order.
    async fn read_queue(self: Arc<Self>, stop: CancellationToken) {
        let mut leader = self.leader.subscribe();
        let mut backoff = BACKOFF_MIN;
        'outer: loop {
            // Wait to be the reader.
            while !*leader.borrow_and_update() {
                tokio::select! {
                    () = stop.cancelled() => break 'outer,
                    changed = leader.changed() => if changed.is_err() { break 'outer },
                }
            }
            // Messages a reader popped but did not publish (it crashed, lost Redis or its
            // lease) go back to the queue first, as channels_redis's cleanup script does.
            if let Err(err) = self.restore().await {
                tracing::debug!(error = %err, "django bridge: restoring in-flight messages failed");
                tokio::select! {
                    () = stop.cancelled() => break 'outer,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = next_backoff(backoff);
                continue;
            }
            loop {
                if stop.is_cancelled() {
                    break 'outer;
                }
                if !*leader.borrow() {
                    continue 'outer;
                }
                let batch = tokio::select! {
                    () = stop.cancelled() => break 'outer,
                    batch = self.pop() => batch,
                };
                let batch = match batch {
                    Ok(batch) => batch,
                    Err(err) => {
                        tracing::debug!(error = %err, "django bridge: reading the queue failed");
                        tokio::select! {
                            () = stop.cancelled() => break 'outer,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = next_backoff(backoff);
                        continue 'outer;
                    }
                };
                for (member, _score) in batch {
                    match self.handle_core(&member).await {
                        Handled::Done => {
                            backoff = BACKOFF_MIN;
                            self.ack(member).await;
                        }
                        Handled::Retry => {
                            // Left in flight; restored, in order, after the pause.
                            tokio::select! {
                                () = stop.cancelled() => break 'outer,
                                () = tokio::time::sleep(backoff) => {}
                            }
                            backoff = next_backoff(backoff);
                            continue 'outer;
                        }
                    }
                }
            }
        }
    }

    async fn restore(&self) -> Result<(), String> {
        let restored = self
            .eval(
                &self.scripts.restore,
                vec![self.names.queue.clone(), self.names.inflight.clone()],
                Vec::new(),
                "restoring in-flight messages",
            )
            .await?;
        if let Some(n) = restored.as_i64().filter(|n| *n > 0) {
            tracing::info!(
                restored = n,
                "django bridge: messages left in flight are queued again"
            );
        }
        Ok(())
    }

    /// The next messages: a batch if the queue has a backlog, else whatever one
    /// `BZPOPMIN` brings within [`BLOCK_SECS`] (possibly nothing).
    async fn pop(&self) -> Result<Vec<(Vec<u8>, String)>, String> {
        let popped = self
            .eval(
                &self.scripts.pop,
                vec![self.names.queue.clone(), self.names.inflight.clone()],
                vec![Value::from(POP_BATCH.to_string())],
                "popping messages",
            )
            .await?;
        let batch = pairs(&popped.into_array());
        if !batch.is_empty() {
            return Ok(batch);
        }
        if !self.reader.is_connected() {
            return Err("popping messages: not connected to Redis".to_owned());
        }
        let bzpopmin = CustomCommand::new_static("BZPOPMIN", ClusterHash::FirstKey, true);
        let waited = tokio::time::timeout(
            COMMAND_TIMEOUT + Duration::from_secs_f64(BLOCK_SECS),
            self.reader.custom::<Value, Value>(
                bzpopmin,
                vec![Value::from(self.names.queue.clone()), Value::from(BLOCK_SECS)],
            ),
        )
        .await
        .map_err(|_| "waiting for messages: Redis did not answer in time".to_owned())?
        .map_err(|err| format!("waiting for messages: {err}"))?;
        let reply = waited.into_array();
        // `key, member, score`, or nothing after the timeout.
        let Some(popped) = reply.get(1..).map(pairs).and_then(|mut p| p.pop()) else {
            return Ok(Vec::new());
        };
        // Kept in the backup until published, as channels_redis's receiver does; on the
        // connection that just answered, the likeliest to still be up.
        let (member, score) = &popped;
        let backup = CustomCommand::new_static("ZADD", ClusterHash::FirstKey, false);
        timed(
            "backing up a popped message",
            self.reader.custom::<Value, Value>(
                backup,
                vec![
                    Value::from(self.names.inflight.clone()),
                    Value::from(score.clone()),
                    Value::from(bytes::Bytes::copy_from_slice(member)),
                ],
            ),
        )
        .await?;
        Ok(vec![popped])
    }

    async fn ack(&self, member: Vec<u8>) {
        let zrem = CustomCommand::new_static("ZREM", ClusterHash::FirstKey, false);
        let acked = timed(
            "acknowledging a message",
            self.commands.custom::<Value, Value>(
                zrem,
                vec![
                    Value::from(self.names.inflight.clone()),
                    Value::from(bytes::Bytes::from(member)),
                ],
            ),
        )
        .await;
        if let Err(err) = acked {
            // It is restored and published again by the next restore: at least once.
            tracing::debug!(error = %err, "django bridge: acknowledging failed");
        }
    }

    async fn handle_core(&self, member: &[u8]) -> Handled {
        let layer = Layer::Core;
        let mut dict = match self.core_decoder.decode(member, unix_now().as_secs()) {
            Ok(dict) => dict,
            Err(err) => return self.undecodable(layer, None, &err),
        };
        let names = wire::take_asgi_channels(&mut dict);
        let Some(group) = names
            .iter()
            .find_map(|name| self.names.group_of(name))
            .map(str::to_owned)
        else {
            let to = names.first().map_or("", String::as_str);
            return self.unmappable(
                layer,
                "?",
                &format!("sent to {to:?}, not to a group herald joined"),
            );
        };
        self.publish(layer, &group, dict).await
    }

    // === the pub/sub layer ===

    fn patterns(&self) -> Vec<String> {
        // Group patterns only use [A-Za-z0-9_.-] besides their `*`; the prefix may hold
        // anything, so its glob characters are escaped.
        let prefix = wire::escape_glob(&self.names.prefix);
        let mut patterns: Vec<String> = self
            .options
            .rules
            .iter()
            .map(|rule| wire::group_pubsub_channel(&prefix, &rule.glob()))
            .collect();
        patterns.sort();
        patterns.dedup();
        patterns
    }

    async fn psubscribe(&self) -> bool {
        if !self.subscriber.is_connected() {
            return false;
        }
        match timed(
            "subscribing to groups",
            self.subscriber.psubscribe(self.patterns()),
        )
        .await
        {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(error = %err, "django bridge: PSUBSCRIBE failed; retrying");
                false
            }
        }
    }

    /// Receives pub/sub group messages while this node holds the lease.
    async fn listen(self: Arc<Self>, stop: CancellationToken, mut subscribed: bool) {
        let mut leader = self.leader.subscribe();
        let mut messages = self.subscriber.message_rx();
        let mut reconnects = self.subscriber.reconnect_rx();
        let mut retry = tokio::time::interval(LEASE_RENEW);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let group_prefix = wire::group_pubsub_channel(&self.names.prefix, "");
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                changed = leader.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let reading = *leader.borrow_and_update();
                    if reading && !subscribed {
                        subscribed = self.psubscribe().await;
                    } else if !reading && subscribed {
                        let _ = timed("unsubscribing", self.subscriber.punsubscribe(self.patterns())).await;
                        subscribed = false;
                    }
                }
                reconnect = reconnects.recv() => match reconnect {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        subscribed = *leader.borrow() && self.psubscribe().await;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                _ = retry.tick() => {
                    if *leader.borrow() && !subscribed {
                        subscribed = self.psubscribe().await;
                    }
                }
                message = messages.recv() => match message {
                    Ok(message) => {
                        if !subscribed {
                            continue;
                        }
                        let Some(group) = message.channel.strip_prefix(group_prefix.as_str()) else {
                            continue;
                        };
                        let Some(body) = message.value.as_bytes() else {
                            self.undecodable(Layer::PubSub, Some(group), &Undecodable::Format("not a string".to_owned()));
                            continue;
                        };
                        match self.pubsub_decoder.decode(body, unix_now().as_secs()) {
                            Ok(dict) => {
                                self.publish(Layer::PubSub, group, dict).await;
                            }
                            Err(err) => {
                                self.undecodable(Layer::PubSub, Some(group), &err);
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "django bridge: pub/sub messages dropped (herald fell behind)");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            }
        }
    }

    // === both layers ===

    /// Maps a group's message and publishes it.
    async fn publish(
        &self,
        layer: Layer,
        group: &str,
        dict: serde_json::Map<String, serde_json::Value>,
    ) -> Handled {
        let (rule, channel) = match self.options.rules.route(group) {
            Some(Ok(routed)) => routed,
            Some(Err(err)) => return self.unmappable(layer, group, &err.0),
            None => return self.unmappable(layer, group, "no [[django.groups]] rule matches this group"),
        };
        let draft: Draft = match mapping::compose(rule, &channel, dict) {
            Ok(draft) => draft,
            Err(err) => {
                return self.unmappable(
                    layer,
                    group,
                    &format!("{err} (rule message = \"{}\")", rule.message().label()),
                )
            }
        };
        match self.publisher.publish(&channel, &draft).await {
            Ok(_) => {
                self.metrics.bridge_message(layer.label(), "published");
                Handled::Done
            }
            Err(err) => match layer {
                Layer::Core => {
                    tracing::warn!(%channel, error = %err, "django bridge: publish failed; retrying");
                    Handled::Retry
                }
                Layer::PubSub => {
                    self.metrics.bridge_message(layer.label(), "failed");
                    tracing::warn!(%channel, error = %err, "django bridge: publish failed; pub/sub message lost");
                    Handled::Done
                }
            },
        }
    }

    /// Whether this is the first problem logged for `group`.
    fn first_warning(&self, group: &str) -> bool {
        let mut warned = lock(&self.warned);
        warned.len() < MAX_WARNED_GROUPS && warned.insert(group.to_owned())
    }

    fn unmappable(&self, layer: Layer, group: &str, reason: &str) -> Handled {
        self.metrics.bridge_message(layer.label(), "unmappable");
        if self.first_warning(group) {
            tracing::warn!(
                layer = layer.label(),
                group,
                reason,
                "django bridge: message does not map to a herald message; dropped (logged once per group)"
            );
        }
        Handled::Done
    }

    fn undecodable(&self, layer: Layer, group: Option<&str>, err: &Undecodable) -> Handled {
        self.metrics.bridge_message(layer.label(), "undecodable");
        let group = group.unwrap_or("?");
        if self.first_warning(group) {
            tracing::warn!(
                layer = layer.label(),
                group,
                error = %err,
                "django bridge: cannot read message; dropped (logged once per group)"
            );
        }
        Handled::Done
    }
}

/// The broker with the bridge's hooks: the first socket of a channel on this node joins
/// the channel's groups before its welcome is sent, the last one starts the countdown to
/// leaving them. Everything else goes to the inner broker unchanged.
pub struct BridgedBroker {
    inner: Arc<dyn Broker>,
    bridge: Arc<Bridge>,
}

impl BridgedBroker {
    pub fn new(inner: Arc<dyn Broker>, bridge: Arc<Bridge>) -> Self {
        Self { inner, bridge }
    }
}

#[async_trait]
impl Broker for BridgedBroker {
    async fn publish(&self, channel: &Channel, draft: &Draft) -> Result<Published, BrokerError> {
        self.inner.publish(channel, draft).await
    }

    async fn history(&self, channel: &Channel, since: u64, limit: usize) -> Result<History, BrokerError> {
        self.inner.history(channel, since, limit).await
    }

    async fn position(&self, channel: &Channel) -> Result<Position, BrokerError> {
        self.inner.position(channel).await
    }

    async fn subscribe(&self, channel: &Channel) -> Result<(), BrokerError> {
        let subscribed = self.inner.subscribe(channel).await;
        self.bridge.activate(channel).await;
        subscribed
    }

    async fn unsubscribe(&self, channel: &Channel) {
        self.inner.unsubscribe(channel).await;
        self.bridge.deactivate(channel);
    }

    async fn ready(&self) -> bool {
        self.inner.ready().await
    }

    fn memory_stats(&self) -> Option<crate::broker::memory::MemoryStats> {
        self.inner.memory_stats()
    }

    fn reconnects(&self) -> u64 {
        self.inner.reconnects()
    }
}

#[cfg(test)]
mod tests;
