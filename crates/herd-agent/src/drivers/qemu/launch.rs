//! How a QEMU process for one VM is put together, as pure functions of the VM's files and
//! spec, so the command line is tested without starting anything.
//!
//! QEMU runs with `-daemonize`: the process we spawn forks the real VM process and exits
//! once it is ready, so the VM is never our child. It outlives the agent, is adopted again
//! through its pid file and sockets, and never becomes a zombie of ours (the short-lived
//! parent is waited for).

use crate::drivers::guest_config;
use herd_proto::wire::{VmId, VmSpec};
use std::path::{Path, PathBuf};

/// Longest kernel command line x86 accepts (COMMAND_LINE_SIZE, minus room to spare).
pub const MAX_KERNEL_CMDLINE: usize = 2000;

/// The file in a VM's directory where QEMU writes its pid.
pub const PID_FILE: &str = "qemu.pid";

/// The files of one VM, all inside its own directory.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn new(state_dir: &Path, id: VmId) -> VmPaths {
        VmPaths {
            dir: state_dir.join(id.to_string()),
        }
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join(PID_FILE)
    }
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn guest(&self) -> PathBuf {
        self.dir.join("guest.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// The VM's data disk (qcow2), when its spec asks for one.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn suspend_image(&self) -> PathBuf {
        self.dir.join("suspend.img")
    }
    /// Where an incoming QEMU listens for a live migration's stream.
    pub fn migration_socket(&self) -> PathBuf {
        self.dir.join("migrate-in.sock")
    }
    /// Where the agent listens for an outgoing QEMU's migration stream.
    pub fn outgoing_socket(&self) -> PathBuf {
        self.dir.join("migrate-out.sock")
    }
}

/// Where a QEMU's guest state comes from, when it does not boot.
#[derive(Debug, Clone, Copy)]
pub enum Incoming<'a> {
    /// A suspend image: loaded, then left paused for the driver to continue.
    Image(&'a Path),
    /// A live migration's stream on this unix socket: the guest runs as soon as it is
    /// loaded, which keeps the switch-over short.
    Socket(&'a Path),
}

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Everything the command line depends on.
#[derive(Debug, Clone)]
pub struct LaunchSpec<'a> {
    pub id: VmId,
    pub spec: &'a VmSpec,
    pub token: &'a str,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub accel: Accel,
    pub tsc_khz: Option<u64>,
    /// Load the guest's state instead of booting.
    pub incoming: Option<Incoming<'a>>,
    /// Run QEMU in the foreground instead of daemonizing (accelerator probes).
    pub foreground: bool,
    /// When the VM first booted (unix ms), set at create and kept across stops and
    /// suspends, so the guest's lifespan rules count from the VM's birth, not its boot.
    pub born_unix_ms: Option<u64>,
    /// The wall clock at launch, for a guest that has no clock source of its own.
    pub now_unix_ms: u64,
}

impl LaunchSpec<'_> {
    fn guest(&self) -> guest_config::GuestIdentity<'_> {
        guest_config::GuestIdentity {
            id: self.id,
            spec: self.spec,
            token: self.token,
            born_unix_ms: self.born_unix_ms,
            now_unix_ms: self.now_unix_ms,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LaunchError {
    #[error("the kernel command line would be {0} bytes, over {MAX_KERNEL_CMDLINE}: shorten the workload command")]
    CmdlineTooLong(usize),
    #[error("the kernel command line would be {0} bytes with the VM's policy, over {MAX_KERNEL_CMDLINE}: simplify the policy or shorten the workload command")]
    PolicyTooLarge(usize),
    #[error("the policy does not encode: {0}")]
    BadPolicy(String),
    #[error("path {0} cannot be used in a QEMU option (contains ',')")]
    BadPath(String),
}

/// The kernel command line: console, timer fix, and the guest's identity and workload.
pub fn kernel_cmdline(l: &LaunchSpec<'_>) -> Result<String, LaunchError> {
    // panic=-1 turns a guest panic into a reboot, which -no-reboot turns into an exit that
    // the driver reports as an error instead of a VM that hangs forever.
    let mut line = String::from("console=ttyS0 quiet panic=-1");
    if let Some(khz) = l.tsc_khz {
        // Without it about one TCG boot in ten hangs calibrating the TSC against a
        // nested host's unstable clock; telling the kernel the rate skips calibration.
        line.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let guest = l.guest();
    line.push_str(&guest_config::identity(&guest));
    if line.len() > MAX_KERNEL_CMDLINE {
        return Err(LaunchError::CmdlineTooLong(line.len()));
    }
    line.push_str(&guest_config::clock_and_policy(&guest).map_err(LaunchError::BadPolicy)?);
    if !l.spec.policy.is_empty() && line.len() > MAX_KERNEL_CMDLINE {
        return Err(LaunchError::PolicyTooLarge(line.len()));
    }
    Ok(line)
}

fn opt_path(p: &Path) -> Result<String, LaunchError> {
    let s = p.display().to_string();
    if s.contains(',') {
        return Err(LaunchError::BadPath(s));
    }
    Ok(s)
}

/// QEMU's arguments for one VM.
pub fn qemu_args(paths: &VmPaths, l: &LaunchSpec<'_>) -> Result<Vec<String>, LaunchError> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    let machine = format!("microvm,accel={}", l.accel.as_str());
    let memory = l.spec.memory_mib.max(64).to_string();
    let vcpus = l.spec.vcpus.max(1).to_string();
    let cmdline = kernel_cmdline(l)?;
    let console = format!(
        "file,id=con0,path={},append=on",
        opt_path(&paths.console())?
    );
    let channel = format!(
        "socket,id=ch0,path={},server=on,wait=off",
        opt_path(&paths.guest())?
    );
    let qmp = format!("unix:{},server=on,wait=off", opt_path(&paths.qmp())?);
    let name = format!("herd-{}", l.id);
    push(&[
        "-name",
        &name,
        "-M",
        &machine,
        "-m",
        &memory,
        "-smp",
        &vcpus,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        &opt_path(l.kernel)?,
        "-initrd",
        &opt_path(l.initrd)?,
        "-append",
        &cmdline,
        "-chardev",
        &console,
        "-serial",
        "chardev:con0",
        "-device",
        "virtio-serial-device",
        "-chardev",
        &channel,
        "-device",
        "virtserialport,chardev=ch0,name=herd.0",
        "-qmp",
        &qmp,
    ]);
    if l.spec.disk_mib > 0 {
        // microvm has no PCI: the disk is a virtio-mmio block device, /dev/vda inside.
        let drive = format!(
            "file={},format=qcow2,if=none,id=disk0,cache=writeback,discard=unmap",
            opt_path(&paths.disk())?
        );
        push(&["-drive", &drive, "-device", "virtio-blk-device,drive=disk0"]);
    }
    match l.incoming {
        Some(Incoming::Image(image)) => {
            // -S: stay paused after loading, so the driver decides when the guest runs
            // again.
            let incoming = format!("exec:cat {}", shell_quote(&image.display().to_string()));
            push(&["-S", "-incoming", &incoming]);
        }
        Some(Incoming::Socket(socket)) => {
            let incoming = format!("unix:{}", opt_path(socket)?);
            push(&["-incoming", &incoming]);
        }
        None => {}
    }
    if !l.foreground {
        let pid = opt_path(&paths.pid_file())?;
        push(&["-daemonize", "-pidfile", &pid]);
    }
    Ok(args)
}

/// Quotes a path for the shell QEMU runs `exec:` migration commands with.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The host's TSC frequency in kHz, from the kernel log line or /proc/cpuinfo.
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    tsc_khz_from_cpuinfo(&cpuinfo)
}

pub fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    let khz = (mhz * 1000.0).round() as u64;
    (khz > 0).then_some(khz)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn spec(command: Vec<String>) -> VmSpec {
        VmSpec {
            name: "a".into(),
            hypervisor: "qemu".into(),
            vcpus: 2,
            memory_mib: 256,
            image: "default".into(),
            command,
            policy: Default::default(),
            keep_running: false,
            disk_mib: 0,
            burst: Default::default(),
            seed: None,
        }
    }

    #[test]
    fn command_line_has_identity_timer_and_sockets() {
        let spec = spec(vec!["/bin/echo".into(), "hi".into()]);
        let paths = VmPaths::new(Path::new("/state"), VmId::from_u128(1));
        let l = LaunchSpec {
            id: VmId::from_u128(1),
            spec: &spec,
            token: "tok",
            kernel: Path::new("/img/vmlinuz"),
            initrd: Path::new("/img/initrd"),
            accel: Accel::Tcg,
            tsc_khz: Some(2_000_000),
            incoming: None,
            foreground: false,
            born_unix_ms: Some(1_700_000_000_000),
            now_unix_ms: 1_700_000_100_000,
        };
        let args = qemu_args(&paths, &l).expect("args");
        // No policy, nothing about it on the command line.
        assert!(!args.join(" ").contains("herd.policy"));
        let joined = args.join(" ");
        assert!(joined.contains("-M microvm,accel=tcg"));
        assert!(joined.contains("tsc_early_khz=2000000"));
        assert!(joined.contains("herd.vm=00000000-0000-0000-0000-000000000001 herd.token=tok"));
        assert!(joined.contains("herd.cmd=WyIvYmluL2VjaG8iLCJoaSJd"));
        assert!(joined
            .contains("-daemonize -pidfile /state/00000000-0000-0000-0000-000000000001/qemu.pid"));
        assert!(!joined.contains("-incoming"));
        assert!(!joined.contains("-drive"), "no disk asked for, none given");
        let with_disk = VmSpec {
            disk_mib: 64,
            ..spec.clone()
        };
        let args = qemu_args(
            &paths,
            &LaunchSpec {
                spec: &with_disk,
                ..l.clone()
            },
        )
        .expect("args");
        let joined = args.join(" ");
        assert!(joined.contains(
            "-drive file=/state/00000000-0000-0000-0000-000000000001/disk.qcow2,format=qcow2"
        ));
        assert!(joined.contains("-device virtio-blk-device,drive=disk0"));
        let l = LaunchSpec {
            incoming: Some(Incoming::Image(Path::new("/s/it's.img"))),
            ..l
        };
        let args = qemu_args(&paths, &l).expect("args");
        assert!(args.contains(&"exec:cat '/s/it'\\''s.img'".to_string()));
        assert!(args.contains(&"-S".to_string()));
        let l = LaunchSpec {
            incoming: Some(Incoming::Socket(Path::new("/s/in.sock"))),
            ..l
        };
        let args = qemu_args(&paths, &l).expect("args");
        assert!(args.join(" ").contains("-incoming unix:/s/in.sock"));
        assert!(!args.contains(&"-S".to_string()));
    }

    #[test]
    fn policy_and_birth_travel_on_the_command_line() {
        use herd_proto::policy::*;
        let mut spec = spec(vec![]);
        spec.policy = PolicySpec {
            lifespan: Some(Lifespan {
                max_seconds: Some(6),
                end_at: None,
                enforce: Enforcement {
                    action: PolicyAction::Stop,
                    warn: Some(3),
                },
            }),
            cost_cap: Some(CostCap {
                max_micros: 1_000_000,
                rates: RateCard::default(),
                enforce: Enforcement {
                    action: PolicyAction::Terminate,
                    warn: Some(800),
                },
            }),
            ..Default::default()
        };
        let l = LaunchSpec {
            id: VmId::from_u128(1),
            spec: &spec,
            token: "t",
            kernel: Path::new("/k"),
            initrd: Path::new("/i"),
            accel: Accel::Tcg,
            tsc_khz: None,
            incoming: None,
            foreground: true,
            born_unix_ms: Some(1_700_000_000_123),
            now_unix_ms: 1_700_000_000_456,
        };
        let line = kernel_cmdline(&l).expect("cmdline");
        assert!(line.contains(" herd.born=1700000000123"), "{line}");
        assert!(line.contains(" herd.now=1700000000456"), "{line}");
        assert!(line.contains(" herd.mem=256"), "{line}");
        let b64 = line
            .split(' ')
            .find_map(|w| w.strip_prefix("herd.policy="))
            .expect("policy");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b64)
            .expect("b64");
        let back: PolicySpec = postcard::from_bytes(&bytes).expect("postcard");
        assert_eq!(back, spec.policy);
    }

    #[test]
    fn limits() {
        let spec = spec(vec!["x".repeat(3000)]);
        let l = LaunchSpec {
            id: VmId::from_u128(1),
            spec: &spec,
            token: "t",
            kernel: Path::new("/k"),
            initrd: Path::new("/i"),
            accel: Accel::Tcg,
            tsc_khz: None,
            incoming: None,
            foreground: true,
            born_unix_ms: None,
            now_unix_ms: 0,
        };
        assert!(matches!(
            kernel_cmdline(&l),
            Err(LaunchError::CmdlineTooLong(_))
        ));
        // A command that fits, with a policy that does not.
        let mut spec = spec.clone();
        spec.command = vec!["x".repeat(1400)];
        spec.policy.lifespan = Some(herd_proto::policy::Lifespan {
            max_seconds: Some(60),
            end_at: None,
            enforce: herd_proto::policy::Enforcement {
                action: herd_proto::policy::PolicyAction::Stop,
                warn: None,
            },
        });
        let l = LaunchSpec { spec: &spec, ..l };
        assert!(matches!(
            kernel_cmdline(&l),
            Err(LaunchError::PolicyTooLarge(_))
        ));
        assert_eq!(
            tsc_khz_from_cpuinfo("processor: 0\ncpu MHz\t\t: 1999.9996\n"),
            Some(2_000_000)
        );
        assert_eq!(tsc_khz_from_cpuinfo("nothing"), None);
    }
}
