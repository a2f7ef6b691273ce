//! SPEC "Limits against hostile clients" (issue 15): request-head and idle timeouts,
//! pending connections per IP, the per-node connection ceiling, trusted proxies.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::support::*;

/// A TCP connection to `server` from the loopback address `source`.
async fn tcp_from(source: [u8; 4], server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(server).await.unwrap()
}

/// Reads until the server closes the connection (EOF or reset); returns when, or
/// `None` if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Instant> {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(Instant::now()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// A WebSocket handshake over `stream`; the HTTP status on refusal.
async fn ws_over(stream: TcpStream, srv: &TestServer, path: &str, user: &str) -> Result<(), u16> {
    let mut request = srv.ws_url(path).into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("herald.bearer, {}", srv.token(user))).unwrap(),
    );
    match tokio_tungstenite::client_async(request, stream).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(err) => panic!("handshake failed: {err}"),
    }
}

/// One HTTP/1.1 request on a kept-alive connection; the status line.
async fn request_on(stream: &mut TcpStream, path: &str) -> String {
    exchange(stream, &format!("GET {path} HTTP/1.1\r\nHost: herald\r\n\r\n")).await
}

/// Sends `request` (the whole of it) on a kept-alive connection and reads its answer;
/// the status line.
async fn exchange(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before answering {request:?}");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length: usize = text[..head_end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= head_end + 4 + length {
                return text.lines().next().unwrap_or("").to_owned();
            }
        }
    }
}

#[tokio::test]
async fn stalled_connections_from_one_ip_are_capped_and_closed_after_the_head_timeout() {
    const MAX_PENDING: usize = 8;
    let srv = TestServer::builder()
        .env("HERALD_MAX_PENDING_PER_IP", MAX_PENDING.to_string())
        .configure(|config| config.request_head_timeout = Duration::from_millis(1500))
        .spawn()
        .await;
    // Half an upgrade request each, then silence.
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..MAX_PENDING + 4 {
        let mut stream = tcp_from([127, 0, 0, 1], srv.addr).await;
        stream
            .write_all(b"GET /ws/notifications/ HTTP/1.1\r\nHost: herald\r\nUpgrade: web")
            .await
            .unwrap();
        stalled.push(stream);
    }
    // Those beyond the cap are closed at accept, long before the head timeout.
    let mut closed_early = 0;
    for stream in stalled.iter_mut().skip(MAX_PENDING) {
        if closed_within(stream, Duration::from_millis(800)).await.is_some() {
            closed_early += 1;
        }
    }
    assert_eq!(
        closed_early, 4,
        "connections beyond HERALD_MAX_PENDING_PER_IP must be closed at accept"
    );

    // Meanwhile another client address connects normally.
    let other = tcp_from([127, 0, 0, 2], srv.addr).await;
    ws_over(other, &srv, "/ws/notifications/", "alice")
        .await
        .expect("127.0.0.2 is not limited by 127.0.0.1's pending connections");

    // The stalled ones are closed after the request-head timeout, not before.
    for stream in stalled.iter_mut().take(MAX_PENDING) {
        let closed = closed_within(stream, WAIT)
            .await
            .expect("a stalled connection stayed open");
        let after = closed.duration_since(started);
        assert!(
            after >= Duration::from_millis(1400),
            "closed after {after:?}, before the head timeout"
        );
    }
    // 127.0.0.1 may connect again, and the refusals were counted.
    let again = tcp_from([127, 0, 0, 1], srv.addr).await;
    ws_over(again, &srv, "/ws/notifications/", "bob")
        .await
        .expect("slots are free again");
    assert_eq!(
        srv.metric("herald_rate_limited_total{limit=\"pending_per_ip\"}")
            .await,
        4.0
    );
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout_not_the_head_timeout() {
    let srv = TestServer::builder()
        .configure(|config| {
            config.request_head_timeout = Duration::from_millis(1000);
            config.http_idle_timeout = Duration::from_millis(2000);
        })
        .spawn()
        .await;
    // A keep-alive connection may wait longer than the head timeout between requests…
    let mut kept = tcp_from([127, 0, 0, 1], srv.addr).await;
    assert!(request_on(&mut kept, "/healthz").await.contains("200"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(request_on(&mut kept, "/healthz").await.contains("200"));
    // …but is closed once idle longer than the idle timeout, counted from the end of
    // its last request (not at the idle and head timeouts added up, 3 s).
    let idle_from = Instant::now();
    let closed = closed_within(&mut kept, WAIT)
        .await
        .expect("an idle keep-alive connection stayed open");
    let idle = closed.duration_since(idle_from);
    assert!(
        idle >= Duration::from_millis(1800) && idle < Duration::from_millis(2600),
        "closed after {idle:?}"
    );

    // A connection that never sends a byte is closed after the idle timeout too.
    let opened = Instant::now();
    let mut silent = tcp_from([127, 0, 0, 1], srv.addr).await;
    let closed = closed_within(&mut silent, WAIT)
        .await
        .expect("a silent connection stayed open");
    let after = closed.duration_since(opened);
    assert!(after >= Duration::from_millis(1800), "closed after {after:?}");

    // A head sent slowly, byte by byte, is cut at the head timeout counted from its
    // first byte.
    let mut slow = tcp_from([127, 0, 0, 1], srv.addr).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let first_byte = Instant::now();
    let mut cut = None;
    for byte in b"GET /healthz HTTP/1.1\r\nHost: herald\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaa" {
        if slow.write_all(&[*byte]).await.is_err() {
            cut = Some(Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cut = match cut {
        Some(at) => at,
        None => closed_within(&mut slow, WAIT)
            .await
            .expect("a slow head stayed open"),
    };
    let after = cut.duration_since(first_byte);
    assert!(
        after >= Duration::from_millis(950) && after < Duration::from_millis(2000),
        "cut after {after:?}"
    );
}

#[tokio::test]
async fn at_the_connection_ceiling_upgrades_get_503_and_http_keeps_answering() {
    let srv = TestServer::builder()
        .env("HERALD_MAX_CONNECTIONS", "3")
        .spawn()
        .await;
    let (_a, _) = srv.connect("/ws/notifications/", "alice").await;
    let (_b, _) = srv.connect("/ws/notifications/", "bob").await;
    let (_c, _) = srv.connect("/ws/notifications/", "carol").await;
    match WsClient::connect(&srv, "/ws/notifications/")
        .token(&srv.token("dave"))
        .open()
        .await
    {
        Err(Refused(status)) => assert_eq!(status, 503),
        Ok(_) => panic!("a fourth connection was upgraded beyond HERALD_MAX_CONNECTIONS=3"),
    }
    // The JSON error shape, on a raw connection.
    let mut raw = tcp_from([127, 0, 0, 1], srv.addr).await;
    let request = "GET /ws/notifications/ HTTP/1.1\r\nHost: herald\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    raw.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, raw.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("\"error\":\"unavailable\"") && answer.contains("HERALD_MAX_CONNECTIONS"),
        "{answer}"
    );
    drop(raw);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let status = srv.http.get(srv.url(path)).send().await.unwrap().status();
        assert_eq!(status, 200, "{path}");
    }
    // The API too (notify asserts its 202).
    srv.notify("alice", serde_json::json!({"title": "still here"}))
        .await;
}

/// A handshake from loopback address `source` with `X-Forwarded-For: forwarded`.
async fn handshake_via(srv: &TestServer, source: [u8; 4], forwarded: &str) -> Result<(), u16> {
    let stream = tcp_from(source, srv.addr).await;
    let mut request = srv.ws_url("/ws/notifications/").into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("herald.bearer, {}", srv.token("alice"))).unwrap(),
    );
    headers.insert("X-Forwarded-For", HeaderValue::from_str(forwarded).unwrap());
    match tokio_tungstenite::client_async(request, stream).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(err) => panic!("handshake failed: {err}"),
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_handshake_rate_counts_the_forwarded_client() {
    // 1 handshake per second per client IP, bursts of 4.
    let srv = TestServer::builder()
        .env("HERALD_TRUSTED_PROXIES", "127.0.0.2/32, 10.0.0.0/8")
        .handshakes_per_ip_per_second(1)
        .spawn()
        .await;
    let proxy = [127, 0, 0, 2];
    // Through the trusted proxy, each forwarded client has its own budget: a spoofed
    // left-most entry does not count, the proxy's own hop (10.0.0.9) is skipped.
    for _ in 0..4 {
        handshake_via(&srv, proxy, "6.6.6.6, 198.51.100.1, 10.0.0.9")
            .await
            .expect("within the burst");
    }
    assert_eq!(
        handshake_via(&srv, proxy, "7.7.7.7, 198.51.100.1").await,
        Err(429)
    );
    for _ in 0..4 {
        handshake_via(&srv, proxy, "198.51.100.2")
            .await
            .expect("another client behind the proxy");
    }
    assert_eq!(handshake_via(&srv, proxy, "198.51.100.2").await, Err(429));

    // An untrusted peer is the client, whatever it forwards.
    let untrusted = [127, 0, 0, 3];
    for n in 0..4 {
        handshake_via(&srv, untrusted, &format!("203.0.113.{n}"))
            .await
            .expect("within the burst");
    }
    assert_eq!(handshake_via(&srv, untrusted, "203.0.113.99").await, Err(429));
}

#[tokio::test]
async fn the_pending_cap_counts_the_peer_even_behind_a_trusted_proxy() {
    let srv = TestServer::builder()
        .env("HERALD_TRUSTED_PROXIES", "127.0.0.2")
        .env("HERALD_MAX_PENDING_PER_IP", "2")
        .spawn()
        .await;
    // Two stalled requests through the proxy, forwarding two different clients, fill
    // the proxy address's pending slots: the cap acts before any header is read.
    let mut stalled = Vec::new();
    for client in ["198.51.100.1", "198.51.100.2"] {
        let mut stream = tcp_from([127, 0, 0, 2], srv.addr).await;
        let head = format!("GET /healthz HTTP/1.1\r\nX-Forwarded-For: {client}\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stalled.push(stream);
    }
    let mut third = tcp_from([127, 0, 0, 2], srv.addr).await;
    assert!(
        closed_within(&mut third, Duration::from_secs(2)).await.is_some(),
        "a third pending connection from the proxy was kept"
    );
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = tcp_from([127, 0, 0, 2], srv.addr).await;
    assert!(request_on(&mut fourth, "/healthz").await.contains("200"));
}

#[tokio::test]
async fn chat_messages_are_paged_newest_page_first() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
    let srv = TestServer::builder()
        .env("HERALD_DATABASE_URL", url.clone())
        .spawn()
        .await;
    // 300 turns written the way workers write them.
    let store = herald::store::Store::connect(&url).await.unwrap();
    for i in 0..150 {
        store
            .add_chat_exchange("u1", "c1", &format!("q{i}"), &format!("a{i}"))
            .await
            .unwrap();
    }
    store
        .add_chat_exchange("u2", "c1", "other user", "other answer")
        .await
        .unwrap();
    let token = srv.token("u1");
    let page = |query: &'static str| {
        let srv = &srv;
        let token = token.clone();
        async move { crate::chat::user_get(srv, &format!("/api/chat/c1/messages{query}"), &token).await }
    };
    let indexes = |body: &serde_json::Value| -> Vec<i64> {
        body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["index"].as_i64().unwrap())
            .collect()
    };

    let (status, first) = page("").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        indexes(&first),
        (200..300).collect::<Vec<_>>(),
        "the newest 100, oldest first"
    );
    assert_eq!(first["messages"][99]["content"], "a149");
    assert_eq!(first["messages"][0]["role"], "user");
    assert_eq!(first["next_before"], 200);

    let (_, second) = page("?before=200&limit=150").await;
    assert_eq!(indexes(&second), (50..200).collect::<Vec<_>>());
    assert_eq!(second["messages"][0]["content"], "q25");
    assert_eq!(second["next_before"], 50);

    let (_, last) = page("?before=50&limit=1000").await;
    assert_eq!(indexes(&last), (0..50).collect::<Vec<_>>());
    assert!(last.get("next_before").is_none(), "{last}");

    let (_, all) = page("?limit=1000").await;
    assert_eq!(indexes(&all).len(), 300);
    assert!(all.get("next_before").is_none());

    // Another user's chat of the same id is separate.
    let (_, other) = crate::chat::user_get(&srv, "/api/chat/c1/messages", &srv.token("u2")).await;
    assert_eq!(indexes(&other), vec![0, 1]);

    for bad in [
        "?limit=0",
        "?limit=1001",
        "?limit=ten",
        "?before=-1",
        "?limit=5&limit=6",
    ] {
        let (status, body) = page(bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "bad_request", "{bad}: {body}");
    }
}

#[tokio::test]
async fn ended_tasks_are_kept_at_most_200_per_user_oldest_dropped_first() {
    for (engine, srv, _redis) in engines().await {
        eprintln!("engine: {engine}");
        let token = srv.token("looper");
        let mut ids = Vec::new();
        for i in 0..205 {
            let task_id = crate::chat::generate(&srv, "looper", "c1", &format!("prompt {i}")).await;
            let cancel = format!("/api/chat/tasks/{task_id}/cancel");
            let (status, _) = crate::chat::user_post(&srv, &cancel, &token, serde_json::json!({})).await;
            assert_eq!(status, 202);
            // Wait for its end, so tasks end in submission order.
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let (_, view) =
                    crate::chat::user_get(&srv, &format!("/api/chat/tasks/{task_id}"), &token).await;
                if ["cancelled", "completed", "failed"].contains(&view["status"].as_str().unwrap_or("")) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{engine}: task {i} never ended: {view}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids.push(task_id);
        }
        let status_of = |id: &String| {
            let srv = &srv;
            let token = token.clone();
            let path = format!("/api/chat/tasks/{id}");
            async move { crate::chat::user_get(srv, &path, &token).await.0 }
        };
        for id in &ids[..5] {
            assert_eq!(
                status_of(id).await,
                404,
                "{engine}: the oldest ended tasks are dropped"
            );
        }
        for id in [&ids[5], &ids[100], &ids[204]] {
            assert_eq!(status_of(id).await, 200, "{engine}: the newest 200 are kept");
        }
        // Another user's ended task is not affected by this user's loop.
        let other = crate::chat::generate(&srv, "quiet", "c1", "hello").await;
        assert_eq!(
            crate::chat::user_get(&srv, &format!("/api/chat/tasks/{other}"), &srv.token("quiet"))
                .await
                .0,
            200
        );
    }
}

/// Sends `head` (without its final blank line; `Connection: close` is added) and an
/// optional body on a fresh connection; returns the status, the head and the body.
async fn raw(srv: &TestServer, head: &str, body: &str) -> (u16, String, String) {
    let mut stream = tcp_from([127, 0, 0, 1], srv.addr).await;
    let request = format!(
        "{head}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

#[track_caller]
fn assert_json_error(status: u16, head: &str, body: &str, expected_status: u16, code: &str) {
    assert_eq!(status, expected_status, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let body: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    assert_eq!(body["error"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

#[tokio::test]
async fn every_error_answer_is_json() {
    let srv = TestServer::spawn().await;
    let token = srv.token("alice");
    let cases = [
        // A path id that is not valid percent-encoded UTF-8.
        (format!("GET /api/chat/tasks/%FF HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}"), 400, "bad_request"),
        (format!("GET /api/v1/orgs/%FF/members HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {API_KEY}"), 400, "bad_request"),
        // A repeated query parameter.
        (
            format!("GET /api/v1/channels/org:acme/history?limit=1&limit=2 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {API_KEY}"),
            400,
            "bad_request",
        ),
        // A wrong method on a WebSocket path and on an API path.
        ("POST /ws/notifications/ HTTP/1.1\r\nHost: h".to_owned(), 405, "method_not_allowed"),
        ("DELETE /api/v1/notifications/alice HTTP/1.1\r\nHost: h".to_owned(), 405, "method_not_allowed"),
        // Oversized headers (herald's own 16 KiB limit).
        (format!("GET /healthz HTTP/1.1\r\nHost: h\r\nX-Big: {}", "a".repeat(20 * 1024)), 431, "headers_too_large"),
    ];
    for (head, status, code) in cases {
        let (got, answer_head, body) = raw(&srv, &head, "").await;
        assert_json_error(got, &answer_head, &body, status, code);
        if status == 405 {
            assert!(
                answer_head.to_ascii_lowercase().contains("allow:"),
                "{answer_head}"
            );
        }
    }
}

#[tokio::test]
async fn lengths_in_characters_count_unicode_scalar_values() {
    let srv = TestServer::spawn().await;
    // 128 two-byte characters (256 bytes) is within the 128-character limit; 129 is not.
    let (status, body) = srv
        .post(
            "/api/v1/orgs/acme/events",
            serde_json::json!({"event_type": "é".repeat(128)}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, _) = srv
        .post(
            "/api/v1/orgs/acme/events",
            serde_json::json!({"event_type": "é".repeat(129)}),
        )
        .await;
    assert_eq!(status, 400);
    let (status, body) = srv
        .put_json(
            "/api/v1/orgs/acme/members/alice",
            serde_json::json!({"role": "ü".repeat(64)}),
        )
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, _) = srv
        .put_json(
            "/api/v1/orgs/acme/members/alice",
            serde_json::json!({"role": "ü".repeat(65)}),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_token_with_crit_and_two_origin_headers_are_refused() {
    let srv = TestServer::spawn().await;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.crit = Some(vec!["exp".to_owned()]);
    let claims = serde_json::json!({"sub": "alice", "exp": now() + 600});
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let reason = expect_refused_with(WsClient::connect(&srv, "/ws/notifications/").token(&token), 4001).await;
    assert!(reason.contains("crit"), "{reason}");
    let response = srv
        .http
        .get(srv.url("/api/chat/tasks/x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    // Two Origin headers, even both allowed, are refused before the upgrade.
    let allowed = "http://localhost:8000";
    let mut request = srv.ws_url("/ws/notifications/").into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("herald.bearer, {}", srv.token("alice"))).unwrap(),
    );
    headers.append("Origin", HeaderValue::from_static("http://localhost:8000"));
    headers.append("Origin", HeaderValue::from_static("http://localhost:8000"));
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or(b"")).unwrap();
            assert_eq!(body["error"], "forbidden", "{body}");
        }
        other => panic!(
            "two Origin headers were not refused with 403: {:?}",
            other.map(|_| ())
        ),
    }
    // One allowed Origin still passes.
    WsClient::connect(&srv, "/ws/notifications/")
        .token(&srv.token("alice"))
        .origin(allowed)
        .connected()
        .await;
}

#[tokio::test]
async fn dev_endpoints_check_the_host_header() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::builder()
        .env("HERALD_JWT_SECRET", "")
        .env("HERALD_API_KEYS", "")
        .env(
            "HERALD_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("herald.db").display()),
        )
        .spawn()
        .await;
    let body = r#"{"user_id":"alice"}"#;
    let post =
        |host: &str| format!("POST /dev/token HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json");
    for host in ["evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"] {
        let (status, head, answer) = raw(&srv, &post(host), body).await;
        assert_json_error(status, &head, &answer, 403, "forbidden");
    }
    let port = srv.addr.port();
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "[::1]".to_owned(),
    ] {
        let (status, _, answer) = raw(&srv, &post(&host), body).await;
        assert_eq!(status, 200, "{host}: {answer}");
    }
}

/// The refusal lines of a JSON log with this message and client IP: (count of lines,
/// sum of their `suppressed` counts).
fn refusal_lines(log: &str, what: &str, ip: &str) -> (u64, u64) {
    let mut lines = 0;
    let mut suppressed = 0;
    for line in log.lines() {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if entry["message"] == what && entry["ip"] == ip {
            lines += 1;
            suppressed += entry["suppressed"]
                .as_u64()
                .unwrap_or_else(|| panic!("no suppressed count in {line}"));
        }
    }
    (lines, suppressed)
}

#[tokio::test]
async fn refusals_are_logged_once_per_second_per_reason_and_ip_with_the_suppressed_count() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, addr) = crate::process::start(
        dir.path(),
        &[
            ("HERALD_JWT_SECRET", SECRET),
            ("HERALD_API_KEYS", API_KEY),
            ("HERALD_DATABASE_URL", "sqlite::memory:"),
            ("HERALD_LOG_FORMAT", "json"),
            ("HERALD_TRUSTED_PROXIES", "127.0.0.2"),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    let started = Instant::now();
    let bad_key = || async {
        let response = http
            .post(format!("http://{addr}/api/v1/notifications/u1"))
            .bearer_auth("wrong-key")
            .json(&serde_json::json!({"title": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    };
    let bad_origin = || async {
        let mut request = format!("ws://{addr}/ws/notifications/")
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_static("https://evil.example"));
        match tokio_tungstenite::connect_async(request).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
            other => panic!("a bad origin was not refused: {:?}", other.map(|_| ())),
        }
    };
    const N: u64 = 40;
    for _ in 0..N {
        bad_key().await;
        bad_origin().await;
    }
    // A second later one more of each writes a line carrying the count in between.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    bad_key().await;
    bad_origin().await;
    let elapsed = started.elapsed().as_secs() + 1;
    // Logs name the forwarded client when the peer is a trusted proxy, else the peer.
    for (source, forwarded) in [([127, 0, 0, 2], "198.51.100.7"), ([127, 0, 0, 3], "198.51.100.8")] {
        let client = reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(source))
            .build()
            .unwrap();
        let response = client
            .get(format!("http://{addr}/api/v1/channels/org:acme/history"))
            .bearer_auth("wrong-key")
            .header("X-Forwarded-For", forwarded)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    proc.stop().await;
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    for what in [
        "service API key refused",
        "origin rejected: not in HERALD_ALLOWED_ORIGINS",
    ] {
        let (lines, suppressed) = refusal_lines(&log, what, "127.0.0.1");
        assert!(
            lines >= 2 && lines <= elapsed + 1,
            "{lines} `{what}` lines in {elapsed} s:\n{log}"
        );
        assert_eq!(
            lines + suppressed,
            N + 1,
            "every refusal is a line or counted in one:\n{log}"
        );
    }
    assert!(
        log.contains(r#""ip":"198.51.100.7""#),
        "behind a trusted proxy the client IP is logged:\n{log}"
    );
    assert!(
        !log.contains("198.51.100.8"),
        "an untrusted peer's X-Forwarded-For is not believed:\n{log}"
    );
    assert!(log.contains(r#""ip":"127.0.0.3""#), "{log}");
}

#[tokio::test]
async fn a_busy_keep_alive_connection_is_not_cut_by_the_head_timeout_of_its_first_request() {
    let srv = TestServer::builder()
        .configure(|config| {
            config.request_head_timeout = Duration::from_millis(300);
            config.http_idle_timeout = Duration::from_millis(2000);
        })
        .spawn()
        .await;
    // Requests with bodies, back to back on one connection, for several head timeouts.
    let mut stream = tcp_from([127, 0, 0, 1], srv.addr).await;
    let token = srv.token("alice");
    let until = Instant::now() + Duration::from_millis(1500);
    let mut answered = 0;
    while Instant::now() < until {
        let body = r#"{"user_id":"alice","chat_id":"c1","prompt":"hello"}"#;
        let request = format!(
            "POST /api/chat/generate-response/ HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        // 202, or 429 once the user has three answers running: either is an answer.
        let status = exchange(&mut stream, &request).await;
        assert!(status.starts_with("HTTP/1.1 "), "answer {answered}: {status}");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answered > 10, "{answered}");
}

/// The service API key is checked on every request of a kept-alive connection, not
/// once per connection: a wrong key after a right one is refused, on the first
/// connection and on the next, and the right key still passes between them.
#[tokio::test]
async fn a_wrong_api_key_after_a_right_one_on_a_kept_alive_connection_is_refused() {
    let srv = TestServer::spawn().await;
    let stats =
        |key: &str| format!("GET /api/v1/stats HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {key}\r\n\r\n");
    let publish = |key: &str| {
        let body = r#"{"n":1}"#;
        format!(
            "POST /api/v1/notifications/alice HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let wrong = [
        API_KEY[..API_KEY.len() - 1].to_owned(),
        format!("{API_KEY}x"),
        API_KEY.to_uppercase(),
        API_KEY.repeat(2),
        API_KEY.chars().rev().collect(),
        format!("{}?", &API_KEY[..API_KEY.len() - 1]),
    ];
    for connection in ["first", "second"] {
        let mut stream = tcp_from([127, 0, 0, 1], srv.addr).await;
        assert!(exchange(&mut stream, &stats(API_KEY)).await.contains(" 200 "));
        for key in &wrong {
            let status = exchange(&mut stream, &stats(key)).await;
            assert!(
                status.contains(" 401 "),
                "{connection} connection, key {key:?}: {status}"
            );
            let status = exchange(&mut stream, &publish(key)).await;
            assert!(
                status.contains(" 401 "),
                "{connection} connection, key {key:?}: {status}"
            );
            let status = exchange(&mut stream, &publish(API_KEY)).await;
            assert!(
                status.contains(" 202 "),
                "{connection} connection, after {key:?}: {status}"
            );
        }
    }
}
