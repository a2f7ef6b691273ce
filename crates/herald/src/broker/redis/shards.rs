//! Commands to a Redis Cluster over one connection per primary, routed by hash slot.
//!
//! fred's cluster client runs every primary's connection through one router task,
//! which stops sending commands to *all* primaries while it reconnects to any one of
//! them (a primary killed, until a replica takes over). For herald that turned one
//! shard's failover into a full outage: every publish 503, every handshake 1001.
//! [`Shards`] keeps the cluster client for what it does well (discovering the slot
//! map, pub/sub) and sends scripts over a plain connection to the primary that owns
//! the script's slot, so a failing primary fails only its own channels.
//!
//! The slot map is the cluster client's cached one (refreshed by its own syncs and by
//! the subscriber's periodic slot check). A script sent to a primary that no longer owns
//! the slot gets `MOVED`: the map is refreshed and the caller answers 503, so the
//! publisher retries (safely, with an `Idempotency-Key`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::{ClientLike, ClusterInterface, Config, Value};
use fred::types::cluster::ClusterRouting;
use fred::types::config::{Server, ServerConfig};
use fred::types::scripts::Script;
use tokio::time::Instant;

use crate::broker::BrokerError;

/// How long a command waits for a primary's connection that is not up yet (made on
/// first use, or reconnecting) before the shard is reported unavailable.
const CONNECT_WAIT: Duration = Duration::from_millis(500);

/// One connection per Cluster primary, made on first use.
pub struct Shards {
    /// The cluster client whose slot map routes commands.
    cluster: fred::prelude::Client,
    /// The cluster URL's settings (password, timeouts), for each primary's connection.
    config: Config,
    nodes: Mutex<HashMap<Server, fred::prelude::Client>>,
    /// The last slot map read from the cluster client, and when. fred may have no map
    /// while it re-reads the cluster (a failover); the last one still routes every
    /// healthy primary's slots, and a stale entry is corrected by `MOVED`.
    routing: Mutex<Option<Routing>>,
}

/// A slot map and where it came from.
struct Routing {
    at: Instant,
    map: Arc<ClusterRouting>,
    /// Read by [`Shards::sync`] from a primary (kept until [`OWN_ROUTING_TTL`]), rather
    /// than copied from the cluster client.
    own: bool,
}

/// How often the slot map is copied from the cluster client.
const ROUTING_REFRESH: Duration = Duration::from_millis(250);

/// How long a slot map read by [`Shards::sync`] is preferred to the cluster client's,
/// which lags behind while fred's router waits on a dead primary.
const OWN_ROUTING_TTL: Duration = Duration::from_secs(5);

/// How long [`Shards::sync`] waits for each primary's `CLUSTER SLOTS`.
const SLOTS_TIMEOUT: Duration = Duration::from_millis(500);

impl Shards {
    /// Routes by `cluster`'s slot map; `config` is the cluster URL's configuration.
    pub fn new(cluster: fred::prelude::Client, config: Config) -> Self {
        Self {
            cluster,
            config,
            nodes: Mutex::new(HashMap::new()),
            routing: Mutex::new(None),
        }
    }

    /// The slot map: the cluster client's (copied at most every [`ROUTING_REFRESH`]),
    /// or the last one it had.
    pub(super) fn routing(&self) -> Option<Arc<ClusterRouting>> {
        let mut routing = super::lock(&self.routing);
        let fresh = routing.as_ref().is_some_and(|routing| {
            routing.at.elapsed()
                < if routing.own {
                    OWN_ROUTING_TTL
                } else {
                    ROUTING_REFRESH
                }
        });
        if !fresh {
            if let Some(current) = self.cluster.cached_cluster_state() {
                *routing = Some(Routing {
                    at: Instant::now(),
                    map: Arc::new(current),
                    own: false,
                });
            }
        }
        routing.as_ref().map(|routing| routing.map.clone())
    }

    /// The connection to the primary that owns `key`'s slot.
    fn client_for(&self, key: &str) -> Result<fred::prelude::Client, BrokerError> {
        let routing = self.routing().ok_or_else(|| {
            BrokerError::Unavailable("the Redis Cluster's slot map is not known yet".into())
        })?;
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let server = routing.get_server(slot).cloned().ok_or_else(|| {
            BrokerError::Unavailable(format!("no Redis Cluster primary serves slot {slot}"))
        })?;
        self.client_at(server)
    }

    /// Re-reads the cluster's slot map now, and routes by it from the next call.
    ///
    /// Asks the primaries themselves (`CLUSTER SLOTS`, first answer wins) before the
    /// cluster client: while fred's router reconnects to a dead primary it answers
    /// nothing, and a promoted replica must be found before new writes there hide the
    /// offsets the failover lost.
    pub(super) async fn sync(&self) -> Result<(), BrokerError> {
        let primaries = self
            .routing()
            .map(|routing| routing.unique_primary_nodes())
            .unwrap_or_default();
        for server in primaries {
            let Ok(client) = self.client_at(server.clone()) else {
                continue;
            };
            if !client.is_connected() {
                continue;
            }
            let slots = client.custom::<Value, Value>(
                fred::types::CustomCommand::new_static("CLUSTER", fred::types::ClusterHash::Random, false),
                vec![Value::from("SLOTS")],
            );
            let Ok(Ok(slots)) = tokio::time::timeout(SLOTS_TIMEOUT, slots).await else {
                continue;
            };
            match ClusterRouting::from_cluster_slots(slots, server.host.clone()) {
                Ok(map) if !map.slots().is_empty() => {
                    *super::lock(&self.routing) = Some(Routing {
                        at: Instant::now(),
                        map: Arc::new(map),
                        own: true,
                    });
                    return Ok(());
                }
                _ => continue,
            }
        }
        let synced = tokio::time::timeout(super::COMMAND_TIMEOUT, self.cluster.sync_cluster()).await;
        self.invalidate();
        match synced {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(super::unavailable(err)),
            Err(_) => Err(BrokerError::Unavailable(
                "reading the Redis Cluster slot map timed out".into(),
            )),
        }
    }

    /// Re-reads the slot map in the background (after a `MOVED`).
    pub(super) fn refresh(&self) {
        let cluster = self.cluster.clone();
        self.invalidate();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(super::COMMAND_TIMEOUT, cluster.sync_cluster()).await;
        });
    }

    /// Makes the next call copy the cluster client's map again (keeping this one if it
    /// has none).
    fn invalidate(&self) {
        if let Some(routing) = super::lock(&self.routing).as_mut() {
            routing.at = routing.at.checked_sub(OWN_ROUTING_TTL).unwrap_or(routing.at);
            routing.own = false;
        }
    }

    /// A new connection to `server` (not connected yet), with the cluster URL's
    /// settings: for the subscriber's pub/sub connection to each primary.
    pub(super) fn connection_to(&self, server: &Server) -> Result<fred::prelude::Client, BrokerError> {
        let mut config = self.config.clone();
        config.server = ServerConfig::new_centralized(server.host.to_string(), server.port);
        Ok(crate::redis::build_client_from(config)?)
    }

    /// How many shard subscriptions the connection `id` holds on `server` (`ssub` in
    /// `CLIENT LIST`, Redis 7.0.3 or later); `None` when that cannot be read.
    pub(super) async fn shard_subscriptions_of(&self, server: &Server, id: i64) -> Option<usize> {
        let client = self.client_at(server.clone()).ok()?;
        if !client.is_connected() {
            return None;
        }
        let listed: Value = client
            .custom(
                fred::types::CustomCommand::new_static("CLIENT", fred::types::ClusterHash::FirstKey, false),
                vec![Value::from("LIST"), Value::from("ID"), Value::from(id)],
            )
            .await
            .ok()?;
        ssub_of(std::str::from_utf8(listed.as_bytes()?).ok()?)
    }

    /// Whether the primary that owns `key`'s slot answers (its connection is made on
    /// first use, so the first call after a start may say no).
    pub fn serves(&self, key: &str) -> bool {
        self.client_for(key).is_ok_and(|client| client.is_connected())
    }

    /// Whether any primary of the slot map answers: the node can serve the channels
    /// of the primaries that are up (those of a primary that is down get 503, or close
    /// 1001 at connect, until a replica takes over).
    pub fn any_up(&self) -> bool {
        let Some(routing) = self.routing() else {
            return false;
        };
        routing
            .unique_primary_nodes()
            .into_iter()
            .filter_map(|server| self.client_at(server).ok())
            .any(|client| client.is_connected())
    }

    /// Whether this node's command connection to `server` is up.
    pub(super) fn is_up(&self, server: &Server) -> bool {
        super::lock(&self.nodes)
            .get(server)
            .is_some_and(|client| client.is_connected())
    }

    /// The connection to `server`, made on first use.
    fn client_at(&self, server: Server) -> Result<fred::prelude::Client, BrokerError> {
        let mut nodes = super::lock(&self.nodes);
        if let Some(client) = nodes.get(&server) {
            return Ok(client.clone());
        }
        let client = self.connection_to(&server)?;
        client.connect();
        nodes.insert(server, client.clone());
        Ok(client)
    }

    /// Runs `script` on the primary that owns `keys[0]`'s slot (a script's keys share
    /// one hash tag), within `timeout`. A primary that is down fails at once
    /// ([`BrokerError::Unavailable`]) without touching the others. A `MOVED` or `ASK`
    /// answer (the slot moved, or is moving) is followed once, and the slot map is
    /// refreshed for the next call.
    pub async fn eval(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
        timeout: Duration,
    ) -> Result<Value, BrokerError> {
        let first = keys
            .first()
            .ok_or_else(|| BrokerError::Unavailable("a script without keys cannot be routed".into()))?;
        let client = self.client_for(first)?;
        let err = match run(&client, script, keys.clone(), args.clone(), timeout, false).await? {
            Ok(reply) => return Ok(reply),
            Err(err) => err,
        };
        let Some((asking, server)) = redirection(err.details()) else {
            return Err(super::sent_but_failed(err));
        };
        self.refresh();
        let client = self.client_at(server)?;
        run(&client, script, keys, args, timeout, asking)
            .await?
            .map_err(super::sent_but_failed)
    }

    /// Closes every primary's connection.
    pub async fn quit(&self) {
        let nodes: Vec<fred::prelude::Client> = super::lock(&self.nodes).drain().map(|(_, c)| c).collect();
        for client in nodes {
            let _ = client.quit().await;
        }
    }
}

/// Sends `script` on `client` (after `ASKING` when `asking`): the outer error is the
/// connection being down (not sent) or the time running out (outcome unknown), the
/// inner one what came back.
async fn run(
    client: &fred::prelude::Client,
    script: &Script,
    keys: Vec<String>,
    args: Vec<Value>,
    timeout: Duration,
    asking: bool,
) -> Result<Result<Value, fred::error::Error>, BrokerError> {
    if !client.is_connected()
        && tokio::time::timeout(CONNECT_WAIT, client.wait_for_connect())
            .await
            .map_or(true, |connected| connected.is_err())
    {
        return Err(BrokerError::Unavailable(
            "the Redis Cluster primary for this channel is unreachable".into(),
        ));
    }
    let call = async {
        if asking {
            client
                .custom::<Value, Value>(
                    fred::types::CustomCommand::new_static("ASKING", fred::types::ClusterHash::Random, false),
                    vec![],
                )
                .await?;
        }
        script
            .evalsha_with_reload::<Value, _, _>(client, keys, args)
            .await
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| BrokerError::OutcomeUnknown {
            reason: "Redis did not answer in time".into(),
            id: None,
        })
}

/// `MOVED <slot> <host:port>` or `ASK <slot> <host:port>`: whether it is an `ASK`, and
/// the server named.
pub(super) fn redirection(details: &str) -> Option<(bool, Server)> {
    let start = details.find("MOVED ").or_else(|| details.find("ASK "))?;
    let mut words = details[start..].split_whitespace();
    let asking = match words.next()? {
        "MOVED" => false,
        "ASK" => true,
        _ => return None,
    };
    let _slot = words.next()?;
    let (host, port) = words.next()?.rsplit_once(':')?;
    Some((asking, Server::new(host, port.parse().ok()?)))
}

/// The `ssub=` count of a `CLIENT LIST` line: the connection's shard subscriptions.
pub(super) fn ssub_of(listed: &str) -> Option<usize> {
    listed
        .split_whitespace()
        .find_map(|field| field.strip_prefix("ssub="))?
        .parse()
        .ok()
}
