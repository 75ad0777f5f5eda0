//! A thin REST client for the CLI: one request, one clear error line on failure.

use anyhow::{anyhow, bail, Result};
use herd_server::api::{ErrorBody, VmList, VmView};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub struct Client {
    url: String,
    token: String,
    http: reqwest::Client,
}

#[derive(serde::Deserialize)]
struct ErrorEnvelope {
    error: ErrorDetailOwned,
}

#[derive(serde::Deserialize)]
struct ErrorDetailOwned {
    code: String,
    message: String,
}

impl Client {
    /// A client for `url`. An https URL needs `ca_pem`, the server's CA: it is the only
    /// CA trusted (the system's roots are not).
    pub fn new(url: String, token: String, ca_pem: Option<&str>) -> Result<Client> {
        let http = if url.starts_with("https://") {
            let Some(ca_pem) = ca_pem else {
                bail!(
                    "{url} is https but no CA is pinned for it: run `herd login --ca-fingerprint \
                     <sha256>` (the server prints it at start), set HERD_CA to the server's \
                     ca.pem (in its data dir), or add `ca_pem` to {} (`herd up` writes it)",
                    crate::config::config_path().display()
                );
            };
            let tls = herd_tls::client_config(ca_pem, None)
                .map_err(|e| anyhow!("the pinned CA: {}", chain(&e)))?;
            reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .build()
                .map_err(|e| anyhow!("building the HTTPS client: {e}"))?
        } else {
            reqwest::Client::new()
        };
        Ok(Client { url, token, http })
    }

    pub fn from_config() -> Result<Client> {
        let resolved = crate::config::resolve()?;
        Client::new(resolved.url, resolved.token, resolved.ca_pem.as_deref())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(StatusCode, Vec<u8>)> {
        self.exchange(method, path, body, false).await
    }

    /// Sends a request; fails on an error status, except a 404 when `missing_is_none`
    /// (answered as a 404 with no body).
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        missing_is_none: bool,
    ) -> Result<(StatusCode, Vec<u8>)> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            anyhow!(
                "cannot reach the herd server at {}: {}",
                self.url,
                chain(&e)
            )
        })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| anyhow!("reading the server's answer: {e}"))?;
        if status == StatusCode::NOT_FOUND && missing_is_none {
            return Ok((status, Vec::new()));
        }
        if !status.is_success() {
            if let Ok(envelope) = serde_json::from_slice::<ErrorEnvelope>(&bytes) {
                bail!("{} ({})", envelope.error.message, envelope.error.code);
            }
            bail!("server answered {status}");
        }
        Ok((status, bytes.to_vec()))
    }

    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let (_, bytes) = self.send(method, path, body).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| anyhow!("unexpected answer from the server: {e}"))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// Reads an object that may be gone: `None` on a 404.
    pub async fn get_if_exists<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>> {
        let (status, bytes) = self.exchange(Method::GET, path, None::<&()>, true).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| anyhow!("unexpected answer from the server: {e}"))
    }

    /// Sends and returns the status; for routes that may answer without a body.
    pub async fn call_status(&self, method: Method, path: &str) -> Result<(StatusCode, Vec<u8>)> {
        self.send(method, path, None::<&()>).await
    }

    /// Finds a VM by id or, failing that, by name (in any project).
    pub async fn resolve_vm(&self, id_or_name: &str) -> Result<VmView> {
        if id_or_name.parse::<uuid::Uuid>().is_ok() {
            return self.get(&format!("/v1/vms/{id_or_name}")).await;
        }
        let list: VmList = self
            .get(&format!("/v1/vms?name={}&limit=2", urlencode(id_or_name)))
            .await?;
        let id = match list.items.as_slice() {
            [] => bail!("no VM named {id_or_name:?}"),
            [one] => one.id,
            _ => bail!("more than one VM is named {id_or_name:?}: use its id"),
        };
        // A single VM's read says more than a list's item (its burst, its job).
        self.get(&format!("/v1/vms/{id}")).await
    }
}

// Keep ErrorBody referenced so the CLI fails to build if the error schema moves.
#[allow(dead_code)]
fn _schema_check(_: ErrorBody) {}

/// The root cause, and before it the TLS cause if there is one: "invalid peer
/// certificate: UnknownIssuer" says more than "connection closed".
fn chain(error: &dyn std::error::Error) -> String {
    let mut causes = vec![error.to_string()];
    let mut cause = error.source();
    while let Some(next) = cause {
        causes.push(next.to_string());
        cause = next.source();
    }
    // reqwest's outer messages ("error sending request for url ...") repeat the URL;
    // the innermost two say what went wrong.
    let n = causes.len();
    causes[n.saturating_sub(2)..].join(": ")
}

pub fn urlencode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
