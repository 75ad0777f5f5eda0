//! `herd vm broadcast`: spreads a VM's snapshot to other hosts and, with `--watch`,
//! follows it: one line per host with its chunks, until every host is done or given
//! up on.

use super::{print_json, short};
use crate::client::Client;
use crate::Output;
use anyhow::{bail, Result};
use herd_server::api::{BroadcastList, BroadcastRequest, BroadcastView, HostInfo};
use reqwest::Method;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long `--watch` follows a broadcast before it leaves it to the background.
const FOLLOW_FOR: Duration = Duration::from_secs(1800);

pub struct Ask {
    pub vm: String,
    pub request: BroadcastRequest,
    pub watch: bool,
    pub output: Output,
}

/// The lines about where a broadcast stands: a heading, then one per host.
pub fn lines(b: &BroadcastView, names: &HashMap<uuid::Uuid, String>) -> Vec<String> {
    let name = |id: &uuid::Uuid| names.get(id).cloned().unwrap_or_else(|| short(id));
    let mut head = format!(
        "broadcast {} from {}: {}",
        short(&b.id),
        name(&b.source),
        b.phase
    );
    if let (Some(bytes), Some(chunks)) = (b.size_bytes, b.chunks) {
        head.push_str(&format!(
            ", {:.1} MiB in {chunks} chunks",
            bytes as f64 / f64::from(1 << 20)
        ));
    }
    if let Some(ms) = b.paused_ms {
        head.push_str(&format!(", the VM paused {ms} ms"));
    }
    if let Some(reason) = &b.reason {
        head.push_str(&format!(" [{reason}]"));
    }
    let mut out = vec![head];
    for h in &b.hosts {
        let percent = match b.chunks {
            Some(n) if n > 0 => f64::from(h.chunks) * 100.0 / f64::from(n),
            _ => 0.0,
        };
        let mut line = format!(
            "  {:<16} {:<9} {:>5.1}%  from {}",
            name(&h.host),
            h.phase,
            percent,
            h.parent.map(|p| name(&p)).unwrap_or_default()
        );
        if let Some(ms) = h.ms_after_capture {
            line.push_str(&format!(
                ", done {:.2} s after the snapshot",
                ms as f64 / 1000.0
            ));
        }
        if h.refetched > 0 {
            line.push_str(&format!(", {} chunks fetched again", h.refetched));
        }
        if let Some(copy) = h.copy {
            line.push_str(&format!(", copy {copy}"));
        }
        if let Some(reason) = &h.reason {
            line.push_str(&format!(" [{reason}]"));
        }
        out.push(line);
    }
    out
}

fn over(b: &BroadcastView) -> bool {
    !matches!(b.phase.as_str(), "capturing" | "spreading")
}

pub async fn broadcast(client: &Client, ask: Ask) -> Result<()> {
    let view = client.resolve_vm(&ask.vm).await?;
    let started = Instant::now();
    let mut b: BroadcastView = client
        .call(
            Method::POST,
            &format!("/v1/vms/{}/broadcast", view.id),
            Some(&ask.request),
        )
        .await?;
    if ask.watch {
        // Host names, if the caller may list hosts; ids otherwise.
        let names: HashMap<uuid::Uuid, String> = client
            .get::<Vec<HostInfo>>("/v1/hosts")
            .await
            .map(|hosts| hosts.into_iter().map(|h| (h.id, h.hostname)).collect())
            .unwrap_or_default();
        let mut shown = Vec::new();
        loop {
            let now = lines(&b, &names);
            if now != shown {
                for line in &now {
                    eprintln!("{line}");
                }
                shown = now;
            }
            if over(&b) {
                break;
            }
            if started.elapsed() > FOLLOW_FOR {
                bail!(
                    "broadcast {} still {} after {} s; it goes on: `herd vm broadcasts {}`",
                    b.id,
                    b.phase,
                    FOLLOW_FOR.as_secs(),
                    view.name
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            let list: BroadcastList = client
                .get(&format!("/v1/vms/{}/broadcasts", view.id))
                .await?;
            match list.items.into_iter().find(|item| item.id == b.id) {
                Some(now) => b = now,
                None => bail!("broadcast {} is gone from the server's list", b.id),
            }
        }
        eprintln!("({:.1} s)", started.elapsed().as_secs_f64());
        if b.phase == "failed" {
            bail!(
                "{} was not broadcast: {}",
                view.name,
                b.reason.as_deref().unwrap_or("no reason given")
            );
        }
    }
    match ask.output {
        Output::Json => print_json(&b),
        Output::Table => {
            println!("{}", b.id);
            Ok(())
        }
    }
}

/// `herd vm broadcasts VM`: its broadcasts, newest first.
pub async fn list(client: &Client, vm: &str, output: Output) -> Result<()> {
    let view = client.resolve_vm(vm).await?;
    let list: BroadcastList = client
        .get(&format!("/v1/vms/{}/broadcasts", view.id))
        .await?;
    match output {
        Output::Json => print_json(&list),
        Output::Table => {
            let names: HashMap<uuid::Uuid, String> = client
                .get::<Vec<HostInfo>>("/v1/hosts")
                .await
                .map(|hosts| hosts.into_iter().map(|h| (h.id, h.hostname)).collect())
                .unwrap_or_default();
            for b in &list.items {
                for line in lines(b, &names) {
                    println!("{line}");
                }
            }
            Ok(())
        }
    }
}
