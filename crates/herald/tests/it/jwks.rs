//! SPEC §2, JWKS mode and OIDC discovery, against a fake identity provider on port 0:
//! the key types, `exp`, key rotation, the unknown-`kid` refetch throttle, algorithm
//! confusion, discovery from the issuer alone, and an identity provider that is down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures_util::future::join_all;
use herald::auth::AuthFailure;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::support::*;

const RSA_A_PEM: &[u8] = include_bytes!("../fixtures/rsa-2048-a.pem");
const RSA_A_PUBLIC_PEM: &[u8] = include_bytes!("../fixtures/rsa-2048-a.pub.pem");
const RSA_B_PEM: &[u8] = include_bytes!("../fixtures/rsa-2048-b.pem");
const EC_P256_PEM: &[u8] = include_bytes!("../fixtures/ec-p256.pem");
const ED25519_PEM: &[u8] = include_bytes!("../fixtures/ed25519.pem");

/// SPEC §2: an unknown `kid` refetches the JWKS at most this often.
const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// A signing key of the fake identity provider, with the public JWK it publishes.
struct TestKey {
    kid: &'static str,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl TestKey {
    /// RS256, and the JWK says so (`"alg": "RS256"`).
    fn rsa_a() -> Self {
        let key = EncodingKey::from_rsa_pem(RSA_A_PEM).unwrap();
        Self::new("rsa-a", Algorithm::RS256, key, true)
    }

    /// The key rotated in. Its JWK has no `alg`: herald derives RS256 from `kty`.
    fn rsa_b() -> Self {
        let key = EncodingKey::from_rsa_pem(RSA_B_PEM).unwrap();
        Self::new("rsa-b", Algorithm::RS256, key, false)
    }

    /// ES256, derived from `crv: P-256`.
    fn ec_p256() -> Self {
        let key = EncodingKey::from_ec_pem(EC_P256_PEM).unwrap();
        Self::new("ec-p256", Algorithm::ES256, key, false)
    }

    /// EdDSA, derived from `kty: OKP, crv: Ed25519`.
    fn ed25519() -> Self {
        let key = EncodingKey::from_ed_pem(ED25519_PEM).unwrap();
        Self::new("ed25519", Algorithm::EdDSA, key, false)
    }

    fn new(kid: &'static str, alg: Algorithm, encoding: EncodingKey, declare_alg: bool) -> Self {
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        if !declare_alg {
            jwk.common.key_algorithm = None;
        }
        let jwk = serde_json::to_value(&jwk).unwrap();
        assert_eq!(jwk.get("alg").is_some(), declare_alg, "{jwk}");
        Self {
            kid,
            alg,
            encoding,
            jwk,
        }
    }

    /// A token signed with this key, its algorithm and its `kid`.
    fn sign(&self, claims: &Value) -> String {
        self.sign_as(self.alg, Some(self.kid), claims)
    }

    /// A token signed with this key, under any algorithm of its family and any `kid`.
    fn sign_as(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

/// A token with any header, HMAC-SHA256-signed with `secret` whatever the header says.
fn hmac_token(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let key = EncodingKey::from_secret(secret);
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{message}.{signature}")
}

/// Valid claims for `user` for an hour.
fn claims(user: &str) -> Value {
    json!({"sub": user, "exp": now() + 3600})
}

fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
}

/// A fake identity provider: `GET /jwks.json` serves whatever the test last set, and
/// `GET /.well-known/openid-configuration` points to it. Requests are counted.
struct FakeIdp {
    base: String,
    shared: Arc<IdpShared>,
    task: JoinHandle<()>,
}

struct IdpShared {
    base: String,
    jwks: Mutex<Value>,
    jwks_requests: AtomicUsize,
    discovery_requests: AtomicUsize,
}

impl FakeIdp {
    async fn start(keys: &[&TestKey]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(IdpShared {
            base: base.clone(),
            jwks: Mutex::new(jwks(keys)),
            jwks_requests: AtomicUsize::new(0),
            discovery_requests: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/jwks.json", get(serve_jwks))
            .route("/.well-known/openid-configuration", get(serve_discovery))
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { base, shared, task }
    }

    fn jwks_url(&self) -> String {
        format!("{}/jwks.json", self.base)
    }

    /// From now on, serve exactly these keys.
    fn serve_keys(&self, keys: &[&TestKey]) {
        self.serve_document(jwks(keys));
    }

    /// From now on, serve this document at `/jwks.json`.
    fn serve_document(&self, document: Value) {
        *self.shared.jwks.lock().unwrap() = document;
    }

    fn jwks_requests(&self) -> usize {
        self.shared.jwks_requests.load(Ordering::SeqCst)
    }

    fn discovery_requests(&self) -> usize {
        self.shared.discovery_requests.load(Ordering::SeqCst)
    }
}

impl Drop for FakeIdp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_jwks(State(shared): State<Arc<IdpShared>>) -> Json<Value> {
    shared.jwks_requests.fetch_add(1, Ordering::SeqCst);
    let document = shared.jwks.lock().unwrap().clone();
    Json(document)
}

async fn serve_discovery(State(shared): State<Arc<IdpShared>>) -> Json<Value> {
    shared.discovery_requests.fetch_add(1, Ordering::SeqCst);
    Json(json!({
        "issuer": shared.base,
        "jwks_uri": format!("{}/jwks.json", shared.base),
    }))
}

/// A herald in JWKS mode on `idp`. The harness's `HERALD_JWT_SECRET` stays set: the
/// JWKS URL must win over it.
async fn jwks_server(idp: &FakeIdp) -> TestServer {
    TestServer::builder()
        .env("HERALD_JWT_JWKS_URL", idp.jwks_url())
        .spawn()
        .await
}

async fn assert_accepted(srv: &TestServer, token: &str, user: &str) {
    let mut ws = WsClient::connect(srv, "/ws/notifications/")
        .token(token)
        .open()
        .await
        .unwrap();
    let welcome = ws.next_json().await;
    assert_eq!(welcome["status"], "connected", "{welcome}");
    assert_eq!(welcome["user_id"], user, "{welcome}");
}

/// Expects close 4001 and returns its reason.
async fn refused(srv: &TestServer, token: &str) -> String {
    expect_refused_with(WsClient::connect(srv, "/ws/notifications/").token(token), 4001).await
}

#[tokio::test]
async fn rs256_es256_and_eddsa_tokens_are_accepted() {
    let (rsa, ec, ed) = (TestKey::rsa_a(), TestKey::ec_p256(), TestKey::ed25519());
    let idp = FakeIdp::start(&[&rsa, &ec, &ed]).await;
    let srv = jwks_server(&idp).await;

    assert_accepted(&srv, &rsa.sign(&claims("user_rsa")), "user_rsa").await;
    assert_accepted(&srv, &ec.sign(&claims("user_ec")), "user_ec").await;
    assert_accepted(&srv, &ed.sign(&claims("user_ed")), "user_ed").await;
    // Cached: three tokens, one fetch.
    assert_eq!(idp.jwks_requests(), 1);

    // The JWKS URL takes precedence over HERALD_JWT_SECRET: HS256 tokens signed with
    // that secret are no longer valid.
    assert!(srv.config.jwt_secret.is_some());
    refused(&srv, &srv.token("user_hs")).await;
}

#[tokio::test]
async fn exp_is_required_and_checked_with_leeway() {
    let (rsa, ed) = (TestKey::rsa_a(), TestKey::ed25519());
    let idp = FakeIdp::start(&[&rsa, &ed]).await;
    let srv = jwks_server(&idp).await;

    let no_exp = json!({"sub": "u1"});
    let reason = refused(&srv, &rsa.sign(&no_exp)).await;
    assert_eq!(reason, AuthFailure::MissingExpiry.to_string());

    let expired = json!({"sub": "u1", "exp": now() - 60});
    let reason = refused(&srv, &rsa.sign(&expired)).await;
    assert_eq!(reason, AuthFailure::Expired.to_string());
    let reason = refused(&srv, &ed.sign(&expired)).await;
    assert_eq!(reason, AuthFailure::Expired.to_string());

    // 30 s leeway on exp and nbf.
    let just_expired = json!({"sub": "u1", "exp": now() - 10});
    assert_accepted(&srv, &rsa.sign(&just_expired), "u1").await;
    let not_yet = json!({"sub": "u1", "exp": now() + 3600, "nbf": now() + 120});
    let reason = refused(&srv, &rsa.sign(&not_yet)).await;
    assert_eq!(reason, AuthFailure::NotYetValid.to_string());
}

/// The only test that moves past the refetch interval (once).
#[tokio::test]
async fn a_rotated_key_is_fetched_and_the_dropped_key_refused() {
    let (old, new) = (TestKey::rsa_a(), TestKey::rsa_b());
    let idp = FakeIdp::start(&[&old]).await;
    let srv = jwks_server(&idp).await;
    assert_accepted(&srv, &old.sign(&claims("u1")), "u1").await;
    assert_eq!(idp.jwks_requests(), 1);

    // The identity provider rotates: the new key in, the old one out.
    idp.serve_keys(&[&new]);
    // herald's clock (tokio's, in this runtime) jumps past the interval instead of the
    // test waiting it out.
    tokio::time::pause();
    tokio::time::advance(REFETCH_MIN_INTERVAL + Duration::from_millis(250)).await;
    tokio::time::resume();

    // The new kid is unknown to herald's cache, so it refetches, once.
    assert_accepted(&srv, &new.sign(&claims("u2")), "u2").await;
    assert_eq!(idp.jwks_requests(), 2);

    // The dropped key no longer verifies anything, although its tokens are unexpired.
    let reason = refused(&srv, &old.sign(&claims("u1"))).await;
    assert_eq!(reason, AuthFailure::UnknownKey.to_string());
    // And its kid, unknown now, did not cause a refetch within the interval.
    assert_eq!(idp.jwks_requests(), 2);
    assert_accepted(&srv, &new.sign(&claims("u3")), "u3").await;
}

#[tokio::test]
async fn unknown_kids_refetch_at_most_once_per_interval() {
    let rsa = TestKey::rsa_a();
    let idp = FakeIdp::start(&[&rsa]).await;
    let srv = jwks_server(&idp).await;
    assert_accepted(&srv, &rsa.sign(&claims("u1")), "u1").await;
    assert_eq!(idp.jwks_requests(), 1);

    // A flood of made-up kids, one after another and then all at once, well within
    // 10 s of the first fetch.
    for i in 0..5 {
        let token = rsa.sign_as(Algorithm::RS256, Some(&format!("made-up-{i}")), &claims("u1"));
        let reason = refused(&srv, &token).await;
        assert_eq!(reason, AuthFailure::UnknownKey.to_string());
    }
    let tokens: Vec<String> = (5..15)
        .map(|i| rsa.sign_as(Algorithm::RS256, Some(&format!("made-up-{i}")), &claims("u1")))
        .collect();
    join_all(tokens.iter().map(|token| refused(&srv, token))).await;

    let n_requests = idp.jwks_requests();
    assert!(
        n_requests <= 2,
        "15 unknown kids within 10 s caused {} extra JWKS requests",
        n_requests - 1
    );
    // The real key still works, from the cache.
    assert_accepted(&srv, &rsa.sign(&claims("u1")), "u1").await;
    assert_eq!(idp.jwks_requests(), n_requests);
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    let (rsa, rsa_b, ec) = (TestKey::rsa_a(), TestKey::rsa_b(), TestKey::ec_p256());
    let idp = FakeIdp::start(&[&rsa, &rsa_b, &ec]).await;
    // Symmetric keys in a JWKS are public, so herald must never use them.
    let oct_secret = b"a-symmetric-key-anybody-can-read";
    let k = URL_SAFE_NO_PAD.encode(oct_secret);
    let mut document = jwks(&[&rsa, &rsa_b, &ec]);
    let keys = document["keys"].as_array_mut().unwrap();
    keys.push(json!({"kty": "oct", "kid": "oct-hs256", "alg": "HS256", "k": k}));
    keys.push(json!({"kty": "oct", "kid": "oct-no-alg", "k": k}));
    keys.push(json!({"kty": "oct", "kid": "oct-rs256", "alg": "RS256", "k": k}));
    idp.serve_document(document);
    let srv = jwks_server(&idp).await;
    assert_accepted(&srv, &rsa.sign(&claims("u1")), "u1").await;
    let wrong_algorithm = AuthFailure::WrongAlgorithm.to_string();

    // HS256 "signed" with the RSA public key as the HMAC secret, under the RSA kid.
    let hs256 = Header {
        kid: Some(rsa.kid.to_owned()),
        ..Header::new(Algorithm::HS256)
    };
    let confused =
        jsonwebtoken::encode(&hs256, &claims("u1"), &EncodingKey::from_secret(RSA_A_PUBLIC_PEM)).unwrap();
    assert_eq!(refused(&srv, &confused).await, wrong_algorithm);
    // The same without a kid.
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("u1"),
        &EncodingKey::from_secret(RSA_A_PUBLIC_PEM),
    )
    .unwrap();
    refused(&srv, &confused).await;

    // Validly signed by the right key, but under another algorithm of its family than
    // the JWK's: declared (rsa-a has "alg": "RS256") or derived (rsa-b has no alg).
    for key in [&rsa, &rsa_b] {
        for alg in [Algorithm::RS384, Algorithm::RS512, Algorithm::PS256] {
            let token = key.sign_as(alg, Some(key.kid), &claims("u1"));
            assert_eq!(refused(&srv, &token).await, wrong_algorithm, "{alg:?}");
        }
    }
    // ES256 (valid with the EC key) under the RSA key's kid.
    let token = ec.sign_as(Algorithm::ES256, Some(rsa.kid), &claims("u1"));
    assert_eq!(refused(&srv, &token).await, wrong_algorithm);
    // RS256 (valid with the RSA key) under the EC key's kid.
    let token = rsa.sign_as(Algorithm::RS256, Some(ec.kid), &claims("u1"));
    assert_eq!(refused(&srv, &token).await, wrong_algorithm);

    // `alg: none`, with and without a signature.
    let payload = URL_SAFE_NO_PAD.encode(claims("u1").to_string());
    for header in [
        json!({"alg": "none", "typ": "JWT", "kid": rsa.kid}),
        json!({"alg": "none", "typ": "JWT"}),
        json!({"alg": "None", "kid": rsa.kid}),
    ] {
        let header = URL_SAFE_NO_PAD.encode(header.to_string());
        refused(&srv, &format!("{header}.{payload}.")).await;
        let signed = rsa.sign(&claims("u1"));
        let signature = signed.rsplit('.').next().unwrap();
        refused(&srv, &format!("{header}.{payload}.{signature}")).await;
    }

    // Symmetric JWKs are skipped, whatever their alg says.
    for kid in ["oct-hs256", "oct-no-alg"] {
        let header = json!({"alg": "HS256", "typ": "JWT", "kid": kid});
        refused(&srv, &hmac_token(&header, &claims("u1"), oct_secret)).await;
    }
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": "oct-rs256"});
    refused(&srv, &hmac_token(&header, &claims("u1"), oct_secret)).await;

    // None of these refusals broke the good key.
    assert_accepted(&srv, &rsa.sign(&claims("u2")), "u2").await;
}

#[tokio::test]
async fn oidc_discovery_from_the_issuer_alone() {
    let rsa = TestKey::rsa_a();
    let idp = FakeIdp::start(&[&rsa]).await;
    let srv = TestServer::builder()
        .env("HERALD_JWT_SECRET", "")
        .env("HERALD_JWT_ISSUER", &idp.base)
        .spawn()
        .await;
    assert!(srv.config.jwt_secret.is_none());

    let good = json!({"sub": "u1", "exp": now() + 3600, "iss": idp.base});
    assert_accepted(&srv, &rsa.sign(&good), "u1").await;
    assert_eq!(idp.discovery_requests(), 1);
    assert_eq!(idp.jwks_requests(), 1);

    let wrong_issuer = AuthFailure::WrongIssuer.to_string();
    let other = json!({"sub": "u1", "exp": now() + 3600, "iss": "https://evil.example"});
    assert_eq!(refused(&srv, &rsa.sign(&other)).await, wrong_issuer);
    let other = json!({"sub": "u1", "exp": now() + 3600, "iss": format!("{}/", idp.base)});
    assert_eq!(refused(&srv, &rsa.sign(&other)).await, wrong_issuer);
    // A configured issuer is required, not merely checked when present.
    let missing = json!({"sub": "u1", "exp": now() + 3600});
    assert_eq!(refused(&srv, &rsa.sign(&missing)).await, wrong_issuer);

    // HERALD_JWT_SECRET with the issuer: HS256 mode, no discovery (SPEC §2 order).
    let hs = TestServer::builder()
        .env("HERALD_JWT_ISSUER", &idp.base)
        .spawn()
        .await;
    refused(&hs, &rsa.sign(&good)).await;
    assert_accepted(&hs, &sign(good.clone()), "u1").await;
    let reason = refused(&hs, &sign(json!({"sub": "u1", "exp": now() + 3600}))).await;
    assert_eq!(reason, wrong_issuer);
    assert_eq!(idp.discovery_requests(), 1);
}

#[tokio::test]
async fn identity_provider_down_refuses_tokens_and_herald_survives() {
    let rsa = TestKey::rsa_a();
    // A port that was free a moment ago: connections to it are refused.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);

    let by_url = TestServer::builder()
        .env("HERALD_JWT_JWKS_URL", format!("{dead}/jwks.json"))
        .spawn()
        .await;
    let by_discovery = TestServer::builder()
        .env("HERALD_JWT_SECRET", "")
        .env("HERALD_JWT_ISSUER", &dead)
        .spawn()
        .await;
    // An identity provider that answers, but not with a JWKS.
    let broken = FakeIdp::start(&[]).await;
    broken.serve_document(json!({"error": "maintenance"}));
    let by_broken = jwks_server(&broken).await;

    let token = rsa.sign(&json!({"sub": "u1", "exp": now() + 3600, "iss": dead}));
    for srv in [&by_url, &by_discovery, &by_broken] {
        for _ in 0..3 {
            let reason = refused(srv, &token).await;
            assert_eq!(reason, AuthFailure::KeysUnavailable.to_string());
        }
        // The HS256 secret is no fallback either.
        refused(srv, &srv.token("u1")).await;
        let (status, _) = srv.get("/healthz").await;
        assert_eq!(status, 200);
    }
    // Failed fetches are throttled like unknown kids.
    assert!(broken.jwks_requests() <= 2, "{}", broken.jwks_requests());

    for srv in [by_url, by_discovery, by_broken] {
        srv.stop().await.unwrap();
    }
}
