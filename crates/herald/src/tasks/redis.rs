//! The shared task queue (with `HERALD_REDIS_URL`): a Redis stream read by one consumer
//! group, so every task is queued once and taken by one worker of any node.
//!
//! Keys, all under the `{tasks}` hash tag so each script touches one Cluster slot:
//! - `herald:{tasks}:queue`: the stream; each entry is `task <task id>`. The consumer
//!   group is [`GROUP`]; each process is one consumer, named by its node id.
//! - `herald:{tasks}:task:<id>`: a hash with the request (`user_id`, `chat_id`,
//!   `prompt`, `model`), `status`, `response`, `error`, `attempts`, `worker`,
//!   `cancel`, the stream `entry`, and the progress of its stream (`phase`,
//!   `next_index`, `offset`). It lives a day while in flight and [`TASK_RETENTION`](crate::tasks::TASK_RETENTION)
//!   after the task ends.
//! - `herald:{tasks}:text:<id>`: the answer text sent so far (APPENDed per frame).
//! - `herald:{tasks}:user:<user id>`: the user's tasks in flight (the 3-task limit).
//! - `herald:{tasks}:ended:<user id>`: the user's ended tasks, oldest first; beyond
//!   [`MAX_ENDED_TASKS_PER_USER`](crate::tasks::MAX_ENDED_TASKS_PER_USER) the oldest one's record is deleted.
//! - `herald:{tasks}:queued`: how many tasks wait for a worker (the queue-depth gauge).
//!
//! Every change of state is one Lua script, so a task is never half-submitted or
//! half-ended. A worker that takes an entry owns it in the group's pending list; while
//! it runs the task, its node's heartbeat re-claims the entry every
//! `claim_idle / 10` (≤ 500 ms), which keeps it from looking idle and also picks up a
//! cancel asked on any node. A task's end is recorded before its final `llm_status`
//! goes out, and its entry is acknowledged only after that status is out
//! (`lua/announced.lua`): a worker that dies in between, or whose lease lapsed, leaves
//! the entry pending, and the worker that takes it over sends the status unless the
//! frame stream's history shows it went out (`start.lua`'s `announce`); the same holds
//! for the node that took a queued task's cancel (`cancel.lua`). A worker that dies
//! stops heartbeating: after `claim_idle` (`task_claim_idle_ms`, 15 s) another
//! worker's `XAUTOCLAIM` takes its entries, as many at once as it has free workers, and
//! resumes each stream where it stopped ([`worker::Resume`]). A worker that cannot
//! heartbeat for `claim_idle / 2` (Redis unreachable) stops the task without sending
//! anything more, so two workers never run one task at the same time. After
//! [`MAX_ATTEMPTS`] starts a task fails with [`GAVE_UP`].
//!
//! At shutdown a node stops taking tasks; a task still running at the end of the drain
//! window is handed back (marked idle at once) and another worker resumes it.

mod api;
mod consumer;
mod heartbeat;
mod run;
mod scripts;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::{ClientLike, Value};
use fred::types::scripts::Script;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::redis::{shards_for, Shards};
use crate::broker::Broker;
use crate::config::Config;
use crate::redis::{build_client, connect_and_wait, quit_on, COMMAND_TIMEOUT, SECONDARY_CONNECT_WAIT};
use crate::tasks::worker::Context;
use crate::tasks::{Parts, TaskStatus, Unavailable};
use scripts::Scripts;

/// The consumer group every worker reads the queue with.
pub const GROUP: &str = "herald-workers";

/// A task is started at most this many times (a start is a worker taking it; a worker
/// that dies mid-task costs one). Then it fails with [`GAVE_UP`].
pub const MAX_ATTEMPTS: u32 = 3;

/// The error of a task whose workers kept dying.
pub const GAVE_UP: &str = "LLM processing failed: the task was interrupted 3 times and was given up";

/// How long a task's record lives while it is in flight (a bound for records nobody
/// will ever end, e.g. after every worker was removed).
const IN_FLIGHT_TTL: Duration = Duration::from_secs(24 * 3600);

const QUEUE_KEY: &str = "herald:{tasks}:queue";
const QUEUED_KEY: &str = "herald:{tasks}:queued";
const TASK_PREFIX: &str = "herald:{tasks}:task:";

fn task_key(task_id: &str) -> String {
    format!("{TASK_PREFIX}{task_id}")
}

fn text_key(task_id: &str) -> String {
    format!("herald:{{tasks}}:text:{task_id}")
}

fn user_key(user_id: &str) -> String {
    format!("herald:{{tasks}}:user:{user_id}")
}

/// The user's ended tasks still kept, oldest first (at most
/// [`MAX_ENDED_TASKS_PER_USER`](crate::tasks::MAX_ENDED_TASKS_PER_USER); older ones' records are deleted).
fn ended_key(user_id: &str) -> String {
    format!("herald:{{tasks}}:ended:{user_id}")
}

fn ms(duration: Duration) -> String {
    duration.as_millis().to_string()
}

fn unavailable(err: impl std::fmt::Display) -> Unavailable {
    Unavailable(err.to_string())
}

fn text(value: Option<&Value>) -> String {
    value.and_then(Value::as_string).unwrap_or_default()
}

fn number(value: Option<&Value>) -> u64 {
    value
        .and_then(|v| v.as_u64().or_else(|| v.as_string()?.parse().ok()))
        .unwrap_or(0)
}

fn status_of(name: &str) -> Option<TaskStatus> {
    [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ]
    .into_iter()
    .find(|status| status.as_str() == name)
}

/// One task this node runs.
struct Running {
    /// Tells this run from a later one of the same task on this node.
    run: u64,
    entry: String,
    cancel: CancellationToken,
    abandon: CancellationToken,
}

/// Timings derived from `task_claim_idle_ms`.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// An entry idle this long belongs to a dead worker and is taken over.
    claim_idle: Duration,
    /// How often a node renews its claims (and reads cancel flags).
    heartbeat: Duration,
    /// A worker that could not renew for this long stops its tasks.
    lease: Duration,
    /// How often a worker looks for entries to take over.
    reclaim_every: Duration,
}

impl Timing {
    fn new(claim_idle: Duration) -> Self {
        let claim_idle = claim_idle.max(Duration::from_millis(300));
        Self {
            claim_idle,
            heartbeat: (claim_idle / 10).clamp(Duration::from_millis(20), Duration::from_millis(500)),
            lease: claim_idle / 2,
            reclaim_every: (claim_idle / 3).min(Duration::from_secs(1)),
        }
    }
}

/// The shared queue of one node.
pub struct RedisQueue {
    client: fred::prelude::Client,
    /// On a Cluster, a connection to the primary of the queue's slot, for readiness.
    shards: Option<Arc<Shards>>,
    ctx: Arc<Context>,
    broker: Arc<dyn Broker>,
    node_id: String,
    workers: Arc<Semaphore>,
    timing: Timing,
    history_size: usize,
    running: Mutex<HashMap<String, Running>>,
    /// Numbers the runs ([`Running::run`]).
    runs: AtomicU64,
    /// Until when this node's claims are surely its own: `lease` after the last
    /// renewal that succeeded was sent (or after a heartbeat found nothing to renew).
    lease_until: Mutex<Instant>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    scripts: Scripts,
}

impl RedisQueue {
    /// Connects and, when `workers > 0`, starts this node's consumer and heartbeat.
    /// `stop` closes the connections; it must outlive the drain of running tasks.
    pub async fn start(
        url: &str,
        config: &Config,
        workers: usize,
        ctx: Arc<Context>,
        parts: &Parts,
        node_id: &str,
        stop: &CancellationToken,
    ) -> Result<Arc<Self>, Unavailable> {
        let client = build_client(url).map_err(unavailable)?;
        connect_and_wait(
            &client,
            SECONDARY_CONNECT_WAIT,
            "the task queue's Redis is not reachable yet: starting not-ready, retrying",
        )
        .await;
        let shards = shards_for(url, &client).map_err(unavailable)?;
        if let Some(shards) = shards.clone() {
            // Makes the connection to the queue's primary now, so readiness is known.
            shards.serves(QUEUE_KEY);
            let stop = stop.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                shards.quit().await;
            });
        }
        let queue = Arc::new(Self {
            client: client.clone(),
            shards,
            ctx,
            broker: parts.broker.clone(),
            node_id: node_id.to_owned(),
            workers: Arc::new(Semaphore::new(workers)),
            timing: Timing::new(config.task_claim_idle),
            history_size: config.history_size,
            running: Mutex::new(HashMap::new()),
            runs: AtomicU64::new(0),
            lease_until: Mutex::new(Instant::now() + Timing::new(config.task_claim_idle).lease),
            tracker: parts.tracker.clone(),
            shutdown: parts.shutdown.clone(),
            scripts: Scripts::load(),
        });
        let mut clients = vec![client];
        if workers > 0 {
            // XREADGROUP blocks its connection, so the consumer has one of its own.
            let reader = build_client(url).map_err(unavailable)?;
            reader.connect();
            clients.push(reader.clone());
            tokio::spawn(queue.clone().consume(reader));
            tokio::spawn(queue.clone().renew_claims(stop.clone()));
        }
        quit_on(stop, clients);
        Ok(queue)
    }

    /// One Redis: the connection is up. A Cluster: the primary holding the queue
    /// answers (the cluster client calls itself disconnected while any primary is).
    pub fn ready(&self) -> bool {
        match &self.shards {
            Some(shards) => shards.serves(QUEUE_KEY),
            None => self.client.is_connected(),
        }
    }

    async fn eval(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, Unavailable> {
        if !self.client.is_connected() {
            return Err(Unavailable("not connected to Redis".to_owned()));
        }
        tokio::time::timeout(
            COMMAND_TIMEOUT,
            script.evalsha_with_reload::<Value, _, _>(&self.client, keys, args),
        )
        .await
        .map_err(|_| Unavailable("Redis did not answer in time".to_owned()))?
        .map_err(unavailable)
    }

    fn set_queue_depth(&self, queued: u64) {
        self.ctx
            .publisher
            .metrics()
            .set_task_queue_depth(i64::try_from(queued).unwrap_or(i64::MAX));
    }
}
