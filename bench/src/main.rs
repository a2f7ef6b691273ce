//! herald's load generator and benchmark driver (issue 8).
//!
//! `bench all` starts each server under test in a fresh process for each scenario —
//! herald, the bare axum baseline (`bench/baselines/bare/`, in its WebSocket layer
//! variants) and the Django Channels stack herald replaces (`bench/baselines/django/`) — drives it
//! with worker processes (`bench worker`) that hold the sockets, and writes
//! `bench/results/<date>.json`, a plot, and `BENCHMARKS.md`. `bench/run.sh` builds
//! everything and runs it; `--quick` is a short version of the same run.
//!
//! Layout: `scenarios` (what is measured), `servers` (starting the servers), `fleet`
//! and `worker` (the load generator's processes, speaking `wire`), `publish` (the
//! publisher), `procfs` (CPU and memory of a pid), `histogram`, `report`.

mod fleet;
mod histogram;
mod pairs;
mod procfs;
mod publish;
mod report;
mod scenarios;
mod servers;
mod token;
mod wire;
mod worker;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use scenarios::{Ctx, Pace};
use servers::{Kind, Programs};

#[derive(Debug, Parser)]
#[command(about = "herald's load generator and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the scenarios against every server and write results, plot and BENCHMARKS.md.
    All(AllArgs),
    /// Write BENCHMARKS.md and the plot again from a results file.
    Report {
        /// A `bench/results/<date>.json`.
        results: PathBuf,
        /// Print only this scenario's section to stdout (for a run of one scenario,
        /// whose section goes into the BENCHMARKS.md of the last full run).
        #[arg(long, value_enum)]
        section: Option<Scenario>,
    },
    /// Print each goal's ratios pooled over the pairs of several results files: medians
    /// and 95 % intervals, as a Markdown table (for runs of the same code, to narrow
    /// what one run's pairs can tell).
    Pool {
        /// `bench/results/<date>.json` files, two or more.
        #[arg(required = true, num_args = 2..)]
        results: Vec<PathBuf>,
    },
    /// A load-generator worker (started by `all`; reads commands on stdin).
    Worker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    Idle,
    Fanout,
    Unicast,
    Stream,
    Max,
    Capacity,
    Cluster,
    Multiplex,
}

#[derive(Debug, clap::Args)]
struct AllArgs {
    /// Small sizes and short rounds (a few minutes).
    #[arg(long)]
    quick: bool,
    /// Scenarios to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// Servers to measure (default: all; capacity and cluster are herald only).
    #[arg(long, value_enum, value_delimiter = ',')]
    servers: Vec<Kind>,
    /// Directory holding the release `herald` and `bench-bare` binaries (default: this
    /// program's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The Django baseline's virtualenv (default: $HERALD_BENCH_VENV, else
    /// ~/.cache/herald-bench/django-venv).
    #[arg(long)]
    venv: Option<PathBuf>,
    /// Run herald and the bare baseline under this command, e.g. `valgrind
    /// --tool=callgrind` or `perf record --switch-output` (profiling; both are told
    /// where the measured phase starts and ends, see `profiler_mark`). The CPU and
    /// memory figures are then the wrapper's process: the server itself under
    /// valgrind, perf alone (not its child, the server) under perf.
    #[arg(long)]
    wrap: Option<String>,
    /// Where results go (default: bench/results).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not write BENCHMARKS.md (results and plot only).
    #[arg(long)]
    no_markdown: bool,
    /// Override the plan: sockets of the idle scenario.
    #[arg(long)]
    idle_sockets: Option<usize>,
    /// Override the plan: subscriber counts of the fan-out sweep.
    #[arg(long, value_delimiter = ',')]
    fanout_sizes: Vec<usize>,
    /// Override the plan: deliveries per second offered in the fan-out sweep (herald and
    /// the bare baseline).
    #[arg(long)]
    fanout_rate: Option<f64>,
    /// Override the plan: users of the multiplex scenario.
    #[arg(long)]
    multiplex_users: Option<usize>,
    /// Override the plan: users (one socket each) of the unicast scenario. With fewer
    /// users at the same rate, each socket's state is touched more often: two runs
    /// tell what a larger working set costs a delivery.
    #[arg(long)]
    unicast_users: Option<usize>,
    /// Override the plan: concurrent tasks of the stream scenario (every server).
    #[arg(long)]
    stream_tasks: Option<usize>,
    /// Override the plan: words of each stream's prompt (the echo reply has one frame a
    /// word). Two runs with different lengths split a task's fixed cost from a frame's.
    #[arg(long)]
    stream_words: Option<usize>,
    /// Measure the goals of issue 19 in this many herald/bare pairs, the main run being
    /// the first; the goals are judged on the median ratio (see `bench/src/pairs.rs`).
    /// Only the goal scenarios among `--scenarios` are paired. Default: 5, or 1 with
    /// `--quick`.
    #[arg(long)]
    pairs: Option<usize>,
}

/// Sizes of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub idle_sockets: usize,
    pub fanout_sizes: Vec<usize>,
    pub fanout_deliveries_per_s: f64,
    pub django_fanout_deliveries_per_s: f64,
    pub fanout_round_seconds: f64,
    pub unicast_users: usize,
    pub unicast_rate: f64,
    pub django_unicast_rate: f64,
    pub unicast_seconds: f64,
    pub stream_tasks: usize,
    pub django_stream_tasks: usize,
    pub stream_words: usize,
    pub max_subscribers: usize,
    pub django_max_subscribers: usize,
    pub max_start_deliveries_per_s: f64,
    pub django_max_start_deliveries_per_s: f64,
    pub max_steps: usize,
    pub capacity_sockets: usize,
    pub cluster_nodes: usize,
    pub cluster_sockets: usize,
    /// Users of `multiplex`, each with three channels.
    #[serde(default)]
    pub multiplex_users: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                idle_sockets: 2_000,
                fanout_sizes: vec![250, 500, 1_000, 2_000],
                fanout_deliveries_per_s: 20_000.0,
                django_fanout_deliveries_per_s: 1_000.0,
                fanout_round_seconds: 2.0,
                unicast_users: 1_000,
                unicast_rate: 500.0,
                django_unicast_rate: 100.0,
                unicast_seconds: 2.0,
                stream_tasks: 200,
                django_stream_tasks: 10,
                stream_words: 19,
                max_subscribers: 1_000,
                django_max_subscribers: 500,
                max_start_deliveries_per_s: 20_000.0,
                django_max_start_deliveries_per_s: 500.0,
                max_steps: 10,
                capacity_sockets: 5_000,
                cluster_nodes: 3,
                cluster_sockets: 3_000,
                multiplex_users: 1_000,
            }
        } else {
            Self {
                idle_sockets: 10_000,
                fanout_sizes: vec![1_000, 2_000, 5_000, 10_000],
                fanout_deliveries_per_s: 50_000.0,
                django_fanout_deliveries_per_s: 2_000.0,
                fanout_round_seconds: 3.0,
                unicast_users: 10_000,
                unicast_rate: 2_000.0,
                django_unicast_rate: 200.0,
                unicast_seconds: 5.0,
                stream_tasks: 1_000,
                django_stream_tasks: 25,
                stream_words: 49,
                max_subscribers: 10_000,
                django_max_subscribers: 500,
                max_start_deliveries_per_s: 50_000.0,
                django_max_start_deliveries_per_s: 500.0,
                max_steps: 12,
                capacity_sockets: 19_000,
                cluster_nodes: 6,
                cluster_sockets: 100_000,
                multiplex_users: 5_000,
            }
        }
    }
}

/// Everything one run measured (`bench/results/<date>.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub date: String,
    pub mode: String,
    pub command: String,
    pub git_rev: String,
    pub machine: String,
    /// How the measured servers were built (bench/run.sh: `HERALD_BENCH_BUILDS`), e.g.
    /// profile-guided by bench/pgo.sh; empty when not told.
    #[serde(default)]
    pub builds: String,
    pub seconds: f64,
    pub plan: Option<Plan>,
    pub idle: Vec<scenarios::IdleResult>,
    pub fanout: Vec<scenarios::FanoutResult>,
    pub unicast: Vec<scenarios::RoundResult>,
    pub stream: Vec<scenarios::StreamResult>,
    pub max: Vec<scenarios::MaxResult>,
    pub capacity: Option<scenarios::IdleResult>,
    pub cluster: Option<scenarios::ClusterResult>,
    #[serde(default)]
    pub multiplex: Option<scenarios::MultiplexResult>,
    /// The goals measured again in alternating pairs (`--pairs`), after the main run.
    #[serde(default)]
    pub pairs: Vec<pairs::GoalPair>,
    /// Scenarios that failed, with why.
    pub errors: Vec<String>,
    /// Servers that were not measured, with why.
    pub skipped: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Worker => worker::run(),
        Command::Report { results, section } => {
            let text = std::fs::read_to_string(&results)
                .with_context(|| format!("cannot read {}", results.display()))?;
            let parsed: Results = serde_json::from_str(&text).context("bad results file")?;
            match section {
                Some(Scenario::Multiplex) => {
                    #[allow(clippy::print_stdout)]
                    {
                        print!("{}", report::multiplex_section(&parsed));
                    }
                    Ok(())
                }
                Some(other) => anyhow::bail!("--section supports multiplex only, not {other:?}"),
                None => {
                    let repo = repo_root()?;
                    report::write_all(&repo, &parsed, &results, &default_venv())
                }
            }
        }
        Command::Pool { results } => {
            let mut runs: Vec<Results> = Vec::new();
            for path in &results {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let parsed: Results = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a results file", path.display()))?;
                if let Some(first) = runs.first() {
                    anyhow::ensure!(
                        first.mode == parsed.mode,
                        "{} is a {} run and the first file a {} run: their figures are of different sizes; pool runs of one mode",
                        path.display(),
                        parsed.mode,
                        first.mode
                    );
                }
                runs.push(parsed);
            }
            #[allow(clippy::print_stdout)]
            {
                print!("{}", report::pooled_table(&runs));
            }
            Ok(())
        }
        Command::All(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            runtime.block_on(all(args))
        }
    }
}

/// The repository root: the parent of this crate's directory.
fn repo_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(PathBuf::from)
        .context("the bench crate has no parent directory")
}

fn default_venv() -> PathBuf {
    if let Some(venv) = std::env::var_os("HERALD_BENCH_VENV") {
        return PathBuf::from(venv);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/herald-bench/django-venv")
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}

async fn all(args: AllArgs) -> anyhow::Result<()> {
    let repo = repo_root()?;
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()
            .context("cannot find the bench program")?
            .parent()
            .map(PathBuf::from)
            .context("the bench program has no directory")?,
    };
    let venv = args.venv.unwrap_or_else(default_venv);
    let programs = Programs {
        bin_dir,
        repo: repo.clone(),
        venv: venv.clone(),
        wrap: args.wrap,
    };
    let ctx = Ctx {
        programs,
        ticks_per_second: procfs::ticks_per_second(),
    };
    let mut plan = Plan::new(args.quick);
    if let Some(sockets) = args.idle_sockets {
        plan.idle_sockets = sockets;
    }
    if let Some(users) = args.multiplex_users {
        plan.multiplex_users = users;
    }
    if let Some(users) = args.unicast_users {
        plan.unicast_users = users;
    }
    if !args.fanout_sizes.is_empty() {
        plan.fanout_sizes = args.fanout_sizes;
    }
    if let Some(rate) = args.fanout_rate {
        plan.fanout_deliveries_per_s = rate;
    }
    if let Some(tasks) = args.stream_tasks {
        plan.stream_tasks = tasks;
        plan.django_stream_tasks = tasks;
    }
    if let Some(words) = args.stream_words {
        plan.stream_words = words;
    }
    let scenarios = if args.scenarios.is_empty() {
        vec![
            Scenario::Idle,
            Scenario::Fanout,
            Scenario::Unicast,
            Scenario::Stream,
            Scenario::Max,
            Scenario::Capacity,
            Scenario::Cluster,
            Scenario::Multiplex,
        ]
    } else {
        args.scenarios
    };
    let mut kinds = if args.servers.is_empty() {
        vec![
            Kind::Herald,
            Kind::Bare,
            Kind::BareTungsteniteSmall,
            Kind::BareTokioWebsockets,
            Kind::BareHistory,
            Kind::Django,
        ]
    } else {
        args.servers
    };
    let started = tokio::time::Instant::now();
    let date = command_output("date", &["-u", "+%Y-%m-%dT%H-%M-%SZ"]);
    let mut results = Results {
        date: date.clone(),
        mode: if args.quick { "quick" } else { "full" }.to_owned(),
        // bench/run.sh names itself; otherwise this program's own command line.
        command: std::env::var_os("HERALD_BENCH_COMMAND").map_or_else(
            || std::env::args().collect::<Vec<_>>().join(" "),
            |command| command.to_string_lossy().into_owned(),
        ),
        git_rev: command_output(
            "git",
            &["-C", &repo.display().to_string(), "rev-parse", "--short", "HEAD"],
        ),
        machine: format!(
            "{} cores ({}), Linux {}",
            command_output("nproc", &[]),
            command_output("sh", &["-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]),
            command_output("uname", &["-r"])
        ),
        builds: std::env::var_os("HERALD_BENCH_BUILDS")
            .map(|builds| builds.to_string_lossy().into_owned())
            .unwrap_or_default(),
        plan: Some(plan.clone()),
        ..Results::default()
    };
    if kinds.contains(&Kind::Django) && !servers::django_available(&ctx.programs) {
        results.skipped.push(format!(
            "django: no virtualenv at {} (run bench/baselines/django/install.sh)",
            venv.display()
        ));
        kinds.retain(|kind| *kind != Kind::Django);
    }
    // The WebSocket layer variants of the bare baseline are measured where the layer
    // matters: idle memory and fan-out. The bare relay with the contract's retention is
    // measured where a message is kept for every delivery: unicast and the stream.
    let without = |excluded: &[Kind]| -> Vec<Kind> {
        kinds
            .iter()
            .copied()
            .filter(|kind| !excluded.contains(kind))
            .collect()
    };
    let layers = [Kind::BareTungsteniteSmall, Kind::BareTokioWebsockets];
    let layer_kinds = without(&[Kind::BareHistory]);
    let retention_kinds = without(&layers);
    let main_kinds = without(&[layers[0], layers[1], Kind::BareHistory]);
    let record_error = |results: &mut Results, what: String, err: anyhow::Error| {
        eprintln!("!! {what}: {err:#}");
        results.errors.push(format!("{what}: {err:#}"));
    };
    for scenario in &scenarios {
        match scenario {
            Scenario::Idle => {
                for kind in &layer_kinds {
                    eprintln!("== idle: {} sockets on {}", plan.idle_sockets, kind.label());
                    match scenarios::idle(&ctx, *kind, plan.idle_sockets).await {
                        Ok(result) => results.idle.push(result),
                        Err(err) => record_error(&mut results, format!("idle on {}", kind.label()), err),
                    }
                }
            }
            Scenario::Fanout => {
                for kind in &layer_kinds {
                    eprintln!(
                        "== fanout: {:?} subscribers on {}",
                        plan.fanout_sizes,
                        kind.label()
                    );
                    let pace = if *kind == Kind::Django {
                        Pace {
                            deliveries_per_s: plan.django_fanout_deliveries_per_s,
                            seconds: plan.fanout_round_seconds,
                            min_events: 3,
                        }
                    } else {
                        Pace {
                            deliveries_per_s: plan.fanout_deliveries_per_s,
                            seconds: plan.fanout_round_seconds,
                            min_events: 10,
                        }
                    };
                    match scenarios::fanout(&ctx, *kind, &plan.fanout_sizes, pace).await {
                        Ok(result) => results.fanout.push(result),
                        Err(err) => record_error(&mut results, format!("fanout on {}", kind.label()), err),
                    }
                }
            }
            Scenario::Unicast => {
                for kind in &retention_kinds {
                    let rate = if *kind == Kind::Django {
                        plan.django_unicast_rate
                    } else {
                        plan.unicast_rate
                    };
                    eprintln!(
                        "== unicast: {} users at {rate}/s on {}",
                        plan.unicast_users,
                        kind.label()
                    );
                    match scenarios::unicast(&ctx, *kind, plan.unicast_users, rate, plan.unicast_seconds)
                        .await
                    {
                        Ok(result) => results.unicast.push(result),
                        Err(err) => record_error(&mut results, format!("unicast on {}", kind.label()), err),
                    }
                }
            }
            Scenario::Stream => {
                for kind in &retention_kinds {
                    let tasks = if *kind == Kind::Django {
                        plan.django_stream_tasks
                    } else {
                        plan.stream_tasks
                    };
                    eprintln!("== stream: {tasks} echo tasks on {}", kind.label());
                    match scenarios::stream(&ctx, *kind, tasks, plan.stream_words).await {
                        Ok(result) => results.stream.push(result),
                        Err(err) => record_error(&mut results, format!("stream on {}", kind.label()), err),
                    }
                }
            }
            Scenario::Max => {
                for kind in &main_kinds {
                    let (subscribers, start) = if *kind == Kind::Django {
                        (
                            plan.django_max_subscribers,
                            plan.django_max_start_deliveries_per_s,
                        )
                    } else {
                        (plan.max_subscribers, plan.max_start_deliveries_per_s)
                    };
                    eprintln!("== max: {subscribers} subscribers on {}", kind.label());
                    let pace = Pace {
                        deliveries_per_s: start,
                        seconds: plan.fanout_round_seconds,
                        min_events: 3,
                    };
                    match scenarios::max(&ctx, *kind, subscribers, pace, plan.max_steps).await {
                        Ok(result) => results.max.push(result),
                        Err(err) => record_error(&mut results, format!("max on {}", kind.label()), err),
                    }
                }
            }
            Scenario::Capacity => {
                if kinds.contains(&Kind::Herald) {
                    eprintln!(
                        "== capacity: {} idle sockets on one herald",
                        plan.capacity_sockets
                    );
                    match scenarios::capacity(&ctx, plan.capacity_sockets).await {
                        Ok(result) => results.capacity = Some(result),
                        Err(err) => record_error(&mut results, "capacity on herald".to_owned(), err),
                    }
                }
            }
            Scenario::Multiplex => {
                if kinds.contains(&Kind::Herald) {
                    eprintln!(
                        "== multiplex: {} users, one /ws/ socket with 3 subscriptions against 3 single-channel sockets",
                        plan.multiplex_users
                    );
                    let pace = Pace {
                        deliveries_per_s: plan.fanout_deliveries_per_s,
                        seconds: plan.fanout_round_seconds,
                        min_events: 10,
                    };
                    match scenarios::multiplex(
                        &ctx,
                        plan.multiplex_users,
                        pace,
                        plan.unicast_rate,
                        plan.unicast_seconds,
                    )
                    .await
                    {
                        Ok(result) => results.multiplex = Some(result),
                        Err(err) => record_error(&mut results, "multiplex on herald".to_owned(), err),
                    }
                }
            }
            Scenario::Cluster => {
                if kinds.contains(&Kind::Herald) {
                    eprintln!(
                        "== cluster: {} sockets over {} herald nodes sharing one Redis",
                        plan.cluster_sockets, plan.cluster_nodes
                    );
                    match scenarios::cluster(&ctx, plan.cluster_nodes, plan.cluster_sockets, 3).await {
                        Ok(result) => results.cluster = Some(result),
                        Err(err) => record_error(&mut results, "cluster on herald".to_owned(), err),
                    }
                }
            }
        }
    }
    let n_pairs = args.pairs.unwrap_or(if args.quick { 1 } else { 5 });
    let position = |kind: Kind| kinds.iter().position(|k| *k == kind);
    if let (true, Some(herald), Some(bare)) = (n_pairs > 1, position(Kind::Herald), position(Kind::Bare)) {
        // The main run measured the servers in `kinds`' order; the pairs take turns.
        let main_herald_first = herald < bare;
        let with_history = kinds.contains(&Kind::BareHistory);
        for n in 1..n_pairs {
            let herald_first = main_herald_first == (n % 2 == 0);
            let pair = pairs::run(
                &ctx,
                &plan,
                &scenarios,
                herald_first,
                with_history,
                &mut results.errors,
            )
            .await;
            results.pairs.push(pair);
        }
    }
    results.seconds = started.elapsed().as_secs_f64();
    let out = args.out.unwrap_or_else(|| repo.join("bench/results"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join(format!("{date}.json"));
    let json = serde_json::to_string_pretty(&results).context("cannot encode the results")?;
    std::fs::write(&path, json).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("results: {} ({:.0} s)", path.display(), results.seconds);
    if args.no_markdown {
        report::plot(&repo, &path, &venv)?;
        Ok(())
    } else {
        report::write_all(&repo, &results, &path, &venv)
    }
}
