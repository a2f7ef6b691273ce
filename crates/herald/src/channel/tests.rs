//! Unit tests for `channel`: channel names, drafts and sealing.

use serde_json::json;

use super::*;

#[test]
fn channel_names() {
    let ch = Channel::parse("org:acme.eu").unwrap();
    assert_eq!(ch.kind(), ChannelKind::Org);
    assert_eq!(ch.id(), "acme.eu");
    assert_eq!(ch.name(), "org:acme.eu");
    // Identifiers may themselves contain ':'.
    assert_eq!(Channel::parse("frames:a:b").unwrap().id(), "a:b");
    assert_eq!(Channel::parse("presence:x"), Err(InvalidChannel::UnknownKind));
    assert_eq!(Channel::parse("org"), Err(InvalidChannel::UnknownKind));
    assert!(matches!(
        Channel::parse("notifications:a b"),
        Err(InvalidChannel::BadId(_))
    ));
}

#[test]
fn seal_adds_sequence_fields_once() {
    let body = json!({"type": "notification", "offset": 99, "id": "forged", "channel": "x:y", "x": "é\"q"});
    let serde_json::Value::Object(map) = body else {
        unreachable!()
    };
    let sealed = Draft::from_object(map).seal("org:acme", "abc", 42, "ep1", "2025-01-01T00:00:00.000Z");
    let value: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
    assert_eq!(
        value,
        json!({"type": "notification", "x": "é\"q", "channel": "org:acme", "id": "abc", "offset": 42, "epoch": "ep1",
               "timestamp": "2025-01-01T00:00:00.000Z"})
    );
    let text = std::str::from_utf8(&sealed).unwrap();
    assert_eq!(text.matches("\"offset\"").count(), 1);
}

#[test]
fn seal_empty_object() {
    let sealed = Draft::from_object(serde_json::Map::new()).seal("org:a", "i", 1, "e", "t");
    let value: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
    assert_eq!(
        value,
        json!({"channel": "org:a", "id": "i", "offset": 1, "epoch": "e", "timestamp": "t"})
    );
}

#[test]
fn timestamps_are_rfc3339_utc_millis() {
    let ts = now_rfc3339();
    assert_eq!(ts.len(), "2025-11-04T10:30:00.123Z".len(), "{ts}");
    assert!(ts.ends_with('Z'));
    assert_eq!(unix_to_rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(unix_to_rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
}

#[test]
fn timestamps_match_humantime_across_centuries() {
    use std::time::{Duration, UNIX_EPOCH};
    // Leap days, century and 400-year boundaries, month ends, the last second of 9999.
    let mut secs: Vec<u64> = vec![
        0,
        59,
        86_399,
        86_400,
        951_782_400, // 2000-02-29
        951_868_799,
        4_107_542_400, // 2100-03-01
        4_102_444_800,
        1_767_225_599,
        super::MAX_RFC3339_SECS,
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        secs.push(x % (super::MAX_RFC3339_SECS + 1));
    }
    for s in secs {
        let time = UNIX_EPOCH + Duration::from_millis(s * 1000 + s % 1000);
        assert_eq!(
            super::Rfc3339Millis::at(time).as_str(),
            humantime::format_rfc3339_millis(time).to_string(),
            "{s}"
        );
    }
}

#[test]
fn seal_writes_every_offset_in_decimal() {
    for offset in [0, 7, 10, 99, 1_000_000, u64::MAX] {
        let sealed = Draft::from_object(serde_json::Map::new()).seal("org:a", "i", offset, "e", "t");
        let value: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
        assert_eq!(value["offset"], json!(offset));
    }
}

#[test]
fn an_envelope_is_the_bytes_of_its_map() {
    let inner = json!({"title": "hi \"there\"", "z": [1, 2, {"b": null, "a": true}], "é": "ü"});
    let mut map = serde_json::Map::new();
    map.insert("type".to_owned(), json!("notification"));
    map.insert("notification".to_owned(), inner.clone());
    assert_eq!(
        Draft::enveloped("notification", &inner, "notification").as_bytes(),
        Draft::from_object(map).as_bytes()
    );
}

#[test]
fn ids_are_32_lowercase_hex_digits_and_differ() {
    let (a, b) = (super::new_id(), super::new_id());
    for id in [&a, &b] {
        assert_eq!(id.len(), 32, "{id}");
        assert!(
            id.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
            "{id}"
        );
    }
    assert_ne!(a, b);
}
