//! A load-generator worker process (`bench worker`): holds a slice of the scenario's
//! sockets, counts what arrives on them, and runs echo chat tasks. It reads
//! [`Command`]s from stdin and answers each with one [`Reply`] on stdout.
//!
//! It runs on one thread: the sockets of a worker never contend for a lock, and the
//! orchestrator starts as many workers as the sockets need.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_websockets::{ClientBuilder, MaybeTlsStream, Message, WebSocketStream};

use crate::histogram::Recorder;
use crate::token::{mint, now_us};
use crate::wire::{Command, ConnectReport, Endpoint, Reply, RoundReport, StreamReport};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one socket has seen in the current round.
#[derive(Debug, Default, Clone)]
struct SocketState {
    /// The highest sequence number seen in this round.
    last: Option<u64>,
    distinct: u64,
    duplicated: u64,
    out_of_order: u64,
    open: bool,
    /// The socket's user is `u{user}`.
    user: usize,
    stream: StreamState,
}

#[derive(Debug, Default, Clone)]
struct StreamState {
    posted_at: Option<Instant>,
    first_frame_seen: bool,
    next_index: u64,
    frames: u64,
    lost: u64,
    out_of_order: u64,
    /// `Some(true)` completed, `Some(false)` failed or cancelled.
    outcome: Option<bool>,
    ended_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Shared {
    round: u32,
    /// Marks every socket should get this round (fan-out), or `None` (unicast).
    expected: Option<u64>,
    sockets: Vec<SocketState>,
    latency: Recorder,
    first_frame: Recorder,
    received: u64,
    stale: u64,
    closed: u64,
}

type SharedState = Arc<Mutex<Shared>>;

fn lock(shared: &SharedState) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs the worker until `Quit` or the end of stdin.
pub fn run() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let shared: SharedState = Arc::default();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    // Sockets are kept open by their reading tasks, which live until the process exits.
    let mut sockets_opened = 0usize;
    while let Some(line) = lines.next_line().await.context("cannot read a command")? {
        let command: Command = serde_json::from_str(&line).context("bad command")?;
        let reply = match command {
            Command::Quit => break,
            Command::Connect {
                servers,
                endpoint,
                first,
                count,
                per_source_ip,
                concurrency,
                secret,
                timeout_ms,
            } => {
                let spec = ConnectSpec {
                    servers,
                    endpoint,
                    per_source_ip: per_source_ip.max(1),
                    secret,
                    timeout: Duration::from_millis(timeout_ms),
                };
                let report =
                    connect_all(&shared, &spec, first, count, concurrency.max(1), sockets_opened).await;
                sockets_opened += count;
                Reply::Connected(report)
            }
            Command::Round {
                round,
                expected_per_socket,
            } => {
                let mut state = lock(&shared);
                state.round = round;
                state.expected = expected_per_socket;
                state.received = 0;
                state.stale = 0;
                state.latency.clear();
                for socket in &mut state.sockets {
                    socket.last = None;
                    socket.distinct = 0;
                    socket.duplicated = 0;
                    socket.out_of_order = 0;
                }
                drop(state);
                Reply::Ok
            }
            Command::Status => {
                let state = lock(&shared);
                Reply::Status {
                    received: state.received,
                    closed: state.closed,
                }
            }
            Command::EndRound => Reply::Round(end_round(&shared)),
            Command::Stream {
                http,
                prompt,
                frames_per_task,
                concurrency,
                secret,
                timeout_ms,
            } => {
                let spec = StreamSpec {
                    http,
                    prompt,
                    frames_per_task,
                    secret,
                    timeout: Duration::from_millis(timeout_ms),
                };
                match stream_all(&shared, &spec, concurrency.max(1)).await {
                    Ok(report) => Reply::Stream(report),
                    Err(err) => Reply::Error(format!("{err:#}")),
                }
            }
        };
        let mut line = serde_json::to_vec(&reply).context("cannot encode a reply")?;
        line.push(b'\n');
        stdout.write_all(&line).await.context("cannot write a reply")?;
        stdout.flush().await.context("cannot write a reply")?;
    }
    Ok(())
}

fn end_round(shared: &SharedState) -> RoundReport {
    let state = lock(shared);
    let expected = state.expected;
    let mut report = RoundReport {
        sockets: u64::try_from(state.sockets.len()).unwrap_or(u64::MAX),
        received: state.received,
        stale: state.stale,
        closed: state.closed,
        latency_us: state.latency.snapshot(),
        ..RoundReport::default()
    };
    for socket in &state.sockets {
        report.duplicated += socket.duplicated;
        report.out_of_order += socket.out_of_order;
        if let Some(expected) = expected {
            report.lost += expected.saturating_sub(socket.distinct);
        }
    }
    report
}

struct ConnectSpec {
    servers: Vec<String>,
    endpoint: Endpoint,
    per_source_ip: usize,
    secret: String,
    timeout: Duration,
}

/// Source address number `n` (2 → 127.0.0.2) in 127.0.0.0/8.
fn source_ip(n: usize) -> Ipv4Addr {
    let n = u32::try_from(n).unwrap_or(u32::MAX) & 0x00ff_ffff;
    Ipv4Addr::from(0x7f00_0000 | n)
}

async fn connect_all(
    shared: &SharedState,
    spec: &ConnectSpec,
    first: usize,
    count: usize,
    concurrency: usize,
    base_slot: usize,
) -> ConnectReport {
    let started = Instant::now();
    {
        let mut state = lock(shared);
        state
            .sockets
            .extend((first..first + count).map(|user| SocketState {
                user,
                ..SocketState::default()
            }));
    }
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut handles = Vec::with_capacity(count);
    for offset in 0..count {
        let index = first + offset;
        let slot = base_slot + offset;
        let server = spec.servers[index % spec.servers.len().max(1)].clone();
        let source = source_ip(2 + index / spec.per_source_ip);
        let user = format!("u{index}");
        let (path, orgs) = match &spec.endpoint {
            Endpoint::Notifications => ("/ws/notifications/".to_owned(), Vec::new()),
            Endpoint::Events { org } => (format!("/ws/events/{org}/"), vec![org.clone()]),
            Endpoint::FrameStream => (format!("/ws/frame-stream/{user}/"), Vec::new()),
            Endpoint::Multiplexed { org } => ("/ws/".to_owned(), vec![org.clone()]),
        };
        let channels = match &spec.endpoint {
            Endpoint::Multiplexed { org } => vec![
                format!("notifications:{user}"),
                format!("frames:{user}"),
                format!("org:{org}"),
            ],
            _ => Vec::new(),
        };
        let token = match mint(&spec.secret, &user, &orgs) {
            Ok(token) => token,
            Err(err) => {
                return ConnectReport {
                    failed: u64::try_from(count).unwrap_or(u64::MAX),
                    first_error: Some(format!("{err:#}")),
                    ..ConnectReport::default()
                }
            }
        };
        let semaphore = Arc::clone(&semaphore);
        let shared = Arc::clone(shared);
        let timeout = spec.timeout;
        handles.push(tokio::spawn(async move {
            let permit = semaphore.acquire_owned().await;
            let uri = format!("ws://{server}{path}?token={token}");
            let opened = tokio::time::timeout(timeout, async {
                let mut socket = open(&server, &uri, source).await?;
                subscribe(&mut socket, &channels).await?;
                anyhow::Ok(socket)
            })
            .await;
            drop(permit);
            let socket = match opened {
                Ok(Ok(socket)) => socket,
                Ok(Err(err)) => return Err(format!("{user} via {source}: {err:#}")),
                Err(_) => return Err(format!("{user} via {source}: no welcome within {timeout:?}")),
            };
            lock(&shared).sockets[slot].open = true;
            tokio::spawn(read_loop(socket, slot, shared));
            Ok(())
        }));
    }
    let mut report = ConnectReport::default();
    for handle in handles {
        match handle.await {
            Ok(Ok(())) => report.connected += 1,
            Ok(Err(err)) => {
                report.failed += 1;
                report.first_error.get_or_insert(err);
            }
            Err(err) => {
                report.failed += 1;
                report.first_error.get_or_insert(err.to_string());
            }
        }
    }
    report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    report
}

/// Connects from `source`, upgrades, and waits for the server's first message (the
/// welcome), which says the socket is subscribed.
async fn open(server: &str, uri: &str, source: Ipv4Addr) -> anyhow::Result<Socket> {
    let address: SocketAddr = server
        .parse()
        .with_context(|| format!("bad server address {server}"))?;
    let socket = TcpSocket::new_v4().context("socket")?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .with_context(|| format!("cannot bind {source}"))?;
    let stream = socket.connect(address).await.context("connect")?;
    stream.set_nodelay(true).context("nodelay")?;
    let (mut ws, _response) = ClientBuilder::new()
        .uri(uri)
        .context("bad uri")?
        .connect_on(MaybeTlsStream::Plain(stream))
        .await
        .context("upgrade")?;
    match ws.next().await {
        Some(Ok(message)) if message.is_text() => Ok(ws),
        Some(Ok(message)) => match message.as_close() {
            Some((code, reason)) => Err(anyhow!("closed at once: {} {reason}", u16::from(code))),
            None => Err(anyhow!("first message is not text")),
        },
        Some(Err(err)) => Err(anyhow!(err).context("reading the welcome")),
        None => Err(anyhow!("closed before the welcome")),
    }
}

/// Subscribes a `/ws/` socket to `channels` and waits until each is `subscribed`.
async fn subscribe(socket: &mut Socket, channels: &[String]) -> anyhow::Result<()> {
    for (id, channel) in channels.iter().enumerate() {
        let request = serde_json::json!({"type": "subscribe", "channel": channel, "id": id});
        socket
            .send(Message::text(request.to_string()))
            .await
            .context("sending subscribe")?;
    }
    let mut pending = channels.len();
    while pending > 0 {
        let message = match socket.next().await {
            Some(Ok(message)) => message,
            Some(Err(err)) => return Err(anyhow!(err).context("reading subscribed")),
            None => return Err(anyhow!("closed before subscribed")),
        };
        let Some(text) = message.as_text() else {
            continue;
        };
        let answer: serde_json::Value = serde_json::from_str(text).context("answer is not JSON")?;
        match answer["type"].as_str() {
            Some("subscribed") => pending -= 1,
            Some("subscribe_error") => return Err(anyhow!("subscribe refused: {answer}")),
            _ => {}
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct MaybeMark {
    r: Option<u32>,
    s: Option<u64>,
    t: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
    index: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
    data: Option<MaybeMark>,
    notification: Option<MaybeMark>,
    #[serde(borrow)]
    frame: Option<Frame<'a>>,
}

async fn read_loop(mut socket: Socket, slot: usize, shared: SharedState) {
    while let Some(message) = socket.next().await {
        let Ok(message) = message else { break };
        if let Some(text) = message.as_text() {
            on_text(&shared, slot, text);
        } else if message.is_close() {
            break;
        }
    }
    let mut state = lock(&shared);
    state.closed += 1;
    state.sockets[slot].open = false;
}

fn on_text(shared: &SharedState, slot: usize, text: &str) {
    let Ok(incoming) = serde_json::from_str::<Incoming<'_>>(text) else {
        return;
    };
    let received_at = now_us();
    let mut state = lock(shared);
    let state = &mut *state;
    match incoming.kind.as_ref() {
        "org_event" | "notification" => {
            let mark = if incoming.kind == "org_event" {
                incoming.data
            } else {
                incoming.notification
            };
            let Some(MaybeMark {
                r: Some(round),
                s: Some(seq),
                t: Some(due),
            }) = mark
            else {
                return;
            };
            if round != state.round {
                state.stale += 1;
                return;
            }
            let socket = &mut state.sockets[slot];
            match socket.last {
                Some(last) if seq == last => socket.duplicated += 1,
                Some(last) if seq < last => socket.out_of_order += 1,
                _ => {
                    socket.last = Some(seq);
                    socket.distinct += 1;
                    state.received += 1;
                    state.latency.record(received_at.saturating_sub(due));
                }
            }
        }
        "llm_frame" => {
            let Some(frame) = incoming.frame else { return };
            if frame.status.as_deref() != Some("streaming") {
                return;
            }
            let Some(index) = frame.index else { return };
            let stream = &mut state.sockets[slot].stream;
            if !stream.first_frame_seen {
                stream.first_frame_seen = true;
                if let Some(posted_at) = stream.posted_at {
                    let waited = u64::try_from(posted_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                    state.first_frame.record(waited);
                }
            }
            let stream = &mut state.sockets[slot].stream;
            stream.frames += 1;
            match index.cmp(&stream.next_index) {
                std::cmp::Ordering::Equal => stream.next_index += 1,
                std::cmp::Ordering::Greater => {
                    stream.lost += index - stream.next_index;
                    stream.next_index = index + 1;
                }
                std::cmp::Ordering::Less => stream.out_of_order += 1,
            }
        }
        "llm_status" => {
            let outcome = match incoming.status.as_deref() {
                Some("completed") => true,
                Some("failed" | "cancelled") => false,
                _ => return,
            };
            let stream = &mut state.sockets[slot].stream;
            stream.outcome = Some(outcome);
            stream.ended_at = Some(Instant::now());
        }
        _ => {}
    }
}

struct StreamSpec {
    http: String,
    prompt: String,
    frames_per_task: u64,
    secret: String,
    timeout: Duration,
}

/// Starts one chat task per socket of this worker and waits for all of them to end.
async fn stream_all(
    shared: &SharedState,
    spec: &StreamSpec,
    concurrency: usize,
) -> anyhow::Result<StreamReport> {
    let users: Vec<usize> = lock(shared).sockets.iter().map(|socket| socket.user).collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .context("cannot build the HTTP client")?;
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(users.len());
    for (slot, user_index) in users.iter().enumerate() {
        let user = format!("u{user_index}");
        let token = mint(&spec.secret, &user, &[])?;
        let body =
            serde_json::json!({"user_id": user, "chat_id": format!("chat-{user}"), "prompt": spec.prompt});
        let url = format!("{}/api/chat/generate-response/", spec.http);
        let client = client.clone();
        let shared = Arc::clone(shared);
        let semaphore = Arc::clone(&semaphore);
        handles.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            lock(&shared).sockets[slot].stream.posted_at = Some(Instant::now());
            let response = client.post(&url).bearer_auth(&token).json(&body).send().await;
            match response {
                Ok(response) if response.status().as_u16() == 202 => Ok(()),
                Ok(response) => Err(format!("generate answered {}", response.status())),
                Err(err) => Err(format!("generate failed: {err}")),
            }
        }));
    }
    let mut report = StreamReport {
        tasks: u64::try_from(users.len()).unwrap_or(u64::MAX),
        ..StreamReport::default()
    };
    for handle in handles {
        match handle.await {
            Ok(Ok(())) => report.started += 1,
            Ok(Err(err)) => {
                report.first_error.get_or_insert(err);
            }
            Err(err) => {
                report.first_error.get_or_insert(err.to_string());
            }
        }
    }
    let deadline = started + spec.timeout;
    loop {
        let done = {
            let state = lock(shared);
            state
                .sockets
                .iter()
                .all(|socket| socket.stream.outcome.is_some() || !socket.open)
        };
        if done || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = lock(shared);
    let mut last_end = started;
    for socket in &state.sockets {
        let stream = &socket.stream;
        match stream.outcome {
            Some(true) => report.completed += 1,
            Some(false) => report.failed += 1,
            None => {}
        }
        if let Some(ended_at) = stream.ended_at {
            last_end = last_end.max(ended_at);
        }
        report.frames += stream.frames;
        report.out_of_order += stream.out_of_order;
        let distinct = stream.frames.saturating_sub(stream.out_of_order);
        report.lost_frames += stream.lost.max(spec.frames_per_task.saturating_sub(distinct));
    }
    report.first_frame_us = state.first_frame.snapshot();
    report.elapsed_ms = u64::try_from(last_end.duration_since(started).as_millis()).unwrap_or(u64::MAX);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_start_at_127_0_0_2_and_carry_over() {
        assert_eq!(source_ip(2), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_ip(256 + 3), Ipv4Addr::new(127, 0, 1, 3));
    }
}
