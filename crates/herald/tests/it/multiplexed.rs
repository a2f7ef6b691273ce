//! SPEC §11 "One connection, many channels": `/ws/`, every row of its table on both
//! engines (memory and Redis), then across two nodes on one Redis (subscribe, resume,
//! membership removal through the control channel), and an epoch change told to one
//! subscription. The Redis Cluster case is in `redis_cluster.rs`.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::members::member_path;
use crate::redis::{user, Redis};
use crate::support::*;

const WS: &str = "/ws/";

/// Sends `subscribe` for `channel` with request id `id` (and any extra fields).
async fn send_subscribe(ws: &mut WsClient, channel: &str, id: &str, extra: Value) {
    let mut message = json!({"type": "subscribe", "channel": channel, "id": id});
    if let (Some(message), Some(extra)) = (message.as_object_mut(), extra.as_object()) {
        message.extend(extra.clone());
    }
    ws.send_json(message).await;
}

/// Subscribes to `channel` and returns the `subscribed` answer, checking its shape.
async fn subscribe(ws: &mut WsClient, channel: &str, id: &str) -> Value {
    send_subscribe(ws, channel, id, json!({})).await;
    let answer = ws.next_json().await;
    assert_subscribed(&answer, channel, id);
    answer
}

fn assert_subscribed(answer: &Value, channel: &str, id: &str) {
    assert_eq!(answer["type"], "subscribed", "{answer}");
    assert_eq!(
        keys(answer),
        ["channel", "epoch", "id", "offset", "read_offset", "type"],
        "{answer}"
    );
    assert_eq!(answer["channel"], channel, "{answer}");
    assert_eq!(answer["id"], id, "{answer}");
    assert!(
        answer["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "{answer}"
    );
    assert!(answer["offset"].is_u64(), "{answer}");
    // These users never sent `read`: every subscription starts unread.
    assert_eq!(answer["read_offset"], 0, "{answer}");
}

/// Sends a subscribe that must be refused with `code`; returns the `subscribe_error`.
async fn refused(ws: &mut WsClient, message: Value, code: u16) -> Value {
    ws.send_json(message.clone()).await;
    let answer = ws.next_json().await;
    assert_eq!(answer["type"], "subscribe_error", "{message} → {answer}");
    assert_eq!(
        keys(&answer),
        ["channel", "code", "error", "id", "message", "type"],
        "{answer}"
    );
    assert_eq!(answer["code"], code, "{message} → {answer}");
    assert_eq!(
        answer["channel"],
        message.get("channel").cloned().unwrap_or(Value::Null)
    );
    assert_eq!(answer["id"], message.get("id").cloned().unwrap_or(Value::Null));
    answer
}

/// Publishes `data` to `channel` through the generic publish call; returns the receipt.
async fn publish(srv: &TestServer, channel: &str, data: Value) -> Value {
    let (status, receipts) = srv
        .post("/api/v1/publish", json!({"channel": channel, "data": data}))
        .await;
    assert_eq!(status, 202, "{receipts}");
    receipts[0].clone()
}

/// Proof the socket is open and answering, and that nothing was queued before the pong.
async fn assert_nothing_pending(ws: &mut WsClient) {
    ws.send_json(json!({"type": "ping"})).await;
    let next = ws.next_json().await;
    assert_eq!(next["type"], "pong", "expected nothing before the pong: {next}");
}

fn org_event(org: &str) -> String {
    format!("/api/v1/orgs/{org}/events")
}

// === the welcome ===

#[tokio::test]
async fn welcome_names_the_user_and_subscribes_to_nothing() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        for path in ["/ws/", "/ws"] {
            let (mut ws, welcome) = srv.connect(path, "u1").await;
            assert_eq!(
                keys(&welcome),
                ["connection_id", "status", "timestamp", "type", "user_id"],
                "{welcome}"
            );
            assert_eq!(welcome["type"], "system");
            assert_eq!(welcome["user_id"], "u1");
            assert!(welcome["timestamp"].as_str().unwrap().ends_with('Z'));
            srv.notify("u1", json!({"n": 1})).await;
            assert_nothing_pending(&mut ws).await;
        }
        // `since`/`epoch` belong in each subscribe message, not the URL.
        let reason = expect_refused_with(
            WsClient::connect(&srv, "/ws/?since=1").token(&srv.token("u1")),
            4000,
        )
        .await;
        assert!(reason.contains("subscribe"), "{reason}");
        // The handshake checks are those of the other endpoints.
        expect_refused_with(WsClient::connect(&srv, WS), 4001).await;
        let bad = WsClient::connect(&srv, WS)
            .token(&srv.token("u1"))
            .origin("https://evil.example")
            .open()
            .await;
        assert!(
            matches!(bad, Err(Refused(403))),
            "a bad Origin is refused before the upgrade"
        );
    }
}

// === subscribe ===

#[tokio::test]
async fn subscribed_then_each_channel_arrives_with_its_name() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let (u, org) = (user("sub"), user("org"));
        assert_eq!(srv.put(&member_path(&org, &u)).await.0, 204);
        for _ in 0..2 {
            srv.notify(&u, json!({})).await;
        }
        let (mut ws, _) = srv.connect(WS, &u).await;
        let notes = format!("notifications:{u}");
        let org_channel = format!("org:{org}");
        let frames = format!("frames:{u}");
        let answer = subscribe(&mut ws, &notes, "s1").await;
        assert_eq!(answer["offset"], 2, "the channel's last offset");
        let answer = subscribe(&mut ws, &org_channel, "s2").await;
        assert_eq!(answer["offset"], 0);
        let answer = subscribe(&mut ws, &frames, "s3").await;
        assert_eq!(answer["offset"], 0);
        // A numeric id is echoed as a number.
        ws.send_json(json!({"type": "subscribe", "channel": notes, "id": 9}))
            .await;
        assert_eq!(ws.next_json().await["id"], 9);

        let receipt = srv.notify(&u, json!({"title": "hi"})).await;
        let message = ws.next_json().await;
        assert_eq!(
            (&message["type"], &message["channel"], &message["offset"]),
            (&json!("notification"), &json!(notes), &json!(3))
        );
        assert_eq!(message["id"], receipt["id"]);
        let (status, _) = srv
            .post(&org_event(&org), json!({"event_type": "x", "data": {"k": 1}}))
            .await;
        assert_eq!(status, 202);
        let message = ws.next_json().await;
        assert_eq!(
            (&message["type"], &message["channel"], &message["offset"]),
            (&json!("org_event"), &json!(org_channel), &json!(1))
        );
        let (status, _) = srv
            .post(
                &format!("/api/v1/frame-stream/{u}"),
                json!({"type": "llm_status", "status": "started", "chat_id": "c1", "message": "go"}),
            )
            .await;
        assert_eq!(status, 202);
        let message = ws.next_json().await;
        assert_eq!(
            (&message["type"], &message["channel"], &message["offset"]),
            (&json!("llm_status"), &json!(frames), &json!(1))
        );
        // Interleaved publishes keep each channel's own order.
        for n in 0..5 {
            srv.notify(&u, json!({"n": n})).await;
            publish(&srv, &org_channel, json!({"type": "tick", "n": n})).await;
        }
        let (mut note_offsets, mut org_offsets) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            let message = ws.next_json().await;
            match message["channel"].as_str() {
                Some(c) if c == notes => note_offsets.push(message["offset"].as_u64().unwrap()),
                Some(c) if c == org_channel => org_offsets.push(message["offset"].as_u64().unwrap()),
                _ => panic!("unexpected {message}"),
            }
        }
        assert_eq!(note_offsets, [4, 5, 6, 7, 8]);
        assert_eq!(org_offsets, [2, 3, 4, 5, 6]);
        assert_nothing_pending(&mut ws).await;
    }
}

#[tokio::test]
async fn subscribe_with_since_replays_then_recovered() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let u = user("since");
        let notes = format!("notifications:{u}");
        let quiet = format!("frames:{u}");
        let (mut ws, _) = srv.connect(WS, &u).await;
        let epoch = subscribe(&mut ws, &notes, "a").await["epoch"].clone();
        for n in 1..=3 {
            srv.notify(&u, json!({"n": n})).await;
        }
        for n in 1..=3 {
            assert_eq!(ws.next_json().await["offset"], n);
        }
        ws.close().await;
        for n in 4..=6 {
            srv.notify(&u, json!({"n": n})).await;
        }

        // A new tab resumes after offset 3, beside a fresh subscription.
        let (mut ws, _) = srv.connect(WS, &u).await;
        subscribe(&mut ws, &quiet, "b").await;
        send_subscribe(&mut ws, &notes, "c", json!({"since": 3, "epoch": epoch})).await;
        let answer = ws.next_json().await;
        assert_subscribed(&answer, &notes, "c");
        assert_eq!(answer["offset"], 6);
        assert_eq!(answer["epoch"], epoch);
        for n in 4..=6 {
            let message = ws.next_json().await;
            assert_eq!(
                (&message["offset"], &message["notification"]["n"]),
                (&json!(n), &json!(n))
            );
        }
        let recovered = ws.next_json().await;
        assert_eq!(recovered["type"], "system", "{recovered}");
        assert_eq!(recovered["status"], "recovered");
        assert_eq!(recovered["channel"], notes.as_str());
        assert_eq!(
            (&recovered["recovered"], &recovered["missed"]),
            (&json!(true), &json!(3))
        );
        assert_eq!(recovered["epoch"], epoch);
        assert_eq!(recovered["offset"], 6);
        // Live delivery follows without a repeat.
        srv.notify(&u, json!({"n": 7})).await;
        assert_eq!(ws.next_json().await["offset"], 7);

        // Another epoch: nothing replayed before `recovered:false`.
        let (mut ws, _) = srv.connect(WS, &u).await;
        send_subscribe(
            &mut ws,
            &notes,
            "d",
            json!({"since": 1, "epoch": "someotherepoch"}),
        )
        .await;
        assert_subscribed(&ws.next_json().await, &notes, "d");
        let recovered = ws.next_json().await;
        assert_eq!(recovered["status"], "recovered", "nothing may be replayed first");
        assert_eq!(
            (&recovered["recovered"], &recovered["missed"]),
            (&json!(false), &json!(0))
        );
        assert_eq!(recovered["channel"], notes.as_str());
        // `since` alone replays whatever the channel's epoch holds; `presence` is taken
        // and not acted on yet.
        send_subscribe(&mut ws, &quiet, "e", json!({"since": 0, "presence": true})).await;
        assert_subscribed(&ws.next_json().await, &quiet, "e");
        let recovered = ws.next_json().await;
        assert_eq!(
            (&recovered["recovered"], &recovered["missed"]),
            (&json!(true), &json!(0))
        );
        // A since beyond the channel's last offset is a client out of sync.
        ws.send_json(json!({"type": "unsubscribe", "channel": notes, "id": "f"}))
            .await;
        assert_eq!(ws.next_json().await["type"], "unsubscribed");
        send_subscribe(&mut ws, &notes, "g", json!({"since": 99, "epoch": epoch})).await;
        assert_subscribed(&ws.next_json().await, &notes, "g");
        assert_eq!(ws.next_json().await["recovered"], false);
    }
}

#[tokio::test]
async fn a_gap_that_left_history_is_not_recovered() {
    for (engine, srv, _redis) in engines_with(|b| b.env("HERALD_HISTORY_SIZE", "5")).await {
        eprintln!("engine: {engine}");
        let u = user("gap");
        let notes = format!("notifications:{u}");
        let (mut ws, _) = srv.connect(WS, &u).await;
        let epoch = subscribe(&mut ws, &notes, "a").await["epoch"].clone();
        for _ in 0..10 {
            srv.notify(&u, json!({})).await;
        }
        let (mut ws, _) = srv.connect(WS, &u).await;
        send_subscribe(&mut ws, &notes, "b", json!({"since": 4, "epoch": epoch})).await;
        assert_subscribed(&ws.next_json().await, &notes, "b");
        let recovered = ws.next_json().await;
        assert_eq!(
            (&recovered["recovered"], &recovered["missed"]),
            (&json!(false), &json!(0))
        );
        ws.send_json(json!({"type": "unsubscribe", "channel": notes, "id": "c"}))
            .await;
        ws.next_json().await;
        send_subscribe(&mut ws, &notes, "d", json!({"since": 5, "epoch": epoch})).await;
        assert_subscribed(&ws.next_json().await, &notes, "d");
        for n in 6..=10 {
            assert_eq!(ws.next_json().await["offset"], n);
        }
        assert_eq!(ws.next_json().await["missed"], 5);
    }
}

// === unsubscribe ===

#[tokio::test]
async fn unsubscribe_stops_one_channel() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let u = user("unsub");
        let (notes, frames) = (format!("notifications:{u}"), format!("frames:{u}"));
        let (mut ws, _) = srv.connect(WS, &u).await;
        subscribe(&mut ws, &notes, "a").await;
        subscribe(&mut ws, &frames, "b").await;
        ws.send_json(json!({"type": "unsubscribe", "channel": notes, "id": "c"}))
            .await;
        let answer = ws.next_json().await;
        assert_eq!(
            answer,
            json!({"type": "unsubscribed", "channel": notes, "id": "c"})
        );
        srv.notify(&u, json!({"n": 1})).await;
        publish(&srv, &frames, json!({"type": "x"})).await;
        let next = ws.next_json().await;
        assert_eq!(next["channel"], frames.as_str(), "only the other channel: {next}");
        // A channel not subscribed is already left: the same answer.
        ws.send_json(json!({"type": "unsubscribe", "channel": "org:nowhere", "id": 4}))
            .await;
        assert_eq!(
            ws.next_json().await,
            json!({"type": "unsubscribed", "channel": "org:nowhere", "id": 4})
        );
        // Subscribing again starts from where the channel stands now.
        let answer = subscribe(&mut ws, &notes, "d").await;
        assert_eq!(answer["offset"], 1);
        srv.notify(&u, json!({"n": 2})).await;
        assert_eq!(ws.next_json().await["offset"], 2);
        assert_nothing_pending(&mut ws).await;
    }
}

// === ping, heartbeat, refresh, anything else ===

#[tokio::test]
async fn ping_heartbeat_and_refresh_as_on_the_other_endpoints() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let (mut ws, _) = srv.connect(WS, "u1").await;
        ws.send_json(json!({"type": "ping"})).await;
        assert_eq!(ws.next_json().await["type"], "pong");
        ws.send_json(json!({"type": "heartbeat"})).await;
        assert_eq!(ws.next_json().await["type"], "heartbeat_ack");
        let exp = now() + 7200;
        ws.send_json(json!({"type": "refresh", "token": sign(json!({"sub": "u1", "exp": exp}))}))
            .await;
        let refreshed = ws.next_json().await;
        assert_eq!(
            (&refreshed["type"], &refreshed["status"]),
            (&json!("system"), &json!("refreshed"))
        );
        ws.send_text("nope").await;
        assert_eq!(ws.next_json().await["error"], "invalid_json");
        ws.send_json(json!({"type": "publish"})).await;
        let error = ws.next_json().await;
        assert_eq!(error["error"], "unsupported_message");
        assert!(
            error["message"].as_str().unwrap().contains("subscribe"),
            "{error}"
        );
        ws.send_json(json!({"type": "unsubscribe"})).await;
        assert_eq!(ws.next_json().await["error"], "unsupported_message");
        // A refresh for another user still closes the whole socket.
        ws.send_json(json!({"type": "refresh", "token": srv.token("u2")}))
            .await;
        assert_eq!(ws.expect_close().await.0, 4001);
    }
}

#[tokio::test]
async fn single_channel_endpoints_do_not_take_subscribe() {
    let srv = TestServer::spawn().await;
    let (mut ws, welcome) = srv.connect("/ws/notifications/", "u1").await;
    assert_eq!(welcome["channel"], "notifications:u1", "{welcome}");
    assert_eq!(welcome["message"], "WebSocket connection established");
    for kind in ["subscribe", "unsubscribe"] {
        ws.send_json(json!({"type": kind, "channel": "notifications:u1", "id": "a"}))
            .await;
        let error = ws.next_json().await;
        assert_eq!(error["error"], "unsupported_message", "{error}");
        assert_eq!(
            error["message"], "clients may send only read, ping, heartbeat and refresh messages",
            "{error}"
        );
    }
    srv.notify("u1", json!({"n": 1})).await;
    assert_eq!(ws.next_json().await["offset"], 1);
}

// === refusals ===

#[tokio::test]
async fn refusals_answer_subscribe_error_and_leave_the_socket_open() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let (u, org) = (user("refuse"), user("org"));
        let notes = format!("notifications:{u}");
        let (mut ws, _) = srv.connect(WS, &u).await;
        subscribe(&mut ws, &notes, "mine").await;

        // 4003: another user's channels, an org the user is not a member of.
        for channel in [
            "notifications:someone-else".to_owned(),
            "frames:someone-else".to_owned(),
            format!("org:{org}"),
        ] {
            let error = refused(
                &mut ws,
                json!({"type": "subscribe", "channel": channel, "id": "x"}),
                4003,
            )
            .await;
            assert_eq!(error["error"], "forbidden", "{error}");
        }
        // 4000: malformed channel names, since and epoch; a channel already subscribed.
        for message in [
            json!({"type": "subscribe", "channel": "chat:1", "id": "x"}),
            json!({"type": "subscribe", "channel": "org:", "id": "x"}),
            json!({"type": "subscribe", "channel": "org:a b", "id": "x"}),
            json!({"type": "subscribe", "id": "x"}),
            json!({"type": "subscribe", "channel": 5, "id": "x"}),
            json!({"type": "subscribe", "channel": format!("frames:{u}"), "id": "x", "since": -1}),
            json!({"type": "subscribe", "channel": format!("frames:{u}"), "id": "x", "since": "3"}),
            json!({"type": "subscribe", "channel": format!("frames:{u}"), "id": "x", "epoch": "abc"}),
            json!({"type": "subscribe", "channel": format!("frames:{u}"), "id": "x", "since": 1, "epoch": "a b"}),
            json!({"type": "subscribe", "channel": notes, "id": "again"}),
        ] {
            let mut expected = message.clone();
            if !expected["channel"].is_string() {
                expected["channel"] = Value::Null;
            }
            ws.send_json(message.clone()).await;
            let answer = ws.next_json().await;
            assert_eq!(answer["type"], "subscribe_error", "{message} → {answer}");
            assert_eq!(answer["code"], 4000, "{message} → {answer}");
            assert_eq!(answer["error"], "bad_request", "{answer}");
            assert_eq!(answer["channel"], expected["channel"], "{answer}");
            assert_eq!(answer["id"], expected["id"], "{answer}");
            assert!(!answer["message"].as_str().unwrap().is_empty());
        }
        // The socket and its subscription are untouched.
        srv.notify(&u, json!({"still": "here"})).await;
        let message = ws.next_json().await;
        assert_eq!(message["notification"]["still"], "here", "{message}");
        assert_nothing_pending(&mut ws).await;
        // Becoming a member makes the org subscribable.
        assert_eq!(srv.put(&member_path(&org, &u)).await.0, 204);
        subscribe(&mut ws, &format!("org:{org}"), "now").await;
    }
}

#[tokio::test]
async fn subscriptions_per_connection_are_bounded() {
    for (engine, srv, _redis) in engines_with(|b| b.env("HERALD_MAX_SUBSCRIPTIONS_PER_CONNECTION", "2")).await
    {
        eprintln!("engine: {engine}");
        let u = user("max");
        let (mut ws, _) = srv.connect(WS, &u).await;
        subscribe(&mut ws, &format!("notifications:{u}"), "a").await;
        subscribe(&mut ws, &format!("frames:{u}"), "b").await;
        let error = refused(
            &mut ws,
            json!({"type": "subscribe", "channel": format!("notifications:{u}x"), "id": "c"}),
            4429,
        )
        .await;
        assert_eq!(error["error"], "too_many_subscriptions");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("HERALD_MAX_SUBSCRIPTIONS_PER_CONNECTION"),
            "{error}"
        );
        // The limit is per socket: another tab has its own, and leaving one frees a place.
        let (mut other_tab, _) = srv.connect(WS, &u).await;
        subscribe(&mut other_tab, &format!("notifications:{u}"), "a").await;
        ws.send_json(json!({"type": "unsubscribe", "channel": format!("frames:{u}"), "id": "d"}))
            .await;
        assert_eq!(ws.next_json().await["type"], "unsubscribed");
        let answer = subscribe(&mut ws, &format!("frames:{u}"), "e").await;
        assert_eq!(answer["offset"], 0);
        assert_nothing_pending(&mut ws).await;
    }
}

#[tokio::test]
async fn connections_per_user_count_sockets_not_subscriptions() {
    for (engine, srv, _redis) in engines_with(|b| b.env("HERALD_MAX_CONNECTIONS_PER_USER", "2")).await {
        eprintln!("engine: {engine}");
        let u = user("tabs");
        let (mut first, _) = srv.connect(WS, &u).await;
        for channel in [format!("notifications:{u}"), format!("frames:{u}")] {
            subscribe(&mut first, &channel, "a").await;
        }
        let (_second, _) = srv.connect(WS, &u).await;
        let token = srv.token(&u);
        let reason = expect_refused_with(WsClient::connect(&srv, WS).token(&token), 4429).await;
        assert!(reason.contains("too many connections"), "{reason}");
        expect_refused_with(WsClient::connect(&srv, "/ws/notifications/").token(&token), 4429).await;
        assert_nothing_pending(&mut first).await;
        first.close().await;
        connect_when_accepted(&srv, WS, &u, Duration::from_secs(5)).await;
    }
}

// === membership ===

#[tokio::test]
async fn losing_membership_ends_that_one_subscription() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let (u, stays, org) = (user("removed"), user("stays"), user("org"));
        for member in [&u, &stays] {
            assert_eq!(srv.put(&member_path(&org, member)).await.0, 204);
        }
        let org_channel = format!("org:{org}");
        let notes = format!("notifications:{u}");
        let (mut ws, _) = srv.connect(WS, &u).await;
        subscribe(&mut ws, &org_channel, "o").await;
        subscribe(&mut ws, &notes, "n").await;
        let (mut other, _) = srv.connect(WS, &stays).await;
        subscribe(&mut other, &org_channel, "o").await;
        // A single-channel socket of the same user is closed as before.
        let (mut single, _) = srv.connect(&format!("/ws/events/{org}/"), &u).await;

        assert_eq!(srv.delete(&member_path(&org, &u)).await.0, 204);
        let ended = ws.next_json().await;
        assert_eq!(keys(&ended), ["channel", "code", "reason", "type"], "{ended}");
        assert_eq!(ended["type"], "unsubscribed");
        assert_eq!(ended["channel"], org_channel.as_str());
        assert_eq!(ended["code"], 4003);
        assert_eq!(ended["reason"], "membership revoked");
        assert_eq!(single.expect_close().await.0, 4003);

        // The org's events no longer reach the removed user; everything else does.
        let (status, _) = srv
            .post(&org_event(&org), json!({"event_type": "after", "data": {}}))
            .await;
        assert_eq!(status, 202);
        srv.notify(&u, json!({"n": 1})).await;
        let next = ws.next_json().await;
        assert_eq!(
            next["channel"],
            notes.as_str(),
            "no org event after removal: {next}"
        );
        let event = other.next_json().await;
        assert_eq!(event["event_type"], "after", "{event}");
        refused(
            &mut ws,
            json!({"type": "subscribe", "channel": org_channel, "id": "again"}),
            4003,
        )
        .await;
    }
}

#[tokio::test]
async fn a_refreshed_token_without_the_org_ends_its_subscription() {
    for (engine, srv, _redis) in engines_with(|b| b.env("HERALD_MEMBERSHIP", "claims")).await {
        eprintln!("engine: {engine}");
        let token = |orgs: Value| sign(json!({"sub": "u1", "exp": now() + 600, "orgs": orgs}));
        let (mut ws, _) = WsClient::connect(&srv, WS)
            .token(&token(json!(["acme", "beta"])))
            .connected()
            .await;
        subscribe(&mut ws, "org:acme", "a").await;
        subscribe(&mut ws, "org:beta", "b").await;
        subscribe(&mut ws, "notifications:u1", "c").await;
        ws.send_json(json!({"type": "refresh", "token": token(json!(["beta"]))}))
            .await;
        let ended = ws.next_json().await;
        assert_eq!(
            (&ended["type"], &ended["channel"], &ended["code"]),
            (&json!("unsubscribed"), &json!("org:acme"), &json!(4003)),
            "{ended}"
        );
        assert_eq!(ws.next_json().await["status"], "refreshed");
        publish(&srv, "org:acme", json!({"type": "gone"})).await;
        publish(&srv, "org:beta", json!({"type": "kept"})).await;
        assert_eq!(ws.next_json().await["type"], "kept");
    }
}

// === what still closes the whole socket ===

#[tokio::test]
async fn token_expiry_and_connection_age_close_the_whole_socket() {
    let srv = TestServer::builder()
        .env("HERALD_MAX_CONNECTION_AGE", "2")
        .spawn()
        .await;
    // Expired 29 s ago: inside the 30 s leeway, so accepted, then closed a second later.
    let expiring = sign(json!({"sub": "u1", "exp": now() - 29}));
    let (mut ws, _) = WsClient::connect(&srv, WS).token(&expiring).connected().await;
    subscribe(&mut ws, "notifications:u1", "a").await;
    let (code, reason) = ws.expect_close().await;
    assert_eq!(code, 4001);
    assert!(reason.contains("expired"), "{reason}");

    let (mut ws, _) = srv.connect(WS, "u2").await;
    subscribe(&mut ws, "notifications:u2", "a").await;
    subscribe(&mut ws, "frames:u2", "b").await;
    let (code, reason) = ws.expect_close().await;
    assert_eq!((code, reason.as_str()), (1000, "max connection age"));
}

/// A client that does not read is closed with 1008 however its messages are spread over
/// its subscriptions: they share one outbox and its one bound.
#[tokio::test]
async fn a_slow_consumer_is_closed_1008_across_its_subscriptions() {
    let srv = TestServer::builder().outbox_max_bytes(16 * 1024).spawn().await;
    let raw = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    raw.set_tcp_mss(536).unwrap();
    raw.set_recv_buffer_size(4096).unwrap();
    raw.set_nonblocking(true).unwrap();
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(raw));
    let stream = socket.connect(srv.addr).await.unwrap();
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(srv.ws_url(WS))
            .unwrap();
    let protocol = format!("herald.bearer, {}", srv.token("slow"));
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_str(&protocol).unwrap(),
    );
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(request, stream).await.unwrap();
    let mut ws = WsClient { ws, protocol: None };
    assert_eq!(ws.next_json().await["status"], "connected");
    subscribe(&mut ws, "notifications:slow", "a").await;
    subscribe(&mut ws, "frames:slow", "b").await;
    let pad = "x".repeat(2000);
    for n in 0..200 {
        let channel = if n % 2 == 0 {
            "notifications:slow"
        } else {
            "frames:slow"
        };
        publish(&srv, channel, json!({"type": "tick", "pad": pad})).await;
    }
    assert_eq!(ws.expect_close().await.0, 1008);
    let (_, stats) = srv.get("/api/v1/stats").await;
    assert_eq!(
        stats["nodes"][0]["messages"]["slow_consumer_disconnects"], 1,
        "{stats}"
    );
}

#[tokio::test]
async fn stats_and_metrics_count_ws_sockets() {
    let srv = TestServer::spawn().await;
    let (mut ws, _) = srv.connect(WS, "u1").await;
    subscribe(&mut ws, "notifications:u1", "a").await;
    subscribe(&mut ws, "frames:u1", "b").await;
    let (_, stats) = srv.get("/api/v1/stats").await;
    let node = &stats["nodes"][0];
    assert_eq!(node["connections"]["ws"], 1, "{stats}");
    assert_eq!(node["connections"]["open"], 1, "{stats}");
    assert_eq!(node["subscriptions"], 2, "{stats}");
    assert_eq!(srv.metric("herald_connections_open{endpoint=\"ws\"}").await, 1.0);
    assert_eq!(
        srv.metric("herald_client_messages_total{type=\"subscribe\"}")
            .await,
        2.0
    );
    srv.notify("u1", json!({})).await;
    ws.next_json().await;
    srv.wait_for_metric("herald_messages_delivered_total{kind=\"notifications\"}", 1.0)
        .await;
    ws.close().await;
    srv.wait_for_metric("herald_connections_open{endpoint=\"ws\"}", 0.0)
        .await;
    let (_, stats) = srv.get("/api/v1/stats").await;
    assert_eq!(stats["nodes"][0]["subscriptions"], 0, "{stats}");
}

// === many nodes ===

/// Two nodes on `url` (one Redis or a Cluster): a `/ws/` socket on B subscribed to three
/// channels gets what is published on A; a new tab on A resumes one of them with
/// `since`; removing the user from the org through A ends only that subscription on B,
/// within a second.
pub(crate) async fn check_across_nodes(url: &str, u: &str, org: &str) {
    let dir = tempfile::tempdir().unwrap();
    let node = || {
        TestServer::builder()
            .env("HERALD_REDIS_URL", url)
            .env(
                "HERALD_DATABASE_URL",
                format!("sqlite://{}", dir.path().join("members.db").display()),
            )
            .spawn()
    };
    let a = node().await;
    assert_eq!(a.get("/healthz").await.0, 200);
    let b = node().await;
    assert_eq!(a.put(&member_path(org, u)).await.0, 204);
    let channels = [
        format!("notifications:{u}"),
        format!("frames:{u}"),
        format!("org:{org}"),
    ];
    let (mut on_b, _) = b.connect(WS, u).await;
    let mut epochs = Vec::new();
    for channel in &channels {
        epochs.push(subscribe(&mut on_b, channel, channel).await["epoch"].clone());
    }
    for round in 1..=2 {
        for channel in &channels {
            publish(&a, channel, json!({"type": "tick", "round": round})).await;
        }
        for channel in &channels {
            let message = on_b.next_json().await;
            assert_eq!(
                (&message["channel"], &message["offset"], &message["round"]),
                (&json!(channel), &json!(round), &json!(round)),
                "{message}"
            );
        }
    }

    // A second tab on the other node resumes one channel after offset 1.
    let (mut on_a, _) = a.connect(WS, u).await;
    send_subscribe(
        &mut on_a,
        &channels[2],
        "r",
        json!({"since": 1, "epoch": epochs[2]}),
    )
    .await;
    let answer = on_a.next_json().await;
    assert_subscribed(&answer, &channels[2], "r");
    assert_eq!((&answer["offset"], &answer["epoch"]), (&json!(2), &epochs[2]));
    assert_eq!(on_a.next_json().await["offset"], 2);
    let recovered = on_a.next_json().await;
    assert_eq!(
        (&recovered["channel"], &recovered["missed"]),
        (&json!(channels[2]), &json!(1))
    );

    let started = Instant::now();
    assert_eq!(a.delete(&member_path(org, u)).await.0, 204);
    for ws in [&mut on_b, &mut on_a] {
        let ended = tokio::time::timeout(Duration::from_secs(5), ws.next_json())
            .await
            .expect("the org subscription ends");
        assert_eq!(
            (&ended["type"], &ended["channel"], &ended["code"]),
            (&json!("unsubscribed"), &json!(channels[2]), &json!(4003)),
            "{ended}"
        );
    }
    let took = started.elapsed();
    assert!(took <= Duration::from_secs(1), "ended {took:?} after the DELETE");
    publish(&a, &channels[2], json!({"type": "after"})).await;
    publish(&a, &channels[0], json!({"type": "still"})).await;
    let next = on_b.next_json().await;
    assert_eq!(next["type"], "still", "the other subscriptions go on: {next}");
}

#[tokio::test]
async fn subscriptions_recovery_and_removal_across_two_nodes() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    check_across_nodes(&redis.url(), &user("multi"), &user("org")).await;
}

/// However many sockets and subscriptions a node has on a channel, it subscribes to
/// the channel in Redis once.
#[tokio::test]
async fn a_node_subscribes_to_a_channel_once_for_all_its_sockets() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    if !redis.owned() {
        panic!("this test reads Redis's pub/sub state: unset HERALD_TEST_REDIS_URL to let it start its own");
    }
    let srv = redis.node().await;
    let u = user("once");
    let channel = format!("notifications:{u}");
    let pubsub = format!("herald:{{{channel}}}:messages");
    let numsub = || async {
        let reply = redis.cli(&["PUBSUB", "NUMSUB", &pubsub]).await;
        reply
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let (mut ws, _) = srv.connect(WS, &u).await;
        subscribe(&mut ws, &channel, "a").await;
        sockets.push(ws);
    }
    let (_single, _) = srv.connect("/ws/notifications/", &u).await;
    assert_eq!(numsub().await, 1);
    srv.notify(&u, json!({})).await;
    for ws in &mut sockets {
        assert_eq!(ws.next_json().await["channel"], channel.as_str());
    }
    // The last subscription to leave unsubscribes the node.
    drop(_single);
    for ws in &mut sockets {
        ws.send_json(json!({"type": "unsubscribe", "channel": channel, "id": "b"}))
            .await;
        assert_eq!(ws.next_json().await["type"], "unsubscribed");
    }
    let deadline = Instant::now() + WAIT;
    while numsub().await != 0 {
        assert!(Instant::now() < deadline, "the node stayed subscribed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SPEC §8 per subscription: when one channel's offsets are handed out again (a
/// failover that lost writes, simulated by moving the offset back in Redis), that
/// subscription is told `recovered:false` with its channel and the new epoch; the
/// socket's other subscription goes on untouched.
#[tokio::test]
async fn an_epoch_change_is_told_to_that_subscription_only() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    if !redis.owned() {
        panic!("this test edits Redis keys: unset HERALD_TEST_REDIS_URL to let it start its own");
    }
    let (a, b) = (redis.node().await, redis.node().await);
    let u = user("epoch");
    let (lost, kept) = (format!("notifications:{u}"), format!("frames:{u}"));
    let (mut ws, _) = b.connect(WS, &u).await;
    let first = subscribe(&mut ws, &lost, "a").await;
    let kept_epoch = subscribe(&mut ws, &kept, "b").await["epoch"].clone();
    for n in 1..=5 {
        a.notify(&u, json!({"n": n})).await;
    }
    for n in 1..=5 {
        assert_eq!(ws.next_json().await["offset"], n);
    }
    redis
        .cli(&["HSET", &format!("herald:{{{lost}}}:meta"), "offset", "3"])
        .await;
    // From a node that never published there (node A would start the new epoch itself),
    // so node B sees the offset come again.
    redis.node().await.notify(&u, json!({"n": "reused"})).await;
    let told = ws.next_json().await;
    assert_eq!(
        (&told["status"], &told["recovered"], &told["channel"]),
        (&json!("recovered"), &json!(false), &json!(lost)),
        "{told}"
    );
    assert_ne!(told["epoch"], first["epoch"]);
    a.notify(&u, json!({"n": "next"})).await;
    let next = ws.next_json().await;
    assert_eq!(
        (&next["notification"]["n"], &next["epoch"]),
        (&json!("next"), &told["epoch"])
    );
    assert_eq!(next["offset"], told["offset"].as_u64().unwrap() + 1);
    publish(&a, &kept, json!({"type": "x"})).await;
    let other = ws.next_json().await;
    assert_eq!(
        (&other["channel"], &other["epoch"], &other["offset"]),
        (&json!(kept), &kept_epoch, &json!(1))
    );
}
