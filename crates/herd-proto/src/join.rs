//! JSON messages of an agent's join and discovery, the only HTTP calls an agent makes
//! before it opens its bus connection.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `POST /v1/agent/join`: a new host presents a one-time join token and a certificate
/// signing request for the key it will prove itself with from then on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub join_token: String,
    pub hostname: String,
    /// PKCS#10 CSR (PEM) for the agent's key. Only its key and self-signature count: the
    /// server decides the certificate's identity (the new host id).
    pub csr_pem: String,
    /// The host's first labels (`rack`, `zone`, `region` place it); an admin changes
    /// them later with `herd host label`.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The host's identity and its long-lived credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JoinResponse {
    pub host_id: Uuid,
    pub agent_token: String,
    /// The agent's client certificate (PEM) for the CSR, naming `host_id`. Absent when
    /// the server speaks plain HTTP (insecure mode): there is no TLS to present it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_pem: Option<String>,
    /// The server's CA certificate (PEM), which the agent trusts from then on. Absent in
    /// insecure mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    pub discovery: Discovery,
}

/// `GET /v1/agent/discovery`: everything an agent needs to configure itself, from the
/// one URL it was given.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Discovery {
    pub server_version: String,
    /// Where the agent's command queue and state reports go (a WebSocket URL).
    pub bus_url: String,
    /// Where guest images are served from.
    pub image_store_url: String,
    pub sync_interval_ms: u64,
    pub usage_interval_ms: u64,
}
