//! herd-guest: PID 1 of a herd guest image, and the VM's self-management module.
//!
//! One static binary, two processes. As PID 1 (**init**) it prepares the minimal system
//! (proc, sys, devtmpfs, virtio modules), starts itself again as the **module** (a child
//! process, `HERD_GUEST_ROLE=module`), writes the module's pid to `/run/herd-guest.pid`
//! and reaps orphans for ever. If the module dies, init neither powers off nor restarts
//! it: a killed module leaves the VM to the agent's host-side backstop (which is what
//! tests of that backstop rely on; PID 1 itself cannot be killed).
//!
//! In a system container (the agent's `oci` driver) the same binary is PID 1 of the
//! container instead, told so by `HERD_GUEST_CHANNEL`: the runtime has mounted /proc,
//! /dev and /sys, so init prepares nothing; the channel is a unix socket the agent
//! listens on, bind-mounted read-only into the container, which the module connects to
//! (and again whenever the agent restarts); the configuration comes from a file beside
//! it, because /proc/cmdline is the host's; "power off" ends init, which ends the
//! container. Init blocks its signals and reads them from a signalfd: PID 1 of a
//! namespace receives only signals it handles, and the runtime's SIGTERM must reach it.
//!
//! The module opens the virtio-serial port named `herd.0`, supervises the user's
//! workload, reports to the agent over that port with the frames of `herd_proto::guest`,
//! and enforces the VM's self-management policy from its own /proc and clock,
//! with nobody else reachable: see [`policy`].
//!
//! The host side of the port comes and goes (agent restarts, suspend/restore gives a
//! fresh connection), so the guest never assumes a connection: it answers every host
//! `Hello` with its own `Hello` and `Status`, keeps the reports that matter in a bounded
//! [`outbox`] while nobody listens, and flushes them after the next `Hello`. When the
//! workload ends it reports the exit code and powers the VM off, unless `herd.keep=1` or
//! a policy rule says otherwise (task basis, restarts on errors).

mod burst;
mod cmdline;
mod init;
mod outbox;
mod policy;
mod stats;

use cmdline::GuestConfig;
use herd_proto::guest::{encode_frame, FrameDecoder, GuestMsg, HostMsg};
use herd_proto::policy::PolicyAction;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use outbox::Outbox;
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
const VERSION: &str = env!("CARGO_PKG_VERSION");
const ROLE_ENV: &str = "HERD_GUEST_ROLE";
const PID_FILE: &str = "/run/herd-guest.pid";
/// Set in a container: the unix socket of the channel.
const CHANNEL_ENV: &str = "HERD_GUEST_CHANNEL";
/// Set in a container: the file holding the configuration line.
const CONFIG_ENV: &str = "HERD_GUEST_CONFIG";
/// How long a container's init waits for its processes to end on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

pub(crate) fn log(msg: impl AsRef<str>) {
    eprintln!("herd-guest: {}", msg.as_ref());
}

/// The writing end of the channel and what waits to be written.
struct Port {
    file: Option<File>,
    outbox: Outbox,
}

/// State shared by the supervisor, the channel reader and the policy monitor.
pub(crate) struct Shared {
    config: GuestConfig,
    port: Mutex<Port>,
    workload_pid: AtomicI32,
    /// The workload's exit code once it ended; i64::MIN while it runs.
    exit_code: AtomicI64,
    power_off_requested: AtomicBool,
    /// A host greeted us on the current connection (cleared when it hangs up).
    host_connected: AtomicBool,
    /// The workload is stopped (SIGSTOP) by a Suspend action nobody carried out.
    frozen: AtomicBool,
    /// A PolicyAction{Suspend} report reached a host.
    suspend_delivered: AtomicBool,
    /// The policy asked for a suspend.
    suspend_requested: AtomicBool,
    /// This process powers the VM off (it runs inside a guest), rather than exiting.
    in_guest: bool,
    /// The guest is a container: powering off is ending init, and the clock is the host's.
    container: bool,
    /// A container's own cgroup, mounted inside it, for its CPU and memory figures.
    pub(crate) cgroup: Option<herd_cgroup::Layout>,
    started: Instant,
    policy: Option<Mutex<policy::Monitor>>,
    /// The host's answer to the workload's ask for a burst.
    bursts: burst::Pending,
}

/// Messages kept for a host that is not there: the ones a later reader needs.
fn worth_keeping(msg: &GuestMsg) -> bool {
    matches!(
        msg,
        GuestMsg::WorkloadExit { .. }
            | GuestMsg::Error { .. }
            | GuestMsg::PolicyWarning { .. }
            | GuestMsg::PolicyAction { .. }
    )
}

/// Writes one whole frame; false if nothing could be written (no host). Never blocks
/// for long: a guest must not stall because nobody is on the other end of the port.
fn write_frame(port: &File, frame: &[u8]) -> bool {
    let mut written = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while written < frame.len() && Instant::now() < deadline {
        match (&*port).write(&frame[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && written == 0 => return false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLOUT)];
                let _ = nix::poll::poll(&mut fds, PollTimeout::from(100u16));
            }
            Err(_) => return false,
        }
    }
    // A frame cut short by the deadline desynchronizes the stream; the host's decoder
    // notices and reconnects, which is all that can be done.
    true
}

impl Shared {
    /// Sends one message, or keeps it for the next host if it is worth keeping.
    pub(crate) fn send(&self, msg: &GuestMsg) {
        let Ok(frame) = encode_frame(msg) else {
            return;
        };
        let is_suspend = matches!(
            msg,
            GuestMsg::PolicyAction {
                action: PolicyAction::Suspend,
                ..
            }
        );
        let Ok(mut guard) = self.port.lock() else {
            return;
        };
        let port = &mut *guard;
        // Order matters: what waits goes first.
        if !port.outbox.is_empty() {
            if let Some(file) = port.file.as_ref() {
                port.outbox.flush(|f| write_frame(file, f));
            }
        }
        let sent = port.outbox.is_empty()
            && port
                .file
                .as_ref()
                .is_some_and(|file| write_frame(file, &frame));
        if sent {
            if is_suspend {
                self.suspend_delivered.store(true, Ordering::SeqCst);
            }
        } else if worth_keeping(msg) {
            port.outbox.push(frame);
        }
    }

    /// Sends what waits in the outbox; says how many were lost to its bound.
    fn flush_outbox(&self) {
        let Ok(mut guard) = self.port.lock() else {
            return;
        };
        let port = &mut *guard;
        let Some(file) = port.file.as_ref() else {
            return;
        };
        let had = port.outbox.len();
        let sent = port.outbox.flush(|f| write_frame(file, f));
        if sent == had && had > 0 {
            // A Suspend action among them reached the host too.
            if self.suspend_requested.load(Ordering::SeqCst) {
                self.suspend_delivered.store(true, Ordering::SeqCst);
            }
        }
        if port.outbox.dropped > 0 && port.outbox.is_empty() {
            let dropped = std::mem::take(&mut port.outbox.dropped);
            if let Ok(frame) = encode_frame(&GuestMsg::Error {
                message: format!("{dropped} reports were dropped while no host was connected"),
            }) {
                write_frame(file, &frame);
            }
        }
    }

    /// Tries for up to `within` to hand every kept report to a host.
    pub(crate) fn flush_best_effort(&self, within: Duration) {
        let until = Instant::now() + within;
        loop {
            self.flush_outbox();
            let empty = self
                .port
                .lock()
                .map(|p| p.outbox.is_empty())
                .unwrap_or(true);
            if empty || Instant::now() >= until {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn rss_kib(pid: &str) -> u64 {
        // smaps_rollup, not status: VmRSS lags behind with split RSS counting and reads
        // as 4 kB for a fresh static binary.
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .map(|s| stats::rss_kib(&s))
            .unwrap_or(0)
    }

    fn status(&self) -> GuestMsg {
        let code = self.exit_code.load(Ordering::SeqCst);
        // The module and, when it is a separate process, init: all of herd-guest.
        let mut rss = Self::rss_kib("self");
        if nix::unistd::getpid().as_raw() != 1 && self.in_guest {
            rss += Self::rss_kib("1");
        }
        GuestMsg::Status {
            uptime_ms: self.started.elapsed().as_millis() as u64,
            workload_running: code == i64::MIN,
            guest_rss_kib: rss,
        }
    }

    fn hello(&self) -> GuestMsg {
        GuestMsg::Hello {
            vm_id: self.config.vm_id,
            management_token: self.config.token.clone(),
            guest_version: VERSION.into(),
        }
    }

    pub(crate) fn workload_state(&self) -> herd_policy::Workload {
        let code = self.exit_code.load(Ordering::SeqCst);
        if self.workload_pid.load(Ordering::SeqCst) == 0 {
            herd_policy::Workload::NotStarted
        } else if code == i64::MIN {
            herd_policy::Workload::Running
        } else {
            herd_policy::Workload::Exited { code: code as i32 }
        }
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the workload's process group.
    pub(crate) fn freeze(&self, freeze: bool) {
        let pid = self.workload_pid.load(Ordering::SeqCst);
        if pid <= 0 {
            return;
        }
        let signal = if freeze {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        let _ = kill(Pid::from_raw(-pid), signal);
        self.frozen.store(freeze, Ordering::SeqCst);
        log(if freeze {
            "workload frozen: a Suspend action and no host to carry it out"
        } else {
            "workload continues"
        });
    }

    pub(crate) fn power_off(&self) -> ! {
        power_off(self.in_guest, self.container)
    }
}

/// A container's channel: connects to the agent's socket, serves the connection until
/// the agent hangs up, and connects again, for ever.
fn socket_loop(shared: Arc<Shared>, path: PathBuf) {
    let mut logged = false;
    loop {
        let stream = match std::os::unix::net::UnixStream::connect(&path) {
            Ok(stream) => stream,
            Err(e) => {
                if !std::mem::replace(&mut logged, true) {
                    log(format!("connecting to {}: {e}; retrying", path.display()));
                }
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        logged = false;
        let files = stream.set_nonblocking(true).and_then(|()| {
            let writer = File::from(std::os::fd::OwnedFd::from(stream.try_clone()?));
            Ok((File::from(std::os::fd::OwnedFd::from(stream)), writer))
        });
        let (reader, writer) = match files {
            Ok(files) => files,
            Err(e) => {
                log(format!("channel socket: {e}"));
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        if let Ok(mut port) = shared.port.lock() {
            port.file = Some(writer);
        }
        shared.send(&shared.hello());
        channel_loop(&shared, &reader, true);
        shared.host_connected.store(false, Ordering::SeqCst);
        if let Ok(mut port) = shared.port.lock() {
            port.file = None;
        }
        std::thread::sleep(Duration::from_millis(100));
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

/// Reads host messages; answers greetings, obeys power-off, sets the clock. A port
/// (`once` false) is read for ever, through hang-ups; a socket until the host hangs up.
fn channel_loop(shared: &Arc<Shared>, reader: &File, once: bool) {
    let mut decoder = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
        let revents = match nix::poll::poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) => fds[0].revents().unwrap_or(PollFlags::empty()),
            Err(_) => PollFlags::empty(),
        };
        if revents.contains(PollFlags::POLLHUP) {
            if once {
                return;
            }
            // No host on the other end: whatever was half-read belongs to a dead stream.
            shared.host_connected.store(false, Ordering::SeqCst);
            decoder = FrameDecoder::new();
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if !revents.contains(PollFlags::POLLIN) {
            continue;
        }
        let n = match (&*reader).read(&mut buf) {
            Ok(0) if once => return,
            Ok(0) => {
                decoder = FrameDecoder::new();
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) if once => return,
            Err(e) => {
                log(format!("reading the channel: {e}"));
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        match decoder.feed::<HostMsg>(&buf[..n]) {
            Ok(msgs) => {
                for msg in msgs {
                    handle_host_msg(shared, msg);
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
            // A host that greets us after it received our Suspend action has suspended
            // and resumed the VM (or chose not to): the workload runs again.
            let unfreeze = shared.frozen.load(Ordering::SeqCst)
                && shared.suspend_delivered.load(Ordering::SeqCst);
            shared.host_connected.store(true, Ordering::SeqCst);
            shared.send(&shared.hello());
            shared.send(&shared.status());
            shared.flush_outbox();
            let code = shared.exit_code.load(Ordering::SeqCst);
            if code != i64::MIN {
                shared.send(&GuestMsg::WorkloadExit { code: code as i32 });
            }
            if unfreeze {
                shared.freeze(false);
            }
        }
        // A container's clock is the host's own.
        HostMsg::Time { unix_ms } if !shared.container => set_clock(unix_ms),
        HostMsg::Time { .. } => {}
        HostMsg::Ack => {}
        HostMsg::Burst { answer } => shared.bursts.answered(answer),
        HostMsg::PowerOff => {
            log("power-off requested by the host");
            shared.power_off_requested.store(true, Ordering::SeqCst);
            let pid = shared.workload_pid.load(Ordering::SeqCst);
            if pid > 0 && shared.exit_code.load(Ordering::SeqCst) == i64::MIN {
                let _ = kill(Pid::from_raw(-pid), Signal::SIGCONT);
                let _ = kill(Pid::from_raw(-pid), Signal::SIGTERM);
                // A workload that ignores SIGTERM does not keep the VM up.
                let (in_guest, container) = (shared.in_guest, shared.container);
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(5));
                    power_off(in_guest, container);
                });
            } else {
                shared.power_off();
            }
        }
    }
}

/// Sets the guest's wall clock from the host's, when they differ by more than a little.
fn set_clock(unix_ms: u64) {
    let now = policy::unix_ms();
    if now.abs_diff(unix_ms) < 50 {
        return;
    }
    let ts = nix::sys::time::TimeSpec::new(
        (unix_ms / 1000) as i64,
        ((unix_ms % 1000) * 1_000_000) as i64,
    );
    match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
        Ok(()) => log(format!(
            "clock set from the host (the guest was {} ms {})",
            now.abs_diff(unix_ms),
            if unix_ms > now { "behind" } else { "ahead" }
        )),
        Err(e) => log(format!("setting the clock: {e}")),
    }
}

fn power_off(in_guest: bool, container: bool) -> ! {
    nix::unistd::sync();
    // A container's init ends the container when this process exits.
    if in_guest && !container {
        // Any root process may power the machine off, not only PID 1.
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
    std::process::exit(0)
}

fn spawn_workload(command: &[String]) -> Result<i32, String> {
    let (program, args) = command.split_first().ok_or("empty workload command")?;
    let child = std::process::Command::new(program)
        .args(args)
        .env_remove(ROLE_ENV)
        .env_remove(CHANNEL_ENV)
        .env_remove(CONFIG_ENV)
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "burst") {
        burst::client(&args[1..]);
    }
    let pid = nix::unistd::getpid().as_raw();
    let container = std::env::var_os(CHANNEL_ENV).is_some();
    if pid == 1 && container {
        init::run_container_init();
    }
    if pid == 1 {
        init::run_init();
    }
    let in_guest = std::env::var(ROLE_ENV).is_ok_and(|r| r == "module");
    run_module(in_guest, container);
}

pub(crate) fn run_module(in_guest: bool, container: bool) -> ! {
    log(format!("{VERSION} starting"));
    let raw_cmdline = if container {
        let path = std::env::var(CONFIG_ENV).unwrap_or_else(|_| "/run/herd/config".into());
        std::fs::read_to_string(&path).unwrap_or_else(|e| {
            log(format!("reading {path}: {e}"));
            String::new()
        })
    } else {
        std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
    };
    let (config, config_error) = match cmdline::parse(&raw_cmdline) {
        Ok(c) => (c, None),
        Err(e) => (GuestConfig::empty(), Some(e.to_string())),
    };
    // Without a clock source (no RTC on microvm) the guest would think it is 1970 until
    // a host tells it the time; a lifespan must hold with no host, so start from the
    // host's clock at launch plus the time since boot.
    if let Some(host_now) = config.host_now_unix_ms.filter(|_| !container) {
        let uptime_ms = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|u| u.parse::<f64>().ok())
            })
            .map(|s| (s * 1000.0) as u64)
            .unwrap_or(0);
        let estimate = host_now.saturating_add(uptime_ms);
        if policy::unix_ms().saturating_add(1000) < estimate {
            set_clock(estimate);
        }
    }
    let monitor = (!config.policy.is_empty()).then(|| Mutex::new(policy::Monitor::new(&config)));
    let shared = Arc::new(Shared {
        config,
        port: Mutex::new(Port {
            file: None,
            outbox: Outbox::default(),
        }),
        workload_pid: AtomicI32::new(0),
        exit_code: AtomicI64::new(i64::MIN),
        power_off_requested: AtomicBool::new(false),
        host_connected: AtomicBool::new(false),
        frozen: AtomicBool::new(false),
        suspend_delivered: AtomicBool::new(false),
        suspend_requested: AtomicBool::new(false),
        in_guest,
        container,
        cgroup: container.then(herd_cgroup::Layout::detect).flatten(),
        started: Instant::now(),
        policy: monitor,
        bursts: burst::Pending::default(),
    });

    if let Some(path) = std::env::var_os(CHANNEL_ENV).filter(|_| container) {
        let s = shared.clone();
        std::thread::spawn(move || socket_loop(s, PathBuf::from(path)));
    } else {
        open_port(&shared);
    }
    // Greet first: if the host is already listening it learns of us without asking.
    shared.send(&shared.hello());
    if let Some(e) = config_error {
        log(&e);
        shared.send(&GuestMsg::Error { message: e });
    }
    {
        let s = shared.clone();
        std::thread::spawn(move || policy::monitor_loop(s));
    }
    {
        let s = shared.clone();
        std::thread::spawn(move || burst::serve(s));
    }

    start_workload(&shared);
    shared.send(&shared.status());

    // Wait for the workload (and, as PID 1, reap every orphan).
    loop {
        let workload_pid = shared.workload_pid.load(Ordering::SeqCst);
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == workload_pid => {
                workload_ended(&shared, code)
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid.as_raw() == workload_pid => {
                workload_ended(&shared, 128 + signal as i32)
            }
            Ok(_) => {}
            Err(Errno::ECHILD) => {
                if !shared.in_guest {
                    std::process::exit(0);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A VM's channel: the virtio-serial port, opened once and read for ever.
fn open_port(shared: &Arc<Shared>) {
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
                    port.file = Some(writer);
                }
                let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
                log(format!(
                    "channel {} open at uptime {}s",
                    dev.display(),
                    uptime.split_whitespace().next().unwrap_or("?")
                ));
                let s = shared.clone();
                std::thread::spawn(move || channel_loop(&s, &reader, false));
            }
            Err(e) => log(format!("opening {}: {e}", dev.display())),
        },
        None => log(format!("no virtio-serial port named {PORT_NAME}")),
    }
}

/// Starts (or restarts) the workload; a workload that cannot start counts as exit 127.
fn start_workload(shared: &Arc<Shared>) {
    match spawn_workload(&shared.config.command) {
        Ok(pid) => {
            shared.exit_code.store(i64::MIN, Ordering::SeqCst);
            shared.workload_pid.store(pid, Ordering::SeqCst);
        }
        Err(e) => {
            log(&e);
            shared.send(&GuestMsg::Error { message: e });
            shared.workload_pid.store(-1, Ordering::SeqCst);
            workload_ended(shared, 127);
        }
    }
}

fn workload_ended(shared: &Arc<Shared>, code: i32) {
    log(format!("workload exited with code {code}"));
    shared.exit_code.store(i64::from(code), Ordering::SeqCst);
    shared.send(&GuestMsg::WorkloadExit { code });
    shared.send(&shared.status());
    if shared.power_off_requested.load(Ordering::SeqCst) {
        finish(shared, code);
    }
    match policy::on_workload_exit(shared, code) {
        policy::AfterExit::Restart => {
            std::thread::sleep(policy::RESTART_BACKOFF);
            log("restarting the workload (errors policy)");
            start_workload(shared);
        }
        policy::AfterExit::Stay => {}
        policy::AfterExit::Default => {
            if !shared.config.keep {
                finish(shared, code);
            }
        }
    }
}

fn finish(shared: &Shared, code: i32) {
    if shared.in_guest {
        // Give the host a moment to read the exit report before the VM disappears.
        shared.flush_best_effort(Duration::from_millis(500));
        std::thread::sleep(Duration::from_millis(300));
        shared.power_off();
    } else {
        std::process::exit(code);
    }
}
