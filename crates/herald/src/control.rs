//! Control actions that must reach every node: removing an org member (close that
//! user's sockets on the org with 4003), forgetting cached webhook answers, and a
//! user's new read position (told to their sockets on the channel).
//!
//! The node that gets the call applies the action at once, then, with Redis, publishes
//! it on the pub/sub channel [`CONTROL_CHANNEL`]; every node subscribes to it with its
//! own connection and applies what other nodes send. Plain PUBLISH/SUBSCRIBE, not the
//! sharded kind: on a Redis Cluster a plain message reaches subscribers on every
//! cluster node, which is what a message for all herald nodes needs. Without Redis the
//! action is only applied here, the one node.
//!
//! Pub/sub keeps nothing for a node that was not listening. So whenever the control
//! subscriber connects again (or its receive buffer overflowed), the node checks the
//! membership of every user with a socket on an org channel here against the database
//! and closes the sockets of those no longer members (4003), and clears its whole
//! webhook cache. With `claims` membership there is nothing to check: the token is the
//! membership.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerError;
use crate::channel::{Channel, ChannelKind};
use crate::close::{Close, CloseCode};
use crate::hub::Hub;
use crate::membership::Membership;
use crate::redis::{build_client, connect_and_wait, quit_on, wait_connected, SECONDARY_CONNECT_WAIT};
use crate::store::Store;

/// The pub/sub channel control actions travel on.
pub const CONTROL_CHANNEL: &str = "herald:control";

/// How long sending an action may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection for commands (control actions, `Idempotency-Key` records), closed on
/// `stopped` (after the drain, with the broker's). Waits a few seconds for Redis; if it
/// is not there yet, keeps connecting in the background.
pub async fn command_client(
    url: &str,
    stopped: &CancellationToken,
) -> Result<fred::prelude::Client, BrokerError> {
    let client = build_client(url)?;
    connect_and_wait(
        &client,
        SECONDARY_CONNECT_WAIT,
        "Redis is not reachable yet: publishes with an Idempotency-Key and control actions wait for it",
    )
    .await;
    quit_on(stopped, vec![client.clone()]);
    Ok(client)
}

/// An action for every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// `user_id` left `org_id`: close their sockets on `org:{org_id}` (4003) and forget
    /// the webhook's cached answer.
    RemoveMember { org_id: String, user_id: String },
    /// `user_id`'s membership in `org_id` changed: forget the webhook's cached answer.
    ForgetMembership { org_id: String, user_id: String },
    /// `user_id` read `channel` up to `offset`: tell their sockets on it.
    Read {
        channel: String,
        user_id: String,
        offset: u64,
    },
}

/// `{"type":"read","channel","offset"}`: a user's new read position, for their sockets.
pub fn read_message(channel: &str, offset: u64) -> bytes::Bytes {
    bytes::Bytes::from(serde_json::json!({"type": "read", "channel": channel, "offset": offset}).to_string())
}

/// An action on the wire, with the node that sent it.
#[derive(Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    action: Action,
}

/// Applies control actions here and sends them to every other node.
pub struct Control {
    hub: Arc<Hub>,
    membership: Arc<Membership>,
    /// Told when another node keeps a read position.
    store: Store,
    node_id: Arc<str>,
    /// The connection actions are published on; `None` in memory mode.
    publisher: Option<fred::prelude::Client>,
}

impl Control {
    /// One node, no Redis: actions apply here only.
    pub fn local(hub: Arc<Hub>, membership: Arc<Membership>, store: Store, node_id: Arc<str>) -> Arc<Self> {
        Arc::new(Self {
            hub,
            membership,
            store,
            node_id,
            publisher: None,
        })
    }

    /// Many nodes: publishes on `publisher` (a connected command client) and starts the
    /// subscriber, on its own connection to `url`, which runs until `stopped`.
    pub async fn redis(
        url: &str,
        publisher: fred::prelude::Client,
        hub: Arc<Hub>,
        membership: Arc<Membership>,
        store: Store,
        node_id: Arc<str>,
        stopped: &CancellationToken,
    ) -> Result<Arc<Self>, BrokerError> {
        let subscriber = build_client(url)?;
        let control = Arc::new(Self {
            hub,
            membership,
            store,
            node_id,
            publisher: Some(publisher),
        });
        let stop = stopped.child_token();
        tokio::spawn(control.clone().listen(subscriber.clone(), stop));
        if !wait_connected(&subscriber, SECONDARY_CONNECT_WAIT).await {
            tracing::warn!("Redis is not reachable yet: control actions from other nodes wait for it");
        }
        Ok(control)
    }

    /// Applies `action` on this node, then sends it to the others. Returns how many
    /// sockets it closed here; an error means the other nodes could not be told (the
    /// caller may send it again: applying an action twice does no harm).
    pub async fn send(&self, action: Action) -> Result<usize, BrokerError> {
        let closed = self.apply(&action);
        self.broadcast(action).await.map(|()| closed)
    }

    /// Sends `action` to the other nodes only (the caller applied it here its own way).
    pub async fn broadcast(&self, action: Action) -> Result<(), BrokerError> {
        let Some(publisher) = &self.publisher else {
            return Ok(());
        };
        if !publisher.is_connected() {
            return Err(BrokerError::Unavailable("not connected to Redis".into()));
        }
        let envelope = Envelope {
            from: self.node_id.to_string(),
            action,
        };
        let text = serde_json::to_string(&envelope).unwrap_or_default();
        tokio::time::timeout(
            SEND_TIMEOUT,
            publisher.publish::<i64, _, _>(CONTROL_CHANNEL, text),
        )
        .await
        .map_err(|_| BrokerError::Unavailable("Redis did not answer in time".into()))?
        .map_err(|err| BrokerError::Unavailable(err.to_string()))?;
        Ok(())
    }

    /// Carries out `action` on this node. Returns how many sockets it closed.
    pub fn apply(&self, action: &Action) -> usize {
        match action {
            Action::RemoveMember { org_id, user_id } => {
                self.membership.forget(org_id, user_id);
                let Ok(channel) = Channel::new(ChannelKind::Org, org_id) else {
                    return 0;
                };
                let close = Close::new(CloseCode::Forbidden, "membership revoked");
                self.hub.disconnect_user(&channel, user_id, &close)
            }
            Action::ForgetMembership { org_id, user_id } => {
                self.membership.forget(org_id, user_id);
                0
            }
            Action::Read {
                channel,
                user_id,
                offset,
            } => {
                self.store.read_kept_elsewhere();
                self.hub
                    .notify_user(channel, user_id, None, &read_message(channel, *offset));
                0
            }
        }
    }

    /// Subscribes (again after every reconnect) and applies the actions of other nodes
    /// until `stop`.
    async fn listen(self: Arc<Self>, client: fred::prelude::Client, stop: CancellationToken) {
        let mut messages = client.message_rx();
        let mut reconnects = client.reconnect_rx();
        // Connected only now, so the first connection's event is not missed.
        client.connect();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                message = messages.recv() => match message {
                    Ok(message) => self.receive(&message),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "control messages dropped; checking open org sockets");
                        self.check_missed().await;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                reconnect = reconnects.recv() => match reconnect {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        match tokio::time::timeout(SEND_TIMEOUT, client.subscribe(CONTROL_CHANNEL)).await {
                            Ok(Ok(())) => {}
                            // The next reconnect tries again.
                            _ => tracing::warn!("subscribing to control actions failed"),
                        }
                        // Actions sent while this node was not listening are lost:
                        // check what they would have changed.
                        self.check_missed().await;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            }
        }
        let _ = client.quit().await;
    }

    /// Checks what actions this node may have missed would have changed: open org
    /// sockets of removed members, and read positions kept elsewhere.
    async fn check_missed(&self) {
        self.check_members().await;
        if let Err(err) = self.store.recheck_reads().await {
            tracing::warn!(error = %err, "could not check for read positions; checking again after the next reconnect");
        }
    }

    fn receive(&self, message: &fred::types::Message) {
        if &*message.channel != CONTROL_CHANNEL {
            return;
        }
        let Some(envelope) = message
            .value
            .as_bytes()
            .and_then(|bytes| serde_json::from_slice::<Envelope>(bytes).ok())
        else {
            tracing::warn!("malformed control message ignored");
            return;
        };
        if *envelope.from == *self.node_id {
            return;
        }
        let closed = self.apply(&envelope.action);
        tracing::debug!(action = ?envelope.action, closed, "control action from another node");
    }

    /// Closes (4003) the org sockets here whose user is no longer a member, and forgets
    /// every cached webhook answer. Run when control actions may have been missed.
    async fn check_members(&self) {
        match &*self.membership {
            Membership::Claims => {}
            Membership::Webhook(webhook) => webhook.forget_all(),
            Membership::Database(store) => {
                let mut checked = HashSet::new();
                let mut closed = 0;
                for (channel, users) in self.hub.users_of("org:") {
                    let Ok(channel) = Channel::parse(&channel) else {
                        continue;
                    };
                    for user_id in users {
                        if !checked.insert((channel.clone(), user_id.clone())) {
                            continue;
                        }
                        match store.is_member(channel.id(), &user_id).await {
                            Ok(true) => {}
                            Ok(false) => {
                                let close = Close::new(CloseCode::Forbidden, "membership revoked");
                                closed += self.hub.disconnect_user(&channel, &user_id, &close);
                            }
                            // Not knowing is no reason to close a member's socket; the
                            // next reconnect checks again.
                            Err(err) => tracing::warn!(error = %err, "membership check failed"),
                        }
                    }
                }
                if closed > 0 {
                    tracing::info!(
                        closed,
                        "sockets of removed members closed after a control reconnect"
                    );
                }
            }
        }
    }
}
