//! SPEC §5 "Many nodes" on a Redis Cluster: herald nodes given a `redis-cluster://` URL
//! share delivery, offsets, history and the per-user connection limit through sharded
//! pub/sub and single-slot scripts.
//!
//! Each test starts its own cluster: three `redis-server --cluster-enabled yes` masters
//! on free ports, in a temporary directory, joined with `redis-cli --cluster create`
//! (killed on drop). Without `redis-server` on PATH the tests print
//! `skipped: no redis-server` and pass, unless `HERALD_REQUIRE_REDIS=1`.

use std::time::Duration;

use serde_json::json;
use tokio::process::{Child, Command};

use crate::redis::{
    broker_reconnects, check_connection_limit_across_nodes, free_ports, redis_server_on_path,
    start_server_with, user, wait_ready,
};
use crate::support::*;

/// One master of the test cluster.
struct Master {
    port: u16,
    id: String,
    /// `redis-server` arguments after the port, to start it again.
    args: Vec<String>,
    child: Option<Child>,
}

impl Master {
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Starts it again on the same port and cluster config file, with no data.
    async fn restart(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.child = Some(start_server_with(self.port, &args).await);
    }
}

/// A three-master Redis Cluster for one test.
struct Cluster {
    masters: Vec<Master>,
    /// The `HERALD_REDIS_URL` naming it.
    url: String,
    _dir: tempfile::TempDir,
}

/// `redis-cli -p PORT ARGS…`, failing the test on an error reply.
async fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .await
        .expect("run redis-cli");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !stdout.starts_with("ERR") && !stdout.starts_with("(error)"),
        "redis-cli -p {port} {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The slot of a Redis key (CRC16 of its hash tag, as Redis computes it).
fn slot_of(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

/// The pub/sub channel herald uses for a user's notifications.
fn notifications_pubsub(user: &str) -> String {
    format!("herald:{{notifications:{user}}}:messages")
}

impl Cluster {
    /// A fresh cluster, or `None` (after printing why) when none can be had.
    async fn start() -> Option<Cluster> {
        if !redis_server_on_path() {
            return None;
        }
        let version = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .expect("run redis-server --version");
        let version = String::from_utf8_lossy(&version.stdout).into_owned();
        let major: u32 = version
            .split_whitespace()
            .find_map(|word| word.strip_prefix("v="))
            .and_then(|v| v.split('.').next())
            .and_then(|major| major.parse().ok())
            .unwrap_or(0);
        assert!(
            major >= 7,
            "herald on a Redis Cluster needs Redis 7.0 or later (sharded pub/sub); found {version}"
        );
        let dir = tempfile::tempdir().unwrap();
        // A port and a cluster bus port for each master.
        let ports = free_ports(6);
        let mut masters = Vec::new();
        for pair in ports.chunks(2) {
            let (port, bus) = (pair[0], pair[1]);
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir(&node_dir).unwrap();
            let args: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
                "--cluster-config-file",
                node_dir.join("nodes.conf").to_str().unwrap(),
                "--cluster-node-timeout",
                "2000",
                // As docs/protocol.md recommends: a failed primary stops only its own
                // slots.
                "--cluster-require-full-coverage",
                "no",
                "--dir",
                node_dir.to_str().unwrap(),
            ]
            .into_iter()
            .map(str::to_owned)
            .collect();
            let mut master = Master {
                port,
                id: String::new(),
                args,
                child: None,
            };
            master.restart().await;
            master.id = cli(port, &["cluster", "myid"]).await.trim().to_owned();
            masters.push(master);
        }
        let addresses: Vec<String> = masters.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .await
            .expect("run redis-cli --cluster create");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        let cluster = Cluster {
            url: format!(
                "redis-cluster://{}?node={}&node={}",
                addresses[0], addresses[1], addresses[2]
            ),
            masters,
            _dir: dir,
        };
        cluster.wait_consistent().await;
        Some(cluster)
    }

    /// Waits until every master reports `cluster_state:ok` and sees all three masters
    /// with every slot.
    async fn wait_consistent(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut consistent = true;
            for master in &self.masters {
                let info = cli(master.port, &["cluster", "info"]).await;
                let slots = self.slots_seen_by(master.port).await;
                let owners: std::collections::BTreeSet<u16> =
                    slots.iter().map(|(_, _, port)| *port).collect();
                let covered: u32 = slots
                    .iter()
                    .map(|(start, end, _)| u32::from(end - start) + 1)
                    .sum();
                consistent &= info.contains("cluster_state:ok") && owners.len() == 3 && covered == 16384;
            }
            if consistent {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the Redis Cluster did not reach cluster_state:ok"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `(first slot, last slot, master port)` ranges from `CLUSTER NODES` as seen by the
    /// master on `port`.
    async fn slots_seen_by(&self, port: u16) -> Vec<(u16, u16, u16)> {
        let nodes = cli(port, &["cluster", "nodes"]).await;
        let mut ranges = Vec::new();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let Some(master_port) = fields[1]
                .split('@')
                .next()
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|p| p.parse().ok())
            else {
                continue;
            };
            // Ranges like `0-5460` or `7`; `[slot->-id]` marks a migration in progress.
            for range in fields[8..].iter().copied().filter(|r| !r.starts_with('[')) {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                ranges.push((start.parse().unwrap(), end.parse().unwrap(), master_port));
            }
        }
        ranges
    }

    /// The port of the master that owns `slot`.
    async fn owner(&self, slot: u16) -> u16 {
        self.slots_seen_by(self.masters[0].port)
            .await
            .into_iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, port)| port)
            .expect("every slot has an owner")
    }

    /// A master other than the one on `port`.
    fn other_master(&self, port: u16) -> u16 {
        self.masters
            .iter()
            .map(|m| m.port)
            .find(|p| *p != port)
            .expect("the test cluster has three masters")
    }

    fn master(&self, port: u16) -> &Master {
        self.masters.iter().find(|m| m.port == port).unwrap()
    }

    /// Moves `slot` and its keys to the master on `to`, as `redis-cli --cluster reshard`
    /// does for each slot.
    async fn move_slot(&self, slot: u16, to: u16) {
        let from = self.owner(slot).await;
        let (source, target) = (self.master(from), self.master(to));
        let slot = slot.to_string();
        let slot = slot.as_str();
        cli(to, &["cluster", "setslot", slot, "importing", source.id.as_str()]).await;
        cli(
            from,
            &["cluster", "setslot", slot, "migrating", target.id.as_str()],
        )
        .await;
        loop {
            let keys = cli(from, &["cluster", "getkeysinslot", slot, "100"]).await;
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let to_port = to.to_string();
            let mut args = vec!["migrate", "127.0.0.1", to_port.as_str(), "", "0", "5000", "keys"];
            args.extend(keys);
            cli(from, &args).await;
        }
        for master in &self.masters {
            cli(
                master.port,
                &["cluster", "setslot", slot, "node", target.id.as_str()],
            )
            .await;
        }
        self.wait_consistent().await;
    }

    /// How many connections on the master `port` hold a shard subscription to `channel`.
    async fn shard_subscribers(&self, port: u16, channel: &str) -> u64 {
        let reply = cli(port, &["pubsub", "shardnumsub", channel]).await;
        reply
            .lines()
            .nth(1)
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or(0)
    }

    async fn node(&self) -> TestServer {
        TestServer::builder()
            .env("HERALD_REDIS_URL", self.url.clone())
            .spawn()
            .await
    }
}

#[tokio::test]
async fn publishes_reach_every_node_for_channels_on_every_master() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let (a, b, c) = (cluster.node().await, cluster.node().await, cluster.node().await);

    // One user whose channel lives on each master.
    let mut users: Vec<(u16, String)> = Vec::new();
    while users.len() < cluster.masters.len() {
        let u = user("shard");
        let owner = cluster.owner(slot_of(&notifications_pubsub(&u))).await;
        if users.iter().all(|(port, _)| *port != owner) {
            users.push((owner, u));
        }
    }

    let path = "/ws/notifications/";
    let mut sockets = Vec::new();
    for (_, u) in &users {
        let (on_b, welcome_b) = b.connect(path, u).await;
        let (on_c, welcome_c) = c.connect(path, u).await;
        assert_eq!(welcome_b["epoch"], welcome_c["epoch"], "one epoch across nodes");
        sockets.push((on_b, on_c));
    }
    // Publishes alternating between the nodes get one sequence of offsets per channel,
    // and reach the sockets on the other nodes.
    for (n, node) in [&a, &b, &c].into_iter().enumerate() {
        for (_, u) in &users {
            let published = node.notify(u, json!({"n": n + 1})).await;
            assert_eq!(published["offset"], n + 1, "{published}");
        }
    }
    for (on_b, on_c) in &mut sockets {
        for ws in [on_b, on_c] {
            for n in 1..=3 {
                let message = ws.next_json().await;
                assert_eq!(message["offset"], n, "{message}");
                assert_eq!(message["notification"]["n"], n);
            }
        }
    }
    assert_eq!(
        broker_reconnects(&b).await,
        0.0,
        "first connections are no reconnects"
    );
    // Each node holds one shard subscription per channel, on the master of its slot.
    for (port, u) in &users {
        assert_eq!(
            cluster.shard_subscribers(*port, &notifications_pubsub(u)).await,
            2
        );
    }

    // History reads the same from every node, and a client resumes through another
    // node than the one it used.
    let (_, u) = &users[0];
    let (on_b, _) = sockets.remove(0);
    let epoch = epoch_of(&b, u).await;
    on_b.close().await;
    for n in 4..=5 {
        a.notify(u, json!({"n": n})).await;
    }
    for node in [&a, &b, &c] {
        let (status, history) = node
            .get(&format!("/api/v1/channels/notifications:{u}/history?since=3"))
            .await;
        assert_eq!(status, 200, "{history}");
        assert_eq!(history["offset"], 5, "{history}");
    }
    let (mut resumed, welcome) = a.connect(&format!("{path}?since=3&epoch={epoch}"), u).await;
    assert_eq!(welcome["offset"], 5);
    for n in 4..=5 {
        assert_eq!(resumed.next_json().await["offset"], n);
    }
    let recovered = resumed.next_json().await;
    assert_eq!(recovered["recovered"], true, "{recovered}");
    assert_eq!(recovered["missed"], 2);
}

/// The epoch of `u`'s notifications, read through `node`.
async fn epoch_of(node: &TestServer, u: &str) -> String {
    let (status, history) = node
        .get(&format!("/api/v1/channels/notifications:{u}/history?since=0"))
        .await;
    assert_eq!(status, 200, "{history}");
    history["epoch"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn subscriptions_follow_a_slot_moved_to_another_master() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let (a, b) = (cluster.node().await, cluster.node().await);
    let u = user("moved");
    let channel = notifications_pubsub(&u);
    let slot = slot_of(&channel);
    let from = cluster.owner(slot).await;
    let to = cluster.other_master(from);

    let (mut on_b, welcome) = b.connect("/ws/notifications/", &u).await;
    a.notify(&u, json!({"n": 1})).await;
    assert_eq!(on_b.next_json().await["offset"], 1);

    // Redis drops the shard subscription of a slot that moves away.
    cluster.move_slot(slot, to).await;
    assert_eq!(cluster.shard_subscribers(from, &channel).await, 0);
    // Published while node B is not subscribed anywhere: B's client gets it from
    // history once the next live message shows the gap.
    a.notify(&u, json!({"n": 2})).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while cluster.shard_subscribers(to, &channel).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node B did not subscribe again on the slot's new master"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.notify(&u, json!({"n": 3})).await;
    for n in 2..=3 {
        let message = on_b.next_json().await;
        assert_eq!(message["offset"], n, "{message}");
        assert_eq!(
            message["epoch"], welcome["epoch"],
            "the slot's keys moved with it"
        );
    }
}

/// A slot that leaves its master and comes back before the next slot check leaves the
/// slot map as it was, but Redis has dropped the master's shard subscriptions of that
/// slot (and fred does not pass the `sunsubscribe` on). The subscriber finds the drop by
/// counting its subscriptions on each master, subscribes again and delivers what was
/// published meanwhile, without waiting for another message.
#[tokio::test]
async fn shard_subscriptions_dropped_by_redis_are_restored_and_caught_up() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let (a, b) = (cluster.node().await, cluster.node().await);
    let u = user("dropped");
    let channel = notifications_pubsub(&u);
    let slot = slot_of(&channel).to_string();
    let owner = cluster.owner(slot_of(&channel)).await;

    let (mut on_b, welcome) = b.connect("/ws/notifications/", &u).await;
    a.notify(&u, json!({"n": 1})).await;
    assert_eq!(on_b.next_json().await["offset"], 1);
    assert_eq!(cluster.shard_subscribers(owner, &channel).await, 1);

    // The slot leaves the master and comes back at once: same owner, no subscription.
    cli(owner, &["cluster", "delslots", slot.as_str()]).await;
    cli(owner, &["cluster", "addslots", slot.as_str()]).await;
    assert_eq!(cluster.shard_subscribers(owner, &channel).await, 0);
    cluster.wait_consistent().await;

    // Published while node B holds no subscription; the only message, so no later one
    // reveals the gap: B must find the lost subscription and catch up by itself.
    a.notify(&u, json!({"n": 2})).await;
    let message = tokio::time::timeout(Duration::from_secs(15), on_b.next_json())
        .await
        .expect("the message published while Redis had dropped the subscription arrives");
    assert_eq!(message["offset"], 2, "{message}");
    assert_eq!(message["epoch"], welcome["epoch"]);
    assert_eq!(cluster.shard_subscribers(owner, &channel).await, 1);
    a.notify(&u, json!({"n": 3})).await;
    assert_eq!(on_b.next_json().await["offset"], 3);
}

/// Writes a failover lost on a channel that only the node that published them knew
/// of: after the channel's slot changes primary, that node compares what it was
/// acknowledged with the new primary, starts a new epoch, and every node's sockets are
/// told. Simulated by moving the offset back on the old primary and then moving the
/// slot, as a promoted replica that missed the last writes would have it.
#[tokio::test]
async fn writes_lost_in_a_failover_are_found_by_the_node_that_published_them() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let (a, b) = (cluster.node().await, cluster.node().await);
    let u = user("lost-unheard");
    let channel = notifications_pubsub(&u);
    let slot = slot_of(&channel);
    let from = cluster.owner(slot).await;
    let to = cluster.other_master(from);
    for n in 1..=5 {
        a.notify(&u, json!({"n": n})).await;
    }
    let meta = format!("herald:{{notifications:{u}}}:meta");
    let epoch = cli(from, &["hget", &meta, "epoch"]).await.trim().to_owned();
    cli(from, &["hset", &meta, "offset", "3"]).await;
    let (mut ws, welcome) = b.connect("/ws/notifications/", &u).await;
    assert_eq!(welcome["offset"], 3);

    cluster.move_slot(slot, to).await;
    let told = tokio::time::timeout(Duration::from_secs(15), ws.next_json())
        .await
        .expect("the socket is told the channel lost writes");
    assert_eq!(told["status"], "recovered", "{told}");
    assert_eq!(told["recovered"], false, "{told}");
    assert_ne!(told["epoch"], epoch.as_str(), "{told}");
    assert_eq!(
        cli(to, &["hget", &meta, "epoch"]).await.trim(),
        told["epoch"].as_str().unwrap()
    );
    b.notify(&u, json!({"n": "next"})).await;
    let next = ws.next_json().await;
    assert_eq!(next["epoch"], told["epoch"], "{next}");
    assert_eq!(next["offset"], told["offset"].as_u64().unwrap() + 1, "{next}");
}

#[tokio::test]
async fn presence_holds_across_nodes_on_a_cluster() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let (a, b) = (cluster.node().await, cluster.node().await);
    crate::presence::check_presence_across_two_nodes(&a, &b).await;
}

#[tokio::test]
async fn connection_limit_holds_across_nodes_on_a_cluster() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    check_connection_limit_across_nodes(&cluster.url).await;
}

#[tokio::test]
async fn removing_a_member_closes_their_org_sockets_on_every_node_of_a_cluster() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    crate::control::check_member_removal_across_nodes(&cluster.url).await;
}

/// SPEC §11 on a Cluster: one `/ws/` socket's three channels live on three different
/// masters, yet it gets them all, resumes them and loses one on a membership removal,
/// as on one Redis.
#[tokio::test]
async fn a_ws_socket_gets_channels_from_every_master_of_a_cluster() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let owner = |channel: String| {
        let key = format!("herald:{{{channel}}}:messages");
        let cluster = &cluster;
        async move { cluster.owner(slot_of(&key)).await }
    };
    let (u, org) = loop {
        let (u, org) = (user("multi"), user("org"));
        let owners: std::collections::BTreeSet<u16> = [
            owner(format!("notifications:{u}")).await,
            owner(format!("frames:{u}")).await,
            owner(format!("org:{org}")).await,
        ]
        .into();
        if owners.len() == 3 {
            break (u, org);
        }
    };
    crate::multiplexed::check_across_nodes(&cluster.url, &u, &org).await;
}

#[tokio::test]
async fn a_plain_redis_url_naming_a_cluster_node_is_refused() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let url = format!("redis://127.0.0.1:{}", cluster.masters[0].port);
    let refused = herald::broker::redis::RedisBroker::connect(
        &url,
        std::sync::Arc::new(herald::hub::Hub::default()),
        100,
        Duration::from_secs(60),
        &shutdown,
    )
    .await;
    let Err(err) = refused else {
        panic!("redis:// to a Cluster node was accepted")
    };
    assert!(err.to_string().contains("redis-cluster://"), "{err}");
    shutdown.cancel();
}

#[tokio::test]
async fn a_master_restarted_empty_fails_its_channels_then_nodes_resubscribe() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    let (a, b) = (cluster.node().await, cluster.node().await);
    let u = user("restart");
    let path = "/ws/notifications/";
    let owner = cluster.owner(slot_of(&notifications_pubsub(&u))).await;
    let (mut on_b, welcome) = b.connect(path, &u).await;
    a.notify(&u, json!({"n": 1})).await;
    assert_eq!(on_b.next_json().await["offset"], 1);

    let master = cluster.masters.iter_mut().find(|m| m.port == owner).unwrap();
    master.kill().await;
    // Its channels fail (the nodes stay ready for the other primaries' channels).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = a
            .post(&format!("/api/v1/notifications/{u}"), json!({"n": 2}))
            .await;
        if status == 503 {
            break;
        }
        assert_eq!(status, 202, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishes on a dead primary kept succeeding"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Back on the same port with its cluster config but no data: the channel's epoch
    // is gone. The socket that stayed open is told in band that it cannot recover.
    let master = cluster.masters.iter_mut().find(|m| m.port == owner).unwrap();
    master.restart().await;
    cluster.wait_consistent().await;
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    let told = on_b.next_json().await;
    assert_eq!(told["recovered"], false, "{told}");
    assert_ne!(told["epoch"], welcome["epoch"]);
    assert!(broker_reconnects(&b).await >= 1.0);
    // Node B subscribed again on the restarted master: delivery across nodes resumes.
    a.notify(&u, json!({"after": true})).await;
    let received = on_b.next_json().await;
    assert_eq!(received["notification"]["after"], true, "{received}");
    assert_eq!(received["epoch"], told["epoch"]);
    let old_epoch = welcome["epoch"].as_str().unwrap();
    let (mut resumed, new_welcome) = b.connect(&format!("{path}?since=1&epoch={old_epoch}"), &u).await;
    assert_eq!(new_welcome["epoch"], told["epoch"]);
    assert_eq!(resumed.next_json().await["recovered"], false);
}

/// The shared task queue on a Cluster: its scripts run on the primary of `{tasks}`; a
/// task submitted on a node without workers runs on another node, and a cancel from
/// the first reaches it.
#[tokio::test]
async fn llm_tasks_run_across_nodes_on_a_cluster() {
    use crate::chat::{generate, user_post, TaskStream};
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let submitting = TestServer::builder()
        .env("HERALD_REDIS_URL", cluster.url.clone())
        .env("HERALD_WORKERS", "0")
        .spawn()
        .await;
    let _working = cluster.node().await;
    let u = user("cluster-task");
    let (mut ws, _) = submitting.connect(&format!("/ws/frame-stream/{u}/"), &u).await;
    let task_id = generate(&submitting, &u, "c", "over a cluster").await;
    let stream = TaskStream::read(&mut ws, &task_id).await;
    stream.assert_completed_order();
    assert_eq!(stream.text(), "Echo: over a cluster");

    let long = generate(&submitting, &u, "c", &"word ".repeat(300)).await;
    loop {
        let m = ws.next_json().await;
        if m["task_id"] == long.as_str() && m["type"] == "llm_frame" && m["frame"]["status"] == "streaming" {
            break;
        }
    }
    let (status, _) = user_post(
        &submitting,
        &format!("/api/chat/tasks/{long}/cancel"),
        &submitting.token(&u),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 202);
    let rest = TaskStream::read(&mut ws, &long).await;
    assert_eq!(rest.messages.last().unwrap()["status"], "cancelled");
}

/// A primary down stays a partial outage: publishes, handshakes and deliveries of
/// channels on the other primaries keep working; only the down primary's channels
/// fail (503, with nothing falsely acknowledged).
#[tokio::test]
async fn a_partial_outage_fails_only_the_shard_that_is_down() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    let (a, b) = (cluster.node().await, cluster.node().await);
    // The connection counts live on one primary, which every handshake needs, and the
    // task queue on one, which readiness needs (SPEC: "queue reachable"): fail another.
    let counts = cluster.owner(slot_of("herald:{conns}:nodes")).await;
    let queue = cluster.owner(slot_of("herald:{tasks}:queue")).await;
    let Some(victim) = cluster
        .masters
        .iter()
        .map(|m| m.port)
        .find(|port| *port != counts && *port != queue)
    else {
        panic!("the counts and the queue are spread over all three masters' slots: no master to fail");
    };
    let (mut healthy, mut broken) = (None, None);
    while healthy.is_none() || broken.is_none() {
        let u = user("partial");
        let owner = cluster.owner(slot_of(&notifications_pubsub(&u))).await;
        if owner == victim {
            broken.get_or_insert(u);
        } else {
            healthy.get_or_insert(u);
        }
    }
    let (healthy, broken) = (healthy.unwrap(), broken.unwrap());
    let path = "/ws/notifications/";
    let (mut ws, _) = b.connect(path, &healthy).await;
    a.notify(&healthy, json!({"n": 1})).await;
    assert_eq!(ws.next_json().await["notification"]["n"], 1);

    cluster
        .masters
        .iter_mut()
        .find(|m| m.port == victim)
        .unwrap()
        .kill()
        .await;
    // While the primary is down: the healthy shard's channel keeps working, through
    // both nodes, promptly.
    for n in 2..=4 {
        let started = tokio::time::Instant::now();
        let (status, body) = a
            .post(&format!("/api/v1/notifications/{healthy}"), json!({"n": n}))
            .await;
        assert_eq!(status, 202, "publish on a healthy shard: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(ws.next_json().await["notification"]["n"], n);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (mut second, welcome) = b.connect(path, &healthy).await;
    assert_eq!(welcome["status"], "connected", "{welcome}");
    a.notify(&healthy, json!({"n": 5})).await;
    assert_eq!(second.next_json().await["notification"]["n"], 5);
    // The down shard's channel fails honestly.
    let (status, body) = a
        .post(&format!("/api/v1/notifications/{broken}"), json!({"n": 1}))
        .await;
    assert_eq!(status, 503, "{body}");
    // Both nodes stay ready: a load balancer must not take every node out for one
    // shard's outage.
    for node in [&a, &b] {
        let (status, body) = node.get("/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["broker"], true, "{body}");
    }

    // With every primary down, no node is ready.
    for master in &mut cluster.masters {
        master.kill().await;
    }
    wait_ready(&a, false).await;
    wait_ready(&b, false).await;
}

/// The per-user connection counts live on one primary; while it is down, sockets of
/// channels on the other primaries are still accepted (counted on each node alone) and
/// the per-user limit still holds on each node.
#[tokio::test]
async fn handshakes_go_on_while_the_primary_of_the_connection_counts_is_down() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    let node = || {
        TestServer::builder()
            .env("HERALD_REDIS_URL", cluster.url.clone())
            .env("HERALD_MAX_CONNECTIONS_PER_USER", "3")
            .spawn()
    };
    let (a, b) = (node().await, node().await);
    let counts = cluster.owner(slot_of("herald:{conns}:nodes")).await;
    let u = loop {
        let u = user("counts");
        if cluster.owner(slot_of(&notifications_pubsub(&u))).await != counts {
            break u;
        }
    };
    let path = "/ws/notifications/";
    let (_before, _) = b.connect(path, &u).await;

    cluster
        .masters
        .iter_mut()
        .find(|m| m.port == counts)
        .unwrap()
        .kill()
        .await;
    // Promptly, on both nodes, while the counts' primary fails over.
    let started = tokio::time::Instant::now();
    let (mut on_b, welcome) = b.connect(path, &u).await;
    assert_eq!(welcome["status"], "connected", "{welcome}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    a.notify(&u, json!({"n": 1})).await;
    assert_eq!(on_b.next_json().await["notification"]["n"], 1);
    // The limit (3) still holds on each node: three sockets on A, the fourth refused.
    let mut on_a = Vec::new();
    for _ in 0..3 {
        on_a.push(a.connect(path, &u).await.0);
    }
    expect_refused_with(WsClient::connect(&a, path).token(&a.token(&u)), 4429).await;
}
