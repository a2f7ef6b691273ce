//! Dev mode: with no JWT key source and no API keys configured, herald generates both,
//! saves them (file mode 0600) next to the SQLite file, and reuses them on later starts
//! and in `herald token`, so a dev token keeps working across restarts.

use std::path::{Path, PathBuf};

use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::config::Secrets;
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
/// Saves freshly generated secrets at once; `herald serve` uses [`prepare`] instead, so
/// that nothing is written before the listener is bound and the database opened.
pub fn resolve(config: &Config) -> anyhow::Result<(Secrets, Option<PathBuf>)> {
    let prepared = prepare(config)?;
    prepared.save()?;
    let path = prepared.dev.as_ref().map(|dev| dev.path.clone());
    Ok((prepared.secrets, path))
}

/// The secrets to run with, before anything is written: see [`Prepared::save`].
pub struct Prepared {
    pub secrets: Secrets,
    /// In dev mode: where the secrets live, and whether they were just generated.
    pub dev: Option<DevFile>,
}

/// The dev secrets file of a [`Prepared`].
pub struct DevFile {
    pub path: PathBuf,
    /// True when the file did not exist and the secrets were generated now; they are
    /// written by [`Prepared::save`].
    pub fresh: bool,
    saved: Saved,
}

impl Prepared {
    /// Writes freshly generated dev secrets (file mode 0600); does nothing when they were
    /// loaded from the file or are configured.
    pub fn save(&self) -> anyhow::Result<()> {
        let Some(dev) = self.dev.as_ref().filter(|dev| dev.fresh) else {
            return Ok(());
        };
        write_private(&dev.path, &serde_json::to_string_pretty(&dev.saved)?)
            .map_err(|err| anyhow::anyhow!("cannot save dev secrets to {}: {err}", dev.path.display()))
    }
}

/// Like [`resolve`], but generated secrets are kept in memory until [`Prepared::save`].
pub fn prepare(config: &Config) -> anyhow::Result<Prepared> {
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
        return Ok(Prepared {
            secrets: Secrets {
                dev_jwt_secret: None,
                api_keys: config.api_keys.clone(),
            },
            dev: None,
        });
    }
    let path = secrets_path(config);
    let (saved, fresh) = match load(&path)? {
        Some(saved) => (saved, false),
        None => (
            Saved {
                jwt_secret: random_token(32),
                api_key: format!("hk_{}", random_token(24)),
            },
            true,
        ),
    };
    Ok(Prepared {
        secrets: Secrets {
            dev_jwt_secret: Some(Secret::new(saved.jwt_secret.clone())),
            api_keys: vec![Secret::new(saved.api_key.clone())],
        },
        dev: Some(DevFile { path, fresh, saved }),
    })
}

/// The saved dev JWT secret, for `herald token`. Never generates one: a token signed
/// with a secret no server knows would only be refused (4001).
pub fn saved_jwt_secret(config: &Config) -> anyhow::Result<Secret> {
    let path = secrets_path(config);
    match load(&path)? {
        Some(saved) => Ok(Secret::new(saved.jwt_secret)),
        None => {
            let shown = if path.is_absolute() {
                path.display().to_string()
            } else {
                let cwd = std::env::current_dir().unwrap_or_default();
                cwd.join(&path).display().to_string()
            };
            anyhow::bail!(
                "no dev secrets at {shown}: herald token signs with the secret `herald serve` saved there in dev mode. \
                 Run herald token from the directory herald serve runs in (with the same HERALD_DATABASE_URL: the file \
                 sits next to the SQLite database), or set HERALD_JWT_SECRET to the server's secret"
            )
        }
    }
}

/// The saved secrets at `path`, or `None` when there is no file.
fn load(path: &Path) -> anyhow::Result<Option<Saved>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|err| {
            anyhow::anyhow!(
                "{} is not a valid dev secrets file ({err}); delete it to generate new secrets",
                path.display()
            )
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
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
