//! Parsers for configuration values: each takes the text of an environment variable
//! (or a TOML value as text) and says what is wrong in the words of its error.

use std::time::Duration;

use crate::config::{AllowedOrigins, MembershipMode};

pub(super) fn toml_to_text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) => items.iter().map(toml_to_text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

pub(super) fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

pub(super) fn parse_count(value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .map_err(|_| "expected a whole number, 0 or more".to_owned())
}

pub(super) fn parse_positive(value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("expected a whole number, 1 or more".to_owned()),
    }
}

/// The longest duration setting accepted (a year): anything longer is a typo, and
/// deadlines computed from it must not overflow.
pub(super) const MAX_SECONDS: u64 = 365 * 24 * 3600;

pub(super) fn parse_seconds(value: &str) -> Result<Duration, String> {
    match value.parse::<u64>() {
        Ok(n) if n > 0 && n <= MAX_SECONDS => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "expected a whole number of seconds, from 1 to {MAX_SECONDS}"
        )),
    }
}

pub(super) fn parse_scheme(value: &str, schemes: &[&str]) -> Result<String, String> {
    let ok = value
        .split_once("://")
        .is_some_and(|(scheme, _)| schemes.contains(&scheme));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "expected a URL starting with {}://",
            schemes.join(":// or ")
        ))
    }
}

/// One `redis://` or `rediss://` URL: the Redis of the channels_redis layer (its
/// `hosts` entry). Sharded layers (several hosts) are refused.
pub(super) fn parse_bridge_url(value: &str) -> Result<String, String> {
    if value.contains(',') || value.contains(char::is_whitespace) {
        return Err(
            "expected one Redis URL; herald bridges a channels_redis layer with one host, not a sharded \
             (several hosts) one: give the host the layer uses, or use one host"
                .to_owned(),
        );
    }
    let url = parse_scheme(value, &["redis", "rediss"])?;
    reqwest::Url::parse(&url)
        .map(|_| url)
        .map_err(|err| format!("not a valid URL ({err})"))
}

pub(super) fn parse_http_url(value: &str) -> Result<String, String> {
    parse_scheme(value, &["http", "https"]).and_then(|url| {
        reqwest::Url::parse(&url)
            .map(|_| url)
            .map_err(|err| format!("not a valid URL ({err})"))
    })
}

pub(super) fn parse_membership(value: &str) -> Result<MembershipMode, String> {
    match value {
        "database" => Ok(MembershipMode::Database),
        "claims" => Ok(MembershipMode::Claims),
        other => match other.strip_prefix("webhook:") {
            Some(url) => parse_http_url(url).map(MembershipMode::Webhook),
            None => Err("expected database, claims or webhook:<http(s) url>".to_owned()),
        },
    }
}

pub(super) fn parse_origins(value: &str) -> Result<AllowedOrigins, String> {
    let items = split_list(value);
    if items.iter().any(|item| item == "*") {
        return Ok(AllowedOrigins::Any);
    }
    items
        .iter()
        .map(|item| {
            normalize_origin(item).ok_or_else(|| {
                format!(
                    "{item:?} is not an origin; expected scheme://host[:port], e.g. https://app.example.com"
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(AllowedOrigins::List)
}

/// Normalizes an origin for exact comparison: lowercase scheme and host, default ports
/// dropped, trailing `/` removed. Returns `None` for anything that is not
/// `scheme://host[:port]` (including the literal `null`).
pub fn normalize_origin(origin: &str) -> Option<String> {
    let origin = origin.trim().trim_end_matches('/');
    let (scheme, rest) = origin.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let rest = rest.to_ascii_lowercase();
    let rest = match (scheme.as_str(), rest.rsplit_once(':')) {
        ("http", Some((host, "80"))) | ("https", Some((host, "443")))
            if !host.ends_with(']') || host.starts_with('[') =>
        {
            host.to_owned()
        }
        _ => rest,
    };
    Some(format!("{scheme}://{rest}"))
}

impl AllowedOrigins {
    /// Whether a browser `Origin` header value is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            AllowedOrigins::Any => true,
            AllowedOrigins::List(list) => {
                normalize_origin(origin).is_some_and(|origin| list.contains(&origin))
            }
        }
    }
}
