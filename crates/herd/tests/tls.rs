//! HTTPS and agent mTLS with real processes on loopback (sim driver): an agent joins
//! with a CSR pinning the CA by fingerprint, clients trust only the pinned CA, and the
//! agent routes take a token only together with that host's own certificate.

mod common;

use common::{pinned_client, Proc, Server};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// What an agent saved when it joined.
struct Joined {
    host_id: String,
    token: String,
    cert_pem: String,
    key_pem: String,
}

fn joined(agent_dir: &Path) -> Joined {
    let creds: Value =
        serde_json::from_slice(&std::fs::read(agent_dir.join("agent.json")).expect("agent.json"))
            .expect("credentials");
    Joined {
        host_id: creds["host_id"].as_str().expect("host_id").to_owned(),
        token: creds["agent_token"].as_str().expect("token").to_owned(),
        cert_pem: std::fs::read_to_string(agent_dir.join("agent.pem")).expect("agent.pem"),
        key_pem: std::fs::read_to_string(agent_dir.join("agent.key")).expect("agent.key"),
    }
}

/// A client trusting `ca_pem` and presenting `identity`.
fn mtls_client(ca_pem: &str, identity: Option<&Joined>) -> reqwest::Client {
    let identity = identity.map(|j| (j.cert_pem.as_str(), j.key_pem.as_str()));
    reqwest::Client::builder()
        .use_preconfigured_tls(herd_tls::client_config(ca_pem, identity).expect("config"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

fn other_ca() -> (tempfile::TempDir, herd_tls::Ca) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = herd_tls::Ca::load_or_create(dir.path()).expect("CA");
    (dir, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_joins_over_https_with_a_csr_and_runs_a_vm() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(root.path(), &[]).await;
    assert!(server.url.starts_with("https://"));
    let agent = server.start_agent(root.path(), "host-a", &[]).await;
    let api = server.client();
    let hosts = api
        .wait_hosts("the host up", Duration::from_secs(20), |hosts| {
            hosts.len() == 1 && hosts[0]["state"] == "up"
        })
        .await;

    // The agent keeps a private key, and a certificate naming exactly its host id.
    let saved = joined(&agent.data_dir);
    assert_eq!(hosts[0]["id"].as_str(), Some(saved.host_id.as_str()));
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(agent.data_dir.join("agent.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let cert_der = herd_tls::der_of_pem(&saved.cert_pem).expect("certificate");
    assert_eq!(
        herd_tls::host_id_of(&cert_der).map(|h| h.to_string()),
        Some(saved.host_id.clone())
    );

    api.post(
        "/v1/vms",
        json!({"name": "web", "hypervisor": "sim", "vcpus": 1, "memory_mib": 128}),
    )
    .await
    .expect("launch");
    api.wait_vms("web running", Duration::from_secs(30), |vms| {
        vms.len() == 1 && vms[0]["state"] == "running"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_pinned_ca_is_trusted() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(root.path(), &[]).await;
    let (_dir, other) = other_ca();

    // A client pinned to another CA does not get through.
    let wrong = pinned_client(Some(other.pem()));
    let answer = wrong.get(format!("{}/healthz", server.url)).send().await;
    let err = answer.expect_err("another CA must not verify");
    assert!(
        format!("{err:?}").contains("UnknownIssuer") || format!("{err:?}").contains("certificate"),
        "{err:?}"
    );

    // Plain HTTP on the HTTPS port gets no answer.
    let plain = server.url.replace("https://", "http://");
    let answer = reqwest::Client::new()
        .get(format!("{plain}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        answer.is_err() || !answer.expect("answer").status().is_success(),
        "plain HTTP answered on the HTTPS port"
    );

    // An agent pinning the wrong fingerprint refuses to join and spends no token.
    let token = server.join_token().await;
    let log = root.path().join("wrong-pin.log");
    let dir = root.path().join("wrong-pin");
    let (url, dir_arg, fingerprint) = (
        server.url.clone(),
        dir.display().to_string(),
        other.fingerprint(),
    );
    let mut agent = Proc::spawn(
        "wrong-pin",
        &[
            "agent",
            "--join",
            &url,
            "--token",
            &token,
            "--ca-fingerprint",
            &fingerprint,
            "--data-dir",
            &dir_arg,
            "--drivers",
            "sim",
        ],
        &log,
    );
    let status = wait_exit(&mut agent, Duration::from_secs(20));
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("did not present the pinned CA"), "{text}");
    assert!(!dir.join("agent.json").exists());
    // The token is still good: the right pin joins with it.
    let mut agent = Proc::spawn(
        "right-pin",
        &[
            "agent",
            "--join",
            &url,
            "--token",
            &token,
            "--ca-fingerprint",
            &server.ca_fingerprint(),
            "--data-dir",
            &dir_arg,
            "--drivers",
            "sim",
        ],
        &root.path().join("right-pin.log"),
    );
    server
        .client()
        .wait_hosts("the host up", Duration::from_secs(20), |hosts| {
            hosts.len() == 1 && hosts[0]["state"] == "up"
        })
        .await;
    assert!(agent.exited().is_none());
}

fn wait_exit(proc: &mut Proc, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = proc.exited() {
            return status;
        }
        assert!(Instant::now() < deadline, "{} did not exit", proc.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A WebSocket upgrade request to the agent bus.
async fn bus_status(client: &reqwest::Client, url: &str, token: &str) -> u16 {
    client
        .get(format!("{url}/v1/agent/bus"))
        .bearer_auth(token)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("bus request")
        .status()
        .as_u16()
}

async fn discovery_status(client: &reqwest::Client, url: &str, token: &str) -> u16 {
    client
        .get(format!("{url}/v1/agent/discovery"))
        .bearer_auth(token)
        .send()
        .await
        .expect("discovery request")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_routes_need_the_hosts_own_certificate() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(root.path(), &[]).await;
    let a = server.start_agent(root.path(), "host-a", &[]).await;
    let b = server.start_agent(root.path(), "host-b", &[]).await;
    server
        .client()
        .wait_hosts("two hosts up", Duration::from_secs(20), |hosts| {
            hosts.len() == 2 && hosts.iter().all(|h| h["state"] == "up")
        })
        .await;
    let (a, b) = (joined(&a.data_dir), joined(&b.data_dir));
    let ca = server.ca_pem.as_deref().expect("CA");
    let no_cert = mtls_client(ca, None);
    let a_cert = mtls_client(ca, Some(&a));
    let url = &server.url;

    // The token without its certificate is refused.
    assert_eq!(discovery_status(&no_cert, url, &a.token).await, 403);
    assert_eq!(bus_status(&no_cert, url, &a.token).await, 403);
    // Host A's certificate with host B's token is refused.
    assert_eq!(discovery_status(&a_cert, url, &b.token).await, 403);
    assert_eq!(bus_status(&a_cert, url, &b.token).await, 403);
    // A certificate from another CA does not get past the handshake.
    let (_dir, other) = other_ca();
    let (key_pem, csr) = herd_tls::agent_key_and_csr().expect("csr");
    let forged = Joined {
        host_id: a.host_id.clone(),
        token: a.token.clone(),
        cert_pem: other
            .sign_agent_csr(&csr, a.host_id.parse().expect("uuid"))
            .expect("forged cert"),
        key_pem,
    };
    let forged_client = mtls_client(ca, Some(&forged));
    assert!(forged_client
        .get(format!("{url}/v1/agent/discovery"))
        .bearer_auth(&a.token)
        .send()
        .await
        .is_err());
    // The host's own certificate with its own token gets through (last: this takes
    // over host A's bus connection).
    assert_eq!(discovery_status(&a_cert, url, &a.token).await, 200);
    assert_eq!(bus_status(&a_cert, url, &a.token).await, 101);
    // Operators need no client certificate.
    assert_eq!(
        no_cert
            .get(format!("{url}/v1/hosts"))
            .bearer_auth(&server.token)
            .send()
            .await
            .expect("hosts")
            .status()
            .as_u16(),
        200
    );
}

/// `herd up` serves HTTPS on loopback and pins its CA in the client config it writes;
/// the CLI trusts that CA only, and says how to pin one when it has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herd_up_pins_its_ca_for_the_cli() {
    let root = tempfile::tempdir().expect("tempdir");
    let config_home = root.path().join("config");
    let data_dir = root.path().join("data");
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let data_arg = data_dir.display().to_string();
    let log = root.path().join("up.log");
    let env = [("XDG_CONFIG_HOME", config_home.as_path())];
    let mut up = Proc::spawn_env(
        "up",
        &[
            "up",
            "--data-dir",
            &data_arg,
            "--listen",
            &listen,
            "--drivers",
            "sim",
        ],
        &log,
        &env,
    );
    let ca_pem = common::wait_ca(
        &mut up,
        &data_dir.join("server"),
        &log,
        Duration::from_secs(30),
    )
    .await;
    let url = format!("https://{listen}");
    common::wait_healthy(&pinned_client(Some(&ca_pem)), &url).await;
    let config = std::fs::read_to_string(config_home.join("herd/config.toml")).expect("config");
    assert!(config.contains("ca_pem"), "{config}");
    assert!(config.contains(&format!("url = \"{url}\"")), "{config}");

    let cli = |args: &[&str], extra_env: &[(&str, &str)]| {
        let mut command = std::process::Command::new(common::herd_bin());
        command
            .args(args)
            .env("XDG_CONFIG_HOME", &config_home)
            .env_remove("HERD_URL")
            .env_remove("HERD_TOKEN")
            .env_remove("HERD_CA");
        for (key, value) in extra_env {
            command.env(key, value);
        }
        command.output().expect("run herd")
    };
    // The CLI launches through the pinned CA (waiting for the local agent to join).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cli(&["vm", "launch", "web", "--hypervisor", "sim"], &[]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "launch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The join command carries the CA fingerprint.
    let out = cli(&["host", "join-token"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fingerprint = herd_tls::fingerprint_of_pem(&ca_pem).expect("fingerprint");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("--ca-fingerprint {fingerprint}")),
        "{stdout}"
    );
    // Another CA (HERD_CA) is refused; no CA at all says how to pin one.
    let (other_dir, _other) = other_ca();
    let other_pem = other_dir.path().join("ca.pem");
    let out = cli(
        &["vm", "ls"],
        &[("HERD_CA", other_pem.to_str().expect("utf-8 path"))],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");
    let token = config
        .lines()
        .find_map(|l| l.strip_prefix("token = \""))
        .map(|t| t.trim_end_matches('"').to_owned())
        .expect("token in config");
    let empty = root.path().join("empty-config");
    let out = std::process::Command::new(common::herd_bin())
        .args(["vm", "ls"])
        .env("XDG_CONFIG_HOME", &empty)
        .env("HERD_URL", &url)
        .env("HERD_TOKEN", &token)
        .env_remove("HERD_CA")
        .output()
        .expect("run herd");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HERD_CA"), "{stderr}");

    // Plain HTTP is refused off loopback.
    let out = cli(
        &[
            "server",
            "--insecure-http",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            &root.path().join("s").display().to_string(),
        ],
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
}
