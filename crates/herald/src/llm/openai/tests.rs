//! Unit tests for the OpenAI-compatible provider: event interpretation, the decoder over
//! every way a body can be split, timeouts (in paused time), status mapping and retry
//! delays. The HTTP side is tested against a fake server in `tests/it/llm.rs`.

use super::*;
use crate::llm::MAX_DETAIL_CHARS;

const MODEL: &str = "gpt-4o-mini";

#[track_caller]
fn check_event(event_type: &str, data: &str, expected: Result<Parsed, LlmErrorKind>) {
    let event = Event {
        event: event_type.to_owned(),
        data: data.to_owned(),
        ..Event::default()
    };
    let parsed = parse_event(&event, &Errors::default()).map_err(|err| err.kind());
    assert_eq!(parsed, expected, "event {event_type:?} data {data:?}");
}

fn text(content: &str) -> Result<Parsed, LlmErrorKind> {
    Ok(Parsed::Chunk {
        content: Some(content.to_owned()),
        usage: None,
        finish_reason: None,
    })
}

const NOTHING: Result<Parsed, LlmErrorKind> = Ok(Parsed::Chunk {
    content: None,
    usage: None,
    finish_reason: None,
});

#[test]
fn events_are_interpreted() {
    check_event("message", "[DONE]", Ok(Parsed::Done));
    check_event(
        "message",
        r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
        text("Hi"),
    );
    check_event(
        "message",
        r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        NOTHING,
    );
    check_event(
        "message",
        r#"{"choices":[{"index":0,"delta":{"content":null}}]}"#,
        NOTHING,
    );
    check_event("message", r#"{"choices":[{"index":0,"delta":{}}]}"#, NOTHING);
    check_event(
        "message",
        r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        Ok(Parsed::Chunk {
            content: None,
            usage: None,
            finish_reason: Some("stop".to_owned()),
        }),
    );
    // The last delta may come with its finish reason (llama.cpp, some proxies).
    check_event(
        "message",
        r#"{"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"length"}]}"#,
        Ok(Parsed::Chunk {
            content: Some("!".to_owned()),
            usage: None,
            finish_reason: Some("length".to_owned()),
        }),
    );
    check_event("message", r#"{"choices":[{"index":0}]}"#, NOTHING);
    check_event("message", r#"{"choices":null}"#, NOTHING);
    check_event("message", "{}", NOTHING);
    // Only the first choice is the reply.
    check_event(
        "message",
        r#"{"choices":[{"index":1,"delta":{"content":"B"}},{"index":0,"delta":{"content":"A"}}]}"#,
        text("A"),
    );
    check_event(
        "message",
        r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#,
        Ok(Parsed::Chunk {
            content: None,
            usage: Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 12,
            }),
            finish_reason: None,
        }),
    );
    // Any event type other than `error` is read as data (`event: ping` with `{}`).
    check_event("ping", "{}", NOTHING);
    check_event(
        "message",
        r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
        Err(LlmErrorKind::Upstream),
    );
    check_event(
        "message",
        r#"{"error":{"message":"slow down","code":"rate_limit_exceeded"}}"#,
        Err(LlmErrorKind::RateLimited),
    );
    check_event(
        "message",
        r#"{"error":"model crashed"}"#,
        Err(LlmErrorKind::Upstream),
    );
    check_event("error", r#"{"message":"boom"}"#, Err(LlmErrorKind::Upstream));
    check_event(
        "message",
        r#"{"choices":[{"index":0,"delta":{"content":"unterminated"#,
        Err(LlmErrorKind::Upstream),
    );
    check_event("message", "not json", Err(LlmErrorKind::Upstream));
}

#[test]
fn upstream_messages_are_extracted() {
    assert_eq!(
        upstream_message(r#"{"error":{"message":"Invalid model","type":"invalid_request_error"}}"#),
        "invalid_request_error: Invalid model"
    );
    assert_eq!(
        upstream_message(r#"{"error":"model 'x' not found"}"#),
        "model 'x' not found"
    );
    assert_eq!(
        upstream_message("  <html>Bad Gateway</html>\n"),
        "<html>Bad Gateway</html>"
    );
}

#[test]
fn statuses_map_to_kinds() {
    let cases = [
        (400, LlmErrorKind::Rejected),
        (401, LlmErrorKind::Unauthorized),
        (403, LlmErrorKind::Unauthorized),
        (404, LlmErrorKind::ModelUnavailable),
        (408, LlmErrorKind::TimedOut),
        (413, LlmErrorKind::Rejected),
        (422, LlmErrorKind::Rejected),
        (429, LlmErrorKind::RateLimited),
        (500, LlmErrorKind::Upstream),
        (502, LlmErrorKind::Upstream),
        (503, LlmErrorKind::Upstream),
        (302, LlmErrorKind::Upstream),
    ];
    for (status, kind) in cases {
        assert_eq!(
            kind_for_refusal(StatusCode::from_u16(status).unwrap(), "{}"),
            kind,
            "status {status}"
        );
    }
}

/// An unknown model reads the same whatever status upstream chose for it (SPEC §10);
/// other refusals that mention a model stay what their status says.
#[test]
fn bodies_refine_the_status() {
    let model_errors = [
        // LiteLLM.
        (
            400,
            r#"{"error":{"message":"Invalid model name passed in model=gpt-9. Call `/v1/models` to view available models for your key.","type":"invalid_request_error","param":"model","code":"400"}}"#,
        ),
        // OpenAI.
        (
            404,
            r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
        ),
        (
            400,
            r#"{"error":{"message":"no access","type":"invalid_request_error","code":"model_not_found"}}"#,
        ),
        // vLLM.
        (
            400,
            r#"{"object":"error","message":"The model `gpt-9` does not exist.","type":"NotFoundError","param":null,"code":400}"#,
        ),
        // Ollama.
        (
            400,
            r#"{"error":"model \"gpt-9\" not found, try pulling it first"}"#,
        ),
        (422, "Unknown model: gpt-9"),
    ];
    for (status, body) in model_errors {
        assert_eq!(
            kind_for_refusal(StatusCode::from_u16(status).unwrap(), body),
            LlmErrorKind::ModelUnavailable,
            "{status} {body}"
        );
    }
    let others = [
        (
            400,
            r#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
            LlmErrorKind::Rejected,
        ),
        (400, "Bad Request", LlmErrorKind::Rejected),
        (
            429,
            r#"{"error":{"message":"Rate limit reached for model gpt-9"}}"#,
            LlmErrorKind::RateLimited,
        ),
        (
            401,
            r#"{"error":{"message":"model not found","code":"model_not_found"}}"#,
            LlmErrorKind::Unauthorized,
        ),
        (
            500,
            r#"{"error":{"message":"model not found"}}"#,
            LlmErrorKind::Upstream,
        ),
    ];
    for (status, body, kind) in others {
        assert_eq!(
            kind_for_refusal(StatusCode::from_u16(status).unwrap(), body),
            kind,
            "{status} {body}"
        );
    }
}

#[test]
fn retry_after_headers_are_read() {
    let check = |pairs: &[(&'static str, &'static str)], expected: Option<Duration>| {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().unwrap());
        }
        assert_eq!(retry_after(&headers), expected, "{pairs:?}");
    };
    check(&[], None);
    check(&[("retry-after", "1")], Some(Duration::from_secs(1)));
    check(&[("retry-after", " 2 ")], Some(Duration::from_secs(2)));
    check(&[("retry-after", "0.5")], Some(Duration::from_millis(500)));
    check(&[("retry-after", "0")], Some(Duration::ZERO));
    check(&[("retry-after", "-1")], None);
    check(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")], None);
    check(
        &[("retry-after-ms", "250"), ("retry-after", "9")],
        Some(Duration::from_millis(250)),
    );
    check(
        &[("retry-after", "99999999999")],
        Some(Duration::from_secs(1_000_000)),
    );
}

#[test]
fn retry_delays_back_off_with_jitter_and_honour_retry_after() {
    let policy = RetryPolicy::default();
    let backoffs: Vec<Duration> = (1..=7).map(|attempt| policy.backoff(attempt)).collect();
    let ms = Duration::from_millis;
    assert_eq!(
        backoffs,
        [
            ms(500),
            ms(1000),
            ms(2000),
            ms(4000),
            ms(8000),
            ms(8000),
            ms(8000)
        ]
    );
    assert_eq!(policy.backoff(u32::MAX), policy.max_delay);
    for attempt in 1..=5 {
        for _ in 0..50 {
            let delay = policy.delay(attempt, None);
            let backoff = policy.backoff(attempt);
            assert!(
                delay >= backoff / 2 && delay <= backoff,
                "attempt {attempt}: {delay:?}"
            );
        }
    }
    assert_eq!(
        policy.delay(1, Some(Duration::from_secs(1))),
        Duration::from_secs(1)
    );
    assert_eq!(
        policy.delay(1, Some(Duration::from_secs(3600))),
        policy.max_retry_after
    );
}

fn chunk(delta: &str) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":null}}],\"usage\":null}}\n\n"
    )
}

/// A complete OpenAI stream, with multi-byte characters to split inside.
fn transcript() -> String {
    [
        chunk(r#"{"role":"assistant","content":""}"#),
        chunk(r#"{"content":"Hel"}"#),
        ": keep-alive\n\n".to_owned(),
        chunk(r#"{"content":"lo, wörld 🌍"}"#),
        chunk("{}").replace("\"finish_reason\":null", "\"finish_reason\":\"stop\""),
        "data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":12}}\n\n"
            .to_owned(),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat()
}

fn expected() -> Vec<Result<LlmEvent, LlmErrorKind>> {
    vec![
        Ok(LlmEvent::Delta("Hel".to_owned())),
        Ok(LlmEvent::Delta("lo, wörld 🌍".to_owned())),
        Ok(LlmEvent::Done {
            usage: Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 12,
            }),
            model: MODEL.to_owned(),
            finish_reason: "stop".to_owned(),
        }),
    ]
}

fn ok(bytes: &[u8]) -> Result<Bytes, LlmError> {
    Ok(Bytes::copy_from_slice(bytes))
}

async fn run(chunks: Vec<Result<Bytes, LlmError>>) -> Vec<Result<LlmEvent, LlmErrorKind>> {
    let far = Instant::now() + Duration::from_secs(3600);
    let stream = decode(
        futures_util::stream::iter(chunks),
        MODEL.to_owned(),
        far,
        Duration::from_secs(3600),
        Errors::default(),
    );
    stream
        .map(|event| event.map_err(|err| err.kind()))
        .collect()
        .await
}

#[tokio::test]
async fn decodes_a_whole_body() {
    assert_eq!(run(vec![ok(transcript().as_bytes())]).await, expected());
}

#[tokio::test]
async fn decodes_the_same_however_the_body_is_split() {
    let body = transcript().into_bytes();
    for split in 0..=body.len() {
        let events = run(vec![ok(&body[..split]), ok(&body[split..])]).await;
        assert_eq!(events, expected(), "split at byte {split}");
    }
    let bytewise = body.iter().map(|byte| ok(&[*byte])).collect();
    assert_eq!(run(bytewise).await, expected(), "one byte per read");
}

#[tokio::test]
async fn decodes_crlf_line_ends() {
    let body = transcript().replace('\n', "\r\n");
    assert_eq!(run(vec![ok(body.as_bytes())]).await, expected());
}

#[tokio::test]
async fn decodes_without_usage() {
    let body = [
        chunk(r#"{"content":"Hi"}"#).replace("\"finish_reason\":null", "\"finish_reason\":\"length\""),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    assert_eq!(
        run(vec![ok(body.as_bytes())]).await,
        [
            Ok(LlmEvent::Delta("Hi".to_owned())),
            Ok(LlmEvent::Done {
                usage: None,
                model: MODEL.to_owned(),
                finish_reason: "length".to_owned(),
            })
        ]
    );
}

/// llama.cpp ends a generation it interrupts (another request arrived) with `[DONE]`
/// and no `finish_reason`: a cut answer, not a complete one (SPEC §10).
#[tokio::test]
async fn done_without_a_finish_reason_is_interrupted() {
    let body = [chunk(r#"{"content":"Hi"}"#), "data: [DONE]\n\n".to_owned()].concat();
    assert_eq!(
        run(vec![ok(body.as_bytes())]).await,
        [
            Ok(LlmEvent::Delta("Hi".to_owned())),
            Err(LlmErrorKind::Interrupted)
        ]
    );
}

#[tokio::test]
async fn a_body_ending_before_done_is_interrupted() {
    let body = transcript();
    let cut = body.find("data: [DONE]").unwrap();
    let mut events = expected();
    events.pop();
    events.push(Err(LlmErrorKind::Interrupted));
    assert_eq!(run(vec![ok(&body.as_bytes()[..cut])]).await, events);
    // Cut inside an event, and inside a multi-byte character.
    let inside = body.find("🌍").unwrap() + 2;
    assert_eq!(
        run(vec![ok(&body.as_bytes()[..inside])]).await,
        [
            Ok(LlmEvent::Delta("Hel".to_owned())),
            Err(LlmErrorKind::Interrupted)
        ]
    );
    assert_eq!(run(vec![]).await, [Err(LlmErrorKind::Interrupted)]);
}

#[tokio::test]
async fn a_transport_error_ends_the_stream() {
    let first = chunk(r#"{"content":"Hel"}"#);
    let broken = LlmError::new(LlmErrorKind::Interrupted, "connection reset");
    let after = transcript();
    let events = run(vec![ok(first.as_bytes()), Err(broken), ok(after.as_bytes())]).await;
    assert_eq!(
        events,
        [
            Ok(LlmEvent::Delta("Hel".to_owned())),
            Err(LlmErrorKind::Interrupted)
        ]
    );
}

#[tokio::test]
async fn nothing_follows_an_error_in_the_stream() {
    let body = [
        chunk(r#"{"content":"Hel"}"#),
        "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n".to_owned(),
        chunk(r#"{"content":"lo"}"#),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    assert_eq!(
        run(vec![ok(body.as_bytes())]).await,
        [Ok(LlmEvent::Delta("Hel".to_owned())), Err(LlmErrorKind::Upstream)]
    );
}

#[tokio::test]
async fn nothing_follows_done() {
    let body = format!("{}{}", transcript(), chunk(r#"{"content":"extra"}"#));
    assert_eq!(run(vec![ok(body.as_bytes())]).await, expected());
}

#[tokio::test(start_paused = true)]
async fn the_first_token_must_come_before_its_deadline() {
    let start = Instant::now();
    // A role chunk and keep-alives do not count as the first token.
    let role = chunk(r#"{"role":"assistant","content":""}"#);
    let body = futures_util::stream::iter([ok(role.as_bytes()), ok(b": ping\n\n")])
        .chain(futures_util::stream::pending());
    let stream = decode(
        body,
        MODEL.to_owned(),
        start + Duration::from_secs(5),
        Duration::from_secs(1),
        Errors::default(),
    );
    let events: Vec<_> = stream
        .map(|event| event.map_err(|err| err.kind()))
        .collect()
        .await;
    assert_eq!(events, [Err(LlmErrorKind::TimedOut)]);
    assert_eq!(start.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn tokens_must_follow_each_other_within_the_gap() {
    let start = Instant::now();
    let first = chunk(r#"{"content":"Hel"}"#);
    let second = chunk(r#"{"content":"lo"}"#);
    let body = futures_util::stream::iter([ok(first.as_bytes())])
        .chain(futures_util::stream::once(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            ok(second.as_bytes())
        }))
        .chain(futures_util::stream::pending());
    let stream = decode(
        body,
        MODEL.to_owned(),
        start + Duration::from_secs(60),
        Duration::from_secs(3),
        Errors::default(),
    );
    let events: Vec<_> = stream
        .map(|event| event.map_err(|err| err.kind()))
        .collect()
        .await;
    assert_eq!(
        events,
        [
            Ok(LlmEvent::Delta("Hel".to_owned())),
            Ok(LlmEvent::Delta("lo".to_owned())),
            Err(LlmErrorKind::TimedOut)
        ]
    );
    // 2 s to the second token, then 3 s of silence.
    assert_eq!(start.elapsed(), Duration::from_secs(5));
}

#[test]
fn the_configured_key_is_hidden_from_details() {
    let errors = Errors {
        api_key: Some(Secret::new("my-own-key-42")),
    };
    let err = errors.error(
        LlmErrorKind::Unauthorized,
        "bad key my-own-key-42, at http://h:1/v1",
    );
    assert_eq!(err.detail(), "bad key <key>, at <url>");
    // Hidden before the detail is cut, so no prefix of it survives the cut.
    let long = format!("{}my-own-key-42", "x".repeat(MAX_DETAIL_CHARS - 3));
    assert!(!errors
        .error(LlmErrorKind::Upstream, long)
        .detail()
        .contains("my-"));
}
