//! The conformance kit: what every driver must do, checked on a real instance of it.
//! The agent never branches on the hypervisor type, so every driver must answer the
//! same operations the same way: errors for VMs it lacks, idempotent termination,
//! states that the lifecycle flow allows, and the capabilities it claims. Each
//! driver's tests run [`check`] against the real thing (QEMU, the sim); a new driver
//! passes it before the agent may use it.

use crate::driver::{Driver, DriverError};
use herd_proto::wire::{VmId, VmSpec};
use herd_proto::VmState;
use std::time::{Duration, Instant};

/// What broke the contract, with the step it broke in.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {what}")]
pub struct Breach {
    pub step: &'static str,
    pub what: String,
}

fn breach(step: &'static str, what: impl Into<String>) -> Breach {
    Breach {
        step,
        what: what.into(),
    }
}

/// Runs the whole contract on `driver` with one VM of `spec` (named `vm`), waiting up
/// to `patience` for each state change. Returns the steps that passed.
pub async fn check(
    driver: &dyn Driver,
    vm: VmId,
    spec: &VmSpec,
    patience: Duration,
) -> Result<Vec<&'static str>, Breach> {
    let mut passed = Vec::new();
    let info = driver
        .probe()
        .await
        .map_err(|e| breach("probe", e.to_string()))?;
    if info.kind != driver.kind() || spec.hypervisor != driver.kind() {
        return Err(breach(
            "probe",
            format!("kind {:?}, spec {:?}", info.kind, spec.hypervisor),
        ));
    }
    passed.push("probe");

    absent(driver, vm).await?;
    passed.push("a VM it lacks is absent and named in every error");

    driver
        .create(vm, spec)
        .await
        .map_err(|e| breach("create", e.to_string()))?;
    reach(driver, vm, VmState::Running, patience, "create").await?;
    passed.push("create reaches running");

    let listed = driver
        .list()
        .await
        .map_err(|e| breach("list", e.to_string()))?;
    if !listed
        .iter()
        .any(|o| o.id == vm && o.state == VmState::Running)
    {
        return Err(breach("list", "the running VM is not listed as running"));
    }
    driver
        .usage()
        .await
        .map_err(|e| breach("usage", e.to_string()))?;
    let console = driver
        .console(vm, 64)
        .await
        .map_err(|e| breach("console", e.to_string()))?;
    if console.len() > 64 {
        return Err(breach(
            "console",
            format!("{} bytes for 64 asked", console.len()),
        ));
    }
    passed.push("list, usage and console answer for a running VM");

    if let Err(e) = driver.start(vm).await {
        if !matches!(e, DriverError::WrongState { .. }) {
            return Err(breach("start while running", e.to_string()));
        }
    }
    passed.push("starting a running VM is refused as a wrong state, or is a no-op");

    driver
        .pause(vm)
        .await
        .map_err(|e| breach("pause", e.to_string()))?;
    reach(driver, vm, VmState::Paused, patience, "pause").await?;
    driver
        .resume(vm)
        .await
        .map_err(|e| breach("resume", e.to_string()))?;
    reach(driver, vm, VmState::Running, patience, "resume").await?;
    passed.push("pause and resume");

    if driver.capabilities().suspend_to_disk {
        driver
            .suspend(vm)
            .await
            .map_err(|e| breach("suspend", e.to_string()))?;
        reach(driver, vm, VmState::Suspended, patience, "suspend").await?;
        driver
            .resume(vm)
            .await
            .map_err(|e| breach("resume from disk", e.to_string()))?;
        reach(driver, vm, VmState::Running, patience, "resume from disk").await?;
        passed.push("suspend to disk and resume");
    }

    driver
        .stop(vm)
        .await
        .map_err(|e| breach("stop", e.to_string()))?;
    reach(driver, vm, VmState::Stopped, patience, "stop").await?;
    if let Err(e) = driver.pause(vm).await {
        if !matches!(e, DriverError::WrongState { .. }) {
            return Err(breach("pause while stopped", e.to_string()));
        }
    }
    driver
        .start(vm)
        .await
        .map_err(|e| breach("start", e.to_string()))?;
    reach(driver, vm, VmState::Running, patience, "start").await?;
    passed.push("stop and start again");

    driver
        .terminate(vm)
        .await
        .map_err(|e| breach("terminate", e.to_string()))?;
    let deadline = Instant::now() + patience;
    while driver
        .state_of(vm)
        .await
        .map_err(|e| breach("terminate", e.to_string()))?
        .is_some_and(|state| state != VmState::Terminated)
    {
        if Instant::now() > deadline {
            return Err(breach("terminate", "the VM is still there"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    driver
        .terminate(vm)
        .await
        .map_err(|e| breach("terminate again", e.to_string()))?;
    passed.push("terminate, and terminate again");
    Ok(passed)
}

/// A VM the driver does not hold: absent from its answers, and every operation but
/// terminate fails naming it.
async fn absent(driver: &dyn Driver, vm: VmId) -> Result<(), Breach> {
    const STEP: &str = "absent VM";
    match driver.state_of(vm).await {
        Ok(None) => {}
        other => return Err(breach(STEP, format!("state_of answered {other:?}"))),
    }
    let results = [
        ("start", driver.start(vm).await),
        ("pause", driver.pause(vm).await),
        ("resume", driver.resume(vm).await),
        ("suspend", driver.suspend(vm).await),
        ("stop", driver.stop(vm).await),
        ("console", driver.console(vm, 16).await.map(|_| ())),
    ];
    for (op, result) in results {
        if !matches!(result, Err(DriverError::NoSuchVm(id)) if id == vm) {
            return Err(breach(STEP, format!("{op} answered {result:?}")));
        }
    }
    driver
        .terminate(vm)
        .await
        .map_err(|e| breach(STEP, format!("terminate of a VM it lacks failed: {e}")))
}

/// Waits until the VM is in `want`; any state off the way there is a breach only
/// once `patience` is spent.
async fn reach(
    driver: &dyn Driver,
    vm: VmId,
    want: VmState,
    patience: Duration,
    step: &'static str,
) -> Result<(), Breach> {
    let deadline = Instant::now() + patience;
    loop {
        let state = driver
            .state_of(vm)
            .await
            .map_err(|e| breach(step, e.to_string()))?;
        if state == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(breach(
                step,
                format!("still {state:?} after {patience:?}, expected {want}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
