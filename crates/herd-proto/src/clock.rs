//! The one reading of the wall clock that every herd process shares.
//!
//! Decisions take the time as an argument (so tests can pick it); only the edges that
//! feed them call [`unix_ms`]. Times on the wire and in the store are unix
//! milliseconds, so there is one conversion, not one per crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch; 0 if the clock is set before it.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_time_after_2020() {
        assert!(super::unix_ms() > 1_577_836_800_000);
    }
}
