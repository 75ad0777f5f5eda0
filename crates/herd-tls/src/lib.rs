//! herd's PKI and TLS plumbing, and nothing else.
//!
//! The server makes its own certificate authority on first start ([`Ca`]) and keeps it
//! in its data dir. Everything that speaks TLS to herd trusts that one CA and no other:
//!
//! - the server presents a certificate the CA issued for its names
//!   ([`Ca::server_identity`]), served by [`serve`];
//! - the CLI pins the CA's certificate in its config ([`client_config`]);
//! - an agent sends a CSR when it joins ([`agent_key_and_csr`]); the server issues it a
//!   client certificate whose identity is the host id ([`Ca::sign_agent_csr`]), and the
//!   agent presents it on every connection after (mTLS). [`serve`] puts the verified
//!   host id of each connection into its requests as a [`PeerCert`];
//! - agents serve each other (migration, broadcast) with the same certificate: the peer
//!   requires a client certificate from the CA ([`peer_server_config`]) and the dialer
//!   checks the name [`peer_name`] of the host it meant to reach ([`client_config`]).
//!
//! Before an agent has the CA it knows only the CA's fingerprint, from the join command;
//! [`fetch_pinned_ca`] takes the CA certificate from an unverified handshake only if its
//! fingerprint matches, and everything after verifies against it.
//!
//! **Architecture Invariant:** every rustls config here is built with the `ring`
//! provider passed explicitly, never a process-wide default, and trusts only the CA
//! it was given.

mod ca;
mod config;
mod serve;

pub use ca::{
    agent_key_and_csr, der_of_pem, fingerprint_of_der, fingerprint_of_pem, host_id_of, peer_name,
    Ca, Identity, MAX_CSR_BYTES,
};
pub use config::{
    client_config, fetch_pinned_ca, normalize_fingerprint, peer_server_config, server_config,
};
/// The rustls these configs are made with, so users name the same types.
pub use rustls;
pub use serve::{serve, PeerCert, HANDSHAKE_TIMEOUT};

use std::path::PathBuf;

/// The URI subject alternative name of an agent certificate: this prefix, then the host
/// id.
pub const HOST_URI_PREFIX: &str = "urn:herd:host:";

/// The DNS suffix of the names agent certificates carry for agent-to-agent links.
pub const PEER_DNS_SUFFIX: &str = "host.herd.internal";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{present} exists but {missing} does not: refusing to make a new CA next to half of an \
         old one (restore the missing file, or remove both to start a new CA)"
    )]
    HalfCa { present: PathBuf, missing: PathBuf },
    #[error("{path} does not hold a usable certificate or key")]
    Load {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot make a certificate")]
    Generate(#[source] rcgen::Error),
    #[error("{what} is not valid PEM")]
    Pem { what: &'static str },
    #[error("the certificate signing request is {size} bytes; at most {max} are accepted")]
    CsrTooLarge { size: usize, max: usize },
    #[error("invalid certificate signing request")]
    Csr(#[source] rcgen::Error),
    #[error("{name:?} is not a DNS name or IP address a server certificate can carry")]
    BadName { name: String },
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{url:?} is not an https:// URL with a host")]
    BadUrl { url: String },
    #[error("cannot reach {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the server at {addr} did not present the pinned CA {expected}; it presented {presented}"
    )]
    FingerprintMismatch {
        addr: String,
        expected: String,
        presented: String,
    },
    #[error("{0:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")]
    BadFingerprint(String),
}
