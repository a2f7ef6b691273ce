//! SPEC §3 "Recovery" and §7: resume with `?since=&epoch=`: welcome, the missed
//! messages in order, then `recovered`; `recovered:false` when the epoch changed or the
//! gap left history.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

async fn resume(srv: &TestServer, path: &str, user: &str, since: u64, epoch: &str) -> (WsClient, Value) {
    let path = format!("{path}?since={since}&epoch={epoch}");
    srv.connect(&path, user).await
}

#[tokio::test]
async fn resume_replays_the_gap_in_order_then_recovered() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        resume_replays_the_gap_in_order_then_recovered_on(&srv).await;
    }
}

async fn resume_replays_the_gap_in_order_then_recovered_on(srv: &TestServer) {
    let (mut ws, welcome) = srv.connect("/ws/notifications/", "u1").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        srv.notify("u1", json!({"n": n})).await;
    }
    for n in 1..=3 {
        assert_eq!(ws.next_json().await["offset"], n);
    }
    ws.close().await;
    for n in 4..=6 {
        srv.notify("u1", json!({"n": n})).await;
    }
    let (mut ws, welcome) = resume(srv, "/ws/notifications/", "u1", 3, &epoch).await;
    assert_eq!(
        welcome["offset"], 6,
        "the welcome carries the channel's last offset"
    );
    for n in 4..=6 {
        let message = ws.next_json().await;
        assert_eq!(message["offset"], n);
        assert_eq!(message["notification"]["n"], n);
    }
    let recovered = ws.next_json().await;
    assert_eq!(recovered["type"], "system");
    assert_eq!(recovered["status"], "recovered");
    assert_eq!(recovered["recovered"], true);
    assert_eq!(recovered["missed"], 3);
    // Live delivery continues right after, without a duplicate.
    srv.notify("u1", json!({"n": 7})).await;
    assert_eq!(ws.next_json().await["offset"], 7);
}

#[tokio::test]
async fn resume_with_nothing_missed() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        resume_with_nothing_missed_on(&srv).await;
    }
}

async fn resume_with_nothing_missed_on(srv: &TestServer) {
    srv.notify("u1", json!({})).await;
    let (_ws, welcome) = srv.connect("/ws/notifications/", "u1").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let (mut ws, _) = resume(srv, "/ws/notifications/", "u1", 1, &epoch).await;
    let recovered = ws.next_json().await;
    assert_eq!(
        (recovered["recovered"].clone(), recovered["missed"].clone()),
        (json!(true), json!(0))
    );
}

#[tokio::test]
async fn wrong_epoch_replays_nothing() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        wrong_epoch_replays_nothing_on(&srv).await;
    }
}

async fn wrong_epoch_replays_nothing_on(srv: &TestServer) {
    for _ in 0..3 {
        srv.notify("u1", json!({})).await;
    }
    let (mut ws, welcome) = resume(srv, "/ws/notifications/", "u1", 1, "someotherepoch").await;
    assert_eq!(welcome["offset"], 3);
    let recovered = ws.next_json().await;
    assert_eq!(
        recovered["status"], "recovered",
        "nothing may be replayed before recovered:false"
    );
    assert_eq!(recovered["recovered"], false);
    assert_eq!(recovered["missed"], 0);
}

#[tokio::test]
async fn gap_that_left_history_is_not_recovered() {
    for (engine, srv, _redis) in engines_with(|b| b.env("HERALD_HISTORY_SIZE", "5")).await {
        eprintln!("engine: {engine}");
        gap_that_left_history_is_not_recovered_on(&srv).await;
    }
}

async fn gap_that_left_history_is_not_recovered_on(srv: &TestServer) {
    let (_ws, welcome) = srv.connect("/ws/notifications/", "u1").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    for _ in 0..10 {
        srv.notify("u1", json!({})).await;
    }
    // Offsets 6..=10 are kept: since=5 is recoverable, since=4 is not.
    let (mut ws, _) = resume(srv, "/ws/notifications/", "u1", 5, &epoch).await;
    for n in 6..=10 {
        assert_eq!(ws.next_json().await["offset"], n);
    }
    assert_eq!(ws.next_json().await["recovered"], true);
    let (mut ws, _) = resume(srv, "/ws/notifications/", "u1", 4, &epoch).await;
    let recovered = ws.next_json().await;
    assert_eq!(
        (recovered["recovered"].clone(), recovered["missed"].clone()),
        (json!(false), json!(0))
    );
    // A since beyond the channel's last offset is a client out of sync: reload.
    let (mut ws, _) = resume(srv, "/ws/notifications/", "u1", 99, &epoch).await;
    assert_eq!(ws.next_json().await["recovered"], false);
}

#[tokio::test]
async fn since_zero_without_epoch_replays_all_history() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        since_zero_without_epoch_replays_all_history_on(&srv).await;
    }
}

async fn since_zero_without_epoch_replays_all_history_on(srv: &TestServer) {
    for n in 1..=4 {
        srv.notify("u1", json!({"n": n})).await;
    }
    let (mut ws, _) = srv.connect("/ws/notifications/?since=0", "u1").await;
    for n in 1..=4 {
        assert_eq!(ws.next_json().await["offset"], n);
    }
    assert_eq!(ws.next_json().await["missed"], 4);
}

/// Issue 3: cut a frame-stream socket in the middle of an LLM answer (published by an
/// external worker through the API) and resume: the concatenated deltas equal the final
/// response, indices 0..n with no gap and no repeat.
#[tokio::test]
async fn resume_in_the_middle_of_an_llm_answer() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        resume_in_the_middle_of_an_llm_answer_on(&srv).await;
    }
}

async fn resume_in_the_middle_of_an_llm_answer_on(srv: &TestServer) {
    let answer = "The quick brown fox jumps over the lazy dog, again and again.";
    let deltas: Vec<String> = answer
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let (mut ws, welcome) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let publisher = {
        let http = srv.http.clone();
        let url = srv.url("/api/v1/frame-stream/u1");
        let deltas = deltas.clone();
        tokio::spawn(async move {
            let post = |body: Value| {
                let http = http.clone();
                let url = url.clone();
                async move {
                    let response = http
                        .post(url)
                        .bearer_auth(API_KEY)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status().as_u16(), 202);
                }
            };
            post(json!({"type": "llm_status", "status": "streaming", "chat_id": "c1", "task_id": "t1"}))
                .await;
            for (index, delta) in deltas.iter().enumerate() {
                post(json!({"type": "llm_frame", "chat_id": "c1", "task_id": "t1",
                            "frame": {"status": "streaming", "delta": delta, "index": index}}))
                .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            post(json!({"type": "llm_response", "chat_id": "c1", "task_id": "t1",
                        "data": {"event": "response_generated", "response": answer}}))
            .await;
        })
    };

    let mut answer_seen = Answer::default();
    // Read a few frames, then cut the socket mid-answer.
    for _ in 0..5 {
        let message = ws.next_json().await;
        answer_seen.take(&message);
    }
    drop(ws);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (mut ws, _) = resume(srv, "/ws/frame-stream/u1/", "u1", answer_seen.last_offset, &epoch).await;
    while answer_seen.response.is_none() {
        answer_seen.take_resumed(&ws.next_json().await);
    }
    publisher.await.unwrap();
    assert_eq!(answer_seen.indices, (0..deltas.len() as u64).collect::<Vec<_>>());
    assert_eq!(answer_seen.text, answer);
    assert_eq!(answer_seen.response.as_deref(), Some(answer));
}

/// What a client rebuilt of an LLM answer from the frames it received.
#[derive(Default)]
struct Answer {
    indices: Vec<u64>,
    text: String,
    response: Option<String>,
    last_offset: u64,
}

impl Answer {
    /// Takes a message read after a resume: the `recovered` message must say true, and
    /// every other message must be the next offset (no gap, no repeat).
    #[track_caller]
    fn take_resumed(&mut self, message: &Value) {
        if message["type"] == "system" {
            assert_eq!(message["recovered"], true, "{message}");
            return;
        }
        assert_eq!(
            message["offset"].as_u64().unwrap(),
            self.last_offset + 1,
            "no gap, no repeat"
        );
        self.take(message);
    }

    fn take(&mut self, message: &Value) {
        self.last_offset = message["offset"].as_u64().unwrap();
        match message["type"].as_str() {
            Some("llm_frame") if message["frame"]["status"] == "streaming" => {
                self.indices.push(message["frame"]["index"].as_u64().unwrap());
                self.text.push_str(message["frame"]["delta"].as_str().unwrap());
            }
            Some("llm_response") => {
                self.response = Some(message["data"]["response"].as_str().unwrap().to_owned())
            }
            _ => {}
        }
    }
}

/// A tiny seeded generator, so the randomized test is reproducible from its seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Issue 3: publishers hammer a channel while clients disconnect and reconnect with
/// `since` at random moments; every client ends with exactly the published sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_reconnects_never_lose_duplicate_or_reorder() {
    let srv = TestServer::builder()
        .env("HERALD_MEMBERSHIP", "claims")
        .spawn()
        .await;
    randomized_reconnects(vec![srv]).await;
}

/// The same with three nodes on one Redis: every reconnect and every publish goes to a
/// node picked at random, so clients resume through nodes they never used before.
#[tokio::test]
async fn randomized_reconnects_across_three_redis_nodes_never_lose_duplicate_or_reorder() {
    let Some(redis) = crate::redis::Redis::start().await else {
        return;
    };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(
            TestServer::builder()
                .env("HERALD_REDIS_URL", redis.url())
                .env("HERALD_MEMBERSHIP", "claims")
                .spawn()
                .await,
        );
    }
    randomized_reconnects(nodes).await;
}

async fn randomized_reconnects(nodes: Vec<TestServer>) {
    const SEED: u64 = 0x4845_5241_4c44; // "HERALD"
    const PUBLISHERS: u64 = 3;
    const PER_PUBLISHER: u64 = 150;
    const CLIENTS: u64 = 6;
    const TOTAL: u64 = PUBLISHERS * PER_PUBLISHER;
    let nodes = Arc::new(nodes);
    let token = |user: &str| sign(json!({"sub": user, "exp": now() + 600, "orgs": ["race"]}));

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let nodes = nodes.clone();
        let token = token(&format!("client{c}"));
        clients.push(tokio::spawn(async move {
            let mut rng = SplitMix(SEED ^ (c + 1));
            let mut seen: Vec<u64> = Vec::new();
            let mut position: Option<(u64, String)> = None;
            let mut reconnects = 0;
            while seen.last().copied().unwrap_or(0) < TOTAL {
                let path = match &position {
                    None => "/ws/events/race/".to_owned(),
                    Some((since, epoch)) => format!("/ws/events/race/?since={since}&epoch={epoch}"),
                };
                let srv = &nodes[rng.below(nodes.len() as u64) as usize];
                let mut ws = WsClient::connect(srv, &path).token(&token).open().await.unwrap();
                let welcome = ws.next_json().await;
                let epoch = welcome["epoch"].as_str().unwrap().to_owned();
                if position.is_none() {
                    // First connect: start from the beginning of the channel.
                    drop(ws);
                    position = Some((0, epoch));
                    continue;
                }
                let budget = 1 + rng.below(40);
                let mut taken = 0;
                while taken < budget && seen.last().copied().unwrap_or(0) < TOTAL {
                    let message = ws.next_json().await;
                    if message["type"] == "system" {
                        assert_eq!(message["recovered"], true, "history is large enough: {message}");
                        continue;
                    }
                    seen.push(message["offset"].as_u64().unwrap());
                    taken += 1;
                }
                position = Some((seen.last().copied().unwrap_or(0), epoch));
                reconnects += 1;
                drop(ws);
                if rng.below(3) == 0 {
                    tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
                }
            }
            (seen, reconnects)
        }));
    }

    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let nodes = nodes.clone();
        publishers.push(tokio::spawn(async move {
            let mut rng = SplitMix(SEED ^ (100 + p));
            for n in 0..PER_PUBLISHER {
                let srv = &nodes[rng.below(nodes.len() as u64) as usize];
                let (status, _) = srv
                    .post(
                        "/api/v1/orgs/race/events",
                        json!({"event_type": "tick", "data": {"p": p, "n": n}}),
                    )
                    .await;
                assert_eq!(status, 202);
                if rng.below(4) == 0 {
                    tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
                }
            }
        }));
    }
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let expected: Vec<u64> = (1..=TOTAL).collect();
    for (c, client) in clients.into_iter().enumerate() {
        let (seen, reconnects) = client.await.unwrap();
        assert_eq!(
            seen, expected,
            "client {c} (seed {SEED:#x}) lost, duplicated or reordered messages"
        );
        assert!(reconnects > 3, "client {c} should have reconnected several times");
    }
}

/// Issue 3 with herald's own LLM worker: cut the frame-stream socket in the middle of
/// an answer and resume; the deltas rebuild the final response exactly.
#[tokio::test]
async fn resume_in_the_middle_of_a_herald_llm_task() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        resume_in_the_middle_of_a_herald_llm_task_on(&srv).await;
    }
}

async fn resume_in_the_middle_of_a_herald_llm_task_on(srv: &TestServer) {
    let (mut ws, welcome) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let prompt = (0..60).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    let task_id = crate::chat::generate(srv, "u1", "c1", &prompt).await;
    let mut seen = Answer::default();
    while seen.indices.len() < 10 {
        let message = ws.next_json().await;
        seen.take(&message);
    }
    drop(ws);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (mut ws, _) = resume(srv, "/ws/frame-stream/u1/", "u1", seen.last_offset, &epoch).await;
    loop {
        let message = ws.next_json().await;
        if message["type"] != "system" {
            assert_eq!(message["task_id"], task_id.as_str());
        }
        seen.take_resumed(&message);
        if message["type"] == "llm_status" && message["status"] == "completed" {
            break;
        }
    }
    let n = seen.indices.len() as u64;
    assert_eq!(seen.indices, (0..n).collect::<Vec<_>>());
    assert_eq!(seen.text, format!("Echo: {prompt}"));
    assert_eq!(seen.response.as_deref(), Some(seen.text.as_str()));
}
