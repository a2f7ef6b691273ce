//! WebSocket close codes: the one table in code, mirrored by
//! `docs/protocol.md` (a tidy test compares them).
//!
//! 4000–4099 are "do not reconnect unchanged" (Pusher's convention), except 4429,
//! which clients retry with capped exponential backoff.

/// Why herald closes a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: normal closure; also at `HERALD_MAX_CONNECTION_AGE`.
    Normal,
    /// 1001: the server is shutting down; reconnect after a short random delay.
    GoingAway,
    /// 1003: the client sent a binary frame.
    UnsupportedData,
    /// 1008: the client was too slow to read and its outbox overflowed.
    SlowConsumer,
    /// 1009: the client sent a message larger than 4 KiB.
    MessageTooBig,
    /// 4000: bad request (malformed path id, bad `since` or `epoch`).
    BadRequest,
    /// 4001: no token, bad token, expired token, or a refresh for another user.
    Unauthorized,
    /// 4003: not a member of the org, or not the user whose stream this is.
    Forbidden,
    /// 4429: too many connections for this user, or too many client messages.
    TooManyRequests,
}

impl CloseCode {
    /// Every code herald sends, in table order.
    pub const ALL: [CloseCode; 9] = [
        Self::Normal,
        Self::GoingAway,
        Self::UnsupportedData,
        Self::SlowConsumer,
        Self::MessageTooBig,
        Self::BadRequest,
        Self::Unauthorized,
        Self::Forbidden,
        Self::TooManyRequests,
    ];

    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::UnsupportedData => 1003,
            Self::SlowConsumer => 1008,
            Self::MessageTooBig => 1009,
            Self::BadRequest => 4000,
            Self::Unauthorized => 4001,
            Self::Forbidden => 4003,
            Self::TooManyRequests => 4429,
        }
    }

    /// A short default reason sent in the close frame.
    pub fn default_reason(self) -> &'static str {
        match self {
            Self::Normal => "normal closure",
            Self::GoingAway => "server shutting down",
            Self::UnsupportedData => "binary frames are not supported",
            Self::SlowConsumer => "client too slow",
            Self::MessageTooBig => "message too big",
            Self::BadRequest => "bad request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::TooManyRequests => "too many requests",
        }
    }
}

/// A close frame to send: code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: CloseCode,
    pub reason: String,
}

impl Close {
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        // A close frame's reason must fit in 123 bytes.
        if reason.len() > 120 {
            let mut cut = 120;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Self { code, reason }
    }
}

impl From<CloseCode> for Close {
    fn from(code: CloseCode) -> Self {
        Self::new(code, code.default_reason())
    }
}
