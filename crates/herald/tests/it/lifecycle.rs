//! Socket lifecycle rows of the close-code table: 1000 at `HERALD_MAX_CONNECTION_AGE`,
//! 1001 when the server shuts down (spread over `HERALD_SHUTDOWN_DRAIN`).

use std::time::Duration;

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
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
