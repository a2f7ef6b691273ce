//! The messages herald publishes for each kind of publish: a notification, an
//! organization event, a frame-stream message. They are shaped and checked here once, and
//! used by both the HTTP publish API (`http::publish`) and the Django bridge (`bridge`),
//! so a message reaches a socket in the same form whichever way it came in.

pub mod llm;

use serde_json::{json, Map, Value};

use crate::channel::{Channel, Draft};
use crate::ids::{ChatId, OrgId};
use llm::LlmKind;

/// `type`s an external worker may publish to a frame stream (docs/protocol.md).
pub const FRAME_MESSAGE_TYPES: [&str; 4] = [
    LlmKind::Status.as_str(),
    LlmKind::Frame.as_str(),
    LlmKind::Response.as_str(),
    LlmKind::Error.as_str(),
];

/// Longest `event_type` of an organization event.
pub const MAX_EVENT_TYPE_LEN: usize = 128;

/// Why a body cannot be published; the text says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// `{"type":"notification","notification":{…}}`; the notification must be an object.
pub fn notification(notification: Value) -> Result<Draft, Invalid> {
    if !notification.is_object() {
        return Err(Invalid("the notification must be a JSON object".to_owned()));
    }
    Ok(Draft::enveloped("notification", &notification, "notification"))
}

/// `{"type":"org_event","org_id","event_type","data"}` from a body holding `event_type`
/// (1 to 128 characters) and an optional `data` object; other fields are ignored.
pub fn org_event(org_id: &OrgId, mut body: Map<String, Value>) -> Result<Draft, Invalid> {
    let event_type = match body.remove("event_type") {
        Some(Value::String(t)) if !t.is_empty() && t.chars().count() <= MAX_EVENT_TYPE_LEN => t,
        _ => {
            return Err(Invalid(format!(
                "event_type must be a non-empty string of at most {MAX_EVENT_TYPE_LEN} characters"
            )))
        }
    };
    let data = match body.remove("data") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(data @ Value::Object(_)) => data,
        Some(_) => return Err(Invalid("data must be a JSON object".to_owned())),
    };
    let mut message = Map::new();
    message.insert("type".to_owned(), json!("org_event"));
    message.insert("org_id".to_owned(), json!(org_id.as_str()));
    message.insert("event_type".to_owned(), json!(event_type));
    message.insert("data".to_owned(), data);
    Ok(Draft::from_object(message))
}

/// A frame-stream message for `channel` (a `frames:` channel): its `type` must be one of
/// [`FRAME_MESSAGE_TYPES`] and it must carry a valid `chat_id`; `user_id` is set from the
/// channel. Everything else is kept as sent.
pub fn frame(channel: &Channel, mut message: Map<String, Value>) -> Result<Draft, Invalid> {
    let kind = message.get("type").and_then(Value::as_str).unwrap_or("");
    if !FRAME_MESSAGE_TYPES.contains(&kind) {
        return Err(Invalid(format!(
            "type must be one of {}",
            FRAME_MESSAGE_TYPES.join(", ")
        )));
    }
    match message.get("chat_id").and_then(Value::as_str) {
        Some(chat_id) => {
            ChatId::parse(chat_id).map_err(|err| Invalid(err.to_string()))?;
        }
        None => return Err(Invalid("chat_id is required".to_owned())),
    }
    message.insert("user_id".to_owned(), json!(channel.id()));
    Ok(Draft::from_object(message))
}
