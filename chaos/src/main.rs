//! herald's chaos suite (issue 14): real herald nodes, workers and Redis (one server, and
//! a 3 + 3 Cluster) under injected faults, with every client's epochs and offsets
//! accounted for against every acknowledged publish.
//!
//! `herald-chaos run` runs the scenarios (`scenarios`) and prints one table row each;
//! a full run also writes `chaos/results/<date>.json` and `RELIABILITY.md`.
//! `chaos/run.sh` builds the release `herald` and runs it.
//!
//! Layout: `procs` (starting, signalling and stopping processes), `client` (the
//! WebSocket clients, which behave like the JS client), `publish` (the publisher),
//! `ledger` (the accounting), `report` (table and Markdown), `token`.

mod client;
mod ledger;
mod procs;
mod publish;
mod report;
mod scenarios;
mod token;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use report::Results;
use scenarios::Ctx;

#[derive(Debug, Parser)]
#[command(about = "herald's chaos suite: delivery under faults")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run scenarios and print the table; a full run of every scenario also writes
    /// chaos/results/<date>.json and RELIABILITY.md.
    Run(RunArgs),
    /// Write RELIABILITY.md again from a results file (after editing chaos/notes.md).
    Report {
        /// A `chaos/results/<date>.json`.
        results: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Fewer clients, shorter phases (about half the time).
    #[arg(long)]
    quick: bool,
    /// Scenarios to run, by letter (default: all of a–h).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<char>,
    /// Directory holding the release `herald` (default: this program's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Also write RELIABILITY.md and the results file for a quick or partial run.
    #[arg(long)]
    write: bool,
    /// Keep the scratch directory (process logs, databases) after the run.
    #[arg(long)]
    keep: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let interrupted = std::sync::atomic::AtomicBool::new(false);
    let result = runtime.block_on(async {
        tokio::select! {
            result = dispatch(cli.command) => result,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("interrupted: stopping every process the suite started");
                interrupted.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
        }
    });
    // Dropping the runtime drops every scenario's processes (killed on drop).
    runtime.shutdown_timeout(Duration::from_secs(5));
    if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
        let _ = std::fs::remove_dir_all(scratch_dir());
    }
    result
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    let repo = std::env::current_dir().context("no current directory")?;
    match command {
        Command::Report { results } => {
            let text = std::fs::read_to_string(&results)
                .with_context(|| format!("cannot read {}", results.display()))?;
            let parsed: Results = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a results file", results.display()))?;
            report::write_markdown(&repo, &parsed, &results.display().to_string())?;
            println!("{}", report::table(&parsed.rows));
            Ok(())
        }
        Command::Run(args) => run(args, repo).await,
    }
}

async fn run(args: RunArgs, repo: PathBuf) -> anyhow::Result<()> {
    let bin = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()
            .context("cannot find this program")?
            .parent()
            .map(PathBuf::from)
            .context("this program has no directory")?,
    };
    let selected: Vec<char> = if args.scenarios.is_empty() {
        scenarios::ALL.to_vec()
    } else {
        args.scenarios.iter().map(char::to_ascii_lowercase).collect()
    };
    if let Some(bad) = selected.iter().find(|s| !scenarios::ALL.contains(s)) {
        bail!("no scenario {bad}: choose among a–h");
    }
    let full = !args.quick && selected.len() == scenarios::ALL.len();
    let dir = scratch_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ctx = Ctx {
        bin,
        dir: dir.clone(),
        quick: args.quick,
    };
    let started = tokio::time::Instant::now();
    let date = command_output("date", &["-u", "+%Y-%m-%dT%H-%M-%SZ"]).await;
    let mut rows = Vec::new();
    for id in selected {
        eprintln!("chaos: scenario {id}: {}", scenarios::title(id));
        let row = scenarios::run(&ctx, id).await;
        if let Some(error) = &row.error {
            eprintln!("chaos: scenario {id} did not run to the end: {error}");
        }
        eprintln!(
            "{}",
            report::table(std::slice::from_ref(&row))
                .lines()
                .last()
                .unwrap_or_default()
        );
        rows.push(row);
    }
    let results = Results {
        date,
        mode: if full {
            "full"
        } else if args.quick {
            "quick"
        } else {
            "partial"
        }
        .to_owned(),
        command: std::env::var_os("HERALD_CHAOS_COMMAND").map_or_else(
            || "herald-chaos run".to_owned(),
            |c| c.to_string_lossy().into_owned(),
        ),
        git_rev: command_output("git", &["rev-parse", "--short", "HEAD"]).await,
        machine: machine().await,
        seconds: started.elapsed().as_secs_f64(),
        rows,
    };
    println!("{}", report::table(&results.rows));
    println!("{}", report::details(&results.rows));
    if full || args.write {
        let out = repo.join("chaos/results");
        std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
        let file = format!("chaos/results/{}.json", results.date);
        let json = serde_json::to_string_pretty(&results).context("cannot encode the results")?;
        std::fs::write(repo.join(&file), json).with_context(|| format!("cannot write {file}"))?;
        report::write_markdown(&repo, &results, &file)?;
        println!("wrote {file} and RELIABILITY.md");
    }
    if args.keep {
        println!("logs and databases: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// This run's scratch directory (process logs, databases).
fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!("herald-chaos-{}", std::process::id()))
}

async fn command_output(program: &str, args: &[&str]) -> String {
    match tokio::process::Command::new(program).args(args).output().await {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Err(_) => "unknown".to_owned(),
    }
}

async fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let kernel = command_output("uname", &["-sr"]).await;
    format!("{cores} cores ({model}), {kernel}")
}
