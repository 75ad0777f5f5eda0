//! Runs the node's utility module (`herd-util`) beside the agent: starts it with the
//! drivers' footprints, reads its samples, and starts it again when it dies, hangs or
//! talks nonsense, with a growing pause so a module that cannot run does not spin.
//!
//! The module is a child with its stdout on a pipe: when the agent dies, its next write
//! fails and it ends, so it never outlives the agent for more than an interval.

use herd_proto::node::NodeStats;
use herd_util::Source;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// A sample line longer than this is not the module speaking.
const MAX_LINE: usize = 64 * 1024;
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A module that ran this long before it died starts over from the shortest pause.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// How to run the module.
#[derive(Debug, Clone)]
pub struct UtilityConfig {
    pub program: PathBuf,
    pub interval: Duration,
}

/// The module's latest sample, and why there is none now if there is not.
#[derive(Debug, Clone, Default)]
pub struct UtilityState {
    pub stats: Option<NodeStats>,
    pub error: Option<String>,
    /// The running module's pid (for operators and tests).
    pub pid: Option<u32>,
}

/// Starts supervising the module; dropping or aborting the handle ends it.
pub fn start(
    config: UtilityConfig,
    data_dir: PathBuf,
    sources: Vec<Source>,
) -> (watch::Receiver<UtilityState>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(UtilityState::default());
    let args = herd_util::Config {
        data_dir,
        interval: config.interval,
        once: false,
        sources,
    }
    .to_args();
    let handle = tokio::spawn(supervise(config, args, tx));
    (rx, handle)
}

async fn supervise(
    config: UtilityConfig,
    args: Vec<std::ffi::OsString>,
    tx: watch::Sender<UtilityState>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let started = tokio::time::Instant::now();
        let ended = run_once(&config, &args, &tx).await;
        if started.elapsed() > HEALTHY_RUN {
            backoff = MIN_BACKOFF;
        }
        warn!("utility module {ended}; starting it again in {backoff:?}");
        tx.send_modify(|state| {
            state.error = Some(format!("utility module {ended}"));
            state.pid = None;
        });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Runs the module until it ends or must be ended; says how it ended.
async fn run_once(
    config: &UtilityConfig,
    args: &[std::ffi::OsString],
    tx: &watch::Sender<UtilityState>,
) -> String {
    let mut child = match tokio::process::Command::new(&config.program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return format!("cannot start ({}: {e})", config.program.display()),
    };
    let pid = child.id();
    info!(?pid, "utility module started");
    tx.send_modify(|state| state.pid = pid);
    let Some(stdout) = child.stdout.take() else {
        return "has no output".into();
    };
    let mut lines = BufReader::new(stdout);
    // Silence past three intervals (and a little) is a hung module.
    let silence = config.interval * 3 + Duration::from_secs(2);
    let mut line = String::new();
    let why = loop {
        line.clear();
        let read = tokio::time::timeout(silence, async {
            // Bounded: a line is read only up to MAX_LINE bytes.
            let mut limited = (&mut lines).take(MAX_LINE as u64 + 1);
            limited.read_line(&mut line).await
        });
        match read.await {
            Err(_) => break format!("said nothing for {silence:?}"),
            Ok(Err(e)) => break format!("output unreadable ({e})"),
            Ok(Ok(0)) => break String::new(),
            Ok(Ok(_)) if line.len() > MAX_LINE => break "sent an oversized line".into(),
            Ok(Ok(_)) => match serde_json::from_str::<NodeStats>(line.trim_end()) {
                Ok(stats) => tx.send_modify(|state| {
                    state.stats = Some(stats);
                    state.error = None;
                }),
                Err(e) => break format!("sent an unreadable sample ({e})"),
            },
        }
    };
    let _ = child.start_kill();
    // Reaped here, not left to PID 1.
    let status = match child.wait().await {
        Ok(status) => status.to_string(),
        Err(e) => format!("unknown status ({e})"),
    };
    if why.is_empty() {
        format!("exited ({status})")
    } else {
        format!("{why}, ended ({status})")
    }
}
