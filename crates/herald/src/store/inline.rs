//! A SQLite file's chat statements, run on the calling thread.
//!
//! sqlx runs a SQLite connection on a thread of its own and hands it each statement
//! over a channel, so every statement is a wake-up of that thread and one of the
//! waiting task, plus a round through the pool (whose return spawns a task). A chat
//! task makes two statements, its history read and its exchange write; in the echo
//! stream benchmark they were about a fifth of herald's CPU per frame
//! (bench/notes.md). This second connection to the same file runs those two on the
//! caller's thread instead: each is tens of microseconds of SQLite's own work (an
//! indexed read; an append to the write-ahead log, not synced under
//! `synchronous = NORMAL`), short enough for a runtime worker.
//!
//! It never checkpoints the log itself (`wal_autocheckpoint = 0`): a checkpoint copies
//! the log into the file and syncs both, which can take milliseconds. Every
//! [`CHECKPOINT_EVERY`] exchanges the sqlx connection, on its own thread, checkpoints
//! instead, with the [`Inline::gate`] closed: the log can only start over once a
//! checkpoint has copied all of it, which never happens while exchanges keep arriving,
//! so they wait for it, as tasks (not as blocked threads).
//!
//! A file only: an in-memory database exists per connection, so there the sqlx
//! connection runs these statements too.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};

use super::ChatTurn;

/// Exchanges between two checkpoints (a few pages each: the log stays well under a
/// megabyte).
const CHECKPOINT_EVERY: u64 = 128;

/// How long a statement waits for another connection's write to finish: not at all,
/// since it would wait on a runtime worker. A statement that finds the file locked
/// (the pool writing a membership or read position, another process, a backup) is
/// answered `None`, and the caller runs it through the pool instead, whose thread may
/// wait.
const BUSY_TIMEOUT: Duration = Duration::ZERO;

/// `None` when SQLite found the file locked by another connection.
fn unless_busy<T>(result: Result<T, rusqlite::Error>) -> Result<Option<T>, rusqlite::Error> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(err)
            if matches!(
                err.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ) =>
        {
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Whether a SQLite URL may get an inline connection: a file opened read-write with no
/// other option (a `vfs`, `immutable` or `cache` setting would have the two connections
/// lock or see the file differently).
pub(super) fn suits(url: &str) -> bool {
    let query = url.split_once('?').map_or("", |(_, query)| query);
    !url.contains(":memory:")
        && query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .all(|pair| pair == "mode=rwc" || pair == "mode=rw")
}

pub(super) const ADD_EXCHANGE: &str =
    "INSERT INTO chat_messages (user_id, chat_id, role, content, created_at) \
     VALUES ($1, $2, 'user', $3, $4), ($5, $6, 'assistant', $7, $8)";

pub(super) const CHAT_TURNS: &str = "SELECT role, content, created_at FROM chat_messages \
     WHERE user_id = $1 AND chat_id = $2 ORDER BY id DESC LIMIT $3";

pub(super) struct Inline {
    conn: Mutex<Connection>,
    exchanges: AtomicU64,
    /// A checkpoint is asked for and not yet done: at most one waits at a time.
    pub(super) checkpointing: AtomicBool,
    /// Held shared by each exchange write, and alone by a checkpoint.
    pub(super) gate: tokio::sync::RwLock<()>,
}

impl Inline {
    /// Opens the file the migrated sqlx pool uses.
    pub(super) fn open(path: &Path) -> Result<Inline, rusqlite::Error> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // The journal mode belongs to the file (the pool set WAL); the sync level and
        // the checkpoints belong to each connection.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(Inline {
            conn: Mutex::new(conn),
            exchanges: AtomicU64::new(0),
            checkpointing: AtomicBool::new(false),
            gate: tokio::sync::RwLock::new(()),
        })
    }

    /// See `Store::add_chat_exchange`, which holds the gate open. Returns whether a
    /// checkpoint is due, or `None` if the file was locked (nothing was written).
    pub(super) fn add_chat_exchange(
        &self,
        user_id: &str,
        chat_id: &str,
        prompt: &str,
        answer: &str,
        now: i64,
    ) -> Result<Option<bool>, rusqlite::Error> {
        let written = {
            // A panic elsewhere while the lock was held cannot leave the connection
            // half way through a statement: each statement below runs to its end.
            let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
            unless_busy(conn.prepare_cached(ADD_EXCHANGE).and_then(|mut statement| {
                statement.execute(params![
                    user_id, chat_id, prompt, now, user_id, chat_id, answer, now
                ])
            }))?
        };
        Ok(written.map(|_| {
            let done = self.exchanges.fetch_add(1, Ordering::Relaxed) + 1;
            done % CHECKPOINT_EVERY == 0
        }))
    }

    /// See `Store::chat_turns`: newest first, as the statement reads them; `None` if the
    /// file was locked.
    pub(super) fn chat_turns_newest_first(
        &self,
        user_id: &str,
        chat_id: &str,
        limit: i64,
    ) -> Result<Option<Vec<ChatTurn>>, rusqlite::Error> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        unless_busy(conn.prepare_cached(CHAT_TURNS).and_then(|mut statement| {
            statement
                .query_map(params![user_id, chat_id, limit], |row| {
                    Ok(ChatTurn {
                        role: row.get(0)?,
                        content: row.get(1)?,
                        created_at: row.get(2)?,
                    })
                })?
                .collect()
        }))
    }
}
