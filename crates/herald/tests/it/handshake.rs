//! SPEC §2 (token sources, HS256 checks, origins) and SPEC §3 (endpoints, close codes,
//! welcome, client messages) over real sockets.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn welcome_message_on_each_endpoint() {
    for (engine, srv, _redis) in engines_with(|builder| builder.env("HERALD_MEMBERSHIP", "claims")).await {
        eprintln!("engine: {engine}");
        let (_ws, welcome) = srv.connect("/ws/notifications/", "user_123").await;
        assert_eq!(welcome["type"], "system");
        assert_eq!(welcome["message"], "WebSocket connection established");
        assert_eq!(welcome["user_id"], "user_123");
        assert_eq!(welcome["channel"], "notifications:user_123");
        assert_eq!(welcome["offset"], 0);
        assert!(welcome["connection_id"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(welcome["epoch"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(welcome["timestamp"].as_str().is_some_and(|s| s.ends_with('Z')));
        assert!(welcome.get("org_id").is_none());

        let (_ws, welcome) = srv.connect("/ws/frame-stream/user_123/", "user_123").await;
        assert_eq!(welcome["channel"], "frames:user_123");

        // Trailing slash optional.
        let (_ws, welcome) = srv.connect("/ws/frame-stream/user_123", "user_123").await;
        assert_eq!(welcome["channel"], "frames:user_123");
        let (_ws, welcome) = srv.connect("/ws/notifications", "user_123").await;
        assert_eq!(welcome["channel"], "notifications:user_123");

        let token = sign(json!({"sub": "u1", "exp": now() + 60, "orgs": ["acme"]}));
        let mut ws = WsClient::connect(&srv, "/ws/events/acme/")
            .token(&token)
            .open()
            .await
            .unwrap();
        let welcome = ws.next_json().await;
        assert_eq!(welcome["channel"], "org:acme");
        assert_eq!(welcome["org_id"], "acme");
        let mut ws = WsClient::connect(&srv, "/ws/events/acme")
            .token(&token)
            .open()
            .await
            .unwrap();
        assert_eq!(ws.next_json().await["org_id"], "acme");
    }
}

#[tokio::test]
async fn token_sources_and_their_order() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let good = srv.token("u1");

        // 1. Subprotocol: answered with herald.bearer only, never the token.
        let mut ws = WsClient::connect(&srv, "/ws/notifications/")
            .token(&good)
            .open()
            .await
            .unwrap();
        assert_eq!(ws.protocol.as_deref(), Some("herald.bearer"));
        assert_eq!(ws.next_json().await["user_id"], "u1");

        // 2. Authorization header.
        let mut ws = WsClient::connect(&srv, "/ws/notifications/")
            .bearer(&good)
            .open()
            .await
            .unwrap();
        assert_eq!(ws.protocol, None);
        assert_eq!(ws.next_json().await["user_id"], "u1");

        // 3. Query parameter.
        let mut ws = WsClient::connect(&srv, &format!("/ws/notifications/?token={good}"))
            .open()
            .await
            .unwrap();
        assert_eq!(ws.next_json().await["user_id"], "u1");

        // The first source present is the one used: a bad subprotocol token is not rescued
        // by a good header, and a good subprotocol token wins over a bad header.
        let connect = WsClient::connect(&srv, &format!("/ws/notifications/?token={good}")).token("garbage");
        expect_refused_with(connect, 4001).await;
        let mut ws = WsClient::connect(&srv, "/ws/notifications/")
            .token(&good)
            .bearer("garbage")
            .open()
            .await
            .unwrap();
        assert_eq!(ws.next_json().await["user_id"], "u1");
        let connect = WsClient::connect(&srv, &format!("/ws/notifications/?token={good}")).bearer("garbage");
        expect_refused_with(connect, 4001).await;
    }
}

#[tokio::test]
async fn unauthorized_closes_4001() {
    for (engine, srv, _redis) in engines_with(|builder| {
        builder
            .env("HERALD_JWT_ISSUER", "https://id.example.com")
            .env("HERALD_JWT_AUDIENCE", "herald,other")
    })
    .await
    {
        eprintln!("engine: {engine}");
        let claims = |extra: serde_json::Value| {
            let mut claims =
                json!({"sub": "u1", "exp": now() + 60, "iss": "https://id.example.com", "aud": "herald"});
            for (k, v) in extra.as_object().unwrap() {
                if v.is_null() {
                    claims.as_object_mut().unwrap().remove(k);
                } else {
                    claims[k] = v.clone();
                }
            }
            claims
        };
        let ok = sign(claims(json!({})));
        let (_ws, _) = WsClient::connect(&srv, "/ws/notifications/")
            .token(&ok)
            .connected()
            .await;

        // No token at all.
        expect_refused_with(WsClient::connect(&srv, "/ws/notifications/"), 4001).await;
        let wrong_key = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims(json!({})),
            &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret"),
        )
        .unwrap();
        for (token, what) in [
            (wrong_key, "bad signature"),
            (sign(claims(json!({"exp": now() - 120}))), "expired"),
            (sign(claims(json!({"exp": null}))), "no exp"),
            (
                sign(claims(json!({"iss": "https://evil.example.com"}))),
                "wrong issuer",
            ),
            (sign(claims(json!({"aud": "someone-else"}))), "wrong audience"),
            (sign(claims(json!({"nbf": now() + 300}))), "not yet valid"),
            ("not.a.jwt".to_owned(), "malformed"),
        ] {
            let reason =
                expect_refused_with(WsClient::connect(&srv, "/ws/notifications/").token(&token), 4001).await;
            assert!(
                !reason.contains(&token),
                "{what}: the reason must not echo the token"
            );
        }
        // The second configured audience is accepted too.
        let (_ws, _) = WsClient::connect(&srv, "/ws/notifications/")
            .token(&sign(claims(json!({"aud": ["other"]}))))
            .connected()
            .await;
    }
}

#[tokio::test]
async fn alg_none_is_refused() {
    use base64::Engine;
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let b64 =
            |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!(
            "{}.{}.",
            b64(json!({"alg": "none"})),
            b64(json!({"sub": "u1", "exp": now() + 60}))
        );
        expect_refused_with(WsClient::connect(&srv, "/ws/notifications/").token(&none), 4001).await;
    }
}

#[tokio::test]
async fn origin_checked_before_upgrade() {
    for (engine, srv, _redis) in engines_with(|builder| {
        builder.env(
            "HERALD_ALLOWED_ORIGINS",
            "https://app.example.com,http://localhost:3000",
        )
    })
    .await
    {
        eprintln!("engine: {engine}");
        let token = srv.token("u1");
        for allowed in ["https://app.example.com", "http://localhost:3000"] {
            let (_ws, _) = WsClient::connect(&srv, "/ws/notifications/")
                .token(&token)
                .origin(allowed)
                .connected()
                .await;
        }
        // No Origin: a non-browser client, allowed on purpose.
        let (_ws, _) = WsClient::connect(&srv, "/ws/notifications/")
            .token(&token)
            .connected()
            .await;

        for refused in [
            "null",
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://evil.app.example.com",
            "https://app.example.com.evil.com",
            "http://localhost:3001",
        ] {
            let result = WsClient::connect(&srv, "/ws/notifications/")
                .token(&token)
                .origin(refused)
                .open()
                .await;
            assert!(matches!(result, Err(Refused(403))), "{refused} must get HTTP 403");
        }
        // The origin check comes first: even without a token it is a 403, not a 4001.
        let result = WsClient::connect(&srv, "/ws/notifications/")
            .origin("https://evil.com")
            .open()
            .await;
        assert!(matches!(result, Err(Refused(403))));
    }
}

#[tokio::test]
async fn default_origins_and_wildcard() {
    let srv = TestServer::spawn().await;
    let token = srv.token("u1");
    let (_ws, _) = WsClient::connect(&srv, "/ws/notifications/")
        .token(&token)
        .origin("http://localhost:8000")
        .connected()
        .await;
    let result = WsClient::connect(&srv, "/ws/notifications/")
        .token(&token)
        .origin("http://localhost:9999")
        .open()
        .await;
    assert!(matches!(result, Err(Refused(403))));

    let srv = TestServer::builder()
        .env("HERALD_ALLOWED_ORIGINS", "*")
        .spawn()
        .await;
    let (_ws, _) = WsClient::connect(&srv, "/ws/notifications/")
        .token(&token)
        .origin("https://anything.example")
        .connected()
        .await;
}

#[tokio::test]
async fn bad_requests_close_4000() {
    for (engine, srv, _redis) in engines_with(|builder| builder.env("HERALD_MEMBERSHIP", "claims")).await {
        eprintln!("engine: {engine}");
        let token = srv.token("u1");
        for path in [
            "/ws/events/bad%20org/",
            "/ws/events/org%2Fslash/",
            // Not valid UTF-8 once decoded.
            "/ws/events/%FF/",
            // A malformed frame-stream user id is 4000, not 4003.
            "/ws/frame-stream/not%20valid/",
            "/ws/notifications/?since=-1",
            "/ws/notifications/?since=abc",
            "/ws/notifications/?since=1.5",
            "/ws/notifications/?since=1&epoch=has%20space",
            "/ws/notifications/?epoch=abc",
        ] {
            expect_refused_with(WsClient::connect(&srv, path).token(&token), 4000).await;
        }
        let long = "x".repeat(129);
        expect_refused_with(
            WsClient::connect(&srv, &format!("/ws/frame-stream/{long}/")).token(&token),
            4000,
        )
        .await;
    }
}

#[tokio::test]
async fn forbidden_closes_4003() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        // Database membership (the default): u1 is not a member of acme yet.
        expect_refused_with(
            WsClient::connect(&srv, "/ws/events/acme/").token(&srv.token("u1")),
            4003,
        )
        .await;
        assert_eq!(srv.put("/api/v1/orgs/acme/members/u1").await.0, 204);
        let (_ws, welcome) = srv.connect("/ws/events/acme/", "u1").await;
        assert_eq!(welcome["org_id"], "acme");
        // Another user's frame stream.
        expect_refused_with(
            WsClient::connect(&srv, "/ws/frame-stream/u2/").token(&srv.token("u1")),
            4003,
        )
        .await;
    }
}

#[tokio::test]
async fn client_messages() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let (mut ws, _) = srv.connect("/ws/notifications/", "u1").await;

        ws.send_json(json!({"type": "ping"})).await;
        let pong = ws.next_json().await;
        assert_eq!(pong["type"], "pong");
        assert!(pong["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));

        ws.send_json(json!({"type": "heartbeat"})).await;
        assert_eq!(ws.next_json().await["type"], "heartbeat_ack");

        ws.send_text("this is not json").await;
        let err = ws.next_json().await;
        assert_eq!(err["type"], "error");
        assert_eq!(err["error"], "invalid_json");
        assert!(err["message"].is_string());

        for other in [
            json!({"type": "publish", "channel": "org:x"}),
            json!([1, 2]),
            json!({"no": "type"}),
        ] {
            ws.send_json(other).await;
            let err = ws.next_json().await;
            assert_eq!(err["error"], "unsupported_message");
        }

        // Protocol-level pings are answered with pongs.
        ws.send_ping().await;
        assert!(matches!(ws.next_event().await, Event::Pong));

        // The socket is still open after all of that.
        ws.send_json(json!({"type": "ping"})).await;
        assert_eq!(ws.next_json().await["type"], "pong");
    }
}

#[tokio::test]
async fn binary_frame_closes_1003() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let (mut ws, _) = srv.connect("/ws/notifications/", "u1").await;
        ws.send_binary(vec![1, 2, 3]).await;
        assert_eq!(ws.expect_close().await.0, 1003);
    }
}

#[tokio::test]
async fn message_over_4_kib_closes_1009() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let (mut ws, _) = srv.connect("/ws/notifications/", "u1").await;
        // Exactly 4 KiB is still allowed.
        let at_limit = format!("{{\"type\":\"ping\",\"pad\":\"{}\"}}", "x".repeat(4096 - 24));
        assert_eq!(at_limit.len(), 4096);
        ws.send_text(&at_limit).await;
        assert_eq!(ws.next_json().await["type"], "pong");
        let over = format!("{{\"type\":\"ping\",\"pad\":\"{}\"}}", "x".repeat(4097 - 24));
        ws.send_text(&over).await;
        assert_eq!(ws.expect_close().await.0, 1009);
    }
}

#[tokio::test]
async fn refresh_extends_or_closes_4001() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let (mut ws, _) = srv.connect("/ws/notifications/", "u1").await;
        let exp = now() + 7200;
        ws.send_json(json!({"type": "refresh", "token": sign(json!({"sub": "u1", "exp": exp}))}))
            .await;
        let refreshed = ws.next_json().await;
        assert_eq!(refreshed["type"], "system");
        assert_eq!(refreshed["status"], "refreshed");
        let expected =
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp))
                .to_string();
        assert_eq!(refreshed["expires_at"], expected);

        // A token for another user closes the socket.
        ws.send_json(json!({"type": "refresh", "token": srv.token("u2")}))
            .await;
        assert_eq!(ws.expect_close().await.0, 4001);

        // So does a bad token.
        let (mut ws, _) = srv.connect("/ws/notifications/", "u1").await;
        ws.send_json(json!({"type": "refresh", "token": "bad"})).await;
        assert_eq!(ws.expect_close().await.0, 4001);
    }
}

#[tokio::test]
async fn token_expiry_while_connected_closes_4001() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        // Expired 29 s ago: still inside the 30 s leeway, so accepted, then closed about a
        // second later when the leeway runs out.
        let token = sign(json!({"sub": "u1", "exp": now() - 29}));
        let (mut ws, _) = WsClient::connect(&srv, "/ws/notifications/")
            .token(&token)
            .connected()
            .await;
        let (code, reason) = ws.expect_close().await;
        assert_eq!(code, 4001);
        assert!(reason.contains("expired"), "{reason}");
    }
}

#[tokio::test]
async fn plain_http_to_a_socket_endpoint_is_400() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let response = srv.http.get(srv.url("/ws/notifications/")).send().await.unwrap();
        let (status, body) = read(response).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"], "bad_request");
    }
}
