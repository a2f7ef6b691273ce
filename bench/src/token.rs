//! HS256 user tokens for the load generator's sockets, in the shape every server under
//! test accepts: `sub`, `exp`, and `orgs` for the org events endpoint (herald's
//! `HERALD_MEMBERSHIP=claims`).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

/// How long a benchmark token lives: longer than any run.
const TTL_SECONDS: u64 = 6 * 3600;

#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    orgs: &'a [String],
}

pub fn mint(secret: &str, user: &str, orgs: &[String]) -> anyhow::Result<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    let claims = Claims {
        sub: user,
        exp: now + TTL_SECONDS,
        orgs,
    };
    jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("cannot sign a token")
}

/// Microseconds since the Unix epoch (the clock every process on this machine shares).
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| {
        u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
    })
}
