//! The OCI runtime configuration (`config.json`) of one container, as a pure function of
//! what the VM spec asks for.
//!
//! A herd container is a system container: its own pid, mount, uts, ipc, network and
//! cgroup namespaces, herd-guest as PID 1, no host devices beyond the harmless pseudo
//! devices the runtime always creates, the capabilities a root init needs to run services
//! and nothing that reaches the host (no SYS_ADMIN, NET_ADMIN, SYS_MODULE, SYS_PTRACE...).
//! The guest channel is the one thing shared with the host: a directory the agent owns,
//! mounted read-only at `/run/herd`, holding the socket the agent listens on and the
//! configuration line. Read-only, so the workload cannot replace the socket or the line.

use serde_json::{json, Value};

/// Where the channel directory appears inside the container.
pub(super) const CHANNEL_MOUNT: &str = "/run/herd";
/// The socket herd-guest connects to, inside the container.
pub(super) const GUEST_SOCKET: &str = "/run/herd/guest.sock";
/// The configuration line, inside the container.
pub(super) const GUEST_CONFIG: &str = "/run/herd/config";
/// The CPU quota period; the quota is `vcpus` periods.
const CPU_PERIOD_US: u64 = 100_000;

const CAPABILITIES: [&str; 11] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
];

/// What one container's configuration is made of.
#[derive(Debug, Clone)]
pub struct BundleSpec<'a> {
    /// The VM's name; becomes the hostname (cut to what a hostname may hold).
    pub name: &'a str,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The cgroup path, relative to each hierarchy's root.
    pub cgroup: &'a str,
    /// The host directory mounted at [`CHANNEL_MOUNT`].
    pub channel_dir: &'a str,
}

/// A hostname from a VM name: lowercase letters, digits and dashes, at most 63, never
/// empty and never starting or ending with a dash.
pub(super) fn hostname(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let trimmed = cleaned.trim_matches('-');
    if trimmed.is_empty() {
        "herd".into()
    } else {
        trimmed.into()
    }
}

/// The cgroup limits of a shape: (CPU quota, CPU period) in µs and memory in bytes.
pub(super) fn limits(vcpus: u32, memory_mib: u64) -> (u64, u64, u64) {
    (
        u64::from(vcpus.max(1)) * CPU_PERIOD_US,
        CPU_PERIOD_US,
        memory_mib.saturating_mul(1024 * 1024),
    )
}

/// The `config.json` of the container.
pub fn config(spec: &BundleSpec<'_>) -> Value {
    let (quota, _, memory) = limits(spec.vcpus, spec.memory_mib);
    let caps: Vec<&str> = CAPABILITIES.to_vec();
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": ["/init"],
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                format!("HERD_GUEST_CHANNEL={GUEST_SOCKET}"),
                format!("HERD_GUEST_CONFIG={GUEST_CONFIG}"),
            ],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "noNewPrivileges": true,
        },
        "root": { "path": "rootfs", "readonly": false },
        "hostname": hostname(spec.name),
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
              "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
              "options": ["nosuid", "noexec", "nodev", "relatime", "ro"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "nodev", "mode=1777"] },
            { "destination": CHANNEL_MOUNT, "type": "bind", "source": spec.channel_dir,
              "options": ["rbind", "ro", "nosuid", "nodev", "noexec"] },
        ],
        "linux": {
            "cgroupsPath": spec.cgroup,
            "resources": {
                "devices": [{ "allow": false, "access": "rwm" }],
                "memory": { "limit": memory },
                "cpu": { "quota": quota, "period": CPU_PERIOD_US },
                "pids": { "limit": 4096 },
            },
            "namespaces": [
                { "type": "pid" }, { "type": "network" }, { "type": "ipc" },
                { "type": "uts" }, { "type": "mount" }, { "type": "cgroup" },
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BundleSpec<'static> {
        BundleSpec {
            name: "Web_1",
            vcpus: 2,
            memory_mib: 256,
            cgroup: "/herd/x",
            channel_dir: "/var/lib/herd/x/chan",
        }
    }

    #[test]
    fn limits_come_from_the_spec() {
        let c = config(&spec());
        let r = &c["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 256u64 * 1024 * 1024);
        assert_eq!(r["cpu"]["quota"], 200_000u64);
        assert_eq!(r["cpu"]["period"], 100_000u64);
        assert_eq!(c["linux"]["cgroupsPath"], "/herd/x");
        assert_eq!(c["hostname"], "web-1");
    }

    #[test]
    fn isolated_from_the_host() {
        let c = config(&spec());
        let namespaces: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .filter_map(|n| n["type"].as_str())
            .collect();
        for ns in ["pid", "network", "ipc", "uts", "mount", "cgroup"] {
            assert!(namespaces.contains(&ns), "{ns}");
        }
        assert_eq!(c["linux"]["resources"]["devices"][0]["allow"], false);
        assert_eq!(c["process"]["noNewPrivileges"], true);
        let caps = c["process"]["capabilities"]["bounding"]
            .as_array()
            .expect("caps");
        for dangerous in [
            "CAP_SYS_ADMIN",
            "CAP_NET_ADMIN",
            "CAP_SYS_MODULE",
            "CAP_SYS_PTRACE",
        ] {
            assert!(!caps.iter().any(|c| c == dangerous), "{dangerous}");
        }
        let channel = c["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["destination"] == CHANNEL_MOUNT)
            .expect("channel mount");
        assert_eq!(channel["source"], "/var/lib/herd/x/chan");
        let options = channel["options"].as_array().expect("options");
        assert!(
            options.iter().any(|o| o == "ro"),
            "the channel is read-only"
        );
    }

    #[test]
    fn hostnames_are_valid() {
        assert_eq!(hostname("--"), "herd");
        assert_eq!(hostname(""), "herd");
        assert_eq!(hostname(&"a".repeat(100)).len(), 63);
        assert_eq!(hostname("db.prod"), "db-prod");
    }

    #[test]
    fn zero_vcpus_still_get_one() {
        let mut s = spec();
        s.vcpus = 0;
        assert_eq!(config(&s)["linux"]["resources"]["cpu"]["quota"], 100_000u64);
    }
}
