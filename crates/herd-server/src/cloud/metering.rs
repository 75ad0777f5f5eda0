//! Usage as agents meter it, rate cards and bills.

use super::{invalid, Cloud, CloudError};
use crate::billing::{self, BillLine};
use crate::group_commit::Pending;
use crate::store::{now_ms, StoreError, UsageRow};
use herd_proto::policy::RateCard;
use herd_proto::wire::{HostId, VmId, VmUsage};
use herd_proto::VmState;
use std::collections::HashMap;

impl Cloud {
    /// A VM's metered usage samples up to `to_ms`, oldest first.
    pub fn usage_samples(&self, vm: VmId, to_ms: i64) -> Result<Vec<UsageRow>, CloudError> {
        Ok(self.store.usage_samples(vm, to_ms)?)
    }

    /// The last usage counters heard for a VM, with when (unix ms).
    pub fn vm_usage(&self, id: VmId) -> Option<(VmUsage, i64)> {
        self.usage.lock().get(&id).copied()
    }

    /// Meters a usage batch from a host: stored once per (VM, instant), so a
    /// retransmitted batch changes nothing. Returns how many entries were dropped
    /// because their VM is not placed on that host.
    pub async fn record_usage(
        &self,
        host: HostId,
        sampled_at_ms: u64,
        usage: &[VmUsage],
    ) -> Result<usize, CloudError> {
        let (n_rejected, written) = self.hand_over_usage(host, sampled_at_ms, usage);
        written.durable().await?;
        Ok(n_rejected)
    }

    /// Like [`Cloud::record_usage`], returning at once: the samples are on disk when
    /// the returned handle resolves.
    pub fn hand_over_usage(
        &self,
        host: HostId,
        sampled_at_ms: u64,
        usage: &[VmUsage],
    ) -> (usize, Pending) {
        let now = now_ms();
        let mut n_rejected = 0;
        let mut rows = Vec::with_capacity(usage.len());
        {
            let placement = self.placement.lock();
            let mut table = self.usage.lock();
            for entry in usage {
                if placement
                    .vms
                    .get(&entry.vm)
                    .is_some_and(|(placed, _, _)| *placed == host)
                {
                    table.insert(entry.vm, (*entry, now));
                    rows.push((
                        entry.vm,
                        UsageRow {
                            sampled_at_ms: sampled_at_ms as i64,
                            cpu_ms: entry.cpu_ms,
                            mem_kib: entry.mem_kib,
                            net_bytes: entry.net_rx_bytes.saturating_add(entry.net_tx_bytes),
                            disk_bytes: entry
                                .disk_read_bytes
                                .saturating_add(entry.disk_write_bytes),
                        },
                    ));
                } else {
                    n_rejected += 1;
                }
            }
        }
        (n_rejected, self.commits.hand_over(None, Vec::new(), rows))
    }

    /// A VM's latest `limit` usage samples, oldest first (for its charts).
    pub fn recent_usage(&self, id: VmId, limit: usize) -> Result<Vec<UsageRow>, CloudError> {
        Ok(self.store.recent_usage(id, limit)?)
    }

    /// Every state a VM was reported in, with when, oldest first.
    pub fn state_history(&self, id: VmId) -> Result<Vec<(i64, VmState)>, CloudError> {
        Ok(self.store.state_history(id)?)
    }

    pub fn set_rate_card(&self, project: &str, card: &RateCard) -> Result<(), CloudError> {
        self.project(project)?;
        if card.peak_start_hour > 24 || card.peak_end_hour > 24 {
            return Err(invalid("peak_start_hour", "peak hours are 0 to 24 (UTC)"));
        }
        let json = serde_json::to_string(card).map_err(|e| invalid("rate card", e.to_string()))?;
        self.store.set_rate_card(project, &json)?;
        Ok(())
    }

    /// The prices a project's VMs pay: its own card, or [`RateCard::STANDARD`] until a
    /// cloud admin sets one.
    pub fn rate_card(&self, project: &str) -> Result<RateCard, CloudError> {
        Ok(self.own_rate_card(project)?.unwrap_or(RateCard::STANDARD))
    }

    /// The card set for a project, if one is.
    pub fn own_rate_card(&self, project: &str) -> Result<Option<RateCard>, CloudError> {
        self.store
            .rate_card(project)?
            .map(|json| {
                serde_json::from_str(&json)
                    .map_err(|e| CloudError::Store(StoreError::Corrupt(format!("rate card: {e}"))))
            })
            .transpose()
    }

    /// Every VM's charges over `[from_ms, to_ms)`, priced by its project's rate card.
    pub fn bill(
        &self,
        project: Option<&str>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<BillLine>, CloudError> {
        Ok(self
            .bills(project, &[(from_ms, to_ms)])?
            .pop()
            .unwrap_or_default())
    }

    /// One VM's cost over each period (its cost chart), priced like its bill; `None`
    /// if the ledger does not know it.
    pub fn vm_costs(
        &self,
        vm: VmId,
        periods: &[(i64, i64)],
    ) -> Result<Option<Vec<u64>>, CloudError> {
        let now = now_ms();
        let Some(mut ledger) = self.store.ledger_vm(vm)? else {
            return Ok(None);
        };
        ledger.resized = self
            .store
            .vm_sizes(vm)?
            .into_iter()
            .map(|(at, size)| (at, size.memory_mib))
            .collect();
        ledger.bursts = self.store.bursts_of(vm)?;
        let rates = self.rate_card(&ledger.project)?;
        let history = self.store.state_history(vm)?;
        let last = periods
            .iter()
            .map(|&(_, t)| t.min(now))
            .max()
            .unwrap_or(now);
        let samples = self.store.usage_samples(vm, last)?;
        Ok(Some(
            periods
                .iter()
                .map(|&(from, to)| {
                    billing::bill_vm(&rates, &ledger, &history, &samples, from, to.min(now))
                        .cost_micros
                })
                .collect(),
        ))
    }

    /// The bills of several periods at once (a chart by month): each VM's history is
    /// read once for all of them. One list of lines per period, in the order given.
    pub fn bills(
        &self,
        project: Option<&str>,
        periods: &[(i64, i64)],
    ) -> Result<Vec<Vec<BillLine>>, CloudError> {
        let now = now_ms();
        let periods: Vec<(i64, i64)> = periods.iter().map(|&(f, t)| (f, t.min(now))).collect();
        let last = periods.iter().map(|&(_, t)| t).max().unwrap_or(now);
        let mut cards: HashMap<String, RateCard> = HashMap::new();
        let mut bills: Vec<Vec<BillLine>> = periods.iter().map(|_| Vec::new()).collect();
        let mut all = self.store.ledger_history(project)?;
        for mut vm in self.store.ledger(project)? {
            vm.resized = all.sizes.remove(&vm.vm).unwrap_or_default();
            vm.bursts = all.bursts.remove(&vm.vm).unwrap_or_default();
            if !cards.contains_key(&vm.project) {
                let card = self.rate_card(&vm.project)?;
                cards.insert(vm.project.clone(), card);
            }
            let rates = cards.get(&vm.project).copied().unwrap_or_default();
            let history = all.states.remove(&vm.vm).unwrap_or_default();
            let samples = if all.sampled.contains(&vm.vm) {
                self.store.usage_samples(vm.vm, last)?
            } else {
                Vec::new()
            };
            for (&(from_ms, to_ms), lines) in periods.iter().zip(bills.iter_mut()) {
                let line = billing::bill_vm(&rates, &vm, &history, &samples, from_ms, to_ms);
                if line.billed_ms > 0
                    || line.cpu_ms > 0
                    || line.net_bytes > 0
                    || !line.bursts.is_empty()
                {
                    lines.push(line);
                }
            }
        }
        Ok(bills)
    }
}
