//! HS256 user tokens in the shape herald accepts with `HERALD_MEMBERSHIP=claims`: `sub`,
//! `exp`, and `orgs` for the org events endpoint.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

use crate::procs::JWT_SECRET;

/// Longer than any run.
const TTL_SECONDS: u64 = 6 * 3600;

#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    orgs: &'a [String],
}

pub fn mint(user: &str, orgs: &[String]) -> anyhow::Result<String> {
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
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .context("cannot sign a token")
}
