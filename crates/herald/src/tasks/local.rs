//! The in-process task queue of one node (memory mode): the registry of tasks (status
//! while queued, running and for [`TASK_RETENTION`] after), a semaphore of
//! `HERALD_WORKERS` permits, the per-user in-flight limit and cancellation.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ids::UserId;
use crate::tasks::worker::{self, Checkpoint, Context, Job, Outcome, Progress};
use crate::tasks::{
    SubmitError, TaskRequest, TaskStatus, TaskView, MAX_ENDED_TASKS_PER_USER, MAX_TASKS_IN_FLIGHT_PER_USER,
    TASK_RETENTION,
};

/// The error of a task still queued when the node shut down.
const NOT_STARTED: &str = "LLM processing failed: the server shut down before the task started";

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
pub struct LocalQueue {
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
    /// Each user's ended tasks still kept, oldest first: at most
    /// [`MAX_ENDED_TASKS_PER_USER`].
    ended_by_user: HashMap<UserId, VecDeque<String>>,
}

impl Registry {
    fn forget_expired(&mut self, now: Instant) {
        while let Some((at, _)) = self.ended.front() {
            if now.duration_since(*at) < TASK_RETENTION {
                break;
            }
            if let Some((_, task_id)) = self.ended.pop_front() {
                if let Some(record) = self.records.remove(&task_id) {
                    self.forget_ended_of(&record.user_id, &task_id);
                }
            }
        }
    }

    /// Drops `task_id` from its user's ended list (it is the oldest there).
    fn forget_ended_of(&mut self, user_id: &UserId, task_id: &str) {
        if let Some(list) = self.ended_by_user.get_mut(user_id) {
            if list.front().is_some_and(|id| id == task_id) {
                list.pop_front();
            } else {
                list.retain(|id| id != task_id);
            }
            if list.is_empty() {
                self.ended_by_user.remove(user_id);
            }
        }
    }

    /// Notes a task's end; beyond [`MAX_ENDED_TASKS_PER_USER`] the user's oldest ended
    /// task is forgotten.
    fn note_ended(&mut self, user_id: &UserId, task_id: &str, now: Instant) {
        self.ended.push_back((now, task_id.to_owned()));
        let list = self.ended_by_user.entry(user_id.clone()).or_default();
        list.push_back(task_id.to_owned());
        while list.len() > MAX_ENDED_TASKS_PER_USER {
            if let Some(oldest) = list.pop_front() {
                self.records.remove(&oldest);
            }
        }
        // The global list's entries of forgotten tasks are skipped when they expire;
        // compact it when they outnumber the tasks kept.
        if self.ended.len() > 2 * self.records.len() + 1024 {
            let records = &self.records;
            self.ended.retain(|(_, id)| records.contains_key(id));
        }
        self.forget_expired(now);
    }
}

struct Inner {
    registry: Mutex<Registry>,
    /// One permit per task allowed to run at once (`HERALD_WORKERS`).
    workers: Arc<Semaphore>,
    n_workers: usize,
    ctx: Arc<Context>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl LocalQueue {
    pub fn new(workers: usize, ctx: Arc<Context>, tracker: TaskTracker, shutdown: CancellationToken) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(Registry::default()),
                workers: Arc::new(Semaphore::new(workers)),
                n_workers: workers,
                ctx,
                tracker,
                shutdown,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Critical sections are short map and counter updates; a poisoned lock is still
        // consistent.
        crate::sync::lock(&self.inner.registry)
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
                    tasks.finish_unstarted(&id, &request, TaskStatus::Failed, Some(NOT_STARTED)).await;
                    return;
                }
            };
            let Ok(_permit) = permit else {
                return;
            };
            tasks.set_status(&id, TaskStatus::Running, None, None);
            let never = CancellationToken::new();
            let registry = Registered {
                tasks: &tasks,
                task_id: &id,
            };
            let job = Job {
                task_id: &id,
                request: &request,
                cancel: &cancel,
                abandon: &never,
                resume: worker::Resume::default(),
                checkpoint: &registry,
            };
            if worker::run(&tasks.inner.ctx, job).await.is_none() {
                // Memory mode never hands a task back; should it ever, the task must not
                // look alive forever.
                tasks.set_status(&id, TaskStatus::Failed, None, Some(worker::SHUT_DOWN.to_owned()));
            }
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
        let registry = Registered { tasks: self, task_id };
        worker::publish_unstarted_end(&self.inner.ctx, task_id, request, status, error, &registry).await;
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
            let user_id = record.user_id.clone();
            if let Some(n) = registry.in_flight.get_mut(&user_id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    registry.in_flight.remove(&user_id);
                }
            }
            registry.note_ended(&user_id, task_id, Instant::now());
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

/// Records a task's end in the registry (memory mode keeps no progress: nobody else
/// could resume the task).
struct Registered<'a> {
    tasks: &'a LocalQueue,
    task_id: &'a str,
}

#[async_trait]
impl Checkpoint for Registered<'_> {
    async fn save(&self, _progress: Progress<'_>) {}

    fn records_progress(&self) -> bool {
        false
    }

    async fn finish(&self, outcome: &Outcome) -> bool {
        self.tasks.set_status(
            self.task_id,
            outcome.status,
            outcome.response.clone(),
            outcome.error.clone(),
        );
        // Only this process runs its tasks.
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(user: &UserId) -> Record {
        Record {
            user_id: user.clone(),
            chat_id: "c".to_owned(),
            status: TaskStatus::Cancelled,
            response: None,
            error: None,
            cancel: CancellationToken::new(),
        }
    }

    #[test]
    fn ended_tasks_are_capped_per_user_oldest_first_and_expire() {
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        let mut registry = Registry::default();
        let t0 = Instant::now();
        for (user, n) in [(&bob, 5), (&alice, MAX_ENDED_TASKS_PER_USER + 50)] {
            for i in 0..n {
                let id = format!("{user}-{i}");
                registry.records.insert(id.clone(), record(user));
                registry.note_ended(user, &id, t0);
            }
        }
        assert_eq!(registry.records.len(), MAX_ENDED_TASKS_PER_USER + 5);
        assert!(
            !registry.records.contains_key("alice-49"),
            "the oldest are dropped first"
        );
        assert!(registry.records.contains_key("alice-50"));
        assert!(
            registry.records.contains_key("bob-0"),
            "another user's tasks are kept"
        );
        // An hour later everything is forgotten, bookkeeping included.
        registry.forget_expired(t0 + TASK_RETENTION);
        assert!(registry.records.is_empty());
        assert!(registry.ended.is_empty());
        assert!(registry.ended_by_user.is_empty());
    }
}
