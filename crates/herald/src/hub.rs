//! This node's fan-out: channel name → the outboxes of the sockets subscribed to it here.
//!
//! A socket has one outbox whatever its number of channels: a `/ws/` socket subscribed
//! to three channels appears in three channels' lists, each time with the
//! [`SubscriptionId`] its session gave that subscription, and every message is queued
//! with it, so the session knows which channel a message is for without parsing it.
//!
//! **Invariant:** no publisher ever waits on a client. Delivery pushes the message's
//! shared bytes into each outbox without blocking; an outbox that overflows asks its
//! session to close with 1008 and is dropped from the channel.

pub mod outbox;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use foldhash::fast::RandomState;

use crate::channel::{Channel, Message};
use crate::close::Close;
use crate::sync::lock;
pub use outbox::{Batch, Drained, Outbox, Overflow, SubscriptionId, SOLE};

/// Channels are spread over this many independently locked maps so that publishes and
/// subscribes to different channels rarely contend.
const SHARDS: usize = 64;

type Subscribers = HashMap<Arc<str>, Vec<Subscriber>, RandomState>;

/// One socket's subscription to a channel.
struct Subscriber {
    outbox: Arc<Outbox>,
    sub: SubscriptionId,
}

pub struct Hub {
    shards: Box<[Mutex<Subscribers>]>,
    hasher: RandomState,
    /// Calls to [`Hub::disconnect_user`]. A session reads it before its membership
    /// check and again after subscribing: if it moved, a removal may have run in
    /// between, found no subscription to end, and the membership must be checked again.
    revocations: AtomicU64,
}

/// What one delivery did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Outboxes the message was queued in.
    pub queued: usize,
    /// Outboxes that overflowed and were asked to close with 1008.
    pub slow: usize,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            hasher: RandomState::default(),
            revocations: AtomicU64::new(0),
        }
    }
}

impl Hub {
    fn shard(&self, channel: &str) -> MutexGuard<'_, Subscribers> {
        let idx = (self.hasher.hash_one(channel) as usize) % SHARDS;
        // Critical sections only edit vectors and push into outboxes; a panic cannot
        // leave a shard half-updated in a way that matters, so poisoning is ignored.
        lock(&self.shards[idx])
    }

    /// Adds `outbox` to `channel` as its subscription `sub`. Returns true if it is the
    /// channel's first subscriber on this node (the broker then starts listening for it).
    pub fn subscribe(&self, channel: &Channel, outbox: Arc<Outbox>, sub: SubscriptionId) -> bool {
        let mut shard = self.shard(channel.name());
        let subscribers = shard.entry(Arc::from(channel.name())).or_default();
        subscribers.push(Subscriber { outbox, sub });
        subscribers.len() == 1
    }

    /// Removes subscription `sub` of `outbox` from `channel`. Returns true if the channel
    /// has no subscriber left on this node.
    pub fn unsubscribe(&self, channel: &Channel, outbox: &Arc<Outbox>, sub: SubscriptionId) -> bool {
        let mut shard = self.shard(channel.name());
        let Some(subscribers) = shard.get_mut(channel.name()) else {
            return true;
        };
        subscribers.retain(|s| !(Arc::ptr_eq(&s.outbox, outbox) && s.sub == sub));
        if subscribers.is_empty() {
            shard.remove(channel.name());
            true
        } else {
            false
        }
    }

    /// Hands `message` to every subscriber of `channel` on this node. The bytes are
    /// shared, never copied or re-serialized per subscriber.
    pub fn deliver(&self, channel: &str, message: &Message) -> Delivery {
        let mut shard = self.shard(channel);
        let Some(subscribers) = shard.get_mut(channel) else {
            return Delivery::default();
        };
        let mut delivery = Delivery::default();
        subscribers.retain(|s| match s.outbox.push(s.sub, message) {
            Ok(()) => {
                delivery.queued += 1;
                true
            }
            Err(Overflow) => {
                delivery.slow += 1;
                false
            }
        });
        if subscribers.is_empty() {
            shard.remove(channel);
        }
        drop(shard);
        if delivery.slow > 0 {
            tracing::warn!(
                channel,
                n_slow = delivery.slow,
                "slow consumers disconnected (1008)"
            );
        }
        delivery
    }

    /// Ends every subscription of `user_id` to `channel`: a single-channel socket is
    /// closed with `close`, a `/ws/` subscription ends and its socket is told in band.
    /// Returns how many.
    pub fn disconnect_user(&self, channel: &Channel, user_id: &str, close: &Close) -> usize {
        let shard = self.shard(channel.name());
        // Counted under the shard lock: a session that subscribes after this scan sees
        // the new count; one that subscribed before it is found by the scan.
        self.revocations.fetch_add(1, Ordering::SeqCst);
        let Some(subscribers) = shard.get(channel.name()) else {
            return 0;
        };
        let mut n = 0;
        for s in subscribers.iter().filter(|s| s.outbox.user_id() == user_id) {
            s.outbox.end(s.sub, close.clone());
            n += 1;
        }
        n
    }

    /// Queues `text`, a message without an offset, for every subscription of `user_id`
    /// to `channel` on this node but `except`'s (the socket it came from). Returns how
    /// many.
    pub fn notify_user(
        &self,
        channel: &str,
        user_id: &str,
        except: Option<&Arc<Outbox>>,
        text: &bytes::Bytes,
    ) -> usize {
        let shard = self.shard(channel);
        let Some(subscribers) = shard.get(channel) else {
            return 0;
        };
        let mut n = 0;
        for s in subscribers.iter().filter(|s| {
            s.outbox.user_id() == user_id && except.is_none_or(|except| !Arc::ptr_eq(except, &s.outbox))
        }) {
            // An overflowing outbox asks its session to close; delivery drops it.
            let _ = s.outbox.push_note(s.sub, text.clone());
            n += 1;
        }
        n
    }

    /// Asks every socket on the channel named `channel` to close (a `/ws/` socket with
    /// its other subscriptions: each resumes with `since`). Returns how many.
    pub fn disconnect_channel(&self, channel: &str, close: &Close) -> usize {
        let shard = self.shard(channel);
        let Some(subscribers) = shard.get(channel) else {
            return 0;
        };
        for s in subscribers.iter() {
            s.outbox.request_close(close.clone());
        }
        subscribers.len()
    }

    /// How many times [`Hub::disconnect_user`] has run.
    pub fn revocations(&self) -> u64 {
        self.revocations.load(Ordering::SeqCst)
    }

    /// Whether any socket on this node is subscribed to `channel`.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.shard(channel).contains_key(channel)
    }

    /// The users with a socket here on each channel whose name starts with `prefix`
    /// (one entry per socket).
    pub fn users_of(&self, prefix: &str) -> Vec<(String, Vec<String>)> {
        let mut found = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for (channel, subscribers) in shard.iter().filter(|(channel, _)| channel.starts_with(prefix)) {
                let users = subscribers
                    .iter()
                    .map(|s| s.outbox.user_id().to_owned())
                    .collect();
                found.push((channel.to_string(), users));
            }
        }
        found
    }

    /// Number of subscriptions on this node.
    pub fn subscription_count(&self) -> usize {
        (0..SHARDS)
            .map(|idx| lock(&self.shards[idx]).values().map(Vec::len).sum::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests;
