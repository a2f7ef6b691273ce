//! Channels and the messages published to them.
//!
//! A channel is named `kind:id`: `notifications:{user}`, `org:{org_id}` or
//! `frames:{user_id}`. Every message published to a channel gets an `offset` (+1 per
//! message in that channel), the channel's `epoch`, an `id` and a `timestamp`. Those
//! fields are added once, when the message is sequenced, and the result is kept as the
//! exact bytes every subscriber receives: a message is serialized once per publish.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::ids::{check_id, InvalidId};

/// The three kinds of channel herald serves (docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// `notifications:{user}`: one user's notifications.
    Notifications,
    /// `org:{org_id}`: events for every member of an organization.
    Org,
    /// `frames:{user_id}`: one user's LLM response streams.
    Frames,
}

impl ChannelKind {
    pub const ALL: [ChannelKind; 3] = [Self::Notifications, Self::Org, Self::Frames];

    /// The prefix before `:` in the channel name.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Notifications => "notifications",
            Self::Org => "org",
            Self::Frames => "frames",
        }
    }

    /// A bounded label for metrics and logs.
    pub fn label(self) -> &'static str {
        self.prefix()
    }
}

/// A validated channel name. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Channel {
    kind: ChannelKind,
    name: Arc<str>,
}

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidChannel {
    #[error("channel must look like notifications:{{user_id}}, org:{{org_id}} or frames:{{user_id}}")]
    UnknownKind,
    #[error(transparent)]
    BadId(#[from] InvalidId),
}

impl Channel {
    /// Builds the channel of `kind` for `id`, validating `id`.
    pub fn new(kind: ChannelKind, id: &str) -> Result<Self, InvalidId> {
        let what = match kind {
            ChannelKind::Org => "org_id",
            ChannelKind::Notifications | ChannelKind::Frames => "user_id",
        };
        check_id(id, what)?;
        // Pushed rather than `format!`ed: one channel name a publish, and `fmt` costs
        // more than the name (issue 19).
        let prefix = kind.prefix();
        let mut name = String::with_capacity(prefix.len() + 1 + id.len());
        name.push_str(prefix);
        name.push(':');
        name.push_str(id);
        Ok(Self {
            kind,
            name: Arc::from(name),
        })
    }

    /// Parses a full channel name such as `org:acme`.
    pub fn parse(name: &str) -> Result<Self, InvalidChannel> {
        let (prefix, id) = name.split_once(':').ok_or(InvalidChannel::UnknownKind)?;
        let kind = ChannelKind::ALL
            .into_iter()
            .find(|kind| kind.prefix() == prefix)
            .ok_or(InvalidChannel::UnknownKind)?;
        Ok(Self::new(kind, id)?)
    }

    pub fn kind(&self) -> ChannelKind {
        self.kind
    }

    /// The full name, `kind:id`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The part after `kind:`.
    pub fn id(&self) -> &str {
        &self.name[self.kind.prefix().len() + 1..]
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Fields herald adds to every published message; a publisher's own values for them
/// are dropped so the wire never carries a key twice.
pub const RESERVED_FIELDS: [&str; 5] = ["channel", "id", "offset", "epoch", "timestamp"];

/// A message body before it is sequenced: a JSON object serialized once, without the
/// fields in [`RESERVED_FIELDS`].
#[derive(Debug, Clone)]
pub struct Draft {
    /// Serialized JSON object, starting with `{` and ending with `}`.
    body: Vec<u8>,
}

impl Draft {
    /// Serializes `body`, dropping any reserved fields it carries.
    pub fn from_object(mut body: serde_json::Map<String, serde_json::Value>) -> Self {
        for field in RESERVED_FIELDS {
            body.remove(field);
        }
        // Serializing a map of JSON values cannot fail: keys are strings and values are
        // already valid JSON.
        let body = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        Self { body }
    }

    /// `{"<field>":<value>,"type":"<kind>"}`, the same bytes [`Draft::from_object`]
    /// makes of that two-field map when `field` sorts before `type`, without building
    /// the map (a notification's envelope; issue 19, the unicast path).
    pub fn enveloped(field: &str, value: &serde_json::Value, kind: &str) -> Self {
        debug_assert!(field < "type" && !RESERVED_FIELDS.contains(&field));
        // Room for a typical notification, so that serializing it rarely grows the
        // buffer (each growth copies it; the buffer lives only until the publish).
        let mut body = Vec::with_capacity(256);
        body.push(b'{');
        // Writing JSON values into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut body, field);
        body.push(b':');
        let _ = serde_json::to_writer(&mut body, value);
        body.extend_from_slice(b",\"type\":");
        let _ = serde_json::to_writer(&mut body, kind);
        body.push(b'}');
        Self { body }
    }

    /// Rebuilds a draft from bytes produced by [`Draft::from_object`] (used by brokers
    /// that ship drafts between processes).
    pub fn from_serialized(body: Vec<u8>) -> Option<Self> {
        (body.first() == Some(&b'{') && body.last() == Some(&b'}')).then_some(Self { body })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.body
    }

    /// Completes the message with its sequence fields. This is the one serialization a
    /// publish does: the bytes returned are what every subscriber receives.
    pub fn seal(&self, channel: &str, id: &str, offset: u64, epoch: &str, timestamp: &str) -> Bytes {
        // The fields' keys and punctuation are 58 bytes, an offset at most 20.
        let mut out = Vec::with_capacity(
            self.body.len() + channel.len() + id.len() + epoch.len() + timestamp.len() + 80,
        );
        out.extend_from_slice(&self.body[..self.body.len() - 1]);
        if self.body.len() > 2 {
            out.push(b',');
        }
        // The channel name is validated (`[A-Za-z0-9_.:@-]`), and `id`, `epoch` and
        // `timestamp` are generated by herald from a safe alphabet, so they need no
        // escaping; serde_json would escape them identically.
        out.extend_from_slice(b"\"channel\":\"");
        out.extend_from_slice(channel.as_bytes());
        out.extend_from_slice(b"\",\"id\":\"");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\",\"offset\":");
        push_decimal(&mut out, offset);
        out.extend_from_slice(b",\"epoch\":\"");
        out.extend_from_slice(epoch.as_bytes());
        out.extend_from_slice(b"\",\"timestamp\":\"");
        out.extend_from_slice(timestamp.as_bytes());
        out.extend_from_slice(b"\"}");
        Bytes::from(out)
    }
}

/// A sequenced message: its offset and epoch in the channel and the exact bytes sent to
/// clients.
///
/// The epoch travels beside the bytes (not only inside them) so that a session can
/// check every message it forwards against the epoch its client was told, without
/// parsing JSON: an offset means nothing outside its epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub offset: u64,
    /// The channel's epoch this message was sequenced in.
    pub epoch: Arc<str>,
    /// The JSON text frame, shared by every subscriber. Empty for an epoch marker.
    pub bytes: Bytes,
    /// When this node sequenced (or received) it, for publish-to-send latency.
    pub published_at: tokio::time::Instant,
}

impl Message {
    /// A marker that tells a channel's sessions the channel now stands at `epoch` and
    /// `offset`, found by a node that could not see the messages that led there (Redis
    /// restarted, a failover lost writes). Sessions treat it as a message of that epoch
    /// and never send it; it carries no bytes.
    pub fn epoch_marker(epoch: Arc<str>, offset: u64) -> Self {
        Self {
            offset,
            epoch,
            bytes: Bytes::new(),
            published_at: tokio::time::Instant::now(),
        }
    }

    /// Whether this is an [`Message::epoch_marker`].
    pub fn is_marker(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Appends `n` in decimal.
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// The current time as RFC 3339 UTC with milliseconds and a `Z` suffix.
///
/// Every published message carries one, so it is formatted here directly (civil date
/// from days since the epoch, H. Hinnant's algorithm) rather than through `fmt`; a
/// test checks it against `humantime` across centuries.
pub fn now_rfc3339() -> String {
    Rfc3339Millis::now().as_str().to_owned()
}

/// A time as RFC 3339 UTC with milliseconds (`2026-12-06T10:18:58.123Z`), held on the
/// stack: a publish writes it straight into the message it seals, with no `String`
/// made and freed for each message.
pub struct Rfc3339Millis([u8; 24]);

impl Rfc3339Millis {
    pub fn now() -> Self {
        Self::at(std::time::SystemTime::now())
    }

    pub fn as_str(&self) -> &str {
        // Always ASCII digits and separators (see `Rfc3339Millis::at`).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// `time`, formatted (H. Hinnant's civil date from days since the epoch).
    fn at(time: std::time::SystemTime) -> Self {
        let since = time.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs().min(MAX_RFC3339_SECS);
        let millis = since.subsec_millis();
        let days = secs / 86_400;
        let of_day = secs % 86_400;
        // Days since 0000-03-01, in 400-year eras.
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + u64::from(month <= 2);
        let mut out = [0u8; 24];
        let mut put = |at: usize, width: usize, mut n: u64| {
            for idx in (at..at + width).rev() {
                out[idx] = b'0' + (n % 10) as u8;
                n /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, of_day / 3_600);
        put(14, 2, of_day / 60 % 60);
        put(17, 2, of_day % 60);
        put(20, 3, u64::from(millis));
        for (idx, sep) in [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
            (23, b'Z'),
        ] {
            out[idx] = sep;
        }
        Self(out)
    }
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z).
const MAX_RFC3339_SECS: u64 = 253_402_300_799;

/// Formats a Unix timestamp (seconds) as RFC 3339 UTC; times past the year 9999 (a
/// token's `exp` can say anything) are written as the last second of 9999.
pub fn unix_to_rfc3339(secs: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.min(MAX_RFC3339_SECS));
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A fresh random identifier for messages, connections and epochs.
pub fn new_id() -> String {
    // Encoded into a buffer rather than through `Display`: one id a published message,
    // and `fmt` costs more than the id (issue 19).
    let mut buffer = [0u8; uuid::fmt::Simple::LENGTH];
    uuid::Uuid::new_v4().simple().encode_lower(&mut buffer).to_owned()
}

#[cfg(test)]
mod tests;
