//! Bringing one channel of a socket up to date: the replay on resume, gap fills, and
//! telling the client about a new epoch.

use super::*;

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Resumes channel `idx` after its welcome or `subscribed`, which told the client
    /// `position`: the messages after `resume.since` from history, then the
    /// `recovered` message (`recovered:false`, nothing replayed, when the epoch changed
    /// or the gap left history).
    pub(super) async fn replay(
        &mut self,
        idx: usize,
        resume: &Resume,
        position: &Position,
    ) -> Result<(), Exit> {
        let epoch_matches = resume.epoch.as_deref().is_none_or(|e| e == position.epoch);
        let mut missed = 0;
        let mut recovered = false;
        if epoch_matches && resume.since <= position.offset {
            let history = self
                .state
                .broker
                .history(&self.cursors[idx].channel, resume.since, usize::MAX)
                .await
                .map_err(|_| Exit::Close(Close::new(CloseCode::GoingAway, "broker unavailable")))?;
            if let Some(close) = self.outbox.close_requested() {
                return Err(Exit::Close(close));
            }
            if history.complete && history.position.epoch == position.epoch {
                recovered = true;
                for message in history.messages {
                    let cursor = &mut self.cursors[idx];
                    cursor.last_offset = cursor.last_offset.max(message.offset);
                    missed += 1;
                    self.queue_text(message.bytes)?;
                }
            }
        }
        let cursor = &self.cursors[idx];
        self.state
            .metrics
            .delivered(cursor.channel.kind(), missed as u64, None);
        let text = protocol::recovered(
            cursor.channel.name(),
            recovered,
            missed,
            &position.epoch,
            cursor.last_offset,
        );
        self.queue_text(text)
    }

    /// A message of channel `idx` from an epoch other than the client's. If the channel
    /// has moved to it (Redis lost the channel's state, or a failover lost writes), the
    /// client is told in band, `recovered:false` with the new epoch and the offset after
    /// which it will receive every message, and the message is then forwarded; a late
    /// message of an epoch the channel has left is dropped. Returns whether to forward
    /// the message.
    ///
    /// Which epoch is current is asked of the broker, not inferred: a message queued
    /// before this socket's welcome may come from the epoch before it.
    pub(super) async fn switch_epoch(&mut self, idx: usize, message: &ChannelMessage) -> Result<bool, Exit> {
        if self.cursors[idx].retired.contains(&message.epoch) {
            return Ok(false);
        }
        let position = Box::pin(self.state.broker.position(&self.cursors[idx].channel))
            .await
            .map_err(|_| {
                Exit::Close(Close::new(
                    CloseCode::GoingAway,
                    "lost position; resume with since",
                ))
            })?;
        let cursor = &mut self.cursors[idx];
        if *position.epoch == *cursor.epoch {
            cursor.retire(message.epoch.clone());
            return Ok(false);
        }
        let (epoch, offset, forward) = if *position.epoch == *message.epoch {
            let offset = if message.is_marker() {
                message.offset.min(position.offset)
            } else {
                message.offset - 1
            };
            (message.epoch.clone(), offset, true)
        } else {
            // The channel moved on again: start from where it stands now.
            cursor.retire(message.epoch.clone());
            (Arc::from(position.epoch.as_str()), position.offset, false)
        };
        let old = std::mem::replace(&mut cursor.epoch, epoch);
        cursor.retire(old);
        cursor.last_offset = offset;
        tracing::info!(channel = %cursor.channel, offset, "channel epoch changed under a socket: told recovered:false");
        let text = protocol::recovered(cursor.channel.name(), false, 0, &cursor.epoch, offset);
        self.queue_text(text)?;
        Ok(forward)
    }

    /// Sends channel `idx`'s messages between the last one written and `next` from
    /// history. If they have left history, the client must resume (and will learn it
    /// lost messages).
    pub(super) async fn fill_gap(&mut self, idx: usize, next: u64) -> Result<(), Exit> {
        let lost = || {
            Exit::Close(Close::new(
                CloseCode::GoingAway,
                "lost position; resume with since",
            ))
        };
        let last_offset = self.cursors[idx].last_offset;
        let history = self
            .state
            .broker
            .history(
                &self.cursors[idx].channel,
                last_offset,
                (next - last_offset - 1) as usize,
            )
            .await
            .map_err(|_| lost())?;
        if !history.complete || *history.position.epoch != *self.cursors[idx].epoch {
            return Err(lost());
        }
        let mut n_sent = 0;
        for message in history.messages {
            let cursor = &mut self.cursors[idx];
            if message.offset < next && message.offset == cursor.last_offset + 1 {
                cursor.last_offset = message.offset;
                n_sent += 1;
                self.queue_text(message.bytes)?;
            }
        }
        let cursor = &self.cursors[idx];
        self.state.metrics.delivered(cursor.channel.kind(), n_sent, None);
        if cursor.last_offset + 1 == next {
            Ok(())
        } else {
            Err(lost())
        }
    }
}
