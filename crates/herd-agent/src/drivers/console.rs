//! What a guest leaves on its console, read back by its driver.
//!
//! herd-guest logs its policy actions to the console too, so when a guest powers itself
//! off with no host connected, the log still says why. The console is the guest's to
//! write, as much as it likes: only its end is read, and only what the guest's policy
//! names is believed.

use crate::driver::DriverError;
use herd_proto::guest::GuestMsg;
use herd_proto::wire::VmId;
use std::path::Path;

/// The last `max_bytes` of the console log in a VM's directory: what `Driver::console`
/// answers. A VM without a directory is not on this host; one without a log has said
/// nothing yet.
pub(crate) fn of_vm(vm_dir: &Path, id: VmId, max_bytes: usize) -> Result<Vec<u8>, DriverError> {
    if !vm_dir.is_dir() {
        return Err(DriverError::NoSuchVm(id));
    }
    match read_tail(&vm_dir.join("console.log"), max_bytes as u64) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(DriverError::io("reading the console log")(e)),
    }
}

/// herd-guest powered the VM off for a Stop or Terminate policy action: it logs that to
/// the console right before the kernel's power-down lines.
pub(crate) fn policy_powered_off(path: &Path) -> bool {
    let text = console_text(path);
    text.lines().rev().take(20).any(|l| {
        l.contains("herd-guest: policy action Stop")
            || l.contains("herd-guest: policy action Terminate")
    })
}

/// The policy action herd-guest logged last, as the report it could not deliver.
pub(crate) fn policy_action_from_console(path: &Path) -> Option<GuestMsg> {
    let text = console_text(path);
    let line = text
        .lines()
        .rev()
        .take(20)
        .find(|l| l.contains("herd-guest: policy action "))?;
    let rest = line.split("herd-guest: policy action ").nth(1)?;
    let (action, rest) = rest.split_once(' ')?;
    let action = match action {
        "Stop" => herd_proto::policy::PolicyAction::Stop,
        "Terminate" => herd_proto::policy::PolicyAction::Terminate,
        "Suspend" => herd_proto::policy::PolicyAction::Suspend,
        _ => herd_proto::policy::PolicyAction::Notify,
    };
    let rest = rest.strip_prefix('(')?;
    let (rule, reason) = rest.split_once("): ")?;
    Some(GuestMsg::PolicyAction {
        rule: rule.to_owned(),
        action,
        reason: format!(
            "{} (read from the console: no host was connected)",
            reason.trim()
        ),
    })
}

/// The end of the console log as text. Only the end: the guest writes the log, as much
/// as it likes, and the agent must not read all of it into memory.
pub(crate) fn console_text(path: &Path) -> String {
    String::from_utf8_lossy(&read_tail(path, 64 * 1024).unwrap_or_default()).into_owned()
}

/// The last `max_bytes` of a file.
pub(crate) fn read_tail(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
    let mut bytes = Vec::with_capacity(len.min(max_bytes) as usize);
    file.take(max_bytes).read_to_end(&mut bytes)?;
    Ok(bytes)
}

pub(crate) fn console_tail(path: &Path) -> String {
    let text = console_text(path);
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(empty)")
        .chars()
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::policy::{Enforcement, Lifespan, PolicyAction, PolicySpec};

    #[test]
    fn only_the_end_of_a_guest_flooded_console_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut text = "x".repeat(1 << 20);
        text.push_str("\nherd-guest: policy action Terminate (lifespan): forged\n");
        std::fs::write(&path, text).expect("write");
        assert_eq!(read_tail(&path, 10).expect("tail"), b"): forged\n");
        assert!(console_text(&path).len() <= 64 * 1024);
        assert!(policy_powered_off(&path));

        // The console is the guest's to write: a Terminate its policy does not name is
        // not believed; the one it names is.
        let claimed = policy_action_from_console(&path).expect("parsed");
        let stop_policy = PolicySpec {
            lifespan: Some(Lifespan {
                max_seconds: Some(1),
                end_at: None,
                enforce: Enforcement {
                    action: PolicyAction::Stop,
                    warn: None,
                },
            }),
            ..PolicySpec::default()
        };
        assert!(!crate::drivers::channel::policy_allows(
            &stop_policy,
            &claimed
        ));
        assert!(!crate::drivers::channel::policy_allows(
            &PolicySpec::default(),
            &claimed
        ));
        let mut terminate_policy = stop_policy;
        if let Some(lifespan) = terminate_policy.lifespan.as_mut() {
            lifespan.enforce.action = PolicyAction::Terminate;
        }
        assert!(crate::drivers::channel::policy_allows(
            &terminate_policy,
            &claimed
        ));
    }
}
