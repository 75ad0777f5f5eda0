//! `herd vm resize`: asks for a new shape and follows it to its end, saying each step
//! (a move to a host with room, a restart) as the server takes it.

use super::print_json;
use crate::client::Client;
use crate::Output;
use anyhow::{bail, Result};
use herd_server::api::{ResizeList, ResizeRequest, ResizeView};
use reqwest::Method;
use std::time::{Duration, Instant};

/// How long the CLI follows a resize before it leaves it to the background.
const FOLLOW_FOR: Duration = Duration::from_secs(900);

/// One line about where a resize stands.
pub fn line(r: &ResizeView) -> String {
    format!(
        "{} vCPU, {} MiB -> {} vCPU, {} MiB: {} ({})",
        r.from.vcpus, r.from.memory_mib, r.to.vcpus, r.to.memory_mib, r.status, r.reason
    )
}

pub struct Ask {
    pub vm: String,
    pub request: ResizeRequest,
    pub no_wait: bool,
    pub output: Output,
}

pub async fn resize(client: &Client, ask: Ask) -> Result<()> {
    let view = client.resolve_vm(&ask.vm).await?;
    let started = Instant::now();
    let mut r: ResizeView = client
        .call(
            Method::POST,
            &format!("/v1/vms/{}/resize", view.id),
            Some(&ask.request),
        )
        .await?;
    let waits = |r: &ResizeView| !ask.no_wait && r.status != "done" && r.status != "failed";
    let mut shown = String::new();
    while waits(&r) {
        let now = line(&r);
        if now != shown {
            eprintln!("{}: {now}", view.name);
            shown = now;
        }
        if started.elapsed() > FOLLOW_FOR {
            bail!(
                "the resize of {} is still {} after {} s; it goes on: `herd vm show {}`",
                view.name,
                r.status,
                FOLLOW_FOR.as_secs(),
                view.name
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let list: ResizeList = client.get(&format!("/v1/vms/{}/resizes", view.id)).await?;
        match list.items.into_iter().find(|item| item.id == r.id) {
            Some(now) => r = now,
            None => bail!("the resize of {} is gone from the server", view.name),
        }
    }
    if !ask.no_wait {
        eprintln!(
            "{}: {} ({:.1} s)",
            view.name,
            line(&r),
            started.elapsed().as_secs_f64()
        );
        if r.status == "failed" {
            bail!("{} was not resized: {}", view.name, r.reason);
        }
    }
    match ask.output {
        Output::Json => print_json(&r),
        Output::Table => {
            println!("{}", r.id);
            Ok(())
        }
    }
}
