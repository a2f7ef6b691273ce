//! User tokens for the suite's clients: herald's own dev-token signer
//! (`herald::auth::mint_hs256`) with the secret the suite gives its nodes, in the shape
//! `HERALD_MEMBERSHIP=claims` reads (`sub`, `exp`, `orgs`).

use std::time::Duration;

use anyhow::Context as _;
use herald::config::Secret;

use crate::procs::JWT_SECRET;

/// Longer than any run.
const TTL: Duration = Duration::from_secs(6 * 3600);

pub fn mint(user: &str, orgs: &[String]) -> anyhow::Result<String> {
    herald::auth::mint_hs256(&Secret::new(JWT_SECRET), user, orgs, TTL).context("cannot sign a token")
}
