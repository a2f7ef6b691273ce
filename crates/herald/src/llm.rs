//! LLM providers: the [`LlmProvider`] trait that turns a chat into a stream of text
//! deltas, its two implementations ([`openai`] for any OpenAI-compatible API, [`echo`]
//! for development), and [`LlmError`], the one list of failures a user may be told.
//!
//! This is the bottom layer of LLM streaming (SPEC §3 "LLM stream"): it knows nothing
//! of tasks, channels or WebSocket messages. A worker calls [`LlmProvider::stream`],
//! turns each [`LlmEvent::Delta`] into a streaming frame and the final
//! [`LlmEvent::Done`] into `llm_response`, and turns an [`LlmError`] into `llm_error`
//! with the error's `Display` text.
//!
//! **Invariant:** the `Display` of an [`LlmError`] is one of the fixed
//! [`LlmErrorKind`] messages, never built from anything upstream sent, so it cannot
//! carry a URL, host, port, key, traceback or raw JSON (SPEC §7). What went wrong in
//! detail is in [`LlmError::detail`], for logs only, and is redacted when it is made.

pub mod echo;
pub mod openai;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// A generation's events: deltas, then exactly one `Done`, or an `Err` at any point.
/// Nothing follows a `Done` or an `Err`.
///
/// Dropping the stream cancels the generation: the upstream HTTP response is dropped,
/// which closes its connection, so a cancelled task stops paying for tokens at once.
pub type LlmStream = BoxStream<'static, Result<LlmEvent, LlmError>>;

/// A source of streamed chat completions.
///
/// The stream is pull-based rather than a channel the provider writes into: the
/// consumer's pace is the backpressure, no task is spawned that would have to be
/// tracked for shutdown, and cancelling is dropping (see [`LlmStream`]).
#[async_trait]
pub trait LlmProvider: Send + Sync {
    /// A short name for logs and the demo page: `echo` or `openai-compatible`.
    fn name(&self) -> &'static str;

    /// Starts a generation. Returns once upstream has accepted the request (retries of
    /// refused attempts happen inside); the first delta may still be on its way.
    /// Errors before the stream exists and errors inside it are the same [`LlmError`].
    async fn stream(&self, request: LlmRequest) -> Result<LlmStream, LlmError>;
}

/// Builds the provider `config` asks for: OpenAI-compatible when `HERALD_LLM_BASE_URL`
/// is set (with `HERALD_LLM_API_KEY`, the configured timeouts and the default retries), the `echo`
/// provider at its default rate otherwise (SPEC §1).
pub fn from_config(config: &Config) -> anyhow::Result<Arc<dyn LlmProvider>> {
    Ok(match &config.llm_base_url {
        Some(base_url) => Arc::new(openai::OpenAiProvider::new(openai::OpenAiConfig {
            api_key: config.llm_api_key.clone(),
            timeouts: openai::LlmTimeouts {
                connect: config.llm_connect_timeout,
                first_token: config.llm_first_token_timeout,
                between_tokens: config.llm_between_tokens_timeout,
            },
            ..openai::OpenAiConfig::new(base_url.clone())
        })?),
        None => Arc::new(echo::EchoProvider::default()),
    })
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LlmRequest {
    /// The model sent upstream: `HERALD_LLM_MODEL` or the task's own model. It is also
    /// the model reported in [`LlmEvent::Done`] (SPEC §7).
    pub model: String,
    /// The conversation, oldest first; the last message is usually the user's prompt.
    pub messages: Vec<ChatMessage>,
}

/// One turn of a chat, in the OpenAI wire shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// Who wrote a [`ChatMessage`]; serialized lowercase, as the OpenAI API spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One event of a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LlmEvent {
    /// The next piece of the reply; never empty.
    Delta(String),
    /// The reply is complete.
    Done {
        /// Token counts as upstream reported them; `None` when it did not (SPEC §7: never
        /// rely on usage being present).
        usage: Option<Usage>,
        /// The model sent upstream ([`LlmRequest::model`]), not the possibly more
        /// specific name upstream answers with (SPEC §7).
        model: String,
        /// Why upstream stopped: `stop`, `length` (the token limit cut the reply),
        /// `content_filter`, …, as upstream spelled it; reported in `llm_response`. A
        /// stream with no finish reason is [`LlmErrorKind::Interrupted`], never `Done`.
        finish_reason: String,
    },
}

/// Token counts of a whole generation, serialized as SPEC §3's `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Why a generation failed, as a user may be told. Each kind's `Display` is a fixed,
/// lowercase message; a worker prefixes it (`LLM processing failed: rate limit
/// exceeded`, SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum LlmErrorKind {
    /// Upstream answered 429 on every attempt, or reported a rate limit mid-stream.
    /// The text says "rate limit", which SPEC §7 requires.
    #[error("rate limit exceeded")]
    RateLimited,
    /// Upstream does not know the model, or answered 404 (a wrong base URL looks the same).
    #[error("model unavailable")]
    ModelUnavailable,
    /// Connecting, the first token, or the gap between two events took too long.
    #[error("timed out")]
    TimedOut,
    /// Upstream refused the API key (401, 403).
    #[error("authentication with the LLM provider failed")]
    Unauthorized,
    /// Upstream refused the request itself (400, 413, 422, …): too long a context, a
    /// content policy, a bad parameter. Retrying would not help.
    #[error("request rejected by the LLM provider")]
    Rejected,
    /// Upstream failed (5xx on every attempt, unreachable, an error inside the stream,
    /// something that is not the wire format).
    #[error("upstream error")]
    Upstream,
    /// The stream stopped before `[DONE]` (the connection was cut or closed early), or
    /// `[DONE]` came without a `finish_reason` (upstream aborted the generation). SPEC
    /// §7, §10: a cut stream is a failure, not a short reply.
    #[error("stream interrupted")]
    Interrupted,
}

impl LlmErrorKind {
    /// Every kind, for tests and metrics.
    pub const ALL: [LlmErrorKind; 7] = [
        LlmErrorKind::RateLimited,
        LlmErrorKind::ModelUnavailable,
        LlmErrorKind::TimedOut,
        LlmErrorKind::Unauthorized,
        LlmErrorKind::Rejected,
        LlmErrorKind::Upstream,
        LlmErrorKind::Interrupted,
    ];

    /// A stable snake_case label for logs and metrics (`reason="rate_limited"`).
    pub fn label(self) -> &'static str {
        match self {
            LlmErrorKind::RateLimited => "rate_limited",
            LlmErrorKind::ModelUnavailable => "model_unavailable",
            LlmErrorKind::TimedOut => "timed_out",
            LlmErrorKind::Unauthorized => "unauthorized",
            LlmErrorKind::Rejected => "rejected",
            LlmErrorKind::Upstream => "upstream",
            LlmErrorKind::Interrupted => "interrupted",
        }
    }
}

/// A failed generation: a [`LlmErrorKind`], whose message is all that `Display` shows,
/// and a redacted detail for logs.
///
/// This is a struct around a fieldless kind rather than an enum with payloads so that
/// the user-facing text cannot depend on a payload by accident: `Display` only sees
/// the kind.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct LlmError {
    kind: LlmErrorKind,
    detail: String,
}

impl LlmError {
    /// An error of `kind`; `detail` (what happened, for logs) is redacted here, so an
    /// `LlmError` never holds a URL, a bearer token or an API key.
    pub fn new(kind: LlmErrorKind, detail: impl AsRef<str>) -> Self {
        Self::hiding(kind, detail, &[])
    }

    /// Like [`LlmError::new`], and each of `secrets` (the configured API key) is also
    /// removed from `detail`, before anything else so that cutting the detail cannot
    /// leave a piece of one.
    pub fn hiding(kind: LlmErrorKind, detail: impl AsRef<str>, secrets: &[&str]) -> Self {
        let mut detail = detail.as_ref().to_owned();
        for secret in secrets.iter().filter(|secret| !secret.is_empty()) {
            detail = detail.replace(secret, "<key>");
        }
        Self {
            kind,
            detail: redact(&detail),
        }
    }

    pub fn kind(&self) -> LlmErrorKind {
        self.kind
    }

    /// What happened, for logs and never for users: the status, the upstream error's
    /// message, the transport failure. URLs, bearer tokens and `sk-…` keys are replaced
    /// by placeholders, and it is cut to [`MAX_DETAIL_CHARS`].
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl fmt::Debug for LlmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LlmError({}: {})", self.kind.label(), self.detail)
    }
}

/// How much of a detail is kept: enough for an upstream error message, not a whole
/// HTML error page.
pub const MAX_DETAIL_CHARS: usize = 500;

/// Strips from `text` what must not reach even the logs: URLs (`scheme://…` up to
/// whitespace or a quote), the token after `Bearer`, and `sk-…`/`sk_…` keys; then cuts
/// it to [`MAX_DETAIL_CHARS`].
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_DETAIL_CHARS));
    let mut after_bearer = false;
    for piece in Words::new(text) {
        match piece {
            Piece::Separator(sep) => out.push_str(sep),
            Piece::Word(word) => {
                if after_bearer {
                    out.push_str("<redacted>");
                } else if word.contains("://") {
                    // Keep what precedes the scheme: `(http://…` gives `(<url>`.
                    out.push_str(&word[..scheme_start(word)]);
                    out.push_str("<url>");
                } else if is_key(word) {
                    out.push_str("<key>");
                } else {
                    out.push_str(word);
                }
                after_bearer = word.eq_ignore_ascii_case("bearer");
            }
        }
    }
    truncate_chars(out, MAX_DETAIL_CHARS)
}

/// Where the URL scheme begins inside `word`, which contains `://`.
fn scheme_start(word: &str) -> usize {
    let sep = word.find("://").unwrap_or(0);
    word[..sep]
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        .last()
        .map_or(sep, |(idx, _)| idx)
}

/// Whether `word` looks like an OpenAI-style secret key (`sk-…`, `sk_…`, `sk-proj-…`),
/// possibly wrapped in punctuation.
fn is_key(word: &str) -> bool {
    let trimmed = word.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    (trimmed.starts_with("sk-") || trimmed.starts_with("sk_")) && trimmed.len() > 6
}

fn truncate_chars(mut text: String, max: usize) -> String {
    if let Some((idx, _)) = text.char_indices().nth(max) {
        text.truncate(idx);
        text.push('…');
    }
    text
}

fn is_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '"' | '\'' | '`' | ',' | ';' | '<' | '>' | '{' | '}' | '[' | ']'
        )
}

/// A piece of text split for redaction: runs of separators, and words between them.
enum Piece<'a> {
    Separator(&'a str),
    Word(&'a str),
}

/// Splits text into words and separators. Quotes, whitespace, commas and brackets end a
/// word, so a URL or key inside JSON (`"url":"http://…"`) is a word of its own.
struct Words<'a> {
    rest: &'a str,
}

impl<'a> Words<'a> {
    fn new(text: &'a str) -> Self {
        Self { rest: text }
    }
}

impl<'a> Iterator for Words<'a> {
    type Item = Piece<'a>;

    fn next(&mut self) -> Option<Piece<'a>> {
        let first = self.rest.chars().next()?;
        let separator = is_separator(first);
        let end = self
            .rest
            .char_indices()
            .find(|(_, c)| is_separator(*c) != separator)
            .map_or(self.rest.len(), |(idx, _)| idx);
        let (piece, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(if separator {
            Piece::Separator(piece)
        } else {
            Piece::Word(piece)
        })
    }
}

#[cfg(test)]
mod tests;
