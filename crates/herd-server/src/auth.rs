//! Credentials: bearer tokens, stored only as hashes.
//!
//! Tokens are 256 random bits, so a single SHA-256 is enough to make a stolen database
//! useless for logging in (a slow password hash protects low-entropy secrets; these
//! are not). The prefix says what a token is for when one turns up in a log.

use herd_proto::wire::HostId;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An operator with a cloud-wide admin token.
    Admin { name: String },
    /// The agent of one host; it may only speak for that host.
    Agent { host: HostId },
}

pub fn new_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("herd_{prefix}_{}", hex::encode(bytes))
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token of an `Authorization: Bearer ...` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
        Some(token.trim())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_hashes_stable() {
        let a = new_token("adm");
        assert!(a.starts_with("herd_adm_"));
        assert_ne!(a, new_token("adm"));
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }
}
