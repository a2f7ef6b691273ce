//! Delivery under faults (docs/protocol.md, "Delivery under faults"): a socket never
//! receives a message of an epoch it was not told about, and never misses an
//! acknowledged message without being told, when Redis loses a channel's state under
//! connected sockets.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::redis::{user, wait_ready, Redis};
use crate::support::{TestServer, WsClient};

/// A Redis this test starts itself (it changes Redis under herald: edits keys, cuts
/// connections, restarts it), or `None` without `redis-server`; `what` names what it
/// does, for the failure with `HERALD_TEST_REDIS_URL`.
async fn own_redis(what: &str) -> Option<Redis> {
    let redis = Redis::start().await?;
    if !redis.owned() {
        panic!("this test {what}: unset HERALD_TEST_REDIS_URL to let it start its own");
    }
    Some(redis)
}

/// How many commands `redis` has refused with WRONGTYPE (`INFO errorstats`): a read of
/// a channel whose meta key was made a string counts one.
async fn wrong_type_errors(redis: &Redis) -> u64 {
    let stats = redis.cli(&["INFO", "errorstats"]).await;
    stats
        .lines()
        .find_map(|line| line.strip_prefix("errorstat_WRONGTYPE:count="))
        .map_or(0, |count| count.trim().parse::<u64>().unwrap())
}

/// Reads `ws` until `n` notifications arrived, checking on the way that every message
/// is in the epoch the socket was last told and follows the previous offset by one, and
/// that an epoch change was told in band (`recovered:false`). Returns the notifications
/// and the `recovered:false` messages seen.
async fn read_checked(ws: &mut WsClient, welcome: &Value, n: usize) -> (Vec<Value>, Vec<Value>) {
    let mut epoch = welcome["epoch"].as_str().unwrap().to_owned();
    let mut offset = welcome["offset"].as_u64().unwrap();
    let (mut got, mut told) = (Vec::new(), Vec::new());
    while got.len() < n {
        let message = ws.next_json().await;
        if message["type"] == "system" && message["status"] == "recovered" {
            assert_eq!(message["recovered"], false, "{message}");
            epoch = message["epoch"].as_str().unwrap().to_owned();
            offset = message["offset"].as_u64().unwrap();
            told.push(message);
            continue;
        }
        assert_eq!(
            message["epoch"],
            epoch.as_str(),
            "a message of an epoch the socket was not told: {message}"
        );
        assert_eq!(
            message["offset"],
            offset + 1,
            "an offset skipped or repeated: {message}"
        );
        offset += 1;
        got.push(message);
    }
    (got, told)
}

/// Redis restarted without its data while sockets stay open on two nodes. Whichever
/// node publishes next (the one holding the sockets included, whose own publish used
/// to hide the epoch change from it), every socket is told the new epoch and then gets
/// every new message; a channel on which nothing is published is told too.
#[tokio::test]
async fn redis_restarted_empty_is_told_in_band_and_nothing_is_skipped() {
    let Some(mut redis) = own_redis("restarts Redis").await else {
        return;
    };
    let (a, b) = (redis.node().await, redis.node().await);
    let path = "/ws/notifications/";
    let users = [user("restart-self"), user("restart-other"), user("restart-quiet")];
    let mut sockets = Vec::new();
    for u in &users {
        let (ws, welcome) = b.connect(path, u).await;
        sockets.push((ws, welcome));
    }
    // Enough messages that a new epoch's first offsets are all "old" numbers.
    for u in &users {
        for n in 1..=5 {
            a.notify(u, json!({"n": n})).await;
        }
    }
    for (ws, welcome) in &mut sockets {
        let (got, told) = read_checked(ws, welcome, 5).await;
        assert!(told.is_empty());
        assert_eq!(got[4]["offset"], 5);
    }

    redis.kill().await;
    wait_ready(&b, false).await;
    redis.restart().await;
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    // Published by the node that holds the sockets, and by the other one.
    for n in 1..=3 {
        b.notify(&users[0], json!({"after": n})).await;
        a.notify(&users[1], json!({"after": n})).await;
    }
    for (i, (ws, welcome)) in sockets.iter_mut().enumerate().take(2) {
        let (got, told) = read_checked(ws, welcome, 3).await;
        assert_eq!(told.len(), 1, "socket {i} told once: {told:?}");
        assert_ne!(told[0]["epoch"], welcome["epoch"]);
        let afters: Vec<&Value> = got.iter().map(|m| &m["notification"]["after"]).collect();
        assert_eq!(
            afters,
            [1, 2, 3],
            "socket {i} got every message after the restart"
        );
    }
    // Nothing published on the third channel: it is told all the same.
    let (ws, welcome) = &mut sockets[2];
    let told = ws.next_json().await;
    assert_eq!(told["recovered"], false, "{told}");
    assert_ne!(told["epoch"], welcome["epoch"]);
    a.notify(&users[2], json!({"after": 1})).await;
    let next = ws.next_json().await;
    assert_eq!(next["epoch"], told["epoch"]);
    assert_eq!(next["offset"], told["offset"].as_u64().unwrap() + 1);
}

/// A failover that lost acknowledged writes hands the same offsets out again in the
/// same epoch. Simulated here by moving the channel's offset back in Redis, as a
/// promoted replica that missed the last writes would have it. The node that sees an
/// offset come again starts a new epoch; its socket is told, never gets the reused
/// offset, and gets what follows.
#[tokio::test]
async fn offsets_handed_out_again_start_a_new_epoch() {
    let Some(redis) = own_redis("edits Redis keys").await else {
        return;
    };
    let (a, b) = (redis.node().await, redis.node().await);
    let u = user("reuse");
    let (mut ws, welcome) = b.connect("/ws/notifications/", &u).await;
    for n in 1..=5 {
        a.notify(&u, json!({"n": n})).await;
    }
    read_checked(&mut ws, &welcome, 5).await;

    // Writes 4 and 5 "lost": the next publish is given offset 4 again. It comes from a
    // node that never published to the channel (node A would start a new epoch itself:
    // see the next test), so only node B can notice.
    let meta = format!("herald:{{notifications:{u}}}:meta");
    redis.cli(&["HSET", &meta, "offset", "3"]).await;
    let c = redis.node().await;
    let receipt = c.notify(&u, json!({"n": "reused"})).await;
    assert_eq!(receipt["offset"], 4, "the simulated failover reuses offset 4");
    let told = ws.next_json().await;
    assert_eq!(told["status"], "recovered", "{told}");
    assert_eq!(told["recovered"], false, "{told}");
    assert_ne!(told["epoch"], welcome["epoch"], "a new epoch");
    // Later messages come in the new epoch, right after the offset told.
    a.notify(&u, json!({"n": "next"})).await;
    let (_, history) = a
        .get(&format!("/api/v1/channels/notifications:{u}/history"))
        .await;
    assert_eq!(
        history["epoch"], told["epoch"],
        "publishes continue in the new epoch"
    );
    let next = ws.next_json().await;
    assert_eq!(next["notification"]["n"], "next", "{next}");
    assert_eq!(next["epoch"], told["epoch"]);
    assert_eq!(next["offset"], told["offset"].as_u64().unwrap() + 1);
}

/// Publishes offsets 1 to 5 of `u`'s notifications through `node`, then moves the
/// channel's offset back to 3 in Redis, as a promoted replica that missed the last two
/// writes would have it. Returns the meta key and the epoch.
async fn publish_five_and_lose_two(redis: &Redis, node: &TestServer, u: &str) -> (String, String) {
    for n in 1..=5 {
        node.notify(u, json!({"n": n})).await;
    }
    let meta = format!("herald:{{notifications:{u}}}:meta");
    let epoch = redis.cli(&["HGET", &meta, "epoch"]).await;
    redis.cli(&["HSET", &meta, "offset", "3"]).await;
    (meta, epoch)
}

/// A node that was acknowledged an offset never publishes below it in the same epoch:
/// after Redis lost writes the node itself made, its next publish starts a new epoch
/// (the publish script compares Redis's offset with the node's), so not even the node
/// publishing hands out an offset twice, and the socket on another node is told.
#[tokio::test]
async fn a_node_publishing_after_its_own_writes_were_lost_starts_a_new_epoch() {
    let Some(redis) = own_redis("edits Redis keys").await else {
        return;
    };
    let (a, b) = (redis.node().await, redis.node().await);
    let u = user("own-lost");
    let (meta, epoch) = publish_five_and_lose_two(&redis, &a, &u).await;
    // A socket on node B, which never saw offsets 4 and 5, joins after the loss.
    let (mut ws, welcome) = b.connect("/ws/notifications/", &u).await;
    assert_eq!(welcome["offset"], 3);
    assert_eq!(welcome["epoch"], epoch.as_str());

    let receipt = a.notify(&u, json!({"n": "after"})).await;
    assert_eq!(receipt["offset"], 1, "a new epoch, not offset 4 again: {receipt}");
    let new_epoch = redis.cli(&["HGET", &meta, "epoch"]).await;
    assert_ne!(new_epoch, epoch);
    let (got, told) = read_checked(&mut ws, &welcome, 1).await;
    assert_eq!(told.len(), 1, "the socket is told the new epoch: {got:?}");
    assert_eq!(told[0]["epoch"], new_epoch.as_str());
    assert_eq!(got[0]["notification"]["n"], "after");

    // A client resuming from offset 5 of the old epoch learns it cannot recover.
    let (mut resumed, _) = b
        .connect(&format!("/ws/notifications/?since=5&epoch={epoch}"), &u)
        .await;
    let recovered = resumed.next_json().await;
    assert_eq!(recovered["recovered"], false, "{recovered}");
}

/// Writes lost on a channel no node listens to, and to which nothing more is published
/// (the last message of an answer, say): the node that was acknowledged them compares
/// with Redis after its connection to Redis comes back, starts a new epoch, and tells
/// every node (a socket that joined meanwhile is told in band).
#[tokio::test]
async fn lost_writes_on_a_channel_nobody_listens_to_are_found_after_a_reconnect() {
    let Some(redis) = own_redis("edits Redis keys").await else {
        return;
    };
    let (a, b) = (redis.node().await, redis.node().await);
    let u = user("unheard");
    let (meta, epoch) = publish_five_and_lose_two(&redis, &a, &u).await;
    let (mut ws, welcome) = b.connect("/ws/notifications/", &u).await;
    assert_eq!(welcome["epoch"], epoch.as_str());

    // Every connection of both nodes drops and comes back, as after a failover (node
    // A's subscription connection holds no channel, so it is a "normal" one).
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]).await;
    let told = ws.next_json().await;
    assert_eq!(told["status"], "recovered", "{told}");
    assert_eq!(told["recovered"], false, "{told}");
    assert_ne!(told["epoch"], epoch.as_str(), "{told}");
    assert_eq!(
        redis.cli(&["HGET", &meta, "epoch"]).await,
        told["epoch"].as_str().unwrap(),
        "Redis has the new epoch"
    );
    // Publishes from a node that knew nothing go on in the new epoch.
    b.notify(&u, json!({"n": "next"})).await;
    let next = ws.next_json().await;
    assert_eq!(next["epoch"], told["epoch"], "{next}");
    assert_eq!(next["offset"], told["offset"].as_u64().unwrap() + 1, "{next}");
}

/// The first command after the subscription comes back may fail: a failover drops the
/// command connection too, and it may still be reconnecting. The node reads the
/// channel's position once more rather than close its sockets with 1001 (a
/// read made to fail here by giving the channel's state the wrong type until it failed).
#[tokio::test]
async fn a_catch_up_whose_first_read_fails_is_tried_again_not_closed() {
    let Some(redis) = own_redis("edits Redis keys").await else {
        return;
    };
    let a = redis.node().await;
    let u = user("retried");
    let (mut ws, welcome) = a.connect("/ws/notifications/", &u).await;
    a.notify(&u, json!({"n": 1})).await;
    read_checked(&mut ws, &welcome, 1).await;
    let meta = format!("herald:{{notifications:{u}}}:meta");
    let fields = redis.cli(&["HGETALL", &meta]).await;
    let fields: Vec<&str> = fields.lines().collect();
    assert!(fields.contains(&"epoch"), "{fields:?}");
    let before = wrong_type_errors(&redis).await;
    redis.cli(&["DEL", &meta]).await;
    redis.cli(&["SET", &meta, "not a hash"]).await;
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while wrong_type_errors(&redis).await == before {
        assert!(Instant::now() < deadline, "the catch-up never read the channel");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Back in one step, before the second try (250 ms after the first).
    let mut restore = vec![
        "EVAL",
        "redis.call('DEL', KEYS[1]); return redis.call('HSET', KEYS[1], unpack(ARGV))",
        "1",
        meta.as_str(),
    ];
    restore.extend(&fields);
    redis.cli(&restore).await;
    // The second read finds the channel as it was: nothing to tell, and the next
    // message follows in the same epoch.
    tokio::time::sleep(Duration::from_millis(800)).await;
    a.notify(&u, json!({"n": 2})).await;
    let next = ws.next_json().await;
    assert_eq!(next["notification"]["n"], 2, "{next}");
    assert_eq!(next["offset"], 2, "{next}");
    assert_eq!(next["epoch"], welcome["epoch"], "{next}");
}

/// A catch-up where many channels cannot be read pauses once for all of them, not once
/// a channel: while it runs it holds the subscriber's lock that every subscribe waits
/// for, so its length must not grow with the number of failing channels. 96 channels
/// whose meta keys are not hashes fail both tries; every socket is closed (1001) about
/// one pause (250 ms) after the first read fails. A pause a channel, 16 at a time, took
/// six pauses (1.5 s) at least.
#[tokio::test]
async fn a_catch_up_of_many_unreadable_channels_pauses_once_for_all_of_them() {
    const CHANNELS: usize = 96;
    let Some(redis) = own_redis("edits Redis keys").await else {
        return;
    };
    let a = redis.node().await;
    let mut sockets = Vec::new();
    let mut metas = Vec::new();
    for n in 0..CHANNELS {
        let u = user(&format!("unreadable{n}"));
        sockets.push(a.connect("/ws/notifications/", &u).await.0);
        metas.push(format!("herald:{{notifications:{u}}}:meta"));
    }
    let before = wrong_type_errors(&redis).await;
    let count = CHANNELS.to_string();
    let mut spoil = vec![
        "EVAL",
        "for _, key in ipairs(KEYS) do redis.call('DEL', key); redis.call('SET', key, 'not a hash') end",
        count.as_str(),
    ];
    spoil.extend(metas.iter().map(String::as_str));
    redis.cli(&spoil).await;
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while wrong_type_errors(&redis).await == before {
        assert!(Instant::now() < deadline, "the catch-up never read the channels");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_failure = Instant::now();
    let closes = futures_util::future::join_all(sockets.iter_mut().map(WsClient::expect_close)).await;
    let took = first_failure.elapsed();
    eprintln!("{CHANNELS} unreadable channels closed {took:?} after the first failed read");
    for (code, reason) in closes {
        assert_eq!(code, 1001, "{reason}");
    }
    assert!(
        took < Duration::from_millis(1200),
        "closing {CHANNELS} unreadable channels took {took:?} after the first failed read"
    );
}

/// The same loss found without a publish: after its subscription reconnects, the node
/// compares the channel's offset in Redis with the highest it has seen, finds it went
/// back, starts a new epoch and tells the socket.
#[tokio::test]
async fn offsets_that_went_back_are_found_when_the_node_catches_up() {
    let Some(redis) = own_redis("edits Redis keys").await else {
        return;
    };
    let a = redis.node().await;
    let u = user("catchup");
    let (mut ws, welcome) = a.connect("/ws/notifications/", &u).await;
    for n in 1..=4 {
        a.notify(&u, json!({"n": n})).await;
    }
    read_checked(&mut ws, &welcome, 4).await;
    let meta = format!("herald:{{notifications:{u}}}:meta");
    redis.cli(&["HSET", &meta, "offset", "2"]).await;
    // Cut the node's subscription connection; it reconnects and catches up.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    let told = ws.next_json().await;
    assert_eq!(told["recovered"], false, "{told}");
    assert_ne!(told["epoch"], welcome["epoch"]);
    a.notify(&u, json!({"n": "next"})).await;
    let next = ws.next_json().await;
    assert_eq!(next["notification"]["n"], "next");
    assert_eq!(next["offset"], told["offset"].as_u64().unwrap() + 1);
}

/// Messages published while a node's subscription was cut off reach its sockets when it
/// reconnects, even when nothing more is published after them (the last message of an
/// LLM answer, say), instead of waiting for a next message to reveal the gap.
#[tokio::test]
async fn messages_missed_by_a_cut_off_subscription_are_delivered_on_reconnect() {
    let Some(redis) = own_redis("cuts Redis connections").await else {
        return;
    };
    let (a, b) = (redis.node().await, redis.node().await);
    let u = user("missed");
    let (mut ws, welcome) = b.connect("/ws/notifications/", &u).await;
    a.notify(&u, json!({"n": 1})).await;
    read_checked(&mut ws, &welcome, 1).await;
    // Pause B's subscription connection's clients so the next publishes reach Redis
    // while B does not receive them: kill it and publish at once.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    for n in 2..=4 {
        a.notify(&u, json!({"n": n})).await;
    }
    let mut welcome_after = welcome.clone();
    welcome_after["offset"] = json!(1);
    let (got, told) = read_checked(&mut ws, &welcome_after, 3).await;
    assert!(told.is_empty(), "same epoch: nothing to tell {told:?}");
    let ns: Vec<&Value> = got.iter().map(|m| &m["notification"]["n"]).collect();
    assert_eq!(ns, [2, 3, 4]);
}
