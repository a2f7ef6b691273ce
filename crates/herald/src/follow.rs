//! Following one LLM task's messages for an HTTP client (SPEC §10): the server-sent
//! events of `/api/chat/tasks/{task_id}/events` and the AI SDK's UI message stream are
//! both built on [`follow`].
//!
//! It shares the socket path's machinery: an [`Outbox`] subscribed to the hub for the
//! user's `frames:{user_id}` channel, history to replay what came before, offsets to
//! drop what was already sent, and the channel's epoch, so an SSE client and a
//! WebSocket client of one task see the same messages at the same offsets, and either
//! can resume from the other's last offset. Like a session, it subscribes first, then
//! reads history: every message is either in that history or queued in the outbox
//! (or both, and then sent once).
//!
//! Unlike a session, a follower never tells its client `recovered:false` and goes on:
//! an HTTP stream has no in-band way to say "your offsets restarted", so anything that
//! would lose or repeat a message (an epoch change, a gap that left history, an outbox
//! overflow) ends the stream with [`Followed::Lost`], and the client re-fetches the
//! task (`GET /api/chat/tasks/{task_id}`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::app::AppState;
use crate::channel::{Channel, ChannelKind, Message};
use crate::compose::llm::{LlmKind, LlmStatus};
use crate::hub::{Batch, Drained, Outbox, SOLE};
use crate::ids::UserId;
use crate::tasks::TaskStatus;

/// How long a follower of a task that had already ended waits for the task's final
/// `llm_status` to arrive, when history did not hold it: a worker records the task's
/// end just before it publishes that message.
const ENDED_GRACE: Duration = Duration::from_secs(5);

/// What a follower hands its HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    /// The task's next message; after one with [`TaskMessage::is_final`] nothing follows.
    Message(TaskMessage),
    /// The stream cannot go on without losing or repeating a message; nothing follows.
    /// The text says why, for the client (it never holds a secret).
    Lost(&'static str),
}

/// One message of the task, as the socket sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMessage {
    pub offset: u64,
    /// The message's `type` (`llm_status`, `llm_frame`, …).
    pub kind: String,
    /// The JSON text, byte for byte what a socket receives.
    pub bytes: Bytes,
    /// `llm_status` `completed`, `failed` or `cancelled`: the task's last message.
    pub is_final: bool,
}

/// The fields of a frames-channel message a follower reads.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    task_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    chat_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    status: Option<std::borrow::Cow<'a, str>>,
}

impl<'a> Head<'a> {
    fn parse(bytes: &'a [u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// The status of an `llm_status` message.
    fn llm_status(&self) -> Option<LlmStatus> {
        if self.kind.as_deref()? != LlmKind::Status.as_str() {
            return None;
        }
        LlmStatus::parse(self.status.as_deref()?)
    }
}

/// Where a follower starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At the task's first message, replayed from history if it was already sent.
    TaskStart,
    /// After this offset of the frames channel (`Last-Event-ID`).
    After(u64),
}

/// Follows task `task_id` of `user_id`, whose status was `status` when its owner was
/// checked. Returns the receiving end of the follower: it ends after the task's final
/// `llm_status`, after [`Followed::Lost`], at shutdown, or when the receiver is dropped.
pub fn follow(
    state: &AppState,
    user_id: &UserId,
    task_id: String,
    status: TaskStatus,
    from: Start,
) -> mpsc::Receiver<Followed> {
    // A small buffer: the outbox is the queue whose bound closes slow readers.
    let (tx, rx) = mpsc::channel(16);
    let state = state.clone();
    let user_id = user_id.clone();
    state.tracker.clone().spawn(async move {
        let Ok(channel) = Channel::new(ChannelKind::Frames, user_id.as_str()) else {
            let _ = tx.send(Followed::Lost("invalid user id")).await;
            return;
        };
        let outbox = Arc::new(Outbox::new(
            Arc::from(user_id.as_str()),
            state.config.outbox_max_bytes,
        ));
        if state.hub.subscribe(&channel, outbox.clone(), SOLE) {
            if let Err(err) = state.broker.subscribe(&channel).await {
                tracing::warn!(%channel, error = %err, "broker subscribe failed");
            }
        }
        let mut follower = Follower {
            state: &state,
            channel: channel.clone(),
            outbox: outbox.clone(),
            task_id,
            tx,
            epoch: Arc::from(""),
            last_offset: 0,
            after: 0,
        };
        let ended_at_start = status.is_done();
        let result = follower.run(from, ended_at_start).await;
        if let Err(Stop::Lost(why)) = result {
            let _ = follower.tx.send(Followed::Lost(why)).await;
        }
        if state.hub.unsubscribe(&channel, &outbox, SOLE) {
            state.broker.unsubscribe(&channel).await;
        }
    });
    rx
}

/// Finds the task a chat's answer is being streamed by: the last task of `chat_id` in
/// the user's frames-channel history, if any.
pub async fn latest_task_of_chat(
    state: &AppState,
    user_id: &UserId,
    chat_id: &str,
) -> Result<Option<String>, crate::broker::BrokerError> {
    let Ok(channel) = Channel::new(ChannelKind::Frames, user_id.as_str()) else {
        return Ok(None);
    };
    let history = state.broker.history(&channel, 0, usize::MAX).await?;
    Ok(history.messages.iter().rev().find_map(|message| {
        let head = Head::parse(&message.bytes)?;
        if head.chat_id.as_deref() == Some(chat_id) {
            head.task_id.map(|id| id.into_owned())
        } else {
            None
        }
    }))
}

/// Why a follower stopped early.
enum Stop {
    /// The client is gone or the server is shutting down: nothing more to send.
    Gone,
    Lost(&'static str),
}

struct Follower<'a> {
    state: &'a AppState,
    channel: Channel,
    outbox: Arc<Outbox>,
    task_id: String,
    tx: mpsc::Sender<Followed>,
    /// The channel's epoch when the stream started; every message must be of it.
    epoch: Arc<str>,
    /// Offset of the last channel message looked at (sent or not: others' messages
    /// count too), so none is looked at twice.
    last_offset: u64,
    /// Messages at or below this offset are never sent (`Last-Event-ID`).
    after: u64,
}

impl Follower<'_> {
    /// Replays what history holds, then follows the outbox until the task's end.
    async fn run(&mut self, from: Start, ended_at_start: bool) -> Result<(), Stop> {
        let lost_broker = || Stop::Lost("the broker is unavailable; retry shortly");
        let since = match from {
            Start::TaskStart => 0,
            Start::After(offset) => offset,
        };
        let history = self
            .state
            .broker
            .history(&self.channel, since, usize::MAX)
            .await
            .map_err(|_| lost_broker())?;
        self.epoch = Arc::from(history.position.epoch.as_str());
        if since > history.position.offset {
            // An offset the channel never reached: its offsets restarted (a new epoch).
            return Err(Stop::Lost("the channel's offsets restarted; reload the task"));
        }
        let messages = match from {
            Start::After(_) if !history.complete => {
                return Err(Stop::Lost(
                    "the messages after Last-Event-ID left history; reload the task",
                ));
            }
            Start::After(offset) => {
                self.after = offset;
                history.messages
            }
            Start::TaskStart => {
                let first = history.messages.iter().position(|message| {
                    Head::parse(&message.bytes)
                        .is_some_and(|head| head.task_id.as_deref() == Some(self.task_id.as_str()))
                });
                match first {
                    Some(first) => {
                        let head = Head::parse(&history.messages[first].bytes);
                        let is_start = head.is_some_and(|head| head.llm_status() == Some(LlmStatus::Started));
                        if !history.complete && !is_start {
                            return Err(Stop::Lost(
                                "the task's first messages left history; reload the task",
                            ));
                        }
                        history.messages[first..].to_vec()
                    }
                    // Not started yet, or its messages left history (then it has ended,
                    // and the grace below ends the stream).
                    None => Vec::new(),
                }
            }
        };
        self.last_offset = history.position.offset;
        for message in messages {
            if self.send(&message).await? {
                return Ok(());
            }
        }
        if ended_at_start && self.after > 0 && self.final_at_or_before_after().await? {
            // The client already has the whole stream (it reconnected after the end).
            return Ok(());
        }
        let grace = tokio::time::sleep_until(Instant::now() + ENDED_GRACE);
        tokio::pin!(grace);
        // Made once for the stream, not per batch (see `sync::cancelled`).
        let state = self.state;
        let shutdown = crate::sync::cancelled(&state.shutdown);
        tokio::pin!(shutdown);
        let mut batch = Batch::default();
        loop {
            tokio::select! {
                () = self.outbox.wait() => {}
                () = self.tx.closed() => return Err(Stop::Gone),
                () = &mut shutdown => return Err(Stop::Gone),
                () = &mut grace, if ended_at_start => {
                    return Err(Stop::Lost("the task's messages left history; reload the task"));
                }
            }
            if let Drained::Close(_) = self.outbox.drain(&mut batch) {
                return Err(Stop::Lost(
                    "the client read too slowly; resume with Last-Event-ID",
                ));
            }
            for (_, message) in batch.messages.drain(..) {
                if self.forward(message).await? {
                    return Ok(());
                }
            }
        }
    }

    /// Whether the task's final message is in history at or before `after`.
    async fn final_at_or_before_after(&self) -> Result<bool, Stop> {
        let history = self
            .state
            .broker
            .history(&self.channel, 0, usize::MAX)
            .await
            .map_err(|_| Stop::Lost("the broker is unavailable; retry shortly"))?;
        Ok(history.messages.iter().any(|message| {
            message.offset <= self.after
                && Head::parse(&message.bytes).is_some_and(|head| {
                    head.task_id.as_deref() == Some(self.task_id.as_str())
                        && head.llm_status().is_some_and(LlmStatus::is_final)
                })
        }))
    }

    /// One message from the outbox: checks its epoch and its offset (filling a gap
    /// from history), then sends it if it is the task's. Returns true after the final
    /// message.
    async fn forward(&mut self, message: Message) -> Result<bool, Stop> {
        if !Arc::ptr_eq(&message.epoch, &self.epoch) {
            if message.epoch == self.epoch {
                self.epoch = message.epoch.clone();
            } else {
                // A late message of an epoch the channel has left is dropped; a message
                // of a new epoch means offsets restarted under this stream.
                let position = Box::pin(self.state.broker.position(&self.channel))
                    .await
                    .map_err(|_| Stop::Lost("the broker is unavailable; retry shortly"))?;
                if *position.epoch == *self.epoch {
                    return Ok(false);
                }
                return Err(Stop::Lost("the channel's offsets restarted; reload the task"));
            }
        }
        let next = if message.is_marker() {
            message.offset + 1
        } else {
            message.offset
        };
        if next > self.last_offset + 1 && self.fill_gap(next).await? {
            return Ok(true);
        }
        if message.is_marker() || message.offset <= self.last_offset {
            return Ok(false);
        }
        self.send(&message).await
    }

    /// Sends, from history, the messages between the last one looked at and `next`.
    async fn fill_gap(&mut self, next: u64) -> Result<bool, Stop> {
        let lost =
            || Stop::Lost("messages left history before they could be sent; resume with Last-Event-ID");
        let history = self
            .state
            .broker
            .history(
                &self.channel,
                self.last_offset,
                (next - self.last_offset - 1) as usize,
            )
            .await
            .map_err(|_| lost())?;
        if !history.complete || *history.position.epoch != *self.epoch {
            return Err(lost());
        }
        for message in history.messages {
            if message.offset < next && message.offset == self.last_offset + 1 && self.send(&message).await? {
                return Ok(true);
            }
        }
        if self.last_offset + 1 == next {
            Ok(false)
        } else {
            Err(lost())
        }
    }

    /// Looks at one message in offset order; sends it if it is the task's and after
    /// `Last-Event-ID`. Returns true when it was the task's final message.
    async fn send(&mut self, message: &Message) -> Result<bool, Stop> {
        self.last_offset = self.last_offset.max(message.offset);
        if message.offset <= self.after {
            return Ok(false);
        }
        let Some(head) = Head::parse(&message.bytes) else {
            return Ok(false);
        };
        if head.task_id.as_deref() != Some(self.task_id.as_str()) {
            return Ok(false);
        }
        let kind = head.kind.as_deref().unwrap_or_default().to_owned();
        let is_final = head.llm_status().is_some_and(LlmStatus::is_final);
        let followed = Followed::Message(TaskMessage {
            offset: message.offset,
            kind,
            bytes: message.bytes.clone(),
            is_final,
        });
        self.tx.send(followed).await.map_err(|_| Stop::Gone)?;
        Ok(is_final)
    }
}
