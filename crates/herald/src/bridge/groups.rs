//! Group membership (core layer): while a channel has sockets on this node, the node's
//! member is in every group that maps to the channel; it leaves `leave_after` after
//! the last socket left.

use std::sync::atomic::Ordering;

use fred::prelude::Value;
use tokio::time::Instant;

use crate::bridge::commands::{unix_now, CommandError};
use crate::bridge::{wire, Bridge};
use crate::channel::Channel;
use crate::sync::lock;

/// Groups joined per script call when refreshing.
const JOIN_BATCH: usize = 500;

/// A channel with sockets on this node (or that had them less than `leave_after` ago).
pub(super) struct Joined {
    pub(super) groups: Vec<String>,
    /// When the last socket left; `None` while sockets are open.
    pub(super) idle_since: Option<Instant>,
}

impl Bridge {
    /// A channel got its first socket on this node: join its groups now.
    pub(super) async fn activate(&self, channel: &Channel) {
        if !self.options.layers.core() {
            return;
        }
        let groups = {
            let mut joined = lock(&self.joined);
            match joined.get_mut(channel) {
                Some(entry) => {
                    // Still in its groups from before (within leave_after).
                    entry.idle_since = None;
                    return;
                }
                None => {
                    let groups = self.options.rules.groups_for(channel);
                    joined.insert(
                        channel.clone(),
                        Joined {
                            groups: groups.clone(),
                            idle_since: None,
                        },
                    );
                    groups
                }
            }
        };
        self.update_groups_gauge();
        if let Err(err) = self.join(&groups).await {
            self.rejoin.store(true, Ordering::Relaxed);
            tracing::warn!(%channel, error = %err, "django bridge: joining groups failed; retrying");
        }
    }

    /// The last socket of a channel left this node: leave its groups after
    /// `leave_after`, unless a socket comes back first.
    pub(super) fn deactivate(&self, channel: &Channel) {
        if let Some(entry) = lock(&self.joined).get_mut(channel) {
            entry.idle_since = Some(Instant::now());
        }
    }

    pub(super) fn update_groups_gauge(&self) {
        let groups: usize = lock(&self.joined).values().map(|entry| entry.groups.len()).sum();
        self.metrics
            .set_bridge_groups(i64::try_from(groups).unwrap_or(i64::MAX));
    }

    pub(super) async fn join(&self, groups: &[String]) -> Result<(), CommandError> {
        self.set_membership(groups, true).await
    }

    pub(super) async fn leave(&self, groups: &[String]) -> Result<(), CommandError> {
        self.set_membership(groups, false).await
    }

    /// Adds (`join`) or removes this node's member in each of `groups`, in batches.
    pub(super) async fn set_membership(&self, groups: &[String], join: bool) -> Result<(), CommandError> {
        for batch in groups.chunks(JOIN_BATCH) {
            let keys: Vec<String> = batch
                .iter()
                .map(|g| wire::group_key(&self.names.prefix, g))
                .collect();
            let members = batch.iter().map(|g| Value::from(self.names.member(g)));
            let (script, args, what) = if join {
                let mut args: Vec<Value> = vec![
                    Value::from(format!("{:.6}", unix_now().as_secs_f64())),
                    Value::from(self.options.group_expiry.as_secs().to_string()),
                ];
                args.extend(members);
                (&self.scripts.join, args, "joining groups")
            } else {
                (&self.scripts.leave, members.collect(), "leaving groups")
            };
            self.eval(script, keys, args, what).await?;
        }
        Ok(())
    }

    /// Every group of every channel this node is in.
    pub(super) fn all_groups(&self) -> Vec<String> {
        lock(&self.joined)
            .values()
            .flat_map(|entry| entry.groups.iter().cloned())
            .collect()
    }

    /// Leaves the groups of channels idle for `leave_after` with no socket back.
    pub(super) async fn leave_idle(&self) {
        let now = Instant::now();
        let leaving: Vec<(Channel, Vec<String>)> = {
            let mut joined = lock(&self.joined);
            let idle: Vec<Channel> = joined
                .iter()
                .filter(|(channel, entry)| {
                    entry
                        .idle_since
                        .is_some_and(|since| now.duration_since(since) >= self.leave_after)
                        && !self.hub.has_subscribers(channel.name())
                })
                .map(|(channel, _)| channel.clone())
                .collect();
            idle.into_iter()
                .filter_map(|channel| joined.remove(&channel).map(|entry| (channel, entry.groups)))
                .collect()
        };
        if leaving.is_empty() {
            return;
        }
        self.update_groups_gauge();
        let groups: Vec<String> = leaving.into_iter().flat_map(|(_, groups)| groups).collect();
        if let Err(err) = self.leave(&groups).await {
            // Our stale members only make Django list one more name in the messages it
            // still sends to the shared queue, until group_expiry drops them.
            tracing::debug!(error = %err, "django bridge: leaving groups failed");
        }
    }
}
