//! LLM generation tasks: submit, status, cancel, and the workers that run them.
//!
//! Two queues behind one [`Tasks`] handle, with the same behaviour:
//! - [`local`]: memory mode; the queue and the task registry live in this process.
//! - [`redis`]: with `HERALD_REDIS_URL`; the queue is a Redis stream read by a consumer
//!   group, so any node's workers (and `herald worker` processes) take tasks queued on
//!   any node, a dead worker's task is taken over, and status and cancel work from
//!   every node.
//!
//! A task runs in [`worker`], which publishes the stream's messages to the user's
//! `frames:{user_id}` channel through the broker like any other publisher: tasks know
//! nothing of sockets.

pub mod local;
pub mod redis;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Publisher};
use crate::config::Config;
use crate::ids::{ChatId, UserId};
use crate::llm::LlmProvider;
use crate::store::Store;

/// Tasks in flight (queued or running) one user may have (documented: 429 beyond).
pub const MAX_TASKS_IN_FLIGHT_PER_USER: usize = 3;

/// How long an ended task stays queryable.
pub const TASK_RETENTION: Duration = Duration::from_secs(3600);

/// Ended tasks kept per user within [`TASK_RETENTION`]; the oldest is forgotten first
/// (a submit-and-cancel loop cannot grow the registry).
pub const MAX_ENDED_TASKS_PER_USER: usize = 200;

/// Longest prompt accepted, in characters (documented: 400 beyond).
pub const MAX_PROMPT_CHARS: usize = 32_000;

/// A task's status, as `GET /api/chat/tasks/{id}` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_done(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// What a user asked for.
#[derive(Debug, Clone)]
pub struct TaskRequest {
    pub user_id: UserId,
    pub chat_id: ChatId,
    pub prompt: String,
    /// The model to send upstream; `HERALD_LLM_MODEL` when the request names none.
    pub model: String,
}

/// A task as its owner may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskView {
    pub task_id: String,
    pub chat_id: String,
    pub status: TaskStatus,
    pub response: Option<String>,
    pub error: Option<String>,
}

/// Why a task was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("more than 3 tasks in flight for this user; wait for one to finish")]
    TooManyInFlight,
    #[error("this node runs no LLM workers (HERALD_WORKERS=0) and no shared queue is configured")]
    NoWorkers,
    #[error("the server is shutting down; retry on another node")]
    ShuttingDown,
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
}

/// The shared task queue could not be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the task queue is unavailable ({0}); retry shortly")]
pub struct Unavailable(pub String);

/// What every task of a node needs, whichever queue runs it.
pub struct Parts {
    pub provider: Arc<dyn LlmProvider>,
    pub publisher: Publisher,
    pub broker: Arc<dyn Broker>,
    pub store: Store,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
}

impl Parts {
    fn context(&self, config: &Config, hand_back_on_shutdown: bool) -> Arc<worker::Context> {
        Arc::new(worker::Context {
            provider: self.provider.clone(),
            publisher: self.publisher.clone(),
            store: self.store.clone(),
            context_messages: config.chat_context_messages,
            coalesce: config.frame_coalesce,
            shutdown: self.shutdown.clone(),
            drain: config.shutdown_drain,
            hand_back_on_shutdown,
        })
    }
}

#[derive(Clone)]
enum Queue {
    Local(local::LocalQueue),
    Redis(Arc<redis::RedisQueue>),
}

/// The node's handle on the task queue. Cheap to clone.
#[derive(Clone)]
pub struct Tasks {
    queue: Queue,
    provider_name: &'static str,
}

impl Tasks {
    /// The in-process queue, running up to `workers` tasks at once.
    pub fn local(config: &Config, workers: usize, parts: &Parts) -> Self {
        let ctx = parts.context(config, false);
        Self {
            queue: Queue::Local(local::LocalQueue::new(
                workers,
                ctx,
                parts.tracker.clone(),
                parts.shutdown.clone(),
            )),
            provider_name: parts.provider.name(),
        }
    }

    /// The shared queue on Redis at `url`; this process runs up to `workers` tasks at
    /// once (0: it only submits). `stop` closes its connections (after the drain).
    pub async fn redis(
        url: &str,
        config: &Config,
        workers: usize,
        parts: &Parts,
        node_id: &str,
        stop: &CancellationToken,
    ) -> Result<Self, Unavailable> {
        let ctx = parts.context(config, true);
        let queue = redis::RedisQueue::start(url, config, workers, ctx, parts, node_id, stop).await?;
        Ok(Self {
            queue: Queue::Redis(queue),
            provider_name: parts.provider.name(),
        })
    }

    /// The live provider's name (`echo` or `openai-compatible`).
    pub fn provider_name(&self) -> &'static str {
        self.provider_name
    }

    /// Queues a task and returns its id.
    pub async fn submit(&self, request: TaskRequest) -> Result<String, SubmitError> {
        match &self.queue {
            Queue::Local(queue) => queue.submit(request),
            // Boxed: the Redis call's future is ~7 KB, and every request's future (moved
            // into a box by the router) would carry it even with the local queue.
            Queue::Redis(queue) => Box::pin(queue.submit(request)).await,
        }
    }

    /// The task, if it exists and belongs to `user_id`.
    pub async fn get(&self, task_id: &str, user_id: &UserId) -> Result<Option<TaskView>, Unavailable> {
        match &self.queue {
            Queue::Local(queue) => Ok(queue.get(task_id, user_id)),
            Queue::Redis(queue) => Box::pin(queue.get(task_id, user_id)).await,
        }
    }

    /// Asks a task of `user_id` to stop. Returns its view as it was, or `None` if there
    /// is no such task of this user. Cancelling an ended task changes nothing.
    pub async fn cancel(&self, task_id: &str, user_id: &UserId) -> Result<Option<TaskView>, Unavailable> {
        match &self.queue {
            Queue::Local(queue) => Ok(queue.cancel(task_id, user_id)),
            Queue::Redis(queue) => Box::pin(queue.cancel(task_id, user_id)).await,
        }
    }

    /// Whether the queue can take tasks (memory mode: always).
    pub fn ready(&self) -> bool {
        match &self.queue {
            Queue::Local(_) => true,
            Queue::Redis(queue) => queue.ready(),
        }
    }
}
