//! The `llm_*` messages of a frame stream, typed: what a worker sends ([`LlmMessage`]),
//! and what the resume and follow logic read back from history ([`LlmHead`]).
//!
//! docs/protocol.md documents the shapes; the Python client's `FrameStreamer` sends the
//! same ones (its statuses are checked against [`LlmStatus::ALL`] by a test).

use serde_json::{json, Map, Value};

/// The thinking frame's text, exactly as the Django stack sent it.
pub const THINKING_MESSAGE: &str = "LLM is generating response...";

/// The text of `llm_status restarted` (SPEC §10).
pub const RESTARTED_MESSAGE: &str = "The answer was interrupted and starts again";

/// The `type` of a frame-stream message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmKind {
    Status,
    Frame,
    Response,
    Error,
}

impl LlmKind {
    pub const ALL: [LlmKind; 4] = [Self::Status, Self::Frame, Self::Response, Self::Error];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Status => "llm_status",
            Self::Frame => "llm_frame",
            Self::Response => "llm_response",
            Self::Error => "llm_error",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// The `status` of an `llm_status` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmStatus {
    Started,
    Thinking,
    Streaming,
    /// The answer starts again: frames from index 0 replace what came before.
    Restarted,
    Completed,
    Failed,
    Cancelled,
}

impl LlmStatus {
    pub const ALL: [LlmStatus; 7] = [
        Self::Started,
        Self::Thinking,
        Self::Streaming,
        Self::Restarted,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Thinking => "thinking",
            Self::Streaming => "streaming",
            Self::Restarted => "restarted",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }

    /// The `message` herald's workers send with this status (the Python client's
    /// `FrameStreamer` sends the same).
    pub const fn message(self) -> &'static str {
        match self {
            Self::Started => "Task started",
            Self::Thinking => THINKING_MESSAGE,
            Self::Streaming => "Streaming response",
            Self::Restarted => RESTARTED_MESSAGE,
            Self::Completed => "Response completed",
            Self::Failed => "Task failed",
            Self::Cancelled => "Task cancelled",
        }
    }

    /// Whether this status ends the task's stream.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// One `llm_*` message as a worker sends it, before the stream adds `user_id`,
/// `chat_id` and `task_id` (and the broker `offset`, `epoch`, `id`, `timestamp`).
#[derive(Debug, Clone, PartialEq)]
pub enum LlmMessage<'a> {
    /// `{"type":"llm_status","status","message"}`.
    Status { status: LlmStatus, message: &'a str },
    /// The thinking frame: `{"type":"llm_frame","frame":{"status":"thinking","message",
    /// "progress":"indeterminate"}}`.
    Thinking { message: &'a str },
    /// A streaming frame: `{"type":"llm_frame","frame":{"status":"streaming","delta",
    /// "index"}}`.
    Frame { delta: &'a str, index: u64 },
    /// `{"type":"llm_response","data":{…}}`.
    Response { data: Value },
    /// `{"type":"llm_error","error"}`.
    Error { error: &'a str },
}

impl LlmMessage<'_> {
    /// `llm_status` with the status's usual message.
    pub fn status(status: LlmStatus) -> Self {
        Self::Status {
            status,
            message: status.message(),
        }
    }

    pub fn kind(&self) -> LlmKind {
        match self {
            Self::Status { .. } => LlmKind::Status,
            Self::Thinking { .. } | Self::Frame { .. } => LlmKind::Frame,
            Self::Response { .. } => LlmKind::Response,
            Self::Error { .. } => LlmKind::Error,
        }
    }

    /// The message as a JSON object: `type` first, then its own fields.
    pub fn into_object(self) -> Map<String, Value> {
        let mut message = Map::new();
        message.insert("type".to_owned(), json!(self.kind().as_str()));
        match self {
            Self::Status {
                status,
                message: text,
            } => {
                message.insert("status".to_owned(), json!(status.as_str()));
                message.insert("message".to_owned(), json!(text));
            }
            Self::Thinking { message: text } => {
                message.insert(
                    "frame".to_owned(),
                    json!({"status": "thinking", "message": text, "progress": "indeterminate"}),
                );
            }
            Self::Frame { delta, index } => {
                message.insert(
                    "frame".to_owned(),
                    json!({"status": "streaming", "delta": delta, "index": index}),
                );
            }
            Self::Response { data } => {
                message.insert("data".to_owned(), data);
            }
            Self::Error { error } => {
                message.insert("error".to_owned(), json!(error));
            }
        }
        message
    }
}

/// What the resume and follow logic read of a frame-stream message from history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmHead<'a> {
    Status(LlmStatus),
    /// A streaming frame (`delta` and `index` both present).
    Frame {
        delta: &'a str,
        index: u64,
    },
    /// Any other `llm_frame` (the thinking frame).
    OtherFrame,
    Response,
    Error,
}

impl<'a> LlmHead<'a> {
    /// Reads `message`; `None` when it is not an `llm_*` message herald knows (or an
    /// `llm_status` with an unknown status).
    pub fn read(message: &'a Value) -> Option<Self> {
        let kind = LlmKind::parse(message.get("type")?.as_str()?)?;
        Some(match kind {
            LlmKind::Status => Self::Status(LlmStatus::parse(message.get("status")?.as_str()?)?),
            LlmKind::Frame => {
                let frame = message.get("frame");
                let index = frame.and_then(|f| f.get("index")).and_then(Value::as_u64);
                let delta = frame.and_then(|f| f.get("delta")).and_then(Value::as_str);
                match (delta, index) {
                    (Some(delta), Some(index)) => Self::Frame { delta, index },
                    _ => Self::OtherFrame,
                }
            }
            LlmKind::Response => Self::Response,
            LlmKind::Error => Self::Error,
        })
    }
}
