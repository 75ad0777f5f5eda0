use super::guard::Bucket;
use super::*;
use herd_proto::policy::{Budget, Enforcement, Lifespan, PolicyAction};
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
