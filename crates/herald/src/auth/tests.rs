//! Unit tests for `auth`: token sources, HS256 verification rules and identities.

use std::collections::BTreeMap;

use http::HeaderValue;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;

fn config(pairs: &[(&str, &str)]) -> Config {
    let env: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    crate::config::load(None, &env).unwrap()
}

fn sign(claims: serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[track_caller]
fn check(auth: &Authenticator, token: &str, expected: Result<&str, AuthFailure>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = rt
        .block_on(auth.authenticate(token))
        .map(|id| id.user_id.to_string());
    assert_eq!(got.as_deref().map_err(|e| *e), expected);
}

#[test]
fn hs256_rules() {
    let config = config(&[
        ("HERALD_JWT_SECRET", "k"),
        ("HERALD_JWT_ISSUER", "iss1"),
        ("HERALD_JWT_AUDIENCE", "a1,a2"),
    ]);
    let auth = Authenticator::new(&config, None).unwrap();
    let good = json!({"sub": "u1", "exp": now() + 60, "iss": "iss1", "aud": "a2"});
    check(&auth, &sign(good.clone(), "k"), Ok("u1"));
    check(&auth, &sign(good, "other"), Err(AuthFailure::BadSignature));
    check(
        &auth,
        &sign(
            json!({"sub": "u1", "exp": now() - 31, "iss": "iss1", "aud": "a1"}),
            "k",
        ),
        Err(AuthFailure::Expired),
    );
    // Inside the 30 s leeway.
    check(
        &auth,
        &sign(
            json!({"sub": "u1", "exp": now() - 20, "iss": "iss1", "aud": "a1"}),
            "k",
        ),
        Ok("u1"),
    );
    check(
        &auth,
        &sign(
            json!({"sub": "u1", "exp": now() + 60, "nbf": now() + 120, "iss": "iss1", "aud": "a1"}),
            "k",
        ),
        Err(AuthFailure::NotYetValid),
    );
    check(
        &auth,
        &sign(json!({"sub": "u1", "iss": "iss1", "aud": "a1"}), "k"),
        Err(AuthFailure::MissingExpiry),
    );
    check(
        &auth,
        &sign(
            json!({"sub": "u1", "exp": now() + 60, "iss": "other", "aud": "a1"}),
            "k",
        ),
        Err(AuthFailure::WrongIssuer),
    );
    check(
        &auth,
        &sign(
            json!({"sub": "u1", "exp": now() + 60, "iss": "iss1", "aud": "zz"}),
            "k",
        ),
        Err(AuthFailure::WrongAudience),
    );
    // A configured issuer and audience are required, not only checked when present.
    check(
        &auth,
        &sign(json!({"sub": "u1", "exp": now() + 60, "aud": "a1"}), "k"),
        Err(AuthFailure::WrongIssuer),
    );
    check(
        &auth,
        &sign(json!({"sub": "u1", "exp": now() + 60, "iss": "iss1"}), "k"),
        Err(AuthFailure::WrongAudience),
    );
    check(
        &auth,
        &sign(
            json!({"sub": "a b", "exp": now() + 60, "iss": "iss1", "aud": "a1"}),
            "k",
        ),
        Err(AuthFailure::BadUser),
    );
    check(&auth, "not-a-jwt", Err(AuthFailure::Malformed));
}

#[test]
fn alg_none_and_switching_are_refused() {
    let config = config(&[("HERALD_JWT_SECRET", "k")]);
    let auth = Authenticator::new(&config, None).unwrap();
    let b64 = |v: &serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let claims = json!({"sub": "u1", "exp": now() + 60});
    let none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&claims));
    check(&auth, &none, Err(AuthFailure::Malformed));
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &claims,
        &EncodingKey::from_secret(b"k"),
    )
    .unwrap();
    check(&auth, &hs512, Err(AuthFailure::WrongAlgorithm));
}

#[test]
fn custom_user_claim_and_org_claims() {
    let config = config(&[("HERALD_JWT_SECRET", "k"), ("HERALD_JWT_USER_CLAIM", "uid")]);
    let auth = Authenticator::new(&config, None).unwrap();
    check(
        &auth,
        &sign(json!({"uid": "u9", "sub": "x", "exp": now() + 60}), "k"),
        Ok("u9"),
    );
    check(
        &auth,
        &sign(json!({"sub": "x", "exp": now() + 60}), "k"),
        Err(AuthFailure::BadUser),
    );

    let claims: Map<String, Value> =
        serde_json::from_value(json!({"orgs": ["a", "b"], "organization": {"kc": {"id": "1"}}})).unwrap();
    assert_eq!(org_claims(&claims), vec!["a", "b", "kc"]);
    let claims: Map<String, Value> = serde_json::from_value(json!({"organization": ["x"]})).unwrap();
    assert_eq!(org_claims(&claims), vec!["x"]);
}

#[test]
fn token_sources_in_order() {
    let mut headers = HeaderMap::new();
    assert_eq!(
        find_token(&headers, Some("q")),
        Some(("q".to_owned(), TokenSource::QueryParameter))
    );
    headers.insert(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer h"));
    assert_eq!(
        find_token(&headers, Some("q")),
        Some(("h".to_owned(), TokenSource::AuthorizationHeader))
    );
    headers.insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("herald.bearer, p"),
    );
    assert_eq!(
        find_token(&headers, Some("q")),
        Some(("p".to_owned(), TokenSource::Subprotocol))
    );
    assert!(offers_bearer_subprotocol(&headers));
    assert_eq!(find_token(&HeaderMap::new(), None), None);
    assert_eq!(find_token(&HeaderMap::new(), Some("")), None);
}

#[tokio::test]
async fn a_token_with_crit_in_its_header_is_refused() {
    let config = config(&[("HERALD_JWT_SECRET", "k")]);
    let auth = Authenticator::new(&config, None).unwrap();
    let claims = json!({"sub": "u1", "exp": now() + 60});
    let mut header = Header::new(Algorithm::HS256);
    header.crit = Some(vec!["exp".to_owned()]);
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(b"k")).unwrap();
    assert_eq!(
        auth.authenticate(&token).await.err(),
        Some(AuthFailure::CriticalExtension)
    );
    // The same token without crit passes.
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"k"),
    )
    .unwrap();
    assert!(auth.authenticate(&token).await.is_ok());
}

#[test]
fn all_lists_every_failure_once() {
    // A new variant fails to compile here until it has a place in ALL (metrics creates
    // a label for each entry of ALL at start).
    let place = |failure: AuthFailure| match failure {
        AuthFailure::Missing => 0,
        AuthFailure::Malformed => 1,
        AuthFailure::CriticalExtension => 2,
        AuthFailure::BadSignature => 3,
        AuthFailure::WrongAlgorithm => 4,
        AuthFailure::Expired => 5,
        AuthFailure::NotYetValid => 6,
        AuthFailure::MissingExpiry => 7,
        AuthFailure::WrongIssuer => 8,
        AuthFailure::WrongAudience => 9,
        AuthFailure::UnknownKey => 10,
        AuthFailure::KeysUnavailable => 11,
        AuthFailure::BadUser => 12,
    };
    for (idx, failure) in AuthFailure::ALL.into_iter().enumerate() {
        assert_eq!(
            place(failure),
            idx,
            "{failure:?} is out of place in AuthFailure::ALL"
        );
    }
}
