//! LLM generation tasks: the registry (status while queued, running and for
//! [`TASK_RETENTION`] after), the in-process queue with bounded concurrency
//! (`HERALD_WORKERS`), per-user limits and cancellation.
//!
//! A task runs in [`worker`], which publishes the stream's messages to the user's
//! `frames:{user_id}` channel through the broker like any other publisher: tasks know
//! nothing of sockets.

pub mod worker;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Publisher;
use crate::config::Config;
use crate::ids::{ChatId, UserId};
use crate::llm::LlmProvider;
use crate::store::Store;

/// Tasks in flight (queued or running) one user may have (documented: 429 beyond).
pub const MAX_TASKS_IN_FLIGHT_PER_USER: usize = 3;

/// How long an ended task stays queryable.
pub const TASK_RETENTION: Duration = Duration::from_secs(3600);

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("more than 3 tasks in flight for this user; wait for one to finish")]
    TooManyInFlight,
    #[error("this node runs no LLM workers (HERALD_WORKERS=0) and no shared queue is configured")]
    NoWorkers,
    #[error("the server is shutting down; retry on another node")]
    ShuttingDown,
}

struct Record {
    user_id: UserId,
    chat_id: String,
    status: TaskStatus,
    response: Option<String>,
    error: Option<String>,
    cancel: CancellationToken,
}

/// The in-process task queue and registry. Cheap to clone.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

/// Every count the registry needs, kept up to date as tasks change state, so no
/// operation scans all tasks.
#[derive(Default)]
struct Registry {
    records: HashMap<String, Record>,
    /// Queued or running tasks per user (the 3-in-flight limit).
    in_flight: HashMap<UserId, usize>,
    /// Tasks waiting for a worker (the queue-depth gauge).
    queued: usize,
    /// Ended tasks, oldest first, forgotten after [`TASK_RETENTION`].
    ended: VecDeque<(Instant, String)>,
}

impl Registry {
    fn forget_expired(&mut self, now: Instant) {
        while let Some((at, _)) = self.ended.front() {
            if now.duration_since(*at) < TASK_RETENTION {
                break;
            }
            if let Some((_, task_id)) = self.ended.pop_front() {
                self.records.remove(&task_id);
            }
        }
    }
}

struct Inner {
    registry: Mutex<Registry>,
    /// One permit per task allowed to run at once (`HERALD_WORKERS`).
    workers: Arc<Semaphore>,
    n_workers: usize,
    ctx: worker::Context,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Tasks {
    pub fn new(
        config: &Config,
        workers: usize,
        provider: Arc<dyn LlmProvider>,
        publisher: Publisher,
        store: Store,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(Registry::default()),
                workers: Arc::new(Semaphore::new(workers)),
                n_workers: workers,
                ctx: worker::Context {
                    provider,
                    publisher,
                    store,
                    context_messages: config.chat_context_messages,
                    coalesce: config.frame_coalesce,
                    shutdown: shutdown.clone(),
                    drain: config.shutdown_drain,
                },
                tracker,
                shutdown,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Critical sections are short map and counter updates; a poisoned lock is still
        // consistent.
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The live provider's name (`echo` or `openai-compatible`).
    pub fn provider_name(&self) -> &'static str {
        self.inner.ctx.provider.name()
    }

    /// Queues a task and returns its id.
    pub fn submit(&self, request: TaskRequest) -> Result<String, SubmitError> {
        if self.inner.n_workers == 0 {
            return Err(SubmitError::NoWorkers);
        }
        if self.inner.shutdown.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        let task_id = crate::channel::new_id();
        let cancel = CancellationToken::new();
        {
            let mut registry = self.lock();
            registry.forget_expired(Instant::now());
            let in_flight = registry.in_flight.entry(request.user_id.clone()).or_insert(0);
            if *in_flight >= MAX_TASKS_IN_FLIGHT_PER_USER {
                return Err(SubmitError::TooManyInFlight);
            }
            *in_flight += 1;
            registry.queued += 1;
            let queued = registry.queued;
            self.set_queue_depth(queued);
            registry.records.insert(
                task_id.clone(),
                Record {
                    user_id: request.user_id.clone(),
                    chat_id: request.chat_id.as_str().to_owned(),
                    status: TaskStatus::Queued,
                    response: None,
                    error: None,
                    cancel: cancel.clone(),
                },
            );
        }
        let tasks = self.clone();
        let id = task_id.clone();
        self.inner.tracker.spawn(async move {
            let permit = tokio::select! {
                permit = tasks.inner.workers.clone().acquire_owned() => permit,
                () = cancel.cancelled() => {
                    tasks.finish_unstarted(&id, &request, TaskStatus::Cancelled, None).await;
                    return;
                }
                () = tasks.inner.shutdown.cancelled() => {
                    tasks.finish_unstarted(&id, &request, TaskStatus::Failed, Some("the server shut down before the task started")).await;
                    return;
                }
            };
            let Ok(_permit) = permit else {
                return;
            };
            tasks.set_status(&id, TaskStatus::Running, None, None);
            let outcome = worker::run(&tasks.inner.ctx, &id, &request, &cancel).await;
            tasks.set_status(&id, outcome.status, outcome.response, outcome.error);
        });
        Ok(task_id)
    }

    async fn finish_unstarted(
        &self,
        task_id: &str,
        request: &TaskRequest,
        status: TaskStatus,
        error: Option<&str>,
    ) {
        worker::publish_unstarted_end(&self.inner.ctx, task_id, request, status, error).await;
        self.set_status(task_id, status, None, error.map(str::to_owned));
    }

    fn set_status(&self, task_id: &str, status: TaskStatus, response: Option<String>, error: Option<String>) {
        let mut registry = self.lock();
        let registry = &mut *registry;
        let Some(record) = registry.records.get_mut(task_id) else {
            return;
        };
        let was = record.status;
        if was.is_done() {
            return;
        }
        record.status = status;
        if response.is_some() {
            record.response = response;
        }
        if error.is_some() {
            record.error = error;
        }
        if was == TaskStatus::Queued && status != TaskStatus::Queued {
            registry.queued = registry.queued.saturating_sub(1);
            self.set_queue_depth(registry.queued);
        }
        if status.is_done() {
            if let Some(n) = registry.in_flight.get_mut(&record.user_id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    registry.in_flight.remove(&record.user_id);
                }
            }
            let now = Instant::now();
            registry.ended.push_back((now, task_id.to_owned()));
            registry.forget_expired(now);
            self.inner.ctx.publisher.metrics().task_ended(status.as_str());
        }
    }

    fn set_queue_depth(&self, queued: usize) {
        self.inner
            .ctx
            .publisher
            .metrics()
            .set_task_queue_depth(i64::try_from(queued).unwrap_or(i64::MAX));
    }

    /// The task, if it exists and belongs to `user_id`.
    pub fn get(&self, task_id: &str, user_id: &UserId) -> Option<TaskView> {
        let registry = self.lock();
        let record = registry.records.get(task_id).filter(|r| &r.user_id == user_id)?;
        Some(TaskView {
            task_id: task_id.to_owned(),
            chat_id: record.chat_id.clone(),
            status: record.status,
            response: record.response.clone(),
            error: record.error.clone(),
        })
    }

    /// Asks a task of `user_id` to stop. Returns its view, or `None` if there is no such
    /// task of this user. Cancelling an ended task changes nothing.
    pub fn cancel(&self, task_id: &str, user_id: &UserId) -> Option<TaskView> {
        let view = self.get(task_id, user_id)?;
        if !view.status.is_done() {
            if let Some(record) = self.lock().records.get(task_id) {
                record.cancel.cancel();
            }
        }
        Some(view)
    }
}
