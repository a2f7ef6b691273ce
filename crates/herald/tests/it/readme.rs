//! The README's worked example, run with the real `herald` binary: dev mode with no
//! configuration, `herald token`, `herald listen`, a published notification, and a
//! restart that keeps the dev secrets.
//!
//! The commands, the request body and the expected output are read from README.md, so
//! the README cannot drift from what herald does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use tokio::process::Command;

use crate::support::{herald, Proc, WAIT};

const SERVE_BANNER: &str = "herald listening on http://";

/// The README lines this test mirrors; if one changes, change the test with it.
const README_COMMANDS: [&str; 4] = [
    "cargo run --release -- serve",
    "TOKEN=$(cargo run --release -q -- token --sub alice)",
    "cargo run --release -q -- listen ws://127.0.0.1:8000/ws/notifications/ --token \"$TOKEN\"",
    "http://127.0.0.1:8000/api/v1/notifications/alice",
];

struct Served {
    proc: Proc,
    addr: SocketAddr,
    /// The API key the banner printed.
    printed_api_key: Option<String>,
}

/// Starts `herald serve` in `dir` on a free port and reads the banner. Only the port is
/// configured (the README uses 8000, which a test cannot count on being free).
async fn serve(dir: &Path, log_name: &str) -> Served {
    let log = std::fs::File::create(dir.join(log_name)).unwrap();
    let mut cmd = herald(dir);
    cmd.arg("serve").env("HERALD_LISTEN", "127.0.0.1:0").stderr(log);
    let mut proc = Proc::spawn("herald serve", cmd);
    let stderr = || std::fs::read_to_string(dir.join(log_name)).unwrap_or_default();
    let mut addr = None;
    let mut printed_api_key = None;
    // The banner: the address first, then (in dev mode) the secrets and a hint.
    while printed_api_key.is_none() {
        let line = tokio::time::timeout(WAIT, proc.lines.recv()).await;
        let Ok(Some(line)) = line else {
            panic!("herald serve did not print its banner; its stderr:\n{}", stderr());
        };
        if let Some(rest) = line.strip_prefix(SERVE_BANNER) {
            let text = rest.split_whitespace().next().unwrap_or_default();
            addr = Some(
                text.parse::<SocketAddr>()
                    .unwrap_or_else(|err| panic!("the banner `{line}` does not name an address ({err})")),
            );
        } else if let Some(key) = line.trim().strip_prefix("API key:") {
            printed_api_key = Some(key.trim().to_owned());
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("herald serve printed no `{SERVE_BANNER}…` line"));
    Served {
        proc,
        addr,
        printed_api_key,
    }
}

async fn run_to_end(name: &'static str, mut cmd: Command) -> String {
    let output = tokio::time::timeout(WAIT, cmd.stderr(Stdio::piped()).output())
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within {WAIT:?}"))
        .unwrap_or_else(|err| panic!("cannot run {name}: {err}"));
    assert!(
        output.status.success(),
        "{name} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Checks `actual` against an example from the README, where a string containing `…`
/// stands for any string.
fn check_example(example: &Value, actual: &Value, what: &str) {
    fn walk(example: &Value, actual: &Value, path: &str) -> Result<(), String> {
        match (example, actual) {
            (Value::String(e), Value::String(_)) if e.contains('…') => Ok(()),
            (Value::Object(e), Value::Object(a)) => {
                let e_keys: Vec<&String> = e.keys().collect();
                let a_keys: Vec<&String> = a.keys().collect();
                if e_keys != a_keys {
                    return Err(format!(
                        "{path}: keys {e_keys:?} in the README, {a_keys:?} in fact"
                    ));
                }
                e.iter()
                    .try_for_each(|(key, value)| walk(value, &a[key], &format!("{path}.{key}")))
            }
            _ if example == actual => Ok(()),
            _ => Err(format!("{path}: {example} in the README, {actual} in fact")),
        }
    }
    if let Err(diff) = walk(example, actual, "$") {
        panic!("README.md's expected {what} no longer matches herald's output ({diff}); update the README. Actual: {actual}");
    }
}

struct Readme {
    api_key_line: String,
    body: Value,
    welcome: Value,
    receipt: Value,
    notification: Value,
}

fn readme() -> Readme {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(&path).unwrap();
    for command in README_COMMANDS {
        assert!(
            text.contains(command),
            "README.md no longer contains `{command}`; update tests/it/readme.rs to run the example as written"
        );
    }
    let api_key_line = text
        .lines()
        .find(|line| line.starts_with("API_KEY="))
        .expect("README.md's example sets API_KEY=… from herald-dev-secrets.json")
        .to_owned();
    let body = text
        .lines()
        .find_map(|line| line.split_once("-d '").map(|(_, rest)| rest))
        .and_then(|rest| rest.split_once('\''))
        .map(|(body, _)| serde_json::from_str::<Value>(body).expect("the curl -d body is JSON"))
        .expect("README.md's example publishes with curl -d '…'");
    let outputs: Vec<Value> = text
        .lines()
        .filter(|line| line.starts_with("{\""))
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let find = |what: &str, pick: &dyn Fn(&Value) -> bool| {
        outputs
            .iter()
            .find(|v| pick(v))
            .cloned()
            .unwrap_or_else(|| panic!("README.md shows no expected {what} line"))
    };
    Readme {
        api_key_line,
        body,
        welcome: find("welcome", &|v| v["status"] == "connected"),
        receipt: find("publish receipt", &|v| v.get("type").is_none()),
        notification: find("notification", &|v| v["type"] == "notification"),
    }
}

#[tokio::test]
async fn worked_example_runs_as_written() {
    let readme = readme();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();

    // Terminal 1: `herald serve` with no configuration generates and saves dev secrets.
    let served = serve(dir, "serve-1.log").await;
    let secrets_path = dir.join("herald-dev-secrets.json");
    let secrets_text =
        std::fs::read_to_string(&secrets_path).expect("herald serve saves herald-dev-secrets.json");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secrets_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, 0o600,
            "herald-dev-secrets.json must be readable by its owner only"
        );
    }
    let secrets: Value = serde_json::from_str(&secrets_text).unwrap();
    let api_key = secrets["api_key"]
        .as_str()
        .expect("api_key in the secrets file")
        .to_owned();
    assert_eq!(
        served.printed_api_key.as_deref(),
        Some(api_key.as_str()),
        "the banner prints the saved API key"
    );

    // The README's `API_KEY=…` line reads the same key.
    #[cfg(unix)]
    {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(format!("{}\nprintf %s \"$API_KEY\"", readme.api_key_line))
            .current_dir(dir);
        assert_eq!(run_to_end("the README's API_KEY= line", sh).await, api_key);
    }

    // Terminal 2: mint a token, listen, publish.
    let mut token_cmd = herald(dir);
    token_cmd.args(["token", "--sub", "alice"]);
    let token = run_to_end("herald token", token_cmd).await.trim().to_owned();
    assert!(!token.is_empty(), "herald token printed nothing");

    let url = format!("ws://{}/ws/notifications/", served.addr);
    let mut listen_cmd = herald(dir);
    listen_cmd.args(["listen", &url, "--token", &token, "--count", "2"]);
    let mut listener = Proc::spawn("herald listen", listen_cmd);
    let welcome: Value = serde_json::from_str(&listener.next_line("waiting for the welcome").await).unwrap();
    check_example(&readme.welcome, &welcome, "welcome");

    let response = reqwest::Client::new()
        .post(format!("http://{}/api/v1/notifications/alice", served.addr))
        .bearer_auth(&api_key)
        .json(&readme.body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let receipt: Value = response.json().await.unwrap();
    check_example(&readme.receipt, &receipt, "publish receipt");

    let notification: Value =
        serde_json::from_str(&listener.next_line("waiting for the notification").await).unwrap();
    check_example(&readme.notification, &notification, "notification");
    assert_eq!(notification["notification"], readme.body);
    assert_eq!(notification["epoch"], welcome["epoch"]);
    assert_eq!(notification["id"], receipt["id"]);
    let status = tokio::time::timeout(WAIT, listener.child.wait())
        .await
        .expect("herald listen --count 2 exits after two messages")
        .unwrap();
    assert!(status.success(), "herald listen exited with {status}");
    served.proc.stop().await;

    // A restart in the same directory reuses the saved secrets: the token and the API
    // key still work.
    let served = serve(dir, "serve-2.log").await;
    assert_eq!(
        std::fs::read_to_string(&secrets_path).unwrap(),
        secrets_text,
        "a restart must reuse herald-dev-secrets.json, not rewrite it"
    );
    assert_eq!(served.printed_api_key.as_deref(), Some(api_key.as_str()));
    let url = format!("ws://{}/ws/notifications/", served.addr);
    let mut listen_cmd = herald(dir);
    listen_cmd.args(["listen", &url, "--token", &token, "--count", "1"]);
    let mut listener = Proc::spawn("herald listen", listen_cmd);
    let welcome: Value = serde_json::from_str(
        &listener
            .next_line("waiting for the welcome after a restart")
            .await,
    )
    .unwrap();
    assert_eq!(
        welcome["status"], "connected",
        "the old token must still connect: {welcome}"
    );
    assert_eq!(welcome["user_id"], "alice");
    let response = reqwest::Client::new()
        .post(format!("http://{}/api/v1/notifications/alice", served.addr))
        .bearer_auth(&api_key)
        .json(&readme.body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "the old API key must still be accepted");
    listener.stop().await;
    served.proc.stop().await;
}
