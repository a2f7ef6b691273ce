//! The `[django]` table of the TOML file: how herald reads a channels_redis layer (its
//! prefix, expiries, encryption keys) and which Django groups map to which herald
//! channels. Every key is listed in [`KEYS`] and documented in docs/protocol.md (a tidy
//! test checks it).

use std::time::Duration;

use serde::Deserialize;

use crate::bridge::mapping::{GroupRule, MessageKind, Rules};
use crate::config::Secret;

/// Every key of the `[django]` table, then of each `[[django.groups]]` entry (prefixed
/// `groups.`), as documented.
pub const KEYS: [&str; 14] = [
    "layer",
    "prefix",
    "channel",
    "group_expiry",
    "expiry",
    "random_prefix_length",
    "symmetric_encryption_keys",
    "leave_after_ms",
    "default_groups",
    "groups",
    "groups.group",
    "groups.channel",
    "groups.message",
    "groups.field",
];

/// channels_redis's own defaults (`RedisChannelLayer.__init__`).
pub const DEFAULT_PREFIX: &str = "asgi";
pub const DEFAULT_GROUP_EXPIRY: Duration = Duration::from_secs(86_400);
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(60);
pub const DEFAULT_RANDOM_PREFIX_LENGTH: usize = 12;

/// The channels_redis channel name herald reads (the part before `!`).
pub const DEFAULT_CHANNEL: &str = "herald";

/// Which channels_redis layers herald reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layers {
    /// `channels_redis.core.RedisChannelLayer`: group sorted sets and queues.
    Core,
    /// `channels_redis.pubsub.RedisPubSubChannelLayer`: Redis pub/sub.
    PubSub,
    /// Both (the default: each costs nothing when Django does not use it).
    Both,
}

impl Layers {
    pub fn core(self) -> bool {
        matches!(self, Self::Core | Self::Both)
    }

    pub fn pubsub(self) -> bool {
        matches!(self, Self::PubSub | Self::Both)
    }
}

/// The `[django]` table, checked.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    pub layers: Layers,
    pub prefix: String,
    pub channel: String,
    pub group_expiry: Duration,
    pub expiry: Duration,
    pub random_prefix_length: usize,
    pub symmetric_encryption_keys: Vec<Secret>,
    /// How long herald stays in a channel's groups after its last socket on this node
    /// left, so a client that comes back finds what was sent meanwhile in history.
    /// `None` (the default): `HERALD_HISTORY_TTL`, as long as history keeps a message.
    pub leave_after: Option<Duration>,
    pub rules: Rules,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        Self {
            layers: Layers::Both,
            prefix: DEFAULT_PREFIX.to_owned(),
            channel: DEFAULT_CHANNEL.to_owned(),
            group_expiry: DEFAULT_GROUP_EXPIRY,
            expiry: DEFAULT_EXPIRY,
            random_prefix_length: DEFAULT_RANDOM_PREFIX_LENGTH,
            symmetric_encryption_keys: Vec::new(),
            leave_after: None,
            rules: Rules::defaults(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    layer: Option<String>,
    prefix: Option<String>,
    channel: Option<String>,
    group_expiry: Option<u64>,
    expiry: Option<u64>,
    random_prefix_length: Option<usize>,
    symmetric_encryption_keys: Option<Vec<String>>,
    leave_after_ms: Option<u64>,
    default_groups: Option<bool>,
    #[serde(default)]
    groups: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    group: String,
    channel: String,
    message: String,
    field: Option<String>,
}

/// channels_redis's name checks (`BaseChannelLayer`): names are shorter than 100
/// characters; group names and the part of a channel name before `!` use these.
pub const MAX_NAME_LEN: usize = 100;

pub fn is_group_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

impl BridgeOptions {
    /// Parses the `[django]` table; the error says which key is wrong and how.
    pub fn from_toml(value: toml::Value) -> Result<Self, String> {
        let raw: RawOptions = value.try_into().map_err(|err: toml::de::Error| {
            format!("{} (the keys are {})", err.message().trim(), KEYS.join(", "))
        })?;
        let mut options = Self::default();
        if let Some(layer) = raw.layer {
            options.layers = match layer.as_str() {
                "core" => Layers::Core,
                "pubsub" => Layers::PubSub,
                "both" => Layers::Both,
                other => {
                    return Err(format!(
                        "layer = {other:?}: expected \"core\" (channels_redis.core.RedisChannelLayer), \
                         \"pubsub\" (channels_redis.pubsub.RedisPubSubChannelLayer) or \"both\""
                    ))
                }
            };
        }
        if let Some(prefix) = raw.prefix {
            // channels_redis builds key names by plain concatenation, so any text works;
            // keep it printable so keys stay readable.
            if prefix.is_empty() || prefix.len() > 64 || prefix.chars().any(|c| c.is_control() || c == ' ') {
                return Err(format!(
                    "prefix = {prefix:?}: expected the channels_redis `prefix` (default \"asgi\"), \
                     1 to 64 characters without spaces"
                ));
            }
            options.prefix = prefix;
        }
        if let Some(channel) = raw.channel {
            if channel.is_empty() || channel.len() > 32 || !channel.chars().all(is_group_char) {
                return Err(format!(
                    "channel = {channel:?}: expected 1 to 32 characters from [A-Za-z0-9_.-]"
                ));
            }
            options.channel = channel;
        }
        if let Some(seconds) = raw.group_expiry {
            options.group_expiry = seconds_at_least_one("group_expiry", seconds)?;
        }
        if let Some(seconds) = raw.expiry {
            options.expiry = seconds_at_least_one("expiry", seconds)?;
        }
        if let Some(length) = raw.random_prefix_length {
            if length > 64 {
                return Err(format!(
                    "random_prefix_length = {length}: expected the channels_redis value (default 12), at most 64"
                ));
            }
            options.random_prefix_length = length;
        }
        if let Some(keys) = raw.symmetric_encryption_keys {
            if keys.iter().any(String::is_empty) {
                return Err("symmetric_encryption_keys: a key is empty".to_owned());
            }
            options.symmetric_encryption_keys = keys.into_iter().map(Secret::new).collect();
        }
        if let Some(ms) = raw.leave_after_ms {
            options.leave_after = Some(Duration::from_millis(ms.min(24 * 3600 * 1000)));
        }
        let mut rules = Vec::with_capacity(raw.groups.len());
        for (idx, rule) in raw.groups.into_iter().enumerate() {
            let kind = MessageKind::parse(&rule.message).ok_or_else(|| {
                format!(
                    "groups[{idx}].message = {:?}: expected notification, org_event, frame or as_is",
                    rule.message
                )
            })?;
            let parsed = GroupRule::new(&rule.group, &rule.channel, kind, rule.field)
                .map_err(|reason| format!("groups[{idx}]: {reason}"))?;
            rules.push(parsed);
        }
        if raw.default_groups.unwrap_or(true) {
            rules.extend(Rules::defaults().into_vec());
        }
        if rules.is_empty() {
            return Err(
                "default_groups = false and no [[django.groups]]: no group would be bridged".to_owned(),
            );
        }
        options.rules = Rules::new(rules);
        Ok(options)
    }
}

fn seconds_at_least_one(key: &str, seconds: u64) -> Result<Duration, String> {
    if seconds == 0 || seconds > 365 * 24 * 3600 {
        return Err(format!(
            "{key} = {seconds}: expected whole seconds, 1 or more (at most a year)"
        ));
    }
    Ok(Duration::from_secs(seconds))
}
