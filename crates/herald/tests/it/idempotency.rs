//! SPEC §8 "Idempotent publish": `Idempotency-Key` on every publish call, on both
//! engines and across nodes; a repeat publishes nothing and replays the first answer
//! with `Idempotent-Replayed: true`; a 503 says whether the message may have been
//! stored (`outcome`).

use std::time::Duration;

use serde_json::{json, Value};

use crate::redis::{user, Redis};
use crate::support::*;

/// A publish call's status, `Idempotent-Replayed` header and exact body text.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    replayed: bool,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

async fn post_with_key(srv: &TestServer, path: &str, key: Option<&str>, body: &Value) -> Answer {
    let mut request = srv.http.post(srv.url(path)).bearer_auth(API_KEY).json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("post");
    let status = response.status().as_u16();
    let replayed = match response.headers().get("idempotent-replayed") {
        None => false,
        Some(value) => {
            assert_eq!(value, "true", "Idempotent-Replayed is only ever true");
            true
        }
    };
    Answer {
        status,
        replayed,
        body: response.text().await.expect("body"),
    }
}

/// The offsets of the messages in `channel`'s history.
async fn offsets(srv: &TestServer, channel: &str) -> Vec<u64> {
    let (status, history) = srv.get(&format!("/api/v1/channels/{channel}/history")).await;
    assert_eq!(status, 200, "{history}");
    history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|message| message["offset"].as_u64().unwrap())
        .collect()
}

/// Sends `body` to `path` twice with one key: the second answer is the first, replayed,
/// and `channel` holds one message more.
async fn check_once(srv: &TestServer, path: &str, body: Value, channel: &str) {
    let key = format!("key-{}", herald::channel::new_id());
    let before = offsets(srv, channel).await.len();
    let first = post_with_key(srv, path, Some(&key), &body).await;
    assert_eq!(first.status, 202, "{path}: {}", first.body);
    assert!(!first.replayed, "{path}: the first answer is no replay");
    let second = post_with_key(srv, path, Some(&key), &body).await;
    assert_eq!(
        second,
        Answer {
            replayed: true,
            ..first
        },
        "{path}: the repeat gets the first answer"
    );
    assert_eq!(
        offsets(srv, channel).await.len(),
        before + 1,
        "{path}: published once"
    );
}

async fn every_call_publishes_once_per_key_on(srv: &TestServer) {
    let u = user("idem");
    check_once(
        srv,
        &format!("/api/v1/notifications/{u}"),
        json!({"title": "once"}),
        &format!("notifications:{u}"),
    )
    .await;
    check_once(
        srv,
        &format!("/api/v1/orgs/{u}/events"),
        json!({"event_type": "thing.done", "data": {"n": 1}}),
        &format!("org:{u}"),
    )
    .await;
    check_once(
        srv,
        &format!("/api/v1/frame-stream/{u}"),
        json!({"type": "llm_status", "status": "started", "message": "Task started", "chat_id": "c1"}),
        &format!("frames:{u}"),
    )
    .await;
    check_once(
        srv,
        "/api/v1/publish",
        json!({"channel": format!("notifications:{u}"), "data": {"generic": true}}),
        &format!("notifications:{u}"),
    )
    .await;

    // A batch: the key covers all of it.
    let key = format!("batch-{}", herald::channel::new_id());
    let batch = json!([
        {"channel": format!("notifications:{u}"), "data": {"n": 1}},
        {"channel": format!("org:{u}"), "data": {"n": 2}},
        {"channel": format!("notifications:{u}"), "data": {"n": 3}},
    ]);
    let before = (
        offsets(srv, &format!("notifications:{u}")).await.len(),
        offsets(srv, &format!("org:{u}")).await.len(),
    );
    let first = post_with_key(srv, "/api/v1/publish", Some(&key), &batch).await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.json().as_array().unwrap().len(), 3);
    let second = post_with_key(srv, "/api/v1/publish", Some(&key), &batch).await;
    assert_eq!(second.body, first.body);
    assert!(second.replayed);
    assert_eq!(
        (
            offsets(srv, &format!("notifications:{u}")).await.len(),
            offsets(srv, &format!("org:{u}")).await.len(),
        ),
        (before.0 + 2, before.1 + 1),
        "the batch was published once"
    );

    // Without a key, every call publishes.
    let path = format!("/api/v1/notifications/{u}");
    let before = offsets(srv, &format!("notifications:{u}")).await.len();
    for _ in 0..2 {
        let answer = post_with_key(srv, &path, None, &json!({"plain": true})).await;
        assert_eq!((answer.status, answer.replayed), (202, false));
    }
    assert_eq!(
        offsets(srv, &format!("notifications:{u}")).await.len(),
        before + 2
    );
}

#[tokio::test]
async fn every_publish_call_publishes_once_per_key() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        every_call_publishes_once_per_key_on(&srv).await;
    }
}

async fn a_key_reused_on_another_channel_is_another_publish_on(srv: &TestServer) {
    let (alice, bob) = (user("alice"), user("bob"));
    let key = format!("shared-{}", herald::channel::new_id());
    let to_alice = post_with_key(
        srv,
        &format!("/api/v1/notifications/{alice}"),
        Some(&key),
        &json!({"n": 1}),
    )
    .await;
    let to_bob = post_with_key(
        srv,
        &format!("/api/v1/notifications/{bob}"),
        Some(&key),
        &json!({"n": 1}),
    )
    .await;
    assert_eq!((to_alice.status, to_alice.replayed), (202, false));
    assert_eq!((to_bob.status, to_bob.replayed), (202, false), "{}", to_bob.body);
    assert_eq!(to_bob.json()["channel"], format!("notifications:{bob}"));
    assert_eq!(offsets(srv, &format!("notifications:{bob}")).await, vec![1]);
    // A one-item batch on alice's channel with her key is her call again.
    let batch = json!([{"channel": format!("notifications:{alice}"), "data": {"n": 1}}]);
    let again = post_with_key(srv, "/api/v1/publish", Some(&key), &batch).await;
    assert!(again.replayed);
    assert_eq!(again.body, to_alice.body);
    assert_eq!(offsets(srv, &format!("notifications:{alice}")).await, vec![1]);
}

#[tokio::test]
async fn a_key_reused_on_another_channel_is_another_publish() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        a_key_reused_on_another_channel_is_another_publish_on(&srv).await;
    }
}

#[tokio::test]
async fn a_key_must_be_1_to_128_characters() {
    let srv = TestServer::spawn().await;
    let u = user("keys");
    let path = format!("/api/v1/notifications/{u}");
    let body = json!({"n": 1});
    for bad in [String::new(), "k".repeat(129), "é".repeat(129)] {
        let answer = post_with_key(&srv, &path, Some(&bad), &body).await;
        assert_eq!(answer.status, 400, "a key of {} characters", bad.chars().count());
        let error = answer.json();
        assert_eq!(error["error"], "bad_request");
        assert!(
            error["message"].as_str().unwrap().contains("Idempotency-Key"),
            "{error}"
        );
    }
    // 128 characters, 256 bytes: accepted.
    let answer = post_with_key(&srv, &path, Some(&"é".repeat(128)), &body).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    // Two keys in one request.
    let response = srv
        .http
        .post(srv.url(&path))
        .bearer_auth(API_KEY)
        .header("Idempotency-Key", "a")
        .header("Idempotency-Key", "b")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(
        offsets(&srv, &format!("notifications:{u}")).await,
        vec![1],
        "no refused call published"
    );
}

async fn concurrent_repeats_publish_once_on(srv: &TestServer) {
    let u = user("race");
    let path = format!("/api/v1/notifications/{u}");
    let key = "the-same-key";
    let calls = (0..8).map(|n| {
        let path = path.clone();
        async move { post_with_key(srv, &path, Some(key), &json!({"n": n})).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    assert!(answers.iter().all(|answer| answer.status == 202), "{answers:?}");
    assert_eq!(
        answers.iter().filter(|answer| !answer.replayed).count(),
        1,
        "{answers:?}"
    );
    assert!(
        answers.iter().all(|answer| answer.body == answers[0].body),
        "{answers:?}"
    );
    assert_eq!(offsets(srv, &format!("notifications:{u}")).await, vec![1]);
}

#[tokio::test]
async fn concurrent_repeats_publish_once() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        concurrent_repeats_publish_once_on(&srv).await;
    }
}

#[tokio::test]
async fn a_repeat_on_another_node_replays_the_first_answer() {
    let Some(redis) = Redis::start().await else { return };
    let (a, b) = (redis.node().await, redis.node().await);
    let u = user("nodes");
    let key = herald::channel::new_id();
    let path = format!("/api/v1/orgs/{u}/events");
    let body = json!({"event_type": "x", "data": {}});
    let first = post_with_key(&a, &path, Some(&key), &body).await;
    assert_eq!((first.status, first.replayed), (202, false), "{}", first.body);
    let second = post_with_key(&b, &path, Some(&key), &body).await;
    assert_eq!(
        second,
        Answer {
            replayed: true,
            ..first
        }
    );
    assert_eq!(offsets(&b, &format!("org:{u}")).await, vec![1]);
}

/// Sends SIGSTOP or SIGCONT to a process.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// How many messages of `channel`'s history carry the notification `{"n": marker}`.
async fn count(srv: &TestServer, channel: &str, marker: &str) -> usize {
    let (status, history) = srv.get(&format!("/api/v1/channels/{channel}/history")).await;
    assert_eq!(status, 200, "{history}");
    history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|message| message["notification"]["n"] == marker)
        .count()
}

/// With Redis gone, a publish is refused as `not_published` and a retry with the same
/// key, once Redis is back, publishes it (once). With Redis frozen, a publish times out
/// as `unknown`, and the message does arrive once Redis runs again.
#[tokio::test]
async fn a_503_says_whether_the_message_may_have_been_stored() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    if !redis.owned() {
        crate::redis::skip_shared_redis(None);
        return;
    }
    let srv = redis.node().await;
    let u = user("outage");
    let path = format!("/api/v1/notifications/{u}");
    let channel = format!("notifications:{u}");
    let note = |marker: &str| json!({"n": marker});

    redis.kill().await;
    crate::redis::wait_ready(&srv, false).await;
    // A publish handed to the connection just before it noticed Redis was gone may be
    // "unknown" (the client library sends it again on reconnect); once the node knows,
    // nothing is sent and the answer is "not_published".
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let refused = post_with_key(&srv, &path, None, &note("keyless")).await;
        assert_eq!(refused.status, 503, "{}", refused.body);
        assert_eq!(refused.json()["error"], "unavailable");
        match refused.json()["outcome"].as_str() {
            Some("not_published") => break,
            Some("unknown") => assert!(tokio::time::Instant::now() < deadline, "{}", refused.body),
            _ => panic!("a publish 503 says its outcome: {}", refused.body),
        }
    }
    let refused = post_with_key(&srv, &path, Some("down-key"), &note("keyed")).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["outcome"], "not_published", "{}", refused.body);
    redis.restart().await;
    crate::redis::wait_ready(&srv, true).await;
    // Retried as a client does, until every connection is back.
    let deadline = tokio::time::Instant::now() + WAIT;
    let retried = loop {
        let retried = post_with_key(&srv, &path, Some("down-key"), &note("keyed")).await;
        if retried.status != 503 || tokio::time::Instant::now() > deadline {
            break retried;
        }
        assert_eq!(retried.json()["outcome"], "not_published", "{}", retried.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (retried.status, retried.replayed),
        (202, false),
        "{}",
        retried.body
    );
    let repeated = post_with_key(&srv, &path, Some("down-key"), &note("keyed")).await;
    assert_eq!(
        (repeated.status, repeated.replayed),
        (202, true),
        "{}",
        repeated.body
    );
    assert_eq!(count(&srv, &channel, "keyed").await, 1);

    // Frozen: the command is sent, no answer comes.
    let pid = redis.pid().unwrap();
    signal(pid, "-STOP");
    let frozen = post_with_key(&srv, &path, None, &note("frozen")).await;
    signal(pid, "-CONT");
    assert_eq!(frozen.status, 503, "{}", frozen.body);
    assert_eq!(frozen.json()["outcome"], "unknown", "{}", frozen.body);
    // It was stored after all, once Redis ran again: "unknown" was the honest answer.
    let deadline = tokio::time::Instant::now() + WAIT;
    while count(&srv, &channel, "frozen").await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the unanswered publish never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A key whose record could not be written while Redis was frozen is free again
    // once it runs: the retry publishes, once.
    signal(pid, "-STOP");
    let frozen = post_with_key(&srv, &path, Some("frozen-key"), &note("frozen-key")).await;
    signal(pid, "-CONT");
    assert_eq!(frozen.status, 503, "{}", frozen.body);
    assert_eq!(frozen.json()["outcome"], "not_published", "{}", frozen.body);
    let retried = post_with_key(&srv, &path, Some("frozen-key"), &note("frozen-key")).await;
    assert_eq!(
        (retried.status, retried.replayed),
        (202, false),
        "{}",
        retried.body
    );
    let repeated = post_with_key(&srv, &path, Some("frozen-key"), &note("frozen-key")).await;
    assert_eq!(
        (repeated.status, repeated.replayed),
        (202, true),
        "{}",
        repeated.body
    );
    assert_eq!(count(&srv, &channel, "frozen-key").await, 1);
}

/// A key left open by an attempt whose publish was not confirmed (as after a Redis
/// timeout): the retry finds the message in history and answers its receipt without
/// publishing again; while the message is not in history, the retry answers "unknown".
#[tokio::test]
async fn a_retry_finds_an_unconfirmed_message_in_history() {
    use herald::channel::Channel;
    use herald::idempotency::{Claim, Idempotency, Key, Unconfirmed};

    let Some(redis) = Redis::start().await else { return };
    let srv = redis.node().await;
    let u = user("unconfirmed");
    let channel = format!("notifications:{u}");
    let path = format!("/api/v1/notifications/{u}");
    // The message the interrupted attempt sent, which did reach Redis.
    let sent = post_with_key(&srv, &path, None, &json!({"n": "sent"})).await;
    assert_eq!(sent.status, 202);
    let sent_id = sent.json()["id"].as_str().unwrap().to_owned();

    // Leave two keys as an attempt that timed out would: one whose message is in
    // history, one whose message never arrived.
    let stopped = tokio_util::sync::CancellationToken::new();
    let client = herald::control::command_client(&redis.url(), &stopped)
        .await
        .unwrap();
    let records = Idempotency::redis(client, None, Duration::from_secs(60));
    let channels = vec![Channel::parse(&channel).unwrap()];
    for (key, id) in [
        ("found-key", sent_id.clone()),
        ("lost-key", herald::channel::new_id()),
    ] {
        let Claim::Publish(ticket) = records
            .claim(&channels, &Key::parse(key.as_bytes()).unwrap(), 1)
            .await
            .unwrap()
        else {
            panic!("a fresh key is free");
        };
        let unconfirmed = Unconfirmed {
            channel: channel.clone(),
            id: Some(id),
        };
        records.release(ticket, Vec::new(), Some(unconfirmed)).await;
    }

    let found = post_with_key(&srv, &path, Some("found-key"), &json!({"n": "sent"})).await;
    assert_eq!((found.status, found.replayed), (202, true), "{}", found.body);
    assert_eq!(found.body, sent.body, "the receipt of the message already sent");
    let lost = post_with_key(&srv, &path, Some("lost-key"), &json!({"n": "lost"})).await;
    assert_eq!(lost.status, 503, "{}", lost.body);
    assert_eq!(lost.json()["outcome"], "unknown", "{}", lost.body);
    let again = post_with_key(&srv, &path, Some("found-key"), &json!({"n": "sent"})).await;
    assert_eq!((again.status, again.replayed, again.body), (202, true, sent.body));
    assert_eq!(
        offsets(&srv, &channel).await,
        vec![1],
        "nothing was published twice"
    );
    stopped.cancel();
}
