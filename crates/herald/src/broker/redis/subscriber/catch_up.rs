//! Bringing a channel's sockets up to date with Redis after the node may have missed
//! messages, and replacing an epoch whose offsets Redis handed out again.

use super::*;

/// How long a batch of channels whose scripts failed (or a lone reset) waits before its
/// second try.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// How long the second try waits for the command connection to come back: the longest
/// reconnect backoff (`redis::build_client`).
const RETRY_CONNECT_WAIT: Duration = Duration::from_secs(2);

impl Subscriber {
    /// Runs a script on the command connection (on a Cluster, its slot's primary).
    pub(super) async fn script(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, BrokerError> {
        run_script(&self.commands, self.shards.as_deref(), script, keys, args).await
    }

    /// Waits before a second try: [`RETRY_PAUSE`], then on one Redis up to
    /// [`RETRY_CONNECT_WAIT`] for the command connection. On a Cluster it does not wait
    /// for the whole-cluster client: each primary has its own connection ([`Shards`]),
    /// and one failing must not hold the others.
    async fn pause_for_connection(&self) {
        tokio::time::sleep(RETRY_PAUSE).await;
        if self.shards.is_none() {
            let _ = tokio::time::timeout(RETRY_CONNECT_WAIT, self.commands.wait_for_connect()).await;
        }
    }

    /// Runs `attempt` on every item, [`CATCH_UP_CONCURRENCY`] at a time, then once more
    /// on the items whose attempt failed, together, after one
    /// [`Subscriber::pause_for_connection`]; returns those that failed twice. A
    /// failover or restart drops the command connection with the subscription, so the
    /// first commands after the resubscribe often fail while it reconnects; without a
    /// second try every channel's sockets were closed (1001) where they could have been
    /// told in band. One pause for the whole batch, not one per channel, bounds how
    /// long a catch-up holds `changing` (and so every subscribe) however many channels
    /// fail: about one pause and two rounds of commands. An attempt may run twice: a
    /// channel read can be repeated, and [`RESET_SCRIPT`] leaves an epoch that is
    /// already gone alone, so a second run finds what the first one did (a check of an
    /// acknowledged position whose reset ran but lost its reply then finds the new
    /// epoch and leaves the old position to expire, which no comparison uses).
    async fn twice<T, F, Fut>(&self, items: Vec<T>, attempt: F) -> Vec<(T, BrokerError)>
    where
        F: Fn(T) -> Fut,
        Fut: std::future::Future<Output = (T, Result<(), BrokerError>)>,
    {
        let failed = each(items, &attempt).await;
        let Some((_, first)) = failed.first() else {
            return failed;
        };
        tracing::debug!(failed = failed.len(), error = %first, "channels could not be checked against Redis: trying them once more once Redis is connected");
        self.pause_for_connection().await;
        each(failed.into_iter().map(|(item, _)| item).collect(), &attempt).await
    }

    /// Brings this node's sockets of `channels` up to date with Redis after the node
    /// may have missed messages (a reconnect, a resubscribe, a lagging receiver).
    /// Messages published meanwhile are delivered from history (sessions skip what they
    /// have); a new epoch is announced with an epoch marker after its messages; an
    /// epoch whose offset went back (lost writes) is replaced. A channel whose state
    /// cannot be read is closed with 1001: its clients resume and are told what they
    /// missed, never left waiting for a message that will not come.
    pub(super) async fn catch_up(self: &Arc<Self>, channels: Vec<String>) {
        if channels.is_empty() {
            return;
        }
        let _ = tokio::time::timeout(FIRST_CONNECT_WAIT, self.commands.wait_for_connect()).await;
        let failed = self
            .twice(channels, |channel| async move {
                let result = self.catch_up_one(&channel).await;
                (channel, result)
            })
            .await;
        for (channel, err) in failed {
            let closed = self.lost_position(&channel);
            tracing::warn!(channel, closed, error = %err, "could not catch up with Redis: closing the channel's sockets (1001)");
        }
    }

    pub(super) async fn catch_up_one(self: &Arc<Self>, channel: &str) -> Result<(), BrokerError> {
        let (position, _) = self.read_channel(channel, false).await?;
        let decision = {
            let mut channels = lock(&self.channels);
            let Some(listening) = channels.get_mut(channel) else {
                return Ok(());
            };
            match &listening.seen {
                Some((known, max)) if **known == *position.epoch && position.offset < *max => {
                    CatchUp::Reset(known.clone(), *max)
                }
                _ => {
                    let from = match &listening.stream {
                        Some((known, max)) if **known == *position.epoch => *max,
                        _ => 0,
                    };
                    CatchUp::Deliver(listening.note(&position.epoch, position.offset), from)
                }
            }
        };
        let (epoch, from) = match decision {
            CatchUp::Deliver(epoch, from) => (epoch, from),
            CatchUp::Reset(known, max) => {
                tracing::warn!(
                    channel,
                    seen = max,
                    now = position.offset,
                    "channel offset went back in Redis (lost writes): starting a new epoch"
                );
                // Once: a failure is tried again with the catch-up's batch.
                return self.reset_once(channel, known).await;
            }
        };
        // History is read only when something was missed (most channels after a short
        // blip have nothing to send), and only kept if the epoch did not move meanwhile.
        let entries = if position.offset > from {
            let (again, entries) = self.read_channel(channel, true).await?;
            if again.epoch == position.epoch {
                entries
            } else {
                Vec::new()
            }
        } else {
            Vec::new()
        };
        let now = Instant::now();
        for entry in &entries {
            let Some((offset, rest)) = value_bytes(entry).and_then(split_number) else {
                continue;
            };
            let Some((_, bytes)) = split_number(rest) else {
                continue;
            };
            if offset > from && offset <= position.offset {
                self.hub.deliver(
                    channel,
                    &Message {
                        offset,
                        epoch: epoch.clone(),
                        bytes: Bytes::copy_from_slice(bytes),
                        published_at: now,
                    },
                );
            }
        }
        self.hub
            .deliver(channel, &Message::epoch_marker(epoch, position.offset));
        Ok(())
    }

    /// The channel's position, with its history entries when `with_history`.
    pub(super) async fn read_channel(
        &self,
        channel: &str,
        with_history: bool,
    ) -> Result<(Position, Vec<Value>), BrokerError> {
        let reply = self
            .script(
                &self.read_script,
                vec![meta_key(channel), history_key(channel)],
                vec![
                    Value::from(new_id()),
                    Value::from(self.meta_ttl_ms.to_string()),
                    Value::from(if with_history { "1" } else { "0" }),
                ],
            )
            .await?;
        parse_read(reply)
    }

    /// Runs [`RESET_SCRIPT`]: `channel` leaves epoch `stale` unless it already has,
    /// and every node listening to it is told (an epoch marker on pub/sub). Returns the
    /// channel's position after it.
    async fn run_reset(&self, channel: &str, stale: &str) -> Result<Position, BrokerError> {
        self.script(
            &Script::from_lua(RESET_SCRIPT),
            vec![meta_key(channel), history_key(channel), pubsub_channel(channel)],
            vec![
                Value::from(stale),
                Value::from(new_id()),
                Value::from(self.meta_ttl_ms.to_string()),
                Value::from(self.fanout.publish_command()),
            ],
        )
        .await
        .and_then(parse_position)
    }

    /// Compares positions this node was acknowledged in channels it does not listen to
    /// with Redis, and starts a new epoch where Redis went back (a failover or restart
    /// lost those writes). A channel that cannot be read now is checked again later.
    pub(super) async fn verify_acked(self: &Arc<Self>, channels: Vec<(ToVerify, Option<Server>)>) {
        if channels.is_empty() {
            return;
        }
        let failed = self
            .twice(channels, |verify| async move {
                let ((channel, epoch, offset), _) = &verify;
                let verified = self.verify_one(channel, epoch, *offset).await;
                (verify, verified)
            })
            .await;
        for (((channel, _, _), before), err) in failed {
            tracing::debug!(channel, error = %err, "could not compare an acknowledged position with Redis: trying again later");
            self.acked.unverified(&channel, before);
        }
    }

    async fn verify_one(
        self: &Arc<Self>,
        channel: &str,
        epoch: &str,
        offset: u64,
    ) -> Result<(), BrokerError> {
        if lock(&self.channels).contains_key(channel) {
            // Listened to since: its own catch-up compares.
            return Ok(());
        }
        let (position, _) = self.read_channel(channel, false).await?;
        if *position.epoch != *epoch || position.offset >= offset {
            return Ok(());
        }
        tracing::warn!(
            channel,
            acknowledged = offset,
            now = position.offset,
            "channel offset went back in Redis (lost writes): starting a new epoch"
        );
        let position = self.run_reset(channel, epoch).await?;
        self.note(channel, &position.epoch, position.offset);
        Ok(())
    }

    /// Replaces `channel`'s epoch `stale`, whose offsets Redis handed out again, and
    /// tells the channel's sessions (an epoch marker). Run alone (a reused offset seen
    /// on pub/sub), so it makes its own second try; if that fails too, the channel's
    /// sockets are closed (1001) and resume.
    pub(super) async fn reset(self: &Arc<Self>, channel: &str, stale: Arc<str>) {
        let result = match self.reset_once(channel, stale.clone()).await {
            Ok(()) => Ok(()),
            Err(err) => {
                tracing::debug!(channel, error = %err, "could not start a new epoch: trying once more once Redis is connected");
                self.pause_for_connection().await;
                self.reset_once(channel, stale).await
            }
        };
        if let Err(err) = result {
            let closed = self.lost_position(channel);
            tracing::warn!(
                channel,
                closed,
                error = %err,
                "could not start a new epoch: closing the channel's sockets (1001)"
            );
        }
    }

    /// Closes `channel`'s sockets on this node (1001) when its position in Redis cannot
    /// be known: its clients resume with `since` and are told what they missed.
    /// Returns how many were closed.
    fn lost_position(&self, channel: &str) -> usize {
        let lost = Close::new(CloseCode::GoingAway, "lost position; resume with since");
        self.hub.disconnect_channel(channel, &lost)
    }

    /// One try at [`Subscriber::reset`]; a failure is left to the caller, a catch-up
    /// tries it again with the rest of its batch. Nothing to do when this node no
    /// longer listens to `channel` or a reset of it is already running.
    async fn reset_once(self: &Arc<Self>, channel: &str, stale: Arc<str>) -> Result<(), BrokerError> {
        {
            let mut channels = lock(&self.channels);
            let Some(listening) = channels.get_mut(channel) else {
                return Ok(());
            };
            if listening.resetting {
                return Ok(());
            }
            listening.resetting = true;
        }
        let result = self.run_reset(channel, &stale).await;
        let marker = {
            let mut channels = lock(&self.channels);
            let Some(listening) = channels.get_mut(channel) else {
                return Ok(());
            };
            listening.resetting = false;
            let position = result?;
            listening.retire(&stale);
            let epoch = listening.note(&position.epoch, position.offset);
            Message::epoch_marker(epoch, position.offset)
        };
        tracing::warn!(
            channel,
            epoch = &*marker.epoch,
            "channel moved to a new epoch after lost writes"
        );
        self.hub.deliver(channel, &marker);
        Ok(())
    }
}

/// Runs `attempt` on every item, [`CATCH_UP_CONCURRENCY`] at a time; returns the items
/// whose attempt failed, with the error.
async fn each<T, F, Fut>(items: Vec<T>, attempt: &F) -> Vec<(T, BrokerError)>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = (T, Result<(), BrokerError>)>,
{
    futures_util::stream::iter(items)
        .map(attempt)
        .buffer_unordered(CATCH_UP_CONCURRENCY)
        .filter_map(|(item, result)| std::future::ready(result.err().map(|err| (item, err))))
        .collect()
        .await
}
