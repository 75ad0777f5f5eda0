//! The proximity tree through the whole product: four agents, two labelled at join and
//! two by `herd host label`, measure their round trips to the neighbours the server
//! names; `herd topology` groups them by rack and zone, with a round trip to each
//! parent, and bad labels, hosts and fan-outs are refused with the reason. Then eight
//! hosts of the netns testbed in two zones of two racks, labelled at join: the tree
//! enters every rack and every zone by one edge.

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

#[test]
fn eight_testbed_hosts_form_one_subtree_per_rack_and_per_zone() {
    use std::collections::HashMap;
    let root = tempfile::tempdir().expect("tempdir");
    let place = |i: usize| (format!("z{}", i / 4 + 1), format!("r{}", i / 2 + 1));
    let labels: Vec<Vec<String>> = (0..8)
        .map(|i| {
            let (zone, rack) = place(i);
            [
                "--label".into(),
                format!("zone={zone}"),
                "--label".into(),
                format!("rack={rack}"),
            ]
            .to_vec()
        })
        .collect();
    let label_refs: Vec<Vec<&str>> = labels
        .iter()
        .map(|l| l.iter().map(String::as_str).collect())
        .collect();
    let host_args: Vec<&[&str]> = label_refs.iter().map(Vec::as_slice).collect();
    let cluster = common::cluster::start_hosts(root.path(), "sim", 8, &host_args, &[]);
    // The second zone is 2 ms further away, where the kernel can delay packets.
    if cluster.bed.netem().is_ok() {
        for i in 4..8 {
            let far = herd_testbed::Shape {
                delay_ms: 2,
                ..herd_testbed::Shape::default()
            };
            cluster.bed.shape(i, far).expect("shape");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let tree = loop {
        let tree = cluster
            .cli_json(&["topology", "--root", "host0", "--fanout", "2"])
            .expect("topology");
        let hosts = tree["hosts"].as_array().cloned().unwrap_or_default();
        let measured = hosts
            .iter()
            .filter(|h| h["parent"].is_string())
            .all(|h| h["rtt_to_parent_us"].as_u64().is_some_and(|us| us > 0));
        if hosts.len() == 8 && measured {
            break tree;
        }
        assert!(
            Instant::now() < deadline,
            "round trips never measured: {tree:#}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let hosts = tree["hosts"].as_array().expect("hosts");
    let index: HashMap<&str, usize> = hosts
        .iter()
        .map(|h| {
            let name = h["hostname"].as_str().unwrap_or_default();
            let i = name.strip_prefix("host").and_then(|n| n.parse().ok());
            (
                h["id"].as_str().unwrap_or_default(),
                i.expect("a testbed host"),
            )
        })
        .collect();
    // Zone z1 comes before z2, and each rack is one run of the order.
    let order: Vec<usize> = hosts
        .iter()
        .map(|h| index[h["id"].as_str().unwrap_or_default()])
        .collect();
    assert_eq!(order[0], 0, "the root first: {order:?}");
    assert!(order[..4].iter().all(|i| place(*i).0 == "z1"), "{order:?}");
    for w in order.windows(3) {
        assert!(
            !(place(w[0]).1 == place(w[2]).1 && place(w[0]).1 != place(w[1]).1),
            "a rack split in the order: {order:?}"
        );
    }
    // Every rack and every zone but the root's is entered by exactly one edge.
    let mut entries: HashMap<String, usize> = HashMap::new();
    for h in hosts {
        let Some(parent) = h["parent"].as_str() else {
            continue;
        };
        let (child, parent) = (
            place(index[h["id"].as_str().unwrap_or_default()]),
            place(index[parent]),
        );
        if child.1 != parent.1 {
            *entries.entry(child.1.clone()).or_default() += 1;
        }
        if child.0 != parent.0 {
            *entries.entry(child.0.clone()).or_default() += 1;
        }
        let degree = hosts.iter().filter(|c| c["parent"] == h["parent"]).count();
        assert!(degree <= 2, "fan-out above 2: {tree:#}");
    }
    let entered: std::collections::BTreeMap<String, usize> = entries.into_iter().collect();
    let expected: std::collections::BTreeMap<String, usize> = ["r2", "r3", "r4", "z2"]
        .iter()
        .map(|k| (k.to_string(), 1))
        .collect();
    assert_eq!(entered, expected, "{tree:#}");
    let text = cluster
        .cli(&["topology", "--root", "host0"])
        .expect("topology");
    assert!(
        text.starts_with("host0 (-/z1/r1)\n  host1 (-/z1/r1)"),
        "{text}"
    );
}
