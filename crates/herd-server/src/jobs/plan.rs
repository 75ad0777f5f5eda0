//! A job that missed its deadline, as the server keeps it: duplicated once, decided by
//! the first of its runners (the original or a copy) whose workload finishes, settled
//! when every other runner has been ended. Pure: the coordinator feeds it the clock,
//! the workloads' exits and the runners it finds, and carries out what it answers.

use herd_proto::broadcast::BroadcastId;
use herd_proto::policy::Deadline;
use herd_proto::wire::VmId;
use herd_proto::VmState;
use serde::{Deserialize, Serialize};

/// The first runner whose workload finished, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub vm: VmId,
    pub exit_code: i32,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The original VM, which carries the deadline.
    pub vm: VmId,
    /// The broadcast its copies come from; `None` if it could not be duplicated.
    pub broadcast: Option<BroadcastId>,
    /// Why it was not duplicated.
    pub reason: Option<String>,
    /// How many copies were asked (0: one on every other host).
    pub copies_asked: u32,
    pub duplicated_at_ms: i64,
    pub result: Option<JobResult>,
    /// Every runner but the winner has been told to end, and no more copies come.
    pub settled: bool,
}

/// Whether a VM's deadline has passed with its workload still running. Only a workload
/// its guest says is running counts: one that finished, or whose guest has not said
/// (after a server restart, say), is never duplicated.
pub fn missed(
    deadline: Option<Deadline>,
    created_at_ms: i64,
    state: VmState,
    workload_running: bool,
    now_ms: i64,
) -> bool {
    let Some(deadline) = deadline else {
        return false;
    };
    let due = created_at_ms.saturating_add(
        i64::try_from(deadline.seconds)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000),
    );
    state == VmState::Running && workload_running && now_ms >= due
}

impl Job {
    /// A job duplicated by `broadcast` (or not, and why) at `now_ms`.
    pub fn new(vm: VmId, broadcast: Result<BroadcastId, String>, copies: u32, now_ms: i64) -> Job {
        let (broadcast, reason) = match broadcast {
            Ok(id) => (Some(id), None),
            Err(why) => (None, Some(why)),
        };
        Job {
            vm,
            broadcast,
            reason,
            copies_asked: copies,
            duplicated_at_ms: now_ms,
            result: None,
            settled: broadcast.is_none(),
        }
    }

    /// A runner's workload exited with `code`: the first decides the job. Returns
    /// whether this one did.
    pub fn on_exit(&mut self, runner: VmId, code: i32, now_ms: i64) -> bool {
        if self.result.is_some() {
            return false;
        }
        self.result = Some(JobResult {
            vm: runner,
            exit_code: code,
            at_ms: now_ms,
        });
        true
    }

    /// The runners to end, of those there are now (the original and the copies made so
    /// far): every one but the winner, once there is one.
    pub fn losers(&self, runners: &[VmId]) -> Vec<VmId> {
        match self.result {
            None => Vec::new(),
            Some(result) => runners
                .iter()
                .copied()
                .filter(|r| *r != result.vm)
                .collect(),
        }
    }

    /// Whether the coordinator still has work for it: a decided job is settled once its
    /// broadcast makes no more copies (`copies_final`) and its losers were ended.
    pub fn settle(&mut self, copies_final: bool) {
        if self.result.is_some() && copies_final {
            self.settled = true;
        }
    }

    pub fn is_active(&self) -> bool {
        !self.settled
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    fn deadline(seconds: u64) -> Option<Deadline> {
        Some(Deadline { seconds, copies: 3 })
    }

    #[test]
    fn a_deadline_is_missed_only_by_a_running_workload_past_it() {
        let running = VmState::Running;
        assert!(!missed(deadline(10), 0, running, true, 9_999));
        assert!(missed(deadline(10), 0, running, true, 10_000));
        assert!(!missed(deadline(10), 0, running, false, 60_000), "finished");
        assert!(!missed(deadline(10), 0, VmState::Paused, true, 60_000));
        assert!(!missed(None, 0, running, true, i64::MAX));
        assert!(!missed(deadline(u64::MAX), 0, running, true, i64::MAX - 1));
    }

    #[test]
    fn the_first_exit_decides_and_every_other_runner_loses() {
        let (original, a, b) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut job = Job::new(original, Ok(Uuid::now_v7()), 2, 0);
        assert!(job.losers(&[original, a, b]).is_empty(), "undecided");
        job.settle(true);
        assert!(job.is_active(), "an undecided job is not settled");
        assert!(job.on_exit(a, 0, 5));
        assert!(!job.on_exit(original, 1, 6), "decided already");
        assert_eq!(job.result.unwrap().vm, a);
        assert_eq!(job.losers(&[original, a, b]), vec![original, b]);
        job.settle(false);
        assert!(job.is_active(), "copies may still come");
        job.settle(true);
        assert!(!job.is_active());
    }

    #[test]
    fn a_job_that_could_not_be_duplicated_is_settled_at_once() {
        let job = Job::new(Uuid::now_v7(), Err("no room".into()), 0, 0);
        assert!(!job.is_active());
        assert_eq!(job.reason.as_deref(), Some("no room"));
    }

    proptest! {
        /// Whatever the order of exits, exactly one runner is kept.
        #[test]
        fn exactly_one_runner_is_kept(exits in proptest::collection::vec((0usize..5, -3i32..3), 1..12)) {
            let runners: Vec<VmId> = (0..5).map(|_| Uuid::now_v7()).collect();
            let mut job = Job::new(runners[0], Ok(Uuid::now_v7()), 4, 0);
            let mut first = None;
            for (t, (i, code)) in exits.iter().enumerate() {
                if job.on_exit(runners[*i], *code, t as i64) {
                    prop_assert!(first.is_none());
                    first = Some(runners[*i]);
                }
            }
            let losers = job.losers(&runners);
            prop_assert_eq!(losers.len(), runners.len() - 1);
            prop_assert!(!losers.contains(&first.unwrap()));
        }
    }
}
