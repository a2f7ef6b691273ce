//! Unit tests of the bridge's pure parts: options, mapping, message decoding, Fernet.

use serde_json::{json, Map, Value};

use super::fernet::{Fernet, FernetError};
use super::mapping::compose;
use super::wire::{self, Decoder, Undecodable};
use super::Names;
use crate::channel::{Channel, ChannelKind};
use crate::config::django::{BridgeOptions, GroupRule, Layers, MessageKind, Rules};
use crate::config::Secret;

fn dict(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn channel(name: &str) -> Channel {
    Channel::parse(name).unwrap()
}

fn draft_json(draft: &crate::channel::Draft) -> Value {
    serde_json::from_slice(draft.as_bytes()).unwrap()
}

#[test]
fn default_rules_route_the_usual_django_groups() {
    let rules = Rules::defaults();
    for (group, expected) in [
        ("user_alice", "notifications:alice"),
        ("notifications_alice", "notifications:alice"),
        ("org_acme", "org:acme"),
        ("frames_bob", "frames:bob"),
        ("frame_stream_bob", "frames:bob"),
        ("user_a_b.c-d", "notifications:a_b.c-d"),
    ] {
        let (_, routed) = rules.route(group).unwrap().unwrap();
        assert_eq!(routed.name(), expected, "group {group}");
    }
    assert!(rules.route("chat_room_1").is_none());
    assert!(rules.route("user_").is_none(), "an empty id is no match");
}

#[test]
fn a_channel_joins_every_group_that_maps_to_it() {
    let rules = Rules::defaults();
    assert_eq!(
        rules.groups_for(&channel("notifications:alice")),
        ["user_alice", "notifications_alice"]
    );
    assert_eq!(rules.groups_for(&channel("org:acme")), ["org_acme"]);
    assert_eq!(
        rules.groups_for(&channel("frames:bob")),
        ["frames_bob", "frame_stream_bob"]
    );
    // `@` and `:` are valid in herald ids but not in Django group names.
    assert!(rules.groups_for(&channel("notifications:a@b.c")).is_empty());
    let long = "x".repeat(98);
    assert_eq!(
        rules.groups_for(&channel(&format!("org:{long}"))),
        Vec::<String>::new()
    );
}

#[test]
fn an_earlier_rule_owns_the_groups_it_matches() {
    let custom = GroupRule::new("user_admin_{id}", "org:{id}", MessageKind::OrgEvent, None).unwrap();
    let mut rules = vec![custom];
    rules.extend(Rules::defaults().into_vec());
    let rules = Rules::new(rules);
    let (_, routed) = rules.route("user_admin_7").unwrap().unwrap();
    assert_eq!(routed.name(), "org:7");
    // `user_admin_7` belongs to the first rule, so notifications:admin_7 does not join it.
    assert_eq!(
        rules.groups_for(&channel("notifications:admin_7")),
        ["notifications_admin_7"]
    );
    assert_eq!(rules.groups_for(&channel("org:7")), ["user_admin_7", "org_7"]);
}

#[test]
fn rules_are_checked() {
    for (group, channel, message, field, expected) in [
        (
            "user",
            "notifications:{id}",
            MessageKind::Notification,
            None,
            "must contain {id} once",
        ),
        (
            "{id}",
            "notifications:{id}",
            MessageKind::Notification,
            None,
            "needs fixed text",
        ),
        (
            "a_{id}_{id}",
            "notifications:{id}",
            MessageKind::Notification,
            None,
            "only once",
        ),
        (
            "a:{id}",
            "notifications:{id}",
            MessageKind::Notification,
            None,
            "[A-Za-z0-9_.-]",
        ),
        (
            "a_{id}",
            "users:{id}",
            MessageKind::Notification,
            None,
            "expected \"notifications:{id}\"",
        ),
        (
            "a_{id}",
            "org:{id}",
            MessageKind::Notification,
            None,
            "cannot be published to org:{id}",
        ),
        (
            "a_{id}",
            "org:{id}",
            MessageKind::OrgEvent,
            Some("x"),
            "field only applies",
        ),
    ] {
        let err = GroupRule::new(group, channel, message, field.map(str::to_owned)).unwrap_err();
        assert!(err.contains(expected), "{group} {channel}: {err}");
    }
    let rule = GroupRule::new("team-{id}.events", "org:{id}", MessageKind::AsIs, None).unwrap();
    assert_eq!(rule.glob(), "team-*.events");
}

#[test]
fn notification_takes_the_dicts_notification() {
    let rules = Rules::defaults();
    let (rule, ch) = rules.route("user_alice").unwrap().unwrap();
    let draft = compose(
        rule,
        &ch,
        dict(json!({"type": "send_notification", "notification": {"title": "Hi"}, "extra": 1})),
    )
    .unwrap();
    assert_eq!(
        draft_json(&draft),
        json!({"type": "notification", "notification": {"title": "Hi"}})
    );
    let err = compose(
        rule,
        &ch,
        dict(json!({"type": "send_notification", "title": "Hi"})),
    )
    .unwrap_err();
    assert!(err.0.contains("no `notification` dict"), "{err}");
    let err = compose(rule, &ch, dict(json!({"notification": "text"}))).unwrap_err();
    assert!(err.0.contains("not a dict"), "{err}");
}

#[test]
fn org_event_takes_event_type_and_data() {
    let rules = Rules::defaults();
    let (rule, ch) = rules.route("org_acme").unwrap().unwrap();
    let draft = compose(
        rule,
        &ch,
        dict(json!({"type": "org_event", "event_type": "resource.created", "data": {"id": 7}})),
    )
    .unwrap();
    assert_eq!(
        draft_json(&draft),
        json!({"type": "org_event", "org_id": "acme", "event_type": "resource.created", "data": {"id": 7}})
    );
    let err = compose(rule, &ch, dict(json!({"type": "org_event", "data": {}}))).unwrap_err();
    assert!(err.0.contains("event_type"), "{err}");
}

#[test]
fn frame_messages_are_checked_like_the_http_api() {
    let rules = Rules::defaults();
    let (rule, ch) = rules.route("frames_bob").unwrap().unwrap();
    let draft = compose(
        rule,
        &ch,
        dict(json!({"type": "llm.frame", "chat_id": "c1", "frame": {"status": "streaming", "delta": "Hel", "index": 0}})),
    )
    .unwrap();
    assert_eq!(
        draft_json(&draft),
        json!({"type": "llm_frame", "chat_id": "c1", "user_id": "bob",
               "frame": {"status": "streaming", "delta": "Hel", "index": 0}})
    );
    let err = compose(rule, &ch, dict(json!({"type": "llm_frame", "frame": {}}))).unwrap_err();
    assert_eq!(err.0, "chat_id is required");
    let err = compose(rule, &ch, dict(json!({"type": "progress", "chat_id": "c1"}))).unwrap_err();
    assert!(err.0.starts_with("type must be one of"), "{err}");
}

#[test]
fn as_is_keeps_the_dict_and_drops_reserved_fields() {
    let rule = GroupRule::new("team_{id}", "org:{id}", MessageKind::AsIs, None).unwrap();
    let ch = channel("org:t1");
    let draft = compose(
        &rule,
        &ch,
        dict(json!({"type": "team.update", "offset": 5, "x": [1, 2]})),
    )
    .unwrap();
    assert_eq!(draft_json(&draft), json!({"type": "team_update", "x": [1, 2]}));
    let rule = GroupRule::new(
        "team_{id}",
        "org:{id}",
        MessageKind::AsIs,
        Some("payload".to_owned()),
    )
    .unwrap();
    let draft = compose(
        &rule,
        &ch,
        dict(json!({"type": "x", "payload": {"type": "a.b", "k": 1}})),
    )
    .unwrap();
    assert_eq!(draft_json(&draft), json!({"type": "a_b", "k": 1}));
}

fn msgpack(value: &rmpv::Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).unwrap();
    out
}

fn core_decoder() -> Decoder {
    Decoder {
        random_prefix_length: 12,
        crypter: None,
        ttl: Some(70),
    }
}

#[test]
fn core_messages_are_random_prefix_then_msgpack() {
    let value = rmpv::Value::Map(vec![
        ("type".into(), "org.event".into()),
        (
            "payload".into(),
            rmpv::Value::Map(vec![
                ("id".into(), 7.into()),
                ("ratio".into(), rmpv::Value::F64(0.5)),
            ]),
        ),
        (3.into(), true.into()),
        (
            wire::ASGI_CHANNEL.into(),
            rmpv::Value::Array(vec!["herald!abcd1234.org_42".into()]),
        ),
    ]);
    let mut body = vec![
        0xc5, 0xc9, 0x45, 0x84, 0x1e, 0x32, 0xa5, 0x00, 0x09, 0x76, 0x36, 0xa1,
    ];
    body.extend(msgpack(&value));
    let mut decoded = core_decoder().decode(&body, 0).unwrap();
    assert_eq!(wire::take_asgi_channels(&mut decoded), ["herald!abcd1234.org_42"]);
    assert_eq!(
        Value::Object(decoded),
        json!({"type": "org.event", "payload": {"id": 7, "ratio": 0.5}, "3": true})
    );
}

#[test]
fn pubsub_messages_have_no_prefix() {
    // channels_redis 4.3.0: group_send("org.42", {"type": "org.event", "x": 1}) published
    // these bytes (REFERENCES.md §5.3).
    let body = [
        0x82, 0xa4, b't', b'y', b'p', b'e', 0xa9, b'o', b'r', b'g', b'.', b'e', b'v', b'e', b'n', b't', 0xa1,
        b'x', 0x01,
    ];
    let decoder = Decoder {
        random_prefix_length: 0,
        crypter: None,
        ttl: None,
    };
    assert_eq!(
        Value::Object(decoder.decode(&body, 0).unwrap()),
        json!({"type": "org.event", "x": 1})
    );
}

#[test]
fn json_serializer_format_is_read_too() {
    let mut body = vec![7u8; 12];
    body.extend_from_slice(br#"{"type": "x", "__asgi_channel__": "herald!n.user_1"}"#);
    let mut decoded = core_decoder().decode(&body, 0).unwrap();
    assert_eq!(wire::take_asgi_channels(&mut decoded), ["herald!n.user_1"]);
}

#[test]
fn what_cannot_be_json_is_undecodable() {
    let decoder = core_decoder();
    let with = |value: rmpv::Value| {
        let mut body = vec![0u8; 12];
        body.extend(msgpack(&rmpv::Value::Map(vec![("v".into(), value)])));
        decoder.decode(&body, 0)
    };
    assert!(matches!(
        with(rmpv::Value::Binary(vec![1, 2])),
        Err(Undecodable::NotJson(_))
    ));
    assert!(matches!(
        with(rmpv::Value::F64(f64::NAN)),
        Err(Undecodable::NotJson(_))
    ));
    assert_eq!(decoder.decode(&[1, 2, 3], 0), Err(Undecodable::TooShort));
    let mut list = vec![0u8; 12];
    list.extend(msgpack(&rmpv::Value::Array(vec![])));
    assert_eq!(decoder.decode(&list, 0), Err(Undecodable::NotADict("a list")));
    let mut garbage = vec![0u8; 12];
    garbage.extend_from_slice(&[0x82, 0xa1, b'a']);
    assert!(matches!(decoder.decode(&garbage, 0), Err(Undecodable::Format(_))));
    let mut encrypted = vec![0u8; 12];
    encrypted.extend_from_slice(b"gAAAAABpZ2xvYmFs");
    assert_eq!(decoder.decode(&encrypted, 0), Err(Undecodable::Encrypted));
}

#[test]
fn fernet_spec_vector() {
    // https://github.com/fernet/spec/blob/master/verify.json
    let key: [u8; 32] = [
        115, 15, 244, 199, 175, 61, 70, 146, 62, 142, 212, 81, 238, 129, 60, 135, 247, 144, 176, 162, 38,
        188, 150, 169, 45, 228, 155, 94, 156, 5, 225, 238,
    ];
    let token = b"gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==";
    let fernet = Fernet::from_raw_keys(&[key]);
    let now = 499_162_801; // 1985-10-26T01:20:01-07:00
    assert_eq!(fernet.decrypt(token, Some(60), now).unwrap(), b"hello");
    assert_eq!(
        fernet.decrypt(token, Some(60), now + 120),
        Err(FernetError::Expired)
    );
    assert_eq!(
        fernet.decrypt(token, None, now - 120),
        Err(FernetError::Expired),
        "from the future"
    );
    let mut tampered = token.to_vec();
    tampered[60] = if tampered[60] == b'A' { b'B' } else { b'A' };
    assert!(fernet.decrypt(&tampered, None, now).is_err());
    let other = Fernet::from_raw_keys(&[[1; 32]]);
    assert_eq!(other.decrypt(token, None, now), Err(FernetError::WrongKey));
    // MultiFernet: any key in the list.
    let both = Fernet::from_raw_keys(&[[1; 32], key]);
    assert_eq!(both.decrypt(token, None, now).unwrap(), b"hello");
}

#[test]
fn channels_redis_encrypted_message() {
    // channels_redis 4.3.0, serializer msgpack, random_prefix_length 12, expiry 60,
    // symmetric_encryption_keys ["s3cret"]: {"type":"send_notification","notification":{"title":"Hi"}}.
    let hex = "c6ca57686e214d1a0990e4316741414141414272416f5438565439467449316f66486d355762726b455474626956475f3352536c473874454455587a32356c684f5a6a6b6c4c63383774356c5245736e476473456e66423563317139504d4155655663757a3446435830663133656d632d485a513563717933754c6e736a756c5a6c704c323163634d62686e375767374370627162656c46";
    let body: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let decoder = Decoder {
        random_prefix_length: 12,
        crypter: Some(Fernet::from_secrets(&[
            Secret::new("wrong"),
            Secret::new("s3cret"),
        ])),
        ttl: Some(70),
    };
    let made_at = 1_795_327_228;
    assert_eq!(
        Value::Object(decoder.decode(&body, made_at).unwrap()),
        json!({"type": "send_notification", "notification": {"title": "Hi"}})
    );
    assert!(matches!(
        decoder.decode(&body, made_at + 3600),
        Err(Undecodable::Decrypt(FernetError::Expired))
    ));
}

#[test]
fn member_names_carry_the_group() {
    let options = BridgeOptions::default();
    let shared = Names::new(&options, true);
    assert_eq!(shared.queue, "asgiherald!");
    assert_eq!(shared.inflight, "asgiherald!$inflight");
    let member = shared.member("user_a.b");
    assert!(
        member.starts_with("herald!") && member.ends_with(".user_a.b"),
        "{member}"
    );
    assert_eq!(shared.group_of(&member), Some("user_a.b"));
    assert_eq!(
        shared.group_of("herald!othernode.org_1"),
        Some("org_1"),
        "another node's member"
    );
    assert_eq!(shared.group_of("specific.abc!def"), None);
    let own = Names::new(&options, false);
    assert_eq!(own.queue, format!("asgiherald.{}!", own.node));
    assert_eq!(own.group_of(&own.member("org_1")), Some("org_1"));
    assert_eq!(
        own.group_of(&shared.member("org_1")),
        None,
        "another node's queue"
    );
}

#[test]
fn the_django_table_is_parsed_and_checked() {
    let table: toml::Value = toml::from_str(
        r#"
        layer = "core"
        prefix = "myapp"
        group_expiry = 3600
        symmetric_encryption_keys = ["k1"]
        leave_after_ms = 5000
        [[groups]]
        group = "team_{id}"
        channel = "org:{id}"
        message = "as_is"
        "#,
    )
    .unwrap();
    let options = BridgeOptions::from_toml(table).unwrap();
    assert_eq!(options.layers, Layers::Core);
    assert_eq!(options.prefix, "myapp");
    assert_eq!(options.group_expiry.as_secs(), 3600);
    assert_eq!(options.leave_after, Some(std::time::Duration::from_millis(5000)));
    assert_eq!(options.symmetric_encryption_keys.len(), 1);
    let (_, routed) = options.rules.route("team_x").unwrap().unwrap();
    assert_eq!(routed.kind(), ChannelKind::Org);
    assert!(
        options.rules.route("user_x").is_some(),
        "defaults stay unless default_groups = false"
    );

    for (text, expected) in [
        ("layer = \"redis\"", "expected \"core\""),
        ("colour = 1", "unknown field `colour`"),
        ("group_expiry = 0", "group_expiry = 0"),
        ("channel = \"a!b\"", "channel = \"a!b\""),
        ("default_groups = false", "no group would be bridged"),
        (
            "[[groups]]\ngroup = \"g_{id}\"\nchannel = \"org:{id}\"\nmessage = \"nope\"",
            "groups[0].message",
        ),
    ] {
        let err = BridgeOptions::from_toml(toml::from_str(text).unwrap()).unwrap_err();
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[test]
fn options_keys_match_the_raw_table() {
    // Every documented key parses, so KEYS cannot list a key the parser refuses.
    let table: toml::Value = toml::from_str(
        r#"
        layer = "both"
        prefix = "asgi"
        channel = "herald"
        group_expiry = 86400
        expiry = 60
        random_prefix_length = 12
        symmetric_encryption_keys = []
        leave_after_ms = 30000
        default_groups = true
        [[groups]]
        group = "g_{id}"
        channel = "notifications:{id}"
        message = "notification"
        field = "n"
        "#,
    )
    .unwrap();
    BridgeOptions::from_toml(table).unwrap();
}

#[test]
fn glob_characters_in_the_prefix_are_escaped() {
    assert_eq!(wire::escape_glob("asgi"), "asgi");
    assert_eq!(wire::escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
}
