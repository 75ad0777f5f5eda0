//! Metering, billing and server-side policies through the real server core and store:
//! a retransmitted usage batch is counted once, the bill follows the rate card, and
//! activation holds a VM back.

use herd_bus::EmbeddedBus;
use herd_proto::join::JoinRequest;
use herd_proto::policy::{Rate, RateCard};
use herd_proto::wire::{HostId, HostUtil, HypervisorInfo, Report, ReportBody, VmStatus, VmUsage};
use herd_proto::VmState;
use herd_server::cloud::LaunchSpec;
use herd_server::store::now_ms;
use herd_server::{ingest, Cloud, ServerConfig};
use herd_sync::HostView;
use std::sync::Arc;
use std::time::Duration;

/// A server core on a fresh store with one joined sim host that said hello.
fn cloud_with_one_sim_host() -> (tempfile::TempDir, Arc<Cloud>, HostId) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ServerConfig::new(dir.path().to_path_buf(), "http://127.0.0.1:1".into());
    config.default_hypervisor = "sim".into();
    let bus = EmbeddedBus::open(&dir.path().join("bus.db")).expect("bus");
    let cloud = Arc::new(Cloud::open(config, Box::new(bus)).expect("cloud"));
    let (token, _) = cloud
        .create_join_token(Duration::from_secs(60))
        .expect("join token");
    let host = cloud
        .join(&JoinRequest {
            join_token: token,
            hostname: "h".into(),
            // A Cloud opened without a CA issues no certificate.
            csr_pem: String::new(),
            labels: Default::default(),
        })
        .expect("join")
        .host_id;
    let sim = [HypervisorInfo {
        kind: "sim".into(),
        detail: String::new(),
    }];
    cloud
        .host_hello(host, "h", &sim, 8, 8192, "test")
        .expect("hello");
    (dir, cloud, host)
}

#[tokio::test(flavor = "multi_thread")]
async fn retransmitted_usage_is_counted_once_and_priced_by_the_rate_card() {
    let (_dir, cloud, host) = cloud_with_one_sim_host();
    // CPU and network only: time-based charges depend on the clock; the unit tests of
    // `billing` check those against a hand calculation.
    let rates = RateCard {
        per_cpu_second: Rate {
            peak: 1_000,
            off_peak: 1_000,
        },
        per_gib_transferred: Rate {
            peak: 50_000,
            off_peak: 50_000,
        },
        ..RateCard::default()
    };
    cloud
        .create_project("acme", &Default::default())
        .expect("project");
    cloud.set_rate_card("acme", &rates).expect("rate card");
    let vm = cloud
        .launch(LaunchSpec {
            name: "a".into(),
            project: Some("acme".into()),
            hypervisor: Some("sim".into()),
            vcpus: Some(1),
            memory_mib: Some(512),
            image: None,
            command: vec![],
            policy: Default::default(),
            keep_running: false,
            disk_mib: None,
        })
        .expect("launch");
    // The host reports it running.
    let mut view = HostView::new();
    let report = Report {
        epoch: 1,
        seq: 1,
        util: HostUtil::default(),
        body: ReportBody::Full {
            vms: vec![VmStatus {
                slot: 0,
                vm: Some(vm.id),
                state: VmState::Running,
            }],
        },
        events: vec![],
    };
    ingest::apply_report(&cloud, host, &mut view, &report)
        .await
        .expect("report");

    let t = now_ms() as u64;
    let usage = |cpu_ms: u64, net: u64| {
        vec![VmUsage {
            vm: vm.id,
            cpu_ms,
            net_rx_bytes: net,
            ..VmUsage::default()
        }]
    };
    let gib = 1u64 << 30;
    cloud
        .record_usage(host, t - 2_000, &usage(10_000, gib))
        .await
        .expect("usage");
    cloud
        .record_usage(host, t - 1_000, &usage(30_000, 3 * gib))
        .await
        .expect("usage");
    let bill = |to| cloud.bill(Some("acme"), 0, to).expect("bill");
    let to = t as i64;
    let first = bill(to);
    assert_eq!(first.len(), 1);
    // 30 CPU-s x 1,000 + 3 GiB x 50,000 = 30,000 + 150,000 micro-units.
    assert_eq!(first[0].cpu_ms, 30_000);
    assert_eq!(first[0].net_bytes, 3 * gib);
    assert_eq!(first[0].cost_micros, 180_000);

    // The same batches again (a reconnecting agent resends them): nothing changes.
    cloud
        .record_usage(host, t - 2_000, &usage(10_000, gib))
        .await
        .expect("usage");
    cloud
        .record_usage(host, t - 1_000, &usage(30_000, 3 * gib))
        .await
        .expect("usage");
    assert_eq!(bill(to), first);

    // A report about this VM from another host counts nothing.
    let (token, _) = cloud
        .create_join_token(Duration::from_secs(60))
        .expect("join token");
    let other = cloud
        .join(&JoinRequest {
            join_token: token,
            hostname: "other".into(),
            // A Cloud opened without a CA issues no certificate.
            csr_pem: String::new(),
            labels: Default::default(),
        })
        .expect("join")
        .host_id;
    let rejected = cloud
        .record_usage(other, t - 500, &usage(90_000, 9 * gib))
        .await
        .expect("usage");
    assert_eq!(rejected, 1);
    assert_eq!(bill(to), first);

    // Later usage adds exactly its difference.
    cloud
        .record_usage(host, t - 500, &usage(31_000, 3 * gib))
        .await
        .expect("usage");
    assert_eq!(bill(to)[0].cost_micros, 181_000);
}

/// Activation: a VM waits, unplaced, until its start time, and until the VM it follows
/// has completed.
#[tokio::test(flavor = "multi_thread")]
async fn activation_holds_a_vm_until_its_time_and_its_predecessor() {
    use herd_proto::policy::{Activation, PolicySpec};
    let (_dir, cloud, host) = cloud_with_one_sim_host();
    let launch = |name: &str, activation: Activation| {
        cloud
            .launch(LaunchSpec {
                name: name.into(),
                project: None,
                hypervisor: Some("sim".into()),
                vcpus: Some(1),
                memory_mib: Some(64),
                image: None,
                command: vec![],
                policy: PolicySpec {
                    activation: Some(activation),
                    ..PolicySpec::default()
                },
                keep_running: false,
                disk_mib: None,
            })
            .expect("launch")
    };
    let first = cloud
        .launch(LaunchSpec {
            name: "first".into(),
            project: None,
            hypervisor: Some("sim".into()),
            vcpus: Some(1),
            memory_mib: Some(64),
            image: None,
            command: vec![],
            policy: PolicySpec::default(),
            keep_running: false,
            disk_mib: None,
        })
        .expect("launch");
    let soon = (now_ms() / 1000 + 2) as u64;
    let timed = launch(
        "timed",
        Activation {
            start_at: Some(soon),
            after_vm: None,
        },
    );
    let follower = launch(
        "follower",
        Activation {
            start_at: None,
            after_vm: Some(first.id),
        },
    );
    cloud.reconcile_once().await.expect("reconcile");
    let state = |id: uuid::Uuid| cloud.vm(&id.to_string()).expect("vm");
    assert_eq!(state(timed.id).observed, VmState::Pending);
    assert!(
        state(timed.id).host.is_none(),
        "placed before its start time"
    );
    assert!(
        state(follower.id).host.is_none(),
        "placed before its predecessor completed"
    );

    tokio::time::sleep(Duration::from_millis(2_100)).await;
    cloud.reconcile_once().await.expect("reconcile");
    assert_eq!(
        state(timed.id).host,
        Some(host),
        "placed once its time came"
    );
    assert!(state(follower.id).host.is_none());

    // The first VM completes (its host reports it stopped).
    let mut view = HostView::new();
    let report = Report {
        epoch: 1,
        seq: 1,
        util: HostUtil::default(),
        body: ReportBody::Full {
            vms: vec![VmStatus {
                slot: 0,
                vm: Some(first.id),
                state: VmState::Stopped,
            }],
        },
        events: vec![],
    };
    ingest::apply_report(&cloud, host, &mut view, &report)
        .await
        .expect("report");
    cloud.reconcile_once().await.expect("reconcile");
    assert_eq!(
        state(follower.id).host,
        Some(host),
        "placed once its predecessor completed"
    );
}

/// A fresh install prices a cost cap with the standard card, so `--budget` works at
/// once; a card the admin sets replaces it for the VMs launched after.
#[tokio::test(flavor = "multi_thread")]
async fn a_cost_cap_is_priced_by_the_standard_card_until_the_project_has_its_own() {
    use herd_proto::policy::{CostCap, Enforcement, PolicyAction, PolicySpec};
    let (_dir, cloud, _host) = cloud_with_one_sim_host();
    let launch = |name: &str| {
        cloud
            .launch(LaunchSpec {
                name: name.into(),
                project: None,
                hypervisor: Some("sim".into()),
                vcpus: Some(1),
                memory_mib: Some(64),
                image: None,
                command: vec![],
                policy: PolicySpec {
                    cost_cap: Some(CostCap {
                        max_micros: 5_000_000,
                        rates: RateCard::default(),
                        enforce: Enforcement {
                            action: PolicyAction::Terminate,
                            warn: None,
                        },
                    }),
                    ..PolicySpec::default()
                },
                keep_running: false,
                disk_mib: None,
            })
            .expect("a cost cap is accepted with no rate card set")
    };
    let priced = |vm: &herd_server::store::VmRecord| vm.policy.cost_cap.map(|cap| cap.rates);
    assert_eq!(
        cloud.rate_card("default").expect("card"),
        RateCard::STANDARD
    );
    assert_eq!(priced(&launch("first")), Some(RateCard::STANDARD));
    let own = RateCard {
        per_hour: Rate {
            peak: 1,
            off_peak: 1,
        },
        ..RateCard::default()
    };
    cloud.set_rate_card("default", &own).expect("rate card");
    assert_eq!(priced(&launch("second")), Some(own));
}
