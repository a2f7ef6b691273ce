//! The processes a scenario starts, faults and stops: `herald serve` nodes, `herald
//! worker`s, private `redis-server`s and a 3-primary + 3-replica Redis Cluster, all on
//! 127.0.0.1.
//!
//! Every process is started here with `kill_on_drop`, so a scenario that ends, fails or
//! is interrupted (ctrl-c drops the scenario's future) leaves nothing running; faults
//! are signals sent to the process's own PID (`kill -s KILL|STOP|CONT <pid>`), never by
//! name.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The HS256 secret every herald node is given.
pub const JWT_SECRET: &str = "herald-chaos-secret-0123456789abcdef";
/// The service API key every herald node is given.
pub const API_KEY: &str = "hk_chaos_0123456789abcdef";

/// A TCP port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr().context("cannot find a free port")?.port())
}

/// One process started by the suite, which can be signalled and started again with the
/// same command line.
pub struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Proc {
    pub fn new(
        name: &str,
        program: &Path,
        args: Vec<String>,
        envs: Vec<(String, String)>,
        dir: &Path,
    ) -> Self {
        Self {
            name: name.to_owned(),
            program: program.to_path_buf(),
            args,
            envs,
            dir: dir.to_path_buf(),
            child: None,
            starts: 0,
        }
    }

    /// Starts the process (again); its output goes to `<dir>/<name>.<n>.log`.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let log_path = self.dir.join(format!("{}.{}.log", self.name, self.starts));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let log_err = log.try_clone().context("cannot open a log file twice")?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true);
        for (name, value) in &self.envs {
            command.env(name, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Sends `signal` (`STOP`, `CONT`, `KILL`, `TERM`) to this process's PID.
    pub async fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        let status = Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()
            .await
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -s {signal} {pid} ({}) failed", self.name);
        }
        Ok(())
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// The last lines of the current log, to explain a failure.
    pub fn log_tail(&self, lines: usize) -> String {
        let path = self
            .dir
            .join(format!("{}.{}.log", self.name, self.starts.saturating_sub(1)));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

pub async fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on {address} after {timeout:?}")
}

/// A private `redis-server` without persistence (`--save "" --appendonly no`): a restart
/// comes back empty.
pub struct Redis {
    pub proc: Proc,
    pub port: u16,
}

impl Redis {
    pub async fn start(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let data = dir.join(name);
        std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
        let args = vec![
            "--port".to_owned(),
            port.to_string(),
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            "--save".to_owned(),
            String::new(),
            "--appendonly".to_owned(),
            "no".to_owned(),
            "--dir".to_owned(),
            data.display().to_string(),
        ];
        let mut proc = Proc::new(name, Path::new("redis-server"), args, Vec::new(), dir);
        proc.start().context("is redis-server on PATH?")?;
        let redis = Self { proc, port };
        wait_for_port(port, Duration::from_secs(10)).await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.start()?;
        wait_for_port(self.port, Duration::from_secs(10)).await
    }
}

/// `redis-cli -p PORT ARGS…`, its standard output.
pub async fn redis_cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        Command::new("redis-cli")
            .arg("-p")
            .arg(port.to_string())
            .args(args)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("redis-cli -p {port} {args:?} took over 10 s"))?
    .context("cannot run redis-cli (is it on PATH?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || stdout.starts_with("ERR") {
        bail!(
            "redis-cli -p {port} {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// One node of the Redis Cluster.
pub struct ClusterNode {
    pub proc: Proc,
    pub port: u16,
    pub id: String,
}

/// A node's role, from `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterRole {
    pub port: u16,
    pub id: String,
    pub primary: bool,
    /// For a replica: its primary's id.
    pub primary_id: Option<String>,
    /// For a primary: its slot ranges.
    pub slots: Vec<(u16, u16)>,
    pub failed: bool,
}

/// A 3-primary + 3-replica Redis Cluster with a 1 s node timeout, and replicas that may
/// always fail over (`cluster-replica-validity-factor 0`).
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
}

impl Cluster {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let mut nodes = Vec::new();
        for n in 0..6 {
            let port = free_port()?;
            let bus = free_port()?;
            let name = format!("cluster-{n}");
            let data = dir.join(&name);
            std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
            let args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
                "--cluster-config-file",
                &data.join("nodes.conf").display().to_string(),
                "--cluster-node-timeout",
                "1000",
                "--cluster-replica-validity-factor",
                "0",
                // Healthy primaries keep serving their slots while another fails over
                // (Redis's default refuses every command until all slots are covered).
                "--cluster-require-full-coverage",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &data.display().to_string(),
            ]
            .into_iter()
            .map(str::to_owned)
            .collect();
            let mut proc = Proc::new(&name, Path::new("redis-server"), args, Vec::new(), dir);
            proc.start().context("is redis-server on PATH?")?;
            nodes.push(ClusterNode {
                proc,
                port,
                id: String::new(),
            });
        }
        for node in &mut nodes {
            wait_for_port(node.port, Duration::from_secs(10)).await?;
            node.id = redis_cli(node.port, &["cluster", "myid"])
                .await?
                .trim()
                .to_owned();
        }
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .await
            .context("cannot run redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let cluster = Self { nodes };
        cluster.wait_healthy(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// `redis-cluster://` URL naming every node.
    pub fn url(&self) -> String {
        let mut url = String::from("redis-cluster://");
        for (n, node) in self.nodes.iter().enumerate() {
            url.push_str(if n == 0 {
                ""
            } else if n == 1 {
                "?node="
            } else {
                "&node="
            });
            url.push_str(&format!("127.0.0.1:{}", node.port));
        }
        url
    }

    /// Roles as seen by the first running node that answers.
    pub async fn roles(&self) -> anyhow::Result<Vec<ClusterRole>> {
        let mut last_error = anyhow!("no cluster node is running");
        for node in &self.nodes {
            if node.proc.pid().is_none() {
                continue;
            }
            match redis_cli(node.port, &["cluster", "nodes"]).await {
                Ok(text) => return Ok(parse_cluster_nodes(&text)),
                Err(err) => last_error = err,
            }
        }
        Err(last_error)
    }

    /// Waits until every running node says `cluster_state:ok` and three healthy primaries
    /// cover all 16384 slots.
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if self.healthy().await {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!("the Redis Cluster is not healthy after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn healthy(&self) -> bool {
        for node in &self.nodes {
            if node.proc.pid().is_none() {
                continue;
            }
            match redis_cli(node.port, &["cluster", "info"]).await {
                Ok(info) if info.contains("cluster_state:ok") => {}
                _ => return false,
            }
        }
        let Ok(roles) = self.roles().await else {
            return false;
        };
        // Every slot served by a primary that is running (a primary just killed still
        // looks healthy until the others mark it failed).
        let running: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.proc.pid().is_some())
            .map(|n| n.port)
            .collect();
        let serving: Vec<&ClusterRole> = roles
            .iter()
            .filter(|r| r.primary && !r.failed && !r.slots.is_empty())
            .collect();
        let covered: u32 = serving
            .iter()
            .flat_map(|r| r.slots.iter())
            .map(|(a, b)| u32::from(*b) - u32::from(*a) + 1)
            .sum();
        covered == 16384 && serving.len() == 3 && serving.iter().all(|r| running.contains(&r.port))
    }

    pub fn node_by_port(&mut self, port: u16) -> Option<&mut ClusterNode> {
        self.nodes.iter_mut().find(|n| n.port == port)
    }
}

/// Parses `CLUSTER NODES` output.
pub fn parse_cluster_nodes(text: &str) -> Vec<ClusterRole> {
    let mut roles = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            continue;
        }
        // 127.0.0.1:port@bus
        let port = fields[1]
            .split('@')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let flags = fields[2];
        let primary = flags.contains("master");
        let failed = (flags.contains("fail") && !flags.contains("fail?")) || flags.contains("noaddr");
        let primary_id = (fields[3] != "-").then(|| fields[3].to_owned());
        let slots = fields[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| {
                let mut parts = s.split('-');
                let a: u16 = parts.next()?.parse().ok()?;
                let b: u16 = parts.next().map_or(Some(a), |b| b.parse().ok())?;
                Some((a, b))
            })
            .collect();
        roles.push(ClusterRole {
            port,
            id: fields[0].to_owned(),
            primary,
            primary_id,
            slots,
            failed,
        });
    }
    roles
}

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM of the hash tag, mod 16384).
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(bytes)) % 16384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// How a herald node is configured.
#[derive(Debug, Clone)]
pub struct HeraldOptions {
    pub redis_url: Option<String>,
    pub database_url: String,
    /// `claims` or `database`.
    pub membership: String,
    /// `HERALD_WORKERS`.
    pub workers: usize,
    /// Extra lines of the TOML file (e.g. `task_claim_idle_ms = 5000`).
    pub toml: String,
}

/// A `herald serve` node (or a `herald worker`, which has no address).
pub struct Herald {
    pub proc: Proc,
    /// `127.0.0.1:port` (serve only).
    pub address: Option<String>,
}

impl Herald {
    /// Prepares a `herald serve` node (not started).
    pub fn serve(bin: &Path, dir: &Path, name: &str, options: &HeraldOptions) -> anyhow::Result<Self> {
        let port = free_port()?;
        let address = format!("127.0.0.1:{port}");
        let proc = Self::proc(bin, dir, name, options, "serve", Some(&address))?;
        Ok(Self {
            proc,
            address: Some(address),
        })
    }

    /// Prepares a `herald worker` (not started).
    pub fn worker(bin: &Path, dir: &Path, name: &str, options: &HeraldOptions) -> anyhow::Result<Self> {
        let proc = Self::proc(bin, dir, name, options, "worker", None)?;
        Ok(Self { proc, address: None })
    }

    fn proc(
        bin: &Path,
        dir: &Path,
        name: &str,
        options: &HeraldOptions,
        command: &str,
        address: Option<&str>,
    ) -> anyhow::Result<Proc> {
        let herald = bin.join("herald");
        if !herald.exists() {
            bail!(
                "{} is missing: build it with `cargo build --release -p herald` (chaos/run.sh does)",
                herald.display()
            );
        }
        let config = dir.join(format!("{name}.toml"));
        // The clients all come from 127.0.0.1.
        std::fs::write(
            &config,
            format!("handshakes_per_ip_per_second = 0\n{}\n", options.toml),
        )
        .with_context(|| format!("cannot write {}", config.display()))?;
        let mut envs = vec![
            ("HERALD_JWT_SECRET".to_owned(), JWT_SECRET.to_owned()),
            ("HERALD_API_KEYS".to_owned(), API_KEY.to_owned()),
            ("HERALD_MEMBERSHIP".to_owned(), options.membership.clone()),
            ("HERALD_DATABASE_URL".to_owned(), options.database_url.clone()),
            ("HERALD_WORKERS".to_owned(), options.workers.to_string()),
            ("HERALD_LOG".to_owned(), "warn".to_owned()),
            ("HERALD_SHUTDOWN_DRAIN".to_owned(), "1".to_owned()),
            // One user may hold a socket on a node that was SIGKILLed (its count is
            // released only when the count's lease runs out) while reconnecting elsewhere.
            ("HERALD_MAX_CONNECTIONS_PER_USER".to_owned(), "10".to_owned()),
            // Every client connects from 127.0.0.1, up to 200 handshakes at once.
            ("HERALD_MAX_PENDING_PER_IP".to_owned(), "1000000".to_owned()),
        ];
        if let Some(address) = address {
            envs.push(("HERALD_LISTEN".to_owned(), address.to_owned()));
        }
        if let Some(redis) = &options.redis_url {
            envs.push(("HERALD_REDIS_URL".to_owned(), redis.clone()));
        }
        let args = vec![
            "--config".to_owned(),
            config.display().to_string(),
            command.to_owned(),
        ];
        Ok(Proc::new(name, &herald, args, envs, dir))
    }

    /// Waits for `/healthz` to answer 200 (serve), or for the process to stay up 1 s
    /// (worker).
    pub async fn wait_up(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let Some(address) = self.address.clone() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Some(status) = self.proc.exited() {
                bail!(
                    "{} exited with {status}:\n{}",
                    self.proc.name,
                    self.proc.log_tail(15)
                );
            }
            return Ok(());
        };
        let client = reqwest::Client::new();
        let url = format!("http://{address}/healthz");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.proc.exited() {
                bail!(
                    "{} exited with {status}:\n{}",
                    self.proc.name,
                    self.proc.log_tail(15)
                );
            }
            if let Ok(response) = client.get(&url).timeout(Duration::from_secs(2)).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "{url} did not answer 200 within {timeout:?}:\n{}",
            self.proc.log_tail(15)
        )
    }

    pub fn address(&self) -> String {
        self.address.clone().unwrap_or_default()
    }
}

/// Starts `count` serve nodes one after the other (so migrations never race).
pub async fn start_nodes(
    bin: &Path,
    dir: &Path,
    count: usize,
    options: &HeraldOptions,
) -> anyhow::Result<Vec<Herald>> {
    let mut nodes = Vec::new();
    for n in 0..count {
        let mut node = Herald::serve(bin, dir, &format!("node-{n}"), options)?;
        node.proc.start()?;
        node.wait_up(Duration::from_secs(30)).await?;
        nodes.push(node);
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("bar"), 5061);
        assert_eq!(key_slot("herald:{org:o1}:meta"), key_slot("org:o1"));
    }

    #[test]
    fn parses_cluster_nodes() {
        let text = "07c3 127.0.0.1:30004@31004 slave e7d1 0 1426238317239 4 connected\n\
                    e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460\n\
                    67ed 127.0.0.1:30002@31002 master,fail - 1426238316232 1426238314232 2 connected 5461-10922 [5461->-abc]\n";
        let roles = parse_cluster_nodes(text);
        assert_eq!(roles.len(), 3);
        assert!(!roles[0].primary && roles[0].primary_id.as_deref() == Some("e7d1"));
        assert_eq!((roles[1].port, roles[1].slots.clone()), (30001, vec![(0, 5460)]));
        assert!(roles[2].failed && roles[2].slots == vec![(5461, 10922)]);
    }
}
