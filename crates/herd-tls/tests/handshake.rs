//! Real TLS handshakes over loopback TCP against [`herd_tls::serve`].

#![allow(clippy::unwrap_used)]

use axum::routing::get;
use axum::{Extension, Router};
use herd_tls::{
    agent_key_and_csr, client_config, fetch_pinned_ca, peer_name, peer_server_config,
    server_config, Ca, PeerCert,
};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

/// Who the server thinks is calling: the client certificate's host id, or "none".
async fn whoami(Extension(peer): Extension<PeerCert>) -> String {
    peer.host
        .map(|h| h.to_string())
        .unwrap_or_else(|| "none".into())
}

struct Running {
    url: String,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

async fn start(ca: &Ca, dir: &std::path::Path) -> Running {
    let identity = ca.server_identity(dir, &[]).unwrap();
    let tls = server_config(&identity, ca).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = Router::new().route("/whoami", get(whoami));
    tokio::spawn(herd_tls::serve(listener, tls, router, async move {
        let _ = rx.await;
    }));
    Running { url, _shutdown: tx }
}

fn client(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(client_config(ca_pem, identity).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn whoami_of(client: &reqwest::Client, url: &str) -> Result<String, reqwest::Error> {
    client
        .get(format!("{url}/whoami"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await
}

/// A CA in its own directory.
fn new_ca() -> (tempfile::TempDir, Ca) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path()).unwrap();
    (dir, ca)
}

#[tokio::test]
async fn pinned_ca_is_accepted_and_another_is_not() {
    let (dir, ca) = new_ca();
    let (_other_dir, other) = new_ca();
    let server = start(&ca, dir.path()).await;
    let pinned = client(ca.pem(), None);
    assert_eq!(whoami_of(&pinned, &server.url).await.unwrap(), "none");
    let wrong = client(other.pem(), None);
    assert!(whoami_of(&wrong, &server.url).await.is_err());
    // The same server by a name its certificate carries.
    let by_name = server.url.replace("127.0.0.1", "localhost");
    assert_eq!(whoami_of(&pinned, &by_name).await.unwrap(), "none");
}

#[tokio::test]
async fn client_certificate_host_id_reaches_the_handler() {
    let (dir, ca) = new_ca();
    let server = start(&ca, dir.path()).await;
    let host = Uuid::new_v4();
    let (key, csr) = agent_key_and_csr().unwrap();
    let cert = ca.sign_agent_csr(&csr, host).unwrap();
    let agent = client(ca.pem(), Some((&cert, &key)));
    assert_eq!(
        whoami_of(&agent, &server.url).await.unwrap(),
        host.to_string()
    );
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let (dir, ca) = new_ca();
    let (_other_dir, other) = new_ca();
    let server = start(&ca, dir.path()).await;
    let (key, csr) = agent_key_and_csr().unwrap();
    let forged = other.sign_agent_csr(&csr, Uuid::new_v4()).unwrap();
    let agent = client(ca.pem(), Some((&forged, &key)));
    assert!(whoami_of(&agent, &server.url).await.is_err());
    // The server is still serving others.
    assert_eq!(
        whoami_of(&client(ca.pem(), None), &server.url)
            .await
            .unwrap(),
        "none"
    );
}

#[tokio::test]
async fn plain_http_and_silent_clients_do_not_stop_the_server() {
    let (dir, ca) = new_ca();
    let server = start(&ca, dir.path()).await;
    let plain = server.url.replace("https://", "http://");
    let answer = reqwest::Client::new()
        .get(format!("{plain}/whoami"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(answer.is_err() || !answer.unwrap().status().is_success());
    // A client that connects and says nothing holds only its own task.
    let addr = server.url.trim_start_matches("https://").to_owned();
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut garbage = tokio::net::TcpStream::connect(&addr).await.unwrap();
    garbage
        .write_all(b"\x16\x03\x01\xff\xffnonsense")
        .await
        .unwrap();
    assert_eq!(
        whoami_of(&client(ca.pem(), None), &server.url)
            .await
            .unwrap(),
        "none"
    );
    silent.write_all(b"").await.unwrap();
}

#[tokio::test]
async fn the_ca_is_fetched_only_by_its_fingerprint() {
    let (dir, ca) = new_ca();
    let (_other_dir, other) = new_ca();
    let server = start(&ca, dir.path()).await;
    let fetched = fetch_pinned_ca(&server.url, &ca.fingerprint())
        .await
        .unwrap();
    assert_eq!(fetched.trim(), ca.pem().trim());
    let err = fetch_pinned_ca(&server.url, &other.fingerprint())
        .await
        .unwrap_err();
    assert!(
        matches!(err, herd_tls::TlsError::FingerprintMismatch { .. }),
        "{err}"
    );
}

/// An agent's key and certificate (PEM) for `host`, issued by `ca`.
fn agent_identity(ca: &Ca, host: Uuid) -> (String, String) {
    let (key, csr) = agent_key_and_csr().unwrap();
    (ca.sign_agent_csr(&csr, host).unwrap(), key)
}

#[tokio::test]
async fn agents_serve_each_other_by_host_name_with_client_certificates() {
    let (_dir, ca) = new_ca();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (a_cert, a_key) = agent_identity(&ca, a);
    let identity = herd_tls::Identity::from_pem(&a_cert, &a_key).unwrap();
    let tls = peer_server_config(&identity, ca.pem()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stop) = tokio::sync::oneshot::channel::<()>();
    let router = Router::new().route("/whoami", get(whoami));
    tokio::spawn(herd_tls::serve(listener, tls, router, async move {
        let _ = stop.await;
    }));
    // B dials A by A's peer name, resolved to the listener.
    let dial = |identity: Option<(&str, &str)>, name: String| {
        reqwest::Client::builder()
            .use_preconfigured_tls(client_config(ca.pem(), identity).unwrap())
            .resolve(&name, addr)
            .timeout(Duration::from_secs(10))
            .build()
            .map(|client| (client, format!("https://{name}:{}", addr.port())))
            .unwrap()
    };
    let (b_cert, b_key) = agent_identity(&ca, b);
    let (client, url) = dial(Some((&b_cert, &b_key)), peer_name(a));
    assert_eq!(whoami_of(&client, &url).await.unwrap(), b.to_string());
    // Dialing A while meaning another host fails: A's certificate does not name it.
    let (client, url) = dial(Some((&b_cert, &b_key)), peer_name(Uuid::new_v4()));
    assert!(whoami_of(&client, &url).await.is_err());
    // Without a client certificate from the CA, A does not answer.
    let (client, url) = dial(None, peer_name(a));
    assert!(whoami_of(&client, &url).await.is_err());
    let (_other_dir, other) = new_ca();
    let (forged_cert, forged_key) = agent_identity(&other, b);
    let (client, url) = dial(Some((&forged_cert, &forged_key)), peer_name(a));
    assert!(whoami_of(&client, &url).await.is_err());
}
