//! The PID 1 side of herd-guest: prepare the system (a VM's; a container's runtime has
//! done it), start the module as a child and reap. A VM's init reaps for ever and leaves
//! a dead module to the host's backstop; a container's init also ends the container
//! when its module exits (it powered off) or the runtime sends SIGTERM.

use crate::{log, run_module, PID_FILE, ROLE_ENV, SHUTDOWN_GRACE};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

/// Starts the module process and records its pid; if it cannot start, this process
/// becomes the module (better one that cannot be killed than none).
fn start_module(container: bool) -> i32 {
    let module = std::process::Command::new("/proc/self/exe")
        .env(ROLE_ENV, "module")
        .spawn();
    let module_pid = match module {
        Ok(child) => child.id() as i32,
        Err(e) => {
            log(format!(
                "cannot start the module process ({e}); running it as PID 1"
            ));
            run_module(true, container)
        }
    };
    if let Err(e) = std::fs::write(PID_FILE, format!("{module_pid}\n")) {
        log(format!("writing {PID_FILE}: {e}"));
    }
    module_pid
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

/// Where the VM's data disk is mounted for the workload.
const DATA_DIR: &str = "/data";

/// Whether a block device holds an ext2/3/4 filesystem (the superblock's magic).
fn has_ext_fs(head: &[u8]) -> bool {
    head.get(1024 + 56..1024 + 58) == Some(&[0x53, 0xef][..])
}

/// Mounts the VM's data disk (virtio-blk, `/dev/vda`) at /data, making a filesystem
/// on it first if it is new (all zeros where a filesystem would start). A disk that
/// holds something else is left alone and said so: reformatting it would destroy it.
fn mount_disk() {
    use nix::mount::{mount, MsFlags};
    use std::io::Read;
    if !Path::new("/sys/block/vda").exists() {
        return;
    }
    // devtmpfs makes the node shortly after the driver sees the disk.
    let device = Path::new("/dev/vda");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !device.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut head = vec![0u8; 64 * 1024];
    if let Err(e) = File::open(device).and_then(|mut f| f.read_exact(&mut head)) {
        log(format!("reading the data disk: {e}"));
        return;
    }
    if !has_ext_fs(&head) {
        if head.iter().any(|&b| b != 0) {
            log("the data disk holds no ext filesystem and is not empty: not mounted");
            return;
        }
        let made = std::process::Command::new("/bin/busybox")
            .args(["mke2fs", "-F", "-L", "herd-data", "-m", "0", "/dev/vda"])
            .status();
        match made {
            Ok(status) if status.success() => log("made a filesystem on the new data disk"),
            Ok(status) => return log(format!("mke2fs on the data disk failed: {status}")),
            Err(e) => return log(format!("cannot run mke2fs: {e}")),
        }
    }
    let _ = std::fs::create_dir_all(DATA_DIR);
    // The kernel's ext4 driver also mounts the ext2 that busybox makes.
    if let Err(e) = mount(
        Some(device),
        DATA_DIR,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    ) {
        log(format!("mounting the data disk at {DATA_DIR}: {e}"));
    }
}

/// PID 1: prepare the system, start the module, reap for ever.
pub(crate) fn run_init() -> ! {
    mount_basics();
    load_modules();
    mount_disk();
    let module_pid = start_module(false);
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == module_pid => log(format!(
                "the module exited with code {code}; the VM is left to the host's backstop"
            )),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid.as_raw() == module_pid => log(format!(
                "the module was killed by {signal}; the VM is left to the host's backstop"
            )),
            Ok(_) => {}
            Err(Errno::ECHILD) => std::thread::sleep(Duration::from_secs(1)),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// PID 1 of a container: start the module, reap, and end the container when the
/// module exits (it powered off) or the runtime asks (SIGTERM).
pub(crate) fn run_container_init() -> ! {
    use nix::sys::signal::SigSet;
    use nix::sys::signalfd::SignalFd;
    let mut mask = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        mask.add(signal);
    }
    // The children start with an empty mask: std::process resets it.
    let signals = mask.thread_block().and_then(|()| SignalFd::new(&mask));
    let module_pid = start_module(true);
    let signals = match signals {
        Ok(signals) => signals,
        Err(e) => {
            log(format!(
                "cannot read signals ({e}): the container ends with its module"
            ));
            container_shutdown(0)
        }
    };
    loop {
        match signals.read_signal() {
            Ok(Some(info))
                if info.ssi_signo == Signal::SIGTERM as u32
                    || info.ssi_signo == Signal::SIGINT as u32 =>
            {
                log("asked to stop: ending every process");
                container_shutdown(128 + info.ssi_signo as i32)
            }
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == module_pid => {
                    container_shutdown(code)
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid.as_raw() == module_pid => log(
                    format!("the module was killed by {signal}; the container is left to the host's backstop"),
                ),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// Ends a container from inside: every process gets SIGTERM, then SIGKILL after a
/// grace, and init exits, which ends the container.
fn container_shutdown(code: i32) -> ! {
    nix::unistd::sync();
    // From PID 1, pid -1 is every other process of the namespace.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let until = Instant::now() + SHUTDOWN_GRACE;
    while Instant::now() < until {
        match waitpid(
            Pid::from_raw(-1),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) {
            Err(Errno::ECHILD) => std::process::exit(code),
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
            _ => {}
        }
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::has_ext_fs;

    #[test]
    fn the_superblock_magic_is_recognised() {
        let mut head = vec![0u8; 4096];
        assert!(!has_ext_fs(&head));
        head[1024 + 56] = 0x53;
        head[1024 + 57] = 0xef;
        assert!(has_ext_fs(&head));
        assert!(!has_ext_fs(&head[..1000]));
    }
}
