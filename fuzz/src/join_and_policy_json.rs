//! Target `join_and_policy_json`: the JSON request bodies the API takes, on their own.
//!
//! `api_http` reaches these too, but at a few thousand requests a second; decoding them
//! directly runs a hundred times faster, so the decoders (serde derives with
//! `deny_unknown_fields`, defaults and nested options) get far more inputs. Every body
//! that decodes must encode and decode back to itself, so what the server stores (it
//! re-serializes policies and rate cards) is what the caller sent. Decoded rate cards
//! are also priced, as the billing code does, since a rate card is the one body whose
//! numbers go straight into arithmetic.
//!
//! Input: the JSON text; the first byte picks nothing, every decoder sees every input.

use herd_policy::{is_peak_hour, peak_ms_between, price_interval, Sample, Workload};
use herd_proto::join::JoinRequest;
use herd_proto::policy::{PolicySpec, RateCard};
use herd_server::api::{JoinTokenRequest, LaunchRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

pub fn run(data: &[u8]) {
    round_trip::<PolicySpec>(data);
    if let Some(card) = round_trip::<RateCard>(data) {
        price(&card);
    }
    if let Ok(join) = serde_json::from_slice::<JoinRequest>(data) {
        let again: JoinRequest = reencode(&join);
        assert_eq!(
            (&again.join_token, &again.hostname),
            (&join.join_token, &join.hostname)
        );
    }
    if let Ok(launch) = serde_json::from_slice::<LaunchRequest>(data) {
        let again: LaunchRequest = reencode(&launch);
        assert_eq!(format!("{again:?}"), format!("{launch:?}"));
    }
    let _ = serde_json::from_slice::<JoinTokenRequest>(data);
}

fn round_trip<T: DeserializeOwned + Serialize + PartialEq + Debug>(data: &[u8]) -> Option<T> {
    let value = serde_json::from_slice::<T>(data).ok()?;
    let again: T = reencode(&value);
    assert_eq!(again, value, "does not round-trip");
    Some(value)
}

fn reencode<T: DeserializeOwned + Serialize + Debug>(value: &T) -> T {
    let text = serde_json::to_string(value).expect("a decoded body encodes");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{value:?} re-decodes: {e}: {text}"))
}

/// Prices an hour and a day with the card, across extreme clock values: the billing and
/// guest code price intervals this way.
fn price(card: &RateCard) {
    for hour in [0, 1, 23, 24, 25, u64::MAX] {
        let _ = is_peak_hour(card, hour);
    }
    let spans = [
        (0, 3_600_000),
        (1_700_000_000_000, 1_700_086_400_000),
        (u64::MAX - 1000, u64::MAX),
        (5, 1),
    ];
    for (from_ms, to_ms) in spans {
        let peak = peak_ms_between(card, from_ms, to_ms);
        assert!(
            peak <= to_ms.saturating_sub(from_ms),
            "{peak} peak ms in [{from_ms}, {to_ms})"
        );
        let from = Sample {
            unix_ms: from_ms,
            cpu_ms: 0,
            mem_kib: 1 << 20,
            net_bytes: 0,
            workload: Workload::Running,
        };
        let to = Sample {
            unix_ms: to_ms,
            cpu_ms: u64::MAX / 2,
            mem_kib: u64::MAX,
            net_bytes: u64::MAX,
            workload: Workload::Running,
        };
        let _ = price_interval(card, &from, &to, u64::MAX);
    }
}
