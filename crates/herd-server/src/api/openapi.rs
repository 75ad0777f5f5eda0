//! The published schema is generated from the handlers' own annotations, so that it
//! cannot drift from the code; this is where they are gathered into one document.

// By bare name: utoipa tags a route with the module path it is listed under, and these
// routes have no tag in the published schema.
use super::{agents::*, billing::*, hosts::*, meta::*, vms::*};
use super::{audit, tenants, ErrorBody, User};
use axum::Json;
use herd_proto::join::{Discovery, JoinRequest, JoinResponse};
use herd_proto::lifecycle::Action;
use herd_proto::policy::RateCard;
use herd_proto::VmState;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "herd", description = "A self-hosted cloud for virtual machines and system containers."),
    paths(
        healthz, metrics, launch_vm, launch_batch, list_vms, get_vm, delete_vm, vm_action, migrate_vm, vm_migrations, resize_vm, vm_resizes, burst_vm, broadcast_vm, vm_broadcasts, vm_events, vm_console,
        list_events, list_hosts, get_host, host_status, label_host, get_topology, get_map, create_join_token, get_rate_card, put_rate_card,
        get_bill, agent_join, agent_discovery, agent_bus,
        tenants::whoami, tenants::list_projects, tenants::create_project, tenants::get_project,
        tenants::delete_project, tenants::put_quota, tenants::list_members, tenants::put_member,
        tenants::delete_member, tenants::list_users, tenants::create_user, tenants::delete_user,
        tenants::list_tokens, tenants::create_token, tenants::revoke_token, audit::list
    ),
    components(schemas(ErrorBody, VmState, Action, JoinRequest, JoinResponse, Discovery, RateCard, crate::access::Role)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

pub(super) async fn openapi_json(_: User) -> Json<utoipa::openapi::OpenApi> {
    let mut doc = ApiDoc::openapi();
    // Describe this route too, so the schema lists every route the server serves.
    doc.paths.paths.insert(
        "/openapi.json".into(),
        utoipa::openapi::path::PathItem::new(
            utoipa::openapi::HttpMethod::Get,
            utoipa::openapi::path::OperationBuilder::new()
                .summary(Some("This document"))
                .response(
                    "200",
                    utoipa::openapi::Response::new("The OpenAPI document"),
                )
                .build(),
        ),
    );
    Json(doc)
}
