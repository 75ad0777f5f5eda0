//! Credentials: bearer tokens, stored only as hashes.
//!
//! API tokens of users are hashed with argon2id so that even a
//! leaked database plus a weak token generator would not yield usable tokens cheaply.
//! A token carries a public id (`herd_<id>_<secret>`) so the server finds its one row
//! instead of trying every hash, and the server remembers tokens it verified (by their
//! SHA-256, in memory only) so the slow hash is paid once per token, not per request.
//! Join and agent tokens are 256 random bits used by machines; a single SHA-256 makes a
//! stolen database useless for them. The prefix says what a token is for when one
//! turns up in a log.

use crate::access::Principal;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use herd_proto::wire::HostId;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A user with the roles they hold.
    User(Principal),
    /// The agent of one host; it may only speak for that host.
    Agent { host: HostId },
}

/// Length of a token's public id, in hex digits.
const TOKEN_ID_LEN: usize = 12;

/// A new API token: its public id and the whole secret string, shown once.
pub fn new_api_token() -> (String, String) {
    let mut id = [0u8; TOKEN_ID_LEN / 2];
    rand::thread_rng().fill_bytes(&mut id);
    let id = hex::encode(id);
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let token = format!("herd_{id}_{}", hex::encode(secret));
    (id, token)
}

/// The public id of an API token, if the text has an API token's shape.
pub fn api_token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("herd_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex_of = |text: &str, len: usize| {
        text.len() == len
            && text
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    (hex_of(id, TOKEN_ID_LEN) && hex_of(secret, 64)).then_some(id)
}

/// The argon2id PHC string of an API token.
pub fn hash_api_token(token: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Ok(Argon2::default()
        .hash_password(token.as_bytes(), &salt)?
        .to_string())
}

/// Whether `token` matches a stored hash: argon2id, or `sha256$<hex>` for admin tokens
/// made before herd had users.
pub fn verify_api_token(token: &str, stored: &str) -> bool {
    if let Some(hex) = stored.strip_prefix("sha256$") {
        return hash_token(token) == hex;
    }
    PasswordHash::new(stored)
        .map(|hash| {
            Argon2::default()
                .verify_password(token.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
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

    #[test]
    fn api_tokens_carry_their_id_and_verify_only_themselves() {
        let (id, token) = new_api_token();
        assert_eq!(api_token_id(&token), Some(id.as_str()));
        let hash = hash_api_token(&token).expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_api_token(&token, &hash));
        let (_, other) = new_api_token();
        assert!(!verify_api_token(&other, &hash));
        assert!(!verify_api_token(&token, "not a hash"));
        assert_eq!(api_token_id("herd_adm_00"), None);
        assert_eq!(api_token_id(&token.to_uppercase()), None);
        let legacy = new_token("adm");
        assert!(verify_api_token(
            &legacy,
            &format!("sha256${}", hash_token(&legacy))
        ));
    }
}
