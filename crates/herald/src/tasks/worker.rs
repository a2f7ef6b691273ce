//! Runs one task: calls the LLM with the chat's earlier turns and publishes the stream
//! to `frames:{user_id}` in the documented order:
//!
//! `llm_status started` → `llm_status thinking` + the thinking `llm_frame` →
//! `llm_status streaming` → streaming `llm_frame`s (`index` 0, 1, 2, … without gaps) →
//! `llm_response` → `llm_status completed`. On failure `llm_error` then `llm_status
//! failed`; on cancel `llm_status cancelled`.
//!
//! Every message carries `user_id`, `chat_id` and `task_id`; the broker adds `offset`,
//! `epoch`, `id` and `timestamp`.
//!
//! With the shared queue a task may be taken over by another worker when its worker
//! dies. The new worker gets a [`Resume`]: how far the stream got. It skips the
//! messages already sent, calls the LLM again, and drops the part of the new answer
//! the user already has, so the stream goes on where it stopped: frame indexes stay
//! without gaps and no text is sent twice. If the new answer does not begin with the
//! text already sent (a sampling model does not answer the same way twice), the answer
//! restarts visibly (SPEC §10): `llm_status restarted`, then the new answer's frames
//! from `index` 0, and the final `llm_response` is the new answer, the one the user
//! saw.

mod run;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::broker::Publisher;
use crate::channel::{Channel, ChannelKind, Draft};
use crate::compose::llm::{LlmHead, LlmMessage, LlmStatus};
use crate::llm::{LlmError, LlmProvider};
use crate::store::Store;
use crate::tasks::{TaskRequest, TaskStatus};
pub use run::run;
#[cfg(test)]
use run::Replay;

/// What a worker needs, shared by every task of a node.
pub struct Context {
    pub provider: Arc<dyn LlmProvider>,
    pub publisher: Publisher,
    pub store: Store,
    /// `HERALD_CHAT_CONTEXT_MESSAGES`.
    pub context_messages: usize,
    /// `HERALD_FRAME_COALESCE_MS`.
    pub coalesce: Duration,
    /// Cancelled when the node shuts down; a running task then has `drain` to finish.
    pub shutdown: CancellationToken,
    /// `HERALD_SHUTDOWN_DRAIN`.
    pub drain: Duration,
    /// What happens to a task still running when the drain window ends: `false` ends
    /// it as failed ([`SHUT_DOWN`]; memory mode has nobody to hand it to), `true`
    /// stops it without a word so another worker of the shared queue resumes it.
    pub hand_back_on_shutdown: bool,
}

/// How far a task's stream got, as the messages sent so far show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Nothing sent yet.
    #[default]
    New,
    /// `llm_status started`, `thinking` and the thinking frame were sent.
    Started,
    /// `llm_status streaming` was sent; frames may follow.
    Streaming,
    /// The exchange was saved to the chat history.
    Saved,
    /// `llm_response` was sent.
    Responded,
    /// `llm_status completed` was sent.
    Completed,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::New,
        Phase::Started,
        Phase::Streaming,
        Phase::Saved,
        Phase::Responded,
        Phase::Completed,
    ];

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(n: u8) -> Phase {
        Phase::ALL.get(usize::from(n)).copied().unwrap_or(Phase::New)
    }
}

/// Where a resumed task's stream stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    pub phase: Phase,
    /// Every streamed delta sent so far, joined.
    pub text: String,
    /// The `index` of the next streaming frame.
    pub next_index: u64,
    /// The stream already told the user the task failed or was cancelled: a worker
    /// sent `llm_error` (or the final status) and then died or could not record the
    /// end. The task ends so; it never runs again after the user was told it ended.
    pub ended: Option<Ended>,
}

/// How a resumed task's stream already ended ([`Resume::ended`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub status: TaskStatus,
    /// The text of `llm_error`, for a failure.
    pub error: Option<String>,
    /// The final `llm_status` was sent too.
    pub announced: bool,
}

/// The error of a failed task whose `llm_error` was lost, seen only by its final status.
const FAILED: &str = "LLM processing failed";

impl Resume {
    /// Whether the stream's final `llm_status` was read back.
    pub fn announced(&self) -> bool {
        self.phase == Phase::Completed || self.ended.as_ref().is_some_and(|ended| ended.announced)
    }

    /// Folds in one message of this task read back from the frame stream's history.
    pub fn observe(&mut self, message: &Value) {
        let head = LlmHead::read(message);
        if !matches!(
            head,
            None | Some(LlmHead::Error | LlmHead::Status(LlmStatus::Failed | LlmStatus::Cancelled))
        ) {
            // A worker went on after an `llm_error`: that error did not end the task.
            self.ended = None;
        }
        let phase = match head {
            Some(LlmHead::Status(LlmStatus::Started | LlmStatus::Thinking)) => Phase::Started,
            Some(LlmHead::Status(LlmStatus::Streaming)) => Phase::Streaming,
            // The answer started again: frames from index 0 replace what came before.
            Some(LlmHead::Status(LlmStatus::Restarted)) => {
                self.text.clear();
                self.next_index = 0;
                Phase::Streaming
            }
            Some(LlmHead::Response) => Phase::Responded,
            Some(LlmHead::Status(LlmStatus::Completed)) => Phase::Completed,
            Some(LlmHead::Frame { delta, index }) => {
                if index == self.next_index {
                    self.text.push_str(delta);
                    self.next_index = index + 1;
                }
                Phase::Streaming
            }
            Some(LlmHead::OtherFrame) => Phase::Started,
            Some(LlmHead::Error) => {
                let error = message.get("error").and_then(Value::as_str).unwrap_or(FAILED);
                self.ended.get_or_insert(Ended {
                    status: TaskStatus::Failed,
                    error: Some(error.to_owned()),
                    announced: false,
                });
                Phase::New
            }
            Some(LlmHead::Status(status @ (LlmStatus::Failed | LlmStatus::Cancelled))) => {
                let ended = self.ended.get_or_insert(Ended {
                    status: TaskStatus::Failed,
                    error: None,
                    announced: false,
                });
                if status == LlmStatus::Cancelled {
                    ended.status = TaskStatus::Cancelled;
                } else if ended.error.is_none() {
                    ended.error = Some(FAILED.to_owned());
                }
                ended.announced = true;
                Phase::New
            }
            None => Phase::New,
        };
        self.phase = self.phase.max(phase);
    }
}

/// How far a task's stream got, as one [`Checkpoint::save`] records it.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    pub phase: Phase,
    /// The whole answer text sent so far.
    pub text: &'a str,
    /// How many bytes at the end of `text` were sent since the last save.
    pub appended: usize,
    /// The `index` of the next streaming frame.
    pub next_index: u64,
    /// The offset of the message just sent (0: none).
    pub offset: u64,
    /// The answer restarted (`llm_status restarted`): `text` and `next_index` replace
    /// the recorded ones instead of extending them.
    pub restarted: bool,
}

impl Progress<'_> {
    /// The bytes sent since the last save.
    pub fn delta(&self) -> &str {
        self.text
            .get(self.text.len().saturating_sub(self.appended)..)
            .unwrap_or_default()
    }
}

/// Where a task's progress is recorded as its messages go out, so another worker can
/// resume it ([`Resume`]), and where its end is recorded. The shared queue records both
/// in Redis; memory mode only the end.
#[async_trait]
pub trait Checkpoint: Send + Sync {
    /// The stream reached `progress`. The recorded text must end up equal to
    /// `progress.text`, also when an earlier save was lost.
    async fn save(&self, progress: Progress<'_>);

    /// The task ended so. Called before the final `llm_status` goes out, so a client
    /// that asks for the task's status when it sees that message reads the end.
    /// Returns whether this run's end was recorded; [`Checkpoint::announced`] follows
    /// once the final `llm_status` is out.
    async fn finish(&self, outcome: &Outcome) -> bool;

    /// The final `llm_status` of an end this run recorded went out (or has nowhere to
    /// go). Until then the shared queue keeps the task's entry pending, so a worker
    /// that dies in between leaves that status to the worker that takes the entry
    /// over, never to nobody.
    async fn announced(&self) {}

    /// Whether this worker still owns the task, as far as it can tell without asking:
    /// checked before every message, so a worker that was frozen (or starved) past its
    /// lease sends nothing once it wakes, even before its heartbeat learns the task
    /// was taken over.
    fn may_send(&self) -> bool {
        true
    }

    /// Whether [`Checkpoint::save`] records anything: a queue whose tasks cannot be
    /// taken over (the local one) says no, and its worker skips the call, a boxed future
    /// per frame.
    fn records_progress(&self) -> bool {
        true
    }
}

/// One run of a task.
pub struct Job<'a> {
    pub task_id: &'a str,
    pub request: &'a TaskRequest,
    /// The user asked to stop: the stream ends with `llm_status cancelled`.
    pub cancel: &'a CancellationToken,
    /// This worker must stop at once without sending anything more (it lost the task
    /// to another worker, or hands it back at shutdown).
    pub abandon: &'a CancellationToken,
    pub resume: Resume,
    pub checkpoint: &'a dyn Checkpoint,
}

/// The error text of a task ended by shutdown.
pub const SHUT_DOWN: &str = "LLM processing failed: the server shut down before the answer was complete";

/// How a task ended.
pub struct Outcome {
    pub status: TaskStatus,
    pub response: Option<String>,
    pub error: Option<String>,
}

/// Publishes one task's messages to its user's frame stream.
struct Stream<'a> {
    ctx: &'a Context,
    channel: Channel,
    task_id: &'a str,
    request: &'a TaskRequest,
    abandon: &'a CancellationToken,
    checkpoint: &'a dyn Checkpoint,
    template: MessageTemplate,
}

/// One task's messages, serialized without building a JSON value per message: what
/// surrounds a message's own fields is written once per task. Every `llm_*` message's
/// own fields (`data`, `error`, `frame`, `message`, `status`) sort between `chat_id` and
/// `task_id`, so a message is `head`, its fields, `ids`, its type and `end`. The bytes
/// are exactly those [`Draft::from_object`] makes of the same message (its keys are
/// sorted), which a unit test checks for every kind.
struct MessageTemplate {
    /// `{"chat_id":…,`
    head: Vec<u8>,
    /// `,"task_id":…,"type":"`
    ids: Vec<u8>,
    /// `","user_id":…}`
    end: Vec<u8>,
}

impl MessageTemplate {
    fn new(request: &TaskRequest, task_id: &str) -> Self {
        let mut head = b"{\"chat_id\":".to_vec();
        write_json_string(&mut head, request.chat_id.as_str());
        head.push(b',');
        let mut ids = b",\"task_id\":".to_vec();
        write_json_string(&mut ids, task_id);
        ids.extend_from_slice(b",\"type\":\"");
        let mut end = b"\",\"user_id\":".to_vec();
        write_json_string(&mut end, request.user_id.as_str());
        end.push(b'}');
        Self { head, ids, end }
    }

    /// `message` with the task's ids.
    fn draft(&self, message: &LlmMessage<'_>) -> Option<Draft> {
        let fields_len = match message {
            LlmMessage::Frame { delta, .. } => delta.len() + 64,
            LlmMessage::Response { .. } => 256,
            _ => 128,
        };
        let kind = message.kind().as_str();
        let mut body =
            Vec::with_capacity(self.head.len() + fields_len + self.ids.len() + kind.len() + self.end.len());
        body.extend_from_slice(&self.head);
        match message {
            // The hot path: one frame per token.
            LlmMessage::Frame { delta, index } => {
                body.extend_from_slice(b"\"frame\":{\"delta\":");
                write_json_string(&mut body, delta);
                body.extend_from_slice(b",\"index\":");
                crate::channel::push_decimal(&mut body, *index);
                body.extend_from_slice(b",\"status\":\"streaming\"}");
            }
            LlmMessage::Status { status, message } => {
                body.extend_from_slice(b"\"message\":");
                write_json_string(&mut body, message);
                body.extend_from_slice(b",\"status\":");
                write_json_string(&mut body, status.as_str());
            }
            LlmMessage::Thinking { message } => {
                body.extend_from_slice(b"\"frame\":{\"message\":");
                write_json_string(&mut body, message);
                body.extend_from_slice(b",\"progress\":\"indeterminate\",\"status\":\"thinking\"}");
            }
            LlmMessage::Response { data } => {
                body.extend_from_slice(b"\"data\":");
                // Writing a JSON value into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut body, data);
            }
            LlmMessage::Error { error } => {
                body.extend_from_slice(b"\"error\":");
                write_json_string(&mut body, error);
            }
        }
        body.extend_from_slice(&self.ids);
        body.extend_from_slice(kind.as_bytes());
        body.extend_from_slice(&self.end);
        Draft::from_serialized(body)
    }
}

/// `message` with the task's ids, through a JSON map: the shape [`MessageTemplate`]
/// writes directly.
fn message_via_map(request: &TaskRequest, task_id: &str, message: LlmMessage<'_>) -> Draft {
    let mut message = message.into_object();
    message.insert("user_id".to_owned(), json!(request.user_id.as_str()));
    message.insert("chat_id".to_owned(), json!(request.chat_id.as_str()));
    message.insert("task_id".to_owned(), json!(task_id));
    Draft::from_object(message)
}

/// Appends `text` as a JSON string, escaped as serde_json escapes it everywhere else.
fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Serializing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(out, text);
}

impl<'a> Stream<'a> {
    /// The stream of `task_id`, or `None` when the user's id makes no frame channel
    /// (ids are validated on submit, so only if that ever changed).
    fn open(
        ctx: &'a Context,
        task_id: &'a str,
        request: &'a TaskRequest,
        abandon: &'a CancellationToken,
        checkpoint: &'a dyn Checkpoint,
    ) -> Option<Self> {
        Some(Self {
            ctx,
            channel: frames_channel(request)?,
            task_id,
            request,
            abandon,
            checkpoint,
            template: MessageTemplate::new(request, task_id),
        })
    }

    /// Sends one message; returns its offset. Sends nothing once the task is abandoned:
    /// another worker owns the stream from then on.
    async fn send(&self, message: LlmMessage<'_>) -> Option<u64> {
        if !self.may_send() {
            return None;
        }
        let draft = match self.template.draft(&message) {
            Some(draft) => draft,
            None => message_via_map(self.request, self.task_id, message),
        };
        self.publish(&draft).await
    }

    /// Whether this worker may still send on the task's stream (see [`Stream::send`]).
    fn may_send(&self) -> bool {
        if self.abandon.is_cancelled() {
            return false;
        }
        if !self.checkpoint.may_send() {
            tracing::warn!(
                task_id = self.task_id,
                "this worker's claim on the task has lapsed; stopping it so the worker that takes it over is the only one sending"
            );
            self.abandon.cancel();
            return false;
        }
        true
    }

    async fn publish(&self, draft: &Draft) -> Option<u64> {
        match self.ctx.publisher.publish(&self.channel, draft).await {
            Ok(published) => Some(published.offset),
            Err(err) => {
                // The stream goes on: the client learns of the gap on resume.
                tracing::warn!(task_id = self.task_id, error = %err, "publishing a task message failed");
                None
            }
        }
    }

    /// Records progress after a message went out (or a step finished).
    async fn reached(&self, phase: Phase, next_index: u64, offset: Option<u64>) {
        self.record(Progress {
            phase,
            text: "",
            appended: 0,
            next_index,
            offset: offset.unwrap_or(0),
            restarted: false,
        })
        .await;
    }

    async fn record(&self, progress: Progress<'_>) {
        if self.checkpoint.records_progress() && !self.abandon.is_cancelled() {
            self.checkpoint.save(progress).await;
        }
    }

    /// Records the end, then sends the final `llm_status` and tells the checkpoint it
    /// went out. A status this run could not send (its lease lapsed, or publishing
    /// failed) is not announced: the task's entry stays pending, and the worker that
    /// takes it over sends that status.
    async fn end(&self, outcome: Outcome, status: LlmStatus) -> Outcome {
        let recorded = self.may_send() && self.checkpoint.finish(&outcome).await;
        let sent = self.status(status).await;
        if recorded && sent.is_some() {
            self.checkpoint.announced().await;
        }
        outcome
    }

    /// Sends `llm_status` with the status's usual message.
    async fn status(&self, status: LlmStatus) -> Option<u64> {
        self.send(LlmMessage::status(status)).await
    }

    /// Sends the frame `index` with the last `delta_len` bytes of `text`, the answer so
    /// far.
    async fn frame(&self, text: &str, delta_len: usize, index: u64) {
        let delta = text
            .get(text.len().saturating_sub(delta_len)..)
            .unwrap_or_default();
        let offset = self.send(LlmMessage::Frame { delta, index }).await;
        self.record(Progress {
            phase: Phase::Streaming,
            text,
            appended: delta.len(),
            next_index: index + 1,
            offset: offset.unwrap_or(0),
            restarted: false,
        })
        .await;
    }

    /// The retried answer differs from the one sent so far: tells the user it starts
    /// again, and records that nothing of the new answer was sent yet.
    async fn restart(&self) {
        let offset = self.status(LlmStatus::Restarted).await;
        self.record(Progress {
            phase: Phase::Streaming,
            text: "",
            appended: 0,
            next_index: 0,
            offset: offset.unwrap_or(0),
            restarted: true,
        })
        .await;
    }

    async fn fail_with(&self, text: String) -> Outcome {
        self.send(LlmMessage::Error { error: &text }).await;
        let outcome = Outcome {
            status: TaskStatus::Failed,
            response: None,
            error: Some(text),
        };
        self.end(outcome, LlmStatus::Failed).await
    }

    async fn failed(&self, error: &LlmError) -> Outcome {
        self.fail_with(format!("LLM processing failed: {error}")).await
    }

    /// The drain window ended with the task still running.
    async fn shut_down(&self) -> Option<Outcome> {
        if self.ctx.hand_back_on_shutdown {
            tracing::info!(
                task_id = self.task_id,
                "task handed back to the shared queue at shutdown"
            );
            return None;
        }
        tracing::warn!(task_id = self.task_id, "task ended by shutdown");
        Some(self.fail_with(SHUT_DOWN.to_owned()).await)
    }

    async fn cancelled(&self) -> Outcome {
        let outcome = Outcome {
            status: TaskStatus::Cancelled,
            response: None,
            error: None,
        };
        self.end(outcome, LlmStatus::Cancelled).await
    }
}

/// The user's frame stream (user ids are validated on submit, so this only fails if
/// that ever changed).
pub fn frames_channel(request: &TaskRequest) -> Option<Channel> {
    Channel::new(ChannelKind::Frames, request.user_id.as_str()).ok()
}

/// Ends a task that never ran to its end here: cancelled or shut down while queued, or
/// out of attempts. `error` is the whole user-facing text. The end is recorded in
/// `checkpoint` before the final message goes out.
pub async fn publish_unstarted_end(
    ctx: &Context,
    task_id: &str,
    request: &TaskRequest,
    status: TaskStatus,
    error: Option<&str>,
    checkpoint: &dyn Checkpoint,
) {
    let never = CancellationToken::new();
    let Some(stream) = Stream::open(ctx, task_id, request, &never, checkpoint) else {
        let outcome = Outcome {
            status,
            response: None,
            error: error.map(str::to_owned),
        };
        record_announced(checkpoint, &outcome).await;
        return;
    };
    match status {
        TaskStatus::Cancelled => {
            stream.cancelled().await;
        }
        _ => {
            let text = error.unwrap_or("LLM processing failed: the task did not run");
            stream.fail_with(text.to_owned()).await;
        }
    }
}

/// Records an end whose final `llm_status` is out already, or has nowhere to go.
pub async fn record_announced(checkpoint: &dyn Checkpoint, outcome: &Outcome) {
    if checkpoint.finish(outcome).await {
        checkpoint.announced().await;
    }
}

/// The `llm_status` a task that ended with `status` ends its stream with.
fn final_llm_status(status: TaskStatus) -> Option<LlmStatus> {
    match status {
        TaskStatus::Completed => Some(LlmStatus::Completed),
        TaskStatus::Cancelled => Some(LlmStatus::Cancelled),
        TaskStatus::Failed => Some(LlmStatus::Failed),
        TaskStatus::Queued | TaskStatus::Running => None,
    }
}

/// Sends the final `llm_status` of a task whose end is recorded (`checkpoint.finish`
/// only confirms it) but whose worker died before that status went out.
pub async fn announce_end(
    ctx: &Context,
    task_id: &str,
    request: &TaskRequest,
    status: TaskStatus,
    abandon: &CancellationToken,
    checkpoint: &dyn Checkpoint,
) {
    let ended = Ended {
        status,
        error: None,
        announced: false,
    };
    match Stream::open(ctx, task_id, request, abandon, checkpoint) {
        Some(stream) => {
            run::finish_ended(&stream, ended).await;
        }
        None => {
            let outcome = Outcome {
                status,
                response: None,
                error: None,
            };
            record_announced(checkpoint, &outcome).await;
        }
    }
}

#[cfg(test)]
mod tests;
