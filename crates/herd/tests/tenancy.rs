//! Tenancy through the CLI against a real HTTPS server process: a cloud admin makes a
//! project and a user, the user logs in by CA fingerprint and works inside the quota,
//! sees nothing of other projects, and the admin reads it all in the audit log.

mod common;

use common::{err, ok, Server};
use std::path::Path;

fn herd(config: &Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    common::herd_cli(config, env, args)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_logs_in_works_within_the_quota_and_is_audited() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(root.path(), &[]).await;
    let fingerprint = server.ca_fingerprint();
    let admin_cfg = root.path().join("admin");
    let alice_cfg = root.path().join("alice");

    let login = |cfg: &Path, token: &str| {
        herd(
            cfg,
            &[],
            &[
                "login",
                "--url",
                &server.url,
                "--token",
                token,
                "--ca-fingerprint",
                &fingerprint,
            ],
        )
    };
    assert!(ok(login(&admin_cfg, &server.token)).contains("Logged in as admin"));
    ok(herd(
        &admin_cfg,
        &[],
        &["project", "create", "team", "--max-vms", "1"],
    ));
    let created = ok(herd(
        &admin_cfg,
        &[],
        &[
            "user",
            "create",
            "alice",
            "--project",
            "team",
            "--role",
            "member",
        ],
    ));
    let token = created
        .lines()
        .find_map(|line| line.strip_prefix("token:"))
        .map(str::trim)
        .expect("the token is printed once")
        .to_owned();

    // A wrong token leaves the config as it was.
    assert!(err(login(&alice_cfg, "herd_000000000000_00")).contains("login failed"));
    assert!(ok(login(&alice_cfg, &token)).contains("Logged in as alice"));
    assert!(ok(herd(&alice_cfg, &[], &["whoami"])).contains("member  in team"));

    // Within the quota, then past it.
    ok(herd(&alice_cfg, &[], &["vm", "launch", "--no-wait", "one"]));
    let refused = err(herd(&alice_cfg, &[], &["vm", "launch", "--no-wait", "two"]));
    assert!(refused.contains("quota_exceeded"), "{refused}");
    // Nothing of the default project, and no cloud-wide routes.
    ok(herd(
        &admin_cfg,
        &[],
        &[
            "vm",
            "launch",
            "--no-wait",
            "--project",
            "default",
            "hidden",
        ],
    ));
    let listed = ok(herd(&alice_cfg, &[], &["vm", "ls"]));
    assert!(
        listed.contains("one") && !listed.contains("hidden"),
        "{listed}"
    );
    let hidden = err(herd(&alice_cfg, &[], &["vm", "show", "hidden"]));
    assert!(hidden.contains("no VM named"), "{hidden}");
    let hosts = err(herd(&alice_cfg, &[], &["host", "ls"]));
    assert!(hosts.contains("only a cloud admin"), "{hosts}");

    // Alice's own tokens: make one, revoke it, and it stops working.
    let made = ok(herd(
        &alice_cfg,
        &[],
        &["token", "create", "--label", "ci", "--ttl", "1h"],
    ));
    let id = made
        .lines()
        .find_map(|line| line.strip_prefix("token id:"))
        .map(str::trim)
        .expect("token id")
        .to_owned();
    let second = made
        .lines()
        .find_map(|line| line.strip_prefix("token:"))
        .map(str::trim)
        .expect("token")
        .to_owned();
    ok(herd(&alice_cfg, &[], &["token", "revoke", &id]));
    let revoked = err(herd(&alice_cfg, &[("HERD_TOKEN", &second)], &["whoami"]));
    assert!(revoked.contains("unauthorized"), "{revoked}");

    // The admin sees who did what.
    let audit = ok(herd(&admin_cfg, &[], &["audit", "--project", "team"]));
    for needle in ["alice", "POST /v1/vms", "quota_exceeded", "admin"] {
        assert!(audit.contains(needle), "audit lacks {needle}:\n{audit}");
    }
}
