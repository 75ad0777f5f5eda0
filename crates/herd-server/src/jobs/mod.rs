//! Duplicate-on-deadline (seed 001's policy): a job whose workload has not finished by
//! its deadline is broadcast, copies started, to the nearest hosts of its type with
//! room (or every one), and whichever runner finishes first, the original or a copy,
//! is the job's result; every other runner is terminated, billed for what it ran.
//!
//! The server judges the deadline (it knows when the VM was launched, and the guest
//! module tells it whether the workload still runs); the copies come from the
//! `broadcast` module, a qemu copy continuing from the snapshot's instant and a
//! container starting its workload again with the original's files. A copy carries
//! the original's policies but its deadline: a duplicate is not duplicated again.

pub mod book;
pub mod plan;

use crate::broadcast::BroadcastAsk;
use crate::cloud::{Cloud, CloudError};
use crate::store::{now_ms, NewEvent, VmRecord};
use herd_proto::policy::PolicyAction;
use herd_proto::wire::VmId;
use plan::Job;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// How often deadlines and decided jobs are looked at.
const DRIVE_EVERY: Duration = Duration::from_secs(1);

impl Cloud {
    /// Loads every job a previous run duplicated.
    pub(crate) fn restore_jobs(&self) -> Result<(), CloudError> {
        let mut all = self.jobs.all.lock();
        for job in self.store.jobs()? {
            all.insert(job.vm, job);
        }
        Ok(())
    }

    /// The job a VM with a deadline became, once it missed it.
    pub fn job_of(&self, vm: VmId) -> Option<Job> {
        self.jobs.all.lock().get(&vm).cloned()
    }

    fn job_event(&self, vm: &VmRecord, message: String) {
        let event = NewEvent {
            vm: Some(vm.id),
            host: vm.host,
            kind: "vm.job",
            message,
            ..NewEvent::default()
        };
        if let Err(e) = self.store.append_event(&event) {
            warn!(vm = %vm.id, "recording a job event: {e}");
        }
    }

    /// Duplicates every job past its deadline with its workload still running.
    fn enforce_deadlines(&self, now: i64) -> Result<(), CloudError> {
        for vm in self.store.vms_with_deadline()? {
            let Some(deadline) = vm.policy.deadline else {
                continue;
            };
            if vm.seed.is_some() || self.jobs.all.lock().contains_key(&vm.id) {
                continue;
            }
            let running = self
                .guest(vm.id)
                .is_some_and(|g| g.workload_running == Some(true) && g.exit_code.is_none());
            if !plan::missed(Some(deadline), vm.created_at_ms, vm.observed, running, now) {
                continue;
            }
            let _step = self.jobs.steps.lock();
            let ask = BroadcastAsk {
                to: None,
                start: true,
                fanout: 1,
                limit: (deadline.copies > 0).then_some(deadline.copies as usize),
            };
            let made = self.broadcast(&vm, &ask);
            let message = match &made {
                Ok(b) => format!(
                    "deadline of {} s passed with the workload running: {} copies from broadcast {}; the first to finish is the result",
                    deadline.seconds,
                    b.hosts.len(),
                    b.id
                ),
                Err(e) => format!(
                    "deadline of {} s passed with the workload running; not duplicated: {e}",
                    deadline.seconds
                ),
            };
            let job = Job::new(
                vm.id,
                made.map(|b| b.id).map_err(|e| e.to_string()),
                deadline.copies,
                now,
            );
            self.store.save_job(&job)?;
            self.job_event(&vm, message);
            self.jobs.all.lock().insert(vm.id, job);
        }
        Ok(())
    }

    /// The original and the copies made so far, and whether more copies may come.
    fn runners(&self, job: &Job) -> Result<(Vec<VmId>, bool), CloudError> {
        let mut runners = vec![job.vm];
        let Some(id) = job.broadcast else {
            return Ok((runners, true));
        };
        let Some(b) = self.broadcast_by_id(id)? else {
            return Ok((runners, true));
        };
        runners.extend(
            b.hosts
                .values()
                .filter_map(|part| part.copy)
                .filter(|copy| !copy.is_nil()),
        );
        let last = b.phase >= crate::broadcast::plan::Phase::Ended;
        Ok((runners, last))
    }

    /// A workload exited: if the VM runs a job, the first exit decides it.
    pub(crate) fn job_workload_exited(&self, vm: VmId, code: i32) -> Result<(), CloudError> {
        if !self.jobs.all.lock().values().any(|j| j.result.is_none()) {
            return Ok(());
        }
        let _step = self.jobs.steps.lock();
        let Some(record) = self.store.vm(vm)? else {
            return Ok(());
        };
        let job = {
            let all = self.jobs.all.lock();
            all.get(&vm)
                .or_else(|| {
                    let seed = record.seed?;
                    all.values().find(|j| j.broadcast == Some(seed))
                })
                .cloned()
        };
        let Some(mut job) = job else {
            return Ok(());
        };
        if !job.on_exit(vm, code, now_ms()) {
            return Ok(());
        }
        if let Some(original) = self.store.vm(job.vm)? {
            self.job_event(
                &original,
                format!(
                    "job result: exit code {code} from {} ({vm}); every other runner ends",
                    record.name
                ),
            );
        }
        self.settle_job(job)
    }

    /// Ends a decided job's losers (those there are so far) and saves it.
    fn settle_job(&self, mut job: Job) -> Result<(), CloudError> {
        let (runners, last) = self.runners(&job)?;
        let why = match job.result {
            Some(result) => format!("job of {} decided by {}", job.vm, result.vm),
            None => return Ok(()),
        };
        for loser in job.losers(&runners) {
            self.policy_desired(loser, PolicyAction::Terminate, &why)?;
        }
        job.settle(last);
        self.store.save_job(&job)?;
        self.jobs.all.lock().insert(job.vm, job);
        Ok(())
    }

    /// Watches deadlines and settles decided jobs on the clock, until the process ends.
    pub async fn drive_jobs(self: Arc<Self>) {
        loop {
            tokio::time::sleep(DRIVE_EVERY).await;
            let cloud = self.clone();
            crate::blocking(move || {
                if let Err(e) = cloud.enforce_deadlines(now_ms()) {
                    warn!("enforcing deadlines: {e}");
                }
                let decided: Vec<VmId> = cloud
                    .jobs
                    .all
                    .lock()
                    .values()
                    .filter(|j| j.is_active() && j.result.is_some())
                    .map(|j| j.vm)
                    .collect();
                for vm in decided {
                    let _step = cloud.jobs.steps.lock();
                    let Some(job) = cloud.job_of(vm) else {
                        continue;
                    };
                    if let Err(e) = cloud.settle_job(job) {
                        warn!(%vm, "settling a job: {e}");
                    }
                }
            });
        }
    }
}
