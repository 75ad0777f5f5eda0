//! `herd`: the one binary. `herd up` runs a whole cloud on this machine; `herd server`
//! and `herd agent` run the parts on many; every other subcommand is a client of the
//! REST API.

mod client;
mod config;
mod hosts;
mod images;
mod policy;
mod progress;
mod run;
mod sim;
mod size;
mod table;
mod tenants;
mod vm;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "herd",
    version,
    about = "A self-hosted cloud for virtual machines and system containers"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

/// What `herd` alone prints: the few commands a new user needs first.
const GETTING_STARTED: &str = "\
herd: a self-hosted cloud for virtual machines and system containers

Getting started on this machine:
  herd up                          start a whole cloud here (server + agent)
  herd vm launch web               launch a VM and wait until it runs
  herd vm ls                       list VMs
  herd vm pause web && herd vm resume web
  herd vm console web              the end of its serial console
  herd bill                        what your projects cost this month
  open https://127.0.0.1:7070/     the web interface (log in with your token)

Every command: herd --help; one command: herd vm launch --help.
Shell completions: herd completions bash > /etc/bash_completion.d/herd
";

#[derive(Subcommand)]
enum Command {
    /// Run the server and a local agent in one process: a whole cloud on this machine.
    Up(UpArgs),
    /// Run the management server.
    Server(ServerArgs),
    /// Run the agent of this host.
    Agent(AgentArgs),
    /// Print a completion script for a shell (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Manage VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Inspect hosts and let new ones join.
    #[command(subcommand)]
    Host(HostCommand),
    /// The proximity tree of the hosts that are up: grouped by region, zone and rack
    /// labels, ordered by measured round trips, at most FANOUT children per host.
    Topology {
        /// The host the tree grows from, by id or hostname (default: the first up host).
        #[arg(long)]
        root: Option<String>,
        #[arg(long, default_value_t = 4)]
        fanout: usize,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The live resource map: per hypervisor type and per host, what is allocated,
    /// measured and free.
    Map {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Per-VM charges and the total over a period.
    Bill(BillArgs),
    /// Set or show a project's rate card.
    #[command(subcommand, name = "rate-card")]
    RateCard(RateCardCommand),
    /// Build and list guest images on this machine.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Save the server URL and an API token in the client config.
    Login(tenants::LoginArgs),
    /// Show who the configured token belongs to and their roles.
    Whoami {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Projects (the sub-clouds): quotas and members.
    #[command(subcommand)]
    Project(tenants::ProjectCommand),
    /// Users (cloud admins).
    #[command(subcommand)]
    User(tenants::UserCommand),
    /// Your API tokens.
    #[command(subcommand)]
    Token(tenants::TokenCommand),
    /// The audit log of mutating requests (admins).
    Audit(tenants::AuditArgs),
    /// Run many simulated hosts in this process against a server and measure sync lag,
    /// resync and failure detection (scale runs).
    Sim(Box<sim::SimArgs>),
}

#[derive(Args)]
pub struct BillArgs {
    #[arg(long)]
    pub project: Option<String>,
    /// Start: RFC 3339 or unix seconds (default: 30 days ago).
    #[arg(long)]
    pub from: Option<String>,
    /// End: RFC 3339 or unix seconds (default: now).
    #[arg(long)]
    pub to: Option<String>,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: BillOutput,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BillOutput {
    Table,
    Json,
    Csv,
}

#[derive(Subcommand)]
pub enum RateCardCommand {
    /// Set a project's rate card from a JSON file (`-` for stdin); prices are in
    /// millionths of the currency unit, e.g. {"per_hour": {"peak": 20000, "off_peak": 12000}, ...}.
    Set { project: String, file: PathBuf },
    /// Show a project's rate card.
    Show { project: String },
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build a guest image from Debian's packages (cached; rebuilt when herd-guest changes).
    Build {
        #[arg(default_value = "default")]
        name: String,
        /// Where images are kept (default: herd's data dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// List the guest images on this machine.
    Ls {
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// Which accelerator the qemu driver uses.
#[derive(Clone, Copy, Default, ValueEnum)]
pub enum AccelArg {
    /// KVM if a probe guest proves it fast here, else TCG.
    #[default]
    Auto,
    Tcg,
    Kvm,
}

#[derive(Clone, Copy, Default, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Args)]
pub struct UpArgs {
    /// Where the store, the queues, VM files and images live.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address of the API (HTTPS, with a CA made on first start that the client config
    /// pins).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Serve plain HTTP instead of HTTPS (loopback addresses only).
    #[arg(long)]
    pub insecure_http: bool,
    /// Drivers the local agent may use: qemu, oci, sim (default: qemu, and oci where runc is installed).
    #[arg(long, value_delimiter = ',')]
    pub drivers: Vec<String>,
    /// Where guest images are built and kept (default: the data dir).
    #[arg(long)]
    pub image_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,
    /// With `--accel auto`: probe KVM again, even if the verdict kept from an earlier
    /// start still holds (same kernel, boot, QEMU and CPU).
    #[arg(long)]
    pub reprobe_kvm: bool,
    /// How often the node's utility module (`herd-util`, beside `herd`) samples this
    /// host; 0 runs none.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub util_interval_ms: u64,
}

#[derive(Args)]
pub struct ServerArgs {
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// The URL agents and clients use to reach this server (default: from --listen).
    /// Its host goes into the server's certificate.
    #[arg(long)]
    pub public_url: Option<String>,
    /// Serve plain HTTP instead of HTTPS: agents are then trusted on their tokens alone.
    /// Loopback addresses only.
    #[arg(long)]
    pub insecure_http: bool,
    /// How often agents report state.
    #[arg(long, default_value_t = 1000)]
    pub sync_interval_ms: u64,
    /// How often agents report usage counters.
    #[arg(long, default_value_t = 10_000)]
    pub usage_interval_ms: u64,
    /// A host silent this long is marked down.
    #[arg(long, default_value_t = 10.0)]
    pub host_grace_s: f64,
    /// vCPUs promised per physical CPU.
    #[arg(long, default_value_t = 4.0)]
    pub cpu_overcommit: f64,
    /// Memory promised per byte of physical memory.
    #[arg(long, default_value_t = 1.0)]
    pub memory_overcommit: f64,
    #[arg(long, value_enum, default_value = "spread")]
    pub strategy: StrategyArg,
    /// Hypervisor type for launches that name none.
    #[arg(long, default_value = "qemu")]
    pub default_hypervisor: String,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum StrategyArg {
    Spread,
    Binpack,
}

#[derive(Args)]
pub struct AgentArgs {
    /// The server URL (needed on first start only).
    #[arg(long)]
    pub join: Option<String>,
    /// The one-time join token (needed on first start only).
    #[arg(long)]
    pub token: Option<String>,
    /// SHA-256 fingerprint of the server's CA, for the first join over HTTPS
    /// (`herd host join-token` prints it).
    #[arg(long)]
    pub ca_fingerprint: Option<String>,
    /// The server's CA certificate (PEM file), instead of --ca-fingerprint.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The TCP port other hosts send live migrations to (mTLS with the agents'
    /// certificates); 0 picks a free port each start.
    #[arg(long, default_value_t = 0)]
    pub transfer_port: u16,
    #[arg(long)]
    pub hostname: Option<String>,
    /// A label for this host at join, KEY=VALUE (repeat it): `rack`, `zone` and
    /// `region` place the host in the proximity tree. Later, `herd host label`.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = hosts::parse_label)]
    pub labels: Vec<(String, String)>,
    /// CPUs to offer (default: all of this host's).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory to offer in MiB (default: all of this host's).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Drivers to use: qemu, oci, sim (default: qemu, and oci where runc is installed).
    #[arg(long, value_delimiter = ',')]
    pub drivers: Vec<String>,
    /// Where guest images are built and kept (default: herd's data dir).
    #[arg(long)]
    pub image_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,
    /// With `--accel auto`: probe KVM again, even if the verdict kept from an earlier
    /// start still holds (same kernel, boot, QEMU and CPU).
    #[arg(long)]
    pub reprobe_kvm: bool,
    /// Boot time of simulated VMs.
    #[arg(long, default_value_t = 300)]
    pub sim_boot_ms: u64,
    /// How often the node's utility module (`herd-util`, beside `herd`) samples this
    /// host; 0 runs none.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub util_interval_ms: u64,
}

#[derive(Subcommand)]
pub enum VmCommand {
    /// Launch a VM.
    Launch(Box<LaunchArgs>),
    /// List VMs.
    Ls(ListArgs),
    /// Show one VM.
    Show {
        vm: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Start a stopped VM; waits until it runs.
    Start(ActArgs),
    /// Stop a VM (graceful, then forced); waits until it is stopped.
    Stop(ActArgs),
    /// Pause a running VM in memory; waits until it is paused.
    Pause(ActArgs),
    /// Resume a paused or suspended VM; waits until it runs.
    Resume(ActArgs),
    /// Save a VM to disk and end its process; waits until it is suspended.
    Suspend(ActArgs),
    /// End a VM and free its resources; its record stays. Waits until it is terminated.
    Terminate(ActArgs),
    /// Terminate a VM and delete its record; waits until the record is gone.
    Rm(ActArgs),
    /// Print the end of a VM's serial console.
    Console {
        vm: String,
        /// How many bytes from the end.
        #[arg(long, default_value_t = 65536)]
        bytes: u32,
    },
    /// A VM's event history.
    Events {
        vm: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Move a running VM to another host of its type while it runs (cloud admins).
    Migrate {
        vm: String,
        /// The target host, by id or hostname (default: the scheduler picks one with
        /// room).
        #[arg(long)]
        to: Option<String>,
        /// Return at once instead of following the migration to its end.
        #[arg(long)]
        no_wait: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Spread a VM's snapshot to other hosts of its type down the proximity tree (the VM
    /// is paused only while it is taken); with --start each host starts a copy.
    Broadcast {
        vm: String,
        /// `all`, or KEY=VALUE: the hosts with that label.
        #[arg(long, default_value = "all")]
        to: String,
        /// Each host that receives the snapshot starts a copy of the VM from it.
        #[arg(long)]
        start: bool,
        /// Children per host (1, a chain, reaches one link's rate whatever the number
        /// of hosts).
        #[arg(long, default_value_t = 1)]
        fanout: usize,
        /// Follow it: every host's progress until all are done.
        #[arg(long)]
        watch: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// A VM's broadcasts, newest first, with every host's part.
    Broadcasts {
        vm: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Give a VM new vCPUs or memory: where it is if its host has room, else on a host
    /// of its type that has (it moves there live first), else refused with the reason.
    Resize {
        vm: String,
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        memory: Option<u64>,
        /// Go ahead when the resize restarts the VM (a running qemu VM's shape changes
        /// only at boot); without it such a resize is refused and says so.
        #[arg(long)]
        restart: bool,
        /// With no host having room now, wait for room instead of refusing.
        #[arg(long)]
        wait_for_room: bool,
        /// Return at once instead of following the resize to its end.
        #[arg(long)]
        no_wait: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Give a running VM more CPU and memory than its shape for a while (a burst). Its
    /// host grants it from its own room and takes it back at expiry, with or without
    /// the server; asking again renews or replaces it.
    Burst {
        vm: String,
        /// Extra vCPUs' worth of CPU time.
        #[arg(long, default_value_t = 0)]
        cpu: u32,
        /// Extra memory (`512M`, `1G`).
        #[arg(long, value_parser = size::parse_mib, value_name = "SIZE")]
        memory: Option<u64>,
        /// How long (`90s`, `10m`, `1h`).
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// An action on one VM, and how long to wait for it to be done.
#[derive(Args)]
pub struct ActArgs {
    /// The VM, by id or name.
    pub vm: String,
    /// Return once the request is taken instead of waiting until it is done.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait before leaving the action to finish in the background.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub timeout: std::time::Duration,
}

#[derive(Args)]
pub struct LaunchArgs {
    pub name: String,
    #[arg(long)]
    pub project: Option<String>,
    #[arg(long)]
    pub hypervisor: Option<String>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long)]
    pub memory: Option<u64>,
    #[arg(long)]
    pub image: Option<String>,
    /// A data disk of this size (e.g. 512M, 2G) that the workload finds at /data; it
    /// keeps its content across stop, start and migration and goes with the VM.
    #[arg(long, value_parser = size::parse_mib, value_name = "SIZE")]
    pub disk: Option<u64>,
    /// Return at once instead of waiting for the VM to run.
    #[arg(long)]
    pub no_wait: bool,
    /// Wait while no host has room for the VM, instead of failing after 10 s with the
    /// scheduler's reason (the VM stays pending either way).
    #[arg(long)]
    pub wait_for_room: bool,
    /// Keep the VM up after its workload ends (by default it powers off).
    #[arg(long)]
    pub keep_running: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
    /// The workload to run inside the guest.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Self-management policies, enforced inside the VM even with no server reachable.
/// Durations like `90s`, `15m`, `2h`; times as
/// RFC 3339; actions: notify, suspend, stop, terminate.
#[derive(Args, Default)]
pub struct PolicyArgs {
    /// A job's deadline: if its workload has not finished this long after launch,
    /// --on-deadline acts.
    #[arg(long, help_heading = "Policies")]
    pub deadline: Option<String>,
    /// `duplicate` (a copy on every other host of its type with room) or
    /// `duplicate=N`: copies from a snapshot continue the job; the first to finish is
    /// its result and the others end.
    #[arg(long, default_value = "duplicate", help_heading = "Policies")]
    pub on_deadline: String,
    /// End the VM this long after it first booted.
    #[arg(long, help_heading = "Policies")]
    pub lifespan: Option<String>,
    /// End the VM at this time.
    #[arg(long, help_heading = "Policies")]
    pub end_at: Option<String>,
    #[arg(long, default_value = "terminate", help_heading = "Policies")]
    pub on_lifespan: String,
    /// Act when CPU and network stay below the idle thresholds this long.
    #[arg(long, help_heading = "Policies")]
    pub idle: Option<String>,
    /// Idle means CPU below this percent of the VM's vCPUs.
    #[arg(long, default_value_t = 5.0, help_heading = "Policies")]
    pub idle_cpu: f64,
    /// Idle means network below this many bytes per second.
    #[arg(long, default_value_t = 10_240, help_heading = "Policies")]
    pub idle_net: u64,
    /// No idle verdict this long after boot.
    #[arg(long, default_value = "0s", help_heading = "Policies")]
    pub warmup: String,
    #[arg(long, default_value = "suspend", help_heading = "Policies")]
    pub on_idle: String,
    /// Over-use: CPU above this percent of the VM's vCPUs...
    #[arg(long, help_heading = "Policies")]
    pub overuse_cpu: Option<f64>,
    /// ...or memory above this many MiB...
    #[arg(long, help_heading = "Policies")]
    pub overuse_mem: Option<u64>,
    /// ...or network above this many bytes per second...
    #[arg(long, help_heading = "Policies")]
    pub overuse_net: Option<u64>,
    /// ...for this long.
    #[arg(long, default_value = "60s", help_heading = "Policies")]
    pub overuse_for: String,
    #[arg(long, default_value = "notify", help_heading = "Policies")]
    pub on_overuse: String,
    /// Budget of CPU-seconds.
    #[arg(long, help_heading = "Policies")]
    pub cpu_budget: Option<u64>,
    /// Budget of memory GiB-hours.
    #[arg(long, help_heading = "Policies")]
    pub mem_budget: Option<f64>,
    /// Budget of network bytes.
    #[arg(long, help_heading = "Policies")]
    pub net_budget: Option<u64>,
    #[arg(long, default_value = "stop", help_heading = "Policies")]
    pub on_resource_budget: String,
    /// Cost cap in money, priced by the project's rate card.
    #[arg(long, help_heading = "Policies")]
    pub budget: Option<String>,
    #[arg(long, default_value = "stop", help_heading = "Policies")]
    pub on_budget: String,
    /// Act when the workload completes (task basis).
    #[arg(long, help_heading = "Policies")]
    pub on_complete: Option<String>,
    /// Restart a crashing workload up to this many times, then act.
    #[arg(long, help_heading = "Policies")]
    pub max_restarts: Option<u32>,
    #[arg(long, default_value = "stop", help_heading = "Policies")]
    pub on_errors: String,
    /// Warn this long before a time-based action.
    #[arg(long, help_heading = "Policies")]
    pub warn: Option<String>,
    /// Warn at this percent of a budget or cost cap.
    #[arg(long, default_value_t = 80.0, help_heading = "Policies")]
    pub warn_at: f64,
    /// Start the VM at this time.
    #[arg(long, help_heading = "Policies")]
    pub start_at: Option<String>,
    /// Start the VM once this VM's workload has completed.
    #[arg(long, help_heading = "Policies")]
    pub after: Option<String>,
}

#[derive(Args)]
pub struct ListArgs {
    #[arg(long)]
    pub project: Option<String>,
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Subcommand)]
pub enum HostCommand {
    /// List hosts: the ones up first, then joining, then down, each by name.
    Ls {
        /// Only hosts in this state (up, joining, down).
        #[arg(long)]
        state: Option<String>,
        /// Only hosts that offer this hypervisor type.
        #[arg(long = "type", value_name = "TYPE")]
        kind: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// What a host knows of the others from their status messages: each one's figures,
    /// room and age, stale when it has been silent for two intervals.
    Status {
        /// The host, by id or hostname.
        host: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Set labels (KEY=VALUE) and remove them (KEY-) on a host, and print its labels.
    Label {
        /// The host, by id or hostname.
        host: String,
        /// KEY=VALUE to set, KEY- to remove.
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        changes: Vec<String>,
    },
    /// Create a one-time token and print the command that joins a new host.
    JoinToken {
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        print!("{GETTING_STARTED}");
        return;
    };
    if let Command::Completions { shell } = command {
        use clap::CommandFactory;
        use std::io::Write;
        // Into a buffer first: clap_complete panics on a write error (a closed pipe).
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "herd", &mut script);
        if let Err(e) = std::io::stdout().write_all(&script) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("herd: writing the completion script: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("herd: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Completions { .. } => Ok(()),
            Command::Up(args) => run::up(args).await,
            Command::Server(args) => run::server(args).await,
            Command::Agent(args) => run::agent(args).await,
            Command::Vm(command) => vm::vm(command).await,
            Command::Host(command) => hosts::host(command).await,
            Command::Map { output } => hosts::map(output).await,
            Command::Topology {
                root,
                fanout,
                output,
            } => hosts::topology(root, fanout, output).await,
            Command::Bill(args) => vm::bill(args).await,
            Command::RateCard(command) => vm::rate_card(command).await,
            Command::Login(args) => tenants::login(args).await,
            Command::Whoami { output } => tenants::whoami(output).await,
            Command::Project(command) => tenants::project(command).await,
            Command::User(command) => tenants::user(command).await,
            Command::Token(command) => tenants::token(command).await,
            Command::Audit(args) => tenants::audit(args).await,
            Command::Sim(args) => sim::sim(*args).await,
            Command::Image(ImageCommand::Build { name, data_dir }) => {
                images::build_command(&data_dir.unwrap_or_else(config::default_data_dir), &name)
            }
            Command::Image(ImageCommand::Ls { data_dir, output }) => {
                images::list_command(&data_dir.unwrap_or_else(config::default_data_dir), output)
            }
        }
    });
    if let Err(error) = result {
        let mut message = error.to_string();
        for cause in error.chain().skip(1) {
            message.push_str(": ");
            message.push_str(&cause.to_string());
        }
        eprintln!("herd: {message}");
        std::process::exit(1);
    }
}
