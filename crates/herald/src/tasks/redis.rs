//! The shared task queue (with `HERALD_REDIS_URL`): a Redis stream read by one consumer
//! group, so every task is queued once and taken by one worker of any node.
//!
//! Keys, all under the `{tasks}` hash tag so each script touches one Cluster slot:
//! - `herald:{tasks}:queue`: the stream; each entry is `task <task id>`. The consumer
//!   group is [`GROUP`]; each process is one consumer, named by its node id.
//! - `herald:{tasks}:task:<id>`: a hash with the request (`user_id`, `chat_id`,
//!   `prompt`, `model`), `status`, `response`, `error`, `attempts`, `worker`,
//!   `cancel`, the stream `entry`, and the progress of its stream (`phase`,
//!   `next_index`, `offset`). It lives a day while in flight and [`TASK_RETENTION`]
//!   after the task ends.
//! - `herald:{tasks}:text:<id>`: the answer text sent so far (APPENDed per frame).
//! - `herald:{tasks}:user:<user id>`: the user's tasks in flight (the 3-task limit).
//! - `herald:{tasks}:ended:<user id>`: the user's ended tasks, oldest first; beyond
//!   [`MAX_ENDED_TASKS_PER_USER`] the oldest one's record is deleted.
//! - `herald:{tasks}:queued`: how many tasks wait for a worker (the queue-depth gauge).
//!
//! Every change of state is one Lua script, so a task is never half-submitted or
//! half-ended. A worker that takes an entry owns it in the group's pending list; while
//! it runs the task, its node's heartbeat re-claims the entry every
//! `claim_idle / 10` (≤ 500 ms), which keeps it from looking idle and also picks up a
//! cancel asked on any node. A worker that dies stops heartbeating: after `claim_idle`
//! (`task_claim_idle_ms`, 15 s) another worker's `XAUTOCLAIM` takes its entries, as many
//! at once as it has free workers, and resumes each stream where it stopped
//! ([`worker::Resume`]). A worker that cannot
//! heartbeat for `claim_idle / 2` (Redis unreachable) stops the task without sending
//! anything more, so two workers never run one task at the same time. After
//! [`MAX_ATTEMPTS`] starts a task fails with [`GAVE_UP`].
//!
//! At shutdown a node stops taking tasks; a task still running at the end of the drain
//! window is handed back (marked idle at once) and another worker resumes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::{ClientLike, HashesInterface, KeysInterface, StreamsInterface, Value};
use fred::types::scripts::Script;
use serde_json::Value as Json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::config::Config;
use crate::ids::{ChatId, UserId};
use crate::redis::{build_client, connect_and_wait, quit_on, COMMAND_TIMEOUT, SECONDARY_CONNECT_WAIT};
use crate::sync::lock;
use crate::tasks::worker::{self, Checkpoint, Context, Job, Outcome, Phase, Progress, Resume};
use crate::tasks::{
    Parts, SubmitError, TaskRequest, TaskStatus, TaskView, Unavailable, MAX_ENDED_TASKS_PER_USER,
    MAX_TASKS_IN_FLIGHT_PER_USER, TASK_RETENTION,
};

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

/// How long one `XREADGROUP` waits for a new entry.
const READ_BLOCK: Duration = Duration::from_secs(1);

/// The shortest `XREADGROUP` wait (a wait of 0 would block forever).
const MIN_READ_BLOCK: Duration = Duration::from_millis(10);

/// The most entries one `XREADGROUP` or `XAUTOCLAIM` takes.
const MAX_BATCH: usize = 100;

/// Pause after a failed read before the next try.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

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
/// [`MAX_ENDED_TASKS_PER_USER`]; older ones' records are deleted).
fn ended_key(user_id: &str) -> String {
    format!("herald:{{tasks}}:ended:{user_id}")
}

/// Lua appended to the scripts that end a task: notes it in KEYS[E] (the user's ended
/// list) and deletes the records of those beyond the cap. `E`, `ID`, `MAX`, `PREFIX`,
/// `TTL` are replaced by the KEYS/ARGV positions of each script.
const NOTE_ENDED_LUA: &str = r#"
redis.call('RPUSH', KEYS[E], ARGV[ID])
while redis.call('LLEN', KEYS[E]) > tonumber(ARGV[MAX]) do
  redis.call('DEL', ARGV[PREFIX] .. redis.call('LPOP', KEYS[E]))
end
redis.call('PEXPIRE', KEYS[E], ARGV[TTL])
"#;

/// [`NOTE_ENDED_LUA`] with its positions filled in.
fn note_ended_lua(e: usize, id: usize, max: usize, prefix: usize, ttl: usize) -> String {
    NOTE_ENDED_LUA
        .replace("KEYS[E]", &format!("KEYS[{e}]"))
        .replace("ARGV[ID]", &format!("ARGV[{id}]"))
        .replace("ARGV[MAX]", &format!("ARGV[{max}]"))
        .replace("ARGV[PREFIX]", &format!("ARGV[{prefix}]"))
        .replace("ARGV[TTL]", &format!("ARGV[{ttl}]"))
}

/// KEYS = task, user, queue, queued; ARGV = task id, user id, chat id, prompt, model,
/// max in flight, in-flight TTL (ms), task key prefix. Returns `{accepted, queued}`.
const SUBMIT_SCRIPT: &str = r#"
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local st = redis.call('HGET', ARGV[8] .. id, 'status')
  if (not st) or st == 'completed' or st == 'failed' or st == 'cancelled' then
    redis.call('SREM', KEYS[2], id)
  end
end
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[6]) then
  return {0, 0}
end
local entry = redis.call('XADD', KEYS[3], '*', 'task', ARGV[1])
redis.call('HSET', KEYS[1], 'user_id', ARGV[2], 'chat_id', ARGV[3], 'prompt', ARGV[4],
  'model', ARGV[5], 'status', 'queued', 'attempts', 0, 'phase', 0, 'next_index', 0,
  'offset', 0, 'entry', entry)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return {1, redis.call('INCR', KEYS[4])}
"#;

/// KEYS = task, queued, queue, text; ARGV = group, entry, consumer, max attempts.
/// Returns `{action, user_id, chat_id, prompt, model, phase, next_index, offset, text,
/// queued, attempts}` with action `run`, `cancel` (asked while its last worker ran it),
/// `exhausted`, or `skip` (ended or gone; the entry is acknowledged).
const START_SCRIPT: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'status', 'cancel', 'user_id', 'chat_id', 'prompt',
  'model', 'phase', 'next_index', 'offset')
local st = f[1]
if (not st) or st == 'completed' or st == 'failed' or st == 'cancelled' then
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[3], ARGV[2])
  return {'skip'}
end
if st == 'queued' and tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then
  redis.call('DECR', KEYS[2])
end
local queued = redis.call('GET', KEYS[2]) or '0'
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3])
local action = 'run'
local attempts = 0
if f[2] == '1' then
  action = 'cancel'
else
  attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  if attempts > tonumber(ARGV[4]) then
    action = 'exhausted'
  end
end
local text = redis.call('GET', KEYS[4]) or ''
return {action, f[3], f[4], f[5], f[6], f[7], f[8], f[9], text, queued, attempts}
"#;

/// Renews this node's claim on its running entries and reads their cancel flags.
/// KEYS = queue; ARGV = group, consumer, task key prefix, then entry, task id pairs.
/// Returns one code per pair: 0 lost (another worker owns it), 1 owned, 2 owned and
/// cancel asked.
const HEARTBEAT_SCRIPT: &str = r#"
local out = {}
for i = 4, #ARGV, 2 do
  local entry = ARGV[i]
  local code = 0
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], entry, entry, 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, entry, 'JUSTID')
    code = 1
    if redis.call('HGET', ARGV[3] .. ARGV[i + 1], 'cancel') == '1' then
      code = 2
    end
  end
  out[#out + 1] = code
end
return out
"#;

/// KEYS = task, text; ARGV = phase, delta, next index, offset, worker, TTL (ms), the
/// text's length (bytes) before `delta`. Raises the recorded progress; only the task's
/// current worker may. Returns 1, 0 (another worker owns the task), or 2 when the
/// recorded text is not what precedes `delta` (a save was lost, or the task was taken
/// over): nothing is recorded then, and the worker rewrites the whole text
/// ([`REWRITE_SCRIPT`]), so the text never has a hole another worker would resume from.
const CHECKPOINT_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[5] then
  return 0
end
if ARGV[2] ~= '' then
  if redis.call('STRLEN', KEYS[2]) ~= tonumber(ARGV[7]) then
    return 2
  end
  redis.call('APPEND', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
for i, field in ipairs({'phase', 'next_index', 'offset'}) do
  local v = ({ARGV[1], ARGV[3], ARGV[4]})[i]
  if tonumber(v) > tonumber(redis.call('HGET', KEYS[1], field) or '0') then
    redis.call('HSET', KEYS[1], field, v)
  end
end
return 1
"#;

/// KEYS = task, text; ARGV = phase, text, next index, offset, worker, TTL (ms).
/// Replaces the recorded text and next index (a repair, a takeover that found messages
/// sent but not recorded, or a restarted answer) and raises phase and offset; only the
/// task's current worker may.
const REWRITE_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[5] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[6])
redis.call('HSET', KEYS[1], 'next_index', ARGV[3])
for i, field in ipairs({'phase', 'offset'}) do
  local v = ({ARGV[1], ARGV[4]})[i]
  if tonumber(v) > tonumber(redis.call('HGET', KEYS[1], field) or '0') then
    redis.call('HSET', KEYS[1], field, v)
  end
end
return 1
"#;

/// KEYS = task, user, queue, text, ended; ARGV = group, entry, status, response, error,
/// retention (ms), worker, task id, max ended, task key prefix. Ends the task unless
/// another worker owns it now (the ended-list part is [`note_ended_lua`]).
const END_SCRIPT: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'status', 'worker')
local done = (not f[1]) or f[1] == 'completed' or f[1] == 'failed' or f[1] == 'cancelled'
if (not done) and f[2] and f[2] ~= ARGV[7] then
  return 0
end
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[3], ARGV[2])
if done then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[3])
if ARGV[3] == 'completed' then
  redis.call('HSET', KEYS[1], 'response', ARGV[4])
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[5])
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('DEL', KEYS[4])
redis.call('SREM', KEYS[2], ARGV[8])
"#;

/// KEYS = task, queue, queued; ARGV = group, entry, worker. Gives a running task back:
/// queued again, this start not counted, and its entry marked idle so the next
/// `XAUTOCLAIM` of any worker takes it at once.
const HAND_BACK_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[3] then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'worker')
redis.call('INCR', KEYS[3])
redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', 3600000000, 'JUSTID')
return 1
"#;

/// KEYS = task, user, queued, ended; ARGV = user id, retention (ms), task id, max
/// ended, task key prefix (the ended-list part is [`note_ended_lua`]).
/// Returns `{outcome, status, chat_id, response, error}` with outcome `none` (no such
/// task of this user), `ended`, `was_queued` (now cancelled) or `running` (cancel
/// flagged for its worker).
const CANCEL_SCRIPT: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'status', 'user_id', 'chat_id', 'response', 'error')
if (not f[1]) or f[2] ~= ARGV[1] then
  return {'none'}
end
local out = {'running', f[1], f[3], f[4] or '', f[5] or ''}
if f[1] == 'completed' or f[1] == 'failed' or f[1] == 'cancelled' then
  out[1] = 'ended'
elseif f[1] == 'queued' then
  out[1] = 'was_queued'
  redis.call('HSET', KEYS[1], 'status', 'cancelled')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[3])
  if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then
    redis.call('DECR', KEYS[3])
  end
"#;

/// The end of [`CANCEL_SCRIPT`], after the ended-list part.
const CANCEL_SCRIPT_END: &str = r#"
else
  redis.call('HSET', KEYS[1], 'cancel', '1')
end
return out
"#;

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
    submit: Script,
    start: Script,
    heartbeat: Script,
    checkpoint: Script,
    rewrite: Script,
    end: Script,
    hand_back: Script,
    cancel: Script,
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
        let queue = Arc::new(Self {
            client: client.clone(),
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
            submit: Script::from_lua(SUBMIT_SCRIPT),
            start: Script::from_lua(START_SCRIPT),
            heartbeat: Script::from_lua(HEARTBEAT_SCRIPT),
            checkpoint: Script::from_lua(CHECKPOINT_SCRIPT),
            rewrite: Script::from_lua(REWRITE_SCRIPT),
            end: Script::from_lua(format!(
                "{END_SCRIPT}{}return 1\n",
                note_ended_lua(5, 8, 9, 10, 6)
            )),
            hand_back: Script::from_lua(HAND_BACK_SCRIPT),
            cancel: Script::from_lua(format!(
                "{CANCEL_SCRIPT}{}{CANCEL_SCRIPT_END}",
                note_ended_lua(4, 3, 4, 5, 2)
            )),
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

    pub fn ready(&self) -> bool {
        self.client.is_connected()
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

    pub async fn submit(&self, request: TaskRequest) -> Result<String, SubmitError> {
        if self.shutdown.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        let task_id = crate::channel::new_id();
        let user_id = request.user_id.as_str();
        let reply = self
            .eval(
                &self.submit,
                vec![
                    task_key(&task_id),
                    user_key(user_id),
                    QUEUE_KEY.to_owned(),
                    QUEUED_KEY.to_owned(),
                ],
                vec![
                    task_id.clone(),
                    user_id.to_owned(),
                    request.chat_id.as_str().to_owned(),
                    request.prompt,
                    request.model,
                    MAX_TASKS_IN_FLIGHT_PER_USER.to_string(),
                    ms(IN_FLIGHT_TTL),
                    TASK_PREFIX.to_owned(),
                ],
            )
            .await?
            .into_array();
        if number(reply.first()) == 0 {
            return Err(SubmitError::TooManyInFlight);
        }
        self.set_queue_depth(number(reply.get(1)));
        Ok(task_id)
    }

    pub async fn get(&self, task_id: &str, user_id: &UserId) -> Result<Option<TaskView>, Unavailable> {
        if !self.client.is_connected() {
            return Err(Unavailable("not connected to Redis".to_owned()));
        }
        let fields: Vec<Value> = tokio::time::timeout(
            COMMAND_TIMEOUT,
            self.client.hmget(
                task_key(task_id),
                vec!["status", "user_id", "chat_id", "response", "error"],
            ),
        )
        .await
        .map_err(|_| Unavailable("Redis did not answer in time".to_owned()))?
        .map_err(unavailable)?;
        if text(fields.get(1)) != user_id.as_str() {
            return Ok(None);
        }
        let Some(status) = status_of(&text(fields.first())) else {
            return Ok(None);
        };
        Ok(Some(TaskView {
            task_id: task_id.to_owned(),
            chat_id: text(fields.get(2)),
            status,
            response: fields.get(3).and_then(Value::as_string),
            error: fields.get(4).and_then(Value::as_string),
        }))
    }

    pub async fn cancel(&self, task_id: &str, user_id: &UserId) -> Result<Option<TaskView>, Unavailable> {
        let reply = self
            .eval(
                &self.cancel,
                vec![
                    task_key(task_id),
                    user_key(user_id.as_str()),
                    QUEUED_KEY.to_owned(),
                    ended_key(user_id.as_str()),
                ],
                vec![
                    user_id.as_str().to_owned(),
                    ms(TASK_RETENTION),
                    task_id.to_owned(),
                    MAX_ENDED_TASKS_PER_USER.to_string(),
                    TASK_PREFIX.to_owned(),
                ],
            )
            .await?
            .into_array();
        let outcome = text(reply.first());
        if outcome == "none" {
            return Ok(None);
        }
        let Some(status) = status_of(&text(reply.get(1))) else {
            return Ok(None);
        };
        let chat_id = text(reply.get(2));
        let view = TaskView {
            task_id: task_id.to_owned(),
            chat_id: chat_id.clone(),
            status,
            response: Some(text(reply.get(3))).filter(|s| !s.is_empty()),
            error: Some(text(reply.get(4))).filter(|s| !s.is_empty()),
        };
        if outcome == "was_queued" {
            // No worker has it: this node ends the stream.
            if let Ok(chat_id) = ChatId::parse(&chat_id) {
                let request = TaskRequest {
                    user_id: user_id.clone(),
                    chat_id,
                    prompt: String::new(),
                    model: String::new(),
                };
                // The cancel script has recorded the end already.
                worker::publish_unstarted_end(
                    &self.ctx,
                    task_id,
                    &request,
                    TaskStatus::Cancelled,
                    None,
                    &AlreadyRecorded,
                )
                .await;
            }
            self.ctx
                .publisher
                .metrics()
                .task_ended(TaskStatus::Cancelled.as_str());
        } else if outcome == "running" {
            // Quicker than the worker's next heartbeat when it runs here.
            if let Some(running) = lock(&self.running).get(task_id) {
                running.cancel.cancel();
            }
        }
        Ok(Some(view))
    }

    /// Takes entries (new ones, or a dead worker's) whenever a worker is free, until
    /// shutdown. Each command takes as many entries as there are free workers (up to
    /// [`MAX_BATCH`]), so the tasks of a dead worker are taken over together, not one
    /// per round.
    async fn consume(self: Arc<Self>, reader: fred::prelude::Client) {
        let mut group_ready = false;
        // When to look for abandoned entries next, and where the last look stopped in
        // the group's pending list ("0-0": the start).
        let mut reclaim_at = Instant::now();
        let mut cursor = "0-0".to_owned();
        loop {
            let permit = tokio::select! {
                () = self.shutdown.cancelled() => return,
                permit = self.workers.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            if !group_ready {
                group_ready = self.ensure_group().await;
                if !group_ready {
                    drop(permit);
                    self.pause().await;
                    continue;
                }
            }
            // This loop is the only one taking permits, so the free ones stay free
            // until the entries are handed out.
            let count = (1 + self.workers.available_permits()).min(MAX_BATCH);
            let mut taken = Vec::new();
            if Instant::now() >= reclaim_at {
                match self.reclaim(&cursor, count).await {
                    Ok((next, entries)) => {
                        // Look again at once while the pending list has more to show.
                        let more = next != "0-0" || entries.len() == count;
                        if !more {
                            reclaim_at = Instant::now() + self.timing.reclaim_every;
                        }
                        cursor = next;
                        taken = entries;
                    }
                    Err(err) => {
                        group_ready = !err.contains("NOGROUP");
                        reclaim_at = Instant::now() + self.timing.reclaim_every;
                        cursor = "0-0".to_owned();
                        tracing::debug!(error = %err, "looking for abandoned tasks failed");
                    }
                }
                self.refresh_queue_depth().await;
            }
            if taken.is_empty() {
                // Wait for new entries until the next look for abandoned ones is due.
                let block = reclaim_at
                    .saturating_duration_since(Instant::now())
                    .clamp(MIN_READ_BLOCK, READ_BLOCK);
                let read = tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    read = self.read(&reader, count, block) => read,
                };
                match read {
                    Ok(entries) => taken = entries,
                    Err(err) => {
                        group_ready = !err.contains("NOGROUP");
                        tracing::debug!(error = %err, "reading the task queue failed");
                        drop(permit);
                        self.pause().await;
                        continue;
                    }
                }
            }
            let mut permit = Some(permit);
            for (entry, task_id) in taken {
                let permit = permit
                    .take()
                    .or_else(|| self.workers.clone().try_acquire_owned().ok());
                let queue = self.clone();
                self.tracker
                    .spawn(async move { queue.run_entry(entry, task_id, permit).await });
            }
        }
    }

    async fn pause(&self) {
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            () = tokio::time::sleep(RETRY_PAUSE) => {}
        }
    }

    /// Creates the consumer group (and the stream) unless it exists. A Redis without
    /// persistence that restarted has neither.
    async fn ensure_group(&self) -> bool {
        let created: Result<Value, _> = self.client.xgroup_create(QUEUE_KEY, GROUP, "0", true).await;
        match created {
            Ok(_) => true,
            Err(err) if err.details().contains("BUSYGROUP") => true,
            Err(err) => {
                tracing::debug!(error = %err, "creating the task queue's consumer group failed");
                false
            }
        }
    }

    async fn refresh_queue_depth(&self) {
        if let Ok(Ok(queued)) =
            tokio::time::timeout(COMMAND_TIMEOUT, self.client.get::<Option<u64>, _>(QUEUED_KEY)).await
        {
            self.set_queue_depth(queued.unwrap_or(0));
        }
    }

    /// Up to `count` new entries, waiting up to `block` for the first.
    async fn read(
        &self,
        reader: &fred::prelude::Client,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(String, String)>, String> {
        if !reader.is_connected() {
            return Err("not connected to Redis".to_owned());
        }
        let block_ms = u64::try_from(block.as_millis()).unwrap_or(1000).max(1);
        let reply = tokio::time::timeout(
            block + COMMAND_TIMEOUT,
            reader.xreadgroup(
                GROUP,
                self.node_id.as_str(),
                Some(u64::try_from(count).unwrap_or(1)),
                Some(block_ms),
                false,
                QUEUE_KEY,
                ">",
            ),
        )
        .await;
        let reply = answered(reply)?;
        // [[queue, [[entry, [field, value, …]], …]]] or nil
        let entries = reply
            .into_array()
            .into_iter()
            .next()
            .and_then(|stream| stream.into_array().into_iter().nth(1))
            .map(Value::into_array)
            .unwrap_or_default();
        Ok(entries.into_iter().filter_map(parse_entry).collect())
    }

    /// Up to `count` entries whose worker stopped renewing them, from `cursor` on in the
    /// group's pending list, now owned by this node; and where the next look starts.
    async fn reclaim(&self, cursor: &str, count: usize) -> Result<(String, Vec<(String, String)>), String> {
        let idle_ms = u64::try_from(self.timing.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let reply = tokio::time::timeout(
            COMMAND_TIMEOUT,
            self.client.xautoclaim(
                QUEUE_KEY,
                GROUP,
                self.node_id.as_str(),
                idle_ms,
                cursor,
                Some(u64::try_from(count).unwrap_or(1)),
                false,
            ),
        )
        .await;
        let reply = answered(reply)?;
        // [cursor, [[entry, [field, value, …]] | nil, …], deleted ids]
        let mut parts = reply.into_array().into_iter();
        let next = parts
            .next()
            .and_then(|cursor| cursor.as_string())
            .unwrap_or_else(|| "0-0".to_owned());
        let taken: Vec<(String, String)> = parts
            .next()
            .map(Value::into_array)
            .unwrap_or_default()
            .into_iter()
            .filter_map(parse_entry)
            .collect();
        if !taken.is_empty() {
            tracing::info!(tasks = taken.len(), "taking over tasks whose worker stopped");
        }
        for (_, task_id) in &taken {
            tracing::debug!(
                task_id = task_id.as_str(),
                "taking over a task whose worker stopped"
            );
        }
        Ok((next, taken))
    }

    /// Runs one taken entry to its end (or until it is lost or handed back). The entry
    /// is renewed by the heartbeat from the start: starting it and reading its stream
    /// back must not let it look idle to other workers.
    async fn run_entry(
        self: Arc<Self>,
        entry: String,
        task_id: String,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let run = Running {
            run: self.runs.fetch_add(1, Ordering::Relaxed),
            entry: entry.clone(),
            cancel: CancellationToken::new(),
            abandon: CancellationToken::new(),
        };
        let (run_id, cancel, abandon) = (run.run, run.cancel.clone(), run.abandon.clone());
        if let Some(previous) = lock(&self.running).insert(task_id.clone(), run) {
            // This node took back an entry it had let lapse: the earlier run is over.
            previous.abandon.cancel();
        }
        let _permit = match permit {
            Some(permit) => Some(permit),
            None => self.workers.clone().acquire_owned().await.ok(),
        };
        self.start_entry(&entry, &task_id, &cancel, &abandon).await;
        let mut running = lock(&self.running);
        if running.get(&task_id).is_some_and(|r| r.run == run_id) {
            running.remove(&task_id);
        }
    }

    /// Starts a taken entry ([`START_SCRIPT`]) and runs its task.
    async fn start_entry(
        &self,
        entry: &str,
        task_id: &str,
        cancel: &CancellationToken,
        abandon: &CancellationToken,
    ) {
        let reply = match self
            .eval(
                &self.start,
                vec![
                    task_key(task_id),
                    QUEUED_KEY.to_owned(),
                    QUEUE_KEY.to_owned(),
                    text_key(task_id),
                ],
                vec![
                    GROUP.to_owned(),
                    entry.to_owned(),
                    self.node_id.clone(),
                    MAX_ATTEMPTS.to_string(),
                ],
            )
            .await
        {
            Ok(reply) => reply.into_array(),
            Err(err) => {
                // The entry stays pending with this node: retried once it looks idle.
                tracing::warn!(task_id, error = %err, "starting a task failed");
                return;
            }
        };
        let action = text(reply.first());
        if action == "skip" {
            return;
        }
        self.set_queue_depth(number(reply.get(9)));
        let (Ok(user_id), Ok(chat_id)) = (
            UserId::parse(&text(reply.get(1))),
            ChatId::parse(&text(reply.get(2))),
        ) else {
            tracing::warn!(task_id, "a task record is malformed; dropping it");
            self.end(entry, task_id, "", TaskStatus::Failed, None, Some("invalid task"))
                .await;
            return;
        };
        let request = TaskRequest {
            user_id,
            chat_id,
            prompt: text(reply.get(3)),
            model: text(reply.get(4)),
        };
        let checkpoint = RedisCheckpoint {
            queue: self,
            task_id,
            entry,
            user_id: request.user_id.as_str(),
        };
        let unstarted = match action.as_str() {
            "cancel" => Some((TaskStatus::Cancelled, None)),
            "exhausted" => {
                tracing::warn!(task_id, "task given up after {MAX_ATTEMPTS} interrupted attempts");
                Some((TaskStatus::Failed, Some(GAVE_UP)))
            }
            _ => None,
        };
        if let Some((status, error)) = unstarted {
            worker::publish_unstarted_end(&self.ctx, task_id, &request, status, error, &checkpoint).await;
            return;
        }
        let mut resume = Resume {
            phase: Phase::from_u8(u8::try_from(number(reply.get(5))).unwrap_or(0)),
            text: text(reply.get(8)),
            next_index: number(reply.get(6)),
        };
        // A first start has sent nothing: only a task taken over (or handed back, which
        // does not count as an attempt) reads its stream back.
        if number(reply.get(10)) > 1 || resume.phase > Phase::New {
            resume = self.resume(task_id, &request, resume, number(reply.get(7))).await;
        }
        let outcome = worker::run(
            &self.ctx,
            Job {
                task_id,
                request: &request,
                cancel,
                abandon,
                resume,
                checkpoint: &checkpoint,
            },
        )
        .await;
        match outcome {
            // The end was recorded before the last message went out.
            Some(_) => {}
            None if abandon.is_cancelled() => {
                tracing::warn!(task_id, "task lost to another worker; stopped");
            }
            None => self.hand_back(entry, task_id).await,
        }
    }

    /// Where the stream of a task taken over stands: the recorded progress, plus what
    /// the frame stream's history holds after the last recorded message (a worker can
    /// die between sending a message and recording it). What the history added is
    /// recorded at once, before anything else is sent: this worker's saves extend the
    /// recorded text, which must then hold everything sent, or a later takeover would
    /// resume from a text with a hole and take its own answer for a different one.
    async fn resume(&self, task_id: &str, request: &TaskRequest, mut resume: Resume, offset: u64) -> Resume {
        if self.history_size == 0 {
            return resume;
        }
        let Some(channel) = worker::frames_channel(request) else {
            return resume;
        };
        let recorded = resume.clone();
        let mut last_offset = offset;
        match self.broker.history(&channel, offset, self.history_size).await {
            Ok(history) => {
                for message in history.messages {
                    let Ok(json) = serde_json::from_slice::<Json>(&message.bytes) else {
                        continue;
                    };
                    if json.get("task_id").and_then(Json::as_str) == Some(task_id) {
                        resume.observe(&json);
                        last_offset = last_offset.max(message.offset);
                    }
                }
            }
            Err(err) => tracing::warn!(task_id, error = %err, "reading the stream to resume a task failed"),
        }
        if resume != recorded {
            let rewritten = self
                .rewrite(
                    task_id,
                    resume.phase,
                    &resume.text,
                    resume.next_index,
                    last_offset,
                )
                .await;
            if let Err(err) = rewritten {
                // This worker's next save finds the text behind and rewrites it.
                tracing::debug!(task_id, error = %err, "recording a resumed task's progress failed");
            }
        }
        resume
    }

    /// Replaces a task's recorded text and next frame index ([`REWRITE_SCRIPT`]).
    async fn rewrite(
        &self,
        task_id: &str,
        phase: Phase,
        text: &str,
        next_index: u64,
        offset: u64,
    ) -> Result<u64, Unavailable> {
        self.eval(
            &self.rewrite,
            vec![task_key(task_id), text_key(task_id)],
            vec![
                phase.as_u8().to_string(),
                text.to_owned(),
                next_index.to_string(),
                offset.to_string(),
                self.node_id.clone(),
                ms(IN_FLIGHT_TTL),
            ],
        )
        .await
        .map(|value| number(Some(&value)))
    }

    async fn end(
        &self,
        entry: &str,
        task_id: &str,
        user_id: &str,
        status: TaskStatus,
        response: Option<&str>,
        error: Option<&str>,
    ) {
        let ended = self
            .eval(
                &self.end,
                vec![
                    task_key(task_id),
                    user_key(user_id),
                    QUEUE_KEY.to_owned(),
                    text_key(task_id),
                    ended_key(user_id),
                ],
                vec![
                    GROUP.to_owned(),
                    entry.to_owned(),
                    status.as_str().to_owned(),
                    response.unwrap_or_default().to_owned(),
                    error.unwrap_or_default().to_owned(),
                    ms(TASK_RETENTION),
                    self.node_id.clone(),
                    task_id.to_owned(),
                    MAX_ENDED_TASKS_PER_USER.to_string(),
                    TASK_PREFIX.to_owned(),
                ],
            )
            .await;
        match ended {
            Ok(value) if number(Some(&value)) == 1 => {
                self.ctx.publisher.metrics().task_ended(status.as_str());
            }
            Ok(_) => {}
            // The entry stays pending: another worker takes it over and finds the
            // stream complete ([`Phase::Completed`]), so it only records the end.
            Err(err) => tracing::warn!(task_id, error = %err, "recording a task's end failed"),
        }
    }

    async fn hand_back(&self, entry: &str, task_id: &str) {
        let handed = self
            .eval(
                &self.hand_back,
                vec![task_key(task_id), QUEUE_KEY.to_owned(), QUEUED_KEY.to_owned()],
                vec![GROUP.to_owned(), entry.to_owned(), self.node_id.clone()],
            )
            .await;
        if let Err(err) = handed {
            tracing::warn!(task_id, error = %err, "handing a task back failed; it is taken over once idle");
        }
    }

    /// Renews this node's claims on the entries it runs and passes on cancels, until
    /// `stop` (after the drain) and no task is left.
    async fn renew_claims(self: Arc<Self>, stop: CancellationToken) {
        // When the last renewal that succeeded was sent: the claims are this node's
        // until `lease` after it, however long the answer took.
        let mut last_renewed = Instant::now();
        let mut tick = tokio::time::interval(self.timing.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let running: Vec<(String, String, CancellationToken, CancellationToken)> = lock(&self.running)
                .iter()
                .map(|(task_id, r)| {
                    (
                        task_id.clone(),
                        r.entry.clone(),
                        r.cancel.clone(),
                        r.abandon.clone(),
                    )
                })
                .collect();
            if running.is_empty() {
                last_renewed = Instant::now();
                *lock(&self.lease_until) = last_renewed + self.timing.lease;
                continue;
            }
            let mut args = vec![GROUP.to_owned(), self.node_id.clone(), TASK_PREFIX.to_owned()];
            for (task_id, entry, _, _) in &running {
                args.push(entry.clone());
                args.push(task_id.clone());
            }
            let sent_at = Instant::now();
            let deadline = last_renewed + self.timing.lease;
            let renewed = tokio::time::timeout_at(
                deadline,
                self.eval(&self.heartbeat, vec![QUEUE_KEY.to_owned()], args),
            )
            .await
            .unwrap_or_else(|_| Err(Unavailable("Redis did not answer within the lease".to_owned())));
            match renewed {
                Ok(codes) => {
                    last_renewed = sent_at;
                    *lock(&self.lease_until) = sent_at + self.timing.lease;
                    for ((task_id, _, cancel, abandon), code) in running.iter().zip(codes.into_array()) {
                        match number(Some(&code)) {
                            0 => {
                                tracing::warn!(
                                    task_id = task_id.as_str(),
                                    "another worker took this task over"
                                );
                                abandon.cancel();
                            }
                            2 => cancel.cancel(),
                            _ => {}
                        }
                    }
                }
                Err(err) if Instant::now() >= deadline => {
                    tracing::warn!(
                        error = %err,
                        tasks = running.len(),
                        "cannot renew task claims in Redis; stopping those tasks so another worker can take them"
                    );
                    for (_, _, _, abandon) in &running {
                        abandon.cancel();
                    }
                }
                Err(err) => tracing::debug!(error = %err, "renewing task claims failed; retrying"),
            }
        }
    }
}

/// The reply of a command run under a timeout, or why there is none.
fn answered(
    reply: Result<Result<Value, fred::error::Error>, tokio::time::error::Elapsed>,
) -> Result<Value, String> {
    match reply {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("Redis did not answer in time".to_owned()),
    }
}

/// `(entry id, task id)` from a stream entry `[id, [field, value, …]]`.
fn parse_entry(entry: Value) -> Option<(String, String)> {
    let mut parts = entry.into_array().into_iter();
    let id = parts.next()?.as_string()?;
    let fields = parts.next()?.into_array();
    let task_id = fields
        .chunks(2)
        .find(|pair| pair.first().and_then(Value::as_string).as_deref() == Some("task"))
        .and_then(|pair| pair.get(1))
        .and_then(Value::as_string)?;
    Some((id, task_id))
}

/// Records a running task's progress and end in its Redis record.
struct RedisCheckpoint<'a> {
    queue: &'a RedisQueue,
    task_id: &'a str,
    entry: &'a str,
    user_id: &'a str,
}

/// For an end a script has recorded already.
struct AlreadyRecorded;

#[async_trait]
impl Checkpoint for AlreadyRecorded {
    async fn save(&self, _progress: Progress<'_>) {}

    async fn finish(&self, _outcome: &Outcome) {}
}

#[async_trait]
impl Checkpoint for RedisCheckpoint<'_> {
    async fn save(&self, progress: Progress<'_>) {
        let delta = progress.delta();
        let mut saved = Ok(2);
        if !progress.restarted {
            saved = self
                .queue
                .eval(
                    &self.queue.checkpoint,
                    vec![task_key(self.task_id), text_key(self.task_id)],
                    vec![
                        progress.phase.as_u8().to_string(),
                        delta.to_owned(),
                        progress.next_index.to_string(),
                        progress.offset.to_string(),
                        self.queue.node_id.clone(),
                        ms(IN_FLIGHT_TTL),
                        (progress.text.len() - delta.len()).to_string(),
                    ],
                )
                .await
                .map(|value| number(Some(&value)));
        }
        if let Ok(2) = saved {
            // Restarted, or the recorded text is not what preceded this delta.
            saved = self
                .queue
                .rewrite(
                    self.task_id,
                    progress.phase,
                    progress.text,
                    progress.next_index,
                    progress.offset,
                )
                .await;
        }
        if let Err(err) = saved {
            // The next save finds the text behind and rewrites it.
            tracing::debug!(task_id = self.task_id, error = %err, "recording task progress failed");
        }
    }

    fn may_send(&self) -> bool {
        Instant::now() < *lock(&self.queue.lease_until)
    }

    async fn finish(&self, outcome: &Outcome) {
        self.queue
            .end(
                self.entry,
                self.task_id,
                self.user_id,
                outcome.status,
                outcome.response.as_deref(),
                outcome.error.as_deref(),
            )
            .await;
    }
}
