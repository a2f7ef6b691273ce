//! The JSON messages a session exchanges with its client, besides published messages
//! (which arrive already serialized): the "client → server" table of docs/protocol.md.

use serde_json::{json, Value};

use crate::channel::now_rfc3339;

/// The longest `epoch` a client may send back (herald's are 32 characters).
const MAX_EPOCH_LEN: usize = 64;

/// `?since=<offset>&epoch=<epoch>`: the client's last position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub since: u64,
    /// `None` accepts whatever epoch the channel has (`since=0` without an epoch
    /// replays the whole history).
    pub epoch: Option<String>,
}

/// Whether `epoch` can be an epoch a client was given: short, `[A-Za-z0-9_-]`.
pub fn valid_epoch(epoch: &str) -> bool {
    epoch.len() <= MAX_EPOCH_LEN
        && epoch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Client message types herald understands, in the order of the documented table.
/// `subscribe` and `unsubscribe` are for `/ws/` only; the single-channel endpoints answer
/// them as unsupported.
pub const CLIENT_MESSAGE_TYPES: [&str; 6] =
    ["subscribe", "unsubscribe", "read", "ping", "heartbeat", "refresh"];

/// A parsed client text frame.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage {
    Ping,
    Heartbeat,
    Refresh {
        token: String,
    },
    Subscribe(Subscribe),
    Unsubscribe {
        channel: String,
        id: Value,
    },
    /// `{"type":"read","channel","offset"}`: the client read `channel` up to `offset`.
    Read(Read),
    /// Valid JSON, but not a message herald accepts.
    Unsupported,
    /// Not JSON at all.
    InvalidJson,
}

impl ClientMessage {
    pub fn parse(text: &str) -> ClientMessage {
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            return ClientMessage::InvalidJson;
        };
        match value.get("type").and_then(Value::as_str) {
            Some("ping") => ClientMessage::Ping,
            Some("heartbeat") => ClientMessage::Heartbeat,
            Some("refresh") => match value.get("token").and_then(Value::as_str) {
                Some(token) if !token.is_empty() => ClientMessage::Refresh {
                    token: token.to_owned(),
                },
                _ => ClientMessage::Unsupported,
            },
            Some("subscribe") => ClientMessage::Subscribe(Subscribe::parse(&value)),
            Some("read") => ClientMessage::Read(Read::parse(&value)),
            Some("unsubscribe") => match value.get("channel").and_then(Value::as_str) {
                Some(channel) => ClientMessage::Unsubscribe {
                    channel: channel.to_owned(),
                    id: request_id(&value),
                },
                None => ClientMessage::Unsupported,
            },
            _ => ClientMessage::Unsupported,
        }
    }

    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ClientMessage::Ping => "ping",
            ClientMessage::Heartbeat => "heartbeat",
            ClientMessage::Refresh { .. } => "refresh",
            ClientMessage::Subscribe(_) => "subscribe",
            ClientMessage::Unsubscribe { .. } => "unsubscribe",
            ClientMessage::Read(_) => "read",
            ClientMessage::Unsupported => "unsupported",
            ClientMessage::InvalidJson => "invalid_json",
        }
    }
}

/// `{"type":"subscribe","channel","id","since"?,"epoch"?,"presence"?}`, as sent; the
/// session checks the channel and the user's right to it.
#[derive(Debug, PartialEq, Eq)]
pub struct Subscribe {
    /// The channel name as sent, echoed in the answer (`null` when it is not a string).
    pub channel: Value,
    /// The client's id for this request, echoed in the answer.
    pub id: Value,
    /// `since`/`epoch`, or why they are malformed (a 4000 refusal).
    pub resume: Result<Option<Resume>, &'static str>,
    /// `"presence":true`: also send the org's presence (org channels only).
    pub presence: bool,
}

/// `{"type":"read","channel","offset"}`, as sent; the session checks the channel.
#[derive(Debug, PartialEq, Eq)]
pub struct Read {
    /// The channel name, or why the message is malformed.
    pub channel: Result<String, &'static str>,
    /// The offset read up to, or why it is malformed.
    pub offset: Result<u64, &'static str>,
}

impl Read {
    fn parse(value: &Value) -> Self {
        Self {
            channel: value
                .get("channel")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or(
                    "read needs a channel, e.g. {\"type\":\"read\",\"channel\":\"org:acme\",\"offset\":41}",
                ),
            offset: value
                .get("offset")
                .and_then(Value::as_u64)
                .ok_or("offset must be a non-negative integer"),
        }
    }
}

impl Subscribe {
    fn parse(value: &Value) -> Self {
        let channel = match value.get("channel") {
            Some(channel @ Value::String(_)) => channel.clone(),
            _ => Value::Null,
        };
        let since = match value.get("since") {
            None | Some(Value::Null) => Ok(None),
            Some(since) => since
                .as_u64()
                .map(Some)
                .ok_or("since must be a non-negative integer"),
        };
        let epoch = match value.get("epoch") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(epoch)) if epoch.is_empty() => Ok(None),
            Some(Value::String(epoch)) if valid_epoch(epoch) => Ok(Some(epoch.clone())),
            Some(_) => Err("epoch is not a valid epoch"),
        };
        let resume = match (since, epoch) {
            (Err(reason), _) | (_, Err(reason)) => Err(reason),
            (Ok(None), Ok(Some(_))) => Err("epoch needs since"),
            (Ok(None), Ok(None)) => Ok(None),
            (Ok(Some(since)), Ok(epoch)) => Ok(Some(Resume { since, epoch })),
        };
        Self {
            channel,
            id: request_id(value),
            resume,
            presence: value.get("presence").and_then(Value::as_bool).unwrap_or(false),
        }
    }
}

/// The `id` a client gave a request, echoed in the answer: a string or a number, else
/// `null`.
fn request_id(value: &Value) -> Value {
    match value.get("id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        _ => Value::Null,
    }
}

pub fn pong() -> String {
    json!({"type": "pong", "timestamp": now_rfc3339()}).to_string()
}

pub fn heartbeat_ack() -> String {
    json!({"type": "heartbeat_ack", "timestamp": now_rfc3339()}).to_string()
}

pub fn refreshed(expires_at: &str) -> String {
    json!({"type": "system", "status": "refreshed", "expires_at": expires_at, "timestamp": now_rfc3339()})
        .to_string()
}

pub fn error(code: &str, message: &str) -> String {
    json!({"type": "error", "error": code, "message": message, "timestamp": now_rfc3339()}).to_string()
}

pub fn invalid_json() -> String {
    error(
        "invalid_json",
        "messages must be JSON text, e.g. {\"type\":\"ping\"}",
    )
}

/// The answer to a message herald does not take; on `/ws/` it names subscribe and
/// unsubscribe too.
pub fn unsupported_message(multiplexed: bool) -> String {
    error(
        "unsupported_message",
        if multiplexed {
            "clients may send only subscribe, unsubscribe, read, ping, heartbeat and refresh messages"
        } else {
            "clients may send only read, ping, heartbeat and refresh messages"
        },
    )
}

/// The welcome of a `/ws/` socket, which has no channel yet.
pub fn multiplexed_welcome(connection_id: &str, user_id: &str) -> String {
    json!({
        "type": "system",
        "status": "connected",
        "connection_id": connection_id,
        "user_id": user_id,
        "timestamp": now_rfc3339(),
    })
    .to_string()
}

/// A subscription took effect: the channel stands at `epoch`/`offset`. `read_offset`
/// is the user's read position in it (0 when none is kept for this epoch).
pub fn subscribed(channel: &str, id: &Value, epoch: &str, offset: u64, read_offset: u64) -> String {
    json!({
        "type": "subscribed",
        "channel": channel,
        "id": id,
        "epoch": epoch,
        "offset": offset,
        "read_offset": read_offset,
    })
    .to_string()
}

/// A subscription was refused; the socket stays open. `code` is 4000, 4003 or 4429.
pub fn subscribe_error(channel: &Value, id: &Value, code: u16, error: &str, message: &str) -> String {
    json!({
        "type": "subscribe_error",
        "channel": channel,
        "id": id,
        "code": code,
        "error": error,
        "message": message,
    })
    .to_string()
}

/// The answer to `unsubscribe`.
pub fn unsubscribed(channel: &str, id: &Value) -> String {
    json!({"type": "unsubscribed", "channel": channel, "id": id}).to_string()
}

/// A subscription ended by the server (membership lost); the socket stays open.
pub fn subscription_ended(channel: &str, code: u16, reason: &str) -> String {
    json!({"type": "unsubscribed", "channel": channel, "code": code, "reason": reason}).to_string()
}

/// The first message of every accepted socket.
pub struct Welcome<'a> {
    pub connection_id: &'a str,
    pub user_id: &'a str,
    pub channel: &'a str,
    pub org_id: Option<&'a str>,
    pub epoch: &'a str,
    pub offset: u64,
    /// The user's read position in the channel (0 when none is kept for this epoch).
    pub read_offset: u64,
}

impl Welcome<'_> {
    pub fn to_json(&self) -> String {
        // Serialized from a struct rather than a `json!` value: every handshake sends
        // one. The fields are in the order a JSON object's keys are written (sorted),
        // so the text is what it was.
        #[derive(serde::Serialize)]
        struct Wire<'a> {
            channel: &'a str,
            connection_id: &'a str,
            epoch: &'a str,
            message: &'a str,
            offset: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            org_id: Option<&'a str>,
            read_offset: u64,
            status: &'a str,
            timestamp: &'a str,
            r#type: &'a str,
            user_id: &'a str,
        }
        let timestamp = now_rfc3339();
        let wire = Wire {
            channel: self.channel,
            connection_id: self.connection_id,
            epoch: self.epoch,
            message: "WebSocket connection established",
            offset: self.offset,
            org_id: self.org_id,
            read_offset: self.read_offset,
            status: "connected",
            timestamp: &timestamp,
            r#type: "system",
            user_id: self.user_id,
        };
        // A struct of strings and a number always serializes.
        serde_json::to_string(&wire).unwrap_or_default()
    }
}

/// Ends a resume: whether the client's gap was filled, and how many messages it got.
pub fn recovered(channel: &str, recovered: bool, missed: usize, epoch: &str, offset: u64) -> String {
    json!({
        "type": "system",
        "status": "recovered",
        "channel": channel,
        "recovered": recovered,
        "missed": missed,
        "epoch": epoch,
        "offset": offset,
        "timestamp": now_rfc3339(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_welcome_is_a_json_object_with_sorted_keys() {
        for org_id in [None, Some("acme")] {
            let text = Welcome {
                connection_id: "c1",
                user_id: "u\"1",
                channel: "org:acme",
                org_id,
                epoch: "e1",
                offset: 7,
                read_offset: 3,
            }
            .to_json();
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            // A serde_json value writes its keys sorted: the text is what the
            // `json!` value it replaced wrote.
            assert_eq!(value.to_string(), text);
            assert_eq!(value["type"], "system");
            assert_eq!(value["status"], "connected");
            assert_eq!(value["user_id"], "u\"1");
            assert_eq!(value["offset"], 7);
            assert_eq!(value["read_offset"], 3);
            assert_eq!(value.get("org_id").and_then(|v| v.as_str()), org_id);
        }
    }

    #[test]
    fn parses_client_messages() {
        assert_eq!(ClientMessage::parse(r#"{"type":"ping"}"#), ClientMessage::Ping);
        assert_eq!(
            ClientMessage::parse(r#"{"type":"heartbeat"}"#),
            ClientMessage::Heartbeat
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"refresh","token":"t"}"#),
            ClientMessage::Refresh {
                token: "t".to_owned()
            }
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"refresh"}"#),
            ClientMessage::Unsupported
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"publish"}"#),
            ClientMessage::Unsupported
        );
        assert_eq!(ClientMessage::parse("[1,2]"), ClientMessage::Unsupported);
        assert_eq!(ClientMessage::parse("hello"), ClientMessage::InvalidJson);
        assert_eq!(
            ClientMessage::parse(r#"{"type":"unsubscribe","channel":"org:a","id":"s1"}"#),
            ClientMessage::Unsubscribe {
                channel: "org:a".to_owned(),
                id: json!("s1")
            }
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"unsubscribe","id":"s1"}"#),
            ClientMessage::Unsupported
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"read","channel":"org:a","offset":4}"#),
            ClientMessage::Read(Read {
                channel: Ok("org:a".to_owned()),
                offset: Ok(4)
            })
        );
        for bad in [
            r#"{"type":"read","channel":"org:a","offset":-1}"#,
            r#"{"type":"read","channel":"org:a","offset":1.5}"#,
            r#"{"type":"read","channel":"org:a","offset":"4"}"#,
            r#"{"type":"read","channel":"org:a"}"#,
        ] {
            let ClientMessage::Read(read) = ClientMessage::parse(bad) else {
                panic!("{bad}")
            };
            assert!(read.offset.is_err(), "{bad}");
        }
        let ClientMessage::Read(read) = ClientMessage::parse(r#"{"type":"read","offset":4}"#) else {
            panic!()
        };
        assert!(read.channel.is_err());
    }

    fn subscribe(text: &str) -> Subscribe {
        match ClientMessage::parse(text) {
            ClientMessage::Subscribe(subscribe) => subscribe,
            other => panic!("{text} parsed as {other:?}"),
        }
    }

    #[test]
    fn parses_subscribe() {
        let s = subscribe(
            r#"{"type":"subscribe","channel":"org:acme","id":"s1","since":41,"epoch":"abc","presence":true}"#,
        );
        assert_eq!(s.channel, json!("org:acme"));
        assert_eq!(s.id, json!("s1"));
        assert!(s.presence);
        assert_eq!(
            s.resume,
            Ok(Some(Resume {
                since: 41,
                epoch: Some("abc".to_owned())
            }))
        );
        let s = subscribe(r#"{"type":"subscribe","channel":"org:acme","id":7}"#);
        assert!(!s.presence);
        assert_eq!((s.id, s.resume), (json!(7), Ok(None)));
        let s = subscribe(r#"{"type":"subscribe","channel":"org:acme","since":0}"#);
        assert_eq!(s.id, Value::Null);
        assert_eq!(
            s.resume,
            Ok(Some(Resume {
                since: 0,
                epoch: None
            }))
        );
        assert_eq!(
            subscribe(r#"{"type":"subscribe","channel":3}"#).channel,
            Value::Null
        );
        for bad in [
            r#"{"type":"subscribe","channel":"org:a","since":-1}"#,
            r#"{"type":"subscribe","channel":"org:a","since":1.5}"#,
            r#"{"type":"subscribe","channel":"org:a","since":"4"}"#,
            r#"{"type":"subscribe","channel":"org:a","since":1,"epoch":"a b"}"#,
            r#"{"type":"subscribe","channel":"org:a","since":1,"epoch":5}"#,
            r#"{"type":"subscribe","channel":"org:a","epoch":"abc"}"#,
        ] {
            assert!(subscribe(bad).resume.is_err(), "{bad}");
        }
    }
}
