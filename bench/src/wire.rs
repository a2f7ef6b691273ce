//! What the orchestrator and its worker processes say to each other: one JSON command a
//! line on the worker's stdin, one JSON reply a line on its stdout.
//!
//! Workers exist because one process may hold at most 20,000 open files here: the
//! sockets of a scenario are spread over several worker processes, each holding a slice
//! of the users `u{first}` … `u{first + count - 1}`.

use serde::{Deserialize, Serialize};

use crate::histogram::Histogram;

/// Which endpoint a worker's sockets connect to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Endpoint {
    /// `/ws/notifications/` as the socket's own user.
    Notifications,
    /// `/ws/events/{org}/`; the token carries `orgs: [org]`.
    Events { org: String },
    /// `/ws/frame-stream/{user}/`.
    FrameStream,
    /// `/ws/`, subscribed to the user's `notifications:` and `frames:` channels and to
    /// `org:{org}`; the token carries `orgs: [org]`. Connected once all three are
    /// `subscribed`.
    Multiplexed { org: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Opens `count` sockets for users `u{first}`…, socket `i` to `servers[i % len]`,
    /// from source address number `2 + i / per_source_ip` (127.0.0.2, …), at most
    /// `concurrency` handshakes at once; waits for each socket's first message.
    Connect {
        servers: Vec<String>,
        endpoint: Endpoint,
        first: usize,
        count: usize,
        per_source_ip: usize,
        concurrency: usize,
        secret: String,
        timeout_ms: u64,
    },
    /// Starts counting round `round`: marks of other rounds are counted as stale.
    /// `expected_per_socket` is the number of marks every socket should get (fan-out),
    /// or `None` when marks go to one socket each (unicast).
    Round {
        round: u32,
        expected_per_socket: Option<u64>,
    },
    /// How many marks of the current round have arrived so far.
    Status,
    /// Ends the round and reports it.
    EndRound,
    /// Starts one echo chat task per socket (they must be frame-stream sockets) and
    /// reports when every task has ended or `timeout_ms` passed.
    Stream {
        http: String,
        prompt: String,
        /// Streaming frames each task should produce.
        frames_per_task: u64,
        concurrency: usize,
        secret: String,
        timeout_ms: u64,
    },
    /// Closes every socket and exits.
    Quit,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Connected(ConnectReport),
    Ok,
    Status { received: u64, closed: u64 },
    Round(RoundReport),
    Stream(StreamReport),
    Error(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectReport {
    pub connected: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundReport {
    pub sockets: u64,
    /// Distinct marks of this round received (summed over sockets).
    pub received: u64,
    /// Marks expected and not received (fan-out only; unicast loss is computed from the
    /// number of publishes).
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Marks of another round.
    pub stale: u64,
    /// Sockets the server closed (or that failed) during the round.
    pub closed: u64,
    /// Publish-to-receive latency of each received mark, in microseconds.
    pub latency_us: Histogram,
}

impl RoundReport {
    pub fn merge(&mut self, other: &RoundReport) {
        self.sockets += other.sockets;
        self.received += other.received;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
        self.stale += other.stale;
        self.closed += other.closed;
        self.latency_us.merge(&other.latency_us);
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamReport {
    pub tasks: u64,
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
    /// Streaming frames received.
    pub frames: u64,
    /// Streaming frames missing (index gaps, or a completed task with fewer frames).
    pub lost_frames: u64,
    /// Frames whose index was not the next one.
    pub out_of_order: u64,
    /// From the generate call to the first streaming frame, in microseconds.
    pub first_frame_us: Histogram,
    /// From the first to the last task's end, in milliseconds.
    pub elapsed_ms: u64,
    pub first_error: Option<String>,
}

impl StreamReport {
    pub fn merge(&mut self, other: &StreamReport) {
        self.tasks += other.tasks;
        self.started += other.started;
        self.completed += other.completed;
        self.failed += other.failed;
        self.frames += other.frames;
        self.lost_frames += other.lost_frames;
        self.out_of_order += other.out_of_order;
        self.first_frame_us.merge(&other.first_frame_us);
        self.elapsed_ms = self.elapsed_ms.max(other.elapsed_ms);
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }
}
