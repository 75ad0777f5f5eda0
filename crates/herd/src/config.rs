//! The client configuration: where the server is, which token to use, and which CA to
//! trust for it.
//!
//! `herd up` writes it, with its server's CA certificate pinned; `HERD_URL`,
//! `HERD_TOKEN` and `HERD_CA` (a PEM file) override it, so scripts and tests never have
//! to touch the file.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub url: Option<String>,
    pub token: Option<String>,
    /// The server's CA certificate (PEM): the only CA trusted for an https URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

pub fn config_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| home().join(".config"));
    base.join("herd").join("config.toml")
}

pub fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| home().join(".local").join("share"));
    base.join("herd")
}

pub fn load() -> Result<ClientConfig> {
    let path = config_path();
    let mut config = match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .with_context(|| format!("{} is not a valid herd client config", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ClientConfig::default(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if let Ok(url) = std::env::var("HERD_URL") {
        config.url = Some(url);
    }
    if let Ok(token) = std::env::var("HERD_TOKEN") {
        config.token = Some(token);
    }
    if let Some(path) = std::env::var_os("HERD_CA") {
        let path = PathBuf::from(path);
        let pem = std::fs::read_to_string(&path)
            .with_context(|| format!("HERD_CA: cannot read {}", path.display()))?;
        config.ca_pem = Some(pem);
    }
    Ok(config)
}

/// Where the client connects, with what, trusting which CA.
pub struct Resolved {
    pub url: String,
    pub token: String,
    pub ca_pem: Option<String>,
}

/// The server URL, token and pinned CA, or an error that says how to get them.
pub fn resolve() -> Result<Resolved> {
    let config = load()?;
    let Some(url) = config.url else {
        bail!(
            "no server configured: run `herd up`, or set HERD_URL and HERD_TOKEN (config file: {})",
            config_path().display()
        );
    };
    let Some(token) = config.token else {
        bail!(
            "no token configured: set HERD_TOKEN or add `token` to {}",
            config_path().display()
        );
    };
    Ok(Resolved {
        url: url.trim_end_matches('/').to_owned(),
        token,
        ca_pem: config.ca_pem,
    })
}

pub fn save(config: &ClientConfig) -> Result<PathBuf> {
    let path = config_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = toml::to_string(config).context("cannot encode the client config")?;
    write_private(&path, text.as_bytes())?;
    Ok(path)
}

/// Writes a file readable only by its owner: it holds a credential.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
