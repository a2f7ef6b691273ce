//! The publish API (docs/protocol.md, service key): notifications, org events, frame-stream
//! messages, generic and batch publish, and channel history.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::app::AppState;
use crate::broker::{BrokerError, Published};
use crate::channel::{Channel, ChannelKind, Draft};
use crate::compose;
use crate::http::error::{ApiError, Outcome};
use crate::http::extract::{ApiJson, IdempotencyKey, ServiceKey, IDEMPOTENT_REPLAYED};
use crate::idempotency::{Answer, Claim, ClaimError, Key, Unconfirmed};
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

/// A publish's answer: `{"channel","id","offset"}`, its fields in the order `json!`
/// used to write them (sorted), so the text is unchanged. Serialized straight from this
/// struct rather than through a `Value` map (issue 19: the unicast path).
#[derive(Serialize)]
struct Receipt<'a> {
    channel: &'a str,
    id: &'a str,
    offset: u64,
}

impl<'a> Receipt<'a> {
    fn new(channel: &'a Channel, published: &'a Published) -> Self {
        Self {
            channel: channel.name(),
            id: &published.id,
            offset: published.offset,
        }
    }
}

/// A receipt as a `Value`, as `Idempotency-Key` records keep them.
fn receipt(channel: &Channel, published: &Published) -> Value {
    // A struct of strings and a number always serializes.
    serde_json::to_value(Receipt::new(channel, published)).unwrap_or(Value::Null)
}

/// A JSON answer from its exact text, so a replay sends the same bytes.
fn json_response(status: StatusCode, body: String, replayed: bool) -> Response {
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

fn object(value: Value, what: &str) -> Result<Map<String, Value>, ApiError> {
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::BadRequest(format!("{what} must be a JSON object"))),
    }
}

/// How a call answers: one receipt, or a list of them (`POST /api/v1/publish`).
#[derive(Clone, Copy)]
enum Shape {
    One,
    List,
}

impl Shape {
    /// The answer's text: the last receipt, or all of them.
    fn body<T: Serialize>(self, receipts: &[T]) -> String {
        let text = match self {
            Shape::One => serde_json::to_string(&receipts.last()),
            Shape::List => serde_json::to_string(receipts),
        };
        // Receipts are strings and numbers: serializing them cannot fail.
        text.unwrap_or_else(|_| "null".to_owned())
    }
}

/// The 503 for a call whose item `failed` could not be published after `published`
/// items were.
fn publish_failed(err: &BrokerError, published: usize, items: usize) -> ApiError {
    let outcome = if err.outcome_unknown() || published > 0 {
        Outcome::Unknown
    } else {
        Outcome::NotPublished
    };
    let mut message = match err {
        BrokerError::OutcomeUnknown { .. } => {
            "Redis did not confirm the publish in time: the message may have been stored".to_owned()
        }
        BrokerError::Unavailable(_) => "the broker cannot take publishes now: nothing was stored".to_owned(),
    };
    if items > 1 {
        message = format!("{message} (the first {published} of {items} items were published)");
    }
    message.push_str("; retry with the same Idempotency-Key, which never publishes twice");
    tracing::debug!(error = %err, outcome = outcome.as_str(), "publish failed");
    ApiError::PublishFailed { message, outcome }
}

/// Publishes `items` in order and answers with their receipts. With an
/// `Idempotency-Key`, at most once per key (see `idempotency`): a repeat gets the first
/// answer, and an attempt that stopped part way is continued, never started again.
async fn publish_items(
    state: &AppState,
    key: Option<Key>,
    items: Vec<(Channel, Draft)>,
    shape: Shape,
) -> Result<Response, ApiError> {
    let Some(key) = key else {
        let mut published = Vec::with_capacity(items.len());
        for (channel, draft) in &items {
            match state.publish(channel, draft).await {
                Ok(done) => published.push(done),
                Err(err) => return Err(publish_failed(&err, published.len(), items.len())),
            }
        }
        let receipts: Vec<Receipt<'_>> = items
            .iter()
            .zip(&published)
            .map(|((channel, _), published)| Receipt::new(channel, published))
            .collect();
        return Ok(json_response(StatusCode::ACCEPTED, shape.body(&receipts), false));
    };
    // Run to the end even if the caller hangs up: the key's record must say what
    // happened, or every repeat would have to answer "unknown".
    let state = state.clone();
    let publishing = state
        .tracker
        .clone()
        .spawn(async move { publish_once(&state, key, items, shape).await });
    match publishing.await {
        Ok(answer) => answer,
        Err(err) => Err(ApiError::Internal(anyhow::anyhow!(
            "the publish task failed: {err}"
        ))),
    }
}

/// [`publish_items`] with an `Idempotency-Key`.
async fn publish_once(
    state: &AppState,
    key: Key,
    items: Vec<(Channel, Draft)>,
    shape: Shape,
) -> Result<Response, ApiError> {
    let channels: Vec<Channel> = items.iter().map(|(channel, _)| channel.clone()).collect();
    let ticket = match state.idempotency.claim(&channels, &key, items.len()).await {
        Ok(Claim::Replay(answer)) => {
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::ACCEPTED);
            return Ok(json_response(status, answer.body, true));
        }
        Ok(Claim::Publish(ticket)) => ticket,
        Err(ClaimError::Unavailable(err)) => {
            tracing::debug!(error = %err, "Idempotency-Key record unavailable");
            return Err(ApiError::PublishFailed {
                message: "the broker cannot take publishes now: nothing was stored; retry with the same \
                          Idempotency-Key"
                    .to_owned(),
                outcome: Outcome::NotPublished,
            });
        }
        Err(ClaimError::Unknown(message)) => {
            return Err(ApiError::PublishFailed {
                message: format!("{message}; retry later with the same Idempotency-Key"),
                outcome: Outcome::Unknown,
            })
        }
    };
    let mut done = ticket.done.clone();
    if let Some(unconfirmed) = ticket.unconfirmed.clone() {
        match find_sent(state, &unconfirmed).await {
            Some(found) => done.push(found),
            None => {
                state.idempotency.release(ticket, done, Some(unconfirmed)).await;
                return Err(ApiError::PublishFailed {
                    message: "an earlier request with this Idempotency-Key sent a message Redis did not \
                              confirm, and it is not in the channel's history (yet): publishing it again \
                              could publish it twice; retry later with the same key"
                        .to_owned(),
                    outcome: Outcome::Unknown,
                });
            }
        }
    }
    let earlier = done.len();
    for (channel, draft) in items.iter().skip(earlier) {
        match state.publish(channel, draft).await {
            Ok(published) => done.push(receipt(channel, &published)),
            Err(err) => {
                let failed = publish_failed(&err, done.len(), items.len());
                let unconfirmed = match err {
                    BrokerError::OutcomeUnknown { id, .. } => Some(Unconfirmed {
                        channel: channel.name().to_owned(),
                        id,
                    }),
                    BrokerError::Unavailable(_) => None,
                };
                state.idempotency.release(ticket, done, unconfirmed).await;
                return Err(failed);
            }
        }
    }
    let answer = Answer {
        status: StatusCode::ACCEPTED.as_u16(),
        body: shape.body(&done),
    };
    state.idempotency.answer(ticket, answer.clone()).await;
    // Every item was published by earlier attempts: this one published nothing.
    let replayed = earlier == items.len();
    Ok(json_response(StatusCode::ACCEPTED, answer.body, replayed))
}

/// The receipt of a message an earlier attempt sent without an answer, if it is in
/// its channel's history.
async fn find_sent(state: &AppState, unconfirmed: &Unconfirmed) -> Option<Value> {
    let id = unconfirmed.id.as_deref()?;
    let channel = Channel::parse(&unconfirmed.channel).ok()?;
    let history = state
        .broker
        .history(&channel, 0, state.config.history_size.max(1))
        .await
        .ok()?;
    let needle = format!("\"id\":\"{id}\",\"offset\":");
    let message = history
        .messages
        .iter()
        .find(|message| contains(&message.bytes, needle.as_bytes()))?;
    let found = Receipt {
        channel: channel.name(),
        id,
        offset: message.offset,
    };
    serde_json::to_value(found).ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

async fn notification(
    State(state): State<AppState>,
    _key: ServiceKey,
    IdempotencyKey(key): IdempotencyKey,
    Path(user_id): Path<String>,
    ApiJson(body): ApiJson,
) -> Result<Response, ApiError> {
    let channel = Channel::new(ChannelKind::Notifications, &user_id)?;
    let draft = compose::notification(body)?;
    publish_items(&state, key, vec![(channel, draft)], Shape::One).await
}

async fn org_event(
    State(state): State<AppState>,
    _key: ServiceKey,
    IdempotencyKey(key): IdempotencyKey,
    Path(org_id): Path<String>,
    ApiJson(body): ApiJson,
) -> Result<Response, ApiError> {
    let org_id = OrgId::parse(&org_id)?;
    let channel = Channel::new(ChannelKind::Org, org_id.as_str())?;
    let draft = compose::org_event(&org_id, object(body, "the event")?)?;
    publish_items(&state, key, vec![(channel, draft)], Shape::One).await
}

async fn frame(
    State(state): State<AppState>,
    _key: ServiceKey,
    IdempotencyKey(key): IdempotencyKey,
    Path(user_id): Path<String>,
    ApiJson(body): ApiJson,
) -> Result<Response, ApiError> {
    let channel = Channel::new(ChannelKind::Frames, &user_id)?;
    let draft = compose::frame(&channel, object(body, "the frame-stream message")?)?;
    publish_items(&state, key, vec![(channel, draft)], Shape::One).await
}

/// `{"channel","data"}` or a JSON array of them. Every item is checked before any is
/// published, so a bad batch publishes nothing.
async fn publish(
    State(state): State<AppState>,
    _key: ServiceKey,
    IdempotencyKey(key): IdempotencyKey,
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
    publish_items(&state, key, checked, Shape::List).await
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
