//! Limits that protect a node: concurrent sockets per user, handshakes per client IP,
//! and client messages per socket (the per-socket limiter lives in the session).
//!
//! The per-user count is kept in this process, or with Redis across all nodes
//! ([`shared`]).

pub mod refusals;
pub mod shared;

pub use refusals::refusal_log;

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};

use governor::clock::DefaultClock;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// Concurrent sockets per user (`HERALD_MAX_CONNECTIONS_PER_USER`), all endpoints.
pub struct ConnectionLimits {
    max_per_user: u32,
    /// This node's counts (memory mode).
    counts: Mutex<HashMap<String, u32>>,
    /// Counts across nodes (Redis mode); when set, `counts` is unused.
    shared: Option<shared::SharedCounts>,
}

/// Why a slot was not given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitRefusal {
    /// The user already has the maximum number of sockets open (4429).
    TooMany,
    /// The shared count could not be reached (the client should retry).
    Unavailable(String),
}

/// A held connection slot; dropping it frees the slot.
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    user_id: String,
    /// Counted in Redis (`true`), or on this node alone.
    shared: bool,
    /// The user's open sockets, this one included, when it was admitted.
    pub count: u32,
}

/// The user already has the maximum number of sockets open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyConnections;

impl ConnectionLimits {
    pub fn new(max_per_user: u32) -> Arc<Self> {
        Arc::new(Self {
            max_per_user,
            counts: Mutex::new(HashMap::new()),
            shared: None,
        })
    }

    /// Limits counted across every node sharing `shared`'s Redis.
    pub fn shared(max_per_user: u32, shared: shared::SharedCounts) -> Arc<Self> {
        Arc::new(Self {
            max_per_user,
            counts: Mutex::new(HashMap::new()),
            shared: Some(shared),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, u32>> {
        // Critical sections are single map updates; a poisoned lock is still consistent.
        crate::sync::lock(&self.counts)
    }

    /// Takes a slot for `user_id`, or refuses if the user is at the limit.
    pub async fn acquire(self: &Arc<Self>, user_id: &str) -> Result<ConnectionSlot, LimitRefusal> {
        if let Some(shared) = &self.shared {
            // Boxed: the Redis call's future is ~8 KB, and every handshake's future
            // (moved into a box by the router) would carry it even on one node.
            return match Box::pin(shared.acquire(user_id, self.max_per_user)).await {
                Ok(Some(count)) => Ok(ConnectionSlot {
                    limits: self.clone(),
                    user_id: user_id.to_owned(),
                    shared: true,
                    count,
                }),
                Ok(None) => Err(LimitRefusal::TooMany),
                // On a Cluster the counts live on one primary; while it fails over,
                // the other shards' channels keep accepting sockets (SPEC 8: a partial
                // outage stays partial), counted on this node alone meanwhile.
                Err(err) if shared.on_cluster() => {
                    if let crate::broker::BrokerError::OutcomeUnknown { .. } = err {
                        // The count may have been taken: give it back once the primary
                        // answers, as the socket is counted here instead.
                        shared.release(user_id);
                    }
                    shared.note_degraded(&err.to_string());
                    self.acquire_local(user_id)
                        .map_err(|TooManyConnections| LimitRefusal::TooMany)
                }
                Err(err) => Err(LimitRefusal::Unavailable(err.to_string())),
            };
        }
        self.acquire_local(user_id)
            .map_err(|TooManyConnections| LimitRefusal::TooMany)
    }

    fn acquire_local(self: &Arc<Self>, user_id: &str) -> Result<ConnectionSlot, TooManyConnections> {
        let mut counts = self.lock();
        let count = counts.entry(user_id.to_owned()).or_insert(0);
        if *count >= self.max_per_user {
            return Err(TooManyConnections);
        }
        *count += 1;
        Ok(ConnectionSlot {
            limits: self.clone(),
            user_id: user_id.to_owned(),
            shared: false,
            count: *count,
        })
    }

    /// Whether sockets can be counted: always for local counts; with one Redis, while
    /// its connection is up (a node that cannot count refuses sockets, so it is not
    /// ready); on a Cluster, always (counted locally while the counts' primary is down).
    pub fn ready(&self) -> bool {
        self.shared.as_ref().is_none_or(shared::SharedCounts::ready)
    }

    /// The user's open sockets counted on this node alone.
    pub fn count(&self, user_id: &str) -> u32 {
        self.lock().get(user_id).copied().unwrap_or(0)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(shared) = self.limits.shared.as_ref().filter(|_| self.shared) {
            shared.release(&self.user_id);
            return;
        }
        let mut counts = self.limits.lock();
        if let Some(count) = counts.get_mut(&self.user_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.user_id);
            }
        }
    }
}

/// WebSocket handshakes per client IP, answered with HTTP 429 before the upgrade, so a
/// misbehaving client or a reconnect storm cannot spend the node's CPU on TLS-less
/// token checks and upgrades.
pub struct HandshakeLimiter {
    limiter: Option<RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>>,
}

impl HandshakeLimiter {
    /// `per_second` handshakes per IP on average, in bursts of up to `burst`; 0 turns
    /// the limit off.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst.max(per_second)).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self { limiter }
    }

    /// Whether `ip` may open another socket now.
    pub fn allow(&self, ip: IpAddr) -> bool {
        self.limiter
            .as_ref()
            .is_none_or(|limiter| limiter.check_key(&ip).is_ok())
    }

    /// Forgets IPs whose budget is full again, so the map does not grow forever.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// The per-socket client message limiter (`HERALD_CLIENT_MESSAGES_PER_MINUTE`, with the
/// whole minute's allowance available as a burst).
pub fn client_message_limiter(per_minute: u32) -> governor::DefaultDirectRateLimiter {
    let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct_with_clock(Quota::per_minute(per_minute), shared_clock())
}

/// Protocol pings a socket may send: 10 per second on average, in bursts of 100. They
/// do not count as client messages, but each one queues a pong.
pub fn protocol_ping_limiter() -> governor::DefaultDirectRateLimiter {
    let rate = NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct_with_clock(Quota::per_second(rate).allow_burst(burst), shared_clock())
}

/// Makes the limiters' shared clock now (it calibrates against the TSC, about 10 ms of
/// CPU on a VM), so the first handshake does not pay for it.
pub fn calibrate_clock() {
    let _ = shared_clock();
}

/// The clock of every per-socket limiter, made once. Making a clock
/// (`quanta::Clock::new`) runs CPUID to detect the TSC each time, which traps to the
/// hypervisor on a VM: two limiters per socket made it about a tenth of herald's CPU in
/// the benchmarks' connect phase (BENCHMARKS.md). A clone copies the calibration.
fn shared_clock() -> governor::clock::DefaultClock {
    static CLOCK: std::sync::OnceLock<governor::clock::DefaultClock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(governor::clock::DefaultClock::default).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_freed() {
        let limits = ConnectionLimits::new(2);
        let a = limits.acquire_local("u").unwrap();
        let b = limits.acquire_local("u").unwrap();
        assert_eq!((a.count, b.count), (1, 2));
        assert_eq!(limits.acquire_local("u").err(), Some(TooManyConnections));
        assert!(limits.acquire_local("other").is_ok());
        drop(a);
        assert_eq!(limits.count("u"), 1);
        assert!(limits.acquire_local("u").is_ok());
    }

    #[test]
    fn handshake_limit_per_ip() {
        let limiter = HandshakeLimiter::new(1, 3);
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        assert!((0..3).all(|_| limiter.allow(ip)));
        assert!(!limiter.allow(ip));
        assert!(limiter.allow("127.0.0.10".parse().unwrap()));
        let off = HandshakeLimiter::new(0, 0);
        assert!((0..1000).all(|_| off.allow(ip)));
    }

    #[test]
    fn client_message_burst_is_the_per_minute_allowance() {
        let limiter = client_message_limiter(5);
        assert!((0..5).all(|_| limiter.check().is_ok()));
        assert!(limiter.check().is_err());
    }
}
