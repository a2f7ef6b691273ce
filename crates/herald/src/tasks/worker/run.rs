//! One run of a task: the LLM call and the streaming loop (`run`), the answer's state
//! while it streams (`Answer`), and the replay of a resumed answer (`Replay`).

use std::borrow::Cow;

use futures_util::StreamExt;
use serde_json::json;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use crate::channel::now_rfc3339;
use crate::compose::llm::{LlmMessage, LlmStatus, THINKING_MESSAGE};
use crate::llm::{ChatMessage, LlmError, LlmEvent, LlmRequest, Usage};
use crate::tasks::worker::{
    final_llm_status, record_announced, Context, Ended, Job, Outcome, Phase, Resume, Stream,
};
use crate::tasks::{TaskRequest, TaskStatus};

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
    let Some(stream) = Stream::open(ctx, task_id, request, abandon, checkpoint) else {
        let outcome = Outcome {
            status: TaskStatus::Failed,
            response: None,
            error: Some("invalid user id".to_owned()),
        };
        record_announced(checkpoint, &outcome).await;
        return Some(outcome);
    };
    // A resumed task whose stream told the user it failed or was cancelled ends so.
    if let Some(ended) = resume.ended {
        return finish_ended(&stream, ended).await;
    }
    // A resumed task that had already finished its answer only sends what is missing.
    if resume.phase >= Phase::Saved {
        return finish_saved(&stream, resume).await;
    }
    let started = Instant::now();
    if resume.phase < Phase::Started {
        announce_start(&stream).await;
    }
    let llm_request = chat_request(ctx, task_id, request).await;

    // At shutdown a running task gets the drain window to finish; then it is ended, or
    // handed back to the shared queue.
    let shutdown_deadline = async {
        crate::sync::cancelled(&ctx.shutdown).await;
        tokio::time::sleep(ctx.drain).await;
    };
    tokio::pin!(shutdown_deadline);
    // Made once, not per event (each one made registers with its token under a lock and
    // deregisters when dropped), and polled without a lock while nothing happens.
    let cancelled = crate::sync::cancelled(cancel);
    tokio::pin!(cancelled);
    let abandoned = crate::sync::cancelled(abandon);
    tokio::pin!(abandoned);

    let mut events = tokio::select! {
        result = ctx.provider.stream(llm_request) => match result {
            Ok(events) => events,
            Err(err) => {
                tracing::warn!(task_id, kind = err.kind().label(), detail = err.detail(), "llm request failed");
                return finished(abandon, stream.failed(&err).await);
            }
        },
        () = &mut cancelled => return finished(abandon, stream.cancelled().await),
        () = &mut abandoned => return None,
        () = &mut shutdown_deadline => return stream.shut_down().await,
    };

    let mut answer = Answer::new(resume, started);
    loop {
        let next = tokio::select! {
            next = next_event(&mut events, answer.flush_at) => next,
            () = &mut cancelled => {
                drop(events);
                return finished(abandon, stream.cancelled().await);
            }
            () = &mut abandoned => return None,
            () = &mut shutdown_deadline => {
                drop(events);
                return stream.shut_down().await;
            }
        };
        match next {
            // The coalescing window closed: send what was joined.
            None => answer.flush(&stream).await,
            Some(Some(Ok(LlmEvent::Delta(delta)))) => answer.delta(&stream, &delta).await,
            Some(Some(Ok(LlmEvent::Done {
                usage,
                model,
                finish_reason,
            }))) => {
                answer.finish(&stream, usage).await;
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
                let outcome = complete(&stream, answer.response, &model, usage).await;
                return finished(abandon, outcome);
            }
            Some(Some(Err(err))) => {
                tracing::warn!(
                    task_id,
                    kind = err.kind().label(),
                    detail = err.detail(),
                    "llm stream failed"
                );
                answer.flush_pending(&stream).await;
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

/// A resumed task whose answer was already saved: sends what is missing of
/// `llm_response` and the final `llm_status`.
async fn finish_saved(stream: &Stream<'_>, resume: Resume) -> Option<Outcome> {
    if resume.phase < Phase::Responded {
        let offset = send_response(stream, &resume.text, &stream.request.model, None).await;
        stream.reached(Phase::Responded, resume.next_index, offset).await;
    }
    let outcome = completed(resume.text);
    if resume.phase < Phase::Completed {
        return finished(stream.abandon, stream.end(outcome, LlmStatus::Completed).await);
    }
    // The final status is out already: only the end is missing.
    record_announced(stream.checkpoint, &outcome).await;
    finished(stream.abandon, outcome)
}

/// A resumed task whose stream already ended in a failure or a cancel: records that
/// end and sends the final `llm_status` if it is missing.
pub(super) async fn finish_ended(stream: &Stream<'_>, ended: Ended) -> Option<Outcome> {
    let outcome = Outcome {
        status: ended.status,
        response: None,
        error: ended.error,
    };
    if ended.announced {
        record_announced(stream.checkpoint, &outcome).await;
        return finished(stream.abandon, outcome);
    }
    let status = final_llm_status(ended.status).unwrap_or(LlmStatus::Failed);
    finished(stream.abandon, stream.end(outcome, status).await)
}

/// `llm_status started`, `llm_status thinking` and the thinking frame.
async fn announce_start(stream: &Stream<'_>) {
    stream.status(LlmStatus::Started).await;
    stream.status(LlmStatus::Thinking).await;
    let offset = stream
        .send(LlmMessage::Thinking {
            message: THINKING_MESSAGE,
        })
        .await;
    stream.reached(Phase::Started, 0, offset).await;
}

/// The LLM request: the chat's earlier turns (when the store has them), then the prompt.
async fn chat_request(ctx: &Context, task_id: &str, request: &TaskRequest) -> LlmRequest {
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
    LlmRequest {
        model: request.model.clone(),
        messages,
    }
}

/// The answer as it streams: what was sent, what waits for the coalescing window, and
/// the timings for the metrics.
struct Answer {
    /// Whether `llm_status streaming` went out (before this run, or in it).
    streaming: bool,
    replay: Replay,
    /// The answer so far, as the user has it.
    response: String,
    /// The index of the next frame.
    index: u64,
    n_deltas: u64,
    /// Fresh text joined while the coalescing window is open.
    pending: String,
    started: Instant,
    first_token_at: Option<Instant>,
    /// When the coalescing window closes.
    flush_at: Option<Instant>,
}

impl Answer {
    fn new(resume: Resume, started: Instant) -> Self {
        Self {
            streaming: resume.phase >= Phase::Streaming,
            replay: Replay {
                sent: resume.text.clone(),
                matched: 0,
            },
            response: resume.text,
            index: resume.next_index,
            n_deltas: 0,
            pending: String::new(),
            started,
            first_token_at: None,
            flush_at: None,
        }
    }

    /// Sends what the coalescing window joined as one frame.
    async fn flush(&mut self, stream: &Stream<'_>) {
        stream.frame(&self.response, self.pending.len(), self.index).await;
        self.index += 1;
        self.pending.clear();
        self.flush_at = None;
    }

    /// Sends what waits for the coalescing window, if anything (the answer ends).
    async fn flush_pending(&mut self, stream: &Stream<'_>) {
        if !self.pending.is_empty() {
            stream.frame(&self.response, self.pending.len(), self.index).await;
        }
    }

    async fn delta(&mut self, stream: &Stream<'_>, delta: &str) {
        let ctx = stream.ctx;
        if self.first_token_at.is_none() {
            let now = Instant::now();
            self.first_token_at = Some(now);
            ctx.publisher.metrics().llm_first_token(now - self.started);
        }
        self.n_deltas += 1;
        let fresh = match self.replay.fresh(delta) {
            Ok(fresh) => Cow::Borrowed(fresh),
            Err(()) => {
                // Only a retried answer is compared, and only until it has passed the
                // text sent before: nothing new was sent yet.
                tracing::info!(
                    task_id = stream.task_id,
                    "the retried answer differs from the text already sent; restarting it"
                );
                stream.restart().await;
                self.response.clear();
                self.index = 0;
                Cow::Owned(self.replay.restart(delta))
            }
        };
        if fresh.is_empty() {
            return;
        }
        if !self.streaming {
            self.streaming = true;
            let offset = stream.status(LlmStatus::Streaming).await;
            stream.reached(Phase::Streaming, self.index, offset).await;
        }
        self.response.push_str(&fresh);
        if ctx.coalesce.is_zero() {
            stream.frame(&self.response, fresh.len(), self.index).await;
            self.index += 1;
        } else {
            self.pending.push_str(&fresh);
            self.flush_at.get_or_insert_with(|| Instant::now() + ctx.coalesce);
        }
    }

    /// The LLM is done: sends what is pending, restarts a retried answer that fell
    /// short of the text sent, and records the tokens per second.
    async fn finish(&mut self, stream: &Stream<'_>, usage: Option<Usage>) {
        self.flush_pending(stream).await;
        if !self.replay.complete() {
            tracing::info!(
                task_id = stream.task_id,
                "the retried answer is shorter than the text already sent; restarting it"
            );
            stream.restart().await;
            self.response = self.replay.restart("");
            if !self.response.is_empty() {
                stream.frame(&self.response, self.response.len(), 0).await;
            }
        }
        if let Some(first) = self.first_token_at {
            let secs = first.elapsed().as_secs_f64();
            let tokens = usage.map_or(self.n_deltas, |u| u.completion_tokens);
            if secs > 0.0 {
                stream
                    .ctx
                    .publisher
                    .metrics()
                    .llm_tokens_per_second(tokens as f64 / secs);
            }
        }
    }
}

/// The deltas of a retried answer that the user already has are dropped; what is left
/// goes out. A retried answer that differs from the text already sent is noticed, and
/// restarts the answer.
pub(super) struct Replay {
    pub(super) sent: String,
    pub(super) matched: usize,
}

impl Replay {
    /// The part of `delta` the user does not have yet, or `Err` if it contradicts what
    /// was sent.
    pub(super) fn fresh<'d>(&mut self, delta: &'d str) -> Result<&'d str, ()> {
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

    pub(super) fn complete(&self) -> bool {
        self.matched == self.sent.len()
    }

    /// The retried answer so far, `delta` being its last piece, once it was found to
    /// differ from the text sent; from then on every delta is fresh.
    pub(super) fn restart(&mut self, delta: &str) -> String {
        let mut answer = self.sent.get(..self.matched).unwrap_or_default().to_owned();
        answer.push_str(delta);
        self.sent.clear();
        self.matched = 0;
        answer
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
    response: &str,
    model: &str,
    usage: Option<Ending<'_>>,
) -> Option<u64> {
    let user_id = stream.request.user_id.as_str();
    let chat_id = stream.request.chat_id.as_str();
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
    stream.send(LlmMessage::Response { data }).await
}

async fn complete(
    stream: &Stream<'_>,
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
    let request = stream.request;
    if let Err(err) = stream
        .ctx
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
    let offset = send_response(stream, &response, model, usage).await;
    stream.reached(Phase::Responded, 0, offset).await;
    stream.end(completed(response), LlmStatus::Completed).await
}
