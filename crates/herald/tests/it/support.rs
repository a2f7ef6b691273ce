//! Test harness: a real herald on 127.0.0.1:0, WebSocket and HTTP clients, tokens.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald::config::{self, Config, Secret};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-0123456789";
pub const API_KEY: &str = "test-api-key";

/// How long a test waits for one expected event before failing.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub config: Config,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    pub http: reqwest::Client,
}

/// A change to the loaded configuration, applied before the server starts.
type ConfigChange = Box<dyn FnOnce(&mut Config) + Send>;

#[derive(Default)]
pub struct Builder {
    env: BTreeMap<String, String>,
    outbox_max_bytes: Option<usize>,
    handshakes_per_ip_per_second: Option<u32>,
    configure: Vec<ConfigChange>,
}

impl Builder {
    /// Sets a `HERALD_*` variable for this server.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.insert(key.to_owned(), value.into());
        self
    }

    /// Sets the per-socket outbox bound (a TOML-only setting).
    pub fn outbox_max_bytes(mut self, bytes: usize) -> Self {
        self.outbox_max_bytes = Some(bytes);
        self
    }

    /// Sets the per-IP handshake rate (a TOML-only setting; off in tests by default).
    pub fn handshakes_per_ip_per_second(mut self, rate: u32) -> Self {
        self.handshakes_per_ip_per_second = Some(rate);
        self
    }

    /// Changes the loaded configuration (for TOML-only settings).
    pub fn configure(mut self, f: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.configure.push(Box::new(f));
        self
    }

    pub async fn spawn(self) -> TestServer {
        let mut env = BTreeMap::from([
            ("HERALD_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
            ("HERALD_JWT_SECRET".to_owned(), SECRET.to_owned()),
            ("HERALD_API_KEYS".to_owned(), API_KEY.to_owned()),
            ("HERALD_DATABASE_URL".to_owned(), "sqlite::memory:".to_owned()),
            ("HERALD_SHUTDOWN_DRAIN".to_owned(), "1".to_owned()),
            // Tests open many sockets per user and per address; the limit tests set
            // their own values.
            ("HERALD_MAX_CONNECTIONS_PER_USER".to_owned(), "100000".to_owned()),
            // Tests open up to hundreds of handshakes at once from 127.0.0.1; the
            // pending-connection tests set their own cap.
            ("HERALD_MAX_PENDING_PER_IP".to_owned(), "100000".to_owned()),
        ]);
        for (k, v) in self.env {
            if v.is_empty() {
                env.remove(&k);
            } else {
                env.insert(k, v);
            }
        }
        let mut config = config::load(None, &env).expect("test config is valid");
        if let Some(bytes) = self.outbox_max_bytes {
            config.outbox_max_bytes = bytes;
        }
        config.handshakes_per_ip_per_second = self.handshakes_per_ip_per_second.unwrap_or(0);
        for f in self.configure {
            f(&mut config);
        }
        let (secrets, _) = herald::dev::resolve(&config).expect("secrets");
        let listener = tokio::net::TcpListener::bind(config.listen).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(herald::serve(config.clone(), secrets, listener, shutdown.clone()));
        TestServer {
            addr,
            config,
            shutdown,
            handle: Some(handle),
            http: reqwest::Client::new(),
        }
    }
}

impl TestServer {
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub async fn spawn() -> TestServer {
        Builder::default().spawn().await
    }

    /// Starts shutdown and waits for `serve` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.handle.take() {
            Some(handle) => handle.await?,
            None => Ok(()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// An HS256 token for `user`, valid for an hour.
    pub fn token(&self, user: &str) -> String {
        token_for(user)
    }

    /// Connects with the token in the `herald.bearer` subprotocol and reads the welcome.
    pub async fn connect(&self, path: &str, user: &str) -> (WsClient, Value) {
        let mut ws = WsClient::connect(self, path)
            .token(&self.token(user))
            .open()
            .await
            .expect("connect");
        let welcome = ws.next_json().await;
        assert_eq!(welcome["status"], "connected", "{welcome}");
        (ws, welcome)
    }

    /// POSTs JSON with the service key.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
            .await
            .expect("post");
        read(response).await
    }

    /// The body of `GET path` (no key), as text.
    pub async fn get_text(&self, path: &str) -> String {
        let response = self.http.get(self.url(path)).send().await.expect("get");
        response.text().await.expect("a text body")
    }

    /// The value of one series of `/metrics`, e.g. `herald_broker_reconnects_total`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get_text("/metrics").await;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no `{series}` in /metrics:\n{text}"))
    }

    /// Waits up to [`WAIT`] for a series of `/metrics` to read `value`.
    pub async fn wait_for_metric(&self, series: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.metric(series).await;
            if now == value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} stayed {now}, expected {value}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("get");
        read(response).await
    }

    pub async fn put(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .put(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("put");
        read(response).await
    }

    /// PUTs JSON with the service key.
    pub async fn put_json(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .put(self.url(path))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
            .await
            .expect("put");
        read(response).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .delete(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("delete");
        read(response).await
    }

    pub async fn notify(&self, user: &str, notification: Value) -> Value {
        let (status, body) = self
            .post(&format!("/api/v1/notifications/{user}"), notification)
            .await;
        assert_eq!(status, 202, "{body}");
        body
    }
}

/// Connects to `path` as `user` until the server accepts (a freed connection slot can
/// take a moment to be seen), failing after `within`.
pub async fn connect_when_accepted(srv: &TestServer, path: &str, user: &str, within: Duration) -> WsClient {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut ws = WsClient::connect(srv, path)
            .token(&srv.token(user))
            .open()
            .await
            .expect("upgrade");
        if let Event::Text(welcome) = ws.next_event().await {
            if welcome["status"] == "connected" {
                return ws;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never accepted {user} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for a spawned `TestServer::stop` to return successfully within `within`.
pub async fn stopped_within(stopping: JoinHandle<anyhow::Result<()>>, within: Duration) {
    tokio::time::timeout(within, stopping)
        .await
        .expect("the server did not stop in time")
        .expect("the stop task panicked")
        .expect("serve returned an error");
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn read(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, value)
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn token_for(user: &str) -> String {
    sign(json!({"sub": user, "exp": now() + 3600}))
}

/// Signs any claims with the test HS256 secret.
pub fn sign(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

pub fn secret() -> Secret {
    Secret::new(SECRET)
}

/// How a test connects: which token source, which Origin.
pub struct Connect {
    url: String,
    subprotocol: Option<String>,
    authorization: Option<String>,
    origin: Option<String>,
}

/// The server refused the upgrade with this HTTP status.
#[derive(Debug)]
pub struct Refused(pub u16);

pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The `Sec-WebSocket-Protocol` the server answered with.
    pub protocol: Option<String>,
}

impl WsClient {
    pub fn connect(server: &TestServer, path: &str) -> Connect {
        Connect {
            url: server.ws_url(path),
            subprotocol: None,
            authorization: None,
            origin: None,
        }
    }
}

impl Connect {
    /// Token in the `herald.bearer` subprotocol (the default way).
    pub fn token(mut self, token: &str) -> Self {
        self.subprotocol = Some(format!("herald.bearer, {token}"));
        self
    }

    pub fn bearer(mut self, token: &str) -> Self {
        self.authorization = Some(format!("Bearer {token}"));
        self
    }

    pub fn origin(mut self, origin: &str) -> Self {
        self.origin = Some(origin.to_owned());
        self
    }

    /// Opens the socket and reads the welcome, which must say `connected`.
    pub async fn connected(self) -> (WsClient, Value) {
        let mut ws = self.open().await.expect("the upgrade must succeed");
        let welcome = ws.next_json().await;
        assert_eq!(welcome["status"], "connected", "{welcome}");
        (ws, welcome)
    }

    pub async fn open(self) -> Result<WsClient, Refused> {
        let mut request = self.url.as_str().into_client_request().expect("request");
        let headers = request.headers_mut();
        if let Some(p) = &self.subprotocol {
            headers.insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(p).expect("header"),
            );
        }
        if let Some(a) = &self.authorization {
            headers.insert("Authorization", HeaderValue::from_str(a).expect("header"));
        }
        if let Some(o) = &self.origin {
            headers.insert("Origin", HeaderValue::from_str(o).expect("header"));
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, response)) => Ok(WsClient {
                ws,
                protocol: response
                    .headers()
                    .get("Sec-WebSocket-Protocol")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(Refused(response.status().as_u16()))
            }
            Err(err) => panic!("connect failed: {err}"),
        }
    }
}

/// What a socket read produced.
#[derive(Debug)]
pub enum Event {
    Text(Value),
    Close(u16, String),
    Pong,
    Ended,
}

impl WsClient {
    /// The next event (text, close or pong), failing after [`WAIT`].
    pub async fn next_event(&mut self) -> Event {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a message");
            match next {
                Some(Ok(Message::Text(text))) => {
                    return Event::Text(serde_json::from_str(&text).expect("server sent JSON"));
                }
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(frame) => Event::Close(u16::from(frame.code), frame.reason.to_string()),
                        None => Event::Close(1005, String::new()),
                    };
                }
                Some(Ok(Message::Pong(_))) => return Event::Pong,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Event::Ended,
            }
        }
    }

    pub async fn next_json(&mut self) -> Value {
        match self.next_event().await {
            Event::Text(value) => value,
            other => panic!("expected a JSON message, got {other:?}"),
        }
    }

    /// Reads until the server's close frame; returns its code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.next_event().await {
                Event::Close(code, reason) => return (code, reason),
                Event::Text(_) | Event::Pong => continue,
                Event::Ended => panic!("socket ended without a close frame"),
            }
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::binary(bytes)).await.expect("send");
    }

    pub async fn send_ping(&mut self) {
        self.ws
            .send(Message::Ping(vec![1, 2, 3].into()))
            .await
            .expect("send");
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// Connects and expects the server to close at once with `code`.
pub async fn expect_refused_with(connect: Connect, code: u16) -> String {
    let mut ws = connect.open().await.expect("the upgrade itself must succeed");
    let (got, reason) = ws.expect_close().await;
    assert_eq!(got, code, "close reason: {reason}");
    reason
}

// === real processes ===

/// A child process that is killed when the test ends, even by a panic.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    /// Its stdout, line by line (read by a task, so the child never blocks on a full
    /// pipe and never writes to a closed one).
    pub lines: mpsc::UnboundedReceiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Proc {
    pub fn spawn(name: &'static str, mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {name}: {err}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { name, child, lines }
    }

    /// The next line of stdout; panics after [`WAIT`] or at end of output.
    pub async fn next_line(&mut self, context: &str) -> String {
        match tokio::time::timeout(WAIT, self.lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => panic!("{} ended its output while {context}", self.name),
            Err(_) => panic!("{} printed nothing for {WAIT:?} while {context}", self.name),
        }
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }
}

/// `herald …` in `dir`, with an environment holding nothing but `PATH` and `HOME`: the
/// example must work with no configuration at all.
pub fn herald(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.env_clear().current_dir(dir).stdin(Stdio::null());
    for key in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(key) {
            cmd.env(key, value);
        }
    }
    cmd
}

/// A server on each engine: memory, then Redis when a `redis-server` can be had (the
/// Redis lives as long as the returned value). Contract tests run on both, so the two
/// engines keep one behaviour.
pub async fn engines() -> Vec<(&'static str, TestServer, Option<crate::redis::Redis>)> {
    engines_with(|builder| builder).await
}

/// [`engines`], each server built with `configure`.
pub async fn engines_with(
    configure: impl Fn(Builder) -> Builder,
) -> Vec<(&'static str, TestServer, Option<crate::redis::Redis>)> {
    let mut servers = vec![("memory", configure(TestServer::builder()).spawn().await, None)];
    if let Some(redis) = crate::redis::Redis::start().await {
        let node = configure(TestServer::builder().env("HERALD_REDIS_URL", redis.url()))
            .spawn()
            .await;
        servers.push(("redis", node, Some(redis)));
    }
    servers
}

/// The keys of a JSON object, sorted (empty for anything else): to check a message has
/// exactly the fields the protocol names.
pub fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .map(|object| object.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}
