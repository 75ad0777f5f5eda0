//! rustls configs that trust herd's CA and nothing else, and the one unverified
//! handshake herd ever makes: taking the CA certificate that matches a pinned
//! fingerprint.

use crate::ca::{certs_from_pem, fingerprint_of_der, pem_of_der, Ca, Identity};
use crate::{TlsError, HANDSHAKE_TIMEOUT};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;

/// The one crypto provider herd uses, passed explicitly to every config.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(certs: Vec<CertificateDer<'static>>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The server's TLS config: it presents `identity` (with the CA certificate appended to
/// the chain, so an agent can pin the CA by fingerprint). A client certificate is
/// optional (operators authenticate with bearer tokens), but one that is presented must
/// be a client certificate issued by `ca`.
pub fn server_config(identity: &Identity, ca: &Ca) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(vec![ca.der().clone()])?),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let mut chain = identity.chain.clone();
    if !chain.contains(ca.der()) {
        chain.push(ca.der().clone());
    }
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, identity.key.clone_key())?;
    Ok(Arc::new(config))
}

/// An agent's TLS config for serving other agents: it presents the agent's own
/// certificate and requires one from the same CA, so only joined hosts reach it. The
/// handler learns which host called from [`crate::PeerCert`].
pub fn peer_server_config(
    identity: &Identity,
    ca_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(certs_from_pem(ca_pem, "CA certificate")?)?),
        provider.clone(),
    )
    .build()?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    Ok(Arc::new(config))
}

/// A client TLS config that trusts only the CA(s) in `ca_pem`, presenting
/// `client_identity` (certificate PEM, key PEM) if given.
pub fn client_config(
    ca_pem: &str,
    client_identity: Option<(&str, &str)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(certs_from_pem(ca_pem, "CA certificate")?)?);
    Ok(match client_identity {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let identity = Identity::from_pem(cert_pem, key_pem)?;
            builder.with_client_auth_cert(identity.chain, identity.key)?
        }
    })
}

/// A fingerprint as 64 lowercase hex digits; accepts upper case and colons
/// (`AB:CD:...`, as openssl prints them).
pub fn normalize_fingerprint(text: &str) -> Result<String, TlsError> {
    let digits: String = text
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    if digits.len() == 64 && digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(digits)
    } else {
        Err(TlsError::BadFingerprint(text.to_owned()))
    }
}

/// Host and port of an `https://` URL.
fn https_host_port(url: &str) -> Result<(String, u16), TlsError> {
    let bad = || TlsError::BadUrl {
        url: url.to_owned(),
    };
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(port) => port.parse().map_err(|_| bad())?,
        None => 443,
    };
    if host.is_empty() || host.contains('@') {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// Connects to the `https://` server at `url` without verifying its certificate, and
/// returns (as PEM) the certificate in its chain whose SHA-256 fingerprint is
/// `fingerprint`: the server appends its CA to its chain. Nothing is sent over this
/// connection; whoever answered is trusted only after the caller connects again
/// verifying against the CA returned here, so a man in the middle who replays the real
/// CA certificate gains nothing.
pub async fn fetch_pinned_ca(url: &str, fingerprint: &str) -> Result<String, TlsError> {
    let expected = normalize_fingerprint(fingerprint)?;
    let (host, port) = https_host_port(url)?;
    let addr = format!("{host}:{port}");
    let connect_err = |source| TlsError::Connect {
        addr: addr.clone(),
        source,
    };
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
    let tcp = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| connect_err(timed_out()))?
    .map_err(connect_err)?;
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_no_client_auth();
    let name = ServerName::try_from(host.clone()).map_err(|_| TlsError::BadUrl {
        url: url.to_owned(),
    })?;
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| connect_err(timed_out()))?
    .map_err(connect_err)?;
    let presented: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    drop(tls);
    if let Some(ca) = presented
        .iter()
        .find(|cert| fingerprint_of_der(cert) == expected)
    {
        return Ok(pem_of_der(ca));
    }
    Err(TlsError::FingerprintMismatch {
        addr,
        expected,
        presented: presented
            .iter()
            .map(|cert| fingerprint_of_der(cert))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Accepts any server certificate, still checking the handshake's signatures. Used only
/// by [`fetch_pinned_ca`], whose connection carries no data.
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fingerprints_and_urls_parse() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(normalize_fingerprint(&colons).unwrap(), hex);
        assert!(normalize_fingerprint("abc").is_err());
        assert!(normalize_fingerprint(&"zz".repeat(32)).is_err());
        assert_eq!(
            https_host_port("https://h.example:8443/x").unwrap(),
            ("h.example".into(), 8443)
        );
        assert_eq!(
            https_host_port("https://[::1]:7070").unwrap(),
            ("::1".into(), 7070)
        );
        assert_eq!(
            https_host_port("https://h.example").unwrap(),
            ("h.example".into(), 443)
        );
        assert!(https_host_port("http://h.example").is_err());
        assert!(https_host_port("https://:80").is_err());
    }
}
