//! Idempotent publish: a publish call sent with `Idempotency-Key` publishes at most once
//! per key and channel within `HERALD_HISTORY_TTL`, on every node, and a repeat gets the
//! first answer again.
//!
//! Each key has one record (JSON), kept in process (memory mode) or in Redis:
//! `herald:{<channel>}:idem:<sha256 of the channels and the key>`. The hash tag is the
//! call's (first) channel, so on a Redis Cluster a record lives in one slot, next to its
//! channel; a batch's record lives in its first channel's slot and covers every item.
//!
//! A record moves through these states, each change a compare-and-set on the whole
//! record (a Lua script in Redis), so two requests can never both own a key:
//! - **owned**: a request holds the key and is publishing, until a deadline. A repeat
//!   that finds it waits (up to [`MAX_WAIT`]) for the answer.
//! - **open**: an attempt ended without publishing everything. The record keeps the
//!   receipts of the items already published (a batch's leading items) and the message
//!   id of an item whose outcome is unknown (its command timed out). The next attempt
//!   with the key takes it over: it looks for that message in the channel's history
//!   (found: it was published), then publishes only the items left.
//! - **answered**: the call's answer (status and body), replayed to every repeat.
//!
//! An item whose outcome is unknown and is not (yet) in history keeps the key open and
//! every repeat answers 503 `outcome: unknown` until the message shows up in history
//! (then the repeat replays it) or the record expires: publishing it again could
//! publish it twice. The same holds for a record whose owner's deadline passed without
//! an answer (the node died while publishing).
//!
//! Records live `HERALD_HISTORY_TTL`. In memory mode at most [`MEMORY_MAX_RECORDS`] are
//! kept; beyond it the records closest to expiry are dropped first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::Value;
use fred::types::scripts::Script;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::broker::redis::Shards;
use crate::broker::BrokerError;
use crate::channel::{new_id, Channel};
use crate::redis::COMMAND_TIMEOUT;
use crate::sync::lock;

/// The most characters (Unicode scalar values) an `Idempotency-Key` may have.
pub const MAX_KEY_CHARS: usize = 128;

/// How long a repeat waits for a request still publishing under the same key.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// Records kept by one node in memory mode.
pub const MEMORY_MAX_RECORDS: usize = 100_000;

/// How long a request may own a key: a base plus a share per item, beyond any publish
/// timeout, so an owner that is still working is never taken for a dead one.
const OWNER_BASE: Duration = Duration::from_secs(15);
const OWNER_PER_ITEM: Duration = Duration::from_secs(4);

/// How often a waiting repeat reads the record again.
const POLL: Duration = Duration::from_millis(50);

/// How often, and how long apart, a record update that failed is tried again in the
/// background (Redis unreachable right after a publish).
const SETTLE_RETRIES: u32 = 30;
const SETTLE_INTERVAL: Duration = Duration::from_secs(1);

/// Sets a record if it still holds the expected value. KEYS = the record; ARGV =
/// expected value (`''`: absent), new value (`''`: delete), TTL (ms). Returns `{1}` on
/// success, else `{0, current value or ''}`.
const CAS_SCRIPT: &str = r#"
local current = redis.call('GET', KEYS[1])
if (current or '') ~= ARGV[1] then
  return {0, current or ''}
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return {1}
"#;

/// A validated `Idempotency-Key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters of UTF-8 text{0}")]
pub struct InvalidKey(&'static str);

impl Key {
    /// Checks a header value: UTF-8, 1 to [`MAX_KEY_CHARS`] characters.
    pub fn parse(raw: &[u8]) -> Result<Key, InvalidKey> {
        let text = std::str::from_utf8(raw).map_err(|_| InvalidKey(" (this one is not UTF-8)"))?;
        match text.chars().count() {
            0 => Err(InvalidKey(" (this one is empty)")),
            n if n > MAX_KEY_CHARS => Err(InvalidKey(" (this one is longer)")),
            _ => Ok(Key(text.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The answer a call gave, replayed to its repeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// A message sent without an answer: it may be in its channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unconfirmed {
    pub channel: String,
    /// The message's id; `None` when the request that sent it is gone.
    pub id: Option<String>,
}

/// What is stored per key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<Owner>,
    /// Receipts of the items published so far, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    done: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unconfirmed: Option<Unconfirmed>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    answer: Option<Answer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Owner {
    token: String,
    /// Unix ms after which the owner counts as gone.
    until_ms: u64,
}

impl Record {
    fn encode(&self) -> String {
        // A struct of strings, numbers and JSON values always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What a request may do with its key.
#[derive(Debug)]
pub enum Claim {
    /// Publish: this request owns the key.
    Publish(Ticket),
    /// Answer this, with `Idempotent-Replayed: true`, and publish nothing.
    Replay(Answer),
}

/// Why a request may not publish under its key.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The key's record could not be read or written; nothing was published.
    #[error("{0}")]
    Unavailable(BrokerError),
    /// An earlier attempt with this key may have published; publishing again could
    /// publish twice.
    #[error("{0}")]
    Unknown(String),
}

/// Ownership of a key, with what earlier attempts left.
#[derive(Debug)]
pub struct Ticket {
    storage: String,
    /// The record as this request wrote it (the compare-and-set's expected value).
    held: String,
    /// Receipts of items earlier attempts published: skip that many items.
    pub done: Vec<serde_json::Value>,
    /// A message an earlier attempt sent without an answer: look for it in history
    /// before publishing the rest.
    pub unconfirmed: Option<Unconfirmed>,
}

enum Backend {
    Memory(Mutex<HashMap<String, (String, Instant)>>),
    Redis {
        client: fred::prelude::Client,
        /// On a Cluster, the record goes to its slot's primary over that primary's own
        /// connection, so a failover elsewhere does not stop keyed publishes.
        shards: Option<Arc<Shards>>,
        cas: Script,
    },
}

/// Runs the compare-and-set script on `storage`.
async fn run_cas(
    client: &fred::prelude::Client,
    shards: Option<&Shards>,
    cas: &Script,
    storage: String,
    args: Vec<Value>,
) -> Result<Value, BrokerError> {
    if let Some(shards) = shards {
        return shards.eval(cas, vec![storage], args, COMMAND_TIMEOUT).await;
    }
    tokio::time::timeout(
        COMMAND_TIMEOUT,
        cas.evalsha_with_reload::<Value, _, _>(client, vec![storage], args),
    )
    .await
    .map_err(|_| BrokerError::Unavailable("Redis did not answer in time".into()))?
    .map_err(|err| BrokerError::Unavailable(err.to_string()))
}

/// The records of every key, in memory or in Redis.
pub struct Idempotency {
    backend: Backend,
    /// How long a record lives: `HERALD_HISTORY_TTL`.
    window: Duration,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Where a call's record lives: the first channel's hash tag, then a hash of every
/// channel of the call and the key (a key reused on other channels is another record).
pub fn storage_key(channels: &[Channel], key: &Key) -> String {
    let mut hasher = Sha256::new();
    for channel in channels {
        hasher.update(channel.name().as_bytes());
        hasher.update(b",");
    }
    hasher.update(b"\n");
    hasher.update(key.as_str().as_bytes());
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let tag = channels.first().map_or("", Channel::name);
    format!("herald:{{{tag}}}:idem:{digest}")
}

impl Idempotency {
    /// Records kept in this process.
    pub fn memory(window: Duration) -> Self {
        Self {
            backend: Backend::Memory(Mutex::new(HashMap::new())),
            window,
        }
    }

    /// Records kept in Redis through `client` (connected by the caller; on a Cluster,
    /// through `shards`).
    pub fn redis(client: fred::prelude::Client, shards: Option<Arc<Shards>>, window: Duration) -> Self {
        Self {
            backend: Backend::Redis {
                client,
                shards,
                cas: Script::from_lua(CAS_SCRIPT),
            },
            window,
        }
    }

    /// Takes the key for a call of `items` items on `channels`, or says what to answer.
    pub async fn claim(&self, channels: &[Channel], key: &Key, items: usize) -> Result<Claim, ClaimError> {
        let storage = storage_key(channels, key);
        let token = new_id();
        let owner_for = OWNER_BASE + OWNER_PER_ITEM.saturating_mul(u32::try_from(items).unwrap_or(u32::MAX));
        let started = Instant::now();
        let mut expected: Option<String> = None;
        loop {
            let mut record = match &expected {
                None => Record::default(),
                Some(current) => serde_json::from_str::<Record>(current).map_err(|_| {
                    ClaimError::Unknown("the record of this Idempotency-Key is unreadable".to_owned())
                })?,
            };
            if let Some(answer) = record.answer {
                return Ok(Claim::Replay(answer));
            }
            if let Some(owner) = &record.owner {
                if unix_ms() >= owner.until_ms {
                    return Err(ClaimError::Unknown(
                        "an earlier request with this Idempotency-Key stopped while publishing, so its \
                         message may have been stored"
                            .to_owned(),
                    ));
                }
                if started.elapsed() >= MAX_WAIT {
                    return Err(ClaimError::Unknown(
                        "an earlier request with this Idempotency-Key is still publishing; retry later with \
                         the same key"
                            .to_owned(),
                    ));
                }
                tokio::time::sleep(POLL).await;
                expected = self.get(&storage).await.map_err(ClaimError::Unavailable)?;
                continue;
            }
            record.owner = Some(Owner {
                token: token.clone(),
                until_ms: unix_ms().saturating_add(millis(owner_for)),
            });
            let held = record.encode();
            let taken = match self.cas(&storage, expected.as_deref(), Some(&held)).await {
                Ok(taken) => taken,
                Err(err) => {
                    // The write may still land (sent, unanswered): undo it when it does,
                    // or the key would look owned by a request that gave up.
                    self.settle_later(storage, held, expected);
                    return Err(ClaimError::Unavailable(err));
                }
            };
            match taken {
                Ok(()) => {
                    return Ok(Claim::Publish(Ticket {
                        storage,
                        held,
                        done: record.done,
                        unconfirmed: record.unconfirmed,
                    }))
                }
                Err(current) => expected = current,
            }
        }
    }

    /// The call is answered: every repeat gets `answer`.
    pub async fn answer(&self, ticket: Ticket, answer: Answer) {
        let record = Record {
            answer: Some(answer),
            ..Record::default()
        };
        self.settle(ticket, Some(record.encode())).await;
    }

    /// The call did not publish everything: keep what was published (`done`) and the
    /// message whose outcome is unknown, so the next attempt goes on from there; with
    /// neither, forget the key.
    pub async fn release(
        &self,
        ticket: Ticket,
        done: Vec<serde_json::Value>,
        unconfirmed: Option<Unconfirmed>,
    ) {
        let next = (!done.is_empty() || unconfirmed.is_some()).then(|| {
            Record {
                owner: None,
                done,
                unconfirmed,
                answer: None,
            }
            .encode()
        });
        self.settle(ticket, next).await;
    }

    /// Replaces the ticket's record with `next`; when Redis cannot take it now, keeps
    /// trying in the background for a while (the record stays owned meanwhile, which
    /// repeats treat as "in progress", then as "unknown": never as free).
    async fn settle(&self, ticket: Ticket, next: Option<String>) {
        if self
            .cas(&ticket.storage, Some(&ticket.held), next.as_deref())
            .await
            .is_err()
        {
            tracing::warn!("saving an Idempotency-Key record failed; retrying in the background");
            self.settle_later(ticket.storage, ticket.held, next);
        }
    }

    /// Sets `storage` from `held` to `next` in the background (Redis only), trying for
    /// a while; gives up when the record holds something else.
    fn settle_later(&self, storage: String, held: String, next: Option<String>) {
        let Backend::Redis { client, shards, cas } = &self.backend else {
            return;
        };
        let client = client.clone();
        let shards = shards.clone();
        let cas = cas.clone();
        let ttl = millis(self.window).to_string();
        // Bounded in time; not tracked, since it only writes a record that may be lost.
        tokio::spawn(async move {
            for _ in 0..SETTLE_RETRIES {
                tokio::time::sleep(SETTLE_INTERVAL).await;
                let args = vec![
                    Value::from(held.clone()),
                    Value::from(next.clone().unwrap_or_default()),
                    Value::from(ttl.clone()),
                ];
                let done = run_cas(&client, shards.as_deref(), &cas, storage.clone(), args).await;
                if done.is_ok() {
                    return;
                }
            }
            tracing::warn!(
                "gave up saving an Idempotency-Key record; repeats of that key answer 503 until it expires"
            );
        });
    }

    async fn get(&self, storage: &str) -> Result<Option<String>, BrokerError> {
        match self.cas(storage, Some("\u{0}"), None).await? {
            Ok(()) => Ok(None),
            Err(current) => Ok(current),
        }
    }

    /// Sets `storage` to `next` (`None`: deletes it) if it holds `expected` (`None`:
    /// absent). `Ok(Err(current))` when it held something else.
    async fn cas(
        &self,
        storage: &str,
        expected: Option<&str>,
        next: Option<&str>,
    ) -> Result<Result<(), Option<String>>, BrokerError> {
        match &self.backend {
            Backend::Memory(records) => {
                let mut records = lock(records);
                let now = Instant::now();
                let current = records
                    .get(storage)
                    .filter(|(_, expires)| *expires > now)
                    .map(|(value, _)| value.clone());
                if current.as_deref() != expected {
                    return Ok(Err(current));
                }
                match next {
                    None => {
                        records.remove(storage);
                    }
                    Some(value) => {
                        if records.len() >= MEMORY_MAX_RECORDS && !records.contains_key(storage) {
                            make_room(&mut records, now);
                        }
                        records.insert(storage.to_owned(), (value.to_owned(), now + self.window));
                    }
                }
                Ok(Ok(()))
            }
            Backend::Redis { client, shards, cas } => {
                use fred::prelude::ClientLike;
                if shards.is_none() && !client.is_connected() {
                    return Err(BrokerError::Unavailable("not connected to Redis".into()));
                }
                let args = vec![
                    Value::from(expected.unwrap_or_default().to_owned()),
                    Value::from(next.unwrap_or_default().to_owned()),
                    Value::from(millis(self.window).to_string()),
                ];
                let reply = run_cas(client, shards.as_deref(), cas, storage.to_owned(), args).await?;
                let Value::Array(parts) = reply else {
                    return Err(BrokerError::Unavailable("unexpected reply from Redis".into()));
                };
                if parts.first().and_then(Value::as_i64) == Some(1) {
                    return Ok(Ok(()));
                }
                let current = parts
                    .get(1)
                    .and_then(Value::as_bytes)
                    .and_then(|bytes| std::str::from_utf8(bytes).ok())
                    .filter(|text| !text.is_empty())
                    .map(str::to_owned);
                Ok(Err(current))
            }
        }
    }
}

/// Drops expired records, then, if still full, the tenth closest to expiry.
fn make_room(records: &mut HashMap<String, (String, Instant)>, now: Instant) {
    records.retain(|_, (_, expires)| *expires > now);
    if records.len() < MEMORY_MAX_RECORDS {
        return;
    }
    let mut expiries: Vec<Instant> = records.values().map(|(_, expires)| *expires).collect();
    let cut = expiries.len() / 10;
    let (_, nth, _) = expiries.select_nth_unstable(cut);
    let cutoff = *nth;
    records.retain(|_, (_, expires)| *expires > cutoff);
}

#[cfg(test)]
mod tests;
