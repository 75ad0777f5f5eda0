//! herd-guest: PID 1 of a herd guest image, the VM's self-management module.
//!
//! It prepares the minimal system (proc, sys, devtmpfs, virtio modules), opens the
//! virtio-serial port named `herd.0`, supervises the user's workload, and reports to the
//! agent over that port with the frames of `herd_proto::guest`. It is a static binary so
//! that an image needs nothing but a kernel, this file and busybox.
//!
//! The host side of the port comes and goes (agent restarts, suspend/restore gives a
//! fresh connection), so the guest never assumes a connection: it answers every host
//! `Hello` with its own `Hello` and `Status`, drops messages while nobody listens, and
//! reads again when the host returns. When the workload ends it reports the exit code and
//! powers the VM off, unless `herd.keep=1`.

mod cmdline;
mod stats;

use cmdline::GuestConfig;
use herd_proto::guest::{encode_frame, FrameDecoder, GuestMsg, HostMsg};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PORT_NAME: &str = "herd.0";
const USAGE_EVERY: Duration = Duration::from_secs(3);
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn log(msg: impl AsRef<str>) {
    eprintln!("herd-guest: {}", msg.as_ref());
}

/// State shared by the supervisor, the channel reader and the usage reporter.
struct Shared {
    config: GuestConfig,
    port: Mutex<Option<File>>,
    workload_pid: AtomicI32,
    /// The workload's exit code once it ended; i64::MIN while it runs.
    exit_code: AtomicI64,
    power_off_requested: AtomicBool,
    started: Instant,
}

impl Shared {
    /// Sends one message if the host is listening. Never blocks for long: a guest must not
    /// stall its supervisor because nobody is on the other end of the port.
    fn send(&self, msg: &GuestMsg) {
        let Ok(frame) = encode_frame(msg) else {
            return;
        };
        let Ok(guard) = self.port.lock() else {
            return;
        };
        let Some(port) = guard.as_ref() else {
            return;
        };
        let mut written = 0;
        let deadline = Instant::now() + Duration::from_secs(2);
        while written < frame.len() && Instant::now() < deadline {
            match (&*port).write(&frame[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && written == 0 => {
                    // Nobody is connected (or the host is slow): drop rather than wait.
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLOUT)];
                    let _ = nix::poll::poll(&mut fds, PollTimeout::from(100u16));
                }
                Err(_) => return,
            }
        }
    }

    fn status(&self) -> GuestMsg {
        let code = self.exit_code.load(Ordering::SeqCst);
        GuestMsg::Status {
            uptime_ms: self.started.elapsed().as_millis() as u64,
            workload_running: code == i64::MIN,
            // smaps_rollup, not status: VmRSS lags behind with split RSS counting and
            // reads as 4 kB for a fresh static binary.
            guest_rss_kib: std::fs::read_to_string("/proc/self/smaps_rollup")
                .map(|s| stats::rss_kib(&s))
                .unwrap_or(0),
        }
    }

    fn hello(&self) -> GuestMsg {
        GuestMsg::Hello {
            vm_id: self.config.vm_id,
            management_token: self.config.token.clone(),
            guest_version: VERSION.into(),
        }
    }
}

fn mount_basics() {
    use nix::mount::{mount, MsFlags};
    let mounts: [(&str, &str, &str); 5] = [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
        ("tmpfs", "/run", "tmpfs"),
    ];
    for (source, target, fstype) in mounts {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(
            Some(source),
            target,
            Some(fstype),
            MsFlags::MS_NOSUID,
            None::<&str>,
        ) {
            if e != Errno::EBUSY {
                log(format!("mount {target}: {e}"));
            }
        }
    }
}

/// Loads the modules listed, in dependency order, in /lib/modules/load-order.
fn load_modules() {
    let Ok(order) = std::fs::read_to_string("/lib/modules/load-order") else {
        return;
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new("/lib/modules").join(format!("{name}.ko"));
        let result = File::open(&path).map_err(|e| e.to_string()).and_then(|f| {
            nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty())
                .map_err(|e| e.to_string())
        });
        match result {
            Ok(()) => {}
            Err(e) if e.contains("EEXIST") => {}
            Err(e) => log(format!("loading module {name}: {e}")),
        }
    }
}

/// Finds the device of the virtio-serial port named `herd.0`.
fn find_port(deadline: Duration) -> Option<PathBuf> {
    let until = Instant::now() + deadline;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if name.trim() == PORT_NAME {
                    let dev = Path::new("/dev").join(entry.file_name());
                    if dev.exists() {
                        return Some(dev);
                    }
                }
            }
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads host messages forever; answers greetings, obeys power-off.
fn channel_loop(shared: Arc<Shared>, reader: File) {
    let mut decoder = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    let mut connected = false;
    loop {
        let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
        let revents = match nix::poll::poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) => fds[0].revents().unwrap_or(PollFlags::empty()),
            Err(_) => PollFlags::empty(),
        };
        if revents.contains(PollFlags::POLLHUP) {
            // No host on the other end: whatever was half-read belongs to a dead stream.
            if connected {
                connected = false;
            }
            decoder = FrameDecoder::new();
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if !revents.contains(PollFlags::POLLIN) {
            continue;
        }
        if !connected {
            connected = true;
        }
        let n = match (&reader).read(&mut buf) {
            Ok(0) => {
                decoder = FrameDecoder::new();
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                log(format!("reading the channel: {e}"));
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        match decoder.feed::<HostMsg>(&buf[..n]) {
            Ok(msgs) => {
                for msg in msgs {
                    handle_host_msg(&shared, msg);
                }
            }
            Err(e) => {
                shared.send(&GuestMsg::Error {
                    message: format!("bad frame from host: {e}"),
                });
                decoder = FrameDecoder::new();
            }
        }
    }
}

fn handle_host_msg(shared: &Arc<Shared>, msg: HostMsg) {
    match msg {
        HostMsg::Hello => {
            shared.send(&shared.hello());
            shared.send(&shared.status());
            let code = shared.exit_code.load(Ordering::SeqCst);
            if code != i64::MIN {
                shared.send(&GuestMsg::WorkloadExit { code: code as i32 });
            }
        }
        HostMsg::Ack => {}
        HostMsg::PowerOff => {
            log("power-off requested by the host");
            shared.power_off_requested.store(true, Ordering::SeqCst);
            let pid = shared.workload_pid.load(Ordering::SeqCst);
            if pid > 0 && shared.exit_code.load(Ordering::SeqCst) == i64::MIN {
                let _ = kill(Pid::from_raw(-pid), Signal::SIGTERM);
                // A workload that ignores SIGTERM does not keep the VM up.
                std::thread::spawn(|| {
                    std::thread::sleep(Duration::from_secs(5));
                    power_off();
                });
            } else {
                power_off();
            }
        }
    }
}

fn usage_loop(shared: Arc<Shared>) {
    loop {
        std::thread::sleep(USAGE_EVERY);
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let (net_rx, net_tx) = stats::net_bytes(&read("/proc/net/dev"));
        shared.send(&GuestMsg::Usage {
            cpu_ms: stats::cpu_ms(&read("/proc/stat")),
            mem_kib: stats::mem_kib(&read("/proc/meminfo")),
            net_rx,
            net_tx,
        });
    }
}

fn power_off() -> ! {
    nix::unistd::sync();
    if nix::unistd::getpid().as_raw() == 1 {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
    std::process::exit(0)
}

fn spawn_workload(command: &[String]) -> Result<i32, String> {
    let (program, args) = command.split_first().ok_or("empty workload command")?;
    let child = std::process::Command::new(program)
        .args(args)
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .env("HOME", "/root")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting workload {program}: {e}"))?;
    Ok(child.id() as i32)
}

fn main() {
    let is_init = nix::unistd::getpid().as_raw() == 1;
    if is_init {
        mount_basics();
    }
    log(format!("{VERSION} starting"));
    let raw_cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (config, config_error) = match cmdline::parse(&raw_cmdline) {
        Ok(c) => (c, None),
        Err(e) => (
            cmdline::parse("").unwrap_or(GuestConfig {
                vm_id: uuid::Uuid::nil(),
                token: String::new(),
                command: cmdline::default_command(),
                keep: false,
            }),
            Some(e.to_string()),
        ),
    };
    if is_init {
        load_modules();
    }
    let shared = Arc::new(Shared {
        config,
        port: Mutex::new(None),
        workload_pid: AtomicI32::new(0),
        exit_code: AtomicI64::new(i64::MIN),
        power_off_requested: AtomicBool::new(false),
        started: Instant::now(),
    });

    match find_port(Duration::from_secs(20)) {
        Some(dev) => match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&dev)
            .and_then(|f| Ok((f.try_clone()?, f)))
        {
            Ok((reader, writer)) => {
                if let Ok(mut port) = shared.port.lock() {
                    *port = Some(writer);
                }
                let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
                log(format!(
                    "channel {} open at uptime {}s",
                    dev.display(),
                    uptime.split_whitespace().next().unwrap_or("?")
                ));
                let s = shared.clone();
                std::thread::spawn(move || channel_loop(s, reader));
            }
            Err(e) => log(format!("opening {}: {e}", dev.display())),
        },
        None => log(format!("no virtio-serial port named {PORT_NAME}")),
    }
    // Greet first: if the host is already listening it learns of us without asking.
    shared.send(&shared.hello());
    if let Some(e) = config_error {
        log(&e);
        shared.send(&GuestMsg::Error { message: e });
    }
    {
        let s = shared.clone();
        std::thread::spawn(move || usage_loop(s));
    }

    let workload_pid = match spawn_workload(&shared.config.command) {
        Ok(pid) => pid,
        Err(e) => {
            log(&e);
            shared.send(&GuestMsg::Error { message: e });
            shared.exit_code.store(127, Ordering::SeqCst);
            shared.send(&GuestMsg::WorkloadExit { code: 127 });
            if !shared.config.keep && is_init {
                std::thread::sleep(Duration::from_millis(200));
                power_off();
            }
            -1
        }
    };
    shared.workload_pid.store(workload_pid, Ordering::SeqCst);
    shared.send(&shared.status());

    // As PID 1 we reap every orphan, and notice the workload's end among them.
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == workload_pid => {
                workload_ended(&shared, code, is_init)
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid.as_raw() == workload_pid => {
                workload_ended(&shared, 128 + signal as i32, is_init)
            }
            Ok(_) => {}
            Err(Errno::ECHILD) => {
                if !is_init {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn workload_ended(shared: &Shared, code: i32, is_init: bool) {
    log(format!("workload exited with code {code}"));
    shared.exit_code.store(i64::from(code), Ordering::SeqCst);
    shared.send(&GuestMsg::WorkloadExit { code });
    shared.send(&shared.status());
    if shared.power_off_requested.load(Ordering::SeqCst) || !shared.config.keep {
        if is_init {
            // Give the host a moment to read the exit report before the VM disappears.
            std::thread::sleep(Duration::from_millis(300));
            power_off();
        } else {
            std::process::exit(code);
        }
    }
}
