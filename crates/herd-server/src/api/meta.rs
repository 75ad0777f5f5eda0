//! Routes about the server itself rather than the cloud's resources: liveness for
//! whatever watches the server, and its counters for Prometheus.

use super::{ApiError, AppState, CloudAdmin, Health};
use crate::map::{MapScope, ResourceMap};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::atomic::Ordering;

/// Liveness; the only route without a token.
#[utoipa::path(get, path = "/healthz", security(()), responses((status = 200, body = Health)))]
pub(super) async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
pub(super) async fn metrics(
    _: CloudAdmin,
    State(cloud): State<AppState>,
) -> Result<Response, ApiError> {
    let m = &cloud.metrics;
    let mut out = String::new();
    let counters = [
        ("herd_sync_reports_total{kind=\"delta\"}", &m.reports_delta),
        ("herd_sync_reports_total{kind=\"full\"}", &m.reports_full),
        ("herd_sync_bytes_received_total", &m.report_bytes),
        ("herd_sync_full_requests_total", &m.full_requests),
        ("herd_vm_state_changes_total", &m.vm_state_changes),
        ("herd_commands_published_total", &m.commands_published),
        ("herd_command_errors_total", &m.command_errors),
        ("herd_agent_messages_rejected_total", &m.rejected_reports),
        ("herd_api_requests_total", &m.api_requests),
        ("herd_hosts_marked_down_total", &m.hosts_marked_down),
        ("herd_agent_discoveries_total", &m.agent_discoveries),
    ];
    for (name, counter) in counters {
        let base = name.split('{').next().unwrap_or(name);
        if !out.contains(&format!("# TYPE {base} ")) {
            out.push_str(&format!("# TYPE {base} counter\n"));
        }
        out.push_str(&format!("{name} {}\n", counter.load(Ordering::Relaxed)));
    }
    let batching = &cloud.commits.stats;
    out.push_str("# TYPE herd_store_batches_total counter\n");
    out.push_str(&format!(
        "herd_store_batches_total {}\n",
        batching.batches.load(Ordering::Relaxed)
    ));
    out.push_str("# TYPE herd_store_batched_writes_total counter\n");
    out.push_str(&format!(
        "herd_store_batched_writes_total {}\n",
        batching.writes.load(Ordering::Relaxed)
    ));
    out.push_str("# TYPE herd_store_unwritten_states gauge\n");
    out.push_str(&format!(
        "herd_store_unwritten_states {}\n",
        cloud.commits.unwritten()
    ));
    out.push_str("# TYPE herd_vms gauge\n");
    for (state, n) in cloud.vm_state_counts() {
        out.push_str(&format!("herd_vms{{state=\"{}\"}} {n}\n", state.as_str()));
    }
    let hosts = cloud.hosts()?;
    let n_up = hosts.iter().filter(|host| host.record.up).count();
    out.push_str("# TYPE herd_hosts gauge\n");
    out.push_str(&format!("herd_hosts{{state=\"up\"}} {n_up}\n"));
    out.push_str(&format!(
        "herd_hosts{{state=\"down\"}} {}\n",
        hosts.len() - n_up
    ));
    map_gauges(&cloud.resource_map(&MapScope::Cloud)?, &mut out);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// The resource map as gauges, labelled by host and hypervisor type, so an alert can
/// fire on a stale host or an unhealthy driver without polling `/v1/map`.
fn map_gauges(map: &ResourceMap, out: &mut String) {
    let mut series: Vec<(&str, String, String)> = Vec::new();
    for host in &map.hosts {
        let h = label(&host.hostname);
        series.push((
            "herd_host_stale",
            format!("host=\"{h}\""),
            u8::from(host.stale).to_string(),
        ));
        series.push((
            "herd_host_free_vcpus",
            format!("host=\"{h}\""),
            host.free_vcpus.to_string(),
        ));
        series.push((
            "herd_host_free_memory_mib",
            format!("host=\"{h}\""),
            host.free_memory_mib.to_string(),
        ));
        if let Some(used) = host.used_millicores {
            series.push((
                "herd_host_used_millicores",
                format!("host=\"{h}\""),
                used.to_string(),
            ));
        }
        for t in &host.types {
            let labels = format!("host=\"{h}\",hypervisor=\"{}\"", label(&t.hypervisor));
            let healthy = u8::from(t.health == "ok");
            series.push(("herd_driver_healthy", labels.clone(), healthy.to_string()));
            if let Some(used) = t.used_millicores {
                series.push(("herd_driver_used_millicores", labels, used.to_string()));
            }
        }
    }
    series.sort_by(|a, b| a.0.cmp(b.0));
    let mut last = "";
    for (name, labels, value) in &series {
        if *name != last {
            out.push_str(&format!("# TYPE {name} gauge\n"));
            last = name;
        }
        out.push_str(&format!("{name}{{{labels}}} {value}\n"));
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
