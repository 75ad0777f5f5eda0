//! Status messages between hosts, through the whole product: three agents, each hearing
//! the others' figures through the bus within an interval or two; one that goes silent
//! (its process stopped, as a cut link would leave it) marked stale by the others within
//! two intervals, and fresh again when it speaks.

mod common;

use common::Server;
use serde_json::Value;
use std::time::{Duration, Instant};

/// What `host` hears of the others, by hostname.
async fn heard(api: &common::Api, host: &str) -> Vec<Value> {
    let view = api.get(&format!("/v1/hosts/{host}/status")).await;
    view.as_array().cloned().unwrap_or_default()
}

fn peer<'a>(peers: &'a [Value], name: &str) -> Option<&'a Value> {
    peers.iter().find(|p| p["hostname"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hosts_hear_each_other_and_mark_a_silent_one_stale() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(root.path(), &[]).await;
    let api = server.client();
    let interval_ms = 500u64;
    let interval = interval_ms.to_string();
    let mut agents = Vec::new();
    for name in ["h1", "h2", "h3"] {
        let args = [
            "--cpus",
            "4",
            "--memory-mib",
            "4096",
            "--util-interval-ms",
            &interval,
        ];
        agents.push(server.start_agent(root.path(), name, &args).await);
    }
    let ids = |hosts: &Value| -> Vec<(String, String)> {
        hosts
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                let field = |k: &str| h[k].as_str().unwrap_or_default().to_owned();
                (field("hostname"), field("id"))
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let hosts = loop {
        let hosts = ids(&api.get("/v1/hosts").await);
        if hosts.len() == 3 {
            break hosts;
        }
        assert!(
            Instant::now() < deadline,
            "three hosts never joined: {hosts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let id_of = |name: &str| {
        hosts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| id.clone())
            .expect("known host")
    };

    // Each hears the two others, fresh, with their figures and room.
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in ["h1", "h2", "h3"] {
        loop {
            let peers = heard(&api, &id_of(name)).await;
            let fresh = |other: &str| {
                peer(&peers, other).is_some_and(|p| {
                    p["stale"] == false && p["status"]["room_cpus"].as_i64() == Some(4)
                })
            };
            let others: Vec<&str> = ["h1", "h2", "h3"]
                .into_iter()
                .filter(|n| *n != name)
                .collect();
            if peers.len() == 2 && others.iter().all(|o| fresh(o)) {
                break;
            }
            assert!(Instant::now() < deadline, "{name} hears: {peers:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // h3 goes silent: the others mark it stale within two intervals (and a little for
    // the relay and this poll), the rest stay fresh.
    let pid = nix::unistd::Pid::from_raw(agents[2].proc.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop h3");
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(10);
    loop {
        let peers = heard(&api, &id_of("h1")).await;
        if peer(&peers, "h3").is_some_and(|p| p["stale"] == true) {
            assert_eq!(
                peer(&peers, "h2").map(|p| &p["stale"]),
                Some(&Value::Bool(false))
            );
            break;
        }
        assert!(Instant::now() < deadline, "h3 never went stale: {peers:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = stopped.elapsed();
    eprintln!(
        "h1 marked the silent h3 stale after {:.2} s ({interval_ms} ms intervals)",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_millis(interval_ms * 2 + 1_500),
        "stale only after {took:?}"
    );

    // Back, h3 is fresh again.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("continue h3");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let peers = heard(&api, &id_of("h2")).await;
        if peer(&peers, "h3").is_some_and(|p| p["stale"] == false) {
            break;
        }
        assert!(Instant::now() < deadline, "h3 never came back: {peers:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
