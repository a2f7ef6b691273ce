//! A newcomer's first hour with the real binary (issue 13): a failed start names its
//! real cause, says "listening" only once it listens, and leaves no generated secrets
//! behind; `herald token` never signs with a secret no server knows; production mode
//! warns about development settings; `serve --help` lists the settings; `listen` takes
//! its token from a file or the environment.

use std::path::Path;
use std::process::Output;

use crate::process::start;
use crate::support::*;

const SECRETS_FILE: &str = "herald-dev-secrets.json";

/// `herald serve` in `dir` with `env` (nothing else configured), expected to fail.
async fn serve_fails(dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = herald(dir);
    cmd.arg("serve").env("HERALD_LISTEN", "127.0.0.1:0");
    for (key, value) in env {
        cmd.env(key, value);
    }
    let output = tokio::time::timeout(WAIT * 2, cmd.output())
        .await
        .expect("herald serve gives up within 20 s")
        .unwrap();
    assert!(!output.status.success(), "herald serve started with {env:?}");
    output
}

fn err_text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Nothing was announced and nothing was written.
fn assert_left_nothing(dir: &Path, output: &Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stdout.contains("listening") && !stdout.contains("API key"),
        "a failed start printed its banner:\n{stdout}"
    );
    assert!(
        !dir.join(SECRETS_FILE).exists(),
        "a failed start saved dev secrets"
    );
}

#[tokio::test]
async fn an_unknown_database_host_is_named_and_nothing_is_announced() {
    let dir = tempfile::tempdir().unwrap();
    let output = serve_fails(dir.path(), &[("HERALD_DATABASE_URL", "postgres://nohost/x")]).await;
    let stderr = err_text(&output);
    assert!(
        stderr.contains("cannot open the database postgres://nohost/x"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("pool timed out") && !stderr.contains("dev secrets"),
        "{stderr}"
    );
    assert_left_nothing(dir.path(), &output);
}

#[tokio::test]
async fn a_refused_database_connection_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let output = serve_fails(dir.path(), &[("HERALD_DATABASE_URL", "postgres://127.0.0.1:1/x")]).await;
    let stderr = err_text(&output);
    assert!(
        stderr.to_lowercase().contains("connection refused"),
        "expected `connection refused`, got:\n{stderr}"
    );
    assert!(!stderr.contains("timed out"), "{stderr}");
    assert_left_nothing(dir.path(), &output);
}

#[tokio::test]
async fn a_missing_sqlite_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for (url, named) in [
        ("sqlite:///nonexistent-dir/h.db", "/nonexistent-dir"),
        ("sqlite://missing/h.db", "missing"),
    ] {
        let output = serve_fails(dir.path(), &[("HERALD_DATABASE_URL", url)]).await;
        let stderr = err_text(&output);
        assert!(
            stderr.contains(&format!(
                "the directory {named} of the SQLite file does not exist"
            )),
            "{url}: {stderr}"
        );
        assert!(!stderr.contains("secrets"), "{url}: {stderr}");
        assert_left_nothing(dir.path(), &output);
        assert!(!dir.path().join("missing").exists());
    }
}

#[tokio::test]
async fn a_port_in_use_leaves_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = serve_fails(dir.path(), &[("HERALD_LISTEN", &addr)]).await;
    let stderr = err_text(&output);
    assert!(
        stderr.contains(&format!("cannot listen on {addr} (HERALD_LISTEN)")),
        "{stderr}"
    );
    assert_left_nothing(dir.path(), &output);
    assert!(
        !dir.path().join("herald.db").exists(),
        "the database was opened before the port was bound"
    );
}

#[tokio::test]
async fn token_refuses_to_sign_without_saved_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let output = herald(dir.path())
        .args(["token", "--sub", "alice"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success(), "herald token signed with a new secret");
    assert!(output.stdout.is_empty(), "herald token printed a token");
    let stderr = err_text(&output);
    let looked_at = dir.path().canonicalize().unwrap().join(SECRETS_FILE);
    assert!(
        stderr.contains(&looked_at.display().to_string()),
        "the message names where it looked ({}):\n{stderr}",
        looked_at.display()
    );
    assert!(
        stderr.contains("HERALD_DATABASE_URL") && stderr.contains("HERALD_JWT_SECRET"),
        "the message says how to point herald token at the secrets:\n{stderr}"
    );
    assert!(
        !dir.path().join(SECRETS_FILE).exists(),
        "herald token saved secrets"
    );

    // With the server's secret given, it signs.
    let output = herald(dir.path())
        .args(["token", "--sub", "alice"])
        .env("HERALD_JWT_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", err_text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).matches('.').count(), 2);
}

/// The warnings `herald serve` logs at start, one line each.
const PRODUCTION_WARNINGS: [&str; 4] = [
    "HERALD_LLM_BASE_URL is not set: the echo development provider answers chat requests",
    "the demo page is served at /; set HERALD_DEMO_PAGE=false to turn it off",
    "HERALD_JWT_SECRET is 1 bytes long",
    "HERALD_ALLOWED_ORIGINS=*",
];

#[tokio::test]
async fn production_mode_warns_about_development_settings() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, _) = start(
        dir.path(),
        &[
            ("HERALD_JWT_SECRET", "x"),
            ("HERALD_API_KEYS", API_KEY),
            ("HERALD_DATABASE_URL", "sqlite::memory:"),
            ("HERALD_ALLOWED_ORIGINS", "*"),
        ],
    )
    .await;
    proc.stop().await;
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    for warning in PRODUCTION_WARNINGS {
        let lines: Vec<&str> = log.lines().filter(|line| line.contains(warning)).collect();
        assert_eq!(lines.len(), 1, "expected one line with `{warning}` in:\n{log}");
        assert!(lines[0].contains("WARN"), "{}", lines[0]);
    }
    assert!(
        !log.contains('\u{1b}'),
        "logs redirected to a file carry no colour codes:\n{log}"
    );

    // Configured for production: no warning.
    let dir = tempfile::tempdir().unwrap();
    let (proc, _) = start(
        dir.path(),
        &[
            ("HERALD_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
            ("HERALD_API_KEYS", API_KEY),
            ("HERALD_DATABASE_URL", "sqlite::memory:"),
            ("HERALD_LLM_BASE_URL", "http://127.0.0.1:9/v1"),
            ("HERALD_DEMO_PAGE", "false"),
        ],
    )
    .await;
    proc.stop().await;
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(!log.contains("WARN"), "{log}");
}

#[tokio::test]
async fn serve_help_lists_every_setting() {
    let dir = tempfile::tempdir().unwrap();
    let output = herald(dir.path())
        .args(["serve", "--help"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for setting in herald::config::SETTINGS {
        assert!(help.contains(setting.env), "`serve --help` lacks {}", setting.env);
    }
    assert!(help.contains("[default: 127.0.0.1:8000]"), "{help}");
}

#[tokio::test]
async fn listen_reads_its_token_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, addr) = start(
        dir.path(),
        &[
            ("HERALD_JWT_SECRET", SECRET),
            ("HERALD_API_KEYS", API_KEY),
            ("HERALD_DATABASE_URL", "sqlite::memory:"),
        ],
    )
    .await;
    let url = format!("ws://{addr}/ws/notifications/");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{}\n", token_for("alice"))).unwrap();
    // The file wins over a HERALD_TOKEN left in the environment.
    let by_file = herald(dir.path())
        .args(["listen", &url, "--count", "1", "--token-file"])
        .arg(&token_file)
        .env("HERALD_TOKEN", token_for("bob"))
        .output();
    let by_env = herald(dir.path())
        .args(["listen", &url, "--count", "1"])
        .env("HERALD_TOKEN", token_for("bob"))
        .output();
    let none = herald(dir.path()).args(["listen", &url]).output();
    let (by_file, by_env, none) = tokio::time::timeout(WAIT, async { tokio::join!(by_file, by_env, none) })
        .await
        .unwrap();
    for (output, user) in [(by_file.unwrap(), "alice"), (by_env.unwrap(), "bob")] {
        assert!(output.status.success(), "{}", err_text(&output));
        let welcome: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(welcome["user_id"], user);
    }
    let none = none.unwrap();
    assert!(!none.status.success());
    assert!(err_text(&none).contains("--token-file"), "{}", err_text(&none));
    proc.stop().await;
}

#[tokio::test]
async fn shutdown_with_no_socket_open_does_not_wait_for_the_drain_window() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, addr) = start(
        dir.path(),
        &[
            ("HERALD_JWT_SECRET", SECRET),
            ("HERALD_API_KEYS", API_KEY),
            ("HERALD_DATABASE_URL", "sqlite::memory:"),
            ("HERALD_SHUTDOWN_DRAIN", "30"),
        ],
    )
    .await;
    // One socket that comes and goes: the node had sockets, and has none now.
    let mut ws = crate::process::connect(addr, "/ws/notifications/", &token_for("alice")).await;
    assert_eq!(ws.next_json().await["status"], "connected");
    ws.close().await;
    let pid = proc.child.id().expect("running").to_string();
    let started = tokio::time::Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(WAIT, proc.child.wait())
        .await
        .expect("herald exits well before its 30 s drain window when no socket is open")
        .unwrap();
    assert!(status.success(), "herald exited with {status}");
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(3), "exit took {took:?}");
}
