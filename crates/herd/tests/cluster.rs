//! A server and agents in separate processes over real sockets (sim driver).

mod common;

use common::{all_in, Server};
use futures_util::future::join_all;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// 63 concurrent launches against exactly 60 vCPUs of capacity on 3 hosts: 60 land,
/// every host ends exactly full and never over, and those 60 reach `running` on the
/// host the server placed them on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_vms_land_within_capacity_and_run() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(root.path(), &["--cpu-overcommit", "4"]).await;
    // 5 CPUs x 4 over-commit = 20 vCPUs per host.
    let mut agents = Vec::new();
    for n in 0..3 {
        agents.push(
            server
                .start_agent(
                    root.path(),
                    &format!("host-{n}"),
                    &["--cpus", "5", "--memory-mib", "4096"],
                )
                .await,
        );
    }
    let api = server.client();
    api.wait_hosts("3 hosts up", Duration::from_secs(20), |hosts| {
        hosts.len() == 3 && hosts.iter().all(|h| h["state"] == "up")
    })
    .await;

    let launches = (0..63).map(|n| {
        let api = api.clone();
        async move {
            api.post(
                "/v1/vms",
                json!({"name": format!("vm-{n}"), "hypervisor": "sim", "vcpus": 1, "memory_mib": 128}),
            )
            .await
        }
    });
    let results = join_all(launches).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");

    let vms = api
        .wait_vms("60 running, 3 pending", Duration::from_secs(60), |vms| {
            vms.iter().filter(|v| v["state"] == "running").count() == 60
                && vms.iter().filter(|v| v["state"] == "pending").count() == 3
        })
        .await;
    let mut per_host: HashMap<String, u64> = HashMap::new();
    for vm in vms.iter().filter(|v| v["state"] == "running") {
        *per_host
            .entry(vm["host"].as_str().expect("host").to_owned())
            .or_default() += 1;
    }
    let hosts = api.hosts().await;
    for host in &hosts {
        let id = host["id"].as_str().expect("id");
        assert_eq!(host["allocated_vcpus"], 20, "{host}");
        assert!(host["allocated_vcpus"].as_u64() <= Some(20));
        assert_eq!(per_host.get(id), Some(&20), "{per_host:?}");
    }
    // What each agent reports (its VM count) matches where the server placed them.
    let hosts = api
        .wait_hosts(
            "agents report 20 VMs each",
            Duration::from_secs(10),
            |hosts| hosts.iter().all(|h| h["n_vms"] == 20),
        )
        .await;
    assert_eq!(hosts.len(), 3);

    // Freeing capacity lets a pending VM in.
    let victim = vms
        .iter()
        .find(|v| v["state"] == "running")
        .expect("a running VM");
    let (status, _) = api
        .request(
            reqwest::Method::DELETE,
            &format!("/v1/vms/{}", victim["id"].as_str().expect("id")),
            None,
        )
        .await
        .expect("delete");
    assert_eq!(status, 202);
    api.wait_vms(
        "a pending VM to take the freed place",
        Duration::from_secs(30),
        |vms| {
            vms.len() == 62
                && vms.iter().filter(|v| v["state"] == "running").count() == 60
                && vms.iter().filter(|v| v["state"] == "pending").count() == 2
        },
    )
    .await;
    drop(agents);
}

/// kill -9 of the server while launches are in flight: every launch that was
/// acknowledged survives, and every VM converges to its desired state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_killed_mid_launch_loses_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(root.path(), &[]).await;
    let _agent = server
        .start_agent(
            root.path(),
            "host-0",
            &["--cpus", "16", "--memory-mib", "65536"],
        )
        .await;
    let api = server.client();
    api.wait_hosts("host up", Duration::from_secs(20), |hosts| {
        hosts.len() == 1 && hosts[0]["state"] == "up"
    })
    .await;

    // Launch 40 VMs in a stream while the server is killed part way through.
    let launcher = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for n in 0..40 {
                let result = api
                    .post(
                        "/v1/vms",
                        json!({"name": format!("vm-{n}"), "hypervisor": "sim", "memory_mib": 64}),
                    )
                    .await;
                if let Ok(body) = result {
                    acknowledged.push(body["id"].as_str().expect("id").to_owned());
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            acknowledged
        })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    server.kill9_and_restart(root.path()).await;
    let acknowledged = launcher.await.expect("launcher");
    eprintln!(
        "{} of 40 launches acknowledged across the kill",
        acknowledged.len()
    );
    assert!(!acknowledged.is_empty());

    let vms = api
        .wait_vms(
            "every VM running after the restart",
            Duration::from_secs(60),
            |vms| vms.len() >= acknowledged.len() && all_in(vms, "running"),
        )
        .await;
    for id in &acknowledged {
        assert!(
            vms.iter().any(|v| v["id"] == id.as_str()),
            "acknowledged VM {id} lost"
        );
    }
    let names: std::collections::HashSet<_> = vms.iter().map(|v| v["name"].to_string()).collect();
    assert_eq!(names.len(), vms.len(), "duplicate VM records");

    // The agent came back with what it had discovered before: a restarted server's
    // agents all reconnect at once, and each discovery is one more TLS handshake.
    let metrics = api
        .http
        .get(format!("{}/metrics", api.url))
        .bearer_auth(&api.token)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("\nherd_agent_discoveries_total 0\n"),
        "the agent discovered again after the restart:\n{metrics}"
    );
}

/// kill -9 of an agent: its host is marked down within the grace period and its VMs
/// `unknown`; restarted, it re-adopts them and they return to their real states.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_killed_host_marked_down_then_reconciled() {
    let root = tempfile::tempdir().expect("tempdir");
    let grace_s = 3.0;
    let server = Server::start(root.path(), &["--host-grace-s", "3"]).await;
    let mut agent = server
        .start_agent(
            root.path(),
            "host-0",
            &["--cpus", "8", "--memory-mib", "8192"],
        )
        .await;
    let api = server.client();
    api.wait_hosts("host up", Duration::from_secs(20), |hosts| {
        hosts.len() == 1 && hosts[0]["state"] == "up"
    })
    .await;
    for n in 0..4 {
        api.post(
            "/v1/vms",
            json!({"name": format!("vm-{n}"), "hypervisor": "sim", "memory_mib": 64}),
        )
        .await
        .expect("launch");
    }
    let vms = api
        .wait_vms("4 running", Duration::from_secs(30), |vms| {
            vms.len() == 4 && all_in(vms, "running")
        })
        .await;
    let paused_id = vms[0]["id"].as_str().expect("id").to_owned();
    api.post(&format!("/v1/vms/{paused_id}/actions/pause"), json!({}))
        .await
        .expect("pause");
    api.wait_vms("one paused", Duration::from_secs(10), |vms| {
        vms.iter().filter(|v| v["state"] == "paused").count() == 1
    })
    .await;

    agent.proc.kill9();
    let killed_at = Instant::now();
    api.wait_hosts("host down", Duration::from_secs(30), |hosts| {
        hosts[0]["state"] == "down"
    })
    .await;
    let detection = killed_at.elapsed().as_secs_f64();
    eprintln!("dead host detected {detection:.2} s after kill -9 (grace {grace_s} s)");
    // The grace period counts from the host's last report, which precedes the kill by
    // up to one sync interval; the check itself runs every 0.1 s.
    assert!(
        detection <= grace_s + 0.2,
        "detected after {detection:.2} s"
    );
    let vms = api.vms().await;
    assert!(all_in(&vms, "unknown"), "{vms:?}");

    agent.restart();
    let vms = api
        .wait_vms("real states back", Duration::from_secs(30), |vms| {
            vms.len() == 4
                && vms.iter().filter(|v| v["state"] == "running").count() == 3
                && vms.iter().filter(|v| v["state"] == "paused").count() == 1
        })
        .await;
    assert!(vms
        .iter()
        .any(|v| v["id"] == paused_id.as_str() && v["state"] == "paused"));
    let hosts = api.hosts().await;
    assert_eq!(
        hosts.len(),
        1,
        "the restarted agent must not register a second host"
    );
    assert_eq!(hosts[0]["state"], "up");
    // The sim driver's own records: still exactly 4 VMs, none duplicated or restarted.
    let sim: serde_json::Value = serde_json::from_slice(
        &std::fs::read(agent.data_dir.join("sim/vms.json")).expect("sim state"),
    )
    .expect("json");
    assert_eq!(sim.as_object().map(|m| m.len()), Some(4));
}

/// A command queued while the agent is offline is delivered when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn command_queued_while_agent_offline_is_delivered() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(root.path(), &[]).await;
    let mut agent = server
        .start_agent(
            root.path(),
            "host-0",
            &["--cpus", "8", "--memory-mib", "8192"],
        )
        .await;
    let api = server.client();
    api.wait_hosts("host up", Duration::from_secs(20), |hosts| {
        hosts.len() == 1 && hosts[0]["state"] == "up"
    })
    .await;
    let vm = api
        .post(
            "/v1/vms",
            json!({"name": "a", "hypervisor": "sim", "memory_mib": 64}),
        )
        .await
        .expect("launch");
    let id = vm["id"].as_str().expect("id").to_owned();
    api.wait_vms("running", Duration::from_secs(20), |vms| {
        all_in(vms, "running")
    })
    .await;

    agent.proc.kill9();
    api.post(&format!("/v1/vms/{id}/actions/suspend"), json!({}))
        .await
        .expect("suspend accepted while the agent is away");
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.restart();
    api.wait_vms("suspended", Duration::from_secs(20), |vms| {
        all_in(vms, "suspended")
    })
    .await;
}
