//! Client subcommands for tenancy: `herd login`, `herd whoami`, `herd project ...`,
//! `herd user ...`, `herd token ...` and `herd audit`.

use crate::client::{urlencode, Client};
use crate::table::Table;
use crate::{config, Output};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use herd_server::access::Role;
use herd_server::api::audit::AuditList;
use herd_server::api::tenants::{
    CreateProject, CreatedToken, CreatedUser, MemberView, ProjectView, PutMember, QuotaView,
    TokenView, UserView, WhoAmI,
};
use herd_server::billing::format_money;
use reqwest::Method;
use serde_json::json;
use std::io::BufRead;

#[derive(Args)]
pub struct LoginArgs {
    /// The server's URL (default: the one configured).
    #[arg(long)]
    pub url: Option<String>,
    /// The API token (default: read from stdin, so it stays out of the shell history).
    #[arg(long)]
    pub token: Option<String>,
    /// Trust the server's CA certificate from this PEM file.
    #[arg(long, conflicts_with = "ca_fingerprint")]
    pub ca: Option<std::path::PathBuf>,
    /// Trust the server's CA whose SHA-256 fingerprint this is (as `herd host
    /// join-token` prints it, or `herd-tls` logs it at first start).
    #[arg(long)]
    pub ca_fingerprint: Option<String>,
}

#[derive(Args)]
pub struct QuotaArgs {
    /// At most this many VMs.
    #[arg(long)]
    pub max_vms: Option<u64>,
    /// At most this many vCPUs over all VMs.
    #[arg(long)]
    pub max_vcpus: Option<u64>,
    /// At most this much memory over all VMs, in MiB.
    #[arg(long)]
    pub max_memory: Option<u64>,
    /// Spend allowed over the last 30 days, e.g. 50.00; launches stop when it is spent.
    #[arg(long)]
    pub budget: Option<String>,
    /// The most extra vCPUs one VM may burst by (default 2).
    #[arg(long)]
    pub max_burst_cpus: Option<u32>,
    /// The most extra memory one VM may burst by (`512M`, `2G`; default 2G).
    #[arg(long, value_parser = crate::size::parse_mib, value_name = "SIZE")]
    pub max_burst_memory: Option<u64>,
    /// The longest burst lease (`30m`, `2h`; default 1h, at most a week).
    #[arg(long, value_name = "DURATION")]
    pub max_burst_for: Option<String>,
}

#[derive(Subcommand)]
pub enum ProjectCommand {
    /// List the projects you hold a role in (all, for cloud admins).
    Ls {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Create a project (cloud admins).
    Create {
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// Show a project's quota and what it holds.
    Show {
        name: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Set a project's quota; a limit left out becomes unlimited (cloud admins).
    Quota {
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
    },
    /// Delete a project with no VMs (cloud admins).
    Rm { name: String },
    /// Who holds which role in a project.
    Members {
        name: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Grant a user a role (viewer, member or admin) in a project.
    Grant {
        project: String,
        user: String,
        role: String,
    },
    /// Take a user's role in a project away.
    Revoke { project: String, user: String },
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// List users (cloud admins).
    Ls {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Create a user and print their first token, once (cloud admins).
    Create {
        name: String,
        /// Every right in every project, and the cloud itself.
        #[arg(long)]
        cloud_admin: bool,
        /// Grant a role in this project at once.
        #[arg(long)]
        project: Option<String>,
        #[arg(long, default_value = "member")]
        role: String,
        /// Lifetime of the first token: 90d, 12h, ... or never.
        #[arg(long, default_value = "90d")]
        ttl: String,
    },
    /// Delete a user: their roles go and their tokens are revoked (cloud admins).
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// List your tokens (everyone's, for cloud admins). Secrets are never shown again.
    Ls {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Make a new token and print it, once.
    Create {
        #[arg(long)]
        label: Option<String>,
        /// Lifetime: 90d, 12h, ... or never (cloud admins).
        #[arg(long, default_value = "90d")]
        ttl: String,
        /// Make it for another user (cloud admins).
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a token at once.
    Revoke { id: String },
}

#[derive(Args)]
pub struct AuditArgs {
    /// Only this project (project admins must name one of theirs).
    #[arg(long)]
    pub project: Option<String>,
    /// Only this caller: a user name, host:<id> or anonymous.
    #[arg(long)]
    pub actor: Option<String>,
    /// How many of the newest entries.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn role(text: &str) -> Result<Role> {
    Role::parse(text).with_context(|| format!("no role {text:?}; roles are viewer, member, admin"))
}

/// `30d`, `12h`, `never` (0), or plain seconds.
fn ttl_seconds(text: &str) -> Result<u64> {
    if text == "never" {
        return Ok(0);
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(seconds);
    }
    humantime::parse_duration(text)
        .map(|d| d.as_secs().max(1))
        .with_context(|| format!("{text:?} is not a duration such as 90d, 12h or never"))
}

fn or_dash(value: Option<impl ToString>) -> String {
    value.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn quota_of(args: &QuotaArgs) -> Result<QuotaView> {
    let budget_micros = args
        .budget
        .as_deref()
        .map(|text| crate::policy::money_micros("--budget", text))
        .transpose()?;
    let any_burst = args.max_burst_cpus.is_some()
        || args.max_burst_memory.is_some()
        || args.max_burst_for.is_some();
    let burst = if any_burst {
        let default = herd_proto::burst::BurstLimits::default();
        let max_seconds = match args.max_burst_for.as_deref() {
            None => default.max_seconds,
            Some(text) => {
                let seconds = humantime::parse_duration(text)
                    .with_context(|| {
                        format!("--max-burst-for {text:?} is not a duration such as 30m")
                    })?
                    .as_secs();
                u32::try_from(seconds)
                    .with_context(|| format!("--max-burst-for {text:?} is too long"))?
            }
        };
        Some(herd_proto::burst::BurstLimits {
            max_cpus: args.max_burst_cpus.unwrap_or(default.max_cpus),
            max_memory_mib: args.max_burst_memory.unwrap_or(default.max_memory_mib),
            max_seconds,
        })
    } else {
        None
    };
    Ok(QuotaView {
        max_vms: args.max_vms,
        max_vcpus: args.max_vcpus,
        max_memory_mib: args.max_memory,
        budget_micros,
        burst,
    })
}

fn print_token(token: &CreatedToken) {
    println!("token id:   {}", token.info.id);
    println!("user:       {}", token.info.user);
    println!("expires:    {}", or_dash(token.info.expires_at.as_ref()));
    println!("token:      {}", token.token);
    println!(
        "\nThe token is shown once. Log in with:\n  herd login --token {}",
        token.token
    );
}

pub async fn login(args: LoginArgs) -> Result<()> {
    let previous = config::load()?;
    let mut next = previous.clone();
    if let Some(url) = args.url {
        next.url = Some(url);
    }
    if let Some(path) = &args.ca {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        herd_tls::fingerprint_of_pem(&pem)
            .with_context(|| format!("{} holds no certificate", path.display()))?;
        next.ca_pem = Some(pem);
    }
    if let Some(fingerprint) = &args.ca_fingerprint {
        let url = next
            .url
            .clone()
            .context("--ca-fingerprint needs the server's URL: add --url")?;
        let pem = herd_tls::fetch_pinned_ca(&url, fingerprint)
            .await
            .context("fetching the server's CA")?;
        next.ca_pem = Some(pem);
    }
    let token = match args.token {
        Some(token) => token,
        None => {
            eprintln!("Paste your API token and press Enter:");
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the token")?;
            line.trim().to_owned()
        }
    };
    if token.is_empty() {
        bail!("no token given");
    }
    next.token = Some(token);
    let path = config::save(&next)?;
    let checked = async {
        let client = Client::from_config()?;
        client.get::<WhoAmI>("/v1/whoami").await
    }
    .await;
    match checked {
        Ok(me) => {
            println!(
                "Logged in as {}{} (config: {})",
                me.user,
                if me.cloud_admin { ", cloud admin" } else { "" },
                path.display()
            );
            Ok(())
        }
        Err(e) => {
            config::save(&previous)?;
            Err(e.context("login failed; the config is unchanged"))
        }
    }
}

pub async fn whoami(output: Output) -> Result<()> {
    let me: WhoAmI = Client::from_config()?.get("/v1/whoami").await?;
    match output {
        Output::Json => print_json(&me),
        Output::Table => {
            println!(
                "{}{}",
                me.user,
                if me.cloud_admin { " (cloud admin)" } else { "" }
            );
            for (project, role) in &me.roles {
                println!("  {:<7} in {project}", role.as_str());
            }
            Ok(())
        }
    }
}

pub async fn project(command: ProjectCommand) -> Result<()> {
    let client = Client::from_config()?;
    match command {
        ProjectCommand::Ls { output } => {
            let projects: Vec<ProjectView> = client.get("/v1/projects").await?;
            match output {
                Output::Json => print_json(&projects),
                Output::Table => {
                    let mut table =
                        Table::new(vec!["NAME", "MAX VMS", "MAX VCPUS", "MAX MEMORY", "BUDGET"]);
                    for p in &projects {
                        table.row(quota_row(&p.name, &p.quota));
                    }
                    print!("{}", table.render());
                    Ok(())
                }
            }
        }
        ProjectCommand::Create { name, quota } => {
            let request = CreateProject {
                name,
                quota: Some(quota_of(&quota)?),
            };
            let view: ProjectView = client
                .call(Method::POST, "/v1/projects", Some(&request))
                .await?;
            println!("project {} created", view.name);
            Ok(())
        }
        ProjectCommand::Show { name, output } => {
            let view: ProjectView = client
                .get(&format!("/v1/projects/{}", urlencode(&name)))
                .await?;
            match output {
                Output::Json => print_json(&view),
                Output::Table => {
                    let mut table = Table::new(vec!["", "QUOTA", "IN USE"]);
                    let usage = view.usage.as_ref();
                    table.row(vec![
                        "VMs".into(),
                        or_dash(view.quota.max_vms),
                        or_dash(usage.map(|u| u.vms)),
                    ]);
                    table.row(vec![
                        "vCPUs".into(),
                        or_dash(view.quota.max_vcpus),
                        or_dash(usage.map(|u| u.vcpus)),
                    ]);
                    table.row(vec![
                        "memory MiB".into(),
                        or_dash(view.quota.max_memory_mib),
                        or_dash(usage.map(|u| u.memory_mib)),
                    ]);
                    table.row(vec![
                        "30-day budget".into(),
                        or_dash(view.quota.budget_micros.map(format_money)),
                        "see herd bill".into(),
                    ]);
                    let burst = view.quota.burst.unwrap_or_default();
                    table.row(vec![
                        "burst per VM".into(),
                        format!(
                            "+{} vCPU, +{} MiB, {}{}",
                            burst.max_cpus,
                            burst.max_memory_mib,
                            humantime::format_duration(std::time::Duration::from_secs(
                                burst.max_seconds.into()
                            )),
                            if view.quota.burst.is_none() {
                                " (default)"
                            } else {
                                ""
                            }
                        ),
                        "see herd vm show".into(),
                    ]);
                    println!("project {} (created {})", view.name, view.created_at);
                    print!("{}", table.render());
                    Ok(())
                }
            }
        }
        ProjectCommand::Quota { name, quota } => {
            let view: ProjectView = client
                .call(
                    Method::PUT,
                    &format!("/v1/projects/{}/quota", urlencode(&name)),
                    Some(&quota_of(&quota)?),
                )
                .await?;
            let mut table =
                Table::new(vec!["NAME", "MAX VMS", "MAX VCPUS", "MAX MEMORY", "BUDGET"]);
            table.row(quota_row(&view.name, &view.quota));
            print!("{}", table.render());
            Ok(())
        }
        ProjectCommand::Rm { name } => {
            client
                .call_status(
                    Method::DELETE,
                    &format!("/v1/projects/{}", urlencode(&name)),
                )
                .await?;
            println!("project {name} deleted");
            Ok(())
        }
        ProjectCommand::Members { name, output } => {
            let members: Vec<MemberView> = client
                .get(&format!("/v1/projects/{}/members", urlencode(&name)))
                .await?;
            match output {
                Output::Json => print_json(&members),
                Output::Table => {
                    let mut table = Table::new(vec!["USER", "ROLE"]);
                    for m in &members {
                        table.row(vec![m.user.clone(), m.role.to_string()]);
                    }
                    print!("{}", table.render());
                    Ok(())
                }
            }
        }
        ProjectCommand::Grant {
            project,
            user,
            role: text,
        } => {
            let request = PutMember { role: role(&text)? };
            let member: MemberView = client
                .call(
                    Method::PUT,
                    &format!(
                        "/v1/projects/{}/members/{}",
                        urlencode(&project),
                        urlencode(&user)
                    ),
                    Some(&request),
                )
                .await?;
            println!("{} is {} in {project}", member.user, member.role);
            Ok(())
        }
        ProjectCommand::Revoke { project, user } => {
            client
                .call_status(
                    Method::DELETE,
                    &format!(
                        "/v1/projects/{}/members/{}",
                        urlencode(&project),
                        urlencode(&user)
                    ),
                )
                .await?;
            println!("{user} no longer has a role in {project}");
            Ok(())
        }
    }
}

fn quota_row(name: &str, quota: &QuotaView) -> Vec<String> {
    vec![
        name.to_owned(),
        or_dash(quota.max_vms),
        or_dash(quota.max_vcpus),
        or_dash(quota.max_memory_mib.map(|m| format!("{m} MiB"))),
        or_dash(quota.budget_micros.map(format_money)),
    ]
}

pub async fn user(command: UserCommand) -> Result<()> {
    let client = Client::from_config()?;
    match command {
        UserCommand::Ls { output } => {
            let users: Vec<UserView> = client.get("/v1/users").await?;
            match output {
                Output::Json => print_json(&users),
                Output::Table => {
                    let mut table = Table::new(vec!["NAME", "CLOUD ADMIN", "CREATED"]);
                    for u in &users {
                        table.row(vec![
                            u.name.clone(),
                            if u.cloud_admin { "yes" } else { "no" }.into(),
                            u.created_at.clone(),
                        ]);
                    }
                    print!("{}", table.render());
                    Ok(())
                }
            }
        }
        UserCommand::Create {
            name,
            cloud_admin,
            project,
            role: text,
            ttl,
        } => {
            let mut request = json!({ "name": name, "cloud_admin": cloud_admin });
            if let Some(project) = project {
                request["project"] = json!(project);
                request["role"] = json!(role(&text)?);
            }
            request["token_ttl_seconds"] = json!(ttl_seconds(&ttl)?);
            let created: CreatedUser = client
                .call(Method::POST, "/v1/users", Some(&request))
                .await?;
            println!("user {} created", created.user.name);
            print_token(&created.token);
            Ok(())
        }
        UserCommand::Rm { name } => {
            client
                .call_status(Method::DELETE, &format!("/v1/users/{}", urlencode(&name)))
                .await?;
            println!("user {name} deleted; their tokens are revoked");
            Ok(())
        }
    }
}

pub async fn token(command: TokenCommand) -> Result<()> {
    let client = Client::from_config()?;
    match command {
        TokenCommand::Ls { output } => {
            let tokens: Vec<TokenView> = client.get("/v1/tokens").await?;
            match output {
                Output::Json => print_json(&tokens),
                Output::Table => {
                    let mut table =
                        Table::new(vec!["ID", "USER", "LABEL", "CREATED", "EXPIRES", "REVOKED"]);
                    for t in &tokens {
                        table.row(vec![
                            t.id.clone(),
                            t.user.clone(),
                            t.label.clone(),
                            t.created_at.clone(),
                            or_dash(t.expires_at.as_ref()),
                            or_dash(t.revoked_at.as_ref()),
                        ]);
                    }
                    print!("{}", table.render());
                    Ok(())
                }
            }
        }
        TokenCommand::Create { label, ttl, user } => {
            let request = json!({
                "label": label.unwrap_or_default(),
                "ttl_seconds": ttl_seconds(&ttl)?,
                "user": user,
            });
            let token: CreatedToken = client
                .call(Method::POST, "/v1/tokens", Some(&request))
                .await?;
            print_token(&token);
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            client
                .call_status(Method::DELETE, &format!("/v1/tokens/{}", urlencode(&id)))
                .await?;
            println!("token {id} revoked");
            Ok(())
        }
    }
}

pub async fn audit(args: AuditArgs) -> Result<()> {
    let client = Client::from_config()?;
    let mut query = vec![format!("limit={}", args.limit)];
    if let Some(project) = &args.project {
        query.push(format!("project={}", urlencode(project)));
    }
    if let Some(actor) = &args.actor {
        query.push(format!("actor={}", urlencode(actor)));
    }
    let list: AuditList = client
        .get(&format!("/v1/audit?{}", query.join("&")))
        .await?;
    match args.output {
        Output::Json => print_json(&list),
        Output::Table => {
            let mut table = Table::new(vec![
                "TIME", "ACTOR", "ACTION", "OBJECT", "PROJECT", "RESULT",
            ]);
            for e in list.items.iter().rev() {
                table.row(vec![
                    e.time.clone(),
                    e.actor.clone(),
                    e.action.clone(),
                    e.object.clone(),
                    or_dash(e.project.as_ref()),
                    format!("{} {}", e.status, e.result),
                ]);
            }
            print!("{}", table.render());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_print_as_billing_rounds_them() {
        let quota = QuotaView {
            budget_micros: Some(5_000),
            ..QuotaView::default()
        };
        assert_eq!(quota_row("p", &quota)[4], "0.01");
        assert_eq!(format_money(4_999), "0.00");
    }
}
