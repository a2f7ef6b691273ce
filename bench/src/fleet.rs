//! The orchestrator's side of the worker processes: start them, give each its slice of
//! the sockets, and gather their replies (see `wire`).

use std::process::Stdio;

use anyhow::{anyhow, bail, Context as _};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command as Process};

use crate::wire::{Command, ConnectReport, Endpoint, Reply, RoundReport, StreamReport};

/// Sockets one worker holds at most: the hard limit is 20,000 open files a process.
pub const SOCKETS_PER_WORKER: usize = 15_000;
/// Sockets per loopback source address (each address has ~28,000 ephemeral ports).
pub const SOCKETS_PER_SOURCE_IP: usize = 2_000;

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Sockets this worker holds.
    sockets: usize,
}

pub struct Fleet {
    workers: Vec<Worker>,
    /// Users handed out so far (socket `i` is user `u{i}`).
    next_user: usize,
}

/// The connect phase of a scenario, over every worker.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ConnectSummary {
    pub sockets: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub handshakes_per_second: f64,
}

impl Fleet {
    /// Starts `count` workers (this same program, `bench worker`).
    pub fn start(count: usize) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the bench program")?;
        let mut workers = Vec::with_capacity(count);
        for _ in 0..count.max(1) {
            let mut child = Process::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start a worker")?;
            let stdin = child
                .stdin
                .take()
                .ok_or_else(|| anyhow!("worker without stdin"))?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("worker without stdout"))?;
            workers.push(Worker {
                child,
                stdin,
                stdout: BufReader::new(stdout).lines(),
                sockets: 0,
            });
        }
        Ok(Self {
            workers,
            next_user: 0,
        })
    }

    /// The next [`Fleet::connect`] hands out users from `u0` again, to the same workers,
    /// so one user can hold sockets on several endpoints.
    pub fn reuse_users(&mut self) {
        self.next_user = 0;
    }

    /// Workers needed for `sockets` sockets (at least two, so the load generator can use
    /// both cores like the server).
    pub fn workers_for(sockets: usize) -> usize {
        sockets.div_ceil(SOCKETS_PER_WORKER).max(2)
    }

    async fn send(worker: &mut Worker, command: &Command) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(command).context("cannot encode a command")?;
        line.push(b'\n');
        worker
            .stdin
            .write_all(&line)
            .await
            .context("a worker stopped reading")?;
        worker.stdin.flush().await.context("a worker stopped reading")
    }

    async fn receive(worker: &mut Worker) -> anyhow::Result<Reply> {
        let line = worker
            .stdout
            .next_line()
            .await
            .context("cannot read a worker's reply")?
            .ok_or_else(|| anyhow!("a worker exited"))?;
        let reply: Reply =
            serde_json::from_str(&line).with_context(|| format!("bad worker reply: {line}"))?;
        if let Reply::Error(err) = reply {
            bail!("worker: {err}");
        }
        Ok(reply)
    }

    /// Sends every worker its command (`None`: nothing), then reads every reply.
    async fn ask(&mut self, commands: Vec<Option<Command>>) -> anyhow::Result<Vec<Reply>> {
        for (worker, command) in self.workers.iter_mut().zip(&commands) {
            if let Some(command) = command {
                Self::send(worker, command).await?;
            }
        }
        let mut replies = Vec::new();
        for (worker, command) in self.workers.iter_mut().zip(&commands) {
            if command.is_some() {
                replies.push(Self::receive(worker).await?);
            }
        }
        Ok(replies)
    }

    /// Workers holding sockets get `command`.
    async fn ask_busy(&mut self, command: &Command) -> anyhow::Result<Vec<Reply>> {
        let commands = self
            .workers
            .iter()
            .map(|worker| (worker.sockets > 0).then(|| command.clone()))
            .collect();
        self.ask(commands).await
    }

    /// Opens `count` more sockets, spread evenly over the workers, socket `i` to
    /// `servers[i % len]`.
    pub async fn connect(
        &mut self,
        servers: &[String],
        endpoint: &Endpoint,
        count: usize,
    ) -> anyhow::Result<ConnectSummary> {
        let n_workers = self.workers.len();
        let mut commands = Vec::with_capacity(n_workers);
        let mut first = self.next_user;
        for (w, worker) in self.workers.iter_mut().enumerate() {
            let share = count / n_workers + usize::from(w < count % n_workers);
            if worker.sockets + share > SOCKETS_PER_WORKER + 4_000 {
                bail!(
                    "a worker would hold {} sockets; start more workers",
                    worker.sockets + share
                );
            }
            commands.push((share > 0).then(|| Command::Connect {
                servers: servers.to_vec(),
                endpoint: endpoint.clone(),
                first,
                count: share,
                per_source_ip: SOCKETS_PER_SOURCE_IP,
                concurrency: 32,
                secret: crate::servers::JWT_SECRET.to_owned(),
                timeout_ms: 60_000,
            }));
            worker.sockets += share;
            first += share;
        }
        self.next_user = first;
        let replies = self.ask(commands).await?;
        let mut summary = ConnectSummary::default();
        let mut slowest_ms = 0;
        for reply in replies {
            let Reply::Connected(ConnectReport {
                connected,
                failed,
                first_error,
                elapsed_ms,
            }) = reply
            else {
                bail!("unexpected reply to connect");
            };
            summary.sockets += connected;
            summary.failed += failed;
            if summary.first_error.is_none() {
                summary.first_error = first_error;
            }
            slowest_ms = slowest_ms.max(elapsed_ms);
        }
        #[allow(clippy::cast_precision_loss)]
        {
            summary.seconds = slowest_ms as f64 / 1000.0;
            summary.handshakes_per_second = if slowest_ms == 0 {
                0.0
            } else {
                summary.sockets as f64 / summary.seconds
            };
        }
        Ok(summary)
    }

    pub async fn start_round(&mut self, round: u32, expected_per_socket: Option<u64>) -> anyhow::Result<()> {
        self.ask_busy(&Command::Round {
            round,
            expected_per_socket,
        })
        .await?;
        Ok(())
    }

    /// Marks received so far this round, and sockets closed so far.
    pub async fn status(&mut self) -> anyhow::Result<(u64, u64)> {
        let mut total = (0, 0);
        for reply in self.ask_busy(&Command::Status).await? {
            if let Reply::Status { received, closed } = reply {
                total.0 += received;
                total.1 += closed;
            }
        }
        Ok(total)
    }

    pub async fn end_round(&mut self) -> anyhow::Result<RoundReport> {
        let mut total = RoundReport::default();
        for reply in self.ask_busy(&Command::EndRound).await? {
            let Reply::Round(report) = reply else {
                bail!("unexpected reply to end-round");
            };
            total.merge(&report);
        }
        Ok(total)
    }

    pub async fn stream(
        &mut self,
        http: &str,
        prompt: &str,
        frames_per_task: u64,
        timeout_ms: u64,
    ) -> anyhow::Result<StreamReport> {
        let command = Command::Stream {
            http: http.to_owned(),
            prompt: prompt.to_owned(),
            frames_per_task,
            concurrency: 256,
            secret: crate::servers::JWT_SECRET.to_owned(),
            timeout_ms,
        };
        let mut total = StreamReport::default();
        for reply in self.ask_busy(&command).await? {
            let Reply::Stream(report) = reply else {
                bail!("unexpected reply to stream");
            };
            total.merge(&report);
        }
        Ok(total)
    }

    /// Tells every worker to quit and waits for them.
    pub async fn stop(mut self) {
        for worker in &mut self.workers {
            let _ = Self::send(worker, &Command::Quit).await;
        }
        for worker in &mut self.workers {
            let waited = tokio::time::timeout(std::time::Duration::from_secs(10), worker.child.wait()).await;
            if waited.is_err() {
                let _ = worker.child.kill().await;
            }
        }
    }
}
