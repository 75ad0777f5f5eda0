//! Whether each driver answers, decided from what its last listing and its last check
//! did. Pure: the agent's session feeds it what it saw (with the time) and sends the
//! result to the server when it changed.
//!
//! A driver has two ways to go wrong that the agent can see: its listing (records and
//! /proc) hangs or fails, or its check (asking the guests' hypervisor processes) does.
//! Either makes the driver unhealthy; the listing's verdict comes first, because without
//! a listing the driver's VMs are shown as they were last seen.

use herd_proto::node::{DriverHealth, DriverStatus};
use std::collections::BTreeMap;

/// What one look (a listing or a check) at a driver found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Unresponsive(String),
    Failing(String),
}

#[derive(Debug, Clone)]
struct Entry {
    listing: Verdict,
    check: Verdict,
    health: DriverHealth,
}

/// Every driver's health, and whether it changed since it was last sent.
#[derive(Debug, Clone, Default)]
pub struct HealthBook {
    drivers: BTreeMap<String, Entry>,
    changed: bool,
}

impl HealthBook {
    /// Every driver starts healthy; the first report says so.
    pub fn new<'a>(kinds: impl IntoIterator<Item = &'a str>) -> HealthBook {
        let drivers = kinds
            .into_iter()
            .map(|kind| {
                let entry = Entry {
                    listing: Verdict::Ok,
                    check: Verdict::Ok,
                    health: DriverHealth::Ok,
                };
                (kind.to_owned(), entry)
            })
            .collect();
        HealthBook {
            drivers,
            changed: true,
        }
    }

    pub fn listing(&mut self, kind: &str, verdict: Verdict, now_ms: u64) {
        if let Some(entry) = self.drivers.get_mut(kind) {
            entry.listing = verdict;
            self.changed |= settle(entry, now_ms);
        }
    }

    pub fn check(&mut self, kind: &str, verdict: Verdict, now_ms: u64) {
        if let Some(entry) = self.drivers.get_mut(kind) {
            entry.check = verdict;
            self.changed |= settle(entry, now_ms);
        }
    }

    pub fn is_ok(&self, kind: &str) -> bool {
        self.drivers.get(kind).is_none_or(|e| e.health.is_ok())
    }

    pub fn statuses(&self) -> Vec<DriverStatus> {
        self.drivers
            .iter()
            .map(|(kind, entry)| DriverStatus {
                kind: kind.clone(),
                health: entry.health.clone(),
            })
            .collect()
    }

    /// True once after any driver's health changed.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }
}

/// Recomputes an entry's health; true if it changed. `since_ms` stays while the driver
/// stays in the same kind of trouble, whatever the latest words for it.
fn settle(entry: &mut Entry, now_ms: u64) -> bool {
    let verdict = match &entry.listing {
        Verdict::Ok => &entry.check,
        listing => listing,
    };
    let since_ms = match (&entry.health, verdict) {
        (DriverHealth::Unresponsive { since_ms, .. }, Verdict::Unresponsive(_))
        | (DriverHealth::Failing { since_ms, .. }, Verdict::Failing(_)) => *since_ms,
        _ => now_ms,
    };
    let health = match verdict {
        Verdict::Ok => DriverHealth::Ok,
        Verdict::Unresponsive(reason) => DriverHealth::Unresponsive {
            since_ms,
            reason: reason.clone(),
        },
        Verdict::Failing(error) => DriverHealth::Failing {
            since_ms,
            error: error.clone(),
        },
    };
    let changed = health != entry.health;
    entry.health = health;
    changed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn health(book: &HealthBook, kind: &str) -> DriverHealth {
        book.statuses()
            .into_iter()
            .find(|s| s.kind == kind)
            .map(|s| s.health)
            .unwrap()
    }

    #[test]
    fn a_hung_check_marks_only_its_driver_and_clears_when_it_answers() {
        let mut book = HealthBook::new(["qemu", "oci"]);
        assert!(
            book.take_changed(),
            "the first report says every driver is ok"
        );
        assert!(!book.take_changed());
        book.check("qemu", Verdict::Unresponsive("QMP of VM x".into()), 1_000);
        assert!(book.take_changed());
        assert_eq!(
            health(&book, "qemu"),
            DriverHealth::Unresponsive {
                since_ms: 1_000,
                reason: "QMP of VM x".into()
            }
        );
        assert!(book.is_ok("oci") && !book.is_ok("qemu"));
        // Still stuck later: the same since, nothing new to send.
        book.check("qemu", Verdict::Unresponsive("QMP of VM x".into()), 6_000);
        assert!(!book.take_changed());
        book.check("qemu", Verdict::Ok, 9_000);
        assert!(book.take_changed());
        assert!(book.is_ok("qemu"));
    }

    #[test]
    fn the_listing_speaks_before_the_check() {
        let mut book = HealthBook::new(["qemu"]);
        book.check("qemu", Verdict::Failing("QMP refused".into()), 1);
        book.listing("qemu", Verdict::Unresponsive("listing hangs".into()), 2);
        assert_eq!(health(&book, "qemu").name(), "unresponsive");
        book.listing("qemu", Verdict::Ok, 3);
        assert_eq!(
            health(&book, "qemu"),
            DriverHealth::Failing {
                since_ms: 3,
                error: "QMP refused".into()
            }
        );
    }

    #[test]
    fn unknown_drivers_are_ignored() {
        let mut book = HealthBook::new(["sim"]);
        book.take_changed();
        book.listing("qemu", Verdict::Failing("x".into()), 1);
        assert!(!book.take_changed());
        assert_eq!(book.statuses().len(), 1);
    }

    fn verdict() -> impl Strategy<Value = Verdict> {
        prop_oneof![
            Just(Verdict::Ok),
            "[ab]".prop_map(Verdict::Unresponsive),
            "[ab]".prop_map(Verdict::Failing),
        ]
    }

    proptest! {
        /// Health always reflects the latest verdicts, and `since` never moves forward
        /// while the driver stays in the same trouble.
        #[test]
        fn health_follows_the_latest_verdicts(
            steps in proptest::collection::vec((any::<bool>(), verdict()), 1..40),
        ) {
            let mut book = HealthBook::new(["d"]);
            let (mut listing, mut check) = (Verdict::Ok, Verdict::Ok);
            let mut previous = DriverHealth::Ok;
            for (at, (is_listing, v)) in steps.into_iter().enumerate() {
                let now = at as u64 * 10;
                if is_listing {
                    book.listing("d", v.clone(), now);
                    listing = v;
                } else {
                    book.check("d", v.clone(), now);
                    check = v;
                }
                let expect = if listing == Verdict::Ok { &check } else { &listing };
                let got = health(&book, "d");
                match (expect, &got) {
                    (Verdict::Ok, DriverHealth::Ok) => {}
                    (Verdict::Unresponsive(r), DriverHealth::Unresponsive { reason, since_ms }) => {
                        prop_assert_eq!(r, reason);
                        if let DriverHealth::Unresponsive { since_ms: old, .. } = previous {
                            prop_assert_eq!(*since_ms, old);
                        }
                    }
                    (Verdict::Failing(e), DriverHealth::Failing { error, since_ms }) => {
                        prop_assert_eq!(e, error);
                        if let DriverHealth::Failing { since_ms: old, .. } = previous {
                            prop_assert_eq!(*since_ms, old);
                        }
                    }
                    _ => prop_assert!(false, "{expect:?} became {got:?}"),
                }
                previous = got;
            }
        }
    }
}
