//! Starting and stopping the servers under test, each in a fresh process: herald (one
//! node, or several sharing a private Redis), the bare axum baseline in its WebSocket
//! layer variants, and the Django Channels baseline (daphne and its own redis-server).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The HS256 secret every server under test is given.
pub const JWT_SECRET: &str = "herald-bench-secret-0123456789abcdef";
/// The service API key every server under test is given.
pub const API_KEY: &str = "hk_bench_0123456789abcdef";

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// `herald serve`, in-memory broker.
    Herald,
    /// The bare axum baseline on tungstenite with a 4 KiB read buffer (the issue's
    /// reference stack).
    Bare,
    /// The bare baseline on tungstenite with read and write buffers of 0.
    BareTungsteniteSmall,
    /// The bare baseline on tokio-websockets (herald's layer).
    BareTokioWebsockets,
    /// The bare baseline as `bare`, keeping what herald's contract keeps of every
    /// message (an offset, an epoch, the last 1,000 messages a channel): what that
    /// retention costs the plain stack. Measured on unicast and the stream only.
    BareHistory,
    /// Django + channels + daphne + channels_redis (the stack herald replaces).
    Django,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Herald => "herald",
            Self::Bare => "bare",
            Self::BareTungsteniteSmall => "bare-tungstenite-small",
            Self::BareTokioWebsockets => "bare-tokio-websockets",
            Self::BareHistory => "bare-history",
            Self::Django => "django",
        }
    }
}

/// Where the programs are.
#[derive(Debug, Clone)]
pub struct Programs {
    /// The directory holding the release `herald` and `bench-bare` binaries.
    pub bin_dir: PathBuf,
    /// The repository root (for the Django app).
    pub repo: PathBuf,
    /// The Django baseline's virtualenv.
    pub venv: PathBuf,
    /// A command to run herald and the bare baseline under (e.g. valgrind), split on
    /// spaces.
    pub wrap: Option<String>,
}

/// Options for one server start.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `HERALD_WORKERS` (herald) for the stream scenario.
    pub llm_workers: Option<usize>,
    /// Number of herald nodes sharing one Redis (0 or 1: one node, memory broker).
    pub nodes: usize,
}

/// A running server: its processes, the address of each node, and a scratch directory.
pub struct Running {
    pub kind: Kind,
    /// The server processes whose CPU and memory are measured (one per node).
    pub processes: Vec<Child>,
    /// `127.0.0.1:port` of each node.
    pub addresses: Vec<String>,
    /// A private redis-server (Django's channel layer, herald's cluster broker).
    pub redis: Option<Child>,
    dir: PathBuf,
}

impl Running {
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().filter_map(Child::id).collect()
    }

    pub fn redis_pid(&self) -> Option<u32> {
        self.redis.as_ref().and_then(Child::id)
    }

    pub fn http(&self) -> String {
        format!(
            "http://{}",
            self.addresses.first().map_or("127.0.0.1:0", String::as_str)
        )
    }

    /// Stops the server: herald and the bare baseline get SIGTERM first (so a profiler
    /// they run under writes its output), then everything is killed.
    pub async fn stop(mut self) {
        if self.kind != Kind::Django {
            for pid in self.pids() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            for child in &mut self.processes {
                let _ = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
            }
        }
        for child in &mut self.processes {
            let _ = child.kill().await;
        }
        if let Some(redis) = &mut self.redis {
            let _ = redis.kill().await;
        }
        // The logs stay for a look after the run; the databases go.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if !entry.file_name().to_string_lossy().ends_with(".log") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr().context("cannot find a free port")?.port())
}

fn scratch_dir(label: &str) -> anyhow::Result<PathBuf> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("herald-bench-{}-{label}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    let file = std::fs::File::create(dir.join(name)).with_context(|| format!("cannot create {name}"))?;
    Ok(Stdio::from(file))
}

pub async fn start(kind: Kind, programs: &Programs, options: &Options) -> anyhow::Result<Running> {
    let dir = scratch_dir(kind.label())?;
    let mut running = Running {
        kind,
        processes: Vec::new(),
        addresses: Vec::new(),
        redis: None,
        dir: dir.clone(),
    };
    let result = match kind {
        Kind::Herald => start_herald(&mut running, programs, options).await,
        Kind::Bare | Kind::BareTungsteniteSmall | Kind::BareTokioWebsockets | Kind::BareHistory => {
            start_bare(&mut running, programs).await
        }
        Kind::Django => start_django(&mut running, programs).await,
    };
    match result {
        Ok(()) => Ok(running),
        Err(err) => {
            let logs = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|entry| {
                    let text = std::fs::read_to_string(entry.path()).ok()?;
                    let tail: String = text
                        .lines()
                        .rev()
                        .take(15)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n");
                    Some(format!("--- {}\n{tail}", entry.file_name().to_string_lossy()))
                })
                .collect::<Vec<_>>()
                .join("\n");
            running.stop().await;
            Err(err.context(format!("{} did not start; its logs:\n{logs}", kind.label())))
        }
    }
}

async fn start_redis(running: &mut Running) -> anyhow::Result<String> {
    let port = free_port()?;
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
        .arg("--dir")
        .arg(&running.dir)
        .stdout(log_file(&running.dir, "redis.log")?)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start redis-server (is it on PATH?)")?;
    running.redis = Some(child);
    wait_for_port(&format!("127.0.0.1:{port}"), Duration::from_secs(10)).await?;
    Ok(format!("redis://127.0.0.1:{port}"))
}

async fn start_herald(running: &mut Running, programs: &Programs, options: &Options) -> anyhow::Result<()> {
    let herald = programs.bin_dir.join("herald");
    if !herald.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p herald`",
            herald.display()
        );
    }
    let config = running.dir.join("herald.toml");
    // Every load-generator socket comes from a handful of loopback addresses.
    std::fs::write(&config, "handshakes_per_ip_per_second = 0\n").context("cannot write herald.toml")?;
    let redis = if options.nodes > 1 {
        Some(start_redis(running).await?)
    } else {
        None
    };
    for node in 0..options.nodes.max(1) {
        let port = free_port()?;
        let address = format!("127.0.0.1:{port}");
        let (program, mut args) = wrapped(programs, &herald)?;
        args.extend([
            "--config".to_owned(),
            config.display().to_string(),
            "serve".to_owned(),
        ]);
        let mut command = Command::new(program);
        command
            .args(&args)
            .current_dir(&running.dir)
            .env("HERALD_LISTEN", &address)
            .env("HERALD_JWT_SECRET", JWT_SECRET)
            .env("HERALD_API_KEYS", API_KEY)
            .env("HERALD_MEMBERSHIP", "claims")
            // Every load client connects from 127.0.0.1, up to 256 handshakes at once.
            .env("HERALD_MAX_PENDING_PER_IP", "1000000")
            .env(
                "HERALD_DATABASE_URL",
                format!("sqlite://{}/herald-{node}.db", running.dir.display()),
            )
            .env("HERALD_LOG", "warn")
            .env("HERALD_SHUTDOWN_DRAIN", "1")
            .stdout(log_file(&running.dir, &format!("herald-{node}.out.log"))?)
            .stderr(log_file(&running.dir, &format!("herald-{node}.log"))?)
            .kill_on_drop(true);
        if let Some(workers) = options.llm_workers {
            command.env("HERALD_WORKERS", workers.to_string());
        }
        if let Some(redis) = &redis {
            command.env("HERALD_REDIS_URL", redis);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", herald.display()))?;
        running.processes.push(child);
        running.addresses.push(address);
    }
    let timeout = start_timeout(programs);
    for address in running.addresses.clone() {
        wait_for_health(running, &address, timeout).await?;
    }
    Ok(())
}

async fn start_bare(running: &mut Running, programs: &Programs) -> anyhow::Result<()> {
    let bare = programs.bin_dir.join("bench-bare");
    if !bare.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p bench-bare`",
            bare.display()
        );
    }
    let port = free_port()?;
    let address = format!("127.0.0.1:{port}");
    let (program, args) = wrapped(programs, &bare)?;
    let mut command = Command::new(program);
    command.args(args).args([
        "--listen",
        &address,
        "--jwt-secret",
        JWT_SECRET,
        "--api-key",
        API_KEY,
    ]);
    match running.kind {
        Kind::BareTungsteniteSmall => {
            command.args(["--ws", "tungstenite", "--read-buffer", "0", "--write-buffer", "0"]);
        }
        Kind::BareTokioWebsockets => {
            command.args(["--ws", "tokio-websockets"]);
        }
        kind => {
            command.args([
                "--ws",
                "tungstenite",
                "--read-buffer",
                "4096",
                "--write-buffer",
                "0",
            ]);
            if kind == Kind::BareHistory {
                // herald's default `HERALD_HISTORY_SIZE`.
                command.args(["--history", "1000"]);
            }
        }
    }
    let child = command
        .stdout(log_file(&running.dir, "bare.out.log")?)
        .stderr(log_file(&running.dir, "bare.log")?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bare.display()))?;
    running.processes.push(child);
    running.addresses.push(address.clone());
    wait_for_health(running, &address, start_timeout(programs)).await
}

/// The program and leading arguments that run `binary`, under `--wrap` if given.
fn wrapped(programs: &Programs, binary: &Path) -> anyhow::Result<(PathBuf, Vec<String>)> {
    let Some(wrap) = &programs.wrap else {
        return Ok((binary.to_path_buf(), Vec::new()));
    };
    let mut parts = wrap.split_whitespace().map(str::to_owned);
    let program = parts.next().ok_or_else(|| anyhow!("--wrap is empty"))?;
    let mut args: Vec<String> = parts.collect();
    args.push(binary.display().to_string());
    Ok((PathBuf::from(program), args))
}

/// How long a server may take to answer its health check: longer under a profiler.
fn start_timeout(programs: &Programs) -> Duration {
    if programs.wrap.is_some() {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(30)
    }
}

async fn start_django(running: &mut Running, programs: &Programs) -> anyhow::Result<()> {
    let daphne = programs.venv.join("bin/daphne");
    if !daphne.exists() {
        bail!(
            "{} is missing: run bench/baselines/django/install.sh (bench/run.sh does)",
            daphne.display()
        );
    }
    let redis = start_redis(running).await?;
    let port = free_port()?;
    let address = format!("127.0.0.1:{port}");
    let app_dir = programs.repo.join("bench/baselines/django");
    let child = Command::new(&daphne)
        .args([
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--verbosity",
            "0",
            "benchsite.asgi:application",
        ])
        .current_dir(&app_dir)
        .env("BENCH_JWT_SECRET", JWT_SECRET)
        .env("BENCH_API_KEY", API_KEY)
        .env("BENCH_REDIS_URL", &redis)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(log_file(&running.dir, "daphne.out.log")?)
        .stderr(log_file(&running.dir, "daphne.log")?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", daphne.display()))?;
    running.processes.push(child);
    running.addresses.push(address.clone());
    wait_for_health(running, &address, Duration::from_secs(60)).await
}

async fn wait_for_port(address: &str, timeout: Duration) -> anyhow::Result<()> {
    let address: SocketAddr = address.parse().context("bad address")?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on {address} after {timeout:?}")
}

async fn wait_for_health(running: &mut Running, address: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("http://{address}/healthz");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for child in &mut running.processes {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("the server exited with {status}");
            }
        }
        if let Ok(response) = client.get(&url).timeout(Duration::from_secs(2)).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} did not answer 200 within {timeout:?}")
}

/// Whether the Django virtualenv is installed (the Django baseline is skipped with a
/// note otherwise).
pub fn django_available(programs: &Programs) -> bool {
    programs.venv.join("bin/daphne").exists()
}
