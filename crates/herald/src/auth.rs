//! User authentication: where a token is found, how it is verified, and what a
//! verified token says ([`Identity`]).
//!
//! Key source, first that applies (docs/protocol.md): a JWKS URL; an HS256 secret; an issuer
//! alone (JWKS by OIDC discovery). Dev mode is an HS256 secret generated at start.
//! The algorithm is fixed by the key, never by the token: `none` and algorithm
//! switching are refused.

pub mod api_key;
mod jwks;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::config::{Config, Secret};
use crate::ids::UserId;

pub use api_key::ApiKeys;
use jwks::JwksKeys;

/// Clock skew tolerated on `exp` and `nbf` (docs/protocol.md).
pub const LEEWAY: Duration = Duration::from_secs(30);

/// The subprotocol a browser offers, followed by the token, to authenticate without
/// putting the token in the URL: `Sec-WebSocket-Protocol: herald.bearer, <token>`.
pub const BEARER_SUBPROTOCOL: &str = "herald.bearer";

/// What a verified token says about its holder.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: UserId,
    /// Organizations named in the `orgs` or Keycloak `organization` claim.
    pub orgs: Vec<String>,
    /// The token's `exp`, Unix seconds.
    pub expires_at: u64,
}

/// Why a token was refused. Maps to HTTP 401 and WebSocket close 4001; the label is
/// what metrics and logs use (never the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no token was given")]
    Missing,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's header lists critical extensions (crit), which herald does not support")]
    CriticalExtension,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token's algorithm is not the one its key requires")]
    WrongAlgorithm,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token has no exp claim")]
    MissingExpiry,
    #[error("the token's issuer is not the configured one")]
    WrongIssuer,
    #[error("the token's audience is not a configured one")]
    WrongAudience,
    #[error("the token's key id is not in the JWKS")]
    UnknownKey,
    #[error("the signing keys could not be fetched")]
    KeysUnavailable,
    #[error("the token's user claim is missing or not a valid user id")]
    BadUser,
}

impl AuthFailure {
    /// Every reason, so metrics can create each label at start.
    pub const ALL: [AuthFailure; 13] = [
        Self::Missing,
        Self::Malformed,
        Self::CriticalExtension,
        Self::BadSignature,
        Self::WrongAlgorithm,
        Self::Expired,
        Self::NotYetValid,
        Self::MissingExpiry,
        Self::WrongIssuer,
        Self::WrongAudience,
        Self::UnknownKey,
        Self::KeysUnavailable,
        Self::BadUser,
    ];

    /// A bounded label for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::CriticalExtension => "crit",
            Self::BadSignature => "bad_signature",
            Self::WrongAlgorithm => "wrong_algorithm",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::MissingExpiry => "missing_exp",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::UnknownKey => "unknown_key",
            Self::KeysUnavailable => "keys_unavailable",
            Self::BadUser => "bad_user",
        }
    }
}

/// Where a token came from, in the documented order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Subprotocol,
    AuthorizationHeader,
    QueryParameter,
}

/// Finds the user token in a WebSocket handshake: the `herald.bearer` subprotocol pair,
/// then `Authorization: Bearer`, then `?token=`.
pub fn find_token(headers: &HeaderMap, query_token: Option<&str>) -> Option<(String, TokenSource)> {
    if let Some(token) = subprotocol_token(headers) {
        return Some((token, TokenSource::Subprotocol));
    }
    if let Some(token) = bearer(headers) {
        return Some((token.to_owned(), TokenSource::AuthorizationHeader));
    }
    query_token
        .filter(|t| !t.is_empty())
        .map(|t| (t.to_owned(), TokenSource::QueryParameter))
}

/// The token offered as `herald.bearer, <token>` in `Sec-WebSocket-Protocol`.
pub fn subprotocol_token(headers: &HeaderMap) -> Option<String> {
    let offered: Vec<&str> = headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let idx = offered.iter().position(|p| *p == BEARER_SUBPROTOCOL)?;
    offered
        .get(idx + 1)
        .filter(|t| !t.is_empty())
        .map(|t| (*t).to_owned())
}

/// Whether the client offered the `herald.bearer` subprotocol (and so must be answered
/// with it).
pub fn offers_bearer_subprotocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == BEARER_SUBPROTOCOL)
}

/// The value of `Authorization: Bearer <value>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Verifies user tokens. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    keys: KeySource,
    issuer: Option<String>,
    audience: Vec<String>,
    user_claim: String,
    /// The checks for HS256 tokens, built once: every handshake verifies a token.
    hs256: Validation,
}

enum KeySource {
    Secret(DecodingKey),
    Jwks(JwksKeys),
}

impl Authenticator {
    /// Builds the authenticator for `config`. `dev_secret` is the generated secret used
    /// when no key source is configured.
    pub fn new(config: &Config, dev_secret: Option<&Secret>) -> anyhow::Result<Self> {
        let keys = if let Some(url) = &config.jwt_jwks_url {
            KeySource::Jwks(JwksKeys::new(jwks::Location::Url(url.clone()))?)
        } else if let Some(secret) = config.jwt_secret.as_ref().or(dev_secret) {
            KeySource::Secret(DecodingKey::from_secret(secret.expose().as_bytes()))
        } else if let Some(issuer) = &config.jwt_issuer {
            KeySource::Jwks(JwksKeys::new(jwks::Location::Discover(issuer.clone()))?)
        } else {
            anyhow::bail!(
                "no key source for user tokens: set HERALD_JWT_SECRET, HERALD_JWT_JWKS_URL or HERALD_JWT_ISSUER"
            );
        };
        let hs256 = validation(
            Algorithm::HS256,
            config.jwt_issuer.as_deref(),
            &config.jwt_audience,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                keys,
                issuer: config.jwt_issuer.clone(),
                audience: config.jwt_audience.clone(),
                user_claim: config.jwt_user_claim.clone(),
                hs256,
            }),
        })
    }

    /// Verifies `token` and returns who it names.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthFailure> {
        let data = match &self.inner.keys {
            // Every handshake verifies a token: the header is parsed once, inside
            // `decode`, and the checks were built once.
            KeySource::Secret(key) => {
                let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.inner.hs256)
                    .map_err(|err| classify(&err))?;
                refuse_critical_extensions(&data.header)?;
                data
            }
            KeySource::Jwks(jwks) => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Malformed)?;
                refuse_critical_extensions(&header)?;
                // Boxed: its future (a key set fetch) would otherwise be part of every
                // handshake's future, HS256 ones too.
                let (key, algorithm) = Box::pin(jwks.key_for(header.kid.as_deref(), header.alg)).await?;
                if header.alg != algorithm {
                    return Err(AuthFailure::WrongAlgorithm);
                }
                let validation = validation(algorithm, self.inner.issuer.as_deref(), &self.inner.audience);
                jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
                    .map_err(|err| classify(&err))?
            }
        };
        self.identity(&data.claims)
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<Identity, AuthFailure> {
        let user = claims
            .get(&self.inner.user_claim)
            .and_then(Value::as_str)
            .ok_or(AuthFailure::BadUser)?;
        let user_id = UserId::parse(user).map_err(|_| AuthFailure::BadUser)?;
        let expires_at = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or(AuthFailure::MissingExpiry)?;
        Ok(Identity {
            user_id,
            orgs: org_claims(claims),
            expires_at,
        })
    }
}

/// RFC 7515 §4.1.11: a recipient that does not understand every extension named in
/// `crit` must refuse the token; herald understands none.
fn refuse_critical_extensions(header: &jsonwebtoken::Header) -> Result<(), AuthFailure> {
    match header.crit {
        Some(_) => Err(AuthFailure::CriticalExtension),
        None => Ok(()),
    }
}

/// The checks a token signed with `algorithm` must pass.
fn validation(algorithm: Algorithm, issuer: Option<&str>, audience: &[String]) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = LEEWAY.as_secs();
    validation.validate_nbf = true;
    // jsonwebtoken checks `iss` and `aud` only when the token has them: a configured
    // issuer or audience must also be required, or leaving the claim out would pass.
    validation.required_spec_claims = HashSet::from(["exp".to_owned()]);
    match issuer {
        Some(issuer) => {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        None => validation.iss = None,
    }
    if audience.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(audience);
        validation.required_spec_claims.insert("aud".to_owned());
    }
    validation
}

fn classify(err: &jsonwebtoken::errors::Error) -> AuthFailure {
    use jsonwebtoken::errors::ErrorKind;
    match err.kind() {
        ErrorKind::ExpiredSignature => AuthFailure::Expired,
        ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
        ErrorKind::InvalidIssuer => AuthFailure::WrongIssuer,
        ErrorKind::InvalidAudience => AuthFailure::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "iss" => AuthFailure::WrongIssuer,
            "aud" => AuthFailure::WrongAudience,
            _ => AuthFailure::MissingExpiry,
        },
        ErrorKind::InvalidSignature => AuthFailure::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthFailure::WrongAlgorithm,
        _ => AuthFailure::Malformed,
    }
}

/// Organizations named by the token: `orgs` (array of strings) or Keycloak's
/// `organization` (an array of names, or an object keyed by name).
fn org_claims(claims: &Map<String, Value>) -> Vec<String> {
    let mut orgs = Vec::new();
    for claim in ["orgs", "organization"] {
        match claims.get(claim) {
            Some(Value::Array(items)) => {
                orgs.extend(items.iter().filter_map(Value::as_str).map(str::to_owned));
            }
            Some(Value::Object(map)) => orgs.extend(map.keys().cloned()),
            Some(Value::String(single)) => orgs.push(single.clone()),
            _ => {}
        }
    }
    orgs
}

/// Signs an HS256 dev token (`herald token`, the demo page and tests).
pub fn mint_hs256(
    secret: &Secret,
    user: &str,
    orgs: &[String],
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = serde_json::json!({
        "sub": user,
        "iat": now,
        "exp": now + ttl.as_secs(),
    });
    if !orgs.is_empty() {
        claims["orgs"] = serde_json::json!(orgs);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.expose().as_bytes()),
    )
}

#[cfg(test)]
mod tests;
