//! The relational store: org memberships, chat history and read state. One code path for
//! SQLite and PostgreSQL through sqlx's `Any` driver, but for the two statements of a
//! chat task on a SQLite file, which run on the caller's thread (`inline`); migrations
//! are embedded per backend and run at start.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Connection, Row};

mod inline;
use inline::Inline;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// A handle to the database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// Whether any read position may be kept: false only while the table was found
    /// empty and no read has been kept or heard of since, so that a deployment that
    /// does not use read state makes no query per handshake for it.
    reads: Arc<AtomicBool>,
    /// A SQLite file's chat statements, on the caller's thread (see `inline`).
    inline: Option<Arc<Inline>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the directory {} of the SQLite file does not exist; create it, or point HERALD_DATABASE_URL at a file in an existing directory", .0.display())]
    MissingDirectory(std::path::PathBuf),
    #[error("no answer within {} s; check the host and port in HERALD_DATABASE_URL", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout,
}

/// How long opening the database may take at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The directory a SQLite URL's file would be created in, when it names a file.
fn sqlite_directory(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let file = rest.split('?').next().unwrap_or(rest);
    if file.is_empty() || file.starts_with(":memory:") {
        return None;
    }
    std::path::Path::new(file)
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(std::path::Path::to_path_buf)
}

/// SQLite's write-ahead log, synced at checkpoints rather than at every commit
/// (`synchronous = NORMAL`). A commit is one append to the log instead of a rollback
/// journal written, synced, applied and deleted (four `fsync`s: most of the CPU the
/// echo stream's 1,000 chat exchanges cost, bench/notes.md). What a commit guarantees:
/// it survives the process crashing or being killed; a power loss or kernel crash may
/// lose the last commits but never corrupts the file. The log lives beside the file
/// (`herald.db-wal`, `herald.db-shm`); back the three up together, or run
/// `PRAGMA wal_checkpoint` first. An in-memory database keeps its own journal mode.
async fn sqlite_pragmas(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    sqlx::query("PRAGMA journal_mode = WAL")
        .execute(&mut *conn)
        .await?;
    sqlx::query("PRAGMA synchronous = NORMAL")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// One row of an org's member list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user_id: String,
    pub role: String,
}

/// One turn of a chat, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// Backend kind, picked from the URL scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of(url: &str) -> Backend {
        if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        }
    }
}

impl Store {
    /// Connects to `url` (`sqlite://file.db`, `sqlite::memory:` or `postgres://…`) and
    /// runs the migrations. A SQLite file is created if missing.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of(url);
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") && !url.contains(":memory:") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_owned(),
        };
        if let Some(dir) = sqlite_directory(&url).filter(|dir| !dir.is_dir()) {
            return Err(StoreError::MissingDirectory(dir));
        }
        let options = AnyConnectOptions::from_str(&url)?;
        // The file a second, inline connection opens once the pool has migrated it.
        let inline_file = match backend {
            Backend::Sqlite if inline::suits(&url) => Some(
                sqlx::sqlite::SqliteConnectOptions::from_str(&url)?
                    .get_filename()
                    .to_owned(),
            ),
            _ => None,
        };
        if backend == Backend::Postgres {
            // One plain connection first: the pool retries until its timeout and then
            // reports only "timed out", hiding "connection refused" or an unknown host.
            use sqlx::{AnyConnection, Connection};
            let probe = tokio::time::timeout(CONNECT_TIMEOUT, AnyConnection::connect_with(&options))
                .await
                .map_err(|_| StoreError::ConnectTimeout)??;
            let _ = probe.close().await;
        }
        let mut pool = AnyPoolOptions::new().acquire_timeout(CONNECT_TIMEOUT);
        pool = match backend {
            // One connection: an in-memory SQLite database exists per connection, and a
            // file database serializes writers anyway.
            Backend::Sqlite => pool
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                // sqlx pings an idle connection before lending it out by default: for
                // SQLite a round trip to the connection's thread before every statement
                // (half of that thread's wake-ups in the echo stream), which can only
                // find out that the thread is gone, and a statement finds that out too.
                .test_before_acquire(false)
                .after_connect(|conn, _| Box::pin(async move { sqlite_pragmas(conn).await })),
            Backend::Postgres => pool.max_connections(16),
        };
        let pool = pool.connect_with(options).await?;
        match backend {
            Backend::Sqlite => migrate_sqlite(&pool).await?,
            // sqlx's migrator holds a PostgreSQL advisory lock (keyed by the database
            // name) while it migrates, also through the Any driver, so nodes starting at
            // once apply each migration once and the others wait, then find it applied.
            Backend::Postgres => {
                let mut conn = pool.acquire().await?;
                POSTGRES_MIGRATIONS.run_direct(&mut *conn).await?;
            }
        }
        let inline = match inline_file {
            Some(file) => Some(Arc::new(Inline::open(&file)?)),
            None => None,
        };
        let store = Store {
            pool,
            reads: Arc::new(AtomicBool::new(false)),
            inline,
        };
        store.recheck_reads().await?;
        Ok(store)
    }

    /// Looks again whether any read position is kept (after this node may have missed
    /// news of one from another node).
    pub async fn recheck_reads(&self) -> Result<(), StoreError> {
        if !self.reads.load(Ordering::Relaxed)
            && sqlx::query("SELECT 1 FROM read_state LIMIT 1")
                .fetch_optional(&self.pool)
                .await?
                .is_some()
        {
            self.reads.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Another node kept a read position.
    pub fn read_kept_elsewhere(&self) {
        self.reads.store(true, Ordering::Relaxed);
    }

    /// A checkpoint of SQLite's write-ahead log, on the pool connection's own thread,
    /// with no exchange being written meanwhile: the inline connection never
    /// checkpoints (see `inline`).
    fn checkpoint_later(&self, inline: &Arc<Inline>) {
        if inline.checkpointing.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.pool.clone();
        let inline = inline.clone();
        tokio::spawn(async move {
            // The connection first, so exchanges wait at the gate only for the
            // checkpoint itself, not for the pool.
            let checkpointed = match pool.acquire().await {
                Ok(mut conn) => {
                    let _closed = inline.gate.write().await;
                    // Its one row read (not `execute`): sqlx's `execute` leaves this
                    // statement unfinished, holding a read of the log, and the log can
                    // never start over.
                    sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                        .fetch_one(&mut *conn)
                        .await
                        .map(drop)
                }
                Err(err) => Err(err),
            };
            inline.checkpointing.store(false, Ordering::Release);
            if let Err(err) = checkpointed {
                tracing::warn!(error = %err, "checkpointing the SQLite log failed; the next one retries");
            }
        });
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Adds `user_id` to `org_id`, or updates the role if already a member.
    pub async fn put_member(&self, org_id: &str, user_id: &str, role: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO org_members (org_id, user_id, role, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (org_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(org_id)
        .bind(user_id)
        .bind(role)
        .bind(unix_now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes a membership. Returns whether there was one.
    pub async fn remove_member(&self, org_id: &str, user_id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM org_members WHERE org_id = $1 AND user_id = $2")
            .bind(org_id)
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn is_member(&self, org_id: &str, user_id: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 FROM org_members WHERE org_id = $1 AND user_id = $2")
            .bind(org_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// An org's members, ordered by user id.
    pub async fn members(&self, org_id: &str) -> Result<Vec<Member>, StoreError> {
        let rows = sqlx::query("SELECT user_id, role FROM org_members WHERE org_id = $1 ORDER BY user_id")
            .bind(org_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Member {
                    user_id: row.try_get("user_id")?,
                    role: row.try_get("role")?,
                })
            })
            .collect()
    }
}

impl Store {
    /// Appends a prompt and its answer to a user's chat, together: one statement, so a
    /// failure leaves no half exchange, and on SQLite (one connection) concurrent
    /// exchanges on one chat do not interleave their turns. One statement rather than a
    /// transaction of two: the pool runs each SQLite statement on its connection's own
    /// thread, so every statement, `BEGIN` and `COMMIT` is a thread wake-up there and
    /// back. On a SQLite file, exchanges that wait together are committed together in
    /// one transaction, a one-row insert a turn (see `inline`).
    pub async fn add_chat_exchange(
        &self,
        user_id: &str,
        chat_id: &str,
        prompt: &str,
        answer: &str,
    ) -> Result<(), StoreError> {
        let now = unix_now_millis();
        if let Some(inline) = &self.inline {
            let exchange = inline::Exchange {
                user_id: user_id.to_owned(),
                chat_id: chat_id.to_owned(),
                prompt: prompt.to_owned(),
                answer: answer.to_owned(),
                now,
            };
            // An error: the committer was dropped before writing it (the runtime is
            // shutting down).
            let written = inline.enqueue(exchange).await.ok().flatten();
            // `None`: locked by another writer, or the write failed; the pool's thread
            // writes it instead (and waits for a lock).
            if let Some(due) = written {
                if due {
                    self.checkpoint_later(inline);
                }
                return Ok(());
            }
        }
        sqlx::query(inline::ADD_EXCHANGE)
            .bind(user_id)
            .bind(chat_id)
            .bind(prompt)
            .bind(now)
            .bind(user_id)
            .bind(chat_id)
            .bind(answer)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The last `limit` turns of a user's chat, oldest first. Another user's chat with
    /// the same id is a different chat.
    pub async fn chat_turns(
        &self,
        user_id: &str,
        chat_id: &str,
        limit: usize,
    ) -> Result<Vec<ChatTurn>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // `None` also when locked by another writer: the pool's thread waits for it.
        let read = match &self.inline {
            Some(inline) => inline.chat_turns_newest_first(user_id, chat_id, limit)?,
            None => None,
        };
        let mut turns = match read {
            Some(turns) => turns,
            None => sqlx::query(inline::CHAT_TURNS)
                .bind(user_id)
                .bind(chat_id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(ChatTurn::from_row)
                .collect::<Result<Vec<_>, sqlx::Error>>()?,
        };
        turns.reverse();
        Ok(turns)
    }
}

/// Runs the SQLite migrations holding the database's write lock for the whole run.
///
/// sqlx's migrator takes no lock on SQLite, so nodes starting together on a fresh file
/// each saw a migration missing, and all but the first failed recording it
/// (`UNIQUE constraint failed: _sqlx_migrations.version`). `BEGIN IMMEDIATE` takes
/// SQLite's reserved lock before reading which migrations are applied: the other
/// starters wait for it (the busy timeout, 5 s by default), then read the migrations as
/// applied and change nothing. The migrator's own transactions become savepoints of
/// this one; SQLite runs schema changes inside a transaction, so a failed run leaves
/// nothing behind.
///
/// `run_direct` is `Migrator::run` on a connection; `run` itself makes the future
/// unusable in `tokio::spawn` (sqlx's "`Acquire` is not general enough").
async fn migrate_sqlite(pool: &AnyPool) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    SQLITE_MIGRATIONS.run_direct(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// A user's read position in one channel: the highest offset marked read, in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPosition {
    pub channel: String,
    pub epoch: String,
    pub offset: u64,
}

impl Store {
    /// Records that `user_id` has read `channel` up to `offset` in `epoch`: kept if it is
    /// higher than the stored offset of the same epoch, or of another epoch (the channel
    /// started a new one; its offsets start again). Returns whether it changed anything:
    /// a lower or equal offset of the same epoch changes nothing.
    pub async fn mark_read(
        &self,
        user_id: &str,
        channel: &str,
        epoch: &str,
        offset: u64,
    ) -> Result<bool, StoreError> {
        self.reads.store(true, Ordering::Relaxed);
        let done = sqlx::query(
            "INSERT INTO read_state (user_id, channel, epoch, read_offset, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (user_id, channel) DO UPDATE SET epoch = excluded.epoch, read_offset = excluded.read_offset, \
             updated_at = excluded.updated_at \
             WHERE read_state.epoch <> excluded.epoch OR read_state.read_offset < excluded.read_offset",
        )
        .bind(user_id)
        .bind(channel)
        .bind(epoch)
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .bind(unix_now())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// `user_id`'s read position in `channel`, if any.
    pub async fn read_position(
        &self,
        user_id: &str,
        channel: &str,
    ) -> Result<Option<ReadPosition>, StoreError> {
        if !self.reads.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT channel, epoch, read_offset FROM read_state WHERE user_id = $1 AND channel = $2",
        )
        .bind(user_id)
        .bind(channel)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(ReadPosition::from_row).transpose()?)
    }

    /// Every read position of `user_id`, ordered by channel.
    pub async fn read_positions(&self, user_id: &str) -> Result<Vec<ReadPosition>, StoreError> {
        if !self.reads.load(Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT channel, epoch, read_offset FROM read_state WHERE user_id = $1 ORDER BY channel",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(ReadPosition::from_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()?)
    }

    /// The orgs `user_id` is a member of (the `database` membership table), ordered.
    pub async fn orgs_of(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT org_id FROM org_members WHERE user_id = $1 ORDER BY org_id")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get("org_id"))
            .collect::<Result<Vec<String>, sqlx::Error>>()?)
    }
}

impl ReadPosition {
    fn from_row(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        let offset: i64 = row.try_get("read_offset")?;
        Ok(Self {
            channel: row.try_get("channel")?,
            epoch: row.try_get("epoch")?,
            offset: u64::try_from(offset).unwrap_or(0),
        })
    }
}

/// One turn of a chat page, with its position in the chat (0 is the first turn).
#[derive(Debug, Clone)]
pub struct IndexedTurn {
    pub index: i64,
    pub turn: ChatTurn,
}

impl Store {
    /// A page of a user's chat: the last `limit` turns whose index is below `before`
    /// (all when `None`), oldest first. Only the page is read from the database.
    pub async fn chat_page(
        &self,
        user_id: &str,
        chat_id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<IndexedTurn>, StoreError> {
        let rows = sqlx::query(
            "SELECT m.role, m.content, m.created_at, p.idx FROM \
             (SELECT id, ROW_NUMBER() OVER (ORDER BY id) - 1 AS idx FROM chat_messages \
              WHERE user_id = $1 AND chat_id = $2) p \
             JOIN chat_messages m ON m.id = p.id WHERE p.idx < $3 ORDER BY p.idx DESC LIMIT $4",
        )
        .bind(user_id)
        .bind(chat_id)
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let mut turns = rows
            .iter()
            .map(|row| {
                Ok(IndexedTurn {
                    index: row.try_get("idx")?,
                    turn: ChatTurn::from_row(row)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        turns.reverse();
        Ok(turns)
    }
}

impl ChatTurn {
    /// A turn from a row with `role`, `content` and `created_at`.
    fn from_row(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            role: row.try_get("role")?,
            content: row.try_get("content")?,
            created_at: row.try_get("created_at")?,
        })
    }
}

fn unix_now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests;
