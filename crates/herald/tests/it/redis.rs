//! SPEC §5 "Many nodes": several herald nodes on one Redis share offsets, epochs and
//! history, and a publish on any node reaches sockets on every node.
//!
//! Each test starts its own `redis-server` on a free port (killed on drop). Without
//! `redis-server` on PATH and without `HERALD_TEST_REDIS_URL` the tests print
//! `skipped: no redis-server` and pass, unless `HERALD_REQUIRE_REDIS=1`.

use std::sync::Arc;
use std::time::Duration;

use herald::broker::redis::RedisBroker;
use herald::broker::Broker;
use herald::channel::{Channel, Draft};
use herald::hub::Hub;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// A Redis for one test: its own `redis-server`, or `HERALD_TEST_REDIS_URL`.
pub(crate) struct Redis {
    pub(crate) url: String,
    port: u16,
    child: Option<Child>,
}

#[allow(clippy::disallowed_methods)]
pub(crate) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `n` distinct ports that were free a moment ago.
pub(crate) fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().unwrap().port())
        .collect()
}

fn free_port() -> u16 {
    free_ports(1)[0]
}

/// Whether `redis-server` can be run; prints the skip line (or fails, when
/// `HERALD_REQUIRE_REDIS=1`) when it cannot.
pub(crate) fn redis_server_on_path() -> bool {
    let on_path = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if !on_path {
        assert!(
            env("HERALD_REQUIRE_REDIS").as_deref() != Some("1"),
            "HERALD_REQUIRE_REDIS=1 but no redis-server on PATH"
        );
        println!("skipped: no redis-server");
    }
    on_path
}

/// For a test that stops, restarts or otherwise disturbs its Redis (kills clients,
/// deletes keys), which it cannot do to `HERALD_TEST_REDIS_URL`: prints the skip line, or fails when `HERALD_REQUIRE_REDIS=1`
/// (or `also_required` names another `HERALD_REQUIRE_*` set to 1), so a required test
/// never passes without running.
pub(crate) fn skip_shared_redis(also_required: Option<&str>) {
    let required = std::iter::once("HERALD_REQUIRE_REDIS")
        .chain(also_required)
        .find(|name| env(name).as_deref() == Some("1"));
    if let Some(name) = required {
        panic!(
            "{name}=1 but this test disturbs its Redis, and HERALD_TEST_REDIS_URL is not ours to disturb: \
             unset HERALD_TEST_REDIS_URL so the test starts its own redis-server"
        );
    }
    println!("skipped: HERALD_TEST_REDIS_URL is not ours to stop");
}

async fn start_server(port: u16) -> Child {
    start_server_with(port, &[]).await
}

/// A private `redis-server` on `port`, with no persistence, plus `extra` arguments;
/// returns once it accepts connections.
pub(crate) async fn start_server_with(port: u16, extra: &[&str]) -> Child {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start redis-server");
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "redis-server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

impl Redis {
    /// A fresh Redis, or `None` (after printing why) when none can be had.
    pub(crate) async fn start() -> Option<Redis> {
        if let Some(url) = env("HERALD_TEST_REDIS_URL") {
            return Some(Redis {
                url,
                port: 0,
                child: None,
            });
        }
        if !redis_server_on_path() {
            return None;
        }
        let port = free_port();
        let child = start_server(port).await;
        Some(Redis {
            url: format!("redis://127.0.0.1:{port}"),
            port,
            child: Some(child),
        })
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Whether this test owns the server (and so can stop and restart it).
    pub(crate) fn owned(&self) -> bool {
        self.child.is_some()
    }

    /// The process id of the test's own `redis-server`.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The port of the test's own `redis-server` (0 for `HERALD_TEST_REDIS_URL`).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Runs one command on this server with `redis-cli` and returns its output.
    pub(crate) async fn cli(&self, args: &[&str]) -> String {
        let port = self.port.to_string();
        let out = tokio::process::Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub(crate) async fn restart(&mut self) {
        self.child = Some(start_server(self.port).await);
    }

    pub async fn node(&self) -> TestServer {
        TestServer::builder()
            .env("HERALD_REDIS_URL", self.url.clone())
            .spawn()
            .await
    }
}

/// `herald_broker_reconnects_total` of `srv`.
pub(crate) async fn broker_reconnects(srv: &TestServer) -> f64 {
    srv.metric("herald_broker_reconnects_total").await
}

/// A user name no other test (or earlier run on a shared Redis) uses.
pub(crate) fn user(prefix: &str) -> String {
    format!("{prefix}-{}", herald::channel::new_id())
}

/// With Redis gone, both nodes turn not-ready and a publish is refused with 503,
/// never a false 202.
pub(crate) async fn assert_cut_off(a: &TestServer, b: &TestServer, user: &str) {
    wait_ready(a, false).await;
    wait_ready(b, false).await;
    let (status, body) = a
        .post(&format!("/api/v1/notifications/{user}"), json!({"n": 2}))
        .await;
    assert_eq!(status, 503, "{body}");
}

pub(crate) async fn wait_ready(srv: &TestServer, ready: bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = srv
            .http
            .get(srv.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if (status == 200) == ready {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "/readyz stayed {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn lua_sealed_bytes_equal_draft_seal() {
    let Some(redis) = Redis::start().await else { return };
    let shutdown = CancellationToken::new();
    let broker = RedisBroker::connect(
        &redis.url,
        Arc::new(Hub::default()),
        100,
        Duration::from_secs(60),
        &shutdown,
    )
    .await
    .unwrap();
    let channel = Channel::parse(&format!("notifications:{}", user("seal"))).unwrap();
    let bodies = [
        json!({}),
        json!({"a": 1}),
        json!({"text": "é \"quoted\" \\ ✓ \u{0001}", "nested": {"x": [1, 2, {}]}}),
    ];
    for (n, body) in bodies.into_iter().enumerate() {
        let Value::Object(map) = body else { unreachable!() };
        let draft = Draft::from_object(map);
        let published = broker.publish(&channel, &draft).await.unwrap();
        assert_eq!(published.offset, n as u64 + 1);
        let history = broker.history(&channel, n as u64, 10).await.unwrap();
        let stored = &history.messages[0].bytes;
        let parsed: Value = serde_json::from_slice(stored).unwrap();
        let timestamp = parsed["timestamp"].as_str().unwrap();
        let expected = draft.seal(
            channel.name(),
            &published.id,
            published.offset,
            &published.epoch,
            timestamp,
        );
        assert_eq!(stored, &expected, "Lua and Rust seal the same bytes");
    }
    shutdown.cancel();
}

#[tokio::test]
async fn three_nodes_share_delivery_offsets_epochs_and_history() {
    let Some(redis) = Redis::start().await else { return };
    let (a, b, c) = (redis.node().await, redis.node().await, redis.node().await);
    let u = user("fan");
    let path = "/ws/notifications/";
    let (mut on_b, welcome_b) = b.connect(path, &u).await;
    let (mut on_c, welcome_c) = c.connect(path, &u).await;
    assert_eq!(welcome_b["epoch"], welcome_c["epoch"], "one epoch across nodes");
    assert_eq!(
        broker_reconnects(&b).await,
        0.0,
        "a first connection is no reconnect"
    );

    // Publishes alternating between the nodes get one sequence of offsets.
    let nodes = [&a, &b, &c, &a, &b, &c];
    for (n, node) in nodes.iter().enumerate() {
        let published = node.notify(&u, json!({"n": n + 1})).await;
        assert_eq!(published["offset"], n + 1, "{published}");
    }
    for ws in [&mut on_b, &mut on_c] {
        for n in 1..=6 {
            let message = ws.next_json().await;
            assert_eq!(message["offset"], n, "{message}");
            assert_eq!(message["epoch"], welcome_b["epoch"]);
            assert_eq!(message["notification"]["n"], n);
        }
    }

    // History reads the same from every node.
    for node in [&a, &b, &c] {
        let (status, history) = node
            .get(&format!("/api/v1/channels/notifications:{u}/history?since=4"))
            .await;
        assert_eq!(status, 200, "{history}");
        assert_eq!(history["offset"], 6);
        let offsets: Vec<&Value> = history["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| &m["offset"])
            .collect();
        assert_eq!(offsets, [5, 6]);
    }

    // A client resumes through another node than the one it used.
    on_b.close().await;
    for n in 7..=9 {
        a.notify(&u, json!({"n": n})).await;
    }
    let epoch = welcome_b["epoch"].as_str().unwrap();
    let (mut resumed, welcome) = c.connect(&format!("{path}?since=6&epoch={epoch}"), &u).await;
    assert_eq!(welcome["offset"], 9);
    for n in 7..=9 {
        assert_eq!(resumed.next_json().await["offset"], n);
    }
    let recovered = resumed.next_json().await;
    assert_eq!(recovered["status"], "recovered", "{recovered}");
    assert_eq!(recovered["recovered"], true);
    assert_eq!(recovered["missed"], 3);
    b.notify(&u, json!({"n": 10})).await;
    assert_eq!(resumed.next_json().await["offset"], 10);
}

#[tokio::test]
async fn losing_redis_makes_nodes_not_ready_and_they_recover() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    if !redis.owned() {
        skip_shared_redis(None);
        return;
    }
    let (a, b) = (redis.node().await, redis.node().await);
    let u = user("outage");
    let path = "/ws/notifications/";
    let (mut on_b, welcome) = b.connect(path, &u).await;
    a.notify(&u, json!({"n": 1})).await;
    assert_eq!(on_b.next_json().await["offset"], 1);

    redis.kill().await;
    assert_cut_off(&a, &b, &u).await;

    // Back on the same port, empty: the old epoch is gone. The socket that stayed open
    // through the outage is told in band that it cannot recover, with the new epoch.
    redis.restart().await;
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    let told = on_b.next_json().await;
    assert_eq!(told["status"], "recovered", "{told}");
    assert_eq!(told["recovered"], false, "{told}");
    assert_eq!(told["channel"], format!("notifications:{u}"));
    assert_ne!(told["epoch"], welcome["epoch"], "Redis lost its data: new epoch");
    // The reconnect is counted.
    let reconnects = broker_reconnects(&b).await;
    assert!(
        reconnects >= 1.0,
        "herald_broker_reconnects_total is {reconnects}"
    );
    // Delivery across nodes resumes, in the epoch the socket was told.
    a.notify(&u, json!({"after": true})).await;
    let received = on_b.next_json().await;
    assert_eq!(received["notification"]["after"], true, "{received}");
    assert_eq!(received["epoch"], told["epoch"]);
    assert_eq!(received["offset"], told["offset"].as_u64().unwrap() + 1);
    // A client that resumes with the old epoch learns it cannot recover.
    let old_epoch = welcome["epoch"].as_str().unwrap();
    let (mut resumed, new_welcome) = b.connect(&format!("{path}?since=1&epoch={old_epoch}"), &u).await;
    assert_eq!(new_welcome["epoch"], told["epoch"]);
    let recovered = resumed.next_json().await;
    assert_eq!(recovered["recovered"], false, "{recovered}");
}

#[tokio::test]
async fn missed_messages_during_a_node_outage_come_back_through_history() {
    let Some(redis) = Redis::start().await else { return };
    let (a, b) = (redis.node().await, redis.node().await);
    let u = user("since");
    let path = "/ws/notifications/";
    let (ws, welcome) = b.connect(path, &u).await;
    let epoch = welcome["epoch"].as_str().unwrap().to_owned();
    ws.close().await;
    // Node B goes away entirely; messages keep coming through A.
    b.stop().await.unwrap();
    for n in 1..=3 {
        a.notify(&u, json!({"n": n})).await;
    }
    let b = redis.node().await;
    let (mut ws, _) = b.connect(&format!("{path}?since=0&epoch={epoch}"), &u).await;
    for n in 1..=3 {
        assert_eq!(ws.next_json().await["notification"]["n"], n);
    }
    assert_eq!(ws.next_json().await["recovered"], true);
}

#[tokio::test]
async fn connection_limit_holds_across_nodes() {
    let Some(redis) = Redis::start().await else { return };
    check_connection_limit_across_nodes(&redis.url).await;
}

/// Two nodes on the Redis at `url`, a limit of 2 sockets per user: the third socket is
/// refused on either node, and closing one frees a slot for another node.
pub(crate) async fn check_connection_limit_across_nodes(url: &str) {
    let node = || {
        TestServer::builder()
            .env("HERALD_REDIS_URL", url)
            .env("HERALD_MAX_CONNECTIONS_PER_USER", "2")
            .spawn()
    };
    let (a, b) = (node().await, node().await);
    let u = user("limit");
    let (on_a, _) = a.connect("/ws/notifications/", &u).await;
    let (on_b, _) = b.connect(&format!("/ws/frame-stream/{u}/"), &u).await;
    for srv in [&a, &b] {
        expect_refused_with(
            WsClient::connect(srv, "/ws/notifications/").token(&srv.token(&u)),
            4429,
        )
        .await;
    }
    // Another user is not affected.
    let _other = a.connect("/ws/notifications/", &user("other")).await;
    // Closing the socket on B frees a slot for A.
    on_b.close().await;
    connect_when_accepted(&a, "/ws/notifications/", &u, std::time::Duration::from_secs(5)).await;
    drop(on_a);
}

#[tokio::test]
async fn a_dead_node_frees_its_slots_within_the_node_ttl() {
    let Some(redis) = Redis::start().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut cmd = herald(dir.path());
    cmd.arg("serve").stderr(log);
    for (k, v) in [
        ("HERALD_LISTEN", "127.0.0.1:0"),
        ("HERALD_REDIS_URL", redis.url.as_str()),
        ("HERALD_JWT_SECRET", SECRET),
        ("HERALD_API_KEYS", API_KEY),
        ("HERALD_DATABASE_URL", "sqlite::memory:"),
        ("HERALD_MAX_CONNECTIONS_PER_USER", "2"),
    ] {
        cmd.env(k, v);
    }
    let mut doomed = Proc::spawn("herald serve", cmd);
    let addr = loop {
        let line = doomed.next_line("starting").await;
        if let Some(rest) = line.strip_prefix("herald listening on http://") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let u = user("dead");
    let mut held = Vec::new();
    for _ in 0..2 {
        let url = format!("ws://{addr}/ws/notifications/?token={}", token_for(&u));
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        use futures_util::StreamExt;
        let welcome = ws.next().await.unwrap().unwrap();
        assert!(welcome.to_text().unwrap().contains("connected"));
        held.push(ws);
    }
    let a = TestServer::builder()
        .env("HERALD_REDIS_URL", redis.url.clone())
        .env("HERALD_MAX_CONNECTIONS_PER_USER", "2")
        .spawn()
        .await;
    expect_refused_with(
        WsClient::connect(&a, "/ws/notifications/").token(&a.token(&u)),
        4429,
    )
    .await;
    // The node dies without releasing anything.
    doomed.child.start_kill().unwrap();
    // Slots come back once the dead node's heartbeat expires.
    connect_when_accepted(
        &a,
        "/ws/notifications/",
        &u,
        herald::limits::shared::NODE_TTL + std::time::Duration::from_secs(6),
    )
    .await;
    drop(held);
}

/// Makes a CA and a server certificate for `localhost`/127.0.0.1 in `dir` with the
/// `openssl` command; `None` when there is no `openssl`.
fn tls_files(dir: &std::path::Path) -> Option<()> {
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    let made = run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=herald test CA",
    ]) && run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other-ca.key",
        "-out",
        "other-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=another CA",
    ]) && run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]) && run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    made.then_some(())
}

/// `rediss://` is TLS with the server's certificate verified against the system's roots
/// (`SSL_CERT_FILE`/`SSL_CERT_DIR` name others): a node reaches a TLS-only Redis whose
/// CA it trusts, and stays not-ready against one whose CA it does not.
#[tokio::test]
async fn rediss_uses_tls_and_verifies_the_server_certificate() {
    if !redis_server_on_path() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if tls_files(dir.path()).is_none() {
        assert!(
            env("HERALD_REQUIRE_REDIS").as_deref() != Some("1"),
            "HERALD_REQUIRE_REDIS=1 but the openssl command failed or is missing"
        );
        println!("skipped: no openssl to make test certificates");
        return;
    }
    let port = free_port();
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    // The TLS port only: the plain port of `start_server_with` is turned off.
    let _redis = start_server_with(
        port,
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &file("server.pem"),
            "--tls-key-file",
            &file("server.key"),
            "--tls-ca-cert-file",
            &file("ca.pem"),
            "--tls-auth-clients",
            "no",
        ],
    )
    .await;
    let url = format!("rediss://localhost:{port}");
    let node = |ca: &str| {
        let ca = dir.path().join(ca).to_str().unwrap().to_owned();
        let url = url.clone();
        let dir = dir.path().to_owned();
        async move {
            crate::process::start(
                &dir,
                &[
                    ("HERALD_JWT_SECRET", SECRET),
                    ("HERALD_API_KEYS", API_KEY),
                    ("HERALD_DATABASE_URL", "sqlite::memory:"),
                    ("HERALD_REDIS_URL", &url),
                    ("SSL_CERT_FILE", &ca),
                ],
            )
            .await
        }
    };
    let http = reqwest::Client::new();
    let ready = |addr: std::net::SocketAddr| {
        let http = http.clone();
        async move {
            let response = http.get(format!("http://{addr}/readyz")).send().await.unwrap();
            response.status().as_u16()
        }
    };

    let (_trusting, addr) = node("ca.pem").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while ready(addr).await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a node trusting the CA never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ws = crate::process::connect(addr, "/ws/notifications/", &token_for("tls-user")).await;
    assert_eq!(ws.next_json().await["status"], "connected");
    let published = http
        .post(format!("http://{addr}/api/v1/notifications/tls-user"))
        .bearer_auth(API_KEY)
        .json(&json!({"over": "tls"}))
        .send()
        .await
        .unwrap();
    assert_eq!(published.status().as_u16(), 202);
    assert_eq!(ws.next_json().await["notification"]["over"], "tls");

    // A certificate from a CA the node does not trust is refused: never ready.
    let (_doubting, addr) = node("other-ca.pem").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ready(addr).await, 503);
}
