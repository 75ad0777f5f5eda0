//! `herd-testbed`: several herd hosts on this machine, for trying by hand what the
//! multi-host tests do. `up` makes the network, starts a server and one agent per
//! host, prints how to reach them and holds them until Ctrl-C; the other commands
//! shape, cut and heal a running testbed's links from another terminal.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use herd_testbed::{net, Cluster, ClusterConfig, Shape, Testbed};
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Several herd hosts on one machine, as network namespaces on a bridge")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make N hosts, start a server and an agent on each, and hold them until Ctrl-C.
    Up {
        /// How many hosts (1 to 200).
        hosts: usize,
        /// `--drivers` for every agent: sim, qemu, oci or a list.
        #[arg(long, default_value = "sim")]
        drivers: String,
        /// The herd binary (default: the one beside herd-testbed, else `herd` on PATH).
        #[arg(long)]
        herd: Option<PathBuf>,
        /// Where data dirs and logs go (default: /tmp/herd-testbed/slot<K>), emptied
        /// first and kept after for the logs.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// One more argument for `herd server` (repeatable).
        #[arg(long = "server-arg", allow_hyphen_values = true)]
        server_args: Vec<String>,
        /// One more argument for every `herd agent` (repeatable).
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// Limit a host's link, both ways.
    Shape {
        /// The testbed's slot (`up` prints it).
        slot: u8,
        /// The host's index, from 0.
        host: usize,
        #[arg(long, default_value_t = 0)]
        rate_kbit: u64,
        /// Needs the netem qdisc (refused with the reason where the kernel lacks it).
        #[arg(long, default_value_t = 0)]
        delay_ms: u32,
        /// Percent of packets lost; needs netem.
        #[arg(long, default_value_t = 0.0)]
        loss_pct: f64,
    },
    /// Remove a host's shaping.
    Unshape { slot: u8, host: usize },
    /// Cut a host off the bridge (a pulled cable).
    Cut { slot: u8, host: usize },
    /// Plug it back in.
    Heal { slot: u8, host: usize },
    /// Remove what testbeds that no longer run left behind.
    Clean,
}

fn herd_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let beside = std::env::current_exe()?
        .parent()
        .context("herd-testbed has no directory")?
        .join("herd");
    Ok(if beside.exists() {
        beside
    } else {
        PathBuf::from("herd")
    })
}

/// Blocks SIGINT and SIGTERM in every thread to come, so that `up` waits for them
/// with `sigwait` and cleans up instead of dying half-way.
fn block_signals() -> Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block()?;
    Ok(set)
}

/// Real guests need an image and the herd-guest inside it. The namespaces have no way
/// out (no DNS, no Debian mirror), so both are made here, once, before any agent
/// starts, and every agent is pointed at them.
fn prepare_guests(config: &mut ClusterConfig) -> Result<()> {
    let real = config.drivers.split(',').any(|d| d == "qemu" || d == "oci");
    if !real
        || config
            .agent_args
            .iter()
            .any(|a| a.starts_with("--image-dir"))
    {
        return Ok(());
    }
    let guest = match std::env::var_os("HERD_GUEST_BINARY") {
        Some(path) => PathBuf::from(path),
        None => {
            eprintln!("building herd-guest...");
            let root = herd_image::workspace_root(env!("CARGO_MANIFEST_DIR"));
            herd_image::guest_binary(&root, true).context("building herd-guest")?
        }
    };
    let images = PathBuf::from("/tmp/herd-testbed/images");
    eprintln!("preparing the guest image in {}...", images.display());
    let status = std::process::Command::new(&config.herd)
        .args(["image", "build", "default", "--data-dir"])
        .arg(&images)
        .env("HERD_GUEST_BINARY", &guest)
        .status()
        .context("running herd image build")?;
    anyhow::ensure!(status.success(), "herd image build failed ({status})");
    config
        .agent_args
        .extend(["--image-dir".into(), images.display().to_string()]);
    config.env.push(("HERD_GUEST_BINARY".into(), guest));
    Ok(())
}

fn up(
    hosts: usize,
    config: impl FnOnce(u8) -> Result<ClusterConfig>,
    signals: &SigSet,
) -> Result<()> {
    eprintln!("making {hosts} hosts...");
    let bed = Testbed::create(hosts)?;
    let slot = bed.slot();
    let config = config(slot)?;
    if config.root.exists() {
        std::fs::remove_dir_all(&config.root)
            .with_context(|| format!("emptying {}", config.root.display()))?;
    }
    std::fs::create_dir_all(&config.root)?;
    eprintln!("starting herd server and {hosts} agents...");
    let cluster = Cluster::start(bed, config)?;
    println!(
        "# testbed slot {slot}: {hosts} hosts, logs in {}",
        cluster.root().display()
    );
    for i in 0..hosts {
        println!(
            "#   host{i}: namespace {}, address {}",
            cluster.bed.ns(i)?,
            cluster.bed.addr(i)?
        );
    }
    println!("export HERD_URL={}", cluster.url);
    println!("export HERD_TOKEN={}", cluster.token);
    println!("export HERD_CA={}", cluster.ca.display());
    println!("# then: herd host ls; herd-testbed cut {slot} 1; herd-testbed heal {slot} 1");
    println!("# Ctrl-C stops every process and removes the network");
    let signal = signals.wait()?;
    eprintln!("{signal:?}: stopping the testbed...");
    drop(cluster);
    eprintln!("done");
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Up {
            hosts,
            drivers,
            herd,
            dir,
            server_args,
            agent_args,
        } => {
            let signals = block_signals()?;
            let herd = herd_binary(herd)?;
            up(
                hosts,
                |slot| {
                    let root = dir
                        .unwrap_or_else(|| PathBuf::from(format!("/tmp/herd-testbed/slot{slot}")));
                    let mut config = ClusterConfig::new(&herd, &root, &drivers);
                    config.server_args = server_args;
                    // Launches that name no type go to the type the hosts have.
                    if !config
                        .server_args
                        .iter()
                        .any(|a| a.starts_with("--default-hypervisor"))
                    {
                        let first = drivers.split(',').next().unwrap_or("qemu");
                        config
                            .server_args
                            .extend(["--default-hypervisor".into(), first.to_owned()]);
                    }
                    config.agent_args = agent_args;
                    prepare_guests(&mut config)?;
                    Ok(config)
                },
                &signals,
            )
        }
        Command::Shape {
            slot,
            host,
            rate_kbit,
            delay_ms,
            loss_pct,
        } => Ok(Testbed::attach(slot)?.shape(
            host,
            Shape {
                rate_kbit,
                delay_ms,
                loss_pct,
            },
        )?),
        Command::Unshape { slot, host } => Ok(Testbed::attach(slot)?.unshape(host)?),
        Command::Cut { slot, host } => Ok(Testbed::attach(slot)?.cut(host)?),
        Command::Heal { slot, host } => Ok(Testbed::attach(slot)?.heal(host)?),
        Command::Clean => {
            let cleaned = net::clean()?;
            if cleaned.is_empty() {
                println!("nothing to clean");
            }
            for (slot, removed) in cleaned {
                println!("slot {slot}: removed {removed} namespaces and bridges");
            }
            Ok(())
        }
    }
}
