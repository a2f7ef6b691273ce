//! The clients in `clients/` against a real herald: the demo page's routes and dev-only
//! endpoints, and, as subprocesses, the JavaScript client's Node tests, `tsc` on its
//! declarations, the Python client's pytest suite (with the README's Celery task), and
//! the demo page in headless Chromium (with the README's browser snippet).
//!
//! The subprocess tests need tools outside Cargo: `node` with `clients/js/node_modules`
//! (`npm ci`), a Python with the packages of `clients/python` (`HERALD_PYTHON`, else
//! `~/.cache/herald-clients-venv/bin/python`), Debian's `chromium` and `redis-server`.
//! `.ci/run` installs them. A missing tool fails the test with the command that
//! installs it: a skipped test that reports `ok` would hide that nothing ran. To skip
//! these tests on purpose, set `HERALD_SKIP_CLIENTS=1` (then a missing tool prints
//! `SKIPPED: …` and the test passes; `HERALD_REQUIRE_CLIENTS=1` overrides it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::Command;

use crate::support::{read, Event, TestServer, WsClient, API_KEY, SECRET};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn env_is_1(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

/// `Some(tool)` when it is there; otherwise fails, unless `HERALD_SKIP_CLIENTS=1` asks
/// to skip (and `HERALD_REQUIRE_CLIENTS=1` does not forbid it).
fn tool(what: &str, found: Option<PathBuf>, install: &str) -> Option<PathBuf> {
    if found.is_some() {
        return found;
    }
    assert!(
        env_is_1("HERALD_SKIP_CLIENTS") && !env_is_1("HERALD_REQUIRE_CLIENTS"),
        "{what} is missing, so this client test cannot run; install it with: {install} \
         (or set HERALD_SKIP_CLIENTS=1 to skip the client tests)"
    );
    eprintln!("SKIPPED (HERALD_SKIP_CLIENTS=1): {what} is missing (install it with: {install}); this client test did not run");
    None
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn node() -> Option<PathBuf> {
    tool(
        "node (Node.js 20 or later)",
        on_path("node"),
        "apt-get install nodejs npm",
    )
}

/// `node`, once `npm ci` has installed the test dependencies.
fn node_with_modules() -> Option<PathBuf> {
    let node = node()?;
    let modules = repo_root().join("clients/js/node_modules");
    let ready = ["ws", "playwright-core", "typescript"]
        .iter()
        .all(|name| modules.join(name).join("package.json").is_file());
    tool(
        "clients/js/node_modules",
        ready.then_some(modules),
        "npm ci --prefix clients/js",
    )?;
    Some(node)
}

fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("HERALD_PYTHON").map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/herald-clients-venv/bin/python"))
    });
    tool(
        "a Python environment for clients/python",
        candidate.filter(|path| path.is_file()),
        "python3 -m venv ~/.cache/herald-clients-venv && ~/.cache/herald-clients-venv/bin/pip install './clients/python[test]'",
    )
}

/// Runs `cmd` to the end within `limit`, failing with everything it printed unless it
/// succeeds; returns its stdout.
async fn run(name: &str, mut cmd: Command, limit: Duration) -> String {
    cmd.current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = tokio::time::Instant::now();
    let output = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within {limit:?}"))
        .unwrap_or_else(|err| panic!("cannot run {name}: {err}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{name} failed ({}).\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    eprintln!("{name} passed in {:.1?}", started.elapsed());
    stdout
}

#[tokio::test]
async fn the_client_and_page_are_served() {
    let srv = TestServer::spawn().await;
    let response = srv.http.get(srv.url("/client/herald.js")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    let served = response.text().await.unwrap();
    let on_disk = std::fs::read_to_string(repo_root().join("clients/js/herald.js")).unwrap();
    assert_eq!(served, on_disk, "/client/herald.js must be clients/js/herald.js");
    let types = srv.http.get(srv.url("/client/herald.d.ts")).send().await.unwrap();
    assert_eq!(types.status(), 200);

    let page = srv.http.get(srv.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(
        html.contains(r#"from "/client/herald.js""#),
        "the page uses the served client"
    );
    assert!(
        html.contains(r#"{"dev":false,"provider":{"model":null,"name":"echo"}}"#),
        "the page is told it is not in dev mode and that echo is live"
    );
}

#[tokio::test]
async fn the_page_names_the_configured_llm() {
    let srv = TestServer::builder()
        .env("HERALD_LLM_BASE_URL", "http://127.0.0.1:9/v1")
        .env("HERALD_LLM_MODEL", "llama3.2")
        .spawn()
        .await;
    let html = srv.get_text("/").await;
    assert!(
        html.contains(r#""provider":{"model":"llama3.2","name":"openai-compatible"}"#),
        "{html}"
    );
}

#[tokio::test]
async fn dev_endpoints_do_not_exist_with_configured_secrets() {
    let srv = TestServer::spawn().await;
    let token = srv.token("alice");
    for path in ["/dev/token", "/dev/notify", "/dev/orgs/acme/events"] {
        let response = srv
            .http
            .post(srv.url(path))
            .bearer_auth(&token)
            .json(&json!({"user_id": "alice"}))
            .send()
            .await
            .unwrap();
        let (status, body) = read(response).await;
        assert_eq!(status, 404, "{path} must not exist outside dev mode: {body}");
        assert_eq!(body["error"], "not_found");
    }
}

/// A herald in dev mode: no JWT secret and no API key configured, the generated pair
/// saved next to a SQLite file in a temporary directory.
async fn dev_server(dir: &Path) -> TestServer {
    TestServer::builder()
        .env("HERALD_JWT_SECRET", "")
        .env("HERALD_API_KEYS", "")
        .env(
            "HERALD_DATABASE_URL",
            format!("sqlite://{}", dir.join("herald.db").display()),
        )
        .spawn()
        .await
}

async fn dev_post(srv: &TestServer, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = srv.http.post(srv.url(path)).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    read(request.send().await.unwrap()).await
}

async fn next_published(ws: &mut WsClient) -> Value {
    loop {
        match ws.next_event().await {
            Event::Text(message) if message.get("offset").is_some() && message["type"] != "system" => {
                return message
            }
            Event::Text(_) => continue,
            other => panic!("expected a published message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn dev_mode_mints_tokens_and_sends_test_messages() {
    let dir = tempfile::tempdir().unwrap();
    let srv = dev_server(dir.path()).await;
    assert!(
        dir.path().join("herald-dev-secrets.json").is_file(),
        "the dev server generated its secrets"
    );
    let html = srv.get_text("/").await;
    assert!(
        html.contains(r#"{"dev":true,"#),
        "the page is told it is in dev mode"
    );

    let (status, minted) = dev_post(
        &srv,
        "/dev/token",
        None,
        json!({"user_id": "alice", "org_id": "acme"}),
    )
    .await;
    assert_eq!(status, 200, "{minted}");
    assert_eq!(minted["user_id"], "alice");
    assert_eq!(minted["org_id"], "acme");
    assert!(minted["expires_at"].as_str().unwrap().ends_with('Z'));
    let token = minted["token"].as_str().unwrap().to_owned();

    // The minted token opens the user's sockets, and the org's: the user was made a member.
    let (mut notifications, _) = WsClient::connect(&srv, "/ws/notifications/")
        .token(&token)
        .connected()
        .await;
    let (mut events, welcome) = WsClient::connect(&srv, "/ws/events/acme/")
        .token(&token)
        .connected()
        .await;
    assert_eq!(welcome["org_id"], "acme");

    let (status, receipt) = dev_post(
        &srv,
        "/dev/notify",
        Some(&token),
        json!({"notification": {"title": "Hello", "body": "from the page"}}),
    )
    .await;
    assert_eq!(status, 202, "{receipt}");
    let message = next_published(&mut notifications).await;
    assert_eq!(
        message["notification"],
        json!({"title": "Hello", "body": "from the page"})
    );
    assert_eq!(message["id"], receipt["id"]);

    let (status, _) = dev_post(&srv, "/dev/notify", Some(&token), json!({})).await;
    assert_eq!(status, 202);
    let message = next_published(&mut notifications).await;
    assert_eq!(message["notification"]["title"], "Test notification");

    let (status, receipt) = dev_post(
        &srv,
        "/dev/orgs/acme/events",
        Some(&token),
        json!({"data": {"n": 1}}),
    )
    .await;
    assert_eq!(status, 202, "{receipt}");
    let event = next_published(&mut events).await;
    assert_eq!(event["type"], "org_event");
    assert_eq!(event["event_type"], "demo.ping");
    assert_eq!(event["data"], json!({"n": 1}));

    // The endpoints check what they are given.
    let (status, body) = dev_post(&srv, "/dev/orgs/other/events", Some(&token), json!({})).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains("not a member"));
    let (status, _) = dev_post(&srv, "/dev/notify", None, json!({})).await;
    assert_eq!(status, 401, "a test notification needs the user's token");
    let (status, body) = dev_post(&srv, "/dev/token", None, json!({"user_id": "bad user"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = dev_post(&srv, "/dev/token", None, json!({})).await;
    assert_eq!(status, 400);

    // Several orgs at once (the demo page's two): the token names both, and the user is
    // made a member of each.
    let (status, minted) = dev_post(
        &srv,
        "/dev/token",
        None,
        json!({"user_id": "bob", "org_id": "acme", "org_ids": ["globex", "acme"]}),
    )
    .await;
    assert_eq!(status, 200, "{minted}");
    assert_eq!(minted["org_id"], "acme");
    assert_eq!(minted["org_ids"], json!(["acme", "globex"]));
    let bob = minted["token"].as_str().unwrap().to_owned();
    for org in ["acme", "globex"] {
        let (_, welcome) = WsClient::connect(&srv, &format!("/ws/events/{org}/"))
            .token(&bob)
            .connected()
            .await;
        assert_eq!(welcome["org_id"], org);
    }
    for bad in [
        json!({"user_id": "bob", "org_ids": "acme"}),
        json!({"user_id": "bob", "org_ids": [""]}),
        json!({"user_id": "bob", "org_ids": ["bad org"]}),
    ] {
        let (status, body) = dev_post(&srv, "/dev/token", None, bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }

    // The dev token is an ordinary token of this herald: the user API takes it too.
    let response = srv
        .http
        .get(srv.url("/api/chat/chat-1/messages"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// `herald.d.ts` accepts the documented uses (`test/types-check.ts`), and `herald.js`
/// itself type-checks against it (checkJs), every export assignable to its declaration
/// (`test/impl-check.ts`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_declarations_compile() {
    let Some(node) = node_with_modules() else { return };
    for config in ["clients/js/tsconfig.json", "clients/js/tsconfig.checkjs.json"] {
        let mut cmd = Command::new(&node);
        cmd.args(["clients/js/node_modules/typescript/bin/tsc", "-p", config]);
        run(&format!("tsc -p {config}"), cmd, Duration::from_secs(120)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_client_against_real_herald() {
    let Some(node) = node_with_modules() else { return };
    // Two sockets per user, so the 4429 test can fill a user's slots.
    let srv = TestServer::builder()
        .env("HERALD_MAX_CONNECTIONS_PER_USER", "2")
        .spawn()
        .await;
    // Every socket is closed by the server after about a second.
    let aging = TestServer::builder()
        .env("HERALD_MAX_CONNECTION_AGE", "1")
        .spawn()
        .await;
    let mut cmd = Command::new(node);
    cmd.args([
        "--test",
        "--test-reporter=spec",
        "clients/js/test/socket.test.mjs",
        "clients/js/test/connecting.test.mjs",
        "clients/js/test/client.test.mjs",
        "clients/js/test/client-protocol.test.mjs",
    ])
    .env("HERALD_URL", srv.url(""))
    .env("HERALD_AGE_URL", aging.url(""))
    .env("HERALD_JWT_SECRET", SECRET)
    .env("HERALD_API_KEY", API_KEY);
    run(
        "node --test clients/js/test/{socket,connecting,client,client-protocol}.test.mjs",
        cmd,
        Duration::from_secs(180),
    )
    .await;
}

/// The Vercel AI SDK's `Chat` and `DefaultChatTransport` (the `ai` package pinned in
/// `clients/js/package-lock.json`), unchanged, stream and resume answers from herald.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ai_sdk_against_real_herald() {
    let Some(node) = node_with_modules() else { return };
    let srv = TestServer::spawn().await;
    let mut cmd = Command::new(node);
    cmd.args([
        "--test",
        "--test-reporter=spec",
        "clients/js/test/ai-sdk.test.mjs",
    ])
    .env("HERALD_URL", srv.url(""))
    .env("HERALD_JWT_SECRET", SECRET)
    .env("HERALD_API_KEY", API_KEY);
    run(
        "node --test clients/js/test/ai-sdk.test.mjs",
        cmd,
        Duration::from_secs(120),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_against_real_herald() {
    let Some(python) = python() else { return };
    let srv = TestServer::spawn().await;
    // Every socket is closed by the server after about a second (listener resume).
    let aging = TestServer::builder()
        .env("HERALD_MAX_CONNECTION_AGE", "1")
        .spawn()
        .await;
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pytest",
        "clients/python/tests",
        "-q",
        "-p",
        "no:cacheprovider",
    ])
    .env("HERALD_URL", srv.url(""))
    .env("HERALD_AGE_URL", aging.url(""))
    .env("HERALD_API_KEY", API_KEY)
    .env("HERALD_JWT_SECRET", SECRET)
    .env("PYTHONPATH", repo_root().join("clients/python/src"))
    .env("PYTHONDONTWRITEBYTECODE", "1");
    let out = run("pytest clients/python/tests", cmd, Duration::from_secs(180)).await;
    assert!(out.contains(" passed"), "pytest ran no test:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_in_chromium() {
    let Some(node) = node_with_modules() else { return };
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/bin/chromium")))
        .filter(|path| path.is_file());
    let Some(chromium) = tool("Chromium", chromium, "apt-get install chromium") else {
        return;
    };
    let Some(_) = tool(
        "redis-server",
        on_path("redis-server"),
        "apt-get install redis-server",
    ) else {
        return;
    };
    let herald = PathBuf::from(env!("CARGO_BIN_EXE_herald"));
    // Next to the binary: target/debug/artifacts (or under CARGO_TARGET_DIR).
    let artifacts = herald
        .parent()
        .map_or_else(|| repo_root().join("target"), Path::to_path_buf)
        .join("artifacts");
    let mut cmd = Command::new(node);
    cmd.arg("clients/js/test/browser.mjs")
        .env("HERALD_BIN", &herald)
        .env("ARTIFACT_DIR", &artifacts)
        .env("CHROMIUM", &chromium);
    let out = run("the demo page in Chromium", cmd, Duration::from_secs(240)).await;
    eprintln!("{out}");
    assert!(out.contains("browser test passed"), "{out}");
    let shot = artifacts.join("demo-page.png");
    assert!(shot.is_file(), "no screenshot at {}", shot.display());
    eprintln!("screenshot of the demo page: {}", shot.display());
}

/// `herald listen --channel … --channel …` follows several channels over one socket to
/// `/ws/`: the welcome, one `subscribed` per channel, then each channel's messages.
#[tokio::test]
async fn herald_listen_follows_several_channels_over_one_socket() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let srv = TestServer::spawn().await;
    let (status, _) = srv.put("/api/v1/orgs/acme-listen/members/lena").await;
    assert_eq!(status, 204);
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "listen",
            &srv.url("").replacen("http", "ws", 1),
            "--channel",
            "notifications:lena",
            "--channel",
            "org:acme-listen",
            "--count",
            "5",
        ])
        .env("HERALD_TOKEN", srv.token("lena"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("herald listen starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen: Vec<Value> = Vec::new();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("herald listen printed a line in time")
            .expect("stdout readable")
            .expect("herald listen printed a line before exiting");
        serde_json::from_str(&line).expect("each line is JSON")
    };
    for _ in 0..3 {
        seen.push(next().await);
    }
    assert_eq!(seen[0]["status"], "connected", "{seen:?}");
    let mut subscribed: Vec<&str> = seen[1..]
        .iter()
        .map(|m| {
            assert_eq!(m["type"], "subscribed", "{m}");
            m["channel"].as_str().unwrap()
        })
        .collect();
    subscribed.sort_unstable();
    assert_eq!(subscribed, ["notifications:lena", "org:acme-listen"]);
    let (status, _) = srv
        .post("/api/v1/notifications/lena", json!({"title": "one socket"}))
        .await;
    assert_eq!(status, 202);
    let (status, _) = srv
        .post(
            "/api/v1/orgs/acme-listen/events",
            json!({"event_type": "listen.works", "data": {}}),
        )
        .await;
    assert_eq!(status, 202);
    let mut published = [next().await, next().await];
    published.sort_by_key(|m| m["channel"].as_str().unwrap_or("").to_owned());
    assert_eq!(published[0]["channel"], "notifications:lena");
    assert_eq!(published[0]["notification"]["title"], "one socket");
    assert_eq!(published[1]["channel"], "org:acme-listen");
    assert_eq!(published[1]["event_type"], "listen.works");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("herald listen exits after --count messages")
        .unwrap();
    assert!(status.success(), "herald listen exited with {status}");
}
