//! LLM streams over HTTP (SPEC §10), for clients that cannot or will not hold a
//! WebSocket:
//! - `GET /api/chat/tasks/{task_id}/events`: one task's messages as server-sent
//!   events, `id` the offset, `event` the type, `data` the socket's JSON; resumable
//!   with `Last-Event-ID`.
//! - `POST /api/chat/ui` and `GET /api/chat/ui/{chat_id}/stream`: the Vercel AI SDK's
//!   UI message stream, so `useChat` with `DefaultChatTransport` works unchanged,
//!   resume included.
//!
//! Both follow the task through [`crate::follow`], the socket path's machinery; this
//! module only turns what it yields into SSE.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::app::AppState;
use crate::compose::llm::{LlmKind, LlmStatus};
use crate::follow::{follow, latest_task_of_chat, Followed, Start, TaskMessage};
use crate::http::chat::{model_of, not_found, string_field};
use crate::http::error::ApiError;
use crate::http::extract::User;
use crate::ids::ChatId;
use crate::tasks::{TaskRequest, TaskStatus, MAX_PROMPT_CHARS};

/// The largest `POST /api/chat/ui` body: `useChat` sends the whole conversation with
/// every prompt, so this is larger than the 64 KiB of the other endpoints.
pub const MAX_UI_BODY: usize = 1024 * 1024;

/// The header that tells the AI SDK the body is its UI message stream, version 1.
const UI_STREAM_HEADER: &str = "x-vercel-ai-ui-message-stream";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/chat/tasks/{task_id}/events", get(task_events))
        .route("/api/chat/ui", post(ui_start))
        .route("/api/chat/ui/{chat_id}/stream", get(ui_resume))
}

/// The task's stream as server-sent events, from its first message or after
/// `Last-Event-ID`, ending after its final `llm_status`.
async fn task_events(
    State(state): State<AppState>,
    User(identity): User,
    Path(task_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let start = match headers.get("last-event-id") {
        None => Start::TaskStart,
        Some(value) => match value.to_str().map(str::trim) {
            Ok("") => Start::TaskStart,
            Ok(text) => Start::After(text.parse().map_err(|_| {
                ApiError::BadRequest("Last-Event-ID must be an offset this stream sent".to_owned())
            })?),
            Err(_) => {
                return Err(ApiError::BadRequest(
                    "Last-Event-ID must be an offset this stream sent".to_owned(),
                ))
            }
        },
    };
    let view = state
        .tasks
        .get(&task_id, &identity.user_id)
        .await?
        .ok_or_else(not_found)?;
    let followed = follow(&state, &identity.user_id, task_id, view.status, start);
    let events = receive(followed).map(|followed| Ok::<_, Infallible>(task_event(followed)));
    Ok(sse(&state, events).into_response())
}

/// A [`Followed`] as its SSE event.
fn task_event(followed: Followed) -> Event {
    match followed {
        Followed::Message(message) => {
            let event = Event::default()
                .id(message.offset.to_string())
                .data(String::from_utf8_lossy(&message.bytes));
            // `event:` may not hold a line break; a type that is not a plain word
            // (only a service-API publisher could send one) goes as a `message` event.
            if is_word(&message.kind) {
                event.event(&message.kind)
            } else {
                event
            }
        }
        Followed::Lost(why) => Event::default()
            .event("error")
            .data(json!({"type": "error", "error": "stream_lost", "message": why}).to_string()),
    }
}

fn is_word(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'))
}

/// `useChat`'s request (`{"id", "messages": [UIMessage…], "trigger", …}`): starts a
/// task with the last user message's text and answers with its UI message stream.
async fn ui_start(
    State(state): State<AppState>,
    User(identity): User,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_UI_BODY)
        .await
        .map_err(|_| ApiError::PayloadTooLarge)?;
    let body: Value = serde_json::from_slice(&bytes)
        .map_err(|err| ApiError::BadRequest(format!("the body is not JSON: {err}")))?;
    let chat_id = ChatId::parse(string_field(&body, "id")?)?;
    let prompt = last_user_text(&body)?;
    if prompt.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "the last user message has no text".to_owned(),
        ));
    }
    if prompt.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::BadRequest(format!(
            "the last user message is longer than {MAX_PROMPT_CHARS} characters"
        )));
    }
    let request = TaskRequest {
        user_id: identity.user_id.clone(),
        chat_id,
        prompt,
        model: model_of(&body, &state)?,
    };
    let task_id = state.tasks.submit(request).await?;
    let followed = follow(
        &state,
        &identity.user_id,
        task_id.clone(),
        TaskStatus::Queued,
        Start::TaskStart,
    );
    Ok(ui_response(&state, task_id, followed))
}

/// `useChat({ resume: true })`: the chat's running answer from its start, or 204 when
/// none runs.
async fn ui_resume(
    State(state): State<AppState>,
    User(identity): User,
    Path(chat_id): Path<String>,
) -> Result<Response, ApiError> {
    let chat_id = ChatId::parse(&chat_id)?;
    let Some(task_id) = latest_task_of_chat(&state, &identity.user_id, chat_id.as_str()).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let running = state
        .tasks
        .get(&task_id, &identity.user_id)
        .await?
        .filter(|view| !view.status.is_done());
    let Some(view) = running else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let followed = follow(
        &state,
        &identity.user_id,
        task_id.clone(),
        view.status,
        Start::TaskStart,
    );
    Ok(ui_response(&state, task_id, followed))
}

/// The text of the last `user` message: its `text` parts joined (AI SDK 5 and later),
/// or its `content` string (earlier versions).
fn last_user_text(body: &Value) -> Result<String, ApiError> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::BadRequest("messages is required and must be an array".to_owned()))?;
    let message = messages
        .iter()
        .rev()
        .find(|message| message.get("role").and_then(Value::as_str) == Some("user"))
        .ok_or_else(|| ApiError::BadRequest("messages has no user message".to_owned()))?;
    if let Some(parts) = message.get("parts").and_then(Value::as_array) {
        let text: String = parts
            .iter()
            .filter(|part| part.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n");
        return Ok(text);
    }
    Ok(message
        .get("content")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned())
}

/// The UI message stream of a followed task, with the AI SDK's headers.
fn ui_response(state: &AppState, task_id: String, followed: mpsc::Receiver<Followed>) -> Response {
    let mut ui = UiStream::new(task_id);
    let start = futures_util::stream::iter(ui.start());
    let chunks = receive(followed).flat_map(move |followed| futures_util::stream::iter(ui.next(followed)));
    let events = start
        .chain(chunks)
        .map(|data| Ok::<_, Infallible>(Event::default().data(data)));
    let mut response = sse(state, events).into_response();
    let headers = response.headers_mut();
    headers.insert(UI_STREAM_HEADER, HeaderValue::from_static("v1"));
    // Nginx buffers a response unless told not to, which would hold the stream back.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Turns a task's messages into UI message stream chunks (the `data` of each event).
///
/// The answer is one text part: `text-start` at the first streaming frame, a
/// `text-delta` per frame, `text-end` and `finish` at `completed`, then `[DONE]`. A
/// failure is an `error` chunk with the `llm_error` text; a cancel ends the answer
/// with `finish` (the SDK's own stop is the client closing the request). If the
/// answer restarts (`llm_status restarted`, a task taken over from a stopped worker),
/// the text so far ends and the new answer is a new text part.
struct UiStream {
    task_id: String,
    /// The open text part's id, if one is open.
    text_id: Option<String>,
    /// Text parts opened so far, for their ids.
    n_parts: usize,
    /// Whether any text was sent, so an `llm_response` without frames still shows.
    sent_text: bool,
    /// The `llm_error` text, sent at `failed`.
    error: Option<String>,
}

impl UiStream {
    fn new(task_id: String) -> Self {
        Self {
            task_id,
            text_id: None,
            n_parts: 0,
            sent_text: false,
            error: None,
        }
    }

    fn start(&self) -> Vec<String> {
        vec![json!({"type": "start", "messageId": self.task_id}).to_string()]
    }

    fn next(&mut self, followed: Followed) -> Vec<String> {
        let message = match followed {
            Followed::Message(message) => message,
            Followed::Lost(_) => {
                let mut chunks = self.end_text();
                let text = "the answer's stream was interrupted; reload the chat";
                chunks.push(json!({"type": "error", "errorText": text}).to_string());
                chunks.push("[DONE]".to_owned());
                return chunks;
            }
        };
        let Ok(value) = serde_json::from_slice::<Value>(&message.bytes) else {
            return Vec::new();
        };
        self.chunks_of(&message, &value)
    }

    fn chunks_of(&mut self, message: &TaskMessage, value: &Value) -> Vec<String> {
        let str_at = |pointer: &str| value.pointer(pointer).and_then(Value::as_str);
        let mut chunks = Vec::new();
        let status = str_at("/status").and_then(LlmStatus::parse);
        match (LlmKind::parse(&message.kind), status) {
            (Some(LlmKind::Frame), _) if str_at("/frame/status") == Some(LlmStatus::Streaming.as_str()) => {
                if let Some(delta) = str_at("/frame/delta").filter(|delta| !delta.is_empty()) {
                    chunks.extend(self.delta(delta));
                }
            }
            (Some(LlmKind::Response), _) if !self.sent_text => {
                if let Some(response) = str_at("/data/response").filter(|text| !text.is_empty()) {
                    chunks.extend(self.delta(response));
                }
            }
            (Some(LlmKind::Error), _) => self.error = str_at("/error").map(str::to_owned),
            (Some(LlmKind::Status), Some(LlmStatus::Restarted)) => chunks.extend(self.end_text()),
            (Some(LlmKind::Status), Some(LlmStatus::Completed | LlmStatus::Cancelled)) => {
                chunks.extend(self.end_text());
                chunks.push(json!({"type": "finish"}).to_string());
                chunks.push("[DONE]".to_owned());
            }
            (Some(LlmKind::Status), Some(LlmStatus::Failed)) => {
                chunks.extend(self.end_text());
                let text = self
                    .error
                    .take()
                    .unwrap_or_else(|| "LLM processing failed".to_owned());
                chunks.push(json!({"type": "error", "errorText": text}).to_string());
                chunks.push("[DONE]".to_owned());
            }
            _ => {}
        }
        chunks
    }

    fn delta(&mut self, delta: &str) -> Vec<String> {
        let mut chunks = Vec::new();
        let id = match &self.text_id {
            Some(id) => id.clone(),
            None => {
                let id = format!("text-{}", self.n_parts);
                self.n_parts += 1;
                chunks.push(json!({"type": "text-start", "id": id}).to_string());
                self.text_id = Some(id.clone());
                id
            }
        };
        chunks.push(json!({"type": "text-delta", "id": id, "delta": delta}).to_string());
        self.sent_text = true;
        chunks
    }

    fn end_text(&mut self) -> Vec<String> {
        self.text_id
            .take()
            .map(|id| json!({"type": "text-end", "id": id}).to_string())
            .into_iter()
            .collect()
    }
}

/// The follower's messages as a stream.
fn receive(followed: mpsc::Receiver<Followed>) -> impl Stream<Item = Followed> {
    futures_util::stream::unfold(followed, |mut followed| async move {
        followed.recv().await.map(|item| (item, followed))
    })
}

/// An SSE response with the configured keep-alive comment.
fn sse<S>(state: &AppState, events: S) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(state.config.sse_keep_alive)
            .text("keep-alive"),
    )
}
