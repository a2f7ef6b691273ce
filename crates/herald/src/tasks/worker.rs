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

use std::sync::Arc;
use std::time::Duration;

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
}

impl Stream<'_> {
    async fn send(&self, kind: &str, fields: Value) {
        let mut message = Map::new();
        message.insert("type".to_owned(), json!(kind));
        if let Value::Object(fields) = fields {
            message.extend(fields);
        }
        message.insert("user_id".to_owned(), json!(self.request.user_id.as_str()));
        message.insert("chat_id".to_owned(), json!(self.request.chat_id.as_str()));
        message.insert("task_id".to_owned(), json!(self.task_id));
        if let Err(err) = self
            .ctx
            .publisher
            .publish(&self.channel, &Draft::from_object(message))
            .await
        {
            // The stream goes on: the client learns of the gap on resume.
            tracing::warn!(task_id = self.task_id, error = %err, "publishing a task message failed");
        }
    }

    async fn status(&self, status: &str, message: &str) {
        self.send("llm_status", json!({"status": status, "message": message}))
            .await;
    }

    async fn frame(&self, delta: &str, index: u64) {
        self.send(
            "llm_frame",
            json!({"frame": {"status": "streaming", "delta": delta, "index": index}}),
        )
        .await;
    }

    async fn failed(&self, error: &LlmError) -> Outcome {
        let text = format!("LLM processing failed: {error}");
        self.send("llm_error", json!({"error": text})).await;
        self.status("failed", "Task failed").await;
        Outcome {
            status: TaskStatus::Failed,
            response: None,
            error: Some(text),
        }
    }

    async fn shut_down(&self) -> Outcome {
        tracing::warn!(task_id = self.task_id, "task ended by shutdown");
        self.send("llm_error", json!({"error": SHUT_DOWN})).await;
        self.status("failed", "Task failed").await;
        Outcome {
            status: TaskStatus::Failed,
            response: None,
            error: Some(SHUT_DOWN.to_owned()),
        }
    }

    async fn cancelled(&self) -> Outcome {
        self.status("cancelled", "Task cancelled").await;
        Outcome {
            status: TaskStatus::Cancelled,
            response: None,
            error: None,
        }
    }
}

/// The user's frame stream (user ids are validated on submit, so this only fails if
/// that ever changed).
fn frames_channel(request: &TaskRequest) -> Option<Channel> {
    Channel::new(ChannelKind::Frames, request.user_id.as_str()).ok()
}

/// Ends a task that never started (cancelled or shut down while queued).
pub async fn publish_unstarted_end(
    ctx: &Context,
    task_id: &str,
    request: &TaskRequest,
    status: TaskStatus,
    error: Option<&str>,
) {
    let Some(channel) = frames_channel(request) else {
        return;
    };
    let stream = Stream {
        ctx,
        channel,
        task_id,
        request,
    };
    match status {
        TaskStatus::Cancelled => {
            stream.cancelled().await;
        }
        _ => {
            let text = format!(
                "LLM processing failed: {}",
                error.unwrap_or("the task did not run")
            );
            stream.send("llm_error", json!({"error": text})).await;
            stream.status("failed", "Task failed").await;
        }
    }
}

/// Runs a task to its end.
pub async fn run(ctx: &Context, task_id: &str, request: &TaskRequest, cancel: &CancellationToken) -> Outcome {
    let Some(channel) = frames_channel(request) else {
        return Outcome {
            status: TaskStatus::Failed,
            response: None,
            error: Some("invalid user id".to_owned()),
        };
    };
    let stream = Stream {
        ctx,
        channel,
        task_id,
        request,
    };
    let started = Instant::now();
    stream.status("started", "Task started").await;
    stream.status("thinking", THINKING_MESSAGE).await;
    stream
        .send(
            "llm_frame",
            json!({"frame": {"status": "thinking", "message": THINKING_MESSAGE, "progress": "indeterminate"}}),
        )
        .await;

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

    // At shutdown a running task gets the drain window to finish, then it is ended: in
    // memory mode there is no other worker to hand it to.
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
                return stream.failed(&err).await;
            }
        },
        () = cancel.cancelled() => return stream.cancelled().await,
        () = &mut shutdown_deadline => return stream.shut_down().await,
    };

    let mut response = String::new();
    let mut index = 0u64;
    let mut n_deltas = 0u64;
    let mut pending = String::new();
    let mut first_token_at: Option<Instant> = None;
    let mut flush_at: Option<Instant> = None;
    loop {
        let next = tokio::select! {
            next = next_event(&mut events, flush_at) => next,
            () = cancel.cancelled() => {
                drop(events);
                return stream.cancelled().await;
            }
            () = &mut shutdown_deadline => {
                drop(events);
                return stream.shut_down().await;
            }
        };
        match next {
            // The coalescing window closed: send what was joined.
            None => {
                stream.frame(&pending, index).await;
                index += 1;
                pending.clear();
                flush_at = None;
            }
            Some(Some(Ok(LlmEvent::Delta(delta)))) => {
                if first_token_at.is_none() {
                    let now = Instant::now();
                    first_token_at = Some(now);
                    ctx.publisher.metrics().llm_first_token(now - started);
                    stream.status("streaming", "Streaming response").await;
                }
                response.push_str(&delta);
                n_deltas += 1;
                if ctx.coalesce.is_zero() {
                    stream.frame(&delta, index).await;
                    index += 1;
                } else {
                    pending.push_str(&delta);
                    flush_at.get_or_insert_with(|| Instant::now() + ctx.coalesce);
                }
            }
            Some(Some(Ok(LlmEvent::Done { usage, model }))) => {
                if !pending.is_empty() {
                    stream.frame(&pending, index).await;
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
                    return stream.cancelled().await;
                }
                return complete(&stream, ctx, request, response, &model, usage).await;
            }
            Some(Some(Err(err))) => {
                tracing::warn!(
                    task_id,
                    kind = err.kind().label(),
                    detail = err.detail(),
                    "llm stream failed"
                );
                if !pending.is_empty() {
                    stream.frame(&pending, index).await;
                }
                return stream.failed(&err).await;
            }
            Some(None) => {
                let err = LlmError::new(
                    crate::llm::LlmErrorKind::Interrupted,
                    "the stream ended without Done",
                );
                return stream.failed(&err).await;
            }
        }
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

async fn complete(
    stream: &Stream<'_>,
    ctx: &Context,
    request: &TaskRequest,
    response: String,
    model: &str,
    usage: Option<Usage>,
) -> Outcome {
    let user_id = request.user_id.as_str();
    let chat_id = request.chat_id.as_str();
    // The exchange joins the chat's history only once it is complete, so a failed or
    // cancelled attempt never becomes context for the next prompt.
    if let Err(err) = ctx
        .store
        .add_chat_exchange(user_id, chat_id, &request.prompt, &response)
        .await
    {
        tracing::warn!(task_id = stream.task_id, error = %err, "saving the chat exchange failed");
    }
    stream
        .send(
            "llm_response",
            json!({"data": {
                "event": "response_generated",
                "user_id": user_id,
                "chat_id": chat_id,
                "response": response,
                "model": model,
                "usage": usage,
                "timestamp": now_rfc3339(),
            }}),
        )
        .await;
    stream.status("completed", "Response completed").await;
    Outcome {
        status: TaskStatus::Completed,
        response: Some(response),
        error: None,
    }
}
