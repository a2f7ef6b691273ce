//! Fuzz targets, as property tests (proptest) that run on the stable toolchain: every
//! input a client or an upstream controls, fed arbitrary and near-valid data. Each must
//! never panic and must keep its contract (a refused token is refused, a round trip
//! gives back what went in, an HTTP body never causes a 5xx).
//!
//! | target | where |
//! |---|---|
//! | client WebSocket messages | `client_messages_*` |
//! | token extraction and JWT header parsing | `token_*` |
//! | the Django bridge's msgpack and Fernet decoding | `bridge_*` |
//! | HTTP request bodies (every POST/PUT route, through the router) | `http_bodies_*` |
//! | the SSE decoder of the LLM client | `llm::openai::fuzz` |
//!
//! `cargo test -p herald --lib fuzz` runs them briefly (256 cases each, part of the
//! normal test run); `PROPTEST_CASES=100000 cargo test -p herald --lib fuzz --release`
//! runs them for longer (README). A failing case is shrunk and printed; keep it as a
//! named regression test below.

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request};
use base64::Engine;
use proptest::prelude::*;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::auth::{find_token, Authenticator};
use crate::bridge::fernet::Fernet;
use crate::bridge::wire::Decoder;
use crate::config::{Config, Secret};
use crate::ws::protocol::ClientMessage;

const SECRET: &str = "fuzz-secret";
const API_KEY: &str = "fuzz-key";

/// Arbitrary JSON, with the field names herald looks at so the interesting branches
/// are reached.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("type".to_owned()),
        Just("token".to_owned()),
        Just("notification".to_owned()),
        Just("event_type".to_owned()),
        Just("data".to_owned()),
        Just("channel".to_owned()),
        Just("items".to_owned()),
        Just("chat_id".to_owned()),
        Just("user_id".to_owned()),
        Just("prompt".to_owned()),
        Just("role".to_owned()),
        Just("status".to_owned()),
        Just("frame".to_owned()),
        ".{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,24}".prop_map(Value::from),
        prop_oneof![
            Just("ping"),
            Just("heartbeat"),
            Just("refresh"),
            Just("llm_frame"),
            Just("llm_status"),
            Just("org:acme"),
            Just("notifications:u1"),
            Just("frames:u1"),
            Just("acme"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// One runtime and one authenticator for all token cases.
fn token_parts() -> &'static (tokio::runtime::Runtime, Authenticator) {
    static PARTS: OnceLock<(tokio::runtime::Runtime, Authenticator)> = OnceLock::new();
    PARTS.get_or_init(|| {
        let mut config = Config::defaults();
        config.jwt_secret = Some(Secret::new(SECRET));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let auth = Authenticator::new(&config, None).unwrap();
        (runtime, auth)
    })
}

/// A node's router over a memory broker and an in-memory database.
fn router_parts() -> &'static (tokio::runtime::Runtime, crate::http::App) {
    static PARTS: OnceLock<(tokio::runtime::Runtime, crate::http::App)> = OnceLock::new();
    PARTS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let router = runtime.block_on(async {
            let mut config = Config::defaults();
            config.database_url = "sqlite::memory:".to_owned();
            config.jwt_secret = Some(Secret::new(SECRET));
            config.membership = crate::config::MembershipMode::Claims;
            let secrets = crate::config::Secrets {
                dev_jwt_secret: None,
                api_keys: vec![Secret::new(API_KEY)],
            };
            let shutdown = tokio_util::sync::CancellationToken::new();
            let (state, _) = crate::build_state(config, secrets, shutdown).await.unwrap();
            crate::router(state)
        });
        (runtime, router)
    })
}

/// The routes that take a body, with the credential each needs.
const BODY_ROUTES: [(&str, &str, bool); 9] = [
    ("POST", "/api/v1/notifications/u1", true),
    ("POST", "/api/v1/orgs/acme/events", true),
    ("POST", "/api/v1/frame-stream/u1", true),
    ("POST", "/api/v1/publish", true),
    ("PUT", "/api/v1/orgs/acme/members/u1", true),
    ("POST", "/api/chat/generate-response/", false),
    ("POST", "/api/chat/tasks/t1/cancel", false),
    ("POST", "/api/v1/notifications/u1?x=%FF", true),
    ("POST", "/ws/notifications/", false),
];

/// Sends `body` to `route`; the status and the body as JSON (`None` if not JSON).
fn send(route: usize, body: Vec<u8>, content_type: &str) -> (u16, Option<Value>) {
    let (runtime, router) = router_parts();
    let (method, path, service) = BODY_ROUTES[route % BODY_ROUTES.len()];
    let credential = if service {
        API_KEY.to_owned()
    } else {
        crate::auth::mint_hs256(
            &Secret::new(SECRET),
            "u1",
            &[],
            std::time::Duration::from_secs(600),
        )
        .unwrap()
    };
    let request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path)
        .header("authorization", format!("Bearer {credential}"))
        .header("content-type", content_type)
        .body(Body::from(body))
        .unwrap();
    runtime.block_on(async {
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).ok())
    })
}

proptest! {
    #[test]
    fn client_messages_any_text_parses_without_a_panic(text in any::<String>()) {
        let message = ClientMessage::parse(&text);
        if serde_json::from_str::<Value>(&text).is_err() {
            prop_assert_eq!(message, ClientMessage::InvalidJson);
        }
    }

    #[test]
    fn client_messages_json_is_classified(value in json_value()) {
        let text = value.to_string();
        let message = ClientMessage::parse(&text);
        let kind = value.get("type").and_then(Value::as_str);
        match message {
            ClientMessage::Ping => prop_assert_eq!(kind, Some("ping")),
            ClientMessage::Heartbeat => prop_assert_eq!(kind, Some("heartbeat")),
            ClientMessage::Refresh { token } => {
                prop_assert_eq!(kind, Some("refresh"));
                prop_assert!(!token.is_empty());
            }
            ClientMessage::Subscribe(subscribe) => {
                prop_assert_eq!(kind, Some("subscribe"));
                prop_assert!(subscribe.channel.is_null() || subscribe.channel.is_string());
                prop_assert!(matches!(subscribe.id, Value::Null | Value::String(_) | Value::Number(_)));
            }
            ClientMessage::Unsubscribe { .. } => prop_assert_eq!(kind, Some("unsubscribe")),
            ClientMessage::Read(read) => {
                prop_assert_eq!(kind, Some("read"));
                prop_assert_eq!(read.offset.ok(), value.get("offset").and_then(Value::as_u64));
            }
            ClientMessage::Unsupported => {}
            ClientMessage::InvalidJson => prop_assert!(false, "valid JSON called invalid: {}", text),
        }
    }

    #[test]
    fn token_extraction_takes_any_headers(
        protocol in proptest::collection::vec(any::<u8>(), 0..200),
        authorization in proptest::collection::vec(any::<u8>(), 0..200),
        query in proptest::option::of(any::<String>()),
    ) {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_bytes(&protocol) {
            headers.insert("sec-websocket-protocol", value);
        }
        if let Ok(value) = HeaderValue::from_bytes(&authorization) {
            headers.insert("authorization", value);
        }
        if let Some((token, _)) = find_token(&headers, query.as_deref()) {
            prop_assert!(!token.is_empty());
        }
    }

    #[test]
    fn token_any_string_is_refused(token in any::<String>()) {
        let (runtime, auth) = token_parts();
        prop_assert!(runtime.block_on(auth.authenticate(&token)).is_err());
    }

    #[test]
    fn token_any_header_and_claims_without_the_key_are_refused(
        header in json_value(),
        alg in prop_oneof![
            Just("HS256".to_owned()),
            Just("none".to_owned()),
            Just("RS256".to_owned()),
            Just("HS512".to_owned()),
            Just("ES256".to_owned()),
            ".{0,6}",
        ],
        crit in any::<bool>(),
        claims in json_value(),
        signature in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut header = match header {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        header.insert("alg".to_owned(), json!(alg));
        if crit {
            header.insert("crit".to_owned(), json!(["exp"]));
        }
        let token = format!(
            "{}.{}.{}",
            b64(Value::Object(header).to_string().as_bytes()),
            b64(claims.to_string().as_bytes()),
            b64(&signature)
        );
        let (runtime, auth) = token_parts();
        prop_assert!(runtime.block_on(auth.authenticate(&token)).is_err(), "{}", token);
    }

    #[test]
    fn bridge_any_body_decodes_without_a_panic(
        body in proptest::collection::vec(any::<u8>(), 0..512),
        prefix in 0usize..16,
        encrypted in any::<bool>(),
    ) {
        let decoder = Decoder {
            random_prefix_length: prefix,
            crypter: encrypted.then(|| Fernet::from_raw_keys(&[[7u8; 32]])),
            ttl: Some(60),
        };
        let _ = decoder.decode(&body, 1_700_000_000);
    }

    #[test]
    fn bridge_msgpack_dicts_round_trip(value in json_value(), prefix in 0usize..16) {
        let Value::Object(map) = value else {
            return Ok(());
        };
        let mut body = vec![b'r'; prefix];
        rmpv::encode::write_value(&mut body, &to_msgpack(&Value::Object(map.clone()))).unwrap();
        let decoder = Decoder { random_prefix_length: prefix, crypter: None, ttl: None };
        let decoded = decoder.decode(&body, 0).unwrap();
        prop_assert_eq!(Value::Object(decoded), Value::Object(map));
    }

    #[test]
    fn bridge_fernet_round_trips_and_refuses_any_change(
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        key in any::<[u8; 32]>(),
        iv in any::<[u8; 16]>(),
        flip in any::<(usize, u8)>(),
    ) {
        let fernet = Fernet::from_raw_keys(&[key]);
        let token = fernet_encrypt(&key, &iv, 1_700_000_000, &payload);
        prop_assert_eq!(fernet.decrypt(token.as_bytes(), Some(60), 1_700_000_010).unwrap(), payload);
        // Any change to the token's bytes is refused, never a panic.
        let mut raw = base64::engine::general_purpose::URL_SAFE.decode(&token).unwrap();
        let at = flip.0 % raw.len();
        raw[at] ^= flip.1.max(1);
        let changed = base64::engine::general_purpose::URL_SAFE.encode(&raw);
        prop_assert!(fernet.decrypt(changed.as_bytes(), Some(60), 1_700_000_010).is_err());
    }

    #[test]
    fn http_bodies_any_bytes_never_fail_inside(
        route in any::<usize>(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
        json_type in any::<bool>(),
    ) {
        let content_type = if json_type { "application/json" } else { "text/plain" };
        let (status, answer) = send(route, body, content_type);
        prop_assert!(status < 500, "status {}: {:?}", status, answer);
        if status >= 400 {
            prop_assert!(answer.as_ref().is_some_and(|a| a["error"].is_string() && a["message"].is_string()), "{:?}", answer);
        }
    }

    #[test]
    fn http_bodies_any_json_never_fails_inside(route in any::<usize>(), value in json_value()) {
        let (status, answer) = send(route, value.to_string().into_bytes(), "application/json");
        prop_assert!(status < 500, "status {}: {:?}", status, answer);
        if status >= 400 {
            prop_assert!(answer.as_ref().is_some_and(|a| a["error"].is_string() && a["message"].is_string()), "{:?}", answer);
        }
    }
}

/// JSON as msgpack the way Python's msgpack writes a dict.
fn to_msgpack(value: &Value) -> rmpv::Value {
    match value {
        Value::Null => rmpv::Value::Nil,
        Value::Bool(b) => rmpv::Value::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => rmpv::Value::from(i),
            (_, Some(u), _) => rmpv::Value::from(u),
            (_, _, Some(f)) => rmpv::Value::F64(f),
            _ => rmpv::Value::Nil,
        },
        Value::String(s) => rmpv::Value::from(s.as_str()),
        Value::Array(items) => rmpv::Value::Array(items.iter().map(to_msgpack).collect()),
        Value::Object(map) => rmpv::Value::Map(
            map.iter()
                .map(|(k, v)| (rmpv::Value::from(k.as_str()), to_msgpack(v)))
                .collect(),
        ),
    }
}

/// A Fernet token (version, timestamp, IV, AES-128-CBC ciphertext, HMAC-SHA256), as
/// Python's `cryptography` makes them.
fn fernet_encrypt(key: &[u8; 32], iv: &[u8; 16], timestamp: u64, payload: &[u8]) -> String {
    use aes::cipher::block_padding::Pkcs7;
    use aes::cipher::{BlockEncryptMut, KeyIvInit};
    use hmac::{Hmac, Mac};
    let (signing, encryption) = key.split_at(16);
    let ciphertext = cbc::Encryptor::<aes::Aes128>::new(encryption.into(), iv.into())
        .encrypt_padded_vec_mut::<Pkcs7>(payload);
    let mut token = vec![0x80];
    token.extend_from_slice(&timestamp.to_be_bytes());
    token.extend_from_slice(iv);
    token.extend_from_slice(&ciphertext);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(signing).unwrap();
    mac.update(&token);
    token.extend_from_slice(&mac.finalize().into_bytes());
    base64::engine::general_purpose::URL_SAFE.encode(token)
}
