//! The consumer: takes new entries, and a dead worker's, whenever a worker is free.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{ClientLike, KeysInterface, StreamsInterface, Value};
use tokio::time::Instant;

use crate::redis::COMMAND_TIMEOUT;
use crate::tasks::redis::{RedisQueue, GROUP, QUEUED_KEY, QUEUE_KEY};

/// How long one `XREADGROUP` waits for a new entry.
const READ_BLOCK: Duration = Duration::from_secs(1);

/// The shortest `XREADGROUP` wait (a wait of 0 would block forever).
const MIN_READ_BLOCK: Duration = Duration::from_millis(10);

/// The most entries one `XREADGROUP` or `XAUTOCLAIM` takes.
const MAX_BATCH: usize = 100;

/// Pause after a failed read before the next try.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Why reading the queue failed. The consumer logs it and tries again.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error("not connected to Redis")]
    NotConnected,
    #[error("Redis did not answer in time")]
    TimedOut,
    #[error("{0}")]
    Redis(fred::error::Error),
}

impl ReadError {
    /// Whether the consumer group is gone (a Redis without persistence restarted): it
    /// must be created again.
    fn no_group(&self) -> bool {
        matches!(self, Self::Redis(err) if err.details().contains("NOGROUP"))
    }
}

impl RedisQueue {
    /// Takes entries (new ones, or a dead worker's) whenever a worker is free, until
    /// shutdown. Each command takes as many entries as there are free workers (up to
    /// [`MAX_BATCH`]), so the tasks of a dead worker are taken over together, not one
    /// per round.
    pub(super) async fn consume(self: Arc<Self>, reader: fred::prelude::Client) {
        let mut group_ready = false;
        // When to look for abandoned entries next, and where the last look stopped in
        // the group's pending list ("0-0": the start).
        let mut reclaim_at = Instant::now();
        let mut cursor = "0-0".to_owned();
        loop {
            let permit = tokio::select! {
                () = self.shutdown.cancelled() => return,
                permit = self.workers.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            if !group_ready {
                group_ready = self.ensure_group().await;
                if !group_ready {
                    drop(permit);
                    self.pause().await;
                    continue;
                }
            }
            // This loop is the only one taking permits, so the free ones stay free
            // until the entries are handed out.
            let count = (1 + self.workers.available_permits()).min(MAX_BATCH);
            let mut taken = Vec::new();
            if Instant::now() >= reclaim_at {
                match self.reclaim(&cursor, count).await {
                    Ok((next, entries)) => {
                        // Look again at once while the pending list has more to show.
                        let more = next != "0-0" || entries.len() == count;
                        if !more {
                            reclaim_at = Instant::now() + self.timing.reclaim_every;
                        }
                        cursor = next;
                        taken = entries;
                    }
                    Err(err) => {
                        group_ready = !err.no_group();
                        reclaim_at = Instant::now() + self.timing.reclaim_every;
                        cursor = "0-0".to_owned();
                        tracing::debug!(error = %err, "looking for abandoned tasks failed");
                    }
                }
                self.refresh_queue_depth().await;
            }
            if taken.is_empty() {
                // Wait for new entries until the next look for abandoned ones is due.
                let block = reclaim_at
                    .saturating_duration_since(Instant::now())
                    .clamp(MIN_READ_BLOCK, READ_BLOCK);
                let read = tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    read = self.read(&reader, count, block) => read,
                };
                match read {
                    Ok(entries) => taken = entries,
                    Err(err) => {
                        group_ready = !err.no_group();
                        tracing::debug!(error = %err, "reading the task queue failed");
                        drop(permit);
                        self.pause().await;
                        continue;
                    }
                }
            }
            let mut permit = Some(permit);
            for (entry, task_id) in taken {
                let permit = permit
                    .take()
                    .or_else(|| self.workers.clone().try_acquire_owned().ok());
                let queue = self.clone();
                self.tracker
                    .spawn(async move { queue.run_entry(entry, task_id, permit).await });
            }
        }
    }

    pub(super) async fn pause(&self) {
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            () = tokio::time::sleep(RETRY_PAUSE) => {}
        }
    }

    /// Creates the consumer group (and the stream) unless it exists. A Redis without
    /// persistence that restarted has neither.
    pub(super) async fn ensure_group(&self) -> bool {
        let created: Result<Value, _> = self.client.xgroup_create(QUEUE_KEY, GROUP, "0", true).await;
        match created {
            Ok(_) => true,
            Err(err) if err.details().contains("BUSYGROUP") => true,
            Err(err) => {
                tracing::debug!(error = %err, "creating the task queue's consumer group failed");
                false
            }
        }
    }

    pub(super) async fn refresh_queue_depth(&self) {
        if let Ok(Ok(queued)) =
            tokio::time::timeout(COMMAND_TIMEOUT, self.client.get::<Option<u64>, _>(QUEUED_KEY)).await
        {
            self.set_queue_depth(queued.unwrap_or(0));
        }
    }

    /// Up to `count` new entries, waiting up to `block` for the first.
    pub(super) async fn read(
        &self,
        reader: &fred::prelude::Client,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(String, String)>, ReadError> {
        if !reader.is_connected() {
            return Err(ReadError::NotConnected);
        }
        let block_ms = u64::try_from(block.as_millis()).unwrap_or(1000).max(1);
        let reply = tokio::time::timeout(
            block + COMMAND_TIMEOUT,
            reader.xreadgroup(
                GROUP,
                self.node_id.as_str(),
                Some(u64::try_from(count).unwrap_or(1)),
                Some(block_ms),
                false,
                QUEUE_KEY,
                ">",
            ),
        )
        .await;
        let reply = answered(reply)?;
        // [[queue, [[entry, [field, value, …]], …]]] or nil
        let entries = reply
            .into_array()
            .into_iter()
            .next()
            .and_then(|stream| stream.into_array().into_iter().nth(1))
            .map(Value::into_array)
            .unwrap_or_default();
        Ok(entries.into_iter().filter_map(parse_entry).collect())
    }

    /// Up to `count` entries whose worker stopped renewing them, from `cursor` on in the
    /// group's pending list, now owned by this node; and where the next look starts.
    pub(super) async fn reclaim(
        &self,
        cursor: &str,
        count: usize,
    ) -> Result<(String, Vec<(String, String)>), ReadError> {
        let idle_ms = u64::try_from(self.timing.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let reply = tokio::time::timeout(
            COMMAND_TIMEOUT,
            self.client.xautoclaim(
                QUEUE_KEY,
                GROUP,
                self.node_id.as_str(),
                idle_ms,
                cursor,
                Some(u64::try_from(count).unwrap_or(1)),
                false,
            ),
        )
        .await;
        let reply = answered(reply)?;
        // [cursor, [[entry, [field, value, …]] | nil, …], deleted ids]
        let mut parts = reply.into_array().into_iter();
        let next = parts
            .next()
            .and_then(|cursor| cursor.as_string())
            .unwrap_or_else(|| "0-0".to_owned());
        let taken: Vec<(String, String)> = parts
            .next()
            .map(Value::into_array)
            .unwrap_or_default()
            .into_iter()
            .filter_map(parse_entry)
            .collect();
        if !taken.is_empty() {
            tracing::info!(tasks = taken.len(), "taking over tasks whose worker stopped");
        }
        for (_, task_id) in &taken {
            tracing::debug!(
                task_id = task_id.as_str(),
                "taking over a task whose worker stopped"
            );
        }
        Ok((next, taken))
    }
}

/// The reply of a command run under a timeout, or why there is none.
fn answered(
    reply: Result<Result<Value, fred::error::Error>, tokio::time::error::Elapsed>,
) -> Result<Value, ReadError> {
    match reply {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(ReadError::Redis(err)),
        Err(_) => Err(ReadError::TimedOut),
    }
}

/// `(entry id, task id)` from a stream entry `[id, [field, value, …]]`.
fn parse_entry(entry: Value) -> Option<(String, String)> {
    let mut parts = entry.into_array().into_iter();
    let id = parts.next()?.as_string()?;
    let fields = parts.next()?.into_array();
    let task_id = fields
        .chunks(2)
        .find(|pair| pair.first().and_then(Value::as_string).as_deref() == Some("task"))
        .and_then(|pair| pair.get(1))
        .and_then(Value::as_string)?;
    Some((id, task_id))
}
