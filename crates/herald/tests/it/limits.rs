//! Issue 5 limits: sockets per user (4429), client messages per minute (4429),
//! handshakes per IP (HTTP 429 before the upgrade), request size bounds.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn connections_per_user_across_endpoints() {
    for (engine, srv, _redis) in engines_with(|builder| {
        builder
            .env("HERALD_MAX_CONNECTIONS_PER_USER", "3")
            .env("HERALD_MEMBERSHIP", "claims")
    })
    .await
    {
        eprintln!("engine: {engine}");
        let token = sign(json!({"sub": "u1", "exp": now() + 600, "orgs": ["acme"]}));
        let mut notifications = WsClient::connect(&srv, "/ws/notifications/")
            .token(&token)
            .open()
            .await
            .unwrap();
        notifications.next_json().await;
        let mut events = WsClient::connect(&srv, "/ws/events/acme/")
            .token(&token)
            .open()
            .await
            .unwrap();
        events.next_json().await;
        let mut frames = WsClient::connect(&srv, "/ws/frame-stream/u1/")
            .token(&token)
            .open()
            .await
            .unwrap();
        frames.next_json().await;

        // The fourth socket, on any endpoint, is refused; another user is not affected.
        let reason =
            expect_refused_with(WsClient::connect(&srv, "/ws/notifications/").token(&token), 4429).await;
        assert!(reason.contains("too many connections"), "{reason}");
        expect_refused_with(
            WsClient::connect(&srv, "/ws/frame-stream/u1/").token(&token),
            4429,
        )
        .await;
        let (_other, _) = srv.connect("/ws/notifications/", "u2").await;

        // The three open sockets are untouched.
        srv.notify("u1", json!({"still": "here"})).await;
        assert_eq!(notifications.next_json().await["notification"]["still"], "here");
        frames.send_json(json!({"type": "ping"})).await;
        assert_eq!(frames.next_json().await["type"], "pong");

        // Closing one frees its slot.
        notifications.close().await;
        connect_when_accepted(
            &srv,
            "/ws/notifications/",
            "u1",
            std::time::Duration::from_secs(1),
        )
        .await;
    }
}

#[tokio::test]
async fn client_messages_per_minute() {
    for (engine, srv, _redis) in
        engines_with(|builder| builder.env("HERALD_CLIENT_MESSAGES_PER_MINUTE", "5")).await
    {
        eprintln!("engine: {engine}");
        let (mut ws, _) = srv.connect("/ws/notifications/", "u1").await;
        // Protocol-level pings are not counted.
        for _ in 0..10 {
            ws.send_ping().await;
            assert!(matches!(ws.next_event().await, Event::Pong));
        }
        // Every client message counts, whatever its type or validity.
        for message in [
            r#"{"type":"ping"}"#,
            r#"{"type":"heartbeat"}"#,
            "not json",
            r#"{"type":"x"}"#,
            r#"{"type":"ping"}"#,
        ] {
            ws.send_text(message).await;
            assert_ne!(ws.next_json().await["type"], "system");
        }
        ws.send_text(r#"{"type":"ping"}"#).await;
        let (code, reason) = ws.expect_close().await;
        assert_eq!(code, 4429);
        assert!(reason.contains("too many client messages"), "{reason}");
    }
}

#[tokio::test]
async fn handshakes_per_ip_answered_429_before_upgrade() {
    // 2 per second with a burst of 8.
    for (engine, srv, _redis) in engines_with(|builder| builder.handshakes_per_ip_per_second(2)).await {
        eprintln!("engine: {engine}");
        let token = srv.token("u1");
        for _ in 0..8 {
            let (_ws, _) = WsClient::connect(&srv, "/ws/notifications/")
                .token(&token)
                .connected()
                .await;
        }
        let refused = WsClient::connect(&srv, "/ws/notifications/")
            .token(&token)
            .open()
            .await;
        assert!(
            matches!(refused, Err(Refused(429))),
            "the 9th handshake in a burst must get HTTP 429"
        );
        // The HTTP API is not affected.
        assert_eq!(srv.post("/api/v1/notifications/u1", json!({})).await.0, 202);
    }
}

#[tokio::test]
async fn oversized_url_and_headers_are_refused() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let long = format!("/healthz?pad={}", "x".repeat(9000));
        let (status, body) = read(srv.http.get(srv.url(&long)).send().await.unwrap()).await;
        assert_eq!((status, body["error"].as_str()), (414, Some("uri_too_long")));
        let mut request = srv.http.get(srv.url("/healthz"));
        for i in 0..20 {
            request = request.header(format!("x-pad-{i}"), "y".repeat(1000));
        }
        let (status, body) = read(request.send().await.unwrap()).await;
        assert_eq!((status, body["error"].as_str()), (431, Some("headers_too_large")));
        let (status, _) = read(srv.http.get(srv.url("/healthz")).send().await.unwrap()).await;
        assert_eq!(status, 200);
    }
}
