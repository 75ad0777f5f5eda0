//! Launch requests checked before anything is written: names, shapes, hypervisor
//! types, images and policies, each refusal naming its field.

use super::{invalid, Cloud, CloudError, LaunchSpec};
use herd_proto::policy::{PolicySpec, RateCard};
use herd_proto::wire::VmSpec;

/// The largest data disk a VM may ask for: 16 TiB.
const MAX_DISK_MIB: u64 = 16 << 20;

/// The hypervisor types that give a VM a data disk of its own.
const DISK_TYPES: &[&str] = &["qemu", "sim"];

/// The vCPUs and memory a VM may have, at launch and in a resize.
pub(crate) fn check_shape(vcpus: u32, memory_mib: u64) -> Result<(), CloudError> {
    if !(1..=256).contains(&vcpus) {
        return Err(invalid("vcpus", "must be between 1 and 256"));
    }
    if !(16..=1 << 20).contains(&memory_mib) {
        return Err(invalid(
            "memory_mib",
            "must be between 16 and 1048576 (1 TiB)",
        ));
    }
    Ok(())
}

pub(crate) fn valid_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
}

impl Cloud {
    pub(super) fn validate_launch(&self, spec: LaunchSpec) -> Result<(String, VmSpec), CloudError> {
        if !valid_name(&spec.name) {
            return Err(invalid(
                "name",
                "must be 1 to 63 characters of a-z, 0-9 and '-', not starting with '-'",
            ));
        }
        let project = spec.project.unwrap_or_else(|| "default".into());
        if !valid_name(&project) {
            return Err(invalid(
                "project",
                "must be 1 to 63 characters of a-z, 0-9 and '-'",
            ));
        }
        let hypervisor = spec
            .hypervisor
            .unwrap_or_else(|| self.config.default_hypervisor.clone());
        let vcpus = spec.vcpus.unwrap_or(1);
        let memory_mib = spec.memory_mib.unwrap_or(256);
        check_shape(vcpus, memory_mib)?;
        let image = spec
            .image
            .unwrap_or_else(|| self.config.default_image.clone());
        if image.is_empty()
            || image.len() > 128
            || !image
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(invalid(
                "image",
                "must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
            ));
        }
        if spec.command.len() > 64
            || spec.command.iter().map(|arg| arg.len()).sum::<usize>() > 16 * 1024
        {
            return Err(invalid(
                "command",
                "at most 64 arguments and 16 KiB in total",
            ));
        }
        let disk_mib = spec.disk_mib.unwrap_or(0);
        if spec.disk_mib.is_some() && !(1..=MAX_DISK_MIB).contains(&disk_mib) {
            return Err(invalid(
                "disk_mib",
                format!("must be between 1 and {MAX_DISK_MIB} (16 TiB); leave it out for no disk"),
            ));
        }
        if disk_mib > 0 && !DISK_TYPES.contains(&hypervisor.as_str()) {
            return Err(invalid(
                "disk_mib",
                format!(
                    "{hypervisor} VMs take no data disk (only {}): a container keeps its \
                     data in its own root",
                    DISK_TYPES.join(", ")
                ),
            ));
        }
        let policy = self.validate_policy(&project, spec.policy)?;
        self.check_offered(&hypervisor)?;
        Ok((
            project,
            VmSpec {
                name: spec.name,
                hypervisor,
                vcpus,
                memory_mib,
                image,
                command: spec.command,
                policy,
                keep_running: spec.keep_running,
                disk_mib,
                burst: Default::default(),
                seed: None,
            },
        ))
    }

    /// The types that exist are the ones hosts announced drivers for (up or down): a VM
    /// of any other type would wait for a host forever. Before the first host is known,
    /// the types this build has drivers for.
    fn check_offered(&self, hypervisor: &str) -> Result<(), CloudError> {
        let placement = self.placement.lock();
        let known = &self.config.hypervisor_kinds;
        if placement.sched.offers(hypervisor)
            || placement.sched.is_empty() && known.iter().any(|kind| kind == hypervisor)
        {
            return Ok(());
        }
        let offered: Vec<&str> = placement.sched.hypervisors().collect();
        let why = if placement.sched.is_empty() && known.is_empty() {
            format!("no host offers {hypervisor:?}: no host has joined yet")
        } else if placement.sched.is_empty() {
            format!(
                "no driver serves {hypervisor:?}; this build has {}",
                known.join(", ")
            )
        } else {
            format!(
                "no host offers {hypervisor:?}; the hosts offer {}",
                offered.join(", ")
            )
        };
        Err(invalid("hypervisor", why))
    }

    /// Checks a policy for values that cannot be meant, and prices a cost cap that came
    /// without rates with the project's rate card.
    fn validate_policy(
        &self,
        project: &str,
        mut policy: PolicySpec,
    ) -> Result<PolicySpec, CloudError> {
        const YEAR_S: u64 = 366 * 86_400;
        let warn_ok = |warn: Option<u64>, field: &'static str| match warn {
            Some(0) => Err(invalid(
                field,
                "a warning must come before the action (> 0)",
            )),
            _ => Ok(()),
        };
        if let Some(lifespan) = &policy.lifespan {
            if lifespan.max_seconds.is_none() && lifespan.end_at.is_none() {
                return Err(invalid("policy.lifespan", "give max_seconds or end_at"));
            }
            if lifespan
                .max_seconds
                .is_some_and(|s| s == 0 || s > 100 * YEAR_S)
            {
                return Err(invalid(
                    "policy.lifespan.max_seconds",
                    "must be 1 s to 100 years",
                ));
            }
            warn_ok(lifespan.enforce.warn, "policy.lifespan.enforce.warn")?;
        }
        if let Some(deadline) = &policy.deadline {
            if deadline.seconds == 0 || deadline.seconds > YEAR_S {
                return Err(invalid("policy.deadline.seconds", "must be 1 s to a year"));
            }
            if deadline.copies > 1000 {
                return Err(invalid(
                    "policy.deadline.copies",
                    "at most 1000 (0 is one on every other host)",
                ));
            }
        }
        if let Some(idle) = &policy.idle {
            if idle.for_seconds == 0 || idle.for_seconds > YEAR_S {
                return Err(invalid("policy.idle.for_seconds", "must be 1 s to a year"));
            }
        }
        if let Some(overuse) = &policy.overuse {
            if overuse.cpu_above_permille.is_none()
                && overuse.mem_above_mib.is_none()
                && overuse.net_above_bps.is_none()
            {
                return Err(invalid(
                    "policy.overuse",
                    "give a CPU, memory or network threshold",
                ));
            }
            if overuse.for_seconds == 0 || overuse.for_seconds > YEAR_S {
                return Err(invalid(
                    "policy.overuse.for_seconds",
                    "must be 1 s to a year",
                ));
            }
        }
        if let Some(budget) = &policy.budget {
            if budget.cpu_seconds.is_none()
                && budget.mem_gib_hours_milli.is_none()
                && budget.net_bytes.is_none()
            {
                return Err(invalid(
                    "policy.budget",
                    "give a CPU, memory or network budget",
                ));
            }
            if budget.enforce.warn.is_some_and(|w| w == 0 || w >= 1000) {
                return Err(invalid(
                    "policy.budget.enforce.warn",
                    "thousandths of the budget, 1 to 999",
                ));
            }
        }
        if let Some(cap) = &mut policy.cost_cap {
            if cap.max_micros == 0 {
                return Err(invalid("policy.cost_cap.max_micros", "must be more than 0"));
            }
            if cap.enforce.warn.is_some_and(|w| w == 0 || w >= 1000) {
                return Err(invalid(
                    "policy.cost_cap.enforce.warn",
                    "thousandths of the cap, 1 to 999",
                ));
            }
            if cap.rates == RateCard::default() {
                cap.rates = self.rate_card(project)?;
            }
        }
        if let Some(errors) = &policy.errors {
            if errors.max_restarts > 1000 {
                return Err(invalid("policy.errors.max_restarts", "at most 1000"));
            }
        }
        if let Some(activation) = &policy.activation {
            if activation.start_at.is_none() && activation.after_vm.is_none() {
                return Err(invalid("policy.activation", "give start_at or after_vm"));
            }
        }
        Ok(policy)
    }
}
