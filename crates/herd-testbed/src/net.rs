//! The testbed's network, made for real: a slot claimed by a lock file, the slot's
//! leftovers from a run that was killed swept away, the bridge, namespaces and veths
//! made, and all of it removed on drop, processes inside included.
//!
//! A slot's lock (`/run/herd-testbed/slot-<k>.lock`, flock) is held for the testbed's
//! life and released by the kernel when its process ends however it ends, so the next
//! testbed to claim the slot knows that whatever it finds there is garbage.

use crate::plan::{self, Cmd, Plan, Shape, SLOTS};
use crate::TestbedError;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const LOCK_DIR: &str = "/run/herd-testbed";

pub struct Testbed {
    plan: Plan,
    /// The slot's lock when this testbed made the network (and removes it on drop);
    /// none when it only reached a running one ([`Testbed::attach`]).
    owner: Option<Flock<File>>,
}

/// Runs one command; its stderr is the error.
pub(crate) fn run(command: &Cmd) -> Result<String, TestbedError> {
    let Some((program, args)) = command.split_first() else {
        return Err(TestbedError::Plan("empty command".into()));
    };
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| TestbedError::Io {
            what: format!("running {program}"),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(TestbedError::Command {
            command: command.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn run_all(commands: &[Cmd]) -> Result<(), TestbedError> {
    commands.iter().try_for_each(|c| run(c).map(|_| ()))
}

/// Kills every process in `ns` and waits (up to 5 s) until none is left.
fn kill_namespace(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = pids_in(ns);
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The live (not zombie) processes in a namespace.
fn pids_in(ns: &str) -> Vec<i32> {
    let listed = run(&plan::cmd(&["ip", "netns", "pids", ns])).unwrap_or_default();
    listed
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                })
                == Some(false)
        })
        .collect()
}

/// Removes whatever slot `slot` holds: namespaces (and their processes), the bridge.
/// Returns how many objects it removed.
fn sweep(slot: u8) -> usize {
    let mut removed = 0;
    let listed = run(&plan::cmd(&["ip", "netns", "list"])).unwrap_or_default();
    for line in listed.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if plan::is_slot_ns(slot, name) {
            kill_namespace(name);
            if run(&plan::cmd(&["ip", "netns", "delete", name])).is_ok() {
                removed += 1;
            }
        }
    }
    // Pairs whose namespace is gone but not yet cleaned up by the kernel.
    let links = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten();
    for link in links {
        let name = link.file_name().to_string_lossy().into_owned();
        if plan::is_slot_veth(slot, &name)
            && run(&plan::cmd(&["ip", "link", "delete", &name])).is_ok()
        {
            removed += 1;
        }
    }
    let bridge = plan::bridge_name(slot);
    if Path::new("/sys/class/net").join(&bridge).exists()
        && run(&plan::cmd(&["ip", "link", "delete", &bridge])).is_ok()
    {
        removed += 1;
    }
    removed
}

/// Removes what testbeds that are no longer running left behind, in every slot no
/// live testbed holds. Returns the slots it cleaned and how much each held.
pub fn clean() -> Result<Vec<(u8, usize)>, TestbedError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(TestbedError::NotRoot);
    }
    let mut cleaned = Vec::new();
    for slot in 0..SLOTS {
        let path = Path::new(LOCK_DIR).join(format!("slot-{slot}.lock"));
        std::fs::create_dir_all(LOCK_DIR).map_err(|source| TestbedError::Io {
            what: format!("creating {LOCK_DIR}"),
            source,
        })?;
        let file = File::create(&path).map_err(|source| TestbedError::Io {
            what: format!("opening {}", path.display()),
            source,
        })?;
        // A slot whose lock is held belongs to a live testbed: leave it alone.
        if let Ok(_lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            let removed = sweep(slot);
            if removed > 0 {
                cleaned.push((slot, removed));
            }
        }
    }
    Ok(cleaned)
}

/// Claims the first free slot.
fn claim_slot() -> Result<(u8, Flock<File>), TestbedError> {
    std::fs::create_dir_all(LOCK_DIR).map_err(|source| TestbedError::Io {
        what: format!("creating {LOCK_DIR}"),
        source,
    })?;
    for slot in 0..SLOTS {
        let path = Path::new(LOCK_DIR).join(format!("slot-{slot}.lock"));
        let file = File::create(&path).map_err(|source| TestbedError::Io {
            what: format!("opening {}", path.display()),
            source,
        })?;
        if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            return Ok((slot, lock));
        }
    }
    Err(TestbedError::NoSlot(SLOTS))
}

impl Testbed {
    /// Makes `n` hosts on a bridge of their own.
    pub fn create(n: usize) -> Result<Testbed, TestbedError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(TestbedError::NotRoot);
        }
        let (slot, lock) = claim_slot()?;
        sweep(slot);
        let plan = Plan::new(slot, n).map_err(TestbedError::Plan)?;
        let bed = Testbed {
            plan,
            owner: Some(lock),
        };
        // On failure the drop removes whatever part was made.
        run_all(&bed.plan.setup())?;
        Ok(bed)
    }

    /// Reaches the testbed another process runs in `slot` (for `herd-testbed cut`
    /// and the like): its hosts are the slot's namespaces; dropping it removes nothing.
    pub fn attach(slot: u8) -> Result<Testbed, TestbedError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(TestbedError::NotRoot);
        }
        let listed = run(&plan::cmd(&["ip", "netns", "list"]))?;
        let n = listed
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| plan::is_slot_ns(slot, name))
            .count();
        if n == 0 {
            return Err(TestbedError::Plan(format!(
                "slot {slot}: no testbed runs there (`herd-testbed up` prints its slot)"
            )));
        }
        let plan = Plan::new(slot, n).map_err(TestbedError::Plan)?;
        Ok(Testbed { plan, owner: None })
    }

    pub fn slot(&self) -> u8 {
        self.plan.slot
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn len(&self) -> usize {
        self.plan.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plan.hosts.is_empty()
    }

    /// The root namespace's address on the bridge (where a server listens).
    pub fn gateway(&self) -> Ipv4Addr {
        self.plan.gateway
    }

    pub fn addr(&self, i: usize) -> Result<Ipv4Addr, TestbedError> {
        Ok(self.plan.host(i).map_err(TestbedError::Plan)?.addr)
    }

    pub fn ns(&self, i: usize) -> Result<&str, TestbedError> {
        Ok(&self.plan.host(i).map_err(TestbedError::Plan)?.ns)
    }

    /// `program` to run inside host `i`'s network namespace. `nsenter` enters only
    /// that one and execs the program (so the child's pid is the program's);
    /// `ip netns exec` would also mount a sysfs of the namespace's own over /sys,
    /// hiding the cgroup hierarchies that containers are made in.
    pub fn command(&self, i: usize, program: &Path) -> Result<Command, TestbedError> {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.ns(i)?))
            .arg("--")
            .arg(program);
        Ok(command)
    }

    /// Shapes host `i`'s link, both ways. Delay and loss need netem: where the kernel
    /// lacks it this says so and shapes nothing.
    pub fn shape(&self, i: usize, shape: Shape) -> Result<(), TestbedError> {
        if shape.needs_netem() {
            self.netem()?;
        }
        run_all(&self.plan.shape(i, shape).map_err(TestbedError::Plan)?)
    }

    pub fn unshape(&self, i: usize) -> Result<(), TestbedError> {
        // Either end may have no shaping: removing it is then a no-op.
        for command in self.plan.unshape(i).map_err(TestbedError::Plan)? {
            let _ = run(&command);
        }
        Ok(())
    }

    /// Whether this kernel can delay and drop packets (netem); says why not.
    pub fn netem(&self) -> Result<(), TestbedError> {
        let h = self.plan.host(0).map_err(TestbedError::Plan)?;
        let probe = plan::in_ns(
            &h.ns,
            &[
                "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
            ],
        );
        match run(&probe) {
            Ok(_) => {
                let _ = run(&plan::in_ns(
                    &h.ns,
                    &["tc", "qdisc", "del", "dev", "lo", "root"],
                ));
                Ok(())
            }
            Err(e) => Err(TestbedError::Unsupported(format!(
                "delay and loss need the netem qdisc, which this kernel lacks ({e})"
            ))),
        }
    }

    /// Pulls host `i`'s cable: nothing passes either way until [`Testbed::heal`].
    pub fn cut(&self, i: usize) -> Result<(), TestbedError> {
        run(&self.plan.cut(i).map_err(TestbedError::Plan)?).map(|_| ())
    }

    pub fn heal(&self, i: usize) -> Result<(), TestbedError> {
        run(&self.plan.heal(i).map_err(TestbedError::Plan)?).map(|_| ())
    }

    /// Processes running in host `i`'s namespace.
    pub fn pids(&self, i: usize) -> Result<Vec<i32>, TestbedError> {
        Ok(pids_in(self.ns(i)?))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.owner.is_none() {
            return;
        }
        for h in &self.plan.hosts {
            kill_namespace(&h.ns);
        }
        for command in self.plan.teardown() {
            let _ = run(&command);
        }
    }
}
