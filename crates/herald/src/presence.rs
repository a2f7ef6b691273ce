//! Presence (docs/protocol.md, "Presence and read state"): which users have a socket
//! subscribed to an org channel, on any node, and the `presence`, `presence_join` and
//! `presence_leave` messages of the subscriptions that asked for them.
//!
//! Every node counts its own sockets per org and user ([`Presence::enter`],
//! [`Presence::exit`], from the session's join and leave of an org channel). Only a
//! user's first socket and last socket on the node change anything beyond it.
//!
//! In memory (one node) that is all: a change is told at once to the org's watchers.
//!
//! With Redis, a node writes its changes per org, at most every [`FLUSH_DELAY`]: one
//! script per org that changed, whatever the number of socket events meanwhile (a user
//! who comes and goes within it costs nothing). The records reuse the per-node design
//! of the connection counts (`limits::shared`), in the same hash tag `{conns}`, so one
//! script sees them all, and the same hash of live nodes:
//! - `herald:{conns}:presence:node:{node}:org:{org}`: user → sockets on that node;
//! - `herald:{conns}:presence:users:{org}`: user → sockets on every node (the sum);
//! - `herald:{conns}:presence:orgs-of:{node}`, `herald:{conns}:presence:nodes`: which
//!   records a node has, to remove them when it dies;
//! - `herald:{conns}:presence:seq`: numbers every change.
//!
//! The script that changes a sum from or to zero publishes the change, numbered, on
//! the plain pub/sub channel `herald:presence:{org}` (from inside the script, so in the
//! order of the changes). A node subscribes to it only while a subscription on it asked
//! for the org's presence: sessions that did not ask pay nothing. A watched org's view
//! (who its watchers were told is there) is read with its number, so a change already
//! in it is not applied twice, and read again every heartbeat, which also covers
//! messages lost while the subscriber reconnected.
//!
//! Every node, every heartbeat (a third of `node_ttl_ms`), removes the records of nodes
//! no longer in the hash of live nodes, publishing their users' leaves: a node that dies
//! takes its users out of presence within the node TTL and a heartbeat (20 s by
//! default). After its subscriber reconnects (Redis restarted, say), a node writes all
//! its records again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::{Client, ClientLike, EventInterface, PubsubInterface, Value};
use fred::types::scripts::Script;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::redis::{shards_for, Shards};
use crate::broker::BrokerError;
use crate::hub::{Outbox, SubscriptionId};
use crate::limits::shared::{heartbeat_interval, NODES_KEY};
use crate::redis::{build_client, wait_connected, COMMAND_TIMEOUT, SECONDARY_CONNECT_WAIT};

/// How long a node gathers its presence changes before writing them.
pub const FLUSH_DELAY: Duration = Duration::from_millis(50);

/// Who is present in every org, on this node (memory) or across nodes (Redis).
pub struct Presence {
    local: Mutex<Local>,
    views: Mutex<HashMap<String, View>>,
    shared: Option<Shared>,
}

/// This node's sockets on org channels.
#[derive(Default)]
struct Local {
    /// org → user → sockets on this node.
    counts: HashMap<String, HashMap<String, u32>>,
    /// With Redis: org → users whose count on this node changed since the last write.
    dirty: HashMap<String, HashSet<String>>,
    /// In memory: numbers every change.
    seq: u64,
}

/// An org watched by subscriptions on this node.
#[derive(Default)]
struct View {
    /// What the watchers were told is present.
    users: BTreeSet<String>,
    /// The number of the last change in `users`.
    seq: u64,
    watchers: Vec<(Arc<Outbox>, SubscriptionId)>,
}

/// The Redis side.
struct Shared {
    client: Client,
    shards: Option<Arc<Shards>>,
    subscriber: Client,
    node_id: String,
    node_ttl: Duration,
    flush: Script,
    snapshot: Script,
    dead: Script,
    orgs_of: Script,
    drop_node: Script,
    /// Wakes the writer.
    wake: Notify,
    /// The `herald:presence:{org}` channels subscribed to.
    subscribed: Mutex<HashSet<String>>,
}

/// KEYS = the node's record of the org, the org's sums, the node's orgs, the nodes with
/// records, the sequence, the live nodes; ARGV = node, org, node TTL (ms), pub/sub
/// channel, then user, sockets on this node, …
const FLUSH: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HSET', KEYS[6], ARGV[1], now + tonumber(ARGV[3]))
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[1])
local joined, left = {}, {}
for i = 5, #ARGV, 2 do
  local user = ARGV[i]
  local new = tonumber(ARGV[i + 1])
  local old = tonumber(redis.call('HGET', KEYS[1], user) or '0')
  if new ~= old then
    if new > 0 then
      redis.call('HSET', KEYS[1], user, new)
    else
      redis.call('HDEL', KEYS[1], user)
    end
    local total = redis.call('HINCRBY', KEYS[2], user, new - old)
    local before = total - (new - old)
    if total <= 0 then
      redis.call('HDEL', KEYS[2], user)
      if before > 0 then left[#left + 1] = user end
    elseif before <= 0 then
      joined[#joined + 1] = user
    end
  end
end
if #joined + #left > 0 then
  local seq = redis.call('INCR', KEYS[5])
  redis.call('PUBLISH', ARGV[4], cjson.encode({seq = seq, joined = joined, left = left}))
end
return 1
"#;

/// KEYS = the org's sums, the sequence. Returns the sequence and the sums.
const SNAPSHOT: &str = r#"
return {tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('HGETALL', KEYS[1])}
"#;

/// KEYS = the nodes with records, the live nodes. Returns the nodes with records that
/// are not alive.
const DEAD: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local dead = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local alive_until = tonumber(redis.call('HGET', KEYS[2], node) or '0')
  if alive_until <= now then dead[#dead + 1] = node end
end
return dead
"#;

/// KEYS = a node's orgs, the nodes with records; ARGV = node. Returns the node's orgs,
/// and forgets the node when it has none.
const ORGS_OF: &str = r#"
local orgs = redis.call('SMEMBERS', KEYS[1])
if #orgs == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
end
return orgs
"#;

/// KEYS = the node's record of the org, the org's sums, the node's orgs, the nodes with
/// records, the sequence; ARGV = node, org, pub/sub channel. Removes a dead node's
/// record of an org and publishes the leaves it makes.
const DROP_NODE: &str = r#"
local fields = redis.call('HGETALL', KEYS[1])
local left = {}
for i = 1, #fields, 2 do
  local user = fields[i]
  local total = redis.call('HINCRBY', KEYS[2], user, -tonumber(fields[i + 1]))
  if total <= 0 then
    redis.call('HDEL', KEYS[2], user)
    left[#left + 1] = user
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[2])
if redis.call('SCARD', KEYS[3]) == 0 then
  redis.call('SREM', KEYS[4], ARGV[1])
end
if #left > 0 then
  local seq = redis.call('INCR', KEYS[5])
  redis.call('PUBLISH', ARGV[3], cjson.encode({seq = seq, joined = {}, left = left}))
end
return #left
"#;

fn record_key(node: &str, org: &str) -> String {
    format!("herald:{{conns}}:presence:node:{node}:org:{org}")
}

fn sums_key(org: &str) -> String {
    format!("herald:{{conns}}:presence:users:{org}")
}

fn orgs_key(node: &str) -> String {
    format!("herald:{{conns}}:presence:orgs-of:{node}")
}

const NODES_WITH_RECORDS_KEY: &str = "herald:{conns}:presence:nodes";
const SEQ_KEY: &str = "herald:{conns}:presence:seq";

/// The pub/sub channel of an org's presence changes.
fn pubsub_channel(org: &str) -> String {
    format!("herald:presence:{org}")
}

/// `{"type":"presence","channel","users":[{"user_id","connections"}]}`: who is present,
/// once per subscription.
pub fn presence_message(org: &str, users: &[(String, u64)]) -> String {
    let users: Vec<serde_json::Value> = users
        .iter()
        .map(|(user, n)| json!({"user_id": user, "connections": n}))
        .collect();
    json!({"type": "presence", "channel": format!("org:{org}"), "users": users}).to_string()
}

fn change_message(kind: &str, org: &str, user: &str) -> Bytes {
    Bytes::from(json!({"type": kind, "channel": format!("org:{org}"), "user_id": user}).to_string())
}

impl Presence {
    /// One node: presence is this node's sockets.
    pub fn local() -> Arc<Self> {
        Arc::new(Self {
            local: Mutex::new(Local::default()),
            views: Mutex::new(HashMap::new()),
            shared: None,
        })
    }

    /// Many nodes sharing `url`: starts the writer, the subscriber and the heartbeat
    /// tasks, which stop on `stopped`.
    pub async fn redis(
        url: &str,
        node_id: &str,
        node_ttl: Duration,
        stopped: &CancellationToken,
    ) -> Result<Arc<Self>, BrokerError> {
        let client = build_client(url)?;
        let shards = shards_for(url, &client)?;
        client.connect();
        wait_connected(&client, SECONDARY_CONNECT_WAIT).await;
        let subscriber = build_client(url)?;
        let presence = Arc::new(Self {
            local: Mutex::new(Local::default()),
            views: Mutex::new(HashMap::new()),
            shared: Some(Shared {
                client: client.clone(),
                shards,
                subscriber: subscriber.clone(),
                node_id: node_id.to_owned(),
                node_ttl,
                flush: Script::from_lua(FLUSH),
                snapshot: Script::from_lua(SNAPSHOT),
                dead: Script::from_lua(DEAD),
                orgs_of: Script::from_lua(ORGS_OF),
                drop_node: Script::from_lua(DROP_NODE),
                wake: Notify::new(),
                subscribed: Mutex::new(HashSet::new()),
            }),
        });
        tokio::spawn(presence.clone().write(stopped.clone()));
        tokio::spawn(presence.clone().listen(stopped.clone()));
        tokio::spawn(presence.clone().heartbeat(stopped.clone()));
        if !wait_connected(&subscriber, SECONDARY_CONNECT_WAIT).await {
            tracing::warn!("Redis is not reachable yet: presence from other nodes waits for it");
        }
        Ok(presence)
    }

    /// A socket of `user` subscribed to `org:{org}` on this node.
    pub fn enter(&self, org: &str, user: &str) {
        self.change(org, user, true);
    }

    /// Undoes [`Presence::enter`].
    pub fn exit(&self, org: &str, user: &str) {
        self.change(org, user, false);
    }

    fn change(&self, org: &str, user: &str, enter: bool) {
        let mut local = crate::sync::lock(&self.local);
        let users = local.counts.entry(org.to_owned()).or_default();
        let count = users.entry(user.to_owned()).or_insert(0);
        let before = *count;
        *count = if enter {
            before + 1
        } else {
            before.saturating_sub(1)
        };
        let after = *count;
        if after == 0 {
            users.remove(user);
            if users.is_empty() {
                local.counts.remove(org);
            }
        }
        match &self.shared {
            // Every count is written (for `connections`), gathered per org.
            Some(shared) => {
                local
                    .dirty
                    .entry(org.to_owned())
                    .or_default()
                    .insert(user.to_owned());
                drop(local);
                shared.wake.notify_one();
            }
            // Only a user's first and last socket are news.
            None if (before == 0) == (after == 0) => {}
            None => {
                local.seq += 1;
                let seq = local.seq;
                let user = [user.to_owned()];
                let (joined, left): (&[String], &[String]) = if enter { (&user, &[]) } else { (&[], &user) };
                // Under the local lock, so changes reach watchers in their order.
                self.apply(org, seq, joined, left);
            }
        }
    }

    /// The users present in `org` with their sockets, ordered by user id.
    pub async fn users(&self, org: &str) -> Result<Vec<(String, u64)>, BrokerError> {
        match &self.shared {
            Some(shared) => Ok(shared.snapshot(org).await?.1.into_iter().collect()),
            None => Ok(local_users(&crate::sync::lock(&self.local), org)
                .into_iter()
                .collect()),
        }
    }

    /// Registers subscription `sub` of `outbox` as a watcher of `org`: it is sent every
    /// join and leave from now on. Returns who is present now with their sockets,
    /// ordered.
    pub async fn watch(
        &self,
        org: &str,
        outbox: &Arc<Outbox>,
        sub: SubscriptionId,
    ) -> Result<Vec<(String, u64)>, BrokerError> {
        let (seq, users) = match &self.shared {
            Some(shared) => {
                // Subscribed before the read, so no change falls between them.
                shared.subscribe(org).await?;
                self.read_view(shared, org).await?
            }
            None => {
                let local = crate::sync::lock(&self.local);
                (local.seq, local_users(&local, org))
            }
        };
        let mut views = crate::sync::lock(&self.views);
        let view = views.entry(org.to_owned()).or_default();
        sync_view(org, view, seq, users.keys().cloned().collect());
        view.watchers.push((outbox.clone(), sub));
        // What the view holds (it may be newer than the read), with the read's counts.
        Ok(view
            .users
            .iter()
            .map(|user| (user.clone(), users.get(user).copied().unwrap_or(1)))
            .collect())
    }

    /// Undoes [`Presence::watch`] (nothing when `sub` does not watch `org`).
    pub fn unwatch(&self, org: &str, outbox: &Arc<Outbox>, sub: SubscriptionId) {
        let mut views = crate::sync::lock(&self.views);
        if let Some(view) = views.get_mut(org) {
            view.watchers
                .retain(|(o, s)| !(Arc::ptr_eq(o, outbox) && *s == sub));
            if view.watchers.is_empty() {
                views.remove(org);
            }
        }
    }

    /// Applies change `seq` of `org` to its view, if newer than it, telling its watchers.
    fn apply(&self, org: &str, seq: u64, joined: &[String], left: &[String]) {
        let mut views = crate::sync::lock(&self.views);
        let Some(view) = views.get_mut(org) else {
            return;
        };
        if seq <= view.seq {
            return;
        }
        view.seq = seq;
        for user in joined {
            if view.users.insert(user.clone()) {
                tell(&view.watchers, &change_message("presence_join", org, user));
            }
        }
        for user in left {
            if view.users.remove(user) {
                tell(&view.watchers, &change_message("presence_leave", org, user));
            }
        }
    }

    /// Writes this node's changed counts, per org, until `stop` (then once more).
    async fn write(self: Arc<Self>, stop: CancellationToken) {
        let Some(shared) = &self.shared else { return };
        loop {
            let stopping = tokio::select! {
                () = shared.wake.notified() => false,
                () = stop.cancelled() => true,
            };
            if !stopping {
                tokio::time::sleep(FLUSH_DELAY).await;
            }
            let batch: Vec<(String, Vec<(String, u32)>)> = {
                let mut local = crate::sync::lock(&self.local);
                let dirty = std::mem::take(&mut local.dirty);
                dirty
                    .into_iter()
                    .map(|(org, users)| {
                        let counts = local.counts.get(&org);
                        let users = users
                            .into_iter()
                            .map(|user| {
                                let n = counts.and_then(|c| c.get(&user)).copied().unwrap_or(0);
                                (user, n)
                            })
                            .collect();
                        (org, users)
                    })
                    .collect()
            };
            let mut failed = false;
            for (org, users) in batch {
                if failed {
                    self.mark_dirty(&org, users.into_iter().map(|(u, _)| u));
                    continue;
                }
                if let Err(err) = shared.flush(&org, &users).await {
                    tracing::warn!(error = %err, "writing presence failed; retrying");
                    self.mark_dirty(&org, users.into_iter().map(|(u, _)| u));
                    failed = true;
                }
            }
            if stopping {
                // The node's users leave presence now rather than when it is found dead.
                if let Err(err) = shared.drop_node_records(&shared.node_id).await {
                    tracing::warn!(error = %err, "removing this node from presence failed");
                }
                let _ = shared.client.quit().await;
                break;
            }
            if failed {
                tokio::time::sleep(Duration::from_secs(1)).await;
                shared.wake.notify_one();
            }
        }
    }

    fn mark_dirty(&self, org: &str, users: impl Iterator<Item = String>) {
        let mut local = crate::sync::lock(&self.local);
        local.dirty.entry(org.to_owned()).or_default().extend(users);
    }

    /// Marks every count of this node for writing (its records may be gone).
    fn mark_all_dirty(&self) {
        let mut local = crate::sync::lock(&self.local);
        let all: Vec<(String, Vec<String>)> = local
            .counts
            .iter()
            .map(|(org, users)| (org.clone(), users.keys().cloned().collect()))
            .collect();
        for (org, users) in all {
            local.dirty.entry(org).or_default().extend(users);
        }
    }

    /// Receives the changes of watched orgs; after every (re)connect, subscribes again
    /// and writes this node's records again.
    async fn listen(self: Arc<Self>, stop: CancellationToken) {
        let Some(shared) = &self.shared else { return };
        let client = shared.subscriber.clone();
        let mut messages = client.message_rx();
        let mut reconnects = client.reconnect_rx();
        client.connect();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                message = messages.recv() => match message {
                    Ok(message) => self.receive(&message),
                    // Missed changes are found by the next heartbeat's reads.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                reconnect = reconnects.recv() => match reconnect {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let channels: Vec<String> = crate::sync::lock(&shared.subscribed).iter().cloned().collect();
                        for channel in channels {
                            if tokio::time::timeout(COMMAND_TIMEOUT, client.subscribe(channel)).await.is_err() {
                                tracing::warn!("subscribing to presence changes failed");
                            }
                        }
                        self.mark_all_dirty();
                        shared.wake.notify_one();
                        self.resync().await;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            }
        }
        let _ = client.quit().await;
    }

    fn receive(&self, message: &fred::types::Message) {
        let Some(org) = message.channel.strip_prefix("herald:presence:") else {
            return;
        };
        let Some(change) = message
            .value
            .as_bytes()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(bytes).ok())
        else {
            tracing::warn!("malformed presence message ignored");
            return;
        };
        let users = |field: &str| -> Vec<String> {
            // An empty Lua table is encoded as `{}`.
            change[field]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        let seq = change["seq"].as_u64().unwrap_or(0);
        self.apply(org, seq, &users("joined"), &users("left"));
    }

    /// Every heartbeat: removes dead nodes' records, reads every watched org again, and
    /// unsubscribes from orgs no longer watched.
    async fn heartbeat(self: Arc<Self>, stop: CancellationToken) {
        let Some(shared) = &self.shared else { return };
        let mut tick = tokio::time::interval(heartbeat_interval(shared.node_ttl));
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {
                    match shared.remove_dead().await {
                        // This node was taken for dead (it could not reach Redis for
                        // the node TTL): write its records again.
                        Ok(true) => {
                            self.mark_all_dirty();
                            shared.wake.notify_one();
                        }
                        Ok(false) => {}
                        Err(err) => tracing::warn!(error = %err, "removing dead nodes from presence failed"),
                    }
                    self.resync().await;
                    let watched: HashSet<String> = crate::sync::lock(&self.views).keys().map(|org| pubsub_channel(org)).collect();
                    let unwatched: Vec<String> = {
                        let mut subscribed = crate::sync::lock(&shared.subscribed);
                        let gone = subscribed.difference(&watched).cloned().collect::<Vec<_>>();
                        for channel in &gone {
                            subscribed.remove(channel);
                        }
                        gone
                    };
                    for channel in unwatched {
                        let _ = tokio::time::timeout(COMMAND_TIMEOUT, shared.subscriber.unsubscribe(channel)).await;
                    }
                }
            }
        }
    }

    /// Who is present in `org` for a view: Redis's sums, and this node's own users,
    /// whose arrival may not be written yet (its change, when it comes, is then no news).
    async fn read_view(
        &self,
        shared: &Shared,
        org: &str,
    ) -> Result<(u64, BTreeMap<String, u64>), BrokerError> {
        let (seq, mut users) = shared.snapshot(org).await?;
        let local = crate::sync::lock(&self.local);
        for (user, n) in local_users(&local, org) {
            users.entry(user).or_insert(n);
        }
        Ok((seq, users))
    }

    /// Reads every watched org again and tells its watchers what changed.
    async fn resync(&self) {
        let Some(shared) = &self.shared else { return };
        let orgs: Vec<String> = crate::sync::lock(&self.views).keys().cloned().collect();
        for org in orgs {
            match self.read_view(shared, &org).await {
                Ok((seq, users)) => {
                    let mut views = crate::sync::lock(&self.views);
                    if let Some(view) = views.get_mut(&org) {
                        sync_view(&org, view, seq, users.into_keys().collect());
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "reading presence failed");
                    return;
                }
            }
        }
    }
}

/// This node's users in `org` with their sockets.
fn local_users(local: &Local, org: &str) -> BTreeMap<String, u64> {
    local
        .counts
        .get(org)
        .into_iter()
        .flatten()
        .map(|(user, n)| (user.clone(), u64::from(*n)))
        .collect()
}

/// Replaces `view` with a read numbered `seq`, unless the view is newer, telling its
/// watchers the difference.
fn sync_view(org: &str, view: &mut View, seq: u64, users: BTreeSet<String>) {
    if seq < view.seq {
        return;
    }
    view.seq = seq;
    for user in users.difference(&view.users) {
        tell(&view.watchers, &change_message("presence_join", org, user));
    }
    for user in view.users.difference(&users) {
        tell(&view.watchers, &change_message("presence_leave", org, user));
    }
    view.users = users;
}

fn tell(watchers: &[(Arc<Outbox>, SubscriptionId)], text: &Bytes) {
    for (outbox, sub) in watchers {
        // An overflowing outbox asks its session to close.
        let _ = outbox.push_note(*sub, text.clone());
    }
}

impl Shared {
    async fn eval(&self, script: &Script, keys: Vec<String>, args: Vec<Value>) -> Result<Value, BrokerError> {
        if let Some(shards) = &self.shards {
            return shards.eval(script, keys, args, COMMAND_TIMEOUT).await;
        }
        if !self.client.is_connected() {
            return Err(BrokerError::Unavailable("not connected to Redis".into()));
        }
        tokio::time::timeout(
            COMMAND_TIMEOUT,
            script.evalsha_with_reload::<Value, _, _>(&self.client, keys, args),
        )
        .await
        .map_err(|_| BrokerError::Unavailable("Redis did not answer in time".into()))?
        .map_err(|err| BrokerError::Unavailable(err.to_string()))
    }

    async fn subscribe(&self, org: &str) -> Result<(), BrokerError> {
        let channel = pubsub_channel(org);
        if crate::sync::lock(&self.subscribed).contains(&channel) {
            return Ok(());
        }
        tokio::time::timeout(COMMAND_TIMEOUT, self.subscriber.subscribe(channel.clone()))
            .await
            .map_err(|_| BrokerError::Unavailable("Redis did not answer in time".into()))?
            .map_err(|err| BrokerError::Unavailable(err.to_string()))?;
        crate::sync::lock(&self.subscribed).insert(channel);
        Ok(())
    }

    async fn flush(&self, org: &str, users: &[(String, u32)]) -> Result<(), BrokerError> {
        let keys = vec![
            record_key(&self.node_id, org),
            sums_key(org),
            orgs_key(&self.node_id),
            NODES_WITH_RECORDS_KEY.to_owned(),
            SEQ_KEY.to_owned(),
            NODES_KEY.to_owned(),
        ];
        let mut args = vec![
            Value::from(self.node_id.clone()),
            Value::from(org.to_owned()),
            Value::from(self.node_ttl.as_millis().to_string()),
            Value::from(pubsub_channel(org)),
        ];
        for (user, n) in users {
            args.push(Value::from(user.clone()));
            args.push(Value::from(n.to_string()));
        }
        self.eval(&self.flush, keys, args).await.map(|_| ())
    }

    /// The org's change number and its users with their sockets.
    async fn snapshot(&self, org: &str) -> Result<(u64, BTreeMap<String, u64>), BrokerError> {
        let reply = self
            .eval(&self.snapshot, vec![sums_key(org), SEQ_KEY.to_owned()], vec![])
            .await?;
        let malformed = || BrokerError::Unavailable("malformed presence reply".into());
        let Value::Array(parts) = reply else {
            return Err(malformed());
        };
        let seq = parts.first().and_then(Value::as_u64).ok_or_else(malformed)?;
        let mut users = BTreeMap::new();
        if let Some(Value::Array(fields)) = parts.get(1) {
            for pair in fields.chunks(2) {
                if let [user, n] = pair {
                    if let (Some(user), Some(n)) = (user.as_string(), n.as_u64()) {
                        if n > 0 {
                            users.insert(user, n);
                        }
                    }
                }
            }
        }
        Ok((seq, users))
    }

    /// Removes the records of nodes no longer alive, publishing their users' leaves.
    /// Returns whether this node's were among them.
    async fn remove_dead(&self) -> Result<bool, BrokerError> {
        let reply = self
            .eval(
                &self.dead,
                vec![NODES_WITH_RECORDS_KEY.to_owned(), NODES_KEY.to_owned()],
                vec![],
            )
            .await?;
        let mut this_node = false;
        for node in strings(reply) {
            self.drop_node_records(&node).await?;
            if node == self.node_id {
                this_node = true;
            } else {
                tracing::info!(node, "a dead node's users left presence");
            }
        }
        Ok(this_node)
    }

    /// Removes every record of `node`, publishing the leaves it makes.
    async fn drop_node_records(&self, node: &str) -> Result<(), BrokerError> {
        let orgs = strings(
            self.eval(
                &self.orgs_of,
                vec![orgs_key(node), NODES_WITH_RECORDS_KEY.to_owned()],
                vec![Value::from(node.to_owned())],
            )
            .await?,
        );
        for org in orgs {
            let keys = vec![
                record_key(node, &org),
                sums_key(&org),
                orgs_key(node),
                NODES_WITH_RECORDS_KEY.to_owned(),
                SEQ_KEY.to_owned(),
            ];
            let args = vec![
                Value::from(node.to_owned()),
                Value::from(org.clone()),
                Value::from(pubsub_channel(&org)),
            ];
            self.eval(&self.drop_node, keys, args).await?;
        }
        Ok(())
    }
}

fn strings(value: Value) -> Vec<String> {
    match value {
        Value::Array(values) => values.into_iter().filter_map(|v| v.as_string()).collect(),
        _ => Vec::new(),
    }
}
