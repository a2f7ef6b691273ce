//! Dev mode: with no JWT key source and no API keys configured, herald generates both,
//! saves them (file mode 0600) next to the SQLite file, and reuses them on later starts
//! and in `herald token`, so a dev token keeps working across restarts.

use std::path::{Path, PathBuf};

use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::app::Secrets;
use crate::config::{Config, Secret};

/// The file name of the saved dev secrets.
pub const DEV_SECRETS_FILE: &str = "herald-dev-secrets.json";

#[derive(Serialize, Deserialize)]
struct Saved {
    jwt_secret: String,
    api_key: String,
}

/// Where the dev secrets live: the SQLite file's directory, or the current directory
/// for in-memory SQLite and PostgreSQL.
pub fn secrets_path(config: &Config) -> PathBuf {
    let dir = config
        .database_url
        .strip_prefix("sqlite://")
        .or_else(|| config.database_url.strip_prefix("sqlite:"))
        .filter(|rest| !rest.starts_with(":memory:"))
        .map(|rest| rest.split('?').next().unwrap_or(rest))
        .and_then(|file| Path::new(file).parent().map(Path::to_path_buf))
        .unwrap_or_default();
    dir.join(DEV_SECRETS_FILE)
}

/// The secrets to run with: the configured ones, completed in dev mode by generated
/// (or previously saved) ones. Returns the path of the file when dev secrets are used.
pub fn resolve(config: &Config) -> anyhow::Result<(Secrets, Option<PathBuf>)> {
    let need_jwt = config.jwt_dev_mode();
    let need_api_key = config.api_keys.is_empty();
    // Dev mode is all or nothing: a node with some auth configured is meant for real
    // use, and must not print a generated service key to its logs.
    if need_api_key && !need_jwt {
        anyhow::bail!(
            "HERALD_API_KEYS is not set: a JWT key source is configured, so this is not dev mode; \
             set HERALD_API_KEYS to the service keys backends will publish with"
        );
    }
    if need_jwt && !need_api_key {
        anyhow::bail!(
            "no JWT key source is set: HERALD_API_KEYS is configured, so this is not dev mode; \
             set HERALD_JWT_SECRET, HERALD_JWT_JWKS_URL or HERALD_JWT_ISSUER"
        );
    }
    if !need_jwt && !need_api_key {
        return Ok((
            Secrets {
                dev_jwt_secret: None,
                api_keys: config.api_keys.clone(),
            },
            None,
        ));
    }
    let path = secrets_path(config);
    let saved = load_or_create(&path)?;
    Ok((
        Secrets {
            dev_jwt_secret: Some(Secret::new(saved.jwt_secret)),
            api_keys: vec![Secret::new(saved.api_key)],
        },
        Some(path),
    ))
}

fn load_or_create(path: &Path) -> anyhow::Result<Saved> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|err| {
            anyhow::anyhow!(
                "{} is not a valid dev secrets file ({err}); delete it to generate new secrets",
                path.display()
            )
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let saved = Saved {
                jwt_secret: random_token(32),
                api_key: format!("hk_{}", random_token(24)),
            };
            write_private(path, &serde_json::to_string_pretty(&saved)?)
                .map_err(|err| anyhow::anyhow!("cannot save dev secrets to {}: {err}", path.display()))?;
            Ok(saved)
        }
        Err(err) => Err(anyhow::anyhow!("cannot read {}: {err}", path.display())),
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())
}

fn random_token(n_bytes: usize) -> String {
    let mut bytes = vec![0u8; n_bytes];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
