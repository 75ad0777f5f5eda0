//! Choosing the accelerator once per driver: KVM only where a guest really boots under
//! it in time. On nested hosts an openable /dev/kvm can be far slower than TCG (a guest
//! under nested KVM here had not booted after 100 s, under TCG it boots in seconds), so
//! the driver proves KVM with a throwaway guest before trusting it.
//!
//! The proof costs up to the probe's timeout, and its answer changes only with the host:
//! the verdict is kept in the driver's state dir with what it depends on (kernel, boot,
//! QEMU, CPU) and reused while those hold. The probe guest is this agent's own child and
//! must never outlive it: it runs under `setpriv --pdeathsig KILL`, so the kernel ends
//! it when the agent dies however it dies, and a start first ends any probe an earlier
//! agent on this state dir left (found by its own probe dir on its command line).

use super::launch::{self, Accel, LaunchSpec, VmPaths};
use super::{AccelChoice, Inner};
use crate::drivers::procfs;
use herd_proto::wire::{VmId, VmSpec};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};
use tracing::{info, warn};

/// Where the verdict is kept, in the driver's state dir (a dot name: not a VM's dir).
const VERDICT_FILE: &str = ".kvm-verdict.json";

/// What a KVM probe's answer depends on: the same inputs give the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ProbeInputs {
    pub kernel: String,
    pub boot_id: String,
    pub qemu: String,
    pub cpu: String,
}

impl ProbeInputs {
    async fn of_host(qemu_binary: &Path) -> ProbeInputs {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let qemu = tokio::process::Command::new(qemu_binary)
            .arg("--version")
            .output()
            .await
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_default();
        ProbeInputs {
            kernel: read("/proc/sys/kernel/osrelease"),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            qemu,
            cpu,
        }
    }
}

/// A probe's answer, as kept between starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Verdict {
    pub inputs: ProbeInputs,
    pub kvm: bool,
    /// Why, in words (`a probe guest reached userspace in 812 ms`).
    pub why: String,
    pub probed_at_ms: u64,
}

impl Verdict {
    fn accel(&self) -> Accel {
        if self.kvm {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// The accelerator and the words `herd host ls` shows for it.
    fn describe(&self, reused: bool) -> (Accel, String) {
        let when = humantime::format_rfc3339_seconds(
            UNIX_EPOCH + Duration::from_millis(self.probed_at_ms),
        );
        let accel = self.accel();
        let reuse = if reused {
            ", kept: same kernel, boot, QEMU and CPU"
        } else {
            ""
        };
        (
            accel,
            format!("{} ({}; probed {when}{reuse})", accel.as_str(), self.why),
        )
    }
}

/// The kept verdict if it still holds for `inputs` and no new probe was asked for.
pub(super) fn reusable(
    kept: Option<Verdict>,
    inputs: &ProbeInputs,
    reprobe: bool,
) -> Option<Verdict> {
    kept.filter(|v| !reprobe && v.inputs == *inputs && !inputs.boot_id.is_empty())
}

/// The pids under `proc_root` (normally `/proc`) whose command line runs QEMU with
/// `probe_dir` in it: probe guests of an agent on this state dir that did not end them.
pub(super) fn leftover_probes(proc_root: &Path, probe_dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let marker = probe_dir.to_string_lossy().into_owned();
    let mut pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(proc_root.join(pid.to_string()).join("cmdline")).is_ok_and(|raw| {
                let mut args = raw.split(|b| *b == 0).map(String::from_utf8_lossy);
                args.next().is_some_and(|exe| exe.contains("qemu"))
                    && args.any(|arg| arg.contains(&marker))
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

impl Inner {
    pub(super) async fn accel(&self) -> (Accel, String) {
        self.accel
            .get_or_init(|| async {
                match self.config.accel {
                    AccelChoice::Force(a) => (a, format!("{} (configured)", a.as_str())),
                    AccelChoice::Auto => self.choose_accel().await,
                }
            })
            .await
            .clone()
    }

    fn probe_dir(&self) -> PathBuf {
        self.state_dir.join(".kvm-probe")
    }

    /// Ends the probe guests an earlier agent on this state dir left running.
    fn end_leftover_probes(&self) {
        for pid in leftover_probes(Path::new("/proc"), &self.probe_dir()) {
            warn!(
                pid,
                "ending a KVM probe guest an earlier start left running"
            );
            procfs::signal(pid, nix::sys::signal::Signal::SIGKILL);
            procfs::reap(pid);
        }
    }

    /// The kept verdict while the host is the same, else a new probe (kept for next time).
    async fn choose_accel(&self) -> (Accel, String) {
        self.end_leftover_probes();
        let tcg = |why: String| (Accel::Tcg, format!("tcg ({why})"));
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return tcg("/dev/kvm is not usable".into());
        }
        let inputs = ProbeInputs::of_host(&self.config.qemu_binary).await;
        let file = self.state_dir.join(VERDICT_FILE);
        let kept = crate::persist::load_json::<Verdict>(&file).unwrap_or_else(|e| {
            warn!("{e}; probing KVM again");
            None
        });
        if let Some(verdict) = reusable(kept, &inputs, self.config.reprobe) {
            return verdict.describe(true);
        }
        let Some((kvm, why)) = self.probe_kvm().await else {
            return tcg("no image to probe KVM with".into());
        };
        let verdict = Verdict {
            inputs,
            kvm,
            why,
            probed_at_ms: herd_proto::clock::unix_ms(),
        };
        match serde_json::to_vec_pretty(&verdict) {
            Ok(bytes) => {
                if let Err(e) = crate::persist::write_atomic(&file, &bytes) {
                    warn!("cannot keep the KVM verdict in {}: {e}", file.display());
                }
            }
            Err(e) => warn!("cannot encode the KVM verdict: {e}"),
        }
        info!(kvm, why = %verdict.why, "KVM probed");
        verdict.describe(false)
    }

    /// Boots a throwaway guest under KVM: whether it reached userspace in time, and why
    /// in words; `None` without an image to boot.
    async fn probe_kvm(&self) -> Option<(bool, String)> {
        let (kernel, initrd) = self.any_image()?;
        let paths = VmPaths {
            dir: self.probe_dir(),
        };
        let _ = std::fs::remove_dir_all(&paths.dir);
        if let Err(e) = std::fs::create_dir_all(&paths.dir) {
            return Some((false, format!("cannot create the probe dir: {e}")));
        }
        let spec = VmSpec {
            name: "kvm-probe".into(),
            hypervisor: "qemu".into(),
            vcpus: 1,
            memory_mib: 128,
            image: String::new(),
            command: vec!["/bin/true".into()],
            policy: Default::default(),
            keep_running: false,
            disk_mib: 0,
            burst: Default::default(),
            seed: None,
        };
        let launch = LaunchSpec {
            id: VmId::nil(),
            spec: &spec,
            token: "probe",
            kernel: &kernel,
            initrd: &initrd,
            accel: Accel::Kvm,
            tsc_khz: self.tsc_khz,
            incoming: None,
            foreground: true,
            born_unix_ms: None,
            now_unix_ms: herd_proto::clock::unix_ms(),
        };
        let Ok(args) = launch::qemu_args(&paths, &launch) else {
            return Some((false, "cannot build the probe command line".into()));
        };
        let started = std::time::Instant::now();
        // setpriv (util-linux) asks the kernel to kill the probe when its parent dies.
        let child = tokio::process::Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(&self.config.qemu_binary)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                return Some((
                    false,
                    format!("cannot start the probe guest under setpriv: {e}"),
                ))
            }
        };
        let deadline = self.config.kvm_probe_timeout;
        let mut reached = false;
        while started.elapsed() < deadline {
            let console = std::fs::read_to_string(paths.console()).unwrap_or_default();
            if console.contains("herd-guest: ") {
                reached = true;
                break;
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = child.kill().await;
        let _ = std::fs::remove_dir_all(&paths.dir);
        Some(if reached {
            (
                true,
                format!(
                    "a probe guest reached userspace in {} ms",
                    started.elapsed().as_millis()
                ),
            )
        } else {
            (
                false,
                format!(
                    "a KVM probe guest did not reach userspace within {} s; nested or slow KVM",
                    deadline.as_secs()
                ),
            )
        })
    }

    pub(super) fn any_image(&self) -> Option<(PathBuf, PathBuf)> {
        let mut names: Vec<String> = std::fs::read_dir(&self.config.images_dir)
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort_by_key(|n| (n != "default", n.clone()));
        names.into_iter().find_map(|n| self.image(&n).ok())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn inputs() -> ProbeInputs {
        ProbeInputs {
            kernel: "6.1.0-42-amd64".into(),
            boot_id: "5e0c".into(),
            qemu: "QEMU emulator version 7.2.19".into(),
            cpu: "AMD EPYC".into(),
        }
    }

    fn verdict(kvm: bool) -> Verdict {
        Verdict {
            inputs: inputs(),
            kvm,
            why: "a probe guest reached userspace in 812 ms".into(),
            probed_at_ms: 1_765_000_000_000,
        }
    }

    #[test]
    fn a_verdict_holds_only_for_the_same_host_and_until_a_reprobe() {
        let same = inputs();
        assert_eq!(
            reusable(Some(verdict(true)), &same, false),
            Some(verdict(true))
        );
        assert_eq!(reusable(Some(verdict(true)), &same, true), None);
        assert_eq!(reusable(None, &same, false), None);
        for changed in [
            ProbeInputs {
                kernel: "6.1.0-43-amd64".into(),
                ..inputs()
            },
            ProbeInputs {
                boot_id: "77aa".into(),
                ..inputs()
            },
            ProbeInputs {
                qemu: "QEMU emulator version 8.0".into(),
                ..inputs()
            },
            ProbeInputs {
                cpu: "Intel Xeon".into(),
                ..inputs()
            },
        ] {
            assert_eq!(
                reusable(Some(verdict(false)), &changed, false),
                None,
                "{changed:?}"
            );
        }
        // Without a boot id a reboot could not be told apart: probe every time.
        let unknown = ProbeInputs {
            boot_id: String::new(),
            ..inputs()
        };
        let kept = Verdict {
            inputs: unknown.clone(),
            ..verdict(true)
        };
        assert_eq!(reusable(Some(kept), &unknown, false), None);
    }

    #[test]
    fn the_words_say_what_why_when_and_whether_kept() {
        let (accel, text) = verdict(false).describe(true);
        assert_eq!(accel, Accel::Tcg);
        assert!(text.starts_with("tcg (a probe guest"), "{text}");
        assert!(text.contains("probed 2025-12-06T05:46:40Z"), "{text}");
        assert!(text.contains("kept: same kernel"), "{text}");
        let (accel, text) = verdict(true).describe(false);
        assert_eq!(accel, Accel::Kvm);
        assert!(!text.contains("kept"), "{text}");
    }

    #[test]
    fn leftover_probes_are_found_by_their_own_dir_only() {
        let proc_root = tempfile::tempdir().unwrap();
        let probe = Path::new("/var/lib/herd/agent/qemu/.kvm-probe");
        let write = |pid: &str, args: &[&str]| {
            let dir = proc_root.path().join(pid);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cmdline"), args.join("\0")).unwrap();
        };
        write(
            "101",
            &[
                "qemu-system-x86_64",
                "-serial",
                "file:/var/lib/herd/agent/qemu/.kvm-probe/console.log",
            ],
        );
        // A user's VM, another agent's probe, a non-QEMU naming the dir, a kernel thread.
        write(
            "102",
            &[
                "qemu-system-x86_64",
                "-serial",
                "file:/var/lib/herd/agent/qemu/0190-vm/console.log",
            ],
        );
        write(
            "103",
            &[
                "qemu-system-x86_64",
                "file:/srv/other/qemu/.kvm-probe/console.log",
            ],
        );
        write(
            "104",
            &[
                "tail",
                "-f",
                "/var/lib/herd/agent/qemu/.kvm-probe/console.log",
            ],
        );
        write("105", &[]);
        write(
            "self",
            &["qemu-system-x86_64", "/var/lib/herd/agent/qemu/.kvm-probe"],
        );
        assert_eq!(leftover_probes(proc_root.path(), probe), vec![101]);
        assert!(leftover_probes(Path::new("/nonexistent"), probe).is_empty());
    }
}
