//! The user API (user JWT): start an LLM generation, follow or cancel it, and read a
//! chat's history. The answer itself streams to `/ws/frame-stream/{user_id}/`, and
//! over HTTP through [`crate::http::sse`].

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::app::AppState;
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, User};
use crate::ids::{ChatId, UserId};
use crate::store::IndexedTurn;
use crate::tasks::{TaskRequest, TaskView, MAX_PROMPT_CHARS};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/chat/generate-response", post(generate))
        .route("/api/chat/generate-response/", post(generate))
        .route("/api/chat/tasks/{task_id}", get(task))
        .route("/api/chat/tasks/{task_id}/cancel", post(cancel))
        .route("/api/chat/{chat_id}/messages", get(messages))
}

pub(crate) fn string_field<'a>(body: &'a Value, name: &str) -> Result<&'a str, ApiError> {
    body.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::BadRequest(format!("{name} is required and must be a string")))
}

/// `{"user_id","chat_id","prompt","model"?}` → `202 {"task_id","chat_id","status":"queued"}`.
async fn generate(
    State(state): State<AppState>,
    User(identity): User,
    ApiJson(body): ApiJson,
) -> Result<Response, ApiError> {
    let user_id = UserId::parse(string_field(&body, "user_id")?)?;
    if user_id != identity.user_id {
        return Err(ApiError::Forbidden("user_id is not the token's user".to_owned()));
    }
    let chat_id = ChatId::parse(string_field(&body, "chat_id")?)?;
    let prompt = string_field(&body, "prompt")?;
    if prompt.trim().is_empty() {
        return Err(ApiError::BadRequest("prompt is empty".to_owned()));
    }
    if prompt.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::BadRequest(format!(
            "prompt is longer than {MAX_PROMPT_CHARS} characters"
        )));
    }
    let request = TaskRequest {
        user_id,
        chat_id: chat_id.clone(),
        prompt: prompt.to_owned(),
        model: model_of(&body, &state)?,
    };
    let task_id = state.tasks.submit(request).await?;
    let body = json!({"task_id": task_id, "chat_id": chat_id.as_str(), "status": "queued"});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// The body's optional `model`, else `HERALD_LLM_MODEL`.
pub(crate) fn model_of(body: &Value, state: &AppState) -> Result<String, ApiError> {
    match body.get("model") {
        None | Some(Value::Null) => Ok(state.config.llm_model.clone()),
        Some(Value::String(model)) if !model.is_empty() && model.chars().count() <= 200 => Ok(model.clone()),
        Some(_) => Err(ApiError::BadRequest(
            "model must be a non-empty string".to_owned(),
        )),
    }
}

fn view_json(view: &TaskView) -> Value {
    let mut body = json!({"task_id": view.task_id, "chat_id": view.chat_id, "status": view.status.as_str()});
    if let Some(response) = &view.response {
        body["response"] = json!(response);
    }
    if let Some(error) = &view.error {
        body["error"] = json!(error);
    }
    body
}

pub(crate) fn not_found() -> ApiError {
    ApiError::NotFound("no such task for this user".to_owned())
}

async fn task(
    State(state): State<AppState>,
    User(identity): User,
    Path(task_id): Path<String>,
) -> Result<Response, ApiError> {
    let view = state
        .tasks
        .get(&task_id, &identity.user_id)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(view_json(&view)).into_response())
}

async fn cancel(
    State(state): State<AppState>,
    User(identity): User,
    Path(task_id): Path<String>,
) -> Result<Response, ApiError> {
    let view = state
        .tasks
        .cancel(&task_id, &identity.user_id)
        .await?
        .ok_or_else(not_found)?;
    Ok((StatusCode::ACCEPTED, Json(view_json(&view))).into_response())
}

/// Turns per page of `GET /api/chat/{chat_id}/messages` when `limit` is not given.
pub const DEFAULT_MESSAGES_PAGE: usize = 100;

/// The largest `limit` of `GET /api/chat/{chat_id}/messages`.
pub const MAX_MESSAGES_PAGE: usize = 1000;

/// `?before=<index>&limit=<n>` of the messages page.
fn page_query(query: Option<&str>) -> Result<(Option<i64>, usize), ApiError> {
    let params = crate::http::extract::query_params(query)?;
    let number = |name: &str| -> Result<Option<i64>, ApiError> {
        params
            .get(name)
            .map(|v| {
                v.parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| ApiError::BadRequest(format!("{name} must be a whole number, 0 or more")))
            })
            .transpose()
    };
    let before = number("before")?;
    let limit = match number("limit")? {
        None => DEFAULT_MESSAGES_PAGE,
        Some(n) if (1..=MAX_MESSAGES_PAGE as i64).contains(&n) => n as usize,
        Some(_) => {
            return Err(ApiError::BadRequest(format!(
                "limit must be from 1 to {MAX_MESSAGES_PAGE}"
            )))
        }
    };
    Ok((before, limit))
}

/// A page of the caller's turns in this chat: the newest page first (older ones with
/// `?before=<next_before>`), each page oldest first.
async fn messages(
    State(state): State<AppState>,
    User(identity): User,
    Path(chat_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let chat_id = ChatId::parse(&chat_id)?;
    let (before, limit) = page_query(query.as_deref())?;
    let page = state
        .store
        .chat_page(identity.user_id.as_str(), chat_id.as_str(), before, limit)
        .await?;
    let next_before = page.first().map(|turn| turn.index).filter(|index| *index > 0);
    let messages: Vec<Value> = page
        .into_iter()
        .map(|IndexedTurn { index, turn }| {
            let millis = u64::try_from(turn.created_at).unwrap_or(0);
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis);
            json!({"index": index, "role": turn.role, "content": turn.content, "timestamp": humantime::format_rfc3339_millis(time).to_string()})
        })
        .collect();
    let mut body = json!({"messages": messages});
    if let Some(next_before) = next_before {
        body["next_before"] = json!(next_before);
    }
    Ok(Json(body).into_response())
}
