//! The scenarios, one fault each (issue 14's table), each ending in one [`Row`]:
//!
//! - a: socket kills and node SIGKILLs on one Redis;
//! - b: Redis SIGKILLed and restarted empty;
//! - c: a Redis Cluster failover that lost acknowledged writes;
//! - d: a Redis Cluster primary SIGKILLed (does the outage stay on its shard?);
//! - e: publishes that time out while Redis is stopped, retried with the same key;
//! - f: a member removed on one node while the socket is on another;
//! - g: a `herald worker` SIGKILLed while it holds 25 tasks;
//! - h: three nodes started at once on a fresh SQLite file.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use crate::client::{ClientRecord, ClientSpec, Fleet, FleetOptions};
use crate::ledger::{tally, Tally};
use crate::procs::{key_slot, start_nodes, Cluster, Herald, HeraldOptions, Redis, API_KEY};
use crate::publish::{Publish, PublishOptions, Publisher};
use crate::report::Row;
use crate::token::mint;

/// What every scenario gets.
pub struct Ctx {
    /// The directory holding the release `herald`.
    pub bin: PathBuf,
    /// This run's scratch directory (logs, databases).
    pub dir: PathBuf,
    pub quick: bool,
}

impl Ctx {
    fn scratch(&self, name: &str) -> anyhow::Result<PathBuf> {
        // A scenario run twice gets a second directory (a Cluster node refuses to join
        // with an old nodes.conf).
        let mut dir = self.dir.join(name);
        let mut n = 1;
        while dir.exists() {
            n += 1;
            dir = self.dir.join(format!("{name}-{n}"));
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

pub const ALL: [char; 8] = ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'];

pub fn title(id: char) -> &'static str {
    match id {
        'a' => "socket kills + node SIGKILL, one Redis",
        'b' => "Redis SIGKILLed, restarted without persistence",
        'c' => "Redis Cluster failover that lost writes",
        'd' => "Redis Cluster, one primary SIGKILLed",
        'e' => "publish timed out (503), retried with the same Idempotency-Key",
        'f' => "member removed on node A, org socket on node B",
        'g' => "herald worker SIGKILLed holding 25 tasks",
        'h' => "3 nodes started together on a fresh SQLite file",
        _ => "unknown",
    }
}

pub async fn run(ctx: &Ctx, id: char) -> Row {
    let started = Instant::now();
    let result = match id {
        'a' => node_kills(ctx).await,
        'b' => redis_restart(ctx).await,
        'c' => cluster_lost_writes(ctx).await,
        'd' => cluster_primary_down(ctx).await,
        'e' => idempotent_retry(ctx).await,
        'f' => member_removal(ctx).await,
        'g' => worker_takeover(ctx).await,
        'h' => concurrent_start(ctx).await,
        other => Err(anyhow!("no scenario {other}")),
    };
    let mut row = match result {
        Ok(row) => row,
        Err(err) => Row {
            finding: "did not run".to_owned(),
            error: Some(format!("{err:#}")),
            ..Row::default()
        },
    };
    row.id = id.to_string();
    row.title = title(id).to_owned();
    row.seconds = started.elapsed().as_secs_f64();
    row
}

/// Clients of org channels: user `{prefix}u{i}` on org `{prefix}o{i % orgs}`.
fn org_clients(prefix: &str, clients: usize, orgs: usize) -> anyhow::Result<(Vec<ClientSpec>, Vec<String>)> {
    let org_ids: Vec<String> = (0..orgs).map(|n| format!("{prefix}o{n}")).collect();
    let mut specs = Vec::new();
    for i in 0..clients {
        let org = &org_ids[i % orgs];
        let user = format!("{prefix}u{i}");
        specs.push(ClientSpec {
            token: mint(&user, std::slice::from_ref(org))?,
            user,
            channel: format!("org:{org}"),
            path: format!("/ws/events/{org}/"),
        });
    }
    Ok((specs, org_ids))
}

/// A load of org events under a fault.
struct Load {
    nodes: Vec<String>,
    clients: usize,
    orgs: usize,
    rate: f64,
    kill_mean: Option<Duration>,
    retry: bool,
    /// How long publishing lasts; the fault runs within it.
    duration: Duration,
    prefix: &'static str,
}

struct LoadResult {
    publishes: Vec<Publish>,
    clients: Vec<ClientRecord>,
    tally: Tally,
    /// What the fault script reported.
    fault: Vec<String>,
}

/// Connects the clients, publishes for `load.duration` while `fault` runs, stops the
/// socket kills and the publisher, lets the clients catch up, and counts.
async fn run_load(
    load: &Load,
    fault: impl Future<Output = anyhow::Result<Vec<String>>>,
) -> anyhow::Result<LoadResult> {
    let (specs, orgs) = org_clients(load.prefix, load.clients, load.orgs)?;
    let fleet = Fleet::start(
        specs,
        &FleetOptions {
            nodes: load.nodes.clone(),
            kill_mean: load.kill_mean,
        },
    );
    fleet.wait_welcomed(load.clients, Duration::from_secs(60)).await?;
    let publisher = Publisher::start(&PublishOptions {
        nodes: load.nodes.clone(),
        orgs,
        rate: load.rate,
        retry: load.retry,
    });
    let (fault, ()) = tokio::join!(fault, sleep(load.duration));
    fleet.set_kills(false);
    let publishes = publisher.finish().await;
    // Time for sockets cut by the fault to reconnect and resume.
    sleep(Duration::from_secs(8)).await;
    let clients = fleet.finish().await;
    let fault = fault?;
    let tally = tally(&publishes, &clients);
    Ok(LoadResult {
        publishes,
        clients,
        tally,
        fault,
    })
}

fn claims_options(redis_url: Option<String>, dir: &Path) -> HeraldOptions {
    HeraldOptions {
        redis_url,
        database_url: format!("sqlite://{}/herald.db", dir.display()),
        membership: "claims".to_owned(),
        workers: 0,
        toml: String::new(),
    }
}

/// The most frequent of `items`, with their counts: `3× a; 1× b`.
fn top<'a>(items: impl Iterator<Item = &'a str>, n: usize) -> String {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for item in items {
        *counts.entry(item).or_default() += 1;
    }
    let mut sorted: Vec<(&str, usize)> = counts.into_iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if sorted.is_empty() {
        return "none".to_owned();
    }
    sorted
        .iter()
        .take(n)
        .map(|(item, count)| format!("{count}× {item}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn addresses(nodes: &[Herald]) -> Vec<String> {
    nodes.iter().map(Herald::address).collect()
}

fn at(t0: Instant) -> String {
    format!("t={:.1}s", t0.elapsed().as_secs_f64())
}

fn row_from(result: &LoadResult, finding: String) -> Row {
    let mut details = result.fault.clone();
    let t = &result.tally;
    details.push(format!(
        "{} clients, {} socket kills; {} missing messages covered by recovered:false; \
         {} clients with a silent loss; {} messages arrived in an epoch the client was not told about; \
         {} offsets skipped inside an epoch without notice",
        t.clients,
        t.socket_kills,
        t.told_messages,
        t.clients_with_loss,
        t.untold_epoch_switches,
        t.offset_gaps
    ));
    details.extend(t.loss_examples.iter().map(|e| format!("silent loss: {e}")));
    let failures: usize = result.publishes.iter().filter(|p| p.acked_at.is_none()).count();
    if failures > 0 {
        details.push(format!("{failures} publishes never got a 202"));
    }
    if t.out_of_order > 0 {
        details.push(format!(
            "{} of the {} out-of-order messages never got a 202 but were stored after the next one (answers: {:?})",
            t.out_of_order_unacknowledged, t.out_of_order, t.out_of_order_answers
        ));
    }
    Row {
        tally: Some(result.tally.clone()),
        finding,
        details,
        ..Row::default()
    }
}

/// a: randomized socket kills throughout, and two nodes SIGKILLed and restarted.
async fn node_kills(ctx: &Ctx) -> anyhow::Result<Row> {
    let dir = ctx.scratch("a")?;
    let redis = Redis::start(&dir, "redis").await?;
    let mut nodes = start_nodes(&ctx.bin, &dir, 3, &claims_options(Some(redis.url()), &dir)).await?;
    let load = Load {
        nodes: addresses(&nodes),
        clients: ctx.pick(100, 200),
        orgs: 20,
        rate: 50.0,
        kill_mean: Some(Duration::from_secs(15)),
        retry: false,
        duration: Duration::from_secs(ctx.pick(25, 55)),
        prefix: "a",
    };
    let kills: Vec<(u64, usize)> = ctx.pick(vec![(8, 1)], vec![(10, 1), (30, 2)]);
    let fault = async {
        let t0 = Instant::now();
        let mut log = Vec::new();
        for (second, node) in kills {
            sleep_until_second(t0, second).await;
            nodes[node].proc.signal("KILL").await?;
            nodes[node].proc.kill().await;
            log.push(format!("{} node {node} SIGKILLed", at(t0)));
            sleep(Duration::from_secs(5)).await;
            nodes[node].proc.start()?;
            nodes[node].wait_up(Duration::from_secs(30)).await?;
            log.push(format!("{} node {node} up again", at(t0)));
        }
        Ok(log)
    };
    let result = run_load(&load, fault).await?;
    Ok(row_from(&result, String::new()))
}

async fn sleep_until_second(t0: Instant, second: u64) {
    tokio::time::sleep_until(t0 + Duration::from_secs(second)).await;
}

/// b: Redis SIGKILLed and started again empty, under load, twice.
async fn redis_restart(ctx: &Ctx) -> anyhow::Result<Row> {
    let dir = ctx.scratch("b")?;
    let mut redis = Redis::start(&dir, "redis").await?;
    let nodes = start_nodes(&ctx.bin, &dir, 3, &claims_options(Some(redis.url()), &dir)).await?;
    let load = Load {
        nodes: addresses(&nodes),
        clients: ctx.pick(100, 200),
        orgs: 20,
        rate: 50.0,
        kill_mean: Some(Duration::from_secs(30)),
        retry: false,
        duration: Duration::from_secs(ctx.pick(28, 48)),
        prefix: "b",
    };
    let restarts: Vec<u64> = ctx.pick(vec![10], vec![10, 22, 34]);
    let fault = async {
        let t0 = Instant::now();
        let mut log = Vec::new();
        for second in restarts {
            sleep_until_second(t0, second).await;
            redis.proc.kill().await;
            log.push(format!("{} Redis SIGKILLed", at(t0)));
            sleep(Duration::from_secs(2)).await;
            redis.restart().await?;
            log.push(format!("{} Redis up again, empty", at(t0)));
        }
        Ok(log)
    };
    let result = run_load(&load, fault).await?;
    drop(nodes);
    Ok(row_from(&result, String::new()))
}

/// Which chaos channels (`org:{id}`) live on the primary on `port`.
fn channels_on(roles: &[crate::procs::ClusterRole], port: u16, orgs: &[String]) -> Vec<String> {
    let Some(primary) = roles.iter().find(|r| r.port == port) else {
        return Vec::new();
    };
    orgs.iter()
        .map(|org| format!("org:{org}"))
        .filter(|channel| {
            let slot = key_slot(channel);
            primary.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
        })
        .collect()
}

/// The healthy primary that owns the most of `orgs`' channels and none of `avoid`'s
/// slots, and its replica's port.
async fn busiest_primary(
    cluster: &Cluster,
    orgs: &[String],
    avoid: &[&str],
) -> anyhow::Result<(u16, u16, Vec<String>)> {
    let roles = cluster.roles().await?;
    let mut best: Option<(u16, u16, Vec<String>)> = None;
    for primary in roles.iter().filter(|r| r.primary && !r.failed) {
        let holds_avoided = avoid.iter().any(|key| {
            let slot = key_slot(key);
            primary.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
        });
        if holds_avoided {
            continue;
        }
        let Some(replica) = roles
            .iter()
            .find(|r| !r.primary && r.primary_id.as_deref() == Some(primary.id.as_str()))
        else {
            continue;
        };
        let channels = channels_on(&roles, primary.port, orgs);
        if best.as_ref().is_none_or(|(_, _, b)| channels.len() > b.len()) {
            best = Some((primary.port, replica.port, channels));
        }
    }
    best.ok_or_else(|| anyhow!("no primary with a replica in the cluster"))
}

fn prefixed_orgs(prefix: &str, orgs: usize) -> Vec<String> {
    (0..orgs).map(|n| format!("{prefix}o{n}")).collect()
}

/// c: the replica of one primary is stopped (replication cut), writes go on for 2 s, the
/// primary is SIGKILLed and the replica resumed: it is promoted without those writes.
async fn cluster_lost_writes(ctx: &Ctx) -> anyhow::Result<Row> {
    let dir = ctx.scratch("c")?;
    let mut cluster = Cluster::start(&dir).await?;
    let nodes = start_nodes(&ctx.bin, &dir, 3, &claims_options(Some(cluster.url()), &dir)).await?;
    let orgs = 16;
    let load = Load {
        nodes: addresses(&nodes),
        clients: 80,
        orgs,
        rate: 50.0,
        kill_mean: Some(Duration::from_secs(30)),
        retry: false,
        duration: Duration::from_secs(ctx.pick(30, 40)),
        prefix: "c",
    };
    let org_ids = prefixed_orgs(load.prefix, orgs);
    let fault = async {
        let t0 = Instant::now();
        let mut log = Vec::new();
        sleep_until_second(t0, 10).await;
        let (primary, replica, channels) = busiest_primary(&cluster, &org_ids, &[]).await?;
        let replica_node = cluster
            .node_by_port(replica)
            .ok_or_else(|| anyhow!("no replica on {replica}"))?;
        replica_node.proc.signal("STOP").await?;
        // The replication stream already in the stopped replica's socket would still
        // reach it on resuming: close the link now, so the next 2 s never get there.
        crate::procs::redis_cli(primary, &["client", "kill", "type", "replica"]).await?;
        log.push(format!(
            "{} replica :{replica} SIGSTOPped (replication of primary :{primary} cut; its shard holds {} of {orgs} channels)",
            at(t0),
            channels.len()
        ));
        sleep(Duration::from_secs(2)).await;
        let primary_node = cluster
            .node_by_port(primary)
            .ok_or_else(|| anyhow!("no primary on {primary}"))?;
        primary_node.proc.kill().await;
        log.push(format!("{} primary :{primary} SIGKILLed", at(t0)));
        sleep(Duration::from_millis(300)).await;
        let replica_node = cluster
            .node_by_port(replica)
            .ok_or_else(|| anyhow!("no replica on {replica}"))?;
        replica_node.proc.signal("CONT").await?;
        log.push(format!("{} replica :{replica} resumed", at(t0)));
        let healed = cluster.wait_healthy(Duration::from_secs(30)).await?;
        let roles = cluster.roles().await?;
        let promoted = roles.iter().any(|r| r.port == replica && r.primary);
        log.push(format!(
            "{} cluster healthy again after {:.1}s; replica :{replica} promoted: {promoted}",
            at(t0),
            healed.as_secs_f64()
        ));
        Ok(log)
    };
    let result = run_load(&load, fault).await?;
    drop(nodes);
    Ok(row_from(&result, String::new()))
}

/// d: one primary SIGKILLed (its replica takes over): do publishes and handshakes of
/// channels on the other primaries keep working?
async fn cluster_primary_down(ctx: &Ctx) -> anyhow::Result<Row> {
    let dir = ctx.scratch("d")?;
    let mut cluster = Cluster::start(&dir).await?;
    let nodes = start_nodes(&ctx.bin, &dir, 3, &claims_options(Some(cluster.url()), &dir)).await?;
    let orgs = 24;
    let load = Load {
        nodes: addresses(&nodes),
        clients: 120,
        orgs,
        rate: 50.0,
        // Many handshakes: each client reconnects every ~6 s.
        kill_mean: Some(Duration::from_secs(6)),
        retry: false,
        duration: Duration::from_secs(ctx.pick(25, 35)),
        prefix: "d",
    };
    let org_ids = prefixed_orgs(load.prefix, orgs);
    let affected = std::sync::Mutex::new(HashSet::new());
    let window = std::sync::Mutex::new(None);
    let fault = async {
        let t0 = Instant::now();
        let mut log = Vec::new();
        sleep_until_second(t0, 10).await;
        // Every handshake needs the primary holding the connection counts (`{conns}`):
        // the scenario fails another one, so that handshakes measure the shards.
        let (primary, _, channels) = busiest_primary(&cluster, &org_ids, &["conns"]).await?;
        if let Ok(mut set) = affected.lock() {
            set.extend(channels.iter().cloned());
        }
        // herald keeps every user's connection count under one hash tag: say whether
        // this primary holds it (handshakes of every channel need it).
        let conns_slot = key_slot("conns");
        let holds_counts = cluster
            .roles()
            .await?
            .iter()
            .any(|r| r.port == primary && r.slots.iter().any(|(a, b)| (*a..=*b).contains(&conns_slot)));
        let killed_at = Instant::now();
        cluster
            .node_by_port(primary)
            .ok_or_else(|| anyhow!("no primary on {primary}"))?
            .proc
            .kill()
            .await;
        log.push(format!(
            "{} primary :{primary} SIGKILLed (its shard holds {} of {orgs} channels{})",
            at(t0),
            channels.len(),
            if holds_counts {
                ", and the slot of herald's connection counts, `{conns}`"
            } else {
                ""
            }
        ));
        let healed = cluster.wait_healthy(Duration::from_secs(30)).await?;
        log.push(format!(
            "{} cluster healthy again after {:.1}s (replica promoted)",
            at(t0),
            healed.as_secs_f64()
        ));
        if let Ok(mut window) = window.lock() {
            *window = Some((killed_at, Instant::now() + Duration::from_secs(3)));
        }
        Ok(log)
    };
    let result = run_load(&load, fault).await?;
    drop(nodes);
    let affected = affected.into_inner().unwrap_or_default();
    let window = window.into_inner().unwrap_or_default();
    // Publishes and handshakes that failed, per class of channel.
    let mut counts: HashMap<bool, [u64; 4]> = HashMap::new();
    for publish in &result.publishes {
        let entry = counts.entry(affected.contains(&publish.channel)).or_default();
        entry[0] += 1;
        if publish.acked_at.is_none() {
            entry[1] += 1;
        }
    }
    for client in &result.clients {
        let entry = counts.entry(affected.contains(&client.channel)).or_default();
        for handshake in client.handshakes.iter().filter(|h| !h.unreachable) {
            entry[2] += 1;
            if !handshake.ok {
                entry[3] += 1;
            }
        }
    }
    let healthy = counts.get(&false).copied().unwrap_or_default();
    let hit = counts.get(&true).copied().unwrap_or_default();
    let finding = format!(
        "healthy shards: {} of {} publishes and {} of {} handshakes failed; affected shard: {} of {} publishes, {} of {} handshakes",
        healthy[1], healthy[0], healthy[3], healthy[2], hit[1], hit[0], hit[3], hit[2]
    );
    let mut row = row_from(&result, finding);
    if let Some((from, to)) = window {
        let in_window = |at: Instant| at >= from && at <= to;
        let healthy_publish_failures = result
            .publishes
            .iter()
            .filter(|p| !affected.contains(&p.channel) && in_window(p.first_sent))
            .filter(|p| p.acked_at.is_none())
            .count();
        let healthy_handshakes: Vec<_> = result
            .clients
            .iter()
            .filter(|c| !affected.contains(&c.channel))
            .flat_map(|c| c.handshakes.iter())
            .filter(|h| !h.unreachable && in_window(h.at))
            .collect();
        let failed: Vec<_> = healthy_handshakes.iter().filter(|h| !h.ok).collect();
        row.details.push(format!(
            "healthy-shard publishes that failed were answered: {}",
            top(
                result
                    .publishes
                    .iter()
                    .filter(|p| !affected.contains(&p.channel) && p.acked_at.is_none())
                    .filter_map(|p| p.attempts.last().map(String::as_str)),
                3
            )
        ));
        row.details.push(format!(
            "healthy-shard handshakes that failed: {}",
            top(failed.iter().filter_map(|h| h.failure.as_deref()), 3)
        ));
        row.details.push(format!(
            "during the failover (kill → healthy + 3 s): {healthy_publish_failures} healthy-shard publishes and {} of {} healthy-shard handshakes failed",
            failed.len(),
            healthy_handshakes.len(),
        ));
    }
    Ok(row)
}

/// e: Redis is SIGSTOPped (commands hang, publishes answer 503 after herald's timeout)
/// and resumed; the publisher retries every 503 with the same Idempotency-Key.
async fn idempotent_retry(ctx: &Ctx) -> anyhow::Result<Row> {
    let dir = ctx.scratch("e")?;
    let redis = Redis::start(&dir, "redis").await?;
    let nodes = start_nodes(&ctx.bin, &dir, 2, &claims_options(Some(redis.url()), &dir)).await?;
    let orgs = 8;
    let load = Load {
        nodes: addresses(&nodes),
        clients: 40,
        orgs,
        rate: 20.0,
        kill_mean: None,
        retry: true,
        duration: Duration::from_secs(ctx.pick(20, 30)),
        prefix: "e",
    };
    let pauses: Vec<u64> = ctx.pick(vec![6], vec![6, 17]);
    let fault = async {
        let t0 = Instant::now();
        let mut log = Vec::new();
        for second in pauses {
            sleep_until_second(t0, second).await;
            redis.proc.signal("STOP").await?;
            log.push(format!("{} Redis SIGSTOPped", at(t0)));
            sleep(Duration::from_secs(5)).await;
            redis.proc.signal("CONT").await?;
            log.push(format!("{} Redis resumed", at(t0)));
        }
        Ok(log)
    };
    let result = run_load(&load, fault).await?;
    // Messages stored twice: the same content id twice in a channel's history.
    let http = reqwest::Client::new();
    let mut stored_twice = 0;
    for org in prefixed_orgs(load.prefix, orgs) {
        let url = format!(
            "http://{}/api/v1/channels/org:{org}/history?since=0&limit=1000",
            load.nodes[0]
        );
        let history: Value = http
            .get(&url)
            .bearer_auth(API_KEY)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .json()
            .await
            .with_context(|| format!("GET {url}: not JSON"))?;
        let mut seen = HashSet::new();
        for message in history
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(cid) = message.pointer("/data/cid").and_then(Value::as_str) {
                if !seen.insert(cid.to_owned()) {
                    stored_twice += 1;
                }
            }
        }
    }
    let failed_attempts: usize = result
        .publishes
        .iter()
        .map(|p| p.attempts.iter().filter(|a| a.as_str() != "202").count())
        .sum();
    let retried = result.publishes.iter().filter(|p| p.attempts.len() > 1).count();
    let unknown: u32 = result.publishes.iter().map(|p| p.outcome_unknown).sum();
    let replayed = result.publishes.iter().filter(|p| p.replayed).count();
    let finding = format!(
        "{stored_twice} messages stored twice (history); {retried} publishes retried after {failed_attempts} failed attempts"
    );
    let mut row = row_from(&result, finding);
    row.details.push(format!(
        "503 bodies saying outcome unknown: {unknown}; retries answered Idempotent-Replayed: {replayed}; failed attempts were answered: {}",
        top(
            result
                .publishes
                .iter()
                .flat_map(|p| p.attempts.iter())
                .map(String::as_str)
                .filter(|a| *a != "202"),
            3
        )
    ));
    drop(nodes);
    Ok(row)
}

/// f: a member is removed through node A while their org socket is on node B.
async fn member_removal(ctx: &Ctx) -> anyhow::Result<Row> {
    let dir = ctx.scratch("f")?;
    let redis = Redis::start(&dir, "redis").await?;
    let mut options = claims_options(Some(redis.url()), &dir);
    options.membership = "database".to_owned();
    let nodes = start_nodes(&ctx.bin, &dir, 2, &options).await?;
    let (a, b) = (nodes[0].address(), nodes[1].address());
    let http = reqwest::Client::new();
    let rounds = ctx.pick(2, 5);
    let mut times = Vec::new();
    let mut details = Vec::new();
    for round in 0..rounds {
        let (org, user) = (format!("fo{round}"), format!("fu{round}"));
        let member = format!("http://{a}/api/v1/orgs/{org}/members/{user}");
        let status = http.put(&member).bearer_auth(API_KEY).send().await?.status();
        if !status.is_success() {
            bail!("PUT {member} answered {status}");
        }
        let token = mint(&user, &[])?;
        let uri = format!("ws://{b}/ws/events/{org}/?token={token}");
        let mut ws = crate::client::open(&b, &uri)
            .await
            .map_err(|(_, err)| err.context(format!("cannot open {b}/ws/events/{org}/")))?;
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(message))) if message.as_text().is_some_and(|t| t.contains("\"connected\"")) => {}
            other => bail!("no welcome on node B: {other:?}"),
        }
        let removed_at = Instant::now();
        let status = http.delete(&member).bearer_auth(API_KEY).send().await?.status();
        if !status.is_success() {
            bail!("DELETE {member} answered {status}");
        }
        // An event after the removal: a socket still open would get it.
        let event = format!("http://{a}/api/v1/orgs/{org}/events");
        let _ = http
            .post(&event)
            .bearer_auth(API_KEY)
            .json(&json!({"event_type": "after-removal", "data": {}}))
            .send()
            .await;
        let limit = Duration::from_secs(10);
        let mut events_after = 0;
        let outcome = loop {
            let left = limit.saturating_sub(removed_at.elapsed());
            match tokio::time::timeout(left, ws.next()).await {
                Err(_) => break None,
                Ok(None | Some(Err(_))) => break Some((removed_at.elapsed(), None)),
                Ok(Some(Ok(message))) => {
                    if let Some((code, _)) = message.as_close() {
                        break Some((removed_at.elapsed(), Some(u16::from(code))));
                    }
                    if message.as_text().is_some_and(|t| t.contains("org_event")) {
                        events_after += 1;
                    }
                }
            }
        };
        match outcome {
            Some((elapsed, code)) => {
                details.push(format!(
                    "round {round}: closed {} after {} ms; {events_after} events received after the removal",
                    code.map_or("without a close frame".to_owned(), |c| c.to_string()),
                    elapsed.as_millis()
                ));
                times.push((elapsed, code));
            }
            None => {
                details.push(format!(
                    "round {round}: still open {} s after the removal; {events_after} events received after it",
                    limit.as_secs()
                ));
                times.push((limit, None));
            }
        }
    }
    let closed_in_time = times
        .iter()
        .filter(|(t, code)| *code == Some(4003) && *t <= Duration::from_secs(1))
        .count();
    let slowest = times.iter().map(|(t, _)| *t).max().unwrap_or_default();
    let finding = format!(
        "{closed_in_time} of {rounds} sockets closed with 4003 within 1 s (slowest: {})",
        if times.iter().any(|(_, c)| c.is_none()) {
            format!("not closed in {} s", slowest.as_secs())
        } else {
            format!("{} ms", slowest.as_millis())
        }
    );
    drop(nodes);
    Ok(Row {
        finding,
        details,
        ..Row::default()
    })
}

/// g: a `herald worker` holding 25 running tasks is SIGKILLed; another takes over.
async fn worker_takeover(ctx: &Ctx) -> anyhow::Result<Row> {
    const TASKS: usize = 25;
    const CLAIM_IDLE_MS: u64 = 5_000;
    let dir = ctx.scratch("g")?;
    let redis = Redis::start(&dir, "redis").await?;
    let mut options = claims_options(Some(redis.url()), &dir);
    options.toml = format!("task_claim_idle_ms = {CLAIM_IDLE_MS}");
    let nodes = start_nodes(&ctx.bin, &dir, 1, &options).await?;
    let node = nodes[0].address();
    options.workers = 64;
    let mut worker_a = Herald::worker(&ctx.bin, &dir, "worker-a", &options)?;
    worker_a.proc.start()?;
    worker_a.wait_up(Duration::from_secs(10)).await?;
    let mut worker_b = Herald::worker(&ctx.bin, &dir, "worker-b", &options)?;

    let prompt: String = (0..300).map(|n| format!("word{n} ")).collect();
    let expected = format!("Echo: {}", prompt.trim());
    let users: Vec<String> = (0..TASKS).map(|n| format!("gu{n}")).collect();
    let mut specs = Vec::new();
    for user in &users {
        specs.push(ClientSpec {
            token: mint(user, &[])?,
            user: user.clone(),
            channel: format!("frames:{user}"),
            path: format!("/ws/frame-stream/{user}/"),
        });
    }
    let tokens: Vec<String> = specs.iter().map(|s| s.token.clone()).collect();
    let fleet = Fleet::start(
        specs,
        &FleetOptions {
            nodes: vec![node.clone()],
            kill_mean: Some(Duration::from_secs(20)),
        },
    );
    fleet.wait_welcomed(TASKS, Duration::from_secs(30)).await?;
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for (user, token) in users.iter().zip(&tokens) {
        let url = format!("http://{node}/api/chat/generate-response/");
        let answer: Value = http
            .post(&url)
            .bearer_auth(token)
            .json(&json!({"user_id": user, "chat_id": format!("chat-{user}"), "prompt": prompt}))
            .send()
            .await?
            .json()
            .await?;
        let task = answer
            .get("task_id")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("no task_id in {answer}"))?;
        tasks.push((task.to_owned(), token.clone()));
    }
    // Every task running on worker A.
    let statuses = |http: reqwest::Client, tasks: Vec<(String, String)>, node: String| async move {
        let mut out = Vec::new();
        for (task, token) in &tasks {
            let url = format!("http://{node}/api/chat/tasks/{task}");
            let status = match http.get(&url).bearer_auth(token).send().await {
                Ok(response) => response
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_default(),
                Err(_) => String::new(),
            };
            out.push(status);
        }
        out
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = statuses(http.clone(), tasks.clone(), node.clone()).await;
        if now.iter().all(|s| s == "running") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the 25 tasks were not all running on worker A within 20 s: {now:?}");
        }
        sleep(Duration::from_millis(200)).await;
    }
    worker_b.proc.start()?;
    worker_b.wait_up(Duration::from_secs(10)).await?;
    let killed_at = Instant::now();
    worker_a.proc.kill().await;
    let limit = Duration::from_millis(CLAIM_IDLE_MS) + Duration::from_secs(90);
    let mut ended = vec![None; TASKS];
    while ended.iter().any(Option::is_none) && killed_at.elapsed() < limit {
        let now = statuses(http.clone(), tasks.clone(), node.clone()).await;
        for (n, status) in now.iter().enumerate() {
            if ended[n].is_none() && matches!(status.as_str(), "completed" | "failed" | "cancelled") {
                ended[n] = Some((killed_at.elapsed(), status.clone()));
            }
        }
        sleep(Duration::from_millis(250)).await;
    }
    sleep(Duration::from_secs(3)).await;
    fleet.set_kills(false);
    let records = fleet.finish().await;
    let completed = ended
        .iter()
        .filter(|e| e.as_ref().is_some_and(|(_, s)| s == "completed"))
        .count();
    let last = ended.iter().flatten().map(|(t, _)| *t).max().unwrap_or_default();
    let mut complete_streams = 0;
    let mut problems = Vec::new();
    for record in &records {
        match check_stream(record, &expected) {
            Ok(()) => complete_streams += 1,
            Err(problem) => problems.push(format!("{}: {problem}", record.spec_user)),
        }
    }
    let finding = format!(
        "{completed} of {TASKS} completed, the last {:.1} s after the kill (claim timeout {:.0} s); {complete_streams} of {TASKS} streams complete",
        last.as_secs_f64(),
        Duration::from_millis(CLAIM_IDLE_MS).as_secs_f64()
    );
    let mut details = vec![format!(
        "task_claim_idle_ms = {CLAIM_IDLE_MS}; 300-word echo answers (20 ms a word); worker B started just before worker A was SIGKILLed"
    )];
    details.extend(problems.into_iter().take(5));
    drop(nodes);
    Ok(Row {
        finding,
        details,
        ..Row::default()
    })
}

/// A stream is complete when its streaming frames have indexes 0, 1, 2, … with no gap
/// and no repeat, they spell the expected answer, the `llm_response` says the same, and
/// `llm_status completed` is the last message.
fn check_stream(record: &ClientRecord, expected: &str) -> Result<(), String> {
    let mut next = 0;
    let mut text = String::new();
    let mut response = None;
    let mut last_status = None;
    for delivery in &record.deliveries {
        let Some(message) = &delivery.llm else {
            continue;
        };
        match message.get("type").and_then(Value::as_str) {
            Some("llm_frame") => {
                let Some(frame) = message.get("frame") else {
                    continue;
                };
                if frame.get("status").and_then(Value::as_str) != Some("streaming") {
                    continue;
                }
                let index = frame.get("index").and_then(Value::as_u64);
                if index != Some(next) {
                    return Err(format!("frame index {index:?} where {next} was next"));
                }
                next += 1;
                text.push_str(frame.get("delta").and_then(Value::as_str).unwrap_or_default());
            }
            Some("llm_response") => {
                response = message
                    .pointer("/data/response")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
            }
            Some("llm_status") => {
                last_status = message.get("status").and_then(Value::as_str).map(str::to_owned);
            }
            _ => {}
        }
    }
    if last_status.as_deref() != Some("completed") {
        return Err(format!("last status {last_status:?}"));
    }
    if response.as_deref() != Some(expected) {
        return Err("llm_response differs from the expected answer".to_owned());
    }
    if text.trim() != expected {
        return Err(format!("{next} frames do not spell the answer"));
    }
    Ok(())
}

/// h: three `herald serve` processes started at the same moment on one fresh SQLite
/// file, several rounds.
async fn concurrent_start(ctx: &Ctx) -> anyhow::Result<Row> {
    let rounds = ctx.pick(4, 10);
    let mut failed = 0;
    let mut reasons: Vec<String> = Vec::new();
    for round in 0..rounds {
        let dir = ctx.scratch(&format!("h/{round}"))?;
        let options = claims_options(None, &dir);
        let mut nodes = Vec::new();
        for n in 0..3 {
            nodes.push(Herald::serve(&ctx.bin, &dir, &format!("node-{n}"), &options)?);
        }
        for node in &mut nodes {
            node.proc.start()?;
        }
        for node in &mut nodes {
            if let Err(err) = node.wait_up(Duration::from_secs(20)).await {
                failed += 1;
                // The same error in every round: name the scratch directory once.
                let text = format!("{err:#}").replace(&dir.display().to_string(), "<scratch>");
                let line = text
                    .lines()
                    .find(|l| l.contains("rror") || l.contains("failed"))
                    .unwrap_or(text.lines().next().unwrap_or_default())
                    .trim()
                    .to_owned();
                if !reasons.contains(&line) {
                    reasons.push(line);
                }
            }
        }
    }
    let starts = rounds * 3;
    let mut details = vec![format!(
        "{rounds} rounds of 3 nodes on a fresh sqlite file (memory broker)"
    )];
    details.extend(reasons.into_iter().take(3).map(|r| format!("error: {r}")));
    Ok(Row {
        finding: format!("{failed} of {starts} starts failed"),
        details,
        ..Row::default()
    })
}
