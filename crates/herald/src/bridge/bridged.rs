//! `BridgedBroker`: the broker with the bridge's hooks on subscribe and unsubscribe.

use std::sync::Arc;

use async_trait::async_trait;

use crate::bridge::Bridge;
use crate::broker::{Broker, BrokerError, History, MemoryStats, Position, Published};
use crate::channel::{Channel, Draft};

/// The broker with the bridge's hooks: the first socket of a channel on this node joins
/// the channel's groups before its welcome is sent, the last one starts the countdown to
/// leaving them. Everything else goes to the inner broker unchanged.
pub struct BridgedBroker {
    inner: Arc<dyn Broker>,
    bridge: Arc<Bridge>,
}

impl BridgedBroker {
    pub fn new(inner: Arc<dyn Broker>, bridge: Arc<Bridge>) -> Self {
        Self { inner, bridge }
    }
}

#[async_trait]
impl Broker for BridgedBroker {
    async fn publish(&self, channel: &Channel, draft: &Draft) -> Result<Published, BrokerError> {
        self.inner.publish(channel, draft).await
    }

    async fn history(&self, channel: &Channel, since: u64, limit: usize) -> Result<History, BrokerError> {
        self.inner.history(channel, since, limit).await
    }

    async fn position(&self, channel: &Channel) -> Result<Position, BrokerError> {
        self.inner.position(channel).await
    }

    async fn subscribe(&self, channel: &Channel) -> Result<(), BrokerError> {
        let subscribed = self.inner.subscribe(channel).await;
        self.bridge.activate(channel).await;
        subscribed
    }

    async fn unsubscribe(&self, channel: &Channel) {
        self.inner.unsubscribe(channel).await;
        self.bridge.deactivate(channel);
    }

    async fn ready(&self) -> bool {
        self.inner.ready().await
    }

    fn memory_stats(&self) -> Option<MemoryStats> {
        self.inner.memory_stats()
    }

    fn reconnects(&self) -> u64 {
        self.inner.reconnects()
    }
}
