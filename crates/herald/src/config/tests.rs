//! Unit tests for `config`: defaults, TOML and environment precedence, validation.

use std::collections::BTreeMap;
use std::io::Write;

use super::*;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_load() {
    let config = Config::defaults();
    assert_eq!(config.listen.to_string(), "127.0.0.1:8000");
    assert_eq!(config.database_url, "sqlite://herald.db");
    assert_eq!(config.membership, MembershipMode::Database);
    assert_eq!(config.max_connections_per_user, 3);
    assert_eq!(config.max_subscriptions_per_connection, 128);
    assert_eq!(config.max_connection_age, Duration::from_secs(7200));
    assert_eq!(config.client_messages_per_minute, 60);
    assert_eq!(config.history_size, 1000);
    assert_eq!(config.history_ttl, Duration::from_secs(600));
    assert_eq!(config.workers, None);
    assert_eq!(config.chat_context_messages, 20);
    assert_eq!(config.frame_coalesce, Duration::ZERO);
    assert_eq!(config.shutdown_drain, Duration::from_secs(10));
    assert_eq!(config.llm_model, "gpt-4o-mini");
    assert_eq!(config.jwt_user_claim, "sub");
    assert!(config.jwt_dev_mode());
    assert!(config.api_keys.is_empty());
    assert!(config.allowed_origins.allows("http://localhost:8000"));
    assert!(config.allowed_origins.allows("http://127.0.0.1:8000"));
    assert!(!config.allowed_origins.allows("http://localhost:8001"));
}

#[test]
fn environment_wins_over_file() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        file,
        "listen = \"127.0.0.1:9000\"\nhistory_size = 5\napi_keys = [\"a\", \"b\"]"
    )
    .unwrap();
    let config = load(Some(file.path()), &env(&[("HERALD_LISTEN", "127.0.0.1:9100")])).unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:9100");
    assert_eq!(config.history_size, 5);
    assert_eq!(config.api_keys, vec![Secret::new("a"), Secret::new("b")]);
}

#[test]
fn unknown_file_key_is_named() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "lisen = \"x\"").unwrap();
    let err = load(Some(file.path()), &env(&[])).unwrap_err();
    assert!(err.to_string().contains("unknown key `lisen`"), "{err}");
}

#[track_caller]
fn check_invalid(name: &str, value: &str, expected: &str) {
    let err = load(None, &env(&[(name, value)])).unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with(&format!("{name}=")), "{text}");
    assert!(text.contains(expected), "{text}");
}

#[test]
fn bad_values_name_the_variable() {
    check_invalid("HERALD_LISTEN", "localhost", "expected host:port");
    check_invalid("HERALD_MAX_CONNECTIONS_PER_USER", "0", "1 or more");
    check_invalid("HERALD_MAX_SUBSCRIPTIONS_PER_CONNECTION", "0", "1 or more");
    check_invalid("HERALD_MAX_CONNECTION_AGE", "soon", "seconds");
    check_invalid("HERALD_LOG_FORMAT", "xml", "text or json");
    check_invalid("HERALD_MEMBERSHIP", "ldap", "database, claims or webhook");
    check_invalid("HERALD_DATABASE_URL", "mysql://x", "sqlite://");
    check_invalid("HERALD_REDIS_URL", "localhost:6379", "redis://");
    check_invalid("HERALD_REDIS_URL", "valkey://localhost:6379", "redis-cluster://");
    check_invalid("HERALD_ALLOWED_ORIGINS", "example.com", "not an origin");
    check_invalid("HERALD_JWT_JWKS_URL", "ftp://x", "http://");
}

#[test]
fn secrets_are_not_echoed_in_errors_or_debug() {
    let config = load(None, &env(&[("HERALD_JWT_SECRET", "s3cr3t-value")])).unwrap();
    assert!(!format!("{config:?}").contains("s3cr3t-value"));
    assert!(!config.jwt_dev_mode());
}

#[test]
fn origins_match_exactly() {
    let origins = parse_origins("https://app.example.com, http://localhost:3000/").unwrap();
    assert!(origins.allows("https://app.example.com"));
    assert!(origins.allows("https://app.example.com:443"));
    assert!(origins.allows("HTTPS://APP.example.com"));
    assert!(origins.allows("http://localhost:3000"));
    for refused in [
        "null",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://evil.app.example.com",
        "https://app.example.com.evil.com",
        "https://example.com",
        "http://localhost:3001",
        "",
    ] {
        assert!(!origins.allows(refused), "{refused} must be refused");
    }
    assert!(parse_origins("*").unwrap().allows("null"));
}

#[test]
fn membership_modes() {
    assert_eq!(parse_membership("claims"), Ok(MembershipMode::Claims));
    assert_eq!(
        parse_membership("webhook:http://127.0.0.1:9/check"),
        Ok(MembershipMode::Webhook("http://127.0.0.1:9/check".to_owned()))
    );
    assert!(parse_membership("webhook:nope").is_err());
}

#[test]
fn every_setting_has_a_toml_key() {
    for setting in SETTINGS {
        assert!(setting.env.starts_with("HERALD_"));
        assert_eq!(setting.toml_key(), setting.env[7..].to_ascii_lowercase());
    }
}

#[test]
fn every_toml_only_key_loads_from_the_file() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for key in TOML_ONLY_KEYS {
        writeln!(file, "{key} = 1234").unwrap();
    }
    let config = load(Some(file.path()), &env(&[])).unwrap();
    assert_eq!(config.outbox_max_bytes, 1234);
    assert_eq!(config.history_max_bytes, 1234);
    assert_eq!(config.handshakes_per_ip_per_second, 1234);
    for duration in [
        config.ping_interval,
        config.pong_timeout,
        config.llm_connect_timeout,
        config.llm_first_token_timeout,
        config.llm_between_tokens_timeout,
    ] {
        assert_eq!(duration, Duration::from_millis(1234));
    }
    let mut bad = tempfile::NamedTempFile::new().unwrap();
    writeln!(bad, "ping_interval_ms = \"soon\"").unwrap();
    let err = load(Some(bad.path()), &env(&[])).unwrap_err();
    assert!(err.to_string().starts_with("ping_interval_ms="), "{err}");
}

#[test]
fn limits_against_hostile_clients_load_with_their_defaults_and_from_file_and_environment() {
    let config = Config::defaults();
    assert_eq!(config.request_head_timeout, Duration::from_secs(10));
    assert_eq!(config.http_idle_timeout, Duration::from_secs(60));
    assert_eq!(config.max_pending_per_ip, 64);
    assert_eq!(config.max_connections, None);
    assert!(config.trusted_proxies.is_empty());

    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        file,
        "request_head_timeout_ms = 2500\nhttp_idle_timeout_ms = 7000"
    )
    .unwrap();
    let config = load(
        Some(file.path()),
        &env(&[
            ("HERALD_MAX_PENDING_PER_IP", "8"),
            ("HERALD_MAX_CONNECTIONS", "500"),
            ("HERALD_TRUSTED_PROXIES", "10.0.0.0/8, ::1"),
        ]),
    )
    .unwrap();
    assert_eq!(config.request_head_timeout, Duration::from_millis(2500));
    assert_eq!(config.http_idle_timeout, Duration::from_millis(7000));
    assert_eq!(config.max_pending_per_ip, 8);
    assert_eq!(config.max_connections, Some(500));
    assert_eq!(config.trusted_proxies.len(), 2);
    assert!(config.trusted_proxies[0].contains("10.1.2.3".parse().unwrap()));

    for (name, value) in [
        ("HERALD_TRUSTED_PROXIES", "10.0.0.0/40"),
        ("HERALD_TRUSTED_PROXIES", "proxy.internal"),
        ("HERALD_MAX_PENDING_PER_IP", "0"),
        ("HERALD_MAX_CONNECTIONS", "lots"),
    ] {
        let err = load(None, &env(&[(name, value)])).unwrap_err().to_string();
        assert!(err.contains(name), "{name}={value}: {err}");
    }
}
