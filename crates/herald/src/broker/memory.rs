//! The single-node broker: channel state and history in this process's memory.
//!
//! Each channel has a lock of its own. A publish takes it, assigns the next offset,
//! appends to the history ring and pushes to this node's hub before releasing it, so
//! subscribers see a channel's messages in offset order and never a message that is not
//! yet in history.
//!
//! History per channel keeps at most `HERALD_HISTORY_SIZE` messages, each for at most
//! `HERALD_HISTORY_TTL`. A channel with no subscriber here and no message in history
//! for a TTL is dropped by [`MemoryBroker::evict_idle`]; its next message starts a new
//! epoch.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::broker::{Broker, BrokerError, History, Position, Published};
use crate::channel::{new_id, now_rfc3339, Channel, Draft, Message};
use crate::hub::Hub;

const SHARDS: usize = 64;

pub struct MemoryBroker {
    hub: Arc<Hub>,
    history_size: usize,
    history_ttl: Duration,
    shards: Box<[Mutex<ChannelMap>]>,
    hasher: RandomState,
}

type ChannelMap = HashMap<Arc<str>, Arc<Mutex<ChannelState>>>;

struct ChannelState {
    epoch: String,
    offset: u64,
    history: VecDeque<Stored>,
    /// Last publish or position query; idle channels are evicted after the TTL.
    touched: Instant,
}

struct Stored {
    message: Message,
    at: Instant,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent before it can panic (offsets
    // are assigned and stored in one step), so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>, history_size: usize, history_ttl: Duration) -> Self {
        Self {
            hub,
            history_size,
            history_ttl,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn channel_state(&self, channel: &Channel) -> Arc<Mutex<ChannelState>> {
        let idx = (self.hasher.hash_one(channel.name()) as usize) % SHARDS;
        let mut shard = lock(&self.shards[idx]);
        if let Some(state) = shard.get(channel.name()) {
            return state.clone();
        }
        let state = Arc::new(Mutex::new(ChannelState {
            epoch: new_id(),
            offset: 0,
            history: VecDeque::new(),
            touched: Instant::now(),
        }));
        shard.insert(Arc::from(channel.name()), state.clone());
        state
    }

    fn prune(&self, state: &mut ChannelState, now: Instant) {
        while state.history.len() > self.history_size {
            state.history.pop_front();
        }
        while state
            .history
            .front()
            .is_some_and(|stored| now.duration_since(stored.at) >= self.history_ttl)
        {
            state.history.pop_front();
        }
    }

    /// Drops channels that have had no subscriber on this node, no publish and no
    /// message in history for a TTL. Returns how many were dropped.
    pub fn evict_idle(&self) -> usize {
        let now = Instant::now();
        let mut evicted = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.retain(|name, state| {
                let mut state = lock(state);
                self.prune(&mut state, now);
                let idle = state.history.is_empty()
                    && now.duration_since(state.touched) >= self.history_ttl
                    && !self.hub.has_subscribers(name);
                evicted += usize::from(idle);
                !idle
            });
        }
        evicted
    }

    /// Number of channels with state on this node.
    pub fn channel_count(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, channel: &Channel, draft: &Draft) -> Result<Published, BrokerError> {
        let state = self.channel_state(channel);
        let mut state = lock(&state);
        let now = Instant::now();
        state.offset += 1;
        state.touched = now;
        let id = new_id();
        let bytes = draft.seal(&id, state.offset, &state.epoch, &now_rfc3339());
        let message = Message {
            offset: state.offset,
            bytes,
        };
        if self.history_size > 0 {
            state.history.push_back(Stored {
                message: message.clone(),
                at: now,
            });
            self.prune(&mut state, now);
        }
        self.hub.deliver(channel.name(), &message);
        Ok(Published {
            id,
            offset: state.offset,
            epoch: state.epoch.clone(),
        })
    }

    async fn history(&self, channel: &Channel, since: u64, limit: usize) -> Result<History, BrokerError> {
        let state = self.channel_state(channel);
        let mut state = lock(&state);
        self.prune(&mut state, Instant::now());
        let oldest_kept = state
            .history
            .front()
            .map_or(state.offset + 1, |stored| stored.message.offset);
        let complete = since <= state.offset && since + 1 >= oldest_kept;
        let messages = state
            .history
            .iter()
            .filter(|stored| stored.message.offset > since)
            .take(limit)
            .map(|stored| stored.message.clone())
            .collect();
        Ok(History {
            position: Position {
                epoch: state.epoch.clone(),
                offset: state.offset,
            },
            messages,
            complete,
        })
    }

    async fn position(&self, channel: &Channel) -> Result<Position, BrokerError> {
        let state = self.channel_state(channel);
        let mut state = lock(&state);
        state.touched = Instant::now();
        Ok(Position {
            epoch: state.epoch.clone(),
            offset: state.offset,
        })
    }

    async fn subscribe(&self, _channel: &Channel) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &Channel) {}

    async fn ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
