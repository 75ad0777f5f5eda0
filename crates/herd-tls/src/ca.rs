//! The CA: made once, kept on disk, and the certificates it issues (the server's, for
//! its names; an agent's, for its host id).

use crate::{TlsError, HOST_URI_PREFIX, PEER_DNS_SUFFIX};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Largest CSR (as PEM) the CA looks at. An ECDSA CSR is about 400 bytes and an RSA-4096
/// one under 2 KiB; anything much larger is not a CSR herd made.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

const CA_LIFETIME: Duration = Duration::days(20 * 365);
const SERVER_LIFETIME: Duration = Duration::days(2 * 365);
/// A cached server certificate closer than this to its end is issued again at start.
const SERVER_RENEW_BEFORE: Duration = Duration::days(60);
const AGENT_LIFETIME: Duration = Duration::days(365);
/// Certificates start a little in the past, so a peer whose clock is slightly behind
/// does not see them as not yet valid.
const BACKDATE: Duration = Duration::minutes(5);

/// The server's certificate authority.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// A certificate chain and its private key, ready for a rustls config.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// From PEM: `cert_pem` holds the leaf first, then any chain.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Identity, TlsError> {
        Ok(Identity {
            chain: certs_from_pem(cert_pem, "certificate")?,
            key: PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| TlsError::Pem {
                what: "private key",
            })?,
        })
    }
}

pub(crate) fn certs_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::Pem { what })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what });
    }
    Ok(certs)
}

pub(crate) fn pem_of_der(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The SHA-256 of a certificate's DER, as 64 lowercase hex digits.
pub fn fingerprint_of_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The DER of the first certificate in `pem`.
pub fn der_of_pem(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    certs_from_pem(pem, "certificate")?
        .into_iter()
        .next()
        .ok_or(TlsError::Pem {
            what: "certificate",
        })
}

/// The fingerprint of the first certificate in `pem`.
pub fn fingerprint_of_pem(pem: &str) -> Result<String, TlsError> {
    Ok(fingerprint_of_der(&der_of_pem(pem)?))
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a file whole (temporary name, sync, rename) with the given mode, so a crash
/// leaves the old file or the new one, and a key is never readable by others, not even
/// for a moment.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    file.write_all(bytes).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))?;
    if let Some(dir) = path.parent() {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Option<String>, TlsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A random positive serial number (16 bytes, top bit clear).
fn random_serial() -> SerialNumber {
    let mut bytes = Uuid::new_v4().into_bytes().to_vec();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from(bytes)
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn this_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
}

/// A server name in the form both the wanted set and a parsed certificate use.
fn normalize_name(name: &str) -> Option<String> {
    let name = name.trim().trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        });
    valid.then(|| name.to_ascii_lowercase())
}

fn san_of(name: &str) -> Result<SanType, TlsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    name.to_owned()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|_| TlsError::BadName {
            name: name.to_owned(),
        })
}

impl Ca {
    /// Loads the CA from `dir` (`ca.pem`, `ca.key`), or makes one there on first start.
    pub fn load_or_create(dir: &Path) -> Result<Ca, TlsError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        match (read_file(&cert_path)?, read_file(&key_path)?) {
            (Some(cert_pem), Some(key_pem)) => Ca::from_pem(&cert_pem, &key_pem, &cert_path),
            (None, None) => Ca::create(dir, &cert_path, &key_path),
            (Some(_), None) => Err(TlsError::HalfCa {
                present: cert_path,
                missing: key_path,
            }),
            (None, Some(_)) => Err(TlsError::HalfCa {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    fn from_pem(cert_pem: &str, key_pem: &str, path: &Path) -> Result<Ca, TlsError> {
        let load = |source| TlsError::Load {
            path: path.to_owned(),
            source,
        };
        let key = KeyPair::from_pem(key_pem).map_err(load)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(load)?;
        let cert_der = certs_from_pem(cert_pem, "CA certificate")?
            .into_iter()
            .next()
            .ok_or(TlsError::Pem {
                what: "CA certificate",
            })?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<Ca, TlsError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        // A random suffix tells two herd CAs apart in error messages and logs.
        let suffix = &Uuid::new_v4().simple().to_string()[..8];
        name.push(DnType::CommonName, format!("herd CA {suffix}"));
        name.push(DnType::OrganizationName, "herd");
        params.distinguished_name = name;
        // Path length 0: the CA signs leaf certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now() - BACKDATE;
        params.not_after = now() + CA_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
        // The key first: a crash between the two writes leaves a key without a
        // certificate, which load_or_create refuses loudly instead of minting a new CA.
        write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), "made a new certificate authority");
        Ok(Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate's DER, 64 lowercase hex digits: what an agent pins
    /// before its first join.
    pub fn fingerprint(&self) -> String {
        fingerprint_of_der(&self.cert_der)
    }

    /// The server's certificate for localhost, 127.0.0.1, ::1, this machine's hostname
    /// and `names` (DNS names or IP addresses), with its key. It is kept in `dir`
    /// (`server.pem`, `server.key`) and issued again when the names change, when it
    /// nears its end, or when it was not issued by this CA.
    pub fn server_identity(&self, dir: &Path, names: &[String]) -> Result<Identity, TlsError> {
        let mut wanted: BTreeSet<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|n| (*n).to_owned())
            .collect();
        // The hostname is a convenience: one that is not a valid DNS name is left out.
        wanted.extend(this_hostname().as_deref().and_then(normalize_name));
        for name in names {
            wanted.insert(
                normalize_name(name).ok_or_else(|| TlsError::BadName { name: name.clone() })?,
            );
        }
        let cert_path = dir.join("server.pem");
        let key_path = dir.join("server.key");
        if let (Some(cert_pem), Some(key_pem)) = (read_file(&cert_path)?, read_file(&key_path)?) {
            if let Ok(identity) = Identity::from_pem(&cert_pem, &key_pem) {
                if self.server_cert_fits(&identity, &wanted) {
                    return Ok(identity);
                }
            }
        }
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "herd server");
        dn.push(DnType::OrganizationName, "herd");
        params.distinguished_name = dn;
        params.subject_alt_names = wanted.iter().map(|n| san_of(n)).collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now() - BACKDATE;
        params.not_after = now() + SERVER_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(TlsError::Generate)?;
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(names = ?wanted, "issued the server certificate");
        Identity::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// Whether a cached server certificate is this CA's, for exactly `wanted`, and not
    /// near its end.
    fn server_cert_fits(&self, identity: &Identity, wanted: &BTreeSet<String>) -> bool {
        let Some(leaf) = identity.chain.first() else {
            return false;
        };
        let (Ok((_, cert)), Ok((_, ca))) = (
            X509Certificate::from_der(leaf),
            X509Certificate::from_der(&self.cert_der),
        ) else {
            return false;
        };
        if cert.verify_signature(Some(ca.public_key())).is_err() {
            return false;
        }
        let renew_at = (now() + SERVER_RENEW_BEFORE).unix_timestamp();
        if cert.validity().not_after.timestamp() < renew_at {
            return false;
        }
        let mut present = BTreeSet::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => {
                        present.insert(dns.to_ascii_lowercase());
                    }
                    GeneralName::IPAddress(octets) => {
                        let ip = match octets.len() {
                            4 => <[u8; 4]>::try_from(*octets).map(IpAddr::from).ok(),
                            16 => <[u8; 16]>::try_from(*octets).map(IpAddr::from).ok(),
                            _ => None,
                        };
                        present.extend(ip.map(|ip| ip.to_string()));
                    }
                    _ => {}
                }
            }
        }
        &present == wanted
    }

    /// Issues an agent's certificate from its CSR. The CSR's self-signature must verify
    /// (the agent holds the key); everything else it asks for (subject, names, usages)
    /// is ignored: the certificate says only "host `host_id`", as its common name, as the
    /// URI `urn:herd:host:<id>` and as the DNS name [`peer_name`], for one year. It
    /// authenticates the agent as a client of the server and, for agent-to-agent links
    /// (migration, broadcast), as a server to other agents, who dial it by that name.
    pub fn sign_agent_csr(&self, csr_pem: &str, host_id: Uuid) -> Result<String, TlsError> {
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(TlsError::CsrTooLarge {
                size: csr_pem.len(),
                max: MAX_CSR_BYTES,
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(TlsError::Csr)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host_id.to_string());
        dn.push(DnType::OrganizationName, "herd agent");
        params.distinguished_name = dn;
        let uri = format!("{HOST_URI_PREFIX}{host_id}")
            .try_into()
            .map_err(|e: rcgen::Error| TlsError::Generate(e))?;
        let dns = peer_name(host_id)
            .try_into()
            .map_err(|e: rcgen::Error| TlsError::Generate(e))?;
        params.subject_alt_names = vec![SanType::URI(uri), SanType::DnsName(dns)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now() - BACKDATE;
        params.not_after = now() + AGENT_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(TlsError::Csr)?;
        Ok(cert.pem())
    }
}

/// The DNS name in an agent's certificate, which another agent checks when it dials that
/// host: under `.internal`, reserved for private use, so no public name can collide.
pub fn peer_name(host_id: Uuid) -> String {
    format!("{host_id}.{PEER_DNS_SUFFIX}")
}

/// A new agent key and a CSR for it, both PEM. The CSR's subject does not matter: the
/// server decides the certificate's identity.
pub fn agent_key_and_csr() -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "herd agent");
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(TlsError::Generate)?;
    Ok((key.serialize_pem(), csr))
}

/// The host id an agent certificate speaks for: its one `urn:herd:host:` URI. Call it
/// only on a certificate already verified against the CA.
pub fn host_id_of(cert_der: &[u8]) -> Option<Uuid> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut hosts = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(HOST_URI_PREFIX)?.parse::<Uuid>().ok(),
            _ => None,
        });
    let host = hosts.next()?;
    // A certificate naming two hosts speaks for neither.
    hosts.next().is_none().then_some(host)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ca_is_made_once_and_loaded_after() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ca::load_or_create(dir.path()).unwrap();
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        assert_eq!(first.fingerprint().len(), 64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn half_a_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join("ca.key")).unwrap();
        let err = Ca::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, TlsError::HalfCa { .. }), "{err}");
    }

    #[test]
    fn server_identity_is_cached_until_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let names = vec!["herd.example".to_owned()];
        let one = ca.server_identity(dir.path(), &names).unwrap();
        let two = ca.server_identity(dir.path(), &names).unwrap();
        assert_eq!(one.chain, two.chain);
        let three = ca
            .server_identity(dir.path(), &["other.example".to_owned()])
            .unwrap();
        assert_ne!(one.chain, three.chain);
        // A new CA does not keep the old CA's server certificate.
        std::fs::remove_file(dir.path().join("ca.pem")).unwrap();
        std::fs::remove_file(dir.path().join("ca.key")).unwrap();
        let new_ca = Ca::load_or_create(dir.path()).unwrap();
        let four = new_ca
            .server_identity(dir.path(), &["other.example".to_owned()])
            .unwrap();
        assert_ne!(three.chain, four.chain);
        assert!(ca
            .server_identity(dir.path(), &["no spaces".into()])
            .is_err());
    }

    #[test]
    fn agent_certificate_names_the_host_and_nothing_the_csr_asked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let host = Uuid::new_v4();
        let cert_pem = ca.sign_agent_csr(&csr, host).unwrap();
        let der = certs_from_pem(&cert_pem, "cert").unwrap().remove(0);
        assert_eq!(host_id_of(&der), Some(host));
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(!cert.is_ca());
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names.len(), 2);
        let dns = format!("{host}.host.herd.internal");
        assert!(sans
            .value
            .general_names
            .iter()
            .any(|name| matches!(name, GeneralName::DNSName(d) if *d == dns)));
        let usage = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(usage.client_auth && usage.server_auth);
    }

    #[test]
    fn tampered_or_huge_csr_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let (_, csr_pem) = agent_key_and_csr().unwrap();
        let mut der = pem::parse(&csr_pem).unwrap().into_contents();
        // The last byte is inside the signature.
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let err = ca.sign_agent_csr(&tampered, Uuid::new_v4()).unwrap_err();
        assert!(matches!(err, TlsError::Csr(_)), "{err}");
        let huge = "A".repeat(MAX_CSR_BYTES + 1);
        let err = ca.sign_agent_csr(&huge, Uuid::new_v4()).unwrap_err();
        assert!(matches!(err, TlsError::CsrTooLarge { .. }), "{err}");
        assert!(ca.sign_agent_csr("not a csr", Uuid::new_v4()).is_err());
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(normalize_name("[::1]").as_deref(), Some("::1"));
        assert_eq!(
            normalize_name("Herd.Example").as_deref(),
            Some("herd.example")
        );
        assert_eq!(normalize_name("a b"), None);
        assert_eq!(normalize_name(""), None);
    }
}
