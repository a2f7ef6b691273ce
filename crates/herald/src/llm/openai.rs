//! The OpenAI-compatible provider: `POST {base}/chat/completions` with `stream: true`,
//! read as server-sent events (REFERENCES §2.4).
//!
//! It speaks the chat-completions streaming format that OpenAI, vLLM, llama.cpp and
//! Ollama's `/v1` endpoint share; Ollama's native NDJSON API (REFERENCES §2.5) is not
//! spoken, so point `HERALD_LLM_BASE_URL` at `http://host:11434/v1`.
//!
//! A request goes through two phases:
//! 1. **Before the first token**, refused attempts (429, 5xx, connection refused) are
//!    retried with capped exponential backoff and jitter, honouring `Retry-After`, up
//!    to [`RetryPolicy::max_attempts`]. Nothing has reached the user yet, so a retry is
//!    invisible to them.
//! 2. **After the first token** nothing is retried: a user has seen part of a reply,
//!    and a second generation would not continue it. A failure ends the stream.
//!
//! The SSE framing is parsed by the `eventsource-stream` crate (the parser async-openai
//! uses) over reqwest's byte stream, so events split across reads, CRLF line ends,
//! multi-line `data:` and `: keep-alive` comments are handled by a maintained parser
//! that follows the WHATWG algorithm; this module only interprets each event's data.

use std::error::Error as _;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use rand::Rng;
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::time::{timeout_at, Instant};

use super::{ChatMessage, LlmError, LlmErrorKind, LlmEvent, LlmProvider, LlmRequest, LlmStream, Usage};
use crate::config::Secret;

/// The provider's [`LlmProvider::name`].
pub const NAME: &str = "openai-compatible";

/// How much of a refused request's body is read for the log detail. Error bodies are
/// small JSON objects; a proxy's HTML error page need not be read whole.
const MAX_ERROR_BODY_BYTES: usize = 16 * 1024;

/// How to reach an OpenAI-compatible API. Passed explicitly; see
/// [`super::from_config`] for the values taken from `Config`.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// The API base, ending in `/v1` (`HERALD_LLM_BASE_URL`); `/chat/completions` is
    /// appended.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …` when set (`HERALD_LLM_API_KEY`). Local servers
    /// (Ollama, llama.cpp) need none.
    pub api_key: Option<Secret>,
    pub timeouts: LlmTimeouts,
    pub retry: RetryPolicy,
}

impl OpenAiConfig {
    /// `base_url` with no key, the default timeouts and the default retries.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            timeouts: LlmTimeouts::default(),
            retry: RetryPolicy::default(),
        }
    }
}

/// How long each phase of a generation may take; exceeding any is
/// [`LlmErrorKind::TimedOut`]. There is no limit on a whole generation: a long reply
/// that keeps producing tokens is fine, and a user can cancel it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlmTimeouts {
    /// Establishing the TCP (and TLS) connection. 10 s: a healthy API connects in
    /// milliseconds, so anything this slow is down or unroutable.
    pub connect: Duration,
    /// From sending an attempt to its first non-empty delta, response headers included.
    /// 60 s: large models with long prompts can think for tens of seconds before the
    /// first token. Each retry attempt gets its own.
    pub first_token: Duration,
    /// The longest silence between two events once a token has arrived (`: ping`
    /// comments do not count as events). 30 s: a generating model sends tokens many
    /// times a second; a gap this long means it is stuck.
    pub between_tokens: Duration,
}

impl Default for LlmTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            first_token: Duration::from_secs(60),
            between_tokens: Duration::from_secs(30),
        }
    }
}

/// When and how often a refused request is tried again (429, 5xx and connection
/// failures, before the first token only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. 3: enough to ride out a blip or a short
    /// rate-limit window; beyond that the user has waited long enough to be told.
    pub max_attempts: u32,
    /// The backoff before the second attempt; it doubles for each later one.
    pub base_delay: Duration,
    /// The backoff never grows past this.
    pub max_delay: Duration,
    /// A `Retry-After` longer than this is cut to it, so an upstream asking for an hour
    /// cannot hold a worker for an hour; the attempt then most likely fails again and
    /// the user is told "rate limit exceeded".
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based): what upstream asked for
    /// in `Retry-After` (capped), or else the jittered backoff.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(asked) = retry_after {
            return asked.min(self.max_retry_after);
        }
        let backoff = self.backoff(attempt);
        // "Equal jitter": half fixed, half random. Workers refused at the same moment
        // spread out, and none retries at once.
        backoff / 2 + rand::rng().random_range(Duration::ZERO..=backoff / 2)
    }

    /// The backoff before jitter: `base_delay × 2^(attempt − 1)`, at most `max_delay`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        self.base_delay.saturating_mul(1 << doublings).min(self.max_delay)
    }
}

/// A client for one OpenAI-compatible API. Cheap to share: reqwest pools connections.
pub struct OpenAiProvider {
    client: reqwest::Client,
    url: reqwest::Url,
    api_key: Option<Secret>,
    errors: Errors,
    timeouts: LlmTimeouts,
    retry: RetryPolicy,
}

impl OpenAiProvider {
    pub fn new(config: OpenAiConfig) -> anyhow::Result<Self> {
        let url = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        let url = reqwest::Url::parse(&url)
            .map_err(|err| anyhow::anyhow!("the LLM base URL is not a valid URL: {err}"))?;
        let client = reqwest::Client::builder()
            .connect_timeout(config.timeouts.connect)
            .build()
            .map_err(|err| anyhow::anyhow!("cannot build the LLM HTTP client: {err}"))?;
        let api_key = config.api_key.filter(|key| !key.expose().is_empty());
        Ok(Self {
            client,
            url,
            errors: Errors {
                api_key: api_key.clone(),
            },
            api_key,
            timeouts: config.timeouts,
            retry: config.retry,
        })
    }

    /// One attempt: sends the request and returns the response once its status says
    /// the stream is coming.
    async fn attempt(&self, body: &Bytes, deadline: Instant) -> Result<reqwest::Response, Refusal> {
        let mut request = self
            .client
            .post(self.url.clone())
            .header(ACCEPT, "text/event-stream")
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone());
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose());
        }
        let response = match timeout_at(deadline, request.send()).await {
            Err(_) => {
                return Err(Refusal::fatal(self.errors.error(
                    LlmErrorKind::TimedOut,
                    "no response before the first-token timeout",
                )))
            }
            Ok(Err(err)) => return Err(self.transport_refusal(&err)),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("text/event-stream");
            if !content_type.starts_with("text/event-stream") {
                let detail = format!("HTTP {status} with content type {content_type}, not an event stream");
                return Err(Refusal::fatal(self.errors.error(LlmErrorKind::Upstream, &detail)));
            }
            return Ok(response);
        }
        let retry_after = retry_after(response.headers());
        let body = read_error_body(response, deadline).await;
        let detail = format!("HTTP {status}: {}", upstream_message(&body));
        Err(Refusal {
            error: self.errors.error(kind_for_refusal(status, &body), &detail),
            retryable: status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error(),
            retry_after,
        })
    }

    fn transport_refusal(&self, err: &reqwest::Error) -> Refusal {
        let detail = format!("sending the request failed: {}", error_chain(err));
        if err.is_timeout() {
            // A connect timeout: retrying would multiply a wait that is already long.
            Refusal::fatal(self.errors.error(LlmErrorKind::TimedOut, &detail))
        } else {
            Refusal {
                error: self.errors.error(LlmErrorKind::Upstream, &detail),
                // A refused connection never reached upstream, so trying again is safe.
                // A failure after connecting may have started a generation: not retried.
                retryable: err.is_connect(),
                retry_after: None,
            }
        }
    }
}

#[async_trait]
impl LlmProvider for OpenAiProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn stream(&self, request: LlmRequest) -> Result<LlmStream, LlmError> {
        let body = WireRequest {
            model: &request.model,
            messages: &request.messages,
            stream: true,
            stream_options: StreamOptions { include_usage: true },
        };
        let body = serde_json::to_vec(&body).map(Bytes::from).map_err(|err| {
            self.errors.error(
                LlmErrorKind::Rejected,
                format!("cannot encode the request: {err}"),
            )
        })?;
        let mut attempt = 1;
        loop {
            let deadline = deadline_after(self.timeouts.first_token);
            match self.attempt(&body, deadline).await {
                Ok(response) => {
                    let errors = self.errors.clone();
                    let body = response.bytes_stream().map(move |chunk| {
                        chunk.map_err(|err| {
                            let detail = format!("reading the stream failed: {}", error_chain(&err));
                            errors.error(LlmErrorKind::Interrupted, detail)
                        })
                    });
                    let errors = self.errors.clone();
                    return Ok(decode(
                        body,
                        request.model,
                        deadline,
                        self.timeouts.between_tokens,
                        errors,
                    ));
                }
                Err(refusal) if refusal.retryable && attempt < self.retry.max_attempts => {
                    let delay = self.retry.delay(attempt, refusal.retry_after);
                    tracing::info!(
                        attempt,
                        reason = refusal.error.kind().label(),
                        detail = refusal.error.detail(),
                        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "llm request refused; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(refusal) => return Err(refusal.error),
            }
        }
    }
}

/// Makes errors, hiding the configured key from their details as well, in case upstream
/// echoes it back in a form the generic redaction does not recognise.
#[derive(Clone, Default)]
struct Errors {
    api_key: Option<Secret>,
}

impl Errors {
    fn error(&self, kind: LlmErrorKind, detail: impl AsRef<str>) -> LlmError {
        match &self.api_key {
            Some(key) => LlmError::hiding(kind, detail, &[key.expose()]),
            None => LlmError::new(kind, detail),
        }
    }
}

/// `now + timeout`, saturating instead of panicking on an absurdly large timeout.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// A failed attempt, and whether another may follow.
struct Refusal {
    error: LlmError,
    retryable: bool,
    /// What upstream asked for in `Retry-After` or `retry-after-ms`.
    retry_after: Option<Duration>,
}

impl Refusal {
    fn fatal(error: LlmError) -> Self {
        Self {
            error,
            retryable: false,
            retry_after: None,
        }
    }
}

/// What a refusal means to a user, from its status and its body (SPEC §10): an
/// unknown model is [`LlmErrorKind::ModelUnavailable`] whether upstream says so with
/// 404 (OpenAI's `model_not_found`, vLLM, Ollama) or with 400 (LiteLLM's
/// `invalid_request_error` "Invalid model name").
fn kind_for_refusal(status: StatusCode, body: &str) -> LlmErrorKind {
    match status.as_u16() {
        401 | 403 => LlmErrorKind::Unauthorized,
        404 => LlmErrorKind::ModelUnavailable,
        408 => LlmErrorKind::TimedOut,
        429 => LlmErrorKind::RateLimited,
        400..=499 if is_model_error(body) => LlmErrorKind::ModelUnavailable,
        400..=499 => LlmErrorKind::Rejected,
        _ => LlmErrorKind::Upstream,
    }
}

/// Whether a refusal's body says the model is unknown: the error's `code` is
/// `model_not_found`, or its message names the model as invalid, unknown or missing.
/// Only the `error` object is read (or the whole body when it is not one), so the
/// word "model" elsewhere, in a context-length message for one, does not count.
fn is_model_error(body: &str) -> bool {
    let parsed = serde_json::from_str::<serde_json::Value>(body).ok();
    let error = parsed.as_ref().and_then(|value| value.get("error"));
    let code = error
        .and_then(|error| error.get("code"))
        .and_then(serde_json::Value::as_str);
    if code == Some("model_not_found") {
        return true;
    }
    let message = match error {
        Some(serde_json::Value::String(message)) => message.clone(),
        Some(error) => error
            .get("message")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        // vLLM's `{"object":"error","message":…}`, or a body that is not JSON.
        None => parsed
            .as_ref()
            .and_then(|value| value.get("message"))
            .and_then(serde_json::Value::as_str)
            .map_or_else(|| body.to_owned(), str::to_owned),
    }
    .to_lowercase();
    const MODEL_MISSING: [&str; 7] = [
        "invalid model",
        "unknown model",
        "model not found",
        "model_not_found",
        "no such model",
        "does not exist",
        "not found",
    ];
    message.contains("model") && MODEL_MISSING.iter().any(|phrase| message.contains(phrase))
}

/// The wait upstream asked for: `retry-after-ms` (OpenAI's, in milliseconds) or
/// `Retry-After` in seconds. The HTTP-date form of `Retry-After` is ignored, and the
/// backoff applies.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let value: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        (value.is_finite() && value >= 0.0).then_some(value)
    };
    if let Some(ms) = number("retry-after-ms") {
        return Some(Duration::from_secs_f64(ms.min(1e9) / 1000.0));
    }
    number("retry-after").map(|secs| Duration::from_secs_f64(secs.min(1e6)))
}

/// Reads up to [`MAX_ERROR_BODY_BYTES`] of a refused request's body, as far as
/// `deadline` allows.
async fn read_error_body(mut response: reqwest::Response, deadline: Instant) -> String {
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY_BYTES {
        match timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY_BYTES);
    String::from_utf8_lossy(&body).into_owned()
}

/// The message of an OpenAI-style `{"error": {"message": …}}` body, or the body itself.
fn upstream_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|value| value.get("error").map(error_message))
        .unwrap_or_else(|| body.trim().to_owned())
}

/// The text of an upstream `error` value: an object with `message` (OpenAI) or a
/// string (Ollama).
fn error_message(error: &serde_json::Value) -> String {
    match error {
        serde_json::Value::String(message) => message.clone(),
        other => {
            let field = |name: &str| other.get(name).and_then(serde_json::Value::as_str);
            let message = field("message").unwrap_or("an error occurred during streaming");
            match field("type").or(field("code")) {
                Some(code) => format!("{code}: {message}"),
                None => message.to_owned(),
            }
        }
    }
}

/// An error and its sources on one line, without the request URL.
fn error_chain(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Turns a `200 text/event-stream` body into the generation's events.
///
/// `first_token_deadline` bounds the wait for the first non-empty delta; after it,
/// each event must follow the previous one within `between_tokens`.
fn decode<S>(
    body: S,
    model: String,
    first_token_deadline: Instant,
    between_tokens: Duration,
    errors: Errors,
) -> LlmStream
where
    S: Stream<Item = Result<Bytes, LlmError>> + Send + 'static,
{
    let decoder = Decoder {
        events: Some(body.eventsource().boxed()),
        model,
        usage: None,
        finish_reason: None,
        first_token_deadline,
        between_tokens,
        started: false,
        errors,
    };
    futures_util::stream::unfold(decoder, |mut decoder| async move {
        let event = decoder.next().await?;
        Some((event, decoder))
    })
    .boxed()
}

/// The state of one generation's stream.
struct Decoder {
    /// The parsed SSE events; `None` once the stream has ended, which drops the
    /// response and frees its connection even if the consumer keeps the stream.
    events: Option<BoxStream<'static, Result<Event, EventStreamError<LlmError>>>>,
    /// The model sent upstream, reported in `Done`.
    model: String,
    /// The latest usage seen; OpenAI sends it in the chunk before `[DONE]`.
    usage: Option<Usage>,
    /// The first choice's `finish_reason`, once a chunk carried one. `[DONE]` without it
    /// means upstream aborted the generation (llama.cpp ends an interrupted stream so).
    finish_reason: Option<String>,
    first_token_deadline: Instant,
    between_tokens: Duration,
    /// Whether a delta has been emitted, which switches to the between-tokens timeout.
    started: bool,
    errors: Errors,
}

impl Decoder {
    /// The next event for the consumer, or `None` after `Done` or an error.
    async fn next(&mut self) -> Option<Result<LlmEvent, LlmError>> {
        let events = self.events.as_mut()?;
        let result = loop {
            let deadline = if self.started {
                deadline_after(self.between_tokens)
            } else {
                self.first_token_deadline
            };
            let event = match timeout_at(deadline, events.next()).await {
                Err(_) => {
                    let detail = if self.started {
                        "no event within the between-tokens timeout"
                    } else {
                        "no token before the first-token timeout"
                    };
                    break Err(self.errors.error(LlmErrorKind::TimedOut, detail));
                }
                Ok(None) => {
                    break Err(self
                        .errors
                        .error(LlmErrorKind::Interrupted, "the stream ended before [DONE]"))
                }
                Ok(Some(Err(EventStreamError::Transport(err)))) => break Err(err),
                // The UTF-8 decoder holds back an incomplete character until more bytes
                // come, and reports it only when the body ends: a cut mid-character.
                Ok(Some(Err(EventStreamError::Utf8(err)))) => {
                    let detail = format!("the stream ended inside a UTF-8 character: {err}");
                    break Err(self.errors.error(LlmErrorKind::Interrupted, detail));
                }
                Ok(Some(Err(err))) => {
                    break Err(self
                        .errors
                        .error(LlmErrorKind::Upstream, format!("malformed event stream: {err}")))
                }
                Ok(Some(Ok(event))) => event,
            };
            match parse_event(&event, &self.errors) {
                Ok(Parsed::Done) => {
                    let Some(finish_reason) = self.finish_reason.take() else {
                        break Err(self.errors.error(
                            LlmErrorKind::Interrupted,
                            "the stream ended with [DONE] but no finish_reason",
                        ));
                    };
                    break Ok(LlmEvent::Done {
                        usage: self.usage.take(),
                        model: self.model.clone(),
                        finish_reason,
                    });
                }
                Ok(Parsed::Chunk {
                    content,
                    usage,
                    finish_reason,
                }) => {
                    if usage.is_some() {
                        self.usage = usage;
                    }
                    if finish_reason.is_some() {
                        self.finish_reason = finish_reason;
                    }
                    if let Some(content) = content {
                        self.started = true;
                        break Ok(LlmEvent::Delta(content));
                    }
                }
                Err(err) => break Err(err),
            }
        };
        if !matches!(result, Ok(LlmEvent::Delta(_))) {
            self.events = None;
        }
        Some(result)
    }
}

/// What one SSE event means.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// `data: [DONE]`: the generation is complete.
    Done,
    /// A `chat.completion.chunk`: maybe text (never empty), maybe usage, maybe the first
    /// choice's `finish_reason`, maybe none of them (the role-only first chunk, an
    /// unknown event).
    Chunk {
        content: Option<String>,
        usage: Option<Usage>,
        finish_reason: Option<String>,
    },
}

/// Interprets one event. An `error` event, or a chunk with an `error` key, is an
/// error: upstream reports failures that way once the 200 status is sent.
fn parse_event(event: &Event, errors: &Errors) -> Result<Parsed, LlmError> {
    let data = event.data.trim();
    if event.event == "error" {
        let message = upstream_message(data);
        return Err(errors.error(LlmErrorKind::Upstream, format!("error event: {message}")));
    }
    if data.starts_with("[DONE]") {
        return Ok(Parsed::Done);
    }
    let chunk: WireChunk = serde_json::from_str(data)
        .map_err(|err| errors.error(LlmErrorKind::Upstream, format!("malformed chunk: {err}")))?;
    if let Some(error) = chunk.error {
        let message = error_message(&error);
        let kind = if message.contains("rate_limit") {
            LlmErrorKind::RateLimited
        } else {
            LlmErrorKind::Upstream
        };
        return Err(errors.error(kind, format!("error in the stream: {message}")));
    }
    let (content, finish_reason) = chunk
        .choices
        .unwrap_or_default()
        .into_iter()
        .find(|choice| choice.index == 0)
        .map_or((None, None), |choice| {
            let content = choice.delta.and_then(|delta| delta.content);
            (content, choice.finish_reason)
        });
    let content = content.filter(|content| !content.is_empty());
    let finish_reason = finish_reason.filter(|reason| !reason.is_empty());
    let usage = chunk.usage.map(|usage| Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    });
    Ok(Parsed::Chunk {
        content,
        usage,
        finish_reason,
    })
}

/// The request body. `stream_options.include_usage` asks for the usage chunk (SPEC §7).
#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    stream: bool,
    stream_options: StreamOptions,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// The parts of a `chat.completion.chunk` herald reads; everything else (ids, tool
/// calls, `obfuscation`, …) is ignored. Every field may be
/// absent or null.
#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Option<Vec<WireChoice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<WireDelta>,
    /// `stop`, `length`, `content_filter`, …: reported in `llm_response` (SPEC §10).
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
