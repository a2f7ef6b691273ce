//! Socket lifecycle rows of the close-code table: 1000 at `HERALD_MAX_CONNECTION_AGE`,
//! 1001 when the server shuts down (spread over `HERALD_SHUTDOWN_DRAIN`).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::support::*;

#[tokio::test]
async fn max_connection_age_closes_1000() {
    let srv = TestServer::builder()
        .env("HERALD_MAX_CONNECTION_AGE", "1")
        .spawn()
        .await;
    let (mut ws, _) = srv.connect("/ws/notifications/", "u1").await;
    let started = Instant::now();
    let (code, reason) = ws.expect_close().await;
    assert_eq!((code, reason.as_str()), (1000, "max connection age"));
    let waited = started.elapsed();
    // Up to 10 % earlier than the age, never later than it (plus scheduling slack).
    assert!(
        waited >= Duration::from_millis(850) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
}

#[tokio::test]
async fn during_the_drain_readyz_is_503_and_new_sockets_are_refused() {
    let srv = TestServer::builder()
        .env("HERALD_SHUTDOWN_DRAIN", "2")
        .spawn()
        .await;
    let (mut ws, _) = srv.connect("/ws/notifications/", "u1").await;
    let http = srv.http.clone();
    let readyz = srv.url("/readyz");
    let addr = srv.addr;
    let token = srv.token("u2");
    let stopping = tokio::spawn(srv.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = read(http.get(&readyz).send().await.unwrap()).await;
    assert_eq!(
        (status, body["shutting_down"].as_bool()),
        (503, Some(true)),
        "{body}"
    );
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/notifications/?token={token}")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503)
        }
        other => panic!("a new socket during the drain must get HTTP 503, got {other:?}"),
    }
    assert_eq!(ws.expect_close().await.0, 1001);
    drop(ws);
    stopped_within(stopping, Duration::from_secs(6)).await;
}

#[tokio::test]
async fn shutdown_closes_every_socket_1001_within_the_drain_window() {
    let srv = TestServer::builder()
        .env("HERALD_SHUTDOWN_DRAIN", "1")
        .spawn()
        .await;
    let mut sockets = Vec::new();
    for i in 0..20 {
        sockets.push(srv.connect("/ws/notifications/", &format!("u{i}")).await.0);
    }
    let started = Instant::now();
    let stopping = tokio::spawn(srv.stop());
    for mut ws in sockets {
        assert_eq!(ws.expect_close().await.0, 1001);
    }
    stopped_within(stopping, Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn server_pings_and_drops_a_silent_client() {
    let srv = TestServer::builder()
        .configure(|c| {
            c.ping_interval = Duration::from_millis(200);
            c.pong_timeout = Duration::from_millis(600);
        })
        .spawn()
        .await;

    // A client that answers pings (tungstenite does) stays connected well past the
    // pong timeout.
    let (mut alive, _) = srv.connect("/ws/notifications/", "u1").await;
    let reader = tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut pings = 0;
        let until = Instant::now() + Duration::from_millis(1500);
        while let Ok(Some(Ok(message))) = tokio::time::timeout_at(until, alive.ws.next()).await {
            if message.is_ping() {
                pings += 1;
            }
        }
        (pings, alive)
    });

    // A client that upgrades and then never sends a byte, not even a pong.
    let mut silent = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let request = format!(
        "GET /ws/notifications/?token={} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        srv.token("u2"),
        srv.addr
    );
    silent.write_all(request.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let mut received = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
    }
    let dropped_after = started.elapsed();
    assert!(received.starts_with(b"HTTP/1.1 101"), "the upgrade succeeded");
    // Ping frames (opcode 0x9, empty payload) were sent before the drop.
    assert!(
        received.windows(2).any(|w| w == [0x89, 0x00]),
        "no ping frame was sent"
    );
    assert!(
        dropped_after >= Duration::from_millis(550) && dropped_after < Duration::from_millis(2500),
        "dropped after {dropped_after:?}"
    );

    let (pings, mut alive) = reader.await.unwrap();
    assert!(pings >= 5, "expected a ping every 200 ms, got {pings}");
    alive.send_json(serde_json::json!({"type": "ping"})).await;
    assert_eq!(
        alive.next_json().await["type"],
        "pong",
        "the answering client is still connected"
    );
}

#[test]
fn documented_ping_defaults() {
    let config = herald::config::Config::defaults();
    assert_eq!(config.ping_interval, Duration::from_secs(25));
    assert_eq!(config.pong_timeout, Duration::from_secs(60));
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_long_task_past_the_drain() {
    let srv = TestServer::builder()
        .env("HERALD_SHUTDOWN_DRAIN", "1")
        .spawn()
        .await;
    let (mut ws, _) = srv.connect("/ws/frame-stream/u1/", "u1").await;
    // About 10 s of echo at 20 ms per word.
    let task_id = crate::chat::generate(&srv, "u1", "c", &"word ".repeat(500)).await;
    loop {
        let m = ws.next_json().await;
        if m["task_id"] == task_id.as_str() && m["type"] == "llm_frame" && m["frame"]["status"] == "streaming"
        {
            break;
        }
    }
    let started = Instant::now();
    let stopping = tokio::spawn(srv.stop());
    assert_eq!(ws.expect_close().await.0, 1001);
    drop(ws);
    stopped_within(stopping, Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        started.elapsed()
    );
}
