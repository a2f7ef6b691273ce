//! SPEC §6 "Moving from Django Channels": the original Django Channels app's `channel_layer.group_send` calls,
//! made by real Django + channels + channels_redis, reach herald sockets with offsets,
//! on both channels_redis layers.
//!
//! The Python side is `tests/django/`: the original Django Channels app's helpers (`seed_app/broadcast.py`), a
//! Celery-style task module, and `send.py`, which configures Django for one layer and
//! runs a list of steps. The packages in `tests/django/requirements.txt` are installed
//! once into `~/.cache/herald-django-venv-<hash>` (hash of that file and the Python
//! version) and reused. Each test starts its own `redis-server` (tests/it/redis.rs).
//! Without python3 and its `venv` module the tests fail, saying what to install, unless
//! `HERALD_SKIP_DJANGO=1` asks to skip them (then they print `SKIPPED` and pass;
//! `HERALD_REQUIRE_DJANGO=1`, set in CI, overrides it).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::StreamExt;
use herald::config::django::BridgeOptions;
use herald::config::Secret;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::process::Command;

use crate::redis::Redis;
use crate::support::*;

/// How long a Python run may take (the first import of Django is the slow part).
const PYTHON_TIMEOUT: Duration = Duration::from_secs(90);

#[allow(clippy::disallowed_methods)]
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn django_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/django")
}

/// The virtualenv's python, made once per process (and cached across runs), or `None`
/// when this machine has no python3 with `venv`.
static VENV: OnceLock<Option<PathBuf>> = OnceLock::new();

fn skip(reason: &str) -> Option<PathBuf> {
    assert!(
        env("HERALD_SKIP_DJANGO").as_deref() == Some("1")
            && env("HERALD_REQUIRE_DJANGO").as_deref() != Some("1"),
        "the Django bridge tests cannot run: {reason}; install python3 and python3-venv \
         (or set HERALD_SKIP_DJANGO=1 to skip them)"
    );
    eprintln!(
        "\n*** SKIPPED (HERALD_SKIP_DJANGO=1): the Django bridge tests need python3 with its venv module: {reason}. ***\n"
    );
    None
}

fn make_venv() -> Option<PathBuf> {
    let version = match std::process::Command::new("python3").arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(_) | Err(_) => return skip("no python3 on PATH"),
    };
    let has_venv = std::process::Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_venv {
        return skip("python3 has no venv/ensurepip module");
    }
    let requirements = django_dir().join("requirements.txt");
    let pinned = std::fs::read(&requirements).expect("tests/django/requirements.txt");
    let mut hasher = Sha256::new();
    hasher.update(&pinned);
    hasher.update(version.as_bytes());
    let hash: String = hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    let venv = home.join(".cache").join(format!("herald-django-venv-{hash}"));
    let python = venv.join("bin/python");
    if venv.join(".complete").exists() && python.exists() {
        return Some(python);
    }
    // Built beside its final place and renamed when complete, so an interrupted install
    // is never reused and a concurrent run never sees half a venv.
    let building = home.join(".cache").join(format!(
        "herald-django-venv-{hash}.building-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&building);
    std::fs::create_dir_all(home.join(".cache")).expect("create ~/.cache");
    let made = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&building)
        .output()
        .expect("run python3 -m venv");
    assert!(
        made.status.success(),
        "python3 -m venv failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    eprintln!("installing {} into {}", requirements.display(), venv.display());
    let installed = std::process::Command::new(building.join("bin/python"))
        .args(["-m", "pip", "install", "--disable-pip-version-check", "-q", "-r"])
        .arg(&requirements)
        .output()
        .expect("run pip");
    assert!(
        installed.status.success(),
        "pip install -r {} failed (PyPI must be reachable the first time):\n{}\n{}",
        requirements.display(),
        String::from_utf8_lossy(&installed.stdout),
        String::from_utf8_lossy(&installed.stderr)
    );
    std::fs::write(building.join(".complete"), b"").expect("mark the venv complete");
    if std::fs::rename(&building, &venv).is_err() {
        // Another run finished first: use its venv.
        let _ = std::fs::remove_dir_all(&building);
    }
    assert!(
        venv.join(".complete").exists(),
        "no complete venv at {}",
        venv.display()
    );
    Some(python)
}

async fn python() -> Option<PathBuf> {
    tokio::task::spawn_blocking(|| VENV.get_or_init(make_venv).clone())
        .await
        .expect("venv setup panicked")
}

/// Redis and the venv, or `None` (after saying why) when either is missing.
async fn setup() -> Option<(Redis, PathBuf)> {
    let python = python().await?;
    let redis = Redis::start().await?;
    Some((redis, python))
}

/// One run of `tests/django/send.py` with Django configured for `layer`.
struct Django<'a> {
    python: &'a Path,
    redis_url: &'a str,
    keys: Option<&'a str>,
}

impl Django<'_> {
    async fn run(&self, layer: &str, steps: Value) {
        let mut cmd = Command::new(self.python);
        cmd.arg(django_dir().join("send.py"))
            .arg(steps.to_string())
            .env("HERALD_TEST_REDIS_URL", self.redis_url)
            .env("HERALD_TEST_LAYER", layer)
            .env_remove("HERALD_TEST_KEYS")
            .kill_on_drop(true);
        if let Some(keys) = self.keys {
            cmd.env("HERALD_TEST_KEYS", keys);
        }
        let out = tokio::time::timeout(PYTHON_TIMEOUT, cmd.output())
            .await
            .expect("send.py took too long")
            .expect("run send.py");
        assert!(
            out.status.success(),
            "send.py ({layer}) failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

async fn bridge_node(redis: &Redis, options: BridgeOptions) -> TestServer {
    TestServer::builder()
        .env("HERALD_DJANGO_BRIDGE", redis.url.clone())
        .configure(move |config| config.django = options)
        .spawn()
        .await
}

/// The value of one metric line, e.g. `herald_django_bridge_groups`.
async fn metric(srv: &TestServer, series: &str) -> f64 {
    srv.metric(series).await
}

fn bridged(layer: &str, outcome: &str) -> String {
    format!("herald_django_bridge_messages_total{{layer=\"{layer}\",outcome=\"{outcome}\"}}")
}

/// Nothing more arrives on `ws` for a moment: no duplicates.
async fn assert_quiet(ws: &mut WsClient, what: &str) {
    if let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_millis(700), ws.ws.next()).await {
        panic!("{what}: unexpected extra message {message:?}");
    }
}

async fn join_org(srv: &TestServer, org: &str, user: &str) {
    let (status, body) = srv.put(&format!("/api/v1/orgs/{org}/members/{user}")).await;
    assert_eq!(status, 204, "{body}");
}

fn assert_sequenced(message: &Value, offset: u64) {
    assert_eq!(message["offset"], offset, "{message}");
    assert!(
        message["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "{message}"
    );
    assert!(message["id"].as_str().is_some_and(|e| !e.is_empty()), "{message}");
    assert!(
        message["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{message}"
    );
}

/// The original Django Channels app's helpers, a Celery-style task and a frame streamer on one layer: every
/// message arrives on the right socket, shaped as the HTTP API would shape it, with
/// offsets 1, 2, … and nothing twice; a reconnect with `since=0` recovers them.
async fn django_helpers_reach_sockets(layer: &str) {
    let Some((redis, python)) = setup().await else {
        return;
    };
    let srv = bridge_node(&redis, BridgeOptions::default()).await;
    join_org(&srv, "acme", "alice").await;
    let (mut notes, _) = srv.connect("/ws/notifications/", "alice").await;
    let (mut events, _) = srv.connect("/ws/events/acme/", "alice").await;
    let (mut frames, _) = srv.connect("/ws/frame-stream/alice/", "alice").await;
    let django = Django {
        python: &python,
        redis_url: &redis.url,
        keys: None,
    };
    django
        .run(
            layer,
            json!([
                {"call": "broadcast_notification", "args": ["alice", {"title": "Hello", "body": "from Django"}]},
                {"call": "broadcast_org_event", "args": ["acme", "resource.created", {"resource_id": "r1"}]},
                {"call": "celery", "task": "export_report", "args": ["alice"]},
                {"call": "celery", "task": "generate_response", "args": ["alice", "chat-1", "Hi"]},
            ]),
        )
        .await;

    let first = notes.next_json().await;
    assert_eq!(first["type"], "notification", "{first}");
    assert_eq!(
        first["notification"],
        json!({"title": "Hello", "body": "from Django"})
    );
    assert_sequenced(&first, 1);
    let second = notes.next_json().await;
    assert_eq!(
        second["notification"],
        json!({"title": "Task Complete", "body": "Your export is ready"})
    );
    assert_sequenced(&second, 2);
    assert_quiet(&mut notes, "notifications").await;

    let event = events.next_json().await;
    assert_eq!(event["type"], "org_event", "{event}");
    assert_eq!(event["org_id"], "acme");
    assert_eq!(event["event_type"], "resource.created");
    assert_eq!(event["data"], json!({"resource_id": "r1"}));
    assert_sequenced(&event, 1);
    assert_quiet(&mut events, "org events").await;

    let expected = [
        json!({"type": "llm_status", "status": "started"}),
        json!({"type": "llm_frame", "frame": {"status": "thinking", "message": "LLM is generating response...", "progress": "indeterminate"}}),
        json!({"type": "llm_frame", "frame": {"status": "streaming", "delta": "Hello", "index": 0}}),
        json!({"type": "llm_frame", "frame": {"status": "streaming", "delta": " there", "index": 1}}),
        json!({"type": "llm_status", "status": "completed", "message": "Hello there"}),
    ];
    for (idx, want) in expected.iter().enumerate() {
        let got = frames.next_json().await;
        for (key, value) in want.as_object().unwrap() {
            assert_eq!(&got[key], value, "frame {idx}: {got}");
        }
        assert_eq!(got["user_id"], "alice", "{got}");
        assert_eq!(got["chat_id"], "chat-1", "{got}");
        assert_sequenced(&got, idx as u64 + 1);
    }
    assert_quiet(&mut frames, "frames").await;

    // Bridged messages are in history like any publish: a client that reconnects
    // with since=0 gets them again, then `recovered`.
    notes.close().await;
    let (mut again, welcome) = srv.connect("/ws/notifications/?since=0", "alice").await;
    assert_eq!(welcome["offset"], 2, "{welcome}");
    assert_eq!(again.next_json().await["offset"], 1);
    assert_eq!(again.next_json().await["offset"], 2);
    let recovered = again.next_json().await;
    assert_eq!(recovered["recovered"], true, "{recovered}");

    assert_eq!(metric(&srv, &bridged(layer, "published")).await, 8.0);
    assert_eq!(metric(&srv, &bridged(layer, "unmappable")).await, 0.0);
}

#[tokio::test]
async fn core_layer_group_send_reaches_sockets() {
    django_helpers_reach_sockets("core").await;
}

#[tokio::test]
async fn pubsub_layer_group_send_reaches_sockets() {
    django_helpers_reach_sockets("pubsub").await;
}

#[tokio::test]
async fn core_layer_joins_groups_while_sockets_are_open_and_leaves_after() {
    let Some((redis, python)) = setup().await else {
        return;
    };
    let options = BridgeOptions {
        leave_after: Some(Duration::from_millis(300)),
        ..BridgeOptions::default()
    };
    let srv = bridge_node(&redis, options).await;
    assert_eq!(metric(&srv, "herald_django_bridge_groups").await, 0.0);
    let (ws, _) = srv.connect("/ws/notifications/", "carol").await;
    // user_carol and notifications_carol.
    assert_eq!(metric(&srv, "herald_django_bridge_groups").await, 2.0);
    let django = Django {
        python: &python,
        redis_url: &redis.url,
        keys: None,
    };
    django
        .run(
            "core",
            json!([{"call": "wait_member", "args": ["notifications_carol"]}]),
        )
        .await;
    ws.close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&srv, "herald_django_bridge_groups").await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never left carol's groups"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Out of the group: a group_send now is not herald's to deliver, and nothing is
    // published while nobody listens.
    django
        .run(
            "core",
            json!([{"call": "broadcast_notification", "args": ["carol", {"title": "late"}]}]),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(metric(&srv, &bridged("core", "published")).await, 0.0);
}

/// The migration guide's promise: a `group_send` made while the user was away is in
/// history when they come back. By default herald stays in the user's groups for
/// `HERALD_HISTORY_TTL` after the last socket closed (here 6 s, standing in for the
/// default 10 minutes, and much longer than the `leave_after_ms` of the test above), so
/// the message is published and recovered; then herald leaves, no sooner.
#[tokio::test]
async fn core_layer_keeps_what_is_sent_while_the_user_is_away_for_the_history_ttl() {
    let Some((redis, python)) = setup().await else {
        return;
    };
    const TTL: Duration = Duration::from_secs(6);
    let srv = TestServer::builder()
        .env("HERALD_DJANGO_BRIDGE", redis.url.clone())
        .env("HERALD_HISTORY_TTL", TTL.as_secs().to_string())
        .spawn()
        .await;
    assert_eq!(
        srv.config.django.leave_after, None,
        "no leave_after_ms: the history TTL"
    );
    let (ws, welcome) = srv.connect("/ws/notifications/", "dave").await;
    let django = Django {
        python: &python,
        redis_url: &redis.url,
        keys: None,
    };
    django
        .run(
            "core",
            json!([{"call": "wait_member", "args": ["notifications_dave"]}]),
        )
        .await;
    ws.close().await;
    let away = tokio::time::Instant::now();
    // Away for over a second (a Python start), past any short leave_after.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    django
        .run(
            "core",
            json!([{"call": "broadcast_notification", "args": ["dave", {"title": "while away"}]}]),
        )
        .await;
    srv.wait_for_metric(&bridged("core", "published"), 1.0).await;
    let was_away = away.elapsed();
    let (mut again, recovered_welcome) = srv
        .connect(
            &format!(
                "/ws/notifications/?since={}&epoch={}",
                welcome["offset"],
                welcome["epoch"].as_str().unwrap()
            ),
            "dave",
        )
        .await;
    assert_eq!(recovered_welcome["offset"], 1, "{recovered_welcome}");
    let missed = again.next_json().await;
    assert_eq!(missed["notification"], json!({"title": "while away"}), "{missed}");
    let recovered = again.next_json().await;
    assert_eq!(
        (recovered["recovered"].as_bool(), recovered["missed"].as_u64()),
        (Some(true), Some(1)),
        "after {was_away:?} away: {recovered}"
    );

    // herald leaves the groups once the user has been away for the TTL, not before.
    again.close().await;
    let left = tokio::time::Instant::now();
    let deadline = left + TTL + WAIT;
    while metric(&srv, "herald_django_bridge_groups").await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never left dave's groups"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stayed = left.elapsed();
    assert!(
        stayed >= TTL - Duration::from_millis(100),
        "left dave's groups {stayed:?} after his last socket closed, before HERALD_HISTORY_TTL ({TTL:?})"
    );
}

#[tokio::test]
async fn unmappable_messages_are_counted_and_the_bridge_goes_on() {
    let Some((redis, python)) = setup().await else {
        return;
    };
    let srv = bridge_node(&redis, BridgeOptions::default()).await;
    let (mut ws, _) = srv.connect("/ws/notifications/", "dave").await;
    let django = Django {
        python: &python,
        redis_url: &redis.url,
        keys: None,
    };
    for (layer, offset) in [("core", 1), ("pubsub", 2)] {
        django
            .run(
                layer,
                json!([
                    // No `notification` dict: nothing herald could send.
                    {"call": "group_send", "args": ["user_dave", {"type": "send_notification", "title": "flat"}]},
                    {"call": "broadcast_notification", "args": ["dave", {"title": layer}]},
                ]),
            )
            .await;
        let got = ws.next_json().await;
        assert_eq!(got["notification"], json!({"title": layer}), "{got}");
        assert_sequenced(&got, offset);
        assert_eq!(metric(&srv, &bridged(layer, "unmappable")).await, 1.0, "{layer}");
        assert_eq!(metric(&srv, &bridged(layer, "published")).await, 1.0, "{layer}");
    }
    assert_quiet(&mut ws, "after unmappable messages").await;
}

#[tokio::test]
async fn encrypted_layers_are_read_with_the_same_keys() {
    let Some((redis, python)) = setup().await else {
        return;
    };
    let options = BridgeOptions {
        // MultiFernet: any of the keys, as during a key rotation.
        symmetric_encryption_keys: vec![Secret::new("old-key"), Secret::new("new-key")],
        ..BridgeOptions::default()
    };
    let srv = bridge_node(&redis, options).await;
    let (mut ws, _) = srv.connect("/ws/notifications/", "erin").await;
    for (layer, offset) in [("core", 1), ("pubsub", 2)] {
        Django {
            python: &python,
            redis_url: &redis.url,
            keys: Some("new-key"),
        }
        .run(
            layer,
            json!([{"call": "broadcast_notification", "args": ["erin", {"secret": layer}]}]),
        )
        .await;
        let got = ws.next_json().await;
        assert_eq!(got["notification"], json!({"secret": layer}), "{got}");
        assert_sequenced(&got, offset);
        // A key herald does not have: counted as undecodable, never delivered.
        Django {
            python: &python,
            redis_url: &redis.url,
            keys: Some("someone-elses-key"),
        }
        .run(
            layer,
            json!([{"call": "broadcast_notification", "args": ["erin", {"secret": "no"}]}]),
        )
        .await;
        srv.wait_for_metric(&bridged(layer, "undecodable"), 1.0).await;
    }
    assert_quiet(&mut ws, "after a message with an unknown key").await;
}

#[tokio::test]
async fn an_encrypted_layer_without_keys_is_counted_not_delivered() {
    let Some((redis, python)) = setup().await else {
        return;
    };
    let srv = bridge_node(&redis, BridgeOptions::default()).await;
    let (mut ws, _) = srv.connect("/ws/notifications/", "fay").await;
    Django {
        python: &python,
        redis_url: &redis.url,
        keys: Some("k"),
    }
    .run(
        "core",
        json!([{"call": "broadcast_notification", "args": ["fay", {"x": 1}]}]),
    )
    .await;
    srv.wait_for_metric(&bridged("core", "undecodable"), 1.0).await;
    assert_quiet(&mut ws, "an encrypted message herald cannot read").await;
}

/// Two nodes sharing a broker: each group_send is published once (offsets 1, 2, 3 on
/// both nodes' sockets, nothing twice), one node reads at a time, and when it stops the
/// other takes over.
#[tokio::test]
async fn two_nodes_publish_each_group_send_once() {
    let Some((redis, python)) = setup().await else {
        return;
    };
    let node = || {
        TestServer::builder()
            .env("HERALD_REDIS_URL", redis.url.clone())
            .env("HERALD_DJANGO_BRIDGE", redis.url.clone())
            .spawn()
    };
    let a = node().await;
    let (mut on_a, _) = a.connect("/ws/notifications/", "gus").await;
    let b = node().await;
    let (mut on_b, _) = b.connect("/ws/notifications/", "gus").await;
    assert_eq!(metric(&a, "herald_django_bridge_reading").await, 1.0);
    assert_eq!(metric(&b, "herald_django_bridge_reading").await, 0.0);
    let django = Django {
        python: &python,
        redis_url: &redis.url,
        keys: None,
    };
    django
        .run(
            "core",
            json!([
                {"call": "broadcast_notification", "args": ["gus", {"n": 1}]},
                {"call": "broadcast_notification", "args": ["gus", {"n": 2}]},
            ]),
        )
        .await;
    django
        .run(
            "pubsub",
            json!([{"call": "broadcast_notification", "args": ["gus", {"n": 3}]}]),
        )
        .await;
    for ws in [&mut on_a, &mut on_b] {
        for n in 1..=3u64 {
            let got = ws.next_json().await;
            assert_eq!(got["notification"]["n"], n, "{got}");
            assert_sequenced(&got, n);
        }
        assert_quiet(ws, "two nodes").await;
    }

    // The reader stops (releasing its lease); the other node takes over and nothing
    // sent meanwhile to the core layer's queue is lost.
    on_a.close().await;
    a.stop().await.unwrap();
    django
        .run(
            "core",
            json!([{"call": "broadcast_notification", "args": ["gus", {"n": 4}]}]),
        )
        .await;
    let got = on_b.next_json().await;
    assert_eq!(got["notification"]["n"], 4, "{got}");
    assert_sequenced(&got, 4);
    assert_eq!(metric(&b, "herald_django_bridge_reading").await, 1.0);
}

/// Once herald is back in `user`'s group (core) and subscribed (pub/sub), a
/// `group_send` on each layer reaches `ws` with the offsets from `offset` on.
async fn both_layers_deliver_once_redis_is_back(
    django: &Django<'_>,
    ws: &mut WsClient,
    user: &str,
    offset: u64,
) {
    for (idx, (layer, wait)) in [
        (
            "core",
            json!({"call": "wait_member", "args": [format!("user_{user}")]}),
        ),
        ("pubsub", json!({"call": "wait_psubscribed"})),
    ]
    .into_iter()
    .enumerate()
    {
        let n = offset + idx as u64;
        django
            .run(
                layer,
                json!([wait, {"call": "broadcast_notification", "args": [user, {"n": n}]}]),
            )
            .await;
        let got = ws.next_json().await;
        assert_eq!(got["notification"]["n"], n, "{layer}: {got}");
        assert_sequenced(&got, n);
    }
}

/// The bridge's Redis restarts empty: herald reconnects, joins its groups again and
/// subscribes again, and the next group_send on either layer is delivered.
#[tokio::test]
async fn the_bridge_survives_a_redis_restart() {
    let Some((mut redis, python)) = setup().await else {
        return;
    };
    if !redis.owned() {
        crate::redis::skip_shared_redis(Some("HERALD_REQUIRE_DJANGO"));
        return;
    }
    let srv = bridge_node(&redis, BridgeOptions::default()).await;
    let (mut ws, _) = srv.connect("/ws/notifications/", "hal").await;
    let url = redis.url.clone();
    let django = Django {
        python: &python,
        redis_url: &url,
        keys: None,
    };
    django
        .run(
            "core",
            json!([{"call": "broadcast_notification", "args": ["hal", {"n": 1}]}]),
        )
        .await;
    assert_eq!(ws.next_json().await["offset"], 1);

    redis.kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart().await;
    both_layers_deliver_once_redis_is_back(&django, &mut ws, "hal", 2).await;
}

/// herald starts while the bridge's Redis is down: sockets work, and once Redis is up
/// the node joins the groups of the sockets already open and subscribes.
#[tokio::test]
async fn the_bridge_starts_without_its_redis_and_catches_up() {
    let Some((mut redis, python)) = setup().await else {
        return;
    };
    if !redis.owned() {
        crate::redis::skip_shared_redis(Some("HERALD_REQUIRE_DJANGO"));
        return;
    }
    redis.kill().await;
    let srv = bridge_node(&redis, BridgeOptions::default()).await;
    let (mut ws, _) = srv.connect("/ws/notifications/", "ivy").await;
    redis.restart().await;
    let url = redis.url.clone();
    let django = Django {
        python: &python,
        redis_url: &url,
        keys: None,
    };
    both_layers_deliver_once_redis_is_back(&django, &mut ws, "ivy", 1).await;
}

#[test]
fn a_sharded_layer_is_refused_at_start() {
    let env = std::collections::BTreeMap::from([(
        "HERALD_DJANGO_BRIDGE".to_owned(),
        "redis://:pw@a:6379,redis://:pw@b:6379".to_owned(),
    )]);
    let err = herald::config::load(None, &env).unwrap_err().to_string();
    assert!(err.contains("one Redis URL"), "{err}");
    assert!(!err.contains("pw"), "the password leaked: {err}");
}

#[test]
fn a_bad_django_table_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, "[django]\nlayer = \"channels\"\n").unwrap();
    let err = herald::config::load(Some(&path), &std::collections::BTreeMap::<String, String>::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("[django] layer = \"channels\""), "{err}");
}
