//! The accept loop (SPEC "Limits against hostile clients"): hyper's HTTP/1 server with
//! a timer, serving the router on each accepted connection.
//!
//! What it adds to a plain `axum::serve`:
//! - a connection that has not finished its first request or upgrade is *pending*;
//!   more than `HERALD_MAX_PENDING_PER_IP` pending from one peer address are closed at
//!   accept (`herald_rate_limited_total{limit="pending_per_ip"}`);
//! - every open connection (an upgraded WebSocket included, until its socket closes)
//!   is counted in [`Load`]; beyond `HERALD_MAX_CONNECTIONS` the WebSocket handshake
//!   answers 503 (`ws`), while every other route keeps answering;
//! - [`Watched`] closes a connection that waits longer than `http_idle_timeout_ms` for
//!   the first byte of a request, or takes longer than `request_head_timeout_ms` from
//!   that byte to the end of the head. hyper's own `header_read_timeout` is not used:
//!   it starts when hyper begins waiting for a head, idle time included, so it cannot
//!   tell the two apart, and it costs every request a boxed `Sleep` (issue 19).
//!   Without that timer hyper polls the socket while a request is in flight and not
//!   again once its response is sent, until bytes arrive; so while a request is in
//!   flight `Watched` keeps its timer armed no later than one idle timeout ahead, and
//!   when it fires after the response, times the wait from the response's end;
//! - each request carries one [`Peer`] extension: its peer address, its client IP
//!   (from `X-Forwarded-For` when the peer is a trusted proxy) and the [`Load`]. One
//!   extension rather than three: each is a boxed entry in the request's extension
//!   map, made for every request (issue 19).
//!
//! Graceful shutdown is hyper-util's: when `shutdown` resolves the listener closes and
//! every connection finishes its request in flight, then closes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::config::{Cidr, Config};
use crate::metrics::Metrics;

/// The connection limits of one node, from [`Config`].
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub request_head_timeout: Duration,
    pub http_idle_timeout: Duration,
    pub max_pending_per_ip: usize,
    pub max_connections: usize,
    pub trusted_proxies: Arc<[Cidr]>,
}

impl ServerLimits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            request_head_timeout: config.request_head_timeout,
            http_idle_timeout: config.http_idle_timeout,
            max_pending_per_ip: config.max_pending_per_ip,
            max_connections: config.max_connections.unwrap_or_else(default_max_connections),
            trusted_proxies: config.trusted_proxies.clone().into(),
        }
    }
}

/// The default of `HERALD_MAX_CONNECTIONS`: the file-descriptor limit minus a reserve
/// of 5 % or 64, whichever is larger, for the listener, the database, Redis and logs.
pub fn default_max_connections() -> usize {
    let limit = fd_limit();
    limit.saturating_sub((limit / 20).max(64)).max(1)
}

/// This process's soft limit on open files.
fn fd_limit() -> usize {
    #[cfg(unix)]
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .map_or(1 << 20, |current| usize::try_from(current).unwrap_or(usize::MAX));
    #[cfg(not(unix))]
    let limit = 1024;
    limit
}

/// Where a request came from, as the accept loop saw it (a request extension).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The TCP peer's address.
    pub addr: SocketAddr,
    /// The client's address, for per-IP limits and logs: the peer, or the address a
    /// trusted proxy forwarded (`HERALD_TRUSTED_PROXIES`).
    pub client_ip: IpAddr,
    /// This node's connection counts.
    pub load: Arc<Load>,
}

impl Peer {
    /// The client IP of the request whose extensions these are; unspecified for a request
    /// that did not come through the accept loop.
    pub fn client_ip_of(extensions: &axum::http::Extensions) -> IpAddr {
        extensions
            .get::<Peer>()
            .map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |peer| peer.client_ip)
    }
}

/// The client IP of a request from `peer` with `headers`: for a peer inside
/// `trusted`, the rightmost `X-Forwarded-For` address not inside it (every
/// `X-Forwarded-For` header, in order, as one list); otherwise, or when there is
/// none, the peer. An unparsable entry ends the walk there: it is where the chain
/// stops being trustworthy, so the address before it (to its right) is used.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let peer = canonical(peer);
    if !trusted.iter().any(|cidr| cidr.contains(peer)) {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("").split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = parse_forwarded(entry) else {
            break;
        };
        client = ip;
        if !trusted.iter().any(|cidr| cidr.contains(ip)) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, maybe with a port (`1.2.3.4:5`,
/// `[::1]:5`).
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    entry.parse::<SocketAddr>().ok().map(|addr| canonical(addr.ip()))
}

/// An IPv4-mapped IPv6 address as IPv4, so one client counts once.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The node's open and pending connections; one per server, shared by every request
/// (as an extension) so the WebSocket handshake can check the ceiling.
#[derive(Debug)]
pub struct Load {
    open: AtomicUsize,
    max_connections: usize,
    pending: Mutex<HashMap<IpAddr, usize>>,
    max_pending_per_ip: usize,
}

impl Load {
    pub fn new(max_connections: usize, max_pending_per_ip: usize) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max_connections,
            pending: Mutex::new(HashMap::new()),
            max_pending_per_ip,
        }
    }

    /// Connections open now, upgraded WebSockets included.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether the node holds more connections than `HERALD_MAX_CONNECTIONS` (the one
    /// asking included): a WebSocket upgrade is then refused.
    pub fn over_ceiling(&self) -> bool {
        self.open() > self.max_connections
    }

    fn opened(self: &Arc<Self>) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }

    /// A pending slot for `ip`, or `None` when it already has its maximum.
    fn try_pending(self: &Arc<Self>, ip: IpAddr) -> Option<PendingGuard> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let count = pending.entry(ip).or_insert(0);
        if *count >= self.max_pending_per_ip {
            return None;
        }
        *count += 1;
        Some(PendingGuard(self.clone(), ip))
    }
}

struct OpenGuard(Arc<Load>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

struct PendingGuard(Arc<Load>, IpAddr);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut pending = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = pending.get_mut(&self.1) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                pending.remove(&self.1);
            }
        }
    }
}

/// What a connection's service tells its socket: requests in flight (their response
/// bodies not yet sent), whether it was upgraded, and its pending slot until its first
/// request head is in.
struct ConnState {
    busy: AtomicUsize,
    /// Requests started on this connection, so the socket notices each one even if it
    /// was not read from while the request was in flight.
    started: AtomicU64,
    /// When the last request in flight was answered.
    idle_since: Mutex<Instant>,
    upgraded: AtomicBool,
    pending: Mutex<Option<PendingGuard>>,
}

/// A request in flight; dropped with its response body.
struct Busy(Arc<ConnState>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut idle_since = self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.busy.fetch_sub(1, Ordering::Relaxed) == 1 {
            *idle_since = Instant::now();
        }
    }
}

/// A TCP connection that times out while waiting for a request: `idle` until a
/// request's first byte, then `head` until the request's head is in (the service is
/// called). Not while a request is in flight, and never once upgraded (the WebSocket
/// session has its own ping/pong deadline).
///
/// While a request is in flight the timer still runs, at most one idle timeout ahead:
/// hyper reads the socket then (to see it close) and not again after the response,
/// so the timer is what brings it back to time the wait for the next request.
pub struct Watched {
    inner: TcpStream,
    /// `None` once the connection was upgraded.
    state: Option<Arc<ConnState>>,
    _open: OpenGuard,
    head_timeout: Duration,
    idle_timeout: Duration,
    idle_since: Instant,
    head_started: Option<Instant>,
    /// The requests started that this socket has accounted for.
    seen: u64,
    /// The timer of the wait for a request; dropped once the connection is upgraded,
    /// so an idle WebSocket does not hold it (issue 19).
    sleep: Option<Pin<Box<Sleep>>>,
}

/// What a connection's socket is doing, for [`Watched`].
enum Phase {
    /// Upgraded to a WebSocket: nothing to time.
    Upgraded,
    /// A request in flight.
    Busy,
    /// Waiting for a request, or reading its head.
    Waiting,
}

impl Watched {
    /// What the connection is doing now; notes the end of a request.
    fn phase(&mut self) -> Phase {
        let Some(state) = &self.state else {
            return Phase::Upgraded;
        };
        if state.upgraded.load(Ordering::Relaxed) {
            // A WebSocket now: nothing more to time, so the timer and the connection's
            // shared state go (an idle socket should hold neither).
            self.sleep = None;
            self.state = None;
            return Phase::Upgraded;
        }
        // One snapshot, under the lock that every change of these is made under.
        let (idle_since, busy, started) = {
            let idle_since = state.idle_since.lock().unwrap_or_else(|e| e.into_inner());
            (
                *idle_since,
                state.busy.load(Ordering::Relaxed),
                state.started.load(Ordering::Relaxed),
            )
        };
        if busy > 0 {
            self.head_started = None;
            return Phase::Busy;
        }
        if started != self.seen {
            // Requests came and went since the last read: wait for the next one from
            // the end of the last.
            self.seen = started;
            self.head_started = None;
            self.idle_since = idle_since;
        }
        Phase::Waiting
    }

    /// Polls the timer, set to `deadline`; whether it has passed.
    fn expired(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx).is_ready()
    }
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        match this.phase() {
            Phase::Upgraded => return result,
            Phase::Busy => {
                if result.is_pending() {
                    // Come back no later than one idle timeout from now: if the request
                    // has ended by then, the wait after it is timed from its end.
                    // (Not later: a head timeout longer than the idle timeout may be
                    // what the timer holds from reading this request's head.)
                    let latest = Instant::now() + this.idle_timeout;
                    let deadline = match &this.sleep {
                        Some(sleep) if !sleep.is_elapsed() && sleep.deadline() <= latest => sleep.deadline(),
                        _ => latest,
                    };
                    if this.expired(deadline, cx) {
                        cx.waker().wake_by_ref();
                    }
                }
                return result;
            }
            Phase::Waiting => {}
        }
        if result.is_ready() {
            if buf.filled().len() > before && this.head_started.is_none() {
                this.head_started = Some(Instant::now());
            }
            return result;
        }
        let deadline = match this.head_started {
            Some(started) => started + this.head_timeout,
            None => this.idle_since + this.idle_timeout,
        };
        if this.expired(deadline, cx) {
            let what = if this.head_started.is_some() {
                "the request head did not arrive within request_head_timeout_ms"
            } else {
                "no request within http_idle_timeout_ms"
            };
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
        }
        Poll::Pending
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that keeps its request counted as in flight until it is sent.
pub struct TrackedBody {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The router as one connection's hyper service.
#[derive(Clone)]
struct ConnService {
    router: crate::http::App,
    conn: Arc<ConnState>,
    peer: SocketAddr,
    load: Arc<Load>,
    trusted_proxies: Arc<[Cidr]>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        // The head is in: the connection is no longer pending.
        drop(self.conn.pending.lock().unwrap_or_else(|e| e.into_inner()).take());
        {
            let _idle = self.conn.idle_since.lock().unwrap_or_else(|e| e.into_inner());
            self.conn.busy.fetch_add(1, Ordering::Relaxed);
            self.conn.started.fetch_add(1, Ordering::Relaxed);
        }
        let busy = Busy(self.conn.clone());
        let client = client_ip(self.peer.ip(), request.headers(), &self.trusted_proxies);
        request.extensions_mut().insert(Peer {
            addr: self.peer,
            client_ip: client,
            load: self.load.clone(),
        });
        let router = self.router.clone();
        let conn = self.conn.clone();
        Box::pin(async move {
            let response = match router.oneshot(request.map(Body::new)).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                conn.upgraded.store(true, Ordering::Relaxed);
            }
            Ok(response.map(|body| TrackedBody { body, _busy: busy }))
        })
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets the connections
/// finish their requests in flight and returns.
pub async fn run(
    listener: TcpListener,
    router: crate::http::App,
    limits: ServerLimits,
    load: Arc<Load>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) {
    // hyper-util's GracefulShutdown does not take upgradeable connections: the same
    // signal, by hand.
    let closing = tokio_util::sync::CancellationToken::new();
    let connections = tokio_util::task::TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // `Watched` times the wait for a request and its head; hyper's own timer would
    // cost every request a boxed `Sleep`, and with no timer hyper sets none.
    builder.header_read_timeout(None);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, or a connection reset before accept:
                    // wait a little rather than spin.
                    tracing::debug!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(pending) = load.try_pending(canonical(peer.ip())) else {
            metrics.rate_limited("pending_per_ip");
            crate::limits::refusal_log(
                "pending_per_ip",
                canonical(peer.ip()),
                "connection closed at accept: too many unfinished requests from this address (HERALD_MAX_PENDING_PER_IP)",
            );
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let now = Instant::now();
        let conn = Arc::new(ConnState {
            busy: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            idle_since: Mutex::new(now),
            upgraded: AtomicBool::new(false),
            pending: Mutex::new(Some(pending)),
        });
        let io = Watched {
            inner: stream,
            state: Some(conn.clone()),
            _open: load.opened(),
            head_timeout: limits.request_head_timeout,
            idle_timeout: limits.http_idle_timeout,
            idle_since: now,
            head_started: None,
            seen: 0,
            sleep: Some(Box::pin(tokio::time::sleep_until(now + limits.http_idle_timeout))),
        };
        let service = ConnService {
            router: router.clone(),
            conn,
            peer,
            load: load.clone(),
            trusted_proxies: limits.trusted_proxies.clone(),
        };
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let closing = closing.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = crate::sync::cancelled(&closing) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = ended {
                tracing::debug!(error = %err, "HTTP connection ended");
            }
        });
    }
    drop(listener);
    closing.cancel();
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests;
