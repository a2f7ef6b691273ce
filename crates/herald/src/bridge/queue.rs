//! The core layer's queue (`RedisChannelLayer`): the reader pops what `group_send` put
//! in this node's queue, keeps it in the in-flight backup until it is published, and
//! puts back what a previous reader left there, as channels_redis's receiver does.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{ClientLike, Value};
use fred::types::{ClusterHash, CustomCommand};
use tokio_util::sync::CancellationToken;

use crate::bridge::commands::{pairs, timed, unix_now, within, CommandError};
use crate::bridge::{wire, Bridge, Handled, Layer};
use crate::redis::COMMAND_TIMEOUT;

/// How long one `BZPOPMIN` blocks (channels_redis uses 5 s); short so that losing the
/// lease or shutting down is noticed quickly.
const BLOCK_SECS: f64 = 1.0;

/// Messages popped per `ZPOPMIN` when the queue has a backlog.
const POP_BATCH: usize = 64;

/// Backoff after a failure: from 100 ms, doubling, up to 2 s.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(BACKOFF_MIN, BACKOFF_MAX)
}

impl Bridge {
    /// Reads the queue while this node holds the lease: restores what a previous reader
    /// left in flight, then pops, publishes and acknowledges, in order.
    pub(super) async fn read_queue(self: Arc<Self>, stop: CancellationToken) {
        let mut leader = self.leader.subscribe();
        let mut backoff = BACKOFF_MIN;
        'outer: loop {
            // Wait to be the reader.
            while !*leader.borrow_and_update() {
                tokio::select! {
                    () = stop.cancelled() => break 'outer,
                    changed = leader.changed() => if changed.is_err() { break 'outer },
                }
            }
            // Messages a reader popped but did not publish (it crashed, lost Redis or its
            // lease) go back to the queue first, as channels_redis's cleanup script does.
            if let Err(err) = self.restore().await {
                tracing::debug!(error = %err, "django bridge: restoring in-flight messages failed");
                tokio::select! {
                    () = stop.cancelled() => break 'outer,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = next_backoff(backoff);
                continue;
            }
            loop {
                if stop.is_cancelled() {
                    break 'outer;
                }
                if !*leader.borrow() {
                    continue 'outer;
                }
                let batch = tokio::select! {
                    () = stop.cancelled() => break 'outer,
                    batch = self.pop() => batch,
                };
                let batch = match batch {
                    Ok(batch) => batch,
                    Err(err) => {
                        tracing::debug!(error = %err, "django bridge: reading the queue failed");
                        tokio::select! {
                            () = stop.cancelled() => break 'outer,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = next_backoff(backoff);
                        continue 'outer;
                    }
                };
                for (member, _score) in batch {
                    match self.handle_core(&member).await {
                        Handled::Done => {
                            backoff = BACKOFF_MIN;
                            self.ack(member).await;
                        }
                        Handled::Retry => {
                            // Left in flight; restored, in order, after the pause.
                            tokio::select! {
                                () = stop.cancelled() => break 'outer,
                                () = tokio::time::sleep(backoff) => {}
                            }
                            backoff = next_backoff(backoff);
                            continue 'outer;
                        }
                    }
                }
            }
        }
    }

    async fn restore(&self) -> Result<(), CommandError> {
        let restored = self
            .eval(
                &self.scripts.restore,
                vec![self.names.queue.clone(), self.names.inflight.clone()],
                Vec::new(),
                "restoring in-flight messages",
            )
            .await?;
        if let Some(n) = restored.as_i64().filter(|n| *n > 0) {
            tracing::info!(
                restored = n,
                "django bridge: messages left in flight are queued again"
            );
        }
        Ok(())
    }

    /// The next messages: a batch if the queue has a backlog, else whatever one
    /// `BZPOPMIN` brings within [`BLOCK_SECS`] (possibly nothing).
    async fn pop(&self) -> Result<Vec<(Vec<u8>, String)>, CommandError> {
        let popped = self
            .eval(
                &self.scripts.pop,
                vec![self.names.queue.clone(), self.names.inflight.clone()],
                vec![Value::from(POP_BATCH.to_string())],
                "popping messages",
            )
            .await?;
        let batch = pairs(&popped.into_array());
        if !batch.is_empty() {
            return Ok(batch);
        }
        if !self.reader.is_connected() {
            return Err(CommandError::NotConnected {
                what: "popping messages",
            });
        }
        let bzpopmin = CustomCommand::new_static("BZPOPMIN", ClusterHash::FirstKey, true);
        let waited = within(
            COMMAND_TIMEOUT + Duration::from_secs_f64(BLOCK_SECS),
            "waiting for messages",
            self.reader.custom::<Value, Value>(
                bzpopmin,
                vec![Value::from(self.names.queue.clone()), Value::from(BLOCK_SECS)],
            ),
        )
        .await?;
        let reply = waited.into_array();
        // `key, member, score`, or nothing after the timeout.
        let Some(popped) = reply.get(1..).map(pairs).and_then(|mut p| p.pop()) else {
            return Ok(Vec::new());
        };
        // Kept in the backup until published, as channels_redis's receiver does; on the
        // connection that just answered, the likeliest to still be up.
        let (member, score) = &popped;
        let backup = CustomCommand::new_static("ZADD", ClusterHash::FirstKey, false);
        timed(
            "backing up a popped message",
            self.reader.custom::<Value, Value>(
                backup,
                vec![
                    Value::from(self.names.inflight.clone()),
                    Value::from(score.clone()),
                    Value::from(bytes::Bytes::copy_from_slice(member)),
                ],
            ),
        )
        .await?;
        Ok(vec![popped])
    }

    async fn ack(&self, member: Vec<u8>) {
        let zrem = CustomCommand::new_static("ZREM", ClusterHash::FirstKey, false);
        let acked = timed(
            "acknowledging a message",
            self.commands.custom::<Value, Value>(
                zrem,
                vec![
                    Value::from(self.names.inflight.clone()),
                    Value::from(bytes::Bytes::from(member)),
                ],
            ),
        )
        .await;
        if let Err(err) = acked {
            // It is restored and published again by the next restore: at least once.
            tracing::debug!(error = %err, "django bridge: acknowledging failed");
        }
    }

    async fn handle_core(&self, member: &[u8]) -> Handled {
        let layer = Layer::Core;
        let mut dict = match self.core_decoder.decode(member, unix_now().as_secs()) {
            Ok(dict) => dict,
            Err(err) => return self.undecodable(layer, None, &err),
        };
        let names = wire::take_asgi_channels(&mut dict);
        let Some(group) = names
            .iter()
            .find_map(|name| self.names.group_of(name))
            .map(str::to_owned)
        else {
            let to = names.first().map_or("", String::as_str);
            return self.unmappable(
                layer,
                "?",
                &format!("sent to {to:?}, not to a group herald joined"),
            );
        };
        self.publish(layer, &group, dict).await
    }
}
