//! SPEC §8 "Control actions reach every node": removing a member closes that user's org
//! sockets on every node within a second, a node that missed the removal (its Redis
//! connection was down) closes them when it reconnects, and a webhook-cache forget
//! reaches every node.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use crate::members::{assert_receives_event, events, member_path, FakeWebhook};
use crate::redis::{user, Redis};
use crate::support::*;

/// How long a removal may take to close a socket on another node (SPEC §8).
const WITHIN: Duration = Duration::from_secs(1);

/// A node on `redis_url` (none: memory mode) whose memberships are in the SQLite file
/// in `dir`, shared with the other nodes of the test. Returns once it serves, so nodes
/// started one after the other do not migrate the file at the same time.
async fn node_on(redis_url: Option<&str>, dir: &Path) -> TestServer {
    let mut builder = TestServer::builder()
        .env(
            "HERALD_DATABASE_URL",
            format!("sqlite://{}", dir.join("members.db").display()),
        )
        .env("HERALD_MAX_CONNECTIONS_PER_USER", "10");
    if let Some(url) = redis_url {
        builder = builder.env("HERALD_REDIS_URL", url);
    }
    let node = builder.spawn().await;
    assert_eq!(node.get("/healthz").await.0, 200);
    node
}

/// Waits for `ws` to be closed with 4003 within [`WITHIN`] of `since`.
async fn closed_with_4003_within(ws: &mut WsClient, since: Instant) {
    let (code, reason) = tokio::time::timeout(WITHIN * 5, ws.expect_close())
        .await
        .expect("the removed member's socket is closed");
    let took = since.elapsed();
    assert_eq!(code, 4003, "{reason}");
    eprintln!("closed with 4003 {took:?} after the DELETE was sent");
    assert!(took <= WITHIN, "closed after {took:?}, more than {WITHIN:?}");
}

/// Two nodes on `url` (one Redis or a Cluster): a member's org sockets on node B are
/// closed with 4003 within a second of a DELETE on node A; another member's socket, and
/// the user's socket on another org, stay open.
pub(crate) async fn check_member_removal_across_nodes(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let a = node_on(Some(url), dir.path()).await;
    let b = node_on(Some(url), dir.path()).await;
    let (org, other_org) = (user("org"), user("org"));
    let (removed, stays) = (user("removed"), user("stays"));
    for (org, member) in [(&org, &removed), (&org, &stays), (&other_org, &removed)] {
        assert_eq!(a.put(&member_path(org, member)).await.0, 204);
    }
    let (mut on_b, _) = b.connect(&events(&org), &removed).await;
    let (mut also_on_b, _) = b.connect(&events(&org), &removed).await;
    let (mut other_member, _) = b.connect(&events(&org), &stays).await;
    let (mut other_org_socket, _) = b.connect(&events(&other_org), &removed).await;
    let (mut on_a, _) = a.connect(&events(&org), &removed).await;

    let started = Instant::now();
    assert_eq!(a.delete(&member_path(&org, &removed)).await.0, 204);
    for ws in [&mut on_b, &mut also_on_b, &mut on_a] {
        closed_with_4003_within(ws, started).await;
    }
    assert_receives_event(&a, &org, &mut other_member).await;
    assert_receives_event(&b, &other_org, &mut other_org_socket).await;
    expect_refused_with(
        WsClient::connect(&b, &events(&org)).token(&b.token(&removed)),
        4003,
    )
    .await;
}

#[tokio::test]
async fn removing_a_member_closes_their_org_sockets_on_every_node() {
    let Some(redis) = Redis::start().await else { return };
    check_member_removal_across_nodes(&redis.url()).await;
}

/// Node A runs without Redis, so its DELETE reaches no other node, like a control
/// message sent while node B was cut off. When B's control connection comes back, B
/// checks its open org sockets and closes the removed member's.
#[tokio::test]
async fn a_node_that_missed_a_removal_closes_the_socket_when_it_reconnects() {
    let Some(redis) = Redis::start().await else { return };
    if !redis.owned() {
        // The test kills its Redis's clients, which it may not do to a shared one.
        crate::redis::skip_shared_redis(None);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = node_on(None, dir.path()).await;
    let b = node_on(Some(&redis.url()), dir.path()).await;
    let (org, removed, stays) = (user("org"), user("removed"), user("stays"));
    for member in [&removed, &stays] {
        assert_eq!(a.put(&member_path(&org, member)).await.0, 204);
    }
    let (mut on_b, _) = b.connect(&events(&org), &removed).await;
    let (mut other_member, _) = b.connect(&events(&org), &stays).await;
    assert_eq!(a.delete(&member_path(&org, &removed)).await.0, 204);
    // B was not told: the socket is still open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_receives_event(&b, &org, &mut on_b).await;
    other_member.next_json().await;

    // Every pub/sub connection is dropped; herald's reconnect at once.
    let out = tokio::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port().to_string(),
            "CLIENT",
            "KILL",
            "TYPE",
            "pubsub",
        ])
        .output()
        .await
        .expect("run redis-cli");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, reason) = tokio::time::timeout(WAIT, on_b.expect_close())
        .await
        .expect("the removed member's socket is closed after the reconnect");
    assert_eq!(code, 4003, "{reason}");
    // The other member's socket stays open. Its node is subscribing again after the
    // kill, so an event published meanwhile may only arrive with the next one.
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _) = b
            .post(
                &format!("/api/v1/orgs/{org}/events"),
                serde_json::json!({"event_type": "x", "data": {}}),
            )
            .await;
        assert_eq!(status, 202);
        match tokio::time::timeout(Duration::from_secs(1), other_member.next_event()).await {
            Ok(Event::Text(event)) => {
                assert_eq!(event["type"], "org_event", "{event}");
                break;
            }
            Ok(other) => panic!("the other member's socket got {other:?}"),
            Err(_) => assert!(
                Instant::now() < deadline,
                "the other member's socket gets nothing"
            ),
        }
    }
}

/// A cached webhook denial on node B is forgotten when a PUT on node A says the
/// membership changed.
#[tokio::test]
async fn a_webhook_cache_forget_reaches_every_node() {
    let Some(redis) = Redis::start().await else { return };
    let hook = FakeWebhook::start().await;
    let node = || {
        TestServer::builder()
            .env("HERALD_REDIS_URL", redis.url())
            .env("HERALD_MEMBERSHIP", hook.mode())
            .spawn()
    };
    let (a, b) = (node().await, node().await);
    let (org, u) = (user("org"), user("u"));
    hook.answer(&u, &org, 403);
    expect_refused_with(WsClient::connect(&b, &events(&org)).token(&b.token(&u)), 4003).await;
    hook.answer(&u, &org, 204);
    // B still holds the cached denial...
    expect_refused_with(WsClient::connect(&b, &events(&org)).token(&b.token(&u)), 4003).await;
    assert_eq!(hook.hits(), 1);
    // ...until a PUT on A says the membership changed.
    assert_eq!(a.put(&member_path(&org, &u)).await.0, 204);
    let deadline = Instant::now() + WITHIN;
    loop {
        let mut ws = WsClient::connect(&b, &events(&org))
            .token(&b.token(&u))
            .open()
            .await
            .expect("the upgrade is accepted");
        match ws.next_event().await {
            Event::Text(welcome) if welcome["status"] == "connected" => break,
            Event::Close(4003, _) => {
                assert!(Instant::now() < deadline, "B kept its cached denial");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("expected a welcome or 4003, got {other:?}"),
        }
    }
    assert_eq!(hook.hits(), 2);
}
