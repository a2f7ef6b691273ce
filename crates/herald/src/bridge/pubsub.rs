//! The pub/sub layer (`RedisPubSubChannelLayer`): herald PSUBSCRIBEs to the patterns
//! of its mapping rules while it holds the lease, so every mapped group reaches its
//! channel whether or not a socket is open.

use std::sync::Arc;

use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
use tokio_util::sync::CancellationToken;

use crate::bridge::commands::{timed, unix_now};
use crate::bridge::lease::LEASE_RENEW;
use crate::bridge::wire::{self, Undecodable};
use crate::bridge::{Bridge, Layer};

impl Bridge {
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

    pub(super) async fn psubscribe(&self) -> bool {
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
    pub(super) async fn listen(self: Arc<Self>, stop: CancellationToken, mut subscribed: bool) {
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
}
