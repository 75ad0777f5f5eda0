//! The session's view of each driver that a hung driver cannot freeze: a listing that
//! does not answer within [`LIST_DEADLINE`] goes on in a task of its own while the
//! interval is reported with the driver's last listing, and the driver's check runs
//! every [`CHECK_EVERY`] in a task. What each saw goes into the [`HealthBook`].

use super::transport::error_chain;
use crate::driver::{Driver, DriverError, ObservedVm};
use crate::health::{HealthBook, Verdict};
use futures_util::future::BoxFuture;
use herd_proto::clock::unix_ms;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long an interval waits for a driver's listing, and how long a listing may be
/// outstanding before the driver counts as unresponsive.
pub(super) const LIST_DEADLINE: Duration = Duration::from_secs(1);
/// How often a driver checks its guests.
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(5);
/// A check outstanding this long counts as unresponsive (a check bounds each of its
/// own waits; this is for one that does not).
pub(super) const CHECK_DEADLINE: Duration = Duration::from_secs(10);

type Listing = Result<Vec<ObservedVm>, DriverError>;

pub(super) struct DriverWatch {
    pub(super) driver: Arc<dyn Driver>,
    /// A listing that outlived its interval, still running.
    listing: Option<(Instant, JoinHandle<Listing>)>,
    /// What the driver said last; shown while it does not answer.
    last_listed: Vec<ObservedVm>,
    checking: Option<(Instant, JoinHandle<Result<(), DriverError>>)>,
    last_check: Option<Instant>,
}

impl DriverWatch {
    pub(super) fn new(driver: Arc<dyn Driver>) -> DriverWatch {
        DriverWatch {
            driver,
            listing: None,
            last_listed: Vec::new(),
            checking: None,
            last_check: None,
        }
    }

    /// Whether a listing of this driver is hung now.
    pub(super) fn stuck(&self) -> bool {
        self.listing.is_some()
    }

    /// The driver's VMs for this interval: a fresh listing if it answers in time, the
    /// last one if not.
    pub(super) async fn list(&mut self, health: &mut HealthBook) -> &[ObservedVm] {
        let kind = self.driver.kind();
        let result = match self.listing.take() {
            // Still out from an earlier interval: look, do not wait again.
            Some((since, mut handle)) => {
                match tokio::time::timeout(Duration::ZERO, &mut handle).await {
                    Ok(joined) => Some(joined.unwrap_or_else(|e| Err(panicked(e)))),
                    Err(_) => {
                        if since.elapsed() >= LIST_DEADLINE {
                            health.listing(kind, listing_hangs(), unix_ms());
                        }
                        self.listing = Some((since, handle));
                        None
                    }
                }
            }
            None => {
                let driver = self.driver.clone();
                let mut listing: BoxFuture<'static, Listing> =
                    Box::pin(async move { driver.list().await });
                match tokio::time::timeout(LIST_DEADLINE, &mut listing).await {
                    Ok(result) => Some(result),
                    Err(_) => {
                        health.listing(kind, listing_hangs(), unix_ms());
                        let since = Instant::now() - LIST_DEADLINE;
                        self.listing = Some((since, tokio::spawn(listing)));
                        None
                    }
                }
            }
        };
        match result {
            Some(Ok(vms)) => {
                health.listing(kind, Verdict::Ok, unix_ms());
                self.last_listed = vms;
            }
            Some(Err(e)) => health.listing(kind, Verdict::Failing(error_chain(&e)), unix_ms()),
            None => {}
        }
        &self.last_listed
    }

    /// Collects a finished check, notices one that hangs, and starts the next when due.
    pub(super) fn check(&mut self, health: &mut HealthBook) {
        let kind = self.driver.kind();
        if let Some((since, handle)) = &self.checking {
            if handle.is_finished() {
                if let Some((_, handle)) = self.checking.take() {
                    // Finished: this does not wait.
                    let verdict = match futures_util::FutureExt::now_or_never(handle) {
                        Some(Ok(Ok(()))) => Verdict::Ok,
                        Some(Ok(Err(e @ DriverError::Timeout { .. }))) => {
                            Verdict::Unresponsive(error_chain(&e))
                        }
                        Some(Ok(Err(e))) => Verdict::Failing(error_chain(&e)),
                        Some(Err(e)) => Verdict::Failing(error_chain(&panicked(e))),
                        None => return,
                    };
                    health.check(kind, verdict, unix_ms());
                }
            } else if since.elapsed() >= CHECK_DEADLINE {
                let reason = format!(
                    "its check of its guests has not answered within {}s",
                    CHECK_DEADLINE.as_secs()
                );
                health.check(kind, Verdict::Unresponsive(reason), unix_ms());
            }
            return;
        }
        if self.last_check.is_none_or(|at| at.elapsed() >= CHECK_EVERY) {
            let driver = self.driver.clone();
            let now = Instant::now();
            self.last_check = Some(now);
            self.checking = Some((now, tokio::spawn(async move { driver.check().await })));
        }
    }

    /// Ends the tasks in flight (the session stops).
    pub(super) fn abort(&mut self) {
        if let Some((_, handle)) = self.listing.take() {
            handle.abort();
        }
        if let Some((_, handle)) = self.checking.take() {
            handle.abort();
        }
    }
}

fn panicked(e: tokio::task::JoinError) -> DriverError {
    DriverError::State(format!("the driver's task ended: {e}"))
}

/// One wording however long it has hung, so the health does not change every interval.
fn listing_hangs() -> Verdict {
    Verdict::Unresponsive(format!(
        "its listing has not answered within {}s",
        LIST_DEADLINE.as_secs()
    ))
}
