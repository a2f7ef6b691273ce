//! The `[django]` table of the TOML file: how herald reads a channels_redis layer (its
//! prefix, expiries, encryption keys) and which Django groups map to which herald
//! channels. Every key is listed in [`KEYS`] and documented in docs/protocol.md (a tidy
//! test checks it).
//!
//! A rule is a group pattern with one `{id}` (`user_{id}`), a channel pattern
//! (`notifications:{id}`) and a message kind. Both directions are needed: a socket on
//! `notifications:alice` makes herald join `user_alice` and `notifications_alice`
//! (core layer), and a message from group `user_alice` is published to
//! `notifications:alice`. Rules are tried in order; the first group pattern that
//! matches wins. How a matched message becomes a herald message is the bridge's
//! (`bridge::mapping`).

use std::time::Duration;

use serde::Deserialize;

use crate::channel::{Channel, ChannelKind};
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

/// How a message dict becomes a herald message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// `{"type":"notification","notification": dict[field]}`; `field` defaults to
    /// `notification` and must hold a dict.
    Notification,
    /// `{"type":"org_event","org_id","event_type","data"}` from the dict's `event_type`
    /// and `data`.
    OrgEvent,
    /// The dict is an `llm_status` / `llm_frame` / `llm_response` / `llm_error` message
    /// (its `type` with `.` read as `_`, so `llm.frame` works too) with a `chat_id`.
    Frame,
    /// The dict itself (or `dict[field]`), with `type` spelled with `_` for `.`.
    AsIs,
}

impl MessageKind {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "notification" => Some(Self::Notification),
            "org_event" => Some(Self::OrgEvent),
            "frame" => Some(Self::Frame),
            "as_is" => Some(Self::AsIs),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Notification => "notification",
            Self::OrgEvent => "org_event",
            Self::Frame => "frame",
            Self::AsIs => "as_is",
        }
    }
}

/// One group pattern → channel pattern rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRule {
    /// The group pattern's text before and after `{id}`.
    before: String,
    after: String,
    kind: ChannelKind,
    message: MessageKind,
    field: Option<String>,
}

impl GroupRule {
    /// Checks a rule: `group` is a channels_redis group name with one `{id}` and some
    /// fixed text; `channel` is `notifications:{id}`, `org:{id}` or `frames:{id}`;
    /// `message` fits the channel.
    pub fn new(
        group: &str,
        channel: &str,
        message: MessageKind,
        field: Option<String>,
    ) -> Result<Self, String> {
        let Some((before, after)) = group.split_once("{id}") else {
            return Err(format!(
                "group = {group:?} must contain {{id}} once, e.g. \"user_{{id}}\""
            ));
        };
        if after.contains("{id}") {
            return Err(format!("group = {group:?} must contain {{id}} only once"));
        }
        if before.is_empty() && after.is_empty() {
            return Err(format!(
                "group = {group:?} needs fixed text around {{id}}, e.g. \"user_{{id}}\"; it would match every group"
            ));
        }
        if !before.chars().chain(after.chars()).all(is_group_char) {
            return Err(format!(
                "group = {group:?}: Django group names only use [A-Za-z0-9_.-] besides {{id}}"
            ));
        }
        let kind = match channel {
            "notifications:{id}" => ChannelKind::Notifications,
            "org:{id}" => ChannelKind::Org,
            "frames:{id}" => ChannelKind::Frames,
            _ => {
                return Err(format!(
                    "channel = {channel:?}: expected \"notifications:{{id}}\", \"org:{{id}}\" or \"frames:{{id}}\""
                ))
            }
        };
        let fits = match message {
            MessageKind::Notification => kind == ChannelKind::Notifications,
            MessageKind::OrgEvent => kind == ChannelKind::Org,
            MessageKind::Frame => kind == ChannelKind::Frames,
            MessageKind::AsIs => true,
        };
        if !fits {
            return Err(format!(
                "message = \"{}\" cannot be published to {channel} (notification goes to notifications:, \
                 org_event to org:, frame to frames:; as_is to any)",
                message.label()
            ));
        }
        if field.is_some() && !matches!(message, MessageKind::Notification | MessageKind::AsIs) {
            return Err("field only applies to message = \"notification\" or \"as_is\"".to_owned());
        }
        Ok(Self {
            before: before.to_owned(),
            after: after.to_owned(),
            kind,
            message,
            field,
        })
    }

    /// The id in `group` if the group matches this rule's pattern.
    fn id_in<'g>(&self, group: &'g str) -> Option<&'g str> {
        let id = group.strip_prefix(&self.before)?.strip_suffix(&self.after)?;
        (!id.is_empty()).then_some(id)
    }

    /// The group this rule maps to `channel`, if the channel's kind matches and its id
    /// can be part of a Django group name.
    fn group_for(&self, channel: &Channel) -> Option<String> {
        if channel.kind() != self.kind {
            return None;
        }
        let id = channel.id();
        let group = format!("{}{id}{}", self.before, self.after);
        (id.chars().all(is_group_char) && group.len() < MAX_NAME_LEN).then_some(group)
    }

    /// The glob that matches this rule's groups, for PSUBSCRIBE (the fixed parts only
    /// use characters that are not special in Redis globs).
    pub fn glob(&self) -> String {
        format!("{}*{}", self.before, self.after)
    }

    pub fn message(&self) -> MessageKind {
        self.message
    }

    /// The dict field that holds the message (`notification` and `as_is` only).
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }
}

/// Why a message dict could not become a herald message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unmappable(pub String);

/// The rules of one bridge, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules(Vec<GroupRule>);

/// The original Django Channels app's groups: `user_{id}` and `notifications_{id}` carry notifications,
/// `org_{id}` organization events, `frames_{id}` and `frame_stream_{id}` LLM streams.
const DEFAULT_RULES: [(&str, &str, MessageKind); 5] = [
    ("user_{id}", "notifications:{id}", MessageKind::Notification),
    (
        "notifications_{id}",
        "notifications:{id}",
        MessageKind::Notification,
    ),
    ("org_{id}", "org:{id}", MessageKind::OrgEvent),
    ("frames_{id}", "frames:{id}", MessageKind::Frame),
    ("frame_stream_{id}", "frames:{id}", MessageKind::Frame),
];

impl Rules {
    pub fn new(rules: Vec<GroupRule>) -> Self {
        Self(rules)
    }

    pub fn defaults() -> Self {
        Self(
            DEFAULT_RULES
                .iter()
                .filter_map(|(group, channel, message)| GroupRule::new(group, channel, *message, None).ok())
                .collect(),
        )
    }

    pub fn into_vec(self) -> Vec<GroupRule> {
        self.0
    }

    pub fn iter(&self) -> impl Iterator<Item = &GroupRule> {
        self.0.iter()
    }

    /// The first rule matching `group` and the herald channel it maps to; `None` when no
    /// rule's pattern matches, `Some(Err)` when one matches but the id is not a valid
    /// herald id.
    pub fn route(&self, group: &str) -> Option<Result<(&GroupRule, Channel), Unmappable>> {
        let (rule, id) = self
            .0
            .iter()
            .find_map(|rule| rule.id_in(group).map(|id| (rule, id)))?;
        Some(
            Channel::new(rule.kind, id)
                .map(|channel| (rule, channel))
                .map_err(|err| Unmappable(format!("the group's id is not a herald id: {err}"))),
        )
    }

    /// Every group that feeds `channel`, without repeats, in rule order.
    pub fn groups_for(&self, channel: &Channel) -> Vec<String> {
        let mut groups: Vec<String> = Vec::new();
        for group in self.0.iter().filter_map(|rule| rule.group_for(channel)) {
            // An earlier rule may claim this group name for another channel.
            let routes_here = matches!(self.route(&group), Some(Ok((_, routed))) if routed == *channel);
            if routes_here && !groups.contains(&group) {
                groups.push(group);
            }
        }
        groups
    }
}
