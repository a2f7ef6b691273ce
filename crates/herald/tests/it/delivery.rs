//! Fan-out under load: a slow consumer is closed with 1008 while everyone else gets
//! every message in order.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const SUBSCRIBERS: usize = 1000;
const MESSAGES: u64 = 150;
const PAYLOAD: usize = 1024;

/// Issue 2: a publish to 1,000 subscribers, one of which never reads, closes that one
/// with 1008 while the other 999 receive every message in order. (That a publish is
/// serialized once is proven at the hub: `hub::tests::fanout_shares_one_buffer`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_1008_and_the_rest_get_everything() {
    for (engine, srv, _redis) in engines_with(|builder| {
        builder
            .env("HERALD_MEMBERSHIP", "claims")
            .outbox_max_bytes(16 * 1024)
    })
    .await
    {
        eprintln!("engine: {engine}");
        let token = |user: &str| sign(json!({"sub": user, "exp": now() + 600, "orgs": ["big"]}));

        // The slow client reads nothing until publishing is over. Its small receive buffer
        // and small MSS (like a slow mobile link) keep the kernel from absorbing the backlog:
        // on loopback's 64 KiB MSS Linux would start the server's send buffer at ~2.6 MB.
        let raw = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        raw.set_tcp_mss(536).unwrap();
        raw.set_recv_buffer_size(4096).unwrap();
        raw.set_nonblocking(true).unwrap();
        let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(raw));
        let stream = socket.connect(srv.addr).await.unwrap();
        let mut request = srv.ws_url("/ws/events/big/").into_client_request().unwrap();
        let protocol = format!("herald.bearer, {}", token("slow"));
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(&protocol).unwrap(),
        );
        let (mut slow, _) = tokio_tungstenite::client_async(request, stream).await.unwrap();

        // The readers, connected in parallel batches.
        let mut readers = Vec::new();
        for batch in 0..(SUBSCRIBERS - 1).div_ceil(100) {
            let connects = (batch * 100..((batch + 1) * 100).min(SUBSCRIBERS - 1)).map(|i| {
                let connect = WsClient::connect(&srv, "/ws/events/big/").token(&token(&format!("u{i}")));
                async move {
                    let mut ws = connect.open().await.unwrap();
                    assert_eq!(ws.next_json().await["status"], "connected");
                    ws
                }
            });
            readers.extend(futures_util::future::join_all(connects).await);
        }
        let readers: Vec<_> = readers
            .into_iter()
            .map(|mut ws| {
                tokio::spawn(async move {
                    let mut offsets = Vec::new();
                    while offsets.len() < MESSAGES as usize {
                        let message = ws.next_json().await;
                        offsets.push(message["offset"].as_u64().unwrap());
                    }
                    offsets
                })
            })
            .collect();

        let pad = "x".repeat(PAYLOAD);
        for n in 1..=MESSAGES {
            let (status, _) = srv
                .post(
                    "/api/v1/orgs/big/events",
                    json!({"event_type": "tick", "data": {"n": n, "pad": pad}}),
                )
                .await;
            assert_eq!(status, 202);
        }

        let expected: Vec<u64> = (1..=MESSAGES).collect();
        for reader in readers {
            assert_eq!(
                reader.await.unwrap(),
                expected,
                "a fast reader lost or reordered messages"
            );
        }

        // Now the slow client reads: a prefix of the sequence in order, then 1008.
        let mut seen = Vec::new();
        let code = loop {
            let Ok(next) = tokio::time::timeout(Duration::from_secs(15), slow.next()).await else {
                panic!("slow client timed out after {} messages", seen.len());
            };
            match next {
                Some(Ok(Message::Text(text))) => {
                    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                    if let Some(offset) = value["offset"].as_u64() {
                        if value["type"] == "org_event" {
                            seen.push(offset);
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("slow client ended without a close frame: {other:?}"),
            }
        };
        assert_eq!(code, Some(1008));
        assert!(
            seen.len() < MESSAGES as usize,
            "the slow client should not have got everything"
        );
        assert_eq!(
            seen,
            (1..=seen.len() as u64).collect::<Vec<_>>(),
            "what it got must be an in-order prefix"
        );

        let (_, stats) = srv.get("/api/v1/stats").await;
        assert_eq!(
            stats["nodes"][0]["messages"]["slow_consumer_disconnects"], 1,
            "{stats}"
        );
    }
}
