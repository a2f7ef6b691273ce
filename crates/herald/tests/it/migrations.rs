//! SPEC §8 "many nodes may start at once": several stores opened together on one fresh
//! database (a SQLite file, and a PostgreSQL database when the server can be reached)
//! all run or see the migrations, and none fails; repeated over several rounds. Also
//! with real `herald serve` processes on one fresh SQLite file.

use std::time::Duration;

use futures_util::future::join_all;
use herald::store::Store;

use crate::members::TestDatabase;
use crate::support::*;

/// Stores opened at once per round.
const AT_ONCE: usize = 8;
/// Fresh databases tried.
const ROUNDS: usize = 5;

/// Opens `AT_ONCE` stores on `url` together; panics with every failure.
async fn open_together(url: &str, round: usize) {
    let opens = (0..AT_ONCE).map(|_| {
        let url = url.to_owned();
        tokio::spawn(async move { Store::connect(&url).await })
    });
    let results = join_all(opens).await;
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|joined| match joined {
            Ok(Ok(_)) => None,
            Ok(Err(err)) => Some(err.to_string()),
            Err(err) => Some(format!("panicked: {err}")),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "round {round}: {} of {AT_ONCE} opens failed: {failures:?}",
        failures.len()
    );
    // The schema is whole: a write and a read work.
    let store = Store::connect(url).await.unwrap();
    store.put_member("acme", "u1", "member").await.unwrap();
    assert!(store.is_member("acme", "u1").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_stores_opened_at_once_on_a_fresh_sqlite_file_all_start() {
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("herald.db").display());
        open_together(&url, round).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_stores_opened_at_once_on_a_fresh_postgres_database_all_start() {
    for round in 0..ROUNDS {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let outcome = std::panic::AssertUnwindSafe(open_together(&db.url, round));
        let outcome = futures_util::FutureExt::catch_unwind(outcome).await;
        db.drop().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_herald_processes_started_together_on_a_fresh_sqlite_file_all_serve() {
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}", dir.path().join("shared.db").display());
        let mut nodes: Vec<Proc> = (0..3)
            .map(|i| {
                let log = std::fs::File::create(dir.path().join(format!("node{i}.log"))).unwrap();
                let mut cmd = herald(dir.path());
                cmd.arg("serve")
                    .env("HERALD_LISTEN", "127.0.0.1:0")
                    .env("HERALD_DATABASE_URL", &db)
                    .env("HERALD_JWT_SECRET", SECRET)
                    .env("HERALD_API_KEYS", API_KEY)
                    .stderr(log);
                Proc::spawn("herald serve", cmd)
            })
            .collect();
        for (i, node) in nodes.iter_mut().enumerate() {
            let log = |dir: &std::path::Path| {
                std::fs::read_to_string(dir.join(format!("node{i}.log"))).unwrap_or_default()
            };
            // The banner comes before the database is opened: a node has started once
            // it answers HTTP.
            let addr = loop {
                let Ok(Some(line)) = tokio::time::timeout(WAIT, node.lines.recv()).await else {
                    panic!("round {round}: node {i} printed no banner:\n{}", log(dir.path()));
                };
                if let Some(rest) = line.strip_prefix("herald listening on ") {
                    break rest.split_whitespace().next().unwrap().to_owned();
                }
            };
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                if let Ok(Some(status)) = node.child.try_wait() {
                    panic!("round {round}: node {i} exited ({status}):\n{}", log(dir.path()));
                }
                let healthy = reqwest::get(format!("{addr}/healthz"))
                    .await
                    .is_ok_and(|response| response.status() == 200);
                if healthy {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "round {round}: node {i} never answered"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for node in nodes {
            node.stop().await;
        }
    }
}
