//! SPEC §12, read state: `{"type":"read","channel","offset"}` keeps the user's highest
//! read offset per channel (with its epoch), tells the user's other sockets on the
//! channel, and comes back as `read_offset` in `subscribed` and the welcome and in
//! `GET /api/v1/users/{user_id}/unread`; on both engines, every refusal, across two
//! nodes on one Redis, across a restart (SQLite file) and on PostgreSQL.

use std::time::Duration;

use futures_util::FutureExt;
use serde_json::{json, Value};

use crate::members::TestDatabase;
use crate::redis::{user, Redis};
use crate::support::*;

async fn subscribe(ws: &mut WsClient, channel: &str) -> Value {
    ws.send_json(json!({"type": "subscribe", "channel": channel, "id": "s"}))
        .await;
    let answer = ws.next_json().await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    answer
}

async fn publish_org(srv: &TestServer, org: &str, n: usize) {
    for _ in 0..n {
        let (status, body) = srv
            .post(&format!("/api/v1/orgs/{org}/events"), json!({"event_type": "e"}))
            .await;
        assert_eq!(status, 202, "{body}");
    }
}

/// Sends a ping and expects the pong next: nothing else was queued for `ws`.
async fn nothing_else(ws: &mut WsClient) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    ws.send_json(json!({"type": "ping"})).await;
    let next = ws.next_json().await;
    assert_eq!(next["type"], "pong", "{next}");
}

/// Expects `{"type":"read","channel","offset"}` next, with exactly those fields.
async fn expect_read(ws: &mut WsClient, channel: &str, offset: u64) {
    let message = ws.next_json().await;
    assert_eq!(keys(&message), ["channel", "offset", "type"], "{message}");
    assert_eq!(
        message,
        json!({"type": "read", "channel": channel, "offset": offset})
    );
}

/// Sends `message` and expects an `error` with `code`; the socket stays open.
async fn refused(ws: &mut WsClient, message: Value, code: &str) {
    ws.send_json(message.clone()).await;
    let answer = ws.next_json().await;
    assert_eq!(answer["type"], "error", "{message} → {answer}");
    assert_eq!(answer["error"], code, "{message} → {answer}");
    assert!(
        answer["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{answer}"
    );
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next_json().await["type"], "pong", "after {message}");
}

/// `GET …/unread` as `channel → (offset, read_offset, unread)`.
async fn unread(srv: &TestServer, user: &str) -> Vec<(String, u64, u64, u64)> {
    let (status, body) = srv.get(&format!("/api/v1/users/{user}/unread")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(keys(&body), ["channels"], "{body}");
    body["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(keys(c), ["channel", "offset", "read_offset", "unread"], "{c}");
            (
                c["channel"].as_str().unwrap().to_owned(),
                c["offset"].as_u64().unwrap(),
                c["read_offset"].as_u64().unwrap(),
                c["unread"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn row(channel: &str, offset: u64, read: u64, unread: u64) -> (String, u64, u64, u64) {
    (channel.to_owned(), offset, read, unread)
}

#[tokio::test]
async fn read_state_on_both_engines() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let (org, other_org, me) = (user("acme"), user("globex"), user("u"));
        let org_channel = format!("org:{org}");
        let mine = format!("notifications:{me}");
        assert_eq!(srv.put(&format!("/api/v1/orgs/{org}/members/{me}")).await.0, 204);
        publish_org(&srv, &org, 3).await;
        assert_eq!(
            unread(&srv, &me).await,
            [row(&mine, 0, 0, 0), row(&org_channel, 3, 0, 3)]
        );

        // Two tabs: one `/ws/` socket, one on the events endpoint.
        let (mut tab1, _) = srv.connect("/ws/", &me).await;
        let answer = subscribe(&mut tab1, &org_channel).await;
        assert_eq!(
            (answer["offset"].as_u64(), answer["read_offset"].as_u64()),
            (Some(3), Some(0))
        );
        let (mut tab2, welcome) = srv.connect(&format!("/ws/events/{org}/"), &me).await;
        assert_eq!(welcome["read_offset"], 0, "{welcome}");

        // A read goes to the other tab, not back to the sender.
        tab1.send_json(json!({"type": "read", "channel": org_channel, "offset": 2}))
            .await;
        expect_read(&mut tab2, &org_channel, 2).await;
        nothing_else(&mut tab1).await;
        assert_eq!(
            unread(&srv, &me).await,
            [row(&mine, 0, 0, 0), row(&org_channel, 3, 2, 1)]
        );
        // Lower or equal: kept as it was, told to no one.
        tab1.send_json(json!({"type": "read", "channel": org_channel, "offset": 1}))
            .await;
        tab1.send_json(json!({"type": "read", "channel": org_channel, "offset": 2}))
            .await;
        nothing_else(&mut tab2).await;
        nothing_else(&mut tab1).await;
        // From the single-channel endpoint, for its channel: the `/ws/` tab hears it.
        tab2.send_json(json!({"type": "read", "channel": org_channel, "offset": 3}))
            .await;
        expect_read(&mut tab1, &org_channel, 3).await;

        // New sockets start from the kept position.
        let (mut tab3, _) = srv.connect("/ws/", &me).await;
        assert_eq!(subscribe(&mut tab3, &org_channel).await["read_offset"], 3);
        let (_tab4, welcome) = srv.connect(&format!("/ws/events/{org}/"), &me).await;
        assert_eq!(welcome["read_offset"], 3, "{welcome}");
        publish_org(&srv, &org, 2).await;
        for ws in [&mut tab1, &mut tab2, &mut tab3] {
            for offset in [4, 5] {
                assert_eq!(ws.next_json().await["offset"], offset);
            }
        }
        assert_eq!(
            unread(&srv, &me).await,
            [row(&mine, 0, 0, 0), row(&org_channel, 5, 3, 2)]
        );

        // Notifications, and membership in a second org.
        srv.notify(&me, json!({"title": "t"})).await;
        assert_eq!(subscribe(&mut tab3, &mine).await["read_offset"], 0);
        let (mut own, welcome) = srv.connect("/ws/notifications/", &me).await;
        assert_eq!(welcome["read_offset"], 0);
        tab3.send_json(json!({"type": "read", "channel": mine, "offset": 1}))
            .await;
        expect_read(&mut own, &mine, 1).await;
        assert_eq!(
            srv.put(&format!("/api/v1/orgs/{other_org}/members/{me}")).await.0,
            204
        );
        let mut want = vec![
            row(&mine, 1, 1, 0),
            row(&org_channel, 5, 3, 2),
            row(&format!("org:{other_org}"), 0, 0, 0),
        ];
        want[1..].sort();
        assert_eq!(unread(&srv, &me).await, want);

        // Refusals: an `error`, the socket stays open.
        for bad in [json!(-1), json!(1.5), json!("2"), json!(null)] {
            refused(
                &mut tab1,
                json!({"type": "read", "channel": org_channel, "offset": bad}),
                "invalid_read",
            )
            .await;
        }
        refused(&mut tab1, json!({"type": "read", "offset": 1}), "invalid_read").await;
        refused(
            &mut tab1,
            json!({"type": "read", "channel": 7, "offset": 1}),
            "invalid_read",
        )
        .await;
        refused(
            &mut tab1,
            json!({"type": "read", "channel": "nonsense", "offset": 1}),
            "not_subscribed",
        )
        .await;
        refused(
            &mut tab1,
            json!({"type": "read", "channel": format!("org:{other_org}"), "offset": 0}),
            "not_subscribed",
        )
        .await;
        refused(
            &mut tab1,
            json!({"type": "read", "channel": mine, "offset": 0}),
            "not_subscribed",
        )
        .await;
        refused(
            &mut tab1,
            json!({"type": "read", "channel": org_channel, "offset": 6}),
            "offset_out_of_range",
        )
        .await;
        refused(
            &mut tab2,
            json!({"type": "read", "channel": mine, "offset": 1}),
            "not_subscribed",
        )
        .await;
        nothing_else(&mut tab3).await;
        assert_eq!(unread(&srv, &me).await[1], row(&org_channel, 5, 3, 2));
        tab1.send_json(json!({"type": "read", "channel": org_channel, "offset": 5}))
            .await;
        expect_read(&mut tab3, &org_channel, 5).await;
        expect_read(&mut tab2, &org_channel, 5).await;
    }
}

/// Reads count toward `HERALD_CLIENT_MESSAGES_PER_MINUTE` like every client message.
#[tokio::test]
async fn reads_are_rate_limited() {
    for (engine, srv, _redis) in engines_with(|b| b.env("HERALD_CLIENT_MESSAGES_PER_MINUTE", "3")).await {
        eprintln!("engine: {engine}");
        let me = user("u");
        let (mut ws, _) = srv.connect("/ws/notifications/", &me).await;
        for _ in 0..4 {
            ws.send_json(json!({"type": "read", "channel": format!("notifications:{me}"), "offset": 0}))
                .await;
        }
        let (code, _) = ws.expect_close().await;
        assert_eq!(code, 4429);
    }
}

/// Two nodes on one Redis and one database: a read on one node reaches the user's
/// socket on the other, and the other node's API and subscriptions see it.
#[tokio::test]
async fn read_state_across_two_nodes() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("herald.db").display());
    let node = || {
        TestServer::builder()
            .env("HERALD_REDIS_URL", redis.url())
            .env("HERALD_DATABASE_URL", db.clone())
            .spawn()
    };
    let (a, b) = (node().await, node().await);
    let (org, me) = (user("acme"), user("u"));
    let channel = format!("org:{org}");
    assert_eq!(a.put(&format!("/api/v1/orgs/{org}/members/{me}")).await.0, 204);
    publish_org(&a, &org, 4).await;
    let (mut on_a, _) = a.connect("/ws/", &me).await;
    subscribe(&mut on_a, &channel).await;
    let (mut on_b, _) = b.connect(&format!("/ws/events/{org}/"), &me).await;
    let (mut on_b2, _) = b.connect("/ws/", &me).await;
    subscribe(&mut on_b2, &channel).await;

    on_a.send_json(json!({"type": "read", "channel": channel, "offset": 3}))
        .await;
    expect_read(&mut on_b, &channel, 3).await;
    expect_read(&mut on_b2, &channel, 3).await;
    nothing_else(&mut on_a).await;
    let mine = format!("notifications:{me}");
    assert_eq!(
        unread(&b, &me).await,
        [row(&mine, 0, 0, 0), row(&channel, 4, 3, 1)]
    );
    let (_, welcome) = b.connect(&format!("/ws/events/{org}/"), &me).await;
    assert_eq!(welcome["read_offset"], 3);

    // And back, from the single-channel endpoint on b.
    on_b.send_json(json!({"type": "read", "channel": channel, "offset": 4}))
        .await;
    expect_read(&mut on_a, &channel, 4).await;
    expect_read(&mut on_b2, &channel, 4).await;
}

/// The read position survives a restart of the node (a SQLite file; Redis keeps the
/// channel's epoch), and on PostgreSQL. On the memory engine a restart starts a new
/// epoch: the old position no longer counts (`read_offset` 0, everything unread).
#[tokio::test]
async fn read_state_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("herald.db").display());
    check_durable(&sqlite, "sqlite").await;
    if let Some(db) = TestDatabase::create().await {
        let outcome = std::panic::AssertUnwindSafe(check_durable(&db.url, "postgres"))
            .catch_unwind()
            .await;
        db.drop().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

async fn check_durable(database_url: &str, name: &str) {
    eprintln!("database: {name}");
    let (org, me) = (user("acme"), user("u"));
    let channel = format!("org:{org}");
    let mine = format!("notifications:{me}");
    let redis = Redis::start().await;
    let node = |redis_url: Option<String>| {
        let builder = TestServer::builder().env("HERALD_DATABASE_URL", database_url.to_owned());
        match redis_url {
            Some(url) => builder.env("HERALD_REDIS_URL", url),
            None => builder,
        }
        .spawn()
    };

    // Memory engine: kept, but a restart is a new epoch.
    let srv = node(None).await;
    assert_eq!(srv.put(&format!("/api/v1/orgs/{org}/members/{me}")).await.0, 204);
    publish_org(&srv, &org, 2).await;
    let (mut ws, _) = srv.connect("/ws/", &me).await;
    subscribe(&mut ws, &channel).await;
    ws.send_json(json!({"type": "read", "channel": channel, "offset": 2}))
        .await;
    nothing_else(&mut ws).await;
    srv.stop().await.unwrap();
    let srv = node(None).await;
    publish_org(&srv, &org, 3).await;
    let (_, welcome) = srv.connect(&format!("/ws/events/{org}/"), &me).await;
    assert_eq!(
        (welcome["offset"].as_u64(), welcome["read_offset"].as_u64()),
        (Some(3), Some(0)),
        "{welcome}"
    );
    assert_eq!(
        unread(&srv, &me).await,
        [row(&mine, 0, 0, 0), row(&channel, 3, 0, 3)]
    );
    srv.stop().await.unwrap();

    // Redis keeps the epoch: the position comes back after a restart.
    let Some(redis) = redis else {
        return;
    };
    let srv = node(Some(redis.url())).await;
    publish_org(&srv, &org, 5).await;
    let (mut ws, _) = srv.connect("/ws/", &me).await;
    subscribe(&mut ws, &channel).await;
    ws.send_json(json!({"type": "read", "channel": channel, "offset": 4}))
        .await;
    nothing_else(&mut ws).await;
    srv.stop().await.unwrap();
    let srv = node(Some(redis.url())).await;
    let (mut ws, welcome) = srv.connect(&format!("/ws/events/{org}/"), &me).await;
    assert_eq!(
        (welcome["offset"].as_u64(), welcome["read_offset"].as_u64()),
        (Some(5), Some(4)),
        "{welcome}"
    );
    let (mut tab, _) = srv.connect("/ws/", &me).await;
    assert_eq!(subscribe(&mut tab, &channel).await["read_offset"], 4);
    assert_eq!(
        unread(&srv, &me).await,
        [row(&mine, 0, 0, 0), row(&channel, 5, 4, 1)]
    );
    ws.send_json(json!({"type": "read", "channel": channel, "offset": 5}))
        .await;
    expect_read(&mut tab, &channel, 5).await;
    srv.stop().await.unwrap();
}
