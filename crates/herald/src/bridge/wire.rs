//! channels_redis's Redis format: key and channel names, and message bodies.
//!
//! A body is `random prefix ‖ payload` on the core layer (12 random bytes by default, so
//! equal messages stay distinct members of a sorted set) and just the payload on the
//! pub/sub layer. The payload is msgpack (`serializer_format="msgpack"`, the default) or
//! UTF-8 JSON (`"json"`), Fernet-encrypted when `symmetric_encryption_keys` is set. It
//! decodes to a dict; on the core layer the dict carries `__asgi_channel__`, the
//! receiving channel name (a string after `send`) or names (a list after `group_send`).

use serde_json::{Map, Number, Value};

use crate::bridge::fernet::{Fernet, FernetError};

/// The routing key channels_redis adds to core-layer messages.
pub const ASGI_CHANNEL: &str = "__asgi_channel__";

/// The sorted set of a group's channel names (`RedisChannelLayer._group_key`).
pub fn group_key(prefix: &str, group: &str) -> String {
    format!("{prefix}:group:{group}")
}

/// The queue key of a channel whose name before `!` is `non_local` (`non_local` ends
/// with `!`): channels_redis writes `prefix + non_local_name`.
pub fn queue_key(prefix: &str, non_local: &str) -> String {
    format!("{prefix}{non_local}")
}

/// The backup of popped messages (`_backup_channel_name`).
pub fn inflight_key(queue_key: &str) -> String {
    format!("{queue_key}$inflight")
}

/// The pub/sub channel of a group (`_get_group_channel_name`).
pub fn group_pubsub_channel(prefix: &str, group: &str) -> String {
    format!("{prefix}__group__{group}")
}

/// `text` with Redis glob characters escaped, to match itself in a PSUBSCRIBE pattern.
pub fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Undecodable {
    #[error("the message is shorter than the random prefix")]
    TooShort,
    #[error("the message is Fernet-encrypted (symmetric_encryption_keys): set the same keys in the [django] table")]
    Encrypted,
    #[error("cannot decrypt: {0}")]
    Decrypt(#[from] FernetError),
    #[error("not msgpack or JSON: {0}")]
    Format(String),
    #[error("the payload is {0}, not a dict")]
    NotADict(&'static str),
    #[error("a value cannot be JSON: {0}")]
    NotJson(String),
}

/// How bodies are read.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub random_prefix_length: usize,
    pub crypter: Option<Fernet>,
    /// Fernet TTL in seconds (`expiry + 10` on the core layer; none on pub/sub).
    pub ttl: Option<u64>,
}

impl Decoder {
    /// The message dict in `body`, as of `now` (Unix seconds, for the Fernet TTL).
    pub fn decode(&self, body: &[u8], now: u64) -> Result<Map<String, Value>, Undecodable> {
        let payload = body
            .get(self.random_prefix_length..)
            .ok_or(Undecodable::TooShort)?;
        let decrypted;
        let payload = match &self.crypter {
            Some(crypter) => {
                decrypted = crypter.decrypt(payload, self.ttl, now)?;
                &decrypted[..]
            }
            None if Fernet::looks_like_token(payload) => return Err(Undecodable::Encrypted),
            None => payload,
        };
        let value = if payload.first() == Some(&b'{') {
            serde_json::from_slice(payload).map_err(|err| Undecodable::Format(err.to_string()))?
        } else {
            let mut reader = payload;
            let value =
                rmpv::decode::read_value(&mut reader).map_err(|err| Undecodable::Format(err.to_string()))?;
            msgpack_to_json(value)?
        };
        match value {
            Value::Object(map) => Ok(map),
            other => Err(Undecodable::NotADict(json_kind(&other))),
        }
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "None",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a dict",
    }
}

/// msgpack → JSON as Python's `json.dumps` would write the same dict: integer and bool
/// keys become strings; bytes, extension types and non-finite floats have no JSON form.
fn msgpack_to_json(value: rmpv::Value) -> Result<Value, Undecodable> {
    Ok(match value {
        rmpv::Value::Nil => Value::Null,
        rmpv::Value::Boolean(b) => Value::Bool(b),
        rmpv::Value::Integer(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            (None, None) => return Err(Undecodable::NotJson("an integer out of range".to_owned())),
        },
        rmpv::Value::F32(f) => float(f64::from(f))?,
        rmpv::Value::F64(f) => float(f)?,
        rmpv::Value::String(s) => match s.into_str() {
            Some(s) => Value::String(s),
            None => return Err(Undecodable::NotJson("a string that is not UTF-8".to_owned())),
        },
        rmpv::Value::Binary(_) => return Err(Undecodable::NotJson("bytes".to_owned())),
        rmpv::Value::Ext(..) => return Err(Undecodable::NotJson("a msgpack extension type".to_owned())),
        rmpv::Value::Array(items) => {
            Value::Array(items.into_iter().map(msgpack_to_json).collect::<Result<_, _>>()?)
        }
        rmpv::Value::Map(entries) => {
            let mut map = Map::with_capacity(entries.len());
            for (key, value) in entries {
                let key = match key {
                    rmpv::Value::String(s) => s
                        .into_str()
                        .ok_or_else(|| Undecodable::NotJson("a key that is not UTF-8".to_owned()))?,
                    rmpv::Value::Integer(n) => n.to_string(),
                    rmpv::Value::Boolean(b) => if b { "true" } else { "false" }.to_owned(),
                    _ => return Err(Undecodable::NotJson("a dict key that is not a string".to_owned())),
                };
                map.insert(key, msgpack_to_json(value)?);
            }
            Value::Object(map)
        }
    })
}

fn float(f: f64) -> Result<Value, Undecodable> {
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| Undecodable::NotJson("NaN or infinity".to_owned()))
}

/// Removes `__asgi_channel__` from a core-layer dict and returns the channel names in it.
pub fn take_asgi_channels(dict: &mut Map<String, Value>) -> Vec<String> {
    match dict.remove(ASGI_CHANNEL) {
        Some(Value::String(name)) => vec![name],
        Some(Value::Array(names)) => names
            .into_iter()
            .filter_map(|name| match name {
                Value::String(name) => Some(name),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}
