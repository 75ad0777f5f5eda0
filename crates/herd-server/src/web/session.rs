//! Browser sessions: a random cookie that stands for an API token, held only in the
//! server's memory.
//!
//! The browser never holds the token itself (a script could read it); it holds a
//! session id in an HttpOnly cookie. Every request still authenticates with the token
//! behind it, so a revoked token or a removed member ends the session's rights at once.
//! A restart of the server logs everyone out, which is the safe way to lose them.

use parking_lot::Mutex;
use rand::RngCore;
use std::collections::HashMap;

/// Name of the session cookie.
pub const COOKIE: &str = "herd_session";

/// One logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// The API token the user logged in with.
    pub token: String,
    /// What every form of this session must send back.
    pub csrf: String,
    pub expires_ms: i64,
}

/// Every open session, bounded so that a flood of logins cannot grow memory without end.
pub struct Sessions {
    book: Mutex<HashMap<String, Session>>,
    ttl_ms: i64,
    max: usize,
}

/// 32 random bytes as hex: unguessable ids and CSRF tokens.
fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    pub fn new(ttl_ms: i64, max: usize) -> Sessions {
        Sessions {
            book: Mutex::new(HashMap::new()),
            ttl_ms,
            max: max.max(1),
        }
    }

    /// Opens a session for a token already known to be valid; returns its id.
    pub fn open(&self, token: String, now_ms: i64) -> (String, Session) {
        let id = random_hex();
        let session = Session {
            token,
            csrf: random_hex(),
            expires_ms: now_ms.saturating_add(self.ttl_ms),
        };
        let mut book = self.book.lock();
        if book.len() >= self.max {
            book.retain(|_, s| s.expires_ms > now_ms);
        }
        if book.len() >= self.max {
            // Still full of live sessions: the one closest to its end goes.
            if let Some(oldest) = book
                .iter()
                .min_by_key(|(_, s)| s.expires_ms)
                .map(|(id, _)| id.clone())
            {
                book.remove(&oldest);
            }
        }
        book.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session of an id; each use extends it (idle sessions end, busy ones
    /// do not).
    pub fn get(&self, id: &str, now_ms: i64) -> Option<Session> {
        let mut book = self.book.lock();
        let session = book.get_mut(id)?;
        if session.expires_ms <= now_ms {
            book.remove(id);
            return None;
        }
        session.expires_ms = now_ms.saturating_add(self.ttl_ms);
        Some(session.clone())
    }

    pub fn close(&self, id: &str) {
        self.book.lock().remove(id);
    }

    pub fn ttl_seconds(&self) -> i64 {
        self.ttl_ms / 1000
    }
}

/// The session id in a `Cookie` header, if any.
pub fn cookie_id(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
}

/// The `Set-Cookie` value that gives a browser its session: only sent over HTTPS, not
/// readable by scripts, and never sent along with a request another site starts.
pub fn set_cookie(id: &str, max_age_seconds: i64) -> String {
    format!("{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age_seconds}")
}

/// The `Set-Cookie` value that makes a browser forget its session.
pub fn clear_cookie() -> String {
    set_cookie("", 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_session_lives_while_used_and_ends_when_idle_or_closed() {
        let sessions = Sessions::new(1000, 10);
        let (id, opened) = sessions.open("tok".into(), 0);
        assert_eq!(sessions.get(&id, 900).unwrap().csrf, opened.csrf);
        // The use at 900 moved the end to 1900.
        assert!(sessions.get(&id, 1800).is_some());
        assert!(sessions.get(&id, 2800).is_none());
        let (id, _) = sessions.open("tok".into(), 5000);
        sessions.close(&id);
        assert!(sessions.get(&id, 5001).is_none());
        assert!(sessions.get("not-an-id", 0).is_none());
    }

    #[test]
    fn the_book_is_bounded_and_evicts_the_expired_first() {
        let sessions = Sessions::new(1000, 2);
        let (old, _) = sessions.open("a".into(), 0);
        let (live, _) = sessions.open("b".into(), 500);
        // At 1200 the first has expired: it goes, the live one stays.
        let (new, _) = sessions.open("c".into(), 1200);
        assert!(sessions.get(&old, 1200).is_none());
        assert!(sessions.get(&live, 1200).is_some());
        assert!(sessions.get(&new, 1200).is_some());
        // Full of live ones: the one nearest its end goes.
        let (newest, _) = sessions.open("d".into(), 1300);
        assert_eq!(sessions.book.lock().len(), 2);
        assert!(sessions.get(&newest, 1300).is_some());
    }

    #[test]
    fn ids_and_csrf_tokens_are_random_and_distinct() {
        let sessions = Sessions::new(1000, 10);
        let (a, sa) = sessions.open("t".into(), 0);
        let (b, sb) = sessions.open("t".into(), 0);
        assert_ne!(a, b);
        assert_ne!(sa.csrf, sb.csrf);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn the_cookie_is_found_among_others_and_carries_its_flags() {
        assert_eq!(cookie_id("a=1; herd_session=xyz; b=2"), Some("xyz"));
        assert_eq!(cookie_id("herd_session="), None);
        assert_eq!(cookie_id("other=1"), None);
        let cookie = set_cookie("xyz", 60);
        for flag in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(cookie.contains(flag), "{cookie}");
        }
    }

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
