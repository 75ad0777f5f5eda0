//! The web UI in a real headless Chromium against a real `herd up` with a real QEMU
//! guest: log in, launch a VM from the form, watch it become running without a reload,
//! pause and resume it, read its console and a bill, and check that a viewer is shown
//! no actions and refused them anyway. Each page's screenshot goes to
//! `docs/screenshots/`, taken in this run.

mod common;

use common::browser::{browser_present, screenshot_dir, Browser};
use common::{qemu_present, Up};
use serde_json::json;
use std::time::Duration;

/// The state badge on a VM's page.
const STATE: &str = "p.big .state";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_web_ui_runs_a_vm_in_a_real_browser() {
    if !qemu_present() || !browser_present() {
        eprintln!("skipped: needs qemu-system-x86, chromium and chromium-driver");
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let up = Up::start(root.path()).await;
    let api = up.api.clone();
    let shots = screenshot_dir();
    let browser = Browser::start(&api.url, &root.path().join("chromedriver.log")).await;

    // Every page wants a login first, and comes back after it.
    browser.open("/ui/vms").await;
    assert!(
        browser.url().await.contains("/ui/login"),
        "{}",
        browser.url().await
    );
    browser.screenshot(&shots.join("login.png")).await;
    browser.type_into("#token", "herd_not-a-token").await;
    browser.click("form.card button[type=submit]").await;
    browser
        .wait_text("p.error", "not valid", Duration::from_secs(10))
        .await;
    browser.type_into("#token", &api.token).await;
    browser.click("form.card button[type=submit]").await;
    browser
        .wait_text("h1", "VMs", Duration::from_secs(10))
        .await;
    let cookies = browser.cookies().await;
    let session = cookies
        .iter()
        .find(|c| c["name"] == "herd_session")
        .expect("a session cookie");
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["secure"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");

    // Launch from the form, with a budget that the default rate card prices.
    browser.click("a.button[href='/ui/vms/new']").await;
    browser.type_into("input[name=name]", "web").await;
    browser.type_into("input[name=memory_mib]", "128").await;
    browser.type_into("input[name=budget]", "5.00").await;
    browser.screenshot(&shots.join("launch.png")).await;
    browser.click("form.launch button[type=submit]").await;
    browser
        .wait_text("h1", "web", Duration::from_secs(10))
        .await;
    let vm_url = browser.url().await;
    let vm_id = vm_url.rsplit('/').next().expect("id").to_owned();

    // It becomes running on the page it is on: the live region updates, no reload.
    browser.run("window.__herd_no_reload = true;").await;
    browser
        .wait_text(STATE, "running", Duration::from_secs(180))
        .await;
    assert_eq!(
        browser
            .run("return window.__herd_no_reload === true;")
            .await,
        true,
        "the page reloaded"
    );
    // The guest says hello and its cost cap shows with its progress.
    browser
        .wait_text("#main", "herd-guest", Duration::from_secs(60))
        .await;

    // Pause, then resume: the page follows each.
    browser
        .click(&format!(
            "form[action='/ui/vms/{vm_id}/actions/pause'] button"
        ))
        .await;
    browser
        .wait_text(STATE, "paused", Duration::from_secs(60))
        .await;
    let vm = api.get(&format!("/v1/vms/{vm_id}")).await;
    assert_eq!(vm["state"], "paused", "{vm}");
    browser
        .click(&format!(
            "form[action='/ui/vms/{vm_id}/actions/resume'] button"
        ))
        .await;
    browser
        .wait_text(STATE, "running", Duration::from_secs(60))
        .await;

    // The console's tail (live), the list, the overview, the hosts, the audit log:
    // each shows what it should, and its picture is kept.
    let pages = [
        (
            format!("/ui/vms/{vm_id}/console"),
            "pre.console",
            "herd-guest",
            "console",
        ),
        ("/ui/vms".to_owned(), "table.vms", "web", "vms"),
        ("/ui".to_owned(), "ul.heatmap", "qemu", "overview"),
        (
            "/ui/projects".to_owned(),
            "section.project",
            "default",
            "projects",
        ),
        ("/ui/hosts".to_owned(), "table.hosts", "qemu", "hosts"),
        (
            "/ui/audit".to_owned(),
            "table.audit",
            "/ui/vms/{id}/actions/{action}",
            "audit",
        ),
    ];
    for (path, css, wanted, shot) in pages {
        browser.open(&path).await;
        browser
            .wait_text(css, wanted, Duration::from_secs(30))
            .await;
        browser.screenshot(&shots.join(format!("{shot}.png"))).await;
    }

    // The VM's page again, now that it has usage samples for its charts.
    browser.open(&format!("/ui/vms/{vm_id}")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while browser.find_all("svg.spark polyline").await.len() < 3
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    browser.screenshot(&shots.join("vm.png")).await;

    // A bill with the VM on it, priced by the default rate card.
    browser.open("/ui/billing").await;
    let bill = browser
        .wait_text("table.bill", "web", Duration::from_secs(10))
        .await;
    assert!(bill.contains("default"), "{bill}");
    browser.screenshot(&shots.join("billing.png")).await;
    let csv = browser
        .run_async("fetch('/ui/billing.csv').then(r => r.text()).then(t => arguments[0](t));")
        .await;
    let csv = csv.as_str().unwrap_or_default();
    assert!(
        csv.starts_with("vm,name,project,") && csv.contains(",web,default,"),
        "{csv}"
    );

    // A viewer: no actions shown, and the server refuses one sent anyway.
    let viewer = api
        .post(
            "/v1/users",
            json!({"name": "vera", "project": "default", "role": "viewer"}),
        )
        .await
        .expect("viewer");
    let viewer_token = viewer["token"]["token"].as_str().expect("token").to_owned();
    browser
        .click("header form[action='/ui/logout'] button")
        .await;
    browser
        .wait_text("h1", "Log in", Duration::from_secs(10))
        .await;
    browser.open(&format!("/ui/vms/{vm_id}")).await;
    browser.type_into("#token", &viewer_token).await;
    browser.click("form.card button[type=submit]").await;
    browser
        .wait_text(STATE, "running", Duration::from_secs(10))
        .await;
    assert!(
        browser.find_all("div.actions button").await.is_empty(),
        "a viewer was shown action buttons"
    );
    let csrf = browser
        .run("return document.querySelector('input[name=csrf]').value;")
        .await;
    let csrf = csrf.as_str().expect("csrf");
    let status = browser
        .run_async(&format!(
            "fetch('/ui/vms/{vm_id}/actions/stop', {{method: 'POST', body: new URLSearchParams({{csrf: '{csrf}'}})}})\
             .then(r => arguments[0](r.status));"
        ))
        .await;
    assert!(
        status.as_u64().is_some_and(|s| (400..500).contains(&s)),
        "a viewer's stop was not refused: {status}"
    );
    let vm = api.get(&format!("/v1/vms/{vm_id}")).await;
    assert_eq!(vm["desired_state"], "running", "{vm}");

    // As admin again: delete it, with the confirmation.
    browser
        .click("header form[action='/ui/logout'] button")
        .await;
    browser
        .wait_text("h1", "Log in", Duration::from_secs(10))
        .await;
    browser.open(&format!("/ui/vms/{vm_id}")).await;
    browser.type_into("#token", &api.token).await;
    browser.click("form.card button[type=submit]").await;
    browser
        .click(&format!(
            "form[action='/ui/vms/{vm_id}/actions/delete'] button"
        ))
        .await;
    browser.accept_dialog().await;
    browser
        .wait_text("h1", "VMs", Duration::from_secs(10))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = api
            .http
            .get(format!("{}/v1/vms/{vm_id}", api.url))
            .bearer_auth(&api.token)
            .send()
            .await
            .expect("get")
            .status();
        if status == 404 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the VM was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
