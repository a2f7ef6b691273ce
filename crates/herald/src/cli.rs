//! The command line: `herald serve`, `herald worker`, `herald token`, `herald listen`. Thin: parses
//! arguments, loads configuration, and calls the library.

#![allow(clippy::print_stdout, clippy::print_stderr)] // A CLI prints.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, ProcessEnv};

/// herald: a real-time gateway for notifications, organization events and LLM
/// response streams over authenticated WebSockets.
///
/// Configuration comes from a TOML file (--config) and HERALD_* environment
/// variables; the environment wins. See docs/protocol.md for every setting.
#[derive(Debug, Parser)]
#[command(name = "herald", version, propagate_version = true)]
pub struct Cli {
    /// TOML configuration file; keys are the HERALD_* names in lowercase without the
    /// prefix (e.g. `listen = "0.0.0.0:8000"`).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: HTTP API and WebSockets, and LLM workers unless
    /// HERALD_WORKERS=0.
    #[command(after_long_help = settings_help())]
    Serve,
    /// Run LLM workers only, taking tasks from the shared queue in Redis
    /// (HERALD_REDIS_URL; HERALD_WORKERS at once, default 256).
    Worker,
    /// Print a dev HS256 user token signed with the configured (or dev) secret.
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        sub: String,
        /// An organization to name in the token's `orgs` claim; repeat for several.
        #[arg(long = "org")]
        orgs: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Connect to a herald WebSocket endpoint and print every message as a line of
    /// JSON (a debugging client).
    Listen {
        /// The endpoint URL, e.g. ws://127.0.0.1:8000/ws/notifications/
        url: String,
        /// The user token, sent with the herald.bearer subprotocol. Other users of this
        /// machine can read it in the process list: prefer --token-file or HERALD_TOKEN.
        #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file holding the user token (surrounding whitespace is ignored); used
        /// instead of --token or HERALD_TOKEN when given.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Exit after this many messages (the welcome message counts).
        #[arg(long)]
        count: Option<u64>,
    },
}

/// Runs the parsed command. Returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = config::load(cli.config.as_deref(), &ProcessEnv).map_err(|err| anyhow::anyhow!("{err}"))?;
    match cli.command {
        Command::Serve => serve(config).await,
        Command::Worker => worker(config).await,
        Command::Token { sub, orgs, ttl } => token(&config, &sub, &orgs, ttl),
        Command::Listen {
            url,
            token,
            token_file,
            count,
        } => {
            let token = match (token_file, token) {
                (None, Some(token)) => token,
                (Some(path), _) => std::fs::read_to_string(&path)
                    .map_err(|err| anyhow::anyhow!("cannot read --token-file {}: {err}", path.display()))?
                    .trim()
                    .to_owned(),
                (None, None) => anyhow::bail!(
                    "herald listen needs a token: --token-file FILE, the HERALD_TOKEN environment variable, or --token TOKEN"
                ),
            };
            listen(&url, &token, count).await
        }
    }
}

/// The settings part of `herald serve --help`: every `HERALD_*` variable with its
/// default and meaning, from [`config::SETTINGS`].
fn settings_help() -> String {
    let mut help = String::from(
        "Settings (environment variables; in the --config TOML file, the same names in lowercase \
         without HERALD_):\n",
    );
    for setting in config::SETTINGS {
        let default = match setting.default {
            "" => String::new(),
            default => format!(" [default: {default}]"),
        };
        help.push_str(&format!("  {}{default}\n      {}\n", setting.env, setting.doc));
    }
    help.push_str("\ndocs/protocol.md describes every setting in full.");
    help
}

async fn serve(config: Config) -> anyhow::Result<()> {
    crate::telemetry::init(&config)?;
    for note in config.not_yet_supported() {
        tracing::warn!("{note}");
    }
    // Nothing is written and nothing says "listening" until the port is bound and the
    // database is open: a failed start leaves no generated secrets behind. Redis comes
    // after: without it a node starts not ready and keeps trying.
    let prepared = crate::dev::prepare(&config)?;
    if prepared.dev.is_none() {
        for warning in config.production_warnings() {
            tracing::warn!("{warning}");
        }
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {} (HERALD_LISTEN): {err}", config.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let secrets = crate::config::Secrets {
        dev_jwt_secret: prepared.secrets.dev_jwt_secret.clone(),
        api_keys: prepared.secrets.api_keys.clone(),
    };
    let store = crate::open_store(&config).await?;
    prepared.save()?;
    let dev_path = prepared.dev.as_ref().map(|dev| dev.path.as_path());
    print_banner(&config, &prepared.secrets, dev_path, addr);
    tokio::spawn(signal_shutdown(shutdown.clone()));
    let built = crate::build_state_with(config, secrets, store, shutdown).await?;
    crate::serve_state(built, listener).await?;
    tracing::info!("herald stopped");
    Ok(())
}

async fn worker(config: Config) -> anyhow::Result<()> {
    crate::telemetry::init(&config)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    crate::work(config, shutdown).await?;
    tracing::info!("herald worker stopped");
    Ok(())
}

fn print_banner(
    config: &Config,
    secrets: &crate::config::Secrets,
    dev_path: Option<&std::path::Path>,
    addr: std::net::SocketAddr,
) {
    let provider = if config.llm_base_url.is_some() {
        "openai-compatible"
    } else {
        "echo (dev)"
    };
    println!("herald listening on http://{addr} (LLM provider: {provider})");
    let Some(path) = dev_path else {
        return;
    };
    println!(
        "dev mode: generated secrets are saved in {} (mode 0600)",
        path.display()
    );
    if let Some(secret) = &secrets.dev_jwt_secret {
        println!("  JWT secret (HS256): {}", secret.expose());
    }
    if config.api_keys.is_empty() {
        if let Some(key) = secrets.api_keys.first() {
            println!("  API key:            {}", key.expose());
            let herald = herald_command();
            println!();
            println!("try it (in another terminal, from this directory):");
            println!("  TOKEN=$({herald} token --sub alice)");
            println!("  {herald} listen ws://{addr}/ws/notifications/ --token \"$TOKEN\"");
            println!(
                "  curl -X POST http://{addr}/api/v1/notifications/alice -H 'Authorization: Bearer {}' \\\n       -H 'Content-Type: application/json' -d '{{\"title\":\"Hello\",\"body\":\"from herald\"}}'",
                key.expose()
            );
        }
    }
}

/// How to run herald again from the current directory, for the banner's hints: the
/// README's `cargo run` from a clone of the repository, else this executable's path.
fn herald_command() -> String {
    if std::path::Path::new("crates/herald/Cargo.toml").is_file() {
        return "cargo run --release -q --".to_owned();
    }
    match std::env::current_exe() {
        Ok(path) if !path.display().to_string().contains(char::is_whitespace) => path.display().to_string(),
        _ => "herald".to_owned(),
    }
}

/// Cancels `shutdown` on SIGTERM (what orchestrators send to stop a process) or SIGINT
/// (Ctrl-C).
async fn signal_shutdown(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            tracing::error!("cannot install signal handlers; stop herald with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; draining"),
            _ = int.recv() => tracing::info!("SIGINT received; draining"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
}

fn token(config: &Config, sub: &str, orgs: &[String], ttl: u64) -> anyhow::Result<()> {
    crate::ids::UserId::parse(sub).map_err(|err| anyhow::anyhow!("--sub: {err}"))?;
    let secret = match &config.jwt_secret {
        Some(secret) => secret.clone(),
        None if config.jwt_dev_mode() => crate::dev::saved_jwt_secret(config)?,
        None => anyhow::bail!(
            "herald token signs HS256 tokens, but this configuration verifies tokens with JWKS; mint tokens with your identity provider"
        ),
    };
    let token = crate::auth::mint_hs256(&secret, sub, orgs, Duration::from_secs(ttl))
        .map_err(|err| anyhow::anyhow!("cannot sign the token: {err}"))?;
    println!("{token}");
    Ok(())
}

async fn listen(url: &str, token: &str, count: Option<u64>) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let uri: http::Uri = url
        .parse()
        .map_err(|err| anyhow::anyhow!("{url} is not a valid ws:// URL: {err}"))?;
    let protocol = format!("{}, {token}", crate::auth::BEARER_SUBPROTOCOL);
    let (mut ws, _) = tokio_websockets::ClientBuilder::from_uri(uri)
        .add_header(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            http::HeaderValue::from_str(&protocol)
                .map_err(|_| anyhow::anyhow!("the token contains invalid characters"))?,
        )
        .map_err(|err| anyhow::anyhow!("{err}"))?
        .connect()
        .await
        .map_err(|err| anyhow::anyhow!("cannot connect to {url}: {err}"))?;
    let mut seen = 0;
    while let Some(message) = ws.next().await {
        let message = message.map_err(|err| anyhow::anyhow!("connection failed: {err}"))?;
        if let Some(text) = message.as_text() {
            println!("{text}");
            seen += 1;
            if count.is_some_and(|count| seen >= count) {
                return Ok(());
            }
        } else if let Some((code, reason)) = message.as_close() {
            eprintln!("closed: {} {reason}", u16::from(code));
            return Ok(());
        }
    }
    eprintln!("closed");
    Ok(())
}

/// Parses `std::env::args` (clap's `--help` and errors exit here).
pub fn parse() -> Cli {
    Cli::parse()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }
}
