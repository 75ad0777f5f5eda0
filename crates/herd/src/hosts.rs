//! `herd host` and `herd map`: what the fleet has and uses, for operators. The host
//! list says per host whether its drivers answer; the map says per hypervisor type and
//! per host what is allocated, measured and free.

use crate::client::Client;
use crate::table::Table;
use crate::vm::{print_json, short};
use crate::{HostCommand, Output};
use anyhow::Result;
use herd_proto::status::PeerView;
use herd_server::api::{HostInfo, JoinTokenView};
use herd_server::map::ResourceMap;
use herd_server::topology::{TopologyHost, TopologyView};
use reqwest::Method;

pub async fn host(command: HostCommand) -> Result<()> {
    let client = Client::from_config()?;
    match command {
        HostCommand::Ls {
            state,
            kind,
            output,
        } => {
            let mut query = Vec::new();
            for (key, value) in [("state", &state), ("type", &kind)] {
                if let Some(value) = value {
                    query.push(format!("{key}={}", crate::client::urlencode(value)));
                }
            }
            let path = match query.is_empty() {
                true => "/v1/hosts".to_owned(),
                false => format!("/v1/hosts?{}", query.join("&")),
            };
            let hosts: Vec<HostInfo> = client.get(&path).await?;
            match output {
                Output::Json => print_json(&hosts),
                Output::Table => {
                    print!("{}", host_table(&hosts));
                    Ok(())
                }
            }
        }
        HostCommand::Status { host, output } => {
            let found = find_host(&client, &host).await?;
            let peers: Vec<PeerView> = client
                .get(&format!("/v1/hosts/{}/status", found.id))
                .await?;
            match output {
                Output::Json => print_json(&peers),
                Output::Table => {
                    println!("what {} hears of the others:", found.hostname);
                    print!("{}", peer_table(&peers));
                    Ok(())
                }
            }
        }
        HostCommand::Label { host, changes } => {
            let found = find_host(&client, &host).await?;
            let mut set = std::collections::BTreeMap::new();
            let mut remove = Vec::new();
            for change in &changes {
                match change.strip_suffix('-') {
                    Some(key) if !change.contains('=') => remove.push(key.to_owned()),
                    _ => {
                        let (key, value) = parse_label(change).map_err(anyhow::Error::msg)?;
                        set.insert(key, value);
                    }
                }
            }
            let labels: std::collections::BTreeMap<String, String> = client
                .call(
                    Method::POST,
                    &format!("/v1/hosts/{}/labels", found.id),
                    Some(&serde_json::json!({ "set": set, "remove": remove })),
                )
                .await?;
            println!("{}: {}", found.hostname, label_text(&labels));
            Ok(())
        }
        HostCommand::JoinToken { ttl } => {
            let view: JoinTokenView = client
                .call(
                    Method::POST,
                    "/v1/join-tokens",
                    Some(&serde_json::json!({ "ttl_seconds": ttl })),
                )
                .await?;
            println!(
                "run this on the new host (the token works once, until {}):",
                view.expires_at
            );
            println!("  {}", view.command);
            Ok(())
        }
    }
}

/// A host by id or hostname.
async fn find_host(client: &Client, host: &str) -> Result<HostInfo> {
    let hosts: Vec<HostInfo> = client.get("/v1/hosts").await?;
    hosts
        .into_iter()
        .find(|h| h.id.to_string() == host || h.hostname == host)
        .ok_or_else(|| anyhow::anyhow!("no host {host:?}: herd host ls lists them"))
}

/// `KEY=VALUE`, checked as the server checks labels.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: a label is KEY=VALUE"))?;
    let one = std::collections::BTreeMap::from([(key.to_owned(), value.to_owned())]);
    herd_topology::check_labels(&one).map_err(|e| e.to_string())?;
    Ok((key.to_owned(), value.to_owned()))
}

fn label_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "no labels".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `herd topology`: the proximity tree, indented by depth.
pub async fn topology(root: Option<String>, fanout: usize, output: Output) -> Result<()> {
    let client = Client::from_config()?;
    let mut path = format!("/v1/topology?fanout={fanout}");
    if let Some(root) = root {
        path.push_str(&format!("&root={}", find_host(&client, &root).await?.id));
    }
    let view: TopologyView = client.get(&path).await?;
    match output {
        Output::Json => print_json(&view),
        Output::Table => {
            print!("{}", topology_text(&view));
            Ok(())
        }
    }
}

/// One line per host, depth-first from the root, each indented under its parent with
/// its place and the round trip to its parent.
fn topology_text(view: &TopologyView) -> String {
    let mut children: std::collections::HashMap<uuid::Uuid, Vec<&TopologyHost>> =
        Default::default();
    for host in &view.hosts {
        if let Some(parent) = host.parent {
            children.entry(parent).or_default().push(host);
        }
    }
    let mut out = String::new();
    let mut stack: Vec<&TopologyHost> = view.hosts.iter().filter(|h| h.parent.is_none()).collect();
    while let Some(host) = stack.pop() {
        let place = [&host.region, &host.zone, &host.rack]
            .iter()
            .map(|p| if p.is_empty() { "-" } else { p.as_str() })
            .collect::<Vec<_>>()
            .join("/");
        let rtt = host
            .rtt_to_parent_us
            .map(|us| format!("  {:.2} ms", f64::from(us) / 1000.0))
            .unwrap_or_default();
        out.push_str(&format!(
            "{}{} ({}){rtt}\n",
            "  ".repeat(host.depth),
            host.hostname,
            place
        ));
        if let Some(kids) = children.get(&host.id) {
            stack.extend(kids.iter().rev());
        }
    }
    out
}

fn peer_table(peers: &[PeerView]) -> String {
    let mut table = Table::new(vec![
        "HOSTNAME",
        "ID",
        "AGE",
        "",
        "CPU",
        "MEM FREE",
        "DISK FREE",
        "ROOM",
        "BURSTS",
    ]);
    for p in peers {
        let figures = p.status.map(|s| {
            [
                format!("{:.1}%", f64::from(s.cpu_permille) / 10.0),
                format!("{} MiB", s.mem_free_mib),
                format!("{} MiB", s.disk_free_mib),
                format!("{} vCPU, {} MiB", s.room_cpus, s.room_mib),
                s.bursts.to_string(),
            ]
        });
        let [cpu, mem, disk, room, bursts] = figures.unwrap_or_default();
        table.row(vec![
            p.hostname.clone(),
            short(&p.host),
            format!("{:.1} s", p.age_ms as f64 / 1000.0),
            if p.stale {
                "stale".into()
            } else {
                String::new()
            },
            cpu,
            mem,
            disk,
            room,
            bursts,
        ]);
    }
    table.render()
}

fn host_table(hosts: &[HostInfo]) -> String {
    let mut table = Table::new(vec![
        "HOSTNAME",
        "ID",
        "STATE",
        "VMS",
        "VCPUS",
        "MEMORY",
        "CPU",
        "HYPERVISORS",
        "HEALTH",
        "LABELS",
    ]);
    for host in hosts {
        table.row(vec![
            host.hostname.clone(),
            short(&host.id),
            host.state.clone(),
            host.n_vms.to_string(),
            format!("{}/{}", host.allocated_vcpus, host.cpus),
            format!("{}/{} MiB", host.allocated_memory_mib, host.memory_mib),
            format!("{:.0}%", f64::from(host.cpu_permille) / 10.0),
            host.hypervisors
                .iter()
                .map(|h| format!("{} ({})", h.kind, h.detail))
                .collect::<Vec<_>>()
                .join("; "),
            health(host),
            if host.labels.is_empty() {
                "-".into()
            } else {
                label_text(&host.labels)
            },
        ]);
    }
    table.render()
}

/// `qemu: ok, oci: unresponsive (...)`, and the utility module's trouble if it has any.
fn health(host: &HostInfo) -> String {
    let mut parts: Vec<String> = host
        .drivers
        .iter()
        .map(|d| match &d.detail {
            Some(detail) => format!("{}: {} ({detail})", d.kind, d.health),
            None => format!("{}: {}", d.kind, d.health),
        })
        .collect();
    if let Some(error) = &host.utility_error {
        parts.push(format!("utility: {error}"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

pub async fn map(output: Output) -> Result<()> {
    let client = Client::from_config()?;
    let map: ResourceMap = client.get("/v1/map").await?;
    match output {
        Output::Json => print_json(&map),
        Output::Table => {
            print!("{}", map_tables(&map));
            Ok(())
        }
    }
}

fn opt<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

fn cores(millicores: Option<u64>) -> String {
    millicores.map_or_else(|| "-".into(), |m| format!("{:.2}", m as f64 / 1000.0))
}

fn map_tables(map: &ResourceMap) -> String {
    let mut types = Table::new(vec![
        "TYPE",
        "HOSTS",
        "STALE",
        "VMS",
        "PENDING",
        "ALLOC VCPUS",
        "ALLOC MEMORY",
        "USED CPUS",
        "USED MEMORY",
        "FREE VCPUS",
        "FREE MEMORY",
    ]);
    for t in &map.types {
        types.row(vec![
            t.hypervisor.clone(),
            t.n_hosts.to_string(),
            t.n_stale_hosts.to_string(),
            t.n_vms.to_string(),
            t.n_pending.to_string(),
            t.allocated_vcpus.to_string(),
            format!("{} MiB", t.allocated_memory_mib),
            cores(t.used_millicores),
            opt(t.used_memory_mib.map(|m| format!("{m} MiB"))),
            opt(t.free_vcpus),
            opt(t.free_memory_mib.map(|m| format!("{m} MiB"))),
        ]);
    }
    let mut out = types.render();
    if map.hosts.is_empty() {
        return out;
    }
    let mut hosts = Table::new(vec![
        "HOSTNAME",
        "STATE",
        "FIGURES",
        "VCPUS",
        "MEMORY",
        "USED CPUS",
        "USED MEMORY",
        "LOAD",
        "DISK FREE",
        "FREE VCPUS",
        "FREE MEMORY",
        "TYPES",
    ]);
    for h in &map.hosts {
        let figures = match (h.stale, &h.stale_reason, h.figures_age_ms) {
            (true, Some(reason), _) => format!("stale ({reason})"),
            (true, None, _) => "stale".into(),
            (false, _, Some(age)) => format!("{:.1}s old", age as f64 / 1000.0),
            (false, _, None) => "-".into(),
        };
        hosts.row(vec![
            h.hostname.clone(),
            h.state.clone(),
            figures,
            format!(
                "{}/{} ({:.2}x)",
                h.allocated_vcpus, h.cpus, h.cpu_overcommit
            ),
            format!(
                "{}/{} MiB ({:.2}x)",
                h.allocated_memory_mib, h.memory_mib, h.memory_overcommit
            ),
            cores(h.used_millicores),
            opt(h.used_memory_mib.map(|m| format!("{m} MiB"))),
            opt(h.load1.map(|l| format!("{l:.2}"))),
            opt(h.disk_free_mib.map(|m| format!("{m} MiB"))),
            h.free_vcpus.to_string(),
            format!("{} MiB", h.free_memory_mib),
            h.types
                .iter()
                .map(|t| {
                    format!(
                        "{} {} ({} vms, {} cpus)",
                        t.hypervisor,
                        t.health,
                        t.n_vms,
                        cores(t.used_millicores)
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        ]);
    }
    out.push('\n');
    out.push_str(&hosts.render());
    out
}
