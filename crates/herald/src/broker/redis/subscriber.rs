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

mod acked;
mod catch_up;
mod cluster;
mod listening;

use acked::{AckedPositions, ToVerify};
use cluster::shard_in;
#[cfg(test)]
use listening::RETIRED_EPOCHS;
use listening::{CatchUp, Listening, Verdict};

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
    /// Primaries whose failover is being followed ([`Subscriber::follow_failover`]).
    failing: Mutex<std::collections::HashSet<Server>>,
    /// Positions of channels this node published to or read without listening to them.
    acked: AckedPositions,
    fanout: Fanout,
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

impl Subscriber {
    /// Makes the subscriber; [`Subscriber::run`] starts it.
    pub fn new(parts: Parts) -> Result<Self, BrokerError> {
        let pubsub = match (&parts.shards, parts.fanout) {
            (Some(shards), Fanout::Sharded) => PubSub::Sharded {
                shards: shards.clone(),
                primaries: Mutex::new(HashMap::new()),
            },
            _ => {
                let client = crate::redis::build_client(&parts.url)?;
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
            failing: Mutex::new(std::collections::HashSet::new()),
            acked: AckedPositions::default(),
            fanout: parts.fanout,
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
        {
            let mut channels = lock(&self.channels);
            if !channels.contains_key(channel) {
                let mut listening = Listening::default();
                // What this node was acknowledged before it listened still counts.
                if let Some(acked) = self.acked.take(channel) {
                    listening.note(&acked.epoch, acked.offset);
                }
                channels.insert(channel.to_owned(), listening);
            }
        }
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

    pub async fn unsubscribe(&self, channel: &str) {
        let _changing = self.changing.lock().await;
        // A socket may have joined since the hub reported this channel empty.
        if self.hub.has_subscribers(channel) {
            return;
        }
        let Some(listening) = self.stop_listening(channel) else {
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

    /// Removes `channel` from the listened ones, keeping its position among the
    /// acknowledged ones.
    fn stop_listening(&self, channel: &str) -> Option<Listening> {
        let mut channels = lock(&self.channels);
        let listening = channels.remove(channel)?;
        if let Some((epoch, offset)) = &listening.seen {
            self.acked
                .note(channel, epoch, *offset, || listening.shard.clone());
        }
        Some(listening)
    }

    /// Records a position Redis gave this node in `channel` (a publish or a read).
    pub fn note(&self, channel: &str, epoch: &str, offset: u64) {
        let mut channels = lock(&self.channels);
        match channels.get_mut(channel) {
            Some(listening) => {
                listening.note(epoch, offset);
            }
            None => self.acked.note(channel, epoch, offset, || self.owner_of(channel)),
        }
    }

    /// The highest position Redis gave this node in `channel`'s current epoch, as far
    /// as it knows: Redis below it has lost acknowledged writes.
    pub fn known(&self, channel: &str) -> Option<(Arc<str>, u64)> {
        if let Some(listening) = lock(&self.channels).get(channel) {
            return listening.seen.clone();
        }
        self.acked.known(channel)
    }

    /// A publish to `channel` failed: on a Cluster (nothing to do on one Redis) its
    /// primary may be failing over, so follow the slot map closely, to compare what
    /// this node was acknowledged there with the promoted replica before other nodes'
    /// writes hide a loss.
    pub fn publish_failed(self: &Arc<Self>, channel: &str) {
        if let Some(server) = self.owner_of(channel) {
            if !lock(&self.failing).contains(&server) {
                let this = self.clone();
                tokio::spawn(async move { this.follow_failover(server).await });
            }
        }
    }

    /// On a Cluster, the primary that owns `channel`'s slot in the current slot map.
    fn owner_of(&self, channel: &str) -> Option<Server> {
        let routing = self.shards.as_ref()?.routing()?;
        shard_in(&routing, channel)
    }

    /// Subscribes again to the channels that need it, then catches them up: after a
    /// reconnect, every channel (on a Cluster, those of the primary that came back); on
    /// a Cluster's slot check, those whose slot changed owner or whose subscription
    /// failed; after Redis dropped subscriptions, every channel of that primary. Then
    /// compares the positions this node was acknowledged in channels it does not listen
    /// to with Redis, where the same events may have lost writes.
    async fn resync(self: &Arc<Self>, why: Resync) {
        {
            let _changing = self.changing.lock().await;
            let again = self.resubscribe(&why).await;
            self.catch_up(again).await;
        }
        // Outside `changing`: there may be many such channels (up to
        // `acked::MOST`), and subscribes of new sockets must not wait for them. A
        // channel subscribed meanwhile takes its position along (`subscribe`).
        let verify = self.acked_to_verify(&why);
        self.verify_acked(verify).await;
    }

    /// The channels whose acknowledged positions `why` calls into question, each with
    /// the owner to set back if it cannot be checked now.
    fn acked_to_verify(&self, why: &Resync) -> Vec<(ToVerify, Option<Server>)> {
        let with_owner = |verify: Vec<ToVerify>, owner: Option<&Server>| {
            verify
                .into_iter()
                .map(|verify| (verify, owner.cloned()))
                .collect()
        };
        match (&self.pubsub, why) {
            (_, Resync::Dropped(_)) | (PubSub::Plain(_), Resync::SlotCheck) => Vec::new(),
            (PubSub::Plain(_), _) | (PubSub::Sharded { .. }, Resync::Lost) => {
                with_owner(self.acked.of_server(None), None)
            }
            (PubSub::Sharded { .. }, Resync::Reconnected(server)) => {
                with_owner(self.acked.of_server(Some(server)), Some(server))
            }
            (PubSub::Sharded { shards, .. }, Resync::SlotCheck) => shards
                .routing()
                .map(|routing| self.acked.moved(&routing))
                .unwrap_or_default(),
        }
    }

    /// Subscribes again to the listened channels `why` calls for; returns those to
    /// catch up.
    async fn resubscribe(self: &Arc<Self>, why: &Resync) -> Vec<String> {
        let channels: Vec<(String, Listening)> = lock(&self.channels)
            .iter()
            .map(|(channel, listening)| (channel.clone(), listening.clone()))
            .collect();
        if channels.is_empty() {
            return Vec::new();
        }
        let again = match &self.pubsub {
            PubSub::Plain(client) => {
                if matches!(why, Resync::SlotCheck | Resync::Dropped(_)) {
                    return Vec::new();
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
                    return Vec::new();
                };
                let mut again = Vec::new();
                let mut failed = 0_usize;
                for (channel, listening) in channels {
                    let owner = shard_in(&routing, &channel);
                    let needed = listening.shard.is_none()
                        || listening.shard != owner
                        || match why {
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
        again.into_iter().map(|(channel, _)| channel).collect()
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
        let mut errors = client.error_rx();
        let mut errors_open = server.is_some();
        let mut connected_before = std::collections::HashSet::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                error = errors.recv(), if errors_open => match (error, &server) {
                    (Err(tokio::sync::broadcast::error::RecvError::Closed), _) | (_, None) => errors_open = false,
                    // The primary may be failing over: find its replacement promptly,
                    // before new writes there hide the offsets it lost.
                    (_, Some(server)) => {
                        let this = self.clone();
                        let server = server.clone();
                        tokio::spawn(async move { this.follow_failover(server).await });
                    }
                },
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
