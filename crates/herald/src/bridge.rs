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

mod bridged;
mod commands;
pub mod fernet;
mod groups;
mod lease;
pub mod mapping;
mod names;
mod pubsub;
mod queue;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::ClientLike;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use bridged::BridgedBroker;
use commands::Scripts;
use groups::Joined;
use names::Names;
use wire::{Decoder, Undecodable};

use crate::broker::Publisher;
use crate::channel::{Channel, Draft};
use crate::config::django::BridgeOptions;
use crate::hub::Hub;
use crate::metrics::{BridgeLayer as Layer, BridgeOutcome, Metrics};
use crate::redis::{build_client, FIRST_CONNECT_WAIT};
use crate::sync::lock;

/// Groups whose unmappable messages have been logged; past this many, further groups
/// are only counted.
const MAX_WARNED_GROUPS: usize = 10_000;

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot set up the Redis client: {0}")]
    Client(crate::redis::ClientError),
}

/// What happened to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    /// Published, or dropped for good (counted): take it off the queue.
    Done,
    /// herald's broker could not take it: keep it and try again.
    Retry,
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
        let build = || build_client(url).map_err(BridgeError::Client);
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
            scripts: Scripts::load(),
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
                url = %crate::config::redact_url(url),
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
            url = %crate::config::redact_url(url),
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
                self.metrics.bridge_message(layer, BridgeOutcome::Published);
                Handled::Done
            }
            Err(err) => match layer {
                Layer::Core => {
                    tracing::warn!(%channel, error = %err, "django bridge: publish failed; retrying");
                    Handled::Retry
                }
                Layer::PubSub => {
                    self.metrics.bridge_message(layer, BridgeOutcome::Failed);
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
        self.metrics.bridge_message(layer, BridgeOutcome::Unmappable);
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
        self.metrics.bridge_message(layer, BridgeOutcome::Undecodable);
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

#[cfg(test)]
mod tests;
