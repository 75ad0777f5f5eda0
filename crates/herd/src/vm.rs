//! Client subcommands: `herd vm ...` and `herd host ...`.

mod act;
mod broadcast;
mod migrate;
mod resize;
mod wait;

use crate::client::{urlencode, Client};
use crate::table::Table;
use crate::{BillArgs, BillOutput, LaunchArgs, ListArgs, Output, RateCardCommand, VmCommand};
use anyhow::Result;
use herd_proto::lifecycle::Action;
use herd_proto::policy::{Enforcement, PolicySpec};
use herd_proto::VmState;
use herd_server::api::{BillView, EventList, EventView, LaunchRequest, VmList, VmView};
use reqwest::Method;
use std::time::{Duration, Instant};

pub(crate) fn short(id: &uuid::Uuid) -> String {
    id.to_string()[..8].to_owned()
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn vm(command: VmCommand) -> Result<()> {
    let client = Client::from_config()?;
    match command {
        VmCommand::Launch(args) => launch(&client, *args).await,
        VmCommand::Ls(args) => list(&client, args).await,
        VmCommand::Show { vm, output } => {
            let view = client.resolve_vm(&vm).await?;
            match output {
                Output::Json => print_json(&view),
                Output::Table => {
                    print!("{}", describe(&view));
                    let migrations: herd_server::api::MigrationList = client
                        .get(&format!("/v1/vms/{}/migrations", view.id))
                        .await?;
                    if let Some(m) = migrations.items.first() {
                        println!(
                            "{:<14}{} at {}",
                            "migration",
                            migrate::line(m),
                            m.updated_at
                        );
                    }
                    let resizes: herd_server::api::ResizeList =
                        client.get(&format!("/v1/vms/{}/resizes", view.id)).await?;
                    if let Some(r) = resizes.items.first() {
                        println!("{:<14}{} at {}", "resize", resize::line(r), r.updated_at);
                    }
                    Ok(())
                }
            }
        }
        VmCommand::Start(args) => act::action(&client, args, Action::Start).await,
        VmCommand::Stop(args) => act::action(&client, args, Action::Stop).await,
        VmCommand::Pause(args) => act::action(&client, args, Action::Pause).await,
        VmCommand::Resume(args) => act::action(&client, args, Action::Resume).await,
        VmCommand::Suspend(args) => act::action(&client, args, Action::Suspend).await,
        VmCommand::Terminate(args) => act::action(&client, args, Action::Terminate).await,
        VmCommand::Rm(args) => act::remove(&client, args).await,
        VmCommand::Events { vm, output } => events(&client, &vm, output).await,
        VmCommand::Migrate {
            vm,
            to,
            no_wait,
            output,
        } => migrate::migrate(&client, &vm, to, no_wait, output).await,
        VmCommand::Broadcast {
            vm,
            to,
            start,
            fanout,
            watch,
            output,
        } => {
            let request = herd_server::api::BroadcastRequest {
                to: Some(to),
                start,
                fanout: Some(fanout),
            };
            let ask = broadcast::Ask {
                vm,
                request,
                watch,
                output,
            };
            broadcast::broadcast(&client, ask).await
        }
        VmCommand::Broadcasts { vm, output } => broadcast::list(&client, &vm, output).await,
        VmCommand::Resize {
            vm,
            vcpus,
            memory,
            restart,
            wait_for_room,
            no_wait,
            output,
        } => {
            let request = herd_server::api::ResizeRequest {
                vcpus,
                memory_mib: memory,
                restart,
                wait_for_room,
            };
            let ask = resize::Ask {
                vm,
                request,
                no_wait,
                output,
            };
            resize::resize(&client, ask).await
        }
        VmCommand::Burst {
            vm,
            cpu,
            memory,
            duration,
            output,
        } => {
            let seconds = humantime::parse_duration(&duration)
                .map_err(|e| anyhow::anyhow!("--for {duration:?}: {e} (write e.g. 90s, 10m, 1h)"))?
                .as_secs();
            let seconds = u32::try_from(seconds)
                .map_err(|_| anyhow::anyhow!("--for {duration:?} is too long"))?;
            let view = client.resolve_vm(&vm).await?;
            let request = herd_server::api::BurstRequest {
                cpus: cpu,
                memory_mib: memory.unwrap_or(0),
                seconds,
            };
            let lease: herd_server::api::BurstView = client
                .call(
                    Method::POST,
                    &format!("/v1/vms/{}/bursts", view.id),
                    Some(&request),
                )
                .await?;
            match output {
                Output::Json => print_json(&lease),
                Output::Table => {
                    println!("{}: {}", view.name, burst_line(&lease));
                    Ok(())
                }
            }
        }
        VmCommand::Console { vm, bytes } => {
            let view = client.resolve_vm(&vm).await?;
            let (_, text) = client
                .call_status(
                    Method::GET,
                    &format!("/v1/vms/{}/console?bytes={bytes}", view.id),
                )
                .await?;
            use std::io::Write;
            std::io::stdout().write_all(&text)?;
            Ok(())
        }
    }
}

/// How long `herd vm launch` waits on a VM that no host can take before it says so.
const PENDING_PATIENCE: Duration = Duration::from_secs(10);

async fn launch(client: &Client, args: LaunchArgs) -> Result<()> {
    let request = LaunchRequest {
        name: args.name,
        project: args.project,
        hypervisor: args.hypervisor,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        image: args.image,
        command: (!args.command.is_empty()).then_some(args.command),
        policy: Some(crate::policy::spec(&args.policy)?).filter(|p| !p.is_empty()),
        keep_running: args.keep_running.then_some(true),
        disk_mib: args.disk,
    };
    let started = Instant::now();
    let mut view: VmView = client.call(Method::POST, "/v1/vms", Some(&request)).await?;
    if !args.no_wait {
        let goal = wait::Goal::State(VmState::Running);
        // A VM no host can take fails the launch after a short wait, with the
        // scheduler's reason, unless asked to wait for room.
        let patience = (!args.wait_for_room).then_some(PENDING_PATIENCE);
        view = wait::until(client, &view, goal, Duration::from_secs(300), patience).await?;
        eprintln!(
            "{}: running ({:.1} s)",
            view.name,
            started.elapsed().as_secs_f64()
        );
    }
    match args.output {
        Output::Json => print_json(&view),
        Output::Table => {
            println!("{}", view.id);
            Ok(())
        }
    }
}

async fn list(client: &Client, args: ListArgs) -> Result<()> {
    let mut query = vec!["limit=1000".to_owned()];
    if let Some(project) = &args.project {
        query.push(format!("project={}", urlencode(project)));
    }
    if let Some(state) = &args.state {
        query.push(format!("state={}", urlencode(state)));
    }
    if let Some(host) = &args.host {
        query.push(format!("host={}", urlencode(host)));
    }
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut page_query = query.clone();
        if let Some(cursor) = &cursor {
            page_query.push(format!("cursor={cursor}"));
        }
        let page: VmList = client
            .get(&format!("/v1/vms?{}", page_query.join("&")))
            .await?;
        all.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    match args.output {
        Output::Json => print_json(&all),
        Output::Table => {
            let mut table = Table::new(vec![
                "NAME", "ID", "PROJECT", "STATE", "DESIRED", "HOST", "TYPE", "VCPUS", "MEMORY",
            ]);
            for vm in &all {
                table.row(vec![
                    vm.name.clone(),
                    short(&vm.id),
                    vm.project.clone(),
                    vm.state.to_string(),
                    if vm.desired_state == vm.state {
                        "-".into()
                    } else {
                        vm.desired_state.to_string()
                    },
                    vm.host.as_ref().map(short).unwrap_or_else(|| "-".into()),
                    vm.hypervisor.clone(),
                    vm.vcpus.to_string(),
                    format!("{} MiB", vm.memory_mib),
                ]);
            }
            print!("{}", table.render());
            if all.is_empty() {
                eprintln!("no VMs; launch one with `herd vm launch NAME`");
            }
            Ok(())
        }
    }
}

/// A job past its deadline as one line: how it was duplicated, and its result.
fn job_line(job: &herd_server::api::JobView) -> String {
    let copies = match (job.broadcast, &job.reason) {
        (Some(b), _) => format!("duplicated at {} (broadcast {b})", job.duplicated_at),
        (None, reason) => format!(
            "deadline missed at {}, not duplicated: {}",
            job.duplicated_at,
            reason.as_deref().unwrap_or("-")
        ),
    };
    match (job.winner, job.exit_code) {
        (Some(winner), Some(code)) => format!(
            "{copies}; result: exit code {code} from {winner}{}",
            if job.settled {
                ""
            } else {
                " (ending the others)"
            }
        ),
        _ => format!("{copies}; running"),
    }
}

/// A burst as one line: what it adds, and until when.
fn burst_line(burst: &herd_server::api::BurstView) -> String {
    let mut adds = Vec::new();
    if burst.cpus > 0 {
        adds.push(format!("+{} vCPU", burst.cpus));
    }
    if burst.memory_mib > 0 {
        adds.push(format!("+{} MiB", burst.memory_mib));
    }
    format!(
        "{} until {} ({} left)",
        adds.join(", "),
        burst.expires_at,
        humantime::format_duration(Duration::from_secs(burst.seconds_left))
    )
}

fn describe(vm: &VmView) -> String {
    let mut out = String::new();
    let mut field = |key: &str, value: String| out.push_str(&format!("{key:<14}{value}\n"));
    field("name", vm.name.clone());
    field("id", vm.id.to_string());
    field("project", vm.project.clone());
    field("state", format!("{} since {}", vm.state, vm.state_since));
    field(
        "desired",
        format!("{} (generation {})", vm.desired_state, vm.generation),
    );
    field(
        "host",
        vm.host
            .map(|h| h.to_string())
            .unwrap_or_else(|| "- (not placed)".into()),
    );
    field("hypervisor", vm.hypervisor.clone());
    field("size", format!("{} vCPU, {} MiB", vm.vcpus, vm.memory_mib));
    if let Some(burst) = &vm.burst {
        field("burst", burst_line(burst));
    }
    field("image", vm.image.clone());
    if vm.disk_mib > 0 {
        field("disk", format!("{} MiB at /data", vm.disk_mib));
    }
    if !vm.command.is_empty() {
        field("command", vm.command.join(" "));
    }
    field("created", vm.created_at.clone());
    if let Some(error) = &vm.last_error {
        field("last error", error.clone());
    }
    if let Some(reason) = &vm.pending_reason {
        field("pending", reason.clone());
    }
    if vm.deleting {
        field("deleting", "yes".into());
    }
    if let Some(b) = vm.copy_of_broadcast {
        field("copy of", format!("broadcast {b}"));
    }
    if let Some(job) = &vm.job {
        field("job", job_line(job));
    }
    let rules = describe_policy(&vm.policy);
    for (idx, rule) in rules.iter().enumerate() {
        field(if idx == 0 { "policies" } else { "" }, rule.clone());
    }
    if let Some(guest) = &vm.guest {
        for (idx, p) in guest.policy_progress.iter().enumerate() {
            let left = p
                .seconds_left
                .map(|s| {
                    format!(
                        ", {} left",
                        humantime::format_duration(std::time::Duration::from_secs(s))
                    )
                })
                .unwrap_or_default();
            field(
                if idx == 0 { "progress" } else { "" },
                format!(
                    "{}: {} ({:.0}%{left})",
                    p.rule,
                    p.text,
                    f64::from(p.fraction_milli) / 10.0
                ),
            );
        }
    }
    match &vm.guest {
        Some(guest) => {
            field(
                "guest",
                format!(
                    "{} (herd-guest {}, hello {})",
                    if guest.connected {
                        "connected"
                    } else {
                        "not connected"
                    },
                    guest.version.as_deref().unwrap_or("?"),
                    guest.hello_at.as_deref().unwrap_or("-"),
                ),
            );
            let mut last = format!("at {}", guest.last_report_at);
            if let Some(running) = guest.workload_running {
                last.push_str(if running {
                    ", workload running"
                } else {
                    ", workload ended"
                });
            }
            if let Some(uptime) = guest.uptime_ms {
                last.push_str(&format!(", up {:.0} s", uptime as f64 / 1000.0));
            }
            if let Some(rss) = guest.guest_rss_kib {
                last.push_str(&format!(", module uses {} KiB", rss));
            }
            if let Some(code) = guest.exit_code {
                last.push_str(&format!(", exit code {code}"));
            }
            field("last report", last);
            if let Some(error) = &guest.last_error {
                field("guest error", error.clone());
            }
        }
        None => field("guest", "not connected (no hello yet)".into()),
    }
    if let Some(usage) = &vm.usage {
        field(
            "usage",
            format!(
                "cpu {:.1} s, mem {} MiB, net rx {} B tx {} B (at {})",
                usage.cpu_ms as f64 / 1000.0,
                usage.mem_kib / 1024,
                usage.net_rx_bytes,
                usage.net_tx_bytes,
                usage.sampled_at
            ),
        );
    }
    out
}

/// Every event of a VM, oldest first, read page by page.
async fn all_events(client: &Client, id: uuid::Uuid) -> Result<Vec<EventView>> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page: EventList = client
            .get(&format!("/v1/vms/{id}/events?after={after}&limit=1000"))
            .await?;
        let done = page.items.len() < 1000;
        all.extend(page.items);
        match page.next_after {
            Some(next) if !done => after = next,
            _ => return Ok(all),
        }
    }
}

async fn events(client: &Client, vm: &str, output: Output) -> Result<()> {
    let view = client.resolve_vm(vm).await?;
    let all = all_events(client, view.id).await?;
    match output {
        Output::Json => print_json(&all),
        Output::Table => {
            let mut table = Table::new(vec!["TIME", "KIND", "CHANGE", "MESSAGE"]);
            for event in &all {
                let change = match (event.from, event.to) {
                    (Some(from), Some(to)) => format!("{from} -> {to}"),
                    (None, Some(to)) => format!("-> {to}"),
                    _ => "-".into(),
                };
                table.row(vec![
                    event.time.clone(),
                    event.kind.clone(),
                    change,
                    event.message.clone(),
                ]);
            }
            print!("{}", table.render());
            Ok(())
        }
    }
}

pub async fn bill(args: BillArgs) -> Result<()> {
    let client = Client::from_config()?;
    let mut query = Vec::new();
    for (key, value) in [
        ("project", &args.project),
        ("from", &args.from),
        ("to", &args.to),
    ] {
        if let Some(value) = value {
            query.push(format!("{key}={}", urlencode(value)));
        }
    }
    let bill: BillView = client
        .get(&format!("/v1/billing?{}", query.join("&")))
        .await?;
    match args.output {
        BillOutput::Json => print_json(&bill),
        BillOutput::Csv => {
            print!("{}", bill.csv());
            Ok(())
        }
        BillOutput::Table => {
            println!("from {} to {}", bill.from, bill.to);
            let mut table = Table::new(vec![
                "VM",
                "PROJECT",
                "HOURS",
                "CPU-S",
                "MEM GIB-H",
                "NET GIB",
                "COST",
            ]);
            for l in &bill.lines {
                // The VM's own line, then one per burst: the rows add up to the total.
                let bursts: u64 = l.bursts.iter().map(|b| b.cost_micros).sum();
                table.row(vec![
                    l.name.clone(),
                    l.project.clone(),
                    format!("{:.2}", l.hours),
                    format!("{:.1}", l.cpu_seconds),
                    format!("{:.3}", l.memory_gib_hours),
                    format!("{:.3}", l.net_gib),
                    herd_server::billing::format_money(l.cost_micros.saturating_sub(bursts)),
                ]);
                for b in &l.bursts {
                    table.row(vec![
                        format!("  burst +{} vCPU +{} MiB", b.cpus, b.memory_mib),
                        String::new(),
                        format!("{:.2}", b.hours),
                        String::new(),
                        format!("{:.3}", b.memory_mib as f64 / 1024.0 * b.hours),
                        String::new(),
                        b.cost.clone(),
                    ]);
                }
            }
            table.row(vec![
                "total".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                bill.total.clone(),
            ]);
            print!("{}", table.render());
            Ok(())
        }
    }
}

pub async fn rate_card(command: RateCardCommand) -> Result<()> {
    let client = Client::from_config()?;
    match command {
        RateCardCommand::Show { project } => {
            let card: serde_json::Value = client
                .get(&format!("/v1/rate-cards/{}", urlencode(&project)))
                .await?;
            print_json(&card)
        }
        RateCardCommand::Set { project, file } => {
            let text = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
                text
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
            };
            let card: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", file.display()))?;
            let _: serde_json::Value = client
                .call(
                    Method::PUT,
                    &format!("/v1/rate-cards/{}", urlencode(&project)),
                    Some(&card),
                )
                .await?;
            println!("rate card of project {project} set");
            Ok(())
        }
    }
}

fn enforce(e: &Enforcement, warn_is_time: bool) -> String {
    let warn = match (e.warn, warn_is_time) {
        (Some(s), true) => format!(
            " (warn {} before)",
            humantime::format_duration(std::time::Duration::from_secs(s))
        ),
        (Some(m), false) => format!(" (warn at {:.0}%)", m as f64 / 10.0),
        (None, _) => String::new(),
    };
    format!("-> {}{warn}", e.action.as_str())
}

/// One line per configured policy rule.
fn describe_policy(policy: &PolicySpec) -> Vec<String> {
    let secs = |s: u64| humantime::format_duration(std::time::Duration::from_secs(s)).to_string();
    let mut lines = Vec::new();
    if let Some(l) = &policy.lifespan {
        let mut what = Vec::new();
        if let Some(max) = l.max_seconds {
            what.push(format!("lifespan {}", secs(max)));
        }
        if let Some(end) = l.end_at {
            what.push(format!(
                "ends at {}",
                humantime::format_rfc3339(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(end)
                )
            ));
        }
        lines.push(format!("{} {}", what.join(", "), enforce(&l.enforce, true)));
    }
    if let Some(d) = &policy.deadline {
        let copies = match d.copies {
            0 => "onto every other host".to_owned(),
            n => format!("onto {n} hosts"),
        };
        lines.push(format!(
            "deadline {}, then duplicated {copies} (the first to finish wins)",
            secs(d.seconds)
        ));
    }
    if let Some(a) = &policy.activation {
        let mut what = Vec::new();
        if let Some(start) = a.start_at {
            what.push(format!(
                "starts at {}",
                humantime::format_rfc3339(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(start)
                )
            ));
        }
        if let Some(after) = a.after_vm {
            what.push(format!("starts after VM {after} completes"));
        }
        lines.push(what.join(", "));
    }
    if let Some(t) = &policy.task {
        lines.push(format!(
            "when the workload completes {}",
            enforce(&t.enforce, true)
        ));
    }
    if let Some(i) = &policy.idle {
        lines.push(format!(
            "idle: cpu < {:.1}%, net < {} B/s for {} (after {} warm-up) {}",
            f64::from(i.cpu_below_permille) / 10.0,
            i.net_below_bps,
            secs(i.for_seconds),
            secs(i.warmup_seconds),
            enforce(&i.enforce, true)
        ));
    }
    if let Some(o) = &policy.overuse {
        let mut what = Vec::new();
        if let Some(c) = o.cpu_above_permille {
            what.push(format!("cpu > {:.1}%", f64::from(c) / 10.0));
        }
        if let Some(m) = o.mem_above_mib {
            what.push(format!("mem > {m} MiB"));
        }
        if let Some(n) = o.net_above_bps {
            what.push(format!("net > {n} B/s"));
        }
        lines.push(format!(
            "over-use: {} for {} {}",
            what.join(" or "),
            secs(o.for_seconds),
            enforce(&o.enforce, true)
        ));
    }
    if let Some(b) = &policy.budget {
        let mut what = Vec::new();
        if let Some(c) = b.cpu_seconds {
            what.push(format!("{c} CPU-s"));
        }
        if let Some(m) = b.mem_gib_hours_milli {
            what.push(format!("{:.3} GiB-h memory", m as f64 / 1000.0));
        }
        if let Some(n) = b.net_bytes {
            what.push(format!("{n} B network"));
        }
        lines.push(format!(
            "budget: {} {}",
            what.join(", "),
            enforce(&b.enforce, false)
        ));
    }
    if let Some(c) = &policy.cost_cap {
        lines.push(format!(
            "cost cap {} {}",
            herd_server::billing::format_money(c.max_micros),
            enforce(&c.enforce, false)
        ));
    }
    if let Some(e) = &policy.errors {
        lines.push(format!(
            "restart a crashed workload up to {} times {}",
            e.max_restarts,
            enforce(&e.enforce, true)
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::policy::{CostCap, PolicyAction};

    /// Money shows as bills round it (half up to the cent), not as a float truncates.
    #[test]
    fn a_cost_cap_shows_as_a_bill_rounds_it() {
        let cap = |max_micros| PolicySpec {
            cost_cap: Some(CostCap {
                max_micros,
                rates: Default::default(),
                enforce: Enforcement {
                    action: PolicyAction::Stop,
                    warn: None,
                },
            }),
            ..PolicySpec::default()
        };
        assert!(describe_policy(&cap(5_000))[0].starts_with("cost cap 0.01 "));
        assert!(describe_policy(&cap(4_999))[0].starts_with("cost cap 0.00 "));
        assert!(describe_policy(&cap(12_345_678))[0].starts_with("cost cap 12.35 "));
    }
}
