//! How fast the web UI's pages answer with many VMs in the store.
//!
//! Starts a real server (plain HTTP on loopback, the background loops running) on a
//! store with `--vms` sim VMs spread over sim hosts, logs in as the admin, and fetches
//! each page `--rounds` times. The baseline is the API's own listing of one page of VMs
//! (`GET /v1/vms?limit=50`, JSON), measured in the same run: each page's p95 is shown as
//! a ratio of it, and against the 200 ms target.

use anyhow::{bail, Context, Result};
use clap::Parser;
use herd_proto::join::JoinRequest;
use herd_proto::wire::HypervisorInfo;
use herd_server::cloud::LaunchSpec;
use herd_server::ServerConfig;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    vms: usize,
    #[arg(long, default_value_t = 40)]
    rounds: usize,
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples.get(i).copied().unwrap_or_default()
}

async fn timed(
    http: &reqwest::Client,
    url: &str,
    cookie: &str,
    rounds: usize,
) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let response = http.get(url).header("cookie", cookie).send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        samples.push(started.elapsed());
        if !status.is_success() {
            bail!("{url}: {status}: {}", String::from_utf8_lossy(&body));
        }
    }
    Ok(samples)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut config = ServerConfig::new(dir.path().to_path_buf(), "http://127.0.0.1:1".into());
    config.insecure_http = true;
    config.default_hypervisor = "sim".into();
    let cloud = herd_server::open(config)?;
    let token = cloud
        .ensure_admin_token()?
        .context("a fresh store makes a token")?;
    let n_hosts = args.vms.div_ceil(1000).max(1);
    for h in 0..n_hosts {
        let (join_token, _) = cloud.create_join_token(Duration::from_secs(60))?;
        let name = format!("h{h}");
        let host = cloud
            .join(&JoinRequest {
                join_token,
                hostname: name.clone(),
                csr_pem: String::new(),
                labels: Default::default(),
            })?
            .host_id;
        let sim = [HypervisorInfo {
            kind: "sim".into(),
            detail: String::new(),
        }];
        cloud.host_hello(host, &name, &sim, 1024, 1 << 20, "bench")?;
    }
    let started = Instant::now();
    let mut left = args.vms;
    let mut batch = 0;
    let mut some_vm = None;
    while left > 0 {
        let count = left.min(1000);
        let records = cloud.launch_batch(
            LaunchSpec {
                name: format!("vm-{batch}"),
                project: None,
                hypervisor: Some("sim".into()),
                vcpus: Some(1),
                memory_mib: Some(64),
                image: None,
                command: vec![],
                policy: Default::default(),
                keep_running: false,
                disk_mib: None,
            },
            Some(count as u32),
        )?;
        some_vm = some_vm.or_else(|| records.first().map(|r| r.id));
        left -= count;
        batch += 1;
    }
    let vm = some_vm.context("no VM launched")?;
    eprintln!(
        "{} VMs on {n_hosts} hosts in {:.1} s",
        args.vms,
        started.elapsed().as_secs_f64()
    );

    let bound = herd_server::bind(cloud, "127.0.0.1:0".parse()?).await?;
    let base = format!("http://{}", bound.addr);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bound.serve(async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let login = http
        .post(format!("{base}/ui/login"))
        .form(&[("token", token.as_str())])
        .send()
        .await?;
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("the login set no cookie")?
        .to_owned();
    let bearer = format!("Bearer {token}");
    let mut baseline = Vec::with_capacity(args.rounds);
    for _ in 0..args.rounds {
        let started = Instant::now();
        let response = http
            .get(format!("{base}/v1/vms?limit=50"))
            .header("authorization", &bearer)
            .send()
            .await?;
        response.error_for_status()?.bytes().await?;
        baseline.push(started.elapsed());
    }
    let base_p95 = percentile(&mut baseline, 0.95);
    println!(
        "web pages with {} VMs, {} rounds each; baseline GET /v1/vms?limit=50 p95 {:.1} ms",
        args.vms,
        args.rounds,
        base_p95.as_secs_f64() * 1000.0
    );
    println!(
        "{:<28} {:>9} {:>9} {:>10} {:>8}",
        "page", "p50 ms", "p95 ms", "p95/base", "<200ms"
    );
    let pages = [
        "/ui".to_owned(),
        "/ui/vms".to_owned(),
        "/ui/vms?state=running".to_owned(),
        "/ui/vms?name=vm-3-7".to_owned(),
        format!("/ui/vms/{vm}"),
        "/ui/vms/new".to_owned(),
        "/ui/projects".to_owned(),
        "/ui/hosts".to_owned(),
        "/ui/billing".to_owned(),
        "/ui/audit".to_owned(),
    ];
    let mut all_fast = true;
    for page in &pages {
        let mut samples = timed(&http, &format!("{base}{page}"), &cookie, args.rounds).await?;
        let p50 = percentile(&mut samples, 0.5);
        let p95 = percentile(&mut samples, 0.95);
        let fast = p95 < Duration::from_millis(200);
        all_fast &= fast;
        println!(
            "{:<28} {:>9.1} {:>9.1} {:>9.1}x {:>8}",
            page,
            p50.as_secs_f64() * 1000.0,
            p95.as_secs_f64() * 1000.0,
            p95.as_secs_f64() / base_p95.as_secs_f64().max(1e-6),
            if fast { "yes" } else { "NO" }
        );
    }
    println!(
        "every page p95 < 200 ms: {}",
        if all_fast { "yes" } else { "no" }
    );
    let _ = stop.send(());
    server.await??;
    Ok(())
}
