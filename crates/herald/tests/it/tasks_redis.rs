//! Issue 6, the shared task queue: tasks submitted on one node run on another node's
//! workers or on `herald worker` processes, status and cancel work from any node, a
//! worker killed with SIGKILL mid-task has its task finished by another worker with a
//! continuous stream, a task whose workers keep dying fails cleanly, and a worker that
//! is stopped hands its task back. Issue 14 (SPEC §8, §10): a dead worker's 25 tasks are
//! taken over together within the claim timeout + 10 s; a task taken over twice goes
//! on from everything sent, also what a dead worker never recorded; a sampling model's
//! different answer restarts visibly. A claim renewal landing between a task's recorded
//! end and its final status does not stop that status, and a worker dying there leaves
//! it to the worker that takes its entry over; a task whose stream already told the
//! user it failed is ended so by that worker, never run again; a queued task's cancel
//! whose node died before its status is announced by a worker.
//!
//! Each test starts its own `redis-server` (see `redis.rs`). Workers that must die are
//! real `herald worker` processes, started with `task_claim_idle_ms = 1500` so a dead
//! worker's task is taken over quickly.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::chat::{generate, user_get, user_post, TaskStream};
use crate::llm::{finish_chunk, role_chunk, text_chunk, usage_chunk, FakeLlm, Reply, DONE, KEY};
use crate::redis::{user, Redis};
use crate::support::*;

/// How long a dead worker's task waits before another worker takes it (the TOML key).
const CLAIM_IDLE_MS: u64 = 1500;

/// A node that submits tasks but runs none.
async fn submitting_node(redis: &Redis) -> TestServer {
    TestServer::builder()
        .env("HERALD_REDIS_URL", redis.url())
        .env("HERALD_WORKERS", "0")
        .spawn()
        .await
}

/// A `herald worker` process on `redis`, with its config file in `dir`.
fn worker(dir: &Path, redis: &Redis, drain_seconds: u64) -> Proc {
    worker_with_claim_idle(dir, redis, drain_seconds, CLAIM_IDLE_MS)
}

fn worker_with_claim_idle(dir: &Path, redis: &Redis, drain_seconds: u64, claim_idle_ms: u64) -> Proc {
    worker_with(dir, redis, drain_seconds, claim_idle_ms, &[])
}

fn worker_with(
    dir: &Path,
    redis: &Redis,
    drain_seconds: u64,
    claim_idle_ms: u64,
    env: &[(&str, &str)],
) -> Proc {
    let config = dir.join(format!("herald-{claim_idle_ms}.toml"));
    std::fs::write(&config, format!("task_claim_idle_ms = {claim_idle_ms}\n")).unwrap();
    let mut cmd = herald(dir);
    cmd.args(["--config", config.to_str().unwrap(), "worker"])
        .env("HERALD_REDIS_URL", redis.url())
        .env("HERALD_SHUTDOWN_DRAIN", drain_seconds.to_string())
        .env("HERALD_LOG", "warn");
    for (key, value) in env {
        cmd.env(key, value);
    }
    Proc::spawn("herald worker", cmd)
}

/// Reads `ws` until `n` more streaming frames of `task_id` arrived; returns every
/// message of that task read on the way.
async fn read_frames(ws: &mut WsClient, task_id: &str, n: usize) -> Vec<Value> {
    let mut messages = Vec::new();
    let mut frames = 0;
    while frames < n {
        let message = ws.next_json().await;
        if message["task_id"] != task_id {
            continue;
        }
        assert_ne!(message["type"], "llm_error", "{message}");
        if message["type"] == "llm_frame" && message["frame"]["status"] == "streaming" {
            frames += 1;
        }
        messages.push(message);
    }
    messages
}

fn words(n: usize) -> String {
    (0..n).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ")
}

#[track_caller]
fn assert_continuous(stream: &TaskStream) {
    let indices = stream.indices();
    assert_eq!(
        indices,
        (0..indices.len() as u64).collect::<Vec<_>>(),
        "frame indexes go on without a gap or a repeat"
    );
}

async fn task_status(srv: &TestServer, user: &str, task_id: &str) -> Value {
    let (status, task) = user_get(srv, &format!("/api/chat/tasks/{task_id}"), &srv.token(user)).await;
    assert_eq!(status, 200, "{task}");
    task
}

#[tokio::test]
async fn a_task_submitted_on_one_node_runs_on_another_and_any_node_reports_and_cancels_it() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let a = submitting_node(&redis).await;
    let b = redis.node().await;
    let user = user("cross");
    let (mut ws, _) = a.connect(&format!("/ws/frame-stream/{user}/"), &user).await;

    let task_id = generate(&a, &user, "c", "hello from node a").await;
    let stream = TaskStream::read(&mut ws, &task_id).await;
    stream.assert_completed_order();
    assert_continuous(&stream);
    assert_eq!(stream.text(), "Echo: hello from node a");
    for srv in [&a, &b] {
        let task = task_status(srv, &user, &task_id).await;
        assert_eq!(
            (task["status"].as_str(), task["response"].as_str()),
            (Some("completed"), Some("Echo: hello from node a"))
        );
    }
    // Only the task's user sees it, on every node.
    let (status, _) = user_get(
        &b,
        &format!("/api/chat/tasks/{task_id}"),
        &b.token("someone-else"),
    )
    .await;
    assert_eq!(status, 404);

    // Cancelled on node a while node b's worker runs it.
    let long = generate(&a, &user, "c", &words(400)).await;
    read_frames(&mut ws, &long, 3).await;
    let (status, body) = user_post(
        &a,
        &format!("/api/chat/tasks/{long}/cancel"),
        &a.token(&user),
        json!({}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let rest = TaskStream::read(&mut ws, &long).await;
    assert_eq!(rest.messages.last().unwrap()["status"], "cancelled");
    assert!(rest.find("llm_response").is_none());
    assert_eq!(task_status(&b, &user, &long).await["status"], "cancelled");

    // With no worker anywhere a task waits, queued; a cancel ends it at once.
    b.stop().await.unwrap();
    let queued = generate(&a, &user, "c", "nobody runs this").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(task_status(&a, &user, &queued).await["status"], "queued");
    let (status, _) = user_post(
        &a,
        &format!("/api/chat/tasks/{queued}/cancel"),
        &a.token(&user),
        json!({}),
    )
    .await;
    assert_eq!(status, 202);
    let ended = TaskStream::read(&mut ws, &queued).await;
    assert_eq!(ended.messages.len(), 1, "{:?}", ended.messages);
    assert_eq!(ended.messages[0]["status"], "cancelled");
    assert_eq!(task_status(&a, &user, &queued).await["status"], "cancelled");

    // The 3-in-flight limit counts queued tasks across nodes.
    let c = submitting_node(&redis).await;
    for _ in 0..3 {
        generate(&a, &user, "c", "waits").await;
    }
    let (status, body) = user_post(
        &c,
        "/api/chat/generate-response/",
        &c.token(&user),
        json!({"user_id": user, "chat_id": "c", "prompt": "a fourth"}),
    )
    .await;
    assert_eq!(status, 429, "{body}");
}

#[tokio::test]
async fn a_worker_killed_mid_task_has_its_task_finished_by_another_without_a_gap_or_a_repeat() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = submitting_node(&redis).await;
    let user = user("kill");
    let (mut ws, _) = a.connect(&format!("/ws/frame-stream/{user}/"), &user).await;
    let first = worker(dir.path(), &redis, 1);

    let prompt = words(150);
    let task_id = generate(&a, &user, "c", &prompt).await;
    let mut messages = read_frames(&mut ws, &task_id, 20).await;
    first.stop().await; // SIGKILL: no drain, no hand-back
    let _second = worker(dir.path(), &redis, 1);
    messages.extend(TaskStream::read(&mut ws, &task_id).await.messages);
    let stream = TaskStream { messages };

    stream.assert_completed_order();
    assert_continuous(&stream);
    let expected = format!("Echo: {prompt}");
    assert_eq!(stream.text(), expected, "no text lost or sent twice");
    assert_eq!(
        stream.find("llm_response").unwrap()["data"]["response"],
        expected.as_str()
    );
    let task = task_status(&a, &user, &task_id).await;
    assert_eq!(task["status"], "completed");
    assert_eq!(task["response"], expected.as_str());
}

#[tokio::test]
async fn a_task_whose_workers_keep_dying_fails_cleanly_after_three_attempts() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = submitting_node(&redis).await;
    let user = user("dying");
    let (mut ws, _) = a.connect(&format!("/ws/frame-stream/{user}/"), &user).await;

    let task_id = generate(&a, &user, "c", &words(400)).await;
    let mut messages = Vec::new();
    for attempt in 1..=3 {
        let doomed = worker(dir.path(), &redis, 1);
        // Each attempt gets further before it dies.
        messages.extend(read_frames(&mut ws, &task_id, 5).await);
        doomed.stop().await;
        eprintln!("attempt {attempt} killed");
    }
    let _last = worker(dir.path(), &redis, 1);
    messages.extend(TaskStream::read(&mut ws, &task_id).await.messages);
    let stream = TaskStream { messages };
    assert_continuous(&stream);
    let error = stream.find("llm_error").expect("the stream ends with llm_error");
    assert_eq!(
        error["error"],
        "LLM processing failed: the task was interrupted 3 times and was given up"
    );
    assert_eq!(stream.messages.last().unwrap()["status"], "failed");
    assert_eq!(task_status(&a, &user, &task_id).await["status"], "failed");
}

#[tokio::test]
async fn a_stopped_worker_hands_its_task_back_at_the_end_of_the_drain() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = submitting_node(&redis).await;
    let user = user("handback");
    let (mut ws, _) = a.connect(&format!("/ws/frame-stream/{user}/"), &user).await;
    // A claim timeout longer than the test: only a hand-back lets the second worker in.
    let mut first = worker_with_claim_idle(dir.path(), &redis, 1, 120_000);

    let prompt = words(300);
    let task_id = generate(&a, &user, "c", &prompt).await;
    let mut messages = read_frames(&mut ws, &task_id, 10).await;
    let _second = worker_with_claim_idle(dir.path(), &redis, 1, 120_000);
    let pid = first.child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    // The drain (1 s) ends before the answer (6 s): the task goes back to the queue, and
    // the second worker takes it at once (a handed-back task needs no claim timeout).
    let exited = tokio::time::timeout(WAIT, first.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exited.success(), "herald worker exits 0 after SIGTERM: {exited}");
    messages.extend(TaskStream::read(&mut ws, &task_id).await.messages);
    let stream = TaskStream { messages };
    stream.assert_completed_order();
    assert_continuous(&stream);
    assert_eq!(stream.text(), format!("Echo: {prompt}"));
}

#[tokio::test]
async fn herald_worker_without_redis_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(WAIT, herald(dir.path()).arg("worker").output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HERALD_REDIS_URL"), "{stderr}");
}

#[tokio::test]
async fn the_queue_works_again_after_redis_restarts_empty() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    if !redis.owned() {
        crate::redis::skip_shared_redis(None);
        return;
    }
    let node = redis.node().await;
    let user = user("restart");
    let path = format!("/ws/frame-stream/{user}/");
    let (mut ws, _) = node.connect(&path, &user).await;
    let before = generate(&node, &user, "c", "before").await;
    assert_eq!(TaskStream::read(&mut ws, &before).await.text(), "Echo: before");

    redis.kill().await;
    crate::redis::wait_ready(&node, false).await;
    let (status, body) = user_post(
        &node,
        "/api/chat/generate-response/",
        &node.token(&user),
        json!({"user_id": user, "chat_id": "c", "prompt": "while down"}),
    )
    .await;
    assert_eq!(status, 503, "never a false 202: {body}");
    let (status, _) = user_get(&node, &format!("/api/chat/tasks/{before}"), &node.token(&user)).await;
    assert_eq!(status, 503);

    // Redis comes back with nothing: no stream, no consumer group. The queue makes
    // them again and tasks run.
    redis.restart().await;
    crate::redis::wait_ready(&node, true).await;
    let (mut ws, _) = node.connect(&path, &user).await;
    let after = generate(&node, &user, "c", "after").await;
    let stream = TaskStream::read(&mut ws, &after).await;
    stream.assert_completed_order();
    assert_eq!(stream.text(), "Echo: after");
}

/// Reads `ws` until `tasks` final statuses arrived, sending each message of those tasks
/// with the time it arrived.
fn read_until_done(
    mut ws: WsClient,
    tasks: usize,
    out: tokio::sync::mpsc::UnboundedSender<(Value, Instant)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ended = 0;
        while ended < tasks {
            let message = ws.next_json().await;
            if message["type"] == "llm_status"
                && matches!(
                    message["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                )
            {
                ended += 1;
            }
            if out.send((message, Instant::now())).is_err() {
                return;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_25_tasks_are_taken_over_together_within_the_claim_timeout_plus_10_s() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = submitting_node(&redis).await;
    const TASKS: usize = 25;
    // Three tasks in flight per user: nine users hold the 25.
    let users: Vec<String> = (0..TASKS.div_ceil(3))
        .map(|i| user(&format!("batch{i}")))
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = Vec::new();
    let mut owners = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let (ws, _) = a.connect(&format!("/ws/frame-stream/{user}/"), user).await;
        let tasks = (TASKS - 3 * i).min(3);
        readers.push(read_until_done(ws, tasks, tx.clone()));
        owners.extend(std::iter::repeat_n(user.clone(), tasks));
    }
    drop(tx);
    let first = worker(dir.path(), &redis, 1);
    // 200 words at the echo provider's 20 ms: 4 s per answer.
    let prompt = words(200);
    let mut streams: HashMap<String, Vec<Value>> = HashMap::new();
    for owner in &owners {
        let task_id = generate(&a, owner, "c", &prompt).await;
        streams.insert(task_id, Vec::new());
    }
    // Every task is running on the first worker (a few frames out) before it dies.
    let frames = |messages: &Vec<Value>| {
        messages
            .iter()
            .filter(|m| m["type"] == "llm_frame" && m["frame"]["status"] == "streaming")
            .count()
    };
    while streams.values().any(|messages| frames(messages) < 3) {
        let (message, _) = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
        let task_id = message["task_id"].as_str().unwrap().to_owned();
        streams.get_mut(&task_id).unwrap().push(message);
    }
    first.stop().await; // SIGKILL: its 25 tasks are orphaned
    let killed = Instant::now();
    let _second = worker(dir.path(), &redis, 1);

    let mut first_after_kill: HashMap<String, Instant> = HashMap::new();
    let mut last_end = killed;
    let budget = Duration::from_millis(CLAIM_IDLE_MS) + Duration::from_secs(10);
    while let Some((message, at)) = tokio::time::timeout(budget + WAIT, rx.recv()).await.unwrap() {
        let task_id = message["task_id"].as_str().unwrap().to_owned();
        // Messages in flight at the kill are the first worker's.
        if at > killed + Duration::from_millis(300) {
            first_after_kill.entry(task_id.clone()).or_insert(at);
        }
        if message["type"] == "llm_status" && message["status"] == "completed" {
            last_end = last_end.max(at);
        }
        streams.get_mut(&task_id).unwrap().push(message);
    }
    for reader in readers {
        reader.await.unwrap();
    }

    let expected = format!("Echo: {prompt}");
    for (task_id, messages) in streams {
        let stream = TaskStream { messages };
        stream.assert_completed_order();
        assert_continuous(&stream);
        assert_eq!(
            stream.text(),
            expected,
            "task {task_id}: no text lost or sent twice"
        );
        assert_eq!(
            stream.find("llm_response").unwrap()["data"]["response"],
            expected.as_str()
        );
    }
    let taken_over: Vec<Duration> = first_after_kill.values().map(|at| *at - killed).collect();
    let latest_takeover = taken_over.iter().max().copied().unwrap_or_default();
    let finished = last_end - killed;
    eprintln!(
        "{TASKS} orphaned tasks: taken over by {latest_takeover:?} after the kill, all completed by {finished:?} (claim timeout {CLAIM_IDLE_MS} ms)"
    );
    assert_eq!(taken_over.len(), TASKS, "every task went on after the kill");
    // Taken together: one task per second would spread the takeover over 25 s.
    assert!(
        latest_takeover <= Duration::from_millis(CLAIM_IDLE_MS) + Duration::from_secs(4),
        "the last task was taken over {latest_takeover:?} after the kill"
    );
    assert!(
        finished <= budget,
        "the 25 tasks completed {finished:?} after the kill, over the claim timeout + 10 s"
    );
}

/// A task's end is recorded before its final `llm_status` goes out. A claim renewal
/// that lands in between (or, since session 16, between the status and the entry's
/// acknowledgement) must not take the task for lost: that dropped `llm_status
/// completed`, and the user waited for an end that never came.
/// Renewals every 30 ms (the shortest claim timeout) and 240 short tasks put many of
/// them in that window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_sends_its_final_status_even_when_a_claim_renewal_lands_after_its_recorded_end() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = submitting_node(&redis).await;
    let _worker = worker_with_claim_idle(dir.path(), &redis, 1, 300);
    const USERS: usize = 8;
    const ROUNDS: usize = 10;
    let mut sockets = Vec::new();
    for i in 0..USERS {
        let user = user(&format!("end{i}"));
        let (ws, _) = node.connect(&format!("/ws/frame-stream/{user}/"), &user).await;
        sockets.push((user, ws));
    }
    for _ in 0..ROUNDS {
        // Three tasks per user (the limit), all users at once, so ends overlap.
        let mut tasks = Vec::new();
        for (user, _) in &sockets {
            for _ in 0..3 {
                tasks.push((user.clone(), generate(&node, user, "c", "hi").await));
            }
        }
        for (i, (user, ws)) in sockets.iter_mut().enumerate() {
            let mut streams: HashMap<&str, TaskStream> = tasks[3 * i..3 * i + 3]
                .iter()
                .map(|(_, task_id)| (task_id.as_str(), TaskStream { messages: Vec::new() }))
                .collect();
            // Short answers: 5 s without an end is an end that never comes.
            let deadline = Instant::now() + Duration::from_secs(5);
            while streams.values().any(|stream| !stream.ended()) {
                let Ok(message) = tokio::time::timeout_at(deadline, ws.next_json()).await else {
                    let open: Vec<_> = streams
                        .iter()
                        .filter(|(_, stream)| !stream.ended())
                        .map(|(task_id, stream)| (task_id, stream.shape()))
                        .collect();
                    panic!("{user}: no final status within 5 s: {open:?}");
                };
                if let Some(stream) = message["task_id"].as_str().and_then(|id| streams.get_mut(id)) {
                    stream.messages.push(message);
                }
            }
            for stream in streams.values() {
                stream.assert_completed_order();
                assert_eq!(stream.text(), "Echo: hi");
            }
        }
    }
}

/// `lua/heartbeat.lua` on a real Redis, one entry per case: a claim this worker holds
/// (1), one with a cancel asked (2), one another worker took over (0), tasks this worker
/// ended, their final status out and entry acknowledged (3, not lost), a task another
/// worker ended (0), an entry no longer pending whose task still runs here (0), and one
/// whose record is gone (0).
#[tokio::test]
async fn the_claim_renewal_tells_a_task_this_worker_ended_from_one_another_worker_took() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    if !redis.owned() {
        // It writes the queue's own keys.
        crate::redis::skip_shared_redis(None);
        return;
    }
    const SCRIPT: &str = include_str!("../../src/tasks/redis/lua/heartbeat.lua");
    let (queue, group) = ("herald:{tasks}:queue", "herald-workers");
    redis
        .cli(&["XGROUP", "CREATE", queue, group, "$", "MKSTREAM"])
        .await;
    // (task, its record's status ("" for no record), its worker, cancel flag, whether
    // the entry is acknowledged, the expected code)
    let cases = [
        ("owned", "running", "me", "", false, "1"),
        ("cancel", "running", "me", "1", false, "2"),
        ("taken", "running", "other", "", false, "0"),
        ("completed-here", "completed", "me", "", true, "3"),
        ("failed-here", "failed", "me", "", true, "3"),
        ("cancelled-here", "cancelled", "me", "", true, "3"),
        ("ended-there", "completed", "other", "", true, "0"),
        ("acked-running", "running", "me", "", true, "0"),
        ("no-record", "", "me", "", true, "0"),
    ];
    let mut args = vec![group.to_owned(), "me".to_owned(), "task:".to_owned()];
    for (task, status, worker, cancel, acked, _) in cases {
        let entry = redis.cli(&["XADD", queue, "*", "task", task]).await;
        // The entry is read by the worker that holds it, and acknowledged when asked.
        let read = [
            "XREADGROUP",
            "GROUP",
            group,
            worker,
            "COUNT",
            "1",
            "STREAMS",
            queue,
            ">",
        ];
        redis.cli(&read).await;
        if acked {
            redis.cli(&["XACK", queue, group, &entry]).await;
        }
        if !status.is_empty() {
            let key = format!("task:{task}");
            let record = ["HSET", &key, "status", status, "worker", worker, "cancel", cancel];
            redis.cli(&record).await;
        }
        args.extend([entry, task.to_owned()]);
    }
    let mut eval = vec!["EVAL", SCRIPT, "1", queue];
    eval.extend(args.iter().map(String::as_str));
    let codes = redis.cli(&eval).await;
    let expected: Vec<&str> = cases.iter().map(|case| case.5).collect();
    assert_eq!(codes.lines().collect::<Vec<_>>(), expected, "codes for {cases:?}");
}

const QUEUE: &str = "herald:{tasks}:queue";
const GROUP: &str = "herald-workers";

/// Plays a worker of the shared queue that dies part way through a task, with the
/// queue's own scripts: it takes the task's entry (`start.lua`), sends messages as a
/// worker would, and may record the end (`end.lua`).
struct DeadWorker<'a> {
    redis: &'a Redis,
    node: &'a TestServer,
    user: &'a str,
    task_id: String,
    entry: String,
}

/// A Redis of the test's own with the workers' consumer group (made as a worker's
/// consumer makes it), a directory for worker configs, and a node that runs no tasks;
/// `None` on a shared Redis, whose queue [`DeadWorker`] must not read.
async fn for_dead_workers() -> Option<(Redis, tempfile::TempDir, TestServer)> {
    let redis = Redis::start().await?;
    if !redis.owned() {
        crate::redis::skip_shared_redis(None);
        return None;
    }
    redis
        .cli(&["XGROUP", "CREATE", QUEUE, GROUP, "0", "MKSTREAM"])
        .await;
    let node = submitting_node(&redis).await;
    Some((redis, tempfile::tempdir().unwrap(), node))
}

impl<'a> DeadWorker<'a> {
    const NAME: &'static str = "dead-worker";

    /// Reads the next entry, which must be `task_id`'s, and starts it.
    async fn take(redis: &'a Redis, node: &'a TestServer, user: &'a str, task_id: &str) -> Self {
        let read = [
            "XREADGROUP",
            "GROUP",
            GROUP,
            Self::NAME,
            "COUNT",
            "1",
            "STREAMS",
            QUEUE,
            ">",
        ];
        let read = redis.cli(&read).await;
        assert!(read.contains(task_id), "{read}");
        let entry = read
            .lines()
            .find(|line| line.split('-').count() == 2 && line.split('-').all(|n| n.parse::<u64>().is_ok()))
            .unwrap_or_else(|| panic!("no entry read: {read}"))
            .to_owned();
        let worker = Self {
            redis,
            node,
            user,
            task_id: task_id.to_owned(),
            entry,
        };
        let (task, text) = (worker.key("task"), worker.key("text"));
        let start = [
            "EVAL",
            include_str!("../../src/tasks/redis/lua/start.lua"),
            "4",
            &task,
            "herald:{tasks}:queued",
            QUEUE,
            &text,
            GROUP,
            &worker.entry,
            Self::NAME,
            "3",
        ];
        let started = redis.cli(&start).await;
        assert!(started.starts_with("run"), "{started}");
        worker
    }

    fn key(&self, kind: &str) -> String {
        let id = match kind {
            "user" | "ended" => self.user,
            _ => &self.task_id,
        };
        format!("herald:{{tasks}}:{kind}:{id}")
    }

    /// Publishes one message of the task to the user's frame stream.
    async fn send(&self, mut message: Value) {
        message["chat_id"] = json!("c");
        message["task_id"] = json!(self.task_id);
        let (status, body) = self
            .node
            .post(&format!("/api/v1/frame-stream/{}", self.user), message)
            .await;
        assert_eq!(status, 202, "{body}");
    }

    /// `hand_back.lua`, as a worker stopping at the end of its drain window.
    async fn hand_back(&self) {
        assert_eq!(self.hand_back_answer().await, "1");
    }

    /// What `hand_back.lua` answers: 1 when it handed the task back.
    async fn hand_back_answer(&self) -> String {
        let task = self.key("task");
        let hand_back = [
            "EVAL",
            include_str!("../../src/tasks/redis/lua/hand_back.lua"),
            "3",
            &task,
            QUEUE,
            "herald:{tasks}:queued",
            GROUP,
            &self.entry,
            Self::NAME,
        ];
        self.redis.cli(&hand_back).await
    }

    async fn record_completed(&self, answer: &str) {
        let (task, user, text, ended) = (
            self.key("task"),
            self.key("user"),
            self.key("text"),
            self.key("ended"),
        );
        let end = [
            "EVAL",
            include_str!("../../src/tasks/redis/lua/end.lua"),
            "5",
            &task,
            &user,
            QUEUE,
            &text,
            &ended,
            GROUP,
            &self.entry,
            "completed",
            answer,
            "",
            "600000",
            Self::NAME,
            &self.task_id,
            "100",
            "herald:{tasks}:task:",
        ];
        assert_eq!(self.redis.cli(&end).await, "1");
    }
}

/// A worker that stops holding a task whose end it recorded (the reply to `end.lua`
/// lost, say) does not hand it back: `hand_back.lua` gives back only a task still
/// running, or an answer saved as complete would be generated again.
#[tokio::test]
async fn a_task_whose_end_is_recorded_is_not_handed_back() {
    let Some((redis, _dir, a)) = for_dead_workers().await else {
        return;
    };
    let user = user("endedback");
    let task_id = generate(&a, &user, "c", "one").await;
    let dead = DeadWorker::take(&redis, &a, &user, &task_id).await;
    dead.record_completed("Echo: one").await;
    let queued = redis.cli(&["GET", "herald:{tasks}:queued"]).await;
    assert_eq!(dead.hand_back_answer().await, "0");
    let task = dead.key("task");
    assert_eq!(redis.cli(&["HGET", &task, "status"]).await, "completed");
    assert_eq!(redis.cli(&["GET", "herald:{tasks}:queued"]).await, queued);
    assert_eq!(task_status(&a, &user, &task_id).await["status"], "completed");
}

/// Waits until every entry of the queue is acknowledged and deleted.
async fn until_the_queue_is_empty(redis: &Redis, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let pending = redis.cli(&["XPENDING", QUEUE, GROUP]).await;
        if pending.lines().next() == Some("0") {
            break;
        }
        assert!(Instant::now() < deadline, "entries still pending: {pending}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(redis.cli(&["XLEN", QUEUE]).await, "0");
}

/// What the frame stream's history holds of `task_id`: `type:status` per message.
async fn history_shape(node: &TestServer, user: &str, task_id: &str) -> Vec<String> {
    let (status, history) = node
        .get(&format!("/api/v1/channels/frames:{user}/history?since=0"))
        .await;
    assert_eq!(status, 200, "{history}");
    history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["task_id"] == task_id)
        .map(|m| {
            format!(
                "{}:{}",
                m["type"].as_str().unwrap(),
                m["status"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// SPEC's "never a silent gap" for a task's end: a worker that dies after recording a
/// task's end and before its final `llm_status` leaves the entry pending, and the worker
/// that takes it over sends that status; if the dead worker had sent it, it is not
/// sent again. Before, `end.lua` acknowledged the entry with the end, and the status
/// was lost.
#[tokio::test]
async fn a_final_status_a_dead_worker_did_not_send_is_sent_by_the_worker_that_takes_its_entry_once() {
    let Some((redis, dir, a)) = for_dead_workers().await else {
        return;
    };
    let user = user("announce");
    let (mut ws, _) = a.connect(&format!("/ws/frame-stream/{user}/"), &user).await;
    let answers = [("one", "Echo: one", false), ("two", "Echo: two", true)];
    let mut tasks = Vec::new();
    for (prompt, answer, sent_final_status) in answers {
        let task_id = generate(&a, &user, "c", prompt).await;
        let dead = DeadWorker::take(&redis, &a, &user, &task_id).await;
        let data = json!({"event": "response_generated", "response": answer});
        dead.send(json!({"type": "llm_response", "data": data})).await;
        dead.record_completed(answer).await;
        if sent_final_status {
            let status =
                json!({"type": "llm_status", "status": "completed", "message": "Response completed"});
            dead.send(status).await;
        }
        tasks.push((task_id, answer));
    }

    let _worker = worker(dir.path(), &redis, 1);
    let stream = TaskStream::read(&mut ws, &tasks[0].0).await;
    assert_eq!(stream.shape(), ["llm_response", "status:completed"]);
    until_the_queue_is_empty(&redis, Duration::from_secs(20)).await;

    // A task run from start to end here has its entry acknowledged by its own worker
    // as its final status goes out, not by a takeover one claim timeout later.
    let task_id = generate(&a, &user, "c", "three").await;
    TaskStream::read(&mut ws, &task_id).await.assert_completed_order();
    until_the_queue_is_empty(&redis, Duration::from_millis(CLAIM_IDLE_MS / 2)).await;
    for (task_id, answer) in &tasks {
        let shape = history_shape(&a, &user, task_id).await;
        assert_eq!(shape, ["llm_response:", "llm_status:completed"], "task {task_id}");
        let task = task_status(&a, &user, task_id).await;
        assert_eq!(
            (task["status"].as_str(), task["response"].as_str()),
            (Some("completed"), Some(*answer))
        );
    }
}

/// A worker that told the user a task failed (`llm_error`, and maybe `llm_status
/// failed`) and died before recording the end: the worker that takes the task over
/// ends it as failed, sending only what is missing, and never runs it again. Before,
/// it ran the task again and streamed an answer after the error. A task whose stream
/// completed is not cancelled after it when the cancel flag is found on takeover.
#[tokio::test]
async fn a_task_whose_stream_already_told_the_user_it_failed_is_not_run_again_by_the_worker_that_takes_it_over(
) {
    let Some((redis, dir, a)) = for_dead_workers().await else {
        return;
    };
    let user = user("failed");
    let error = "LLM processing failed: upstream said no";
    let mut tasks = Vec::new();
    for (prompt, sent_final_status) in [("one", false), ("two", true)] {
        let task_id = generate(&a, &user, "c", prompt).await;
        let dead = DeadWorker::take(&redis, &a, &user, &task_id).await;
        dead.send(json!({"type": "llm_status", "status": "started", "message": "Started"}))
            .await;
        dead.send(json!({"type": "llm_error", "error": error})).await;
        if sent_final_status {
            let status = json!({"type": "llm_status", "status": "failed", "message": "Response failed"});
            dead.send(status).await;
        }
        tasks.push(task_id);
    }

    // One more whose worker sent the whole answer and its final status, could not
    // record the end, and whose user then asked to cancel: it stays completed.
    let completed = generate(&a, &user, "c", "three").await;
    let dead = DeadWorker::take(&redis, &a, &user, &completed).await;
    let frame = json!({"status": "streaming", "delta": "Echo: three", "index": 0});
    dead.send(json!({"type": "llm_frame", "frame": frame})).await;
    let data = json!({"event": "response_generated", "response": "Echo: three"});
    dead.send(json!({"type": "llm_response", "data": data})).await;
    let status = json!({"type": "llm_status", "status": "completed", "message": "Response completed"});
    dead.send(status).await;
    let cancel = format!("/api/chat/tasks/{completed}/cancel");
    let (status, body) = user_post(&a, &cancel, &a.token(&user), json!({})).await;
    assert_eq!(status, 202, "{body}");

    let _worker = worker(dir.path(), &redis, 1);
    until_the_queue_is_empty(&redis, Duration::from_secs(20)).await;
    let shape = history_shape(&a, &user, &completed).await;
    assert_eq!(shape, ["llm_frame:", "llm_response:", "llm_status:completed"]);
    let task = task_status(&a, &user, &completed).await;
    assert_eq!(
        (task["status"].as_str(), task["response"].as_str()),
        (Some("completed"), Some("Echo: three"))
    );
    for task_id in &tasks {
        let shape = history_shape(&a, &user, task_id).await;
        assert_eq!(
            shape,
            ["llm_status:started", "llm_error:", "llm_status:failed"],
            "task {task_id}"
        );
        let task = task_status(&a, &user, task_id).await;
        assert_eq!(
            (task["status"].as_str(), task["error"].as_str()),
            (Some("failed"), Some(error))
        );
    }
}

/// A queued task's cancel is announced by the node that took the cancel, which then
/// removes its entry. A node that dies between recording the cancel (`cancel.lua`) and
/// sending its status leaves the entry to a worker: the worker that reads it first
/// leaves it pending (that node may be sending the status just then), and the worker
/// that takes it over once idle sends the status unless it went out meanwhile. Before,
/// the entry was skipped and the status lost.
#[tokio::test]
async fn a_queued_tasks_cancel_whose_node_died_before_sending_its_status_is_announced_by_a_worker() {
    let Some((redis, dir, a)) = for_dead_workers().await else {
        return;
    };
    let user = user("cancelq");
    let (mut ws, _) = a.connect(&format!("/ws/frame-stream/{user}/"), &user).await;
    let by_api = generate(&a, &user, "c", "one").await;
    let cancel = format!("/api/chat/tasks/{by_api}/cancel");
    let (status, body) = user_post(&a, &cancel, &a.token(&user), json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        TaskStream::read(&mut ws, &by_api).await.shape(),
        ["status:cancelled"]
    );
    until_the_queue_is_empty(&redis, Duration::from_secs(5)).await;

    // Cancels recorded by a node that then died (the cancel script alone): one of a
    // task handed back by a stopping worker (pending, marked idle for ever so any
    // worker takes it at once; the cancel makes it idle from now, or a worker would take
    // it over at once, racing the node's status), one of a task never read, and one
    // whose node was only slow and sends its status while a worker holds the entry.
    let handed = generate(&a, &user, "c", "two").await;
    let dead = DeadWorker::take(&redis, &a, &user, &handed).await;
    dead.hand_back().await;
    let orphan = generate(&a, &user, "c", "three").await;
    let slow = generate(&a, &user, "c", "four").await;
    for task_id in [&handed, &orphan, &slow] {
        cancel_as_a_node_that_dies(&redis, &user, task_id).await;
    }
    let pending = redis
        .cli(&["XPENDING", QUEUE, GROUP, "-", "+", "10", DeadWorker::NAME])
        .await;
    let idle: Vec<&str> = pending.lines().collect();
    assert_eq!(idle.first(), Some(&dead.entry.as_str()), "{pending}");
    let idle_ms: u64 = idle[2].parse().unwrap();
    assert!(
        idle_ms < 1000,
        "the handed-back entry is still idle for {idle_ms} ms"
    );

    // A claim timeout long enough that the slow node's status surely lands before the
    // worker takes the entries over.
    let _worker = worker_with_claim_idle(dir.path(), &redis, 1, 5000);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.cli(&["XPENDING", QUEUE, GROUP]).await.lines().next() != Some("3") {
        assert!(
            Instant::now() < deadline,
            "the worker did not read both new entries"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = json!({"type": "llm_status", "status": "cancelled", "chat_id": "c",
        "task_id": slow, "message": "Task cancelled"});
    let (code, body) = a.post(&format!("/api/v1/frame-stream/{user}"), status).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(
        TaskStream::read(&mut ws, &orphan).await.shape(),
        ["status:cancelled"]
    );
    until_the_queue_is_empty(&redis, Duration::from_secs(20)).await;
    for task_id in [&by_api, &orphan, &slow, &handed] {
        assert_eq!(
            history_shape(&a, &user, task_id).await,
            ["llm_status:cancelled"],
            "{task_id}"
        );
        assert_eq!(task_status(&a, &user, task_id).await["status"], "cancelled");
    }
}

/// Runs `cancel.lua` for a queued task of `user`, as a node that dies before sending
/// the status.
async fn cancel_as_a_node_that_dies(redis: &Redis, user: &str, task_id: &str) {
    let (task, user_key, ended) = (
        format!("herald:{{tasks}}:task:{task_id}"),
        format!("herald:{{tasks}}:user:{user}"),
        format!("herald:{{tasks}}:ended:{user}"),
    );
    let cancel = [
        "EVAL",
        include_str!("../../src/tasks/redis/lua/cancel.lua"),
        "5",
        &task,
        &user_key,
        "herald:{tasks}:queued",
        &ended,
        QUEUE,
        user,
        "600000",
        task_id,
        "100",
        "herald:{tasks}:task:",
        GROUP,
    ];
    let cancelled = redis.cli(&cancel).await;
    assert_eq!(cancelled.lines().next(), Some("was_queued"), "{cancelled}");
}

/// The `index`-th delta of the echo provider's answer to [`words`]: `Echo:`, ` w0`, …
fn echo_delta(index: u64) -> String {
    match index {
        0 => "Echo:".to_owned(),
        n => format!(" w{}", n - 1),
    }
}

#[tokio::test]
async fn a_task_taken_over_twice_goes_on_from_everything_sent_even_what_a_dead_worker_never_recorded() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = submitting_node(&redis).await;
    let user = user("twice");
    let (mut ws, _) = a.connect(&format!("/ws/frame-stream/{user}/"), &user).await;
    let prompt = words(300);
    let task_id = generate(&a, &user, "c", &prompt).await;

    let first = worker(dir.path(), &redis, 1);
    let mut messages = read_frames(&mut ws, &task_id, 5).await;
    first.stop().await;
    // The first worker "died between sending and recording": the next two frames are in
    // the stream but not in its recorded progress. (Sent here, as it would have.)
    let (status, history) = a
        .get(&format!(
            "/api/v1/channels/frames:{user}/history?since=0&limit=1000"
        ))
        .await;
    assert_eq!(status, 200, "{history}");
    let last_index = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["task_id"] == task_id.as_str() && m["frame"]["status"] == "streaming")
        .map(|m| m["frame"]["index"].as_u64().unwrap())
        .max()
        .unwrap();
    for index in [last_index + 1, last_index + 2] {
        let frame = json!({
            "type": "llm_frame", "chat_id": "c", "task_id": task_id,
            "frame": {"status": "streaming", "delta": echo_delta(index), "index": index},
        });
        let (status, body) = a.post(&format!("/api/v1/frame-stream/{user}"), frame).await;
        assert_eq!(status, 202, "{body}");
    }

    // The second worker resumes after those frames, sends a few of its own, and dies
    // too. The third one resumes from what the second recorded: it must hold the frames
    // the first never recorded, or the third takes its own answer for another one.
    let second = worker(dir.path(), &redis, 1);
    messages.extend(read_frames(&mut ws, &task_id, 10).await);
    second.stop().await;
    let _third = worker(dir.path(), &redis, 1);
    messages.extend(TaskStream::read(&mut ws, &task_id).await.messages);
    let stream = TaskStream { messages };
    assert!(
        !stream
            .messages
            .iter()
            .any(|m| m["type"] == "llm_status" && m["status"] == "restarted"),
        "a deterministic answer never restarts: {:?}",
        stream.shape()
    );
    stream.assert_completed_order();
    assert_continuous(&stream);
    let expected = format!("Echo: {prompt}");
    assert_eq!(stream.text(), expected, "no text lost or sent twice");
    assert_eq!(
        task_status(&a, &user, &task_id).await["response"],
        expected.as_str()
    );
}

/// A streamed OpenAI answer of `deltas`, each written `pause` after the one before.
fn sampled_answer(deltas: &[String], pause: Duration) -> Reply {
    let mut pieces = vec![(Duration::ZERO, role_chunk().into_bytes())];
    pieces.extend(deltas.iter().map(|delta| (pause, text_chunk(delta).into_bytes())));
    pieces.extend(
        [
            finish_chunk(),
            usage_chunk(9, deltas.len() as u64),
            DONE.to_owned(),
        ]
        .map(|event| (Duration::ZERO, event.into_bytes())),
    );
    Reply::Stream { pieces, abort: false }
}

#[tokio::test]
async fn a_task_taken_over_with_a_sampling_model_restarts_visibly_and_ends_with_the_answer_shown() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The model answers differently each time it is asked.
    let first_answer: Vec<String> = (0..100).map(|i| format!("alpha{i} ")).collect();
    let second_answer: Vec<String> = (0..20).map(|i| format!("beta{i} ")).collect();
    let fake = FakeLlm::start(vec![
        sampled_answer(&first_answer, Duration::from_millis(50)),
        sampled_answer(&second_answer, Duration::from_millis(5)),
    ])
    .await;
    let env = [
        ("HERALD_LLM_BASE_URL", fake.base_url.as_str()),
        ("HERALD_LLM_API_KEY", KEY),
    ];
    let a = submitting_node(&redis).await;
    let user = user("sampling");
    let (mut ws, _) = a.connect(&format!("/ws/frame-stream/{user}/"), &user).await;
    let task_id = generate(&a, &user, "c", "tell me something").await;

    let first = worker_with(dir.path(), &redis, 1, CLAIM_IDLE_MS, &env);
    let mut messages = read_frames(&mut ws, &task_id, 5).await;
    first.stop().await;
    let _second = worker_with(dir.path(), &redis, 1, CLAIM_IDLE_MS, &env);
    messages.extend(TaskStream::read(&mut ws, &task_id).await.messages);
    assert_eq!(fake.requests().len(), 2, "the model was asked again");

    let restarted = messages
        .iter()
        .position(|m| m["type"] == "llm_status" && m["status"] == "restarted")
        .unwrap_or_else(|| {
            panic!(
                "no llm_status restarted: {:?}",
                TaskStream {
                    messages: messages.clone()
                }
                .shape()
            )
        });
    let before = TaskStream {
        messages: messages[..restarted].to_vec(),
    };
    let after = TaskStream {
        messages: messages[restarted + 1..].to_vec(),
    };
    // Before the restart: the first answer's beginning, without a gap.
    assert_continuous(&before);
    assert!(before.indices().len() >= 5);
    assert!(first_answer.concat().starts_with(&before.text()));
    // After it: the new answer from index 0, then its response and the end.
    assert_continuous(&after);
    let expected = second_answer.concat();
    assert_eq!(after.text(), expected);
    assert_eq!(
        after.shape(),
        ["frame:streaming", "llm_response", "status:completed"],
        "{:?}",
        after.shape()
    );
    assert_eq!(
        after.find("llm_response").unwrap()["data"]["response"],
        expected.as_str()
    );
    let task = task_status(&a, &user, &task_id).await;
    assert_eq!(task["status"], "completed");
    assert_eq!(task["response"], expected.as_str());
}

fn signal(proc: &Proc, signal: &str) {
    let pid = proc.child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_worker_frozen_past_its_claim_sends_nothing_more_once_it_wakes() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = submitting_node(&redis).await;
    let user = user("frozen");
    let (mut ws, _) = a.connect(&format!("/ws/frame-stream/{user}/"), &user).await;
    let prompt = words(300);
    let task_id = generate(&a, &user, "c", &prompt).await;

    let frozen = worker(dir.path(), &redis, 1);
    let mut messages = read_frames(&mut ws, &task_id, 5).await;
    // Frozen, not dead: its answer's deltas keep falling due while it sleeps.
    signal(&frozen, "-STOP");
    let _second = worker(dir.path(), &redis, 1);
    messages.extend(read_frames(&mut ws, &task_id, 10).await);
    // It wakes with a claim another worker has taken: it must not send a thing.
    signal(&frozen, "-CONT");
    messages.extend(TaskStream::read(&mut ws, &task_id).await.messages);
    frozen.stop().await;
    let stream = TaskStream { messages };
    stream.assert_completed_order();
    assert_continuous(&stream);
    assert_eq!(
        stream.text(),
        format!("Echo: {prompt}"),
        "no text lost or sent twice"
    );
}
