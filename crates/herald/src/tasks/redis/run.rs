//! Running one taken entry: start it (or resume it where a dead worker stopped), stream
//! the answer through the worker, record progress, and end it or hand it back.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value as Json;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ids::{ChatId, UserId};
use crate::sync::lock;
use crate::tasks::redis::{
    ended_key, ms, number, status_of, task_key, text, text_key, user_key, RedisQueue, Running, GAVE_UP,
    GROUP, IN_FLIGHT_TTL, MAX_ATTEMPTS, QUEUED_KEY, QUEUE_KEY, TASK_PREFIX,
};
use crate::tasks::worker::{self, Checkpoint, Job, Outcome, Phase, Progress, Resume};
use crate::tasks::{TaskRequest, TaskStatus, Unavailable, MAX_ENDED_TASKS_PER_USER, TASK_RETENTION};

impl RedisQueue {
    /// Runs one taken entry to its end (or until it is lost or handed back). The entry
    /// is renewed by the heartbeat from the start: starting it and reading its stream
    /// back must not let it look idle to other workers.
    pub(super) async fn run_entry(
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

    /// Starts a taken entry (`lua/start.lua`) and runs its task.
    pub(super) async fn start_entry(
        &self,
        entry: &str,
        task_id: &str,
        cancel: &CancellationToken,
        abandon: &CancellationToken,
    ) {
        let reply = match self
            .eval(
                &self.scripts.start,
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
        if action == "skip" || action == "wait" {
            return;
        }
        self.set_queue_depth(number(reply.get(9)));
        let (Ok(user_id), Ok(chat_id)) = (
            UserId::parse(&text(reply.get(1))),
            ChatId::parse(&text(reply.get(2))),
        ) else {
            tracing::warn!(task_id, "a task record is malformed; dropping it");
            // Nothing can be sent to a user whose id is not valid: recorded is announced.
            let recorded = action == "announce"
                || self
                    .end(entry, task_id, "", TaskStatus::Failed, None, Some("invalid task"))
                    .await;
            if recorded {
                self.announced(entry, task_id).await;
            }
            return;
        };
        let request = TaskRequest {
            user_id,
            chat_id,
            prompt: text(reply.get(3)),
            model: text(reply.get(4)),
        };
        let mut checkpoint = RedisCheckpoint {
            queue: self,
            task_id,
            entry,
            user_id: request.user_id.as_str(),
            ended: false,
        };
        if action == "announce" {
            let status = status_of(&text(reply.get(11))).unwrap_or(TaskStatus::Failed);
            if self
                .final_status_sent(task_id, &request, number(reply.get(7)))
                .await
            {
                tracing::info!(
                    task_id,
                    "a dead worker's task had sent its final status; acknowledging it"
                );
                self.announced(entry, task_id).await;
            } else {
                tracing::warn!(
                    task_id,
                    "a dead worker's task ended without its final status; sending it"
                );
                checkpoint.ended = true;
                worker::announce_end(&self.ctx, task_id, &request, status, abandon, &checkpoint).await;
            }
            return;
        }
        let unstarted = match action.as_str() {
            "cancel" => Some((TaskStatus::Cancelled, None)),
            "exhausted" => {
                tracing::warn!(task_id, "task given up after {MAX_ATTEMPTS} interrupted attempts");
                Some((TaskStatus::Failed, Some(GAVE_UP)))
            }
            _ => None,
        };
        let mut resume = Resume {
            phase: Phase::from_u8(u8::try_from(number(reply.get(5))).unwrap_or(0)),
            text: text(reply.get(8)),
            next_index: number(reply.get(6)),
            ended: None,
        };
        // A first start has sent nothing: only a task taken over (or handed back, which
        // does not count as an attempt) reads its stream back.
        if unstarted.is_some() || number(reply.get(10)) > 1 || resume.phase > Phase::New {
            resume = self.resume(task_id, &request, resume, number(reply.get(7))).await;
        }
        if let Some((status, error)) = unstarted {
            // A stream that already ended (the last worker could not record it), or
            // whose answer was saved, ends as it did: `worker::run` only records that
            // end and sends what is missing, without asking the LLM.
            if resume.ended.is_none() && resume.phase < Phase::Saved {
                worker::publish_unstarted_end(&self.ctx, task_id, &request, status, error, &checkpoint).await;
                return;
            }
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
            // The claim ended: taken over, not renewed within the lease (the heartbeat
            // logged which), or this node claimed the entry again. Nobody may have
            // taken the task yet: whichever worker claims the entry next finishes it.
            None if abandon.is_cancelled() => {
                tracing::warn!(
                    task_id,
                    "task stopped on this worker: its claim ended; the worker that claims its queue entry next finishes it"
                );
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
    pub(super) async fn resume(
        &self,
        task_id: &str,
        request: &TaskRequest,
        mut resume: Resume,
        offset: u64,
    ) -> Resume {
        let recorded = resume.clone();
        let mut last_offset = offset;
        for (json, message_offset) in self.read_back(task_id, request, offset).await {
            resume.observe(&json);
            last_offset = last_offset.max(message_offset);
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

    /// The messages of `task_id` in its frame stream's history after `offset`, with
    /// their offsets (none when history is off or cannot be read).
    async fn read_back(&self, task_id: &str, request: &TaskRequest, offset: u64) -> Vec<(Json, u64)> {
        let Some(channel) = worker::frames_channel(request) else {
            return Vec::new();
        };
        if self.history_size == 0 {
            return Vec::new();
        }
        let history = match self.broker.history(&channel, offset, self.history_size).await {
            Ok(history) => history,
            Err(err) => {
                tracing::warn!(task_id, error = %err, "reading a task's stream back failed");
                return Vec::new();
            }
        };
        if !history.complete {
            tracing::warn!(
                task_id,
                "part of a task's stream has left history; a takeover may repeat or miss what it held"
            );
        }
        history
            .messages
            .into_iter()
            .filter_map(|message| {
                let json = serde_json::from_slice::<Json>(&message.bytes).ok()?;
                (json.get("task_id").and_then(Json::as_str) == Some(task_id))
                    .then_some((json, message.offset))
            })
            .collect()
    }

    /// Whether the frame stream's history holds the final `llm_status` of an ended
    /// task (its worker sent it and died before acknowledging the entry). Without
    /// history it cannot tell, and the status is sent: twice is better than never.
    async fn final_status_sent(&self, task_id: &str, request: &TaskRequest, offset: u64) -> bool {
        let mut seen = Resume::default();
        for (json, _) in self.read_back(task_id, request, offset).await {
            seen.observe(&json);
        }
        seen.announced()
    }

    /// Acknowledges an ended task's entry once its final `llm_status` is out
    /// (`lua/announced.lua`).
    pub(super) async fn announced(&self, entry: &str, task_id: &str) {
        let acknowledged = self
            .eval(
                &self.scripts.announced,
                vec![task_key(task_id), QUEUE_KEY.to_owned()],
                vec![GROUP.to_owned(), entry.to_owned()],
            )
            .await;
        if let Err(err) = acknowledged {
            // The entry stays pending: the worker that takes it over finds the status
            // in the stream's history and only acknowledges it.
            tracing::warn!(task_id, error = %err, "acknowledging an ended task failed; another worker will");
        }
    }

    /// Replaces a task's recorded text and next frame index (`lua/rewrite.lua`).
    pub(super) async fn rewrite(
        &self,
        task_id: &str,
        phase: Phase,
        text: &str,
        next_index: u64,
        offset: u64,
    ) -> Result<u64, Unavailable> {
        self.eval(
            &self.scripts.rewrite,
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

    pub(super) async fn end(
        &self,
        entry: &str,
        task_id: &str,
        user_id: &str,
        status: TaskStatus,
        response: Option<&str>,
        error: Option<&str>,
    ) -> bool {
        let ended = self
            .eval(
                &self.scripts.end,
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
                true
            }
            Ok(_) => false,
            // The entry stays pending: the worker that takes it over finds the end
            // recorded (`announce`) or, if it was not, reads the stream's end back
            // ([`Phase::Completed`], [`worker::Resume::ended`]) and only records it.
            Err(err) => {
                tracing::warn!(task_id, error = %err, "recording a task's end failed");
                false
            }
        }
    }

    pub(super) async fn hand_back(&self, entry: &str, task_id: &str) {
        let handed = self
            .eval(
                &self.scripts.hand_back,
                vec![task_key(task_id), QUEUE_KEY.to_owned(), QUEUED_KEY.to_owned()],
                vec![GROUP.to_owned(), entry.to_owned(), self.node_id.clone()],
            )
            .await;
        if let Err(err) = handed {
            tracing::warn!(task_id, error = %err, "handing a task back failed; it is taken over once idle");
        }
    }
}

/// Records a running task's progress and end in its Redis record.
struct RedisCheckpoint<'a> {
    queue: &'a RedisQueue,
    task_id: &'a str,
    entry: &'a str,
    user_id: &'a str,
    /// The end is recorded already (a dead worker's, announced by this one).
    ended: bool,
}

/// For a queued task the cancel script has ended already: the node that took the
/// cancel sends its status, whatever its lease (it may run no workers), and then
/// removes its entry (`entry`; every record has one, the check is only defensive).
pub(super) struct CancelledWhileQueued<'a> {
    pub(super) queue: &'a RedisQueue,
    pub(super) task_id: &'a str,
    pub(super) entry: &'a str,
}

#[async_trait]
impl Checkpoint for CancelledWhileQueued<'_> {
    async fn save(&self, _progress: Progress<'_>) {}

    fn records_progress(&self) -> bool {
        false
    }

    async fn finish(&self, _outcome: &Outcome) -> bool {
        true
    }

    async fn announced(&self) {
        if !self.entry.is_empty() {
            self.queue.announced(self.entry, self.task_id).await;
        }
    }
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
                    &self.queue.scripts.checkpoint,
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

    async fn announced(&self) {
        self.queue.announced(self.entry, self.task_id).await;
    }

    async fn finish(&self, outcome: &Outcome) -> bool {
        if self.ended {
            return true;
        }
        self.queue
            .end(
                self.entry,
                self.task_id,
                self.user_id,
                outcome.status,
                outcome.response.as_deref(),
                outcome.error.as_deref(),
            )
            .await
    }
}
