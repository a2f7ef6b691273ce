//! The LLM providers: the OpenAI-compatible client against a fake OpenAI server that
//! speaks the exact streaming wire format (REFERENCES §2.4), and the `echo` provider.
//!
//! The fake server is scripted per test: the n-th request gets the n-th [`Reply`] (the
//! last one repeats), and every request is recorded. A streamed reply is written as
//! raw byte pieces with pauses between them, so a test decides where TCP writes split
//! the events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use futures_util::StreamExt;
use herald::config::Secret;
use herald::llm::echo::EchoProvider;
use herald::llm::openai::{LlmTimeouts, OpenAiConfig, OpenAiProvider, RetryPolicy};
use herald::llm::{ChatMessage, LlmEvent, LlmProvider, LlmRequest, LlmStream, Usage};
use serde_json::{json, Value};
use tokio::time::Instant;

const MODEL: &str = "gpt-4o-mini";
/// What the fake server calls the model in its chunks: more specific than what was
/// asked, as OpenAI does. `Done` must report [`MODEL`] (SPEC §7).
const SERVED_MODEL: &str = "gpt-4o-mini-2024-07-18";
pub(crate) const KEY: &str = "sk-test-0123456789";

// ---------------------------------------------------------------------------------
// The wire format.

/// One `chat.completion.chunk` event with the given `delta` and `finish_reason`.
pub(crate) fn chunk(delta: Value, finish_reason: Option<&str>) -> String {
    let chunk = json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1_741_569_952,
        "model": SERVED_MODEL,
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        "usage": null,
    });
    format!("data: {chunk}\n\n")
}

pub(crate) fn role_chunk() -> String {
    chunk(json!({"role": "assistant", "content": "", "refusal": null}), None)
}

pub(crate) fn text_chunk(text: &str) -> String {
    chunk(json!({"content": text}), None)
}

pub(crate) fn finish_chunk() -> String {
    chunk(json!({}), Some("stop"))
}

/// The `stream_options.include_usage` chunk: no choices, the whole request's usage.
pub(crate) fn usage_chunk(prompt_tokens: u64, completion_tokens: u64) -> String {
    let chunk = json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1_741_569_952,
        "model": SERVED_MODEL,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
    });
    format!("data: {chunk}\n\n")
}

pub(crate) const DONE: &str = "data: [DONE]\n\n";

/// The deltas of the standard reply, with a multi-byte character in one of them.
pub(crate) const DELTAS: [&str; 5] = ["Hello", "!", " How", " can I help", " you today? 👋"];

/// The standard reply's events: role chunk, deltas, finish, usage, `[DONE]`.
pub(crate) fn reply_events() -> Vec<String> {
    let mut events = vec![role_chunk()];
    events.extend(DELTAS.iter().map(|delta| text_chunk(delta)));
    events.extend([finish_chunk(), usage_chunk(9, 12), DONE.to_owned()]);
    events
}

/// What the provider should yield for the standard reply.
fn reply_expected() -> Vec<Result<LlmEvent, String>> {
    let mut expected: Vec<Result<LlmEvent, String>> = DELTAS
        .iter()
        .map(|delta| Ok(LlmEvent::Delta((*delta).to_owned())))
        .collect();
    expected.push(Ok(LlmEvent::Done {
        usage: Some(Usage {
            prompt_tokens: 9,
            completion_tokens: 12,
        }),
        model: MODEL.to_owned(),
        finish_reason: "stop".to_owned(),
    }));
    expected
}

// ---------------------------------------------------------------------------------
// The fake server.

#[derive(Clone)]
pub(crate) enum Reply {
    /// `200 text/event-stream`, written as these pieces, each after its pause. Then
    /// the body ends cleanly, or the connection is aborted when `abort` is set.
    Stream {
        pieces: Vec<(Duration, Vec<u8>)>,
        abort: bool,
    },
    /// A refusal: this status, these headers, this body.
    Status {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Waits before answering at all (no response headers yet).
    Slow(Duration, Box<Reply>),
    /// `200` with a JSON body, as from a server that ignores `stream: true`.
    Json(String),
}

impl Reply {
    /// A stream with each event in its own write.
    pub(crate) fn events(events: &[String]) -> Reply {
        Reply::Stream {
            pieces: events
                .iter()
                .map(|e| (Duration::ZERO, e.clone().into_bytes()))
                .collect(),
            abort: false,
        }
    }

    /// A stream whose body is written in pieces of `size` bytes, `pause` apart, cutting
    /// lines, JSON and multi-byte characters anywhere.
    pub(crate) fn split(body: &str, size: usize, pause: Duration) -> Reply {
        let pieces = body
            .as_bytes()
            .chunks(size)
            .map(|piece| (pause, piece.to_vec()))
            .collect();
        Reply::Stream { pieces, abort: false }
    }

    pub(crate) fn status(status: u16, body: &str) -> Reply {
        Reply::Status {
            status,
            headers: Vec::new(),
            body: body.to_owned(),
        }
    }

    pub(crate) fn with_header(mut self, name: &'static str, value: &str) -> Reply {
        if let Reply::Status { headers, .. } = &mut self {
            headers.push((name, value.to_owned()));
        }
        self
    }

    pub(crate) fn aborted(mut self) -> Reply {
        if let Reply::Stream { abort, .. } = &mut self {
            *abort = true;
        }
        self
    }
}

/// A request as the fake server saw it.
#[derive(Clone, Debug)]
pub(crate) struct Recorded {
    pub(crate) at: Instant,
    authorization: Option<String>,
    accept: Option<String>,
    content_type: Option<String>,
    pub(crate) body: Value,
}

struct Script {
    replies: Vec<Reply>,
    requests: Mutex<Vec<Recorded>>,
    /// Streamed bodies still being written (a body is dropped when it ends or when the
    /// client goes away).
    open_streams: std::sync::atomic::AtomicUsize,
}

/// Counts a streamed body as open until it is dropped.
struct OpenStream(Arc<Script>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0
            .open_streams
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

pub(crate) struct FakeLlm {
    pub(crate) base_url: String,
    script: Arc<Script>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeLlm {
    pub(crate) async fn start(replies: Vec<Reply>) -> FakeLlm {
        assert!(!replies.is_empty());
        let script = Arc::new(Script {
            replies,
            requests: Mutex::new(Vec::new()),
            open_streams: std::sync::atomic::AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(answer))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeLlm {
            base_url: format!("http://{addr}/v1"),
            script,
            server,
        }
    }

    /// Streamed bodies the server is still writing.
    pub(crate) fn open_streams(&self) -> usize {
        self.script.open_streams.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn requests(&self) -> Vec<Recorded> {
        self.script.requests.lock().unwrap().clone()
    }

    /// Test settings: a key, timeouts of a few seconds, and quick retries.
    fn config(&self) -> OpenAiConfig {
        OpenAiConfig {
            base_url: self.base_url.clone(),
            api_key: Some(Secret::new(KEY)),
            timeouts: LlmTimeouts {
                connect: Duration::from_secs(2),
                first_token: Duration::from_secs(5),
                between_tokens: Duration::from_secs(5),
            },
            retry: RetryPolicy {
                max_attempts: 3,
                base_delay: Duration::from_millis(20),
                max_delay: Duration::from_millis(100),
                max_retry_after: Duration::from_secs(2),
            },
        }
    }

    fn provider(&self) -> OpenAiProvider {
        OpenAiProvider::new(self.config()).unwrap()
    }
}

async fn answer(State(script): State<Arc<Script>>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).map(|value| value.to_str().unwrap().to_owned());
    let idx = {
        let mut requests = script.requests.lock().unwrap();
        requests.push(Recorded {
            at: Instant::now(),
            authorization: header("authorization"),
            accept: header("accept"),
            content_type: header("content-type"),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        requests.len() - 1
    };
    let reply = script.replies[idx.min(script.replies.len() - 1)].clone();
    respond(script, reply).await
}

async fn respond(script: Arc<Script>, mut reply: Reply) -> Response {
    while let Reply::Slow(pause, inner) = reply {
        tokio::time::sleep(pause).await;
        reply = *inner;
    }
    match reply {
        Reply::Stream { pieces, abort } => {
            let pieces = futures_util::stream::iter(pieces).then(|(pause, bytes)| async move {
                tokio::time::sleep(pause).await;
                Ok::<_, std::io::Error>(Bytes::from(bytes))
            });
            // An error from the body stream makes the server drop the connection
            // without ending the chunked body: a cut, as the client sees it.
            // The pause makes the server flush the pieces before the error: hyper drops
            // the connection at the error without writing what it still buffers.
            let end = futures_util::stream::iter(abort.then_some(())).then(|()| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(std::io::Error::other("cut"))
            });
            script
                .open_streams
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let guard = OpenStream(script);
            let body = pieces.chain(end).map(move |item| {
                let _open = &guard;
                item
            });
            Response::builder()
                .header("content-type", "text/event-stream; charset=utf-8")
                .header("cache-control", "no-cache")
                .body(Body::from_stream(body))
                .unwrap()
        }
        Reply::Status {
            status,
            headers,
            body,
        } => {
            let mut response = Response::builder()
                .status(StatusCode::from_u16(status).unwrap())
                .header("content-type", "application/json");
            for (name, value) in headers {
                response = response.header(name, value);
            }
            response.body(Body::from(body)).unwrap()
        }
        Reply::Json(body) => Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap(),
        Reply::Slow(..) => unreachable!("unwrapped above"),
    }
}

// ---------------------------------------------------------------------------------
// Helpers.

fn request() -> LlmRequest {
    LlmRequest {
        model: MODEL.to_owned(),
        messages: vec![
            ChatMessage::system("You are helpful."),
            ChatMessage::user("Hello?"),
        ],
    }
}

/// Every event of a stream, errors as their user-facing text.
async fn drain(stream: LlmStream) -> Vec<Result<LlmEvent, String>> {
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.map(|event| event.map_err(|err| err.to_string())).collect(),
    )
    .await
    .expect("the stream ends")
}

/// Runs `request()` through `provider`: the events, or the error of `stream()` itself.
async fn generate(provider: &dyn LlmProvider) -> Vec<Result<LlmEvent, String>> {
    match provider.stream(request()).await {
        Ok(stream) => drain(stream).await,
        Err(err) => vec![Err(err.to_string())],
    }
}

/// The deltas joined.
fn text_of(events: &[Result<LlmEvent, String>]) -> String {
    events
        .iter()
        .filter_map(|event| match event {
            Ok(LlmEvent::Delta(delta)) => Some(delta.as_str()),
            _ => None,
        })
        .collect()
}

const REPLY_TEXT: &str = "Hello! How can I help you today? 👋";

// ---------------------------------------------------------------------------------
// The OpenAI-compatible provider.

/// A normal reply: every delta in order, then `Done` with upstream's usage and the
/// model that was sent; the request asks for a stream with usage, with the key.
#[tokio::test]
async fn openai_normal_reply_with_usage() {
    let fake = FakeLlm::start(vec![Reply::events(&reply_events())]).await;
    let provider = fake.provider();
    assert_eq!(provider.name(), "openai-compatible");
    let events = generate(&provider).await;
    assert_eq!(events, reply_expected());
    assert_eq!(text_of(&events), REPLY_TEXT);

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(
        sent.authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(sent.accept.as_deref(), Some("text/event-stream"));
    assert_eq!(sent.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        sent.body,
        json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Hello?"},
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    );
}

/// Without a key, no `Authorization` header is sent (Ollama, llama.cpp); a stream
/// without the usage chunk ends with `usage: None`.
#[tokio::test]
async fn openai_without_key_or_usage() {
    let events: Vec<String> = [text_chunk("Hi"), finish_chunk(), DONE.to_owned()].into();
    let fake = FakeLlm::start(vec![Reply::events(&events)]).await;
    let provider = OpenAiProvider::new(OpenAiConfig {
        api_key: None,
        ..fake.config()
    })
    .unwrap();
    assert_eq!(
        generate(&provider).await,
        [
            Ok(LlmEvent::Delta("Hi".to_owned())),
            Ok(LlmEvent::Done {
                usage: None,
                model: MODEL.to_owned(),
                finish_reason: "stop".to_owned(),
            })
        ]
    );
    assert_eq!(fake.requests()[0].authorization, None);
}

/// Events split across TCP writes anywhere: mid-line, mid-JSON, mid-`data:`, inside
/// the emoji's four bytes.
#[tokio::test]
async fn openai_events_split_mid_line_across_writes() {
    let body = reply_events().concat();
    for size in [1, 7, 64] {
        let pause = if size == 1 {
            Duration::ZERO
        } else {
            Duration::from_millis(2)
        };
        let fake = FakeLlm::start(vec![Reply::split(&body, size, pause)]).await;
        let events = generate(&fake.provider()).await;
        assert_eq!(events, reply_expected(), "pieces of {size} bytes");
        assert_eq!(text_of(&events), REPLY_TEXT);
    }
}

/// SSE comments (`: ping`, OpenRouter's `: OPENROUTER PROCESSING`) are keep-alives,
/// not events, wherever they come.
#[tokio::test]
async fn openai_keep_alive_comments_are_ignored() {
    let mut events = vec![": ping\n\n".to_owned(), ": OPENROUTER PROCESSING\n\n".to_owned()];
    for event in reply_events() {
        events.push(event);
        events.push(":\n\n".to_owned());
        events.push(": ping - 2025-01-01 00:00:00.000000\n\n".to_owned());
    }
    let fake = FakeLlm::start(vec![Reply::events(&events)]).await;
    assert_eq!(generate(&fake.provider()).await, reply_expected());
}

/// A 429 with `Retry-After: 1` before the first token is retried after that second,
/// and the user sees only the successful reply.
#[tokio::test]
async fn openai_429_with_retry_after_then_success() {
    let refused = Reply::status(
        429,
        r#"{"error":{"message":"Rate limit reached","type":"requests"}}"#,
    )
    .with_header("retry-after", "1");
    let fake = FakeLlm::start(vec![refused, Reply::events(&reply_events())]).await;
    let events = generate(&fake.provider()).await;
    assert_eq!(events, reply_expected());
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].at - requests[0].at;
    assert!(waited >= Duration::from_millis(950), "waited {waited:?}");
    assert!(waited < Duration::from_secs(2), "waited {waited:?}");
}

/// A 500 before the first token is retried (with the backoff).
#[tokio::test]
async fn openai_500_then_success() {
    let fake = FakeLlm::start(vec![
        Reply::status(500, "Internal Server Error"),
        Reply::events(&reply_events()),
    ])
    .await;
    assert_eq!(generate(&fake.provider()).await, reply_expected());
    assert_eq!(fake.requests().len(), 2);
}

/// 5xx on every attempt gives up after `max_attempts` with "upstream error".
#[tokio::test]
async fn openai_500_forever_is_an_upstream_error_after_bounded_attempts() {
    let fake = FakeLlm::start(vec![Reply::status(503, r#"{"error":{"message":"overloaded"}}"#)]).await;
    assert_eq!(
        generate(&fake.provider()).await,
        [Err("upstream error".to_owned())]
    );
    assert_eq!(fake.requests().len(), 3);
}

/// 429 on every attempt is reported as "rate limit exceeded" (SPEC §7: "rate limit"
/// in the text).
#[tokio::test]
async fn openai_429_forever_is_rate_limit_exceeded() {
    let refused = Reply::status(429, "{}").with_header("retry-after", "0");
    let fake = FakeLlm::start(vec![refused]).await;
    assert_eq!(
        generate(&fake.provider()).await,
        [Err("rate limit exceeded".to_owned())]
    );
    assert_eq!(fake.requests().len(), 3);
}

/// An `{"error": …}` object after some tokens ends the stream with an error; the
/// tokens before it were delivered, and nothing is retried once a token is out.
#[tokio::test]
async fn openai_error_object_mid_stream() {
    let events = [
        role_chunk(),
        text_chunk("Hello"),
        text_chunk(" there"),
        "data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n".to_owned(),
        text_chunk(" never"),
        DONE.to_owned(),
    ];
    let fake = FakeLlm::start(vec![Reply::events(&events)]).await;
    let got = generate(&fake.provider()).await;
    assert_eq!(
        got,
        [
            Ok(LlmEvent::Delta("Hello".to_owned())),
            Ok(LlmEvent::Delta(" there".to_owned())),
            Err("upstream error".to_owned()),
        ]
    );
    assert_eq!(text_of(&got), "Hello there");
    assert_eq!(fake.requests().len(), 1);
}

/// A stream cut before `[DONE]` is a failure (SPEC §7), whether the connection is
/// aborted or the body ends cleanly without `[DONE]`; never retried.
#[tokio::test]
async fn openai_cut_mid_stream_is_stream_interrupted() {
    let partial: Vec<String> = [role_chunk(), text_chunk("Hello"), text_chunk("!")].into();
    let expected = [
        Ok(LlmEvent::Delta("Hello".to_owned())),
        Ok(LlmEvent::Delta("!".to_owned())),
        Err("stream interrupted".to_owned()),
    ];
    // Cut after whole events, and in the middle of the next event's line.
    let mut half_line = partial.clone();
    half_line.push(text_chunk(" How")[..30].to_owned());
    for (events, how) in [(&partial, "after an event"), (&half_line, "mid-line")] {
        for abort in [true, false] {
            let reply = if abort {
                Reply::events(events).aborted()
            } else {
                Reply::events(events)
            };
            let fake = FakeLlm::start(vec![reply]).await;
            let mut stream = fake.provider().stream(request()).await.unwrap();
            let mut got = Vec::new();
            let mut detail = String::new();
            while let Some(event) = stream.next().await {
                got.push(event.map_err(|err| {
                    detail = err.detail().to_owned();
                    err.to_string()
                }));
            }
            assert_eq!(got, expected, "cut {how}, abort: {abort}");
            // The two cuts take different paths: a transport error, or an early end.
            let cause = if abort {
                "reading the stream failed"
            } else {
                "the stream ended before [DONE]"
            };
            assert!(detail.starts_with(cause), "cut {how}, abort: {abort}: {detail}");
            assert_eq!(fake.requests().len(), 1, "cut {how}, abort: {abort}");
        }
    }
}

/// No token within the first-token timeout is "timed out", whether the response
/// headers or the first delta are late; not retried.
#[tokio::test]
async fn openai_slow_first_token_times_out() {
    let late_delta = Reply::Stream {
        pieces: vec![
            (Duration::ZERO, role_chunk().into_bytes()),
            (Duration::ZERO, b": ping\n\n".to_vec()),
            (Duration::from_secs(3), text_chunk("late").into_bytes()),
        ],
        abort: false,
    };
    let late_headers = Reply::Slow(Duration::from_secs(3), Box::new(Reply::events(&reply_events())));
    for (reply, what) in [(late_delta, "delta"), (late_headers, "headers")] {
        let fake = FakeLlm::start(vec![reply]).await;
        let mut config = fake.config();
        config.timeouts.first_token = Duration::from_millis(300);
        let provider = OpenAiProvider::new(config).unwrap();
        let start = Instant::now();
        assert_eq!(
            generate(&provider).await,
            [Err("timed out".to_owned())],
            "late {what}"
        );
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
            "late {what}: {elapsed:?}"
        );
        assert_eq!(fake.requests().len(), 1, "late {what}");
    }
}

/// A stall after the first token longer than the between-tokens timeout is "timed out".
#[tokio::test]
async fn openai_stall_between_tokens_times_out() {
    let reply = Reply::Stream {
        pieces: vec![
            (Duration::ZERO, text_chunk("Hello").into_bytes()),
            (Duration::from_secs(3), text_chunk(" late").into_bytes()),
        ],
        abort: false,
    };
    let fake = FakeLlm::start(vec![reply]).await;
    let mut config = fake.config();
    config.timeouts.between_tokens = Duration::from_millis(300);
    let provider = OpenAiProvider::new(config).unwrap();
    assert_eq!(
        generate(&provider).await,
        [
            Ok(LlmEvent::Delta("Hello".to_owned())),
            Err("timed out".to_owned())
        ]
    );
}

/// 401 is an authentication failure, said as such, and not retried.
#[tokio::test]
async fn openai_401_is_an_authentication_error() {
    let body = r#"{"error":{"message":"Incorrect API key provided: sk-test-***6789.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
    let fake = FakeLlm::start(vec![Reply::status(401, body)]).await;
    assert_eq!(
        generate(&fake.provider()).await,
        [Err("authentication with the LLM provider failed".to_owned())]
    );
    assert_eq!(fake.requests().len(), 1);
}

/// Other refusals: an unknown model, a rejected request; neither is retried.
#[tokio::test]
async fn openai_404_and_400_are_not_retried() {
    let cases = [
        (
            404,
            r#"{"error":{"message":"The model `gpt-9` does not exist","code":"model_not_found"}}"#,
            "model unavailable",
        ),
        (
            400,
            r#"{"error":{"message":"maximum context length is 128000 tokens","code":"context_length_exceeded"}}"#,
            "request rejected by the LLM provider",
        ),
    ];
    for (status, body, message) in cases {
        let fake = FakeLlm::start(vec![Reply::status(status, body)]).await;
        assert_eq!(
            generate(&fake.provider()).await,
            [Err(message.to_owned())],
            "status {status}"
        );
        assert_eq!(fake.requests().len(), 1, "status {status}");
    }
}

/// An unreachable upstream is an upstream error, after the bounded retries.
#[tokio::test]
async fn openai_connection_refused_is_an_upstream_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let fake = FakeLlm::start(vec![Reply::status(500, "")]).await;
    let provider = OpenAiProvider::new(OpenAiConfig {
        base_url: format!("http://{addr}/v1"),
        ..fake.config()
    })
    .unwrap();
    let err = provider.stream(request()).await.err().expect("no stream");
    assert_eq!(err.to_string(), "upstream error");
    assert!(
        err.detail().starts_with("sending the request failed"),
        "{}",
        err.detail()
    );
    assert!(!err.detail().contains("127.0.0.1"), "{}", err.detail());
}

/// A 200 that is not an event stream (a server ignoring `stream: true`) is an error,
/// not an empty reply.
#[tokio::test]
async fn openai_non_stream_answer_is_an_upstream_error() {
    let fake = FakeLlm::start(vec![Reply::Json(
        r#"{"choices":[{"message":{"content":"hi"}}]}"#.to_owned(),
    )])
    .await;
    assert_eq!(
        generate(&fake.provider()).await,
        [Err("upstream error".to_owned())]
    );
}

/// Whatever upstream puts in an error, the user-facing text has no URL, host, port,
/// key or JSON (SPEC §7); the log detail has the URL and keys redacted too, including
/// the configured key in a form the generic rules would not catch.
#[tokio::test]
async fn openai_errors_never_leak_upstream_details() {
    let leak = r#"{"error":{"message":"upstream http://secret-host:1234/v1 refused sk-live-ABC123 (key my-own-key-42)","type":"invalid_request_error"}}"#;
    let mut replies: Vec<(Reply, &str)> = [400, 401, 403, 404, 408, 422, 429, 500, 502, 503]
        .into_iter()
        .map(|status| {
            (
                Reply::status(status, leak).with_header("retry-after", "0"),
                "refusal",
            )
        })
        .collect();
    replies.push((
        Reply::events(&[text_chunk("Hi"), format!("data: {leak}\n\n")]),
        "error object",
    ));
    replies.push((
        Reply::events(&[format!("event: error\ndata: {leak}\n\n")]),
        "error event",
    ));
    replies.push((
        Reply::events(&[text_chunk("Hi"), format!("data: {}\n\n", &leak[..70])]),
        "bad JSON",
    ));
    replies.push((Reply::Json(leak.to_owned()), "not a stream"));
    for (reply, what) in replies {
        let fake = FakeLlm::start(vec![reply]).await;
        let config = OpenAiConfig {
            api_key: Some(Secret::new("my-own-key-42")),
            ..fake.config()
        };
        let provider = OpenAiProvider::new(config).unwrap();
        let err = match provider.stream(request()).await {
            Err(err) => err,
            Ok(mut stream) => loop {
                match stream.next().await.expect("the stream ends with an error") {
                    Ok(LlmEvent::Delta(_)) => continue,
                    Ok(done) => panic!("{what}: expected an error, got {done:?}"),
                    Err(err) => break err,
                }
            },
        };
        let shown = err.to_string();
        for banned in [
            "http",
            "secret-host",
            "1234",
            "sk-live",
            "ABC123",
            "my-own-key",
            "{",
            "}",
            "\"",
        ] {
            assert!(!shown.contains(banned), "{what}: {shown:?} contains {banned:?}");
        }
        for banned in ["http://", "secret-host", "sk-live", "ABC123", "my-own-key"] {
            assert!(
                !err.detail().contains(banned),
                "{what}: detail {:?} contains {banned:?}",
                err.detail()
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// The echo provider.

fn echo_request(model: &str, prompt: &str) -> LlmRequest {
    LlmRequest {
        model: model.to_owned(),
        messages: vec![ChatMessage::system("You are helpful."), ChatMessage::user(prompt)],
    }
}

/// The same prompt gives the same deltas, usage and model every time; the deltas join
/// to `Echo: <prompt>`.
#[tokio::test]
async fn echo_is_deterministic_and_echoes_the_model() {
    let provider = EchoProvider::new(Duration::ZERO);
    assert_eq!(provider.name(), "echo");
    let first = drain(
        provider
            .stream(echo_request("my-model", "Tell me a joke"))
            .await
            .unwrap(),
    )
    .await;
    let second = drain(
        provider
            .stream(echo_request("my-model", "Tell me a joke"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(first, second);
    let expected: Vec<Result<LlmEvent, String>> = vec![
        Ok(LlmEvent::Delta("Echo:".to_owned())),
        Ok(LlmEvent::Delta(" Tell".to_owned())),
        Ok(LlmEvent::Delta(" me".to_owned())),
        Ok(LlmEvent::Delta(" a".to_owned())),
        Ok(LlmEvent::Delta(" joke".to_owned())),
        Ok(LlmEvent::Done {
            usage: Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 5,
            }),
            model: "echo".to_owned(),
            finish_reason: "stop".to_owned(),
        }),
    ];
    assert_eq!(first, expected);
    assert_eq!(text_of(&first), "Echo: Tell me a joke");

    let other = drain(provider.stream(echo_request("gpt-4o-mini", "hi")).await.unwrap()).await;
    assert_eq!(
        other.last(),
        Some(&Ok(LlmEvent::Done {
            usage: Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 2
            }),
            model: "echo".to_owned(),
            finish_reason: "stop".to_owned(),
        }))
    );
}

/// Deltas come at the configured fixed rate, one per interval, however slowly the
/// consumer reads; `Done` follows the last delta at once.
#[tokio::test(start_paused = true)]
async fn echo_streams_at_a_fixed_rate() {
    let interval = herald::llm::echo::DEFAULT_INTERVAL;
    let provider = EchoProvider::default();
    assert_eq!(provider.interval(), Duration::from_millis(20));
    let start = Instant::now();
    let mut stream = provider
        .stream(echo_request(MODEL, "one two three four"))
        .await
        .unwrap();
    let mut arrivals = Vec::new();
    while let Some(event) = stream.next().await {
        arrivals.push((start.elapsed(), event.unwrap()));
        if arrivals.len() == 2 {
            // A consumer that falls behind does not push later deltas back.
            tokio::time::sleep(interval * 3 / 2).await;
        }
    }
    let times: Vec<Duration> = arrivals.iter().map(|(at, _)| *at).collect();
    let ms = Duration::from_millis;
    assert_eq!(times, [ms(20), ms(40), ms(70), ms(80), ms(100), ms(100)]);
    assert!(matches!(arrivals.last(), Some((_, LlmEvent::Done { .. }))));

    let instant = EchoProvider::new(Duration::ZERO);
    let start = Instant::now();
    let events = drain(
        instant
            .stream(echo_request(MODEL, "one two three four"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(events.len(), 6);
    assert_eq!(start.elapsed(), Duration::ZERO);
}
