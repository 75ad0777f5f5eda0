//! The proximity tree through the whole product: four agents, two labelled at join and
//! two by `herd host label`, measure their round trips to the neighbours the server
//! names; `herd topology` groups them by rack and zone, with a round trip to each
//! parent, and bad labels, hosts and fan-outs are refused with the reason.

mod common;

use common::{err, ok, Server};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

fn herd(config: &Path, args: &[&str]) -> std::process::Output {
    common::herd_cli(config, &[], args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hosts_group_by_rack_and_zone_with_measured_round_trips() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(root.path(), &[]).await;
    let cfg = root.path().join("cli");
    common::login_admin(&cfg, &server);
    // a1 and a2 share rack r1; b1 is another rack of the zone; c1 another zone.
    let mut agents = Vec::new();
    for (name, labels) in [
        ("a1", vec!["--label", "zone=z1", "--label", "rack=r1"]),
        ("a2", vec!["--label", "zone=z1", "--label", "rack=r1"]),
        ("b1", vec![]),
        ("c1", vec![]),
    ] {
        agents.push(server.start_agent(root.path(), name, &labels).await);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok(herd(&cfg, &["host", "ls"])).contains("c1") {
        assert!(Instant::now() < deadline, "the hosts never joined");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let labelled = ok(herd(
        &cfg,
        &["host", "label", "b1", "zone=z1", "rack=r2", "os=x"],
    ));
    assert!(labelled.contains("b1: os=x,rack=r2,zone=z1"), "{labelled}");
    ok(herd(&cfg, &["host", "label", "b1", "os-"]));
    ok(herd(&cfg, &["host", "label", "c1", "zone=z2", "rack=r3"]));
    assert!(ok(herd(&cfg, &["host", "ls"])).contains("rack=r1,zone=z1"));

    // Every host below the root gets a measured round trip to its parent.
    let deadline = Instant::now() + Duration::from_secs(60);
    let tree = loop {
        let out = ok(herd(
            &cfg,
            &["topology", "--root", "a1", "--fanout", "2", "-o", "json"],
        ));
        let tree: Value = serde_json::from_str(&out).expect("json");
        let hosts = tree["hosts"].as_array().cloned().unwrap_or_default();
        let measured = hosts
            .iter()
            .filter(|h| h["parent"].is_string())
            .all(|h| h["rtt_to_parent_us"].as_u64().is_some_and(|us| us > 0));
        if hosts.len() == 4 && measured {
            break tree;
        }
        assert!(
            Instant::now() < deadline,
            "round trips never measured: {tree}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let hosts = tree["hosts"].as_array().expect("hosts");
    let names: Vec<&str> = hosts
        .iter()
        .map(|h| h["hostname"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        ["a1", "a2", "b1", "c1"],
        "rack, then zone, then the rest"
    );
    let parent_of = |name: &str| {
        let host = hosts.iter().find(|h| h["hostname"] == name).expect("host");
        let parent = host["parent"].as_str().unwrap_or_default();
        hosts
            .iter()
            .find(|h| h["id"] == parent)
            .map(|h| h["hostname"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(parent_of("a2").as_deref(), Some("a1"));
    assert_eq!(parent_of("a1"), None);
    // The other rack of the zone hangs from the root's rack; the other zone from the
    // root's zone (a full root's rack passes it on to the rack hung before it).
    assert!(matches!(parent_of("b1").as_deref(), Some("a1" | "a2")));
    assert!(matches!(
        parent_of("c1").as_deref(),
        Some("a1" | "a2" | "b1")
    ));
    let text = ok(herd(&cfg, &["topology", "--root", "a1"]));
    assert!(text.starts_with("a1 (-/z1/r1)\n  a2 (-/z1/r1)"), "{text}");

    // Bad input: a clear reason, and nothing changed.
    assert!(err(herd(&cfg, &["host", "label", "b1", "Rack=x"])).contains("label key"));
    assert!(err(herd(&cfg, &["host", "label", "nowhere", "rack=x"])).contains("no host"));
    assert!(err(herd(&cfg, &["topology", "--fanout", "0"])).contains("fanout"));
    let join = err(herd(
        &cfg,
        &[
            "agent",
            "--join",
            &server.url,
            "--token",
            "x",
            "--label",
            "rack",
        ],
    ));
    assert!(join.contains("KEY=VALUE"), "{join}");
    let labels = ok(herd(&cfg, &["host", "ls", "-o", "json"]));
    let hosts: Value = serde_json::from_str(&labels).expect("json");
    let b1 = hosts
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["hostname"] == "b1"))
        .expect("b1");
    assert_eq!(
        b1["labels"],
        serde_json::json!({"rack": "r2", "zone": "z1"})
    );
    drop(agents);
}
