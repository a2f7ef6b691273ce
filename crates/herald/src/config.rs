//! Configuration: one typed [`Config`], loaded from defaults < TOML file < `HERALD_*`
//! environment, validated once at start.
//!
//! Every setting is a row of [`SETTINGS`]: its environment name, its TOML key (the same
//! name, lowercase, without `HERALD_`), its default and its meaning. The environment is
//! read only through the [`Env`] trait so tests can pass a map instead of mutating the
//! process environment.

pub mod django;
mod env;
mod parse;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use env::{Env, ProcessEnv};
pub use parse::normalize_origin;
use parse::{
    parse_bridge_url, parse_count, parse_http_url, parse_membership, parse_origins, parse_positive,
    parse_scheme, parse_seconds, split_list, toml_to_text, MAX_SECONDS,
};

/// One configuration setting, as documented in docs/protocol.md.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The environment variable, e.g. `HERALD_LISTEN`.
    pub env: &'static str,
    /// The default, as text; empty means "not set".
    pub default: &'static str,
    /// What it means, one line.
    pub doc: &'static str,
    /// Whether the value is a secret that must never be echoed back.
    pub secret: bool,
}

impl Setting {
    /// The TOML key for this setting: `HERALD_JWT_SECRET` → `jwt_secret`.
    pub fn toml_key(&self) -> String {
        self.env.trim_start_matches("HERALD_").to_ascii_lowercase()
    }
}

macro_rules! settings {
    ($($konst:ident = $env:literal, $default:literal, $secret:literal, $doc:literal;)*) => {
        $(
            #[doc = $doc]
            pub const $konst: &str = $env;
        )*
        /// Every setting herald reads, in documented order.
        pub const SETTINGS: &[Setting] = &[
            $(Setting { env: $env, default: $default, doc: $doc, secret: $secret },)*
        ];
    };
}

settings! {
    ENV_LISTEN = "HERALD_LISTEN", "127.0.0.1:8000", false, "Address to bind.";
    ENV_JWT_SECRET = "HERALD_JWT_SECRET", "", true, "HS256 secret for user tokens; generated and saved in dev mode when no key source is set.";
    ENV_JWT_JWKS_URL = "HERALD_JWT_JWKS_URL", "", false, "JWKS document URL (RS256/ES256/EdDSA); enables JWKS mode.";
    ENV_JWT_ISSUER = "HERALD_JWT_ISSUER", "", false, "Required `iss`; alone, the JWKS is discovered from `<issuer>/.well-known/openid-configuration`.";
    ENV_JWT_AUDIENCE = "HERALD_JWT_AUDIENCE", "", false, "Required `aud` (comma list: any of); not checked when empty.";
    ENV_JWT_USER_CLAIM = "HERALD_JWT_USER_CLAIM", "sub", false, "Claim holding the user id.";
    ENV_ALLOWED_ORIGINS = "HERALD_ALLOWED_ORIGINS", "http://localhost:8000,http://127.0.0.1:8000", false, "Comma list of allowed `Origin`s; `*` allows all.";
    ENV_DEMO_PAGE = "HERALD_DEMO_PAGE", "true", false, "`true` serves the demo page at `/`; `false` turns it off (the browser client at `/client/` stays).";
    ENV_API_KEYS = "HERALD_API_KEYS", "", true, "Comma list of service keys for the publish/admin API; generated and saved in dev mode when empty.";
    ENV_REDIS_URL = "HERALD_REDIS_URL", "", false, "Redis (`redis://`) or Redis Cluster (`redis-cluster://host:port?node=host:port`) for multi-node fan-out, history, limits and the task queue; in-memory single node when empty.";
    ENV_DATABASE_URL = "HERALD_DATABASE_URL", "sqlite://herald.db", false, "`sqlite://…` or `postgres://…` for memberships and chats.";
    ENV_MEMBERSHIP = "HERALD_MEMBERSHIP", "database", false, "`database`, `claims` or `webhook:<url>`.";
    ENV_LLM_BASE_URL = "HERALD_LLM_BASE_URL", "", false, "OpenAI-compatible API base (`…/v1`); the `echo` dev provider when empty.";
    ENV_LLM_API_KEY = "HERALD_LLM_API_KEY", "", true, "Bearer key for the LLM API.";
    ENV_LLM_MODEL = "HERALD_LLM_MODEL", "gpt-4o-mini", false, "Model name sent to the LLM.";
    ENV_MAX_CONNECTIONS_PER_USER = "HERALD_MAX_CONNECTIONS_PER_USER", "3", false, "Concurrent sockets per user, all endpoints, all nodes.";
    ENV_MAX_SUBSCRIPTIONS_PER_CONNECTION = "HERALD_MAX_SUBSCRIPTIONS_PER_CONNECTION", "128", false, "Channels one `/ws/` socket may subscribe to at once.";
    ENV_MAX_CONNECTION_AGE = "HERALD_MAX_CONNECTION_AGE", "7200", false, "Seconds before the server closes a socket.";
    ENV_CLIENT_MESSAGES_PER_MINUTE = "HERALD_CLIENT_MESSAGES_PER_MINUTE", "60", false, "Client-to-server messages allowed per socket per minute.";
    ENV_LOG = "HERALD_LOG", "info", false, "Log filter, `RUST_LOG` syntax.";
    ENV_LOG_FORMAT = "HERALD_LOG_FORMAT", "text", false, "`text` or `json` (JSON lines).";
    ENV_HISTORY_SIZE = "HERALD_HISTORY_SIZE", "1000", false, "Messages kept per channel for recovery.";
    ENV_HISTORY_TTL = "HERALD_HISTORY_TTL", "600", false, "Seconds a message stays in history.";
    ENV_WORKERS = "HERALD_WORKERS", "", false, "LLM tasks run at once by this process (0: none); 64 for `serve`, 256 for `worker`.";
    ENV_CHAT_CONTEXT_MESSAGES = "HERALD_CHAT_CONTEXT_MESSAGES", "20", false, "Earlier chat turns sent to the LLM.";
    ENV_FRAME_COALESCE_MS = "HERALD_FRAME_COALESCE_MS", "0", false, "Join LLM deltas arriving within this many milliseconds.";
    ENV_SHUTDOWN_DRAIN = "HERALD_SHUTDOWN_DRAIN", "10", false, "Seconds over which sockets are closed on shutdown.";
    ENV_DJANGO_BRIDGE = "HERALD_DJANGO_BRIDGE", "", false, "Redis URL of a Django Channels layer to bridge.";
    ENV_MAX_PENDING_PER_IP = "HERALD_MAX_PENDING_PER_IP", "64", false, "Connections from one peer address that have not finished their request or upgrade; more are closed at accept.";
    ENV_MAX_CONNECTIONS = "HERALD_MAX_CONNECTIONS", "", false, "Open connections per node before upgrades are answered 503; the file-descriptor limit minus a reserve (5 % or 64, the larger) when empty.";
    ENV_TRUSTED_PROXIES = "HERALD_TRUSTED_PROXIES", "", false, "Comma list of CIDRs of reverse proxies whose `X-Forwarded-For` names the client.";
}

/// The secrets a node runs with, after dev-mode generation.
pub struct Secrets {
    /// The HS256 secret when no other key source is configured.
    pub dev_jwt_secret: Option<Secret>,
    pub api_keys: Vec<Secret>,
}

/// A URL (database, Redis) with any password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// A value that must never reach logs: its `Debug` is masked and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call sites are the few places that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where org membership is decided (`HERALD_MEMBERSHIP`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipMode {
    /// The `org_members` table, managed through the service API.
    Database,
    /// The token's `orgs` claim or Keycloak's `organization` claim.
    Claims,
    /// An HTTP endpoint asked `{"user_id","org_id"}`.
    Webhook(String),
}

/// Which browser origins may open sockets (`HERALD_ALLOWED_ORIGINS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    Any,
    /// Normalized `scheme://host[:port]` values, compared exactly.
    List(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything herald needs to run, typed and validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub jwt_secret: Option<Secret>,
    pub jwt_jwks_url: Option<String>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Vec<String>,
    pub jwt_user_claim: String,
    pub allowed_origins: AllowedOrigins,
    pub demo_page: bool,
    pub api_keys: Vec<Secret>,
    pub redis_url: Option<String>,
    pub database_url: String,
    pub membership: MembershipMode,
    pub llm_base_url: Option<String>,
    pub llm_api_key: Option<Secret>,
    pub llm_model: String,
    pub max_connections_per_user: u32,
    pub max_subscriptions_per_connection: u32,
    pub max_connection_age: Duration,
    pub client_messages_per_minute: u32,
    pub log: String,
    pub log_format: LogFormat,
    pub history_size: usize,
    pub history_ttl: Duration,
    /// `None` means the command's default (64 for `serve`, 256 for `worker`).
    pub workers: Option<usize>,
    pub chat_context_messages: usize,
    pub frame_coalesce: Duration,
    pub shutdown_drain: Duration,
    pub django_bridge: Option<String>,
    /// The `[django]` table: channels_redis settings and group mappings for the bridge.
    pub django: django::BridgeOptions,
    /// Bytes a socket's outbox may hold before the client counts as too slow (close
    /// 1008). Not an environment setting; TOML key `outbox_max_bytes`.
    pub outbox_max_bytes: usize,
    /// Bytes of history kept in memory across all channels before the least recently
    /// used channels' histories are dropped. Not an environment setting; TOML key
    /// `history_max_bytes`.
    pub history_max_bytes: usize,
    /// WebSocket handshakes per second per client IP (bursts of 4x), answered with 429
    /// beyond; 0 turns the limit off. Not an environment setting; TOML key
    /// `handshakes_per_ip_per_second`.
    pub handshakes_per_ip_per_second: u32,
    /// How often the server sends a protocol ping. TOML key `ping_interval_ms`.
    pub ping_interval: Duration,
    /// A socket that has sent nothing, not even a pong, for this long is dropped. TOML
    /// key `pong_timeout_ms`.
    pub pong_timeout: Duration,
    /// LLM connect timeout. TOML key `llm_connect_timeout_ms`.
    pub llm_connect_timeout: Duration,
    /// Longest wait for an LLM's first token. TOML key `llm_first_token_timeout_ms`.
    pub llm_first_token_timeout: Duration,
    /// Longest silence between two LLM stream events. TOML key
    /// `llm_between_tokens_timeout_ms`.
    pub llm_between_tokens_timeout: Duration,
    /// `task_claim_idle_ms`: with Redis, how long a running task's worker may go
    /// unheard before another worker takes the task over.
    pub task_claim_idle: Duration,
    /// `node_ttl_ms`: with Redis, how long a node that stopped heartbeating still
    /// counts: its sockets in the per-user connection counts and its users in presence.
    pub node_ttl: Duration,
    /// `sse_keep_alive_ms`: the longest silence on a server-sent-events stream before
    /// a comment line goes out, so proxies keep it open (SPEC §10: 15 s).
    pub sse_keep_alive: Duration,
    /// `request_head_timeout_ms`: from a request's first byte to the end of its head;
    /// beyond it the connection is closed.
    pub request_head_timeout: Duration,
    /// `http_idle_timeout_ms`: how long an HTTP connection may wait for the first byte
    /// of its next request (or of its first) before it is closed.
    pub http_idle_timeout: Duration,
    /// Connections from one peer address not done with their request or upgrade.
    pub max_pending_per_ip: usize,
    /// Open connections on this node before upgrades get 503; `None`: from the
    /// file-descriptor limit ([`crate::http::server::default_max_connections`]).
    pub max_connections: Option<usize>,
    /// Reverse proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Cidr>,
}

/// Default of `request_head_timeout_ms`.
pub const DEFAULT_REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of `http_idle_timeout_ms`.
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// An address block such as `10.0.0.0/8` or `::1/128` (`HERALD_TRUSTED_PROXIES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or a bare address (a block of one).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let bad =
            || format!("{text:?} is not an address block; expected e.g. 10.0.0.0/8, 192.168.1.7 or fd00::/8");
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: std::net::IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }

    /// Whether `ip` is inside the block (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The shortest `HERALD_JWT_SECRET` accepted without a warning: HS256's key should be
/// at least as long as its 256-bit output (RFC 7518, section 3.2).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// Default for [`Config::ping_interval`] (the documented 25 s).
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(25);

/// Default for [`Config::pong_timeout`] (the documented 60 s).
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(60);

/// Default for [`Config::handshakes_per_ip_per_second`]: generous for people behind
/// one NAT reconnecting after a deploy, tight enough to blunt a single flooding client.
pub const DEFAULT_HANDSHAKES_PER_IP_PER_SECOND: u32 = 50;

/// Default for [`Config::history_max_bytes`].
pub const DEFAULT_HISTORY_MAX_BYTES: usize = 256 << 20;

/// Default for [`Config::outbox_max_bytes`]: like Centrifugo's 1 MiB client queue, big
/// enough for bursts, small enough that 10,000 stuck clients cannot exhaust memory.
pub const DEFAULT_OUTBOX_MAX_BYTES: usize = 1 << 20;

/// Why configuration could not be loaded. Each variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}={value} is not valid: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {reason}")]
    ParseFile { path: PathBuf, reason: String },
    #[error("config file {path}: unknown key `{key}` (keys are the HERALD_* names in lowercase without the prefix, e.g. `listen`)")]
    UnknownKey { path: PathBuf, key: String },
    #[error("config file {path}: [{table}] {reason}")]
    Table {
        path: PathBuf,
        table: &'static str,
        reason: String,
    },
}

/// The TOML table that configures the Django bridge (docs/protocol.md).
pub const DJANGO_TABLE: &str = "django";

/// Loads configuration: defaults, then the TOML file (if any), then the environment.
pub fn load(file: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
    let mut raw: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut tuning = Tuning::default();
    let mut django = django::BridgeOptions::default();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        let table: toml::Table = text
            .parse()
            .map_err(|err: toml::de::Error| ConfigError::ParseFile {
                path: path.to_owned(),
                reason: err.message().to_owned(),
            })?;
        for (key, value) in table {
            if key == DJANGO_TABLE {
                django = match value {
                    toml::Value::Table(_) => django::BridgeOptions::from_toml(value),
                    _ => Err("must be a table: write `[django]` followed by its keys".to_owned()),
                }
                .map_err(|reason| ConfigError::Table {
                    path: path.to_owned(),
                    table: DJANGO_TABLE,
                    reason,
                })?;
                continue;
            }
            if let Some(name) = TOML_ONLY_KEYS.iter().find(|name| **name == key) {
                tuning.raw.insert(name, toml_to_text(&value));
                continue;
            }
            let Some(setting) = SETTINGS.iter().find(|s| s.toml_key() == key) else {
                return Err(ConfigError::UnknownKey {
                    path: path.to_owned(),
                    key,
                });
            };
            raw.insert(setting.env, toml_to_text(&value));
        }
    }
    for setting in SETTINGS {
        if let Some(value) = env.get(setting.env) {
            raw.insert(setting.env, value);
        }
    }
    let values = Values { raw };

    let config = Config {
        listen: values.parse(ENV_LISTEN, |v| {
            v.parse::<SocketAddr>()
                .map_err(|_| "expected host:port, e.g. 127.0.0.1:8000".to_owned())
        })?,
        jwt_secret: values.optional(ENV_JWT_SECRET).map(Secret::new),
        jwt_jwks_url: values.parse_optional(ENV_JWT_JWKS_URL, parse_http_url)?,
        jwt_issuer: values.optional(ENV_JWT_ISSUER),
        jwt_audience: split_list(&values.get(ENV_JWT_AUDIENCE)),
        jwt_user_claim: values.parse(ENV_JWT_USER_CLAIM, |v| {
            if v.is_empty() {
                Err("expected a claim name such as sub".to_owned())
            } else {
                Ok(v.to_owned())
            }
        })?,
        allowed_origins: values.parse(ENV_ALLOWED_ORIGINS, parse_origins)?,
        demo_page: values.parse(ENV_DEMO_PAGE, |v| match v {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err("expected true or false".to_owned()),
        })?,
        api_keys: split_list(&values.get(ENV_API_KEYS))
            .into_iter()
            .map(Secret::new)
            .collect(),
        redis_url: values.parse_optional(ENV_REDIS_URL, |v| {
            parse_scheme(v, &["redis", "rediss", "redis-cluster"])
        })?,
        database_url: values.parse(ENV_DATABASE_URL, |v| {
            if v.starts_with("sqlite:") {
                Ok(v.to_owned())
            } else {
                parse_scheme(v, &["sqlite", "postgres", "postgresql"])
            }
        })?,
        membership: values.parse(ENV_MEMBERSHIP, parse_membership)?,
        llm_base_url: values.parse_optional(ENV_LLM_BASE_URL, parse_http_url)?,
        llm_api_key: values.optional(ENV_LLM_API_KEY).map(Secret::new),
        llm_model: values.get(ENV_LLM_MODEL),
        max_connections_per_user: values.parse(ENV_MAX_CONNECTIONS_PER_USER, parse_positive)?,
        max_subscriptions_per_connection: values
            .parse(ENV_MAX_SUBSCRIPTIONS_PER_CONNECTION, parse_positive)?,
        max_connection_age: values.parse(ENV_MAX_CONNECTION_AGE, parse_seconds)?,
        client_messages_per_minute: values.parse(ENV_CLIENT_MESSAGES_PER_MINUTE, parse_positive)?,
        log: values.get(ENV_LOG),
        log_format: values.parse(ENV_LOG_FORMAT, |v| match v {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected text or json".to_owned()),
        })?,
        history_size: values.parse(ENV_HISTORY_SIZE, parse_count)?,
        history_ttl: values.parse(ENV_HISTORY_TTL, parse_seconds)?,
        workers: values.parse_optional(ENV_WORKERS, parse_count)?,
        chat_context_messages: values.parse(ENV_CHAT_CONTEXT_MESSAGES, parse_count)?,
        frame_coalesce: values.parse(ENV_FRAME_COALESCE_MS, |v| {
            parse_count(v).map(|ms| Duration::from_millis(ms as u64))
        })?,
        shutdown_drain: values.parse(ENV_SHUTDOWN_DRAIN, parse_seconds)?,
        django_bridge: values.parse_optional(ENV_DJANGO_BRIDGE, parse_bridge_url)?,
        django,
        outbox_max_bytes: tuning.count("outbox_max_bytes", DEFAULT_OUTBOX_MAX_BYTES)?,
        history_max_bytes: tuning.count("history_max_bytes", DEFAULT_HISTORY_MAX_BYTES)?,
        handshakes_per_ip_per_second: u32::try_from(tuning.count(
            "handshakes_per_ip_per_second",
            DEFAULT_HANDSHAKES_PER_IP_PER_SECOND as usize,
        )?)
        .unwrap_or(u32::MAX),
        ping_interval: tuning.millis("ping_interval_ms", DEFAULT_PING_INTERVAL)?,
        pong_timeout: tuning.millis("pong_timeout_ms", DEFAULT_PONG_TIMEOUT)?,
        llm_connect_timeout: tuning.millis("llm_connect_timeout_ms", Duration::from_secs(10))?,
        llm_first_token_timeout: tuning.millis("llm_first_token_timeout_ms", Duration::from_secs(60))?,
        llm_between_tokens_timeout: tuning
            .millis("llm_between_tokens_timeout_ms", Duration::from_secs(30))?,
        task_claim_idle: tuning.millis("task_claim_idle_ms", DEFAULT_TASK_CLAIM_IDLE)?,
        node_ttl: tuning.millis("node_ttl_ms", DEFAULT_NODE_TTL)?,
        sse_keep_alive: tuning.millis("sse_keep_alive_ms", DEFAULT_SSE_KEEP_ALIVE)?,
        request_head_timeout: tuning.millis("request_head_timeout_ms", DEFAULT_REQUEST_HEAD_TIMEOUT)?,
        http_idle_timeout: tuning.millis("http_idle_timeout_ms", DEFAULT_HTTP_IDLE_TIMEOUT)?,
        max_pending_per_ip: values
            .parse(ENV_MAX_PENDING_PER_IP, |v| parse_positive(v).map(|n| n as usize))?,
        max_connections: values
            .parse_optional(ENV_MAX_CONNECTIONS, |v| parse_positive(v).map(|n| n as usize))?,
        trusted_proxies: values.parse(ENV_TRUSTED_PROXIES, |v| {
            split_list(v).iter().map(|item| Cidr::parse(item)).collect()
        })?,
    };
    Ok(config)
}

impl Config {
    /// The configuration a test or embedded use starts from: every default, with
    /// `database_url` in memory.
    pub fn defaults() -> Config {
        #[allow(clippy::expect_used)]
        // The defaults are constants covered by the `defaults_load` test.
        load(None, &BTreeMap::<String, String>::new()).expect("built-in defaults are valid")
    }

    /// Settings that are accepted but whose feature is not built yet, with what herald
    /// does instead. Logged as warnings at start so nobody relies on them silently.
    pub fn not_yet_supported(&self) -> Vec<String> {
        Vec::new()
    }

    /// Settings that are fine for trying herald out but not for production, one line
    /// each. `herald serve` logs them as warnings when it is not in dev mode.
    pub fn production_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.llm_base_url.is_none() {
            warnings.push(
                "HERALD_LLM_BASE_URL is not set: the echo development provider answers chat requests; \
                 set it to an OpenAI-compatible API (…/v1)"
                    .to_owned(),
            );
        }
        if self.demo_page {
            warnings
                .push("the demo page is served at /; set HERALD_DEMO_PAGE=false to turn it off".to_owned());
        }
        if let Some(secret) = &self.jwt_secret {
            if secret.expose().len() < MIN_JWT_SECRET_BYTES {
                warnings.push(format!(
                    "HERALD_JWT_SECRET is {} bytes long: anyone who guesses it can sign tokens for any user; \
                     use {MIN_JWT_SECRET_BYTES} random bytes or more (e.g. `openssl rand -base64 32`)",
                    secret.expose().len()
                ));
            }
        }
        if self.allowed_origins == AllowedOrigins::Any {
            warnings.push(
                "HERALD_ALLOWED_ORIGINS=*: any web page can open sockets and call the user API with a user's token; \
                 list your app's origins instead"
                    .to_owned(),
            );
        }
        warnings
    }

    /// True when no key source is configured and herald runs with a generated secret.
    pub fn jwt_dev_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_jwks_url.is_none() && self.jwt_issuer.is_none()
    }
}

/// Raw text values by environment name, after merging file and environment.
struct Values {
    raw: BTreeMap<&'static str, String>,
}

impl Values {
    fn setting(name: &'static str) -> &'static Setting {
        SETTINGS.iter().find(|s| s.env == name).unwrap_or(&SETTINGS[0])
    }

    fn get(&self, name: &'static str) -> String {
        match self.raw.get(name) {
            Some(v) => v.trim().to_owned(),
            None => Self::setting(name).default.to_owned(),
        }
    }

    fn optional(&self, name: &'static str) -> Option<String> {
        Some(self.get(name)).filter(|v| !v.is_empty())
    }

    fn parse<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let value = self.get(name);
        parse(&value).map_err(|reason| ConfigError::Invalid {
            name,
            value: if Self::setting(name).secret {
                "<redacted>".to_owned()
            } else {
                // A URL's password (e.g. in a Redis URL, or in a list of them) is
                // never echoed.
                let redacted: Vec<String> = value.split(',').map(redact_url).collect();
                format!("{:?}", redacted.join(","))
            },
            reason,
        })
    }

    fn parse_optional<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        if self.optional(name).is_none() {
            return Ok(None);
        }
        self.parse(name, parse).map(Some)
    }
}

/// Tuning settings only the TOML file can set: operational knobs outside the
/// documented `HERALD_*` environment contract.
pub const TOML_ONLY_KEYS: [&str; 13] = [
    "outbox_max_bytes",
    "history_max_bytes",
    "handshakes_per_ip_per_second",
    "ping_interval_ms",
    "pong_timeout_ms",
    "llm_connect_timeout_ms",
    "llm_first_token_timeout_ms",
    "llm_between_tokens_timeout_ms",
    "task_claim_idle_ms",
    "sse_keep_alive_ms",
    "request_head_timeout_ms",
    "http_idle_timeout_ms",
    "node_ttl_ms",
];

/// Default of `node_ttl_ms` (the documented 15 s).
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(15);

/// Default of `sse_keep_alive_ms` (the documented 15 s).
pub const DEFAULT_SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Default of `task_claim_idle_ms`.
pub const DEFAULT_TASK_CLAIM_IDLE: Duration = Duration::from_secs(15);

/// Raw values of [`TOML_ONLY_KEYS`] from the file, parsed on demand.
#[derive(Default)]
struct Tuning {
    raw: BTreeMap<&'static str, String>,
}

impl Tuning {
    /// A whole number, or `default` when the file does not set it.
    fn count(&self, name: &'static str, default: usize) -> Result<usize, ConfigError> {
        match self.raw.get(name) {
            None => Ok(default),
            Some(v) => parse_count(v).map_err(|reason| ConfigError::Invalid {
                name,
                value: v.clone(),
                reason,
            }),
        }
    }

    /// Milliseconds (at most a year), or `default` when unset or 0.
    fn millis(&self, name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        match self.count(name, 0)? {
            0 => Ok(default),
            ms => Ok(Duration::from_millis((ms as u64).min(MAX_SECONDS * 1000))),
        }
    }
}

#[cfg(test)]
mod tests;
