//! A real headless Chromium, driven over the W3C WebDriver protocol by chromedriver.
//!
//! The client is the few commands the browser suite needs, over reqwest. chromedriver
//! runs in its own process group, so dropping the [`Browser`] kills it and every
//! Chromium process it started, even when a test fails midway.

use base64::Engine;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// The key WebDriver names an element by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub fn browser_present() -> bool {
    Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists()
}

pub struct Browser {
    driver: Child,
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>/session/<id>`
    session: String,
    /// The site under test, e.g. `https://127.0.0.1:7070`.
    pub site: String,
}

/// An element the browser found.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver and a headless Chromium session on `site`.
    pub async fn start(site: &str, log: &Path) -> Browser {
        use std::os::unix::process::CommandExt;
        let port = super::free_port();
        let log_file = std::fs::File::create(log).expect("chromedriver log");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::from(log_file.try_clone().expect("log")))
            .stderr(Stdio::from(log_file))
            .process_group(0)
            .spawn()
            .expect("chromedriver");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(format!("{base}/status"))
                .send()
                .await
                .ok()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // herd's own CA signed the server's certificate.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1100",
                         "--no-first-run", "--disable-extensions"],
            },
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session json");
        let id = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        let mut browser = Browser {
            driver,
            http,
            session: format!("{base}/session/{id}"),
            site: site.to_owned(),
        };
        browser.timeouts().await;
        browser
    }

    async fn timeouts(&mut self) {
        self.call(
            "POST",
            "/timeouts",
            json!({"pageLoad": 30_000, "script": 10_000}),
        )
        .await;
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        self.try_call(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"))
    }

    /// A command that may fail as the page changes under it (a stale element).
    async fn try_call(&self, method: &str, path: &str, body: Value) -> Result<Value, String> {
        let url = format!("{}{path}", self.session);
        let request = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.post(&url).json(&body),
        };
        let reply: Value = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("webdriver {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("webdriver {path}: {e}"));
        if let Some(error) = reply["value"]["error"].as_str() {
            return Err(format!("{error}: {}", reply["value"]["message"]));
        }
        Ok(reply["value"].clone())
    }

    /// Opens a page of the site (`path` like `/ui/vms`).
    pub async fn open(&self, path: &str) {
        self.call(
            "POST",
            "/url",
            json!({"url": format!("{}{path}", self.site)}),
        )
        .await;
    }

    pub async fn url(&self) -> String {
        self.call("GET", "/url", Value::Null)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let found = self
            .call(
                "POST",
                "/elements",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(|id| Element(id.to_owned())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first element matching `css`, waiting up to 10 s for it to appear.
    pub async fn find(&self, css: &str) -> Element {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(element) = self.find_all(css).await.into_iter().next() {
                return element;
            }
            assert!(
                Instant::now() < deadline,
                "no {css:?} on {}: {}",
                self.url().await,
                self.text("body").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the first element matching `css`, finding it again if a live region
    /// replaced it between the finding and the click.
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let Element(id) = self.find(css).await;
            match self
                .try_call("POST", &format!("/element/{id}/click"), json!({}))
                .await
            {
                Ok(_) => return,
                Err(e) if e.starts_with("stale element") && Instant::now() < deadline => {}
                Err(e) => panic!("click {css:?}: {e}"),
            }
        }
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let Element(id) = self.find(css).await;
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            json!({"text": text}),
        )
        .await;
    }

    /// The visible text of the first element matching `css`, or "" if there is none
    /// (or it was replaced as it was read: live regions are).
    pub async fn text(&self, css: &str) -> String {
        let Some(Element(id)) = self.find_all(css).await.into_iter().next() else {
            return String::new();
        };
        self.try_call("GET", &format!("/element/{id}/text"), Value::Null)
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Waits until the text of `css` contains `wanted`; returns it.
    pub async fn wait_text(&self, css: &str, wanted: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text(css).await;
            if text.contains(wanted) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{css:?} never said {wanted:?}; it says {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn run(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Runs a script that ends by calling `arguments[0]` with its result.
    pub async fn run_async(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/async",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Accepts the confirmation dialog a destructive form opens.
    pub async fn accept_dialog(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let url = format!("{}/alert/accept", self.session);
            let reply: Value = self
                .http
                .post(&url)
                .json(&json!({}))
                .send()
                .await
                .expect("alert")
                .json()
                .await
                .expect("alert json");
            if reply["value"]["error"].is_null() {
                return;
            }
            assert!(Instant::now() < deadline, "no dialog opened: {reply}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn cookies(&self) -> Vec<Value> {
        self.call("GET", "/cookie", Value::Null)
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Saves what the browser shows as a PNG.
    pub async fn screenshot(&self, path: &Path) {
        let data = self.call("GET", "/screenshot", Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().unwrap_or_default())
            .expect("screenshot base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }
}

/// Where the suite saves its screenshots: `docs/screenshots/` of the checkout.
pub fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/screenshots")
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver and every Chromium it started are in one process group.
        let pid = self.driver.id() as i32;
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.driver.wait();
    }
}
