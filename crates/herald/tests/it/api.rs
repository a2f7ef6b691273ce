//! SPEC §4 service API rows: publish calls reach sockets with offsets and epochs; errors
//! come as JSON with the listed statuses.

use serde_json::{json, Value};

use crate::support::*;

fn assert_sequenced(message: &Value, offset: u64, epoch: &Value) {
    assert_eq!(message["offset"], offset, "{message}");
    assert_eq!(&message["epoch"], epoch, "{message}");
    assert!(message["id"].as_str().is_some_and(|s| !s.is_empty()), "{message}");
    assert!(
        message["timestamp"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{message}"
    );
}

#[tokio::test]
async fn notification_reaches_the_user() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        notification_reaches_the_user_on(&srv).await;
    }
}

async fn notification_reaches_the_user_on(srv: &TestServer) {
    let (mut ws, welcome) = srv.connect("/ws/notifications/", "user_123").await;
    let (mut other, _) = srv.connect("/ws/notifications/", "user_999").await;
    let receipt = srv
        .notify(
            "user_123",
            json!({"title": "Task Complete", "body": "Your export is ready"}),
        )
        .await;
    assert_eq!(receipt["channel"], "notifications:user_123");
    assert_eq!(receipt["offset"], 1);
    let message = ws.next_json().await;
    assert_eq!(message["type"], "notification");
    assert_eq!(
        message["notification"],
        json!({"title": "Task Complete", "body": "Your export is ready"})
    );
    assert_eq!(message["id"], receipt["id"]);
    assert_sequenced(&message, 1, &welcome["epoch"]);

    // Another user's socket got nothing: its next message is the answer to a ping.
    other.send_json(json!({"type": "ping"})).await;
    assert_eq!(other.next_json().await["type"], "pong");

    // Offsets grow by one per channel.
    let receipt = srv.notify("user_123", json!({"n": 2})).await;
    assert_eq!(receipt["offset"], 2);
    assert_sequenced(&ws.next_json().await, 2, &welcome["epoch"]);
}

#[tokio::test]
async fn welcome_offset_is_the_channel_last_offset() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        welcome_offset_is_the_channel_last_offset_on(&srv).await;
    }
}

async fn welcome_offset_is_the_channel_last_offset_on(srv: &TestServer) {
    for _ in 0..3 {
        srv.notify("u1", json!({"x": 1})).await;
    }
    let (mut ws, welcome) = srv.connect("/ws/notifications/", "u1").await;
    assert_eq!(welcome["offset"], 3);
    srv.notify("u1", json!({"x": 2})).await;
    assert_eq!(ws.next_json().await["offset"], 4);
}

#[tokio::test]
async fn org_event_reaches_every_member() {
    for (engine, srv, _redis) in engines_with(|b| b.env("HERALD_MEMBERSHIP", "claims")).await {
        eprintln!("engine: {engine}");
        org_event_reaches_every_member_on(&srv).await;
    }
}

async fn org_event_reaches_every_member_on(srv: &TestServer) {
    let token = |user: &str| sign(json!({"sub": user, "exp": now() + 60, "orgs": ["acme"]}));
    let mut a = WsClient::connect(srv, "/ws/events/acme/")
        .token(&token("a"))
        .open()
        .await
        .unwrap();
    let mut b = WsClient::connect(srv, "/ws/events/acme/")
        .token(&token("b"))
        .open()
        .await
        .unwrap();
    let epoch = a.next_json().await["epoch"].clone();
    b.next_json().await;
    let (status, receipt) = srv
        .post(
            "/api/v1/orgs/acme/events",
            json!({"event_type": "resource.created", "data": {"resource_id": "r1"}}),
        )
        .await;
    assert_eq!(status, 202, "{receipt}");
    assert_eq!(receipt["channel"], "org:acme");
    for ws in [&mut a, &mut b] {
        let event = ws.next_json().await;
        assert_eq!(event["type"], "org_event");
        assert_eq!(event["org_id"], "acme");
        assert_eq!(event["event_type"], "resource.created");
        assert_eq!(event["data"], json!({"resource_id": "r1"}));
        assert_sequenced(&event, 1, &epoch);
    }
    let (status, body) = srv.post("/api/v1/orgs/acme/events", json!({"data": {}})).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = srv
        .post(
            "/api/v1/orgs/acme/events",
            json!({"event_type": "x", "data": [1]}),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn frame_stream_messages_from_an_external_worker() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        frame_stream_messages_from_an_external_worker_on(&srv).await;
    }
}

async fn frame_stream_messages_from_an_external_worker_on(srv: &TestServer) {
    let (mut ws, welcome) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    let frames = [
        json!({"type": "llm_status", "status": "started", "message": "Task started", "chat_id": "c1", "task_id": "t1"}),
        json!({"type": "llm_frame", "frame": {"status": "streaming", "delta": "Hel", "index": 0}, "chat_id": "c1", "task_id": "t1"}),
        json!({"type": "llm_response", "data": {"event": "response_generated", "response": "Hello"}, "chat_id": "c1"}),
        json!({"type": "llm_error", "error": "LLM processing failed: rate limit exceeded", "chat_id": "c1"}),
    ];
    for (idx, frame) in frames.iter().enumerate() {
        let (status, receipt) = srv.post("/api/v1/frame-stream/u1", frame.clone()).await;
        assert_eq!(status, 202, "{receipt}");
        assert_eq!(receipt["channel"], "frames:u1");
        let got = ws.next_json().await;
        assert_eq!(got["type"], frame["type"]);
        assert_eq!(got["chat_id"], "c1");
        assert_eq!(got["user_id"], "u1");
        assert_sequenced(&got, idx as u64 + 1, &welcome["epoch"]);
    }
    for bad in [
        json!({"type": "llm_frame", "frame": {}}),
        json!({"type": "notification", "chat_id": "c1"}),
        json!({"type": "llm_status", "chat_id": "bad id"}),
    ] {
        let (status, body) = srv.post("/api/v1/frame-stream/u1", bad).await;
        assert_eq!(status, 400, "{body}");
    }
}

#[tokio::test]
async fn generic_publish_single_and_batch() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        generic_publish_single_and_batch_on(&srv).await;
    }
}

async fn generic_publish_single_and_batch_on(srv: &TestServer) {
    let (mut ws, welcome) = srv.connect("/ws/notifications/", "u1").await;
    let (status, receipts) = srv
        .post(
            "/api/v1/publish",
            json!({"channel": "notifications:u1", "data": {"type": "custom", "x": 1, "offset": 999}}),
        )
        .await;
    assert_eq!(status, 202, "{receipts}");
    assert_eq!(
        receipts.as_array().map(Vec::len),
        Some(1),
        "a single object is answered with a list"
    );
    assert_eq!(receipts[0]["channel"], "notifications:u1");
    let got = ws.next_json().await;
    assert_eq!(got["type"], "custom");
    assert_eq!(got["x"], 1);
    // herald's offset wins over one the publisher sent.
    assert_sequenced(&got, 1, &welcome["epoch"]);

    let (status, receipts) = srv
        .post(
            "/api/v1/publish",
            json!([
                {"channel": "notifications:u1", "data": {"n": 1}},
                {"channel": "org:acme", "data": {"n": 2}},
                {"channel": "notifications:u1", "data": {"n": 3}},
            ]),
        )
        .await;
    assert_eq!(status, 202);
    let offsets: Vec<(Value, Value)> = receipts
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["channel"].clone(), r["offset"].clone()))
        .collect();
    assert_eq!(
        offsets,
        vec![
            (json!("notifications:u1"), json!(2)),
            (json!("org:acme"), json!(1)),
            (json!("notifications:u1"), json!(3))
        ]
    );
    assert_eq!(ws.next_json().await["n"], 1);
    assert_eq!(ws.next_json().await["n"], 3);

    // One bad item publishes nothing.
    let (status, body) = srv
        .post(
            "/api/v1/publish",
            json!([{"channel": "notifications:u1", "data": {"n": 4}}, {"channel": "nope:x", "data": {}}]),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    srv.notify("u1", json!({"after": true})).await;
    let next = ws.next_json().await;
    assert_eq!(
        next["offset"], 4,
        "the rejected batch must not have published item 0"
    );
    for bad in [
        json!({"channel": "notifications:u1"}),
        json!({"channel": "notifications:u1", "data": 5}),
        json!([]),
        json!(7),
    ] {
        assert_eq!(srv.post("/api/v1/publish", bad).await.0, 400);
    }
}

#[tokio::test]
async fn publish_without_subscribers_is_kept() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        publish_without_subscribers_is_kept_on(&srv).await;
    }
}

async fn publish_without_subscribers_is_kept_on(srv: &TestServer) {
    let receipt = srv.notify("nobody-yet", json!({"kept": true})).await;
    assert_eq!(receipt["offset"], 1);
    let (status, history) = srv
        .get("/api/v1/channels/notifications:nobody-yet/history?since=0")
        .await;
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["offset"], 1);
    assert_eq!(history["messages"][0]["notification"], json!({"kept": true}));
}

#[tokio::test]
async fn api_errors_are_json_with_spec_statuses() {
    let srv = TestServer::spawn().await;
    let url = srv.url("/api/v1/notifications/u1");

    // 401: no key, bad key.
    let (status, body) = read(srv.http.post(&url).json(&json!({})).send().await.unwrap()).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthorized")));
    assert!(body["message"].is_string());
    let (status, _) = read(
        srv.http
            .post(&url)
            .bearer_auth("wrong")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);

    // 400: bad id, bad body.
    assert_eq!(srv.post("/api/v1/notifications/bad%20id", json!({})).await.0, 400);
    assert_eq!(srv.post("/api/v1/notifications/u1", json!([1])).await.0, 400);
    let (status, body) = read(
        srv.http
            .post(&url)
            .bearer_auth(API_KEY)
            .header("Content-Type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));

    // 413: body over 64 KiB.
    let big = json!({"pad": "x".repeat(64 * 1024)});
    let (status, body) = srv.post("/api/v1/notifications/u1", big).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("payload_too_large")));

    // 415: not JSON.
    let (status, body) = read(
        srv.http
            .post(&url)
            .bearer_auth(API_KEY)
            .header("Content-Type", "text/plain")
            .body("hi")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (415, Some("unsupported_media_type"))
    );

    // 404: unknown route.
    let (status, body) = srv.get("/api/v1/nope").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn history_call() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        history_call_on(&srv).await;
    }
}

async fn history_call_on(srv: &TestServer) {
    for n in 1..=5 {
        srv.notify("u1", json!({"n": n})).await;
    }
    let (status, body) = srv
        .get("/api/v1/channels/notifications:u1/history?since=2&limit=2")
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["offset"], 5,
        "the answer's offset is the channel's last offset"
    );
    assert!(body["epoch"].is_string());
    let offsets: Vec<u64> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        offsets,
        vec![3, 4],
        "since is exclusive; limit takes the oldest first"
    );
    assert_eq!(
        srv.get("/api/v1/channels/notifications:u1/history?since=-1")
            .await
            .0,
        400
    );
    assert_eq!(srv.get("/api/v1/channels/nope:u1/history").await.0, 400);
    let (status, _) = read(
        srv.http
            .get(srv.url("/api/v1/channels/notifications:u1/history"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn health_readiness_and_stats() {
    let srv = TestServer::spawn().await;
    let (status, body) = read(srv.http.get(srv.url("/healthz")).send().await.unwrap()).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = read(srv.http.get(srv.url("/readyz")).send().await.unwrap()).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")), "{body}");
    assert_eq!(
        body,
        json!({"status": "ready", "broker": true, "database": true, "queue": true, "shutting_down": false}),
        "the documented /readyz shape"
    );

    let (_ws, _) = srv.connect("/ws/notifications/", "u1").await;
    srv.notify("u1", json!({})).await;
    let (status, stats) = srv.get("/api/v1/stats").await;
    assert_eq!(status, 200);
    let node = &stats["nodes"][0];
    assert_eq!(node["connections"]["open"], 1, "{stats}");
    assert_eq!(node["connections"]["notifications"], 1);
    assert_eq!(node["messages"]["published"], 1);
    assert_eq!(node["messages"]["delivered"], 1);
    let (status, _) = read(srv.http.get(srv.url("/api/v1/stats")).send().await.unwrap()).await;
    assert_eq!(status, 401);
}
