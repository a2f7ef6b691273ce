//! The WebSocket endpoints and their handshake (docs/protocol.md): the three
//! single-channel endpoints, and `/ws/`, one socket for many channels, whose client
//! subscribes after the handshake (`session`).
//!
//! Handshake order: the `Origin` check answers 403 without upgrading; every other check
//! (path id, `since`/`epoch`, token, membership) is decided before the `101` is sent,
//! and a failure closes the upgraded socket at once with its close code, so browsers see
//! it in `CloseEvent.code`.
//!
//! The upgrade is done here on hyper's upgraded connection with tokio-websockets, which
//! keeps no per-socket write buffer beyond the frames in flight, and (patched, see
//! vendor/tokio-websockets/PATCHES.md) holds a read buffer only while a frame arrives
//! (see ARCHITECTURE.md for the measurements behind the choice).

pub mod protocol;
pub mod session;

use std::collections::HashMap;
use std::net::IpAddr;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use hyper_util::rt::TokioIo;
use tokio_websockets::{Config, Limits, ServerBuilder};

use crate::app::AppState;
use crate::auth::{find_token, offers_bearer_subprotocol, BEARER_SUBPROTOCOL};
use crate::channel::{Channel, ChannelKind};
use crate::close::{Close, CloseCode};
use crate::http::error::ApiError;
use crate::http::server::Peer;
use crate::ids::UserId;
use crate::limits::LimitRefusal;
use crate::metrics::Endpoint;
use protocol::{valid_epoch, Resume};
use session::Plan;

/// Client messages larger than this close the socket with 1009 (docs/protocol.md).
pub const MAX_CLIENT_MESSAGE: usize = 4 * 1024;

/// The WebSocket routes. Every socket's task holds the state for the socket's life: one
/// pointer, since `AppState` is an `Arc` (issue 19, idle memory).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ws", get(multiplexed))
        .route("/ws/", get(multiplexed))
        .route("/ws/notifications", get(notifications))
        .route("/ws/notifications/", get(notifications))
        .route("/ws/events/{org_id}", get(events))
        .route("/ws/events/{org_id}/", get(events))
        .route("/ws/frame-stream/{user_id}", get(frame_stream))
        .route("/ws/frame-stream/{user_id}/", get(frame_stream))
}

/// The state every socket shares.
type Shared = State<AppState>;

async fn notifications(State(state): Shared, request: Request) -> Response {
    handshake(state, Endpoint::Notifications, None, request).await
}

async fn multiplexed(State(state): Shared, request: Request) -> Response {
    handshake(state, Endpoint::Multiplexed, None, request).await
}

/// The path id, or one that fails the identifier rule when the path segment is not
/// valid percent-encoded UTF-8, so the socket is closed with 4000 like any malformed id.
fn path_id(path: Result<Path<String>, PathRejection>) -> String {
    path.map_or_else(|_| "\u{fffd}".to_owned(), |Path(id)| id)
}

async fn events(
    State(state): Shared,
    org_id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    handshake(state, Endpoint::Events, Some(path_id(org_id)), request).await
}

async fn frame_stream(
    State(state): Shared,
    user_id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    handshake(state, Endpoint::FrameStream, Some(path_id(user_id)), request).await
}

/// What the checks decided: run a session, or close at once with a code.
enum Outcome {
    Accept(Box<Plan>),
    Reject(Close),
}

async fn handshake(
    state: AppState,
    endpoint: Endpoint,
    path_id: Option<String>,
    mut request: Request,
) -> Response {
    let ip = Peer::client_ip_of(request.extensions());
    if state.shutdown.is_cancelled() {
        return ApiError::Unavailable("the server is shutting down; reconnect shortly".to_owned())
            .into_response();
    }
    if request
        .extensions()
        .get::<Peer>()
        .is_some_and(|peer| peer.load.over_ceiling())
    {
        state.metrics.rate_limited("max_connections");
        crate::limits::refusal_log(
            "max_connections",
            ip,
            "handshake refused: the node holds HERALD_MAX_CONNECTIONS connections",
        );
        return ApiError::Unavailable(
            "this node is at its connection limit (HERALD_MAX_CONNECTIONS); retry with backoff".to_owned(),
        )
        .into_response();
    }
    if !state.handshake_limiter.allow(ip) {
        crate::limits::refusal_log("handshakes_per_ip", ip, "handshake rate limited");
        state.metrics.rate_limited("handshakes_per_ip");
        return ApiError::TooManyRequests(
            "too many connection attempts from this address; retry with backoff".to_owned(),
        )
        .into_response();
    }
    let Some(accept_key) = websocket_accept_key(request.method(), request.headers()) else {
        return ApiError::BadRequest(
            "this endpoint expects a WebSocket upgrade (GET with Upgrade: websocket)".to_owned(),
        )
        .into_response();
    };
    if request.headers().get_all(header::ORIGIN).iter().nth(1).is_some() {
        crate::limits::refusal_log("bad_origin", ip, "origin rejected: two Origin headers");
        state.metrics.origin_rejected();
        return ApiError::Forbidden("send one Origin header, not several".to_owned()).into_response();
    }
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !state.config.allowed_origins.allows(origin) {
            crate::limits::refusal_log("bad_origin", ip, "origin rejected: not in HERALD_ALLOWED_ORIGINS");
            state.metrics.origin_rejected();
            return ApiError::Forbidden(
                "this Origin is not allowed; add it to HERALD_ALLOWED_ORIGINS".to_owned(),
            )
            .into_response();
        }
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    let outcome = decide(
        &state,
        endpoint,
        path_id.as_deref(),
        request.headers(),
        request.uri().query(),
        ip,
    )
    .await;
    if let Outcome::Reject(close) = &outcome {
        state.metrics.close_sent(close.code);
    }

    let tracker = state.tracker.clone();
    tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::debug!(error = %err, "websocket upgrade failed");
                return;
            }
        };
        let mut ws = ServerBuilder::new()
            .config(socket_config())
            .limits(socket_limits())
            .serve(TokioIo::new(upgraded));
        match outcome {
            Outcome::Accept(plan) => session::run(&state, ws, plan).await,
            Outcome::Reject(close) => session::close_socket(&mut ws, Some(&close)).await,
        }
    });

    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept_key) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    if offers_bearer_subprotocol(request.headers()) {
        // Answer with the protocol name only: the token is never echoed.
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(BEARER_SUBPROTOCOL),
        );
    }
    response
}

/// The WebSocket layer's settings for every socket: no read buffer while nothing
/// arrives (the buffer is allocated for a frame and given back once it is read), so an
/// idle socket holds none (BENCHMARKS.md, idle memory; vendor/tokio-websockets).
fn socket_config() -> Config {
    Config::default().read_buffer_size(0)
}

/// Client messages over [`MAX_CLIENT_MESSAGE`] are refused by the layer (1009).
fn socket_limits() -> Limits {
    Limits::default().max_payload_len(Some(MAX_CLIENT_MESSAGE))
}

/// Validates the upgrade request and computes `Sec-WebSocket-Accept` (RFC 6455 §4.2.2).
fn websocket_accept_key(method: &Method, headers: &HeaderMap) -> Option<String> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if method != Method::GET
        || !has_token(header::UPGRADE, "websocket")
        || !has_token(header::CONNECTION, "upgrade")
        || headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
    {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?.as_bytes();
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key);
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    Some(base64::engine::general_purpose::STANDARD.encode(sha1.digest().bytes()))
}

/// Runs every check after the origin, in order: path id and query (4000), token
/// (4001), permission (4003).
async fn decide(
    state: &AppState,
    endpoint: Endpoint,
    path_id: Option<&str>,
    headers: &HeaderMap,
    query: Option<&str>,
    ip: IpAddr,
) -> Outcome {
    let reject = |code: CloseCode, reason: String| Outcome::Reject(Close::new(code, reason));
    let query: HashMap<String, String> = serde_urlencoded::from_str(query.unwrap_or("")).unwrap_or_default();

    // 4000: the path id and the resume position must be well-formed.
    let path_channel = match (endpoint, path_id) {
        (Endpoint::Events, Some(id)) => Some(Channel::new(ChannelKind::Org, id)),
        (Endpoint::FrameStream, Some(id)) => Some(Channel::new(ChannelKind::Frames, id)),
        _ => None,
    };
    let path_channel = match path_channel.transpose() {
        Ok(channel) => channel,
        Err(err) => return reject(CloseCode::BadRequest, err.to_string()),
    };
    let resume = match parse_resume(&query) {
        Ok(Some(_)) if endpoint == Endpoint::Multiplexed => {
            return reject(
                CloseCode::BadRequest,
                "on /ws/, send since and epoch in each subscribe message".to_owned(),
            );
        }
        Ok(resume) => resume,
        Err(reason) => return reject(CloseCode::BadRequest, reason.to_owned()),
    };

    // 4001: a valid token.
    let Some((token, _source)) = find_token(headers, query.get("token").map(String::as_str)) else {
        state.metrics.auth_failed("missing");
        crate::limits::refusal_log("missing_token", ip, "authentication failed: no token");
        return reject(
            CloseCode::Unauthorized,
            "no token: use the herald.bearer subprotocol, an Authorization header or ?token=".to_owned(),
        );
    };
    let identity = match state.auth.authenticate(&token).await {
        Ok(identity) => identity,
        Err(failure) => {
            state.metrics.auth_failed(failure.reason());
            crate::limits::refusal_log(failure.reason(), ip, "authentication failed");
            return reject(CloseCode::Unauthorized, failure.to_string());
        }
    };

    // 4003: permission for the channel.
    let revocations = state.hub.revocations();
    let (channel, org_id) = match (endpoint, path_channel) {
        // Each subscription is authorized on its own (`session`).
        (Endpoint::Multiplexed, _) => (None, None),
        (Endpoint::Notifications, _) => {
            match Channel::new(ChannelKind::Notifications, identity.user_id.as_str()) {
                Ok(channel) => (Some(channel), None),
                Err(err) => return reject(CloseCode::Unauthorized, err.to_string()),
            }
        }
        (Endpoint::Events, Some(channel)) => {
            if !state.membership.is_member(channel.id(), &identity).await {
                tracing::warn!(org_id = channel.id(), user_id = %identity.user_id, "not a member of the org");
                return reject(
                    CloseCode::Forbidden,
                    "not a member of this organization".to_owned(),
                );
            }
            let org_id = channel.id().to_owned();
            (Some(channel), Some(org_id))
        }
        (Endpoint::FrameStream, Some(channel)) => {
            if UserId::parse(channel.id()).ok().as_ref() != Some(&identity.user_id) {
                tracing::warn!(user_id = %identity.user_id, "frame stream of another user refused");
                return reject(
                    CloseCode::Forbidden,
                    "this stream belongs to another user".to_owned(),
                );
            }
            (Some(channel), None)
        }
        (_, None) => return reject(CloseCode::BadRequest, "missing path id".to_owned()),
    };

    // 4429: the user's connection limit, counted over every endpoint: a `/ws/` socket
    // with many subscriptions is one connection.
    let slot = match state.connection_limits.acquire(identity.user_id.as_str()).await {
        Ok(slot) => slot,
        Err(LimitRefusal::TooMany) => {
            crate::limits::refusal_log("connections_per_user", ip, "too many connections for this user");
            state.metrics.rate_limited("connections_per_user");
            return reject(
                CloseCode::TooManyRequests,
                format!(
                    "too many connections for this user (at most {})",
                    state.config.max_connections_per_user
                ),
            );
        }
        Err(LimitRefusal::Unavailable(reason)) => {
            tracing::warn!(%ip, %reason, "connection count unavailable");
            return reject(CloseCode::GoingAway, "server busy; reconnect shortly".to_owned());
        }
    };

    // `?presence=1` on the events endpoint: also send the org's presence.
    let presence = endpoint == Endpoint::Events
        && query
            .get("presence")
            .is_some_and(|v| matches!(v.as_str(), "1" | "true"));
    Outcome::Accept(Box::new(Plan {
        endpoint,
        channel,
        presence,
        identity,
        org_id,
        resume,
        revocations,
        slot,
        ip,
    }))
}

/// `since` must be a non-negative integer; `epoch` a short token. `epoch` alone is an
/// error; `since` alone resumes from whatever epoch the channel has.
fn parse_resume(query: &HashMap<String, String>) -> Result<Option<Resume>, &'static str> {
    let epoch = match query.get("epoch").map(String::as_str) {
        None | Some("") => None,
        Some(epoch) if valid_epoch(epoch) => Some(epoch.to_owned()),
        Some(_) => return Err("epoch is not a valid epoch"),
    };
    match query.get("since") {
        None if epoch.is_some() => Err("epoch needs since"),
        None => Ok(None),
        Some(since) => match since.parse::<u64>() {
            Ok(since) => Ok(Some(Resume { since, epoch })),
            Err(_) => Err("since must be a non-negative integer"),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context as TaskContext, Poll};

    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn output_size<A, B, C, F>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle socket holds its session's future for its whole life (issue 19).
    #[test]
    fn session_future_size() {
        type Io = tokio::io::DuplexStream;
        let session = output_size(session::run::<Io>);
        println!(
            "session::run future {session} B; AppState {} B; WebSocketStream {} B; Plan {} B",
            std::mem::size_of::<AppState>(),
            std::mem::size_of::<tokio_websockets::WebSocketStream<Io>>(),
            std::mem::size_of::<Plan>(),
        );
        // 4,280 B before issue 19 (the state, socket and plan held twice, every timer
        // and rare await inline); 1,976 B after the first changes; 1,368 B once the
        // session was no longer held twice in `serve` and the limiters were made
        // lazily; 1,088 B since a batch that needs no waiting is forwarded without a
        // future; 1,152 B since the shutdown wait polls the token only once it woke
        // (`sync::cancelled`, its flag and the task's waker) (debug build).
        assert!(session < 1_300, "the session future grew to {session} B");
    }

    /// The server's writes through a pipe that takes at most 7 bytes a write, so every
    /// frame is written in parts: small batches go out from one copy (up to 16 KiB
    /// queued, the patched layer's `send` path), larger ones as slices; a frame cut
    /// anywhere must arrive whole and in order, on both paths and across the boundary.
    #[tokio::test]
    async fn frames_written_in_parts_arrive_whole_and_in_order() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_websockets::{ClientBuilder, Message};

        let (server_io, client_io) = tokio::io::duplex(7);
        let mut server = ServerBuilder::new().config(socket_config()).serve(server_io);
        let mut client = ClientBuilder::new()
            .limits(Limits::unlimited())
            .take_over(client_io);
        let sizes = [
            0,
            1,
            125,
            126,
            127,
            300,
            16 * 1024 - 4,
            16 * 1024,
            16 * 1024 + 1,
            65_535,
            65_536,
            70_000,
            3,
        ];
        let texts: Vec<String> = sizes
            .iter()
            .enumerate()
            .map(|(i, size)| {
                let letter = char::from(b'a' + u8::try_from(i).unwrap());
                letter.to_string().repeat(*size)
            })
            .collect();
        let writer = {
            let texts = texts.clone();
            tokio::spawn(async move {
                // One at a time (each flushed alone), then all fed without a flush
                // between (the layer flushes by itself once several KiB are queued;
                // the frames over 16 KiB take the sliced path).
                for text in &texts {
                    server.send(Message::text(text.clone())).await.unwrap();
                }
                for text in &texts {
                    server.feed(Message::text(text.clone())).await.unwrap();
                }
                server.flush().await.unwrap();
                // A batch of small frames queued together: the copy path with several
                // frames in one write.
                for i in 0..50 {
                    server.feed(Message::text(format!("small {i}"))).await.unwrap();
                }
                server.flush().await.unwrap();
                server
            })
        };
        let mut expected: Vec<String> = texts.iter().chain(&texts).cloned().collect();
        expected.extend((0..50).map(|i| format!("small {i}")));
        for want in &expected {
            let message = client.next().await.unwrap().unwrap();
            assert_eq!(
                message.as_text(),
                Some(want.as_str()),
                "a frame of {} bytes",
                want.len()
            );
        }
        drop(writer.await.unwrap());
    }

    /// A socket that counts which write the layer used, and says it takes vectored
    /// writes, as a TCP stream does.
    struct CountingIo {
        inner: tokio::io::DuplexStream,
        plain: Arc<AtomicUsize>,
        vectored: Arc<AtomicUsize>,
    }

    impl tokio::io::AsyncRead for CountingIo {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut TaskContext<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for CountingIo {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut TaskContext<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.plain.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut TaskContext<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.vectored.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Up to 16 KiB queued goes out as one plain write of a copy (a `send` on TCP, issue
    /// 19), more as one vectored write of the frames' slices (a `writev`), on a socket
    /// that offers both.
    #[tokio::test]
    async fn small_writes_are_copied_and_large_ones_sliced() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_websockets::{ClientBuilder, Message};

        let (server_io, client_io) = tokio::io::duplex(1 << 20);
        let plain = Arc::new(AtomicUsize::new(0));
        let vectored = Arc::new(AtomicUsize::new(0));
        let io = CountingIo {
            inner: server_io,
            plain: Arc::clone(&plain),
            vectored: Arc::clone(&vectored),
        };
        let mut server = ServerBuilder::new().config(socket_config()).serve(io);
        let mut client = ClientBuilder::new()
            .limits(Limits::unlimited())
            .take_over(client_io);

        for i in 0..3 {
            server.feed(Message::text(format!("small {i}"))).await.unwrap();
        }
        server.flush().await.unwrap();
        assert_eq!(
            (plain.load(Ordering::Relaxed), vectored.load(Ordering::Relaxed)),
            (1, 0),
            "three small frames: one plain write of their copy"
        );

        // (The layer flushes by itself once several KiB are queued, so one frame.)
        let large = "x".repeat(20_000);
        server.send(Message::text(large.clone())).await.unwrap();
        assert_eq!(
            plain.load(Ordering::Relaxed),
            1,
            "a 20 KB frame must not be copied"
        );
        assert!(vectored.load(Ordering::Relaxed) >= 1, "a 20 KB frame: slices");

        for want in ["small 0", "small 1", "small 2", &large] {
            let message = client.next().await.unwrap().unwrap();
            assert_eq!(message.as_text(), Some(want));
        }
    }

    #[test]
    fn resume_parameters() {
        assert_eq!(parse_resume(&query(&[])), Ok(None));
        assert_eq!(
            parse_resume(&query(&[("since", "41"), ("epoch", "abc")])),
            Ok(Some(Resume {
                since: 41,
                epoch: Some("abc".to_owned())
            }))
        );
        assert_eq!(
            parse_resume(&query(&[("since", "0")])),
            Ok(Some(Resume {
                since: 0,
                epoch: None
            }))
        );
        for bad in ["-1", "1.5", "x", "", "99999999999999999999999"] {
            assert!(parse_resume(&query(&[("since", bad)])).is_err(), "since={bad}");
        }
        assert!(parse_resume(&query(&[("since", "1"), ("epoch", "a b")])).is_err());
        assert!(parse_resume(&query(&[("epoch", "abc")])).is_err());
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(
            websocket_accept_key(&Method::GET, &headers).as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        assert_eq!(websocket_accept_key(&Method::POST, &headers), None);
    }
}
