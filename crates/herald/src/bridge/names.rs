//! The Redis names this node uses in the channels_redis keyspace: its member name in a
//! group, its queue and in-flight backup, and the reader lease.

use crate::bridge::wire;
use crate::config::django::BridgeOptions;

/// The Redis names this node uses.
#[derive(Debug, Clone)]
pub(super) struct Names {
    /// channels_redis's `prefix`.
    pub(super) prefix: String,
    /// This node's member names start with this (`herald!` or `herald.{node}!`).
    pub(super) non_local: String,
    /// Short random id of this process.
    pub(super) node: String,
    pub(super) queue: String,
    pub(super) inflight: String,
    pub(super) lease: String,
}

impl Names {
    pub(super) fn new(options: &BridgeOptions, shared: bool) -> Self {
        let node: String = crate::channel::new_id().chars().take(8).collect();
        let non_local = if shared {
            format!("{}!", options.channel)
        } else {
            format!("{}.{node}!", options.channel)
        };
        let queue = wire::queue_key(&options.prefix, &non_local);
        Self {
            prefix: options.prefix.clone(),
            inflight: wire::inflight_key(&queue),
            lease: format!("{queue}$reader"),
            queue,
            non_local,
            node,
        }
    }

    /// This node's channel name in `group`.
    pub(super) fn member(&self, group: &str) -> String {
        format!("{}{}.{group}", self.non_local, self.node)
    }

    /// The group named in one of our channel names (any node's).
    pub(super) fn group_of<'m>(&self, member: &'m str) -> Option<&'m str> {
        let local = member.strip_prefix(&self.non_local)?;
        let (_node, group) = local.split_once('.')?;
        (!group.is_empty()).then_some(group)
    }
}
