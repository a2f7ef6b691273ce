//! The SQLite store with its inline chat connection (a file) and without (in memory).

use super::*;

async fn file_store(dir: &tempfile::TempDir) -> Store {
    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
    match Store::connect(&url).await {
        Ok(store) => store,
        Err(err) => panic!("opening {url}: {err}"),
    }
}

/// The contents of a chat's turns, oldest first.
async fn contents(store: &Store, user_id: &str, chat_id: &str) -> Vec<String> {
    store
        .chat_turns(user_id, chat_id, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|turn| turn.content)
        .collect()
}

/// The inline connection every file store has.
fn inline_of(store: &Store) -> &Arc<Inline> {
    match store.inline.as_ref() {
        Some(inline) => inline,
        None => panic!("a file store has an inline connection"),
    }
}

#[tokio::test]
async fn a_file_runs_chat_statements_inline_and_memory_does_not() {
    let dir = tempfile::tempdir().unwrap();
    assert!(file_store(&dir).await.inline.is_some());
    let memory = Store::connect("sqlite::memory:").await.unwrap();
    assert!(memory.inline.is_none());
    // Read-only: nothing to write, and the inline connection would open read-write.
    let url = format!("sqlite://{}?mode=ro", dir.path().join("herald.db").display());
    assert!(Store::connect(&url).await.unwrap().inline.is_none());
}

/// The same answers on both paths: the last turns oldest first, per user and chat, and
/// the pool connection's reads (the chat page API) see the inline connection's writes.
#[tokio::test]
async fn chat_turns_read_back_the_same_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let file = file_store(&dir).await;
    let memory = Store::connect("sqlite::memory:").await.unwrap();
    for store in [&file, &memory] {
        for i in 0..5 {
            store
                .add_chat_exchange("u1", "c1", &format!("q{i}"), &format!("a{i}"))
                .await
                .unwrap();
        }
        store
            .add_chat_exchange("u2", "c1", "other", "answer")
            .await
            .unwrap();
        let turns = store.chat_turns("u1", "c1", 4).await.unwrap();
        let texts: Vec<(&str, &str)> = turns
            .iter()
            .map(|turn| (turn.role.as_str(), turn.content.as_str()))
            .collect();
        assert_eq!(
            texts,
            [
                ("user", "q3"),
                ("assistant", "a3"),
                ("user", "q4"),
                ("assistant", "a4")
            ]
        );
        assert!(turns.iter().all(|turn| turn.created_at > 0));
        assert!(store.chat_turns("u1", "nope", 4).await.unwrap().is_empty());
        let page = store.chat_page("u1", "c1", None, 100).await.unwrap();
        assert_eq!(page.len(), 10);
        assert_eq!(page[9].turn.content, "a4");
        assert_eq!(page[9].index, 9);
    }
}

/// Two connections write one file: the pool's writes (memberships) and the inline
/// exchanges from several threads at once all land, each waiting out the other's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_connections_write_one_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir).await;
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..50 {
                store
                    .add_chat_exchange(&format!("u{w}"), "c", &format!("q{i}"), "a")
                    .await
                    .unwrap();
                store
                    .put_member("org", &format!("u{w}-{i}"), "member")
                    .await
                    .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    for w in 0..4 {
        let page = store.chat_page(&format!("u{w}"), "c", None, 1000).await.unwrap();
        assert_eq!(page.len(), 100);
    }
    assert_eq!(store.members("org").await.unwrap().len(), 200);
}

/// The inline connection never checkpoints the write-ahead log; the pool connection does
/// every `CHECKPOINT_EVERY` exchanges, so the log stops growing. Without those
/// checkpoints this test's log would pass 8 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_checkpointed_off_the_inline_connection() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir).await;
    let answer = "x".repeat(4000);
    let mut largest = 0;
    for i in 0..1000 {
        store
            .add_chat_exchange("u", "c", &format!("q{i}"), &answer)
            .await
            .unwrap();
        if i % 16 == 0 {
            // Let the checkpoint, on the pool's thread, run meanwhile (on a busy
            // server the other worker takes it at once).
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let wal = std::fs::metadata(dir.path().join("herald.db-wal")).map_or(0, |meta| meta.len());
        largest = largest.max(wal);
    }
    assert!(largest > 0, "the database is not in WAL mode");
    assert!(largest < 4 << 20, "the log grew to {largest} bytes");
    assert_eq!(store.chat_page("u", "c", None, 5000).await.unwrap().len(), 2000);
}

/// The inline connection's own commits never checkpoint (`wal_autocheckpoint = 0`): a
/// checkpoint syncs the file, milliseconds on a runtime worker. Its log passes SQLite's
/// default threshold (1,000 pages) here and nothing is copied into the database file;
/// with the default, the file would hold the log's pages (over 4 MB).
#[tokio::test]
async fn the_inline_connection_never_checkpoints_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir).await;
    let inline = inline_of(&store);
    let size = |name: &str| std::fs::metadata(dir.path().join(name)).map_or(0, |meta| meta.len());
    let before = size("herald.db");
    let answer = "x".repeat(16_000);
    for i in 0..400 {
        let exchange = inline::Exchange {
            user_id: "u".to_owned(),
            chat_id: "c".to_owned(),
            prompt: format!("q{i}"),
            answer: answer.clone(),
            now: 1,
        };
        let written = inline.add_chat_exchanges(&[exchange]).unwrap();
        assert!(written.is_some(), "nothing else holds the file");
    }
    assert!(size("herald.db-wal") > 4 << 20, "the log holds every exchange");
    assert!(
        size("herald.db") < before + (1 << 20),
        "the database file grew from {before} to {} bytes: the inline connection checkpointed",
        size("herald.db")
    );
}

/// Takes the file's write lock on another connection (as another process would) and
/// holds it for `held` on a thread of its own; returns once the lock is taken.
fn hold_write_lock(dir: &tempfile::TempDir, held: Duration) -> std::thread::JoinHandle<()> {
    let path = dir.path().join("herald.db");
    let (locked, is_locked) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked.send(()).unwrap();
        std::thread::sleep(held);
        conn.execute_batch("COMMIT").unwrap();
    });
    is_locked.recv().unwrap();
    holder
}

/// The inline connection never waits for a lock on a runtime worker: while another
/// connection holds the file's write lock, the exchange goes through the pool, whose
/// own thread waits for it (without that, the write fails with "database is locked").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_file_sends_the_statement_through_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir).await;
    let holder = hold_write_lock(&dir, Duration::from_millis(300));
    store.add_chat_exchange("u", "c", "q", "a").await.unwrap();
    holder.join().unwrap();
    let turns = store.chat_turns("u", "c", 10).await.unwrap();
    assert_eq!(turns.len(), 2);
}

/// Exchanges that wait together are one transaction: on one runtime thread, every
/// task queues its exchange before the committer runs. Each exchange's two turns stay
/// together and in order.
#[tokio::test(flavor = "current_thread")]
async fn exchanges_waiting_together_are_committed_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir).await;
    let writers: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .add_chat_exchange(&format!("u{}", i % 3), "c", &format!("q{i}"), &format!("a{i}"))
                    .await
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap().unwrap();
    }
    let inline = inline_of(&store);
    assert_eq!(inline.commits.load(Ordering::Relaxed), 1);
    let mut prompts = 0;
    for user in 0..3 {
        let turns = store.chat_turns(&format!("u{user}"), "c", 100).await.unwrap();
        for pair in turns.chunks(2) {
            let (question, answer) = (&pair[0], &pair[1]);
            assert_eq!(
                (question.role.as_str(), answer.role.as_str()),
                ("user", "assistant")
            );
            assert_eq!(question.content.replacen('q', "a", 1), answer.content);
            prompts += 1;
        }
    }
    assert_eq!(prompts, 20);
}

/// A batch that cannot be written on the inline connection is written through the
/// pool, exchange by exchange: here the file is locked by another connection until
/// the committer has found it locked, and every exchange lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_batch_lands_through_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir).await;
    let inline = inline_of(&store).clone();
    let path = dir.path().join("herald.db");
    let (locked, is_locked) = std::sync::mpsc::channel();
    let watched = inline.clone();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked.send(()).unwrap();
        // At most 5 s: then the test fails on its assertion below, not by hanging.
        for _ in 0..1000 {
            if watched.through_pool.load(Ordering::Relaxed) > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        conn.execute_batch("COMMIT").unwrap();
    });
    is_locked.recv().unwrap();
    let writers: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.add_chat_exchange("u", "c", &format!("q{i}"), "a").await })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap().unwrap();
    }
    holder.join().unwrap();
    assert!(
        inline.through_pool.load(Ordering::Relaxed) > 0,
        "the committer never found the file locked"
    );
    assert_eq!(inline.commits.load(Ordering::Relaxed), 0);
    assert_eq!(store.chat_turns("u", "c", 100).await.unwrap().len(), 40);
}

/// An exchange whose answer cannot be written leaves no half of it behind: inside the
/// batch's transaction each turn is its own statement, so what keeps a prompt from
/// landing without its answer is the transaction, rolled back whole; the batch then
/// goes through the pool, where the others land and the failing one is refused.
#[tokio::test(flavor = "current_thread")]
async fn a_batch_failing_part_way_leaves_no_half_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir).await;
    let conn = rusqlite::Connection::open(dir.path().join("herald.db")).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON chat_messages WHEN NEW.content = 'boom' \
         BEGIN SELECT RAISE(ABORT, 'refused'); END;",
    )
    .unwrap();
    drop(conn);
    let writers: Vec<_> = [("q0", "a0"), ("q1", "boom"), ("q2", "a2")]
        .into_iter()
        .map(|(prompt, answer)| {
            let store = store.clone();
            tokio::spawn(async move { store.add_chat_exchange("u", "c", prompt, answer).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for writer in writers {
        outcomes.push(writer.await.unwrap().is_ok());
    }
    assert_eq!(outcomes, [true, false, true]);
    let inline = inline_of(&store);
    assert_eq!(
        inline.commits.load(Ordering::Relaxed),
        0,
        "the batch was not committed"
    );
    assert_eq!(contents(&store, "u", "c").await, ["q0", "a0", "q2", "a2"]);
}

/// While a transaction is left open on the inline connection (a failed rollback), a
/// read goes through the pool and sees only what was committed, not a prompt written
/// there without its answer.
#[tokio::test]
async fn a_read_does_not_see_a_transaction_left_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir).await;
    store.add_chat_exchange("u", "c", "q", "a").await.unwrap();
    let inline = inline_of(&store);
    inline.leave_a_transaction_open();
    inline.write_a_lone_prompt("u", "c", "half");
    assert_eq!(contents(&store, "u", "c").await, ["q", "a"]);
}

/// A transaction left open on the inline connection (a failed rollback) is rolled
/// back before the next batch, which is then written inline.
#[tokio::test]
async fn a_transaction_left_open_is_rolled_back_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(&dir).await;
    let inline = inline_of(&store);
    inline.leave_a_transaction_open();
    store.add_chat_exchange("u", "c", "q", "a").await.unwrap();
    assert_eq!(inline.commits.load(Ordering::Relaxed), 1);
    assert_eq!(inline.through_pool.load(Ordering::Relaxed), 0);
    assert_eq!(store.chat_turns("u", "c", 10).await.unwrap().len(), 2);
}

/// A committer dropped before it takes the queue (its runtime shut down) leaves the
/// queue empty: the exchange waiting on it is told nothing was written, and the next
/// exchange, on another runtime, gets a committer of its own instead of waiting
/// forever behind it.
#[test]
fn a_dropped_committer_does_not_strand_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = first.block_on(file_store(&dir));
    let inline = inline_of(&store).clone();
    let exchange = inline::Exchange {
        user_id: "u".to_owned(),
        chat_id: "c".to_owned(),
        prompt: "q0".to_owned(),
        answer: "a0".to_owned(),
        now: 1,
    };
    // Queued, its committer spawned on the first runtime but never polled there.
    let waiting = {
        let _entered = first.enter();
        inline.enqueue(exchange)
    };
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let told = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(
            matches!(told, Ok(Err(_))),
            "the dropped committer's caller is not told"
        );
        let written = tokio::time::timeout(
            Duration::from_secs(5),
            store.add_chat_exchange("u", "c", "q1", "a1"),
        )
        .await;
        assert!(
            matches!(written, Ok(Ok(()))),
            "the next exchange waited behind a dropped committer"
        );
        assert_eq!(store.chat_turns("u", "c", 10).await.unwrap().len(), 2);
    });
}

#[test]
fn only_a_plain_read_write_file_gets_an_inline_connection() {
    assert!(inline::suits("sqlite://herald.db?mode=rwc"));
    assert!(inline::suits("sqlite:///var/lib/herald/herald.db?mode=rw"));
    assert!(!inline::suits("sqlite::memory:"));
    assert!(!inline::suits("sqlite://herald.db?mode=memory"));
    assert!(!inline::suits("sqlite://herald.db?mode=ro"));
    assert!(!inline::suits("sqlite://herald.db?mode=rwc&vfs=unix-dotfile"));
    assert!(!inline::suits("sqlite://herald.db?immutable=1&mode=rwc"));
    assert!(!inline::suits("sqlite://herald.db?mode=rwc&cache=shared"));
}
