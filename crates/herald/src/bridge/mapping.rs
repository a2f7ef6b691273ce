//! How a `group_send` message dict becomes the herald message, under the rule
//! (`config::django::GroupRule`) its group matched.

use serde_json::{Map, Value};

use crate::channel::{Channel, Draft};
use crate::compose;
use crate::config::django::{GroupRule, MessageKind, Unmappable};
use crate::ids::OrgId;

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
    match rule.message() {
        MessageKind::Notification => {
            let field = rule.field().unwrap_or("notification");
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
            let mut message = match rule.field() {
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
