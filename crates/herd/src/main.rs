//! `herd`: the one binary. `herd up` runs a whole cloud on this machine; `herd server`
//! and `herd agent` run the parts on many; every other subcommand is a client of the
//! REST API.

mod client;
mod config;
mod images;
mod run;
mod table;
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
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server and a local agent in one process: a whole cloud on this machine.
    Up(UpArgs),
    /// Run the management server.
    Server(ServerArgs),
    /// Run the agent of this host.
    Agent(AgentArgs),
    /// Manage VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Inspect hosts and let new ones join.
    #[command(subcommand)]
    Host(HostCommand),
    /// Build and list guest images on this machine.
    #[command(subcommand)]
    Image(ImageCommand),
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
    /// Address of the API (plain HTTP; keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Drivers the local agent may use: qemu, sim (default: qemu).
    #[arg(long, value_delimiter = ',')]
    pub drivers: Vec<String>,
    /// Where guest images are built and kept (default: the data dir).
    #[arg(long)]
    pub image_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,
}

#[derive(Args)]
pub struct ServerArgs {
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// The URL agents and clients use to reach this server (default: from --listen).
    #[arg(long)]
    pub public_url: Option<String>,
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
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub hostname: Option<String>,
    /// CPUs to offer (default: all of this host's).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory to offer in MiB (default: all of this host's).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Drivers to use: qemu, sim (default: qemu).
    #[arg(long, value_delimiter = ',')]
    pub drivers: Vec<String>,
    /// Where guest images are built and kept (default: herd's data dir).
    #[arg(long)]
    pub image_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,
    /// Boot time of simulated VMs.
    #[arg(long, default_value_t = 300)]
    pub sim_boot_ms: u64,
}

#[derive(Subcommand)]
pub enum VmCommand {
    /// Launch a VM.
    Launch(LaunchArgs),
    /// List VMs.
    Ls(ListArgs),
    /// Show one VM.
    Show {
        vm: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Start a stopped VM.
    Start { vm: String },
    /// Stop a VM (graceful, then forced).
    Stop { vm: String },
    /// Pause a running VM in memory.
    Pause { vm: String },
    /// Resume a paused or suspended VM.
    Resume { vm: String },
    /// Save a VM to disk and end its process.
    Suspend { vm: String },
    /// End a VM and free its resources; its record stays.
    Terminate { vm: String },
    /// Terminate a VM and delete its record.
    Rm { vm: String },
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
    /// Return at once instead of waiting for the VM to run.
    #[arg(long)]
    pub no_wait: bool,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
    /// The workload to run inside the guest.
    #[arg(last = true)]
    pub command: Vec<String>,
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
    /// List hosts.
    Ls {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
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
        match cli.command {
            Command::Up(args) => run::up(args).await,
            Command::Server(args) => run::server(args).await,
            Command::Agent(args) => run::agent(args).await,
            Command::Vm(command) => vm::vm(command).await,
            Command::Host(command) => vm::host(command).await,
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
