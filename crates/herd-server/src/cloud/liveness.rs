//! Host liveness: a host that stays silent past its grace period is marked down, in
//! order with the reports before it.

use super::{Cloud, CloudError, Metrics};
use std::time::{Duration, Instant};

/// The longest the liveness check sleeps.
pub(super) const LIVENESS_TICK: Duration = Duration::from_millis(100);

/// Hosts not yet back after a server start get this many grace periods to reconnect.
const RESTART_GRACE_FACTOR: u32 = 3;

impl Cloud {
    /// Marks hosts down whose last word is older than the grace period. Returns when
    /// the next host that is still up falls due if nobody hears from it.
    pub fn check_liveness(&self, now: Instant) -> Result<Option<Instant>, CloudError> {
        let grace = self.config.host_grace;
        let mut overdue = Vec::new();
        let mut next_deadline: Option<Instant> = None;
        for (id, live) in self.live.lock().iter().filter(|(_, live)| !live.down) {
            // Not heard from since this server started: every agent reconnects at
            // once after a restart, which takes a while for thousands of them, and
            // marking the late ones down would only add to the work.
            let grace = if live.session == 0 {
                grace * RESTART_GRACE_FACTOR
            } else {
                grace
            };
            let deadline = live.last_seen + grace;
            if deadline <= now {
                overdue.push((*id, grace));
            } else {
                next_deadline = Some(next_deadline.map_or(deadline, |next| next.min(deadline)));
            }
        }
        for (host, grace) in overdue {
            // Written in order with the reports before it; the writer logs it.
            let why = format!("no report for {} s", grace.as_secs_f64());
            drop(self.commits.host_down(host, why));
            self.placement.lock().sched.set_up(host, false);
            if let Some(live) = self.live.lock().get_mut(&host) {
                live.down = true;
                live.needs_resync = true;
            }
            Metrics::inc(&self.metrics.hosts_marked_down);
        }
        Ok(next_deadline)
    }
}
