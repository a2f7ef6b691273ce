//! Public keys from a JWKS document, fetched from a URL or discovered through the
//! issuer's OpenID configuration, and cached.
//!
//! The cache is refreshed when it is older than [`JWKS_MAX_AGE`], and when a token names
//! a key id the cache lacks, at most once per [`JWKS_REFETCH_MIN_INTERVAL`]: a flood of
//! tokens with made-up key ids cannot turn into a flood of requests to the identity
//! provider.

use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::auth::AuthFailure;

/// Unknown key ids refetch the JWKS at most this often (docs/protocol.md).
pub const JWKS_REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// Keys are refreshed in the background of a request once they are this old, so a
/// rotation that reuses a key id is picked up within the hour.
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(3600);

/// How long a JWKS or discovery request may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) enum Location {
    /// `HERALD_JWT_JWKS_URL`.
    Url(String),
    /// `HERALD_JWT_ISSUER` alone: `<issuer>/.well-known/openid-configuration`.
    Discover(String),
}

pub(crate) struct JwksKeys {
    location: Location,
    client: reqwest::Client,
    /// The keys now in use. Readers take a snapshot and never wait on a fetch, so a slow
    /// identity provider cannot stall tokens whose key is already known.
    keys: RwLock<Arc<KeySet>>,
    /// When a fetch was last tried, successful or not (throttles refetches). A tokio
    /// mutex held across the fetch: requests that need new keys wait for one fetch
    /// instead of starting their own.
    fetching: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct KeySet {
    keys: Vec<CachedKey>,
    /// When these keys were fetched.
    fetched_at: Option<Instant>,
}

struct CachedKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

impl JwksKeys {
    pub(crate) fn new(location: Location) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|err| anyhow::anyhow!("cannot build the JWKS HTTP client: {err}"))?;
        Ok(Self {
            location,
            client,
            keys: RwLock::new(Arc::new(KeySet::default())),
            fetching: Mutex::new(None),
        })
    }

    fn snapshot(&self) -> Arc<KeySet> {
        // Writers only swap the Arc, so a poisoned lock still holds a whole key set.
        crate::sync::read(&self.keys).clone()
    }

    /// The key and algorithm that must verify a token with this header.
    pub(crate) async fn key_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<(DecodingKey, Algorithm), AuthFailure> {
        let current = self.snapshot();
        let stale = current.fetched_at.is_none_or(|at| at.elapsed() >= JWKS_MAX_AGE);
        if let Some(found) = current.find(kid, alg) {
            if stale {
                // Refresh old keys on this request if nobody else is fetching; every
                // other request goes on with the keys it has.
                if let Ok(mut attempted) = self.fetching.try_lock() {
                    if may_refetch(*attempted) {
                        self.refresh(&mut attempted).await;
                        if let Some(fresh) = self.snapshot().find(kid, alg) {
                            return Ok(fresh);
                        }
                    }
                }
            }
            return Ok(found);
        }
        // Unknown key: one fetch at a time, at most once per interval.
        let mut attempted = self.fetching.lock().await;
        if let Some(found) = self.snapshot().find(kid, alg) {
            return Ok(found);
        }
        if may_refetch(*attempted) {
            self.refresh(&mut attempted).await;
            if let Some(found) = self.snapshot().find(kid, alg) {
                return Ok(found);
            }
        }
        if self.snapshot().fetched_at.is_none() {
            Err(AuthFailure::KeysUnavailable)
        } else {
            Err(AuthFailure::UnknownKey)
        }
    }

    async fn refresh(&self, attempted: &mut Option<Instant>) {
        *attempted = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                tracing::debug!(n_keys = keys.len(), "jwks fetched");
                let set = Arc::new(KeySet {
                    keys,
                    fetched_at: Some(Instant::now()),
                });
                *crate::sync::write(&self.keys) = set;
            }
            Err(reason) => {
                tracing::warn!(%reason, "jwks fetch failed; keeping the keys already known");
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<CachedKey>, String> {
        let url = match &self.location {
            Location::Url(url) => url.clone(),
            Location::Discover(issuer) => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let doc: serde_json::Value = self.get_json(&discovery).await?;
                doc.get("jwks_uri")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
                    .ok_or_else(|| "the OpenID configuration has no jwks_uri".to_owned())?
            }
        };
        let set: JwkSet = self.get_json(&url).await?;
        Ok(set.keys.iter().filter_map(cached_key).collect())
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|err| format!("request failed: {}", err.without_url()))?;
        if !response.status().is_success() {
            return Err(format!("answered HTTP {}", response.status().as_u16()));
        }
        response
            .json::<T>()
            .await
            .map_err(|err| format!("not a valid document: {}", err.without_url()))
    }
}

fn may_refetch(attempted: Option<Instant>) -> bool {
    attempted.is_none_or(|at| at.elapsed() >= JWKS_REFETCH_MIN_INTERVAL)
}

impl KeySet {
    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<(DecodingKey, Algorithm)> {
        let found = match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            // Without a kid, only an unambiguous key for the token's algorithm will do.
            None => {
                let mut candidates = self.keys.iter().filter(|k| k.algorithm == alg);
                match (candidates.next(), candidates.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                }
            }
        }?;
        Some((found.key.clone(), found.algorithm))
    }
}

/// Turns a JWK into a verification key with its one algorithm. Symmetric keys, keys
/// for encryption and unsupported types are skipped.
fn cached_key(jwk: &Jwk) -> Option<CachedKey> {
    // A symmetric key in a published JWKS is readable by anyone, whatever `alg` it
    // declares.
    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
        return None;
    }
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| !matches!(u, jsonwebtoken::jwk::PublicKeyUse::Signature))
    {
        return None;
    }
    let algorithm = match jwk.common.key_algorithm {
        Some(declared) => signing_algorithm(declared)?,
        None => match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                _ => return None,
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
            _ => return None,
        },
    };
    if matches!(algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(CachedKey {
        kid: jwk.common.key_id.clone(),
        algorithm,
        key,
    })
}

fn signing_algorithm(declared: KeyAlgorithm) -> Option<Algorithm> {
    Algorithm::from_str(&declared.to_string()).ok()
}
