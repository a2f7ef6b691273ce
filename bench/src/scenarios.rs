//! The scenarios of issue 8, each against a server in a fresh process: `idle`, `fanout`
//! (a sweep over the number of subscribers), `unicast`, `stream`, `max` (fan-out at a
//! rising rate until loss or p99 > 1 s), `capacity` (the most idle sockets one herald
//! holds), `cluster` (herald nodes sharing one Redis) and `multiplex` (one `/ws/` socket
//! with three subscriptions per user against three single-channel sockets).
//!
//! Every loop is bounded in count and in time: rounds wait for their deliveries at most
//! [`DRAIN_TIMEOUT`] after the last publish, and give up sooner when nothing arrives.

use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::fleet::{ConnectSummary, Fleet};
use crate::procfs::{self, Usage};
use crate::publish::{PublishReport, Publisher, Target};
use crate::servers::{self, Kind, Options, Programs, Running};
use crate::wire::{Endpoint, StreamReport};

/// How long a round waits for deliveries after its last publish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// A round stops waiting when nothing has arrived for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(4);
/// A fan-out step is clean only with p99 under this.
const MAX_CLEAN_P99_US: u64 = 1_000_000;
/// The org every fan-out socket joins.
pub const ORG: &str = "acme";

/// Measurement context shared by the scenarios.
pub struct Ctx {
    pub programs: Programs,
    pub ticks_per_second: f64,
}

/// What the server's processes have used so far, and the CPU seconds of its Redis when
/// it has one.
fn cpu(ctx: &Ctx, running: &Running) -> (Usage, f64) {
    let server = running
        .pids()
        .iter()
        .filter_map(|pid| procfs::usage(*pid, ctx.ticks_per_second).ok())
        .fold(Usage::default(), |sum, usage| sum + usage);
    let redis = running
        .redis_pid()
        .and_then(|pid| procfs::usage(pid, ctx.ticks_per_second).ok())
        .map_or(0.0, |usage| usage.cpu());
    (server, redis)
}

/// Under a profiling `--wrap`, marks the measured phase so the profile holds it alone:
/// at its start (`dump: None`) and at its end (`dump: Some(label)`).
///
/// - callgrind: zeroes the server's counters at the start and dumps them, named
///   `label`, at the end.
/// - `perf record --switch-output`: sends perf `SIGUSR2` at both marks, so it starts a
///   new output file at each: each measured phase is a file of its own, the second,
///   fourth, … of a server.
///
/// Django's stack is never wrapped, so it is never marked (`SIGUSR2` would end daphne).
async fn profiler_mark(ctx: &Ctx, running: &Running, dump: Option<&str>) {
    let Some(wrap) = ctx.programs.wrap.as_deref() else {
        return;
    };
    if running.kind == Kind::Django {
        return;
    }
    let perf = wrap.contains("perf record") && wrap.contains("--switch-output");
    if !perf && !wrap.contains("callgrind") {
        return;
    }
    for pid in running.pids() {
        let (program, action) = if perf {
            ("kill", "-USR2".to_owned())
        } else {
            let action = dump.map_or_else(|| "--zero".to_owned(), |label| format!("--dump={label}"));
            ("callgrind_control", action)
        };
        let _ = tokio::process::Command::new(program)
            .args([action, pid.to_string()])
            .output()
            .await;
    }
}

fn rss(running: &Running) -> u64 {
    running
        .pids()
        .iter()
        .filter_map(|pid| procfs::rss_bytes(*pid).ok())
        .sum()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdleResult {
    pub server: String,
    pub connect: ConnectSummary,
    pub rss_before: u64,
    pub rss_after: u64,
    pub rss_per_socket: f64,
    /// Server CPU time over the connect phase, per socket opened.
    pub cpu_us_per_handshake: f64,
    /// The server's Redis (Django's channel layer), after connecting.
    pub redis_rss: u64,
}

/// A publishing round: what was offered, what arrived, and what it cost.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundResult {
    pub server: String,
    pub subscribers: u64,
    pub events: u64,
    pub rate: f64,
    pub offered_deliveries_per_s: f64,
    pub publish: PublishReport,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub stale: u64,
    pub closed: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub seconds: f64,
    pub deliveries_per_s: f64,
    pub cpu_seconds: f64,
    pub cpu_us_per_delivery: f64,
    /// Where `cpu_seconds` went (kept as keys of the result itself).
    #[serde(flatten)]
    pub split: Split,
    pub redis_cpu_seconds: f64,
}

/// Where a server's CPU went over a measured phase, beside its total: stored flattened
/// in [`RoundResult`] and [`StreamResult`], each field a key of its own, absent (0) in
/// results older than the field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Split {
    /// The part of the CPU seconds spent in the kernel (from 2026-12-07).
    #[serde(default)]
    pub system_seconds: f64,
    /// Minor page faults, mostly memory touched for the first time (from 2026-12-07).
    #[serde(default)]
    pub minor_faults: u64,
    /// The threads' voluntary context switches: each is a thread going to sleep, to be
    /// woken again (from 2026-12-07T05).
    #[serde(default)]
    pub voluntary_switches: u64,
    /// The threads' involuntary context switches (preemptions).
    #[serde(default)]
    pub involuntary_switches: u64,
}

impl From<Usage> for Split {
    fn from(used: Usage) -> Self {
        Self {
            system_seconds: used.system,
            minor_faults: used.minor_faults,
            voluntary_switches: used.voluntary_switches,
            involuntary_switches: used.involuntary_switches,
        }
    }
}

impl Split {
    /// For a log line: the kernel's share of `cpu_seconds`, and the faults and switches
    /// a `unit` over `messages`.
    fn describe(&self, cpu_seconds: f64, messages: u64, unit: &str) -> String {
        format!(
            "kernel {:.0}%, {:.2} faults/{unit}, {:.2}+{:.2} switches/{unit}",
            percent(self.system_seconds, cpu_seconds),
            per(self.minor_faults, messages),
            per(self.voluntary_switches, messages),
            per(self.involuntary_switches, messages),
        )
    }
}

impl RoundResult {
    /// No loss, no duplicate, nothing out of order, no socket closed, every publish
    /// accepted, and p99 under a second.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.closed == 0
            && self.publish.failed == 0
            && self.p99_us < MAX_CLEAN_P99_US
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FanoutResult {
    pub server: String,
    pub connect: Vec<ConnectSummary>,
    pub rss_per_socket: f64,
    pub rounds: Vec<RoundResult>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamResult {
    pub server: String,
    pub connect: ConnectSummary,
    pub report: StreamReport,
    pub expected_frames: u64,
    pub frames_per_s: f64,
    pub cpu_seconds: f64,
    pub cpu_us_per_frame: f64,
    /// Where `cpu_seconds` went (kept as keys of the result itself).
    #[serde(flatten)]
    pub split: Split,
    pub redis_cpu_seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MaxResult {
    pub server: String,
    pub subscribers: u64,
    pub steps: Vec<RoundResult>,
    /// The highest delivered rate of a clean step.
    pub best_clean_deliveries_per_s: f64,
    pub stopped_because: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterResult {
    pub nodes: usize,
    pub connect: ConnectSummary,
    pub rss_per_socket: f64,
    pub round: Option<RoundResult>,
}

/// One side of `multiplex`: every user's three channels over one `/ws/` socket, or over
/// three single-channel sockets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MultiplexVariant {
    /// `ws` or `single`.
    pub variant: String,
    pub users: u64,
    pub sockets: u64,
    pub subscriptions: u64,
    pub connect: Vec<ConnectSummary>,
    pub rss_before: u64,
    pub rss_after: u64,
    pub rss_per_user: f64,
    /// Server CPU over the connect phase (handshakes and subscribes), per user.
    pub cpu_us_per_user_connect: f64,
    /// Org events to every user (one delivery per user per event).
    pub fanout: Option<RoundResult>,
    /// Notifications to random users.
    pub unicast: Option<RoundResult>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MultiplexResult {
    pub variants: Vec<MultiplexVariant>,
}

/// A round's shape.
pub struct RoundSpec {
    pub round: u32,
    pub target: Target,
    /// Sockets that receive each message (1 for unicast).
    pub fanout: u64,
    pub events: u64,
    pub rate: f64,
}

/// Publishes one round and waits for its deliveries.
pub async fn run_round(
    ctx: &Ctx,
    running: &Running,
    fleet: &mut Fleet,
    spec: &RoundSpec,
) -> anyhow::Result<RoundResult> {
    let unicast = matches!(spec.target, Target::Users(_));
    fleet
        .start_round(spec.round, (!unicast).then_some(spec.events))
        .await?;
    let publisher = Publisher::new(&running.http())?;
    profiler_mark(ctx, running, None).await;
    let (cpu_before, redis_before) = cpu(ctx, running);
    let started = Instant::now();
    let publish = publisher
        .run(&spec.target, spec.round, spec.events, spec.rate)
        .await;
    let expected = publish.sent * spec.fanout;
    let published_at = Instant::now();
    let (mut last_count, mut last_change) = (0, Instant::now());
    loop {
        let (received, _closed) = fleet.status().await?;
        if received >= expected {
            break;
        }
        if received != last_count {
            (last_count, last_change) = (received, Instant::now());
        }
        if published_at.elapsed() > DRAIN_TIMEOUT || last_change.elapsed() > STALL_TIMEOUT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (cpu_after, redis_after) = cpu(ctx, running);
    profiler_mark(ctx, running, Some("round")).await;
    let report = fleet.end_round().await?;
    let used = cpu_after.since(&cpu_before);
    let cpu_seconds = used.cpu();
    #[allow(clippy::cast_precision_loss)]
    let result = RoundResult {
        server: running.kind.label().to_owned(),
        subscribers: report.sockets,
        events: spec.events,
        rate: spec.rate,
        offered_deliveries_per_s: spec.rate * spec.fanout as f64,
        expected,
        received: report.received,
        lost: expected.saturating_sub(report.received),
        duplicated: report.duplicated,
        out_of_order: report.out_of_order,
        stale: report.stale,
        closed: report.closed,
        p50_us: report.latency_us.quantile(0.5),
        p99_us: report.latency_us.quantile(0.99),
        max_us: report.latency_us.max(),
        seconds,
        deliveries_per_s: report.received as f64 / seconds.max(1e-9),
        cpu_seconds,
        cpu_us_per_delivery: if report.received == 0 {
            0.0
        } else {
            cpu_seconds * 1e6 / report.received as f64
        },
        split: Split::from(used),
        redis_cpu_seconds: redis_after - redis_before,
        publish,
    };
    Ok(result)
}

fn log_round(result: &RoundResult) {
    eprintln!(
        "    {:>24} n={:<6} events={:<5} rate={:<8.1} recv={}/{} lost={} dup={} ooo={} closed={} p50={:.1}ms p99={:.1}ms max={:.1}ms {:.0}/s cpu={:.2}µs/delivery ({})",
        result.server,
        result.subscribers,
        result.events,
        result.rate,
        result.received,
        result.expected,
        result.lost,
        result.duplicated,
        result.out_of_order,
        result.closed,
        ms(result.p50_us),
        ms(result.p99_us),
        ms(result.max_us),
        result.deliveries_per_s,
        result.cpu_us_per_delivery,
        result
            .split
            .describe(result.cpu_seconds, result.received, "delivery"),
    );
}

/// `part` as a percentage of `whole` (0 when `whole` is 0).
fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        part * 100.0 / whole
    } else {
        0.0
    }
}

/// `count` over `of` (0 when `of` is 0).
#[allow(clippy::cast_precision_loss)]
fn per(count: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        count as f64 / of as f64
    }
}

#[allow(clippy::cast_precision_loss)]
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn check_connected(summary: &ConnectSummary, wanted: usize, what: &str) -> anyhow::Result<()> {
    eprintln!(
        "    connected {} of {wanted} in {:.1}s ({:.0} handshakes/s){}",
        summary.sockets,
        summary.seconds,
        summary.handshakes_per_second,
        summary
            .first_error
            .as_deref()
            .map_or_else(String::new, |err| format!("; first error: {err}"))
    );
    if summary.failed > 0 {
        anyhow::bail!(
            "{what}: {} of {wanted} sockets failed to connect (first error: {})",
            summary.failed,
            summary.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

pub async fn idle(ctx: &Ctx, kind: Kind, sockets: usize) -> anyhow::Result<IdleResult> {
    let running = servers::start(kind, &ctx.programs, &Options::default()).await?;
    let result = idle_on(ctx, &running, sockets).await;
    running.stop().await;
    result
}

async fn idle_on(ctx: &Ctx, running: &Running, sockets: usize) -> anyhow::Result<IdleResult> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss(running);
    let mut fleet = Fleet::start(Fleet::workers_for(sockets))?;
    profiler_mark(ctx, running, None).await;
    let (cpu_before, _) = cpu(ctx, running);
    let connect = fleet
        .connect(&running.addresses, &Endpoint::Notifications, sockets)
        .await?;
    let (cpu_after, _) = cpu(ctx, running);
    profiler_mark(ctx, running, Some("connect")).await;
    check_connected(&connect, sockets, "idle")?;
    #[allow(clippy::cast_precision_loss)]
    let cpu_us_per_handshake = cpu_after.since(&cpu_before).cpu() * 1e6 / connect.sockets.max(1) as f64;
    // Let allocations settle (buffers of the handshake burst, timers).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss(running);
    let redis_rss = running
        .redis_pid()
        .and_then(|pid| procfs::rss_bytes(pid).ok())
        .unwrap_or(0);
    fleet.stop().await;
    #[allow(clippy::cast_precision_loss)]
    let rss_per_socket = rss_after.saturating_sub(rss_before) as f64 / connect.sockets.max(1) as f64;
    eprintln!(
        "    RSS {:.1} MB → {:.1} MB: {:.2} KB a socket; {cpu_us_per_handshake:.0} µs of server CPU a handshake",
        mb(rss_before),
        mb(rss_after),
        rss_per_socket / 1000.0
    );
    Ok(IdleResult {
        server: running.kind.label().to_owned(),
        connect,
        rss_before,
        rss_after,
        rss_per_socket,
        cpu_us_per_handshake,
        redis_rss,
    })
}

#[allow(clippy::cast_precision_loss)]
fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Fan-out pacing: `deliveries_per_s` offered, each round lasting about `seconds`, with
/// at least `min_events` events.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub deliveries_per_s: f64,
    pub seconds: f64,
    pub min_events: u64,
}

impl Pace {
    /// Event rate and count for `subscribers`.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    fn for_subscribers(self, subscribers: usize) -> (f64, u64) {
        let rate = (self.deliveries_per_s / subscribers.max(1) as f64).clamp(0.05, 2_000.0);
        let events = ((rate * self.seconds).ceil() as u64).max(self.min_events);
        (rate, events)
    }
}

/// Fan-out to one org with a growing number of subscribers: one round per size.
pub async fn fanout(ctx: &Ctx, kind: Kind, sizes: &[usize], pace: Pace) -> anyhow::Result<FanoutResult> {
    let running = servers::start(kind, &ctx.programs, &Options::default()).await?;
    let result = fanout_on(ctx, &running, sizes, pace).await;
    running.stop().await;
    result
}

async fn fanout_on(
    ctx: &Ctx,
    running: &Running,
    sizes: &[usize],
    pace: Pace,
) -> anyhow::Result<FanoutResult> {
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let mut fleet = Fleet::start(Fleet::workers_for(largest))?;
    let endpoint = Endpoint::Events { org: ORG.to_owned() };
    let mut result = FanoutResult {
        server: running.kind.label().to_owned(),
        ..FanoutResult::default()
    };
    let rss_before = rss(running);
    let mut connected = 0;
    for (index, size) in sizes.iter().copied().enumerate() {
        let more = size.saturating_sub(connected);
        if more > 0 {
            let summary = fleet.connect(&running.addresses, &endpoint, more).await?;
            check_connected(&summary, more, "fanout")?;
            result.connect.push(summary);
            connected = size;
        }
        if size == largest {
            #[allow(clippy::cast_precision_loss)]
            {
                result.rss_per_socket = rss(running).saturating_sub(rss_before) as f64 / size.max(1) as f64;
            }
        }
        let (rate, events) = pace.for_subscribers(size);
        let spec = RoundSpec {
            round: u32::try_from(index + 1).unwrap_or(u32::MAX),
            target: Target::Org(ORG.to_owned()),
            fanout: u64::try_from(size).unwrap_or(u64::MAX),
            events,
            rate,
        };
        let round = run_round(ctx, running, &mut fleet, &spec).await?;
        log_round(&round);
        let closed = round.closed;
        result.rounds.push(round);
        if closed > 0 {
            eprintln!("    sockets were closed; stopping the sweep here");
            break;
        }
    }
    fleet.stop().await;
    Ok(result)
}

/// Notifications to random users, one socket each.
pub async fn unicast(
    ctx: &Ctx,
    kind: Kind,
    users: usize,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<RoundResult> {
    let running = servers::start(kind, &ctx.programs, &Options::default()).await?;
    let result = async {
        let mut fleet = Fleet::start(Fleet::workers_for(users))?;
        let summary = fleet
            .connect(&running.addresses, &Endpoint::Notifications, users)
            .await?;
        check_connected(&summary, users, "unicast")?;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let events = (rate * seconds).ceil().max(1.0) as u64;
        let spec = RoundSpec {
            round: 1,
            target: Target::Users(users),
            fanout: 1,
            events,
            rate,
        };
        let round = run_round(ctx, &running, &mut fleet, &spec).await?;
        log_round(&round);
        fleet.stop().await;
        anyhow::Ok(round)
    }
    .await;
    running.stop().await;
    result
}

/// The prompt of the stream scenario: `words` words, so the echo reply has `words + 1`
/// streaming frames ("Echo:" and each word).
pub fn prompt(words: usize) -> String {
    (0..words).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ")
}

/// `tasks` concurrent echo chat tasks, one user each.
pub async fn stream(ctx: &Ctx, kind: Kind, tasks: usize, words: usize) -> anyhow::Result<StreamResult> {
    let options = Options {
        llm_workers: Some(tasks),
        nodes: 1,
    };
    let running = servers::start(kind, &ctx.programs, &options).await?;
    let result = async {
        let mut fleet = Fleet::start(Fleet::workers_for(tasks))?;
        let connect = fleet
            .connect(&running.addresses, &Endpoint::FrameStream, tasks)
            .await?;
        check_connected(&connect, tasks, "stream")?;
        let expected_frames = u64::try_from(words + 1).unwrap_or(u64::MAX);
        profiler_mark(ctx, &running, None).await;
        let (cpu_before, redis_before) = cpu(ctx, &running);
        // Each reply lasts (words + 1) × 20 ms; allow for a slow server ten times over.
        let timeout_ms = 30_000 + 200 * expected_frames;
        let report = fleet
            .stream(&running.http(), &prompt(words), expected_frames, timeout_ms)
            .await?;
        let (cpu_after, redis_after) = cpu(ctx, &running);
        profiler_mark(ctx, &running, Some("stream")).await;
        fleet.stop().await;
        let used = cpu_after.since(&cpu_before);
        let cpu_seconds = used.cpu();
        #[allow(clippy::cast_precision_loss)]
        let result = StreamResult {
            server: running.kind.label().to_owned(),
            connect,
            expected_frames: expected_frames * u64::try_from(tasks).unwrap_or(0),
            frames_per_s: report.frames as f64 / (report.elapsed_ms.max(1) as f64 / 1000.0),
            cpu_us_per_frame: if report.frames == 0 {
                0.0
            } else {
                cpu_seconds * 1e6 / report.frames as f64
            },
            cpu_seconds,
            split: Split::from(used),
            redis_cpu_seconds: redis_after - redis_before,
            report,
        };
        eprintln!(
            "    {:>24} tasks={} completed={} failed={} frames={}/{} lost={} ttff p50={:.1}ms p99={:.1}ms {:.0} frames/s cpu={:.2}µs/frame ({}){}",
            result.server,
            result.report.tasks,
            result.report.completed,
            result.report.failed,
            result.report.frames,
            result.expected_frames,
            result.report.lost_frames,
            ms(result.report.first_frame_us.quantile(0.5)),
            ms(result.report.first_frame_us.quantile(0.99)),
            result.frames_per_s,
            result.cpu_us_per_frame,
            result
                .split
                .describe(result.cpu_seconds, result.report.frames, "frame"),
            result
                .report
                .first_error
                .as_deref()
                .map_or_else(String::new, |err| format!("; first error: {err}"))
        );
        anyhow::Ok(result)
    }
    .await;
    running.stop().await;
    result
}

/// Fan-out to `subscribers` at a rate rising by half each step, until a step is not
/// clean, the publisher cannot keep the rate, or `max_steps`.
pub async fn max(
    ctx: &Ctx,
    kind: Kind,
    subscribers: usize,
    start: Pace,
    max_steps: usize,
) -> anyhow::Result<MaxResult> {
    let running = servers::start(kind, &ctx.programs, &Options::default()).await?;
    let result = async {
        let mut fleet = Fleet::start(Fleet::workers_for(subscribers))?;
        let summary = fleet
            .connect(&running.addresses, &Endpoint::Events { org: ORG.to_owned() }, subscribers)
            .await?;
        check_connected(&summary, subscribers, "max")?;
        let mut result = MaxResult {
            server: running.kind.label().to_owned(),
            subscribers: summary.sockets,
            stopped_because: format!("reached {max_steps} steps"),
            ..MaxResult::default()
        };
        let mut pace = start;
        for step in 0..max_steps {
            let (rate, events) = pace.for_subscribers(subscribers);
            let spec = RoundSpec {
                round: u32::try_from(step + 1).unwrap_or(u32::MAX),
                target: Target::Org(ORG.to_owned()),
                fanout: u64::try_from(subscribers).unwrap_or(u64::MAX),
                events,
                rate,
            };
            let round = run_round(ctx, &running, &mut fleet, &spec).await?;
            log_round(&round);
            let clean = round.clean();
            // The publisher fell behind its schedule by more than a second: the server
            // is not taking publishes at this rate.
            let kept_up = round.publish.late_max_ms < 1_000.0;
            if clean && kept_up {
                result.best_clean_deliveries_per_s = result.best_clean_deliveries_per_s.max(round.deliveries_per_s);
            }
            let stop = if !clean {
                Some(format!(
                    "step {} ({:.0} deliveries/s offered): lost {}, duplicated {}, out of order {}, closed {}, p99 {:.0} ms",
                    step + 1,
                    round.offered_deliveries_per_s,
                    round.lost,
                    round.duplicated,
                    round.out_of_order,
                    round.closed,
                    ms(round.p99_us)
                ))
            } else if !kept_up {
                Some(format!(
                    "step {} ({:.0} deliveries/s offered): publishes fell {:.0} ms behind schedule",
                    step + 1,
                    round.offered_deliveries_per_s,
                    round.publish.late_max_ms
                ))
            } else {
                None
            };
            result.steps.push(round);
            if let Some(reason) = stop {
                result.stopped_because = reason;
                break;
            }
            pace.deliveries_per_s *= 1.5;
        }
        fleet.stop().await;
        anyhow::Ok(result)
    }
    .await;
    running.stop().await;
    result
}

/// `sockets` idle sockets on one herald (the 19,000-socket target).
pub async fn capacity(ctx: &Ctx, sockets: usize) -> anyhow::Result<IdleResult> {
    idle(ctx, Kind::Herald, sockets).await
}

/// `sockets` org sockets spread over `nodes` herald nodes sharing one Redis, then one
/// fan-out round published on the first node.
pub async fn cluster(ctx: &Ctx, nodes: usize, sockets: usize, events: u64) -> anyhow::Result<ClusterResult> {
    let options = Options {
        llm_workers: None,
        nodes,
    };
    let running = servers::start(Kind::Herald, &ctx.programs, &options).await?;
    let result = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_before = rss(&running);
        let mut fleet = Fleet::start(Fleet::workers_for(sockets))?;
        let connect = fleet
            .connect(
                &running.addresses,
                &Endpoint::Events { org: ORG.to_owned() },
                sockets,
            )
            .await?;
        check_connected(&connect, sockets, "cluster")?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        #[allow(clippy::cast_precision_loss)]
        let rss_per_socket = rss(&running).saturating_sub(rss_before) as f64 / connect.sockets.max(1) as f64;
        eprintln!("    {nodes} nodes: {:.2} KB a socket", rss_per_socket / 1000.0);
        let spec = RoundSpec {
            round: 1,
            target: Target::Org(ORG.to_owned()),
            fanout: u64::try_from(sockets).unwrap_or(u64::MAX),
            events,
            rate: 1.0,
        };
        let round = run_round(ctx, &running, &mut fleet, &spec)
            .await
            .context("cluster fan-out round")?;
        log_round(&round);
        fleet.stop().await;
        anyhow::Ok(ClusterResult {
            nodes,
            connect,
            rss_per_socket,
            round: Some(round),
        })
    }
    .await;
    running.stop().await;
    result
}

/// Issue 17: the cost of a subscription. Each of `users` users gets their
/// `notifications:`, `frames:` and `org:` channels over one `/ws/` socket with three
/// subscriptions, then (on a fresh herald) over three single-channel sockets; each side
/// is measured for RSS per user after connecting and for CPU per delivery in an org
/// fan-out round and a unicast notification round.
pub async fn multiplex(
    ctx: &Ctx,
    users: usize,
    pace: Pace,
    unicast_rate: f64,
    unicast_seconds: f64,
) -> anyhow::Result<MultiplexResult> {
    let mut result = MultiplexResult::default();
    for multiplexed in [true, false] {
        let running = servers::start(Kind::Herald, &ctx.programs, &Options::default()).await?;
        let variant = multiplex_on(
            ctx,
            &running,
            multiplexed,
            users,
            pace,
            unicast_rate,
            unicast_seconds,
        )
        .await;
        running.stop().await;
        result.variants.push(variant?);
    }
    Ok(result)
}

async fn multiplex_on(
    ctx: &Ctx,
    running: &Running,
    multiplexed: bool,
    users: usize,
    pace: Pace,
    unicast_rate: f64,
    unicast_seconds: f64,
) -> anyhow::Result<MultiplexVariant> {
    let org = Endpoint::Events { org: ORG.to_owned() };
    let endpoints = if multiplexed {
        vec![Endpoint::Multiplexed { org: ORG.to_owned() }]
    } else {
        vec![Endpoint::Notifications, org, Endpoint::FrameStream]
    };
    let sockets = users * endpoints.len();
    eprintln!(
        "  -- {users} users, {} socket(s) each ({})",
        endpoints.len(),
        if multiplexed {
            "/ws/ with 3 subscriptions"
        } else {
            "single-channel"
        }
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss(running);
    let mut fleet = Fleet::start(Fleet::workers_for(sockets))?;
    let (cpu_before, _) = cpu(ctx, running);
    let mut connect = Vec::new();
    for endpoint in &endpoints {
        fleet.reuse_users();
        let summary = fleet.connect(&running.addresses, endpoint, users).await?;
        check_connected(&summary, users, "multiplex")?;
        connect.push(summary);
    }
    let (cpu_after, _) = cpu(ctx, running);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss(running);
    #[allow(clippy::cast_precision_loss)]
    let (rss_per_user, cpu_us_per_user_connect) = (
        rss_after.saturating_sub(rss_before) as f64 / users.max(1) as f64,
        cpu_after.since(&cpu_before).cpu() * 1e6 / users.max(1) as f64,
    );
    eprintln!(
        "    RSS {:.1} MB → {:.1} MB: {:.2} KB a user; {cpu_us_per_user_connect:.0} µs of server CPU a user to connect",
        mb(rss_before),
        mb(rss_after),
        rss_per_user / 1000.0
    );
    let (rate, events) = pace.for_subscribers(users);
    let fanout = run_round(
        ctx,
        running,
        &mut fleet,
        &RoundSpec {
            round: 1,
            target: Target::Org(ORG.to_owned()),
            fanout: u64::try_from(users).unwrap_or(u64::MAX),
            events,
            rate,
        },
    )
    .await?;
    log_round(&fanout);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let unicast_events = (unicast_rate * unicast_seconds).ceil().max(1.0) as u64;
    let unicast = run_round(
        ctx,
        running,
        &mut fleet,
        &RoundSpec {
            round: 2,
            target: Target::Users(users),
            fanout: 1,
            events: unicast_events,
            rate: unicast_rate,
        },
    )
    .await?;
    log_round(&unicast);
    fleet.stop().await;
    let users = u64::try_from(users).unwrap_or(u64::MAX);
    Ok(MultiplexVariant {
        variant: if multiplexed { "ws" } else { "single" }.to_owned(),
        users,
        sockets: u64::try_from(sockets).unwrap_or(u64::MAX),
        subscriptions: users * 3,
        connect,
        rss_before,
        rss_after,
        rss_per_user,
        cpu_us_per_user_connect,
        fanout: Some(fanout),
        unicast: Some(unicast),
    })
}
