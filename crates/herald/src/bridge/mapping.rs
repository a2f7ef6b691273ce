//! Which Django group feeds which herald channel, and how a `group_send` message dict
//! becomes the herald message.
//!
//! A rule is a group pattern with one `{id}` (`user_{id}`), a channel pattern
//! (`notifications:{id}`) and a message kind. Both directions are needed: a socket on
//! `notifications:alice` makes herald join `user_alice` and `notifications_alice`
//! (core layer), and a message from group `user_alice` is published to
//! `notifications:alice`. Rules are tried in order; the first group pattern that
//! matches wins.

use serde_json::{Map, Value};

use crate::bridge::options::{is_group_char, MAX_NAME_LEN};
use crate::channel::{Channel, ChannelKind, Draft};
use crate::compose;
use crate::ids::OrgId;

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

/// `type` as Django dispatches it (`llm.frame` calls `llm_frame`), as herald spells it.
fn normalize_type(message: &mut Map<String, Value>) {
    if let Some(Value::String(kind)) = message.get_mut("type") {
        if kind.contains('.') {
            *kind = kind.replace('.', "_");
        }
    }
}

/// Builds the herald message for `channel` from a `group_send` dict under `rule`.
pub fn compose(
    rule: &GroupRule,
    channel: &Channel,
    mut dict: Map<String, Value>,
) -> Result<Draft, Unmappable> {
    let invalid = |err: compose::Invalid| Unmappable(err.0);
    match rule.message {
        MessageKind::Notification => {
            let field = rule.field.as_deref().unwrap_or("notification");
            match dict.remove(field) {
                Some(notification @ Value::Object(_)) => compose::notification(notification).map_err(invalid),
                Some(_) => Err(Unmappable(format!("the message's `{field}` is not a dict"))),
                None => Err(Unmappable(format!("the message has no `{field}` dict"))),
            }
        }
        MessageKind::OrgEvent => {
            let org_id = OrgId::parse(channel.id()).map_err(|err| Unmappable(err.to_string()))?;
            compose::org_event(&org_id, dict).map_err(invalid)
        }
        MessageKind::Frame => {
            normalize_type(&mut dict);
            compose::frame(channel, dict).map_err(invalid)
        }
        MessageKind::AsIs => {
            let mut message = match rule.field.as_deref() {
                None => dict,
                Some(field) => match dict.remove(field) {
                    Some(Value::Object(inner)) => inner,
                    _ => return Err(Unmappable(format!("the message has no `{field}` dict"))),
                },
            };
            normalize_type(&mut message);
            Ok(Draft::from_object(message))
        }
    }
}
