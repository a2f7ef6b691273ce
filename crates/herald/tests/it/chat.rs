//! Issue 4 end to end: `POST /api/chat/generate-response/` → the answer streams to
//! `/ws/frame-stream/{user_id}/` in the documented order; task status, cancel, limits,
//! chat history. These use the `echo` provider; `llm_upstream.rs` covers an
//! OpenAI-compatible upstream.
//!
//! The task-queue contract tests run on both queues ([`engines`]): in memory, and the
//! shared queue on Redis Streams (with a `redis-server` of their own).

use serde_json::{json, Value};

use crate::support::*;

/// POSTs with a user token.
pub async fn user_post(srv: &TestServer, path: &str, token: &str, body: Value) -> (u16, Value) {
    read(
        srv.http
            .post(srv.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

pub async fn user_get(srv: &TestServer, path: &str, token: &str) -> (u16, Value) {
    read(
        srv.http
            .get(srv.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Starts a generation for `user` and returns the task id.
pub async fn generate(srv: &TestServer, user: &str, chat: &str, prompt: &str) -> String {
    let (status, body) = user_post(
        srv,
        "/api/chat/generate-response/",
        &srv.token(user),
        json!({"user_id": user, "chat_id": chat, "prompt": prompt}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "queued");
    assert_eq!(body["chat_id"], chat);
    body["task_id"].as_str().unwrap().to_owned()
}

/// The messages of one task, read from the frame stream until its final status.
#[derive(Debug)]
pub struct TaskStream {
    pub messages: Vec<Value>,
}

/// Whether `message` is a task's final status.
fn is_final(message: &Value) -> bool {
    message["type"] == "llm_status"
        && matches!(
            message["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
}

impl TaskStream {
    pub async fn read(ws: &mut WsClient, task_id: &str) -> TaskStream {
        let mut messages = Vec::new();
        loop {
            let message = ws.next_json().await;
            if message["task_id"] != task_id {
                continue;
            }
            let last = is_final(&message);
            messages.push(message);
            if last {
                return TaskStream { messages };
            }
        }
    }

    /// Whether the stream got its final status.
    pub fn ended(&self) -> bool {
        self.messages.last().is_some_and(is_final)
    }

    /// The message types and statuses in order, frames collapsed to one entry per run.
    pub fn shape(&self) -> Vec<String> {
        let mut shape: Vec<String> = Vec::new();
        for m in &self.messages {
            let entry = match m["type"].as_str().unwrap() {
                "llm_status" => format!("status:{}", m["status"].as_str().unwrap()),
                "llm_frame" => format!("frame:{}", m["frame"]["status"].as_str().unwrap()),
                other => other.to_owned(),
            };
            if shape.last() != Some(&entry) || entry != "frame:streaming" {
                shape.push(entry);
            }
        }
        shape
    }

    /// The documented order of a completed task: started, thinking status and frame
    /// (either order), streaming, frames, response, completed.
    #[track_caller]
    pub fn assert_completed_order(&self) {
        let shape = self.shape();
        assert!(
            shape[..3] == ["status:started", "status:thinking", "frame:thinking"]
                || shape[..3] == ["status:started", "frame:thinking", "status:thinking"],
            "{shape:?}"
        );
        assert_eq!(
            shape[3..],
            [
                "status:streaming",
                "frame:streaming",
                "llm_response",
                "status:completed"
            ],
            "{shape:?}"
        );
    }

    pub fn indices(&self) -> Vec<u64> {
        self.streaming()
            .map(|m| m["frame"]["index"].as_u64().unwrap())
            .collect()
    }

    pub fn text(&self) -> String {
        self.streaming()
            .map(|m| m["frame"]["delta"].as_str().unwrap())
            .collect()
    }

    fn streaming(&self) -> impl Iterator<Item = &Value> {
        self.messages
            .iter()
            .filter(|m| m["type"] == "llm_frame" && m["frame"]["status"] == "streaming")
    }

    pub fn find(&self, kind: &str) -> Option<&Value> {
        self.messages.iter().find(|m| m["type"] == kind)
    }
}

#[tokio::test]
async fn echo_answer_streams_in_order() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        echo_answer_streams_in_order_on(&srv).await;
    }
}

async fn echo_answer_streams_in_order_on(srv: &TestServer) {
    let (mut ws, welcome) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    let task_id = generate(srv, "u1", "chat-1", "hello streaming world").await;
    let stream = TaskStream::read(&mut ws, &task_id).await;

    stream.assert_completed_order();
    let thinking = stream.messages.iter().find(|m| m["type"] == "llm_frame").unwrap();
    assert_eq!(
        thinking["frame"],
        json!({"status": "thinking", "message": "LLM is generating response...", "progress": "indeterminate"})
    );
    let n = stream.indices().len() as u64;
    assert!(n >= 3);
    assert_eq!(
        stream.indices(),
        (0..n).collect::<Vec<_>>(),
        "index counts frames without gaps"
    );
    let response = stream.find("llm_response").unwrap();
    assert_eq!(response["data"]["event"], "response_generated");
    assert_eq!(response["data"]["response"].as_str().unwrap(), stream.text());
    assert_eq!(stream.text(), "Echo: hello streaming world");
    assert_eq!(
        response["data"]["model"], "echo",
        "the echo provider reports itself, not the configured model it did not use"
    );
    assert_eq!(response["data"]["user_id"], "u1");
    assert_eq!(response["data"]["chat_id"], "chat-1");
    assert!(response["data"]["usage"]["completion_tokens"].as_u64().is_some());
    // Every message carries the task's ids and the channel's sequence.
    let mut offset = welcome["offset"].as_u64().unwrap();
    for m in &stream.messages {
        assert_eq!(
            (m["user_id"].as_str(), m["chat_id"].as_str()),
            (Some("u1"), Some("chat-1")),
            "{m}"
        );
        assert_eq!(m["task_id"], task_id.as_str());
        offset += 1;
        assert_eq!(m["offset"], offset);
        assert_eq!(m["epoch"], welcome["epoch"]);
        assert!(m["timestamp"].is_string());
    }

    let (status, task) = user_get(srv, &format!("/api/chat/tasks/{task_id}"), &srv.token("u1")).await;
    assert_eq!(status, 200);
    assert_eq!(task["status"], "completed");
    assert_eq!(task["response"], "Echo: hello streaming world");
    assert_eq!(task["chat_id"], "chat-1");
}

/// The request's `model` is sent upstream and reported; the `echo` provider, which
/// uses no model, reports `echo` whatever the request named.
#[tokio::test]
async fn request_model_is_used_and_reported() {
    use crate::llm::{reply_events, FakeLlm, Reply, KEY};
    let fake = FakeLlm::start(vec![Reply::events(&reply_events())]).await;
    let upstream = TestServer::builder()
        .env("HERALD_LLM_BASE_URL", fake.base_url.clone())
        .env("HERALD_LLM_API_KEY", KEY)
        .spawn()
        .await;
    let echo = TestServer::spawn().await;
    for (srv, reported) in [(&upstream, "llama3.2"), (&echo, "echo")] {
        let (mut ws, _) = srv.connect("/ws/frame-stream/u1/", "u1").await;
        let (status, body) = user_post(
            srv,
            "/api/chat/generate-response/",
            &srv.token("u1"),
            json!({"user_id": "u1", "chat_id": "c", "prompt": "hi", "model": "llama3.2"}),
        )
        .await;
        assert_eq!(status, 202);
        let stream = TaskStream::read(&mut ws, body["task_id"].as_str().unwrap()).await;
        assert_eq!(stream.find("llm_response").unwrap()["data"]["model"], reported);
    }
    assert_eq!(fake.requests()[0].body["model"], "llama3.2");
}

#[tokio::test]
async fn user_api_errors() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        user_api_errors_on(&srv).await;
    }
}

async fn user_api_errors_on(srv: &TestServer) {
    let token = srv.token("u1");
    let path = "/api/chat/generate-response/";
    let ok = json!({"user_id": "u1", "chat_id": "c", "prompt": "hi"});
    // 401: no token, bad token.
    let (status, _) = read(srv.http.post(srv.url(path)).json(&ok).send().await.unwrap()).await;
    assert_eq!(status, 401);
    assert_eq!(user_post(srv, path, "garbage", ok.clone()).await.0, 401);
    // 403: user_id is not the token's user.
    let (status, body) = user_post(
        srv,
        path,
        &token,
        json!({"user_id": "u2", "chat_id": "c", "prompt": "hi"}),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    // 400: empty prompt, prompt over 32,000 characters, bad chat id.
    assert_eq!(
        user_post(
            srv,
            path,
            &token,
            json!({"user_id": "u1", "chat_id": "c", "prompt": "  "})
        )
        .await
        .0,
        400
    );
    let long = "é".repeat(32_001);
    assert_eq!(
        user_post(
            srv,
            path,
            &token,
            json!({"user_id": "u1", "chat_id": "c", "prompt": long})
        )
        .await
        .0,
        400
    );
    let at_limit = "é".repeat(32_000);
    assert_eq!(
        user_post(
            srv,
            path,
            &token,
            json!({"user_id": "u1", "chat_id": "c", "prompt": at_limit})
        )
        .await
        .0,
        202
    );
    assert_eq!(
        user_post(
            srv,
            path,
            &token,
            json!({"user_id": "u1", "chat_id": "bad id", "prompt": "x"})
        )
        .await
        .0,
        400
    );
    assert_eq!(
        user_post(srv, path, &token, json!({"user_id": "u1", "chat_id": "c"}))
            .await
            .0,
        400
    );
    // Tasks and chats are visible to their user only.
    let task_id = generate(srv, "u1", "c", "hi").await;
    assert_eq!(
        user_get(srv, &format!("/api/chat/tasks/{task_id}"), &srv.token("u2"))
            .await
            .0,
        404
    );
    assert_eq!(user_get(srv, "/api/chat/tasks/nope", &token).await.0, 404);
    assert_eq!(
        user_post(
            srv,
            &format!("/api/chat/tasks/{task_id}/cancel"),
            &srv.token("u2"),
            json!({})
        )
        .await
        .0,
        404
    );
}

#[tokio::test]
async fn more_than_3_tasks_in_flight_is_429() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        more_than_3_tasks_in_flight_is_429_on(&srv).await;
    }
}

async fn more_than_3_tasks_in_flight_is_429_on(srv: &TestServer) {
    let token = srv.token("u1");
    let prompt = "word ".repeat(200);
    for _ in 0..3 {
        generate(srv, "u1", "c", &prompt).await;
    }
    let (status, body) = user_post(
        srv,
        "/api/chat/generate-response/",
        &token,
        json!({"user_id": "u1", "chat_id": "c", "prompt": "one more"}),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_requests")),
        "{body}"
    );
    // Another user is not limited by u1's tasks.
    generate(srv, "u2", "c", "hi").await;
}

#[tokio::test]
async fn cancel_ends_the_stream_with_cancelled() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        cancel_ends_the_stream_with_cancelled_on(&srv).await;
    }
}

async fn cancel_ends_the_stream_with_cancelled_on(srv: &TestServer) {
    let (mut ws, _) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    let task_id = generate(srv, "u1", "c", &"word ".repeat(500)).await;
    // Wait for a few streaming frames, then cancel.
    let mut frames = 0;
    while frames < 3 {
        let m = ws.next_json().await;
        if m["type"] == "llm_frame" && m["frame"]["status"] == "streaming" {
            frames += 1;
        }
    }
    let (status, body) = user_post(
        srv,
        &format!("/api/chat/tasks/{task_id}/cancel"),
        &srv.token("u1"),
        json!({}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let rest = TaskStream::read(&mut ws, &task_id).await;
    let last = rest.messages.last().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["status"].as_str()),
        (Some("llm_status"), Some("cancelled"))
    );
    assert!(rest.find("llm_response").is_none());
    let (_, task) = user_get(srv, &format!("/api/chat/tasks/{task_id}"), &srv.token("u1")).await;
    assert_eq!(task["status"], "cancelled");
    // A cancelled exchange does not join the chat's history.
    let (_, history) = user_get(srv, "/api/chat/c/messages", &srv.token("u1")).await;
    assert_eq!(history["messages"], json!([]));
    // Cancelling again is harmless.
    assert_eq!(
        user_post(
            srv,
            &format!("/api/chat/tasks/{task_id}/cancel"),
            &srv.token("u1"),
            json!({})
        )
        .await
        .0,
        202
    );
}

#[tokio::test]
async fn chat_history_is_kept_per_user() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        chat_history_is_kept_per_user_on(&srv).await;
    }
}

async fn chat_history_is_kept_per_user_on(srv: &TestServer) {
    let (mut ws, _) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    for prompt in ["first question", "second question"] {
        let task_id = generate(srv, "u1", "c1", prompt).await;
        TaskStream::read(&mut ws, &task_id).await;
    }
    let (status, body) = user_get(srv, "/api/chat/c1/messages", &srv.token("u1")).await;
    assert_eq!(status, 200);
    let turns: Vec<(String, String)> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        turns,
        [
            ("user", "first question"),
            ("assistant", "Echo: first question"),
            ("user", "second question"),
            ("assistant", "Echo: second question"),
        ]
        .map(|(r, c)| (r.to_owned(), c.to_owned()))
    );
    assert!(body["messages"][0]["timestamp"].as_str().unwrap().ends_with('Z'));
    // The same chat id for another user is another chat.
    let (_, other) = user_get(srv, "/api/chat/c1/messages", &srv.token("u2")).await;
    assert_eq!(other["messages"], json!([]));
}
