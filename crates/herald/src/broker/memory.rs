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
//!
//! Memory bound: the bytes of every message in history, plus [`MESSAGE_OVERHEAD`] each,
//! are counted against `history_max_bytes`. When a publish takes the total over it, the
//! histories of the least recently used channels are dropped until the total is under
//! 90 % of the bound (clients resuming on them get `recovered:false`). What is left
//! outside the bound is the per-channel state (epoch and offset, about
//! [`CHANNEL_OVERHEAD`] bytes each), which idle eviction reclaims.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use foldhash::fast::RandomState;
use tokio::time::Instant;

use crate::broker::{Broker, BrokerError, History, MemoryStats, Position, Published};
use crate::channel::{new_id, Channel, Draft, Message, Rfc3339Millis};
use crate::hub::Hub;
// Every critical section leaves the state consistent before it can panic (offsets are
// assigned and stored in one step), so a poisoned lock is still usable.
use crate::sync::lock;

const SHARDS: usize = 64;

/// Heap bytes a history entry costs beyond its message bytes: the ring slot (48 B) and
/// the shared buffer's header (32 B with the allocator's rounding), rounded up.
pub const MESSAGE_OVERHEAD: usize = 88;

/// Approximate heap bytes of a channel's state without history: the map entry, its
/// name, the lock and the epoch.
pub const CHANNEL_OVERHEAD: usize = 352;

pub struct MemoryBroker {
    hub: Arc<Hub>,
    history_size: usize,
    history_ttl: Duration,
    /// Budget for history bytes, all channels together.
    history_max_bytes: usize,
    shards: Box<[Mutex<ChannelMap>]>,
    hasher: RandomState,
    /// Bytes of history held now, counted as described in the module docs.
    history_bytes: AtomicUsize,
    /// Set while one thread shrinks history to the budget; others skip.
    shrinking: AtomicBool,
    counters: Counters,
}

/// Totals since start, for stats and metrics.
#[derive(Default)]
struct Counters {
    /// Channels whose history was dropped to stay within the memory bound.
    history_evictions: AtomicU64,
    /// Idle channels dropped entirely.
    idle_evictions: AtomicU64,
}

type ChannelMap = HashMap<Arc<str>, Arc<Mutex<ChannelState>>, RandomState>;

struct ChannelState {
    epoch: Arc<str>,
    offset: u64,
    history: VecDeque<Stored>,
    /// Last publish or position query; idle channels are evicted after the TTL.
    touched: Instant,
    /// Set, under this lock, when the channel is evicted: a caller that looked the
    /// channel up just before must look again instead of writing to a lost state.
    evicted: bool,
}

/// A history entry: the message's bytes and when it was sequenced (its age). Its offset
/// is its place in the ring (a channel's history holds consecutive offsets, the last one
/// the channel's), and its epoch the channel's (a channel's epoch never changes in this
/// broker), so neither is stored: 48 bytes a slot rather than a `Message`'s 72, written
/// into fresh memory for every message kept (issue 19).
struct Stored {
    bytes: Bytes,
    published_at: Instant,
}

impl ChannelState {
    /// The offset of the oldest message in history, or the next offset if it is empty.
    fn oldest_kept(&self) -> u64 {
        self.offset + 1 - self.history.len() as u64
    }
}

fn cost(bytes: &Bytes) -> usize {
    bytes.len() + MESSAGE_OVERHEAD
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>, history_size: usize, history_ttl: Duration, history_max_bytes: usize) -> Self {
        Self {
            hub,
            history_size,
            history_ttl,
            history_max_bytes,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            hasher: RandomState::default(),
            history_bytes: AtomicUsize::new(0),
            shrinking: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    fn channel_state(&self, channel: &Channel) -> Arc<Mutex<ChannelState>> {
        let idx = (self.hasher.hash_one(channel.name()) as usize) % SHARDS;
        let mut shard = lock(&self.shards[idx]);
        if let Some(state) = shard.get(channel.name()) {
            return state.clone();
        }
        let state = Arc::new(Mutex::new(ChannelState {
            epoch: Arc::from(new_id()),
            offset: 0,
            history: VecDeque::new(),
            touched: Instant::now(),
            evicted: false,
        }));
        shard.insert(Arc::from(channel.name()), state.clone());
        state
    }

    /// Runs `f` on the channel's state under its lock, creating the channel if needed.
    fn with_channel<R>(&self, channel: &Channel, f: impl FnOnce(&mut ChannelState) -> R) -> R {
        loop {
            let state = self.channel_state(channel);
            let mut guard = lock(&state);
            if !guard.evicted {
                return f(&mut guard);
            }
        }
    }

    /// Drops messages over the size limit or older than the TTL.
    fn prune(&self, state: &mut ChannelState, now: Instant) {
        let mut freed = 0;
        while state.history.len() > self.history_size
            || state
                .history
                .front()
                .is_some_and(|stored| now.duration_since(stored.published_at) >= self.history_ttl)
        {
            if let Some(stored) = state.history.pop_front() {
                freed += cost(&stored.bytes);
            }
        }
        if freed > 0 {
            self.history_bytes.fetch_sub(freed, Ordering::Relaxed);
        }
    }

    /// Drops the histories of the least recently used channels until history is under
    /// 90 % of the budget. One thread at a time; the others carry on publishing.
    fn shrink_to_budget(&self) {
        if self.shrinking.swap(true, Ordering::Acquire) {
            return;
        }
        let target = self.history_max_bytes / 10 * 9;
        let mut candidates: Vec<(Instant, Arc<Mutex<ChannelState>>)> = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for state in shard.values() {
                let touched = {
                    let guard = lock(state);
                    if guard.history.is_empty() {
                        continue;
                    }
                    guard.touched
                };
                candidates.push((touched, state.clone()));
            }
        }
        candidates.sort_by_key(|(touched, _)| *touched);
        for (_, state) in candidates {
            if self.history_bytes.load(Ordering::Relaxed) <= target {
                break;
            }
            let mut state = lock(&state);
            let freed: usize = state.history.drain(..).map(|stored| cost(&stored.bytes)).sum();
            state.history = VecDeque::new();
            self.history_bytes.fetch_sub(freed, Ordering::Relaxed);
            self.counters.history_evictions.fetch_add(1, Ordering::Relaxed);
        }
        self.shrinking.store(false, Ordering::Release);
    }

    /// Memory use and evictions so far.
    pub fn memory_stats(&self) -> MemoryStats {
        MemoryStats {
            channels: self.channel_count(),
            history_bytes: self.history_bytes.load(Ordering::Relaxed),
            history_max_bytes: self.history_max_bytes,
            history_evictions: self.counters.history_evictions.load(Ordering::Relaxed),
            idle_evictions: self.counters.idle_evictions.load(Ordering::Relaxed),
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
                state.evicted = idle;
                !idle
            });
        }
        self.counters
            .idle_evictions
            .fetch_add(evicted as u64, Ordering::Relaxed);
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
        let published = self.with_channel(channel, |state| {
            let now = Instant::now();
            state.offset += 1;
            state.touched = now;
            let id = new_id();
            let timestamp = Rfc3339Millis::now();
            let bytes = draft.seal(
                channel.name(),
                &id,
                state.offset,
                &state.epoch,
                timestamp.as_str(),
            );
            let message = Message {
                offset: state.offset,
                epoch: state.epoch.clone(),
                bytes,
                published_at: now,
            };
            if self.history_size > 0 {
                self.history_bytes
                    .fetch_add(cost(&message.bytes), Ordering::Relaxed);
                state.history.push_back(Stored {
                    bytes: message.bytes.clone(),
                    published_at: now,
                });
                self.prune(state, now);
            }
            self.hub.deliver(channel.name(), &message);
            Published {
                id,
                offset: state.offset,
                // Copied: `to_string` on an `Arc<str>` goes through `fmt`, code a publish
                // has no other use for (issue 19).
                epoch: String::from(&*state.epoch),
            }
        });
        if self.history_bytes.load(Ordering::Relaxed) > self.history_max_bytes {
            self.shrink_to_budget();
        }
        Ok(published)
    }

    async fn history(&self, channel: &Channel, since: u64, limit: usize) -> Result<History, BrokerError> {
        Ok(self.with_channel(channel, |state| {
            self.prune(state, Instant::now());
            let oldest_kept = state.oldest_kept();
            let complete = since <= state.offset && since + 1 >= oldest_kept;
            let skip = usize::try_from(since.saturating_sub(oldest_kept - 1)).unwrap_or(usize::MAX);
            let messages = (oldest_kept..)
                .zip(&state.history)
                .skip(skip)
                .take(limit)
                .map(|(offset, stored)| Message {
                    offset,
                    epoch: state.epoch.clone(),
                    bytes: stored.bytes.clone(),
                    published_at: stored.published_at,
                })
                .collect();
            History {
                position: Position {
                    epoch: String::from(&*state.epoch),
                    offset: state.offset,
                },
                messages,
                complete,
            }
        }))
    }

    async fn position(&self, channel: &Channel) -> Result<Position, BrokerError> {
        Ok(self.with_channel(channel, |state| {
            state.touched = Instant::now();
            Position {
                epoch: String::from(&*state.epoch),
                offset: state.offset,
            }
        }))
    }

    async fn subscribe(&self, _channel: &Channel) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &Channel) {}

    async fn ready(&self) -> bool {
        true
    }

    fn memory_stats(&self) -> Option<MemoryStats> {
        Some(MemoryBroker::memory_stats(self))
    }
}

#[cfg(test)]
mod tests;
