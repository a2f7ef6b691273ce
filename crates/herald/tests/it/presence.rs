//! SPEC §12, presence: who has a socket on an org channel (on any node), the
//! `GET /api/v1/orgs/{org_id}/presence` answer, the `presence` / `presence_join` /
//! `presence_leave` messages of a subscription that asked for them (on `/ws/` and with
//! `?presence=1`), on both engines; then across two nodes on one Redis, and a node
//! process killed (SIGKILL) taking its users out of presence within the node TTL.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::redis::{user, Redis};
use crate::support::*;

/// Subscribes `ws` (a `/ws/` socket) to `org:{org}`, with `presence` when asked, and
/// returns the `subscribed` answer.
async fn subscribe(ws: &mut WsClient, org: &str, presence: bool) -> Value {
    ws.send_json(
        json!({"type": "subscribe", "channel": format!("org:{org}"), "id": "s", "presence": presence}),
    )
    .await;
    let answer = ws.next_json().await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    answer
}

/// The next message, which must be a presence message with exactly these fields.
async fn next_presence(ws: &mut WsClient) -> Value {
    let message = ws.next_json().await;
    match message["type"].as_str() {
        Some("presence") => assert_eq!(keys(&message), ["channel", "type", "users"], "{message}"),
        Some("presence_join" | "presence_leave") => {
            assert_eq!(keys(&message), ["channel", "type", "user_id"], "{message}")
        }
        _ => panic!("expected a presence message, got {message}"),
    }
    message
}

async fn expect_change(ws: &mut WsClient, kind: &str, org: &str, user: &str) {
    let message = next_presence(ws).await;
    assert_eq!(
        message,
        json!({"type": kind, "channel": format!("org:{org}"), "user_id": user})
    );
}

/// `GET …/presence` as `{user: connections}`.
async fn present(srv: &TestServer, org: &str) -> Vec<(String, u64)> {
    let (status, body) = srv.get(&format!("/api/v1/orgs/{org}/presence")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(keys(&body), ["users"], "{body}");
    body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            assert_eq!(keys(u), ["connections", "user_id"], "{u}");
            (
                u["user_id"].as_str().unwrap().to_owned(),
                u["connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Polls `GET …/presence` until it answers `want` (Redis writes changes within 50 ms).
async fn wait_present(srv: &TestServer, org: &str, want: &[(&str, u64)]) {
    let want: Vec<(String, u64)> = want.iter().map(|(u, n)| ((*u).to_owned(), *n)).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let got = present(srv, org).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "presence stayed {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a ping and expects the pong as the next message: nothing else was queued.
async fn nothing_else(ws: &mut WsClient) {
    // A presence change is written within 50 ms; give one the time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send_json(json!({"type": "ping"})).await;
    let next = ws.next_json().await;
    assert_eq!(next["type"], "pong", "{next}");
}

#[tokio::test]
async fn presence_on_both_engines() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let org = user("acme");
        let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
        for u in [&alice, &bob, &carol] {
            assert_eq!(srv.put(&format!("/api/v1/orgs/{org}/members/{u}")).await.0, 204);
        }
        wait_present(&srv, &org, &[]).await;

        // bob watches: `subscribed`, then `presence` with himself.
        let (mut watcher, _) = srv.connect("/ws/", &bob).await;
        subscribe(&mut watcher, &org, true).await;
        let snapshot = next_presence(&mut watcher).await;
        assert_eq!(
            snapshot,
            json!({"type": "presence", "channel": format!("org:{org}"), "users": [{"user_id": bob, "connections": 1}]})
        );
        // carol subscribes without presence: she gets no presence message at all.
        let (mut quiet, _) = srv.connect("/ws/", &carol).await;
        subscribe(&mut quiet, &org, false).await;
        expect_change(&mut watcher, "presence_join", &org, &carol).await;

        // alice's first socket (the events endpoint) is a join; her second is not.
        let (alice1, _) = srv.connect(&format!("/ws/events/{org}/"), &alice).await;
        expect_change(&mut watcher, "presence_join", &org, &alice).await;
        let (mut alice2, _) = srv.connect("/ws/", &alice).await;
        subscribe(&mut alice2, &org, false).await;
        let mut want = vec![(alice.as_str(), 2), (bob.as_str(), 1), (carol.as_str(), 1)];
        want.sort();
        wait_present(&srv, &org, &want).await;

        // Her first socket goes: still present. Her last goes: a leave.
        alice1.close().await;
        let mut want = vec![(alice.as_str(), 1), (bob.as_str(), 1), (carol.as_str(), 1)];
        want.sort();
        wait_present(&srv, &org, &want).await;
        nothing_else(&mut watcher).await;
        alice2
            .send_json(json!({"type": "unsubscribe", "channel": format!("org:{org}"), "id": "u"}))
            .await;
        assert_eq!(alice2.next_json().await["type"], "unsubscribed");
        expect_change(&mut watcher, "presence_leave", &org, &alice).await;
        let mut want = vec![(bob.as_str(), 1), (carol.as_str(), 1)];
        want.sort();
        wait_present(&srv, &org, &want).await;

        // `?presence=1` on the events endpoint: the welcome, then `presence`.
        let (mut events, welcome) = srv
            .connect(&format!("/ws/events/{org}/?presence=1"), &alice)
            .await;
        assert_eq!(welcome["read_offset"], 0, "{welcome}");
        let snapshot = next_presence(&mut events).await;
        let mut everyone = [alice.clone(), bob.clone(), carol.clone()];
        everyone.sort();
        let everyone: Vec<Value> = everyone
            .iter()
            .map(|u| json!({"user_id": u, "connections": 1}))
            .collect();
        assert_eq!(snapshot["users"], json!(everyone), "{snapshot}");
        expect_change(&mut watcher, "presence_join", &org, &alice).await;

        // A user's socket on another channel is no presence in the org.
        let (_notifications, _) = srv.connect("/ws/notifications/", &carol).await;
        quiet.close().await;
        expect_change(&mut watcher, "presence_leave", &org, &carol).await;
        expect_change(&mut events, "presence_leave", &org, &carol).await;

        // Presence messages have no offset and stay out of history: after all this, the
        // org's first message has offset 1 and history holds only it.
        let (status, receipt) = srv
            .post(&format!("/api/v1/orgs/{org}/events"), json!({"event_type": "e"}))
            .await;
        assert_eq!(status, 202, "{receipt}");
        assert_eq!(receipt["offset"], 1, "{receipt}");
        for ws in [&mut watcher, &mut events] {
            let event = ws.next_json().await;
            assert_eq!(
                (event["type"].as_str(), event["offset"].as_u64()),
                (Some("org_event"), Some(1)),
                "{event}"
            );
        }
        let (status, history) = srv
            .get(&format!("/api/v1/channels/org:{org}/history?since=0"))
            .await;
        assert_eq!(status, 200, "{history}");
        let types: Vec<&str> = history["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["org_event"], "{history}");

        // `presence` on a channel that is not an org's is ignored.
        let (mut own, _) = srv.connect("/ws/", &bob).await;
        own.send_json(json!({"type": "subscribe", "channel": format!("notifications:{bob}"), "id": "n", "presence": true}))
            .await;
        assert_eq!(own.next_json().await["type"], "subscribed");
        nothing_else(&mut own).await;
    }
}

#[tokio::test]
async fn presence_api_needs_the_service_key() {
    let srv = TestServer::spawn().await;
    for path in ["/api/v1/orgs/acme/presence", "/api/v1/users/u1/unread"] {
        let response = srv.http.get(srv.url(path)).send().await.unwrap();
        let (status, body) = read(response).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthorized")),
            "{path}: {body}"
        );
        let response = srv
            .http
            .get(srv.url(path))
            .bearer_auth("wrong-key")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path}");
        let response = srv
            .http
            .get(srv.url(path))
            .bearer_auth(srv.token("u1"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path}: a user token is no service key");
    }
    assert_eq!(srv.get("/api/v1/orgs/a%20b/presence").await.0, 400);
    assert_eq!(srv.get("/api/v1/users/a%20b/unread").await.0, 400);
}

/// Two nodes on one Redis: a watcher on one node sees users come and go on the other,
/// and each node's API counts the other's sockets.
#[tokio::test]
async fn presence_across_two_nodes() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let (a, b) = (redis.node().await, redis.node().await);
    check_presence_across_two_nodes(&a, &b).await;
}

/// Joins, leaves, the API and a late watcher's snapshot across nodes `a` and `b`
/// sharing one Redis (or one Redis Cluster: `redis_cluster.rs`).
pub(crate) async fn check_presence_across_two_nodes(a: &TestServer, b: &TestServer) {
    let org = user("acme");
    let (watcher_user, visitor) = (user("w"), user("v"));
    for srv in [a, b] {
        for u in [&watcher_user, &visitor] {
            assert_eq!(srv.put(&format!("/api/v1/orgs/{org}/members/{u}")).await.0, 204);
        }
    }
    let (mut watcher, _) = a.connect("/ws/", &watcher_user).await;
    subscribe(&mut watcher, &org, true).await;
    assert_eq!(
        next_presence(&mut watcher).await["users"],
        json!([{"user_id": watcher_user, "connections": 1}])
    );

    let (v1, _) = b.connect(&format!("/ws/events/{org}/"), &visitor).await;
    expect_change(&mut watcher, "presence_join", &org, &visitor).await;
    let (v2, _) = a.connect(&format!("/ws/events/{org}/"), &visitor).await;
    let mut want = vec![(visitor.as_str(), 2), (watcher_user.as_str(), 1)];
    want.sort();
    wait_present(a, &org, &want).await;
    wait_present(b, &org, &want).await;

    // The visitor's socket on b goes: still present through a. Then the one on a: gone.
    v1.close().await;
    let mut want = vec![(visitor.as_str(), 1), (watcher_user.as_str(), 1)];
    want.sort();
    wait_present(b, &org, &want).await;
    nothing_else(&mut watcher).await;
    v2.close().await;
    expect_change(&mut watcher, "presence_leave", &org, &visitor).await;
    wait_present(b, &org, &[(watcher_user.as_str(), 1)]).await;

    // A watcher on b, joining later, is told the same.
    let (mut late, _) = b
        .connect(&format!("/ws/events/{org}/?presence=1"), &visitor)
        .await;
    let mut everyone = [visitor.clone(), watcher_user.clone()];
    everyone.sort();
    let everyone: Vec<Value> = everyone
        .iter()
        .map(|u| json!({"user_id": u, "connections": 1}))
        .collect();
    assert_eq!(next_presence(&mut late).await["users"], json!(everyone));
    expect_change(&mut watcher, "presence_join", &org, &visitor).await;
}

/// A `herald serve` process killed with SIGKILL (no close, no cleanup) takes its users
/// out of presence within the node TTL and a heartbeat: here `node_ttl_ms = 1500`, so
/// within 2 s and some; the documented bound with the default (15 s) is 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_presence() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("herald.toml");
    std::fs::write(&config, "node_ttl_ms = 1500\n").unwrap();
    let org = user("acme");
    let (watcher_user, visitor) = (user("w"), user("v"));
    let url = redis.url();
    let config_arg = config.to_str().unwrap().to_owned();
    let (mut proc, addr) = crate::process::start_with_args(
        dir.path(),
        &["--config", &config_arg],
        &[
            ("HERALD_REDIS_URL", &url),
            ("HERALD_JWT_SECRET", SECRET),
            ("HERALD_API_KEYS", API_KEY),
            ("HERALD_MEMBERSHIP", "claims"),
            ("HERALD_DATABASE_URL", "sqlite::memory:"),
        ],
    )
    .await;
    let a = TestServer::builder()
        .env("HERALD_REDIS_URL", url.clone())
        .env("HERALD_MEMBERSHIP", "claims")
        .configure(|config| config.node_ttl = Duration::from_millis(1500))
        .spawn()
        .await;
    let claims = |u: &str| sign(json!({"sub": u, "exp": now() + 3600, "orgs": [org]}));
    let mut watcher = WsClient::connect(&a, "/ws/")
        .token(&claims(&watcher_user))
        .open()
        .await
        .unwrap();
    assert_eq!(watcher.next_json().await["status"], "connected");
    subscribe(&mut watcher, &org, true).await;
    next_presence(&mut watcher).await;

    let _visitor = crate::process::connect(addr, &format!("/ws/events/{org}/"), &claims(&visitor)).await;
    expect_change(&mut watcher, "presence_join", &org, &visitor).await;

    let killed = Instant::now();
    proc.child.start_kill().unwrap();
    let _ = proc.child.wait().await;
    let message = tokio::time::timeout(Duration::from_secs(30), watcher.next_json())
        .await
        .expect("the dead node's user left presence within 30 s");
    assert_eq!(
        message,
        json!({"type": "presence_leave", "channel": format!("org:{org}"), "user_id": visitor})
    );
    let took = killed.elapsed();
    println!("presence_leave {took:?} after SIGKILL (node_ttl_ms 1500)");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    wait_present(&a, &org, &[(watcher_user.as_str(), 1)]).await;
}
