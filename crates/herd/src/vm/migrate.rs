//! `herd vm migrate`: asks for a live migration and follows it to its end, with the
//! transfer's progress on one line.

use super::{print_json, short};
use crate::client::Client;
use crate::Output;
use anyhow::{bail, Result};
use herd_server::api::{MigrateRequest, MigrationList, MigrationView};
use reqwest::Method;
use std::io::Write;
use std::time::{Duration, Instant};

/// How long the CLI follows a migration before it leaves it to the background.
const FOLLOW_FOR: Duration = Duration::from_secs(900);

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// One line about where a migration stands.
pub fn line(m: &MigrationView) -> String {
    let p = &m.progress;
    let mut text = format!(
        "{} -> {} {} (attempt {})",
        short(&m.source),
        short(&m.target),
        m.phase,
        m.attempt
    );
    if p.total_bytes > 0 {
        let done = p.total_bytes.saturating_sub(p.remaining_bytes);
        let percent = (done as f64 * 100.0 / p.total_bytes as f64).min(100.0);
        text.push_str(&format!(
            ", {percent:.0}% of {:.0} MiB, {:.0} MiB sent, pass {}",
            mib(p.total_bytes),
            mib(p.transferred_bytes),
            p.pass
        ));
        if let Some(ms) = p.expected_downtime_ms {
            text.push_str(&format!(", expected downtime {ms} ms"));
        }
    }
    if let Some(ms) = m.downtime_ms {
        text.push_str(&format!(", downtime {ms} ms"));
    }
    if let Some(reason) = &m.reason {
        text.push_str(&format!(" [{reason}]"));
    }
    text
}

pub async fn migrate(
    client: &Client,
    vm: &str,
    to: Option<String>,
    no_wait: bool,
    output: Output,
) -> Result<()> {
    let view = client.resolve_vm(vm).await?;
    let started = Instant::now();
    let mut m: MigrationView = client
        .call(
            Method::POST,
            &format!("/v1/vms/{}/migrate", view.id),
            Some(&MigrateRequest { to }),
        )
        .await?;
    if !no_wait {
        let mut shown = String::new();
        while m.phase != "done" && m.phase != "failed" {
            if started.elapsed() > FOLLOW_FOR {
                eprintln!();
                bail!(
                    "migration {} still {} after {} s; it goes on: `herd vm show {}`",
                    m.id,
                    m.phase,
                    FOLLOW_FOR.as_secs(),
                    view.name
                );
            }
            let now = line(&m);
            if now != shown {
                eprint!("\r\x1b[2K{}: {now}", view.name);
                let _ = std::io::stderr().flush();
                shown = now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let list: MigrationList = client
                .get(&format!("/v1/vms/{}/migrations", view.id))
                .await?;
            match list.items.into_iter().find(|item| item.id == m.id) {
                Some(now) => m = now,
                None => bail!("migration {} is gone from the server's list", m.id),
            }
        }
        eprintln!(
            "\r\x1b[2K{}: {} ({:.1} s)",
            view.name,
            line(&m),
            started.elapsed().as_secs_f64()
        );
        if m.phase == "failed" {
            bail!(
                "{} was not migrated: {}",
                view.name,
                m.reason.as_deref().unwrap_or("no reason given")
            );
        }
    }
    match output {
        Output::Json => print_json(&m),
        Output::Table => {
            println!("{}", m.id);
            Ok(())
        }
    }
}
