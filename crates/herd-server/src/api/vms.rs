//! Most of the API is about VMs: launching them, listing them, acting on them and
//! reading their events and consoles, each within the projects the caller may see.

use super::{
    page_size, ApiError, ApiJson, ApiPath, ApiQuery, AppState, BatchLaunchRequest, BatchLaunched,
    BroadcastList, BroadcastRequest, BroadcastView, BurstRequest, BurstView, ConsoleQuery,
    ErrorBody, EventList, EventQuery, EventView, JobView, LaunchRequest, MigrateRequest,
    MigrationList, MigrationView, ResizeList, ResizeRequest, ResizeView, User, VmList, VmQuery,
    VmView,
};
use crate::access::Perm;
use crate::cloud::{Cloud, LaunchSpec};
use crate::store::{EventScope, VmFilter, VmRecord};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use herd_proto::lifecycle::Action;
use herd_proto::wire::HostId;
use herd_proto::VmState;

/// The launch a request asks for, in the project it names (or the caller's only
/// project, else `default`), once the caller may launch there.
fn launch_spec(user: &User, request: LaunchRequest) -> Result<LaunchSpec, ApiError> {
    let project = request.project.unwrap_or_else(|| {
        match (user.principal.cloud_admin, user.principal.roles.len()) {
            (false, 1) => user.principal.roles.keys().next().cloned(),
            _ => None,
        }
        .unwrap_or_else(|| "default".into())
    });
    user.check(&project, Perm::OperateVms, "project", &project)?;
    Ok(LaunchSpec {
        name: request.name,
        project: Some(project),
        hypervisor: request.hypervisor,
        vcpus: request.vcpus,
        memory_mib: request.memory_mib,
        image: request.image,
        command: request.command.unwrap_or_default(),
        policy: request.policy.unwrap_or_default(),
        keep_running: request.keep_running.unwrap_or(false),
        disk_mib: request.disk_mib,
    })
}

/// Launch a VM. It is placed at once if a host fits, else it waits as `pending`.
#[utoipa::path(post, path = "/v1/vms", request_body = LaunchRequest,
    responses((status = 201, body = VmView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn launch_vm(
    user: User,
    State(cloud): State<AppState>,
    ApiJson(request): ApiJson<LaunchRequest>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    let spec = launch_spec(&user, request)?;
    let record = crate::blocking(|| cloud.launch(spec))?;
    user.note.created(record.id);
    Ok((StatusCode::CREATED, Json(VmView::of(&record, None, None))))
}

/// Launch up to 1,000 alike VMs at once, named `{name}-1` to `{name}-{count}`: each
/// placed like a single launch, all stored in one transaction (all or none).
#[utoipa::path(post, path = "/v1/vms/batch", request_body = BatchLaunchRequest,
    responses((status = 201, body = BatchLaunched), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn launch_batch(
    user: User,
    State(cloud): State<AppState>,
    ApiJson(request): ApiJson<BatchLaunchRequest>,
) -> Result<(StatusCode, Json<BatchLaunched>), ApiError> {
    let spec = launch_spec(&user, request.vm)?;
    let records = crate::blocking(|| cloud.launch_batch(spec, Some(request.count)))?;
    if let (Some(first), Some(last)) = (records.first(), records.last()) {
        user.note.created(format!(
            "{} VMs, {} to {}",
            records.len(),
            first.id,
            last.id
        ));
    }
    Ok((
        StatusCode::CREATED,
        Json(BatchLaunched {
            ids: records.iter().map(|record| record.id.to_string()).collect(),
        }),
    ))
}

/// List VMs, filtered, in pages ordered by id.
#[utoipa::path(get, path = "/v1/vms", params(VmQuery),
    responses((status = 200, body = VmList), (status = 400, body = ErrorBody)))]
pub(crate) async fn list_vms(
    user: User,
    State(cloud): State<AppState>,
    ApiQuery(query): ApiQuery<VmQuery>,
) -> Result<Json<VmList>, ApiError> {
    let limit = page_size(query.limit)?;
    if let Some(project) = &query.project {
        user.check(project, Perm::Read, "project", project)?;
    }
    let state = query
        .state
        .as_deref()
        .map(|s| {
            s.parse::<VmState>()
                .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))
        })
        .transpose()?;
    let host = query
        .host
        .as_deref()
        .map(|h| {
            h.parse::<HostId>()
                .map_err(|_| ApiError::bad_request("invalid_query", "host: not a host id"))
        })
        .transpose()?;
    let after = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<uuid::Uuid>().map_err(|_| {
                ApiError::bad_request("invalid_query", "cursor: not a cursor from a previous page")
            })
        })
        .transpose()?;
    let records = cloud.list_vms(&VmFilter {
        project: query.project,
        projects: user.principal.scope(Perm::Read),
        state,
        host,
        name: query.name,
        after,
        limit: limit + 1,
    })?;
    let has_more = records.len() > limit;
    let items: Vec<VmView> = records
        .iter()
        .take(limit)
        .map(|r| {
            let mut view = VmView::of(r, None, cloud.guest(r.id));
            if r.host.is_none() {
                view.pending_reason = cloud.pending_reason(r.id);
            }
            view
        })
        .collect();
    let next_cursor = if has_more {
        items.last().map(|v| v.id.to_string())
    } else {
        None
    };
    Ok(Json(VmList { items, next_cursor }))
}

/// A VM the caller may take `perm` on; another project's VM does not exist.
fn vm_for(cloud: &Cloud, user: &User, id: &str, perm: Perm) -> Result<VmRecord, ApiError> {
    let record = cloud.vm(id)?;
    user.check(&record.project, perm, "VM", id)?;
    Ok(record)
}

/// One VM, with its latest usage counters.
#[utoipa::path(get, path = "/v1/vms/{id}", params(("id" = String, Path, description = "VM id")),
    responses((status = 200, body = VmView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_vm(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<VmView>, ApiError> {
    let record = vm_for(&cloud, &user, &id, Perm::Read)?;
    let usage = cloud.vm_usage(record.id);
    let mut view = VmView::of(&record, usage, cloud.guest(record.id));
    view.job = cloud.job_of(record.id).as_ref().map(JobView::of);
    if record.host.is_none() {
        view.pending_reason = cloud.pending_reason(record.id);
    }
    let now = herd_proto::clock::unix_ms();
    view.burst = cloud
        .bursts
        .lease(record.id)
        .filter(|lease| lease.expires_ms > now)
        .map(|lease| BurstView::of(&lease, now));
    Ok(Json(view))
}

/// Ask for a burst: more CPU and memory than the VM's shape, for a while. The VM's host
/// decides from its own room and answers at once; the lease ends on its own at expiry.
#[utoipa::path(post, path = "/v1/vms/{id}/bursts", request_body = BurstRequest,
    params(("id" = String, Path, description = "VM id")),
    responses((status = 201, body = BurstView), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn burst_vm(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<BurstRequest>,
) -> Result<(StatusCode, Json<BurstView>), ApiError> {
    let record = vm_for(&cloud, &user, &id, Perm::OperateVms)?;
    let ask = herd_proto::burst::BurstAsk {
        cpus: request.cpus,
        memory_mib: request.memory_mib,
        seconds: request.seconds,
    };
    let lease = cloud.burst(&record, ask).await?;
    let now = herd_proto::clock::unix_ms();
    Ok((StatusCode::CREATED, Json(BurstView::of(&lease, now))))
}

/// Delete a VM: terminate it on its host, then drop the record.
#[utoipa::path(delete, path = "/v1/vms/{id}", params(("id" = String, Path, description = "VM id")),
    responses((status = 202, body = VmView, description = "terminating; the record goes when the host confirms"),
              (status = 204, description = "deleted"), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_vm(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    vm_for(&cloud, &user, &id, Perm::OperateVms)?;
    Ok(match crate::blocking(|| cloud.delete(&id))? {
        Some(record) => {
            (StatusCode::ACCEPTED, Json(VmView::of(&record, None, None))).into_response()
        }
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// Ask for a new desired state: start, stop, pause, resume, suspend or terminate.
#[utoipa::path(post, path = "/v1/vms/{id}/actions/{action}",
    params(("id" = String, Path, description = "VM id"),
           ("action" = String, Path, description = "start, stop, pause, resume, suspend or terminate")),
    responses((status = 202, body = VmView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn vm_action(
    user: User,
    State(cloud): State<AppState>,
    ApiPath((id, action)): ApiPath<(String, String)>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    vm_for(&cloud, &user, &id, Perm::OperateVms)?;
    let Some(action) = Action::parse(&action) else {
        return Err(ApiError::not_found(format!(
            "no action {action:?}; actions are start, stop, pause, resume, suspend, terminate"
        )));
    };
    let record = crate::blocking(|| cloud.act(&id, action))?;
    Ok((StatusCode::ACCEPTED, Json(VmView::of(&record, None, None))))
}

/// Move a running VM to another host of its type while it runs (cloud admins): to the
/// host named, or to the one the scheduler picks. Returns at once; the migration goes
/// on in the background (see `GET /v1/vms/{id}/migration`).
#[utoipa::path(post, path = "/v1/vms/{id}/migrate", request_body = MigrateRequest,
    params(("id" = String, Path, description = "VM id")),
    responses((status = 202, body = MigrationView), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn migrate_vm(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<MigrateRequest>,
) -> Result<(StatusCode, Json<MigrationView>), ApiError> {
    vm_for(&cloud, &user, &id, Perm::Read)?;
    user.check_cloud_admin()?;
    let migration = crate::blocking(|| cloud.migrate(&id, request.to.as_deref()))?;
    Ok((StatusCode::ACCEPTED, Json(MigrationView::of(&migration))))
}

/// Give a VM new vCPUs and memory: where it is if its host has room, else on a host of
/// its type that has (moving it there live first), else refused with the reason, or
/// left waiting for room if asked. A running qemu VM restarts to take its new shape,
/// and must be asked with `restart`. Returns at once; `GET /v1/vms/{id}/resizes` follows it.
#[utoipa::path(post, path = "/v1/vms/{id}/resize", request_body = ResizeRequest,
    params(("id" = String, Path, description = "VM id")),
    responses((status = 202, body = ResizeView), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn resize_vm(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<ResizeRequest>,
) -> Result<(StatusCode, Json<ResizeView>), ApiError> {
    vm_for(&cloud, &user, &id, Perm::OperateVms)?;
    let ask = crate::resize::ResizeSpec {
        vcpus: request.vcpus,
        memory_mib: request.memory_mib,
        restart: request.restart,
        wait_for_room: request.wait_for_room,
    };
    let resize = crate::blocking(|| cloud.resize(&id, ask))?;
    Ok((StatusCode::ACCEPTED, Json(ResizeView::of(&resize))))
}

/// The VM's resizes: the latest, if it was ever resized (earlier ones are in its
/// events).
#[utoipa::path(get, path = "/v1/vms/{id}/resizes", params(("id" = String, Path, description = "VM id")),
    responses((status = 200, body = ResizeList), (status = 404, body = ErrorBody)))]
pub(crate) async fn vm_resizes(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ResizeList>, ApiError> {
    let record = vm_for(&cloud, &user, &id, Perm::Read)?;
    let latest = crate::blocking(|| cloud.vm_resize(record.id))?;
    Ok(Json(ResizeList {
        items: latest.iter().map(ResizeView::of).collect(),
    }))
}

/// Spread the VM's snapshot to other hosts of its type, down a proximity tree from its
/// host; with `start`, each starts a copy. The VM is paused only while its snapshot is
/// taken. Returns at once; `GET /v1/vms/{id}/broadcasts` follows it.
#[utoipa::path(post, path = "/v1/vms/{id}/broadcast", request_body = BroadcastRequest,
    params(("id" = String, Path, description = "VM id")),
    responses((status = 202, body = BroadcastView), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn broadcast_vm(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<BroadcastRequest>,
) -> Result<(StatusCode, Json<BroadcastView>), ApiError> {
    let record = vm_for(&cloud, &user, &id, Perm::OperateVms)?;
    let to = match request.to.as_deref() {
        None | Some("all") => None,
        Some(label) => match label.split_once('=') {
            Some((key, value)) if !key.is_empty() && !value.is_empty() => {
                Some((key.to_owned(), value.to_owned()))
            }
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "to: `all` or KEY=VALUE (a host label)",
                ))
            }
        },
    };
    let ask = crate::broadcast::BroadcastAsk {
        to,
        start: request.start,
        fanout: request.fanout.unwrap_or(1),
        limit: None,
    };
    let b = crate::blocking(|| cloud.broadcast(&record, &ask))?;
    Ok((StatusCode::ACCEPTED, Json(BroadcastView::of(&b))))
}

/// The VM's broadcasts, newest first (at most the last 20), each with every host's
/// progress.
#[utoipa::path(get, path = "/v1/vms/{id}/broadcasts", params(("id" = String, Path, description = "VM id")),
    responses((status = 200, body = BroadcastList), (status = 404, body = ErrorBody)))]
pub(crate) async fn vm_broadcasts(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<BroadcastList>, ApiError> {
    let record = vm_for(&cloud, &user, &id, Perm::Read)?;
    let items = crate::blocking(|| cloud.broadcasts_of(record.id))?;
    Ok(Json(BroadcastList {
        items: items.iter().map(BroadcastView::of).collect(),
    }))
}

/// The VM's migrations, newest first (at most the last 20): the first is the one in
/// progress, if any.
#[utoipa::path(get, path = "/v1/vms/{id}/migrations", params(("id" = String, Path, description = "VM id")),
    responses((status = 200, body = MigrationList), (status = 404, body = ErrorBody)))]
pub(crate) async fn vm_migrations(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<MigrationList>, ApiError> {
    let record = vm_for(&cloud, &user, &id, Perm::Read)?;
    let items = crate::blocking(|| cloud.vm_migrations(record.id))?;
    Ok(Json(MigrationList {
        items: items.iter().map(MigrationView::of).collect(),
    }))
}

/// A VM's events, oldest first.
#[utoipa::path(get, path = "/v1/vms/{id}/events", params(("id" = String, Path, description = "VM id"), EventQuery),
    responses((status = 200, body = EventList), (status = 404, body = ErrorBody)))]
pub(crate) async fn vm_events(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<EventQuery>,
) -> Result<Json<EventList>, ApiError> {
    let record = vm_for(&cloud, &user, &id, Perm::Read)?;
    events_page(&cloud, EventScope::Vm(record.id), query)
}

/// The tail of a VM's serial console, fetched from its host.
#[utoipa::path(get, path = "/v1/vms/{id}/console", params(("id" = String, Path, description = "VM id"), ConsoleQuery),
    responses((status = 200, description = "console text", content_type = "text/plain"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn vm_console(
    user: User,
    State(cloud): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ConsoleQuery>,
) -> Result<Response, ApiError> {
    vm_for(&cloud, &user, &id, Perm::ReadConsole)?;
    let max_bytes = query.bytes.unwrap_or(64 * 1024);
    if !(1..=1 << 20).contains(&max_bytes) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "bytes must be between 1 and 1048576",
        ));
    }
    let bytes = cloud.console(&id, max_bytes).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        String::from_utf8_lossy(&bytes).into_owned(),
    )
        .into_response())
}

/// Every event the caller may see, oldest first: all of them for cloud admins, the
/// events of their projects' VMs for everyone else.
#[utoipa::path(get, path = "/v1/events", params(EventQuery),
    responses((status = 200, body = EventList)))]
pub(crate) async fn list_events(
    user: User,
    State(cloud): State<AppState>,
    ApiQuery(query): ApiQuery<EventQuery>,
) -> Result<Json<EventList>, ApiError> {
    let scope = match user.principal.scope(Perm::Read) {
        None => EventScope::All,
        Some(projects) => EventScope::Projects(projects),
    };
    events_page(&cloud, scope, query)
}

fn events_page(
    cloud: &Cloud,
    scope: EventScope,
    query: EventQuery,
) -> Result<Json<EventList>, ApiError> {
    let limit = page_size(query.limit)?;
    let records = cloud.events(&scope, query.after.unwrap_or(0), limit)?;
    let next_after = records.last().map(|e| e.id);
    Ok(Json(EventList {
        items: records.iter().map(EventView::of).collect(),
        next_after,
    }))
}
