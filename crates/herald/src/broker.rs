//! The broker sequences, stores and distributes messages: it gives each message its
//! offset, keeps the channel's recent history for recovery, and hands the message to
//! every node's [`Hub`](crate::hub::Hub).
//!
//! Guarantees every implementation keeps (memory and Redis):
//! - Offsets in a channel start at 1 and grow by exactly 1 per message, within an epoch.
//! - Appending to history and handing to subscribers happen as one step per channel:
//!   subscribers receive a channel's messages in offset order, and a message a
//!   subscriber receives is already in history (so a reconnect can always fill a gap
//!   up to the last message it saw).
//! - A channel's epoch changes only when its offsets restart (its state was lost or
//!   evicted); a client holding an old epoch must reload instead of resuming.
//! - `publish` returning `Ok` means the message is in history (when history is on) and
//!   handed to delivery: it is not lost if no one is connected.

pub mod memory;
pub mod redis;

use async_trait::async_trait;

use std::sync::Arc;

use crate::channel::{Channel, Draft, Message};
use crate::metrics::Metrics;

/// Where a channel stands: its epoch and the offset of its last message (0 if none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// The result of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub offset: u64,
    pub epoch: String,
}

/// Messages of a channel after some offset.
#[derive(Debug, Clone)]
pub struct History {
    pub position: Position,
    /// Oldest first, every offset greater than the requested one that is still kept
    /// (up to the requested limit).
    pub messages: Vec<Message>,
    /// False when some message after the requested offset has already left history,
    /// so the caller cannot rebuild the sequence without a gap.
    pub complete: bool,
}

/// A snapshot of a broker's history memory use and evictions (the memory broker's;
/// Redis keeps its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    pub channels: usize,
    pub history_bytes: usize,
    pub history_max_bytes: usize,
    pub history_evictions: u64,
    pub idle_evictions: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Nothing was done: the broker was not reachable, or refused the command.
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
    /// The command was sent but its answer did not come (a timeout, a connection lost
    /// while waiting): it may have taken effect. For a publish, `id` is the id the
    /// message has if it was stored.
    #[error("the broker did not confirm in time: {reason}")]
    OutcomeUnknown { reason: String, id: Option<String> },
}

impl From<crate::redis::ClientError> for BrokerError {
    fn from(err: crate::redis::ClientError) -> Self {
        Self::Unavailable(err.0)
    }
}

impl BrokerError {
    /// Names the message a publish that ended with [`BrokerError::OutcomeUnknown`] was
    /// sending, so a retry can look for it in history.
    pub fn for_message(self, message_id: &str) -> Self {
        match self {
            Self::OutcomeUnknown { reason, id: None } => Self::OutcomeUnknown {
                reason,
                id: Some(message_id.to_owned()),
            },
            other => other,
        }
    }

    /// Whether the failed command may still have taken effect.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Self::OutcomeUnknown { .. })
    }
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Sequences `draft` in `channel`, appends it to history and hands it to every
    /// subscriber on every node.
    async fn publish(&self, channel: &Channel, draft: &Draft) -> Result<Published, BrokerError>;

    /// The channel's messages with an offset greater than `since`, oldest first, at most
    /// `limit` of them.
    async fn history(&self, channel: &Channel, since: u64, limit: usize) -> Result<History, BrokerError>;

    /// The channel's epoch and last offset. Creates the channel's epoch if it has none
    /// yet, so the epoch a client is told stays valid for the messages that follow.
    async fn position(&self, channel: &Channel) -> Result<Position, BrokerError>;

    /// Called when the first socket on this node subscribes to `channel`.
    async fn subscribe(&self, channel: &Channel) -> Result<(), BrokerError>;

    /// Called when the last socket on this node leaves `channel`.
    async fn unsubscribe(&self, channel: &Channel);

    /// Whether the broker can take publishes now.
    async fn ready(&self) -> bool;

    /// History memory use and evictions on this node, for stats and metrics.
    fn memory_stats(&self) -> Option<MemoryStats> {
        None
    }

    /// Reconnections to the backing service since start (0 for the memory broker).
    fn reconnects(&self) -> u64 {
        0
    }
}

/// The one publish path (HTTP API, LLM workers, bridges): the broker, counted.
#[derive(Clone)]
pub struct Publisher {
    broker: Arc<dyn Broker>,
    metrics: Metrics,
}

impl Publisher {
    pub fn new(broker: Arc<dyn Broker>, metrics: Metrics) -> Self {
        Self { broker, metrics }
    }

    pub async fn publish(&self, channel: &Channel, draft: &Draft) -> Result<Published, BrokerError> {
        let published = self.broker.publish(channel, draft).await?;
        self.metrics.published(channel.kind());
        Ok(published)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
