//! Issue 5 with the real `herald serve` process: SIGTERM drains 200 sockets with 1001
//! and exits 0 within `HERALD_SHUTDOWN_DRAIN`; nothing secret ever reaches the logs.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::support::*;

const BANNER: &str = "herald listening on http://";

/// Starts `herald serve` in `dir` with `env`, stderr to `dir/stderr.log`; returns the
/// process and its address.
pub async fn start(dir: &Path, env: &[(&str, &str)]) -> (Proc, SocketAddr) {
    start_with_args(dir, &[], env).await
}

/// [`start`] with more arguments to `herald serve` (`--config FILE`).
pub async fn start_with_args(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Proc, SocketAddr) {
    let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
    let mut cmd = herald(dir);
    cmd.arg("serve")
        .args(args)
        .env("HERALD_LISTEN", "127.0.0.1:0")
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut proc = Proc::spawn("herald serve", cmd);
    loop {
        let line = proc.next_line("starting").await;
        if let Some(rest) = line.strip_prefix(BANNER) {
            let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
            return (proc, addr);
        }
    }
}

fn sigterm(proc: &Proc) {
    let pid = proc.child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

pub async fn connect(addr: SocketAddr, path: &str, token: &str) -> WsClient {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("herald.bearer, {token}").parse().unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    WsClient {
        ws,
        protocol: Some("herald.bearer".to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_200_sockets_with_1001_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, addr) = start(
        dir.path(),
        &[
            ("HERALD_JWT_SECRET", SECRET),
            ("HERALD_API_KEYS", API_KEY),
            ("HERALD_DATABASE_URL", "sqlite::memory:"),
            ("HERALD_SHUTDOWN_DRAIN", "2"),
            ("HERALD_MAX_CONNECTIONS_PER_USER", "1000"),
        ],
    )
    .await;
    let mut sockets = Vec::new();
    for i in 0..200 {
        let mut ws = connect(addr, "/ws/notifications/", &token_for(&format!("u{}", i % 20))).await;
        assert_eq!(ws.next_json().await["status"], "connected");
        sockets.push(ws);
    }
    let started = Instant::now();
    sigterm(&proc);
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { (ws.expect_close().await.0, Instant::now()) }))
        .collect();
    let mut last_close = started;
    for reader in readers {
        let (code, at) = reader.await.unwrap();
        assert_eq!(code, 1001);
        last_close = last_close.max(at);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), proc.child.wait())
        .await
        .unwrap()
        .unwrap();
    let exited = started.elapsed();
    assert!(status.success(), "herald exited with {status}");
    assert!(
        last_close - started <= Duration::from_millis(2500),
        "closes spread past the drain window"
    );
    assert!(
        last_close - started >= Duration::from_millis(500),
        "closes were not spread over the window"
    );
    assert!(exited < Duration::from_secs(5), "exit took {exited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let jwt_secret = "jwt-secret-Zq8v2LmN4pRt";
    let api_key = "api-key-Hk3sW9xYb7Q";
    let llm_key = "sk-llm-key-Pw5tGz1Vc";
    let (mut proc, addr) = start(
        dir.path(),
        &[
            ("HERALD_JWT_SECRET", jwt_secret),
            ("HERALD_API_KEYS", api_key),
            ("HERALD_LLM_API_KEY", llm_key),
            ("HERALD_DATABASE_URL", "sqlite::memory:"),
            ("HERALD_SHUTDOWN_DRAIN", "1"),
            ("HERALD_LOG", "trace"),
            ("HERALD_LOG_FORMAT", "json"),
            ("HERALD_ALLOWED_ORIGINS", "https://app.example.com"),
        ],
    )
    .await;
    let sign_with = |claims: serde_json::Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(jwt_secret.as_bytes()),
        )
        .unwrap()
    };
    let good = sign_with(json!({"sub": "alice", "exp": now() + 600}));
    let expired = sign_with(json!({"sub": "alice", "exp": now() - 600}));
    let refresh = sign_with(json!({"sub": "alice", "exp": now() + 900}));
    let other_user = sign_with(json!({"sub": "mallory", "exp": now() + 900}));
    let wrong_key_presented = "wrong-api-key-Jd8fK2";
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{addr}{path}");

    // A scripted session touching every path that handles a secret.
    let mut ws = connect(addr, "/ws/notifications/", &good).await;
    ws.next_json().await;
    ws.send_json(json!({"type": "refresh", "token": refresh})).await;
    assert_eq!(ws.next_json().await["status"], "refreshed");
    let mut by_query = WsClientQuery::open(addr, &format!("/ws/frame-stream/alice/?token={good}")).await;
    assert_eq!(by_query.next_json().await["status"], "connected");
    let mut bad = connect(addr, "/ws/notifications/", &expired).await;
    assert_eq!(bad.expect_close().await.0, 4001);
    let mut other = connect(addr, "/ws/notifications/", &good).await;
    other.next_json().await;
    other
        .send_json(json!({"type": "refresh", "token": other_user}))
        .await;
    assert_eq!(other.expect_close().await.0, 4001);
    let response = http
        .post(url("/api/v1/notifications/alice"))
        .bearer_auth(api_key)
        .json(&json!({"x": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let response = http
        .post(url("/api/v1/notifications/alice"))
        .bearer_auth(wrong_key_presented)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    ws.next_json().await;
    drop((ws, by_query, bad, other));

    sigterm(&proc);
    let status = tokio::time::timeout(Duration::from_secs(10), proc.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let mut stdout = String::new();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_millis(200), proc.lines.recv()).await {
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let stderr = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(stderr.lines().count() > 5, "expected trace logs, got:\n{stderr}");
    for line in stderr.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON line: {line}"
        );
    }
    assert!(
        stderr.contains("authentication failed"),
        "security events are logged"
    );
    for (what, secret) in [
        ("JWT secret", jwt_secret),
        ("API key", api_key),
        ("LLM key", llm_key),
        ("presented API key", wrong_key_presented),
        ("token", good.as_str()),
        ("expired token", expired.as_str()),
        ("refresh token", refresh.as_str()),
        ("other user's token", other_user.as_str()),
    ] {
        // A JWT's signature alone is secret enough to check.
        let needle = secret.rsplit('.').next().unwrap_or(secret);
        assert!(!stderr.contains(needle), "the {what} appears in the logs");
        assert!(!stdout.contains(needle), "the {what} appears on stdout");
    }
}

/// A socket opened with the token in the query string (no subprotocol).
struct WsClientQuery;

impl WsClientQuery {
    async fn open(addr: SocketAddr, path: &str) -> WsClient {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
            .await
            .unwrap();
        WsClient { ws, protocol: None }
    }
}

#[tokio::test]
async fn half_configured_auth_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    for (env, expected) in [
        (("HERALD_JWT_SECRET", "s3cret-xyz"), "HERALD_API_KEYS is not set"),
        (("HERALD_API_KEYS", "key-xyz"), "no JWT key source is set"),
    ] {
        let output = herald(dir.path())
            .arg("serve")
            .env("HERALD_LISTEN", "127.0.0.1:0")
            .env(env.0, env.1)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(
            !dir.path().join("herald-dev-secrets.json").exists(),
            "no dev secret may be generated"
        );
        assert!(!String::from_utf8_lossy(&output.stdout).contains("API key"));
    }
}
