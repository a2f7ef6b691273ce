//! Who may join an organization's channel, decided by `HERALD_MEMBERSHIP`:
//! the database, the token's claims, or a webhook.
//!
//! **Invariant:** when the answer cannot be had (database down, webhook unreachable),
//! membership is denied, never allowed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::Identity;
use crate::config::MembershipMode;
use crate::store::Store;

/// How long a webhook's answer is reused (documented: cached at most 30 s).
pub const WEBHOOK_CACHE_TTL: Duration = Duration::from_secs(30);

/// How long the webhook may take to answer.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds the webhook cache; when full, expired answers are swept, then the cache is
/// cleared (it is only a cache).
const WEBHOOK_CACHE_MAX: usize = 100_000;

pub enum Membership {
    Database(Store),
    Claims,
    Webhook(Webhook),
}

pub struct Webhook {
    url: String,
    client: reqwest::Client,
    cache: Mutex<HashMap<(String, String), (bool, Instant)>>,
}

impl Membership {
    pub fn new(mode: &MembershipMode, store: Store) -> anyhow::Result<Self> {
        Ok(match mode {
            MembershipMode::Database => Membership::Database(store),
            MembershipMode::Claims => Membership::Claims,
            MembershipMode::Webhook(url) => Membership::Webhook(Webhook {
                url: url.clone(),
                client: reqwest::Client::builder()
                    .timeout(WEBHOOK_TIMEOUT)
                    .build()
                    .map_err(|err| anyhow::anyhow!("cannot build the webhook HTTP client: {err}"))?,
                cache: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Whether `identity` is a member of `org_id`. Failures deny and are logged.
    pub async fn is_member(&self, org_id: &str, identity: &Identity) -> bool {
        let user_id = identity.user_id.as_str();
        match self {
            Membership::Database(store) => match store.is_member(org_id, user_id).await {
                Ok(member) => member,
                Err(err) => {
                    tracing::warn!(org_id, user_id, error = %err, "membership lookup failed; denying");
                    false
                }
            },
            Membership::Claims => identity.orgs.iter().any(|org| org == org_id),
            Membership::Webhook(webhook) => webhook.is_member(org_id, user_id).await,
        }
    }
}

impl Membership {
    /// Whether `user_id` is a member of `org_id`, without a token: with `claims`, which
    /// only a token can answer, yes. Failures deny and are logged.
    pub async fn is_member_by_id(&self, org_id: &str, user_id: &str) -> bool {
        match self {
            Membership::Database(store) => store.is_member(org_id, user_id).await.unwrap_or_else(|err| {
                tracing::warn!(org_id, user_id, error = %err, "membership lookup failed; denying");
                false
            }),
            Membership::Claims => true,
            Membership::Webhook(webhook) => webhook.is_member(org_id, user_id).await,
        }
    }

    /// Forgets cached answers for a user in an org (after a membership change).
    pub fn forget(&self, org_id: &str, user_id: &str) {
        if let Membership::Webhook(webhook) = self {
            webhook.forget(org_id, user_id);
        }
    }
}

impl Webhook {
    async fn is_member(&self, org_id: &str, user_id: &str) -> bool {
        let key = (org_id.to_owned(), user_id.to_owned());
        if let Some(allowed) = self.cached(&key) {
            return allowed;
        }
        let response = self
            .client
            .post(&self.url)
            .json(&serde_json::json!({"user_id": user_id, "org_id": org_id}))
            .send()
            .await;
        let allowed = match response {
            Ok(response) if response.status().is_success() => true,
            Ok(response) if matches!(response.status().as_u16(), 403 | 404) => false,
            Ok(response) => {
                tracing::warn!(
                    org_id,
                    user_id,
                    status = response.status().as_u16(),
                    "membership webhook gave an unexpected status; denying"
                );
                return false;
            }
            Err(err) => {
                tracing::warn!(org_id, user_id, error = %err.without_url(),
                    "membership webhook unreachable; denying");
                return false;
            }
        };
        self.remember(key, allowed);
        allowed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (bool, Instant)>> {
        crate::sync::lock(&self.cache)
    }

    fn cached(&self, key: &(String, String)) -> Option<bool> {
        let cache = self.lock();
        let (allowed, at) = cache.get(key)?;
        (at.elapsed() < WEBHOOK_CACHE_TTL).then_some(*allowed)
    }

    fn remember(&self, key: (String, String), allowed: bool) {
        let mut cache = self.lock();
        if cache.len() >= WEBHOOK_CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < WEBHOOK_CACHE_TTL);
            if cache.len() >= WEBHOOK_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (allowed, Instant::now()));
    }

    /// Forgets cached answers for a user in an org (after a membership change).
    pub fn forget(&self, org_id: &str, user_id: &str) {
        self.lock().remove(&(org_id.to_owned(), user_id.to_owned()));
    }

    /// Forgets every cached answer (changes may have been missed).
    pub fn forget_all(&self) {
        self.lock().clear();
    }
}
