//! The publish API (docs/protocol.md, service key): notifications, org events, frame-stream
//! messages, generic and batch publish, and channel history.

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::app::AppState;
use crate::broker::Published;
use crate::channel::{Channel, ChannelKind, Draft};
use crate::compose;
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ServiceKey};
use crate::ids::OrgId;

/// `type`s an external worker may publish to a frame stream (docs/protocol.md).
pub use crate::compose::FRAME_MESSAGE_TYPES;

/// Largest `limit` a history call may ask for.
pub const MAX_HISTORY_LIMIT: usize = 10_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/notifications/{user_id}", post(notification))
        .route("/api/v1/orgs/{org_id}/events", post(org_event))
        .route("/api/v1/frame-stream/{user_id}", post(frame))
        .route("/api/v1/publish", post(publish))
        .route("/api/v1/channels/{channel}/history", get(history))
}

fn receipt(channel: &Channel, published: &Published) -> Value {
    json!({"id": published.id, "channel": channel.name(), "offset": published.offset})
}

fn accepted(body: Value) -> Response {
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

fn object(value: Value, what: &str) -> Result<Map<String, Value>, ApiError> {
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::BadRequest(format!("{what} must be a JSON object"))),
    }
}

async fn notification(
    State(state): State<AppState>,
    _key: ServiceKey,
    Path(user_id): Path<String>,
    ApiJson(body): ApiJson,
) -> Result<Response, ApiError> {
    let channel = Channel::new(ChannelKind::Notifications, &user_id)?;
    let draft = compose::notification(body)?;
    let published = state.publish(&channel, &draft).await?;
    Ok(accepted(receipt(&channel, &published)))
}

async fn org_event(
    State(state): State<AppState>,
    _key: ServiceKey,
    Path(org_id): Path<String>,
    ApiJson(body): ApiJson,
) -> Result<Response, ApiError> {
    let org_id = OrgId::parse(&org_id)?;
    let channel = Channel::new(ChannelKind::Org, org_id.as_str())?;
    let draft = compose::org_event(&org_id, object(body, "the event")?)?;
    let published = state.publish(&channel, &draft).await?;
    Ok(accepted(receipt(&channel, &published)))
}

async fn frame(
    State(state): State<AppState>,
    _key: ServiceKey,
    Path(user_id): Path<String>,
    ApiJson(body): ApiJson,
) -> Result<Response, ApiError> {
    let channel = Channel::new(ChannelKind::Frames, &user_id)?;
    let draft = compose::frame(&channel, object(body, "the frame-stream message")?)?;
    let published = state.publish(&channel, &draft).await?;
    Ok(accepted(receipt(&channel, &published)))
}

/// `{"channel","data"}` or a JSON array of them. Every item is checked before any is
/// published, so a bad batch publishes nothing.
async fn publish(
    State(state): State<AppState>,
    _key: ServiceKey,
    ApiJson(body): ApiJson,
) -> Result<Response, ApiError> {
    let items = match body {
        Value::Array(items) => items,
        single @ Value::Object(_) => vec![single],
        _ => {
            return Err(ApiError::BadRequest(
                "the body must be {\"channel\",\"data\"} or an array of them".to_owned(),
            ))
        }
    };
    if items.is_empty() {
        return Err(ApiError::BadRequest("the batch is empty".to_owned()));
    }
    let mut checked = Vec::with_capacity(items.len());
    for (idx, item) in items.into_iter().enumerate() {
        let mut item = object(item, "each item")?;
        let channel = match item.get("channel").and_then(Value::as_str) {
            Some(name) => {
                Channel::parse(name).map_err(|err| ApiError::BadRequest(format!("item {idx}: {err}")))?
            }
            None => return Err(ApiError::BadRequest(format!("item {idx}: channel is required"))),
        };
        let Some(Value::Object(data)) = item.remove("data") else {
            return Err(ApiError::BadRequest(format!(
                "item {idx}: data must be a JSON object"
            )));
        };
        checked.push((channel, Draft::from_object(data)));
    }
    let mut receipts = Vec::with_capacity(checked.len());
    for (channel, draft) in &checked {
        let published = state.publish(channel, draft).await?;
        receipts.push(receipt(channel, &published));
    }
    Ok(accepted(Value::Array(receipts)))
}

#[derive(Deserialize)]
struct HistoryQuery {
    since: Option<String>,
    limit: Option<String>,
}

async fn history(
    State(state): State<AppState>,
    _key: ServiceKey,
    Path(channel): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    let channel = Channel::parse(&channel).map_err(|err| ApiError::BadRequest(err.to_string()))?;
    let since = match query.since.as_deref() {
        None | Some("") => 0,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| ApiError::BadRequest("since must be a non-negative integer".to_owned()))?,
    };
    let limit = match query.limit.as_deref() {
        None | Some("") => 100,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_HISTORY_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "limit must be an integer from 1 to {MAX_HISTORY_LIMIT}"
                )))
            }
        },
    };
    let history = state.broker.history(&channel, since, limit).await?;
    // The stored messages are already JSON text: splice them in instead of parsing and
    // re-serializing each one.
    let mut body = Vec::with_capacity(64 + history.messages.iter().map(|m| m.bytes.len() + 1).sum::<usize>());
    body.extend_from_slice(
        format!(
            "{{\"epoch\":\"{}\",\"offset\":{},\"messages\":[",
            history.position.epoch, history.position.offset
        )
        .as_bytes(),
    );
    for (idx, message) in history.messages.iter().enumerate() {
        if idx > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&message.bytes);
    }
    body.extend_from_slice(b"]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}
