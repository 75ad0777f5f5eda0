//! The configuration line herd-guest reads: the VM's identity, its workload, the clock
//! at launch and its self-management policy, as `herd.*` words (see herd-guest's
//! `cmdline`). A VM gets it on its kernel command line; a container, which shares the
//! host's kernel, in a file.

use base64::Engine;
use herd_proto::wire::{VmId, VmSpec};
use rand::Rng;

/// A fresh secret for a guest's hello: 128 random bits, in hex.
pub fn new_token() -> String {
    let bytes: [u8; 16] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the line says about one guest.
#[derive(Debug, Clone)]
pub struct GuestIdentity<'a> {
    pub id: VmId,
    pub spec: &'a VmSpec,
    pub token: &'a str,
    /// When the VM was created (unix ms); its lifespan counts from it.
    pub born_unix_ms: Option<u64>,
    /// The wall clock at launch.
    pub now_unix_ms: u64,
}

/// ` herd.vm=… herd.token=…`, and the workload: whether to keep running after it, and
/// the command as base64 of a JSON array.
pub fn identity(g: &GuestIdentity<'_>) -> String {
    let mut line = format!(" herd.vm={} herd.token={}", g.id, g.token);
    if g.spec.keep_running {
        line.push_str(" herd.keep=1");
    }
    if !g.spec.command.is_empty() {
        let json = serde_json::to_vec(&g.spec.command).unwrap_or_default();
        let b64 = base64::engine::general_purpose::STANDARD.encode(json);
        line.push_str(&format!(" herd.cmd={b64}"));
    }
    line
}

/// ` herd.now=…`, and the policy if there is one (postcard, then unpadded base64url,
/// which needs no quoting) with what it prices: the memory allocated and the birth.
pub fn clock_and_policy(g: &GuestIdentity<'_>) -> Result<String, String> {
    let mut line = format!(" herd.now={}", g.now_unix_ms);
    if !g.spec.policy.is_empty() {
        let bytes = postcard::to_stdvec(&g.spec.policy).map_err(|e| e.to_string())?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        line.push_str(&format!(
            " herd.policy={b64} herd.mem={}",
            g.spec.memory_mib
        ));
        if let Some(born) = g.born_unix_ms {
            line.push_str(&format!(" herd.born={born}"));
        }
    }
    Ok(line)
}
