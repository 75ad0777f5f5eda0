//! The guest's configuration, read from the kernel command line.
//!
//! The kernel command line is the one channel the host controls before anything in the
//! guest runs, and it survives a suspend/restore unchanged, so the VM's management id,
//! its token and its workload travel there: `herd.vm=<uuid> herd.token=<tok>
//! herd.cmd=<base64 of a JSON array of strings> herd.keep=1`, and its self-management
//! policy: `herd.policy=<base64url of postcard(PolicySpec)> herd.born=<unix ms of first
//! boot> herd.mem=<MiB allocated>`. A container, which shares the host's kernel and so
//! its command line, reads the same line from a file the agent gives it, with
//! `herd.cpus=<vCPUs>` added (its /proc/stat counts the host's CPUs).

use base64::Engine;
use herd_proto::policy::PolicySpec;
use uuid::Uuid;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("herd.vm is not a UUID: {0}")]
    BadVmId(String),
    #[error("herd.cmd is not base64 of a JSON array of strings: {0}")]
    BadCommand(String),
    #[error("herd.policy is not base64url of a postcard PolicySpec: {0}")]
    BadPolicy(String),
    #[error("{0} is not a number")]
    NotANumber(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    pub vm_id: Uuid,
    pub token: String,
    /// The workload; empty means the default, a shell that stays up.
    pub command: Vec<String>,
    /// Keep the VM running after the workload ends.
    pub keep: bool,
    pub policy: PolicySpec,
    /// When the VM first booted (unix ms), if the host said.
    pub born_unix_ms: Option<u64>,
    /// Memory allocated to the VM, for pricing.
    pub memory_mib: u64,
    /// The host's wall clock when it started the VM (unix ms): a guest with no clock
    /// source of its own, and no host to ask, still knows the time.
    pub host_now_unix_ms: Option<u64>,
    /// The CPUs allocated, where the guest cannot count its own (a container).
    pub cpus: Option<u32>,
}

impl GuestConfig {
    pub fn empty() -> GuestConfig {
        GuestConfig {
            vm_id: Uuid::nil(),
            token: String::new(),
            command: default_command(),
            keep: false,
            policy: PolicySpec::default(),
            born_unix_ms: None,
            memory_mib: 0,
            host_now_unix_ms: None,
            cpus: None,
        }
    }
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
    let mut config = GuestConfig::empty();
    config.command = Vec::new();
    let number = |key: &str, value: &str| {
        value
            .parse::<u64>()
            .map_err(|_| CmdlineError::NotANumber(format!("{key}={value}")))
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
            "herd.policy" => {
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(value)
                    .map_err(|e| CmdlineError::BadPolicy(e.to_string()))?;
                config.policy = postcard::from_bytes(&bytes)
                    .map_err(|e| CmdlineError::BadPolicy(e.to_string()))?;
            }
            "herd.born" => config.born_unix_ms = Some(number(key, value)?),
            "herd.mem" => config.memory_mib = number(key, value)?,
            "herd.now" => config.host_now_unix_ms = Some(number(key, value)?),
            "herd.cpus" => {
                let cpus = number(key, value)?;
                config.cpus = u32::try_from(cpus).ok().filter(|c| *c > 0).or(Some(1));
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
        assert!(c.policy.is_empty());
        assert_eq!(c.born_unix_ms, None);
    }

    #[test]
    fn parses_the_policy() {
        use herd_proto::policy::*;
        let policy = PolicySpec {
            idle: Some(Idle {
                cpu_below_permille: 50,
                net_below_bps: 100,
                for_seconds: 5,
                warmup_seconds: 2,
                enforce: Enforcement {
                    action: PolicyAction::Suspend,
                    warn: None,
                },
            }),
            ..Default::default()
        };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(postcard::to_stdvec(&policy).expect("enc"));
        let c = parse(&format!(
            "herd.policy={b64} herd.born=1700000000000 herd.mem=128"
        ))
        .expect("parse");
        assert_eq!(c.policy, policy);
        assert_eq!(c.born_unix_ms, Some(1_700_000_000_000));
        assert_eq!(c.memory_mib, 128);
        assert_eq!(c.cpus, None);
        assert_eq!(parse("herd.cpus=2").expect("parse").cpus, Some(2));
        assert_eq!(parse("herd.cpus=0").expect("parse").cpus, Some(1));
        assert!(parse("herd.policy=AAAA").is_err());
        assert!(parse("herd.born=x").is_err());
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
