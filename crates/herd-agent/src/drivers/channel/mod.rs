//! The host end of one guest's channel, for every driver.
//!
//! A driver says how a connection to its guest is made (a [`Link`]): QEMU listens on
//! the VM's `guest.sock` (a virtio-serial port inside the guest) and the agent connects,
//! again whenever the connection ends, for as long as the same QEMU process lives; a
//! container's herd-guest connects to a socket the agent listens on. Either way a
//! restarted agent, or a guest restored from a suspend image, needs nothing but a new
//! connection. This task greets the guest and reads its frames until the connection
//! ends, then asks the link for the next one.
//!
//! Everything read here is untrusted: a guest's workload runs as root and can replace
//! herd-guest on the port, and it can read its own token from the kernel command line.
//! So the channel assumes the worst and holds each guest to limits that outlive a
//! reconnection ([`Guard`]):
//!
//! - Memory: one read buffer and one frame (the decoder refuses a frame over
//!   [`herd_proto::guest::MAX_GUEST_FRAME`] before buffering it).
//! - Bytes: read at most [`BYTES_PER_SEC`] (after a burst); beyond it the agent stops
//!   reading, the port fills and the guest's writes block. A flood costs the host nothing.
//! - Messages: more than [`MSGS_PER_SEC`] (after a burst), an undecodable frame, or a
//!   hello with a wrong id or token drop the connection for a penalty that doubles with
//!   each offence (1 s up to 60 s).
//! - What reaches the server: only after a hello with the VM's token; one hello per
//!   connection; reports that become events (errors, warnings, exits) at most
//!   [`REPORTS_PER_SEC`] after a burst; a policy action or warning only for a rule the
//!   VM's policy has, and an action only the one that rule names; text cut to a bound.
//! - Logs: at most one line per VM every [`LOG_EVERY`], saying how many were held back.
//!
//! The VM a message is about is the VM whose socket it came in on, never what it says.
//! Each VM's channel is its own task, and it takes the driver's lock only to hand over
//! an admitted message, so one guest's flood does not slow another VM or the agent.

mod guard;

use guard::Guard;
pub(crate) use guard::{clamp, policy_allows};

use herd_proto::guest::{encode_frame, FrameDecoder, GuestMsg, HostMsg};
use herd_proto::policy::PolicySpec;
use herd_proto::wire::VmId;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

/// Bytes read per call; also the most a throttled guest gets in ahead of its budget.
const READ_CHUNK: usize = 8 * 1024;
/// Sustained bytes per second read from one guest, and the burst above it.
pub(super) const BYTES_PER_SEC: f64 = 64.0 * 1024.0;
pub(super) const BYTES_BURST: f64 = 512.0 * 1024.0;
/// Sustained messages per second from one guest, and the burst above it. herd-guest sends
/// about one a second, and after a reconnection up to 256 kept reports at once.
pub(super) const MSGS_PER_SEC: f64 = 20.0;
pub(super) const MSGS_BURST: f64 = 300.0;
/// Reports the server turns into events (errors, policy warnings, workload exits).
pub(super) const REPORTS_PER_SEC: f64 = 1.0;
pub(super) const REPORTS_BURST: f64 = 64.0;
/// Policy actions: each rule acts at most once per boot.
pub(super) const ACTIONS_PER_SEC: f64 = 0.1;
pub(super) const ACTIONS_BURST: f64 = 16.0;
/// The first offence's penalty; each further one doubles it, up to the maximum.
pub(super) const FIRST_PENALTY: Duration = Duration::from_secs(1);
pub(super) const MAX_PENALTY: Duration = Duration::from_secs(60);
/// Offences older than this are forgiven.
pub(super) const FORGIVE_AFTER: Duration = Duration::from_secs(300);
/// At most one log line per VM this often.
pub(super) const LOG_EVERY: Duration = Duration::from_secs(10);
/// Waits after a connection ends without an offence.
const RECONNECT: Duration = Duration::from_millis(200);
/// A quiet connection checks this often that its VM is still wanted.
const QUIET: Duration = Duration::from_secs(2);
/// A guest that does not take a frame from us this fast is not reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest free text relayed (error messages, reasons), and names (rules, versions).
pub(super) const MAX_TEXT: usize = 1024;
pub(super) const MAX_NAME: usize = 64;
pub(super) const MAX_PROGRESS_ITEMS: usize = 16;

/// What the channel needs from the driver about the one VM (and process) it serves.
pub(crate) trait GuestHost: Send + Sync {
    /// False once the VM is gone, relaunched, or its process dead.
    fn wanted(&self) -> bool;
    /// Whether a hello names this VM with its token.
    fn check_hello(&self, vm_id: VmId, token: &str) -> bool;
    /// The VM's self-management policy.
    fn policy(&self) -> PolicySpec;
    /// Takes one admitted message.
    fn deliver(&self, msg: GuestMsg);
}

/// A driver's answers about its guests, by VM and launch (a relaunched VM has a new
/// generation, so the channel task of an old process knows it is obsolete).
pub(crate) trait Guests: Send + Sync + 'static {
    /// False once the VM is gone, relaunched, or its process dead.
    fn wanted(&self, id: VmId, generation: u64) -> bool;
    /// Whether a hello names this VM with its token; the first marks the VM as greeted.
    fn check_hello(&self, id: VmId, generation: u64, vm_id: VmId, token: &str) -> bool;
    /// The VM's self-management policy (none if the VM is gone).
    fn policy(&self, id: VmId) -> PolicySpec;
    /// Takes one admitted message from the guest of that launch.
    fn deliver(&self, id: VmId, generation: u64, msg: GuestMsg);
}

/// One VM's launch, as the channel task serving it sees its driver.
pub(crate) struct Guest<G> {
    pub(crate) guests: std::sync::Arc<G>,
    pub(crate) id: VmId,
    pub(crate) generation: u64,
}

impl<G: Guests> GuestHost for Guest<G> {
    fn wanted(&self) -> bool {
        self.guests.wanted(self.id, self.generation)
    }

    fn check_hello(&self, vm_id: VmId, token: &str) -> bool {
        self.guests
            .check_hello(self.id, self.generation, vm_id, token)
    }

    fn policy(&self) -> PolicySpec {
        self.guests.policy(self.id)
    }

    fn deliver(&self, msg: GuestMsg) {
        self.guests.deliver(self.id, self.generation, msg)
    }
}

/// How a driver's guest is reached, one connection at a time.
#[async_trait::async_trait]
pub(crate) trait Link: Send {
    /// The next connection to the guest; `None` once the VM is no longer wanted.
    async fn next(&mut self, host: &(dyn GuestHost + 'static)) -> Option<UnixStream>;
}

/// Connects to a socket the hypervisor listens on (QEMU's chardev).
pub(crate) struct Dial(pub(crate) std::path::PathBuf);

#[async_trait::async_trait]
impl Link for Dial {
    async fn next(&mut self, host: &(dyn GuestHost + 'static)) -> Option<UnixStream> {
        loop {
            if !host.wanted() {
                return None;
            }
            match UnixStream::connect(&self.0).await {
                Ok(stream) => return Some(stream),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Accepts on a socket the agent listens on (a container's herd-guest connects to it).
pub(crate) struct Listen(pub(crate) tokio::net::UnixListener);

#[async_trait::async_trait]
impl Link for Listen {
    async fn next(&mut self, host: &(dyn GuestHost + 'static)) -> Option<UnixStream> {
        loop {
            if !host.wanted() {
                return None;
            }
            if let Ok(Ok((stream, _))) = tokio::time::timeout(QUIET, self.0.accept()).await {
                return Some(stream);
            }
        }
    }
}

/// Serves one guest's connections, one after another, until its link says it is no
/// longer wanted.
pub(crate) async fn run<H: GuestHost + 'static>(
    host: H,
    mut link: impl Link,
    id: VmId,
    mut host_msgs: mpsc::UnboundedReceiver<HostMsg>,
) {
    let mut guard = Guard::new(Instant::now());
    loop {
        let Some(mut stream) = link.next(&host).await else {
            debug!(%id, "guest channel task ends");
            return;
        };
        if !send(&mut stream, &HostMsg::Hello).await {
            tokio::time::sleep(RECONNECT).await;
            continue;
        }
        let penalty = serve(&host, id, &mut stream, &mut host_msgs, &mut guard).await;
        drop(stream);
        tokio::time::sleep(penalty).await;
    }
}

/// Writes one frame; false if the guest did not take it in time.
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, msg: &HostMsg) -> bool {
    let Ok(frame) = encode_frame(msg) else {
        return false;
    };
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&frame)).await,
        Ok(Ok(()))
    )
}

enum Read {
    Data(usize),
    Quiet,
    Closed,
}

/// Reads once, but not before `resume_at` (the byte budget's pace).
async fn read_paced<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    resume_at: Instant,
) -> Read {
    tokio::time::sleep_until(resume_at).await;
    match tokio::time::timeout(QUIET, stream.read(buf)).await {
        Err(_) => Read::Quiet,
        Ok(Ok(0)) | Ok(Err(_)) => Read::Closed,
        Ok(Ok(n)) => Read::Data(n),
    }
}

/// Serves one connection; returns how long to wait before the next one.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    host: &impl GuestHost,
    id: VmId,
    stream: &mut S,
    host_msgs: &mut mpsc::UnboundedReceiver<HostMsg>,
    guard: &mut Guard,
) -> Duration {
    let policy = host.policy();
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut authenticated = false;
    let mut hello_relayed = false;
    let mut resume_at = Instant::now();
    loop {
        tokio::select! {
            read = read_paced(stream, &mut buf, resume_at) => {
                let n = match read {
                    Read::Quiet if host.wanted() => continue,
                    Read::Quiet => return Duration::ZERO,
                    Read::Closed => return RECONNECT,
                    Read::Data(n) => n,
                };
                let now = Instant::now();
                resume_at = now + guard.on_read(n, now);
                let msgs = match decoder.feed::<GuestMsg>(&buf[..n]) {
                    Ok(msgs) => msgs,
                    Err(e) => return guard.offence(id, now, &e.to_string()),
                };
                for msg in msgs {
                    if !guard.messages.take(now) {
                        return guard.offence(id, now, "more messages than allowed");
                    }
                    if let GuestMsg::Hello { vm_id, management_token, .. } = &msg {
                        if !host.check_hello(*vm_id, management_token) {
                            return guard.offence(id, now, "hello with a wrong id or token");
                        }
                        authenticated = true;
                        // The host's clock answers every guest greeting, fresh (a frame
                        // queued before the guest reads its port would be seconds old): a
                        // guest restored from a suspend image, or booted from a
                        // whole-second RTC, sets its clock from it, so its time rules
                        // count the time it spent suspended.
                        let unix_ms = herd_proto::clock::unix_ms();
                        if !send(stream, &HostMsg::Time { unix_ms }).await {
                            return RECONNECT;
                        }
                        // The guest greets at boot and again when greeted; the server
                        // needs to hear it once per connection.
                        if std::mem::replace(&mut hello_relayed, true) {
                            continue;
                        }
                    } else if !authenticated {
                        continue;
                    } else if let Err(why) = guard.admit(&msg, &policy, now) {
                        guard.complain(id, now, why);
                        continue;
                    }
                    host.deliver(clamp(msg));
                }
            }
            Some(msg) = host_msgs.recv() => {
                if !send(stream, &msg).await {
                    return RECONNECT;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
