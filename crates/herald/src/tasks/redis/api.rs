//! The queue's API for the HTTP handlers: submit a task, read it, cancel it.

use fred::prelude::{ClientLike, HashesInterface, Value};

use crate::ids::{ChatId, UserId};
use crate::redis::COMMAND_TIMEOUT;
use crate::sync::lock;
use crate::tasks::redis::run::CancelledWhileQueued;
use crate::tasks::redis::{
    ended_key, ms, number, status_of, task_key, text, unavailable, user_key, RedisQueue, GROUP,
    IN_FLIGHT_TTL, QUEUED_KEY, QUEUE_KEY, TASK_PREFIX,
};
use crate::tasks::worker;
use crate::tasks::{
    SubmitError, TaskRequest, TaskStatus, TaskView, Unavailable, MAX_ENDED_TASKS_PER_USER,
    MAX_TASKS_IN_FLIGHT_PER_USER, TASK_RETENTION,
};

impl RedisQueue {
    pub async fn submit(&self, request: TaskRequest) -> Result<String, SubmitError> {
        if self.shutdown.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        let task_id = crate::channel::new_id();
        let user_id = request.user_id.as_str();
        let reply = self
            .eval(
                &self.scripts.submit,
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
                &self.scripts.cancel,
                vec![
                    task_key(task_id),
                    user_key(user_id.as_str()),
                    QUEUED_KEY.to_owned(),
                    ended_key(user_id.as_str()),
                    QUEUE_KEY.to_owned(),
                ],
                vec![
                    user_id.as_str().to_owned(),
                    ms(TASK_RETENTION),
                    task_id.to_owned(),
                    MAX_ENDED_TASKS_PER_USER.to_string(),
                    TASK_PREFIX.to_owned(),
                    GROUP.to_owned(),
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
                let checkpoint = CancelledWhileQueued {
                    queue: self,
                    task_id,
                    entry: &text(reply.get(5)),
                };
                worker::publish_unstarted_end(
                    &self.ctx,
                    task_id,
                    &request,
                    TaskStatus::Cancelled,
                    None,
                    &checkpoint,
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
}
