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

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use crate::app::Publisher;
use crate::channel::{now_rfc3339, Channel, ChannelKind, Draft};
use crate::llm::{ChatMessage, LlmError, LlmEvent, LlmProvider, LlmRequest, Usage};
use crate::store::Store;
use crate::tasks::{TaskRequest, TaskStatus};

/// The thinking frame, exactly as the Django stack sent it.
pub const THINKING_MESSAGE: &str = "LLM is generating response...";

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

/// The `message` of `llm_status restarted`: a task taken over from a stopped worker got
/// a different answer, which replaces the one streamed so far.
pub const RESTARTED_MESSAGE: &str = "The answer was interrupted and starts again";

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
}

impl Resume {
    /// Folds in one message of this task read back from the frame stream's history.
    pub fn observe(&mut self, message: &Value) {
        let kind = message.get("type").and_then(Value::as_str).unwrap_or_default();
        let status = message.get("status").and_then(Value::as_str).unwrap_or_default();
        let phase = match (kind, status) {
            ("llm_status", "started" | "thinking") => Phase::Started,
            ("llm_status", "streaming") => Phase::Streaming,
            // The answer started again: frames from index 0 replace what came before.
            ("llm_status", "restarted") => {
                self.text.clear();
                self.next_index = 0;
                Phase::Streaming
            }
            ("llm_response", _) => Phase::Responded,
            ("llm_status", "completed") => Phase::Completed,
            ("llm_frame", _) => {
                let frame = message.get("frame");
                let index = frame.and_then(|f| f.get("index")).and_then(Value::as_u64);
                let delta = frame.and_then(|f| f.get("delta")).and_then(Value::as_str);
                if let (Some(index), Some(delta)) = (index, delta) {
                    if index == self.next_index {
                        self.text.push_str(delta);
                        self.next_index = index + 1;
                    }
                    Phase::Streaming
                } else {
                    Phase::Started
                }
            }
            _ => Phase::New,
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
    async fn finish(&self, outcome: &Outcome);

    /// Whether this worker still owns the task, as far as it can tell without asking:
    /// checked before every message, so a worker that was frozen (or starved) past its
    /// lease sends nothing once it wakes, even before its heartbeat learns the task
    /// was taken over.
    fn may_send(&self) -> bool {
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
    frames: FrameTemplate,
}

/// The streaming `llm_frame`s of one task, serialized without building a JSON value
/// per token: what surrounds `delta` and `index` is written once per task. The bytes
/// are exactly those [`Draft::from_object`] makes of the same message (its keys are
/// sorted), which a unit test checks.
struct FrameTemplate {
    /// `{"chat_id":…,"frame":{"delta":`
    head: Vec<u8>,
    /// `,"status":"streaming"},"task_id":…,"type":"llm_frame","user_id":…}`
    tail: Vec<u8>,
}

impl FrameTemplate {
    fn new(request: &TaskRequest, task_id: &str) -> Self {
        let mut head = b"{\"chat_id\":".to_vec();
        write_json_string(&mut head, request.chat_id.as_str());
        head.extend_from_slice(b",\"frame\":{\"delta\":");
        let mut tail = b",\"status\":\"streaming\"},\"task_id\":".to_vec();
        write_json_string(&mut tail, task_id);
        tail.extend_from_slice(b",\"type\":\"llm_frame\",\"user_id\":");
        write_json_string(&mut tail, request.user_id.as_str());
        tail.push(b'}');
        Self { head, tail }
    }

    /// The streaming frame `index` carrying `delta`.
    fn draft(&self, delta: &str, index: u64) -> Option<Draft> {
        use std::io::Write as _;
        let mut body = Vec::with_capacity(self.head.len() + delta.len() + 40 + self.tail.len());
        body.extend_from_slice(&self.head);
        write_json_string(&mut body, delta);
        // Writing to a Vec cannot fail.
        let _ = write!(body, ",\"index\":{index}");
        body.extend_from_slice(&self.tail);
        Draft::from_serialized(body)
    }
}

/// Appends `text` as a JSON string, escaped as serde_json escapes it everywhere else.
fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Serializing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(out, text);
}

impl Stream<'_> {
    /// Sends one message; returns its offset. Sends nothing once the task is abandoned:
    /// another worker owns the stream from then on.
    async fn send(&self, kind: &str, fields: Value) -> Option<u64> {
        if !self.may_send() {
            return None;
        }
        self.publish(&self.message(kind, fields)).await
    }

    /// The message `kind` with `fields` and the task's ids.
    fn message(&self, kind: &str, fields: Value) -> Draft {
        let mut message = Map::new();
        message.insert("type".to_owned(), json!(kind));
        if let Value::Object(fields) = fields {
            message.extend(fields);
        }
        message.insert("user_id".to_owned(), json!(self.request.user_id.as_str()));
        message.insert("chat_id".to_owned(), json!(self.request.chat_id.as_str()));
        message.insert("task_id".to_owned(), json!(self.task_id));
        Draft::from_object(message)
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
        if !self.abandon.is_cancelled() {
            self.checkpoint.save(progress).await;
        }
    }

    /// Records the end, then sends the final `llm_status`.
    async fn end(&self, outcome: Outcome, status: &str, message: &str) -> Outcome {
        if !self.abandon.is_cancelled() {
            self.checkpoint.finish(&outcome).await;
        }
        self.status(status, message).await;
        outcome
    }

    async fn status(&self, status: &str, message: &str) -> Option<u64> {
        self.send("llm_status", json!({"status": status, "message": message}))
            .await
    }

    /// Sends the frame `index` with the last `delta_len` bytes of `text`, the answer so
    /// far.
    async fn frame(&self, text: &str, delta_len: usize, index: u64) {
        let delta = text
            .get(text.len().saturating_sub(delta_len)..)
            .unwrap_or_default();
        let offset = if self.may_send() {
            // The hot path: one frame per token, serialized from the task's template.
            let draft = self.frames.draft(delta, index).unwrap_or_else(|| {
                self.message(
                    "llm_frame",
                    json!({"frame": {"status": "streaming", "delta": delta, "index": index}}),
                )
            });
            self.publish(&draft).await
        } else {
            None
        };
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
        let offset = self.status("restarted", RESTARTED_MESSAGE).await;
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
        self.send("llm_error", json!({"error": text})).await;
        let outcome = Outcome {
            status: TaskStatus::Failed,
            response: None,
            error: Some(text),
        };
        self.end(outcome, "failed", "Task failed").await
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
        self.end(outcome, "cancelled", "Task cancelled").await
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
    let Some(channel) = frames_channel(request) else {
        checkpoint
            .finish(&Outcome {
                status,
                response: None,
                error: error.map(str::to_owned),
            })
            .await;
        return;
    };
    let never = CancellationToken::new();
    let stream = Stream {
        ctx,
        channel,
        task_id,
        request,
        abandon: &never,
        checkpoint,
        frames: FrameTemplate::new(request, task_id),
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

/// The deltas of a retried answer that the user already has are dropped; what is left
/// goes out. A retried answer that differs from the text already sent is noticed, and
/// restarts the answer.
struct Replay {
    sent: String,
    matched: usize,
}

impl Replay {
    /// The part of `delta` the user does not have yet, or `Err` if it contradicts what
    /// was sent.
    fn fresh<'d>(&mut self, delta: &'d str) -> Result<&'d str, ()> {
        let pending = &self.sent.as_bytes()[self.matched..];
        if pending.is_empty() {
            return Ok(delta);
        }
        let overlap = pending.len().min(delta.len());
        if pending[..overlap] != delta.as_bytes()[..overlap] {
            return Err(());
        }
        self.matched += overlap;
        delta.get(overlap..).ok_or(())
    }

    fn complete(&self) -> bool {
        self.matched == self.sent.len()
    }

    /// The retried answer so far, `delta` being its last piece, once it was found to
    /// differ from the text sent; from then on every delta is fresh.
    fn restart(&mut self, delta: &str) -> String {
        let mut answer = self.sent.get(..self.matched).unwrap_or_default().to_owned();
        answer.push_str(delta);
        self.sent.clear();
        self.matched = 0;
        answer
    }
}

/// Runs a task to its end. `None`: the task was abandoned (lost to another worker or
/// handed back at shutdown) and did not end here.
pub async fn run(ctx: &Context, job: Job<'_>) -> Option<Outcome> {
    let Job {
        task_id,
        request,
        cancel,
        abandon,
        resume,
        checkpoint,
    } = job;
    let Some(channel) = frames_channel(request) else {
        let outcome = Outcome {
            status: TaskStatus::Failed,
            response: None,
            error: Some("invalid user id".to_owned()),
        };
        checkpoint.finish(&outcome).await;
        return Some(outcome);
    };
    let stream = Stream {
        ctx,
        channel,
        task_id,
        request,
        abandon,
        checkpoint,
        frames: FrameTemplate::new(request, task_id),
    };
    // A resumed task that had already finished its answer only sends what is missing.
    if resume.phase >= Phase::Saved {
        if resume.phase < Phase::Responded {
            let offset = send_response(&stream, request, &resume.text, &request.model, None).await;
            stream.reached(Phase::Responded, resume.next_index, offset).await;
        }
        let outcome = completed(resume.text);
        if resume.phase < Phase::Completed {
            return finished(
                abandon,
                stream.end(outcome, "completed", "Response completed").await,
            );
        }
        stream.checkpoint.finish(&outcome).await;
        return finished(abandon, outcome);
    }

    let started = Instant::now();
    if resume.phase < Phase::Started {
        stream.status("started", "Task started").await;
        stream.status("thinking", THINKING_MESSAGE).await;
        let offset = stream
            .send(
                "llm_frame",
                json!({"frame": {"status": "thinking", "message": THINKING_MESSAGE, "progress": "indeterminate"}}),
            )
            .await;
        stream.reached(Phase::Started, 0, offset).await;
    }

    let mut messages: Vec<ChatMessage> = match ctx
        .store
        .chat_turns(
            request.user_id.as_str(),
            request.chat_id.as_str(),
            ctx.context_messages,
        )
        .await
    {
        Ok(turns) => turns
            .into_iter()
            .map(|turn| match turn.role.as_str() {
                "assistant" => ChatMessage::assistant(turn.content),
                _ => ChatMessage::user(turn.content),
            })
            .collect(),
        Err(err) => {
            tracing::warn!(task_id, error = %err, "chat history unavailable; answering without it");
            Vec::new()
        }
    };
    messages.push(ChatMessage::user(request.prompt.clone()));
    let llm_request = LlmRequest {
        model: request.model.clone(),
        messages,
    };

    // At shutdown a running task gets the drain window to finish; then it is ended, or
    // handed back to the shared queue.
    let shutdown_deadline = async {
        ctx.shutdown.cancelled().await;
        tokio::time::sleep(ctx.drain).await;
    };
    tokio::pin!(shutdown_deadline);

    let mut events = tokio::select! {
        result = ctx.provider.stream(llm_request) => match result {
            Ok(events) => events,
            Err(err) => {
                tracing::warn!(task_id, kind = err.kind().label(), detail = err.detail(), "llm request failed");
                return finished(abandon, stream.failed(&err).await);
            }
        },
        () = cancel.cancelled() => return finished(abandon, stream.cancelled().await),
        () = abandon.cancelled() => return None,
        () = &mut shutdown_deadline => return stream.shut_down().await,
    };

    let mut streaming = resume.phase >= Phase::Streaming;
    let mut replay = Replay {
        sent: resume.text.clone(),
        matched: 0,
    };
    let mut response = resume.text;
    let mut index = resume.next_index;
    let mut n_deltas = 0u64;
    let mut pending = String::new();
    let mut first_token_at: Option<Instant> = None;
    let mut flush_at: Option<Instant> = None;
    loop {
        let next = tokio::select! {
            next = next_event(&mut events, flush_at) => next,
            () = cancel.cancelled() => {
                drop(events);
                return finished(abandon, stream.cancelled().await);
            }
            () = abandon.cancelled() => return None,
            () = &mut shutdown_deadline => {
                drop(events);
                return stream.shut_down().await;
            }
        };
        match next {
            // The coalescing window closed: send what was joined.
            None => {
                stream.frame(&response, pending.len(), index).await;
                index += 1;
                pending.clear();
                flush_at = None;
            }
            Some(Some(Ok(LlmEvent::Delta(delta)))) => {
                if first_token_at.is_none() {
                    let now = Instant::now();
                    first_token_at = Some(now);
                    ctx.publisher.metrics().llm_first_token(now - started);
                }
                n_deltas += 1;
                let fresh = match replay.fresh(&delta) {
                    Ok(fresh) => Cow::Borrowed(fresh),
                    Err(()) => {
                        // Only a retried answer is compared, and only until it has
                        // passed the text sent before: nothing new was sent yet.
                        tracing::info!(
                            task_id,
                            "the retried answer differs from the text already sent; restarting it"
                        );
                        stream.restart().await;
                        response.clear();
                        index = 0;
                        Cow::Owned(replay.restart(&delta))
                    }
                };
                if fresh.is_empty() {
                    continue;
                }
                if !streaming {
                    streaming = true;
                    let offset = stream.status("streaming", "Streaming response").await;
                    stream.reached(Phase::Streaming, index, offset).await;
                }
                response.push_str(&fresh);
                if ctx.coalesce.is_zero() {
                    stream.frame(&response, fresh.len(), index).await;
                    index += 1;
                } else {
                    pending.push_str(&fresh);
                    flush_at.get_or_insert_with(|| Instant::now() + ctx.coalesce);
                }
            }
            Some(Some(Ok(LlmEvent::Done {
                usage,
                model,
                finish_reason,
            }))) => {
                if !pending.is_empty() {
                    stream.frame(&response, pending.len(), index).await;
                }
                if !replay.complete() {
                    tracing::info!(
                        task_id,
                        "the retried answer is shorter than the text already sent; restarting it"
                    );
                    stream.restart().await;
                    response = replay.restart("");
                    if !response.is_empty() {
                        stream.frame(&response, response.len(), 0).await;
                    }
                }
                if let Some(first) = first_token_at {
                    let secs = first.elapsed().as_secs_f64();
                    let tokens = usage.map_or(n_deltas, |u| u.completion_tokens);
                    if secs > 0.0 {
                        ctx.publisher
                            .metrics()
                            .llm_tokens_per_second(tokens as f64 / secs);
                    }
                }
                // A cancel that arrived as the answer finished still wins: the caller
                // was told the stream ends with `cancelled`.
                if cancel.is_cancelled() {
                    return finished(abandon, stream.cancelled().await);
                }
                // What `llm_response` reports of how upstream ended the answer.
                let usage = Some(Ending {
                    usage,
                    finish_reason: &finish_reason,
                });
                let outcome = complete(&stream, ctx, request, response, &model, usage).await;
                return finished(abandon, outcome);
            }
            Some(Some(Err(err))) => {
                tracing::warn!(
                    task_id,
                    kind = err.kind().label(),
                    detail = err.detail(),
                    "llm stream failed"
                );
                if !pending.is_empty() {
                    stream.frame(&response, pending.len(), index).await;
                }
                return finished(abandon, stream.failed(&err).await);
            }
            Some(None) => {
                let err = LlmError::new(
                    crate::llm::LlmErrorKind::Interrupted,
                    "the stream ended without Done",
                );
                return finished(abandon, stream.failed(&err).await);
            }
        }
    }
}

/// The outcome, unless the task was abandoned on the way (then what was sent is the
/// new owner's to finish).
fn finished(abandon: &CancellationToken, outcome: Outcome) -> Option<Outcome> {
    (!abandon.is_cancelled()).then_some(outcome)
}

fn completed(response: String) -> Outcome {
    Outcome {
        status: TaskStatus::Completed,
        response: Some(response),
        error: None,
    }
}

/// The next event, or `None` when the coalescing deadline passes first.
async fn next_event(
    events: &mut crate::llm::LlmStream,
    flush_at: Option<Instant>,
) -> Option<Option<Result<LlmEvent, LlmError>>> {
    match flush_at {
        Some(deadline) => timeout_at(deadline, events.next()).await.ok(),
        None => Some(events.next().await),
    }
}

/// How upstream ended an answer, as `llm_response` reports it.
#[derive(Debug, Clone, Copy)]
struct Ending<'a> {
    usage: Option<Usage>,
    /// Upstream's `finish_reason` (`stop`, `length`, …).
    finish_reason: &'a str,
}

/// Sends `llm_response`. `usage` is `None` for an answer taken over after it was saved,
/// whose usage and finish reason were not recorded: `usage` is then null and
/// `finish_reason` absent.
async fn send_response(
    stream: &Stream<'_>,
    request: &TaskRequest,
    response: &str,
    model: &str,
    usage: Option<Ending<'_>>,
) -> Option<u64> {
    let user_id = request.user_id.as_str();
    let chat_id = request.chat_id.as_str();
    let mut data = json!({
        "event": "response_generated",
        "user_id": user_id,
        "chat_id": chat_id,
        "response": response,
        "model": model,
        "usage": usage.and_then(|ending| ending.usage),
        "timestamp": now_rfc3339(),
    });
    if let Some(ending) = usage {
        data["finish_reason"] = json!(ending.finish_reason);
    }
    stream.send("llm_response", json!({ "data": data })).await
}

async fn complete(
    stream: &Stream<'_>,
    ctx: &Context,
    request: &TaskRequest,
    response: String,
    model: &str,
    // Named `usage` like `send_response`'s: the usage and the finish reason.
    usage: Option<Ending<'_>>,
) -> Outcome {
    // The exchange joins the chat's history only once it is complete, so a failed or
    // cancelled attempt never becomes context for the next prompt.
    if stream.abandon.is_cancelled() {
        return completed(response);
    }
    if let Err(err) = ctx
        .store
        .add_chat_exchange(
            request.user_id.as_str(),
            request.chat_id.as_str(),
            &request.prompt,
            &response,
        )
        .await
    {
        tracing::warn!(task_id = stream.task_id, error = %err, "saving the chat exchange failed");
    }
    stream.reached(Phase::Saved, 0, None).await;
    let offset = send_response(stream, request, &response, model, usage).await;
    stream.reached(Phase::Responded, 0, offset).await;
    stream
        .end(completed(response), "completed", "Response completed")
        .await
}

#[cfg(test)]
mod tests;
