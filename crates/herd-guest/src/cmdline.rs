//! The guest's configuration, read from the kernel command line.
//!
//! The kernel command line is the one channel the host controls before anything in the
//! guest runs, and it survives a suspend/restore unchanged, so the VM's management id,
//! its token and its workload travel there: `herd.vm=<uuid> herd.token=<tok>
//! herd.cmd=<base64 of a JSON array of strings> herd.keep=1`.

use base64::Engine;
use uuid::Uuid;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("herd.vm is not a UUID: {0}")]
    BadVmId(String),
    #[error("herd.cmd is not base64 of a JSON array of strings: {0}")]
    BadCommand(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    pub vm_id: Uuid,
    pub token: String,
    /// The workload; empty means the default, a shell that stays up.
    pub command: Vec<String>,
    /// Keep the VM running after the workload ends.
    pub keep: bool,
}

/// The workload used when the VM spec has none: stays up until stopped.
pub fn default_command() -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        "while true; do sleep 3600; done".into(),
    ]
}

pub fn parse(cmdline: &str) -> Result<GuestConfig, CmdlineError> {
    let mut config = GuestConfig {
        vm_id: Uuid::nil(),
        token: String::new(),
        command: Vec::new(),
        keep: false,
    };
    for word in cmdline.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "herd.vm" => {
                config.vm_id =
                    Uuid::parse_str(value).map_err(|_| CmdlineError::BadVmId(value.into()))?
            }
            "herd.token" => config.token = value.into(),
            "herd.keep" => config.keep = value == "1",
            "herd.cmd" => {
                let json = base64::engine::general_purpose::STANDARD
                    .decode(value)
                    .map_err(|e| CmdlineError::BadCommand(e.to_string()))?;
                config.command = serde_json::from_slice(&json)
                    .map_err(|e| CmdlineError::BadCommand(e.to_string()))?;
            }
            _ => {}
        }
    }
    if config.command.is_empty() {
        config.command = default_command();
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_keys_and_ignores_the_rest() {
        let cmd = base64::engine::general_purpose::STANDARD.encode(r#"["/bin/echo","hi there"]"#);
        let line = format!(
            "console=ttyS0 quiet herd.vm=00000000-0000-0000-0000-00000000002a herd.token=abc herd.cmd={cmd} herd.keep=1 noapic\n"
        );
        let c = parse(&line).expect("parse");
        assert_eq!(c.vm_id, Uuid::from_u128(42));
        assert_eq!(c.token, "abc");
        assert_eq!(c.command, vec!["/bin/echo", "hi there"]);
        assert!(c.keep);
    }

    #[test]
    fn defaults_and_errors() {
        let c = parse("console=ttyS0").expect("parse");
        assert_eq!(c.command, default_command());
        assert!(!c.keep);
        assert!(parse("herd.vm=nope").is_err());
        assert!(parse("herd.cmd=!!!").is_err());
    }
}
