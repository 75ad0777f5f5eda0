//! Ending what herd's guests leave behind when their agent is killed: containers
//! outlive their agent (a restarted agent adopts them), so a test or benchmark that
//! ends, or fails, must end its own, and unmount their root filesystems as the agent
//! would have when deleting them.

use std::path::Path;
use std::process::Command;

/// Ends the containers of the oci driver whose state dir is `oci_dir` (an agent's
/// `<data dir>/oci`) and unmounts everything mounted under it.
pub fn end_containers(oci_dir: &Path) {
    let root = oci_dir.join(".runc");
    if let Ok(listed) = Command::new("runc")
        .arg("--root")
        .arg(&root)
        .args(["list", "-q"])
        .output()
    {
        for name in String::from_utf8_lossy(&listed.stdout).lines() {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&root)
                .args(["delete", "-f", name])
                .output();
        }
    }
    let prefix = format!("{}/", oci_dir.display());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|point| point.starts_with(&prefix))
        .collect();
    // The deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
}
