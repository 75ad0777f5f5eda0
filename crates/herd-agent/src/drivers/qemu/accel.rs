//! Choosing the accelerator once per driver: KVM only where a guest really boots under
//! it in time. On nested hosts an openable /dev/kvm can be far slower than TCG (a guest
//! under nested KVM here had not booted after 100 s, under TCG it boots in seconds), so
//! the driver proves KVM with a throwaway guest before trusting it.

use super::launch::{self, Accel, LaunchSpec, VmPaths};
use super::{AccelChoice, Inner};
use herd_proto::wire::{VmId, VmSpec};
use std::path::PathBuf;
use std::time::Duration;

impl Inner {
    pub(super) async fn accel(&self) -> (Accel, String) {
        self.accel
            .get_or_init(|| async {
                match self.config.accel {
                    AccelChoice::Force(a) => (a, format!("{} (configured)", a.as_str())),
                    AccelChoice::Auto => self.probe_kvm().await,
                }
            })
            .await
            .clone()
    }

    /// Boots a throwaway guest under KVM and keeps KVM only if it reaches userspace in
    /// time: on nested hosts an openable /dev/kvm can be far slower than TCG
    /// (measured here: a guest under nested KVM had not booted after 100 s; under TCG it
    /// boots in seconds).
    pub(super) async fn probe_kvm(&self) -> (Accel, String) {
        let tcg = |why: String| (Accel::Tcg, format!("tcg ({why})"));
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return tcg("/dev/kvm is not usable".into());
        }
        let Some((kernel, initrd)) = self.any_image() else {
            return tcg("no image to probe KVM with".into());
        };
        let paths = VmPaths {
            dir: self.state_dir.join(".kvm-probe"),
        };
        let _ = std::fs::remove_dir_all(&paths.dir);
        if std::fs::create_dir_all(&paths.dir).is_err() {
            return tcg("cannot create the probe dir".into());
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
            return tcg("cannot build the probe command line".into());
        };
        let started = std::time::Instant::now();
        let child = tokio::process::Command::new(&self.config.qemu_binary)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let Ok(mut child) = child else {
            return tcg("cannot start the probe guest".into());
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
        if reached {
            (
                Accel::Kvm,
                format!(
                    "kvm (a probe guest reached userspace in {} ms)",
                    started.elapsed().as_millis()
                ),
            )
        } else {
            tcg(format!(
                "a KVM probe guest did not reach userspace within {} s; nested or slow KVM",
                deadline.as_secs()
            ))
        }
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
