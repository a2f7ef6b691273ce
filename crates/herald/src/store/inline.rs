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
//! Exchanges that wait together are written together (group commit): the first one
//! queued spawns a committer, which lets the tasks already ready to run queue theirs
//! too (one `yield_now`), then writes the whole queue in one transaction. An
//! exchange alone waits for nothing but that yield. When many answers end at once,
//! SQLite runs one commit, one write of each page touched and one round of file locks
//! for all of them, instead of one each (bench/notes.md).
//!
//! A file only: an in-memory database exists per connection, so there the sqlx
//! connection runs these statements too.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use rusqlite::{params, Connection, OpenFlags};

use super::ChatTurn;
// A poisoned lock is still usable: every statement runs to its end under it, and a
// transaction left open is rolled back before the next one.
use crate::sync::lock;

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

/// One turn, for [`write_in_one_transaction`]: inside a transaction, a statement that
/// writes several rows and may abort part way (a `NOT NULL` column is enough) keeps a
/// statement journal (a copy of every page it changes, so that it alone can be
/// undone), which a one-row insert does not need. The batch's transaction is what
/// makes an exchange's two turns all or nothing there.
const ADD_TURN: &str = "INSERT INTO chat_messages (user_id, chat_id, role, content, created_at) \
     VALUES ($1, $2, $3, $4, $5)";

pub(super) const CHAT_TURNS: &str = "SELECT role, content, created_at FROM chat_messages \
     WHERE user_id = $1 AND chat_id = $2 ORDER BY id DESC LIMIT $3";

/// One prompt and its answer, to be appended to a chat.
pub(super) struct Exchange {
    pub user_id: String,
    pub chat_id: String,
    pub prompt: String,
    pub answer: String,
    /// Unix milliseconds, both turns' `created_at`.
    pub now: i64,
}

/// An exchange waiting for the committer, and where its outcome goes.
struct Queued {
    exchange: Exchange,
    /// What [`Inline::add_chat_exchanges`] answered for the whole batch.
    written: oneshot::Sender<Option<bool>>,
}

pub(super) struct Inline {
    conn: Mutex<Connection>,
    /// Exchanges waiting to be written; the committer takes them all at once.
    queue: Mutex<Vec<Queued>>,
    exchanges: AtomicU64,
    /// Transactions committed by [`Inline::add_chat_exchanges`].
    #[cfg(test)]
    pub(super) commits: AtomicU64,
    /// Batches the committer could not write, sent through the pool.
    #[cfg(test)]
    pub(super) through_pool: AtomicU64,
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
            queue: Mutex::new(Vec::new()),
            exchanges: AtomicU64::new(0),
            #[cfg(test)]
            commits: AtomicU64::new(0),
            #[cfg(test)]
            through_pool: AtomicU64::new(0),
            checkpointing: AtomicBool::new(false),
            gate: tokio::sync::RwLock::new(()),
        })
    }

    /// Queues `exchange` for the committer, spawning one if none is waiting. The
    /// answer is what [`Inline::add_chat_exchanges`] returned for its batch: whether a
    /// checkpoint is due, or `None` if nothing was written (the file was locked, the
    /// write failed, or the runtime is shutting down): the caller then writes it
    /// through the pool.
    pub(super) fn enqueue(self: &Arc<Self>, exchange: Exchange) -> oneshot::Receiver<Option<bool>> {
        let (written, answer) = oneshot::channel();
        let first = {
            let mut queue = lock(&self.queue);
            queue.push(Queued { exchange, written });
            queue.len() == 1
        };
        if first {
            // Spawned rather than run by the first caller: a caller that is dropped
            // while it waits must not leave the others' exchanges unwritten. A caller
            // dropped after queuing still has its exchange written.
            tokio::spawn(self.clone().commit_queued());
        }
        answer
    }

    /// Writes every queued exchange in one transaction, with the gate open.
    ///
    /// Not an `async fn`: the guard is made before the future, so that a committer
    /// dropped before it takes the queue (never polled, or dropped while it waits,
    /// as at runtime shutdown) empties it. Its callers then hear that nothing was
    /// written and go through the pool, and the next exchange queued finds the queue
    /// empty and spawns a committer of its own.
    fn commit_queued(self: Arc<Self>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut unclaimed = Unclaimed(Some(self));
        async move {
            // The tasks already ready to run (answers that ended in the same timer
            // tick, on the same thread) run first and queue their exchanges behind
            // this one.
            tokio::task::yield_now().await;
            let Some(inline) = unclaimed.0.clone() else { return };
            let _open = inline.gate.read().await;
            let batch = std::mem::take(&mut *lock(&inline.queue));
            // Claimed: from here the callers are answered below.
            unclaimed.0.take();
            let (exchanges, senders): (Vec<Exchange>, Vec<_>) = batch
                .into_iter()
                .map(|queued| (queued.exchange, queued.written))
                .unzip();
            let written = match inline.add_chat_exchanges(&exchanges) {
                Ok(written) => written,
                Err(err) => {
                    tracing::warn!(
                        error = %err,
                        exchanges = exchanges.len(),
                        "writing chat exchanges on the inline SQLite connection failed; each goes through the pool"
                    );
                    None
                }
            };
            if written.is_none() {
                #[cfg(test)]
                inline.through_pool.fetch_add(1, Ordering::Relaxed);
            }
            for sender in senders {
                // A caller that went away no longer waits for its answer.
                let _ = sender.send(written);
            }
        }
    }

    /// Appends `batch` in one transaction: all of it or none. An exchange's two turns
    /// are written one after the other under the connection's lock and the file's
    /// write lock (`BEGIN IMMEDIATE`), so concurrent exchanges on one chat never
    /// interleave their turns. Returns whether a checkpoint is due, or `None` if the
    /// file was locked (nothing was written). Callers hold the gate open.
    pub(super) fn add_chat_exchanges(&self, batch: &[Exchange]) -> Result<Option<bool>, rusqlite::Error> {
        let written = {
            // A transaction left open (a failed rollback, a panic while the lock was
            // held) is rolled back before the next one begins.
            let conn = lock(&self.conn);
            unless_busy(write_in_one_transaction(&conn, batch))?
        };
        Ok(written.map(|()| {
            #[cfg(test)]
            self.commits.fetch_add(1, Ordering::Relaxed);
            let n = batch.len() as u64;
            let before = self.exchanges.fetch_add(n, Ordering::Relaxed);
            (before + n) / CHECKPOINT_EVERY != before / CHECKPOINT_EVERY
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
        let conn = lock(&self.conn);
        // A transaction left open (a failed rollback) may hold a batch's rows, even an
        // exchange's prompt without its answer: read what is committed, on the pool.
        if !conn.is_autocommit() {
            return Ok(None);
        }
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

/// `BEGIN IMMEDIATE` (the write lock, or busy at once), each exchange, `COMMIT`; on any
/// failure after `BEGIN`, `ROLLBACK`. A transaction found open is rolled back first.
fn write_in_one_transaction(conn: &Connection, batch: &[Exchange]) -> Result<(), rusqlite::Error> {
    if !conn.is_autocommit() {
        conn.execute_batch("ROLLBACK")?;
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let written = conn
        .prepare_cached(ADD_TURN)
        .and_then(|mut statement| {
            batch.iter().try_for_each(|e| {
                statement.execute(params![e.user_id, e.chat_id, "user", e.prompt, e.now])?;
                statement.execute(params![e.user_id, e.chat_id, "assistant", e.answer, e.now])?;
                Ok(())
            })
        })
        .and_then(|()| conn.execute_batch("COMMIT"));
    if written.is_err() {
        // Nothing to roll back if SQLite already ended the transaction itself.
        let _ = conn.execute_batch("ROLLBACK");
    }
    written
}

/// Empties the queue when the committer holding it is dropped before taking it.
struct Unclaimed(Option<Arc<Inline>>);

impl Drop for Unclaimed {
    fn drop(&mut self) {
        if let Some(inline) = self.0.take() {
            // Dropping the senders tells each caller that nothing was written.
            drop(std::mem::take(&mut *lock(&inline.queue)));
        }
    }
}

#[cfg(test)]
impl Inline {
    /// Leaves a transaction open on the inline connection, as a failed rollback would.
    pub(super) fn leave_a_transaction_open(&self) {
        let conn = lock(&self.conn);
        if let Err(err) = conn.execute_batch("BEGIN") {
            panic!("BEGIN: {err}");
        }
    }

    /// Writes `user_id`'s prompt alone in the transaction left open, as a batch that
    /// failed between an exchange's two turns and then failed to roll back would.
    pub(super) fn write_a_lone_prompt(&self, user_id: &str, chat_id: &str, prompt: &str) {
        let conn = lock(&self.conn);
        if let Err(err) = conn.execute(ADD_TURN, params![user_id, chat_id, "user", prompt, 0]) {
            panic!("a lone prompt: {err}");
        }
    }
}
