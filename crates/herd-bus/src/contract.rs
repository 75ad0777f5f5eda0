//! The contract every bus engine keeps, as one suite: the embedded engine's tests run
//! it, and a NATS engine is done when it passes the same suite unchanged. It checks
//! what callers rely on: per-host queues in order, one copy per command id, a newer
//! generation superseding older ones, acks that drop what was applied (or older),
//! wakes for the host published to and no other, and queues that survive a reopen.

use crate::{Bus, BusError};
use herd_proto::wire::{Command, CommandId, HostId, VmSpec};
use herd_proto::VmState;
use std::time::Duration;
use uuid::Uuid;

/// What broke the contract.
#[derive(Debug, thiserror::Error)]
pub enum Breach {
    #[error("{0}")]
    Broken(String),
    #[error(transparent)]
    Bus(#[from] BusError),
}

macro_rules! ensure {
    ($cond:expr, $($what:tt)+) => {
        if !$cond {
            return Err(Breach::Broken(format!($($what)+)));
        }
    };
}

/// A command for VM `vm` (by number) at `generation`, as the suite publishes them.
pub fn command(vm: u128, generation: u64) -> Command {
    Command {
        id: CommandId {
            vm: Uuid::from_u128(vm),
            generation,
        },
        spec: VmSpec {
            name: format!("vm{vm}"),
            hypervisor: "sim".into(),
            vcpus: 1,
            memory_mib: 64,
            image: "default".into(),
            command: Vec::new(),
            policy: Default::default(),
            keep_running: false,
            disk_mib: 0,
            burst: Default::default(),
            seed: None,
        },
        target: VmState::Running,
    }
}

/// The (vm, generation) of every pending command of `host`, in queue order.
async fn queue(bus: &dyn Bus, host: HostId) -> Result<Vec<(u128, u64)>, Breach> {
    let pending = bus.pending(host, 0, 1_000).await?;
    ensure!(
        pending.windows(2).all(|pair| pair[0].seq < pair[1].seq),
        "pending is not in queue order: {pending:?}"
    );
    Ok(pending
        .iter()
        .map(|q| (q.command.id.vm.as_u128(), q.command.id.generation))
        .collect())
}

/// Runs the suite on engines made by `open`, which must open the same durable bus each
/// time it is called (the suite drops one and opens it again).
pub async fn check<F>(open: F) -> Result<(), Breach>
where
    F: Fn() -> Result<Box<dyn Bus>, BusError>,
{
    let (a, b) = (Uuid::from_u128(0xa), Uuid::from_u128(0xb));
    let bus = open()?;
    ensure!(bus.depth(a).await? == 0, "a new bus holds commands");
    ensure!(
        queue(bus.as_ref(), a).await?.is_empty(),
        "a new bus has pending commands"
    );

    let mut woken = bus.subscribe(a);
    bus.publish(&[(b, command(9, 1))]).await?;
    let early = tokio::time::timeout(Duration::from_millis(100), woken.queued()).await;
    ensure!(early.is_err(), "a publish for host b woke host a");

    bus.publish(&[(a, command(1, 1)), (a, command(2, 1)), (a, command(3, 1))])
        .await?;
    let woke = tokio::time::timeout(Duration::from_secs(5), woken.queued()).await;
    ensure!(
        woke.is_ok(),
        "a publish for host a did not wake its subscriber"
    );
    ensure!(
        queue(bus.as_ref(), a).await? == [(1, 1), (2, 1), (3, 1)],
        "host a's queue is not what was published, in order"
    );
    ensure!(queue(bus.as_ref(), b).await? == [(9, 1)], "host b's queue");

    bus.publish(&[(a, command(2, 1))]).await?;
    ensure!(
        bus.depth(a).await? == 3,
        "the same command queued twice is two copies"
    );
    bus.publish(&[(a, command(1, 2))]).await?;
    ensure!(
        queue(bus.as_ref(), a).await? == [(2, 1), (3, 1), (1, 2)],
        "a newer generation did not supersede the older one"
    );

    let pending = bus.pending(a, 0, 1).await?;
    ensure!(
        pending.len() == 1,
        "limit 1 gave {} commands",
        pending.len()
    );
    let rest = bus.pending(a, pending[0].seq, 10).await?;
    ensure!(
        rest.len() == 2 && rest.iter().all(|q| q.seq > pending[0].seq),
        "pending after a seq did not skip to after it"
    );

    bus.ack(
        a,
        &[CommandId {
            vm: Uuid::from_u128(2),
            generation: 1,
        }],
    )
    .await?;
    // Applying a newer generation covers an older one still queued.
    bus.ack(
        a,
        &[CommandId {
            vm: Uuid::from_u128(3),
            generation: 5,
        }],
    )
    .await?;
    // Acking an older generation leaves the newer one.
    bus.ack(
        a,
        &[CommandId {
            vm: Uuid::from_u128(1),
            generation: 1,
        }],
    )
    .await?;
    ensure!(
        queue(bus.as_ref(), a).await? == [(1, 2)],
        "acks did not drop exactly what was applied"
    );
    ensure!(bus.depth(a).await? == 1, "depth after acks");
    ensure!(
        queue(bus.as_ref(), b).await? == [(9, 1)],
        "acks for a touched b"
    );

    drop(bus);
    let bus = open()?;
    ensure!(
        queue(bus.as_ref(), a).await? == [(1, 2)] && queue(bus.as_ref(), b).await? == [(9, 1)],
        "the queues did not survive a reopen"
    );
    // Positions keep growing after a reopen, so a connection's "sent up to" stays valid.
    let last = bus
        .pending(a, 0, 10)
        .await?
        .last()
        .map(|q| q.seq)
        .unwrap_or(0);
    bus.publish(&[(a, command(4, 1))]).await?;
    let after = bus.pending(a, last, 10).await?;
    ensure!(
        after.len() == 1 && after[0].command.id.vm == Uuid::from_u128(4),
        "a command published after a reopen is not after the older ones"
    );
    Ok(())
}
