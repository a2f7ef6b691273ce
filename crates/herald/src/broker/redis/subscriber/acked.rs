//! Positions Redis handed this node in channels it does not listen to (its own
//! publishes and reads), so that writes a failover loses are noticed even where no
//! socket follows the channel.
//!
//! Redis never moves a channel's offset back within an epoch; finding it below an
//! offset it acknowledged means it lost writes. A listened channel keeps that knowledge
//! in its [`Listening`](super::listening::Listening); every other channel this node
//! published to keeps it here for [`KEEP_FOR`], bounded by [`MOST`]. It is checked in
//! two places: by the publish script (a publish that finds the offset below what the
//! node knows starts a new epoch instead of handing the offsets out again), and after
//! the channel's slot changed primary or Redis was reconnected (the channel may not be
//! published to again, and its lost writes must still be told).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::types::cluster::ClusterRouting;
use fred::types::config::Server;
use tokio::time::Instant;

use super::cluster::shard_in;
use super::lock;

/// How long a publish is remembered: longer than a Cluster takes to promote a replica
/// with its default `cluster-node-timeout` (15 s), plus slot checks.
pub(super) const KEEP_FOR: Duration = Duration::from_secs(120);

/// At most this many channels are remembered; beyond it, the oldest are forgotten.
pub(super) const MOST: usize = 100_000;

/// What this node knows of one channel it does not listen to.
#[derive(Clone, Debug)]
pub(super) struct Acked {
    /// The epoch Redis answered, and the highest offset in it.
    pub(super) epoch: Arc<str>,
    pub(super) offset: u64,
    /// When it was last noted.
    at: Instant,
    /// On a Cluster, the primary that owned the channel's slot when it was last checked
    /// (or first noted); a different owner in the slot map means a failover or a move,
    /// after which Redis must be asked again.
    owner: Option<Server>,
}

/// The remembered positions.
#[derive(Default)]
pub(super) struct AckedPositions {
    map: Mutex<HashMap<String, Acked>>,
}

/// A channel to compare with Redis: its name, and the epoch and offset acknowledged.
pub(super) type ToVerify = (String, Arc<str>, u64);

impl AckedPositions {
    /// Records `offset` in `epoch`; `owner` is asked only for a channel not known yet.
    pub(super) fn note(
        &self,
        channel: &str,
        epoch: &str,
        offset: u64,
        owner: impl FnOnce() -> Option<Server>,
    ) {
        let now = Instant::now();
        let mut map = lock(&self.map);
        if let Some(acked) = map.get_mut(channel) {
            if *acked.epoch == *epoch {
                acked.offset = acked.offset.max(offset);
            } else {
                acked.epoch = Arc::from(epoch);
                acked.offset = offset;
            }
            acked.at = now;
            return;
        }
        if map.len() >= MOST {
            forget_old(&mut map, now);
        }
        map.insert(
            channel.to_owned(),
            Acked {
                epoch: Arc::from(epoch),
                offset,
                at: now,
                owner: owner(),
            },
        );
    }

    /// The epoch and highest offset known for `channel`.
    pub(super) fn known(&self, channel: &str) -> Option<(Arc<str>, u64)> {
        lock(&self.map)
            .get(channel)
            .map(|acked| (acked.epoch.clone(), acked.offset))
    }

    /// Takes `channel`'s record out (the node now listens to it, and keeps it there).
    pub(super) fn take(&self, channel: &str) -> Option<Acked> {
        lock(&self.map).remove(channel)
    }

    /// Forgets what is older than [`KEEP_FOR`], and returns the channels whose slot has
    /// another owner in `routing` than when they were last checked. Their owner is
    /// updated: [`AckedPositions::unverified`] puts it back when the check fails.
    pub(super) fn moved(&self, routing: &ClusterRouting) -> Vec<(ToVerify, Option<Server>)> {
        let mut map = lock(&self.map);
        forget_expired(&mut map, Instant::now());
        let mut moved = Vec::new();
        for (channel, acked) in map.iter_mut() {
            let owner = shard_in(routing, channel);
            if owner.is_some() && owner != acked.owner {
                let before = std::mem::replace(&mut acked.owner, owner);
                moved.push(((channel.clone(), acked.epoch.clone(), acked.offset), before));
            }
        }
        moved
    }

    /// Every channel remembered, or on a Cluster those whose slot `server` owned: after
    /// the connection to that Redis was made again (it may have restarted from an older
    /// copy of its data).
    pub(super) fn of_server(&self, server: Option<&Server>) -> Vec<ToVerify> {
        let mut map = lock(&self.map);
        forget_expired(&mut map, Instant::now());
        map.iter()
            .filter(|(_, acked)| server.is_none() || acked.owner.as_ref() == server)
            .map(|(channel, acked)| (channel.clone(), acked.epoch.clone(), acked.offset))
            .collect()
    }

    /// Sets `channel`'s owner back to `before` (its check could not be made), so the
    /// next slot check tries again.
    pub(super) fn unverified(&self, channel: &str, before: Option<Server>) {
        if let Some(acked) = lock(&self.map).get_mut(channel) {
            acked.owner = before;
        }
    }

    /// Whether a channel whose slot `server` owns is remembered.
    pub(super) fn any_on(&self, server: &Server) -> bool {
        lock(&self.map)
            .values()
            .any(|acked| acked.owner.as_ref() == Some(server))
    }
}

/// Forgets what was noted longer than [`KEEP_FOR`] ago.
fn forget_expired(map: &mut HashMap<String, Acked>, now: Instant) {
    map.retain(|_, acked| now.duration_since(acked.at) < KEEP_FOR);
}

/// Makes room: forgets what is older than [`KEEP_FOR`], then the oldest tenth.
fn forget_old(map: &mut HashMap<String, Acked>, now: Instant) {
    forget_expired(map, now);
    if map.len() < MOST {
        return;
    }
    let mut ages: Vec<Instant> = map.values().map(|acked| acked.at).collect();
    let tenth = ages.len() / 10;
    let (_, cut, _) = ages.select_nth_unstable(tenth);
    let cut = *cut;
    tracing::debug!(
        remembered = map.len(),
        "too many channels published to: forgetting the oldest positions"
    );
    map.retain(|_, acked| acked.at > cut);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing_to(port: u16) -> ClusterRouting {
        use fred::types::Value;
        let slots = Value::Array(vec![Value::Array(vec![
            Value::Integer(0),
            Value::Integer(16383),
            Value::Array(vec![
                Value::from("127.0.0.1"),
                Value::Integer(i64::from(port)),
                Value::from(format!("id-{port}")),
            ]),
        ])]);
        match ClusterRouting::from_cluster_slots(slots, "127.0.0.1") {
            Ok(routing) => routing,
            Err(err) => panic!("slot map: {err}"),
        }
    }

    #[test]
    fn an_offset_only_grows_within_an_epoch_and_a_new_epoch_replaces_it() {
        let acked = AckedPositions::default();
        acked.note("c", "e1", 5, || None);
        acked.note("c", "e1", 3, || None);
        assert_eq!(acked.known("c"), Some((Arc::from("e1"), 5)));
        acked.note("c", "e2", 1, || None);
        assert_eq!(acked.known("c"), Some((Arc::from("e2"), 1)));
        assert!(acked.take("c").is_some());
        assert_eq!(acked.known("c"), None);
    }

    #[test]
    fn a_channel_whose_slot_changed_owner_is_returned_once_and_again_after_a_failed_check() {
        let acked = AckedPositions::default();
        let a = routing_to(7000);
        let b = routing_to(7001);
        acked.note("c", "e1", 5, || shard_in(&a, "c"));
        assert!(acked.moved(&a).is_empty(), "same owner: nothing to check");
        let moved = acked.moved(&b);
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].0, ("c".to_owned(), Arc::from("e1"), 5));
        assert!(acked.moved(&b).is_empty(), "checked once");
        acked.unverified("c", moved[0].1.clone());
        assert_eq!(acked.moved(&b).len(), 1, "a failed check is made again");
        assert!(acked.any_on(&Server::new("127.0.0.1", 7001)));
        assert_eq!(acked.of_server(Some(&Server::new("127.0.0.1", 7001))).len(), 1);
        assert!(acked.of_server(Some(&Server::new("127.0.0.1", 7000))).is_empty());
        assert_eq!(acked.of_server(None).len(), 1);
    }

    #[test]
    fn it_forgets_the_oldest_when_full() {
        let acked = AckedPositions::default();
        for n in 0..MOST {
            acked.note(&format!("c{n}"), "e", 1, || None);
        }
        acked.note("one more", "e", 1, || None);
        let remembered = lock(&acked.map).len();
        assert!(remembered < MOST, "{remembered}");
        assert!(acked.known("one more").is_some());
    }
}
