//! The JSON messages a session exchanges with its client, besides published messages
//! (which arrive already serialized): the "client → server" table of docs/protocol.md.

use serde_json::{json, Value};

use crate::channel::now_rfc3339;

/// Client message types herald understands, in the order of the documented table.
pub const CLIENT_MESSAGE_TYPES: [&str; 3] = ["ping", "heartbeat", "refresh"];

/// A parsed client text frame.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage {
    Ping,
    Heartbeat,
    Refresh {
        token: String,
    },
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
            _ => ClientMessage::Unsupported,
        }
    }

    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ClientMessage::Ping => "ping",
            ClientMessage::Heartbeat => "heartbeat",
            ClientMessage::Refresh { .. } => "refresh",
            ClientMessage::Unsupported => "unsupported",
            ClientMessage::InvalidJson => "invalid_json",
        }
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

pub fn unsupported_message() -> String {
    error(
        "unsupported_message",
        "clients may send only ping, heartbeat and refresh messages",
    )
}

/// The first message of every accepted socket.
pub struct Welcome<'a> {
    pub connection_id: &'a str,
    pub user_id: &'a str,
    pub channel: &'a str,
    pub org_id: Option<&'a str>,
    pub epoch: &'a str,
    pub offset: u64,
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
    }
}
