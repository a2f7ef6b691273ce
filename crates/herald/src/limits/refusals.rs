//! Refusal logs, rate-limited: a bad key, a bad origin or a rate limit is logged at
//! most once per second per reason and client IP, with the count of the ones
//! suppressed since the last line (SPEC "Limits against hostile clients"), so a
//! flood or a timing probe cannot flood the logs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

/// How often one reason and client IP may write a line.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Keys kept before the ones quiet for a whole interval are swept.
const SWEEP_AT: usize = 4096;

/// When a (reason, IP) last wrote a line, and how many refusals it swallowed since.
struct Entry {
    logged_at: Instant,
    suppressed: u64,
}

/// The log throttle: which (reason, IP) may write now.
#[derive(Default)]
pub struct RefusalLog {
    entries: Mutex<HashMap<(&'static str, IpAddr), Entry>>,
}

impl RefusalLog {
    /// `Some(suppressed)` when a line may be written now, with the number of refusals
    /// of this reason and IP not logged since the previous line; `None` to stay quiet.
    pub fn admit(&self, reason: &'static str, ip: IpAddr, now: Instant) -> Option<u64> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= SWEEP_AT {
            entries.retain(|_, entry| {
                now.duration_since(entry.logged_at) < REFUSAL_LOG_INTERVAL || entry.suppressed > 0
            });
            if entries.len() >= SWEEP_AT {
                // Many addresses refused within one second: forget the oldest lines'
                // counts rather than grow without bound.
                entries.clear();
            }
        }
        match entries.get_mut(&(reason, ip)) {
            Some(entry) if now.duration_since(entry.logged_at) < REFUSAL_LOG_INTERVAL => {
                entry.suppressed += 1;
                None
            }
            Some(entry) => {
                let suppressed = entry.suppressed;
                entry.logged_at = now;
                entry.suppressed = 0;
                Some(suppressed)
            }
            None => {
                entries.insert(
                    (reason, ip),
                    Entry {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

/// The process's throttle.
fn global() -> &'static RefusalLog {
    static LOG: OnceLock<RefusalLog> = OnceLock::new();
    LOG.get_or_init(RefusalLog::default)
}

/// Logs a refusal as a WARN line, unless this reason and client IP already wrote one
/// within the last second; the next line carries `suppressed`, the count in between.
pub fn refusal_log(reason: &'static str, ip: IpAddr, what: &str) {
    if let Some(suppressed) = global().admit(reason, ip, Instant::now()) {
        tracing::warn!(reason, %ip, suppressed, "{what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_second_per_reason_and_ip_with_the_suppressed_count() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert_eq!(log.admit("bad_key", a, t0), Some(0));
        for _ in 0..5 {
            assert_eq!(log.admit("bad_key", a, t0 + Duration::from_millis(10)), None);
        }
        // Another IP and another reason have their own budget.
        assert_eq!(log.admit("bad_key", b, t0), Some(0));
        assert_eq!(log.admit("bad_origin", a, t0), Some(0));
        assert_eq!(log.admit("bad_key", a, t0 + Duration::from_millis(999)), None);
        assert_eq!(log.admit("bad_key", a, t0 + Duration::from_secs(1)), Some(6));
        assert_eq!(log.admit("bad_key", a, t0 + Duration::from_millis(1500)), None);
        assert_eq!(log.admit("bad_key", a, t0 + Duration::from_millis(2100)), Some(1));
    }

    #[test]
    fn memory_stays_bounded_under_many_addresses() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        for i in 0..20_000u32 {
            log.admit("bad_key", IpAddr::from(i.to_be_bytes()), t0);
        }
        let len = log.entries.lock().map(|e| e.len()).unwrap_or(usize::MAX);
        assert!(len <= SWEEP_AT, "{len} entries kept");
    }
}
