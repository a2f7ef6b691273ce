//! The subscriber: the pub/sub side of the Redis broker. It listens once per channel
//! that has a socket on this node, hands what arrives to the hub, and keeps every
//! channel's subscription and position right across reconnects and failovers.
//!
//! On one Redis there is one pub/sub connection for every channel. On a Cluster there
//! is one per primary ([`PubSub::Sharded`]), made on first use: a shard subscription
//! lives on the connection to the primary that owns the channel's slot, so a failing
//! primary stops only its own channels, and the subscriber always knows where each
//! subscription is. Redis drops shard subscriptions without telling the client (fred
//! discards the server's `sunsubscribe`) when a slot changes owner, even when it comes
//! back to the same primary before the next slot check; so every slot check also asks
//! each primary how many shard subscriptions this node's connection holds (`ssub` in
//! `CLIENT LIST`), and subscribes again, then catches up, when it holds fewer than
//! this node expects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fred::interfaces::ClientInterface;
use fred::prelude::{ClientLike, EventInterface, PubsubInterface, Value};
use fred::types::cluster::ClusterRouting;
use fred::types::config::Server;
use fred::types::scripts::Script;
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::shards::{redirection, Shards};
use super::{
    channel_of_pubsub, history_key, lock, may_send, meta_key, new_id, parse_position, parse_read,
    pubsub_channel, run_script, split_number, unavailable, value_bytes, Fanout, CATCH_UP_CONCURRENCY,
    COMMAND_TIMEOUT, FIRST_CONNECT_WAIT, RESET_SCRIPT, SLOT_CHECK_INTERVAL,
};
use crate::broker::{BrokerError, Position};
use crate::channel::Message;
use crate::close::{Close, CloseCode};
use crate::hub::Hub;

/// How long a subscribe waits for a primary's pub/sub connection that is not up yet.
const PRIMARY_CONNECT_WAIT: Duration = Duration::from_millis(500);

/// How long the slot check waits for a primary's count of this node's subscriptions.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(1);

/// The pub/sub connections, the channels this node listens to, and the hub it
/// delivers to. Run by one task ([`Subscriber::run`]), plus one per primary on a
/// Cluster.
pub struct Subscriber {
    pubsub: PubSub,
    hub: Arc<Hub>,
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
    /// Reconnections of the pub/sub connections, for `herald_broker_reconnects_total`;
    /// a server's first connection is not one.
    reconnects: AtomicU64,
    /// Stops the per-primary tasks with the subscriber.
    stop: CancellationToken,
}

/// Where the subscriptions live.
enum PubSub {
    /// One Redis: one connection subscribes to every channel.
    Plain(fred::prelude::Client),
    /// A Cluster: one connection per primary, each with a task that delivers its
    /// messages ([`Subscriber::run_primary`]).
    Sharded {
        shards: Arc<Shards>,
        primaries: Mutex<HashMap<Server, Primary>>,
    },
}

/// One primary's pub/sub connection, and the token that stops its task.
struct Primary {
    client: fred::prelude::Client,
    stop: CancellationToken,
}

/// What [`Subscriber::new`] needs.
pub struct Parts {
    pub hub: Arc<Hub>,
    pub fanout: Fanout,
    /// The command connection (on a Cluster, the cluster client whose slot map routes).
    pub commands: fred::prelude::Client,
    pub shards: Option<Arc<Shards>>,
    /// The URL the pub/sub connection of one Redis is made from.
    pub url: String,
    pub meta_ttl_ms: u64,
    pub stop: CancellationToken,
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
    /// The primary's connection holds fewer shard subscriptions than this node made
    /// there: Redis dropped some.
    Dropped(Server),
}

/// The primary that owns `channel`'s slot in `routing`.
fn shard_in(routing: &ClusterRouting, channel: &str) -> Option<Server> {
    let slot = fred::util::redis_keyslot(pubsub_channel(channel).as_bytes());
    routing.get_server(slot).cloned()
}

impl Subscriber {
    /// Makes the subscriber; [`Subscriber::run`] starts it.
    pub fn new(parts: Parts) -> Result<Self, BrokerError> {
        let pubsub = match (&parts.shards, parts.fanout) {
            (Some(shards), Fanout::Sharded) => PubSub::Sharded {
                shards: shards.clone(),
                primaries: Mutex::new(HashMap::new()),
            },
            _ => {
                let client = super::build_client(&parts.url)?;
                client.connect();
                PubSub::Plain(client)
            }
        };
        Ok(Self {
            pubsub,
            hub: parts.hub,
            channels: Mutex::new(HashMap::new()),
            commands: parts.commands,
            shards: parts.shards,
            read_script: Script::from_lua(super::READ_SCRIPT),
            meta_ttl_ms: parts.meta_ttl_ms,
            changing: tokio::sync::Mutex::new(()),
            checking: tokio::sync::Mutex::new(()),
            reconnects: AtomicU64::new(0),
            stop: parts.stop,
        })
    }

    /// Waits up to `wait` for the pub/sub connection of one Redis (a Cluster's are made
    /// per primary, on first use); whether it is up.
    pub async fn wait_for_connect(&self, wait: Duration) -> bool {
        match &self.pubsub {
            PubSub::Plain(client) => tokio::time::timeout(wait, client.wait_for_connect())
                .await
                .is_ok_and(|connected| connected.is_ok()),
            PubSub::Sharded { .. } => true,
        }
    }

    /// Whether pub/sub can reach Redis: the one connection is up, or on a Cluster, no
    /// primary this node subscribed at is unreachable for long (each one's channels
    /// are caught up or closed with 1001 when it comes back).
    pub fn connected(&self) -> bool {
        match &self.pubsub {
            PubSub::Plain(client) => client.is_connected(),
            PubSub::Sharded { .. } => true,
        }
    }

    /// Reconnections of the pub/sub connections.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    pub async fn subscribe(self: &Arc<Self>, channel: &str) -> Result<(), BrokerError> {
        let _changing = self.changing.lock().await;
        lock(&self.channels).entry(channel.to_owned()).or_default();
        if let PubSub::Plain(client) = &self.pubsub {
            if !may_send(client) {
                // Subscribed again by the task when the connection comes back.
                return Err(BrokerError::Unavailable("not connected to Redis".into()));
            }
        }
        self.listen(channel).await
    }

    /// Sends the SUBSCRIBE (SSUBSCRIBE on a Cluster) for `channel`. Called under
    /// `changing`.
    async fn listen(self: &Arc<Self>, channel: &str) -> Result<(), BrokerError> {
        let name = pubsub_channel(channel);
        match &self.pubsub {
            PubSub::Plain(client) => {
                match tokio::time::timeout(COMMAND_TIMEOUT, client.subscribe(name)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(err)) => Err(unavailable(err)),
                    Err(_) => Err(BrokerError::Unavailable("Redis did not answer in time".into())),
                }
            }
            PubSub::Sharded { shards, .. } => {
                let subscribed = self.listen_at_owner(shards, channel, name).await;
                if let Some(listening) = lock(&self.channels).get_mut(channel) {
                    listening.shard = subscribed.as_ref().ok().cloned();
                }
                subscribed.map(|_| ())
            }
        }
    }

    /// On a Cluster: subscribes to `name` on the connection to the primary that owns
    /// its slot (following one `MOVED`), after leaving the primary it was subscribed at
    /// before if that is another one. Returns the primary.
    async fn listen_at_owner(
        self: &Arc<Self>,
        shards: &Shards,
        channel: &str,
        name: String,
    ) -> Result<Server, BrokerError> {
        let routing = shards.routing().ok_or_else(|| {
            BrokerError::Unavailable("the Redis Cluster's slot map is not known yet".into())
        })?;
        let mut target = shard_in(&routing, channel)
            .ok_or_else(|| BrokerError::Unavailable("no Redis Cluster primary serves this channel".into()))?;
        let previous = lock(&self.channels).get(channel).and_then(|l| l.shard.clone());
        for attempt in 0..2 {
            if let Some(previous) = previous.as_ref().filter(|previous| **previous != target) {
                // Leave first: two connections holding one channel would deliver its
                // messages twice, which reads as offsets handed out again.
                if let Some(old) = self.primary_if_any(previous) {
                    let _ = tokio::time::timeout(PRIMARY_CONNECT_WAIT, old.sunsubscribe(name.clone())).await;
                }
            }
            let client = self.primary(&target)?;
            if !client.is_connected()
                && tokio::time::timeout(PRIMARY_CONNECT_WAIT, client.wait_for_connect())
                    .await
                    .map_or(true, |connected| connected.is_err())
            {
                return Err(BrokerError::Unavailable(
                    "the Redis Cluster primary for this channel is unreachable".into(),
                ));
            }
            match tokio::time::timeout(COMMAND_TIMEOUT, client.ssubscribe(name.clone())).await {
                Ok(Ok(())) => return Ok(target),
                Ok(Err(err)) => match redirection(err.details()) {
                    Some((_, moved)) if attempt == 0 => {
                        shards.refresh();
                        target = moved;
                    }
                    _ => return Err(unavailable(err)),
                },
                Err(_) => return Err(BrokerError::Unavailable("Redis did not answer in time".into())),
            }
        }
        Err(BrokerError::Unavailable(
            "the channel's slot keeps moving; try again".into(),
        ))
    }

    /// The pub/sub connection to `server`, if one was made.
    fn primary_if_any(&self, server: &Server) -> Option<fred::prelude::Client> {
        match &self.pubsub {
            PubSub::Sharded { primaries, .. } => lock(primaries).get(server).map(|p| p.client.clone()),
            PubSub::Plain(_) => None,
        }
    }

    /// The pub/sub connection to `server`, made (with its task) on first use.
    fn primary(self: &Arc<Self>, server: &Server) -> Result<fred::prelude::Client, BrokerError> {
        let PubSub::Sharded { shards, primaries } = &self.pubsub else {
            return Err(BrokerError::Unavailable("not a Redis Cluster".into()));
        };
        let mut primaries = lock(primaries);
        if let Some(primary) = primaries.get(server) {
            return Ok(primary.client.clone());
        }
        let client = shards.connection_to(server)?;
        let stop = self.stop.child_token();
        // The receivers exist before the connection does, so no message or reconnect
        // event is missed.
        tokio::spawn(
            self.clone()
                .run_primary(server.clone(), client.clone(), stop.clone()),
        );
        client.connect();
        primaries.insert(
            server.clone(),
            Primary {
                client: client.clone(),
                stop,
            },
        );
        Ok(client)
    }

    pub async fn unsubscribe(&self, channel: &str) {
        let _changing = self.changing.lock().await;
        // A socket may have joined since the hub reported this channel empty.
        if self.hub.has_subscribers(channel) {
            return;
        }
        let Some(listening) = lock(&self.channels).remove(channel) else {
            return;
        };
        let name = pubsub_channel(channel);
        let unsubscribed = match &self.pubsub {
            PubSub::Plain(client) if may_send(client) => {
                tokio::time::timeout(COMMAND_TIMEOUT, client.unsubscribe(name)).await
            }
            PubSub::Sharded { .. } => match listening.shard.and_then(|server| self.primary_if_any(&server)) {
                Some(client) if client.is_connected() => {
                    tokio::time::timeout(COMMAND_TIMEOUT, client.sunsubscribe(name)).await
                }
                _ => return,
            },
            PubSub::Plain(_) => return,
        };
        if !matches!(unsubscribed, Ok(Ok(()))) {
            tracing::debug!(channel, "Redis unsubscribe failed");
        }
    }

    /// Records a position this node read or published in `channel`, if it listens to
    /// it.
    pub fn note(&self, channel: &str, epoch: &str, offset: u64) {
        if let Some(listening) = lock(&self.channels).get_mut(channel) {
            listening.note(epoch, offset);
        }
    }

    /// Subscribes again to the channels that need it, then catches them up: after a
    /// reconnect, every channel (on a Cluster, those of the primary that came back); on
    /// a Cluster's slot check, those whose slot changed owner or whose subscription
    /// failed; after Redis dropped subscriptions, every channel of that primary.
    async fn resync(self: &Arc<Self>, why: Resync) {
        let _changing = self.changing.lock().await;
        let channels: Vec<(String, Listening)> = lock(&self.channels)
            .iter()
            .map(|(channel, listening)| (channel.clone(), listening.clone()))
            .collect();
        if channels.is_empty() {
            return;
        }
        let again = match &self.pubsub {
            PubSub::Plain(client) => {
                if matches!(why, Resync::SlotCheck | Resync::Dropped(_)) {
                    return;
                }
                let names: Vec<String> = channels
                    .iter()
                    .map(|(channel, _)| pubsub_channel(channel))
                    .collect();
                match client.subscribe(names).await {
                    Ok(()) => tracing::info!(channels = channels.len(), "resubscribed to Redis"),
                    Err(err) => tracing::warn!(error = %err, "Redis resubscribe failed"),
                }
                channels
            }
            PubSub::Sharded { shards, .. } => {
                let Some(routing) = shards.routing() else {
                    return;
                };
                let mut again = Vec::new();
                let mut failed = 0_usize;
                for (channel, listening) in channels {
                    let owner = shard_in(&routing, &channel);
                    let needed = listening.shard.is_none()
                        || listening.shard != owner
                        || match &why {
                            Resync::Reconnected(server) | Resync::Dropped(server) => {
                                listening.shard.as_ref() == Some(server)
                            }
                            Resync::Lost => true,
                            Resync::SlotCheck => false,
                        };
                    if !needed {
                        continue;
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

    /// On a Cluster: refreshes the slot map, subscribes again where it changed, and
    /// checks that each primary still holds this node's subscriptions.
    async fn check_slots(self: &Arc<Self>) {
        // A check still running (Redis slow, many channels) makes this one redundant.
        let Ok(_checking) = self.checking.try_lock() else {
            return;
        };
        let PubSub::Sharded { shards, .. } = &self.pubsub else {
            return;
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, shards.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::debug!(error = %err, "reading the Redis Cluster slot map failed"),
            Err(_) => tracing::debug!("reading the Redis Cluster slot map timed out"),
        }
        // The last map still routes the healthy primaries while the cluster re-reads.
        self.resync(Resync::SlotCheck).await;
        for server in self.dropped_somewhere(shards).await {
            tracing::warn!(server = %server, "Redis dropped this node's shard subscriptions: subscribing again");
            self.resync(Resync::Dropped(server)).await;
        }
        self.forget_idle_primaries(shards);
    }

    /// The primaries whose connection holds fewer shard subscriptions than this node
    /// made there (Redis unsubscribes a slot's channels when the slot leaves a primary,
    /// and fred does not pass that on).
    async fn dropped_somewhere(&self, shards: &Shards) -> Vec<Server> {
        let _changing = self.changing.lock().await;
        let mut expected: HashMap<Server, usize> = HashMap::new();
        for listening in lock(&self.channels).values() {
            if let Some(server) = &listening.shard {
                *expected.entry(server.clone()).or_default() += 1;
            }
        }
        let checks = expected.into_iter().filter_map(|(server, count)| {
            let client = self.primary_if_any(&server)?;
            let id = client.connection_ids().get(&server).copied()?;
            Some(async move {
                let held = tokio::time::timeout(VERIFY_TIMEOUT, shards.shard_subscriptions_of(&server, id))
                    .await
                    .ok()
                    .flatten();
                // Unknown (the primary is down, an old Redis): its reconnect resyncs.
                held.filter(|held| *held < count).map(|_| server)
            })
        });
        futures_util::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Closes the connections to servers that hold none of this node's channels and no
    /// longer own a slot (a failed primary, now a replica or gone).
    fn forget_idle_primaries(&self, shards: &Shards) {
        let PubSub::Sharded { primaries, .. } = &self.pubsub else {
            return;
        };
        let Some(routing) = shards.routing() else {
            return;
        };
        let owners: std::collections::HashSet<Server> = routing
            .slots()
            .iter()
            .map(|range| range.primary.clone())
            .collect();
        let used: std::collections::HashSet<Server> = lock(&self.channels)
            .values()
            .filter_map(|listening| listening.shard.clone())
            .collect();
        lock(primaries).retain(|server, primary| {
            let keep = owners.contains(server) || used.contains(server);
            if !keep {
                primary.stop.cancel();
            }
            keep
        });
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

    /// Runs the subscriber until `stop` is cancelled: on one Redis, delivers messages
    /// and resubscribes after each reconnect; on a Cluster (whose primaries' connections
    /// have tasks of their own), checks the slot map every [`SLOT_CHECK_INTERVAL`].
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        match &self.pubsub {
            PubSub::Plain(client) => {
                let client = client.clone();
                self.clone().pump(None, client.clone(), stop).await;
                let _ = client.quit().await;
            }
            PubSub::Sharded { .. } => {
                let mut slot_check = tokio::time::interval(SLOT_CHECK_INTERVAL);
                slot_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = slot_check.tick() => {
                            let this = self.clone();
                            tokio::spawn(async move { this.check_slots().await });
                        }
                    }
                }
            }
        }
    }

    /// A Cluster primary's pub/sub connection: its messages and reconnects, until
    /// `stop` (the subscriber stops, or the connection is no longer needed).
    async fn run_primary(
        self: Arc<Self>,
        server: Server,
        client: fred::prelude::Client,
        stop: CancellationToken,
    ) {
        self.pump(Some(server), client.clone(), stop).await;
        let _ = client.quit().await;
    }

    /// Delivers one connection's messages to the hub and resubscribes after each of its
    /// reconnects (and its first connection: a socket may have arrived before it).
    /// `server` is the primary it is connected to, on a Cluster.
    async fn pump(
        self: Arc<Self>,
        server: Option<Server>,
        client: fred::prelude::Client,
        stop: CancellationToken,
    ) {
        let mut messages = client.message_rx();
        let mut reconnects = client.reconnect_rx();
        let mut connected_before = std::collections::HashSet::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                message = messages.recv() => match message {
                    Ok(message) => self.deliver(&message),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        // Which channels lost messages is not known: catch every one of
                        // this connection up from history, so a channel's last message
                        // is not left unsent.
                        tracing::warn!(missed, "Redis messages dropped by a lagging receiver: catching up from history");
                        let channels: Vec<String> = lock(&self.channels)
                            .iter()
                            .filter(|(_, listening)| server.is_none() || listening.shard == server)
                            .map(|(channel, _)| channel.clone())
                            .collect();
                        let this = self.clone();
                        tokio::spawn(async move { this.catch_up(channels).await });
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                reconnect = reconnects.recv() => {
                    let (why, again) = match reconnect {
                        Ok(connected) => {
                            let again = !connected_before.insert(connected.clone());
                            (Resync::Reconnected(server.clone().unwrap_or(connected)), again)
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => match &server {
                            Some(server) => (Resync::Reconnected(server.clone()), true),
                            None => (Resync::Lost, true),
                        },
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    };
                    if again {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    let this = self.clone();
                    // Off the receive loop, which must keep draining messages meanwhile.
                    tokio::spawn(async move { this.resync(why).await });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
