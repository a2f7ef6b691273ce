//! The Cluster side of the subscriber: one pub/sub connection per primary, and the
//! slot check that finds subscriptions to move or restore.

use super::*;

/// How long a subscribe waits for a primary's pub/sub connection that is not up yet.
const PRIMARY_CONNECT_WAIT: Duration = Duration::from_millis(500);

/// How often the slot map is read while a primary's connection is failing, and for how
/// many rounds at most (the regular slot check takes over after).
const FAILOVER_CHECK_INTERVAL: Duration = Duration::from_millis(200);
const FAILOVER_CHECK_ROUNDS: u32 = 75;

/// How long the slot check waits for a primary's count of this node's subscriptions.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(1);

/// The primary that owns `channel`'s slot in `routing`.
pub(super) fn shard_in(routing: &ClusterRouting, channel: &str) -> Option<Server> {
    let slot = fred::util::redis_keyslot(pubsub_channel(channel).as_bytes());
    routing.get_server(slot).cloned()
}

impl Subscriber {
    /// On a Cluster: subscribes to `name` on the connection to the primary that owns
    /// its slot (following one `MOVED`), after leaving the primary it was subscribed at
    /// before if that is another one. Returns the primary.
    pub(super) async fn listen_at_owner(
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
    pub(super) fn primary_if_any(&self, server: &Server) -> Option<fred::prelude::Client> {
        match &self.pubsub {
            PubSub::Sharded { primaries, .. } => lock(primaries).get(server).map(|p| p.client.clone()),
            PubSub::Plain(_) => None,
        }
    }

    /// The pub/sub connection to `server`, made (with its task) on first use.
    pub(super) fn primary(self: &Arc<Self>, server: &Server) -> Result<fred::prelude::Client, BrokerError> {
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

    /// On a Cluster: refreshes the slot map, subscribes again where it changed, and
    /// checks that each primary still holds this node's subscriptions.
    pub(super) async fn check_slots(self: &Arc<Self>) {
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
    pub(super) async fn dropped_somewhere(&self, shards: &Shards) -> Vec<Server> {
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
    pub(super) fn forget_idle_primaries(&self, shards: &Shards) {
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

    /// After an error on `server`'s connection (or a publish there failed): reads the
    /// slot map every [`FAILOVER_CHECK_INTERVAL`] until no channel of this node is
    /// subscribed or acknowledged there or the connection is back, so channels move to a promoted replica within a fraction
    /// of a second of its promotion. One such loop per primary at a time.
    pub(super) async fn follow_failover(self: &Arc<Self>, server: Server) {
        if !matches!(self.pubsub, PubSub::Sharded { .. }) || !lock(&self.failing).insert(server.clone()) {
            return;
        }
        for _ in 0..FAILOVER_CHECK_ROUNDS {
            tokio::time::sleep(FAILOVER_CHECK_INTERVAL).await;
            let PubSub::Sharded { shards, .. } = &self.pubsub else {
                break;
            };
            let back = match self.primary_if_any(&server) {
                Some(client) => client.is_connected(),
                None => shards.is_up(&server),
            };
            let used = lock(&self.channels)
                .values()
                .any(|listening| listening.shard.as_ref() == Some(&server))
                || self.acked.any_on(&server);
            if back || !used {
                break;
            }
            self.check_slots().await;
        }
        lock(&self.failing).remove(&server);
    }
}
