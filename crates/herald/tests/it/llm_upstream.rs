//! Issue 4 end to end with an OpenAI-compatible upstream: the fake server of `llm.rs`
//! scripts each upstream behaviour, herald runs the task, and the test reads the whole
//! message sequence from `/ws/frame-stream/{user_id}/`.

use std::time::Duration;

use serde_json::json;

use crate::chat::{generate, user_get, TaskStream};
use crate::llm::{
    chunk, reply_events, role_chunk, text_chunk, usage_chunk, FakeLlm, Reply, DELTAS, DONE, KEY,
};
use crate::support::*;

const ANSWER: &str = "Hello! How can I help you today? 👋";

async fn herald_with(fake: &FakeLlm) -> TestServer {
    TestServer::builder()
        .env("HERALD_LLM_BASE_URL", fake.base_url.clone())
        .env("HERALD_LLM_API_KEY", KEY)
        .env("HERALD_LLM_MODEL", "gpt-4o-mini")
        .configure(|c| c.llm_first_token_timeout = Duration::from_millis(500))
        .spawn()
        .await
}

/// Runs one task against `replies` and returns what the user's socket received.
async fn run(replies: Vec<Reply>) -> (TaskStream, FakeLlm) {
    let fake = FakeLlm::start(replies).await;
    let srv = herald_with(&fake).await;
    let (mut ws, _) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    let task_id = generate(&srv, "u1", "c1", "Say hello").await;
    (TaskStream::read(&mut ws, &task_id).await, fake)
}

#[track_caller]
fn assert_completed(stream: &TaskStream) {
    stream.assert_completed_order();
    let n = stream.indices().len() as u64;
    assert_eq!(stream.indices(), (0..n).collect::<Vec<_>>());
    assert_eq!(stream.text(), ANSWER);
    let response = stream.find("llm_response").unwrap();
    assert_eq!(response["data"]["response"], ANSWER);
}

#[track_caller]
fn assert_failed(stream: &TaskStream, text: &str) {
    let n = stream.messages.len();
    assert!(n >= 2);
    let (error, last) = (&stream.messages[n - 2], &stream.messages[n - 1]);
    assert_eq!(error["type"], "llm_error", "{error}");
    assert_eq!(error["error"], format!("LLM processing failed: {text}"));
    assert_eq!(
        (last["type"].as_str(), last["status"].as_str()),
        (Some("llm_status"), Some("failed"))
    );
    assert!(stream.find("llm_response").is_none());
    let n = stream.indices().len() as u64;
    assert_eq!(
        stream.indices(),
        (0..n).collect::<Vec<_>>(),
        "frames before the failure keep their order"
    );
}

#[tokio::test]
async fn normal_reply_with_usage() {
    let (stream, fake) = run(vec![Reply::events(&reply_events())]).await;
    assert_completed(&stream);
    assert_eq!(
        stream.indices().len(),
        DELTAS.len(),
        "one frame per upstream delta by default"
    );
    let data = &stream.find("llm_response").unwrap()["data"];
    assert_eq!(
        data["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 12})
    );
    assert_eq!(
        data["model"], "gpt-4o-mini",
        "the model sent upstream, not the one it answered with"
    );
    assert_eq!(data["finish_reason"], "stop");
    let request = &fake.requests()[0];
    assert_eq!(request.body["stream"], true);
    assert_eq!(request.body["stream_options"]["include_usage"], true);
    assert_eq!(request.body["model"], "gpt-4o-mini");
    assert_eq!(
        request.body["messages"],
        json!([{"role": "user", "content": "Say hello"}])
    );
}

#[tokio::test]
async fn events_split_mid_line_across_writes() {
    let body: String = reply_events().concat();
    let (stream, _) = run(vec![Reply::split(&body, 7, Duration::from_millis(1))]).await;
    assert_completed(&stream);
}

#[tokio::test]
async fn keep_alive_comments() {
    let mut events = vec![": keep-alive\n\n".to_owned()];
    for event in reply_events() {
        events.push(event);
        events.push(": ping\n\n".to_owned());
    }
    let (stream, _) = run(vec![Reply::events(&events)]).await;
    assert_completed(&stream);
}

#[tokio::test]
async fn rate_limited_with_retry_after_then_success() {
    let limited = Reply::status(
        429,
        r#"{"error":{"message":"Rate limit reached","type":"requests"}}"#,
    )
    .with_header("retry-after", "1");
    let (stream, fake) = run(vec![limited, Reply::events(&reply_events())]).await;
    assert_completed(&stream);
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests[1].at - requests[0].at >= Duration::from_millis(950));
}

#[tokio::test]
async fn server_error_then_success() {
    let (stream, fake) = run(vec![Reply::status(500, "oops"), Reply::events(&reply_events())]).await;
    assert_completed(&stream);
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn rate_limit_that_persists_says_rate_limit() {
    let (stream, _) = run(vec![
        Reply::status(429, "slow down").with_header("retry-after", "0")
    ])
    .await;
    assert_failed(&stream, "rate limit exceeded");
}

#[tokio::test]
async fn error_object_mid_stream() {
    let events = vec![
        role_chunk(),
        text_chunk("Hel"),
        "data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\"}}\n\n".to_owned(),
    ];
    let (stream, _) = run(vec![Reply::events(&events)]).await;
    assert_failed(&stream, "upstream error");
    assert_eq!(stream.text(), "Hel", "the deltas before the error were streamed");
}

#[tokio::test]
async fn cut_mid_stream() {
    let events = vec![role_chunk(), text_chunk("Hello"), text_chunk("!")];
    let (stream, _) = run(vec![Reply::events(&events).aborted()]).await;
    assert_failed(&stream, "stream interrupted");
    assert_eq!(stream.text(), "Hello!");
    // A clean end without [DONE] is a cut too.
    let (stream, _) = run(vec![Reply::events(&[role_chunk(), text_chunk("Hi")])]).await;
    assert_failed(&stream, "stream interrupted");
}

/// llama.cpp interrupts a running generation when another request comes, and ends its
/// stream with `[DONE]` and no `finish_reason`: the user is told the answer was cut,
/// and the cut answer never becomes chat context (SPEC §10).
#[tokio::test]
async fn done_without_a_finish_reason_is_interrupted() {
    let fake = FakeLlm::start(vec![Reply::events(&[
        role_chunk(),
        text_chunk("Hello"),
        text_chunk("!"),
        DONE.to_owned(),
    ])])
    .await;
    let srv = herald_with(&fake).await;
    let (mut ws, _) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    let task_id = generate(&srv, "u1", "c1", "Say hello").await;
    let stream = TaskStream::read(&mut ws, &task_id).await;
    assert_failed(&stream, "stream interrupted");
    assert_eq!(stream.text(), "Hello!", "the deltas before the cut were streamed");
    let (status, body) = user_get(&srv, "/api/chat/c1/messages", &srv.token("u1")).await;
    assert_eq!(status, 200);
    assert_eq!(body["messages"], json!([]), "a cut answer is not chat context");
    let (_, task) = user_get(&srv, &format!("/api/chat/tasks/{task_id}"), &srv.token("u1")).await;
    assert_eq!(task["status"], "failed");
}

/// An answer cut by the token limit is a complete answer whose `finish_reason` says
/// `length`, so a client can offer to continue it.
#[tokio::test]
async fn finish_reason_length_is_reported() {
    let events = vec![
        role_chunk(),
        text_chunk("Hello"),
        chunk(json!({"content": ", wor"}), Some("length")),
        usage_chunk(9, 2),
        DONE.to_owned(),
    ];
    let (stream, _) = run(vec![Reply::events(&events)]).await;
    stream.assert_completed_order();
    let data = &stream.find("llm_response").unwrap()["data"];
    assert_eq!(data["response"], "Hello, wor");
    assert_eq!(data["finish_reason"], "length");
}

/// An unknown model is "model unavailable" whether upstream says so with 400
/// (LiteLLM) or 404 (OpenAI), and the error text is herald's, not upstream's.
#[tokio::test]
async fn unknown_model_is_model_unavailable_for_400_and_404() {
    let litellm = r#"{"error":{"message":"litellm.BadRequestError: Invalid model name passed in model=gpt-9. Call `/v1/models` to view available models for your key.","type":"invalid_request_error","param":"model","code":"400"}}"#;
    let openai = r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;
    for (status, body) in [(400, litellm), (404, openai)] {
        let (stream, fake) = run(vec![Reply::status(status, body)]).await;
        assert_failed(&stream, "model unavailable");
        assert_eq!(fake.requests().len(), 1, "{status}: not retried");
    }
    // A 400 about something else stays a rejected request.
    let context = r#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
    let (stream, _) = run(vec![Reply::status(400, context)]).await;
    assert_failed(&stream, "request rejected by the LLM provider");
}

#[tokio::test]
async fn slow_first_token_times_out() {
    let slow = Reply::Slow(Duration::from_secs(3), Box::new(Reply::events(&reply_events())));
    let (stream, _) = run(vec![slow]).await;
    assert_failed(&stream, "timed out");
    assert_eq!(stream.indices().len(), 0);
}

#[tokio::test]
async fn upstream_error_details_never_reach_the_client() {
    let body = format!(
        r#"{{"error":{{"message":"Incorrect API key provided: {KEY}. See http://secret-host:1234/v1/keys","type":"invalid_request_error"}}}}"#
    );
    for status in [400, 401, 404, 500] {
        let (stream, _) = run(vec![Reply::status(status, &body)]).await;
        let error = stream.find("llm_error").unwrap()["error"]
            .as_str()
            .unwrap()
            .to_owned();
        for leak in ["http", "secret-host", "1234", KEY, "sk-", "{", "Traceback"] {
            assert!(
                !error.contains(leak),
                "status {status}: `{leak}` leaked into `{error}`"
            );
        }
    }
}

#[tokio::test]
async fn second_prompt_carries_the_first_exchange() {
    let fake = FakeLlm::start(vec![Reply::events(&reply_events())]).await;
    let srv = herald_with(&fake).await;
    let (mut ws, _) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    let first = generate(&srv, "u1", "c1", "Say hello").await;
    TaskStream::read(&mut ws, &first).await;
    let second = generate(&srv, "u1", "c1", "And again?").await;
    TaskStream::read(&mut ws, &second).await;
    let requests = fake.requests();
    assert_eq!(
        requests[1].body["messages"],
        json!([
            {"role": "user", "content": "Say hello"},
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": "And again?"},
        ])
    );
    // Another chat starts fresh.
    let third = generate(&srv, "u1", "c2", "New chat").await;
    TaskStream::read(&mut ws, &third).await;
    assert_eq!(
        fake.requests()[2].body["messages"],
        json!([{"role": "user", "content": "New chat"}])
    );
}

#[tokio::test]
async fn frames_are_coalesced_within_the_window() {
    let fake = FakeLlm::start(vec![Reply::events(&reply_events())]).await;
    let srv = TestServer::builder()
        .env("HERALD_LLM_BASE_URL", fake.base_url.clone())
        .env("HERALD_FRAME_COALESCE_MS", "200")
        .spawn()
        .await;
    let (mut ws, _) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    let task_id = generate(&srv, "u1", "c1", "Say hello").await;
    let stream = TaskStream::read(&mut ws, &task_id).await;
    assert_completed(&stream);
    assert!(
        stream.indices().len() < DELTAS.len(),
        "deltas arriving together are joined"
    );
}

#[tokio::test]
async fn cancel_drops_the_upstream_request() {
    // About 10 s of deltas, 100 ms apart.
    let mut events = vec![role_chunk()];
    events.extend((0..100).map(|i| text_chunk(&format!(" w{i}"))));
    let pieces = events
        .iter()
        .map(|e| (Duration::from_millis(100), e.clone().into_bytes()))
        .collect();
    let fake = FakeLlm::start(vec![Reply::Stream { pieces, abort: false }]).await;
    let srv = herald_with(&fake).await;
    let (mut ws, _) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    let task_id = generate(&srv, "u1", "c1", "Count slowly").await;
    let mut frames = 0;
    while frames < 2 {
        let m = ws.next_json().await;
        if m["type"] == "llm_frame" && m["frame"]["status"] == "streaming" {
            frames += 1;
        }
    }
    assert_eq!(fake.open_streams(), 1, "the upstream stream is being read");
    let (status, _) = crate::chat::user_post(
        &srv,
        &format!("/api/chat/tasks/{task_id}/cancel"),
        &srv.token("u1"),
        json!({}),
    )
    .await;
    assert_eq!(status, 202);
    let rest = TaskStream::read(&mut ws, &task_id).await;
    assert_eq!(rest.messages.last().unwrap()["status"], "cancelled");
    // The upstream body is dropped within a piece or two, not after the whole answer.
    let started = tokio::time::Instant::now();
    while fake.open_streams() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the upstream request was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
