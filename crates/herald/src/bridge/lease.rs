//! The reader lease and the bridge's periodic work. With a shared broker one node at a
//! time (the holder of `{queue}$reader`) reads the shared queue and the pub/sub
//! patterns, so a message is published once and a group's messages stay in order.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{ClientLike, EventInterface, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bridge::Bridge;
use crate::redis::COMMAND_TIMEOUT;

/// The reader lease: held this long without renewal, renewed this often.
const LEASE_TTL: Duration = Duration::from_secs(10);
pub(super) const LEASE_RENEW: Duration = Duration::from_secs(2);

/// Re-adding members to their groups happens at least this often (and 4 times per
/// `group_expiry`), so herald stays in a group even if Django's `group_expiry` is
/// shorter than herald was told.
const MAX_REFRESH: Duration = Duration::from_secs(600);

/// How often the maintenance task runs (lease, leaving idle channels, refresh).
const TICK: Duration = Duration::from_millis(500);

impl Bridge {
    /// Takes or renews the lease (always held without a shared broker). Returns whether
    /// this node reads.
    pub(super) async fn renew_lease(&self) -> bool {
        if !self.shared {
            self.set_leader(true);
            return true;
        }
        let held = self
            .eval(
                &self.scripts.lease,
                vec![self.names.lease.clone()],
                vec![
                    Value::from(self.names.node.clone()),
                    Value::from(LEASE_TTL.as_millis().to_string()),
                ],
                "taking the reader lease",
            )
            .await;
        match held {
            Ok(value) => {
                let leader = value.as_i64() == Some(1);
                self.set_leader(leader);
                leader
            }
            Err(err) => {
                tracing::debug!(error = %err, "django bridge: lease renewal failed");
                false
            }
        }
    }

    pub(super) fn set_leader(&self, leader: bool) {
        let changed = self.leader.send_if_modified(|current| {
            let changed = *current != leader;
            *current = leader;
            changed
        });
        if changed {
            self.metrics.set_bridge_reading(leader);
            tracing::info!(node = %self.names.node, reading = leader, "django bridge reader changed");
        }
    }

    /// Periodic work: the lease, leaving idle channels, re-adding members before the
    /// group expiry and after a reconnect. On shutdown, leaves every group and gives the
    /// lease up.
    pub(super) async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let refresh = (self.options.group_expiry / 4).clamp(Duration::from_secs(1), MAX_REFRESH);
        let mut reconnects = self.commands.reconnect_rx();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh = Instant::now();
        let mut last_lease = Instant::now();
        let mut last_held = Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                reconnect = reconnects.recv() => match reconnect {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        tracing::info!("django bridge reconnected to Redis");
                        self.rejoin.store(true, Ordering::Relaxed);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick() => {}
            }
            if self.shared && last_lease.elapsed() >= LEASE_RENEW {
                last_lease = Instant::now();
                if self.renew_lease().await {
                    last_held = Instant::now();
                } else if last_held.elapsed() >= LEASE_TTL.saturating_sub(LEASE_RENEW) {
                    // Unrenewed, the lease is about to pass to another node.
                    self.set_leader(false);
                }
            }
            self.leave_idle().await;
            if self.rejoin.swap(false, Ordering::Relaxed) || last_refresh.elapsed() >= refresh {
                match self.join(&self.all_groups()).await {
                    Ok(()) => last_refresh = Instant::now(),
                    Err(err) => {
                        self.rejoin.store(true, Ordering::Relaxed);
                        tracing::debug!(error = %err, "django bridge: refreshing groups failed");
                    }
                }
            }
        }
        let groups = self.all_groups();
        if let Err(err) = self.leave(&groups).await {
            tracing::debug!(error = %err, "django bridge: leaving groups at shutdown failed");
        }
        if self.shared && *self.leader.borrow() {
            let _ = self
                .eval(
                    &self.scripts.release,
                    vec![self.names.lease.clone()],
                    vec![Value::from(self.names.node.clone())],
                    "giving the lease up",
                )
                .await;
        }
        self.set_leader(false);
        for client in [&self.commands, &self.reader, &self.subscriber] {
            let _ = tokio::time::timeout(COMMAND_TIMEOUT, client.quit()).await;
        }
    }
}
