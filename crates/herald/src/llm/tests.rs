//! Unit tests for `llm`: redaction of error details, the user-safe error messages, and
//! the wire shape of the shared types.

use super::*;

#[track_caller]
fn check_redact(input: &str, expected: &str) {
    assert_eq!(redact(input), expected, "input {input:?}");
}

#[test]
fn redact_removes_urls_bearer_tokens_and_keys() {
    check_redact("plain words stay", "plain words stay");
    check_redact("GET http://secret-host:1234/v1/chat failed", "GET <url> failed");
    check_redact("(https://api.example.com/v1?key=abc)", "(<url>");
    check_redact(r#"{"url":"http://10.0.0.5:8080/x"}"#, r#"{"url":"<url>"}"#);
    check_redact("url=ftp://host/path", "url=<url>");
    check_redact(
        "Authorization: Bearer abc.def.ghi",
        "Authorization: Bearer <redacted>",
    );
    check_redact("bearer  token123 rest", "bearer  <redacted> rest");
    check_redact(
        "Incorrect API key provided: sk-live-ABC123.",
        "Incorrect API key provided: <key>",
    );
    check_redact(r#"{"key":"sk_test_0123456789"}"#, r#"{"key":"<key>"}"#);
    check_redact("sk-proj-abcdef and sk-", "<key> and sk-");
    check_redact("skill sketch", "skill sketch");
    check_redact("", "");
}

#[test]
fn redact_cuts_long_details_after_redacting() {
    let long = format!("{} http://secret-host:1234/", "é".repeat(MAX_DETAIL_CHARS));
    let redacted = redact(&long);
    assert_eq!(redacted.chars().count(), MAX_DETAIL_CHARS + 1);
    assert!(redacted.ends_with('…'));
    // A URL that straddles the cut is removed before the cut, not half kept.
    let straddling = format!(
        "{}http://secret-host:1234/v1",
        "x ".repeat(MAX_DETAIL_CHARS / 2 - 3)
    );
    assert!(!redact(&straddling).contains("secret"), "{}", redact(&straddling));
}

#[test]
fn error_display_is_a_fixed_user_safe_message() {
    let messages: Vec<String> = LlmErrorKind::ALL.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            "rate limit exceeded",
            "model unavailable",
            "timed out",
            "authentication with the LLM provider failed",
            "request rejected by the LLM provider",
            "upstream error",
            "stream interrupted",
        ]
    );
    let leaky = r#"{"error":{"message":"see http://secret-host:1234/v1 with sk-live-ABC123"}} Traceback"#;
    for kind in LlmErrorKind::ALL {
        let err = LlmError::new(kind, leaky);
        assert_eq!(err.to_string(), kind.to_string());
        assert_eq!(err.kind(), kind);
        for banned in ["http", "secret-host", "1234", "sk-", "{", "Traceback"] {
            assert!(!err.to_string().contains(banned), "{kind:?} displays {banned:?}");
        }
        let debug = format!("{err:?}");
        assert!(
            debug.starts_with(&format!("LlmError({}: ", kind.label())),
            "{debug}"
        );
        for banned in ["http://", "secret-host", "sk-live"] {
            assert!(!debug.contains(banned), "{debug}");
            assert!(!err.detail().contains(banned), "{}", err.detail());
        }
    }
    assert!(
        LlmErrorKind::RateLimited.to_string().contains("rate limit"),
        "SPEC §7"
    );
}

#[test]
fn shared_types_use_the_openai_wire_shape() {
    let messages = vec![
        ChatMessage::system("be brief"),
        ChatMessage::user("hi"),
        ChatMessage::assistant("yo"),
    ];
    assert_eq!(
        serde_json::to_value(&messages).unwrap(),
        serde_json::json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
        ])
    );
    assert_eq!(
        serde_json::to_value(Usage {
            prompt_tokens: 9,
            completion_tokens: 12
        })
        .unwrap(),
        serde_json::json!({"prompt_tokens": 9, "completion_tokens": 12})
    );
}

fn config(pairs: &[(&str, &str)]) -> Config {
    let env: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    crate::config::load(None, &env).unwrap()
}

#[test]
fn config_picks_the_provider() {
    let echo = config(&[("HERALD_DATABASE_URL", "sqlite::memory:")]);
    assert_eq!(from_config(&echo).unwrap().name(), "echo");
    let openai = config(&[
        ("HERALD_DATABASE_URL", "sqlite::memory:"),
        ("HERALD_LLM_BASE_URL", "http://127.0.0.1:9/v1"),
        ("HERALD_LLM_API_KEY", "sk-test-key"),
    ]);
    assert_eq!(from_config(&openai).unwrap().name(), "openai-compatible");
}
