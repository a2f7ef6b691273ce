//! Issue 18: LLM streams over HTTP (SPEC §10). A task's server-sent events carry the
//! socket's messages at the socket's offsets, resume after `Last-Event-ID` without loss
//! or repeat, keep proxies open with comments, end after the final status, and are the
//! owner's only. The AI SDK's UI message stream (`/api/chat/ui`) is tested here at the
//! byte level, and with the real `ai` package in `clients.rs`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::chat::{generate, TaskStream};
use crate::llm::{reply_events, FakeLlm, Reply};
use crate::support::*;

/// A prompt the `echo` provider answers in about a second (one word every 20 ms).
fn long_prompt() -> String {
    (0..50).map(|i| format!("word{i}")).collect::<Vec<_>>().join(" ")
}

/// One server-sent event, or a comment line.
#[derive(Debug, Clone, PartialEq)]
enum Sse {
    Event {
        id: Option<String>,
        event: Option<String>,
        data: String,
    },
    Comment(String),
}

impl Sse {
    fn data(&self) -> Value {
        match self {
            Sse::Event { data, .. } => serde_json::from_str(data).unwrap(),
            Sse::Comment(text) => panic!("a comment, not an event: {text}"),
        }
    }
}

/// Reads an SSE body incrementally.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event or comment; `None` when the body ends.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data, mut comment) = (None, None, Vec::new(), None);
                for line in block.lines() {
                    if let Some(text) = line.strip_prefix(':') {
                        comment = Some(text.trim().to_owned());
                    } else if let Some((field, value)) = line.split_once(':') {
                        let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
                        match field {
                            "id" => id = Some(value),
                            "event" => event = Some(value),
                            "data" => data.push(value),
                            other => panic!("unexpected field {other}"),
                        }
                    }
                }
                if data.is_empty() {
                    if let Some(comment) = comment {
                        return Some(Sse::Comment(comment));
                    }
                    continue;
                }
                return Some(Sse::Event {
                    id,
                    event,
                    data: data.join("\n"),
                });
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("no SSE data within 10 s")
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next event, skipping comments.
    async fn next_event(&mut self) -> Option<Sse> {
        loop {
            match self.next().await? {
                Sse::Comment(_) => continue,
                event => return Some(event),
            }
        }
    }

    /// Every remaining event until the body ends.
    async fn rest(&mut self) -> Vec<Sse> {
        let mut events = Vec::new();
        while let Some(event) = self.next_event().await {
            events.push(event);
        }
        events
    }
}

async fn open_events(
    srv: &TestServer,
    task_id: &str,
    token: &str,
    last_event_id: Option<u64>,
) -> reqwest::Response {
    let mut request = srv
        .http
        .get(srv.url(&format!("/api/chat/tasks/{task_id}/events")))
        .bearer_auth(token);
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    request.send().await.unwrap()
}

async fn events(srv: &TestServer, task_id: &str, last_event_id: Option<u64>) -> SseReader {
    let response = open_events(srv, task_id, &srv.token("u1"), last_event_id).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    SseReader::new(response)
}

/// Each event is `id: <offset>`, `event: <type>`, `data: <the socket's JSON>`.
#[track_caller]
fn assert_event_matches(event: &Sse, message: &Value) {
    let Sse::Event {
        id,
        event: kind,
        data,
    } = event
    else {
        panic!("not an event: {event:?}");
    };
    assert_eq!(id.as_deref(), Some(message["offset"].to_string().as_str()));
    assert_eq!(kind.as_deref(), message["type"].as_str());
    assert_eq!(&serde_json::from_str::<Value>(data).unwrap(), message);
}

/// A finished task's events, replayed from history, are the socket's messages of that
/// task, in order, and the response ends after the final status.
#[tokio::test]
async fn events_are_the_sockets_messages_and_end_after_the_final_status() {
    let srv = TestServer::spawn().await;
    let (mut ws, _) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    // Another task's and another chat's messages share the channel; they are not sent.
    let other = generate(&srv, "u1", "c0", "Something else").await;
    let task_id = generate(&srv, "u1", "c1", "Tell me a story").await;
    // The two tasks run at once: read the socket until both ended.
    let (mut socket, mut ended) = (Vec::new(), 0);
    while ended < 2 {
        let message = ws.next_json().await;
        if message["type"] == "llm_status"
            && matches!(
                message["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        {
            ended += 1;
        }
        if message["task_id"] == task_id.as_str() {
            socket.push(message);
        }
    }
    assert!(socket.len() >= 8, "{socket:?}");
    let socket = TaskStream { messages: socket };

    let events = events(&srv, &task_id, None).await.rest().await;
    assert!(events
        .iter()
        .all(|event| event.data()["task_id"] != other.as_str()));
    assert_eq!(events.len(), socket.messages.len(), "{events:?}");
    for (event, message) in events.iter().zip(&socket.messages) {
        assert_event_matches(event, message);
    }
    assert_eq!(
        events.last().unwrap().data()["status"],
        "completed",
        "the response ends after the final status"
    );
    // A socket's offset is a valid Last-Event-ID: the SSE stream goes on from it.
    let offset = socket.messages[3]["offset"].as_u64().unwrap();
    let rest = self::events(&srv, &task_id, Some(offset)).await.rest().await;
    assert_eq!(rest.len(), socket.messages.len() - 4);
    for (event, message) in rest.iter().zip(&socket.messages[4..]) {
        assert_event_matches(event, message);
    }
}

/// Live: the same messages as the socket while the answer streams, and a reconnect
/// with `Last-Event-ID` in the middle resumes after it with no loss and no repeat.
#[tokio::test]
async fn a_reconnect_with_last_event_id_resumes_mid_stream() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        reconnect_mid_stream(&srv).await;
    }
}

async fn reconnect_mid_stream(srv: &TestServer) {
    let (mut ws, _) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    let task_id = generate(srv, "u1", "c1", &long_prompt()).await;

    let mut reader = events(srv, &task_id, None).await;
    let mut seen = Vec::new();
    let mut frames = 0;
    while frames < 5 {
        let event = reader.next_event().await.expect("the stream ended early");
        if event.data()["frame"]["status"] == "streaming" {
            frames += 1;
        }
        seen.push(event);
    }
    // The client drops the connection mid-answer, and reconnects.
    drop(reader);
    let last_id: u64 = match seen.last().unwrap() {
        Sse::Event { id, .. } => id.as_deref().unwrap().parse().unwrap(),
        Sse::Comment(_) => unreachable!(),
    };
    let rest = events(srv, &task_id, Some(last_id)).await.rest().await;
    let socket = TaskStream::read(&mut ws, &task_id).await;
    assert!(rest.len() > 5, "the answer was still streaming at the reconnect");
    let all: Vec<Sse> = seen.into_iter().chain(rest).collect();
    assert_eq!(all.len(), socket.messages.len(), "no loss, no repeat");
    for (event, message) in all.iter().zip(&socket.messages) {
        assert_event_matches(event, message);
    }
    let text: String = all
        .iter()
        .map(Sse::data)
        .filter(|m| m["frame"]["status"] == "streaming")
        .map(|m| m["frame"]["delta"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, format!("Echo: {}", long_prompt()));

    // Reconnecting after the final message: nothing is left, and the response ends
    // at once.
    let final_offset = socket.messages.last().unwrap()["offset"].as_u64().unwrap();
    let mut after_end = events(srv, &task_id, Some(final_offset)).await;
    let ended = tokio::time::timeout(Duration::from_secs(2), after_end.rest()).await;
    assert!(
        matches!(ended, Ok(ref events) if events.is_empty()),
        "after the end: {ended:?}"
    );
}

/// A node whose LLM is silent for `delay` before it answers, configured by `configure`;
/// the fake LLM goes with it (it stops when dropped).
async fn with_a_slow_llm(
    delay: Duration,
    configure: impl FnOnce(&mut herald::config::Config) + Send + 'static,
) -> (FakeLlm, TestServer) {
    let slow = Reply::Slow(delay, Box::new(Reply::events(&reply_events())));
    let fake = FakeLlm::start(vec![slow]).await;
    let srv = TestServer::builder()
        .env("HERALD_LLM_BASE_URL", fake.base_url.clone())
        .configure(configure)
        .spawn()
        .await;
    (fake, srv)
}

/// While nothing happens (upstream is slow to answer), a comment line goes out every
/// `sse_keep_alive_ms`.
#[tokio::test]
async fn a_quiet_stream_gets_keep_alive_comments() {
    let (_fake, srv) = with_a_slow_llm(Duration::from_millis(1500), |c| {
        c.sse_keep_alive = Duration::from_millis(200)
    })
    .await;
    let task_id = generate(&srv, "u1", "c1", "Say hello").await;
    let mut reader = events(&srv, &task_id, None).await;
    let mut comments = 0;
    let mut statuses = Vec::new();
    while let Some(item) = reader.next().await {
        match item {
            Sse::Comment(text) => {
                assert_eq!(text, "keep-alive");
                comments += 1;
            }
            event => {
                let data = event.data();
                if data["type"] == "llm_status" {
                    statuses.push(data["status"].as_str().unwrap().to_owned());
                }
            }
        }
    }
    assert!(comments >= 4, "{comments} comments in 1.5 s of silence at 200 ms");
    assert_eq!(statuses.last().map(String::as_str), Some("completed"));
}

/// A response in flight is not timed by the HTTP idle timeout, however long it stays
/// silent: that timeout bounds the wait for a request, which begins once the response
/// has ended (SPEC §9, `http_idle_timeout_ms`).
#[tokio::test]
async fn a_silent_stream_longer_than_the_http_idle_timeout_is_not_cut() {
    let (_fake, srv) = with_a_slow_llm(Duration::from_millis(2000), |c| {
        c.http_idle_timeout = Duration::from_millis(400);
        c.sse_keep_alive = Duration::from_secs(60);
    })
    .await;
    let task_id = generate(&srv, "u1", "c1", "Say hello").await;
    let opened = tokio::time::Instant::now();
    let mut reader = events(&srv, &task_id, None).await;
    let mut statuses = Vec::new();
    while let Some(event) = reader.next_event().await {
        let data = event.data();
        if data["type"] == "llm_status" {
            statuses.push(data["status"].as_str().unwrap().to_owned());
        }
    }
    assert!(
        opened.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        opened.elapsed()
    );
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("completed"),
        "{statuses:?}"
    );
}

/// The wait for the next request on a keep-alive connection starts when a long response
/// ends, and a connection left idle then is closed at `http_idle_timeout_ms` (SPEC §9),
/// also when the response was a stream that ended after hyper last read the socket.
#[tokio::test]
async fn a_connection_idle_after_a_stream_ended_is_closed_at_the_http_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_fake, srv) = with_a_slow_llm(Duration::from_millis(800), |c| {
        c.http_idle_timeout = Duration::from_millis(1000);
        c.request_head_timeout = Duration::from_millis(1500);
    })
    .await;
    let task_id = generate(&srv, "u1", "c1", "Say hello").await;
    let mut stream = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let request = format!(
        "GET /api/chat/tasks/{task_id}/events HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {}\r\n\r\n",
        srv.token("u1")
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The chunked body's last chunk ends the response.
    while !got.ends_with(b"0\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("the stream did not end")
            .unwrap();
        assert!(
            n > 0,
            "closed before the stream ended: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).contains("completed"));
    let ended = tokio::time::Instant::now();
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("the idle connection stayed open")
        .unwrap_or(0);
    assert_eq!(n, 0, "no bytes after the response");
    let idle = ended.elapsed();
    assert!(
        idle >= Duration::from_millis(800) && idle < Duration::from_millis(1800),
        "closed {idle:?} after the stream ended (idle timeout 1 s, head timeout 1.5 s)"
    );
}

/// A `Last-Event-ID` the channel never reached means its offsets restarted (a new
/// epoch) since the client's last event: the stream ends at once with `stream_lost`,
/// so the client re-fetches the task rather than miss messages.
#[tokio::test]
async fn an_offset_from_another_epoch_ends_the_stream() {
    let srv = TestServer::spawn().await;
    let (mut ws, _) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    let task_id = generate(&srv, "u1", "c1", "Hello").await;
    TaskStream::read(&mut ws, &task_id).await;
    let events = events(&srv, &task_id, Some(10_000)).await.rest().await;
    assert_eq!(events.len(), 1, "{events:?}");
    let Sse::Event { event, .. } = &events[0] else {
        unreachable!()
    };
    assert_eq!(event.as_deref(), Some("error"));
    assert_eq!(events[0].data()["error"], "stream_lost");
}

/// Mid-stream, the channel's state is lost in Redis, so its offsets restart in a new
/// epoch: the stream sends nothing of the new epoch and ends with `stream_lost`, as a
/// socket would be told `recovered:false`.
#[tokio::test]
async fn an_epoch_change_mid_stream_ends_the_stream() {
    let Some(redis) = crate::redis::Redis::start().await else {
        return;
    };
    if !redis.owned() {
        // The test deletes a channel's keys with redis-cli on its own redis-server.
        crate::redis::skip_shared_redis(None);
        return;
    }
    let srv = redis.node().await;
    let task_id = generate(&srv, "u1", "c1", &long_prompt()).await;
    let mut reader = events(&srv, &task_id, None).await;
    let first = reader.next_event().await.unwrap();
    let epoch = first.data()["epoch"].as_str().unwrap().to_owned();
    let mut frames = 0;
    while frames < 3 {
        let event = reader.next_event().await.unwrap();
        if event.data()["frame"]["status"] == "streaming" {
            frames += 1;
        }
    }
    let keys = redis.cli(&["--scan", "--pattern", "*frames:u1*"]).await;
    let keys: Vec<&str> = keys.lines().filter(|key| !key.is_empty()).collect();
    assert!(!keys.is_empty(), "the channel's keys were found");
    let mut del = vec!["DEL"];
    del.extend(keys);
    redis.cli(&del).await;
    let rest = reader.rest().await;
    let (last, before) = rest.split_last().expect("the stream ended with an event");
    assert!(
        before.iter().all(|event| event.data()["epoch"] == epoch.as_str()),
        "nothing of another epoch is sent"
    );
    assert_eq!(last.data()["error"], "stream_lost", "{last:?}");
}

/// Only the task's owner may follow it: 401 without or with a bad token, 404 for
/// another user's task or none at all.
#[tokio::test]
async fn events_are_the_owners_only() {
    let srv = TestServer::spawn().await;
    let task_id = generate(&srv, "u1", "c1", "Private").await;
    let path = format!("/api/chat/tasks/{task_id}/events");
    let response = srv.http.get(srv.url(&path)).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let response = open_events(&srv, &task_id, "not-a-token", None).await;
    assert_eq!(response.status(), 401);
    let response = open_events(&srv, &task_id, &srv.token("u2"), None).await;
    assert_eq!(response.status(), 404);
    let (status, body) = read(response).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let response = open_events(&srv, "no-such-task", &srv.token("u1"), None).await;
    assert_eq!(response.status(), 404);
    let response = open_events(&srv, &task_id, &srv.token("u1"), None).await;
    assert_eq!(response.status(), 200);
    let response = srv
        .http
        .get(srv.url(&path))
        .bearer_auth(srv.token("u1"))
        .header("Last-Event-ID", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

async fn ui_post(srv: &TestServer, body: Value) -> reqwest::Response {
    srv.http
        .post(srv.url("/api/chat/ui"))
        .bearer_auth(srv.token("u1"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn ui_body(chat_id: &str, prompt: &str) -> Value {
    json!({
        "id": chat_id,
        "messages": [
            {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "An earlier question"}]},
            {"id": "m2", "role": "assistant", "parts": [{"type": "text", "text": "An earlier answer"}]},
            {"id": "m3", "role": "user", "parts": [{"type": "text", "text": prompt}]},
        ],
        "trigger": "submit-message",
    })
}

/// The UI message stream's chunks, as `data` texts.
async fn ui_chunks(response: reqwest::Response) -> Vec<String> {
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-vercel-ai-ui-message-stream"], "v1");
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut reader = SseReader::new(response);
    let mut chunks = Vec::new();
    while let Some(event) = reader.next_event().await {
        let Sse::Event {
            id,
            event: kind,
            data,
        } = event
        else {
            unreachable!()
        };
        assert_eq!((id, kind), (None, None), "UI chunks are bare data events");
        chunks.push(data);
    }
    chunks
}

/// `POST /api/chat/ui` answers with start, text-start, text-deltas, text-end, finish
/// and `[DONE]`; the deltas are the answer to the last user message.
#[tokio::test]
async fn ui_message_stream_shape() {
    let srv = TestServer::spawn().await;
    let chunks = ui_chunks(ui_post(&srv, ui_body("chat1", "Hi there")).await).await;
    let (last, json_chunks) = chunks.split_last().unwrap();
    assert_eq!(last, "[DONE]");
    let chunks: Vec<Value> = json_chunks
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    let types: Vec<&str> = chunks.iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(types[..2], ["start", "text-start"]);
    assert_eq!(types[types.len() - 2..], ["text-end", "finish"]);
    assert!(types[2..types.len() - 2].iter().all(|t| *t == "text-delta"));
    let id = &chunks[1]["id"];
    assert!(chunks[1..chunks.len() - 1].iter().all(|c| &c["id"] == id));
    let text: String = chunks.iter().filter_map(|c| c["delta"].as_str()).collect();
    assert_eq!(text, "Echo: Hi there");
    // herald keeps the chat's context itself: the exchange is saved.
    let (_, history) = crate::chat::user_get(&srv, "/api/chat/chat1/messages", &srv.token("u1")).await;
    assert_eq!(history["messages"][0]["content"], "Hi there");

    // Nothing runs in the chat any more: resume answers 204.
    let response = srv
        .http
        .get(srv.url("/api/chat/ui/chat1/stream"))
        .bearer_auth(srv.token("u1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = srv
        .http
        .get(srv.url("/api/chat/ui/never-used/stream"))
        .bearer_auth(srv.token("u1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
}

/// A failed answer is an `error` chunk with herald's fixed text, then `[DONE]`.
#[tokio::test]
async fn ui_message_stream_error() {
    let fake = FakeLlm::start(vec![Reply::status(
        400,
        r#"{"error":{"message":"Invalid model name passed in model=gpt-9","type":"invalid_request_error"}}"#,
    )])
    .await;
    let srv = TestServer::builder()
        .env("HERALD_LLM_BASE_URL", fake.base_url.clone())
        .spawn()
        .await;
    let chunks = ui_chunks(ui_post(&srv, ui_body("chat1", "Hi")).await).await;
    assert_eq!(
        chunks,
        [
            json!({"type": "start", "messageId": chunks_message_id(&chunks)}).to_string(),
            json!({"type": "error", "errorText": "LLM processing failed: model unavailable"}).to_string(),
            "[DONE]".to_owned(),
        ]
    );
}

fn chunks_message_id(chunks: &[String]) -> String {
    let start: Value = serde_json::from_str(&chunks[0]).unwrap();
    start["messageId"].as_str().unwrap().to_owned()
}

/// Bad requests are refused before any task starts.
#[tokio::test]
async fn ui_refuses_bad_requests() {
    let srv = TestServer::spawn().await;
    let no_user = json!({"id": "c1", "messages": [{"id": "m1", "role": "assistant", "parts": []}]});
    let empty = json!({"id": "c1", "messages": [{"id": "m1", "role": "user", "parts": [{"type": "file", "url": "x"}]}]});
    let bad_chat = ui_body("bad chat id!", "Hi");
    for body in [no_user, empty, bad_chat, json!({"messages": []})] {
        let response = ui_post(&srv, body.clone()).await;
        assert_eq!(response.status(), 400, "{body}");
    }
    let response = srv
        .http
        .post(srv.url("/api/chat/ui"))
        .json(&ui_body("c1", "Hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

/// `GET /api/chat/ui/{chat_id}/stream` while the answer runs replays it from its
/// start and follows it to the end, like the AI SDK's resumable streams.
#[tokio::test]
async fn ui_resume_replays_the_running_answer() {
    let srv = TestServer::spawn().await;
    let response = ui_post(&srv, ui_body("chat1", &long_prompt())).await;
    let mut first = SseReader::new(response);
    let mut n = 0;
    while n < 6 {
        first.next_event().await.unwrap();
        n += 1;
    }
    drop(first);
    let response = srv
        .http
        .get(srv.url("/api/chat/ui/chat1/stream"))
        .bearer_auth(srv.token("u1"))
        .send()
        .await
        .unwrap();
    let chunks = ui_chunks(response).await;
    let text: String = chunks
        .iter()
        .filter(|c| c.starts_with('{'))
        .map(|c| serde_json::from_str::<Value>(c).unwrap())
        .filter_map(|c| c["delta"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, format!("Echo: {}", long_prompt()));
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
}
