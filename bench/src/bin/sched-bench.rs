//! Placement rate of the scheduler's index (`herd_sched::Scheduler`) against the linear
//! filter-and-weigh (`herd_sched::place`) on the same states, for 100 to 10,000 hosts.
//!
//! Hosts come in five sizes and two hypervisor types (some hosts offer both); VMs in
//! nine flavors. Each run places VMs until the first one does not fit, then keeps the
//! cloud full: before each further placement a random VM is released. Every attempt is
//! a full decision (a host, or the reasons none fits) with capacity accounting; releases
//! are timed too. The linear reference runs on a sample of the same states just before
//! the index decides, and both must choose the same host (or fail with the same reasons).
//! At the end every host's usage is recounted from the VMs still placed and checked
//! against its limits and against the index's own accounting.
//!
//! `--distinct-shapes` rows give every host its own memory size, the index's worst case
//! (see `crates/herd-sched/src/index/`).

use anyhow::{bail, Result};
use clap::Parser;
use herd_sched::{place, Demand, HostSlot, SchedPolicy, Scheduler, Strategy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    /// Numbers of hosts, one row each.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    hosts: Vec<usize>,
    /// Placement attempts with the index on the largest number of hosts.
    #[arg(long, default_value_t = 1_000_000)]
    attempts: usize,
    /// Placement attempts with the index on the smaller numbers of hosts.
    #[arg(long, default_value_t = 200_000)]
    attempts_small: usize,
    /// Linear `place()` calls per row, spread over the run, each checked against the index.
    #[arg(long, default_value_t = 5_000)]
    linear_samples: usize,
    /// Also run the worst case (every host its own shape) on the largest host count,
    /// with this many attempts; 0 to skip.
    #[arg(long, default_value_t = 100_000)]
    distinct_shapes: usize,
    #[arg(long, value_delimiter = ',', default_value = "spread,binpack")]
    strategies: Vec<String>,
    /// Rows as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Rows as CSV, for the "placement rate vs number of hosts" plot.
    #[arg(long, env = "HERD_SCHED_BENCH_CSV")]
    csv: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Host sizes: (cpus, memory MiB).
const HOST_SIZES: [(u32, u64); 5] = [
    (16, 64 * 1024),
    (32, 128 * 1024),
    (48, 256 * 1024),
    (64, 256 * 1024),
    (128, 1024 * 1024),
];

/// VM flavors: (vCPUs, memory MiB, weight).
const FLAVORS: [(u32, u64, u32); 9] = [
    (1, 512, 20),
    (1, 1024, 20),
    (2, 2048, 15),
    (2, 4096, 15),
    (4, 8192, 10),
    (8, 16384, 6),
    (2, 16384, 5),
    (8, 4096, 5),
    (16, 65536, 4),
];

const KINDS: [&str; 2] = ["qemu", "sim"];

#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    strategy: String,
    hosts: usize,
    shapes: &'static str,
    attempts: usize,
    placed: usize,
    no_fit: usize,
    released: usize,
    index_decisions_per_s: f64,
    index_placed_per_s: f64,
    linear_samples: usize,
    linear_decisions_per_s: f64,
    ratio: f64,
    live_vms: usize,
}

fn make_hosts(rng: &mut StdRng, n_hosts: usize, distinct: bool) -> Vec<HostSlot> {
    (0..n_hosts)
        .map(|_| {
            let (cpus, memory_mib) = HOST_SIZES[rng.gen_range(0..HOST_SIZES.len())];
            let memory_mib = if distinct {
                memory_mib - rng.gen_range(0..4096)
            } else {
                memory_mib
            };
            let hypervisors = match rng.gen_range(0..10) {
                0..=3 => vec![KINDS[0].to_owned()],
                4..=7 => vec![KINDS[1].to_owned()],
                _ => vec![KINDS[0].to_owned(), KINDS[1].to_owned()],
            };
            HostSlot {
                id: Uuid::from_u128(rng.gen()),
                up: true,
                hypervisors,
                cpus,
                memory_mib,
                used_vcpus: 0,
                used_memory_mib: 0,
            }
        })
        .collect()
}

fn make_demand(rng: &mut StdRng) -> Demand {
    let total: u32 = FLAVORS.iter().map(|f| f.2).sum();
    let mut pick = rng.gen_range(0..total);
    let mut flavor = FLAVORS[0];
    for f in FLAVORS {
        if pick < f.2 {
            flavor = f;
            break;
        }
        pick -= f.2;
    }
    Demand {
        hypervisor: KINDS[rng.gen_range(0..KINDS.len())].to_owned(),
        vcpus: flavor.0,
        memory_mib: flavor.1,
    }
}

/// The linear reference's view of the hosts, kept in step with the index outside the
/// timed sections.
struct Mirror {
    slots: Vec<HostSlot>,
    position: HashMap<Uuid, usize>,
}

impl Mirror {
    fn add(&mut self, host: Uuid, vcpus: u32, memory_mib: u64, sign: i64) {
        let slot = &mut self.slots[self.position[&host]];
        if sign > 0 {
            slot.used_vcpus += u64::from(vcpus);
            slot.used_memory_mib += memory_mib;
        } else {
            slot.used_vcpus -= u64::from(vcpus);
            slot.used_memory_mib -= memory_mib;
        }
    }
}

fn run(
    strategy: Strategy,
    n_hosts: usize,
    distinct: bool,
    attempts: usize,
    linear_samples: usize,
    seed: u64,
) -> Result<Row> {
    let mut rng = StdRng::seed_from_u64(seed ^ (n_hosts as u64) << 8 ^ u64::from(distinct));
    let policy = SchedPolicy {
        strategy,
        ..SchedPolicy::default()
    };
    let hosts = make_hosts(&mut rng, n_hosts, distinct);
    let mut sched = Scheduler::new(policy);
    for host in &hosts {
        sched.upsert_host(host.clone());
    }
    let mut mirror = Mirror {
        position: hosts.iter().enumerate().map(|(i, h)| (h.id, i)).collect(),
        slots: hosts,
    };
    let stride = (attempts / linear_samples.max(1)).max(1);
    let mut live: Vec<(Uuid, u32, u64)> = Vec::new();
    let (mut placed, mut no_fit, mut released, mut n_linear) = (0, 0, 0, 0);
    let mut full = false;
    let mut index_time = Duration::ZERO;
    let mut linear_time = Duration::ZERO;
    for attempt in 0..attempts {
        if full && !live.is_empty() {
            let (host, vcpus, memory_mib) = live.swap_remove(rng.gen_range(0..live.len()));
            let start = Instant::now();
            sched.release(host, vcpus, memory_mib);
            index_time += start.elapsed();
            mirror.add(host, vcpus, memory_mib, -1);
            released += 1;
        }
        let demand = make_demand(&mut rng);
        let reference = if attempt % stride == 0 {
            let start = Instant::now();
            let chosen = place(&mirror.slots, &demand, &policy);
            linear_time += start.elapsed();
            n_linear += 1;
            Some(chosen.map(|idx| mirror.slots[idx].id))
        } else {
            None
        };
        let start = Instant::now();
        let chosen = sched.place_and_reserve(&demand);
        index_time += start.elapsed();
        if let Some(reference) = reference {
            if reference != chosen {
                bail!(
                    "{strategy:?}, {n_hosts} hosts, attempt {attempt}: index chose {chosen:?}, \
                     linear place() {reference:?}"
                );
            }
        }
        match chosen {
            Ok(host) => {
                mirror.add(host, demand.vcpus, demand.memory_mib, 1);
                live.push((host, demand.vcpus, demand.memory_mib));
                placed += 1;
            }
            Err(_) => {
                no_fit += 1;
                full = true;
            }
        }
    }
    // Recount every host's usage from the VMs still placed.
    let mut recount: HashMap<Uuid, (u64, u64)> = HashMap::new();
    for (host, vcpus, memory_mib) in &live {
        let used = recount.entry(*host).or_default();
        used.0 += u64::from(*vcpus);
        used.1 += memory_mib;
    }
    for slot in sched.hosts() {
        let (vcpus, memory_mib) = recount.get(&slot.id).copied().unwrap_or_default();
        if vcpus > policy.vcpu_limit(slot) || memory_mib > policy.memory_limit_mib(slot) {
            bail!(
                "host {} over capacity: {vcpus}/{} vCPUs, {memory_mib}/{} MiB",
                slot.id,
                policy.vcpu_limit(slot),
                policy.memory_limit_mib(slot)
            );
        }
        if (vcpus, memory_mib) != (slot.used_vcpus, slot.used_memory_mib) {
            bail!(
                "host {}: the index's accounting differs from the recount",
                slot.id
            );
        }
    }
    let index_rate = attempts as f64 / index_time.as_secs_f64();
    let linear_rate = n_linear as f64 / linear_time.as_secs_f64();
    Ok(Row {
        strategy: format!("{strategy:?}").to_lowercase(),
        hosts: n_hosts,
        shapes: if distinct { "distinct" } else { "5 sizes" },
        attempts,
        placed,
        no_fit,
        released,
        index_decisions_per_s: index_rate,
        index_placed_per_s: placed as f64 / index_time.as_secs_f64(),
        linear_samples: n_linear,
        linear_decisions_per_s: linear_rate,
        ratio: index_rate / linear_rate,
        live_vms: live.len(),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut rows = Vec::new();
    println!(
        "placements on N hosts (5 sizes, 2 hypervisor types), 9 VM flavors; fill, then \
         release one random VM before each placement; cpu overcommit 4, memory 1"
    );
    println!(
        "index = Scheduler::place_and_reserve (+ release); linear = place() over a slice, \
         on sampled states of the same run, each compared with the index's choice"
    );
    println!();
    println!(
        "{:>8} {:>6} {:>9} {:>9} {:>8} {:>8} {:>12} {:>12} {:>8} {:>12} {:>8}",
        "strategy",
        "hosts",
        "shapes",
        "attempts",
        "placed",
        "no-fit",
        "index dec/s",
        "index pl/s",
        "samples",
        "linear dec/s",
        "ratio"
    );
    let largest = args.hosts.iter().copied().max().unwrap_or(0);
    for name in &args.strategies {
        let strategy = match name.as_str() {
            "spread" => Strategy::Spread,
            "binpack" => Strategy::Binpack,
            other => bail!("unknown strategy {other}"),
        };
        let mut cases: Vec<(usize, bool, usize, usize)> = args
            .hosts
            .iter()
            .map(|&n| {
                let attempts = if n == largest {
                    args.attempts
                } else {
                    args.attempts_small
                };
                (n, false, attempts, args.linear_samples)
            })
            .collect();
        if args.distinct_shapes > 0 && largest > 0 {
            let samples = (args.linear_samples / 2).max(1);
            cases.push((largest, true, args.distinct_shapes, samples));
        }
        for (n_hosts, distinct, attempts, samples) in cases {
            let row = run(strategy, n_hosts, distinct, attempts, samples, args.seed)?;
            println!(
                "{:>8} {:>6} {:>9} {:>9} {:>8} {:>8} {:>12.0} {:>12.0} {:>8} {:>12.0} {:>7.1}x",
                row.strategy,
                row.hosts,
                row.shapes,
                row.attempts,
                row.placed,
                row.no_fit,
                row.index_decisions_per_s,
                row.index_placed_per_s,
                row.linear_samples,
                row.linear_decisions_per_s,
                row.ratio
            );
            std::io::stdout().flush()?;
            rows.push(row);
        }
    }
    println!();
    let n_samples: usize = rows.iter().map(|r| r.linear_samples).sum();
    let n_live: usize = rows.iter().map(|r| r.live_vms).sum();
    println!(
        "checked: {n_samples} sampled decisions equal to linear place(); no host over its \
         limits, usage recounted from {n_live} placed VMs"
    );
    println!("dec/s: decisions (a host, or the reasons none fits) per second; pl/s: VMs placed per second of the same time");
    if let Some(row) = rows
        .iter()
        .find(|r| r.hosts == 10_000 && r.strategy == "spread" && r.shapes != "distinct")
    {
        println!(
            "acceptance (>= 10,000 placements/s on 10,000 hosts, spread): {:.0} placed/s, {}",
            row.index_placed_per_s,
            if row.index_placed_per_s >= 10_000.0 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&rows)?)?;
    }
    if let Some(path) = &args.csv {
        let mut out = String::from(
            "strategy,hosts,shapes,attempts,placed,no_fit,released,index_decisions_per_s,\
             index_placed_per_s,linear_samples,linear_decisions_per_s,ratio\n",
        );
        for r in &rows {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{:.0},{:.0},{},{:.0},{:.2}\n",
                r.strategy,
                r.hosts,
                r.shapes,
                r.attempts,
                r.placed,
                r.no_fit,
                r.released,
                r.index_decisions_per_s,
                r.index_placed_per_s,
                r.linear_samples,
                r.linear_decisions_per_s,
                r.ratio
            ));
        }
        std::fs::write(path, out)?;
    }
    Ok(())
}
