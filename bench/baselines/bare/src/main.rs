//! The bare Rust baseline of herald's benchmarks (issue 8): a minimal axum WebSocket
//! broadcast server, the plain stack herald is built on, with nothing herald adds.
//!
//! It checks an HS256 token and nothing else: no origin check, no membership, no limits,
//! no history, no offsets, no metrics. A publish is serialized once and handed to every
//! subscriber of the channel through an unbounded per-socket queue. It speaks the same
//! paths and message shapes as herald for what the scenarios use:
//!
//! - `GET /ws/notifications/`, `/ws/events/{org}/`, `/ws/frame-stream/{user}/` (token
//!   in `?token=` or `Authorization: Bearer`), first message `{"type":"system",...}`;
//! - `POST /api/v1/notifications/{user}`, `POST /api/v1/orgs/{org}/events` (API key);
//! - `POST /api/chat/generate-response/` (user token): an echo stream in herald's frame
//!   order, one delta every 20 ms, as herald's `echo` provider;
//! - `GET /healthz`.
//!
//! With `--history N` it also keeps what herald's contract keeps of every message, and
//! nothing else herald adds: each message gets its channel's next `offset` and the
//! channel's `epoch`, and the channel keeps its last N messages (serialized, in a ring)
//! for a client that would resume. It is the bare relay doing the contract's retention,
//! the yardstick for what that retention costs (bench/notes.md); no request reads the
//! history back.
//!
//! The WebSocket layer is chosen with `--ws`: `tungstenite` (axum's own, with
//! `--read-buffer`/`--write-buffer` sizes) or `tokio-websockets` (the upgrade done by
//! hand on hyper, as herald does), so the layers can be compared in one program.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::extract::ws::{Message as AxumMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt as _, StreamExt as _};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The pause before each echo delta, as herald's `echo` provider (50 tokens a second).
const ECHO_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Layer {
    /// axum's `WebSocketUpgrade` (tungstenite).
    Tungstenite,
    /// tokio-websockets on hyper's upgraded connection.
    TokioWebsockets,
}

/// A minimal WebSocket broadcast server (the benchmarks' bare baseline).
#[derive(Debug, Parser)]
struct Cli {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1:8100")]
    listen: SocketAddr,
    /// HS256 secret for user tokens.
    #[arg(long)]
    jwt_secret: String,
    /// Service API key for the publish calls.
    #[arg(long)]
    api_key: String,
    /// WebSocket layer.
    #[arg(long, value_enum, default_value = "tungstenite")]
    ws: Layer,
    /// tungstenite's read buffer, in bytes (its default is 128 KiB).
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    /// tungstenite's write buffer, in bytes, before frames are flushed (default 128 KiB).
    #[arg(long, default_value_t = 0)]
    write_buffer: usize,
    /// Messages kept per channel, each with an offset and an epoch (0: none, no offsets).
    #[arg(long, default_value_t = 0)]
    history: usize,
}

#[derive(Clone)]
struct AppState {
    inner: Arc<Inner>,
}

/// Channel name → the queues of its sockets, each with a socket id; with `--history`,
/// also channel name → its sequence and history, in a map of its own, so that without the
/// option a channel costs what it did before the option existed.
#[derive(Default)]
struct Channels {
    subscribers: HashMap<String, Vec<(u64, mpsc::UnboundedSender<Utf8Bytes>)>>,
    kept: HashMap<String, Kept>,
}

/// With `--history`: a channel's epoch, its last offset and its last messages.
struct Kept {
    epoch: String,
    offset: u64,
    history: VecDeque<Utf8Bytes>,
}

struct Inner {
    decoding_key: DecodingKey,
    validation: Validation,
    api_key: String,
    layer: Layer,
    read_buffer: usize,
    write_buffer: usize,
    history: usize,
    channels: Mutex<Channels>,
    next_id: AtomicU64,
}

impl AppState {
    fn channels(&self) -> MutexGuard<'_, Channels> {
        self.inner
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Serializes `message` once and queues it for every socket of `channel`; returns how
    /// many sockets it was queued for. With `--history`, the message is sequenced and
    /// kept under the lock first, as herald's memory broker does.
    fn publish(&self, channel: &str, message: &Value) -> usize {
        let Ok(bytes) = serde_json::to_string(message) else {
            return 0;
        };
        if self.inner.history > 0 {
            return self.publish_kept(channel, bytes);
        }
        let text = Utf8Bytes::from(bytes);
        let mut channels = self.channels();
        let Some(subscribers) = channels.subscribers.get_mut(channel) else {
            return 0;
        };
        subscribers.retain(|(_, queue)| queue.send(text.clone()).is_ok());
        subscribers.len()
    }

    /// [`AppState::publish`] with `--history`: appends the channel's next `offset` and its
    /// `epoch` to the serialized object (as herald's `Draft::seal` appends its fields),
    /// keeps the message in the channel's ring, then queues it.
    fn publish_kept(&self, channel: &str, mut text: String) -> usize {
        let mut guard = self.channels();
        let channels = &mut *guard;
        if !channels.kept.contains_key(channel) {
            let kept = Kept {
                epoch: format!("{:032x}", u128::from(self.next_id()) * 0x9e37_79b9_7f4a_7c15),
                offset: 0,
                history: VecDeque::new(),
            };
            channels.kept.insert(channel.to_owned(), kept);
        }
        let Some(kept) = channels.kept.get_mut(channel) else {
            return 0;
        };
        kept.offset += 1;
        // `text` is a JSON object with at least one field.
        text.pop();
        text.push_str(",\"offset\":");
        text.push_str(&kept.offset.to_string());
        text.push_str(",\"epoch\":\"");
        text.push_str(&kept.epoch);
        text.push_str("\"}");
        let text = Utf8Bytes::from(text);
        if kept.history.len() == self.inner.history {
            kept.history.pop_front();
        }
        kept.history.push_back(text.clone());
        let Some(subscribers) = channels.subscribers.get_mut(channel) else {
            return 0;
        };
        subscribers.retain(|(_, queue)| queue.send(text.clone()).is_ok());
        subscribers.len()
    }

    fn subscribe(&self, channel: &str) -> (u64, mpsc::UnboundedReceiver<Utf8Bytes>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let id = self.next_id();
        self.channels()
            .subscribers
            .entry(channel.to_owned())
            .or_default()
            .push((id, sender));
        (id, receiver)
    }

    fn unsubscribe(&self, channel: &str, id: u64) {
        let mut channels = self.channels();
        if let Some(subscribers) = channels.subscribers.get_mut(channel) {
            subscribers.retain(|(other, _)| *other != id);
            if subscribers.is_empty() {
                channels.subscribers.remove(channel);
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(serve(cli))
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    // SIGTERM ends the process through `exit`, so a profile-guided build's instrumented
    // binary writes its profile (bench/pgo.sh); the default action would not.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::spawn(async move {
        terminate.recv().await;
        std::process::exit(0);
    });
    let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.leeway = 30;
    let state = AppState {
        inner: Arc::new(Inner {
            decoding_key: DecodingKey::from_secret(cli.jwt_secret.as_bytes()),
            validation,
            api_key: cli.api_key,
            layer: cli.ws,
            read_buffer: cli.read_buffer,
            write_buffer: cli.write_buffer,
            history: cli.history,
            channels: Mutex::new(Channels::default()),
            next_id: AtomicU64::new(1),
        }),
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/ws/notifications/", get(notifications))
        .route("/ws/events/{org}/", get(events))
        .route("/ws/frame-stream/{user}/", get(frame_stream))
        .route("/api/v1/notifications/{user}", post(publish_notification))
        .route("/api/v1/orgs/{org}/events", post(publish_event))
        .route("/api/chat/generate-response/", post(generate))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot bind {}", cli.listen))?;
    axum::serve(listener, app).await.context("the server stopped")
}

fn timestamp_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn query_token(request: &Request) -> Option<String> {
    let query = request.uri().query()?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token=").map(str::to_owned))
}

/// The token's user, if the token is a valid HS256 token.
fn authenticate(state: &AppState, token: &str) -> Option<String> {
    jsonwebtoken::decode::<Claims>(token, &state.inner.decoding_key, &state.inner.validation)
        .ok()
        .map(|data| data.claims.sub)
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, "bad token").into_response()
}

fn service_key_ok(state: &AppState, headers: &HeaderMap) -> bool {
    bearer(headers) == Some(state.inner.api_key.as_str())
}

async fn notifications(State(state): State<AppState>, request: Request) -> Response {
    let token = query_token(&request).or_else(|| bearer(request.headers()).map(str::to_owned));
    let Some(user) = token.and_then(|token| authenticate(&state, &token)) else {
        return unauthorized();
    };
    upgrade(state, format!("notifications:{user}"), user, request).await
}

async fn events(State(state): State<AppState>, Path(org): Path<String>, request: Request) -> Response {
    let token = query_token(&request).or_else(|| bearer(request.headers()).map(str::to_owned));
    let Some(user) = token.and_then(|token| authenticate(&state, &token)) else {
        return unauthorized();
    };
    upgrade(state, format!("org:{org}"), user, request).await
}

async fn frame_stream(
    State(state): State<AppState>,
    Path(path_user): Path<String>,
    request: Request,
) -> Response {
    let token = query_token(&request).or_else(|| bearer(request.headers()).map(str::to_owned));
    let Some(user) = token.and_then(|token| authenticate(&state, &token)) else {
        return unauthorized();
    };
    if user != path_user {
        return (StatusCode::FORBIDDEN, "another user's stream").into_response();
    }
    upgrade(state, format!("frames:{user}"), user, request).await
}

fn welcome(channel: &str, user: &str) -> Utf8Bytes {
    Utf8Bytes::from(
        json!({
            "type": "system",
            "status": "connected",
            "channel": channel,
            "user_id": user,
            "timestamp": timestamp_ms(),
        })
        .to_string(),
    )
}

async fn upgrade(state: AppState, channel: String, user: String, request: Request) -> Response {
    match state.inner.layer {
        Layer::Tungstenite => {
            let (mut parts, _body) = request.into_parts();
            let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
                Ok(upgrade) => upgrade,
                Err(rejection) => return rejection.into_response(),
            };
            upgrade
                .read_buffer_size(state.inner.read_buffer)
                .write_buffer_size(state.inner.write_buffer)
                .on_upgrade(move |socket| run_tungstenite(state, socket, channel, user))
        }
        Layer::TokioWebsockets => upgrade_tokio_websockets(state, channel, user, request),
    }
}

/// One socket on tungstenite: the welcome, then queued messages, until the client leaves.
async fn run_tungstenite(state: AppState, mut socket: WebSocket, channel: String, user: String) {
    let (id, mut queue) = state.subscribe(&channel);
    if socket
        .send(AxumMessage::Text(welcome(&channel, &user)))
        .await
        .is_ok()
    {
        loop {
            tokio::select! {
                message = queue.recv() => {
                    let Some(message) = message else { break };
                    if socket.feed(AxumMessage::Text(message)).await.is_err() {
                        break;
                    }
                    let mut failed = false;
                    while let Ok(message) = queue.try_recv() {
                        if socket.feed(AxumMessage::Text(message)).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed || socket.flush().await.is_err() {
                        break;
                    }
                }
                incoming = socket.recv() => match incoming {
                    None | Some(Err(_) | Ok(AxumMessage::Close(_))) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
    }
    state.unsubscribe(&channel, id);
}

/// The upgrade by hand on hyper, as herald does, then one socket on tokio-websockets.
fn upgrade_tokio_websockets(
    state: AppState,
    channel: String,
    user: String,
    mut request: Request,
) -> Response {
    let Some(accept_key) = websocket_accept_key(request.method(), request.headers()) else {
        return (StatusCode::BAD_REQUEST, "expected a WebSocket upgrade").into_response();
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let socket = tokio_websockets::ServerBuilder::new().serve(TokioIo::new(upgraded));
        run_tokio_websockets(state, socket, channel, user).await;
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept_key) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}

async fn run_tokio_websockets<S>(
    state: AppState,
    mut socket: tokio_websockets::WebSocketStream<S>,
    channel: String,
    user: String,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio_websockets::Message;
    let (id, mut queue) = state.subscribe(&channel);
    let text = |message: Utf8Bytes| Message::text(Bytes::from(message));
    if socket.send(text(welcome(&channel, &user))).await.is_ok() {
        loop {
            tokio::select! {
                message = queue.recv() => {
                    let Some(message) = message else { break };
                    if socket.feed(text(message)).await.is_err() {
                        break;
                    }
                    let mut failed = false;
                    while let Ok(message) = queue.try_recv() {
                        if socket.feed(text(message)).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed || socket.flush().await.is_err() {
                        break;
                    }
                }
                incoming = socket.next() => match incoming {
                    None | Some(Err(_)) => break,
                    Some(Ok(message)) if message.is_close() => break,
                    Some(Ok(_)) => {}
                },
            }
        }
    }
    state.unsubscribe(&channel, id);
}

/// Validates the upgrade request and computes `Sec-WebSocket-Accept` (RFC 6455 §4.2.2).
fn websocket_accept_key(method: &Method, headers: &HeaderMap) -> Option<String> {
    if method != Method::GET {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?.as_bytes();
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key);
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    Some(base64::engine::general_purpose::STANDARD.encode(sha1.digest().bytes()))
}

async fn publish_notification(
    State(state): State<AppState>,
    Path(user): Path<String>,
    headers: HeaderMap,
    Json(notification): Json<Value>,
) -> Response {
    if !service_key_ok(&state, &headers) {
        return unauthorized();
    }
    let id = state.next_id();
    let message = json!({
        "type": "notification",
        "notification": notification,
        "id": id,
        "timestamp": timestamp_ms(),
    });
    let sent = state.publish(&format!("notifications:{user}"), &message);
    (StatusCode::ACCEPTED, Json(json!({"id": id, "sockets": sent}))).into_response()
}

#[derive(Debug, Deserialize)]
struct EventBody {
    event_type: String,
    #[serde(default)]
    data: Value,
}

async fn publish_event(
    State(state): State<AppState>,
    Path(org): Path<String>,
    headers: HeaderMap,
    Json(body): Json<EventBody>,
) -> Response {
    if !service_key_ok(&state, &headers) {
        return unauthorized();
    }
    let id = state.next_id();
    let message = json!({
        "type": "org_event",
        "org_id": org,
        "event_type": body.event_type,
        "data": body.data,
        "id": id,
        "timestamp": timestamp_ms(),
    });
    let sent = state.publish(&format!("org:{org}"), &message);
    (StatusCode::ACCEPTED, Json(json!({"id": id, "sockets": sent}))).into_response()
}

#[derive(Debug, Deserialize)]
struct GenerateBody {
    user_id: String,
    chat_id: String,
    prompt: String,
}

/// Starts an echo stream: herald's frame order, one word-sized delta every 20 ms.
async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<GenerateBody>,
) -> Response {
    let Some(user) = bearer(&headers).and_then(|token| authenticate(&state, token)) else {
        return unauthorized();
    };
    if user != body.user_id {
        return (StatusCode::FORBIDDEN, "user_id is not the token's user").into_response();
    }
    let task_id = format!("t{}", state.next_id());
    let response = json!({"task_id": task_id, "chat_id": body.chat_id, "status": "queued"});
    tokio::spawn(echo_stream(state, user, body.chat_id, task_id, body.prompt));
    (StatusCode::ACCEPTED, Json(response)).into_response()
}

async fn echo_stream(state: AppState, user: String, chat_id: String, task_id: String, prompt: String) {
    let channel = format!("frames:{user}");
    let send = |mut message: Value| {
        if let Some(object) = message.as_object_mut() {
            object.insert("user_id".to_owned(), json!(user));
            object.insert("chat_id".to_owned(), json!(chat_id));
            object.insert("task_id".to_owned(), json!(task_id));
            object.insert("timestamp".to_owned(), json!(timestamp_ms()));
        }
        state.publish(&channel, &message);
    };
    send(json!({"type": "llm_status", "status": "started", "message": "task started"}));
    send(json!({"type": "llm_status", "status": "thinking", "message": "thinking"}));
    send(
        json!({"type": "llm_frame", "frame": {"status": "thinking", "message": "LLM is generating response...", "progress": "indeterminate"}}),
    );
    send(json!({"type": "llm_status", "status": "streaming", "message": "streaming"}));
    let reply = format!("Echo: {}", prompt.trim());
    let start = tokio::time::Instant::now();
    for (index, word) in reply.split(' ').enumerate() {
        let n = u32::try_from(index + 1).unwrap_or(u32::MAX);
        tokio::time::sleep_until(start + ECHO_INTERVAL.saturating_mul(n)).await;
        let delta = if index == 0 {
            word.to_owned()
        } else {
            format!(" {word}")
        };
        send(json!({"type": "llm_frame", "frame": {"status": "streaming", "delta": delta, "index": index}}));
    }
    send(json!({"type": "llm_response", "data": {"event": "response_generated", "response": reply}}));
    send(json!({"type": "llm_status", "status": "completed", "message": "completed"}));
}
