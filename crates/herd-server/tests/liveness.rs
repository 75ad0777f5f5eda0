//! Liveness through the real server core and store: a host that goes silent is marked
//! down after its grace period, and after a server restart the hosts that have not
//! reconnected yet get three grace periods (ten thousand agents reconnecting at once
//! take a while, and marking the late ones down would only add to the work).

mod common;

use common::{sim_hello, sim_host};
use herd_bus::EmbeddedBus;
use herd_proto::wire::HostId;
use herd_server::{Cloud, ServerConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const GRACE: Duration = Duration::from_secs(1);

fn open(dir: &Path) -> Arc<Cloud> {
    let mut config = ServerConfig::new(dir.to_path_buf(), "http://127.0.0.1:1".into());
    config.default_hypervisor = "sim".into();
    config.host_grace = GRACE;
    let bus = EmbeddedBus::open(&dir.join("bus.db")).expect("bus");
    Arc::new(Cloud::open(config, Box::new(bus)).expect("cloud"))
}

fn is_down(cloud: &Cloud, host: HostId) -> bool {
    let status = cloud.host(&host.to_string()).expect("host");
    status.live.is_some_and(|live| live.down)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_host_is_marked_down_after_its_grace_and_not_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = open(dir.path());
    let host = sim_host(&cloud, "a");
    tokio::time::sleep(GRACE / 2).await;
    cloud.check_liveness(Instant::now()).expect("check");
    assert!(!is_down(&cloud, host), "down before its grace");
    tokio::time::sleep(GRACE).await;
    cloud.check_liveness(Instant::now()).expect("check");
    assert!(is_down(&cloud, host), "still up after its grace");
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_restart_hosts_get_three_grace_periods_to_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (early, late) = {
        let cloud = open(dir.path());
        (sim_host(&cloud, "early"), sim_host(&cloud, "late"))
    };
    // Restarted: `early` reconnects at once, `late` never does.
    let cloud = open(dir.path());
    sim_hello(&cloud, early, "early");
    tokio::time::sleep(GRACE * 2).await;
    cloud.check_liveness(Instant::now()).expect("check");
    assert!(
        is_down(&cloud, early),
        "a host back since the restart has the usual grace"
    );
    assert!(
        !is_down(&cloud, late),
        "a host not back yet was marked down within three grace periods"
    );
    tokio::time::sleep(GRACE * 2).await;
    cloud.check_liveness(Instant::now()).expect("check");
    assert!(
        is_down(&cloud, late),
        "a host that never came back is marked down in the end"
    );
}
