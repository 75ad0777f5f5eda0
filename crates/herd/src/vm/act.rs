//! `herd vm start|stop|pause|resume|suspend|terminate|rm`: one request each, then (unless
//! `--no-wait`) the wait until the host reports it done, so commands can be chained.

use super::wait;
use crate::client::Client;
use crate::ActArgs;
use anyhow::Result;
use herd_proto::lifecycle::Action;
use herd_server::api::VmView;
use reqwest::{Method, StatusCode};
use std::time::Instant;

/// Asks for an action and, unless `--no-wait`, waits until the host reports its target.
pub async fn action(client: &Client, args: ActArgs, action: Action) -> Result<()> {
    let view = client.resolve_vm(&args.vm).await?;
    let started = Instant::now();
    let after: VmView = client
        .call(
            Method::POST,
            &format!("/v1/vms/{}/actions/{}", view.id, action.as_str()),
            None::<&()>,
        )
        .await?;
    if args.no_wait {
        println!(
            "{}: {} requested (desired {}, now {})",
            after.name,
            action.as_str(),
            after.desired_state,
            after.state
        );
        return Ok(());
    }
    let done = wait::until(
        client,
        &after,
        wait::Goal::State(action.target()),
        args.timeout,
        None,
    )
    .await?;
    println!(
        "{}: {} ({:.1} s)",
        done.name,
        done.state,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Deletes a VM: at once if it has nothing running, else once its host confirms the
/// termination, which this waits for unless `--no-wait`.
pub async fn remove(client: &Client, args: ActArgs) -> Result<()> {
    let view = client.resolve_vm(&args.vm).await?;
    let (status, body) = client
        .call_status(Method::DELETE, &format!("/v1/vms/{}", view.id))
        .await?;
    if status == StatusCode::NO_CONTENT {
        println!("{}: deleted", view.name);
        return Ok(());
    }
    if args.no_wait {
        println!(
            "{}: terminating; its record goes once its host confirms",
            view.name
        );
        return Ok(());
    }
    let after: VmView = serde_json::from_slice(&body)?;
    wait::until(client, &after, wait::Goal::Gone, args.timeout, None).await?;
    println!("{}: deleted", view.name);
    Ok(())
}
