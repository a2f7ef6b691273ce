//! The suite's WebSocket clients. Each one holds one socket to one channel and behaves
//! like the JavaScript client (`clients/js/herald.js`): it keeps the channel's epoch and
//! last offset, resumes with `?since=&epoch=` on every reconnect (to a random node),
//! hands a message to "the app" only when it is past that position, and on
//! `recovered:false` continues from the position the server gives.
//!
//! Everything it sees is recorded with the time it arrived, for the ledger
//! (`ledger.rs`): the messages handed to the app, every published frame on the wire
//! (for offsets reused), the `recovered:false` notices, each handshake's outcome and
//! each close. Sockets are also killed at random (the client drops its TCP connection
//! with a reset, no close frame) when the scenario asks for it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use rand::Rng as _;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_websockets::{ClientBuilder, MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One client: a user's socket to one endpoint.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub user: String,
    /// The channel it subscribes to (`org:o3`, `frames:u1`).
    pub channel: String,
    /// The endpoint path (`/ws/events/o3/`).
    pub path: String,
    pub token: String,
}

/// A message handed to the app.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub at: Instant,
    /// The publisher's content id and per-channel sequence number (chaos events).
    pub cid: Option<String>,
    pub seq: Option<u64>,
    /// The whole message, for LLM stream messages.
    pub llm: Option<Value>,
}

/// How one handshake ended.
#[derive(Debug, Clone)]
pub struct Handshake {
    pub at: Instant,
    /// The node it went to.
    pub node: String,
    /// Welcome received.
    pub ok: bool,
    /// Why not: the close code before the welcome, or the connection error.
    pub failure: Option<String>,
    /// The node could not be reached at all (connection refused): not a handshake the
    /// server failed.
    pub unreachable: bool,
}

/// Everything one client saw.
#[derive(Debug, Clone)]
pub struct ClientRecord {
    pub spec_user: String,
    pub channel: String,
    pub first_welcome: Option<Instant>,
    pub deliveries: Vec<Delivery>,
    /// Every published frame on the wire: (epoch, offset, id).
    pub wire: Vec<(String, u64, String)>,
    /// `recovered:false` notices.
    pub notices: Vec<Instant>,
    pub handshakes: Vec<Handshake>,
    /// Server closes after the welcome: (time, code).
    pub closes: Vec<(Instant, Option<u16>)>,
    /// A close the client does not reconnect after (4000, 4003, 1003, 1009).
    pub gave_up: Option<(Instant, u16)>,
    /// Messages whose epoch differs from the client's without a notice first.
    pub untold_epoch_switches: u64,
    /// Offsets skipped inside one epoch with no notice (as the app sees them).
    pub offset_gaps: u64,
    /// Frames dropped because their offset was not past the client's position.
    pub dropped_as_seen: u64,
    /// Sockets the client killed.
    pub kills: u64,
    /// Whether a welcomed socket was open when the clients were stopped.
    pub open_at_end: bool,
}

/// Fleet-wide settings.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// `127.0.0.1:port` of each node; each connection picks one at random.
    pub nodes: Vec<String>,
    /// Mean time between socket kills per client (exponential), or none.
    pub kill_mean: Option<Duration>,
}

/// The running clients.
pub struct Fleet {
    stop: watch::Sender<bool>,
    kills: Arc<AtomicBool>,
    welcomed: Arc<AtomicUsize>,
    handles: Vec<JoinHandle<ClientRecord>>,
}

impl Fleet {
    pub fn start(specs: Vec<ClientSpec>, options: &FleetOptions) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let kills = Arc::new(AtomicBool::new(options.kill_mean.is_some()));
        let welcomed = Arc::new(AtomicUsize::new(0));
        let nodes = Arc::new(options.nodes.clone());
        let handles = specs
            .into_iter()
            .map(|spec| {
                let client = Client {
                    record: ClientRecord {
                        spec_user: spec.user.clone(),
                        channel: spec.channel.clone(),
                        first_welcome: None,
                        deliveries: Vec::new(),
                        wire: Vec::new(),
                        notices: Vec::new(),
                        handshakes: Vec::new(),
                        closes: Vec::new(),
                        gave_up: None,
                        untold_epoch_switches: 0,
                        offset_gaps: 0,
                        dropped_as_seen: 0,
                        kills: 0,
                        open_at_end: false,
                    },
                    spec,
                    nodes: Arc::clone(&nodes),
                    kill_mean: options.kill_mean,
                    kills: Arc::clone(&kills),
                    welcomed: Arc::clone(&welcomed),
                    position: None,
                    welcome: None,
                    resuming: false,
                    node: String::new(),
                };
                tokio::spawn(client.run(stop_rx.clone()))
            })
            .collect();
        Self {
            stop,
            kills,
            welcomed,
            handles,
        }
    }

    /// Waits until `count` clients have had their first welcome.
    pub async fn wait_welcomed(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.welcomed.load(Ordering::Relaxed) < count {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "only {} of {count} clients connected within {timeout:?}",
                    self.welcomed.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub fn set_kills(&self, on: bool) {
        self.kills.store(on, Ordering::Relaxed);
    }

    /// Stops every client and returns what each saw.
    pub async fn finish(self) -> Vec<ClientRecord> {
        let _ = self.stop.send(true);
        let mut records = Vec::new();
        for handle in self.handles {
            if let Ok(record) = handle.await {
                records.push(record);
            }
        }
        records
    }
}

struct Client {
    spec: ClientSpec,
    nodes: Arc<Vec<String>>,
    kill_mean: Option<Duration>,
    kills: Arc<AtomicBool>,
    welcomed: Arc<AtomicUsize>,
    record: ClientRecord,
    /// The JS client's (epoch, offset).
    position: Option<(String, u64)>,
    /// The current connection's welcome position.
    welcome: Option<(String, u64)>,
    resuming: bool,
    /// The node of the current connection.
    node: String,
}

/// How a connection ended.
enum End {
    Stop,
    /// The client killed the socket.
    Killed,
    /// Closed by the server with this code (None: no close frame, the connection broke).
    Closed(Option<u16>),
}

impl Client {
    async fn run(mut self, mut stop: watch::Receiver<bool>) -> ClientRecord {
        let mut failures = 0u32;
        loop {
            if *stop.borrow() {
                break;
            }
            let node = {
                let mut rng = rand::rng();
                self.nodes[rng.random_range(0..self.nodes.len())].clone()
            };
            let mut uri = format!("ws://{node}{}?token={}", self.spec.path, self.spec.token);
            if let Some((epoch, offset)) = &self.position {
                uri.push_str(&format!("&since={offset}&epoch={epoch}"));
            }
            self.resuming = self.position.is_some();
            self.welcome = None;
            self.node.clone_from(&node);
            let at = Instant::now();
            let opened = tokio::select! {
                opened = tokio::time::timeout(Duration::from_secs(5), open(&node, &uri)) => opened,
                _ = stop.changed() => break,
            };
            let end = match opened {
                Ok(Ok(mut ws)) => self.session(&mut ws, &mut stop, at).await,
                Ok(Err((unreachable, err))) => {
                    self.record.handshakes.push(Handshake {
                        at,
                        node: node.clone(),
                        ok: false,
                        failure: Some(format!("{err:#}")),
                        unreachable,
                    });
                    End::Closed(None)
                }
                Err(_) => {
                    self.record.handshakes.push(Handshake {
                        at,
                        node: node.clone(),
                        ok: false,
                        failure: Some("no upgrade within 5 s".to_owned()),
                        unreachable: false,
                    });
                    End::Closed(None)
                }
            };
            if self.welcome.is_some() {
                failures = 0;
            } else {
                failures += 1;
            }
            let delay = match end {
                End::Stop => break,
                End::Killed => Duration::from_millis(rand::rng().random_range(0..200)),
                End::Closed(Some(code @ (4000 | 4003 | 1003 | 1009))) => {
                    self.record.gave_up = Some((Instant::now(), code));
                    break;
                }
                // Like the JS client: 1000/1001 after a random delay, the rest with
                // capped exponential backoff and jitter.
                End::Closed(Some(1000 | 1001)) if failures <= 1 => {
                    Duration::from_millis(rand::rng().random_range(0..1500))
                }
                End::Closed(_) => {
                    let cap = 100u64 << failures.min(5);
                    Duration::from_millis(rand::rng().random_range(cap / 2..=cap).min(3000))
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.changed() => break,
            }
        }
        self.record
    }

    async fn session(&mut self, ws: &mut Socket, stop: &mut watch::Receiver<bool>, at: Instant) -> End {
        let kill_at = self.kill_mean.map(|mean| {
            let u: f64 = rand::rng().random_range(f64::EPSILON..1.0);
            Instant::now() + mean.mul_f64(-u.ln())
        });
        let kill =
            tokio::time::sleep_until(kill_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)));
        tokio::pin!(kill);
        let end = loop {
            tokio::select! {
                _ = stop.changed() => break End::Stop,
                () = &mut kill, if self.welcome.is_some() && self.kills.load(Ordering::Relaxed) => {
                    self.record.kills += 1;
                    break End::Killed;
                }
                frame = ws.next() => match frame {
                    None | Some(Err(_)) => break End::Closed(None),
                    Some(Ok(message)) => {
                        if let Some((code, _)) = message.as_close() {
                            break End::Closed(Some(u16::from(code)));
                        }
                        if let Some(text) = message.as_text() {
                            self.on_text(text, at);
                        }
                    }
                },
            }
        };
        if matches!(end, End::Stop) {
            self.record.open_at_end = self.welcome.is_some();
        }
        if self.welcome.is_none() && !matches!(end, End::Stop) {
            let failure = match &end {
                End::Closed(Some(code)) => format!("closed {code} before the welcome"),
                _ => "connection lost before the welcome".to_owned(),
            };
            self.record.handshakes.push(Handshake {
                at,
                node: self.node.clone(),
                ok: false,
                failure: Some(failure),
                unreachable: false,
            });
        } else if let End::Closed(code) = end {
            self.record.closes.push((Instant::now(), code));
        }
        end
    }

    fn on_text(&mut self, text: &str, at: Instant) {
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let now = Instant::now();
        let kind = message.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind == "system" {
            let status = message.get("status").and_then(Value::as_str).unwrap_or_default();
            let epoch = message.get("epoch").and_then(Value::as_str).map(str::to_owned);
            let offset = message.get("offset").and_then(Value::as_u64);
            if status == "connected" {
                let (Some(epoch), Some(offset)) = (epoch, offset) else {
                    return;
                };
                if self.record.first_welcome.is_none() {
                    self.record.first_welcome = Some(now);
                    self.welcomed.fetch_add(1, Ordering::Relaxed);
                }
                self.record.handshakes.push(Handshake {
                    at,
                    node: self.node.clone(),
                    ok: true,
                    failure: None,
                    unreachable: false,
                });
                if !self.resuming {
                    self.position = Some((epoch.clone(), offset));
                }
                self.welcome = Some((epoch, offset));
            } else if status == "recovered" {
                self.resuming = false;
                if message.get("recovered").and_then(Value::as_bool) == Some(true) {
                    if let (Some((current_epoch, current)), Some(epoch)) = (&mut self.position, epoch) {
                        *current_epoch = epoch;
                        if let Some(offset) = offset {
                            *current = (*current).max(offset);
                        }
                    }
                } else {
                    self.record.notices.push(now);
                    // In band (SPEC §8) the notice carries the new position; after a
                    // resume it is the welcome's.
                    self.position = match (epoch, offset) {
                        (Some(epoch), Some(offset)) => Some((epoch, offset)),
                        _ => self.welcome.clone(),
                    };
                }
            }
            return;
        }
        let (Some(epoch), Some(offset), Some(id)) = (
            message.get("epoch").and_then(Value::as_str),
            message.get("offset").and_then(Value::as_u64),
            message.get("id").and_then(Value::as_str),
        ) else {
            return;
        };
        self.record.wire.push((epoch.to_owned(), offset, id.to_owned()));
        if let Some((current_epoch, current)) = &self.position {
            if current_epoch == epoch {
                if offset <= *current {
                    self.record.dropped_as_seen += 1;
                    return;
                }
                self.record.offset_gaps += offset - *current - 1;
            } else {
                self.record.untold_epoch_switches += 1;
            }
        }
        self.position = Some((epoch.to_owned(), offset));
        let data = message.get("data");
        let cid = data
            .and_then(|d| d.get("cid"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let seq = data.and_then(|d| d.get("seq")).and_then(Value::as_u64);
        let llm = kind.starts_with("llm_").then(|| message.clone());
        self.record.deliveries.push(Delivery {
            at: now,
            cid,
            seq,
            llm,
        });
    }
}

/// Connects (the socket resets on drop: a kill sends no close frame) and upgrades. The
/// error says whether the node was unreachable (nothing listening).
pub async fn open(node: &str, uri: &str) -> Result<Socket, (bool, anyhow::Error)> {
    let stream = TcpStream::connect(node)
        .await
        .map_err(|err| (true, anyhow::Error::new(err).context("connect")))?;
    let upgrade = async {
        stream.set_nodelay(true).context("nodelay")?;
        stream.set_zero_linger().context("linger")?;
        let (ws, _response) = ClientBuilder::new()
            .uri(uri)
            .context("bad uri")?
            .connect_on(MaybeTlsStream::Plain(stream))
            .await
            .context("upgrade")?;
        anyhow::Ok(ws)
    };
    upgrade.await.map_err(|err| (false, err))
}
