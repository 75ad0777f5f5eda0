//! The host end of one VM's guest channel.
//!
//! QEMU listens on the VM's `guest.sock` (a virtio-serial port inside the guest); this
//! task connects, greets the guest, and reads its frames until the connection ends, then
//! connects again for as long as the same QEMU process lives. Connecting from the agent
//! side means a restarted agent, or a QEMU restored from a suspend image, needs nothing
//! but a new connection.
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

use super::Inner;
use herd_policy::Rule;
use herd_proto::guest::{encode_frame, FrameDecoder, GuestMsg, HostMsg};
use herd_proto::policy::{Enforcement, PolicySpec};
use herd_proto::wire::VmId;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Bytes read per call; also the most a throttled guest gets in ahead of its budget.
const READ_CHUNK: usize = 8 * 1024;
/// Sustained bytes per second read from one guest, and the burst above it.
const BYTES_PER_SEC: f64 = 64.0 * 1024.0;
const BYTES_BURST: f64 = 512.0 * 1024.0;
/// Sustained messages per second from one guest, and the burst above it. herd-guest sends
/// about one a second, and after a reconnection up to 256 kept reports at once.
const MSGS_PER_SEC: f64 = 20.0;
const MSGS_BURST: f64 = 300.0;
/// Reports the server turns into events (errors, policy warnings, workload exits).
const REPORTS_PER_SEC: f64 = 1.0;
const REPORTS_BURST: f64 = 64.0;
/// Policy actions: each rule acts at most once per boot.
const ACTIONS_PER_SEC: f64 = 0.1;
const ACTIONS_BURST: f64 = 16.0;
/// The first offence's penalty; each further one doubles it, up to the maximum.
const FIRST_PENALTY: Duration = Duration::from_secs(1);
const MAX_PENALTY: Duration = Duration::from_secs(60);
/// Offences older than this are forgiven.
const FORGIVE_AFTER: Duration = Duration::from_secs(300);
/// At most one log line per VM this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Waits after a connection ends without an offence.
const RECONNECT: Duration = Duration::from_millis(200);
/// A quiet connection checks this often that its VM is still wanted.
const QUIET: Duration = Duration::from_secs(2);
/// A guest that does not take a frame from us this fast is not reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest free text relayed (error messages, reasons), and names (rules, versions).
const MAX_TEXT: usize = 1024;
const MAX_NAME: usize = 64;
const MAX_PROGRESS_ITEMS: usize = 16;

/// What the channel needs from the driver about the one VM (and QEMU) it serves.
pub(super) trait GuestHost: Send + Sync {
    /// False once the VM is gone, relaunched, or its QEMU dead.
    fn wanted(&self) -> bool;
    /// Whether a hello names this VM with its token.
    fn check_hello(&self, vm_id: VmId, token: &str) -> bool;
    /// The VM's self-management policy.
    fn policy(&self) -> PolicySpec;
    /// Takes one admitted message.
    fn deliver(&self, msg: GuestMsg);
}

/// The qemu driver's side of one VM's channel.
struct QemuGuest {
    inner: Arc<Inner>,
    id: VmId,
    generation: u64,
}

impl GuestHost for QemuGuest {
    fn wanted(&self) -> bool {
        self.inner
            .channel_target(self.id, self.generation)
            .is_some()
    }

    fn check_hello(&self, vm_id: VmId, token: &str) -> bool {
        self.inner
            .check_hello(self.id, self.generation, vm_id, token)
    }

    fn policy(&self) -> PolicySpec {
        self.inner.guest_policy(self.id)
    }

    fn deliver(&self, msg: GuestMsg) {
        self.inner.guest_message(self.id, self.generation, msg)
    }
}

pub(super) async fn run(
    inner: Arc<Inner>,
    id: VmId,
    generation: u64,
    mut host_msgs: mpsc::UnboundedReceiver<HostMsg>,
) {
    let host = QemuGuest {
        inner: inner.clone(),
        id,
        generation,
    };
    let mut guard = Guard::new(Instant::now());
    loop {
        let Some(path) = inner.channel_target(id, generation) else {
            debug!(%id, generation, "guest channel task ends");
            return;
        };
        let mut stream = match UnixStream::connect(&path).await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
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

/// A token bucket: `burst` tokens, refilled at `per_sec`.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    at: Instant,
}

impl Bucket {
    fn new(burst: f64, per_sec: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            burst,
            per_sec,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.at = self.at.max(now);
    }

    /// Takes one token if there is one.
    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, into debt if need be; returns how long until the debt is paid.
    fn charge(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_sec)
        }
    }
}

/// One guest's budgets, offences and log allowance; kept across its connections, so
/// reconnecting buys a guest nothing.
#[derive(Debug)]
pub(super) struct Guard {
    bytes: Bucket,
    messages: Bucket,
    reports: Bucket,
    actions: Bucket,
    strikes: u32,
    last_strike: Option<Instant>,
    last_log: Option<Instant>,
    /// Log lines held back since the last one written.
    held_back: u64,
    /// Totals, for the log.
    bytes_read: u64,
    dropped: u64,
    lines_logged: u64,
}

impl Guard {
    fn new(now: Instant) -> Guard {
        Guard {
            bytes: Bucket::new(BYTES_BURST, BYTES_PER_SEC, now),
            messages: Bucket::new(MSGS_BURST, MSGS_PER_SEC, now),
            reports: Bucket::new(REPORTS_BURST, REPORTS_PER_SEC, now),
            actions: Bucket::new(ACTIONS_BURST, ACTIONS_PER_SEC, now),
            strikes: 0,
            last_strike: None,
            last_log: None,
            held_back: 0,
            bytes_read: 0,
            dropped: 0,
            lines_logged: 0,
        }
    }

    /// Counts `n` bytes read; returns how long to wait before reading again.
    fn on_read(&mut self, n: usize, now: Instant) -> Duration {
        self.bytes_read += n as u64;
        self.bytes.charge(n as f64, now)
    }

    /// Counts an offence (which ends the connection); returns the penalty.
    fn strike(&mut self, now: Instant) -> Duration {
        if self
            .last_strike
            .is_some_and(|at| now.saturating_duration_since(at) >= FORGIVE_AFTER)
        {
            self.strikes = 0;
        }
        self.last_strike = Some(now);
        self.strikes = self.strikes.saturating_add(1);
        FIRST_PENALTY
            .saturating_mul(1 << (self.strikes - 1).min(16))
            .min(MAX_PENALTY)
    }

    /// Counts an offence, logs it (within the allowance) and returns the penalty.
    fn offence(&mut self, id: VmId, now: Instant, what: &str) -> Duration {
        let penalty = self.strike(now);
        self.complain(
            id,
            now,
            &format!(
                "{what}; dropping the channel for {} s (offence {})",
                penalty.as_secs(),
                self.strikes
            ),
        );
        penalty
    }

    /// Logs a line about this guest unless one was logged within [`LOG_EVERY`].
    fn complain(&mut self, id: VmId, now: Instant, what: &str) {
        if self
            .last_log
            .is_some_and(|at| now.saturating_duration_since(at) < LOG_EVERY)
        {
            self.held_back += 1;
            return;
        }
        self.last_log = Some(now);
        self.lines_logged += 1;
        // Taken outside the macro: its fields are not evaluated when the level is off.
        let held_back = std::mem::take(&mut self.held_back);
        warn!(
            %id,
            held_back,
            bytes_read = self.bytes_read,
            dropped = self.dropped,
            "guest channel: {what}"
        );
    }

    /// Whether an authenticated guest's message (not a hello) may go on, or why not.
    fn admit(
        &mut self,
        msg: &GuestMsg,
        policy: &PolicySpec,
        now: Instant,
    ) -> Result<(), &'static str> {
        let verdict = match msg {
            GuestMsg::Hello { .. }
            | GuestMsg::Status { .. }
            | GuestMsg::Usage { .. }
            | GuestMsg::PolicyProgress { .. } => Ok(()),
            GuestMsg::PolicyAction { .. } if !policy_allows(policy, msg) => {
                Err("a policy action its policy does not allow")
            }
            GuestMsg::PolicyAction { .. } => {
                if self.actions.take(now) {
                    Ok(())
                } else {
                    Err("more policy actions than allowed; dropping them")
                }
            }
            GuestMsg::PolicyWarning { rule, .. } if enforcement(policy, rule).is_none() => {
                Err("a policy warning for a rule its policy does not have")
            }
            GuestMsg::PolicyWarning { .. }
            | GuestMsg::Error { .. }
            | GuestMsg::WorkloadExit { .. } => {
                if self.reports.take(now) {
                    Ok(())
                } else {
                    Err("more reports than allowed; dropping them")
                }
            }
        };
        if verdict.is_err() {
            self.dropped += 1;
        }
        verdict
    }
}

/// Whether a policy action is the one the VM's policy names for that rule (anything else
/// is not a policy action).
pub(super) fn policy_allows(policy: &PolicySpec, msg: &GuestMsg) -> bool {
    match msg {
        GuestMsg::PolicyAction { rule, action, .. } => {
            enforcement(policy, rule).is_some_and(|e| e.action == *action)
        }
        _ => true,
    }
}

/// The enforcement the VM's policy gives the rule named `rule`, if it has that rule.
fn enforcement(policy: &PolicySpec, rule: &str) -> Option<Enforcement> {
    const RULES: [Rule; 7] = [
        Rule::Lifespan,
        Rule::Task,
        Rule::Idle,
        Rule::Overuse,
        Rule::Budget,
        Rule::CostCap,
        Rule::Errors,
    ];
    let rule = RULES.into_iter().find(|r| r.as_str() == rule)?;
    match rule {
        Rule::Lifespan => policy.lifespan.map(|r| r.enforce),
        Rule::Task => policy.task.map(|r| r.enforce),
        Rule::Idle => policy.idle.map(|r| r.enforce),
        Rule::Overuse => policy.overuse.map(|r| r.enforce),
        Rule::Budget => policy.budget.map(|r| r.enforce),
        Rule::CostCap => policy.cost_cap.map(|r| r.enforce),
        Rule::Errors => policy.errors.map(|r| r.enforce),
    }
}

/// Cuts a guest's free text to a bound before it travels on (and into the event log).
pub(super) fn clamp(msg: GuestMsg) -> GuestMsg {
    fn cut(mut text: String, max: usize) -> String {
        if text.len() > max {
            let mut end = max;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        text
    }
    match msg {
        GuestMsg::Hello {
            vm_id,
            management_token,
            guest_version,
        } => GuestMsg::Hello {
            vm_id,
            management_token,
            guest_version: cut(guest_version, MAX_NAME),
        },
        GuestMsg::Error { message } => GuestMsg::Error {
            message: cut(message, MAX_TEXT),
        },
        GuestMsg::PolicyWarning { rule, message } => GuestMsg::PolicyWarning {
            rule: cut(rule, MAX_NAME),
            message: cut(message, MAX_TEXT),
        },
        GuestMsg::PolicyAction {
            rule,
            action,
            reason,
        } => GuestMsg::PolicyAction {
            rule: cut(rule, MAX_NAME),
            action,
            reason: cut(reason, MAX_TEXT),
        },
        GuestMsg::PolicyProgress { mut items } => {
            items.truncate(MAX_PROGRESS_ITEMS);
            GuestMsg::PolicyProgress {
                items: items
                    .into_iter()
                    .map(|(rule, text, milli, left)| {
                        (cut(rule, MAX_NAME), cut(text, MAX_NAME * 4), milli, left)
                    })
                    .collect(),
            }
        }
        other @ (GuestMsg::Status { .. }
        | GuestMsg::Usage { .. }
        | GuestMsg::WorkloadExit { .. }) => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::policy::{Budget, Lifespan, PolicyAction};
    use std::sync::Mutex;

    const VM: VmId = VmId::from_u128(7);

    #[derive(Default)]
    struct FakeHost {
        policy: PolicySpec,
        delivered: Mutex<Vec<GuestMsg>>,
        hellos_checked: Mutex<u32>,
    }

    impl GuestHost for FakeHost {
        fn wanted(&self) -> bool {
            true
        }
        fn check_hello(&self, vm_id: VmId, token: &str) -> bool {
            *self.hellos_checked.lock().expect("lock") += 1;
            vm_id == VM && token == "tok"
        }
        fn policy(&self) -> PolicySpec {
            self.policy
        }
        fn deliver(&self, msg: GuestMsg) {
            self.delivered.lock().expect("lock").push(msg);
        }
    }

    fn hello(vm_id: VmId, token: &str) -> GuestMsg {
        GuestMsg::Hello {
            vm_id,
            management_token: token.into(),
            guest_version: "0.1".into(),
        }
    }

    fn frames(msgs: &[GuestMsg]) -> Vec<u8> {
        msgs.iter()
            .flat_map(|m| encode_frame(m).expect("encode"))
            .collect()
    }

    fn stop_policy() -> PolicySpec {
        PolicySpec {
            lifespan: Some(Lifespan {
                max_seconds: Some(60),
                end_at: None,
                enforce: Enforcement {
                    action: PolicyAction::Stop,
                    warn: None,
                },
            }),
            ..PolicySpec::default()
        }
    }

    /// Runs `serve` against `input` written by a fake guest; returns the penalty and the
    /// guard. The guest side stays open (and reads what the host writes) until `serve`
    /// ends or `within` passes.
    async fn serve_input(
        host: &FakeHost,
        input: Vec<u8>,
        guard: &mut Guard,
        within: Duration,
    ) -> Option<Duration> {
        let (mut agent_end, guest_end) = UnixStream::pair().expect("pair");
        let (mut guest_read, mut guest_write) = guest_end.into_split();
        let writer = tokio::spawn(async move {
            let _ = guest_write.write_all(&input).await;
            // Keep the connection open: an ended stream would end `serve` at once.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(guest_write);
        });
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 4096];
            while let Ok(n) = guest_read.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        let (_tx, mut rx) = mpsc::unbounded_channel();
        let result = tokio::time::timeout(within, serve(host, VM, &mut agent_end, &mut rx, guard))
            .await
            .ok();
        writer.abort();
        reader.abort();
        result
    }

    #[test]
    fn buckets_refill_and_pace() {
        let t0 = Instant::now();
        let mut b = Bucket::new(3.0, 2.0, t0);
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(500)));
        assert!(!b.take(t0 + Duration::from_millis(500)));
        // A long pause refills to the burst, no more.
        let later = t0 + Duration::from_secs(100);
        assert!((0..3).all(|_| b.take(later)));
        assert!(!b.take(later));

        let mut bytes = Bucket::new(1000.0, 1000.0, t0);
        assert_eq!(bytes.charge(1000.0, t0), Duration::ZERO);
        assert_eq!(bytes.charge(500.0, t0), Duration::from_millis(500));
        assert_eq!(
            bytes.charge(500.0, t0 + Duration::from_millis(500)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn penalties_double_up_to_a_cap_and_are_forgiven() {
        let t0 = Instant::now();
        let mut guard = Guard::new(t0);
        let penalties: Vec<u64> = (0..9).map(|_| guard.strike(t0).as_secs()).collect();
        assert_eq!(penalties, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(guard.strike(t0 + FORGIVE_AFTER).as_secs(), 1);
    }

    #[test]
    fn logging_is_rate_limited_and_counts_what_it_held_back() {
        let t0 = Instant::now();
        let mut guard = Guard::new(t0);
        for i in 0..1000u64 {
            guard.complain(VM, t0 + Duration::from_millis(i), "bad");
        }
        assert_eq!(guard.lines_logged, 1);
        assert_eq!(guard.held_back, 999);
        guard.complain(VM, t0 + LOG_EVERY, "bad");
        assert_eq!(guard.lines_logged, 2);
        assert_eq!(guard.held_back, 0);
    }

    #[test]
    fn only_actions_the_policy_names_are_admitted() {
        let t0 = Instant::now();
        let mut guard = Guard::new(t0);
        let policy = stop_policy();
        let action = |rule: &str, action| GuestMsg::PolicyAction {
            rule: rule.into(),
            action,
            reason: "r".into(),
        };
        assert!(guard
            .admit(&action("lifespan", PolicyAction::Stop), &policy, t0)
            .is_ok());
        // Another action than the rule's, a rule the policy lacks, an unknown rule.
        assert!(guard
            .admit(&action("lifespan", PolicyAction::Terminate), &policy, t0)
            .is_err());
        assert!(guard
            .admit(&action("budget", PolicyAction::Stop), &policy, t0)
            .is_err());
        assert!(guard
            .admit(&action("nonsense", PolicyAction::Stop), &policy, t0)
            .is_err());
        assert!(guard
            .admit(
                &action("lifespan", PolicyAction::Stop),
                &PolicySpec::default(),
                t0
            )
            .is_err());
        let warning = |rule: &str| GuestMsg::PolicyWarning {
            rule: rule.into(),
            message: "m".into(),
        };
        assert!(guard.admit(&warning("lifespan"), &policy, t0).is_ok());
        assert!(guard.admit(&warning("idle"), &policy, t0).is_err());
        let budget = PolicySpec {
            budget: Some(Budget {
                cpu_seconds: Some(1),
                mem_gib_hours_milli: None,
                net_bytes: None,
                enforce: Enforcement {
                    action: PolicyAction::Suspend,
                    warn: None,
                },
            }),
            ..PolicySpec::default()
        };
        assert!(guard
            .admit(&action("budget", PolicyAction::Suspend), &budget, t0)
            .is_ok());
        assert_eq!(guard.dropped, 5);
    }

    #[test]
    fn reports_are_capped_but_periodic_state_is_not() {
        let t0 = Instant::now();
        let mut guard = Guard::new(t0);
        let policy = PolicySpec::default();
        let error = GuestMsg::Error {
            message: "x".into(),
        };
        let admitted = (0..1000)
            .filter(|_| guard.admit(&error, &policy, t0).is_ok())
            .count();
        assert_eq!(admitted, REPORTS_BURST as usize);
        let usage = GuestMsg::Usage {
            cpu_ms: 1,
            mem_kib: 1,
            net_rx: 0,
            net_tx: 0,
        };
        assert!(guard.admit(&usage, &policy, t0).is_ok());
        assert!(guard
            .admit(&error, &policy, t0 + Duration::from_secs(1))
            .is_ok());
    }

    #[test]
    fn text_is_cut_to_a_bound_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let GuestMsg::Error { message } = clamp(GuestMsg::Error {
            message: long.clone(),
        }) else {
            panic!("not an error")
        };
        assert!(message.len() <= MAX_TEXT + '…'.len_utf8());
        assert!(message.ends_with('…'));
        let items = vec![("idle".to_string(), long, 1u32, None); 100];
        let GuestMsg::PolicyProgress { items } = clamp(GuestMsg::PolicyProgress { items }) else {
            panic!("not progress")
        };
        assert_eq!(items.len(), MAX_PROGRESS_ITEMS);
        assert!(items
            .iter()
            .all(|i| i.1.len() <= MAX_NAME * 4 + '…'.len_utf8()));
    }

    #[tokio::test]
    async fn garbage_ends_the_connection_with_one_log_line() {
        let host = FakeHost::default();
        let mut guard = Guard::new(Instant::now());
        let garbage: Vec<u8> = (0..1_000_000u64).map(|i| (i * 7919 % 251) as u8).collect();
        let penalty = serve_input(&host, garbage, &mut guard, Duration::from_secs(10))
            .await
            .expect("serve ends on garbage");
        assert_eq!(penalty, FIRST_PENALTY);
        assert!(
            guard.bytes_read <= READ_CHUNK as u64,
            "{}",
            guard.bytes_read
        );
        assert_eq!(guard.lines_logged, 1);
        assert!(host.delivered.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn identity_comes_from_the_socket_not_the_hello() {
        let host = FakeHost::default();
        let mut guard = Guard::new(Instant::now());
        let other_vm = VmId::from_u128(8);
        let input = frames(&[
            hello(other_vm, "tok"),
            GuestMsg::Error {
                message: "as another VM".into(),
            },
        ]);
        let penalty = serve_input(&host, input, &mut guard, Duration::from_secs(10)).await;
        assert_eq!(penalty, Some(FIRST_PENALTY));
        let input = frames(&[hello(VM, "wrong token")]);
        let penalty = serve_input(&host, input, &mut guard, Duration::from_secs(10)).await;
        assert_eq!(penalty, Some(FIRST_PENALTY * 2));
        assert!(host.delivered.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn nothing_counts_before_a_hello_and_one_hello_is_relayed() {
        let host = FakeHost {
            policy: stop_policy(),
            ..FakeHost::default()
        };
        let mut guard = Guard::new(Instant::now());
        let exit = GuestMsg::WorkloadExit { code: 3 };
        let forbidden = GuestMsg::PolicyAction {
            rule: "lifespan".into(),
            action: PolicyAction::Terminate,
            reason: "x".into(),
        };
        let input = frames(&[
            exit.clone(),
            hello(VM, "tok"),
            hello(VM, "tok"),
            forbidden,
            exit.clone(),
        ]);
        // The connection stays up: nothing wrong enough to drop it.
        let ended = serve_input(&host, input, &mut guard, Duration::from_millis(500)).await;
        assert_eq!(ended, None);
        assert_eq!(*host.hellos_checked.lock().expect("lock"), 2);
        assert_eq!(
            *host.delivered.lock().expect("lock"),
            vec![hello(VM, "tok"), exit]
        );
        assert_eq!(guard.dropped, 1);
    }

    #[tokio::test]
    async fn a_flood_of_valid_frames_is_cut_off_and_reports_capped() {
        let host = FakeHost::default();
        let mut guard = Guard::new(Instant::now());
        let error = GuestMsg::Error {
            message: "e".repeat(MAX_TEXT + 200),
        };
        let mut msgs = vec![hello(VM, "tok")];
        msgs.extend(std::iter::repeat_n(error, 1000));
        let penalty = serve_input(&host, frames(&msgs), &mut guard, Duration::from_secs(30))
            .await
            .expect("a flood ends the connection");
        assert_eq!(penalty, FIRST_PENALTY);
        let delivered = host.delivered.lock().expect("lock");
        // The hello and one burst of reports, each cut short.
        assert_eq!(delivered.len(), 1 + REPORTS_BURST as usize);
        assert!(delivered.iter().all(|m| match m {
            GuestMsg::Error { message } => message.len() <= MAX_TEXT + '…'.len_utf8(),
            _ => true,
        }));
        assert_eq!(guard.lines_logged, 1);
    }

    #[tokio::test]
    async fn a_fast_writer_is_paced_to_the_byte_budget() {
        let host = FakeHost::default();
        let mut guard = Guard::new(Instant::now());
        // Valid frames of nearly the largest size, faster than the budget allows.
        let error = GuestMsg::Error {
            message: "e".repeat(60_000),
        };
        let mut msgs = vec![hello(VM, "tok")];
        msgs.extend(std::iter::repeat_n(error, 40));
        let started = std::time::Instant::now();
        let ended = serve_input(&host, frames(&msgs), &mut guard, Duration::from_secs(2)).await;
        assert_eq!(ended, None, "pacing is not an offence");
        let read = guard.bytes_read as f64;
        let allowed = BYTES_BURST + BYTES_PER_SEC * started.elapsed().as_secs_f64();
        assert!(
            read > BYTES_BURST && read <= allowed + READ_CHUNK as f64,
            "read {read} bytes, allowed {allowed}"
        );
        assert_eq!(guard.lines_logged, 0);
    }
}
