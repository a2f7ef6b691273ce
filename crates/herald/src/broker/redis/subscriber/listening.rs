//! What the subscriber knows of each channel, and how it judges what arrives.

use std::sync::Arc;

use fred::types::config::Server;

/// What the subscriber knows of one channel it listens to.
#[derive(Clone, Debug, Default)]
pub(super) struct Listening {
    /// The newest epoch this node knows for the channel, and the highest offset it has
    /// seen in it from any source (its own publishes and reads, pub/sub). Redis never
    /// moves an offset back within an epoch, so finding Redis below it later means Redis
    /// lost acknowledged writes (a failover).
    pub(super) seen: Option<(Arc<str>, u64)>,
    /// The epoch and offset of the last message received on the pub/sub connection.
    /// Within one epoch these only grow: a message at or below it reuses an offset.
    pub(super) stream: Option<(Arc<str>, u64)>,
    /// Epochs this channel has left, newest last (a few): their late messages are
    /// dropped instead of being taken for a new epoch.
    pub(super) retired: Vec<Arc<str>>,
    /// A reset of the epoch is under way (one at a time per channel).
    pub(super) resetting: bool,
    /// On a Cluster, the primary that owned the channel's slot when this node last
    /// subscribed to it; `None` until a subscription succeeded.
    pub(super) shard: Option<Server>,
}

/// What catching up does with one channel.
pub(super) enum CatchUp {
    /// Deliver history after this offset, in this epoch.
    Deliver(Arc<str>, u64),
    /// Redis is below the highest offset seen in this epoch: replace it.
    Reset(Arc<str>, u64),
}

/// How many left epochs a channel remembers.
pub(super) const RETIRED_EPOCHS: usize = 4;

/// What the subscriber does with one pub/sub message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Deliver,
    /// A late message of an epoch the channel has left.
    Stale,
    /// An offset at or below one already received in the same epoch: Redis lost
    /// writes and handed the offset out again. The epoch must be replaced.
    Reused,
}

impl Listening {
    pub(super) fn retire(&mut self, epoch: &Arc<str>) {
        if !self.retired.iter().any(|e| e == epoch) {
            if self.retired.len() == RETIRED_EPOCHS {
                self.retired.remove(0);
            }
            self.retired.push(epoch.clone());
        }
    }

    /// Records `offset` in `epoch` as seen by this node; a different epoch replaces the
    /// old one, which is retired. Returns the interned epoch.
    pub(super) fn note(&mut self, epoch: &str, offset: u64) -> Arc<str> {
        match &mut self.seen {
            Some((known, max)) if **known == *epoch => {
                *max = (*max).max(offset);
                known.clone()
            }
            _ => {
                let epoch: Arc<str> = Arc::from(epoch);
                if let Some((old, _)) = self.seen.take() {
                    self.retire(&old);
                }
                self.seen = Some((epoch.clone(), offset));
                epoch
            }
        }
    }

    /// Judges a pub/sub message, and records it when it is delivered.
    pub(super) fn judge(&mut self, epoch: &str, offset: u64) -> (Verdict, Arc<str>) {
        if let Some(retired) = self.retired.iter().find(|e| ***e == *epoch) {
            return (Verdict::Stale, retired.clone());
        }
        if let Some((known, max)) = &self.stream {
            if **known == *epoch && offset <= *max {
                // Nothing more of this epoch can be trusted: its later messages may
                // follow reused ones. They are dropped until the new epoch is told.
                let known = known.clone();
                self.retire(&known);
                return (Verdict::Reused, known);
            }
        }
        let interned = self.note(epoch, offset);
        self.stream = Some((interned.clone(), offset));
        (Verdict::Deliver, interned)
    }
}
