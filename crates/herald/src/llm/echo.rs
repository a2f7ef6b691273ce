//! The `echo` development provider (SPEC §1): a deterministic reply built from the
//! prompt, streamed at a fixed rate, so the whole LLM path can be run, demonstrated and
//! load-tested without an API key or a model.
//!
//! The reply is `Echo: <the last user message>`, cut into word-sized deltas (each word
//! with the whitespace before it), one every [`EchoProvider::interval`]. Usage counts
//! whitespace-separated words of the whole conversation (prompt) and deltas
//! (completion); the model it reports is `echo`, whatever the request named, since no
//! model answered.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::time::Instant;

use super::{LlmError, LlmEvent, LlmProvider, LlmRequest, LlmStream, Role, Usage};

/// The provider's [`LlmProvider::name`].
pub const NAME: &str = "echo";

/// The default pause before each delta: 50 tokens a second, about the pace of a fast
/// hosted model, so the demo page looks like the real thing.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(20);

/// The `finish_reason` of every echo reply: it always ends on its own.
pub const FINISH_REASON: &str = "stop";

/// What the reply says when the conversation has no user text.
const EMPTY_PROMPT: &str = "(empty prompt)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoProvider {
    interval: Duration,
}

impl Default for EchoProvider {
    fn default() -> Self {
        Self::new(DEFAULT_INTERVAL)
    }
}

impl EchoProvider {
    /// A provider that waits `interval` before each delta; zero streams everything at
    /// once (for tests and benchmarks of the layers above).
    pub fn new(interval: Duration) -> Self {
        Self { interval }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// The reply to `request`: `Echo: ` and the last user message, trimmed.
pub fn reply(request: &LlmRequest) -> String {
    let prompt = request
        .messages
        .iter()
        .rev()
        .find(|message| message.role == Role::User)
        .map_or("", |message| message.content.trim());
    let prompt = if prompt.is_empty() { EMPTY_PROMPT } else { prompt };
    format!("Echo: {prompt}")
}

/// Cuts `text` into deltas: a new one starts at each run of whitespace that follows a
/// non-whitespace character, so `"a b\n c"` gives `["a", " b", "\n c"]`. The deltas
/// joined are `text` exactly.
pub fn tokens(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut start = 0;
    let mut previous_was_space = true;
    for (idx, c) in text.char_indices() {
        let is_space = c.is_whitespace();
        if is_space && !previous_was_space {
            tokens.push(text[start..idx].to_owned());
            start = idx;
        }
        previous_was_space = is_space;
    }
    if start < text.len() {
        tokens.push(text[start..].to_owned());
    }
    tokens
}

/// The deterministic token counts of a generation.
pub fn usage(request: &LlmRequest, n_deltas: usize) -> Usage {
    let prompt_words = request
        .messages
        .iter()
        .map(|message| message.content.split_whitespace().count())
        .sum::<usize>();
    Usage {
        prompt_tokens: u64::try_from(prompt_words).unwrap_or(u64::MAX),
        completion_tokens: u64::try_from(n_deltas).unwrap_or(u64::MAX),
    }
}

#[async_trait]
impl LlmProvider for EchoProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn stream(&self, request: LlmRequest) -> Result<LlmStream, LlmError> {
        let deltas = tokens(&reply(&request));
        let done = LlmEvent::Done {
            usage: Some(usage(&request, deltas.len())),
            model: NAME.to_owned(),
            finish_reason: FINISH_REASON.to_owned(),
        };
        let interval = self.interval;
        let start = Instant::now();
        // Delta `n` (0-based) is due at `start + (n + 1) × interval`: sleeping until a
        // due time rather than for an interval keeps the rate fixed however late the
        // consumer polls.
        let deltas =
            futures_util::stream::iter(deltas.into_iter().enumerate()).then(move |(idx, delta)| async move {
                if !interval.is_zero() {
                    let n = u32::try_from(idx + 1).unwrap_or(u32::MAX);
                    tokio::time::sleep_until(start + interval.saturating_mul(n)).await;
                }
                Ok(LlmEvent::Delta(delta))
            });
        Ok(deltas
            .chain(futures_util::stream::once(async move { Ok(done) }))
            .boxed())
    }
}

#[cfg(test)]
mod tests;
