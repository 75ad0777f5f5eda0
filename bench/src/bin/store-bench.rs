//! How many observed-state changes per second the store takes, by batch size.
//!
//! Fills a store with `--vms` VMs (on 10,000 hosts), then writes `--changes` state
//! flips of random VMs (running <-> paused, one event each, as the churn of `herd
//! sim` makes them) in transactions of each `--batch` size. The first batch size is
//! the baseline the others are compared with. This is the cost under the ingest at
//! scale: a change is a row update, index updates and an event, each on a random page
//! of a table far larger than the page cache.

use anyhow::Result;
use clap::Parser;
use herd_proto::VmState;
use herd_server::store::{NewEvent, Observation, Store, VmRecord};
use rand::Rng;
use std::time::Instant;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    vms: usize,
    #[arg(long, default_value_t = 60_000)]
    changes: usize,
    /// Transaction sizes to compare; the first is the baseline.
    #[arg(long, value_delimiter = ',', default_values_t = [500, 2_000, 10_000, 30_000])]
    batch: Vec<usize>,
}

fn record(id: Uuid, host: Uuid, n: usize, now: i64) -> VmRecord {
    VmRecord {
        id,
        name: format!("vm-{n}"),
        project: "default".into(),
        hypervisor: "sim".into(),
        vcpus: 1,
        memory_mib: 64,
        image: "default".into(),
        command: vec![],
        policy: Default::default(),
        keep_running: false,
        disk_mib: 0,
        host: Some(host),
        desired: VmState::Running,
        generation: 1,
        issued_generation: 1,
        observed: VmState::Running,
        observed_at_ms: now,
        last_error: None,
        deleting: false,
        created_at_ms: now,
        updated_at_ms: now,
        seed: None,
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("herd.db"))?;
    let hosts: Vec<Uuid> = (0..10_000).map(|_| Uuid::new_v4()).collect();
    let now = 1_700_000_000_000;
    let started = Instant::now();
    let mut ids = Vec::with_capacity(args.vms);
    for chunk in (0..args.vms).collect::<Vec<_>>().chunks(10_000) {
        let rows: Vec<(VmRecord, NewEvent)> = chunk
            .iter()
            .map(|&n| {
                let id = Uuid::now_v7();
                ids.push(id);
                let event = NewEvent {
                    vm: Some(id),
                    kind: "vm.state",
                    message: "scheduled".into(),
                    ..NewEvent::default()
                };
                (record(id, hosts[n % hosts.len()], n, now), event)
            })
            .collect();
        store.insert_vms(&rows)?;
    }
    let filled = started.elapsed();
    // What a restart costs before the server can answer: opening a store of this size
    // loads its in-memory index of VMs by state and host.
    drop(store);
    let started = Instant::now();
    let store = Store::open(&dir.path().join("herd.db"))?;
    println!(
        "filled {} VMs in {:.1} s; reopened in {:.2} s; now {} random state flips per batch size",
        args.vms,
        filled.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        args.changes
    );
    println!(
        "{:>8} {:>12} {:>10} {:>8}",
        "batch", "changes/s", "ms/batch", "ratio"
    );
    let mut rng = rand::thread_rng();
    let mut paused = vec![false; ids.len()];
    let mut baseline = None;
    for &batch in &args.batch {
        let started = Instant::now();
        let mut done = 0;
        while done < args.changes {
            let n = batch.min(args.changes - done);
            let observations: Vec<Observation> = (0..n)
                .map(|_| {
                    let i = rng.gen_range(0..ids.len());
                    let (from, to) = if paused[i] {
                        (VmState::Paused, VmState::Running)
                    } else {
                        (VmState::Running, VmState::Paused)
                    };
                    paused[i] = !paused[i];
                    Observation {
                        vm: ids[i],
                        state: to,
                        purge: false,
                        host: None,
                        events: vec![NewEvent {
                            vm: Some(ids[i]),
                            kind: "vm.state",
                            from: Some(from),
                            to: Some(to),
                            message: "flip".into(),
                            ..NewEvent::default()
                        }],
                    }
                })
                .collect();
            store.write_batch(&observations, &[])?;
            done += n;
        }
        let secs = started.elapsed().as_secs_f64();
        let rate = done as f64 / secs;
        let base = *baseline.get_or_insert(rate);
        println!(
            "{batch:>8} {rate:>12.0} {:>10.1} {:>7.2}x",
            secs * 1000.0 / (done as f64 / batch as f64),
            rate / base
        );
    }
    Ok(())
}
