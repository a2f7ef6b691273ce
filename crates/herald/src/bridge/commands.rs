//! The bridge's Redis commands: its Lua scripts (`bridge/lua/*.lua`), the timeout every
//! command runs under, and the error a failed one reports.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::{ClientLike, Value};
use fred::types::scripts::Script;

use crate::bridge::Bridge;
use crate::redis::COMMAND_TIMEOUT;

/// The bridge's scripts, loaded once.
pub(super) struct Scripts {
    /// KEYS = group keys; ARGV = now (s), group expiry (s), one member per key.
    pub(super) join: Script,
    /// KEYS = group keys; ARGV = one member per key.
    pub(super) leave: Script,
    /// KEYS = queue, in-flight backup; ARGV = most to pop.
    pub(super) pop: Script,
    /// KEYS = queue, in-flight backup.
    pub(super) restore: Script,
    /// KEYS = lease; ARGV = node, TTL (ms).
    pub(super) lease: Script,
    /// KEYS = lease; ARGV = node.
    pub(super) release: Script,
}

impl Scripts {
    pub(super) fn load() -> Self {
        Self {
            join: Script::from_lua(include_str!("lua/join.lua")),
            leave: Script::from_lua(include_str!("lua/leave.lua")),
            pop: Script::from_lua(include_str!("lua/pop.lua")),
            restore: Script::from_lua(include_str!("lua/restore.lua")),
            lease: Script::from_lua(include_str!("lua/lease.lua")),
            release: Script::from_lua(include_str!("lua/release.lua")),
        }
    }
}

/// A Redis command of the bridge that failed; `what` says what it was doing. The bridge
/// logs it and tries again later (see where each is called).
#[derive(Debug, thiserror::Error)]
pub(super) enum CommandError {
    #[error("{what}: not connected to Redis")]
    NotConnected { what: &'static str },
    #[error("{what}: Redis did not answer in time")]
    TimedOut { what: &'static str },
    #[error("{what}: {source}")]
    Failed {
        what: &'static str,
        source: fred::error::Error,
    },
}

/// Runs `future` within [`COMMAND_TIMEOUT`].
pub(super) async fn timed<T>(
    what: &'static str,
    future: impl std::future::Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, CommandError> {
    within(COMMAND_TIMEOUT, what, future).await
}

/// Runs `future` within `timeout`.
pub(super) async fn within<T>(
    timeout: Duration,
    what: &'static str,
    future: impl std::future::Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, CommandError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(CommandError::Failed { what, source }),
        Err(_) => Err(CommandError::TimedOut { what }),
    }
}

/// `member, score, member, score, …` (or `key, member, score` from `BZPOPMIN`) → pairs.
pub(super) fn pairs(values: &[Value]) -> Vec<(Vec<u8>, String)> {
    values
        .chunks_exact(2)
        .filter_map(|pair| {
            let member = pair[0].as_bytes()?.to_vec();
            let score = pair[1].as_string()?;
            Some((member, score))
        })
        .collect()
}

pub(super) fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

impl Bridge {
    /// Runs `script` on the command connection.
    pub(super) async fn eval(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
        what: &'static str,
    ) -> Result<Value, CommandError> {
        if !self.commands.is_connected() {
            return Err(CommandError::NotConnected { what });
        }
        timed(
            what,
            script.evalsha_with_reload::<Value, _, _>(&self.commands, keys, args),
        )
        .await
    }
}
